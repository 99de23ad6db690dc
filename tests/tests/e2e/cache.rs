//! The response cache end to end (issue 8, items 1 and 2): identical concurrent requests make
//! one upstream call; no answer crosses institutions; minors, non-deterministic requests and
//! conversations with history go to the provider; a cached answer replays as a valid stream; a
//! hit costs nothing.

use std::time::Duration;

use carrel_tests::mock::{MockUpstream, Reply};
use carrel_tests::{Gateway, unsigned};
use reqwest::Method;
use serde_json::{Value, json};

fn ask(temperature: f64) -> Value {
    json!({"model": "mock-model", "temperature": temperature,
           "messages": [{"role": "user", "content": "What is a carrel?"}]})
}

/// An answer the mock gives once: a second upstream call would get a different one.
fn answer(content: &str) -> Reply {
    let mut body = carrel_tests::mock::chat_completion("mock-model");
    body["choices"][0]["message"]["content"] = json!(content);
    Reply::Json { status: 200, body }
}

fn chat_calls(mock: &MockUpstream) -> usize {
    mock.received()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count()
}

/// (status, `x-carrel-cache`, body) of one chat request.
async fn chat(
    gw: &Gateway,
    key: &str,
    body: &Value,
    header: Option<&str>,
) -> (u16, String, String) {
    let mut req = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body);
    if let Some(h) = header {
        req = req.header("x-carrel-cache", h);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-carrel-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, resp.text().await.unwrap())
}

/// A service key of each of two institutions, Springfield's first.
async fn two_institutions_keys(gw: &Gateway) -> Vec<String> {
    let mut keys = Vec::new();
    for name in ["Springfield", "Shelbyville"] {
        let inst = gw.institution(name).await;
        keys.push(
            gw.create_key(&inst, json!({"name": "desk", "kind": "service"}))
                .await
                .1,
        );
    }
    keys
}

#[tokio::test]
async fn a_hundred_identical_requests_make_one_upstream_call_and_hits_cost_nothing() {
    let (mock, gw) = Gateway::with_mock().await;
    // Slow enough that the hundred arrive while the first is still with the provider; were any
    // to reach it, it would get another answer.
    mock.script_with_latency(
        "mock-model",
        Reply::sequence(vec![answer("first"), answer("second"), answer("third")]),
        Duration::from_millis(300),
    );
    let inst = gw.institution("Springfield").await;
    let (key_id, key) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    let limits = format!("/admin/v1/keys/{key_id}/limits");
    let (status, set) = gw
        .admin(
            Method::PUT,
            &limits,
            Some(json!({"tokens_per_day": 1_000_000_000})),
        )
        .await;
    assert_eq!(status, 200, "{set}");
    let body = ask(0.0);
    let replies =
        futures_util::future::join_all((0..100).map(|_| chat(&gw, &key, &body, None))).await;

    assert_eq!(
        chat_calls(&mock),
        1,
        "one upstream call for a hundred requests"
    );
    let mut by_cache = std::collections::BTreeMap::<String, usize>::new();
    for (status, cache, text) in &replies {
        assert_eq!(*status, 200, "{text}");
        let answer: Value = serde_json::from_str(text).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "first");
        assert_eq!(text, &replies[0].2, "every answer is the same bytes");
        *by_cache.entry(cache.clone()).or_default() += 1;
    }
    assert_eq!(
        by_cache,
        [("hit".to_owned(), 99), ("miss".to_owned(), 1)].into()
    );

    // The key's budget was charged for one answer only.
    let (_, report) = gw.admin(Method::GET, &limits, None).await;
    let (prompt, completion) = carrel_tests::mock::MOCK_USAGE;
    assert_eq!(
        report["usage"]["tokens_today"],
        prompt + completion,
        "{report}"
    );
    // The ledger: one request paid for its tokens, the hits for nothing.
    gw.app.state.ledger.flush().await;
    let records = gw.app.state.store.usage_records(&inst, 200).await.unwrap();
    assert_eq!(records.len(), 100);
    let (paid, cached): (Vec<_>, Vec<_>) = records.iter().partition(|r| !r.cached);
    assert_eq!(paid.len(), 1);
    assert!(paid[0].prompt_tokens > 0);
    assert!(
        cached
            .iter()
            .all(|r| r.prompt_tokens + r.completion_tokens == 0 && r.cost_nano_usd == 0)
    );
    // Each hit saved what the provider charged for the answer; the report adds them up.
    assert!(paid[0].cost_nano_usd > 0 && paid[0].saved_nano_usd == 0);
    assert!(
        cached
            .iter()
            .all(|r| r.saved_nano_usd == paid[0].cost_nano_usd)
    );
    let (_, usage) = gw
        .admin(
            Method::GET,
            &format!("/admin/v1/institutions/{inst}/usage"),
            None,
        )
        .await;
    assert_eq!(usage["totals"]["requests"], 100, "{usage}");
    assert_eq!(usage["totals"]["cached"], 99, "{usage}");
    let savings = usage["totals"]["savings_usd"].as_f64().unwrap();
    let expected = 99.0 * paid[0].cost_nano_usd as f64 / 1e9;
    assert!(
        (savings - expected).abs() < 1e-12,
        "{savings} vs {expected}"
    );
    let metrics = gw.metrics().await;
    let count = |result: &str| {
        carrel_tests::metric(
            &metrics,
            &format!("carrel_cache_requests_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("miss"), 1);
    assert_eq!(count("hit") + count("coalesced"), 99);
    assert!(metrics.contains("# TYPE carrel_cache_answers gauge\ncarrel_cache_answers 1\n"));
}

#[tokio::test]
async fn answers_stay_in_their_institution_and_only_deterministic_requests_use_the_cache() {
    let (mock, gw) = Gateway::with_mock().await;
    let keys = two_institutions_keys(&gw).await;
    let body = ask(0.0);
    assert_eq!(chat(&gw, &keys[0], &body, None).await.1, "miss");
    assert_eq!(chat(&gw, &keys[0], &body, None).await.1, "hit");
    // The other institution asks the provider itself.
    assert_eq!(chat(&gw, &keys[1], &body, None).await.1, "miss");
    assert_eq!(chat_calls(&mock), 2);

    // Sampled answers, an explicit bypass and a conversation with history go to the provider
    // every time.
    let sampled = ask(0.7);
    let mut history = ask(0.0);
    history["messages"] = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is a carrel?"}
    ]);
    for _ in 0..2 {
        assert_eq!(chat(&gw, &keys[0], &sampled, None).await.1, "bypass");
        assert_eq!(chat(&gw, &keys[0], &body, Some("bypass")).await.1, "bypass");
        assert_eq!(chat(&gw, &keys[0], &history, None).await.1, "bypass");
    }
    assert_eq!(chat_calls(&mock), 8);
    // A client may opt a sampled request in.
    assert_eq!(chat(&gw, &keys[0], &sampled, Some("allow")).await.1, "miss");
    assert_eq!(chat(&gw, &keys[0], &sampled, Some("allow")).await.1, "hit");
    assert_eq!(chat_calls(&mock), 9);
}

#[tokio::test]
async fn a_minor_s_request_is_never_served_from_the_cache() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Riverside").await;
    gw.local_patrons(
        &inst,
        "card,pin,age_band\n1001,1111,minor\n2002,2222,adult\n",
    )
    .await;
    let (_, kiosk) = gw
        .create_key(&inst, json!({"name": "Kiosk", "kind": "kiosk"}))
        .await;
    let body = ask(0.0);
    let adult = gw.patron_session(&kiosk, "2002", "2222").await;
    assert_eq!(chat(&gw, &adult, &body, None).await.1, "miss");
    assert_eq!(chat(&gw, &adult, &body, None).await.1, "hit");
    // The same question from a minor at the same kiosk (signing in ends the adult's session):
    // not from the cache, even when the client asks for it.
    let minor = gw.patron_session(&kiosk, "1001", "1111").await;
    assert_eq!(chat(&gw, &minor, &body, None).await.1, "bypass");
    assert_eq!(chat(&gw, &minor, &body, Some("allow")).await.1, "bypass");
    assert_eq!(chat_calls(&mock), 3);
}

#[tokio::test]
async fn a_cached_answer_replays_as_a_valid_stream() {
    let (mock, gw) = Gateway::with_mock().await;
    mock.script("mock-model", answer("Carrels are study desks."));
    let inst = gw.institution("Springfield").await;
    let (_, key) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    let body = ask(0.0);
    assert_eq!(chat(&gw, &key, &body, None).await.1, "miss");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-carrel-cache"], "hit");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = unsigned(&text)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(*last, "data: [DONE]");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Carrels are study desks.");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(
        chunks.last().unwrap()["usage"]["total_tokens"],
        carrel_tests::mock::chat_completion("m")["usage"]["total_tokens"]
    );
    assert_eq!(chat_calls(&mock), 1);
}

/// A request whose `max_tokens` the quota lowered (the institution's `clamp` policy) gets an
/// answer cut to its caller's allowance: it is neither stored for others nor served from what
/// others were answered.
#[tokio::test]
async fn an_answer_clamped_to_one_key_s_allowance_is_not_shared() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Springfield").await;
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/admin/v1/institutions/{inst}"),
            Some(json!({"over_quota": "clamp"})),
        )
        .await;
    assert_eq!(status, 200);
    let (short_id, short) = gw
        .create_key(&inst, json!({"name": "almost spent", "kind": "service"}))
        .await;
    let (_, full) = gw
        .create_key(&inst, json!({"name": "plenty", "kind": "service"}))
        .await;
    let (status, body) = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/keys/{short_id}/limits"),
            Some(json!({"tokens_per_day": 100})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut body = ask(0.0);
    body["max_tokens"] = json!(500);
    assert_eq!(chat(&gw, &short, &body, None).await.1, "bypass");
    let clamped = mock.received().pop().unwrap().json()["max_tokens"]
        .as_u64()
        .unwrap();
    assert!(clamped < 100, "clamped to what is left: {clamped}");
    // The key with room asks for the whole answer; then the clamped key still may not take it.
    assert_eq!(chat(&gw, &full, &body, None).await.1, "miss");
    assert_eq!(chat(&gw, &full, &body, None).await.1, "hit");
    assert_eq!(chat(&gw, &short, &body, None).await.1, "bypass");
    assert_eq!(chat_calls(&mock), 3);
}

/// An institution may opt every request into the cache and put a price on a cached answer:
/// a hit then costs that share of what the provider charged, counted against the money
/// budget, and the rest is what the report shows as saved.
#[tokio::test]
async fn an_institution_opts_in_and_prices_its_cached_answers() {
    let (mock, gw) = Gateway::with_mock().await;
    let inst = gw.institution("Shelbyville").await;
    let settings = format!("/admin/v1/institutions/{inst}");
    let (status, err) = gw
        .admin(
            Method::PATCH,
            &settings,
            Some(json!({"cache_price_percent": 101})),
        )
        .await;
    assert_eq!(
        (status, err["error"]["param"].clone()),
        (422, json!("cache_price_percent"))
    );
    let (_, key) = gw
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    // Not deterministic: without the institution's opt-in the cache stays out of it.
    let warm = ask(0.7);
    assert_eq!(chat(&gw, &key, &warm, None).await.1, "bypass");
    let (status, set) = gw
        .admin(
            Method::PATCH,
            &settings,
            Some(json!({"cache_all": true, "cache_price_percent": 25})),
        )
        .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        (set["cache_all"].clone(), set["cache_price_percent"].clone()),
        (json!(true), json!(25))
    );
    assert_eq!(chat(&gw, &key, &warm, None).await.1, "miss");
    assert_eq!(chat(&gw, &key, &warm, None).await.1, "hit");
    assert_eq!(chat_calls(&mock), 2);

    gw.app.state.ledger.flush().await;
    let records = gw.app.state.store.usage_records(&inst, 10).await.unwrap();
    let paid = records.iter().rfind(|r| !r.cached).unwrap();
    let hit = records.iter().find(|r| r.cached).unwrap();
    let full = paid.cost_nano_usd;
    assert!(full > 0);
    assert_eq!(hit.cost_nano_usd, full * 25 / 100);
    assert_eq!(hit.saved_nano_usd, full - full * 25 / 100);
}

/// With `cache.shared`, an answer one replica bought serves another replica: the second asks
/// the shared tier in Redis, not the provider.
#[tokio::test]
async fn the_shared_tier_serves_an_answer_to_another_replica() {
    let mock = MockUpstream::start().await;
    let prefix = carrel_tests::redis_prefix("shared-cache");
    let toml = carrel_tests::config_for(
        &mock.base_url(),
        &format!(
            "{}[cache]\nshared = true\n",
            carrel_tests::redis_store_toml(&prefix)
        ),
    );
    let a = Gateway::start(&toml).await;
    let b = Gateway::start(&toml).await;
    let inst = a.institution("Two Branch Library").await;
    let (_, key) = a
        .create_key(&inst, json!({"name": "desk", "kind": "service"}))
        .await;
    let body = ask(0.0);
    assert_eq!(chat(&a, &key, &body, None).await.1, "miss");
    // A stores the answer in Redis beside answering; B learns of the key from the replicated
    // log within moments (until then it refuses it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while carrel_tests::metric(&a.metrics().await, "carrel_cache_shared_stored_total") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "A never stored the answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = loop {
        let (status, cache, _) = chat(&b, &key, &body, None).await;
        if status != 401 {
            break (status, cache);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never learned the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(served, (200, "hit".to_owned()));
    assert_eq!(chat_calls(&mock), 1, "one answer bought for both replicas");
    let metrics = b.metrics().await;
    assert_eq!(
        carrel_tests::metric(&metrics, "carrel_cache_shared_hits_total"),
        1
    );
    assert_eq!(
        carrel_tests::metric(&metrics, "carrel_cache_shared_errors_total"),
        0
    );
}

/// An operator may mark a model's single-turn prompts public: then one institution's answer
/// serves another. Only that class: a conversation with history stays the institution's own,
/// and other models keep every answer per institution.
#[tokio::test]
async fn answers_in_a_class_marked_public_are_shared_across_institutions() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&carrel_tests::config_for(
        &mock.base_url(),
        r#"
[[models]]
name = "public-model"
provider = "mock"
upstream_model = "mock-model"
tier = "baseline"
public_cache = ["single_turn"]
"#,
    ))
    .await;
    let keys = two_institutions_keys(&gw).await;
    let mut public = ask(0.0);
    public["model"] = json!("public-model");
    assert_eq!(chat(&gw, &keys[0], &public, None).await.1, "miss");
    assert_eq!(chat(&gw, &keys[1], &public, None).await.1, "hit");
    assert_eq!(chat_calls(&mock), 1);

    // A conversation with history is not in the class: each institution's own.
    let mut history = public.clone();
    history["messages"] = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is a carrel?"}
    ]);
    assert_eq!(chat(&gw, &keys[0], &history, Some("allow")).await.1, "miss");
    assert_eq!(chat(&gw, &keys[1], &history, Some("allow")).await.1, "miss");
    // Nor is any answer of a model not marked.
    let private = ask(0.0);
    assert_eq!(chat(&gw, &keys[0], &private, None).await.1, "miss");
    assert_eq!(chat(&gw, &keys[1], &private, None).await.1, "miss");
    assert_eq!(chat_calls(&mock), 5);
}
