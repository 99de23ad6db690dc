//! The official `openai` Python package as the client, against the real server and the mock.
//! The test command installs it; without it this test fails rather than skipping.

use std::process::Command;

use carrel_tests::mock::MockUpstream;
use carrel_tests::{Gateway, config_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let (_, key) = gw.new_key(None).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/test_openai_sdk.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let base_url = gw.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", script])
            .env("CARREL_BASE_URL", base_url)
            .env("CARREL_API_KEY", key)
            .env("CARREL_MODEL", "mock-model")
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (the test command installs it with openai and pytest)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("6 passed"),
        "every SDK check ran:\n{stdout}"
    );
    // models.list is answered by Carrel; the unknown model and the bad key never leave it.
    let paths: Vec<String> = mock.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/embeddings"
        ],
        "the SDK's inference requests reached the upstream"
    );
}
