//! Transports: HTTP/2 without TLS (h2c) and TLS with ALPN.

use carrel_tests::mock::MockUpstream;
use carrel_tests::{Gateway, config_for};
use serde_json::json;

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let mock = MockUpstream::start().await;
    let gw = Gateway::start(&config_for(&mock.base_url(), "")).await;
    let (_, key) = gw.new_key(None).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-model", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(carrel_tests::unsigned(&text).ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn tls_with_a_configured_certificate() {
    let mock = MockUpstream::start().await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let extra = format!(
        "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), &extra)).await;
    let (_, key) = gw.new_key(None).await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", gw.public)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/v1/models", gw.public.port());
    let resp = client.get(&url).bearer_auth(&key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let plain = reqwest::get(format!("http://{}/healthz", gw.public)).await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP is not served on a TLS listener"
    );
}
