//! Limits through the admin API: the PUT/GET contract of every level (absent leaves a limit,
//! `null` removes it), bad values that name their field, the carving rule (children never get
//! more than their parent has), tenancy, and the front desk's patron extensions and day resets,
//! which never let the patron's own id into the answer or the audit trail.

use carrel_core::quota::Level;
use carrel_tests::{ADMIN_TOKEN, Gateway};
use reqwest::Method;
use serde_json::{Value, json};

/// A card number, as a library knows its patron.
const CARD: &str = "21234000123456";

/// Creates a site (`what` = "sites") or a group ("groups") of `inst`; returns its id.
async fn member(gw: &Gateway, inst: &str, what: &str, name: &str) -> String {
    let body = match what {
        "sites" => json!({"name": name}),
        _ => json!({"name": name, "kind": "class"}),
    };
    let (status, created) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/{what}"),
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

/// Creates a key of `inst` (in `site`, if given); returns its id.
async fn key(gw: &Gateway, inst: &str, site: Option<&str>) -> String {
    let mut body = json!({"name": "desk", "kind": "kiosk"});
    if let Some(site) = site {
        body["site_id"] = json!(site);
    }
    let (status, created) = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/keys"),
            Some(body),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_owned()
}

async fn put(gw: &Gateway, path: &str, body: Value) -> (u16, Value) {
    gw.admin(Method::PUT, path, Some(body)).await
}

/// Asserts a report's shape: level, id, the six limits (`null` when unset) and the usage.
fn assert_report(report: &Value, level: &str, id: &str) {
    assert_eq!(report["level"], level, "{report}");
    assert_eq!(report["id"], id, "{report}");
    let limits = report["limits"].as_object().expect("limits object");
    let mut fields: Vec<&str> = limits.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "concurrent_streams",
            "cost_per_month_usd",
            "patron_tokens_per_day",
            "requests_per_minute",
            "tokens_per_day",
            "tokens_per_month"
        ],
        "{report}"
    );
    let usage = &report["usage"];
    for field in [
        "tokens_today",
        "tokens_this_month",
        "cost_this_month_usd",
        "concurrent_streams",
    ] {
        assert!(usage[field].is_number(), "{field}: {report}");
    }
    let day = usage["day_resets_at"].as_str().expect("day_resets_at");
    let month = usage["month_resets_at"].as_str().expect("month_resets_at");
    // RFC 3339 in UTC: comparable as text; the day never ends after the month.
    assert!(day.contains('T') && day.ends_with('Z'), "{day}");
    assert!(month.contains('T') && month.ends_with('Z'), "{month}");
    assert!(day <= month, "{day} after {month}");
}

#[tokio::test]
async fn limits_round_trip_and_absent_leaves_while_null_removes() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Round Trip Library").await;
    let path = format!("/admin/v1/institutions/{inst}/limits");

    // Nothing set yet: every limit is null, usage is zero.
    let (status, report) = gw.admin(Method::GET, &path, None).await;
    assert_eq!(status, 200, "{report}");
    assert_report(&report, "institution", &inst);
    assert!(
        report["limits"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_null)
    );
    assert_eq!(report["usage"]["tokens_today"], 0);

    let (status, set) = put(
        &gw,
        &path,
        json!({"requests_per_minute": 600, "tokens_per_day": 100000,
               "tokens_per_month": 2000000, "cost_per_month_usd": 12.5,
               "concurrent_streams": 20, "patron_tokens_per_day": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    assert_report(&set, "institution", &inst);
    assert_eq!(
        set["limits"],
        json!({"requests_per_minute": 600, "tokens_per_day": 100000,
               "tokens_per_month": 2000000, "cost_per_month_usd": 12.5,
               "concurrent_streams": 20, "patron_tokens_per_day": 5000})
    );
    let (status, got) = gw.admin(Method::GET, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(got["limits"], set["limits"]);
    // In force in the engine the data plane counts with before the response.
    let engine = gw.app.admin.quota.limits();
    let live = engine
        .get(Level::Institution, &inst)
        .expect("limits loaded");
    assert_eq!(live.tokens_per_day, Some(100_000));
    assert_eq!(live.cost_per_month_nano_usd, Some(12_500_000_000));

    // Absent leaves a limit as it is; null removes it; an empty body changes nothing.
    let (status, changed) = put(
        &gw,
        &path,
        json!({"tokens_per_day": null, "requests_per_minute": 60}),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        changed["limits"],
        json!({"requests_per_minute": 60, "tokens_per_day": null,
               "tokens_per_month": 2000000, "cost_per_month_usd": 12.5,
               "concurrent_streams": 20, "patron_tokens_per_day": 5000})
    );
    let (status, same) = put(&gw, &path, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(same["limits"], changed["limits"]);
    let engine = gw.app.admin.quota.limits();
    assert_eq!(
        engine
            .get(Level::Institution, &inst)
            .unwrap()
            .tokens_per_day,
        None
    );

    // Sites, groups and keys answer the same way.
    let site = member(&gw, &inst, "sites", "Main Branch").await;
    let group = member(&gw, &inst, "groups", "Year 9").await;
    let key_id = key(&gw, &inst, Some(&site)).await;
    for (level, id) in [("site", &site), ("group", &group), ("key", &key_id)] {
        let path = format!("/admin/v1/{level}s/{id}/limits");
        let (status, set) = put(&gw, &path, json!({"requests_per_minute": 30})).await;
        assert_eq!(status, 200, "{level}: {set}");
        assert_report(&set, level, id);
        assert_eq!(set["limits"]["requests_per_minute"], 30);
        assert!(set["limits"]["tokens_per_day"].is_null());
        let (status, got) = gw.admin(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{level}: {got}");
        assert_eq!(got["limits"], set["limits"], "{level}");
        let (status, cleared) = put(&gw, &path, json!({"requests_per_minute": null})).await;
        assert_eq!(status, 200, "{level}: {cleared}");
        assert!(
            cleared["limits"]
                .as_object()
                .unwrap()
                .values()
                .all(Value::is_null),
            "{level}: {cleared}"
        );
    }

    // Every change is in the audit trail, naming the level, the id and the limits.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let targets: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "limits.set")
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert!(
        targets
            .iter()
            .any(|t| t.starts_with(&format!("institution:{inst}"))
                && t.contains("requests_per_minute=60")),
        "{targets:?}"
    );
    assert!(
        targets
            .iter()
            .any(|t| t.starts_with(&format!("key:{key_id}"))),
        "{targets:?}"
    );
}

#[tokio::test]
async fn bad_limits_are_refused_naming_the_field() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Strict Library").await;
    let path = format!("/admin/v1/institutions/{inst}/limits");
    for (bad, param) in [
        (json!({"tokens_per_day": 0}), "tokens_per_day"),
        (json!({"tokens_per_day": -1}), "tokens_per_day"),
        (json!({"tokens_per_day": 1.5}), "tokens_per_day"),
        (json!({"tokens_per_day": "x"}), "tokens_per_day"),
        (
            json!({"tokens_per_month": 1_000_000_000_001_u64}),
            "tokens_per_month",
        ),
        (json!({"requests_per_minute": 0}), "requests_per_minute"),
        (
            json!({"concurrent_streams": 2_000_000}),
            "concurrent_streams",
        ),
        (
            json!({"patron_tokens_per_day": true}),
            "patron_tokens_per_day",
        ),
        (json!({"cost_per_month_usd": 0}), "cost_per_month_usd"),
        (json!({"cost_per_month_usd": -5.0}), "cost_per_month_usd"),
        (json!({"cost_per_month_usd": "ten"}), "cost_per_month_usd"),
        (json!({"tokens_per_week": 5}), "tokens_per_week"),
    ] {
        let (status, err) = put(&gw, &path, bad.clone()).await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{bad}: {err}"
        );
        assert_eq!(err["error"]["code"], "invalid_field", "{bad}: {err}");
        assert!(
            err["error"]["message"].as_str().unwrap().starts_with(param),
            "{bad}: {err}"
        );
    }
    // Malformed JSON and a body that is not an object: 400, with the error body.
    for raw in ["{\"tokens_per_day\": 1", "[1, 2]"] {
        let resp = gw
            .http
            .put(gw.admin_url(&path))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{raw}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_json", "{raw}: {err}");
    }
    // Nothing was written.
    let (_, report) = gw.admin(Method::GET, &path, None).await;
    assert!(
        report["limits"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_null)
    );
}

#[tokio::test]
async fn children_are_never_allotted_more_than_their_parent_has() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Carved Library").await;
    let inst_path = format!("/admin/v1/institutions/{inst}/limits");
    let north = member(&gw, &inst, "sites", "North").await;
    let south = member(&gw, &inst, "sites", "South").await;
    let north_path = format!("/admin/v1/sites/{north}/limits");
    let south_path = format!("/admin/v1/sites/{south}/limits");

    let (status, _) = put(&gw, &inst_path, json!({"tokens_per_day": 1000})).await;
    assert_eq!(status, 200);
    let (status, ok) = put(&gw, &north_path, json!({"tokens_per_day": 600})).await;
    assert_eq!(status, 200, "{ok}");

    // 600 + 500 > 1000: refused, naming both levels and the numbers.
    let (status, err) = put(&gw, &south_path, json!({"tokens_per_day": 500})).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["param"], "tokens_per_day", "{err}");
    assert_eq!(err["error"]["code"], "limit_over_parent", "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    for part in ["site", "institution", "1100", "1000"] {
        assert!(message.contains(part), "{part} missing from {message}");
    }
    // Nothing was written; what fits is allowed.
    let (_, south_report) = gw.admin(Method::GET, &south_path, None).await;
    assert!(south_report["limits"]["tokens_per_day"].is_null());
    let (status, _) = put(&gw, &south_path, json!({"tokens_per_day": 400})).await;
    assert_eq!(status, 200);

    // The parent may not be lowered below what its children are allotted (600 + 400).
    let (status, err) = put(&gw, &inst_path, json!({"tokens_per_day": 900})).await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["param"], "tokens_per_day");
    let message = err["error"]["message"].as_str().unwrap();
    for part in ["site", "institution", "1000", "900"] {
        assert!(message.contains(part), "{part} missing from {message}");
    }
    let (_, inst_report) = gw.admin(Method::GET, &inst_path, None).await;
    assert_eq!(inst_report["limits"]["tokens_per_day"], 1000);

    // Keys are carved from their site in the same way; money too.
    let (status, _) = put(&gw, &north_path, json!({"cost_per_month_usd": 10.0})).await;
    assert_eq!(status, 200);
    let desk = key(&gw, &inst, Some(&north)).await;
    let (status, err) = put(
        &gw,
        &format!("/admin/v1/keys/{desk}/limits"),
        json!({"cost_per_month_usd": 10.5}),
    )
    .await;
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"]["param"], "cost_per_month_usd");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("key") && message.contains("site"),
        "{message}"
    );

    // A per-patron allotment is a cap for each patron, not a share: never carved.
    let (status, _) = put(&gw, &inst_path, json!({"patron_tokens_per_day": 100})).await;
    assert_eq!(status, 200);
    let (status, ok) = put(&gw, &north_path, json!({"patron_tokens_per_day": 500})).await;
    assert_eq!(status, 200, "{ok}");
}

#[tokio::test]
async fn another_institutions_levels_are_not_found() {
    let (_mock, gw) = Gateway::with_mock().await;
    let a = gw.institution("Alpha Library").await;
    let b = gw.institution("Bravo Library").await;
    let b_site = member(&gw, &b, "sites", "Bravo Branch").await;
    let b_group = member(&gw, &b, "groups", "Bravo Class").await;
    let b_key = key(&gw, &b, None).await;
    let a_site = member(&gw, &a, "sites", "Alpha Branch").await;
    let a_key = key(&gw, &a, Some(&a_site)).await;
    let admin = gw
        .session("alpha-admin", "institution_admin", Some(&a))
        .await;
    let body = json!({"tokens_per_day": 10});

    for path in [
        format!("/admin/v1/institutions/{b}/limits"),
        format!("/admin/v1/sites/{b_site}/limits"),
        format!("/admin/v1/groups/{b_group}/limits"),
        format!("/admin/v1/keys/{b_key}/limits"),
    ] {
        for (method, body) in [(Method::GET, None), (Method::PUT, Some(body.clone()))] {
            let (status, err) = gw.admin_as(&admin, method.clone(), &path, body).await;
            assert_eq!(status, 404, "{method} {path}: {err}");
            assert_eq!(err["error"]["code"], "not_found");
            assert!(!err.to_string().contains("Bravo"), "{err}");
        }
    }
    for (method, path, body) in [
        (
            Method::POST,
            format!("/admin/v1/institutions/{b}/patron-extensions"),
            json!({"patron": CARD, "tokens": 10, "expires_in_minutes": 5}),
        ),
        (
            Method::POST,
            format!("/admin/v1/institutions/{b}/patron-day-resets"),
            json!({"patron": CARD}),
        ),
    ] {
        let (status, err) = gw.admin_as(&admin, method, &path, Some(body)).await;
        assert_eq!(status, 404, "{path}: {err}");
    }
    // B's limits were never touched.
    let (_, report) = gw
        .admin(Method::GET, &format!("/admin/v1/keys/{b_key}/limits"), None)
        .await;
    assert!(report["limits"]["tokens_per_day"].is_null(), "{report}");

    // Ids that do not exist are not found either, for the operator too.
    for path in [
        "/admin/v1/institutions/inst_nope/limits",
        "/admin/v1/sites/site_nope/limits",
        "/admin/v1/groups/group_nope/limits",
        "/admin/v1/keys/key_nope/limits",
        "/admin/v1/models/no-such-model/limits",
    ] {
        assert_eq!(gw.admin(Method::GET, path, None).await.0, 404, "{path}");
        assert_eq!(put(&gw, path, body.clone()).await.0, 404, "PUT {path}");
    }
    // A revoked key has no limits to show or set.
    let gone = key(&gw, &a, None).await;
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/admin/v1/keys/{gone}"), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/keys/{gone}/limits"), None)
            .await
            .0,
        404
    );

    // A's own levels are A's admin's to read and change.
    for path in [
        format!("/admin/v1/institutions/{a}/limits"),
        format!("/admin/v1/sites/{a_site}/limits"),
        format!("/admin/v1/keys/{a_key}/limits"),
    ] {
        let (status, report) = gw
            .admin_as(&admin, Method::PUT, &path, Some(body.clone()))
            .await;
        assert_eq!(status, 200, "{path}: {report}");
        let (status, _) = gw.admin_as(&admin, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{path}");
    }
}

#[tokio::test]
async fn only_admins_set_limits_and_only_operators_set_a_models() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Roles Library").await;
    let staff = gw.session("roles-staff", "staff", Some(&inst)).await;
    let auditor = gw.session("roles-auditor", "auditor", Some(&inst)).await;
    let admin = gw
        .session("roles-admin", "institution_admin", Some(&inst))
        .await;
    let site = member(&gw, &inst, "sites", "Roles Branch").await;
    let desk = key(&gw, &inst, None).await;
    let body = json!({"concurrent_streams": 3});
    for path in [
        format!("/admin/v1/institutions/{inst}/limits"),
        format!("/admin/v1/sites/{site}/limits"),
        format!("/admin/v1/keys/{desk}/limits"),
    ] {
        for who in [&staff, &auditor] {
            let (status, _) = gw
                .admin_as(who, Method::PUT, &path, Some(body.clone()))
                .await;
            assert_eq!(status, 403, "PUT {path}");
            // Reading limits and usage is theirs, as the usage report is.
            let (status, report) = gw.admin_as(who, Method::GET, &path, None).await;
            assert_eq!(status, 200, "GET {path}: {report}");
        }
    }

    // A model's limits hold within each institution; only an operator sets them.
    let path = "/admin/v1/models/mock-model/limits";
    let (status, _) = gw
        .admin_as(
            &admin,
            Method::PUT,
            path,
            Some(json!({"tokens_per_day": 1000})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, set) = put(&gw, path, json!({"tokens_per_day": 1000})).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        (&set["level"], &set["id"], &set["limits"]["tokens_per_day"]),
        (&json!("model"), &json!("mock-model"), &json!(1000))
    );
    // The operator is bound to no institution: no usage to show.
    assert!(set["usage"].is_null(), "{set}");
    let engine = gw.app.admin.quota.limits();
    assert_eq!(
        engine
            .get(Level::Model, "mock-model")
            .unwrap()
            .tokens_per_day,
        Some(1000)
    );
    // An institution's admin reads them, with the institution's own use of the model.
    let (status, got) = gw.admin_as(&admin, Method::GET, path, None).await;
    assert_eq!(status, 200, "{got}");
    assert_report(&got, "model", "mock-model");
    assert_eq!(got["limits"], set["limits"]);
}

#[tokio::test]
async fn staff_extend_and_reset_patrons_and_the_card_number_goes_nowhere() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Front Desk Library").await;
    let staff = gw.session("desk-staff", "staff", Some(&inst)).await;
    let auditor = gw.session("desk-auditor", "auditor", Some(&inst)).await;
    let extensions = format!("/admin/v1/institutions/{inst}/patron-extensions");
    let resets = format!("/admin/v1/institutions/{inst}/patron-day-resets");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // Surrounding whitespace is not part of the id.
    let (status, ext) = gw
        .admin_as(
            &staff,
            Method::POST,
            &extensions,
            Some(json!({"patron": format!(" {CARD} "), "tokens": 5000, "expires_in_minutes": 60})),
        )
        .await;
    assert_eq!(status, 201, "{ext}");
    let patron_ref = ext["patron_ref"].as_str().unwrap().to_owned();
    assert!(patron_ref.starts_with("pat_"), "{ext}");
    assert_eq!(patron_ref, gw.app.admin.pepper.patron_ref(&inst, CARD));
    assert_eq!(ext["tokens"], 5000);
    assert_eq!(ext["institution_id"], inst.as_str());
    assert!(ext["id"].as_str().unwrap().starts_with("ext_"), "{ext}");
    let expires_at = ext["expires_at"].as_i64().unwrap();
    assert!(
        (now + 3600 - 5..=now + 3600 + 60).contains(&expires_at),
        "{expires_at} is not an hour after {now}"
    );
    assert!(!ext.to_string().contains(CARD), "{ext}");
    // Stored, and running.
    let running = gw
        .app
        .admin
        .store
        .active_extensions(Some((inst.as_str(), patron_ref.as_str())), now)
        .await
        .unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].tokens, 5000);

    let (status, reset) = gw
        .admin_as(&staff, Method::POST, &resets, Some(json!({"patron": CARD})))
        .await;
    assert_eq!(status, 200, "{reset}");
    assert_eq!(reset["patron_ref"], patron_ref.as_str());
    let day = reset["day"].as_str().unwrap();
    assert!(
        day.len() == 10 && day.as_bytes()[4] == b'-' && day.as_bytes()[7] == b'-',
        "{day}"
    );
    assert!(!reset.to_string().contains(CARD), "{reset}");

    // Admins and operators may too; auditors may not.
    let (status, _) = gw
        .admin(
            Method::POST,
            &extensions,
            Some(json!({"patron": "app-user-42", "tokens": 1, "expires_in_minutes": 1440})),
        )
        .await;
    assert_eq!(status, 201);
    for (path, body) in [
        (
            &extensions,
            json!({"patron": CARD, "tokens": 5000, "expires_in_minutes": 60}),
        ),
        (&resets, json!({"patron": CARD})),
    ] {
        let (status, err) = gw.admin_as(&auditor, Method::POST, path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {err}");
    }

    // Bad bodies name their field, and never quote the patron's id back.
    for (bad, param) in [
        (
            json!({"patron": CARD, "tokens": 0, "expires_in_minutes": 60}),
            "tokens",
        ),
        (
            json!({"patron": CARD, "tokens": 1_000_000_001, "expires_in_minutes": 60}),
            "tokens",
        ),
        (
            json!({"patron": CARD, "tokens": 10, "expires_in_minutes": 0}),
            "expires_in_minutes",
        ),
        (
            json!({"patron": CARD, "tokens": 10, "expires_in_minutes": 1441}),
            "expires_in_minutes",
        ),
        (
            json!({"patron": "   ", "tokens": 10, "expires_in_minutes": 60}),
            "patron",
        ),
        (
            json!({"patron": "9".repeat(257), "tokens": 10, "expires_in_minutes": 60}),
            "patron",
        ),
        (
            json!({"patron": 21234000123456_u64, "tokens": 10, "expires_in_minutes": 60}),
            "patron",
        ),
        (json!({"tokens": 10, "expires_in_minutes": 60}), "patron"),
        (
            json!({"patron": CARD, "tokens": 10, "expires_in_minutes": 60, "note": "x"}),
            "note",
        ),
    ] {
        let (status, err) = gw
            .admin_as(&staff, Method::POST, &extensions, Some(bad.clone()))
            .await;
        assert_eq!(
            (status, err["error"]["param"].as_str()),
            (422, Some(param)),
            "{bad}: {err}"
        );
        assert!(!err.to_string().contains(CARD), "{err}");
        assert!(!err.to_string().contains("99999"), "{err}");
    }
    let (status, err) = gw
        .admin_as(&staff, Method::POST, &resets, Some(json!({"patron": ""})))
        .await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (422, Some("patron"))
    );

    // The audit trail has both actions, by the patron's reference and never by the card.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let entries = audit["data"].as_array().unwrap();
    for action in ["patron.extend", "patron.reset_day"] {
        assert!(
            entries.iter().any(|e| e["action"] == action
                && e["institution_id"] == inst.as_str()
                && e["target"].as_str().unwrap().contains(&patron_ref)),
            "no {action} of {patron_ref} in {audit}"
        );
    }
    assert!(!audit.to_string().contains(CARD), "{audit}");
    // Nor does it leak through the institution's own view of its trail.
    let admin = gw
        .session("desk-admin", "institution_admin", Some(&inst))
        .await;
    let (_, own) = gw
        .admin_as(&admin, Method::GET, "/admin/v1/audit", None)
        .await;
    assert!(own["data"].as_array().unwrap().len() >= 2, "{own}");
    assert!(!own.to_string().contains(CARD), "{own}");
}
