//! Tenant isolation over every admin route, driven by the committed OpenAPI document: a new
//! route cannot be added without this sweep covering it.
//!
//! Principals of institution A (an admin's and an auditor's session, an automation token with
//! every scope and one with `read` only) call each route against institution B's resources: a
//! route naming B's record answers 404, exactly as for an id that does not exist; any other
//! route 403 or 404, never B's data. Routes that name no resource answer with A's own view,
//! which must not contain B's records either. Without a token every route is 401.

use carrel_tests::mock::MockUpstream;
use carrel_tests::{Gateway, PASSWORD, config_for};
use reqwest::Method;
use serde_json::{Value, json};

/// What B has, to aim at and to look for in answers.
struct Tenant {
    id: String,
    key_id: String,
    secret: String,
    token_id: String,
    user_id: String,
    site_id: String,
    group_id: String,
    /// An entry of B's in the audit log.
    audit_seq: i64,
}

async fn tenant(gw: &Gateway, name: &str) -> Tenant {
    let (_, inst) = gw
        .admin(
            Method::POST,
            "/admin/v1/institutions",
            Some(json!({"name": name, "kind": "school", "region": "US-IL",
                        "timezone": "America/Chicago", "sector": "k12"})),
        )
        .await;
    let id = inst["id"].as_str().unwrap().to_owned();
    let (_, site) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{id}/sites"),
            Some(json!({"name": format!("{name} campus")})),
        )
        .await;
    assert!(site["id"].is_string(), "{site}");
    let (_, group) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{id}/groups"),
            Some(json!({"name": format!("{name} class"), "kind": "class"})),
        )
        .await;
    let (_, key) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{id}/keys"),
            Some(json!({"name": format!("{name} key"), "kind": "service"})),
        )
        .await;
    let (_, token) = gw
        .admin(
            Method::POST,
            "/admin/v1/tokens",
            Some(
                json!({"name": format!("{name} automation"), "scopes": ["read"],
                        "institution_id": id}),
            ),
        )
        .await;
    let (_, user) = gw
        .admin(
            Method::POST,
            "/admin/v1/users",
            Some(
                json!({"username": format!("{}-staff", &id[5..]), "password": PASSWORD,
                        "role": "staff", "institution_id": id}),
            ),
        )
        .await;
    let audit_seq = gw
        .app
        .state
        .store
        .audit_log()
        .await
        .unwrap()
        .iter()
        .find(|e| e.institution_id.as_deref() == Some(id.as_str()))
        .expect("the institution's creation is audited")
        .seq;
    Tenant {
        audit_seq,
        user_id: user["id"].as_str().unwrap().to_owned(),
        site_id: site["id"].as_str().unwrap().to_owned(),
        group_id: group["id"].as_str().unwrap().to_owned(),
        id,
        key_id: key["id"].as_str().unwrap().to_owned(),
        secret: key["secret"].as_str().unwrap().to_owned(),
        token_id: token["id"].as_str().unwrap().to_owned(),
    }
}

/// The request the sweep sends for a documented route: the concrete path (aimed at B) and a
/// body that would be valid for B's admin. Panics for a route it does not know, so a new route
/// must be added here.
fn aimed_at(b: &Tenant, method: &str, template: &str) -> (String, Option<Value>) {
    let path = template
        .replace("/institutions/{id}", &format!("/institutions/{}", b.id))
        .replace("/keys/{id}", &format!("/keys/{}", b.key_id))
        .replace("/tokens/{id}", &format!("/tokens/{}", b.token_id))
        .replace("/users/{id}", &format!("/users/{}", b.user_id))
        .replace("/sites/{id}", &format!("/sites/{}", b.site_id))
        .replace("/groups/{id}", &format!("/groups/{}", b.group_id))
        .replace("/models/{name}", "/models/mock-model")
        .replace("/providers/{name}", "/providers/mock")
        // A pool belongs to no institution: only operators reach one.
        .replace("/sponsor-pools/{pool}", "/sponsor-pools/pool_any")
        .replace("{institution_id}", &b.id)
        .replace(
            "/audit/proof/inclusion",
            &format!("/audit/proof/inclusion?seq={}", b.audit_seq),
        )
        .replace(
            "/audit/proof/consistency",
            "/audit/proof/consistency?first=1",
        );
    let body = match (method, template) {
        ("get" | "delete", _) => None,
        ("post", "/admin/v1/institutions") => {
            Some(json!({"name": "C", "kind": "library", "region": "US-IL", "timezone": "UTC"}))
        }
        ("patch", "/admin/v1/institutions/{id}") => Some(json!({"name": "renamed"})),
        ("post", "/admin/v1/institutions/{id}/keys") => {
            Some(json!({"name": "k", "kind": "service"}))
        }
        ("post", "/admin/v1/institutions/{id}/sites") => Some(json!({"name": "x"})),
        ("post", "/admin/v1/institutions/{id}/groups") => {
            Some(json!({"name": "x", "kind": "class"}))
        }
        ("patch", "/admin/v1/keys/{id}") => Some(json!({"name": "renamed"})),
        ("post", "/admin/v1/keys/{id}/rotate") => Some(json!({})),
        ("post", "/admin/v1/users") => Some(json!({"username": "intruder", "password": PASSWORD,
                                                    "role": "staff", "institution_id": b.id})),
        ("post", "/admin/v1/tokens") => {
            Some(json!({"name": "t", "scopes": ["read"], "institution_id": b.id}))
        }
        ("post", "/admin/v1/providers") => {
            Some(json!({"name": "p", "base_url": "http://127.0.0.1:9/v1"}))
        }
        ("post", "/admin/v1/models") => {
            Some(json!({"name": "m", "provider": "mock", "tier": "baseline"}))
        }
        ("post", "/admin/v1/models/{name}/prices") => {
            Some(json!({"input_price_per_mtok": 0.0, "output_price_per_mtok": 0.0}))
        }
        ("post", "/admin/v1/sponsor-pools") => Some(json!({"name": "p", "funder": "f"})),
        ("put", "/admin/v1/sponsor-pools/{pool}/members/{institution_id}") => Some(json!({})),
        ("post", "/admin/v1/sponsor-pools/{pool}/top-ups") => Some(json!({"amount_usd": 1.0})),
        ("post", "/admin/v1/sponsor-pools/settle") => None,
        ("post", "/admin/v1/logout") => None,
        ("put", t) if t.ends_with("/limits") => Some(json!({"tokens_per_day": 10})),
        ("post", "/admin/v1/institutions/{id}/patron-extensions") => {
            Some(json!({"patron": "card-1", "tokens": 10, "expires_in_minutes": 5}))
        }
        ("post", "/admin/v1/institutions/{id}/patron-day-resets") => {
            Some(json!({"patron": "card-1"}))
        }
        ("put", "/admin/v1/institutions/{id}/patron-auth") => Some(json!({"kind": "local"})),
        ("post", "/admin/v1/institutions/{id}/patrons") => Some(json!("card,pin")),
        ("post", "/admin/v1/institutions/{id}/guest-passes") => Some(json!({"tokens": 10})),
        ("put", "/admin/v1/keys/{id}/frontier-attestation") => Some(
            json!({"use_case": "x", "expires_at": carrel_core::domain::rfc3339(
                carrel_core::domain::unix_now() + 86_400)}),
        ),
        ("put", "/admin/v1/institutions/{id}/safeguards") => Some(json!({"sets": []})),
        ("post", "/admin/v1/incidents") => Some(json!({
            "title": "t", "description": "d", "date": "2026-11-27", "alleged_deployer": "x",
            "alleged_developer": "y", "harmed_or_nearly_harmed_parties": ["patrons"],
            "implicated_model": "mock-model", "harm_type": "other", "severity": "low",
            "hazard": true, "institution_id": b.id})),
        ("patch", "/admin/v1/models/{name}" | "/admin/v1/providers/{name}") => {
            Some(json!({"contained": true}))
        }
        other => panic!("the tenant sweep has no request for {other:?}: add one"),
    };
    (path, body)
}

/// Routes that name no resource and answer with the caller's own view.
fn own_view(method: &str, template: &str) -> bool {
    method == "get"
        && matches!(
            template,
            "/admin/v1/institutions"
                | "/admin/v1/users"
                | "/admin/v1/me"
                | "/admin/v1/audit"
                | "/admin/v1/models"
                | "/admin/v1/tokens"
                | "/admin/v1/models/{name}/limits"
                | "/admin/v1/models/{name}/prices"
                // Sizes and hashes of the whole log: nobody's records.
                | "/admin/v1/audit/tree-head"
                | "/admin/v1/audit/tree-heads"
                | "/admin/v1/audit/proof/consistency"
                | "/admin/v1/incidents"
        )
}

#[tokio::test]
async fn every_admin_route_keeps_institutions_apart() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let a = tenant(&gw, "Alpha District").await;
    let b = tenant(&gw, "Bravo District").await;
    let session = gw
        .session("admin-a", "institution_admin", Some(&a.id))
        .await;
    let every_scope = json!([
        "read",
        "keys",
        "structure",
        "usage",
        "audit",
        "institutions",
        "catalog"
    ]);
    let mut tokens = Vec::new();
    for scopes in [every_scope, json!(["read"])] {
        let (status, token) = gw
            .admin_as(
                &session,
                Method::POST,
                "/admin/v1/tokens",
                Some(json!({"name": "automation of A", "scopes": scopes})),
            )
            .await;
        assert_eq!(status, 201, "{token}");
        tokens.push(token["token"].as_str().unwrap().to_owned());
    }
    let auditor = gw.session("auditor-a", "auditor", Some(&a.id)).await;
    let callers = [
        ("A's admin", &session),
        ("A's auditor", &auditor),
        ("A's all-scope token", &tokens[0]),
        ("A's read-only token", &tokens[1]),
    ];

    let spec: Value = serde_json::from_str(include_str!("../../../openapi/openapi.json")).unwrap();
    let mut swept = 0;
    for (template, item) in spec["paths"].as_object().unwrap() {
        if !template.starts_with("/admin/v1/") || template == "/admin/v1/login" {
            continue;
        }
        for method in item.as_object().unwrap().keys() {
            let (path, body) = aimed_at(&b, method, template);
            let verb = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            for (who, credential) in callers {
                if template == "/admin/v1/logout" {
                    continue; // would end A's session; it names nothing of B's
                }
                let (status, resp) = gw
                    .admin_as(credential, verb.clone(), &path, body.clone())
                    .await;
                let text = resp.to_string();
                for secret in [&b.secret, "Bravo District", "Bravo District campus"] {
                    assert!(
                        !text.contains(secret),
                        "{who}: {method} {path} leaked B ({secret}): {status} {text}"
                    );
                }
                if template.contains("{id}") {
                    // Named B's record: it does not exist for A, whatever A's role or scopes
                    // (a 403 here would tell A that the id is real).
                    assert_eq!(status, 404, "{who}: {method} {path}: {text}");
                } else if own_view(method, template) {
                    assert!(
                        status == 200 || status == 403,
                        "{who}: {method} {path}: {status}"
                    );
                    for id in [
                        &b.id,
                        &b.key_id,
                        &b.token_id,
                        &b.user_id,
                        &b.site_id,
                        &b.group_id,
                    ] {
                        assert!(
                            !text.contains(id.as_str()),
                            "{who}: {method} {path} listed B's {id}: {text}"
                        );
                    }
                } else {
                    assert!(
                        status == 403 || status == 404,
                        "{who}: {method} {path}: {status} {text}"
                    );
                }
            }
            let status = gw
                .http
                .request(verb.clone(), gw.admin_url(&path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            assert_eq!(status, 401, "{method} {path} without a token");
            swept += 1;
        }
    }
    assert!(swept >= 25, "the sweep covered only {swept} routes");

    // B is untouched: its key works, its name and token are as they were.
    let resp = gw
        .post(
            "/v1/chat/completions",
            &b.secret,
            &json!({"model": "mock-model", "messages": []}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (_, inst) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{}", b.id),
            None,
        )
        .await;
    assert_eq!(inst["name"], "Bravo District");
    let (_, tokens) = gw.admin(Method::GET, "/admin/v1/tokens", None).await;
    let b_token = tokens["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == b.token_id.as_str())
        .unwrap();
    assert!(b_token["revoked_at"].is_null(), "{b_token}");
    // And A's own key was never touched either.
    let (_, keys) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{}/keys", a.id),
            None,
        )
        .await;
    assert_eq!(keys["data"][0]["id"], a.key_id.as_str());
}
