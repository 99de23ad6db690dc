//! Quotas through the real server: rates, token and money budgets at every level, patrons,
//! streams (settled, estimated, cut, abandoned), the headers, `/v1/quota`, and a restart.

use std::sync::Arc;

use carrel_tests::mock::{Gate, MockUpstream, Reply, StreamScript, chat_completion};
use carrel_tests::{Gateway, config_for, error_of};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Barrier;

/// A chat request whose prompt Carrel estimates at exactly 10 tokens with the byte estimate
/// (`mock-model` is not an OpenAI model): 12 bytes → 3 tokens, + 4 for the message, + 3 that
/// prime the reply.
fn chat10(max_tokens: u64) -> Value {
    json!({"model": "mock-model", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "xxxxxxxxxxxx"}]})
}

/// The mock answers `mock-model` with this usage.
fn answer_with_usage(mock: &MockUpstream, prompt: u64, completion: u64) {
    let mut body = chat_completion("mock-model");
    body["usage"] = json!({"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion});
    mock.script("mock-model", Reply::Json { status: 200, body });
}

async fn started(extra: &str) -> (MockUpstream, Gateway, String, String) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), extra)).await;
    let (key_id, key) = gw.new_key(None).await;
    (mock, gw, key_id, key)
}

async fn institution_of(gw: &Gateway, key_id: &str) -> String {
    let key = gw.app.state.store.get_key(key_id).await.unwrap().unwrap();
    key.institution_id
}

async fn set_limits(gw: &Gateway, path: &str, limits: Value) {
    let (status, body) = gw.admin(Method::PUT, path, Some(limits)).await;
    assert_eq!(status, 200, "{path}: {body}");
}

/// 500 requests, released 200 at a time through a barrier, against a key's 10,000-token day
/// with 120-token reservations: exactly 83 are admitted, and what settles stays in the budget.
#[tokio::test]
async fn a_token_budget_holds_under_a_burst_of_500_requests() {
    let (mock, gw, key_id, key) = started("").await;
    answer_with_usage(&mock, 10, 110);
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"tokens_per_day": 10_000}),
    )
    .await;
    let gw = Arc::new(gw);
    let wide = Arc::new(Barrier::new(200));
    let rest = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (gw, key) = (Arc::clone(&gw), key.clone());
            let barrier = Arc::clone(if i < 400 { &wide } else { &rest });
            tokio::spawn(async move {
                barrier.wait().await;
                let resp = gw.post("/v1/chat/completions", &key, &chat10(110)).await;
                let status = resp.status().as_u16();
                if status == 429 {
                    assert_eq!(error_of(resp).await.1, "insufficient_quota");
                }
                status
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 83);
    let (_, report) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/keys/{key_id}/limits"),
            None,
        )
        .await;
    assert_eq!(report["usage"]["tokens_today"], 83 * 120, "{report}");
    gw.app.state.ledger.flush().await;
    let inst = institution_of(&gw, &key_id).await;
    let records = gw.app.state.store.usage_records(&inst, 1000).await.unwrap();
    assert_eq!(records.len(), 83);
    let settled: u64 = records
        .iter()
        .map(|r| r.prompt_tokens + r.completion_tokens)
        .sum();
    assert!(settled <= 10_000, "{settled}");
}

/// 64 simultaneous first requests of a patron nobody has seen: the allotment is not overshot,
/// and the card number goes nowhere.
#[tokio::test]
async fn a_new_patron_s_first_64_requests_at_once_do_not_overshoot() {
    const CARD: &str = "21234000123456";
    let (mock, gw, key_id, key) = started("").await;
    answer_with_usage(&mock, 10, 90);
    let inst = institution_of(&gw, &key_id).await;
    set_limits(
        &gw,
        &format!("/admin/v1/institutions/{inst}/limits"),
        json!({"patron_tokens_per_day": 1000}),
    )
    .await;
    let gw = Arc::new(gw);
    let barrier = Arc::new(Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (gw, key, barrier) = (Arc::clone(&gw), key.clone(), Arc::clone(&barrier));
            tokio::spawn(async move {
                let mut body = chat10(90);
                body["user"] = json!(CARD);
                barrier.wait().await;
                gw.post("/v1/chat/completions", &key, &body)
                    .await
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap() == 200);
    }
    assert_eq!(admitted, 10);
    let quota: Value = gw
        .get(&format!("/v1/quota?user={CARD}"), &key)
        .await
        .json()
        .await
        .unwrap();
    let patron = quota["levels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["level"] == "patron")
        .unwrap_or_else(|| panic!("{quota}"));
    assert_eq!(patron["tokens_per_day"]["remaining"], 0, "{quota}");
    assert!(patron["id"].is_null());
    assert!(
        quota["summary"]
            .as_str()
            .unwrap()
            .contains("allowance is used up"),
        "{quota}"
    );
    // The patron's id never reached the provider, the ledger or the quota answer.
    for r in mock.received() {
        assert!(!String::from_utf8_lossy(&r.body).contains(CARD));
        assert!(r.json().get("user").is_none());
    }
    assert!(!quota.to_string().contains(CARD));
    gw.app.state.ledger.flush().await;
    let records = gw.app.state.store.usage_records(&inst, 100).await.unwrap();
    assert_eq!(records.len(), 10);
    let pref = records[0].patron_ref.as_deref().unwrap();
    assert!(
        pref.starts_with("pat_") && !pref.contains("1234000"),
        "{pref}"
    );
}

/// Carrel asks every stream for its usage and settles to it exactly; the client that did not
/// ask never sees the usage chunk.
#[tokio::test]
async fn streams_settle_to_the_provider_s_usage_and_hide_the_chunk_nobody_asked_for() {
    let (mock, gw, key_id, key) = started("").await;
    let body = json!({"model": "mock-model", "stream": true,
                      "messages": [{"role": "user", "content": "Hours?"}]});
    let resp = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("Hello") && carrel_tests::unsigned(&text).ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(!text.contains("usage"), "{text}");
    let sent = mock.received().pop().unwrap().json();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    gw.app.state.ledger.flush().await;
    let inst = institution_of(&gw, &key_id).await;
    let r = &gw.app.state.store.usage_records(&inst, 10).await.unwrap()[0];
    let (prompt, completion) = carrel_tests::mock::MOCK_USAGE;
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.estimated),
        (prompt, completion, false)
    );
    assert_eq!(r.status.as_str(), "complete");
}

/// A provider that reports no usage for a stream: Carrel counts the streamed text with the
/// model's tokenizer, within 10% of the truth, and marks the record estimated.
#[tokio::test]
async fn a_stream_without_usage_is_estimated_within_ten_percent() {
    let extra = r#"
[[models]]
name = "gpt-model"
provider = "mock"
upstream_model = "gpt-4o-mini"
tier = "baseline"
"#;
    let (mock, gw, key_id, key) = started(extra).await;
    // Forty pieces of one token each: the provider's own count would be 40.
    let words = [
        " the", " book", " is", " on", " the", " shelf", " by", " the", " door", ".",
    ];
    let pieces: Vec<String> = words
        .iter()
        .cycle()
        .take(40)
        .map(|w| (*w).to_owned())
        .collect();
    mock.script(
        "gpt-4o-mini",
        Reply::Stream(StreamScript {
            pieces,
            usage: false,
            ..StreamScript::default()
        }),
    );
    let body = json!({"model": "gpt-model", "stream": true,
                      "messages": [{"role": "user", "content": "Where is the book?"}]});
    let resp = gw.post("/v1/chat/completions", &key, &body).await;
    let text = resp.text().await.unwrap();
    assert!(carrel_tests::unsigned(&text).ends_with("data: [DONE]\n\n"));
    gw.app.state.ledger.flush().await;
    let inst = institution_of(&gw, &key_id).await;
    let r = &gw.app.state.store.usage_records(&inst, 10).await.unwrap()[0];
    assert!(r.estimated);
    assert!(
        (36..=44).contains(&r.completion_tokens),
        "{}",
        r.completion_tokens
    );
    // "Where is the book?" is 5 tokens in o200k_base, + 4 + 3 of framing.
    assert_eq!(r.prompt_tokens, 12);
}

/// A client that leaves mid-stream: the provider's stream is cancelled, and what was
/// generated is settled once, freeing the stream slot.
#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_settled_once() {
    let (mock, gw, key_id, key) = started("").await;
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"concurrent_streams": 1}),
    )
    .await;
    let gate = Gate::new();
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["One".into(), " two".into(), " three".into()],
            usage: true,
            gate: Some(gate.clone()),
            ..StreamScript::default()
        }),
    );
    let body = json!({"model": "mock-model", "stream": true,
                      "messages": [{"role": "user", "content": "Count"}]});
    let mut resp = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.chunk().await.unwrap().is_some());
    // A second stream is refused while this one holds the only slot.
    let (status, code, _) = error_of(gw.post("/v1/chat/completions", &key, &body).await).await;
    assert_eq!((status, code.as_str()), (429, "rate_limit_exceeded"));
    drop(resp);
    gate.dropped().await;
    gw.app.state.ledger.flush().await;
    let inst = institution_of(&gw, &key_id).await;
    let records = gw.app.state.store.usage_records(&inst, 10).await.unwrap();
    assert_eq!(records.len(), 1, "settled once");
    assert_eq!(records[0].status.as_str(), "incomplete");
    assert_eq!(
        records[0].completion_tokens, 1,
        "the one piece that was generated"
    );
    // The slot is free again.
    mock.script("mock-model", Reply::Auto);
    let resp = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
}

/// A provider that streams past `max_tokens`: the stream is cut with an SSE error event.
#[tokio::test]
async fn a_stream_past_its_reservation_is_cut_with_an_error_event() {
    let (mock, gw, key_id, key) = started("").await;
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: (0..200).map(|_| " word".to_owned()).collect(),
            usage: true,
            ..StreamScript::default()
        }),
    );
    let mut body = chat10(20);
    body["stream"] = json!(true);
    let text = gw
        .post("/v1/chat/completions", &key, &body)
        .await
        .text()
        .await
        .unwrap();
    let last = carrel_tests::unsigned(&text)
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap();
    let event: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "reservation_exceeded", "{last}");
    assert!(!text.contains("[DONE]"));
    assert!(text.matches("\"content\"").count() < 30);
    gw.app.state.ledger.flush().await;
    let inst = institution_of(&gw, &key_id).await;
    let r = &gw.app.state.store.usage_records(&inst, 10).await.unwrap()[0];
    assert_eq!(r.status.as_str(), "cut");
}

/// Every inference response carries the rate-limit headers; failed requests count against the
/// rate; a 429 says which level and when to come back.
#[tokio::test]
async fn failed_requests_count_and_every_answer_says_where_it_stands() {
    let (_mock, gw, key_id, key) = started("").await;
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"requests_per_minute": 3, "tokens_per_day": 5000}),
    )
    .await;
    let bad = gw.post("/v1/chat/completions", &key, &chat10(0)).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["x-ratelimit-limit-requests"], "3");
    assert_eq!(bad.headers()["x-ratelimit-remaining-requests"], "2");
    let ok = gw.post("/v1/chat/completions", &key, &chat10(100)).await;
    assert_eq!(ok.status(), 200);
    let h = ok.headers();
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert_eq!(h["x-ratelimit-limit-tokens"], "5000");
    // 5000 - (10 + 100) reserved while the response is made.
    assert_eq!(h["x-ratelimit-remaining-tokens"], "4890");
    assert!(
        h["x-ratelimit-reset-tokens"]
            .to_str()
            .unwrap()
            .ends_with('s')
    );
    let upstream_down = gw
        .post("/v1/chat/completions", &key, &json!({"model": "nope"}))
        .await;
    assert_eq!(upstream_down.status(), 404);
    let refused = gw.post("/v1/chat/completions", &key, &chat10(100)).await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let (_, code, message) = error_of(refused).await;
    assert_eq!(code, "rate_limit_exceeded");
    assert!(
        message.contains("key level") && message.contains("3 requests per minute"),
        "{message}"
    );
}

/// Bad input gets a clear 400 naming the field; `n` choices count `n` times.
#[tokio::test]
async fn bad_input_is_refused_and_n_choices_count_n_times() {
    let (_mock, gw, key_id, key) = started("").await;
    for (body, param) in [
        (
            json!({"model": "mock-model", "max_tokens": -1}),
            "max_tokens",
        ),
        (
            json!({"model": "mock-model", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "mock-model", "max_tokens": 1_000_000_000_000u64}),
            "max_tokens",
        ),
        (
            json!({"model": "mock-model", "max_tokens": "10"}),
            "max_tokens",
        ),
        (
            json!({"model": "mock-model", "max_completion_tokens": 1.5}),
            "max_completion_tokens",
        ),
        (json!({"model": "mock-model", "n": 0}), "n"),
        (json!({"model": "mock-model", "n": 129}), "n"),
        (json!({"messages": []}), "model"),
    ] {
        let resp = gw.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "invalid_parameter", "{body}");
        assert_eq!(err["error"]["param"], param, "{body}");
    }
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"tokens_per_day": 1000}),
    )
    .await;
    let mut five = chat10(200);
    five["n"] = json!(5);
    let (status, code, message) =
        error_of(gw.post("/v1/chat/completions", &key, &five).await).await;
    assert_eq!((status, code.as_str()), (429, "insufficient_quota"));
    assert!(
        message.contains("This key's daily allowance of 1000 tokens"),
        "{message}"
    );
    let mut four = chat10(200);
    four["n"] = json!(4);
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &four).await.status(),
        200
    );
}

/// An institution that chose `clamp` gets `max_tokens` lowered to what is left.
#[tokio::test]
async fn the_clamp_policy_lowers_max_tokens_to_what_is_left() {
    let (mock, gw, key_id, key) = started("").await;
    let inst = institution_of(&gw, &key_id).await;
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/admin/v1/institutions/{inst}"),
            Some(json!({"over_quota": "clamp"})),
        )
        .await;
    assert_eq!(status, 200);
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"tokens_per_day": 100}),
    )
    .await;
    let resp = gw.post("/v1/chat/completions", &key, &chat10(500)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.received().pop().unwrap().json()["max_tokens"], 90);
}

/// A money budget, from the model's prices.
#[tokio::test]
async fn a_monthly_budget_is_spent_at_the_model_s_prices() {
    let (_mock, gw, key_id, key) = started("").await;
    let inst = institution_of(&gw, &key_id).await;
    // mock-model costs $0.15 / $0.60 per million tokens: 150 / 600 nano-dollars a token.
    set_limits(
        &gw,
        &format!("/admin/v1/institutions/{inst}/limits"),
        json!({"cost_per_month_usd": 0.0001}),
    )
    .await;
    // 10 × 150 + 100 × 600 = 61,500 of 100,000 reserved; the mock's 7 + 5 tokens settle 4,050.
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &chat10(100))
            .await
            .status(),
        200
    );
    let (status, code, message) =
        error_of(gw.post("/v1/chat/completions", &key, &chat10(200)).await).await;
    assert_eq!((status, code.as_str()), (429, "budget_exceeded"));
    assert!(
        message.contains("The institution's monthly budget"),
        "{message}"
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &chat10(150))
            .await
            .status(),
        200
    );
}

/// What was used survives a restart: the counters are rebuilt from the ledger.
#[tokio::test]
async fn usage_survives_a_restart() {
    let (mock, gw, key_id, key) = started("").await;
    answer_with_usage(&mock, 10, 90);
    set_limits(
        &gw,
        &format!("/admin/v1/keys/{key_id}/limits"),
        json!({"tokens_per_day": 250}),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(
            gw.post("/v1/chat/completions", &key, &chat10(90))
                .await
                .status(),
            200
        );
    }
    let gw = gw.restart().await;
    let quota: Value = gw.get("/v1/quota", &key).await.json().await.unwrap();
    let key_level = &quota["levels"][0];
    assert_eq!(key_level["level"], "key", "{quota}");
    assert_eq!(key_level["tokens_per_day"]["used"], 200, "{quota}");
    assert!(
        quota["summary"]
            .as_str()
            .unwrap()
            .starts_with("You have 50 tokens left today."),
        "{quota}"
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &chat10(90))
            .await
            .status(),
        429
    );
}

/// Front-desk staff give an exhausted patron a time-boxed extension, or a fresh day.
#[tokio::test]
async fn staff_extend_an_exhausted_patron_and_reset_the_day() {
    let (mock, gw, key_id, key) = started("").await;
    answer_with_usage(&mock, 10, 90);
    let inst = institution_of(&gw, &key_id).await;
    set_limits(
        &gw,
        &format!("/admin/v1/institutions/{inst}/limits"),
        json!({"patron_tokens_per_day": 100}),
    )
    .await;
    let mut body = chat10(90);
    body["user"] = json!("card-77");
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &body).await.status(),
        200
    );
    let (status, code, message) =
        error_of(gw.post("/v1/chat/completions", &key, &body).await).await;
    assert_eq!((status, code.as_str()), (429, "insufficient_quota"));
    assert!(
        message.starts_with("Your daily allowance of 100 tokens"),
        "{message}"
    );
    assert!(message.contains("America/Chicago"), "{message}");
    let staff = gw.session("desk", "staff", Some(&inst)).await;
    let (status, ext) = gw
        .admin_as(
            &staff,
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/patron-extensions"),
            Some(json!({"patron": "card-77", "tokens": 100, "expires_in_minutes": 60})),
        )
        .await;
    assert_eq!(status, 201, "{ext}");
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &body).await.status(),
        200
    );
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &body).await.status(),
        429
    );
    let (status, reset) = gw
        .admin_as(
            &staff,
            Method::POST,
            &format!("/admin/v1/institutions/{inst}/patron-day-resets"),
            Some(json!({"patron": "card-77"})),
        )
        .await;
    assert_eq!(status, 200, "{reset}");
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &body).await.status(),
        200
    );
}
