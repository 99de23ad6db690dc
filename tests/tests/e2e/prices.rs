//! Versioned prices end to end (issue 8, item 4): a request is priced at the version in force
//! when it ran, a version that starts later leaves today's requests alone, the provider's
//! prompt cache is priced at the cached input price, and a bad price entry is refused by
//! validation rather than breaking requests.

use carrel_tests::Gateway;
use carrel_tests::mock::{MOCK_USAGE, Reply};
use reqwest::Method;
use serde_json::{Value, json};

const PRICES: &str = "/admin/v1/models/mock-model/prices";

/// The institution's total cost so far, in US dollars.
async fn cost_so_far(gw: &Gateway, inst: &str) -> f64 {
    let (status, report) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{inst}/usage"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{report}");
    report["totals"]["cost_usd"].as_f64().unwrap()
}

async fn chat(gw: &Gateway, key: &str) {
    let resp = gw
        .post(
            "/v1/chat/completions",
            key,
            &json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[tokio::test]
async fn requests_are_priced_by_the_version_in_force_when_they_ran() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Priced Library").await;
    let (_, key) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    let (p, c) = MOCK_USAGE;

    // Before any version: the model's own prices (0.15 and 0.6 per million).
    chat(&gw, &key).await;
    let first = (p as f64 * 0.15 + c as f64 * 0.6) / 1e6;
    assert!(close(cost_so_far(&gw, &inst).await, first));

    // A version from now on, and one that starts tomorrow.
    let (status, now) = gw
        .admin(
            Method::POST,
            PRICES,
            Some(
                json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0,
                        "cached_input_price_per_mtok": 0.5}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{now}");
    let tomorrow = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    let (status, listed) = gw
        .admin(
            Method::POST,
            PRICES,
            Some(
                json!({"input_price_per_mtok": 100.0, "output_price_per_mtok": 100.0,
                        "effective_at": tomorrow.to_string()}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{listed}");
    let in_force: Vec<(Value, bool)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["input_price_per_mtok"].clone(), v["in_force"] == true))
        .collect();
    assert_eq!(
        in_force,
        [
            (json!(0.15), false),
            (json!(1.0), true),
            (json!(100.0), false)
        ]
    );
    assert_eq!(listed["data"][0]["effective_at"], Value::Null);
    assert_eq!(listed["data"][2]["cached_input_price_per_mtok"], 100.0);

    // After the change: the new version, with the provider's cached prompt tokens at the
    // cached price; tomorrow's version does not apply yet.
    let mut body = carrel_tests::mock::chat_completion("mock-model");
    body["usage"] = json!({"prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
                           "prompt_tokens_details": {"cached_tokens": 600}});
    mock.script("mock-model", Reply::Json { status: 200, body });
    chat(&gw, &key).await;
    let second = (400.0 * 1.0 + 600.0 * 0.5 + 10.0 * 2.0) / 1e6;
    let total = cost_so_far(&gw, &inst).await;
    assert!(close(total, first + second), "{total}");

    // The change is in the audit log.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    assert!(
        audit["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "model.price")
            .count()
            == 2,
        "{audit}"
    );
}

#[tokio::test]
async fn a_bad_price_entry_is_refused_and_requests_go_on() {
    let (_mock, gw) = Gateway::with_mock().await;
    let past = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let cases = [
        (
            json!({"input_price_per_mtok": -1.0, "output_price_per_mtok": 1.0}),
            "input_price_per_mtok",
        ),
        (
            json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1e9}),
            "output_price_per_mtok",
        ),
        (
            json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0,
                   "cached_input_price_per_mtok": 2.0}),
            "cached_input_price_per_mtok",
        ),
        (
            json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0,
                   "effective_at": past.to_string()}),
            "effective_at",
        ),
        (
            json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0,
                   "effective_at": "next tuesday"}),
            "effective_at",
        ),
    ];
    for (body, param) in cases {
        let (status, err) = gw.admin(Method::POST, PRICES, Some(body.clone())).await;
        assert_eq!(status, 422, "{body} → {err}");
        assert_eq!(err["error"]["param"], param, "{err}");
    }
    let (status, _) = gw
        .admin(
            Method::POST,
            PRICES,
            Some(json!({"input_price_per_mtok": "cheap", "output_price_per_mtok": 1.0})),
        )
        .await;
    assert!(status == 400 || status == 422, "{status}");
    let (status, _) = gw
        .admin(
            Method::POST,
            "/admin/v1/models/no-such-model/prices",
            Some(json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0})),
        )
        .await;
    assert_eq!(status, 404);

    // Two versions at one time: the second is a conflict, not a silent replacement.
    let at = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2)).to_string();
    let version = json!({"input_price_per_mtok": 1.0, "output_price_per_mtok": 1.0,
                         "effective_at": at});
    let (status, _) = gw.admin(Method::POST, PRICES, Some(version.clone())).await;
    assert_eq!(status, 201);
    let (status, _) = gw.admin(Method::POST, PRICES, Some(version)).await;
    assert_eq!(status, 409);

    // Only operators set prices; institution staff may read them.
    let inst = gw.institution("Staffed Library").await;
    let admin = gw
        .session("prices-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(
            &admin,
            Method::POST,
            PRICES,
            Some(json!({"input_price_per_mtok": 0.0, "output_price_per_mtok": 0.0})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, listed) = gw.admin_as(&admin, Method::GET, PRICES, None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);

    // Nothing refused broke the model.
    let (_, key) = gw
        .create_key(&inst, json!({"name": "k", "kind": "service"}))
        .await;
    chat(&gw, &key).await;
}
