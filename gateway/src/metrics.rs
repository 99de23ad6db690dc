//! `/metrics` on the admin listener, in the Prometheus text format: what the usage ledger, the
//! shared store and the shared quota counters have done, fallbacks above all. The labels say
//! what kind of thing happened, never who it happened to.
//!
//! This is the part of the metrics that the Redis backend needs to be operable; request,
//! latency and token metrics join it later.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

/// The route, to merge into the admin router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(serve))
        .with_state(state)
}

async fn serve(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state),
    )
}

/// One family (a counter when its name ends in `_total`, else a gauge): its help text and each
/// labelled value.
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    values: Vec<(Option<(&'a str, &'a str)>, u64)>,
}

/// Bucket bounds of `carrel_overhead_seconds`, in nanoseconds: 5 µs to 1 s.
pub const OVERHEAD_BOUNDS: &[u64] = &[
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    1_000_000_000,
];

/// A Prometheus histogram of durations with fixed bounds: one relaxed atomic add per bucket
/// and one for the sum per observation, no lock.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive), in nanoseconds, ascending.
    bounds: &'static [u64],
    /// Observations per bucket, not cumulative; the last one is past every bound.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (nanoseconds, ascending).
    pub fn new(bounds: &'static [u64]) -> Self {
        debug_assert!(bounds.is_sorted());
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let bucket = self.bounds.partition_point(|&b| b < nanos);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends the histogram in the exposition format, in seconds.
    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += load(count);
            match self.bounds.get(i) {
                Some(&b) => {
                    let le = Duration::from_nanos(b).as_secs_f64();
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = Duration::from_nanos(load(&self.sum_nanos)).as_secs_f64();
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The exposition text.
pub fn render(state: &AppState) -> String {
    let ledger = state.ledger.counters();
    let breakers = state.breakers.all();
    let mut families = vec![
        Family {
            name: "carrel_usage_records_total",
            help: "Usage records by what became of them.",
            values: vec![
                (Some(("outcome", "written")), load(&ledger.written)),
                (Some(("outcome", "dropped")), load(&ledger.dropped)),
                (Some(("outcome", "failed")), load(&ledger.failed)),
            ],
        },
        Family {
            name: "carrel_store_backend_info",
            help: "The store backend in use.",
            values: vec![(Some(("backend", state.store.kind())), 1)],
        },
    ];
    let sg = &state.screener.counters;
    families.push(Family {
        name: "carrel_incidents_total",
        help: "Safeguard incidents recorded by action, and those dropped with a full queue.",
        values: vec![
            (Some(("action", "flag")), load(&sg.incidents[0])),
            (Some(("action", "block")), load(&sg.incidents[1])),
            (Some(("action", "dropped")), load(&sg.incidents[2])),
        ],
    });
    families.push(Family {
        name: "carrel_moderation_checks_total",
        help: "Checks with the external moderation service, by outcome.",
        values: vec![
            (Some(("outcome", "passed")), load(&sg.moderation[0])),
            (Some(("outcome", "flagged")), load(&sg.moderation[1])),
            (Some(("outcome", "failed")), load(&sg.moderation[2])),
        ],
    });
    families.push(Family {
        name: "carrel_incident_notifications_total",
        help: "High-severity incident notifications to institutions' webhooks, by outcome.",
        values: vec![
            (Some(("outcome", "sent")), load(&sg.notifications[0])),
            (Some(("outcome", "refused")), load(&sg.notifications[1])),
            (Some(("outcome", "failed")), load(&sg.notifications[2])),
        ],
    });
    families.push(Family {
        name: "carrel_responses_unsigned_total",
        help: "Inference responses sent without a signature (too large to hold, or a value \
               that cannot be signed) while signing is on.",
        values: vec![(None, state.signing_keys.unsigned())],
    });
    families.push(Family {
        name: "carrel_upstream_retries_total",
        help: "Requests sent again, to another deployment when there is one, after a \
               deployment failed before any byte reached the client.",
        values: vec![(None, load(&state.retries))],
    });
    families.push(Family {
        name: "carrel_upstream_fallbacks_total",
        help: "Requests answered by a fallback model after every deployment of the model \
               asked for refused or could not be reached.",
        values: vec![(None, load(&state.fallbacks))],
    });
    families.push(Family {
        name: "carrel_upstream_breaker_open",
        help: "Whether a deployment's circuit breaker is open (requests kept away from it), \
               by provider/upstream model.",
        values: breakers
            .iter()
            .map(|b| (Some(("deployment", &*b.name)), u64::from(b.is_open())))
            .collect(),
    });
    families.push(Family {
        name: "carrel_upstream_breaker_opened_total",
        help: "Times a deployment's circuit breaker opened, by provider/upstream model.",
        values: breakers
            .iter()
            .map(|b| (Some(("deployment", &*b.name)), load(&b.opened)))
            .collect(),
    });
    if let Some(cache) = &state.cache {
        let c = &cache.counters;
        families.push(Family {
            name: "carrel_cache_requests_total",
            help: "Inference requests by what the response cache did: `hit` (a stored answer), \
                   `coalesced` (the answer of an identical request in flight), `miss` \
                   (cacheable, asked the provider), `bypass` (not cacheable by policy).",
            values: vec![
                (Some(("result", "hit")), load(&c.hits)),
                (Some(("result", "coalesced")), load(&c.coalesced)),
                (Some(("result", "miss")), load(&c.misses)),
                (Some(("result", "bypass")), load(&c.bypasses)),
            ],
        });
        families.push(Family {
            name: "carrel_cache_answers_stored_total",
            help: "Answers stored in the response cache.",
            values: vec![(None, load(&c.stored))],
        });
        if let Some(tier) = cache.shared() {
            families.push(Family {
                name: "carrel_cache_shared_hits_total",
                help: "Answers found in the shared (Redis) tier and not in this process.",
                values: vec![(None, load(&tier.hits))],
            });
            families.push(Family {
                name: "carrel_cache_shared_stored_total",
                help: "Answers this process stored in the shared (Redis) tier.",
                values: vec![(None, load(&tier.stored))],
            });
            families.push(Family {
                name: "carrel_cache_shared_errors_total",
                help: "Lookups and stores in the shared tier that failed or took too long \
                       (each a miss; the cache goes on locally).",
                values: vec![(None, load(&tier.errors))],
            });
        }
        let (entries, bytes) = cache.size();
        families.push(Family {
            name: "carrel_cache_answers",
            help: "Answers the response cache holds now.",
            values: vec![(None, entries)],
        });
        families.push(Family {
            name: "carrel_cache_bytes",
            help: "Bytes of answers the response cache holds now (bounded by cache.max_mib).",
            values: vec![(None, bytes)],
        });
    }
    families.push(Family {
        name: "carrel_patron_sign_ins_total",
        help: "Patron sign-ins by outcome (`ok` or the refusal's code); never by patron.",
        values: state
            .patron_desk
            .counters
            .snapshot()
            .into_iter()
            .map(|(outcome, n)| (Some(("outcome", outcome)), n))
            .collect(),
    });
    let sip2 = state.patron_desk.sip2_stats();
    families.push(Family {
        name: "carrel_sip2_requests_total",
        help: "SIP2 exchanges with libraries' systems, and those that failed (timeouts, \
               refusals, replies that stayed malformed).",
        values: vec![
            (
                Some(("outcome", "all")),
                sip2.iter().map(|s| s.requests).sum(),
            ),
            (
                Some(("outcome", "failed")),
                sip2.iter().map(|s| s.failures).sum(),
            ),
            (
                Some(("outcome", "end_session")),
                load(&state.patron_desk.counters.sip2_end_sessions),
            ),
        ],
    });
    if let Some(r) = state.store.replica_counters() {
        families.push(Family {
            name: "carrel_store_log_entries_applied_total",
            help: "Entries of the shared log and usage stream applied to this replica's view.",
            values: vec![(None, load(&r.applied))],
        });
        families.push(Family {
            name: "carrel_store_log_read_failures_total",
            help: "Reads of the shared log that failed and were retried.",
            values: vec![(None, load(&r.read_failures))],
        });
        families.push(Family {
            name: "carrel_usage_journal_batches_total",
            help: "Usage batches written to the local journal while Redis was away, sent from \
                   it once Redis was back, and set aside unreadable (`quarantined`).",
            values: vec![
                (Some(("event", "journaled")), load(&r.journaled)),
                (Some(("event", "replayed")), load(&r.replayed)),
                (Some(("event", "quarantined")), load(&r.quarantined)),
            ],
        });
    }
    if let Some(q) = state.quota.shared_counters() {
        families.push(Family {
            name: "carrel_quota_redis_fallbacks_total",
            help: "Requests whose limits were checked while Redis could not be reached, by \
                   what the failure policy did.",
            values: vec![
                (Some(("policy", "local")), load(&q.local_fallbacks)),
                (Some(("policy", "fail_closed")), load(&q.failed_closed)),
                (Some(("policy", "uncounted")), load(&q.uncounted)),
            ],
        });
        families.push(Family {
            name: "carrel_quota_settle_failures_total",
            help: "Settlements that did not reach Redis (their reservations stay counted in \
                   full).",
            values: vec![(None, load(&q.settle_failures))],
        });
        families.push(Family {
            name: "carrel_quota_leased_total",
            help: "Reservations and rate checks served from a lease, without a round trip.",
            values: vec![(None, load(&q.leased))],
        });
    }
    let mut out = String::new();
    for f in families {
        // Prometheus naming: counters end in `_total`; the rest are gauges.
        let kind = if f.name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {kind}", f.name);
        for (label, value) in f.values {
            match label {
                Some((k, v)) => {
                    let _ = writeln!(out, "{}{{{k}=\"{v}\"}} {value}", f.name);
                }
                None => {
                    let _ = writeln!(out, "{} {value}", f.name);
                }
            }
        }
    }
    state.overhead.render(
        "carrel_overhead_seconds",
        "Time Carrel spent on an inference request before its response head went out, less \
         the time it waited on providers (or on an identical request in flight).",
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_duration_in_its_bucket_and_renders_cumulatively() {
        let h = Histogram::new(&[10_000, 100_000]);
        for micros in [3, 10, 11, 99, 2_000] {
            h.observe(Duration::from_micros(micros));
        }
        let mut out = String::new();
        h.render("t_seconds", "Test.", &mut out);
        assert_eq!(
            out,
            "# HELP t_seconds Test.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{le=\"0.00001\"} 2\n\
             t_seconds_bucket{le=\"0.0001\"} 4\n\
             t_seconds_bucket{le=\"+Inf\"} 5\n\
             t_seconds_sum 0.002123\n\
             t_seconds_count 5\n"
        );
    }
}
