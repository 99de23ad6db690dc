//! The quota engine of one process: request rates, token and money budgets and concurrent
//! streams at every level a request counts against, checked and committed together.
//!
//! State is kept per institution, behind one mutex each: every level a request counts against
//! (institution, site, group, key, patron, model) belongs to one institution, so one lock makes
//! a reservation all-or-nothing across levels, and institutions never wait on each other. The
//! critical section is one hash lookup per level (each level's counters are found once per
//! call, with no allocation or reference count on a hit) and a few additions. Limits themselves are a read-mostly
//! snapshot ([`LimitsTable`] in an `ArcSwap`), replaced whole when an admin changes one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use jiff::Timestamp;
use jiff::tz::TimeZone;
// The engine's maps are keyed by ids from the store, catalog names and keyed-hash patron
// references, none chosen by a client: a fast non-keyed hash is safe here.
use rustc_hash::{FxBuildHasher, FxHashMap};

/// A map per [`Level`], indexed by `level as usize`.
type PerLevel<T> = [T; Level::ALL.len()];

use super::gcra::Gcra;
use super::lease::{NoLease, Part};
use super::limits::{Level, LimitKind, Limits};
use super::period::{Period, Window};
use super::shared::{
    Denial, InFlight, LevelLimits, Shared, SharedCounters, SharedHold, SharedSettings, Unreachable,
    Windows,
};
use crate::config::OnFailure;
use crate::domain::Principal;
use crate::store::PeriodUsage;

/// Where the engine reads time. Rates use the monotonic reading, periods the wall clock.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Monotonic nanoseconds since some fixed start.
    fn mono_ns(&self) -> u64;
    /// The wall-clock time.
    fn wall(&self) -> Timestamp;
}

/// The system's clocks.
#[derive(Debug)]
pub struct SystemClock {
    start: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            start: std::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn mono_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock tests move by hand: both readings advance together.
#[derive(Debug)]
pub struct FakeClock {
    start: Timestamp,
    elapsed_ns: AtomicU64,
}

impl FakeClock {
    /// A clock that reads `start` until advanced.
    pub fn at(start: Timestamp) -> Arc<FakeClock> {
        Arc::new(FakeClock {
            start,
            elapsed_ns: AtomicU64::new(0),
        })
    }

    /// Moves both readings forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.elapsed_ns
            .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn mono_ns(&self) -> u64 {
        // Never zero, so a fresh limiter's TAT of 0 is in the past.
        1 + self.elapsed_ns.load(Ordering::SeqCst)
    }
    fn wall(&self) -> Timestamp {
        self.start + jiff::SignedDuration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst) as i64)
    }
}

/// Limits by level and id: a snapshot, replaced whole.
#[derive(Debug, Default, Clone)]
pub struct LimitsTable {
    by_level: PerLevel<FxHashMap<Box<str>, Limits>>,
}

impl LimitsTable {
    /// Sets the limits of one level (an empty set removes the entry).
    pub fn insert(&mut self, level: Level, id: &str, limits: Limits) {
        let map = &mut self.by_level[level as usize];
        if limits.is_empty() {
            map.remove(id);
        } else {
            map.insert(id.into(), limits);
        }
    }

    /// The limits of one level, if any are set.
    pub fn get(&self, level: Level, id: &str) -> Option<&Limits> {
        self.by_level[level as usize].get(id)
    }

    /// Every limit divided by `n` (at least 1 where a limit is set): one replica's share.
    pub fn divided(&self, n: u32) -> LimitsTable {
        let n = u64::from(n.max(1));
        let mut out = LimitsTable::default();
        for (level, map) in Level::ALL.into_iter().zip(&self.by_level) {
            for (id, limits) in map {
                let mut share = *limits;
                for kind in LimitKind::ALL {
                    if let Some(v) = limits.get(kind) {
                        share.set(kind, Some((v / n).max(1)));
                    }
                }
                out.insert(level, id, share);
            }
        }
        out
    }
}

/// Who and what a request counts against: the key's principal (its institution, site, group
/// and key), and the patron and model when known. Cloning shares the principal.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The key's principal; its institution's time zone sets when periods turn over.
    pub principal: Arc<Principal>,
    /// The patron reference, when a patron is known.
    pub patron: Option<Arc<str>>,
    /// The model, when one is asked for.
    pub model: Option<Arc<str>>,
}

impl Subject {
    /// The institution.
    pub fn institution(&self) -> &Arc<str> {
        &self.principal.institution_id
    }

    /// The institution's IANA time zone.
    pub fn timezone(&self) -> &Arc<str> {
        &self.principal.timezone
    }

    /// The levels this subject counts against, widest first.
    pub fn levels(&self) -> impl Iterator<Item = (Level, &Arc<str>)> {
        Level::ALL
            .into_iter()
            .zip(self.ids())
            .filter_map(|(level, id)| Some((level, id?)))
    }

    /// Each level's id, indexed by `level as usize`.
    fn ids(&self) -> PerLevel<Option<&Arc<str>>> {
        let p = &*self.principal;
        [
            Some(&p.institution_id),
            p.site_id.as_ref(),
            p.group_id.as_ref(),
            Some(&p.key_id),
            self.patron.as_ref(),
            self.model.as_ref(),
        ]
    }
}

/// What a request asks to reserve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
    /// Output tokens per choice the request may produce (`max_tokens` or the model's cap).
    pub max_output_tokens: u64,
    /// Choices asked for (`n`); the output counts once for each.
    pub choices: u64,
    /// Nano-dollars per prompt token.
    pub input_nano_per_token: f64,
    /// Nano-dollars per output token.
    pub output_nano_per_token: f64,
    /// Whether the request streams (and so holds a stream slot).
    pub stream: bool,
}

impl Demand {
    fn cost(&self, prompt: u64, output: u64) -> u64 {
        (prompt as f64 * self.input_nano_per_token + output as f64 * self.output_nano_per_token)
            .ceil() as u64
    }
}

/// What to do when a request's estimate is more than what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverPolicy {
    /// Refuse with 429.
    Reject,
    /// Lower `max_tokens` to what is left, when at least one token per choice is.
    Clamp,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The level whose limit was hit.
    pub level: Level,
    /// Which limit.
    pub kind: LimitKind,
    /// The limit.
    pub limit: u64,
    /// What was left of it (tokens, or nano-dollars, for period limits; 0 for rates and
    /// streams).
    pub remaining: u64,
    /// Seconds until trying again can succeed.
    pub retry_after_secs: u64,
    /// When the period turns over, for period limits.
    pub resets_at: Option<Timestamp>,
}

/// The tightest limit of one kind for response headers: limit, remaining, and when it is full
/// again (a duration for rates, an instant for periods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    /// The limit.
    pub limit: u64,
    /// What is left.
    pub remaining: u64,
    /// Nanoseconds until it resets.
    pub reset_ns: u64,
}

/// The counters of one level in the current periods.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    tat: u64,
    day_id: i32,
    day_tokens: u64,
    month_id: i32,
    month_tokens: u64,
    month_cost: u64,
    streams: u64,
}

impl Counters {
    fn new(day: i32, month: i32) -> Counters {
        Counters {
            day_id: day,
            month_id: month,
            ..Counters::default()
        }
    }

    fn roll(&mut self, day: i32, month: i32) {
        if self.day_id != day {
            self.day_id = day;
            self.day_tokens = 0;
        }
        if self.month_id != month {
            self.month_id = month;
            self.month_tokens = 0;
            self.month_cost = 0;
        }
    }
}

/// A time-boxed addition to a patron's daily allotment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// Tokens added.
    pub tokens: u64,
    /// When the extension lapses.
    pub expires_at: Timestamp,
}

#[derive(Debug)]
struct InstState {
    tz_name: Arc<str>,
    tz: TimeZone,
    day: Window,
    month: Window,
    /// The periods after `day` and `month`, for the shared counters' scripts.
    next_day: Window,
    next_month: Window,
    counters: PerLevel<hashbrown::HashMap<Arc<str>, Counters, FxBuildHasher>>,
    extensions: FxHashMap<Arc<str>, Vec<Extension>>,
}

impl InstState {
    fn new(tz_name: &Arc<str>, now: Timestamp) -> InstState {
        let tz = TimeZone::get(tz_name).unwrap_or(TimeZone::UTC);
        let day = Window::containing(Period::Day, now, &tz);
        let month = Window::containing(Period::Month, now, &tz);
        InstState {
            tz_name: Arc::clone(tz_name),
            day,
            month,
            next_day: Window::containing(Period::Day, day.resets_at, &tz),
            next_month: Window::containing(Period::Month, month.resets_at, &tz),
            tz,
            counters: Default::default(),
            extensions: FxHashMap::default(),
        }
    }

    /// Brings the periods up to `now` (and the zone up to date).
    fn refresh(&mut self, tz_name: &Arc<str>, now: Timestamp) {
        if *self.tz_name != **tz_name {
            let fresh = InstState::new(tz_name, now);
            self.tz_name = fresh.tz_name;
            self.tz = fresh.tz;
            self.day = fresh.day;
            self.month = fresh.month;
            self.next_day = fresh.next_day;
            self.next_month = fresh.next_month;
        }
        if now >= self.day.resets_at {
            self.day = Window::containing(Period::Day, now, &self.tz);
            self.next_day = Window::containing(Period::Day, self.day.resets_at, &self.tz);
            // Yesterday's patrons are done with; keep those with a stream still open.
            self.counters[Level::Patron as usize].retain(|_, c| c.streams > 0);
        }
        if now >= self.month.resets_at {
            self.month = Window::containing(Period::Month, now, &self.tz);
            self.next_month = Window::containing(Period::Month, self.month.resets_at, &self.tz);
        }
    }

    fn windows(&self) -> Windows {
        Windows {
            day: self.day,
            next_day: self.next_day,
            month: self.month,
            next_month: self.next_month,
        }
    }

    /// One level's counters in the current periods (created when missing).
    fn counters(&mut self, level: Level, id: &str) -> &mut Counters {
        let (day, month) = (self.day.id, self.month.id);
        let c = self.counters[level as usize]
            .entry_ref(id)
            .or_insert_with(|| Counters::new(day, month));
        c.roll(day, month);
        c
    }

    /// The counters of every level of `ids` at once, each found once.
    fn all_counters<'a>(
        &'a mut self,
        ids: &PerLevel<Option<&Arc<str>>>,
    ) -> PerLevel<Option<&'a mut Counters>> {
        let (day, month) = (self.day.id, self.month.id);
        let mut maps = self.counters.iter_mut();
        ids.map(|id| {
            let map = maps.next().expect("one map per level");
            let c = map
                .entry_ref(&**id?)
                .or_insert_with(|| Counters::new(day, month));
            c.roll(day, month);
            Some(c)
        })
    }

    /// The limits at one level of `subject`; a patron's daily allotment includes their running
    /// extensions.
    fn limits(
        &mut self,
        table: &LimitsTable,
        subject: &Subject,
        level: Level,
        id: &str,
        now: Timestamp,
    ) -> Limits {
        let mut limits = limits_at(table, subject, level, id);
        if level == Level::Patron
            && let Some(allotment) = limits.tokens_per_day
        {
            let extra = self.extension_tokens(id, now);
            limits.tokens_per_day = Some(allotment.saturating_add(extra));
        }
        limits
    }

    /// What one level has used, in the current periods.
    fn usage(&mut self, level: Level, id: &str, requests_remaining: Option<u64>) -> LevelUsage {
        let (day, month) = (self.day, self.month);
        let c = *self.counters(level, id);
        LevelUsage {
            day_tokens: c.day_tokens,
            month_tokens: c.month_tokens,
            month_cost_nano_usd: c.month_cost,
            streams: c.streams,
            requests_remaining,
            day_resets_at: day.resets_at,
            month_resets_at: month.resets_at,
        }
    }

    fn extension_tokens(&mut self, patron: &str, now: Timestamp) -> u64 {
        let Some(list) = self.extensions.get_mut(patron) else {
            return 0;
        };
        list.retain(|e| e.expires_at > now);
        list.iter().map(|e| e.tokens).fold(0, u64::saturating_add)
    }
}

/// The limits that apply at one level of a subject.
fn limits_at(table: &LimitsTable, subject: &Subject, level: Level, id: &str) -> Limits {
    match level {
        // A patron's daily allotment is the smallest `patron_tokens_per_day` any of the
        // subject's levels sets.
        Level::Patron => {
            let allotment = subject
                .levels()
                .filter(|(l, _)| !matches!(l, Level::Patron | Level::Model))
                .filter_map(|(l, id)| table.get(l, id)?.patron_tokens_per_day)
                // A guest pass's fixed allotment caps the patron's day too.
                .chain(subject.principal.patron.as_ref().and_then(|p| p.allowance))
                .min();
            Limits {
                tokens_per_day: allotment,
                ..Limits::default()
            }
        }
        _ => table.get(level, id).copied().unwrap_or_default(),
    }
}

/// What one level has used in the current periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelUsage {
    /// Tokens today (reserved ones included).
    pub day_tokens: u64,
    /// Tokens this month.
    pub month_tokens: u64,
    /// Cost this month, nano-dollars.
    pub month_cost_nano_usd: u64,
    /// Streams open now.
    pub streams: u64,
    /// Requests that could be made at once now, when a rate limit is set.
    pub requests_remaining: Option<u64>,
    /// When the day ends.
    pub day_resets_at: Timestamp,
    /// When the month ends.
    pub month_resets_at: Timestamp,
}

/// A level's limits and usage, as `GET /v1/quota` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelStatus {
    /// The level.
    pub level: Level,
    /// Its id.
    pub id: Arc<str>,
    /// Its limits (for a patron: the allotment plus extensions, as `tokens_per_day`).
    pub limits: Limits,
    /// Its usage.
    pub usage: LevelUsage,
}

/// The engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct QuotaEngine {
    inner: Arc<EngineInner>,
}

#[derive(Debug)]
struct EngineInner {
    clock: Arc<dyn Clock>,
    limits: ArcSwap<LimitsTable>,
    /// One lock per institution (see the module docs). DashMap shards the lookup of the lock;
    /// the lock itself is what makes a reservation atomic.
    institutions: DashMap<Arc<str>, Arc<Mutex<InstState>>, FxBuildHasher>,
    /// On the Redis backend: the shared counters, and the in-process engine (limits divided by
    /// the expected replicas) that counts while they cannot be reached.
    shared: Option<(Arc<Shared>, QuotaEngine)>,
}

impl QuotaEngine {
    /// An engine with no limits, on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> QuotaEngine {
        QuotaEngine::build(clock, None)
    }

    fn build(clock: Arc<dyn Clock>, shared: Option<(Arc<Shared>, QuotaEngine)>) -> QuotaEngine {
        QuotaEngine {
            inner: Arc::new(EngineInner {
                clock,
                limits: ArcSwap::from_pointee(LimitsTable::default()),
                institutions: DashMap::with_hasher(FxBuildHasher),
                shared,
            }),
        }
    }

    /// An engine whose counters live in Redis, shared by every replica (see [`super::shared`]).
    pub async fn with_shared_counters(
        clock: Arc<dyn Clock>,
        settings: &SharedSettings,
    ) -> Result<QuotaEngine, String> {
        let shared = Shared::connect(settings).await?;
        tracing::info!(
            timeout_ms = settings.timeout.as_millis() as u64,
            expected_replicas = settings.expected_replicas,
            on_redis_failure = %settings.policy,
            "quota counters shared in Redis"
        );
        let fallback = QuotaEngine::new(Arc::clone(&clock));
        let shared = Arc::new(shared);
        if shared.leases.on() {
            shared
                .runtime
                .spawn(super::lease::sweeper(Arc::downgrade(&shared)));
        }
        Ok(QuotaEngine::build(clock, Some((shared, fallback))))
    }

    /// Whether the counters are shared in Redis.
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// What the shared counters have done (`None` in process).
    pub fn shared_counters(&self) -> Option<&SharedCounters> {
        self.inner.shared.as_ref().map(|(s, _)| &s.counters)
    }

    /// Replaces every limit.
    pub fn set_limits(&self, table: LimitsTable) {
        let shared = self.inner.shared.as_ref().map(|(shared, fallback)| {
            fallback.set_limits(table.divided(shared.expected_replicas));
            Arc::clone(shared)
        });
        self.inner.limits.store(Arc::new(table));
        if let Some(shared) = shared {
            // Leases taken under the old limits are not spent any more: new ones meet the new
            // limits.
            shared.leases.limits_changed();
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<LimitsTable> {
        self.inner.limits.load_full()
    }

    fn institution(&self, id: &Arc<str>, tz: &Arc<str>) -> Arc<Mutex<InstState>> {
        if let Some(state) = self.inner.institutions.get(id) {
            return Arc::clone(&state);
        }
        let now = self.inner.clock.wall();
        Arc::clone(
            &self
                .inner
                .institutions
                .entry(Arc::clone(id))
                .or_insert_with(|| Arc::new(Mutex::new(InstState::new(tz, now)))),
        )
    }

    fn lock<'a>(
        &self,
        state: &'a Mutex<InstState>,
        tz: &Arc<str>,
    ) -> (MutexGuard<'a, InstState>, Timestamp) {
        // A panic while holding the lock leaves counters that are still numbers; carry on.
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.inner.clock.wall();
        guard.refresh(tz, now);
        (guard, now)
    }

    /// Counts a request against the request rates of `levels` of `subject`: all of them, or
    /// none when one is over its rate. Returns the tightest rate for the response headers.
    pub fn admit(&self, subject: &Subject, levels: &[Level]) -> Result<Option<Headroom>, Refusal> {
        let table = self.inner.limits.load();
        let mut ids = subject.ids();
        let mut rated: PerLevel<Option<Gcra>> = [None; Level::ALL.len()];
        for (level, (id, gcra)) in Level::ALL.into_iter().zip(ids.iter_mut().zip(&mut rated)) {
            *gcra = id
                .filter(|_| levels.contains(&level))
                .and_then(|id| limits_at(&table, subject, level, id).requests_per_minute)
                .map(Gcra::for_limit);
            if gcra.is_none() {
                *id = None;
            }
        }
        if rated.iter().all(Option::is_none) {
            return Ok(None);
        }
        let state = self.institution(subject.institution(), subject.timezone());
        let (mut st, _) = self.lock(&state, subject.timezone());
        let now = self.inner.clock.mono_ns();
        let mut counters = st.all_counters(&ids);
        let mut next = [0u64; Level::ALL.len()];
        for (level, ((gcra, c), tat)) in Level::ALL
            .into_iter()
            .zip(rated.iter().zip(&counters).zip(&mut next))
        {
            let (Some(gcra), Some(c)) = (gcra, c) else {
                continue;
            };
            match gcra.check(c.tat, now) {
                Ok(t) => *tat = t,
                Err(wait) => {
                    return Err(Refusal {
                        level,
                        kind: LimitKind::RequestsPerMinute,
                        limit: u64::from(gcra.burst()),
                        remaining: 0,
                        retry_after_secs: wait.div_ceil(1_000_000_000).max(1),
                        resets_at: None,
                    });
                }
            }
        }
        let mut tightest: Option<Headroom> = None;
        for ((gcra, c), tat) in rated.iter().zip(&mut counters).zip(next) {
            let (Some(gcra), Some(c)) = (gcra, c) else {
                continue;
            };
            c.tat = tat;
            let room = Headroom {
                limit: u64::from(gcra.burst()),
                remaining: u64::from(gcra.remaining(tat, now)),
                reset_ns: gcra.reset_ns(tat, now),
            };
            if tightest.is_none_or(|t| room.remaining < t.remaining) {
                tightest = Some(room);
            }
        }
        Ok(tightest)
    }

    /// Reserves `demand` at every level of `subject`, or refuses (or, under
    /// [`OverPolicy::Clamp`], reserves a smaller output). The reservation is refunded when it
    /// is dropped unsettled.
    pub fn reserve(
        &self,
        subject: &Subject,
        demand: Demand,
        policy: OverPolicy,
    ) -> Result<Reservation, Refusal> {
        let table = self.inner.limits.load();
        let state = self.institution(subject.institution(), subject.timezone());
        let (mut st, now) = self.lock(&state, subject.timezone());
        let choices = demand.choices.max(1);
        let wanted_output = demand.max_output_tokens.saturating_mul(choices);
        let (day, month) = (st.day, st.month);

        // Each level's limits, then its counters, each looked up once.
        let ids = subject.ids();
        let mut limits = [Limits::default(); Level::ALL.len()];
        for ((level, id), limits) in Level::ALL.into_iter().zip(ids).zip(&mut limits) {
            if let Some(id) = id {
                *limits = st.limits(&table, subject, level, id, now);
            }
        }
        let mut counters = st.all_counters(&ids);

        // The most output each limited level leaves room for, and the tightest one.
        let mut output_room = u64::MAX;
        let mut binding: Option<Refusal> = None;
        let mut tokens_headroom: Option<Headroom> = None;
        for (level, (limits, c)) in Level::ALL.into_iter().zip(limits.iter().zip(&counters)) {
            let Some(c) = c else { continue };
            if limits.is_empty() {
                continue;
            }
            if demand.stream
                && let Some(max) = limits.concurrent_streams
                && c.streams >= max
            {
                return Err(Refusal {
                    level,
                    kind: LimitKind::ConcurrentStreams,
                    limit: max,
                    remaining: 0,
                    retry_after_secs: 1,
                    resets_at: None,
                });
            }
            let periods = [
                (
                    LimitKind::TokensPerDay,
                    limits.tokens_per_day,
                    c.day_tokens,
                    day,
                ),
                (
                    LimitKind::TokensPerMonth,
                    limits.tokens_per_month,
                    c.month_tokens,
                    month,
                ),
            ];
            for (kind, limit, used, window) in periods {
                let Some(limit) = limit else { continue };
                let left = limit.saturating_sub(used);
                let after = left.saturating_sub(demand.prompt_tokens.saturating_add(wanted_output));
                if tokens_headroom.is_none_or(|t| after < t.remaining) {
                    tokens_headroom = Some(Headroom {
                        limit,
                        remaining: after,
                        reset_ns: nanos_until(now, window.resets_at),
                    });
                }
                let refused = || refusal(level, kind, limit, left, now, window.resets_at);
                let Some(room) = left.checked_sub(demand.prompt_tokens) else {
                    return Err(refused());
                };
                if room < output_room {
                    output_room = room;
                    binding = Some(refused());
                }
            }
            if let Some(limit) = limits.cost_per_month_nano_usd {
                let left = limit.saturating_sub(c.month_cost);
                let prompt_cost = demand.cost(demand.prompt_tokens, 0);
                let refused = || {
                    let kind = LimitKind::CostPerMonth;
                    refusal(level, kind, limit, left, now, month.resets_at)
                };
                let Some(left) = left.checked_sub(prompt_cost) else {
                    return Err(refused());
                };
                let room = if demand.output_nano_per_token > 0.0 {
                    (left as f64 / demand.output_nano_per_token).floor() as u64
                } else {
                    u64::MAX
                };
                if room < output_room {
                    output_room = room;
                    binding = Some(refused());
                }
            }
        }

        let output = if wanted_output <= output_room {
            wanted_output
        } else {
            let refusal = binding.expect("a limit was binding");
            let per_choice = output_room / choices;
            if policy == OverPolicy::Reject || per_choice == 0 {
                return Err(refusal);
            }
            per_choice * choices
        };
        let tokens = demand.prompt_tokens.saturating_add(output);
        let cost = demand.cost(demand.prompt_tokens, output);
        for c in counters.iter_mut().flatten() {
            c.day_tokens = c.day_tokens.saturating_add(tokens);
            c.month_tokens = c.month_tokens.saturating_add(tokens);
            c.month_cost = c.month_cost.saturating_add(cost);
            if demand.stream {
                c.streams += 1;
            }
        }
        if let Some(h) = &mut tokens_headroom {
            // Clamping used what was left.
            h.remaining = h.remaining.min(output_room.saturating_sub(output));
        }
        drop(st);
        Ok(Reservation {
            held: Held::Local {
                engine: self.clone(),
                state,
                subject: subject.clone(),
                day_id: day.id,
                month_id: month.id,
                cost,
                stream: demand.stream,
            },
            tokens,
            output_tokens: output,
            clamped_to: (output < wanted_output).then_some(output / choices),
            tokens_headroom,
            settled: false,
        })
    }

    /// The limits and usage of every level of `subject`, widest first.
    pub fn status(&self, subject: &Subject) -> Vec<LevelStatus> {
        let table = self.inner.limits.load();
        let state = self.institution(subject.institution(), subject.timezone());
        let (mut st, now) = self.lock(&state, subject.timezone());
        let mono = self.inner.clock.mono_ns();
        subject
            .levels()
            .map(|(level, id)| {
                let limits = st.limits(&table, subject, level, id, now);
                let tat = st.counters(level, id).tat;
                let requests_remaining = limits
                    .requests_per_minute
                    .map(|rpm| u64::from(Gcra::for_limit(rpm).remaining(tat, mono)));
                LevelStatus {
                    level,
                    id: Arc::clone(id),
                    limits,
                    usage: st.usage(level, id, requests_remaining),
                }
            })
            .collect()
    }

    /// Usage of one level of an institution (zero when it has none).
    pub fn usage(
        &self,
        institution: &Arc<str>,
        timezone: &Arc<str>,
        level: Level,
        id: &str,
    ) -> LevelUsage {
        let state = self.institution(institution, timezone);
        let (mut st, _) = self.lock(&state, timezone);
        st.usage(level, id, None)
    }

    /// Adds usage recorded before this process started (the ledger's sums of the current day
    /// and month) to one level.
    pub fn seed(&self, institution: &Arc<str>, timezone: &Arc<str>, used: &PeriodUsage) {
        let state = self.institution(institution, timezone);
        let (mut st, _) = self.lock(&state, timezone);
        let c = st.counters(used.level, &used.id);
        c.day_tokens = c.day_tokens.saturating_add(used.day_tokens);
        c.month_tokens = c.month_tokens.saturating_add(used.month_tokens);
        c.month_cost = c.month_cost.saturating_add(used.month_cost_nano_usd);
    }

    /// Starts a patron's day afresh: today's tokens no longer count against the allotment
    /// (they still count at the other levels).
    pub fn reset_patron_day(&self, institution: &Arc<str>, timezone: &Arc<str>, patron: &str) {
        if let Some((_, fallback)) = &self.inner.shared {
            fallback.reset_patron_day(institution, timezone, patron);
        }
        let state = self.institution(institution, timezone);
        let (mut st, _) = self.lock(&state, timezone);
        st.counters(Level::Patron, patron).day_tokens = 0;
    }

    /// Replaces a patron's extensions.
    pub fn set_extensions(
        &self,
        institution: &Arc<str>,
        timezone: &Arc<str>,
        patron: &str,
        extensions: Vec<Extension>,
    ) {
        if let Some((_, fallback)) = &self.inner.shared {
            fallback.set_extensions(institution, timezone, patron, extensions.clone());
        }
        let state = self.institution(institution, timezone);
        let (mut st, _) = self.lock(&state, timezone);
        st.extensions.insert(Arc::from(patron), extensions);
    }

    /// The current wall-clock time of the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.wall()
    }

    /// Gives back every lease this engine holds and waits until every settlement it has
    /// started has reached Redis (or failed): what it counted is then what Redis holds.
    /// Immediate in process.
    pub async fn quiesce(&self) {
        let Some((shared, _)) = &self.inner.shared else {
            return;
        };
        // What leases hold goes back first.
        shared.sweep(true).await;
        loop {
            let woken = shared.settled.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if shared.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    }

    /// The current periods of `subject`'s institution and the ones after them.
    fn windows(&self, subject: &Subject) -> Windows {
        let state = self.institution(subject.institution(), subject.timezone());
        let (st, _) = self.lock(&state, subject.timezone());
        st.windows()
    }

    /// Each level of `subject` with its limits now (a patron's with their extensions), and the
    /// periods.
    fn limits_now(&self, subject: &Subject) -> (Vec<LevelLimits>, Windows, Timestamp) {
        let table = self.inner.limits.load();
        let state = self.institution(subject.institution(), subject.timezone());
        let (mut st, now) = self.lock(&state, subject.timezone());
        let levels = subject
            .levels()
            .map(|(level, id)| {
                let limits = st.limits(&table, subject, level, id, now);
                (level, Arc::clone(id), limits)
            })
            .collect();
        (levels, st.windows(), now)
    }

    /// [`QuotaEngine::admit`] on the counters this engine keeps: in process, or shared in
    /// Redis (under the failure policy when Redis cannot be reached).
    pub async fn check_rate(
        &self,
        subject: &Subject,
        levels: &[Level],
    ) -> Result<Option<Headroom>, Denial> {
        let Some((shared, fallback)) = &self.inner.shared else {
            return self.admit(subject, levels).map_err(Denial::Refused);
        };
        let table = self.inner.limits.load();
        let rated: Vec<(Level, &str, u64)> = subject
            .levels()
            .filter(|(level, _)| levels.contains(level))
            .filter_map(|(level, id)| {
                let rpm = limits_at(&table, subject, level, id).requests_per_minute?;
                Some((level, &**id, rpm))
            })
            .collect();
        if rated.is_empty() {
            return Ok(None);
        }
        if shared.leases.on() {
            let key = subject_key(subject.institution(), rated.iter().map(|r| (r.0, r.1)));
            return match shared
                .admit_leased(&key, subject.institution(), &rated)
                .await
            {
                Ok(verdict) => verdict.map_err(Denial::Refused),
                Err(e) => self.rate_unreachable(shared, fallback, &e, subject, levels),
            };
        }
        match shared.admit(subject.institution(), &rated, 1).await {
            Ok(verdict) => verdict.map_err(Denial::Refused),
            Err(e) => self.rate_unreachable(shared, fallback, &e, subject, levels),
        }
    }

    /// A rate check Redis did not answer: the policy for request rates decides.
    fn rate_unreachable(
        &self,
        shared: &Shared,
        fallback: &QuotaEngine,
        e: &Unreachable,
        subject: &Subject,
        levels: &[Level],
    ) -> Result<Option<Headroom>, Denial> {
        match shared.policy.requests_per_minute {
            OnFailure::FailClosed => {
                shared.failed_closed(e);
                Err(Denial::Unavailable)
            }
            OnFailure::Local => {
                shared.went_local(e);
                fallback.admit(subject, levels).map_err(Denial::Refused)
            }
        }
    }

    /// [`QuotaEngine::reserve`] on the counters this engine keeps. `frontier` says the model
    /// is of the frontier tier, which has a failure policy of its own.
    pub async fn take(
        &self,
        subject: &Subject,
        demand: Demand,
        policy: OverPolicy,
        frontier: bool,
    ) -> Result<Reservation, Denial> {
        let Some((shared, fallback)) = &self.inner.shared else {
            return self
                .reserve(subject, demand, policy)
                .map_err(Denial::Refused);
        };
        let (levels, windows, now) = self.limits_now(subject);
        let leased = if shared.leases.on() {
            let mut key = subject_key(subject.institution(), levels.iter().map(|l| (l.0, &*l.1)));
            if demand.stream {
                key.push_str("\u{1f}stream");
            }
            match shared
                .take_leased(&key, subject.institution(), &levels, windows, &demand, now)
                .await
            {
                Ok(part) => {
                    let output = demand
                        .max_output_tokens
                        .saturating_mul(demand.choices.max(1));
                    return Ok(Reservation {
                        tokens: part.tokens,
                        output_tokens: output,
                        clamped_to: None,
                        tokens_headroom: part.tokens_headroom,
                        held: Held::Leased {
                            shared: Arc::clone(shared),
                            part,
                        },
                        settled: false,
                    });
                }
                Err(NoLease::Alone) => None,
                Err(NoLease::Unreachable(e)) => Some(e),
            }
        } else {
            None
        };
        let e = if let Some(e) = leased {
            e
        } else {
            match shared
                .reserve(
                    subject.institution(),
                    &levels,
                    windows,
                    &demand,
                    u64::from(demand.stream),
                    policy,
                    now,
                )
                .await
            {
                Ok(Ok(hold)) => {
                    return Ok(Reservation {
                        tokens: hold.tokens,
                        output_tokens: hold.output_tokens,
                        clamped_to: hold.clamped_to,
                        tokens_headroom: hold.tokens_headroom,
                        held: Held::Shared {
                            engine: self.clone(),
                            subject: subject.clone(),
                            hold,
                        },
                        settled: false,
                    });
                }
                Ok(Err(refusal)) => return Err(Denial::Refused(refusal)),
                Err(e) => e,
            }
        };
        // Redis is away: what the request meets decides.
        let met: Vec<(Level, LimitKind)> = levels
            .iter()
            .flat_map(|&(level, _, limits)| {
                [
                    LimitKind::TokensPerDay,
                    LimitKind::TokensPerMonth,
                    LimitKind::CostPerMonth,
                    LimitKind::ConcurrentStreams,
                ]
                .into_iter()
                .filter(move |&kind| {
                    limits.get(kind).is_some()
                        && (kind != LimitKind::ConcurrentStreams || demand.stream)
                })
                .map(move |kind| (level, kind))
            })
            .collect();
        let closed = (frontier && shared.policy.frontier_models == OnFailure::FailClosed)
            || met
                .iter()
                .any(|&(level, kind)| shared.policy_for(level, kind) == OnFailure::FailClosed);
        if closed {
            shared.failed_closed(&e);
            return Err(Denial::Unavailable);
        }
        if met.is_empty() {
            shared.counters.uncounted.fetch_add(1, Ordering::Relaxed);
            shared.log_fallback(&e, "no limit: uncounted");
            let output = demand
                .max_output_tokens
                .saturating_mul(demand.choices.max(1));
            return Ok(Reservation {
                held: Held::Uncounted,
                tokens: demand.prompt_tokens.saturating_add(output),
                output_tokens: output,
                clamped_to: None,
                tokens_headroom: None,
                settled: false,
            });
        }
        shared.went_local(&e);
        fallback
            .reserve(subject, demand, policy)
            .map_err(Denial::Refused)
    }

    /// [`QuotaEngine::status`] on the counters this engine keeps (this replica's fallback
    /// counts while Redis cannot be reached).
    pub async fn status_now(&self, subject: &Subject) -> Vec<LevelStatus> {
        let Some((shared, fallback)) = &self.inner.shared else {
            return self.status(subject);
        };
        let (levels, windows, now) = self.limits_now(subject);
        let ids: Vec<(Level, &str)> = levels.iter().map(|(l, id, _)| (*l, &**id)).collect();
        let counts = match shared.read(subject.institution(), &ids, windows, now).await {
            Ok(counts) => counts,
            Err(e) => {
                shared.log_fallback(&e, "status from this replica's fallback counts");
                return fallback.status(subject);
            }
        };
        let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        levels
            .into_iter()
            .zip(counts)
            .map(|((level, id, limits), counts)| {
                let requests_remaining = limits.requests_per_minute.map(|rpm| {
                    let tat_ns = counts.tat_us.saturating_mul(1000);
                    u64::from(Gcra::for_limit(rpm).remaining(tat_ns, now_ns))
                });
                LevelStatus {
                    level,
                    id,
                    limits,
                    usage: counts.usage(windows, requests_remaining),
                }
            })
            .collect()
    }

    /// [`QuotaEngine::usage`] on the counters this engine keeps.
    pub async fn usage_now(
        &self,
        institution: &Arc<str>,
        timezone: &Arc<str>,
        level: Level,
        id: &str,
    ) -> LevelUsage {
        let Some((shared, fallback)) = &self.inner.shared else {
            return self.usage(institution, timezone, level, id);
        };
        let state = self.institution(institution, timezone);
        let (windows, now) = {
            let (st, now) = self.lock(&state, timezone);
            (st.windows(), now)
        };
        match shared.read(institution, &[(level, id)], windows, now).await {
            Ok(counts) => counts[0].usage(windows, None),
            Err(e) => {
                shared.log_fallback(&e, "usage from this replica's fallback counts");
                fallback.usage(institution, timezone, level, id)
            }
        }
    }

    /// [`QuotaEngine::reset_patron_day`] on the counters this engine keeps; on the shared
    /// ones, [`Denial::Unavailable`] when Redis cannot be reached.
    pub async fn reset_patron_day_now(
        &self,
        institution: &Arc<str>,
        timezone: &Arc<str>,
        patron: &str,
    ) -> Result<(), Denial> {
        self.reset_patron_day(institution, timezone, patron);
        let Some((shared, _)) = &self.inner.shared else {
            return Ok(());
        };
        let state = self.institution(institution, timezone);
        let (windows, now) = {
            let (st, now) = self.lock(&state, timezone);
            (st.windows(), now)
        };
        shared
            .reset_patron_day(institution, patron, windows, now)
            .await
            .map_err(|e| {
                shared.log_fallback(&e, "patron day reset refused");
                Denial::Unavailable
            })
    }
}

/// The name of what a lease is for: an institution and each level's id.
fn subject_key<'a>(institution: &str, levels: impl Iterator<Item = (Level, &'a str)>) -> String {
    let mut key = String::from(institution);
    for (level, id) in levels {
        key.push('\u{1f}');
        key.push_str(level.as_str());
        key.push('=');
        key.push_str(id);
    }
    key
}

fn nanos_until(now: Timestamp, then: Timestamp) -> u64 {
    u64::try_from(then.as_nanosecond().saturating_sub(now.as_nanosecond())).unwrap_or(0)
}

fn refusal(
    level: Level,
    kind: LimitKind,
    limit: u64,
    remaining: u64,
    now: Timestamp,
    resets_at: Timestamp,
) -> Refusal {
    Refusal {
        remaining,
        level,
        kind,
        limit,
        retry_after_secs: nanos_until(now, resets_at).div_ceil(1_000_000_000).max(1),
        resets_at: Some(resets_at),
    }
}

/// Tokens and money held for one request until it settles.
#[derive(Debug)]
pub struct Reservation {
    held: Held,
    tokens: u64,
    output_tokens: u64,
    clamped_to: Option<u64>,
    tokens_headroom: Option<Headroom>,
    settled: bool,
}

#[derive(Debug)]
enum Held {
    /// In this process's counters.
    Local {
        engine: QuotaEngine,
        state: Arc<Mutex<InstState>>,
        subject: Subject,
        day_id: i32,
        month_id: i32,
        cost: u64,
        stream: bool,
    },
    /// In Redis.
    Shared {
        engine: QuotaEngine,
        subject: Subject,
        hold: SharedHold,
    },
    /// In a block this replica leased in Redis.
    Leased { shared: Arc<Shared>, part: Part },
    /// Nowhere: the shared counters were unreachable and no limit applied.
    Uncounted,
}

impl Reservation {
    /// Output tokens reserved, all choices together; a stream that produces more is cut.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens
    }

    /// Tokens reserved.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// When the policy lowered the output, the `max_tokens` per choice to forward.
    pub fn clamped_to(&self) -> Option<u64> {
        self.clamped_to
    }

    /// The tightest token limit after this reservation, for the response headers.
    pub fn tokens_headroom(&self) -> Option<Headroom> {
        self.tokens_headroom
    }

    /// Replaces the reservation with what the request really used.
    pub fn settle(mut self, tokens: u64, cost_nano_usd: u64) {
        self.apply(tokens, cost_nano_usd);
    }

    fn apply(&mut self, tokens: u64, cost: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let reserved = self.tokens;
        match std::mem::replace(&mut self.held, Held::Uncounted) {
            Held::Local {
                engine,
                state,
                subject,
                day_id,
                month_id,
                cost: reserved_cost,
                stream,
            } => {
                let (mut st, _) = engine.lock(&state, subject.timezone());
                for c in st.all_counters(&subject.ids()).into_iter().flatten() {
                    if c.day_id == day_id {
                        c.day_tokens = c.day_tokens.saturating_sub(reserved);
                    }
                    c.day_tokens = c.day_tokens.saturating_add(tokens);
                    if c.month_id == month_id {
                        c.month_tokens = c.month_tokens.saturating_sub(reserved);
                        c.month_cost = c.month_cost.saturating_sub(reserved_cost);
                    }
                    c.month_tokens = c.month_tokens.saturating_add(tokens);
                    c.month_cost = c.month_cost.saturating_add(cost);
                    if stream {
                        c.streams = c.streams.saturating_sub(1);
                    }
                }
            }
            Held::Shared {
                engine,
                subject,
                hold,
            } => {
                let Some((shared, _)) = &engine.inner.shared else {
                    return;
                };
                let in_flight = InFlight::start(shared);
                // The request is over: its settlement must not hold up its response. One short
                // write; should it fail, the reservation stays counted in full, which never
                // lets spending past a limit.
                shared.runtime.clone().spawn(async move {
                    let shared = &in_flight.0;
                    let windows = engine.windows(&subject);
                    if let Err(e) = shared.settle(&hold, windows, tokens, cost).await {
                        shared
                            .counters
                            .settle_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e.0, "a settlement did not reach Redis; \
                            the reservation stays counted in full");
                    }
                });
            }
            Held::Leased { shared, part } => shared.finish_part(part, tokens, cost),
            Held::Uncounted => {}
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Never settled: the request went nowhere (upstream failure, cancelled); refund.
        self.apply(0, 0);
    }
}

#[cfg(test)]
mod tests;
