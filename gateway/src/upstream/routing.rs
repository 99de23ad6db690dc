//! Resilient routing: a model's deployments, each behind a circuit breaker, picked by weight.
//!
//! - **Passive outlier detection.** Every attempt tells its deployment's [`Breaker`] how it
//!   went: a connect error, a timeout, a broken connection, a 429 or a 5xx is a failure,
//!   anything else a success.
//!   `upstream.breaker_failures` failures in a row open the breaker: for
//!   `upstream.breaker_open_ms` no request is sent there; then one trial request is, and its
//!   outcome closes the breaker or opens it again.
//! - **Active health checks.** Every `upstream.health_check_interval_ms` each provider of a
//!   model with several deployments is asked for `GET {base_url}/models` ([`probe_all`]). No
//!   answer or a 5xx opens the breakers of its deployments; any other answer closes those a
//!   probe opened, so a provider that comes back is used again without waiting for a trial (a
//!   breaker opened by real 429s or 5xx keeps its open period: a provider may answer probes
//!   and still refuse work).
//! - **Retries.** A request goes to a deployment picked by weight among those whose breaker
//!   lets it through (weight 0: a standby, picked only when no weighted one can be). After a
//!   connect error, a 429, a 502 or a 503 — failures where the provider did no work — it tries
//!   again, another deployment first, up to `upstream.retries` times with a short backoff. A
//!   timeout, a 500, a 504 or a connection broken mid-request is not sent again: the provider
//!   may have done (and billed) the work. Once a response head is relayed nothing is retried:
//!   the client has seen the first byte.
//!
//! When every breaker is open the request still goes to a deployment (picked by weight): a
//! total outage answers as the provider does, and the first success closes its breaker.
//!
//! Breakers are kept by provider and upstream model in [`Breakers`], outside the catalog, so a
//! catalog rebuilt for a price or a new model keeps what it knows about health. Reading one on
//! the hot path is an atomic load; only failures and recoveries write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::catalog::{ModelRoute, Target};

/// Milliseconds since the process's first look at the clock, plus one (0 means "closed").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One deployment's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    /// `provider/upstream model`, for logs and metrics.
    pub name: Arc<str>,
    /// Failures in a row while closed.
    failures: AtomicU32,
    /// When it opened until ([`now_ms`]); 0 while closed.
    open_until: AtomicU64,
    /// When the current trial was let through; 0 when none is out.
    trial_at: AtomicU64,
    threshold: u32,
    open_for: u64,
    /// Times it has opened.
    pub opened: AtomicU64,
    /// Whether a health probe opened it (and so a probe that answers may close it; a breaker
    /// opened by real failures waits for its trial).
    by_probe: std::sync::atomic::AtomicBool,
}

impl Breaker {
    fn new(name: Arc<str>, threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            name,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trial_at: AtomicU64::new(0),
            threshold: threshold.max(1),
            open_for: open_for.as_millis().max(1) as u64,
            opened: AtomicU64::new(0),
            by_probe: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether it is open (no request should go there but a trial).
    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    /// Whether [`Breaker::admits`] would let a request through, without taking the trial.
    pub fn may_admit(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        let trial = self.trial_at.load(Ordering::Relaxed);
        now >= until && (trial == 0 || now >= trial + self.open_for)
    }

    /// Whether a request may go there now; a request let through an expired open breaker is
    /// its one trial.
    pub fn admits(&self) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = now_ms();
        if now < until {
            return false;
        }
        // Half open: one trial at a time; a trial that never reported (its client left) stops
        // blocking others after another open period.
        let trial = self.trial_at.load(Ordering::Relaxed);
        (trial == 0 || now >= trial + self.open_for)
            && self
                .trial_at
                .compare_exchange(trial, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// An attempt there went well (or a health check answered).
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Relaxed);
            self.trial_at.store(0, Ordering::Relaxed);
            tracing::info!(deployment = %self.name, "circuit breaker closed");
        }
    }

    /// An attempt there failed: a connect error, a timeout, a 429 or a 5xx.
    pub fn failed(&self) {
        if self.is_open() {
            // A trial failed (or a request sent when every breaker was open): open again.
            self.open();
            return;
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= self.threshold {
            self.open();
        }
    }

    /// A health probe found the provider down: opens it, unless it is open already.
    pub fn probe_failed(&self) {
        if !self.is_open() {
            self.open();
            self.by_probe.store(true, Ordering::Relaxed);
        }
    }

    /// A health probe found the provider answering: closes it if a probe opened it. One that
    /// real requests opened (a 429 or 5xx while the provider still answers probes) keeps its
    /// open period and trial.
    pub fn probe_succeeded(&self) {
        if self.by_probe.swap(false, Ordering::Relaxed) {
            self.succeeded();
        }
    }

    /// Opens it now, for the open period.
    pub fn open(&self) {
        self.by_probe.store(false, Ordering::Relaxed);
        let was = self
            .open_until
            .swap(now_ms() + self.open_for, Ordering::Relaxed);
        self.trial_at.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        if was == 0 {
            self.opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(deployment = %self.name, "circuit breaker opened");
        }
    }
}

/// Every deployment's breaker, by provider and upstream model; shared by catalog builds.
#[derive(Debug)]
pub struct Breakers {
    by_name: Mutex<HashMap<Arc<str>, Arc<Breaker>>>,
    threshold: u32,
    open_for: Duration,
}

impl Breakers {
    /// Breakers that open after `threshold` failures in a row, for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Breakers {
        Breakers {
            by_name: Mutex::new(HashMap::new()),
            threshold,
            open_for,
        }
    }

    /// The breaker of `provider` serving `upstream_model`, made on first use.
    pub fn of(&self, provider: &str, upstream_model: &str) -> Arc<Breaker> {
        let name: Arc<str> = format!("{provider}/{upstream_model}").into();
        let mut map = self.by_name.lock().expect("breakers lock");
        Arc::clone(
            map.entry(Arc::clone(&name))
                .or_insert_with(|| Arc::new(Breaker::new(name, self.threshold, self.open_for))),
        )
    }

    /// Every breaker, by name (for metrics).
    pub fn all(&self) -> Vec<Arc<Breaker>> {
        let mut all: Vec<_> = self
            .by_name
            .lock()
            .expect("breakers lock")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// One place a model is served.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Provider name.
    pub provider: Arc<str>,
    /// The provider's name for the model.
    pub upstream_model: Arc<str>,
    /// Share of first attempts; 0 for a standby.
    pub weight: u32,
    /// Time to the response head, if not `upstream.response_timeout_ms`.
    pub timeout: Option<Duration>,
    /// Where requests go.
    pub target: Target,
    /// Its health.
    pub breaker: Arc<Breaker>,
}

/// The deployments a request has tried, and those it must not use, by index (a model has at
/// most a few dozen deployments).
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried {
    tried: u64,
    excluded: u64,
}

impl Tried {
    /// Marks deployment `i` tried.
    pub fn add(&mut self, i: usize) {
        self.tried |= 1 << (i % 64);
    }

    /// Rules deployment `i` out (its provider is contained).
    pub fn exclude(&mut self, i: usize) {
        self.excluded |= 1 << (i % 64);
    }

    fn has(self, i: usize) -> bool {
        (self.tried | self.excluded) & (1 << (i % 64)) != 0
    }

    fn excludes(self, i: usize) -> bool {
        self.excluded & (1 << (i % 64)) != 0
    }
}

/// The deployment for the next attempt of a request that has tried `tried`: by weight among
/// untried ones whose breaker admits it; then untried standbys; then any whose breaker admits
/// it; and when no breaker admits anything, by weight regardless. A model with one
/// deployment makes no choice (and draws no random number).
pub fn pick(route: &ModelRoute, mut tried: Tried) -> usize {
    let deps = &route.deployments;
    if deps.len() == 1 {
        return 0;
    }
    let roll = roll();
    let choose = |pass: &dyn Fn(usize, &Deployment) -> bool| -> Option<usize> {
        let total: u64 = deps
            .iter()
            .enumerate()
            .filter(|(i, d)| pass(*i, d))
            .map(|(_, d)| u64::from(d.weight.max(1)))
            .sum();
        let mut at = roll.checked_rem(total)?;
        for (i, d) in deps.iter().enumerate().filter(|(i, d)| pass(*i, d)) {
            let w = u64::from(d.weight.max(1));
            if at < w {
                return Some(i);
            }
            at -= w;
        }
        None
    };
    // A breaker is asked to admit only the one request picked for it (admitting takes a
    // half-open breaker's single trial); one that turns it down is passed over.
    let mut refused = Tried::default();
    for _ in 0..deps.len() {
        let open = |i: usize, d: &Deployment| !refused.has(i) && d.breaker.may_admit();
        let picked = choose(&|i, d| d.weight > 0 && !tried.has(i) && open(i, d))
            .or_else(|| choose(&|i, d| d.weight == 0 && !tried.has(i) && open(i, d)))
            .or_else(|| choose(&|i, d| !tried.excludes(i) && open(i, d)));
        let Some(i) = picked else { break };
        if deps[i].breaker.admits() {
            return i;
        }
        refused.add(i);
        tried.add(i);
    }
    choose(&|i, d| d.weight > 0 && !tried.excludes(i))
        .or_else(|| choose(&|i, _| !tried.excludes(i)))
        .unwrap_or(0)
}

/// The backoff before attempt `n` (1 for the first retry): 50 ms doubling, at most 800 ms, with
/// up to half of it again at random so that retries from many requests spread out.
pub fn backoff(n: u32, roll: u64) -> Duration {
    let base = 50u64 << n.saturating_sub(1).min(4);
    Duration::from_millis(base + roll % (base / 2 + 1))
}

/// A random number for [`pick`] and [`backoff`]: a per-thread xorshift seeded from the OS, so
/// the hot path makes no system call (spreading load needs no cryptographic randomness).
pub fn roll() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> =
            std::cell::Cell::new(u64::from_le_bytes(carrel_core::ids::random_bytes()) | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Probes every provider serving a model that has more than one deployment, once, all at the
/// same time: `GET {base_url}/models`. A provider that does not answer, or answers 5xx, has
/// those deployments' breakers opened; one that answers anything else has the breakers that
/// probes opened closed. A model with one deployment always goes there, so its provider is not
/// probed.
pub async fn probe_all(upstream: &super::Upstream, catalog: &super::catalog::Catalog) {
    let mut by_provider: HashMap<&str, (&Arc<super::catalog::HttpTarget>, Vec<&Arc<Breaker>>)> =
        HashMap::new();
    // Only a model with a choice of deployments routes by health.
    for route in catalog.iter().filter(|r| r.deployments.len() > 1) {
        for d in route.deployments.iter() {
            if let Target::Http(target) = &d.target {
                by_provider
                    .entry(&d.provider)
                    .or_insert_with(|| (target, Vec::new()))
                    .1
                    .push(&d.breaker);
            }
        }
    }
    let probes = by_provider
        .into_values()
        .map(|(target, breakers)| async move {
            let up = upstream.probe(target).await;
            for b in breakers {
                if up {
                    b.probe_succeeded();
                } else {
                    b.probe_failed();
                }
            }
        });
    futures_util::future::join_all(probes).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(threshold: u32, open_ms: u64) -> Breaker {
        Breaker::new("p/m".into(), threshold, Duration::from_millis(open_ms))
    }

    #[test]
    fn a_breaker_opens_after_failures_in_a_row_and_a_success_resets_the_count() {
        let b = breaker(3, 60_000);
        b.failed();
        b.failed();
        b.succeeded();
        b.failed();
        b.failed();
        assert!(b.admits() && !b.is_open());
        b.failed();
        assert!(b.is_open() && !b.admits());
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
        b.succeeded();
        assert!(!b.is_open() && b.admits());
    }

    #[test]
    fn an_expired_breaker_lets_one_trial_through() {
        let b = breaker(1, 1);
        b.failed();
        // Open for 1 ms: wait it out on the breaker's own clock.
        let until = now_ms() + 2;
        while now_ms() < until {
            std::hint::spin_loop();
        }
        assert!(b.admits(), "the trial");
        assert!(!b.admits(), "only one trial at a time");
        b.failed();
        assert!(b.is_open());
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!((50..=75).contains(&backoff(1, 7).as_millis()));
        assert!((100..=150).contains(&backoff(2, 7).as_millis()));
        assert!(backoff(30, u64::MAX).as_millis() <= 1200);
    }
}
