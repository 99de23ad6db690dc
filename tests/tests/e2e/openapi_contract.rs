//! The published contract, checked by independent tools: the committed `openapi/openapi.json`
//! by openapi-spec-validator, and the live server by schemathesis (no 5xx, every response
//! conforms to the spec): the admin paths against the admin listener, the public paths against
//! the public listener. Both tools come from PyPI via tests/run.sh.

use std::process::Command;

use carrel_tests::mock::MockUpstream;
use carrel_tests::{ADMIN_TOKEN, Gateway, config_for};

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn spec_path() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json").to_owned()
}

#[test]
fn the_committed_spec_is_valid_openapi() {
    let out = Command::new(python())
        .args(["-m", "openapi_spec_validator", &spec_path()])
        .output()
        .expect("python3 runs (tests/run.sh installs openapi-spec-validator)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs schemathesis with `args` after the schema location; panics with its report unless it
/// passed.
async fn schemathesis(args: Vec<String>) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-m", "schemathesis.cli", "run"])
            .args(&args)
            .args(["--max-examples", "25", "--max-time", "60", "--seed", "1"])
            .env("NO_COLOR", "1")
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (tests/run.sh installs schemathesis)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_off_spec_responses() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    schemathesis(vec![
        gw.admin_url("/admin/openapi.json"),
        // The document also describes the public API, which the admin listener does not serve;
        // the test below runs those paths against the public listener.
        "--include-path-regex".into(),
        "^/admin/".into(),
        "--header".into(),
        format!("Authorization: Bearer {ADMIN_TOKEN}"),
        // Every check but "schema-valid data is accepted": the API also checks what a schema
        // cannot say (a provider must exist, a demo provider takes no URL), and says so with
        // a 422 that names the field.
        "--checks".into(),
        "all".into(),
        "--exclude-checks".into(),
        "positive_data_acceptance".into(),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_the_public_api_as_documented() {
    let mock = MockUpstream::start().await;
    // The demo model (the name the document's examples use) answers in process, so the
    // examples reach a 200 and their answers are checked against the response schemas.
    let gw = Gateway::start_with(&config_for(&mock.base_url(), ""), |config| {
        carrel_gateway::startup::add_demo_model(config);
    })
    .await;
    let (_, key) = gw.new_key(None).await;
    schemathesis(vec![
        gw.admin_url("/admin/openapi.json"),
        "--url".into(),
        gw.url(""),
        "--include-path-regex".into(),
        "^/(v1/|healthz$|readyz$)".into(),
        "--header".into(),
        format!("Authorization: Bearer {key}"),
        "--checks".into(),
        "all".into(),
        // Excluded, both because Carrel reads only `model` and `stream` and forwards the rest
        // for the provider to judge (documented in the request schemas):
        // - "schema-invalid data is rejected": a bad `temperature` reaches the provider, and
        //   the demo model and the mock accept anything;
        // - "schema-valid data is accepted": a well-formed request for a model that is not
        //   configured is a 404 `model_not_found`, which no schema can rule out.
        "--exclude-checks".into(),
        "negative_data_rejection,positive_data_acceptance".into(),
    ])
    .await;
}
