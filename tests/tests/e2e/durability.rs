//! The store's promise, with the real `carrel serve` as a process of its own: after `kill -9`
//! during load, nothing written through the admin API is lost, and neither is the usage record
//! of any response that ended 100 ms or more before the kill. On the embedded backend the
//! restart reads the SQLite file; on the Redis backend a fresh replica reads Redis.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carrel_core::store::{PageRequest, Store};
use carrel_tests::mock::MockUpstream;
use carrel_tests::{TEST_PEPPER, config_for, redis_prefix, redis_store_toml, replica_of};
use serde_json::json;

use crate::serve::Serve;

#[tokio::test]
async fn kill_9_during_load_loses_no_control_data_and_no_settled_usage() {
    kill_9_during_load(None).await;
}

#[tokio::test]
async fn kill_9_of_a_replica_during_load_loses_nothing_in_redis() {
    kill_9_during_load(Some(redis_prefix("kill9"))).await;
}

/// The test, on the embedded backend or (with a key prefix) on Redis.
async fn kill_9_during_load(redis: Option<String>) {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store_toml = redis.as_deref().map(redis_store_toml).unwrap_or_default();
    std::fs::write(
        dir.path().join("carrel.toml"),
        config_for(
            &mock.base_url(),
            &format!("{store_toml}[log]\nlevel = \"warn\"\n"),
        ),
    )
    .unwrap();
    // Replicas share one pepper; the embedded store makes its own.
    let env: &[(&str, &str)] = match redis {
        Some(_) => &[("CARREL_PEPPER", TEST_PEPPER)],
        None => &[],
    };
    let http = reqwest::Client::new();
    let serve = Serve::start(dir.path(), env).await;
    let inst = serve
        .admin(
            &http,
            "/admin/v1/institutions",
            json!({"name": "Kill Library", "kind": "library", "region": "US-IL",
                   "timezone": "America/Chicago"}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = serve
        .admin(
            &http,
            &format!("/admin/v1/institutions/{inst}/keys"),
            json!({"name": "k", "kind": "service"}),
        )
        .await["secret"]
        .as_str()
        .unwrap()
        .to_owned();

    // Load: eight clients, each noting when each answer ended and its record's id; an admin
    // noting each site it created.
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let progress = Arc::new(tokio::sync::Notify::new());
    let chat = json!({"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}]});
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (http, stop, answered, progress) = (
                http.clone(),
                Arc::clone(&stop),
                Arc::clone(&answered),
                Arc::clone(&progress),
            );
            let (url, key, chat) = (
                format!("{}/v1/chat/completions", serve.public),
                key.clone(),
                chat.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(resp) = http.post(&url).bearer_auth(&key).json(&chat).send().await
                    else {
                        return;
                    };
                    assert_eq!(resp.status(), 200);
                    let id = resp.headers()["x-carrel-request-id"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    if resp.bytes().await.is_err() {
                        return;
                    }
                    answered.lock().unwrap().push((id, Instant::now()));
                    progress.notify_one();
                }
            })
        })
        .collect();
    // Twenty sites written through the admin API while the load runs; then the load goes on
    // until enough answers are well older than 100 ms for the check below to have teeth.
    let mut sites = Vec::new();
    for n in 0..20 {
        let site = serve
            .admin(
                &http,
                &format!("/admin/v1/institutions/{inst}/sites"),
                json!({"name": format!("Branch {n}")}),
            )
            .await;
        sites.push(site["id"].as_str().unwrap().to_owned());
    }
    let enough = || {
        let answered = answered.lock().unwrap();
        answered.len() >= 400
            && answered[answered.len() / 2].1.elapsed() >= Duration::from_millis(300)
    };
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !enough() {
            assert!(
                clients.iter().all(|c| !c.is_finished()),
                "a client stopped before the kill"
            );
            progress.notified().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the load never reached 400 answers");
    let Serve { mut child, .. } = serve;
    let killed_at = Instant::now();
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    // What the next start will find.
    let store = match &redis {
        None => Store::open(&dir.path().join("data")).unwrap(),
        Some(prefix) => replica_of(prefix).await,
    };
    let records = store.usage_records(&inst, u32::MAX).await.unwrap();
    let recorded: HashSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(recorded.len(), records.len(), "a record written twice");
    let answered = answered.lock().unwrap().clone();
    let settled: Vec<_> = answered
        .iter()
        .filter(|(_, at)| killed_at.duration_since(*at) >= Duration::from_millis(100))
        .collect();
    let lost: Vec<_> = settled
        .iter()
        .filter(|(id, _)| !recorded.contains(id.as_str()))
        .collect();
    assert!(settled.len() >= 200, "{} answers to check", settled.len());
    assert!(
        lost.is_empty(),
        "{} of {} responses that ended 100 ms before the kill have no record, such as {:?}",
        lost.len(),
        settled.len(),
        &lost[..lost.len().min(3)]
    );
    assert!(
        records.len() <= answered.len() + 8,
        "more records than requests"
    );
    let stored: HashSet<String> = store
        .list_sites(&inst, PageRequest::first(500))
        .await
        .unwrap()
        .data
        .into_iter()
        .map(|s| s.id)
        .collect();
    for site in &sites {
        assert!(stored.contains(site), "site {site} was lost");
    }
    drop(store);

    // And it starts again on what is there, with the same key.
    let again = Serve::start(dir.path(), env).await;
    let resp = http
        .post(format!("{}/v1/chat/completions", again.public))
        .bearer_auth(&key)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
