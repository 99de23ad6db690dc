//! Counters shared by every replica, in Redis: request rates, token and money budgets and open
//! streams, checked and committed by Lua scripts so that a reservation is all-or-nothing across
//! levels however many replicas reserve at once.
//!
//! The engine ([`super::QuotaEngine`]) still decides what the limits are (the table, patron
//! allotments and extensions) and what a refusal says; the scripts hold the counters and do the
//! arithmetic the in-process engine does, with the time taken from Redis `TIME` (rates) and the
//! periods named by the replica but turned over at Redis's clock.
//!
//! # Keys
//!
//! One hash per level a request counts against, under the institution's hash tag so that every
//! key of one reservation is in one Redis Cluster slot:
//!
//! - `{P:<institution>}:q:<level>:<id>`: fields `tat` (the GCRA's theoretical arrival time, µs),
//!   `d`/`dt` (the day, `yyyymmdd`, and its tokens), `m`/`mt`/`mc` (the month, its tokens and
//!   its cost in nano-dollars). Expires after [`TTL_DAYS`] idle; a patron's at the end of the
//!   institution's day it last counted in, so a patron's counters are deleted at the daily
//!   reset.
//! - `{P:<institution>}:qs:<level>:<id>`: a sorted set of the stream slots held at a level
//!   (one per open stream, or per request a lease may serve), each scored by when it lapses,
//!   so the slot of a replica that died mid-stream comes back after [`STREAM_LEASE`].
//!
//! # When Redis cannot be reached
//!
//! A script that fails or takes longer than `store.redis_timeout_ms` puts the request under the
//! failure policy of the kinds of limits it meets (`store.on_redis_failure`): `fail_closed`
//! refuses it ([`Denial::Unavailable`]), `local` counts it in an in-process engine whose limits
//! are divided by `store.expected_replicas`. A settlement that fails leaves the reservation
//! counted in full: the counters may show more use than there was, never less.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;

use super::engine::{Demand, Headroom, LevelUsage, OverPolicy, Refusal};
use super::limits::{Level, LimitKind, Limits};
use super::period::Window;
use crate::config::{FailurePolicy, OnFailure};

/// Days a level's counters live in Redis after their last use (a month's budget must outlive
/// the month).
pub const TTL_DAYS: u64 = 40;
/// How long a patron's rate state lives when the patron has no counted day yet: longer than a
/// minute's GCRA needs. A patron's hash that counts a day expires at that day's end instead.
const PATRON_RATE_TTL_MS: u64 = 120_000;
/// How long a stream holds its slot without settling.
pub const STREAM_LEASE: Duration = Duration::from_secs(30 * 60);

/// Request rates. KEYS: one hash per rated level. ARGV: 1 the cells to take (requests: 1, or a
/// lease of several), then for each level: emission interval (µs), burst, TTL (ms; negative:
/// `-ttl` only when the hash has no expiry, so a patron's hash keeps its day's end). Returns
/// `{1, limit, remaining, reset_us}` for the tightest rate, or `{0, index, wait_us}` for the
/// first level without room for the cells (nothing is then counted).
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k = tonumber(ARGV[1])
local n = #KEYS
local tats = {}
for i = 1, n do
  local em = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('HGET', KEYS[i], 'tat') or '0')
  if tat < now then tat = now end
  local allow_at = tat + em * (k - 1) - em * (burst - 1)
  if now < allow_at then
    return {0, i, allow_at - now}
  end
  tats[i] = tat + em * k
end
local best = nil
for i = 1, n do
  local em = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  redis.call('HSET', KEYS[i], 'tat', tats[i])
  local ttl = tonumber(ARGV[3 * i + 1])
  if ttl >= 0 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  elseif redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], -ttl)
  end
  local slack = now + em * (burst - 1) + em - tats[i]
  if slack < 0 then slack = 0 end
  local remaining = math.min(math.floor(slack / em), burst)
  if best == nil or remaining < best[3] then
    best = {1, burst, remaining, tats[i] - now}
  end
end
return best
";

/// The start of the budget scripts: Redis's time, the day and month current by it (ARGV 1–7:
/// day, its end in ms, the next day, its end; month, its end, the next month), `counters(key)`,
/// a level's tokens today, tokens and cost this month (zero for a period that has turned
/// over), and `expire(key, ttl)`: a TTL in ms, or with `ttl` 0 (a patron's), the end of the
/// day counted in.
macro_rules! periods {
    () => {
        r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = tonumber(ARGV[1])
local day_end = tonumber(ARGV[2])
if now_ms >= day_end then day = tonumber(ARGV[3]); day_end = tonumber(ARGV[4]) end
local month = tonumber(ARGV[5])
if now_ms >= tonumber(ARGV[6]) then month = tonumber(ARGV[7]) end
local function expire(key, ttl)
  ttl = tonumber(ttl)
  if ttl == 0 then
    redis.call('PEXPIREAT', key, day_end)
  else
    redis.call('PEXPIRE', key, ttl)
  end
end
local function counters(key)
  local v = redis.call('HMGET', key, 'd', 'dt', 'm', 'mt', 'mc')
  local dt, mt, mc = 0, 0, 0
  if tonumber(v[1]) == day then dt = tonumber(v[2]) or 0 end
  if tonumber(v[3]) == month then mt = tonumber(v[4]) or 0; mc = tonumber(v[5]) or 0 end
  return dt, mt, mc
end
"
    };
}

/// Reservation. KEYS: one hash per level, then one stream set per level that limits streams.
/// ARGV: 1–7 the periods (see `periods!`), 8 prompt tokens, 9 wanted output, 10 choices, 11
/// nano-dollars per prompt token, 12 per output token, 13 clamp (0/1), 14 stream slots to hold
/// (0; 1 for a stream; more for a lease), 15 reservation id (slot `j` is member `<id>:<j>`),
/// 16 stream lease (ms), 17 levels, then for each level: TTL (ms, 0 for the day's end), tokens
/// per day, tokens per month, cost per month, streams (each -1 for none), and the index of its
/// stream set among KEYS (0 for none). A stream set with the day's end outlives its streams'
/// lease.
/// Returns `{1, output, tokens, cost, day, month, h_limit, h_after, h_window, room}`, or
/// `{0, level, kind, limit, left, window}` (kind: 1 day tokens, 2 month tokens, 3 cost,
/// 4 streams; window: 1 day, 2 month, 0 none).
const RESERVE: &str = concat!(
    periods!(),
    r"
local prompt = tonumber(ARGV[8])
local wanted = tonumber(ARGV[9])
local choices = tonumber(ARGV[10])
local pin = tonumber(ARGV[11])
local pout = tonumber(ARGV[12])
local clamp = ARGV[13] == '1'
local slots = tonumber(ARGV[14])
local lease = tonumber(ARGV[16])
local stream = slots > 0
local n = tonumber(ARGV[17])
local used = {}
local room = math.huge
local bind = nil
local h = nil
for i = 1, n do
  local b = 17 + (i - 1) * 6
  local dt, mt, mc = counters(KEYS[i])
  used[i] = {dt, mt, mc}
  local slimit = tonumber(ARGV[b + 5])
  local skey = tonumber(ARGV[b + 6])
  if stream and slimit >= 0 and skey > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[skey], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[skey]) + slots > slimit then
      return {0, i, 4, slimit, 0, 0}
    end
  end
  local checks = {{1, tonumber(ARGV[b + 2]), dt, 1}, {2, tonumber(ARGV[b + 3]), mt, 2}}
  for _, c in ipairs(checks) do
    local limit = c[2]
    if limit >= 0 then
      local left = limit - c[3]
      if left < 0 then left = 0 end
      local after = left - prompt - wanted
      if after < 0 then after = 0 end
      if h == nil or after < h[2] then h = {limit, after, c[4]} end
      local r = left - prompt
      if r < 0 then return {0, i, c[1], limit, left, c[4]} end
      if r < room then room = r; bind = {0, i, c[1], limit, left, c[4]} end
    end
  end
  local climit = tonumber(ARGV[b + 4])
  if climit >= 0 then
    local left = climit - mc
    if left < 0 then left = 0 end
    local rest = left - math.ceil(prompt * pin)
    if rest < 0 then return {0, i, 3, climit, left, 2} end
    local r = math.huge
    if pout > 0 then r = math.floor(rest / pout) end
    if r < room then room = r; bind = {0, i, 3, climit, left, 2} end
  end
end
local output = wanted
if wanted > room then
  local per = math.floor(room / choices)
  if (not clamp) or per == 0 then return bind end
  output = per * choices
end
local tokens = prompt + output
local cost = math.ceil(prompt * pin + output * pout)
for i = 1, n do
  local b = 17 + (i - 1) * 6
  local u = used[i]
  redis.call('HSET', KEYS[i], 'd', day, 'dt', u[1] + tokens, 'm', month, 'mt', u[2] + tokens,
    'mc', u[3] + cost)
  expire(KEYS[i], ARGV[b + 1])
  local skey = tonumber(ARGV[b + 6])
  if stream and skey > 0 then
    for j = 1, slots do
      redis.call('ZADD', KEYS[skey], now_ms + lease, ARGV[15] .. ':' .. j)
    end
    local ttl = tonumber(ARGV[b + 1])
    if ttl == 0 then
      redis.call('PEXPIREAT', KEYS[skey], math.max(day_end, now_ms + lease))
    else
      redis.call('PEXPIRE', KEYS[skey], ttl)
    end
  end
end
if h == nil then return {1, output, tokens, cost, day, month, -1, 0, 0, 0} end
local left_room = room - output
if room == math.huge then left_room = -1 end
return {1, output, tokens, cost, day, month, h[1], h[2], h[3], left_room}
"
);

/// Settlement. KEYS: the reservation's hashes, then its stream sets. ARGV: 1–7 the periods
/// now (see `periods!`), 8 the reservation's day, 9 its month, 10 tokens reserved, 11 cost
/// reserved, 12 tokens used, 13 cost, 14 reservation id, 15 hashes, 16 stream slots held,
/// then each hash's TTL (ms, 0 for the day's end).
const SETTLE: &str = concat!(
    periods!(),
    r"
local rday, rmonth = tonumber(ARGV[8]), tonumber(ARGV[9])
local rtok, rcost = tonumber(ARGV[10]), tonumber(ARGV[11])
local tok, cost = tonumber(ARGV[12]), tonumber(ARGV[13])
local n = tonumber(ARGV[15])
for i = 1, #KEYS do
  if i <= n then
    local dt, mt, mc = counters(KEYS[i])
    if day == rday then dt = math.max(dt - rtok, 0) end
    if month == rmonth then mt = math.max(mt - rtok, 0); mc = math.max(mc - rcost, 0) end
    redis.call('HSET', KEYS[i], 'd', day, 'dt', dt + tok, 'm', month, 'mt', mt + tok,
      'mc', mc + cost)
    expire(KEYS[i], ARGV[16 + i])
  else
    for j = 1, tonumber(ARGV[16]) do
      redis.call('ZREM', KEYS[i], ARGV[14] .. ':' .. j)
    end
  end
end
return {1}
"
);

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A limit refuses it.
    Refused(Refusal),
    /// The shared counters cannot be reached and a limit it meets fails closed.
    Unavailable,
}

/// What the shared counters have done, for metrics and tests.
#[derive(Debug, Default)]
pub struct SharedCounters {
    /// Requests counted by the local fallback while Redis could not be reached.
    pub local_fallbacks: AtomicU64,
    /// Requests refused because Redis could not be reached and a limit fails closed.
    pub failed_closed: AtomicU64,
    /// Requests with no limit at all that went on uncounted while Redis could not be reached.
    pub uncounted: AtomicU64,
    /// Settlements that did not reach Redis (their reservations stay counted in full).
    pub settle_failures: AtomicU64,
    /// Reservations and rate checks served from a lease, without a round trip.
    pub leased: AtomicU64,
}

/// Where the shared counters are and what to do without them.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    /// Redis.
    pub url: String,
    /// `store.redis_prefix`.
    pub prefix: String,
    /// How long a request waits for Redis.
    pub timeout: Duration,
    /// Divides limits that fall back to `local`.
    pub expected_replicas: u32,
    /// The failure policy.
    pub policy: FailurePolicy,
    /// Most requests a lease is sized for (`store.lease_requests`); below 2, none.
    pub lease_requests: u64,
}

/// The Redis side of a [`super::QuotaEngine`] on shared counters.
pub(crate) struct Shared {
    pub(crate) conn: redis::aio::ConnectionManager,
    prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) policy: FailurePolicy,
    pub(crate) expected_replicas: u32,
    admit: redis::Script,
    reserve: redis::Script,
    settle: redis::Script,
    pub(crate) counters: SharedCounters,
    /// Settlements on their way to Redis, and a wake-up for those waiting on them.
    pub(crate) in_flight: AtomicU64,
    pub(crate) settled: tokio::sync::Notify,
    /// The runtime settlements run on: the one the engine was made on, which outlives the
    /// workers' (a settlement started as a worker stops still reaches Redis).
    pub(crate) runtime: tokio::runtime::Handle,
    /// When a fallback was last logged (Unix seconds), so an outage logs once a second.
    last_logged: AtomicU64,
    /// Blocks of budget and rate this replica holds (see [`super::lease`]).
    pub(crate) leases: super::lease::Leases,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// Counts a settlement in flight until dropped, however its task ends.
pub(crate) struct InFlight(pub(crate) Arc<Shared>);

impl InFlight {
    pub(crate) fn start(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(shared))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

/// A level a request counts against, its id and its limits.
pub(crate) type LevelLimits = (Level, Arc<str>, Limits);

/// A failed or late script.
#[derive(Debug)]
pub(crate) struct Unreachable(pub(crate) String);

impl Shared {
    pub(crate) async fn connect(settings: &SharedSettings) -> Result<Shared, String> {
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(settings.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1);
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| format!("redis at {}: {e}", settings.url))?;
        Ok(Shared {
            conn,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            policy: settings.policy,
            expected_replicas: settings.expected_replicas.max(1),
            admit: redis::Script::new(ADMIT),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
            counters: SharedCounters::default(),
            in_flight: AtomicU64::new(0),
            settled: tokio::sync::Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            last_logged: AtomicU64::new(0),
            leases: super::lease::Leases::new(settings.lease_requests),
        })
    }

    pub(crate) fn hash_key(&self, institution: &str, level: Level, id: &str) -> String {
        format!(
            "{{{}:{institution}}}:q:{}:{id}",
            self.prefix,
            level.as_str()
        )
    }

    fn streams_key(&self, institution: &str, level: Level, id: &str) -> String {
        format!(
            "{{{}:{institution}}}:qs:{}:{id}",
            self.prefix,
            level.as_str()
        )
    }

    async fn run(&self, inv: redis::ScriptInvocation<'_>) -> Result<Vec<i64>, Unreachable> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async::<Vec<i64>>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Unreachable(e.to_string())),
            Err(_) => Err(Unreachable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Counts and logs a request refused for want of Redis.
    pub(crate) fn failed_closed(&self, why: &Unreachable) {
        self.counters.failed_closed.fetch_add(1, Ordering::Relaxed);
        self.log_fallback(why, "fail_closed");
    }

    /// Counts and logs a request counted by the local fallback.
    pub(crate) fn went_local(&self, why: &Unreachable) {
        self.counters
            .local_fallbacks
            .fetch_add(1, Ordering::Relaxed);
        self.log_fallback(why, "local");
    }

    /// Logs a fallback, at most once a second.
    pub(crate) fn log_fallback(&self, why: &Unreachable, what: &str) {
        let now = Timestamp::now().as_second().max(0) as u64;
        if self.last_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(error = %why.0, policy = what, "shared counters unreachable");
        }
    }

    /// Counts `cells` requests against the rates of `rated` (level, id, limit per minute).
    pub(crate) async fn admit(
        &self,
        institution: &str,
        rated: &[(Level, &str, u64)],
        cells: u64,
    ) -> Result<Result<Option<Headroom>, Refusal>, Unreachable> {
        let mut inv = self.admit.prepare_invoke();
        inv.arg(cells);
        for &(level, id, per_minute) in rated {
            let per_minute = per_minute.clamp(1, u64::from(u32::MAX));
            inv.key(self.hash_key(institution, level, id))
                .arg(60_000_000 / per_minute)
                .arg(per_minute)
                .arg(rate_ttl_ms(level));
        }
        let r = self.run(inv).await?;
        match r.as_slice() {
            [1, limit, remaining, reset_us] => Ok(Ok(Some(Headroom {
                limit: *limit as u64,
                remaining: (*remaining).max(0) as u64,
                reset_ns: (*reset_us).max(0) as u64 * 1000,
            }))),
            [0, index, wait_us] => {
                let (level, _, per_minute) = rated[(*index as usize).saturating_sub(1)];
                Ok(Err(Refusal {
                    level,
                    kind: LimitKind::RequestsPerMinute,
                    limit: per_minute,
                    remaining: 0,
                    retry_after_secs: ((*wait_us).max(0) as u64).div_ceil(1_000_000).max(1),
                    resets_at: None,
                }))
            }
            other => Err(Unreachable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Reserves `demand` at `levels` (level, id, its limits), holding `slots` stream slots
    /// (one for a stream, none otherwise; a lease holds one per request it may serve).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn reserve(
        &self,
        institution: &str,
        levels: &[LevelLimits],
        windows: Windows,
        demand: &Demand,
        slots: u64,
        policy: OverPolicy,
        now: Timestamp,
    ) -> Result<Result<SharedHold, Refusal>, Unreachable> {
        let choices = demand.choices.max(1);
        let wanted = demand.max_output_tokens.saturating_mul(choices);
        let reservation_id = crate::ids::random_base62(16);
        let mut inv = self.reserve.prepare_invoke();
        let mut keys = Vec::with_capacity(levels.len());
        let mut ttls_ms = Vec::with_capacity(levels.len());
        let mut stream_keys = Vec::new();
        for (level, id, _) in levels {
            let (level, id) = (*level, &**id);
            let key = self.hash_key(institution, level, id);
            inv.key(&key);
            keys.push(key);
            ttls_ms.push(ttl_ms(level));
        }
        // A stream is held at every level (each shows its open streams); only levels with
        // a limit refuse one.
        if slots > 0 {
            for (level, id, _) in levels {
                let key = self.streams_key(institution, *level, id);
                inv.key(&key);
                stream_keys.push(key);
            }
        }
        windows.push(&mut inv);
        inv.arg(demand.prompt_tokens)
            .arg(wanted)
            .arg(choices)
            .arg(demand.input_nano_per_token)
            .arg(demand.output_nano_per_token)
            .arg(u8::from(policy == OverPolicy::Clamp))
            .arg(slots)
            .arg(&reservation_id)
            .arg(STREAM_LEASE.as_millis() as u64)
            .arg(levels.len());
        for (i, &(level, _, limits)) in levels.iter().enumerate() {
            let stream_index = if slots > 0 { levels.len() + i + 1 } else { 0 };
            inv.arg(ttl_ms(level))
                .arg(signed(limits.tokens_per_day))
                .arg(signed(limits.tokens_per_month))
                .arg(signed(limits.cost_per_month_nano_usd))
                .arg(signed(limits.concurrent_streams))
                .arg(stream_index);
        }
        let r = self.run(inv).await?;
        let nanos_until = |at: Timestamp| {
            u64::try_from(at.as_nanosecond().saturating_sub(now.as_nanosecond())).unwrap_or(0)
        };
        match r.as_slice() {
            [
                1,
                output,
                tokens,
                cost,
                day,
                month,
                h_limit,
                h_after,
                h_window,
                room,
            ] => {
                let output = (*output).max(0) as u64;
                let tokens_headroom = (*h_limit >= 0).then(|| {
                    let resets = if *h_window == 2 {
                        windows.month.resets_at
                    } else {
                        windows.day.resets_at
                    };
                    let mut remaining = (*h_after).max(0) as u64;
                    if *room >= 0 {
                        remaining = remaining.min(*room as u64);
                    }
                    Headroom {
                        limit: *h_limit as u64,
                        remaining,
                        reset_ns: nanos_until(resets),
                    }
                });
                Ok(Ok(SharedHold {
                    keys,
                    stream_keys,
                    slots,
                    reservation_id,
                    day_id: *day,
                    month_id: *month,
                    tokens: (*tokens).max(0) as u64,
                    cost: (*cost).max(0) as u64,
                    output_tokens: output,
                    clamped_to: (output < wanted).then_some(output / choices),
                    tokens_headroom,
                    ttls_ms,
                }))
            }
            [0, index, kind, limit, left, window] => {
                let level = levels[(*index as usize).saturating_sub(1)].0;
                let kind = match kind {
                    1 => LimitKind::TokensPerDay,
                    2 => LimitKind::TokensPerMonth,
                    3 => LimitKind::CostPerMonth,
                    _ => LimitKind::ConcurrentStreams,
                };
                let resets_at = match window {
                    1 => Some(windows.day.resets_at),
                    2 => Some(windows.month.resets_at),
                    _ => None,
                };
                Ok(Err(Refusal {
                    level,
                    kind,
                    limit: (*limit).max(0) as u64,
                    remaining: (*left).max(0) as u64,
                    retry_after_secs: resets_at
                        .map_or(1, |at| nanos_until(at).div_ceil(1_000_000_000).max(1)),
                    resets_at,
                }))
            }
            other => Err(Unreachable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Replaces a reservation with what was used.
    pub(crate) async fn settle(
        &self,
        hold: &SharedHold,
        windows: Windows,
        tokens: u64,
        cost: u64,
    ) -> Result<(), Unreachable> {
        let mut inv = self.settle.prepare_invoke();
        for key in hold.keys.iter().chain(&hold.stream_keys) {
            inv.key(key);
        }
        windows.push(&mut inv);
        inv.arg(hold.day_id)
            .arg(hold.month_id)
            .arg(hold.tokens)
            .arg(hold.cost)
            .arg(tokens)
            .arg(cost)
            .arg(&hold.reservation_id)
            .arg(hold.keys.len())
            .arg(hold.slots);
        for ttl in &hold.ttls_ms {
            inv.arg(*ttl);
        }
        self.run(inv).await.map(drop)
    }

    /// The counters of `levels` now, in one round trip.
    pub(crate) async fn read(
        &self,
        institution: &str,
        levels: &[(Level, &str)],
        windows: Windows,
        now: Timestamp,
    ) -> Result<Vec<Counts>, Unreachable> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for &(level, id) in levels {
            pipe.cmd("HMGET")
                .arg(self.hash_key(institution, level, id))
                .arg(&["tat", "d", "dt", "m", "mt", "mc"][..])
                .zcount(
                    self.streams_key(institution, level, id),
                    now.as_millisecond(),
                    "+inf",
                );
        }
        let read = pipe.query_async::<Vec<redis::Value>>(&mut conn);
        let replies = match tokio::time::timeout(self.timeout * 5, read).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(Unreachable(e.to_string())),
            Err(_) => return Err(Unreachable("no answer".into())),
        };
        if replies.len() != 2 * levels.len() {
            return Err(Unreachable("a short pipeline reply".into()));
        }
        let day = i64::from(windows.current_day(now).id);
        let month = i64::from(windows.current_month(now).id);
        replies
            .chunks(2)
            .map(|pair| {
                let [fields, streams] = pair else {
                    return Err(Unreachable("a short pipeline reply".into()));
                };
                let v: Vec<Option<i64>> =
                    redis::from_redis_value_ref(fields).map_err(|e| Unreachable(e.to_string()))?;
                let streams: u64 =
                    redis::from_redis_value_ref(streams).map_err(|e| Unreachable(e.to_string()))?;
                let get = |i: usize| v.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
                let this_day = get(1) == day as u64;
                let this_month = get(3) == month as u64;
                Ok(Counts {
                    day_tokens: if this_day { get(2) } else { 0 },
                    month_tokens: if this_month { get(4) } else { 0 },
                    month_cost: if this_month { get(5) } else { 0 },
                    streams,
                    tat_us: get(0),
                })
            })
            .collect()
    }

    /// Starts a patron's day afresh.
    pub(crate) async fn reset_patron_day(
        &self,
        institution: &str,
        patron: &str,
        windows: Windows,
        now: Timestamp,
    ) -> Result<(), Unreachable> {
        let mut conn = self.conn.clone();
        let key = self.hash_key(institution, Level::Patron, patron);
        let day = windows.current_day(now);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&key)
            .arg("d")
            .arg(day.id)
            .arg("dt")
            .arg(0)
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&key)
            .arg(day.resets_at.as_millisecond())
            .ignore();
        let write = pipe.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.timeout * 5, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Unreachable(e.to_string())),
            Err(_) => Err(Unreachable("no answer".into())),
        }
    }

    /// The policy for a kind of limit met at `level`.
    pub(crate) fn policy_for(&self, level: Level, kind: LimitKind) -> OnFailure {
        let p = &self.policy;
        match kind {
            LimitKind::RequestsPerMinute => p.requests_per_minute,
            LimitKind::TokensPerDay if level == Level::Patron => p.patron_tokens_per_day,
            LimitKind::TokensPerDay => p.tokens_per_day,
            LimitKind::TokensPerMonth => p.tokens_per_month,
            LimitKind::CostPerMonth => p.cost_per_month,
            LimitKind::ConcurrentStreams => p.concurrent_streams,
            LimitKind::PatronTokensPerDay => p.patron_tokens_per_day,
        }
    }
}

fn signed(v: Option<u64>) -> i64 {
    v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A level's hash TTL in the budget scripts: 0 for a patron (the end of the day counted in).
fn ttl_ms(level: Level) -> u64 {
    if level == Level::Patron {
        0
    } else {
        TTL_DAYS * 86_400_000
    }
}

/// A level's hash TTL in the rate script: a patron's only when its hash has none yet.
fn rate_ttl_ms(level: Level) -> i64 {
    if level == Level::Patron {
        -(PATRON_RATE_TTL_MS as i64)
    } else {
        (TTL_DAYS * 86_400_000) as i64
    }
}

/// The current day and month of an institution and the ones after them, so a script turns
/// them over at Redis's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Windows {
    pub(crate) day: Window,
    pub(crate) next_day: Window,
    pub(crate) month: Window,
    pub(crate) next_month: Window,
}

impl Windows {
    fn push(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self.day.id)
            .arg(self.day.resets_at.as_millisecond())
            .arg(self.next_day.id)
            .arg(self.next_day.resets_at.as_millisecond())
            .arg(self.month.id)
            .arg(self.month.resets_at.as_millisecond())
            .arg(self.next_month.id);
    }

    /// The day current at `now` (its end is when a patron's counters go).
    fn current_day(&self, now: Timestamp) -> Window {
        if now >= self.day.resets_at {
            self.next_day
        } else {
            self.day
        }
    }

    fn current_month(&self, now: Timestamp) -> Window {
        if now >= self.month.resets_at {
            self.next_month
        } else {
            self.month
        }
    }
}

/// One level's counters in Redis, in the current periods.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) day_tokens: u64,
    pub(crate) month_tokens: u64,
    pub(crate) month_cost: u64,
    pub(crate) streams: u64,
    /// The GCRA's theoretical arrival time, µs.
    pub(crate) tat_us: u64,
}

impl Counts {
    /// As the engine reports a level's usage.
    pub(crate) fn usage(self, windows: Windows, requests_remaining: Option<u64>) -> LevelUsage {
        LevelUsage {
            day_tokens: self.day_tokens,
            month_tokens: self.month_tokens,
            month_cost_nano_usd: self.month_cost,
            streams: self.streams,
            requests_remaining,
            day_resets_at: windows.day.resets_at,
            month_resets_at: windows.month.resets_at,
        }
    }
}

/// A reservation held in Redis.
#[derive(Debug)]
pub(crate) struct SharedHold {
    keys: Vec<String>,
    stream_keys: Vec<String>,
    /// Stream slots held (members `<reservation id>:1..=slots` of each stream set).
    pub(crate) slots: u64,
    reservation_id: String,
    day_id: i64,
    month_id: i64,
    pub(crate) tokens: u64,
    pub(crate) cost: u64,
    pub(crate) output_tokens: u64,
    pub(crate) clamped_to: Option<u64>,
    pub(crate) tokens_headroom: Option<Headroom>,
    ttls_ms: Vec<u64>,
}
