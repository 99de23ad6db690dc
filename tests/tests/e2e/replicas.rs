//! Several replicas on one Redis, and one replica whose Redis goes away.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use carrel_tests::mock::MockUpstream;
use carrel_tests::tcp_proxy::{TcpProxy, redis_addr};
use carrel_tests::{
    Gateway, TEST_PEPPER, config_for, redis_prefix, redis_store_toml, redis_store_toml_at,
    replica_of,
};
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

/// Two `carrel serve` replicas on one Redis prefix, and an institution with a key made
/// through the first.
struct TwoReplicas {
    a: Serve,
    b: Serve,
    http: reqwest::Client,
    inst: String,
    key_id: String,
    secret: String,
    _mock: MockUpstream,
    _dirs: [tempfile::TempDir; 2],
}

impl TwoReplicas {
    async fn start(test: &str) -> TwoReplicas {
        let mock = MockUpstream::start().await;
        let toml = config_for(
            &mock.base_url(),
            &format!(
                "{}[log]\nlevel = \"warn\"\n",
                redis_store_toml(&redis_prefix(test))
            ),
        );
        let env: &[(&str, &str)] = &[("CARREL_PEPPER", TEST_PEPPER)];
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for dir in &dirs {
            std::fs::write(dir.path().join("carrel.toml"), &toml).unwrap();
        }
        let a = Serve::start(dirs[0].path(), env).await;
        let b = Serve::start(dirs[1].path(), env).await;
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
        TwoReplicas {
            a,
            b,
            http,
            inst,
            key_id: key["id"].as_str().unwrap().to_owned(),
            secret: key["secret"].as_str().unwrap().to_owned(),
            _mock: mock,
            _dirs: dirs,
        }
    }
}

#[tokio::test]
async fn a_key_made_on_one_replica_works_on_the_other_and_its_revocation_lands_within_a_second() {
    let TwoReplicas {
        a,
        b,
        http,
        key_id,
        secret,
        ..
    } = &TwoReplicas::start("revoke").await;
    let (key_id, secret) = (key_id.as_str(), secret.as_str());

    // Made through A a moment ago; B answers with it at once, and then from its cache.
    assert_eq!(chat_status(http, &b.public, secret).await, 200);
    assert_eq!(chat_status(http, &b.public, secret).await, 200);
    assert_eq!(chat_status(http, &a.public, secret).await, 200);

    let resp = http
        .delete(format!("{}/admin/v1/keys/{key_id}", a.admin))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let revoked_at = Instant::now();
    // A refuses it before its admin API answers; B once the change reaches it.
    assert_eq!(chat_status(http, &a.public, secret).await, 401);
    let mut answers = 0;
    loop {
        answers += 1;
        match chat_status(http, &b.public, secret).await {
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
    let store = redis_store_toml_at(&format!("redis://{}", proxy.addr()), &prefix);
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
    let send = |n: usize| {
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
    // And an operator sees it in the metrics. (The requests themselves needed no Redis: the
    // lease the replica held went on serving them.)
    let metrics = gw.metrics().await;
    let value = |series: &str| carrel_tests::metric(&metrics, series);
    assert!(value("carrel_usage_journal_batches_total{event=\"journaled\"}") > 0);
    assert!(value("carrel_usage_journal_batches_total{event=\"replayed\"}") > 0);
    assert_eq!(value("carrel_usage_records_total{outcome=\"failed\"}"), 0);

    // What any replica finds in Redis: every record once.
    let fresh = replica_of(&prefix).await;
    let records = fresh.usage_records(&inst, 1000).await.unwrap();
    let recorded: HashSet<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(records.len(), recorded.len(), "a record was sent twice");
    let answered: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(recorded, answered);
}

#[tokio::test]
async fn a_token_budget_shared_by_two_replicas_is_never_overshot() {
    let TwoReplicas {
        a,
        b,
        http,
        inst,
        secret,
        ..
    } = &TwoReplicas::start("budget").await;
    const BUDGET: u64 = 1200;
    let resp = http
        .put(format!("{}/admin/v1/institutions/{inst}/limits", a.admin))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .json(&json!({"tokens_per_day": BUDGET}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // B learns of the limit from the shared log; wait until its quota report shows it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let quota: Value = http
            .get(format!("{}/v1/quota", b.public))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if quota["levels"].to_string().contains("tokens_per_day") {
            break;
        }
        assert!(Instant::now() < deadline, "B never saw the limit: {quota}");
        tokio::task::yield_now().await;
    }

    // Sixteen clients, eight on each replica, each until the budget refuses it.
    let body = json!({"model": "mock-model", "max_tokens": 20,
                      "messages": [{"role": "user", "content": "Hi"}]});
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let url = format!(
                "{}/v1/chat/completions",
                if i % 2 == 0 { &a.public } else { &b.public }
            );
            let (http, secret, body) = (http.clone(), secret.clone(), body.clone());
            tokio::spawn(async move {
                let mut used = 0u64;
                loop {
                    let resp = http
                        .post(&url)
                        .bearer_auth(&secret)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => {
                            let reply: Value = resp.json().await.unwrap();
                            used += reply["usage"]["total_tokens"].as_u64().unwrap();
                        }
                        429 => return used,
                        other => panic!("{other}: {}", resp.text().await.unwrap()),
                    }
                }
            })
        })
        .collect();
    let mut used = 0;
    for c in clients {
        used += c.await.unwrap();
    }
    assert!(
        used <= BUDGET,
        "{used} tokens used of a {BUDGET}-token budget"
    );
    // A replica may still hold a lease (a block of the budget) its clients stopped before
    // using up; it goes back once idle, and then both replicas report exactly what was used.
    let tokens_today = |s: &Serve| {
        let url = format!("{}/admin/v1/institutions/{inst}/limits", s.admin);
        let http = http.clone();
        async move {
            let report: Value = http
                .get(url)
                .bearer_auth(carrel_tests::ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            report["usage"]["tokens_today"].as_u64().unwrap()
        }
    };
    let settled = |used: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        for s in [a, b] {
            loop {
                let counted = tokens_today(s).await;
                if counted == used {
                    break;
                }
                assert!(counted > used, "{counted} counted but {used} used");
                assert!(Instant::now() < deadline, "{counted} counted, {used} used");
            }
        }
    };
    settled(used).await;
    // What the leases gave back is there to use, on either replica, to the last request.
    loop {
        let mut answered = false;
        for s in [a, b] {
            let resp = http
                .post(format!("{}/v1/chat/completions", s.public))
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await
                .unwrap();
            if resp.status() == 200 {
                let reply: Value = resp.json().await.unwrap();
                used += reply["usage"]["total_tokens"].as_u64().unwrap();
                answered = true;
            } else {
                assert_eq!(resp.status(), 429);
            }
        }
        if !answered {
            break;
        }
    }
    assert!(
        used <= BUDGET,
        "{used} tokens used of a {BUDGET}-token budget"
    );
    // Used, not refused early: what is left is less than one request's reservation.
    assert!(used > BUDGET - 100, "only {used} of {BUDGET} tokens used");
    settled(used).await;
}

/// The failure policy, on an engine whose Redis is cut off by a proxy.
#[tokio::test]
async fn without_redis_each_kind_of_limit_follows_its_policy() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;

    use carrel_core::config::FailurePolicy;
    use carrel_core::domain::{InstitutionKind, InstitutionStatus, OverQuota, Principal, Tier};
    use carrel_core::quota::{
        Demand, Denial, Level, LimitKind, Limits, LimitsTable, OverPolicy, QuotaEngine,
        SharedSettings, Subject, SystemClock,
    };

    let proxy = TcpProxy::start(redis_addr().await).await;
    let engine = QuotaEngine::with_shared_counters(
        Arc::new(SystemClock::default()),
        &SharedSettings {
            url: format!("redis://{}", proxy.addr()),
            prefix: redis_prefix("policy"),
            timeout: Duration::from_millis(500),
            expected_replicas: 2,
            policy: FailurePolicy::default(),
            lease_requests: 0,
        },
    )
    .await
    .unwrap();
    let subject = Subject {
        principal: Arc::new(Principal {
            institution_id: "inst".into(),
            institution_kind: InstitutionKind::Library,
            timezone: "America/Chicago".into(),
            institution_status: InstitutionStatus::Active,
            frontier_verified: true,
            over_quota: OverQuota::Reject,
            economy: Default::default(),
            key_id: "key".into(),
            site_id: None,
            group_id: None,
            tier_ceiling: Tier::Frontier,
            group_tier_ceiling: None,
            institution_tier_ceiling: Tier::Frontier,
            minor_tier_ceiling: Tier::Baseline,
            attested_until: None,
            allowed_models: None,
            expires_at: None,
            key_kind: carrel_core::domain::KeyKind::Service,
            patron: None,
        }),
        patron: None,
        model: Some("m".into()),
    };
    let demand = Demand {
        prompt_tokens: 100,
        max_output_tokens: 100,
        choices: 1,
        input_nano_per_token: 1.0,
        output_nano_per_token: 1.0,
        stream: false,
    };
    let limits = |level: Level, id: &str, limits: Limits| {
        let mut t = LimitsTable::default();
        t.insert(level, id, limits);
        engine.set_limits(t);
    };
    let tokens = Limits {
        tokens_per_day: Some(1000),
        ..Limits::default()
    };
    limits(Level::Key, "key", tokens);
    let shared = engine
        .take(&subject, demand, OverPolicy::Reject, false)
        .await
        .unwrap();
    drop(shared);
    engine.quiesce().await;
    let counters = engine.shared_counters().unwrap();
    proxy.cut();

    // Token budgets go local, at a half share each (two replicas expected): 500 tokens.
    let held: Vec<_> = [(); 2]
        .iter()
        .map(|()| engine.take(&subject, demand, OverPolicy::Reject, false))
        .collect();
    let mut kept = Vec::new();
    for r in held {
        kept.push(r.await.expect("within the local share"));
    }
    let Err(Denial::Refused(refusal)) = engine
        .take(&subject, demand, OverPolicy::Reject, false)
        .await
    else {
        panic!("the third is over the local share")
    };
    assert_eq!(
        (refusal.kind, refusal.limit),
        (LimitKind::TokensPerDay, 500)
    );
    assert_eq!(counters.local_fallbacks.load(Relaxed), 3);

    // Money fails closed.
    limits(
        Level::Institution,
        "inst",
        Limits {
            cost_per_month_nano_usd: Some(1_000_000),
            ..Limits::default()
        },
    );
    assert_eq!(
        engine
            .take(&subject, demand, OverPolicy::Reject, false)
            .await
            .err(),
        Some(Denial::Unavailable)
    );
    assert_eq!(counters.failed_closed.load(Relaxed), 1);

    // Nothing limited: the request goes on, uncounted; but a frontier model fails closed.
    engine.set_limits(LimitsTable::default());
    assert!(
        engine
            .take(&subject, demand, OverPolicy::Reject, false)
            .await
            .is_ok()
    );
    assert_eq!(counters.uncounted.load(Relaxed), 1);
    assert_eq!(
        engine
            .take(&subject, demand, OverPolicy::Reject, true)
            .await
            .err(),
        Some(Denial::Unavailable)
    );

    // Request rates go local: 10 a minute is 5 here.
    limits(
        Level::Key,
        "key",
        Limits {
            requests_per_minute: Some(10),
            ..Limits::default()
        },
    );
    let mut admitted = 0;
    for _ in 0..8 {
        admitted += usize::from(engine.check_rate(&subject, &[Level::Key]).await.is_ok());
    }
    assert_eq!(admitted, 5);

    // Back to the shared counters once Redis answers.
    proxy.restore();
    limits(Level::Key, "key", tokens);
    let before = counters.local_fallbacks.load(Relaxed);
    let r = engine
        .take(&subject, demand, OverPolicy::Reject, false)
        .await
        .unwrap();
    assert_eq!(counters.local_fallbacks.load(Relaxed), before);
    drop(r);
    drop(kept);
}

#[tokio::test]
async fn a_model_contained_through_one_replica_stops_on_the_other_within_a_second() {
    use carrel_tests::mock::{Gate, Reply, StreamScript};
    let TwoReplicas {
        a,
        b,
        http,
        secret,
        _mock: mock,
        ..
    } = &TwoReplicas::start("contain").await;
    let gate = Gate::new();
    mock.script(
        "mock-model",
        Reply::Stream(StreamScript {
            pieces: vec!["One".into(), " two".into()],
            usage: true,
            gate: Some(gate.clone()),
            ..StreamScript::default()
        }),
    );
    // A stream in flight on B, held by the provider after its first chunk.
    let mut stream = http
        .post(format!("{}/v1/chat/completions", b.public))
        .bearer_auth(secret)
        .json(&json!({"model": "mock-model", "stream": true,
                      "messages": [{"role": "user", "content": "Count"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());

    let resp = http
        .patch(format!("{}/admin/v1/models/mock-model", a.admin))
        .bearer_auth(carrel_tests::ADMIN_TOKEN)
        .json(&json!({"contained": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let contained_at = Instant::now();
    // B's stream ends with the error event...
    let mut rest = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(1), stream.chunk())
        .await
        .expect("B's stream ends within a second")
        .unwrap()
    {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(rest.contains("\"model_contained\""), "{rest}");
    assert!(contained_at.elapsed() < Duration::from_secs(1));
    // ...and B refuses new requests; A did before its admin API answered.
    mock.script("mock-model", Reply::Auto);
    assert_eq!(chat_status(http, &a.public, secret).await, 503);
    loop {
        match chat_status(http, &b.public, secret).await {
            503 => break,
            200 => assert!(
                contained_at.elapsed() < Duration::from_secs(1),
                "B still serves the model {:?} after it was contained",
                contained_at.elapsed()
            ),
            other => panic!("B answered {other}"),
        }
    }
    assert!(contained_at.elapsed() < Duration::from_secs(1));
}
