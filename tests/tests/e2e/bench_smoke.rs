//! The benchmark's own load generator (`carrel-load`, deploy/bench/) kept working: its two
//! measures run briefly against a real gateway, and what they report matches what happened.

use std::time::Duration;

use carrel_tests::mock::{MockUpstream, Reply, StreamScript};
use carrel_tests::{Gateway, config_for};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const LOAD: &str = env!("CARGO_BIN_EXE_carrel-load");

#[tokio::test]
async fn the_load_generator_times_streams_and_holds_them_open() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let (_, key) = gw.new_key(None).await;
    let url = gw.url("/v1/chat/completions");
    let body = json!({"model": "mock-model", "stream": true,
                      "messages": [{"role": "user", "content": "Hello"}]})
    .to_string();

    // Streams, timed: every one a complete 200 stream.
    let out = Command::new(LOAD)
        .args(["stream", &url, &body, "2", "1", &key])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let streams = report["streams"].as_u64().unwrap();
    assert!(streams > 0, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let (first, end) = (
        report["ttfb_p50_us"].as_u64().unwrap(),
        report["total_p50_us"].as_u64().unwrap(),
    );
    assert!(0 < first && first <= end, "{report}");
    let served = mock
        .received()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(
        served as u64, streams,
        "each stream reached the provider once"
    );

    // Streams held open: all of them open at once, then let go.
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec![" word".to_owned(); 100],
            usage: true,
            chunk_delay: Duration::from_millis(200),
            gate: None,
        }),
    );
    let mut hold = Command::new(LOAD)
        .args(["hold", &url, &body, "20", "1", &key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hold.stdout.take().unwrap()).lines();
    assert_eq!(lines.next_line().await.unwrap().unwrap(), "open 20");
    let report: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(report["held_to_the_end"], 20, "{report}");
    assert!(hold.wait().await.unwrap().success());
}
