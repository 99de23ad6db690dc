//! Signed responses end to end: each response is checked by an implementation Carrel's authors
//! did not derive from Carrel's code (`tests/python/verify_signature.py`, with the
//! `cryptography` package, builds the RFC 9421 signature base itself) and by `carrel verify`;
//! a tampered copy fails both; a rotated key stays published and its responses still verify.

use std::path::Path;

use carrel_core::signing::SavedResponse;
use carrel_tests::mock::{MockUpstream, Reply, StreamScript};
use carrel_tests::{Gateway, config_for};
use serde_json::{Value, json};

const CARREL: &str = env!("CARGO_BIN_EXE_carrel-e2e");

/// Runs the Python verifier; (exit code, stdout + stderr).
fn python_verify(dir: &Path, jwks: &Value, saved: &SavedResponse, stream: bool) -> (i32, String) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/verify_signature.py");
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    std::fs::write(
        dir.join("response.json"),
        serde_json::to_vec(saved).unwrap(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script)
        .arg("--jwks")
        .arg(dir.join("jwks.json"))
        .arg("--response")
        .arg(dir.join("response.json"));
    if stream {
        cmd.arg("--stream");
    }
    let out = cmd
        .output()
        .expect("python runs (the test command installs cryptography)");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `carrel verify` on a response saved as `curl -si` prints it.
fn carrel_verify(dir: &Path, jwks: &Value, raw: &[u8]) -> (i32, String) {
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    std::fs::write(dir.join("response.txt"), raw).unwrap();
    let out = std::process::Command::new(CARREL)
        .arg("verify")
        .arg("--jwks")
        .arg(dir.join("jwks.json"))
        .arg(dir.join("response.txt"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A response as received: status, headers, body; and as `curl -si` would print it.
async fn save(resp: reqwest::Response) -> (SavedResponse, Vec<u8>) {
    let status = resp.status().as_u16();
    let headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    let body = resp.bytes().await.unwrap();
    let mut raw = format!("HTTP/1.1 {status} OK\r\n").into_bytes();
    for (n, v) in &headers {
        raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(&body);
    let saved = SavedResponse::new(
        status,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        &body,
    );
    (saved, raw)
}

async fn jwks(gw: &Gateway) -> Value {
    let resp = gw
        .http
        .get(gw.url("/.well-known/carrel/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn tampered(saved: &SavedResponse, flip_at: usize) -> SavedResponse {
    let mut body = saved.body().unwrap();
    body[flip_at] ^= 0x01;
    SavedResponse::new(
        saved.status,
        saved.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        &body,
    )
}

#[tokio::test]
async fn responses_and_streams_verify_independently_and_tampering_is_caught() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let (_, key) = gw.new_key(None).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = jwks(&gw).await;
    let jwk = &keys["keys"][0];
    assert_eq!(
        (&jwk["kty"], &jwk["crv"], &jwk["alg"]),
        (&json!("OKP"), &json!("Ed25519"), &json!("EdDSA"))
    );

    // A JSON answer.
    let resp = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "renamed", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (saved, raw) = save(resp).await;
    assert_eq!(saved.headers["carrel-model"], "renamed");
    // The provider's request id is kept (and signed); Carrel's is beside it.
    assert_eq!(saved.headers["x-request-id"], "req_mock");
    assert!(saved.headers["x-carrel-request-id"].starts_with("req_"));
    assert!(saved.headers["content-digest"].starts_with("sha-256=:"));
    let (code, out) = python_verify(dir.path(), &keys, &saved, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok kid={}", jwk["kid"].as_str().unwrap())));
    let (code, out) = carrel_verify(dir.path(), &keys, &raw);
    assert_eq!(code, 0, "{out}");
    // One flipped byte of the body, a changed status, a changed model: each is caught.
    let (code, out) = python_verify(dir.path(), &keys, &tampered(&saved, 10), false);
    assert_eq!(code, 1, "{out}");
    let mut restatused = saved.clone();
    restatused.status = 201;
    assert_eq!(python_verify(dir.path(), &keys, &restatused, false).0, 1);
    let mut remodelled = saved.clone();
    remodelled
        .headers
        .insert("carrel-model".into(), "mock-model".into());
    assert_eq!(python_verify(dir.path(), &keys, &remodelled, false).0, 1);
    let mut raw_tampered = raw.clone();
    let last = raw_tampered.len() - 3;
    raw_tampered[last] ^= 0x01;
    let (code, out) = carrel_verify(dir.path(), &keys, &raw_tampered);
    assert_eq!(code, 1, "{out}");

    // A provider's refusal is signed as relayed.
    mock.script(
        "mock-model",
        Reply::Json {
            status: 400,
            body: json!({"error": {"message": "context too long", "type": "invalid_request_error"}}),
        },
    );
    let resp = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    let (saved, _) = save(resp).await;
    let (code, out) = python_verify(dir.path(), &keys, &saved, false);
    assert_eq!(code, 0, "{out}");

    // A stream: the final event signs the digest of everything before it.
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["One".into(), " two".into(), " three".into()],
            usage: true,
            ..StreamScript::default()
        }),
    );
    let resp = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "mock-model", "stream": true,
                    "messages": [{"role": "user", "content": "Count"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let (saved, raw) = save(resp).await;
    let body = String::from_utf8(saved.body().unwrap()).unwrap();
    assert!(
        body.contains("data: [DONE]\n\nevent: carrel.signature\ndata: {"),
        "{body}"
    );
    let (code, out) = python_verify(dir.path(), &keys, &saved, true);
    assert_eq!(code, 0, "{out}");
    let (code, out) = carrel_verify(dir.path(), &keys, &raw);
    assert_eq!(code, 0, "{out}");
    let (code, out) = python_verify(dir.path(), &keys, &tampered(&saved, 30), true);
    assert_eq!(code, 1, "{out}");
}

#[tokio::test]
async fn a_rotated_key_stays_published_and_its_responses_still_verify() {
    let mock = MockUpstream::start().await;
    let toml = config_for(&mock.base_url(), "");
    let data = tempfile::tempdir().unwrap();
    let keep = data.path().to_owned();
    let gw = Gateway::start_with(&toml, |c| c.server.data_dir = keep.clone()).await;
    let (_, key) = gw.new_key(None).await;
    let chat = json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]});
    let (before, _) = save(gw.post("/v1/chat/completions", &key, &chat).await).await;
    let old = jwks(&gw).await;
    drop(gw);

    // `carrel rotate-signing-key` on the stopped gateway's files.
    let signing = carrel_core::config::SigningConfig {
        enabled: true,
        key_file: None,
        retired_keys_file: None,
    };
    let (old_kid, new_kid) = carrel_gateway::signing::rotate(&signing, data.path()).unwrap();
    assert_eq!(old_kid, old["keys"][0]["kid"].as_str().unwrap());
    assert_ne!(old_kid, new_kid);

    let keep = data.path().to_owned();
    let gw = Gateway::start_with(&toml, |c| c.server.data_dir = keep.clone()).await;
    let keys = jwks(&gw).await;
    let kids: Vec<&str> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [new_kid.as_str(), old_kid.as_str()]);
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = python_verify(dir.path(), &keys, &before, false);
    assert_eq!(code, 0, "the old response still verifies: {out}");
    assert!(out.contains(&old_kid), "{out}");
    let (_, key) = gw.new_key(None).await;
    let (after, _) = save(gw.post("/v1/chat/completions", &key, &chat).await).await;
    let (code, out) = python_verify(dir.path(), &keys, &after, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&new_kid), "{out}");
}
