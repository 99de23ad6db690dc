//! Resilient routing end to end (issue 8, item 3): a model served by two deployments fails
//! over from one that is down with no error the client sees; the down one's circuit breaker
//! opens and keeps requests away, and closes when a health check finds it back; a failure
//! before the first byte is retried elsewhere, and nothing is retried after it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use carrel_tests::mock::{Gate, MockUpstream, Reply, StreamScript};
use carrel_tests::{Gateway, config_for, metric};
use serde_json::json;
use tokio::net::TcpListener;

/// A config with the usual mock as provider `mock`, and model `routed` served first by
/// provider `a` at `a` and, as a standby, by `mock`.
fn routed(mock: &MockUpstream, a: SocketAddr, upstream: &str) -> String {
    config_for(
        &mock.base_url(),
        &format!(
            r#"
[[providers]]
name = "a"
base_url = "http://{a}/v1"

[[models]]
name = "routed"
provider = "a"
upstream_model = "mock-model"
tier = "baseline"

[[models.deployments]]
provider = "mock"
upstream_model = "mock-model"
weight = 0

[upstream]
{upstream}
"#
        ),
    )
}

fn chat_calls(mock: &MockUpstream) -> usize {
    mock.received()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .count()
}

async fn ask(gw: &Gateway, key: &str, model: &str) -> (u16, String) {
    let resp = gw
        .post(
            "/v1/chat/completions",
            key,
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Polls `/metrics` until `series` reads `value`, for at most 10 s.
async fn until_metric(gw: &Gateway, series: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if metric(&m, series) == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {value}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const A_OPEN: &str = "carrel_upstream_breaker_open{deployment=\"a/mock-model\"}";

#[tokio::test]
async fn a_deployment_that_is_down_fails_over_and_its_breaker_keeps_requests_away() {
    let mock = MockUpstream::start().await;
    let down = carrel_tests::closed_port().await;
    let gw = Gateway::start(&routed(
        &mock,
        down,
        "retries = 2\nbreaker_failures = 3\nbreaker_open_ms = 3600000\n\
         health_check_interval_ms = 0",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;
    for _ in 0..20 {
        let (status, body) = ask(&gw, &key, "routed").await;
        assert_eq!(status, 200, "no client-visible error: {body}");
    }
    // Every answer came from the standby; `a` was tried until its breaker opened (3 failures
    // in a row), then never again.
    assert_eq!(chat_calls(&mock), 20);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "carrel_upstream_retries_total"), 3, "{m}");
    assert_eq!(metric(&m, A_OPEN), 1);
    assert_eq!(
        metric(
            &m,
            "carrel_upstream_breaker_opened_total{deployment=\"a/mock-model\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &m,
            "carrel_upstream_breaker_open{deployment=\"mock/mock-model\"}"
        ),
        0
    );
}

#[tokio::test]
async fn a_health_check_opens_the_breaker_and_closes_it_when_the_deployment_is_back() {
    let mock = MockUpstream::start().await;
    let a = carrel_tests::closed_port().await;
    let gw = Gateway::start(&routed(
        &mock,
        a,
        "breaker_open_ms = 3600000\nhealth_check_interval_ms = 20",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;
    // Nothing listens at `a`: the probes open its breaker without a request failing.
    until_metric(&gw, A_OPEN, 1).await;
    let (status, _) = ask(&gw, &key, "routed").await;
    assert_eq!(status, 200);
    assert_eq!(chat_calls(&mock), 1, "the standby answered");
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "carrel_upstream_retries_total"), 0, "{m}");

    // `a` comes back: the next probe closes its breaker and it takes the traffic again.
    let back = MockUpstream::serve(TcpListener::bind(a).await.unwrap());
    until_metric(&gw, A_OPEN, 0).await;
    let (status, _) = ask(&gw, &key, "routed").await;
    assert_eq!(status, 200);
    assert_eq!(
        chat_calls(&back),
        1,
        "the deployment that came back answered"
    );
    assert_eq!(chat_calls(&mock), 1);
}

#[tokio::test]
async fn a_failure_before_the_first_byte_is_retried_and_nothing_after_it() {
    let standby = MockUpstream::start().await;
    let first = MockUpstream::start().await;
    let gw = Gateway::start(&routed(
        &standby,
        first.addr(),
        "retries = 1\nidle_timeout_ms = 300\nhealth_check_interval_ms = 0",
    ))
    .await;
    let (_, key) = gw.new_key(None).await;

    // A 503 from the first deployment: the client gets the standby's answer.
    first.script(
        "mock-model",
        Reply::Json {
            status: 503,
            body: json!({"error": {"message": "overloaded", "type": "server_error"}}),
        },
    );
    let (status, body) = ask(&gw, &key, "routed").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((chat_calls(&first), chat_calls(&standby)), (1, 1));

    // A stream that starts and then goes silent: the client has its first chunk, so the cut
    // ends the stream with an error event and nothing is sent to the standby.
    let gate = Gate::new();
    first.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["Hello".into(), " again".into()],
            usage: true,
            chunk_delay: Duration::ZERO,
            gate: Some(gate.clone()),
        }),
    );
    let resp = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "routed", "stream": true,
                    "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("Hello"), "{text}");
    assert!(text.contains("upstream_idle_timeout"), "{text}");
    assert!(!text.contains(" again"), "{text}");
    assert_eq!((chat_calls(&first), chat_calls(&standby)), (2, 1));
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "carrel_upstream_retries_total"), 1, "{m}");
}

#[tokio::test]
async fn a_fallback_model_answers_for_an_institution_that_allows_it() {
    let mock = MockUpstream::start().await;
    let down = carrel_tests::closed_port().await;
    let config = config_for(
        &mock.base_url(),
        &format!(
            r#"
[[providers]]
name = "a"
base_url = "http://{down}/v1"

[[models]]
name = "routed"
provider = "a"
tier = "advanced"
input_price_per_mtok = 5.0
fallback = ["renamed", "mock-model"]

[upstream]
retries = 0
health_check_interval_ms = 0
"#
        ),
    );
    let gw = Gateway::start(&config).await;
    let inst = gw.institution("Fallback Library").await;
    let (_, key) = gw
        .create_key(
            &inst,
            json!({"name": "desk", "kind": "service",
                   "allowed_models": ["routed", "mock-model"]}),
        )
        .await;
    // Not allowed (the default): the client sees the failure.
    let (status, body) = ask(&gw, &key, "routed").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_unreachable"), "{body}");
    assert_eq!(chat_calls(&mock), 0);

    let (status, set) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/admin/v1/institutions/{inst}"),
            Some(json!({"allow_fallback": true})),
        )
        .await;
    assert_eq!(status, 200, "{set}");
    let (status, body) = ask(&gw, &key, "routed").await;
    assert_eq!(status, 200, "{body}");
    // The first fallback is not among the key's models and is skipped; mock-model answers,
    // asked for by its own name, and the record says so.
    let sent = mock.received().pop().unwrap().json();
    assert_eq!(sent["model"], "mock-model");
    gw.app.state.ledger.flush().await;
    let records = gw.app.state.store.usage_records(&inst, 10).await.unwrap();
    let answered: Vec<&str> = records
        .iter()
        .filter(|r| r.status == carrel_core::store::UsageStatus::Complete)
        .map(|r| &*r.model)
        .collect();
    assert_eq!(answered, ["mock-model"]);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "carrel_upstream_fallbacks_total"), 1, "{m}");
}

#[tokio::test]
async fn a_deployment_s_own_timeout_bounds_its_wait() {
    let mock = MockUpstream::start().await;
    let slow = MockUpstream::start().await;
    slow.script("mock-model", Reply::Hang);
    // The global wait is five minutes; the deployment's own is a fifth of a second, so only
    // the deployment's setting can end this request before the client gives up (30 s).
    let config = config_for(
        &mock.base_url(),
        &format!(
            r#"
[[providers]]
name = "slow"
base_url = "{}"

[[models]]
name = "routed"
provider = "slow"
upstream_model = "mock-model"
tier = "baseline"
timeout_ms = 200

[upstream]
response_timeout_ms = 300000
health_check_interval_ms = 0
"#,
            slow.base_url()
        ),
    );
    let gw = Gateway::start(&config).await;
    let (_, key) = gw.new_key(None).await;
    let (status, body) = ask(&gw, &key, "routed").await;
    // A timeout is not retried (the work may be under way): the client gets the 504.
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"), "{body}");
    assert_eq!(chat_calls(&slow), 1);
}
