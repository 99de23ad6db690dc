//! Several replicas on one Redis, and one replica whose Redis goes away.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use carrel_tests::mock::MockUpstream;
use carrel_tests::tcp_proxy::{TcpProxy, redis_addr};
use carrel_tests::{Gateway, TEST_PEPPER, config_for, redis_prefix, redis_store_toml, replica_of};
use serde_json::{Value, json};

use crate::serve::Serve;

fn chat() -> Value {
    json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}]})
}

async fn chat_status(http: &reqwest::Client, public: &str, key: &str) -> u16 {
    http.post(format!("{public}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat())
        .send()
        .await
        .expect("chat request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_key_made_on_one_replica_works_on_the_other_and_its_revocation_lands_within_a_second() {
    let mock = MockUpstream::start().await;
    let prefix = redis_prefix("revoke");
    let toml = config_for(
        &mock.base_url(),
        &format!("{}[log]\nlevel = \"warn\"\n", redis_store_toml(&prefix)),
    );
    let env: &[(&str, &str)] = &[("CARREL_PEPPER", TEST_PEPPER)];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&dir_a, &dir_b] {
        std::fs::write(dir.path().join("carrel.toml"), &toml).unwrap();
    }
    let a = Serve::start(dir_a.path(), env).await;
    let b = Serve::start(dir_b.path(), env).await;
    let http = reqwest::Client::new();

    let inst = a
        .admin(
            &http,
            "/admin/v1/institutions",
            json!({"name": "Two Branch Library", "kind": "library", "region": "US-IL",
                   "timezone": "America/Chicago"}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = a
        .admin(
            &http,
            &format!("/admin/v1/institutions/{inst}/keys"),
            json!({"name": "desk", "kind": "service"}),
        )
        .await;
    let (key_id, secret) = (key["id"].as_str().unwrap(), key["secret"].as_str().unwrap());

    // Made through A a moment ago; B answers with it at once, and then from its cache.
    assert_eq!(chat_status(&http, &b.public, secret).await, 200);
    assert_eq!(chat_status(&http, &b.public, secret).await, 200);
    assert_eq!(chat_status(&http, &a.public, secret).await, 200);

    let resp = http
        .delete(format!("{}/admin/v1/keys/{key_id}", a.admin))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let revoked_at = Instant::now();
    // A refuses it before its admin API answers; B once the change reaches it.
    assert_eq!(chat_status(&http, &a.public, secret).await, 401);
    let mut answers = 0;
    loop {
        answers += 1;
        match chat_status(&http, &b.public, secret).await {
            401 => break,
            200 => assert!(
                revoked_at.elapsed() < Duration::from_secs(1),
                "B still accepts the key {:?} after it was revoked ({answers} answers)",
                revoked_at.elapsed()
            ),
            other => panic!("B answered {other}"),
        }
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn usage_while_redis_is_away_is_journaled_then_sent_once() {
    let mock = MockUpstream::start().await;
    let proxy = TcpProxy::start(redis_addr().await).await;
    let prefix = redis_prefix("journal");
    let store = format!(
        "[store]\nkind = \"redis\"\nredis_url = \"redis://{}\"\nredis_prefix = \"{prefix}\"\n",
        proxy.addr()
    );
    let gw = Gateway::start(&config_for(&mock.base_url(), &store)).await;
    let inst = gw.institution("Outage Library").await;
    let (status, key) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/v1/institutions/{inst}/keys"),
            Some(json!({"name": "desk", "kind": "service"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().unwrap();
    let public = format!("http://{}", gw.public);
    let mut ids = Vec::new();
    let mut send = |n: usize| {
        let (http, public, secret) = (gw.http.clone(), public.clone(), secret.to_owned());
        async move {
            let mut got = Vec::new();
            for _ in 0..n {
                let resp = http
                    .post(format!("{public}/v1/chat/completions"))
                    .bearer_auth(&secret)
                    .json(&chat())
                    .send()
                    .await
                    .unwrap();
                // Nothing on a request's path needs Redis: no 5xx while it is away.
                assert_eq!(resp.status(), 200);
                got.push(
                    resp.headers()["x-carrel-request-id"]
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
                resp.bytes().await.unwrap();
            }
            got
        }
    };
    ids.extend(send(20).await);
    proxy.cut();
    ids.extend(send(50).await);
    // Flushing the ledger while Redis is away journals what it holds.
    gw.app.state.ledger.flush().await;
    let counters = gw.app.state.store.replica_counters().unwrap();
    assert!(
        counters
            .journaled
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "nothing was journaled: the test did not cut Redis off"
    );
    proxy.restore();

    // A usage report flushes the ledger (which sends the journal) and waits for this replica
    // to read it back from Redis.
    let (status, report) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/v1/institutions/{inst}/usage"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["totals"]["requests"], 70, "{report}");
    assert!(counters.replayed.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // What any replica finds in Redis: every record once.
    let fresh = replica_of(&prefix).await;
    let records = fresh.usage_records(&inst, 1000).await.unwrap();
    let recorded: HashSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(records.len(), recorded.len(), "a record was sent twice");
    let answered: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(recorded, answered);
}
