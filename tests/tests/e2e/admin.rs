//! The admin contract of issue 2, end to end.

use carrel_tests::{ADMIN_TOKEN, Gateway};
use reqwest::Method;
use serde_json::{Value, json};

fn assert_field_error(status: u16, body: &Value, field: &str) {
    assert!(status == 400 || status == 422, "status {status}: {body}");
    assert_eq!(body["error"]["param"], field, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(field),
        "{body}"
    );
}

#[tokio::test]
async fn every_admin_route_but_healthz_needs_the_token() {
    let (_mock, gw) = Gateway::with_mock().await;
    let health = gw.http.get(gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    for path in [
        "/admin/v1/institutions",
        "/admin/v1/models",
        "/admin/v1/providers",
    ] {
        let none = gw.http.get(gw.admin_url(path)).send().await.unwrap();
        assert_eq!(none.status(), 401, "{path}");
        let wrong = gw
            .http
            .get(gw.admin_url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let body: Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_admin_token");
        let right = gw
            .http
            .get(gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), 200, "{path}");
    }
    let post = gw
        .http
        .post(gw.admin_url("/admin/v1/institutions"))
        .json(&json!({"name": "x", "kind": "library", "region": "US-IL", "timezone": "UTC"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 401);
}

#[tokio::test]
async fn providers_and_models_created_through_the_api_route_at_once() {
    let (mock, gw) = Gateway::with_mock().await;
    let (status, provider) = gw
        .admin(
            Method::POST,
            "/admin/v1/providers",
            Some(json!({"name": "second", "base_url": mock.base_url(), "api_key": "sk-second"})),
        )
        .await;
    assert_eq!(status, 201, "{provider}");
    assert!(provider["id"].as_str().unwrap().starts_with("prov_"));
    assert_eq!(provider["name"], "second");
    assert_eq!(provider["has_api_key"], true);
    assert!(
        provider.get("api_key").is_none(),
        "the provider key is never returned"
    );

    let (status, model) = gw
        .admin(
            Method::POST,
            "/admin/v1/models",
            Some(json!({"name": "added", "provider": "second", "upstream_model": "added-upstream",
                        "tier": "baseline", "input_price_per_mtok": 0.1, "output_price_per_mtok": 0.4})),
        )
        .await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["tier"], "baseline");
    assert_eq!(model["upstream_model"], "added-upstream");

    let (_, key) = gw.new_key(None).await;
    let resp = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "added", "messages": []}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let sent = mock.received().pop().unwrap();
    assert_eq!(sent.json()["model"], "added-upstream");
    assert_eq!(sent.headers["authorization"], "Bearer sk-second");

    let (status, dup) = gw
        .admin(
            Method::POST,
            "/admin/v1/providers",
            Some(json!({"name": "second", "base_url": mock.base_url()})),
        )
        .await;
    assert_eq!(
        (status, dup["error"]["code"].as_str()),
        (409, Some("conflict"))
    );

    let (status, listed) = gw.admin(Method::GET, "/admin/v1/models", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"].as_array().unwrap().len(), 4);
    let (_, providers) = gw.admin(Method::GET, "/admin/v1/providers", None).await;
    let mock_provider = providers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "mock")
        .unwrap();
    assert_eq!(mock_provider["source"], "config");
    assert_eq!(mock_provider["has_api_key"], true);
}

#[tokio::test]
async fn validation_errors_name_the_field() {
    let (_mock, gw) = Gateway::with_mock().await;
    let institution = json!({"name": "Springfield", "kind": "library", "region": "US-IL",
                             "timezone": "America/Chicago"});
    let cases = [
        ("kind", json!({"kind": "castle"})),
        ("region", json!({"region": "Springfield"})),
        ("region", json!({"region": "XX-AB"})),
        ("timezone", json!({"timezone": "Mars/Olympus"})),
        ("name", json!({"name": ""})),
        ("bogus", json!({"bogus": 1})),
    ];
    for (field, patch) in cases {
        let mut body = institution.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, err) = gw
            .admin(Method::POST, "/admin/v1/institutions", Some(body))
            .await;
        assert_eq!(status, 422, "{field}: {err}");
        assert_field_error(status, &err, field);
    }
    let mut missing = institution.clone();
    missing.as_object_mut().unwrap().remove("timezone");
    let (status, err) = gw
        .admin(Method::POST, "/admin/v1/institutions", Some(missing))
        .await;
    assert_field_error(status, &err, "timezone");

    let (status, err) = gw
        .admin(
            Method::POST,
            "/admin/v1/models",
            Some(json!({"name": "m2", "provider": "mock", "tier": "ultra"})),
        )
        .await;
    assert_field_error(status, &err, "tier");
    let (status, err) = gw
        .admin(
            Method::POST,
            "/admin/v1/models",
            Some(json!({"name": "m2", "provider": "nope", "tier": "baseline"})),
        )
        .await;
    assert_field_error(status, &err, "provider");
    let (status, err) = gw
        .admin(Method::POST, "/admin/v1/models",
               Some(json!({"name": "m2", "provider": "mock", "tier": "baseline", "input_price_per_mtok": -1})))
        .await;
    assert_field_error(status, &err, "input_price_per_mtok");
    let (status, err) = gw
        .admin(
            Method::POST,
            "/admin/v1/providers",
            Some(json!({"name": "p", "base_url": "http://169.254.169.254/v1"})),
        )
        .await;
    assert_field_error(status, &err, "base_url");

    let (status, inst) = gw
        .admin(Method::POST, "/admin/v1/institutions", Some(institution))
        .await;
    assert_eq!(status, 201);
    assert!(inst["id"].as_str().unwrap().starts_with("inst_"));
    assert_eq!(inst["kind"], "library");
    let keys = format!(
        "/admin/v1/institutions/{}/keys",
        inst["id"].as_str().unwrap()
    );
    let (status, err) = gw
        .admin(
            Method::POST,
            &keys,
            Some(json!({"name": "k", "kind": "robot"})),
        )
        .await;
    assert_field_error(status, &err, "kind");

    let malformed = gw
        .http
        .post(gw.admin_url("/admin/v1/institutions"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn keys_show_their_secret_once() {
    let (_mock, gw) = Gateway::with_mock().await;
    let (status, inst) = gw
        .admin(Method::POST, "/admin/v1/institutions",
               Some(json!({"name": "Lakeside School", "kind": "school", "region": "GB-LND", "timezone": "Europe/London"})))
        .await;
    assert_eq!(status, 201);
    let id = inst["id"].as_str().unwrap();
    let (status, key) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{id}/keys"),
            Some(json!({"name": "lab", "kind": "kiosk"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().unwrap();
    assert!(secret.starts_with("crl_") && secret.contains(key["id"].as_str().unwrap()));
    assert_eq!(key["kind"], "kiosk");
    assert_eq!(key["tier_ceiling"], "advanced");

    let (status, listed) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{id}/keys"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert!(
        !listed.to_string().contains(secret),
        "listing never shows the secret"
    );
    assert!(listed[0].get("secret").is_none());

    let (status, _) = gw
        .admin(
            Method::POST,
            "/admin/v1/institutions/inst_missing/keys",
            Some(json!({"name": "k", "kind": "service"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = gw.admin(Method::DELETE, "/admin/v1/keys/nope", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_served_openapi_document_matches_the_committed_one() {
    let (_mock, gw) = Gateway::with_mock().await;
    let (status, served) = gw.admin(Method::GET, "/admin/openapi.json", None).await;
    assert_eq!(status, 200);
    let committed: Value = serde_json::from_str(include_str!("../../../openapi/openapi.json"))
        .expect("openapi/openapi.json is JSON; regenerate it with `cargo run -- openapi > openapi/openapi.json`");
    assert_eq!(
        served, committed,
        "regenerate with `cargo run -- openapi > openapi/openapi.json`"
    );
    for path in [
        "/admin/v1/providers",
        "/admin/v1/models",
        "/admin/v1/institutions",
        "/admin/v1/institutions/{id}/keys",
        "/admin/v1/keys/{id}",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} is documented");
    }
}
