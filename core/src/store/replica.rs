//! The Redis backend: several replicas share one truth through two Redis streams.
//!
//! - **Control data.** Every write is a [`Command`] appended to the stream `{P}:log`. Each
//!   replica reads the stream in order and applies every entry to its own SQLite view of the
//!   control data, so the view of every replica goes through the same states; writes are pure
//!   functions of the view and their entry (see [`super::write`]). A replica that proposes a
//!   write waits until it has applied it and answers with what it returned, so a client reads
//!   its own writes. Reads never leave the replica. The stream is the truth: a replica that
//!   starts without a view, or with a view of another Redis, rebuilds it from the stream.
//! - **Usage.** The ledger writer appends each batch of usage records to `{P}:usage`, once:
//!   a Lua script adds the entry only if the batch id is new. Every replica applies the
//!   stream to its view of the ledger, so reports count the usage of every replica. While
//!   Redis is away, batches go to a local fsynced journal and are appended, in order and
//!   exactly once, when it is back.
//! - **Patrons in the usage stream.** The stream keeps records for
//!   `usage.record_retention_days`, but a record may name its patron only for the
//!   institution's window (24 hours by default, at most 7 days; see [`super::retention`]).
//!   So the entry holds the records without patrons, and the patron references go to keys
//!   of their own, `{P}:usage-patrons:<batch id>:<n>`, which Redis deletes when the window of
//!   the records in them ends. A replica applying the entry joins what is still there; a
//!   replica that reads it later (one rebuilding its view) gets the records anonymous.
//! - **Events.** Applying an entry proposed elsewhere tells this replica's data plane what
//!   changed ([`StoreEvent`]): a revoked key is dropped from its cache within milliseconds.
//!   A stream rather than `PUBLISH`: pub/sub drops what is sent while a subscriber reconnects,
//!   a stream is read from where the replica left off.
//!
//! Every key starts with the hash tag `{P}` (`P` is `store.redis_prefix`), so the streams
//! read together in one `XREAD` share a Redis Cluster slot. The key names are listed in
//! `deploy/REDIS.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot, watch};

use super::journal::Journal;
use super::usage::{decode_batch, encode_batch, encode_records, insert_usage};
use super::write::{Command, Outcome, StoreEvent, WriteCtx};
use super::{Store, StoreError, UsageRecord};

/// How long a control write may take to reach Redis.
const LOG_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a proposer waits to apply its own write once Redis has it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a blocking read of the streams waits for news before asking again.
const READ_BLOCK_MS: usize = 500;
/// Most entries applied in one SQLite transaction.
const READ_COUNT: usize = 512;
/// How long a batch id is remembered, so a batch journaled and sent again is added once. Far
/// longer than any outage a journal rides out.
const SEEN_TTL_SECS: u64 = 30 * 86_400;
/// Pause before reconnecting after Redis failed.
const RETRY: Duration = Duration::from_millis(200);

/// Adds a usage batch to the stream unless its id was seen, with its patron parts. KEYS:
/// stream, seen-key, then one key per part; ARGV: batch, ttl, the entry's `p` field, then per
/// part its value and its expiry (Unix seconds). Returns the entry id, or false for a batch
/// already added.
const APPEND_USAGE: &str = r"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  if #KEYS == 2 then
    return redis.call('XADD', KEYS[1], '*', 'b', ARGV[1])
  end
  for i = 3, #KEYS do
    redis.call('SET', KEYS[i], ARGV[2 * i - 2], 'EXAT', ARGV[2 * i - 1])
  end
  return redis.call('XADD', KEYS[1], '*', 'b', ARGV[1], 'p', ARGV[3])
end
return false
";
/// How long this replica uses the institutions' windows it read before reading them again.
const WINDOWS_FOR: Duration = Duration::from_secs(60);

/// Where the Redis backend finds Redis, and what it names its keys.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port/db` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// The hash tag every key starts with; tests give each their own.
    pub prefix: String,
    /// The data directory: the SQLite view and the usage journal live here.
    pub data_dir: PathBuf,
}

/// File name of a replica's view inside the data directory, apart from the embedded store's
/// file so that switching backends never overwrites one with the other.
pub const VIEW_FILE: &str = "carrel-view.db";
/// File name of the usage journal inside the data directory.
pub const JOURNAL_FILE: &str = "usage-journal";

/// The names of the keys, all in one hash slot.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    log: String,
    usage: String,
    epoch: String,
    seen: String,
    patrons: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let tag = format!("{{{prefix}}}");
        Keys {
            prefix: prefix.to_owned(),
            log: format!("{tag}:log"),
            usage: format!("{tag}:usage"),
            epoch: format!("{tag}:epoch"),
            seen: format!("{tag}:usage-seen:"),
            patrons: format!("{tag}:usage-patrons:"),
        }
    }

    /// The key of a batch's `n`th patron part.
    fn patron_part(&self, batch: &str, n: usize) -> String {
        format!("{}{batch}:{n}", self.patrons)
    }
}

/// A log entry.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// The replica that proposed it.
    replica: String,
    /// Its number there, to hand the outcome back.
    nonce: u64,
    ctx: WriteCtx,
    cmd: Command,
}

/// A stream position, `ms-seq`, compared as numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Pos(u64, u64);

impl Pos {
    fn parse(id: &str) -> Option<Pos> {
        let (ms, seq) = id.split_once('-')?;
        Some(Pos(ms.parse().ok()?, seq.parse().ok()?))
    }
    fn text(self) -> String {
        format!("{}-{}", self.0, self.1)
    }
}

/// What the replica has done with Redis, for metrics and tests.
#[derive(Debug, Default)]
pub struct ReplicaCounters {
    /// Log entries applied.
    pub applied: AtomicU64,
    /// Usage batches written to the local journal because Redis could not take them.
    pub journaled: AtomicU64,
    /// Journaled batches later appended to Redis.
    pub replayed: AtomicU64,
    /// Journaled batches this build could not read, set aside in `usage-journal.quarantine`.
    pub quarantined: AtomicU64,
    /// Times a read of the streams failed and was retried.
    pub read_failures: AtomicU64,
}

/// The replica's side of the Redis backend.
pub(crate) struct Replica {
    keys: Keys,
    /// This process, in the entries it proposes.
    id: String,
    client: redis::Client,
    conn: redis::aio::ConnectionManager,
    /// Proposed entries waiting to be applied here.
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    events: broadcast::Sender<StoreEvent>,
    /// The last usage entry appended by this replica, and the last applied to its view.
    usage_sent: watch::Sender<Pos>,
    usage_applied: watch::Sender<Pos>,
    /// The last log entry applied to the view.
    control_applied: watch::Sender<Pos>,
    /// The ledger writer's connection and journal (only that thread writes usage).
    writer: Mutex<UsageWriter>,
    append_usage: redis::Script,
    /// Each institution's patron window in seconds, as last read from the view, and when.
    windows: Mutex<(Option<std::time::Instant>, Windows)>,
    pub(crate) counters: ReplicaCounters,
}

struct UsageWriter {
    conn: Option<redis::Connection>,
    journal: Journal,
    /// After a failure, batches go straight to the journal until then: a Redis that hangs
    /// must not hold the ledger writer for a timeout per batch.
    quiet_until: Option<std::time::Instant>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("keys", &self.keys)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

impl Store {
    /// Opens a replica of the Redis backend: connects, brings the local view up to date with
    /// the log (so the replica starts with every write made before it), and keeps applying
    /// the log in a task of the current runtime.
    pub async fn open_replica(settings: RedisSettings) -> Result<Store, StoreError> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| unavailable("store.redis_url", e))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(LOG_TIMEOUT))
            .set_response_timeout(Some(LOG_TIMEOUT))
            .set_number_of_retries(1);
        let mut conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| unavailable(&format!("redis at {}", settings.url), e))?;
        let keys = Keys::new(&settings.prefix);
        // The log's identity: a view built from one log is thrown away in front of another.
        let fresh = crate::ids::random_base62(16);
        let _: bool = conn
            .set_nx(&keys.epoch, &fresh)
            .await
            .map_err(|e| unavailable("redis", e))?;
        let epoch: String = conn
            .get(&keys.epoch)
            .await
            .map_err(|e| unavailable("redis", e))?;
        std::fs::create_dir_all(&settings.data_dir).map_err(|source| StoreError::Io {
            path: settings.data_dir.display().to_string(),
            source,
        })?;
        let view = open_view(&settings.data_dir, &epoch)?;
        let journal = Journal::open(&settings.data_dir.join(JOURNAL_FILE))?;
        let (usage_applied, _) = watch::channel(view.usage_pos);
        let (usage_sent, _) = watch::channel(Pos::default());
        let (control_applied, _) = watch::channel(view.control_pos);
        let replica = Arc::new(Replica {
            id: crate::ids::random_base62(12),
            client,
            conn,
            pending: Mutex::default(),
            events: broadcast::channel(1024).0,
            usage_sent,
            usage_applied,
            control_applied,
            writer: Mutex::new(UsageWriter {
                conn: None,
                journal,
                quiet_until: None,
            }),
            append_usage: redis::Script::new(APPEND_USAGE),
            windows: Mutex::default(),
            counters: ReplicaCounters::default(),
            keys,
        });
        let store = Store::from_parts(view.conn, Some(Arc::clone(&replica)))?;
        // Catch up before serving: a replica never answers from a view older than its start.
        let mut reader = reader_connection(&replica.client)
            .await
            .map_err(|e| unavailable("redis", e))?;
        let mut pos = (view.control_pos, view.usage_pos);
        while replica.pump(&store, &mut reader, &mut pos, None).await? > 0 {}
        tracing::info!(
            prefix = %settings.prefix,
            log = %pos.0.text(),
            usage = %pos.1.text(),
            "replica view up to date with the Redis log"
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "follows the log for the life of the runtime; nothing to drain at shutdown: \
                      each applied run commits its position with it"
        )]
        tokio::spawn(follow(store.clone(), replica, reader, pos));
        Ok(store)
    }

    /// Changes made through other replicas, as they are applied here. Empty (never sends) on
    /// the embedded backend, where every change is made through this process.
    pub fn events(&self) -> broadcast::Receiver<StoreEvent> {
        match &self.replica {
            Some(r) => r.events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Counters of the Redis backend (`None` on the embedded one).
    pub fn replica_counters(&self) -> Option<&ReplicaCounters> {
        self.replica.as_deref().map(|r| &r.counters)
    }

    /// Waits until this replica has applied every change and usage batch that Redis held
    /// when it was called: what any replica wrote before is then read here. Immediate on the
    /// embedded backend.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let Some(r) = &self.replica else {
            return Ok(());
        };
        let control = newest(&r.conn, &r.keys.log).await?;
        let usage = newest(&r.conn, &r.keys.usage).await?;
        let wait = async {
            let mut c = r.control_applied.subscribe();
            let mut u = r.usage_applied.subscribe();
            let _ = c.wait_for(|p| *p >= control).await;
            let _ = u.wait_for(|p| *p >= usage).await;
        };
        tokio::time::timeout(APPLY_TIMEOUT, wait)
            .await
            .map_err(|_| StoreError::Unavailable("this replica is behind the Redis log".into()))
    }

    /// For a record this replica's view does not have: catches up with the shared log for at
    /// most `within`, in case another replica made it a moment ago. Whether a second look is
    /// worth it: false on the embedded backend (nothing to catch up with), and when Redis is
    /// away or slow (the view is what this replica has).
    pub async fn caught_up_within(&self, within: Duration) -> bool {
        self.is_replica()
            && matches!(
                tokio::time::timeout(within, self.catch_up()).await,
                Ok(Ok(()))
            )
    }

    /// Waits until the usage this replica has appended to Redis is in its own view, so a
    /// report read next includes it. Immediate on the embedded backend.
    pub async fn usage_visible(&self) {
        let Some(r) = &self.replica else { return };
        let sent = *r.usage_sent.borrow();
        let mut applied = r.usage_applied.subscribe();
        let _ = tokio::time::timeout(APPLY_TIMEOUT, applied.wait_for(|p| *p >= sent)).await;
    }
}

/// The id of the newest entry of a stream (`0-0` when it is empty).
async fn newest(conn: &redis::aio::ConnectionManager, key: &str) -> Result<Pos, StoreError> {
    let mut conn = conn.clone();
    let reply: redis::streams::StreamRangeReply = conn
        .xrevrange_count(key, "+", "-", 1)
        .await
        .map_err(|e| unavailable("redis", e))?;
    Ok(reply
        .ids
        .first()
        .and_then(|e| Pos::parse(&e.id))
        .unwrap_or_default())
}

/// A connection for blocking reads: no response timeout of its own (the caller bounds the
/// wait), and no other traffic to hold up.
async fn reader_connection(
    client: &redis::Client,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(LOG_TIMEOUT))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Keeps applying the log until the runtime shuts down.
async fn follow(
    store: Store,
    replica: Arc<Replica>,
    mut reader: redis::aio::MultiplexedConnection,
    mut pos: (Pos, Pos),
) {
    loop {
        match replica
            .pump(&store, &mut reader, &mut pos, Some(READ_BLOCK_MS))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                replica
                    .counters
                    .read_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "reading the Redis log failed; retrying");
                tokio::time::sleep(RETRY).await;
                if let Ok(c) = reader_connection(&replica.client).await {
                    reader = c;
                }
            }
        }
    }
}

impl Replica {
    /// Reads what follows `pos` in both streams (waiting up to `block` ms for news) and
    /// applies it to the view in one transaction. Returns how many entries it applied.
    async fn pump(
        &self,
        store: &Store,
        reader: &mut redis::aio::MultiplexedConnection,
        pos: &mut (Pos, Pos),
        block: Option<usize>,
    ) -> Result<usize, StoreError> {
        let mut opts = StreamReadOptions::default().count(READ_COUNT);
        if let Some(ms) = block {
            opts = opts.block(ms);
        }
        let keys = [&self.keys.log, &self.keys.usage];
        let ids = [pos.0.text(), pos.1.text()];
        let read = reader.xread_options::<_, _, Option<StreamReadReply>>(&keys, &ids, &opts);
        // The reader's own connection has no response timeout (it blocks on purpose); a dead
        // server is noticed here instead.
        let wait = Duration::from_millis(block.unwrap_or(0) as u64) + LOG_TIMEOUT;
        let reply = tokio::time::timeout(wait, read)
            .await
            .map_err(|_| unavailable("redis", "no answer to XREAD"))?
            .map_err(|e| unavailable("redis", e))?;
        let Some(reply) = reply else { return Ok(0) };
        let mut control = Vec::new();
        let mut usage = Vec::new();
        let mut part_keys = Vec::new();
        for key in reply.keys {
            for entry in key.ids {
                let at = Pos::parse(&entry.id)
                    .ok_or_else(|| StoreError::Corrupt(format!("stream id {}", entry.id)))?;
                let field = if key.key == self.keys.log { "e" } else { "b" };
                let bytes = |field: &str| match entry.map.get(field) {
                    Some(redis::Value::BulkString(b)) => Some(b.clone()),
                    _ => None,
                };
                let body = bytes(field).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "{} entry {} has no field {field}",
                        key.key, entry.id
                    ))
                })?;
                if key.key == self.keys.log {
                    control.push((at, body));
                    continue;
                }
                // `p`: "<batch id> <parts>", when the batch named patrons.
                let parts = bytes("p")
                    .and_then(|p| {
                        let p = String::from_utf8(p).ok()?;
                        let (batch, n) = p.split_once(' ')?;
                        Some((batch.to_owned(), n.parse::<usize>().ok()?))
                    })
                    .map_or(0..0, |(batch, n)| {
                        let from = part_keys.len();
                        part_keys.extend((0..n).map(|i| self.keys.patron_part(&batch, i)));
                        from..part_keys.len()
                    });
                usage.push((at, body, parts));
            }
        }
        // What is left of the patron parts: those past their window are gone.
        let found: Vec<Option<Vec<u8>>> = if part_keys.is_empty() {
            Vec::new()
        } else {
            let mut mget = redis::cmd("MGET");
            mget.arg(&part_keys);
            tokio::time::timeout(LOG_TIMEOUT, mget.query_async(reader))
                .await
                .map_err(|_| unavailable("redis", "no answer to MGET"))?
                .map_err(|e| unavailable("redis", e))?
        };
        let usage: Vec<(Pos, Vec<u8>, Vec<Vec<u8>>)> = usage
            .into_iter()
            .map(|(at, body, parts)| {
                let found = parts.filter_map(|i| found.get(i).cloned().flatten());
                (at, body, found.collect())
            })
            .collect();
        let n = control.len() + usage.len();
        let start = *pos;
        let (done, end) = store
            .call(move |c| apply_entries(c, start, control, usage))
            .await?;
        *pos = end;
        self.counters.applied.fetch_add(n as u64, Ordering::Relaxed);
        self.usage_applied.send_replace(end.1);
        self.control_applied.send_replace(end.0);
        for (entry, outcome) in done {
            let mine = entry.replica == self.id;
            let waiting = mine
                .then(|| self.pending.lock().expect("pending").remove(&entry.nonce))
                .flatten();
            match waiting {
                Some(tx) => {
                    let _ = tx.send(outcome);
                }
                None if !mine => {
                    if let Some(event) = entry.cmd.event() {
                        let _ = self.events.send(event);
                    }
                }
                None => {}
            }
        }
        Ok(n)
    }

    /// Appends `cmd` to the log and waits until this replica has applied it.
    /// The short-lived shared state, on this Redis under the same hash tag.
    pub(crate) fn ephemeral(&self) -> super::ephemeral::Ephemeral {
        super::ephemeral::Ephemeral::redis(self.conn.clone(), &self.keys.prefix)
    }

    pub(crate) async fn propose(&self, cmd: Command) -> Result<Outcome, StoreError> {
        let nonce = u64::from_le_bytes(crate::ids::random_bytes());
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending").insert(nonce, tx);
        // Forget the entry however this future ends (an error, or a caller that gave up).
        let _forget = Forget(self, nonce);
        let entry = Entry {
            replica: self.id.clone(),
            nonce,
            ctx: WriteCtx::fresh(),
            cmd,
        };
        let json = serde_json::to_vec(&entry).expect("commands serialise");
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(&self.keys.log, "*", &[("e", json)])
            .await
            .map_err(|e| unavailable("redis", e))?;
        match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            _ => Err(StoreError::Unavailable(
                "the change is in the Redis log but this replica has not applied it yet".into(),
            )),
        }
    }

    /// Appends a usage batch to Redis, or to the journal while Redis cannot take it. Journaled
    /// batches go first, in order, when Redis is back.
    pub(crate) fn publish_usage(&self, records: &[UsageRecord]) -> Result<usize, StoreError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.drain_journal(&mut w);
        let id = crate::ids::random_bytes::<16>();
        if w.journal.is_empty() && self.append(&mut w, &id, records).is_ok() {
            return Ok(records.len());
        }
        // The journal is this replica's own disk, emptied when Redis takes the batches; the
        // patron parts are made when they are sent, so a window that ended meanwhile holds.
        w.journal.append(&id, &encode_batch(records))?;
        self.counters.journaled.fetch_add(1, Ordering::Relaxed);
        Ok(records.len())
    }

    /// Sends what the journal holds, if anything and if Redis answers. `now` tries Redis even
    /// if it failed moments ago.
    pub(crate) fn retry_journal(&self, now: bool) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if now {
            w.quiet_until = None;
        }
        self.drain_journal(&mut w);
    }

    fn drain_journal(&self, w: &mut UsageWriter) {
        if w.journal.is_empty() || w.quiet_until.is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        let frames = match w.journal.read_all() {
            Ok(frames) => frames,
            Err(e) => {
                tracing::error!(error = %e, "could not read the usage journal");
                return;
            }
        };
        let total = frames.len();
        let mut sent = 0;
        for (i, (id, batch)) in frames.iter().enumerate() {
            let records = match decode_batch(batch) {
                Ok(records) => records,
                Err(e) => {
                    // Whole but unreadable (written by another version): set aside for an
                    // operator, so that it cannot hold up every batch after it.
                    match w.journal.quarantine(id, batch) {
                        Ok(path) => {
                            self.counters.quarantined.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(error = %e, path = %path.display(),
                                "a usage journal batch cannot be read; set aside");
                            continue;
                        }
                        Err(q) => {
                            tracing::error!(error = %e, quarantine = %q,
                                "a usage journal batch cannot be read nor set aside; it stays");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = self.append(w, id, &records) {
                tracing::warn!(error = %e, left = total - i, "Redis is still away; usage stays journaled");
                return;
            }
            sent += 1;
        }
        match w.journal.clear() {
            Ok(()) => {
                self.counters.replayed.fetch_add(sent, Ordering::Relaxed);
                tracing::info!(batches = sent, "journaled usage appended to Redis");
            }
            // Sent but not cleared: sent again later, and the batch ids keep it once.
            Err(e) => tracing::error!(error = %e, "could not clear the usage journal"),
        }
    }

    /// Appends one batch, once per id.
    fn append(
        &self,
        w: &mut UsageWriter,
        id: &[u8; 16],
        records: &[UsageRecord],
    ) -> Result<(), StoreError> {
        if w.quiet_until.is_some_and(|t| std::time::Instant::now() < t) {
            return Err(StoreError::Unavailable("redis failed moments ago".into()));
        }
        let result = self.try_append(w, id, records);
        if result.is_err() {
            w.conn = None;
            w.quiet_until = Some(std::time::Instant::now() + LEDGER_QUIET);
        }
        result
    }

    fn try_append(
        &self,
        w: &mut UsageWriter,
        id: &[u8; 16],
        records: &[UsageRecord],
    ) -> Result<(), StoreError> {
        if w.conn.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(LEDGER_TIMEOUT)
                .map_err(|e| unavailable("redis", e))?;
            conn.set_read_timeout(Some(LEDGER_TIMEOUT))
                .and_then(|()| conn.set_write_timeout(Some(LEDGER_TIMEOUT)))
                .map_err(|e| unavailable("redis", e))?;
            w.conn = Some(conn);
        }
        let conn = w.conn.as_mut().expect("connected above");
        let batch_id = hex::encode(id);
        let windows = Arc::clone(&self.windows.lock().unwrap_or_else(|p| p.into_inner()).1);
        let (batch, parts) = split_patrons(records, &windows, crate::domain::unix_now());
        let mut script = self.append_usage.key(&self.keys.usage);
        script
            .key(format!("{}{batch_id}", self.keys.seen))
            .arg(batch)
            .arg(SEEN_TTL_SECS)
            .arg(format!("{batch_id} {}", parts.len()));
        for (n, (expires_at, part)) in parts.into_iter().enumerate() {
            script
                .key(self.keys.patron_part(&batch_id, n))
                .arg(part)
                .arg(expires_at);
        }
        let added: Result<Option<String>, _> = script.invoke(conn);
        match added {
            Ok(Some(entry)) => {
                if let Some(p) = Pos::parse(&entry) {
                    self.usage_sent.send_if_modified(|s| {
                        let newer = p > *s;
                        if newer {
                            *s = p;
                        }
                        newer
                    });
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(unavailable("redis", e)),
        }
    }

    /// Trims usage entries older than `before` (Unix seconds) from the stream.
    pub(crate) fn trim_usage(&self, before: i64) -> Result<(), StoreError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conn) = w.conn.as_mut() else {
            return Ok(());
        };
        let min_id = format!("{}-0", before.max(0) as u64 * 1000);
        redis::cmd("XTRIM")
            .arg(&self.keys.usage)
            .arg("MINID")
            .arg("~")
            .arg(min_id)
            .query::<u64>(conn)
            .map(drop)
            .map_err(|e| unavailable("redis", e))
    }
}

impl Replica {
    /// Whether the institutions' windows are due to be read again before `records` go out:
    /// a minute has passed, or one of them names a patron of an institution not read yet.
    pub(crate) fn windows_stale(&self, records: &[UsageRecord]) -> bool {
        let w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        w.0.is_none_or(|read| read.elapsed() >= WINDOWS_FOR)
            || records
                .iter()
                .any(|r| r.patron_ref.is_some() && !w.1.contains_key(&*r.institution_id))
    }

    /// The institutions' windows, as just read from the view.
    pub(crate) fn set_windows(&self, windows: HashMap<String, i64>) {
        *self.windows.lock().unwrap_or_else(|p| p.into_inner()) =
            (Some(std::time::Instant::now()), Arc::new(windows));
    }
}

/// Each institution's patron window, in seconds.
type Windows = Arc<HashMap<String, i64>>;

/// A patron part: (index of the record in its batch, patron reference) pairs, as JSON.
type PatronRefs<'a> = Vec<(usize, &'a str)>;

/// Splits a batch for the shared stream: the records without their patrons, and the patron
/// references grouped by when their window ends (`windows`: seconds by institution; the
/// shortest window any institution may set for one this replica does not know yet). A
/// reference whose window has already ended (a batch sent late from the journal) is dropped.
fn split_patrons(
    records: &[UsageRecord],
    windows: &HashMap<String, i64>,
    now: i64,
) -> (Vec<u8>, Vec<(i64, Vec<u8>)>) {
    if records.iter().all(|r| r.patron_ref.is_none()) {
        return (encode_batch(records), Vec::new());
    }
    let mut parts: std::collections::BTreeMap<i64, PatronRefs<'_>> = Default::default();
    for (i, r) in records.iter().enumerate() {
        let Some(patron) = &r.patron_ref else {
            continue;
        };
        let window = windows
            .get(&*r.institution_id)
            .copied()
            .unwrap_or(super::retention::SHORTEST_WINDOW);
        let ends = r.at.saturating_add(window);
        if ends > now {
            parts.entry(ends).or_default().push((i, patron));
        }
    }
    let parts = parts
        .into_iter()
        .map(|(ends, refs)| (ends, serde_json::to_vec(&refs).expect("pairs serialise")))
        .collect();
    (encode_records(records, false), parts)
}

/// Puts the references of one patron part back into the records of its batch.
fn join_patrons(records: &mut [UsageRecord], part: &[u8]) -> Result<(), StoreError> {
    let refs: Vec<(usize, String)> = serde_json::from_slice(part)
        .map_err(|e| StoreError::Corrupt(format!("usage patron part: {e}")))?;
    for (i, patron) in refs {
        let record = records
            .get_mut(i)
            .ok_or_else(|| StoreError::Corrupt(format!("usage patron part: no record {i}")))?;
        record.patron_ref = Some(patron.into());
    }
    Ok(())
}

/// How long the ledger writer waits for Redis before it journals a batch.
const LEDGER_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the ledger writer journals without trying Redis after it failed.
const LEDGER_QUIET: Duration = Duration::from_secs(1);

struct Forget<'a>(&'a Replica, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().expect("pending").remove(&self.1);
    }
}

/// A view and where it stands in the streams.
struct View {
    conn: Connection,
    control_pos: Pos,
    usage_pos: Pos,
}

/// Where a view stands in the streams, and of which log.
const POSITION_TABLE: &str = "CREATE TABLE IF NOT EXISTS replica_position (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch TEXT NOT NULL,
    control TEXT NOT NULL,
    usage TEXT NOT NULL
)";

/// Opens the view in `dir`, throwing it away when it was built from another log.
fn open_view(dir: &Path, epoch: &str) -> Result<View, StoreError> {
    let path = dir.join(VIEW_FILE);
    let conn = super::open_file(&path)?;
    conn.execute_batch(POSITION_TABLE)?;
    let row: Option<(String, String, String)> = conn
        .query_row(
            "SELECT epoch, control, usage FROM replica_position",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    match row {
        Some((e, control, usage)) if e == epoch => Ok(View {
            conn,
            control_pos: Pos::parse(&control).unwrap_or_default(),
            usage_pos: Pos::parse(&usage).unwrap_or_default(),
        }),
        stale => {
            if stale.is_some() {
                tracing::warn!(path = %path.display(), "the view was built from another Redis log; rebuilding it");
            }
            drop(conn);
            for suffix in ["", "-wal", "-shm"] {
                let p = PathBuf::from(format!("{}{suffix}", path.display()));
                if p.exists() {
                    std::fs::remove_file(&p).map_err(|source| StoreError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                }
            }
            let conn = super::open_file(&path)?;
            conn.execute_batch(POSITION_TABLE)?;
            conn.execute(
                "INSERT INTO replica_position (id, epoch, control, usage) VALUES (1, ?1, '0-0', '0-0')",
                [epoch],
            )?;
            Ok(View {
                conn,
                control_pos: Pos::default(),
                usage_pos: Pos::default(),
            })
        }
    }
}

type Applied = (Vec<(Entry, Outcome)>, (Pos, Pos));

/// Applies a run of entries and moves the position past them, in one transaction. An entry
/// whose write fails (a conflict, say) fails alike on every replica and is passed over; a
/// failure of SQLite itself applies nothing, to be tried again.
fn apply_entries(
    c: &mut Connection,
    start: (Pos, Pos),
    control: Vec<(Pos, Vec<u8>)>,
    usage: Vec<(Pos, Vec<u8>, Vec<Vec<u8>>)>,
) -> Result<Applied, StoreError> {
    let mut pos = start;
    let mut done = Vec::with_capacity(control.len());
    c.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        for (at, body) in control {
            pos.0 = at;
            let entry: Entry = match serde_json::from_slice(&body) {
                Ok(e) => e,
                Err(e) => {
                    // Written by a newer Carrel: skipping it would let views drift apart.
                    return Err(StoreError::Corrupt(format!(
                        "log entry {}: {e} (is a newer Carrel writing to this log?)",
                        at.text()
                    )));
                }
            };
            let mut ctx = entry.ctx.clone();
            c.execute_batch("SAVEPOINT entry")?;
            let outcome = match entry.cmd.clone().apply(c, &mut ctx) {
                Ok(v) => {
                    c.execute_batch("RELEASE entry")?;
                    Ok(v)
                }
                Err(e) if e.is_deterministic() => {
                    c.execute_batch("ROLLBACK TO entry; RELEASE entry")?;
                    Err(e)
                }
                Err(e) => return Err(e),
            };
            done.push((entry, outcome));
        }
        for (at, body, parts) in usage {
            pos.1 = at;
            let mut records = decode_batch(&body)?;
            for part in &parts {
                join_patrons(&mut records, part)?;
            }
            insert_usage(c, &records)?;
        }
        c.execute(
            "UPDATE replica_position SET control = ?1, usage = ?2 WHERE id = 1",
            params![pos.0.text(), pos.1.text()],
        )?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            c.execute_batch("COMMIT")?;
            Ok((done, pos))
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{InstitutionKind, KeyKind, Tier};
    use crate::store::tests::test_replica;
    use crate::store::{NewApiKey, NewInstitution, PageRequest};

    fn prefix(name: &str) -> String {
        format!("test-{name}-{}", crate::ids::random_base62(10))
    }

    fn library() -> NewInstitution {
        NewInstitution {
            name: "Springfield Library".into(),
            kind: InstitutionKind::Library,
            region: "US-IL".into(),
            timezone: "America/Chicago".into(),
            sector: None,
        }
    }

    fn key(id: &str, institution_id: &str) -> NewApiKey {
        NewApiKey {
            id: id.into(),
            institution_id: institution_id.into(),
            name: "desk".into(),
            kind: KeyKind::Kiosk,
            tier_ceiling: Tier::Baseline,
            secret_hash: [3; 32],
            expires_at: None,
            site_id: None,
            group_id: None,
            allowed_models: None,
        }
    }

    #[tokio::test]
    async fn replicas_share_writes_and_hear_of_each_other_s_changes() {
        let prefix = prefix("share");
        let a = test_replica(&prefix).await;
        let b = test_replica(&prefix).await;
        let mut heard_by_b = b.events();
        let inst = a.create_institution(library()).await.unwrap();
        a.create_key(key("key_1", &inst.id)).await.unwrap();
        b.catch_up().await.unwrap();
        assert_eq!(
            b.get_institution(&inst.id).await.unwrap(),
            Some(inst.clone())
        );
        assert!(b.key_credential("key_1").await.unwrap().is_some());

        // The log orders writes from both: the second site of the same name is a conflict,
        // whichever replica it came through.
        b.create_site(&inst.id, "Main".into()).await.unwrap();
        let again = a.create_site(&inst.id, "Main".into()).await;
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");

        assert!(a.revoke_key("key_1").await.unwrap());
        let event = tokio::time::timeout(APPLY_TIMEOUT, heard_by_b.recv())
            .await
            .expect("B hears of the revocation")
            .unwrap();
        assert_eq!(event, StoreEvent::KeyChanged("key_1".into()));
        assert!(b.key_credential("key_1").await.unwrap().is_none());

        // A replica that starts later builds the same view from the log: same ids, same times.
        let c = test_replica(&prefix).await;
        for s in [&a, &b] {
            assert_eq!(
                c.list_keys(&inst.id, PageRequest::ALL).await.unwrap(),
                s.list_keys(&inst.id, PageRequest::ALL).await.unwrap()
            );
            assert_eq!(
                c.list_sites(&inst.id, PageRequest::ALL).await.unwrap(),
                s.list_sites(&inst.id, PageRequest::ALL).await.unwrap()
            );
        }
    }

    #[tokio::test]
    async fn a_usage_batch_sent_twice_is_added_once() {
        let prefix = prefix("usage-once");
        let a = test_replica(&prefix).await;
        let b = test_replica(&prefix).await;
        let record = UsageRecord {
            request_id: "req_1".into(),
            institution_id: "inst_x".into(),
            day: "2026-11-27".into(),
            prompt_tokens: 3,
            ..UsageRecord::default()
        };
        let r = a.replica.as_ref().unwrap();
        {
            let mut w = r.writer.lock().unwrap();
            r.append(&mut w, &[7; 16], std::slice::from_ref(&record))
                .unwrap();
            // As a journal replay would after a reply lost on the way back.
            r.append(&mut w, &[7; 16], std::slice::from_ref(&record))
                .unwrap();
        }
        for s in [&a, &b] {
            s.catch_up().await.unwrap();
            let seen = s.usage_records("inst_x", 10).await.unwrap();
            assert_eq!(seen, vec![record.clone()]);
        }
    }

    /// Item 8 of issue 7 on the Redis backend: the shared stream keeps usage for 90 days, but
    /// names a patron only for the institution's window.
    #[tokio::test]
    async fn the_usage_stream_names_patrons_only_for_their_institution_s_window() {
        let prefix = prefix("patron-window");
        let a = test_replica(&prefix).await;
        let inst = a.create_institution(library()).await.unwrap();
        a.update_institution(
            &inst.id,
            crate::store::InstitutionPatch {
                patron_retention_hours: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let now = crate::domain::unix_now();
        let record = |id: &str, at: i64, patron: Option<&str>| UsageRecord {
            request_id: id.into(),
            at,
            institution_id: inst.id.as_str().into(),
            day: "2026-11-27".into(),
            patron_ref: patron.map(Arc::from),
            prompt_tokens: 5,
            ..UsageRecord::default()
        };
        a.record_usage(vec![
            record("req_1", now, Some("pat_recent")),
            // Sent late (from the journal, say): its hour has passed.
            record("req_2", now - 7200, Some("pat_earlier")),
            record("req_3", now, None),
        ])
        .await
        .unwrap();

        // What Redis holds: no patron in the stream, one part that ends with the window.
        let mut raw = redis::Client::open(crate::store::tests::test_redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys = Keys::new(&prefix);
        let stream: redis::streams::StreamRangeReply = raw.xrange_all(&keys.usage).await.unwrap();
        assert_eq!(stream.ids.len(), 1);
        let redis::Value::BulkString(batch) = &stream.ids[0].map["b"] else {
            panic!("no batch in {:?}", stream.ids[0]);
        };
        assert!(
            decode_batch(batch)
                .unwrap()
                .iter()
                .all(|r| r.patron_ref.is_none())
        );
        let parts: Vec<String> = raw.keys(format!("{}*", keys.patrons)).await.unwrap();
        assert_eq!(parts.len(), 1, "{parts:?}");
        let expires: i64 = redis::cmd("EXPIRETIME")
            .arg(&parts[0])
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(expires, now + 3600);

        let patrons = |store: Store| {
            let inst = inst.id.clone();
            async move {
                store.catch_up().await.unwrap();
                let records = store.usage_records(&inst, 10).await.unwrap();
                assert_eq!(records.iter().map(|r| r.prompt_tokens).sum::<u64>(), 15);
                records
                    .into_iter()
                    .map(|r| r.patron_ref.map(|p| p.to_string()))
                    .collect::<Vec<_>>()
            }
        };
        let named = vec![Some("pat_recent".to_owned()), None, None];
        // The writer's view, and the view of a replica that starts within the window.
        assert_eq!(patrons(a.clone()).await, named);
        assert_eq!(patrons(test_replica(&prefix).await).await, named);
        // Once Redis has let the part go (done here as its expiry would), a replica that
        // builds its view reads the usage without patrons.
        let _: () = raw.del(&parts[0]).await.unwrap();
        assert_eq!(
            patrons(test_replica(&prefix).await).await,
            vec![None, None, None]
        );
    }

    #[test]
    fn patron_parts_join_back_into_their_batch() {
        let record = |at: i64, inst: &str, patron: Option<&str>| UsageRecord {
            at,
            institution_id: inst.into(),
            patron_ref: patron.map(Arc::from),
            ..UsageRecord::default()
        };
        let records = vec![
            record(100, "short", Some("p1")),
            record(100, "short", None),
            record(100, "long", Some("p2")),
            record(101, "short", Some("p3")),
            record(10, "short", Some("gone")),
            // Not known here yet: the shortest window any institution may have.
            record(100, "new", Some("p4")),
        ];
        let windows = HashMap::from([("short".to_owned(), 3600), ("long".to_owned(), 7200)]);
        let (batch, parts) = split_patrons(&records, &windows, 3650);
        let ends: Vec<i64> = parts.iter().map(|(t, _)| *t).collect();
        assert_eq!(ends, [3700, 3701, 7300]);
        let mut back = decode_batch(&batch).unwrap();
        assert!(back.iter().all(|r| r.patron_ref.is_none()));
        for (_, part) in &parts {
            join_patrons(&mut back, part).unwrap();
        }
        let want: Vec<_> = records
            .iter()
            .map(|r| r.patron_ref.clone().filter(|p| &**p != "gone"))
            .collect();
        assert_eq!(
            back.iter()
                .map(|r| r.patron_ref.clone())
                .collect::<Vec<_>>(),
            want
        );
        assert!(join_patrons(&mut back, br#"[[9,"x"]]"#).is_err());
        // No patrons: the batch as it is, no parts.
        let plain = vec![record(1, "short", None)];
        assert_eq!(
            split_patrons(&plain, &windows, 0),
            (encode_batch(&plain), Vec::new())
        );
    }

    #[tokio::test]
    async fn an_unreadable_journal_batch_is_set_aside_and_the_rest_are_sent() {
        let prefix = prefix("quarantine");
        let a = test_replica(&prefix).await;
        let record = UsageRecord {
            request_id: "req_after".into(),
            institution_id: "inst_q".into(),
            day: "2026-11-27".into(),
            prompt_tokens: 4,
            ..UsageRecord::default()
        };
        let r = a.replica.as_ref().unwrap();
        {
            let mut w = r.writer.lock().unwrap();
            // Whole (its checksum holds) but of a format this build does not know.
            w.journal.append(&[1; 16], b"\x09not a batch").unwrap();
            w.journal
                .append(&[2; 16], &encode_batch(std::slice::from_ref(&record)))
                .unwrap();
        }
        r.retry_journal(true);
        assert!(r.writer.lock().unwrap().journal.is_empty());
        assert_eq!(r.counters.quarantined.load(Ordering::Relaxed), 1);
        assert_eq!(r.counters.replayed.load(Ordering::Relaxed), 1);
        a.catch_up().await.unwrap();
        assert_eq!(a.usage_records("inst_q", 10).await.unwrap(), vec![record]);
    }

    #[test]
    fn a_view_built_from_another_log_is_thrown_away() {
        let dir = tempfile::tempdir().unwrap();
        let view = open_view(dir.path(), "epoch-1").unwrap();
        view.conn
            .execute("UPDATE replica_position SET control = '5-1'", [])
            .unwrap();
        drop(view);
        let again = open_view(dir.path(), "epoch-1").unwrap();
        assert_eq!(again.control_pos, Pos(5, 1));
        drop(again);
        let other = open_view(dir.path(), "epoch-2").unwrap();
        assert_eq!((other.control_pos, other.usage_pos), (Pos(0, 0), Pos(0, 0)));
    }

    #[test]
    fn stream_positions_order_as_numbers() {
        let a = Pos::parse("999-5").unwrap();
        let b = Pos::parse("1000-0").unwrap();
        assert!(a < b);
        assert_eq!(Pos::parse(&b.text()), Some(b));
        assert_eq!(Pos::parse("nope"), None);
    }

    #[test]
    fn every_key_shares_one_hash_tag() {
        let k = Keys::new("t1");
        for key in [&k.log, &k.usage, &k.epoch, &k.seen, &k.patrons] {
            assert!(key.starts_with("{t1}:"), "{key}");
        }
    }
}
