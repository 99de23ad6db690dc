//! The admin API's published contract, checked by independent tools: the committed
//! `openapi/openapi.json` by openapi-spec-validator, and the live admin API by schemathesis
//! (no 5xx, every response conforms to the spec). Both come from PyPI via tests/run.sh.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_and_no_off_spec_responses() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let url = gw.admin_url("/admin/openapi.json");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args(["-m", "schemathesis.cli", "run", &url])
            .args(["--header", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            // Every check but "schema-valid data is accepted": the API also checks what a schema
            // cannot say (a provider must exist, a demo provider takes no URL), and says so with
            // a 422 that names the field.
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
            ])
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
