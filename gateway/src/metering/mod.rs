//! Metering: what each forwarded request used, settled against its reservation and written to
//! the usage ledger.
//!
//! [`MeteredBody`] wraps a 2xx response body on its way to the client and, when the body ends —
//! or the client goes away — settles the request's quota reservation to the provider's usage
//! (or Carrel's count, see [`body`]) and hands a [`PendingUsage`] to the [`UsageLedger`]. Both
//! happen before the final bytes reach the client, so a quota or report asked for after a
//! response has been read includes it.
//!
//! The ledger's writer is one thread that wakes every [`WRITE_INTERVAL`] and writes what has
//! queued in one transaction, folded into daily sums (see `core::store::usage`). The data plane
//! never waits for a disk and a response costs no thread wake-up: a transaction per response
//! cost ~14 µs of CPU per request at concurrency 64, and a SQLite row per response ~2 µs
//! more, so records are written a batch to a row (deploy/bench/RESULTS.md). A flush wakes the writer at once. A full queue drops the record
//! and counts it (a store that cannot keep up for 65 536 responses is an incident to alert on,
//! not a reason to stall patrons).
//!
//! Each record is handed to the store once; a batch is written in one transaction, as one
//! row of records plus the daily sums reports and the quota engine read (see
//! `core::store::usage`).

pub mod body;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use carrel_core::store::{Store, UsageRecord};

pub use body::MeteredBody;

/// Records queued for the writer before new ones are dropped.
pub const QUEUE: usize = 65_536;
/// How often the writer writes what has queued. A committed batch survives the process being
/// killed (SQLite's WAL is in the OS's page cache), so a record is safe from `kill -9` within
/// about this long after its response ended; the promise is 100 ms, and this leaves the rest for
/// a slow write.
pub const WRITE_INTERVAL: Duration = Duration::from_millis(20);
/// How often records past their retention are deleted (and once at start).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Most records written in one transaction.
const BATCH: usize = 1024;

/// A record as the data plane knows it; the writer adds the institution's local day.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingUsage {
    /// The record, with `day` still empty.
    pub record: UsageRecord,
    /// The institution's IANA time zone.
    pub timezone: Arc<str>,
}

/// A new request id: `req_`, the time in milliseconds, a per-process random part and a
/// sequence number, all base62, so ids are unique across replicas and restarts and sort by time
/// to the millisecond. Ids reach clients (`x-carrel-request-id`), so the sequence number is
/// passed through a keyed permutation first: a plain counter would let anyone who sees two ids
/// work out how many requests the whole gateway served between them.
pub fn request_id() -> String {
    struct Process {
        tag: String,
        keys: [u64; 4],
    }
    static PROCESS: std::sync::OnceLock<Process> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| Process {
        tag: carrel_core::ids::random_base62(6),
        keys: std::array::from_fn(|_| u64::from_le_bytes(carrel_core::ids::random_bytes())),
    });
    let ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(24);
    id.push_str("req_");
    carrel_core::ids::push_base62(&mut id, ms, 8);
    id.push_str(&process.tag);
    carrel_core::ids::push_base62(&mut id, permute(n, &process.keys), 6);
    id
}

/// Bits of the sequence number that are permuted; six base62 digits hold them. Ids repeat only
/// if one process hands out 2^34 of them within one millisecond.
const SEQUENCE_BITS: u32 = 34;

/// A keyed bijection on `0..2^SEQUENCE_BITS` (a four-round Feistel network), applied to `n`
/// modulo that.
fn permute(n: u64, keys: &[u64; 4]) -> u64 {
    const HALF: u32 = SEQUENCE_BITS / 2;
    const MASK: u64 = (1 << HALF) - 1;
    let (mut left, mut right) = ((n >> HALF) & MASK, n & MASK);
    for key in keys {
        let mixed = mix(right ^ key) & MASK;
        (left, right) = (right, left ^ mixed);
    }
    (left << HALF) | right
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

enum Msg {
    Record(Box<PendingUsage>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Handle to the ledger writer. Cheap to clone.
#[derive(Clone)]
pub struct UsageLedger {
    tx: SyncSender<Msg>,
    /// The writer thread, woken by a flush.
    writer: std::thread::Thread,
    counters: Arc<Counters>,
}

/// What the ledger has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records written.
    pub written: AtomicU64,
    /// Records dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Records lost because the store failed to write them.
    pub failed: AtomicU64,
}

impl std::fmt::Debug for UsageLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLedger")
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl UsageLedger {
    /// Starts the writer thread over `store`, keeping per-request records for `retention` (see
    /// [`PRUNE_INTERVAL`]). It stops when every handle is dropped, after writing what was
    /// queued.
    pub fn start(store: Store, retention: Duration) -> std::io::Result<UsageLedger> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let writer_counters = Arc::clone(&counters);
        let writer = std::thread::Builder::new()
            .name("carrel-ledger".to_owned())
            .spawn(move || write_loop(&store, &rx, &writer_counters, retention))?
            .thread()
            .clone();
        Ok(UsageLedger {
            tx,
            writer,
            counters,
        })
    }

    /// Queues a record; never blocks.
    pub fn record(&self, usage: PendingUsage) {
        match self.tx.try_send(Msg::Record(Box::new(usage))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::error!(dropped = n, "usage ledger queue full; usage record dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("usage ledger writer is gone; usage record lost");
            }
        }
    }

    /// Waits until every record queued before this call is in the store.
    pub async fn flush(&self) {
        let (ack, done) = tokio::sync::oneshot::channel();
        let tx = self.tx.clone();
        let writer = self.writer.clone();
        // The queue may be full: wait for room off the async threads, with the writer awake.
        let sent = tokio::task::spawn_blocking(move || {
            writer.unpark();
            let sent = tx.send(Msg::Flush(ack)).is_ok();
            writer.unpark();
            sent
        })
        .await;
        if matches!(sent, Ok(true)) {
            let _ = done.await;
        }
    }

    /// What the ledger has done.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

fn write_loop(store: &Store, rx: &Receiver<Msg>, counters: &Counters, retention: Duration) {
    let mut next_prune = Instant::now();
    loop {
        if Instant::now() >= next_prune {
            prune(store, retention);
            next_prune = Instant::now() + PRUNE_INTERVAL;
        }
        std::thread::park_timeout(WRITE_INTERVAL);
        store.retry_usage_journal_blocking(false);
        // Everything queued now, a batch at a time; records a flush follows are written before
        // it is acknowledged.
        loop {
            let mut batch = Vec::new();
            let mut acks = Vec::new();
            let mut gone = false;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(Msg::Record(pending)) => batch.push(with_day(*pending)),
                    Ok(Msg::Flush(ack)) => acks.push(ack),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            let full = batch.len() == BATCH;
            write(store, &batch, counters);
            if !acks.is_empty() {
                // A flush asks for everything to be in the store: the journal too, if Redis
                // is back.
                store.retry_usage_journal_blocking(true);
            }
            for ack in acks {
                let _ = ack.send(());
            }
            if gone {
                return;
            }
            if !full {
                break;
            }
        }
    }
}

/// Deletes per-request records older than `retention`, and forgets patrons past their
/// institution's window ([`Store::forget_patrons_blocking`]). A failure is logged and tried
/// again at the next interval.
fn prune(store: &Store, retention: Duration) {
    match store.forget_patrons_blocking(carrel_core::domain::unix_now()) {
        Ok(done) if done == carrel_core::store::Forgotten::default() => {}
        Ok(done) => tracing::info!(
            references = done.references,
            daily_sums = done.daily_sums,
            "patrons' usage metadata past its window removed"
        ),
        Err(e) => tracing::error!(error = %e, "could not remove patrons' old usage metadata"),
    }
    let before = carrel_core::domain::unix_now()
        .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
    match store.prune_usage_records_blocking(before) {
        Ok(0) => {}
        Ok(n) => tracing::info!(records = n, "usage records past their retention deleted"),
        Err(e) => tracing::error!(error = %e, "could not delete old usage records"),
    }
}

fn write(store: &Store, batch: &[UsageRecord], counters: &Counters) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match store.record_usage_blocking(batch) {
        Ok(_) => {
            counters.written.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            counters.failed.fetch_add(n, Ordering::Relaxed);
            tracing::error!(error = %e, records = n, "could not write usage records");
        }
    }
}

/// Fills in the institution's local date at the record's time.
fn with_day(pending: PendingUsage) -> UsageRecord {
    let mut record = pending.record;
    record.day = carrel_core::domain::local_date(record.at, &pending.timezone).to_string();
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_sort_by_millisecond_and_hide_the_sequence() {
        let ids: Vec<String> = (0..20_000).map(|_| request_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for pair in ids.windows(2) {
            let [a, b] = pair else { unreachable!() };
            assert_eq!((a.len(), &a[..4]), (24, "req_"));
            assert!(carrel_core::ids::is_base62(&a[4..]));
            assert!(a[4..12] <= b[4..12], "{a} {b}");
        }
        // Consecutive ids do not give away how many came between: their last six digits are
        // not in order.
        let ascending = ids.windows(2).filter(|p| p[0][18..] < p[1][18..]).count();
        assert!((5_000..15_000).contains(&ascending), "{ascending}");
    }

    #[test]
    fn the_permutation_is_a_bijection() {
        let keys = [1, 2, 3, 4];
        let mut seen = std::collections::HashSet::new();
        // Every value of a window maps to a distinct value in range.
        for n in (1u64 << 33)..(1u64 << 33) + 100_000 {
            let p = permute(n, &keys);
            assert!(p < 1 << SEQUENCE_BITS);
            assert!(seen.insert(p), "{n} collides");
        }
    }

    /// The writer deletes records past their retention when it starts (and hourly after).
    #[tokio::test]
    async fn the_writer_prunes_records_past_their_retention() {
        let store = Store::open_in_memory().unwrap();
        let now = carrel_core::domain::unix_now();
        let record = |id: &str, at: i64| UsageRecord {
            request_id: id.into(),
            at,
            day: "2026-11-26".into(),
            institution_id: "inst_a".into(),
            key_id: "k".into(),
            model: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1,
            ..UsageRecord::default()
        };
        store
            .record_usage(vec![record("req_old", now - 3 * 86_400)])
            .await
            .unwrap();
        store
            .record_usage(vec![record("req_new", now)])
            .await
            .unwrap();
        let ledger = UsageLedger::start(store.clone(), Duration::from_secs(2 * 86_400)).unwrap();
        ledger.flush().await;
        let left = store.usage_records("inst_a", 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request_id, "req_new");
    }

    #[test]
    fn days_are_local_to_the_institution() {
        // 2026-11-27 03:00 UTC is still the 26th in Chicago.
        let at = carrel_core::domain::unix_seconds("2026-11-27T03:00:00Z").unwrap();
        let pending = |tz: &str| PendingUsage {
            record: UsageRecord {
                request_id: "req_1".into(),
                at,
                day: String::new(),
                institution_id: "i".into(),
                key_id: "k".into(),
                model: "m".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                ..UsageRecord::default()
            },
            timezone: tz.into(),
        };
        assert_eq!(with_day(pending("America/Chicago")).day, "2026-11-26");
        assert_eq!(with_day(pending("Asia/Tokyo")).day, "2026-11-27");
    }
}
