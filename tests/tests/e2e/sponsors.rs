//! Sponsor pools end to end (issue 8, item 5): a funder's top-ups, an institution's spend paid
//! by its pools in the order it joined them, every top-up and draw in the pool's ledger, and the
//! room a draw gives back in the institution's own money budget.

use carrel_tests::Gateway;
use carrel_tests::mock::MOCK_USAGE;
use reqwest::Method;
use serde_json::{Value, json};

/// What one mock answer costs at mock-model's prices (0.15 and 0.6 per million), nano-dollars.
const ANSWER_NANO: i64 = (MOCK_USAGE.0 * 150 + MOCK_USAGE.1 * 600) as i64;

async fn ask(gw: &Gateway, key: &str) -> u16 {
    gw.post(
        "/v1/chat/completions",
        key,
        &json!({"model": "mock-model", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .status()
    .as_u16()
}

async fn ok(gw: &Gateway, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, v) = gw.admin(method, path, body).await;
    assert!(status == 200 || status == 201, "{path}: {status} {v}");
    v
}

fn nano(usd: &Value) -> i64 {
    (usd.as_f64().unwrap() * 1e9).round() as i64
}

#[tokio::test]
async fn pools_pay_in_the_order_joined_and_give_the_budget_room() {
    let (_mock, gw) = Gateway::with_mock().await;
    let inst = ok(
        &gw,
        Method::POST,
        "/admin/v1/institutions",
        Some(
            json!({"name": "Funded Library", "kind": "library", "region": "US-IL",
                    "timezone": "UTC"}),
        ),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, key) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    // Room for three answers of its own money, not four.
    ok(
        &gw,
        Method::PUT,
        &format!("/admin/v1/institutions/{inst}/limits"),
        Some(json!({"cost_per_month_usd": (3.5 * ANSWER_NANO as f64) / 1e9})),
    )
    .await;

    let first = ok(
        &gw,
        Method::POST,
        "/admin/v1/sponsor-pools",
        Some(json!({"name": "State fund", "funder": "State Library"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = ok(
        &gw,
        Method::POST,
        "/admin/v1/sponsor-pools",
        Some(json!({"name": "Foundation grant", "funder": "A Foundation"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for pool in [&first, &second] {
        ok(
            &gw,
            Method::PUT,
            &format!("/admin/v1/sponsor-pools/{pool}/members/{inst}"),
            Some(json!({})),
        )
        .await;
    }
    // The first pool holds two answers' worth; the second plenty.
    let topped = ok(
        &gw,
        Method::POST,
        &format!("/admin/v1/sponsor-pools/{first}/top-ups"),
        Some(json!({"amount_usd": (2 * ANSWER_NANO) as f64 / 1e9, "note": "grant 1"})),
    )
    .await;
    assert_eq!(nano(&topped["balance_usd"]), 2 * ANSWER_NANO);
    assert_eq!(topped["members"][0]["institution_id"], inst);
    ok(
        &gw,
        Method::POST,
        &format!("/admin/v1/sponsor-pools/{second}/top-ups"),
        Some(json!({"amount_usd": 1.0})),
    )
    .await;

    for _ in 0..3 {
        assert_eq!(ask(&gw, &key).await, 200);
    }
    assert_eq!(
        ask(&gw, &key).await,
        429,
        "the institution's own budget is spent"
    );

    // Settle today so far: the first pool pays what it holds, the second the rest.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let settled = ok(
        &gw,
        Method::POST,
        &format!("/admin/v1/sponsor-pools/settle?through={today}"),
        None,
    )
    .await;
    assert_eq!(settled["draws"], 2, "{settled}");
    let ledger = |pool: String| {
        let gw = &gw;
        async move {
            ok(
                gw,
                Method::GET,
                &format!("/admin/v1/sponsor-pools/{pool}/ledger"),
                None,
            )
            .await["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["kind"].as_str().unwrap().to_owned(),
                        nano(&e["amount_usd"]),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        ledger(first.clone()).await,
        [
            ("top_up".to_owned(), 2 * ANSWER_NANO),
            ("draw".to_owned(), 2 * ANSWER_NANO)
        ]
    );
    assert_eq!(
        ledger(second.clone()).await,
        [
            ("top_up".to_owned(), 1_000_000_000),
            ("draw".to_owned(), ANSWER_NANO)
        ]
    );
    let pool = ok(
        &gw,
        Method::GET,
        &format!("/admin/v1/sponsor-pools/{first}"),
        None,
    )
    .await;
    assert_eq!(nano(&pool["balance_usd"]), 0);

    // Settling again pays nothing twice.
    let again = ok(
        &gw,
        Method::POST,
        &format!("/admin/v1/sponsor-pools/settle?through={today}"),
        None,
    )
    .await;
    assert_eq!(again["draws"], 0);
    // What the pools paid is room in the institution's own budget again.
    assert_eq!(ask(&gw, &key).await, 200);
    // The day runs on: the next settlement pays what it spent since, from the pool with money.
    let later = ok(&gw, Method::POST, "/admin/v1/sponsor-pools/settle", None).await;
    assert_eq!(later["draws"], 1, "{later}");
    assert_eq!(
        ledger(second.clone()).await,
        [
            ("top_up".to_owned(), 1_000_000_000),
            ("draw".to_owned(), ANSWER_NANO),
            ("draw".to_owned(), ANSWER_NANO)
        ]
    );
}

#[tokio::test]
async fn pools_are_the_operator_s_and_amounts_are_checked() {
    let (_mock, gw) = Gateway::with_mock().await;
    let pool = ok(
        &gw,
        Method::POST,
        "/admin/v1/sponsor-pools",
        Some(json!({"name": "Fund", "funder": "Funder"})),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let top_ups = format!("/admin/v1/sponsor-pools/{pool}/top-ups");
    for bad in [json!(0), json!(-5), json!(1e12)] {
        let (status, err) = gw
            .admin(Method::POST, &top_ups, Some(json!({"amount_usd": bad})))
            .await;
        assert_eq!(
            (status, err["error"]["param"].clone()),
            (422, json!("amount_usd"))
        );
    }
    let (status, _) = gw
        .admin(
            Method::POST,
            "/admin/v1/sponsor-pools",
            Some(json!({"name": "Fund", "funder": "Other"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/sponsor-pools/{pool}/members/inst_nope"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 404);
    let inst = gw.institution("Member").await;
    let admin = gw
        .session("member-admin", "institution_admin", Some(&inst))
        .await;
    let (status, _) = gw
        .admin_as(&admin, Method::GET, "/admin/v1/sponsor-pools", None)
        .await;
    assert_eq!(status, 403);
}
