//! Leases: a replica reserves a block of budget (or of request-rate cells) in Redis for one
//! subject at a time and spends it here, request by request, so a busy subject costs a Redis
//! round trip per block rather than per request.
//!
//! A block is an ordinary reservation made by the same script, for `k` requests like the one
//! at hand, at every level at once: while a replica holds it, Redis counts it as spent. So
//! leases never admit more than the limits allow (**over-admission: none**), for budgets and
//! for rates alike. What they can do is refuse early: a block another replica holds and has
//! not used is not available here. That is bounded: a replica holds at most one block per
//! subject, of at most `store.lease_requests` requests, and gives back what it has not used
//! once the subject has been idle for [`IDLE`] (or at once when asked to, by
//! [`super::QuotaEngine::quiesce`]). A block that does not fit what is left is not taken: the
//! request is then reserved alone, exactly, so a budget is used to its last token.
//!
//! `k` starts at 2 and doubles each time a subject uses up a block, up to
//! `store.lease_requests`; a subject that goes quiet starts again at 2. Request cells are
//! taken one at a time for a quiet subject (a lease would cost a second round trip to give
//! back), and in doubling leases for a busy one. Streams lease blocks of their own, holding a
//! stream slot in Redis for each request the block may serve (so a stream limit, too, is never
//! passed); a slot comes back to the block when its stream ends. A block is replaced after
//! [`MAX_AGE`] however busy its subject. When limits change, no lease taken before is spent any more (it goes back):
//! a lowered limit binds at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::engine::{Demand, Headroom};
use super::shared::{InFlight, Shared, SharedHold, Windows};

/// How long a subject's block stays here unused before what is left goes back to Redis.
pub const IDLE: Duration = Duration::from_millis(100);
/// How often the leases are swept for idle blocks.
const SWEEP: Duration = Duration::from_millis(50);
/// The longest a block is spent before a fresh one replaces it, however busy its subject (its
/// stream slots lapse in Redis after [`super::shared::STREAM_LEASE`]).
const MAX_AGE: Duration = Duration::from_secs(10);

/// The leases of one replica.
#[derive(Debug)]
pub(crate) struct Leases {
    /// Most requests a block is sized for; below 2, leases are off.
    pub(crate) max_requests: u64,
    budgets: Mutex<HashMap<String, Arc<tokio::sync::Mutex<BudgetSlot>>>>,
    rates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<RateSlot>>>>,
    /// Bumped when limits change; a lease of an older generation is not spent.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct BudgetSlot {
    block: Option<Arc<Block>>,
    next_k: u64,
}

#[derive(Debug, Default)]
struct RateSlot {
    /// Requests left of the cells taken.
    cells: u64,
    /// The limits' generation when they were taken.
    generation: u64,
    next_k: u64,
    last_used: Option<Instant>,
    /// The tightest rate when the cells were taken.
    headroom: Option<Headroom>,
    /// Each rated key and its emission interval (µs), to give cells back.
    keys: Vec<(String, u64)>,
}

/// A block of budget reserved in Redis, spent here.
#[derive(Debug)]
pub(crate) struct Block {
    hold: SharedHold,
    windows: Windows,
    /// The limits' generation it was taken under.
    generation: u64,
    state: Mutex<BlockState>,
}

#[derive(Debug)]
struct BlockState {
    tokens_left: i64,
    cost_left: i64,
    /// Stream slots not in use.
    slots_left: u64,
    used_tokens: u64,
    used_cost: u64,
    outstanding: u64,
    closed: bool,
    returned: bool,
    last_used: Instant,
    created: Instant,
}

/// One request's part of a block.
#[derive(Debug)]
pub(crate) struct Part {
    pub(crate) block: Arc<Block>,
    pub(crate) tokens: u64,
    pub(crate) cost: u64,
    /// Whether it holds one of the block's stream slots.
    pub(crate) stream: bool,
    pub(crate) tokens_headroom: Option<Headroom>,
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Block {
    fn new(hold: SharedHold, windows: Windows, generation: u64) -> Block {
        let state = BlockState {
            tokens_left: signed(hold.tokens),
            cost_left: signed(hold.cost),
            slots_left: hold.slots,
            used_tokens: 0,
            used_cost: 0,
            outstanding: 0,
            closed: false,
            returned: false,
            last_used: Instant::now(),
            created: Instant::now(),
        };
        Block {
            hold,
            windows,
            generation,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `tokens`, `cost` and (for a stream) a slot for one request, if the block has
    /// them.
    fn take(self: &Arc<Self>, tokens: u64, cost: u64, stream: bool) -> Option<Part> {
        let mut st = self.lock();
        if st.closed
            || st.tokens_left < signed(tokens)
            || st.cost_left < signed(cost)
            || (stream && st.slots_left == 0)
        {
            return None;
        }
        st.tokens_left -= signed(tokens);
        st.cost_left -= signed(cost);
        st.slots_left -= u64::from(stream);
        st.outstanding += 1;
        st.last_used = Instant::now();
        let left = st.tokens_left.max(0) as u64;
        Some(Part {
            block: Arc::clone(self),
            tokens,
            cost,
            stream,
            tokens_headroom: self.hold.tokens_headroom.map(|h| Headroom {
                remaining: h.remaining.saturating_add(left),
                ..h
            }),
        })
    }

    /// No more requests: whether it is to go back to Redis now (nothing outstanding).
    fn close(&self) -> bool {
        let mut st = self.lock();
        st.closed = true;
        let now = st.outstanding == 0 && !st.returned;
        st.returned |= now;
        now
    }

    fn idle_for(&self) -> Duration {
        self.lock().last_used.elapsed()
    }

    fn age(&self) -> Duration {
        self.lock().created.elapsed()
    }
}

impl Leases {
    pub(crate) fn new(max_requests: u64) -> Leases {
        Leases {
            max_requests,
            budgets: Mutex::default(),
            rates: Mutex::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Limits changed: no lease taken before is spent any more.
    pub(crate) fn limits_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn on(&self) -> bool {
        self.max_requests >= 2
    }

    /// Subjects with a slot here (budget and rate): what the sweeps keep bounded.
    #[cfg(test)]
    pub(crate) fn subjects(&self) -> usize {
        fn count<T>(m: &Slots<T>) -> usize {
            m.lock().unwrap_or_else(|p| p.into_inner()).len()
        }
        count(&self.budgets) + count(&self.rates)
    }

    fn budget_slot(&self, key: &str) -> Arc<tokio::sync::Mutex<BudgetSlot>> {
        slot(&self.budgets, key)
    }

    fn rate_slot(&self, key: &str) -> Arc<tokio::sync::Mutex<RateSlot>> {
        slot(&self.rates, key)
    }
}

/// `key`'s slot, made on first use (the key is copied only then).
fn slot<T: Default>(map: &Slots<T>, key: &str) -> Arc<tokio::sync::Mutex<T>> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(slot) = map.get(key) {
        return Arc::clone(slot);
    }
    Arc::clone(map.entry(key.to_owned()).or_default())
}

/// What a lease could not do: reserve alone instead, or Redis failed.
pub(crate) enum NoLease {
    /// A block does not fit: reserve this request alone.
    Alone,
    /// Redis did not answer.
    Unreachable(super::shared::Unreachable),
}

impl Shared {
    /// Takes `demand` from `subject_key`'s block, reserving a new block when needed. Streams
    /// lease blocks of their own, with a stream slot for each request: their key says so.
    pub(crate) async fn take_leased(
        self: &Arc<Self>,
        subject_key: &str,
        institution: &str,
        levels: &[super::shared::LevelLimits],
        windows: Windows,
        demand: &Demand,
        now: jiff::Timestamp,
    ) -> Result<Part, NoLease> {
        let output = demand
            .max_output_tokens
            .saturating_mul(demand.choices.max(1));
        let tokens = demand.prompt_tokens.saturating_add(output);
        let cost = (demand.prompt_tokens as f64 * demand.input_nano_per_token
            + output as f64 * demand.output_nano_per_token)
            .ceil() as u64;
        let slot = self.leases.budget_slot(subject_key);
        let mut slot = slot.lock().await;
        // A block of other limits, of another day or month, or too old, is not spent now.
        let generation = self.leases.generation();
        if slot.block.as_ref().is_some_and(|b| {
            b.generation != generation
                || b.windows.day.id != windows.day.id
                || b.windows.month.id != windows.month.id
                || b.age() >= MAX_AGE
        }) {
            let block = slot.block.take().expect("checked above");
            if block.close() {
                self.give_back(block);
            }
        }
        if let Some(block) = &slot.block {
            if let Some(part) = block.take(tokens, cost, demand.stream) {
                self.counters.leased.fetch_add(1, Ordering::Relaxed);
                return Ok(part);
            }
            // Used up: a busy subject gets a bigger block next.
            let block = slot.block.take().expect("checked above");
            if block.close() {
                self.give_back(block);
            }
            slot.next_k = slot.next_k.saturating_mul(2);
        }
        let k = slot.next_k.clamp(2, self.leases.max_requests);
        let block_demand = Demand {
            prompt_tokens: demand.prompt_tokens.saturating_mul(k),
            max_output_tokens: output.saturating_mul(k),
            choices: 1,
            stream: false,
            ..*demand
        };
        let policy = super::engine::OverPolicy::Reject;
        let slots = if demand.stream { k } else { 0 };
        match self
            .reserve(
                institution,
                levels,
                windows,
                &block_demand,
                slots,
                policy,
                now,
            )
            .await
        {
            Ok(Ok(hold)) => {
                let block = Arc::new(Block::new(hold, windows, generation));
                let part = block
                    .take(tokens, cost, demand.stream)
                    .expect("a block of k fits one");
                slot.block = Some(block);
                slot.next_k = k;
                Ok(part)
            }
            Ok(Err(_)) => {
                slot.next_k = 2;
                Err(NoLease::Alone)
            }
            Err(e) => Err(NoLease::Unreachable(e)),
        }
    }

    /// A request served from a block has ended, having used `tokens` and `cost`.
    pub(crate) fn finish_part(self: &Arc<Self>, part: Part, tokens: u64, cost: u64) {
        let back = {
            let mut st = part.block.lock();
            st.tokens_left += signed(part.tokens) - signed(tokens);
            st.cost_left += signed(part.cost) - signed(cost);
            st.used_tokens = st.used_tokens.saturating_add(tokens);
            st.used_cost = st.used_cost.saturating_add(cost);
            st.slots_left += u64::from(part.stream);
            st.outstanding -= 1;
            st.last_used = Instant::now();
            let back = st.closed && st.outstanding == 0 && !st.returned;
            st.returned |= back;
            back
        };
        if back {
            self.give_back(part.block);
        }
    }

    /// Settles a closed block in Redis to what its requests used.
    fn give_back(self: &Arc<Self>, block: Arc<Block>) {
        let in_flight = InFlight::start(self);
        let runtime = self.runtime.clone();
        runtime.spawn(async move {
            let shared = &in_flight.0;
            let (tokens, cost) = {
                let st = block.lock();
                (st.used_tokens, st.used_cost)
            };
            let windows = block.windows;
            if let Err(e) = shared.settle(&block.hold, windows, tokens, cost).await {
                shared
                    .counters
                    .settle_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e.0, "a lease did not go back to Redis; \
                    it stays counted in full");
            }
        });
    }

    /// Counts one request against the rates of `rated` from `subject_key`'s cells, taking
    /// more cells when the subject is busy (one at a time when it is not).
    pub(crate) async fn admit_leased(
        self: &Arc<Self>,
        subject_key: &str,
        institution: &str,
        rated: &[(super::Level, &str, u64)],
    ) -> Result<Result<Option<Headroom>, super::Refusal>, super::shared::Unreachable> {
        let slot = self.leases.rate_slot(subject_key);
        let mut slot = slot.lock().await;
        let generation = self.leases.generation();
        if slot.cells > 0 && slot.generation != generation {
            let cells = std::mem::take(&mut slot.cells);
            self.return_cells(cells, &slot.keys).await;
        }
        if slot.cells > 0 {
            self.counters.leased.fetch_add(1, Ordering::Relaxed);
            slot.cells -= 1;
            slot.last_used = Some(Instant::now());
            let cells = slot.cells;
            return Ok(Ok(slot.headroom.map(|h| Headroom {
                remaining: h.remaining.saturating_add(cells),
                ..h
            })));
        }
        let busy = slot.last_used.is_some_and(|t| t.elapsed() < IDLE);
        slot.last_used = Some(Instant::now());
        if busy {
            let k = slot
                .next_k
                .saturating_mul(2)
                .clamp(2, self.leases.max_requests);
            if let Ok(headroom) = self.admit(institution, rated, k).await? {
                slot.cells = k - 1;
                slot.generation = generation;
                slot.next_k = k;
                slot.headroom = headroom;
                slot.keys = rated
                    .iter()
                    .map(|&(level, id, per_minute)| {
                        let per_minute = per_minute.clamp(1, u64::from(u32::MAX));
                        (
                            self.hash_key(institution, level, id),
                            60_000_000 / per_minute,
                        )
                    })
                    .collect();
                return Ok(Ok(headroom.map(|h| Headroom {
                    remaining: h.remaining.saturating_add(k - 1),
                    ..h
                })));
            }
        }
        // Quiet, or no room for a lease: this request alone.
        slot.next_k = 1;
        self.admit(institution, rated, 1).await
    }

    /// Gives back unused cells: their requests were never made.
    async fn return_cells(&self, cells: u64, keys: &[(String, u64)]) {
        let mut pipe = redis::pipe();
        for (key, em) in keys {
            pipe.cmd("HINCRBY")
                .arg(key)
                .arg("tat")
                .arg(-signed(cells.saturating_mul(*em)))
                .ignore();
        }
        let mut conn = self.conn.clone();
        let sent = pipe.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.timeout * 5, sent).await {
            Ok(Ok(())) => {}
            // The cells stay spent: the rate is then a little tighter for a moment.
            Ok(Err(e)) => tracing::debug!(error = %e, "unused request cells not given back"),
            Err(_) => tracing::debug!("unused request cells not given back: no answer"),
        }
    }

    /// Gives back what idle subjects hold (everything, with `all`), and forgets subjects
    /// that hold nothing.
    pub(crate) async fn sweep(self: &Arc<Self>, all: bool) {
        for (key, slot) in snapshot(&self.leases.budgets) {
            let Some(mut held) = lock_for_sweep(&slot, all).await else {
                continue;
            };
            if !all && held.block.as_ref().is_some_and(|b| b.idle_for() < IDLE) {
                continue;
            }
            if let Some(block) = held.block.take()
                && block.close()
            {
                self.give_back(block);
            }
            drop(held);
            forget_if_unused(&self.leases.budgets, &key, slot);
        }
        for (key, slot) in snapshot(&self.leases.rates) {
            let Some(mut held) = lock_for_sweep(&slot, all).await else {
                continue;
            };
            if !all && held.last_used.is_some_and(|t| t.elapsed() < IDLE) {
                continue;
            }
            if held.cells > 0 {
                let cells = std::mem::take(&mut held.cells);
                self.return_cells(cells, &held.keys).await;
            }
            drop(held);
            forget_if_unused(&self.leases.rates, &key, slot);
        }
    }
}

type Slots<T> = Mutex<HashMap<String, Arc<tokio::sync::Mutex<T>>>>;

/// The slots of a map, to sweep without holding its lock.
fn snapshot<T>(map: &Slots<T>) -> Vec<(String, Arc<tokio::sync::Mutex<T>>)> {
    let map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.iter()
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect()
}

/// The slot, waited for when sweeping everything; skipped while a request has it otherwise.
async fn lock_for_sweep<T>(
    slot: &tokio::sync::Mutex<T>,
    all: bool,
) -> Option<tokio::sync::MutexGuard<'_, T>> {
    if all {
        Some(slot.lock().await)
    } else {
        slot.try_lock().ok()
    }
}

/// Drops `key`'s slot from the map when nothing but the map refers to it (no request holds it
/// or waits for it). Requests find slots under the map's lock, so none can take it meanwhile.
fn forget_if_unused<T>(map: &Slots<T>, key: &str, ours: Arc<tokio::sync::Mutex<T>>) {
    drop(ours);
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if map.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
        map.remove(key);
    }
}

/// Sweeps `shared`'s leases until it is dropped.
pub(crate) async fn sweeper(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.leases.on() {
            shared.sweep(false).await;
        }
    }
}
