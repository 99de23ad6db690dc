//! Admin accounts, sessions, lockout, and isolation between institutions.

use carrel_tests::{Gateway, PASSWORD};
use reqwest::Method;
use serde_json::{Value, json};

async fn user(gw: &Gateway, username: &str, role: &str, institution: Option<&str>) -> Value {
    let mut body = json!({"username": username, "password": PASSWORD, "role": role});
    if let Some(inst) = institution {
        body["institution_id"] = json!(inst);
    }
    let (status, created) = gw.admin(Method::POST, "/admin/v1/users", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    assert!(created.get("password").is_none() && created.get("password_hash").is_none());
    created
}

async fn login(gw: &Gateway, username: &str, password: &str) -> (u16, Value) {
    let resp = gw
        .http
        .post(gw.admin_url("/admin/v1/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The session token of a successful login.
async fn login_token(gw: &Gateway, username: &str) -> String {
    let (status, session) = login(gw, username, PASSWORD).await;
    assert_eq!(status, 200, "{session}");
    session["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn login_me_and_logout() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Springfield").await;
    user(&gw, "admin@springfield", "institution_admin", Some(&inst)).await;

    let (status, session) = login(&gw, "admin@springfield", PASSWORD).await;
    assert_eq!(status, 200, "{session}");
    let token = session["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("crs_"));
    assert_eq!(session["user"]["role"], "institution_admin");

    let (status, me) = gw.admin_as(&token, Method::GET, "/admin/v1/me", None).await;
    assert_eq!(status, 200);
    assert_eq!(me["user"]["username"], "admin@springfield");
    assert_eq!(me["user"]["institution_id"], inst.as_str());

    let (status, _) = gw
        .admin_as(&token, Method::POST, "/admin/v1/logout", None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = gw.admin_as(&token, Method::GET, "/admin/v1/me", None).await;
    assert_eq!(status, 401, "the session ended");

    let (status, err) = login(&gw, "admin@springfield", "wrong password!!").await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("invalid_credentials"))
    );
    let (status, err) = login(&gw, "nobody-here", PASSWORD).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("invalid_credentials"))
    );
}

#[tokio::test]
async fn five_failed_logins_lock_the_account() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Shelbyville").await;
    user(&gw, "desk@shelbyville", "staff", Some(&inst)).await;
    for attempt in 1..=4 {
        let (status, _) = login(&gw, "desk@shelbyville", "not the password").await;
        assert_eq!(status, 401, "attempt {attempt}");
    }
    let resp = gw
        .http
        .post(gw.admin_url("/admin/v1/login"))
        .json(&json!({"username": "desk@shelbyville", "password": "not the password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "the fifth failure locks");
    let retry: i64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 15 * 60);
    let (status, err) = login(&gw, "desk@shelbyville", PASSWORD).await;
    assert_eq!(
        status, 429,
        "even the right password waits out the lock: {err}"
    );
    assert_eq!(err["error"]["code"], "account_locked");
}

#[tokio::test]
async fn user_creation_is_checked() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Capital City").await;
    let cases = [
        (
            "password",
            json!({"username": "a.user", "password": "short", "role": "staff", "institution_id": inst}),
        ),
        (
            "username",
            json!({"username": "no spaces allowed", "password": PASSWORD, "role": "staff", "institution_id": inst}),
        ),
        (
            "role",
            json!({"username": "a.user", "password": PASSWORD, "role": "overlord", "institution_id": inst}),
        ),
        (
            "institution_id",
            json!({"username": "a.user", "password": PASSWORD, "role": "staff"}),
        ),
        (
            "institution_id",
            json!({"username": "a.user", "password": PASSWORD, "role": "operator", "institution_id": inst}),
        ),
    ];
    for (field, body) in cases {
        let (status, err) = gw.admin(Method::POST, "/admin/v1/users", Some(body)).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(field)),
            "{err}"
        );
    }
    user(&gw, "a.user", "staff", Some(&inst)).await;
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/users",
               Some(json!({"username": "a.user", "password": PASSWORD, "role": "staff", "institution_id": inst})))
        .await;
    assert_eq!(status, 409);
}

/// Every admin route, called by institution A's admin against institution B's resources, or
/// outside A's role: never 2xx, never B's data. Without a token: 401.
#[tokio::test]
async fn institutions_are_isolated_from_each_other() {
    let (_mock, gw) = Gateway::with_mock().await;
    let a = gw.institution("Library A").await;
    let b = gw.institution("Library B").await;
    user(&gw, "admin-a", "institution_admin", Some(&a)).await;
    user(&gw, "admin-b", "institution_admin", Some(&b)).await;
    user(&gw, "auditor-a", "auditor", Some(&a)).await;
    let (_, b_key) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{b}/keys"),
            Some(json!({"name": "b", "kind": "service"})),
        )
        .await;
    let b_key_id = b_key["id"].as_str().unwrap().to_owned();
    let b_secret = b_key["secret"].as_str().unwrap().to_owned();
    let token_a = login_token(&gw, "admin-a").await;
    let auditor_a = login_token(&gw, "auditor-a").await;

    let key_body = json!({"name": "k", "kind": "service"});
    let user_body =
        json!({"username": "intruder", "password": PASSWORD, "role": "staff", "institution_id": b});
    let cross: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/admin/v1/institutions/{b}"), None),
        (
            Method::GET,
            format!("/admin/v1/institutions/{b}/keys"),
            None,
        ),
        (
            Method::POST,
            format!("/admin/v1/institutions/{b}/keys"),
            Some(key_body.clone()),
        ),
        (Method::DELETE, format!("/admin/v1/keys/{b_key_id}"), None),
        (
            Method::POST,
            format!("/admin/v1/keys/{b_key_id}/rotate"),
            Some(json!({})),
        ),
        (
            Method::GET,
            format!("/admin/v1/institutions/{b}/sites"),
            None,
        ),
        (
            Method::POST,
            format!("/admin/v1/institutions/{b}/sites"),
            Some(json!({"name": "x"})),
        ),
        (
            Method::GET,
            format!("/admin/v1/institutions/{b}/groups"),
            None,
        ),
        (
            Method::POST,
            format!("/admin/v1/institutions/{b}/groups"),
            Some(json!({"name": "x", "kind": "class"})),
        ),
        (Method::POST, "/admin/v1/users".into(), Some(user_body)),
        (
            Method::POST,
            "/admin/v1/users".into(),
            Some(json!({"username": "new-op", "password": PASSWORD, "role": "operator"})),
        ),
        (
            Method::POST,
            "/admin/v1/institutions".into(),
            Some(json!({"name": "C", "kind": "library", "region": "US-IL", "timezone": "UTC"})),
        ),
        (
            Method::POST,
            "/admin/v1/providers".into(),
            Some(json!({"name": "p", "base_url": "http://127.0.0.1:9/v1"})),
        ),
        (Method::GET, "/admin/v1/providers".into(), None),
        (
            Method::POST,
            "/admin/v1/models".into(),
            Some(json!({"name": "m", "provider": "mock", "tier": "baseline"})),
        ),
    ];
    for (method, path, body) in &cross {
        let (status, resp) = gw
            .admin_as(&token_a, method.clone(), path, body.clone())
            .await;
        assert!(
            status == 403 || status == 404,
            "{method} {path}: {status} {resp}"
        );
        assert!(
            !resp.to_string().contains(&b_secret) && !resp.to_string().contains("Library B"),
            "{method} {path} leaked B: {resp}"
        );
        let (status, _) = gw
            .http
            .request(method.clone(), gw.admin_url(path))
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .unwrap();
        assert_eq!(status, 401, "{method} {path} without a token");
    }

    // Lists show only A.
    let (_, list) = gw
        .admin_as(&token_a, Method::GET, "/admin/v1/institutions", None)
        .await;
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Library A"]);
    let (_, users) = gw
        .admin_as(&token_a, Method::GET, "/admin/v1/users", None)
        .await;
    assert!(
        users["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["institution_id"] == a.as_str()),
        "{users}"
    );

    // B's key still works: nothing A did touched it.
    let resp = gw
        .post(
            "/v1/chat/completions",
            &b_secret,
            &json!({"model": "mock-model", "messages": []}),
        )
        .await;
    assert_eq!(resp.status(), 200);

    // Within its own institution, A's admin manages keys; A's auditor only reads.
    let (status, own) = gw
        .admin_as(
            &token_a,
            Method::POST,
            &format!("/admin/v1/institutions/{a}/keys"),
            Some(key_body.clone()),
        )
        .await;
    assert_eq!(status, 201, "{own}");
    let (status, _) = gw
        .admin_as(
            &auditor_a,
            Method::GET,
            &format!("/admin/v1/institutions/{a}/keys"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .admin_as(
            &auditor_a,
            Method::POST,
            &format!("/admin/v1/institutions/{a}/keys"),
            Some(key_body),
        )
        .await;
    assert_eq!(status, 403);
    let own_id = own["id"].as_str().unwrap();
    let (status, _) = gw
        .admin_as(
            &auditor_a,
            Method::DELETE,
            &format!("/admin/v1/keys/{own_id}"),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = gw
        .admin_as(
            &token_a,
            Method::DELETE,
            &format!("/admin/v1/keys/{own_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn logins_are_throttled_per_address() {
    let (_mock, gw) = Gateway::with_mock().await;
    // Different usernames, so the per-account lockout never triggers: only the address counts.
    for i in 0..carrel_admin::accounts::LOGIN_BURST {
        let (status, _) = login(&gw, &format!("guess-{i}"), PASSWORD).await;
        assert_eq!(status, 401, "attempt {i} is within the burst");
    }
    let resp = gw
        .http
        .post(gw.admin_url("/admin/v1/login"))
        .json(&json!({"username": "one-more", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_logins");
}

#[tokio::test]
async fn the_audit_trail_records_who_did_what_without_secrets() {
    let (_mock, gw) = Gateway::with_mock().await;
    let a = gw.institution("Library A").await;
    let b = gw.institution("Library B").await;
    let admin_a = user(&gw, "admin-a", "institution_admin", Some(&a)).await;
    user(&gw, "auditor-a", "auditor", Some(&a)).await;
    user(&gw, "staff-a", "staff", Some(&a)).await;
    user(&gw, "admin-b", "institution_admin", Some(&b)).await;
    let token_a = login_token(&gw, "admin-a").await;
    let (_, key) = gw
        .admin_as(
            &token_a,
            Method::POST,
            &format!("/admin/v1/institutions/{a}/keys"),
            Some(json!({"name": "kiosk", "kind": "kiosk"})),
        )
        .await;
    let key_id = key["id"].as_str().unwrap();
    let secret = key["secret"].as_str().unwrap().to_owned();
    let (status, _) = gw
        .admin_as(
            &token_a,
            Method::DELETE,
            &format!("/admin/v1/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    login(&gw, "admin-a", "a wrong password").await;

    let auditor = login_token(&gw, "auditor-a").await;
    let (status, page) = gw
        .admin_as(&auditor, Method::GET, "/admin/v1/audit", None)
        .await;
    assert_eq!(status, 200, "{page}");
    let text = page.to_string();
    assert!(
        !text.contains(&secret) && !text.contains(PASSWORD) && !text.contains("a wrong password")
    );
    assert!(
        !text.contains("admin-b") && !text.contains(&b),
        "only A's entries: {page}"
    );
    let actions: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "session.login",
            "session.login_failed",
            "key.revoke",
            "key.create",
            "session.login",
            "user.create",
            "user.create",
            "user.create",
            "institution.create"
        ],
        "{page}"
    );
    let revoke = &page["data"][2];
    assert_eq!(
        revoke["actor"],
        format!("user:{}", admin_a["id"].as_str().unwrap())
    );
    assert_eq!(revoke["target"], format!("key:{key_id}"));

    // Pages follow the cursor.
    let (_, first) = gw
        .admin_as(&auditor, Method::GET, "/admin/v1/audit?limit=2", None)
        .await;
    assert_eq!(first["data"].as_array().unwrap().len(), 2);
    let cursor = first["next_cursor"].as_i64().unwrap();
    let (_, second) = gw
        .admin_as(
            &auditor,
            Method::GET,
            &format!("/admin/v1/audit?limit=2&before={cursor}"),
            None,
        )
        .await;
    assert_eq!(second["data"][0]["action"], "key.revoke");
    let (status, err) = gw
        .admin_as(&auditor, Method::GET, "/admin/v1/audit?limit=0", None)
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("limit"))
    );

    let staff = login_token(&gw, "staff-a").await;
    let (status, _) = gw
        .admin_as(&staff, Method::GET, "/admin/v1/audit", None)
        .await;
    assert_eq!(status, 403, "staff do not read the audit trail");
    let (_, all) = gw
        .admin(Method::GET, "/admin/v1/audit?limit=500", None)
        .await;
    assert!(
        all.to_string().contains(&b),
        "the operator sees every institution"
    );
}

#[tokio::test]
async fn keys_expire_and_rotate_with_an_overlap() {
    let (_mock, gw) = Gateway::with_mock().await;
    let a = gw.institution("Library A").await;
    let keys = format!("/admin/v1/institutions/{a}/keys");
    let chat = json!({"model": "mock-model", "messages": []});

    let (status, err) = gw
        .admin(
            Method::POST,
            &keys,
            Some(json!({"name": "k", "kind": "staff", "expires_at": "2001-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("expires_at"))
    );
    let (status, err) = gw
        .admin(
            Method::POST,
            &keys,
            Some(json!({"name": "k", "kind": "staff", "expires_at": "next tuesday"})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("expires_at"))
    );

    let (status, key) = gw
        .admin(
            Method::POST,
            &keys,
            Some(json!({"name": "k", "kind": "staff", "expires_at": "2099-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    assert_eq!(key["expires_at"], "2099-01-01T00:00:00Z");
    let (old_id, old_secret) = (
        key["id"].as_str().unwrap().to_owned(),
        key["secret"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &old_secret, &chat)
            .await
            .status(),
        200
    );

    // Rotation with an overlap: both keys work.
    let rotate = format!("/admin/v1/keys/{old_id}/rotate");
    let (status, second) = gw
        .admin(
            Method::POST,
            &rotate,
            Some(json!({"overlap_seconds": 3600})),
        )
        .await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["kind"], "staff");
    assert_eq!(
        second["expires_at"], "2099-01-01T00:00:00Z",
        "the new key keeps the old settings"
    );
    let second_secret = second["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.post("/v1/chat/completions", &old_secret, &chat)
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &second_secret, &chat)
            .await
            .status(),
        200
    );

    // Rotation with no overlap: the rotated key stops at once, with its own code.
    let second_id = second["id"].as_str().unwrap();
    let (status, third) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/keys/{second_id}/rotate"),
            Some(json!({"overlap_seconds": 0})),
        )
        .await;
    assert_eq!(status, 201, "{third}");
    let resp = gw.post("/v1/chat/completions", &second_secret, &chat).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "expired_api_key");
    let third_secret = third["secret"].as_str().unwrap();
    assert_eq!(
        gw.post("/v1/chat/completions", third_secret, &chat)
            .await
            .status(),
        200
    );

    let (status, err) = gw
        .admin(Method::POST, &rotate, Some(json!({"overlap_seconds": -1})))
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("overlap_seconds"))
    );
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/keys/nope/rotate", Some(json!({})))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sites_and_groups_hold_keys_of_their_own_institution_only() {
    let (_mock, gw) = Gateway::with_mock().await;
    let a = gw.institution("District A").await;
    let b = gw.institution("District B").await;
    let (status, site) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{a}/sites"),
            Some(json!({"name": "North Campus"})),
        )
        .await;
    assert_eq!(status, 201, "{site}");
    assert!(site["id"].as_str().unwrap().starts_with("site_"));
    let (status, group) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{a}/groups"),
            Some(json!({"name": "Year 9 Science", "kind": "class"})),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let (status, dup) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{a}/sites"),
            Some(json!({"name": "North Campus"})),
        )
        .await;
    assert_eq!(status, 409, "{dup}");
    let (status, err) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{a}/groups"),
            Some(json!({"name": "g", "kind": "club"})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("kind"))
    );

    let (site_id, group_id) = (site["id"].as_str().unwrap(), group["id"].as_str().unwrap());
    let (status, key) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{a}/keys"),
            Some(json!({"name": "lab", "kind": "kiosk", "site_id": site_id, "group_id": group_id})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    assert_eq!(
        (key["site_id"].as_str(), key["group_id"].as_str()),
        (Some(site_id), Some(group_id))
    );

    // Another institution's site or group cannot hold B's keys.
    let (status, err) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{b}/keys"),
            Some(json!({"name": "x", "kind": "service", "site_id": site_id})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("site_id"))
    );
    let (status, err) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{b}/keys"),
            Some(json!({"name": "x", "kind": "service", "group_id": group_id})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("group_id"))
    );

    let (_, sites) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{a}/sites"),
            None,
        )
        .await;
    assert_eq!(sites["data"].as_array().unwrap().len(), 1);
    let (_, none) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{b}/groups"),
            None,
        )
        .await;
    assert_eq!(none, json!({"data": []}));
    let (status, _) = gw
        .admin(
            Method::GET,
            "/admin/v1/institutions/inst_missing/sites",
            None,
        )
        .await;
    assert_eq!(status, 404);
}
