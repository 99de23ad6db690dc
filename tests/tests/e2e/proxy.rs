//! The data plane end to end: JSON and streaming through to the mock, and every refusal.

use std::time::{Duration, Instant};

use carrel_tests::mock::{Gate, MockUpstream, Reply, StreamScript, chat_completion};
use carrel_tests::{Gateway, closed_port, config_for};
use reqwest::Method;
use serde_json::{Value, json};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
           "messages": [{"role": "user", "content": "What are the library's hours?"}]})
}

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("a JSON error body");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    (status, code)
}

async fn started() -> (MockUpstream, Gateway, String) {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let (_, key) = gw.new_key(None).await;
    (mock, gw, key)
}

#[tokio::test]
async fn chat_json_passes_through_and_only_provider_headers_cross() {
    let (mock, gw, key) = started().await;
    let resp = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-forwarded-for", "203.0.113.9")
        .header("cookie", "patron=alice")
        .header("x-patron-name", "Alice Example")
        .json(&chat("mock-model", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req_mock");
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "upstream cookies stay upstream"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, chat_completion("mock-model"));

    let seen = mock.received();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(req.headers["authorization"], "Bearer sk-mock-provider-key");
    assert_eq!(req.headers["host"], mock.addr().to_string().as_str());
    for private in [
        "x-forwarded-for",
        "cookie",
        "x-patron-name",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(
            req.headers.get(private).is_none(),
            "{private} must not reach the provider"
        );
    }
    assert!(!String::from_utf8_lossy(&req.body).contains("crl_"));
    assert_eq!(
        req.json(),
        chat("mock-model", false),
        "the body is forwarded unchanged"
    );
}

#[tokio::test]
async fn renamed_models_are_rewritten_for_the_provider() {
    let (mock, gw, key) = started().await;
    let mut request = chat("renamed", false);
    request["temperature"] = json!(0.25);
    let resp = gw.post("/v1/chat/completions", &key, &request).await;
    assert_eq!(resp.status(), 200);
    let sent = mock.received()[0].json();
    assert_eq!(sent["model"], "mock-upstream-name");
    assert_eq!(sent["temperature"], 0.25);
    assert_eq!(sent["messages"], request["messages"]);
}

#[tokio::test]
async fn the_first_streamed_chunk_arrives_before_the_upstream_finishes() {
    let (mock, gw, key) = started().await;
    let gate = Gate::new();
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["Open".into(), " nine".into(), " to".into(), " five.".into()],
            usage: true,
            gate: Some(gate.clone()),
            ..StreamScript::default()
        }),
    );
    let mut request = chat("mock-model", true);
    request["stream_options"] = json!({"include_usage": true});
    let mut resp = gw.post("/v1/chat/completions", &key, &request).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.starts_with("data: ") && first.contains("Open"),
        "{first}"
    );
    assert!(
        !gate.finished(),
        "the upstream is still held at its first chunk"
    );

    gate.open();
    let mut rest = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(rest.contains(" five."), "{rest}");
    assert!(
        rest.contains("\"usage\""),
        "the usage chunk the client asked for passes through: {rest}"
    );
    assert!(
        carrel_tests::unsigned(&rest).ends_with("data: [DONE]\n\n"),
        "{rest}"
    );
    assert!(gate.finished());
}

#[tokio::test]
async fn streams_without_usage_pass_through_unchanged() {
    let (mock, gw, key) = started().await;
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["a".into(), "b".into()],
            usage: false,
            ..StreamScript::default()
        }),
    );
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", true))
        .await;
    let text = resp.text().await.unwrap();
    let text = carrel_tests::unsigned(&text);
    assert_eq!(
        text.matches("data: ").count(),
        4,
        "two pieces, stop, [DONE]: {text}"
    );
    assert!(!text.contains("usage"));
}

#[tokio::test]
async fn completions_embeddings_and_models() {
    let (mock, gw, key) = started().await;
    let resp = gw
        .post(
            "/v1/completions",
            &key,
            &json!({"model": "mock-model", "prompt": "Once"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");

    let resp = gw
        .post(
            "/v1/embeddings",
            &key,
            &json!({"model": "mock-model", "input": "card catalog"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"][0]["embedding"], json!([0.1, 0.2, 0.3]));
    let paths: Vec<String> = mock.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/completions", "/v1/embeddings"]);

    // The default key reaches baseline and advanced models, not frontier ones.
    let resp = gw.get("/v1/models", &key).await;
    assert_eq!(resp.status(), 200);
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-model", "renamed"]);
    assert_eq!(list["data"][0]["object"], "model");

    let one = gw.get("/v1/models/renamed", &key).await;
    assert_eq!(one.status(), 200);
    let hidden = gw.get("/v1/models/frontier-model", &key).await;
    assert_eq!(error_code(hidden).await, (404, "model_not_found".into()));

    let resp = gw
        .post("/v1/chat/completions", &key, &chat("frontier-model", false))
        .await;
    assert_eq!(error_code(resp).await, (403, "tier_not_allowed".into()));

    let (_, frontier_key) = gw.new_key(Some("frontier")).await;
    let list: Value = gw
        .get("/v1/models", &frontier_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 3);
    let resp = gw
        .post(
            "/v1/chat/completions",
            &frontier_key,
            &chat("frontier-model", false),
        )
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bad_keys_get_401() {
    let (mock, gw, key) = started().await;
    let body = chat("mock-model", false);
    let none = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(none).await, (401, "missing_api_key".into()));
    let junk = gw
        .post("/v1/chat/completions", "sk-not-carrel", &body)
        .await;
    assert_eq!(error_code(junk).await, (401, "invalid_api_key".into()));
    let unknown = carrel_core::keys::NewKey::generate().token;
    let resp = gw.post("/v1/chat/completions", &unknown, &body).await;
    assert_eq!(error_code(resp).await, (401, "invalid_api_key".into()));

    // The right id with a different, well-formed secret (valid checksum).
    let id = carrel_core::keys::ParsedKey::parse(&key)
        .unwrap()
        .id
        .to_owned();
    let forged = carrel_core::keys::compose(&id, carrel_core::keys::NewKey::generate().secret());
    assert!(carrel_core::keys::ParsedKey::parse(&forged).is_some());
    let resp = gw.post("/v1/chat/completions", &forged, &body).await;
    assert_eq!(error_code(resp).await, (401, "invalid_api_key".into()));
    assert!(
        mock.received().is_empty(),
        "no refused request reaches the provider"
    );

    let ok = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let (_mock, gw, _) = started().await;
    let (id, key) = gw.new_key(None).await;
    let body = chat("mock-model", false);
    // Warm the key cache first, so the test covers eviction and not just a cold lookup.
    for _ in 0..2 {
        assert_eq!(
            gw.post("/v1/chat/completions", &key, &body).await.status(),
            200
        );
    }
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let resp = gw.post("/v1/chat/completions", &key, &body).await;
    // The very first request after the 204 is refused: well within the 1 s the issue allows,
    // with no clock in the test.
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (401, "invalid_api_key"));
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn request_errors_have_distinct_codes() {
    let (mock, gw, key) = started().await;
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("no-such-model", false))
        .await;
    assert_eq!(error_code(resp).await, (404, "model_not_found".into()));

    let resp = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{\"model\": \"mock-model\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_json".into()));

    let resp = gw
        .post("/v1/chat/completions", &key, &json!({"messages": []}))
        .await;
    assert_eq!(error_code(resp).await, (400, "invalid_parameter".into()));

    let resp = gw.get("/v1/chat/completions", &key).await;
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(error_code(resp).await, (405, "method_not_allowed".into()));
    let resp = gw
        .http
        .delete(gw.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["allow"], "GET");
    assert_eq!(error_code(resp).await, (405, "method_not_allowed".into()));
    let resp = gw.http.get(gw.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(error_code(resp).await, (404, "unknown_url".into()));
    assert!(mock.received().is_empty());
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    // Bodies far over the limit: unless the gateway reads them before answering, closing the
    // socket with unread data resets the connection and the client never sees the 413.
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(
        &mock.base_url(),
        "[server]\nmax_body_bytes = 4096\n",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;
    let big = json!({"model": "mock-model", "messages": [{"role": "user", "content": "x".repeat(256 * 1024)}]});
    let resp = gw.post("/v1/chat/completions", &key, &big).await;
    assert_eq!(error_code(resp).await, (413, "request_too_large".into()));

    // Without a Content-Length the limit still holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 4096])).collect();
    let resp = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (413, "request_too_large".into()));

    let fits =
        json!({"model": "mock-model", "messages": [{"role": "user", "content": "x".repeat(3000)}]});
    assert_eq!(
        gw.post("/v1/chat/completions", &key, &fits).await.status(),
        200
    );
    assert_eq!(mock.received().len(), 1);
}

#[tokio::test]
async fn upstream_down_is_502() {
    let down = closed_port().await;
    let gw = Gateway::start(&config_for(&format!("http://{down}/v1"), "")).await;
    let (_, key) = gw.new_key(None).await;
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", false))
        .await;
    assert_eq!(error_code(resp).await, (502, "upstream_unreachable".into()));
}

#[tokio::test]
async fn an_upstream_that_hangs_gets_504_after_the_configured_timeout() {
    let mock = MockUpstream::start().await;
    mock.script("mock-model", Reply::Hang);
    let gw = Gateway::start(&config_for(
        &mock.base_url(),
        "[upstream]\nresponse_timeout_ms = 300\n",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;
    let started = Instant::now();
    // The client's own timeout is 30 s: a gateway that hung would fail this test.
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", false))
        .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited for the timeout"
    );
    assert_eq!(error_code(resp).await, (504, "upstream_timeout".into()));
    assert_eq!(mock.received().len(), 1, "the request reached the upstream");

    // A slow upstream that answers inside the timeout is not cut off (the mock scripts by the
    // upstream's model name).
    mock.script_with_latency("mock-upstream-name", Reply::Auto, Duration::from_millis(20));
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("renamed", false))
        .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn upstream_errors_and_resets() {
    let (mock, gw, key) = started().await;
    let upstream_error = json!({"error": {"message": "context too long", "type": "invalid_request_error",
                                          "param": "messages", "code": "context_length_exceeded"}});
    mock.script(
        "mock-model",
        Reply::Json {
            status: 400,
            body: upstream_error.clone(),
        },
    );
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", false))
        .await;
    assert_eq!(resp.status(), 400, "upstream 4xx pass through");
    assert_eq!(resp.json::<Value>().await.unwrap(), upstream_error);

    mock.script(
        "mock-model",
        Reply::Json {
            status: 500,
            body: json!({"error": {"message": "boom"}}),
        },
    );
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", false))
        .await;
    assert_eq!(
        resp.status(),
        500,
        "upstream 5xx pass through until retries arrive (issue 8)"
    );

    mock.script("mock-model", Reply::Reset);
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", false))
        .await;
    assert_eq!(error_code(resp).await, (502, "upstream_failed".into()));
}

#[tokio::test]
async fn a_stream_that_goes_quiet_ends_with_an_error_event() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["first".into(), "never".into()],
            gate: Some(gate.clone()),
            ..StreamScript::default()
        }),
    );
    let gw = Gateway::start(&config_for(
        &mock.base_url(),
        "[upstream]\nidle_timeout_ms = 200\n",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;
    let resp = gw
        .post("/v1/chat/completions", &key, &chat("mock-model", true))
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("first"), "{text}");
    assert!(text.contains("upstream_idle_timeout"), "{text}");
    assert!(!text.contains("never"));
    gate.open();
}

#[tokio::test]
async fn health_and_readiness() {
    let (_mock, gw, _) = started().await;
    let health = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = gw.http.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["models"], 3);
}

/// `carrel_overhead_seconds` counts every inference request, and with `server.overhead_header`
/// each answer says Carrel's own time: the provider's time is left out, so Carrel's time and
/// the provider's together never exceed what the client waited.
#[tokio::test]
async fn the_overhead_header_and_histogram_leave_the_provider_s_time_out() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start_with(&config_for(&mock.base_url(), ""), |c| {
        c.server.overhead_header = true;
    })
    .await;
    let (_, key) = gw.new_key(None).await;
    let provider = Duration::from_millis(300);
    mock.script_with_latency("mock-model", Reply::Auto, provider);
    let ask = |gw: &Gateway, key: &str, body: Value| {
        gw.http
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    for stream in [false, true] {
        let sent = Instant::now();
        let resp = ask(&gw, &key, chat("mock-model", stream)).await.unwrap();
        let waited = sent.elapsed();
        assert_eq!(resp.status(), 200);
        let overhead: u64 = resp.headers()["x-carrel-overhead-us"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let overhead = Duration::from_micros(overhead);
        assert!(
            overhead + provider <= waited,
            "{overhead:?} overhead and {provider:?} at the provider, but the client waited \
             {waited:?}"
        );
        resp.bytes().await.unwrap();
    }
    // A refusal before the provider is Carrel's time too.
    let resp = ask(&gw, &key, chat("no-such-model", false)).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-carrel-overhead-us"));
    let metrics = gw.metrics().await;
    assert_eq!(
        carrel_tests::metric(&metrics, "carrel_overhead_seconds_count"),
        3
    );
    assert_eq!(
        carrel_tests::metric(&metrics, r#"carrel_overhead_seconds_bucket{le="+Inf"}"#),
        3
    );

    // Off by default.
    let (mock, gw, key) = started().await;
    drop(mock);
    let resp = ask(&gw, &key, chat("no-such-model", false)).await.unwrap();
    assert!(!resp.headers().contains_key("x-carrel-overhead-us"));
}
