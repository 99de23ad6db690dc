//! Running an institution: its settings and status, keys limited to some models, cursor pages,
//! automation tokens, and usage reports.

use carrel_tests::Gateway;
use carrel_tests::mock::{MOCK_USAGE, Reply};
use reqwest::Method;
use serde_json::{Value, json};

async fn chat(gw: &Gateway, secret: &str, model: &str) -> (u16, Value) {
    let resp = gw
        .post(
            "/v1/chat/completions",
            secret,
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn lists_page_with_cursors() {
    let (_mock, gw) = Gateway::with_mock().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(gw.institution(&format!("Library {i}")).await);
    }
    let mut seen = Vec::new();
    let mut path = "/admin/v1/institutions?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = gw.admin(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/admin/v1/institutions?limit=2&after={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, created, "every row once, in creation order");
    assert_eq!(pages, 3);

    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=x", "limit"),
        ("after=nope", "after"),
        ("colour=blue", "colour"),
    ] {
        let (status, err) = gw
            .admin(
                Method::GET,
                &format!("/admin/v1/institutions?{query}"),
                None,
            )
            .await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{query}"
        );
    }
}

#[tokio::test]
async fn suspending_an_institution_stops_its_keys_at_once() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Springfield").await;
    let (_, created) = gw
        .admin(Method::GET, &format!("/admin/v1/institutions/{inst}"), None)
        .await;
    assert_eq!(
        (
            &created["status"],
            &created["frontier_verified"],
            &created["sector"]
        ),
        (&json!("active"), &json!(false), &json!("public_library"))
    );
    let (_, secret) = gw
        .create_key(&inst, json!({"name": "k", "kind": "kiosk"}))
        .await;
    assert_eq!(chat(&gw, &secret, "mock-model").await.0, 200);
    // Frontier models wait for an operator's verification, whatever the key's ceiling.
    let (_, frontier) = gw
        .create_key(
            &inst,
            json!({"name": "f", "kind": "staff", "tier_ceiling": "frontier"}),
        )
        .await;
    let (status, err) = chat(&gw, &frontier, "frontier-model").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("frontier_not_verified"))
    );
    let admin = gw
        .session("spring-admin", "institution_admin", Some(&inst))
        .await;
    let path = format!("/admin/v1/institutions/{inst}");

    // Its admin may change the name, sector and time zone, but not govern it.
    let (status, changed) = gw
        .admin_as(
            &admin,
            Method::PATCH,
            &path,
            Some(json!({"name": "Springfield PL", "sector": null, "timezone": "America/New_York"})),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (&changed["name"], &changed["sector"], &changed["timezone"]),
        (
            &json!("Springfield PL"),
            &Value::Null,
            &json!("America/New_York")
        )
    );
    for governed in [
        json!({"status": "suspended"}),
        json!({"frontier_verified": true}),
    ] {
        let (status, _) = gw
            .admin_as(&admin, Method::PATCH, &path, Some(governed))
            .await;
        assert_eq!(status, 403);
    }
    for (bad, param) in [
        (json!({"timezone": "Mars/Base"}), "timezone"),
        (json!({"sector": "Public Library"}), "sector"),
        (json!({"status": "closed"}), "status"),
        (json!({"region": "US-CA"}), "region"),
        (json!({"name": ""}), "name"),
    ] {
        let (status, err) = gw.admin(Method::PATCH, &path, Some(bad.clone())).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{bad}"
        );
    }

    // The operator suspends it: the (cached) key is refused before the PATCH returns.
    let (status, suspended) = gw
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"status": "suspended", "frontier_verified": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(suspended["status"], "suspended");
    assert_eq!(suspended["frontier_verified"], true);
    let (status, err) = chat(&gw, &secret, "mock-model").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("institution_suspended"))
    );
    gw.admin(Method::PATCH, &path, Some(json!({"status": "active"})))
        .await;
    assert_eq!(chat(&gw, &secret, "mock-model").await.0, 200);
    assert_eq!(chat(&gw, &frontier, "frontier-model").await.0, 200);

    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"institution.govern") && actions.contains(&"institution.update"));
}

#[tokio::test]
async fn keys_can_be_limited_to_some_models_and_changed() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Limits").await;
    let (id, secret) = gw
        .create_key(
            &inst,
            json!({"name": "k", "kind": "service", "allowed_models": ["mock-model"]}),
        )
        .await;
    assert_eq!(chat(&gw, &secret, "mock-model").await.0, 200);
    let (status, err) = chat(&gw, &secret, "renamed").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("model_not_permitted"))
    );
    let models: Value = gw.get("/v1/models", &secret).await.json().await.unwrap();
    let names: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mock-model"]);

    // Lifting the limit takes effect at once, on the cached key too.
    let path = format!("/admin/v1/keys/{id}");
    let (status, changed) = gw
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"allowed_models": null, "name": "k2"})),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (&changed["allowed_models"], &changed["name"]),
        (&Value::Null, &json!("k2"))
    );
    assert_eq!(chat(&gw, &secret, "renamed").await.0, 200);

    for (bad, param) in [
        (
            json!({"allowed_models": ["no-such-model"]}),
            "allowed_models[0]",
        ),
        (
            json!({"allowed_models": ["mock-model", "mock-model"]}),
            "allowed_models[1]",
        ),
        (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"expires_at": "tomorrow"}), "expires_at"),
        (json!({"tier_ceiling": "ultra"}), "tier_ceiling"),
        (json!({"secret": "x"}), "secret"),
    ] {
        let (status, err) = gw.admin(Method::PATCH, &path, Some(bad.clone())).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{bad}"
        );
    }

    // Expiry: set, then cleared.
    let (status, changed) = gw
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"expires_at": "2099-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(
        (status, changed["expires_at"].as_str()),
        (200, Some("2099-01-01T00:00:00Z"))
    );
    let (_, changed) = gw
        .admin(Method::PATCH, &path, Some(json!({"expires_at": null})))
        .await;
    assert!(changed["expires_at"].is_null());

    // A revoked key cannot be changed.
    assert_eq!(gw.admin(Method::DELETE, &path, None).await.0, 204);
    assert_eq!(
        gw.admin(Method::PATCH, &path, Some(json!({"name": "x"})))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn automation_tokens_act_within_their_scopes_until_revoked() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Automated").await;
    let admin = gw
        .session("auto-admin", "institution_admin", Some(&inst))
        .await;
    let (status, created) = gw
        .admin_as(
            &admin,
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"name": "nightly rotation", "scopes": ["keys", "read"]})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("cra_"));
    assert_eq!(created["role"], "institution_admin");
    assert_eq!(created["institution_id"], inst.as_str());
    assert_eq!(created["scopes"], json!(["keys", "read"]));
    let token_id = created["id"].as_str().unwrap().to_owned();

    // Within scope: read and manage keys.
    let keys = format!("/admin/v1/institutions/{inst}/keys");
    let (status, made) = gw
        .admin_as(
            &token,
            Method::POST,
            &keys,
            Some(json!({"name": "k", "kind": "kiosk"})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(gw.admin_as(&token, Method::GET, &keys, None).await.0, 200);
    // Outside scope, or making tokens: 403.
    for (method, path, body) in [
        (Method::GET, "/admin/v1/audit".to_owned(), None),
        (
            Method::GET,
            format!("/admin/v1/institutions/{inst}/usage"),
            None,
        ),
        (
            Method::POST,
            format!("/admin/v1/institutions/{inst}/sites"),
            Some(json!({"name": "s"})),
        ),
        (
            Method::POST,
            "/admin/v1/tokens".to_owned(),
            Some(json!({"name": "more", "scopes": ["read"]})),
        ),
    ] {
        let (status, _) = gw.admin_as(&token, method.clone(), &path, body).await;
        assert_eq!(status, 403, "{method} {path}");
    }
    // It knows what it is, and it makes no accounts: a session of one would not be bound by
    // its scopes.
    let (_, me) = gw.admin_as(&token, Method::GET, "/admin/v1/me", None).await;
    assert_eq!(
        (&me["role"], &me["token"]["scopes"]),
        (&json!("institution_admin"), &json!(["keys", "read"]))
    );
    let (status, _) = gw
        .admin_as(
            &token,
            Method::POST,
            "/admin/v1/users",
            Some(
                json!({"username": "escape", "password": carrel_tests::PASSWORD,
                        "role": "institution_admin", "institution_id": inst}),
            ),
        )
        .await;
    assert_eq!(status, 403);
    // The audit trail names the token as the actor.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit?limit=1", None).await;
    assert_eq!(audit["data"][0]["actor"], format!("token:{token_id}"));
    // Listed without the token itself.
    let (_, listed) = gw
        .admin_as(&admin, Method::GET, "/admin/v1/tokens", None)
        .await;
    assert_eq!(listed["data"][0]["id"], token_id.as_str());
    assert!(!listed.to_string().contains(&token));

    // Staff and auditors make no tokens; bad bodies name their field.
    let staff = gw.session("auto-staff", "staff", Some(&inst)).await;
    let (status, _) = gw
        .admin_as(
            &staff,
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"name": "x", "scopes": ["read"]})),
        )
        .await;
    assert_eq!(status, 403);
    for (bad, param) in [
        (json!({"name": "x", "scopes": []}), "scopes"),
        (json!({"name": "x", "scopes": ["root"]}), "scopes[0]"),
        (
            json!({"name": "x", "scopes": ["read"], "ttl_seconds": 5}),
            "ttl_seconds",
        ),
    ] {
        let (status, err) = gw
            .admin_as(&admin, Method::POST, "/admin/v1/tokens", Some(bad.clone()))
            .await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{bad}"
        );
    }

    // An operator's account may mint a token for any institution; it acts as its admin.
    let operator = gw.session("auto-operator", "operator", None).await;
    let (status, minted) = gw
        .admin_as(
            &operator,
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"name": "provisioning", "scopes": ["read"], "institution_id": inst})),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    assert_eq!(minted["role"], "institution_admin");

    // Revoked: 401 at once.
    let (status, _) = gw
        .admin_as(
            &admin,
            Method::DELETE,
            &format!("/admin/v1/tokens/{token_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(gw.admin_as(&token, Method::GET, &keys, None).await.0, 401);

    // Deleting an account ends its sessions and revokes the tokens it made.
    let (_, second) = gw
        .admin_as(
            &admin,
            Method::POST,
            "/admin/v1/tokens",
            Some(json!({"name": "second", "scopes": ["read"]})),
        )
        .await;
    let second = second["token"].as_str().unwrap().to_owned();
    assert_eq!(gw.admin_as(&second, Method::GET, &keys, None).await.0, 200);
    let (_, me) = gw.admin_as(&admin, Method::GET, "/admin/v1/me", None).await;
    let admin_id = me["user"]["id"].as_str().unwrap().to_owned();
    let (status, _) = gw
        .admin_as(
            &staff,
            Method::DELETE,
            &format!("/admin/v1/users/{admin_id}"),
            None,
        )
        .await;
    assert_eq!(status, 403, "staff delete no accounts");
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/admin/v1/users/{admin_id}"), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(gw.admin_as(&admin, Method::GET, &keys, None).await.0, 401);
    assert_eq!(gw.admin_as(&second, Method::GET, &keys, None).await.0, 401);
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/admin/v1/users/{admin_id}"), None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn usage_is_reported_by_day_key_and_model_as_json_and_csv() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Metered").await;
    let (_, site) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/sites"),
            Some(json!({"name": "Main"})),
        )
        .await;
    let site_id = site["id"].as_str().unwrap();
    let (key_a, secret_a) = gw
        .create_key(
            &inst,
            json!({"name": "a", "kind": "kiosk", "site_id": site_id, "tier_ceiling": "advanced"}),
        )
        .await;
    let (key_b, secret_b) = gw
        .create_key(&inst, json!({"name": "b", "kind": "service"}))
        .await;
    for _ in 0..2 {
        assert_eq!(chat(&gw, &secret_a, "mock-model").await.0, 200);
    }
    assert_eq!(chat(&gw, &secret_b, "renamed").await.0, 200);
    // A stream that asks for usage is counted from its usage event.
    let streamed = gw
        .post(
            "/v1/chat/completions",
            &secret_b,
            &json!({"model": "mock-model", "messages": [], "stream": true,
                    "stream_options": {"include_usage": true}}),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(
        carrel_tests::unsigned(&streamed).ends_with("data: [DONE]\n\n"),
        "{streamed}"
    );
    // Refused requests are not usage: by the gateway, or by the provider.
    assert_eq!(chat(&gw, &secret_b, "no-such-model").await.0, 404);
    mock.script(
        "frontier-model",
        Reply::Json {
            status: 400,
            body: json!({"error": {"message": "context too long", "type": "invalid_request_error"}}),
        },
    );
    let (_, frontier) = gw
        .create_key(
            &inst,
            json!({"name": "f", "kind": "staff", "tier_ceiling": "frontier"}),
        )
        .await;
    gw.admin(
        Method::PATCH,
        &format!("/admin/v1/institutions/{inst}"),
        Some(json!({"frontier_verified": true})),
    )
    .await;
    assert_eq!(chat(&gw, &frontier, "frontier-model").await.0, 400);

    let (p, c) = MOCK_USAGE;
    let usage = format!("/admin/v1/institutions/{inst}/usage");
    let (status, by_key) = gw
        .admin(Method::GET, &format!("{usage}?group_by=key"), None)
        .await;
    assert_eq!(status, 200, "{by_key}");
    let mut expected = vec![
        json!({"group": key_a, "requests": 2, "incomplete": 0, "prompt_tokens": 2 * p, "completion_tokens": 2 * c,
               "total_tokens": 2 * (p + c), "cost_usd": 2.0 * (p as f64 * 0.15 + c as f64 * 0.6) / 1e6,
               "cached": 0, "savings_usd": 0.0}),
        json!({"group": key_b, "requests": 2, "incomplete": 0, "prompt_tokens": 2 * p, "completion_tokens": 2 * c,
               "total_tokens": 2 * (p + c), "cost_usd": (p as f64 * 0.15 + c as f64 * 0.6) / 1e6,
               "cached": 0, "savings_usd": 0.0}),
    ];
    expected.sort_by_key(|l| l["group"].as_str().unwrap().to_owned());
    assert_eq!(by_key["data"], json!(expected), "{by_key}");
    assert_eq!(by_key["totals"]["requests"], 4);
    assert_eq!(by_key["timezone"], "America/Chicago");

    let (_, by_site) = gw
        .admin(Method::GET, &format!("{usage}?group_by=site"), None)
        .await;
    let sites: Vec<(Value, Value)> = by_site["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["group"].clone(), l["requests"].clone()))
        .collect();
    assert_eq!(sites, [(Value::Null, json!(2)), (json!(site_id), json!(2))]);

    let (_, by_day) = gw.admin(Method::GET, &usage, None).await;
    let today = by_day["to"].as_str().unwrap();
    assert_eq!(by_day["data"][0]["group"], today);
    assert_eq!(by_day["data"][0]["requests"], 4);

    // CSV, for a spreadsheet.
    let resp = gw
        .http
        .get(gw.admin_url(&format!("{usage}?group_by=model&format=csv")))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = resp.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "model,requests,incomplete,prompt_tokens,completion_tokens,total_tokens,cost_usd,cached,savings_usd"
    );
    assert!(lines[1].starts_with("mock-model,3,"), "{csv}");
    assert!(lines[2].starts_with("renamed,1,"), "{csv}");

    // Staff read usage; a day range in the past is empty; bad parameters name themselves.
    let staff = gw.session("metered-staff", "staff", Some(&inst)).await;
    assert_eq!(gw.admin_as(&staff, Method::GET, &usage, None).await.0, 200);
    let (_, old) = gw
        .admin(
            Method::GET,
            &format!("{usage}?from=2020-01-01&to=2020-01-31"),
            None,
        )
        .await;
    assert_eq!(old["data"], json!([]));
    assert_eq!(old["totals"]["requests"], 0);
    for (query, param) in [
        ("group_by=patron", "group_by"),
        ("format=xml", "format"),
        ("from=yesterday", "from"),
        ("from=2026-02-01&to=2026-01-01", "from"),
        ("from=2020-01-01&to=2026-01-01", "to"),
        ("patron=1", "patron"),
    ] {
        let (status, err) = gw
            .admin(Method::GET, &format!("{usage}?{query}"), None)
            .await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{query}"
        );
    }
}
