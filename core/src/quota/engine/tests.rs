use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;
use crate::quota::limits::{Level, LimitKind, Limits};

fn principal(key: &str) -> Arc<Principal> {
    use crate::domain::{InstitutionKind, InstitutionStatus, OverQuota, Tier};
    Arc::new(Principal {
        institution_id: "inst".into(),
        institution_kind: InstitutionKind::Library,
        timezone: "America/Chicago".into(),
        institution_status: InstitutionStatus::Active,
        frontier_verified: false,
        over_quota: OverQuota::Reject,
        economy: Default::default(),
        key_id: key.into(),
        site_id: Some("site".into()),
        group_id: None,
        tier_ceiling: Tier::Baseline,
        group_tier_ceiling: None,
        institution_tier_ceiling: Tier::Frontier,
        minor_tier_ceiling: Tier::Baseline,
        attested_until: None,
        allowed_models: None,
        expires_at: None,
        key_kind: crate::domain::KeyKind::Service,
        patron: None,
    })
}

fn subject(patron: Option<&str>) -> Subject {
    Subject {
        principal: principal("key"),
        patron: patron.map(Into::into),
        model: Some("m".into()),
    }
}

fn demand(prompt: u64, output: u64) -> Demand {
    Demand {
        prompt_tokens: prompt,
        max_output_tokens: output,
        choices: 1,
        input_nano_per_token: 1000.0,
        output_nano_per_token: 2000.0,
        stream: false,
    }
}

fn engine_with(level: Level, id: &str, limits: Limits) -> (QuotaEngine, Arc<FakeClock>) {
    // 10:00 in Chicago.
    let clock = FakeClock::at("2026-11-27T16:00:00Z".parse().unwrap());
    let engine = QuotaEngine::new(clock.clone());
    let mut table = LimitsTable::default();
    table.insert(level, id, limits);
    engine.set_limits(table);
    (engine, clock)
}

#[test]
fn the_rate_limit_follows_a_fake_clock_exactly() {
    let (engine, clock) = engine_with(
        Level::Key,
        "key",
        Limits {
            requests_per_minute: Some(120),
            ..Limits::default()
        },
    );
    let s = subject(None);
    let key = [Level::Key];
    for i in 0..120 {
        let room = engine.admit(&s, &key).unwrap().unwrap();
        assert_eq!((room.limit, room.remaining), (120, 119 - i));
    }
    let refused = engine.admit(&s, &key).unwrap_err();
    assert_eq!(
        (refused.level, refused.kind),
        (Level::Key, LimitKind::RequestsPerMinute)
    );
    assert_eq!(refused.retry_after_secs, 1);
    // Half a second on, one more (one every 500 ms), then none.
    clock.advance(Duration::from_millis(499));
    assert!(engine.admit(&s, &key).is_err());
    clock.advance(Duration::from_millis(1));
    assert!(engine.admit(&s, &key).is_ok());
    assert!(engine.admit(&s, &key).is_err());
    // Over ten simulated minutes at one request every 100 ms, exactly 2 a second pass.
    let mut admitted = 0;
    for _ in 0..6000 {
        clock.advance(Duration::from_millis(100));
        admitted += usize::from(engine.admit(&s, &key).is_ok());
    }
    assert_eq!(admitted, 1200);
}

#[test]
fn a_refused_rate_counts_at_no_level() {
    let clock = FakeClock::at("2026-11-27T16:00:00Z".parse().unwrap());
    let engine = QuotaEngine::new(clock);
    let mut table = LimitsTable::default();
    let rpm = |n| Limits {
        requests_per_minute: Some(n),
        ..Limits::default()
    };
    table.insert(Level::Institution, "inst", rpm(10));
    table.insert(Level::Key, "key", rpm(2));
    engine.set_limits(table);
    let s = subject(None);
    let levels = [Level::Institution, Level::Key];
    assert!(engine.admit(&s, &levels).is_ok());
    assert!(engine.admit(&s, &levels).is_ok());
    for _ in 0..5 {
        assert_eq!(engine.admit(&s, &levels).unwrap_err().level, Level::Key);
    }
    // The key's refusals did not use the institution's rate: another key has 8 left.
    let other = Subject {
        principal: principal("other"),
        ..subject(None)
    };
    for _ in 0..8 {
        assert!(engine.admit(&other, &levels).is_ok());
    }
    assert_eq!(
        engine.admit(&other, &levels).unwrap_err().level,
        Level::Institution
    );
}

#[test]
fn reservations_settle_and_refund() {
    let (engine, _) = engine_with(
        Level::Institution,
        "inst",
        Limits {
            tokens_per_day: Some(1000),
            ..Limits::default()
        },
    );
    let s = subject(None);
    let r = engine
        .reserve(&s, demand(100, 400), OverPolicy::Reject)
        .unwrap();
    assert_eq!(r.tokens(), 500);
    assert_eq!(r.tokens_headroom().unwrap().remaining, 500);
    let r2 = engine
        .reserve(&s, demand(100, 400), OverPolicy::Reject)
        .unwrap();
    let refused = engine
        .reserve(&s, demand(1, 1), OverPolicy::Reject)
        .unwrap_err();
    assert_eq!(
        (refused.level, refused.kind),
        (Level::Institution, LimitKind::TokensPerDay)
    );
    // Chicago's midnight is 14 hours away.
    assert_eq!(refused.retry_after_secs, 14 * 3600);
    r.settle(150, 0);
    drop(r2); // an upstream failure: refunded
    let usage = engine.usage(s.institution(), s.timezone(), Level::Institution, "inst");
    assert_eq!(usage.day_tokens, 150);
    assert_eq!(
        engine
            .usage(s.institution(), s.timezone(), Level::Key, "key")
            .day_tokens,
        150
    );
}

#[test]
fn clamping_gives_what_is_left_and_no_less_than_a_token_a_choice() {
    let (engine, _) = engine_with(
        Level::Key,
        "key",
        Limits {
            tokens_per_day: Some(1000),
            ..Limits::default()
        },
    );
    let s = subject(None);
    let mut d = demand(100, 2000);
    d.choices = 2;
    let r = engine.reserve(&s, d, OverPolicy::Clamp).unwrap();
    assert_eq!(
        (r.clamped_to(), r.output_tokens(), r.tokens()),
        (Some(450), 900, 1000)
    );
    assert_eq!(r.tokens_headroom().unwrap().remaining, 0);
    let refused = engine
        .reserve(&s, demand(1, 10), OverPolicy::Clamp)
        .unwrap_err();
    assert_eq!(refused.kind, LimitKind::TokensPerDay);
    r.settle(0, 0);
    // Exactly enough room: not clamped.
    let r = engine
        .reserve(&s, demand(100, 900), OverPolicy::Clamp)
        .unwrap();
    assert_eq!(r.clamped_to(), None);
}

#[test]
fn money_budgets_use_the_model_prices() {
    let (engine, _) = engine_with(
        Level::Institution,
        "inst",
        Limits {
            // One millionth of a dollar per prompt token, two per output token; 1 cent.
            cost_per_month_nano_usd: Some(10_000_000),
            ..Limits::default()
        },
    );
    let s = subject(None);
    // 1000 prompt + 4000 output = 0.1 ms + 8 ms of dollars... = $0.009.
    let r = engine
        .reserve(&s, demand(1000, 4000), OverPolicy::Reject)
        .unwrap();
    let refused = engine
        .reserve(&s, demand(1000, 1000), OverPolicy::Reject)
        .unwrap_err();
    assert_eq!(refused.kind, LimitKind::CostPerMonth);
    // December 1st, Chicago midnight.
    assert_eq!(
        refused.resets_at.unwrap(),
        "2026-12-01T06:00:00Z".parse().unwrap()
    );
    r.settle(1000, 1_000_000);
    assert!(
        engine
            .reserve(&s, demand(1000, 1000), OverPolicy::Reject)
            .is_ok()
    );
}

#[test]
fn patrons_get_the_smallest_allotment_plus_extensions_and_a_new_day() {
    let clock = FakeClock::at("2026-11-27T16:00:00Z".parse().unwrap());
    let engine = QuotaEngine::new(clock.clone());
    let mut table = LimitsTable::default();
    let allot = |n| Limits {
        patron_tokens_per_day: Some(n),
        ..Limits::default()
    };
    table.insert(Level::Institution, "inst", allot(1000));
    table.insert(Level::Site, "site", allot(300));
    engine.set_limits(table);
    let ana = subject(Some("p_ana"));
    let r = engine
        .reserve(&ana, demand(100, 200), OverPolicy::Reject)
        .unwrap();
    r.settle(300, 0);
    let refused = engine
        .reserve(&ana, demand(1, 1), OverPolicy::Reject)
        .unwrap_err();
    assert_eq!(
        (refused.level, refused.kind),
        (Level::Patron, LimitKind::TokensPerDay)
    );
    // Another patron is untouched.
    assert!(
        engine
            .reserve(&subject(Some("p_bo")), demand(100, 200), OverPolicy::Reject)
            .is_ok()
    );
    // Staff extend Ana's day by 100 tokens for an hour.
    let (inst, tz) = (ana.institution().clone(), ana.timezone().clone());
    engine.set_extensions(
        &inst,
        &tz,
        "p_ana",
        vec![Extension {
            tokens: 100,
            expires_at: engine.now() + jiff::SignedDuration::from_hours(1),
        }],
    );
    engine
        .reserve(&ana, demand(50, 50), OverPolicy::Reject)
        .unwrap()
        .settle(100, 0);
    assert!(
        engine
            .reserve(&ana, demand(1, 1), OverPolicy::Reject)
            .is_err()
    );
    // Or reset her day.
    engine.reset_patron_day(&inst, &tz, "p_ana");
    engine
        .reserve(&ana, demand(100, 300), OverPolicy::Reject)
        .unwrap()
        .settle(400, 0);
    assert!(
        engine
            .reserve(&ana, demand(1, 1), OverPolicy::Reject)
            .is_err()
    );
    // Local midnight (14 hours on) gives everyone a new day.
    clock.advance(Duration::from_secs(14 * 3600));
    assert!(
        engine
            .reserve(&ana, demand(100, 200), OverPolicy::Reject)
            .is_ok()
    );
}

#[test]
fn a_guest_pass_allowance_caps_the_patron_day_with_or_without_an_allotment() {
    use crate::domain::{AgeBand, PatronPrincipal};
    let guest = |allowance| {
        let mut p = (*principal("kiosk")).clone();
        p.patron = Some(PatronPrincipal {
            session_id: "s".into(),
            patron_ref: "p_guest".into(),
            age_band: AgeBand::Unknown,
            allowance: Some(allowance),
        });
        Subject {
            principal: Arc::new(p),
            patron: Some("p_guest".into()),
            model: Some("m".into()),
        }
    };
    // No institution allotment at all: the pass alone limits the day.
    let engine = QuotaEngine::new(FakeClock::at("2026-11-27T16:00:00Z".parse().unwrap()));
    let s = guest(250);
    engine
        .reserve(&s, demand(100, 100), OverPolicy::Reject)
        .unwrap()
        .settle(200, 0);
    let refused = engine
        .reserve(&s, demand(30, 30), OverPolicy::Reject)
        .unwrap_err();
    assert_eq!((refused.level, refused.limit), (Level::Patron, 250));
    // A smaller institution allotment still wins.
    let (engine, _) = engine_with(
        Level::Institution,
        "inst",
        Limits {
            patron_tokens_per_day: Some(100),
            ..Limits::default()
        },
    );
    let refused = engine
        .reserve(&guest(250), demand(60, 60), OverPolicy::Reject)
        .unwrap_err();
    assert_eq!(refused.limit, 100);
}

#[test]
fn concurrent_streams_are_held_until_settled() {
    let (engine, _) = engine_with(
        Level::Key,
        "key",
        Limits {
            concurrent_streams: Some(2),
            ..Limits::default()
        },
    );
    let s = subject(None);
    let mut d = demand(1, 1);
    d.stream = true;
    let a = engine.reserve(&s, d, OverPolicy::Reject).unwrap();
    let _b = engine.reserve(&s, d, OverPolicy::Reject).unwrap();
    assert_eq!(
        engine.reserve(&s, d, OverPolicy::Reject).unwrap_err().kind,
        LimitKind::ConcurrentStreams
    );
    // Requests that do not stream are not held back.
    assert!(engine.reserve(&s, demand(1, 1), OverPolicy::Reject).is_ok());
    a.settle(2, 0);
    assert!(engine.reserve(&s, d, OverPolicy::Reject).is_ok());
}

/// 500 requests, released 200 at a time through a barrier, against a 10,000-token budget with
/// 120-token reservations: exactly 83 are admitted and what settles stays within the budget.
#[test]
fn a_budget_holds_under_contention() {
    let (engine, _) = engine_with(
        Level::Key,
        "key",
        Limits {
            tokens_per_day: Some(10_000),
            ..Limits::default()
        },
    );
    let wide = Arc::new(Barrier::new(200));
    let rest = Arc::new(Barrier::new(100));
    let threads: Vec<_> = (0..500)
        .map(|i| {
            let engine = engine.clone();
            let barrier = if i < 400 {
                Arc::clone(&wide)
            } else {
                Arc::clone(&rest)
            };
            std::thread::spawn(move || {
                barrier.wait();
                match engine.reserve(&subject(None), demand(20, 100), OverPolicy::Reject) {
                    Ok(r) => {
                        r.settle(120, 0);
                        true
                    }
                    Err(_) => false,
                }
            })
        })
        .collect();
    let admitted = threads
        .into_iter()
        .filter(|_| true)
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(admitted, 83);
    let s = subject(None);
    let used = engine
        .usage(s.institution(), s.timezone(), Level::Key, "key")
        .day_tokens;
    assert_eq!(used, 83 * 120);
}

/// 64 first requests of a new patron at once: the allotment is not overshot.
#[test]
fn a_new_patron_cannot_overshoot() {
    let (engine, _) = engine_with(
        Level::Institution,
        "inst",
        Limits {
            patron_tokens_per_day: Some(1000),
            ..Limits::default()
        },
    );
    let barrier = Arc::new(Barrier::new(64));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let engine = engine.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                engine
                    .reserve(&subject(Some("p_new")), demand(50, 50), OverPolicy::Reject)
                    .map(|r| r.settle(100, 0))
                    .is_ok()
            })
        })
        .collect();
    let admitted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(admitted, 10);
    let s = subject(Some("p_new"));
    assert_eq!(
        engine
            .usage(s.institution(), s.timezone(), Level::Patron, "p_new")
            .day_tokens,
        1000
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever mix of reservations, settlements and refunds, a day's tokens never pass the
        /// limit while every reservation is held, and what remains is what was settled.
        #[test]
        fn reservations_never_overshoot(
            ops in proptest::collection::vec((1u64..200, 0u64..400, 0u8..3), 1..200),
            limit in 1u64..5000,
        ) {
            let (engine, _) = engine_with(Level::Key, "key", Limits {
                tokens_per_day: Some(limit),
                ..Limits::default()
            });
            let s = subject(None);
            let mut held = Vec::new();
            let mut settled = 0u64;
            for (prompt, output, action) in ops {
                if let Ok(r) = engine.reserve(&s, demand(prompt, output), OverPolicy::Clamp) {
                    held.push(r);
                }
                let usage = engine.usage(s.institution(), s.timezone(), Level::Key, "key").day_tokens;
                prop_assert!(usage <= limit.max(settled));
                if action > 0 && let Some(r) = held.pop() {
                    if action == 1 {
                        let real = r.tokens() / 2;
                        settled += real;
                        r.settle(real, 0);
                    } else {
                        drop(r);
                    }
                }
            }
            drop(held);
            let usage = engine.usage(s.institution(), s.timezone(), Level::Key, "key").day_tokens;
            prop_assert_eq!(usage, settled);
        }
    }
}

/// The same engine with its counters in Redis (the machine's, or `CARREL_TEST_REDIS_URL`):
/// what the in-process engine decides, the shared one decides, and two engines on one prefix
/// (two replicas) share every limit. Redis keeps its own time, so these use the system clock.
// Tasks race one another as replicas would; a test has no shutdown to drain.
#[allow(clippy::disallowed_methods)]
mod shared {
    use super::*;
    use crate::config::FailurePolicy;
    use crate::quota::{Denial, SharedSettings};

    fn settings(prefix: &str) -> SharedSettings {
        SharedSettings {
            url: crate::store::tests::test_redis_url(),
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(2),
            expected_replicas: 2,
            policy: FailurePolicy::default(),
            // Exact, request by request, unless a test leases.
            lease_requests: 0,
        }
    }

    fn prefix(test: &str) -> String {
        format!("test-quota-{test}-{}", crate::ids::random_base62(10))
    }

    /// A shared engine on `prefix` and an in-process one, both with `table`.
    async fn engines(prefix: &str, table: &LimitsTable) -> (QuotaEngine, QuotaEngine) {
        engines_leasing(prefix, table, 0).await
    }

    /// [`engines`], the shared one leasing blocks of up to `lease` requests.
    async fn engines_leasing(
        prefix: &str,
        table: &LimitsTable,
        lease: u64,
    ) -> (QuotaEngine, QuotaEngine) {
        let clock = Arc::new(SystemClock::default());
        let settings = SharedSettings {
            lease_requests: lease,
            ..settings(prefix)
        };
        let shared = QuotaEngine::with_shared_counters(clock.clone(), &settings)
            .await
            .expect("the tests need Redis (tests/run.sh starts one)");
        let local = QuotaEngine::new(clock);
        shared.set_limits(table.clone());
        local.set_limits(table.clone());
        (shared, local)
    }

    fn table(level: Level, id: &str, limits: Limits) -> LimitsTable {
        let mut t = LimitsTable::default();
        t.insert(level, id, limits);
        t
    }

    /// Two replicas on one prefix, both with `table`, leasing blocks of up to `lease`.
    async fn replicas(prefix: &str, table: &LimitsTable, lease: u64) -> [QuotaEngine; 2] {
        let (a, _) = engines_leasing(prefix, table, lease).await;
        let (b, _) = engines_leasing(prefix, table, lease).await;
        [a, b]
    }

    /// `n` requests at once, alternately through each replica; each one's outcome.
    async fn race<T, F, Fut>(replicas: &[QuotaEngine; 2], n: usize, request: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(QuotaEngine) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let tasks: Vec<_> = (0..n)
            .map(|i| tokio::spawn(request(replicas[i % 2].clone())))
            .collect();
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    /// A 120-token reservation settled at 120: whether it was admitted.
    async fn take_120(engine: QuotaEngine) -> bool {
        match engine
            .take(&subject(None), demand(20, 100), OverPolicy::Reject, false)
            .await
        {
            Ok(r) => {
                r.settle(120, 0);
                true
            }
            Err(Denial::Refused(_)) => false,
            Err(Denial::Unavailable) => panic!("Redis unavailable"),
        }
    }

    /// One request against the key's rate: whether it was admitted.
    async fn admit_one(engine: QuotaEngine) -> bool {
        engine
            .check_rate(&subject(None), &[Level::Key])
            .await
            .is_ok()
    }

    /// Requests the replicas served from a lease.
    fn leased(replicas: &[QuotaEngine; 2]) -> u64 {
        replicas
            .iter()
            .map(|e| e.shared_counters().unwrap().leased.load(Ordering::Relaxed))
            .sum()
    }

    /// What a reservation or refusal says, for comparing backends.
    fn outcome(r: &Result<Reservation, Denial>) -> String {
        match r {
            Ok(r) => format!(
                "ok tokens={} output={} clamped={:?} left={:?}",
                r.tokens(),
                r.output_tokens(),
                r.clamped_to(),
                r.tokens_headroom().map(|h| (h.limit, h.remaining))
            ),
            Err(Denial::Refused(f)) => format!(
                "refused {:?} {:?} limit={} left={} resets={:?}",
                f.level, f.kind, f.limit, f.remaining, f.resets_at
            ),
            Err(Denial::Unavailable) => "unavailable".into(),
        }
    }

    /// A script of reservations, settlements and refunds, run on both backends step by step:
    /// every answer the same.
    #[tokio::test]
    async fn the_shared_engine_decides_as_the_local_one_does() {
        let mut t = LimitsTable::default();
        t.insert(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(1000),
                concurrent_streams: Some(2),
                ..Limits::default()
            },
        );
        t.insert(
            Level::Institution,
            "inst",
            Limits {
                cost_per_month_nano_usd: Some(3_000_000),
                patron_tokens_per_day: Some(400),
                ..Limits::default()
            },
        );
        let (shared, local) = engines(&prefix("same"), &t).await;
        let mut held: [Vec<Reservation>; 2] = [Vec::new(), Vec::new()];
        let mut streamed = demand(10, 10);
        streamed.stream = true;
        let mut two_choices = demand(100, 2000);
        two_choices.choices = 2;
        let steps: Vec<(Option<&str>, Demand, OverPolicy, &str)> = vec![
            (None, demand(100, 200), OverPolicy::Reject, "hold"),
            (Some("p_ana"), demand(100, 200), OverPolicy::Reject, "hold"),
            (Some("p_ana"), demand(50, 100), OverPolicy::Reject, "hold"),
            (Some("p_ana"), demand(10, 500), OverPolicy::Clamp, "hold"),
            (None, two_choices, OverPolicy::Clamp, "settle"),
            (None, demand(100, 900), OverPolicy::Reject, "drop"),
            (None, streamed, OverPolicy::Reject, "hold"),
            (None, streamed, OverPolicy::Reject, "hold"),
            (None, streamed, OverPolicy::Reject, "hold"),
            (Some("p_bo"), demand(300, 0), OverPolicy::Reject, "settle"),
            (None, demand(1, 1), OverPolicy::Reject, "hold"),
        ];
        for (i, (patron, d, policy, then)) in steps.into_iter().enumerate() {
            let s = subject(patron);
            let mut answers = Vec::new();
            for (engine, held) in [&shared, &local].into_iter().zip(held.iter_mut()) {
                let r = engine.take(&s, d, policy, false).await;
                answers.push(outcome(&r));
                if let Ok(r) = r {
                    match then {
                        "hold" => held.push(r),
                        "settle" => {
                            let used = r.tokens() / 2;
                            r.settle(used, used * 1000);
                        }
                        _ => drop(r),
                    }
                }
                engine.quiesce().await;
            }
            assert_eq!(answers[0], answers[1], "step {i}");
        }
        let failures = shared
            .shared_counters()
            .unwrap()
            .settle_failures
            .load(Ordering::Relaxed);
        assert_eq!(failures, 0, "settlements failed");
        for level in [Level::Institution, Level::Key, Level::Patron] {
            let id = match level {
                Level::Institution => "inst",
                Level::Key => "key",
                _ => "p_ana",
            };
            let s = subject(None);
            let a = shared
                .usage_now(s.institution(), s.timezone(), level, id)
                .await;
            let b = local
                .usage_now(s.institution(), s.timezone(), level, id)
                .await;
            assert_eq!(
                (
                    a.day_tokens,
                    a.month_tokens,
                    a.month_cost_nano_usd,
                    a.streams
                ),
                (
                    b.day_tokens,
                    b.month_tokens,
                    b.month_cost_nano_usd,
                    b.streams
                ),
                "{level:?}"
            );
        }
    }

    /// Two replicas, 500 requests at once (250 through each) against a 10,000-token budget
    /// with 120-token reservations: exactly 83 admitted, as in process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_budget_shared_by_two_replicas_never_overshoots() {
        let prefix = prefix("budget");
        let t = table(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(10_000),
                ..Limits::default()
            },
        );
        let both = replicas(&prefix, &t, 0).await;
        let admitted = race(&both, 500, take_120)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 83);
        for engine in &both {
            engine.quiesce().await;
        }
        let s = subject(None);
        for engine in &both {
            let used = engine
                .usage_now(s.institution(), s.timezone(), Level::Key, "key")
                .await;
            assert_eq!(used.day_tokens, 83 * 120);
        }
    }

    /// A rate of 30 a minute (a burst of 30) shared by two replicas: 30 of 100 requests.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_rate_shared_by_two_replicas_admits_its_burst_once() {
        let prefix = prefix("rate");
        let t = table(
            Level::Key,
            "key",
            Limits {
                requests_per_minute: Some(30),
                ..Limits::default()
            },
        );
        let both = replicas(&prefix, &t, 0).await;
        let admitted = race(&both, 100, admit_one)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        assert_eq!(admitted, 30);
        let refused = both[0]
            .check_rate(&subject(None), &[Level::Key])
            .await
            .unwrap_err();
        let Denial::Refused(refusal) = refused else {
            panic!("{refused:?}")
        };
        assert_eq!(
            (refusal.level, refusal.kind, refusal.limit),
            (Level::Key, LimitKind::RequestsPerMinute, 30)
        );
        // One request every two seconds comes back.
        assert!((1..=2).contains(&refusal.retry_after_secs), "{refusal:?}");
    }

    /// Two leasing replicas and 500 requests at once against a 10,000-token budget with
    /// 120-token reservations: never more than 83 admitted. Once the leases are back, the
    /// budget is used to its last request: 83 in all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn leases_never_overshoot_and_give_back_what_they_did_not_use() {
        let prefix = prefix("lease-budget");
        let t = table(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(10_000),
                ..Limits::default()
            },
        );
        let both = replicas(&prefix, &t, 64).await;
        let [a, b] = &both;
        let mut admitted = race(&both, 500, take_120)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        assert!(admitted <= 83, "{admitted} admitted");
        assert!(leased(&both) > 0, "no request was served from a lease");
        a.quiesce().await;
        b.quiesce().await;
        let s = subject(None);
        let used = a
            .usage_now(s.institution(), s.timezone(), Level::Key, "key")
            .await;
        assert_eq!(
            used.day_tokens,
            admitted as u64 * 120,
            "leases settled exactly"
        );
        while take_120(a.clone()).await {
            admitted += 1;
        }
        assert_eq!(admitted, 83);
        a.quiesce().await;
        // Nothing held, nothing remembered: a replica's leases do not grow with its subjects.
        for e in &both {
            let (shared, _) = e.inner.shared.as_ref().unwrap();
            assert_eq!(shared.leases.subjects(), 0);
        }
        let counters = a.shared_counters().unwrap();
        assert_eq!(counters.settle_failures.load(Ordering::Relaxed), 0);
    }

    /// Leased request cells: never more than the burst, and the unused ones come back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn leased_rate_cells_never_pass_the_burst() {
        let prefix = prefix("lease-rate");
        // One request every 10 s after a burst of 6: nothing refills during the test.
        let t = table(
            Level::Key,
            "key",
            Limits {
                requests_per_minute: Some(6),
                ..Limits::default()
            },
        );
        let both = replicas(&prefix, &t, 64).await;
        let [a, b] = &both;
        let mut admitted = race(&both, 40, admit_one)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        assert!(admitted <= 6, "{admitted} admitted");
        assert!(leased(&both) > 0, "no request was served from a lease");
        a.quiesce().await;
        b.quiesce().await;
        while admit_one(a.clone()).await {
            admitted += 1;
            assert!(admitted <= 6, "{admitted} admitted");
        }
        assert_eq!(admitted, 6);
    }

    /// A lease taken under a limit is not spent after the limit is lowered.
    #[tokio::test]
    async fn a_lowered_limit_binds_at_once_despite_a_lease() {
        let generous = table(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(10_000),
                ..Limits::default()
            },
        );
        let (a, _) = engines_leasing(&prefix("lease-lower"), &generous, 64).await;
        // A block for two requests; the first spends half of it.
        let first = a
            .take(&subject(None), demand(20, 100), OverPolicy::Reject, false)
            .await
            .unwrap();
        first.settle(120, 0);
        let tight = table(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(200),
                ..Limits::default()
            },
        );
        a.set_limits(tight);
        let refused = a
            .take(&subject(None), demand(20, 100), OverPolicy::Reject, false)
            .await;
        let Err(Denial::Refused(refusal)) = refused else {
            panic!(
                "the lease was spent under the lowered limit: {}",
                outcome(&refused)
            )
        };
        assert_eq!(
            (refusal.kind, refusal.limit),
            (LimitKind::TokensPerDay, 200)
        );
        a.quiesce().await;
        let s = subject(None);
        let used = a
            .usage_now(s.institution(), s.timezone(), Level::Key, "key")
            .await;
        assert_eq!(used.day_tokens, 120);
    }

    /// A patron's counters in Redis are deleted at the institution's daily reset (its local
    /// midnight), however they were last touched: a rate check, a reservation, a settlement
    /// or a staff reset. A key's outlive the month.
    #[tokio::test]
    async fn a_patrons_counters_go_at_the_daily_reset() {
        let prefix = prefix("patron-ttl");
        let mut t = LimitsTable::default();
        t.insert(
            Level::Key,
            "key",
            Limits {
                patron_tokens_per_day: Some(1000),
                ..Limits::default()
            },
        );
        let (a, _) = engines(&prefix, &t).await;
        // Patrons have no rate of their own today; the rate script still keeps to the rule
        // should one be given, so it is driven directly.
        let (shared, _) = a.inner.shared.as_ref().unwrap();
        let rate_check = async || {
            shared
                .admit("inst", &[(Level::Patron, "p_ttl", 100)], 1)
                .await
                .unwrap()
                .unwrap();
        };
        let s = subject(Some("p_ttl"));
        let client = redis::Client::open(crate::store::tests::test_redis_url().as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let patron_key = format!("{{{prefix}:inst}}:q:patron:p_ttl");
        let key_key = format!("{{{prefix}:inst}}:q:key:key");
        let tz = TimeZone::get("America/Chicago").unwrap();
        // When the key expires, in ms since the epoch, and whether that is the end of the
        // institution's day as it stood before or after the call that set it.
        let mut expires_at = async |key: &str| -> i64 {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(ttl > 0, "{key} has no expiry ({ttl})");
            Timestamp::now().as_millisecond() + ttl
        };
        let day_end = |at: Timestamp| Window::containing(Period::Day, at, &tz).resets_at;
        let at_reset = |expiry: i64, before: Timestamp| {
            let after = Timestamp::now();
            [day_end(before), day_end(after)]
                .iter()
                .any(|end| (end.as_millisecond() - expiry).abs() <= 2_000)
        };

        // A rate check alone leaves a short-lived hash: a minute's rate is all it holds.
        rate_check().await;
        let rate_only = expires_at(&patron_key).await - Timestamp::now().as_millisecond();
        assert!(rate_only <= 120_000, "{rate_only} ms");

        // A reservation and its settlement: the patron's hash goes at midnight.
        let before = Timestamp::now();
        a.take(&s, demand(20, 100), OverPolicy::Reject, false)
            .await
            .unwrap()
            .settle(120, 0);
        a.quiesce().await;
        let expiry = expires_at(&patron_key).await;
        assert!(
            at_reset(expiry, before),
            "expires at {expiry} ms, not at midnight"
        );

        // A later rate check does not carry it past midnight.
        let before = Timestamp::now();
        rate_check().await;
        let expiry = expires_at(&patron_key).await;
        assert!(
            at_reset(expiry, before),
            "a rate check moved it to {expiry} ms"
        );

        // Nor does a staff reset of the patron's day.
        let before = Timestamp::now();
        a.reset_patron_day_now(&"inst".into(), &"America/Chicago".into(), "p_ttl")
            .await
            .unwrap();
        let expiry = expires_at(&patron_key).await;
        assert!(at_reset(expiry, before), "a reset moved it to {expiry} ms");

        // The key's counters hold a month's budget: they stay for weeks.
        let key_expiry = expires_at(&key_key).await - Timestamp::now().as_millisecond();
        assert!(key_expiry > 39 * 86_400_000, "{key_expiry} ms");
    }

    /// Scripts are loaded once and loaded again when Redis has forgotten them (a restart, a
    /// `SCRIPT FLUSH`): the next request goes on.
    #[tokio::test]
    async fn a_script_redis_forgot_is_loaded_again() {
        let t = table(
            Level::Key,
            "key",
            Limits {
                tokens_per_day: Some(1000),
                requests_per_minute: Some(100),
                ..Limits::default()
            },
        );
        let (a, _) = engines(&prefix("noscript"), &t).await;
        let once = || async {
            a.check_rate(&subject(None), &[Level::Key]).await.unwrap();
            a.take(&subject(None), demand(1, 1), OverPolicy::Reject, false)
                .await
                .unwrap()
                .settle(2, 0);
            a.quiesce().await;
        };
        once().await;
        let client = redis::Client::open(crate::store::tests::test_redis_url().as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        once().await;
        let s = subject(None);
        let used = a
            .usage_now(s.institution(), s.timezone(), Level::Key, "key")
            .await;
        assert_eq!(used.day_tokens, 4);
        let failures = a
            .shared_counters()
            .unwrap()
            .settle_failures
            .load(Ordering::Relaxed);
        assert_eq!(failures, 0);
    }

    /// Leased stream slots: never more streams open than the limit, across two replicas,
    /// and every slot comes back when the streams end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn leased_stream_slots_never_pass_the_limit() {
        let prefix = prefix("lease-streams");
        let t = table(
            Level::Key,
            "key",
            Limits {
                concurrent_streams: Some(3),
                ..Limits::default()
            },
        );
        let both = replicas(&prefix, &t, 64).await;
        let [a, b] = &both;
        let mut streamed = demand(10, 10);
        streamed.stream = true;
        let open = |engine: QuotaEngine| async move {
            engine
                .take(&subject(None), streamed, OverPolicy::Reject, false)
                .await
                .ok()
        };
        let mut held = Vec::new();
        for round in 0..3 {
            held.extend(race(&both, 10, open).await.into_iter().flatten());
            assert!(
                held.len() <= 3,
                "round {round}: {} streams open",
                held.len()
            );
        }
        assert!(leased(&both) > 0, "no stream was served from a lease");
        for r in held.drain(..) {
            r.settle(20, 0);
        }
        a.quiesce().await;
        b.quiesce().await;
        let s = subject(None);
        let open_now = a
            .usage_now(s.institution(), s.timezone(), Level::Key, "key")
            .await
            .streams;
        assert_eq!(open_now, 0, "every slot came back");
        while let Some(r) = open(a.clone()).await {
            held.push(r);
            assert!(held.len() <= 3);
        }
        assert_eq!(held.len(), 3);
    }
}
