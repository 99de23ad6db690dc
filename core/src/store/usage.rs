//! The usage ledger: what each forwarded request used, and the daily sums that reports and the
//! quota engine read. Records hold ids and numbers only — never prompt text, and a patron only
//! as a keyed-hash reference.
//!
//! Writers hand over [`UsageRecord`]s in batches (the gateway's ledger thread, a batch per
//! wake-up). [`Store::record_usage`] writes a batch in one transaction: the records, encoded
//! together into one `usage_batches` row ([`encode_batch`]); the daily sums by key (with its
//! site and group) and model they add to (`usage_daily`); and patrons' daily sums
//! (`patron_daily`). A batch is all or nothing, and the one writer hands each record over
//! once, so each is counted once.
//!
//! One row per batch rather than per request: a row per request cost ~2 µs of SQLite each, a
//! fifth of the gateway's own CPU per chat request (deploy/bench/RESULTS.md, run 5). The price
//! is that records are not indexed: [`Store::usage_records`] reads them by scanning the
//! batches, which suits audits and tests, not a hot path. Nothing here de-duplicates by request
//! id; a replayed journal (issue 5) must be idempotent where it is replayed.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
// Keys are ids, days and operator-named models, none chosen by a client.
use rustc_hash::FxHashMap;
use serde::Serialize;

use super::{Store, StoreError};
use crate::domain::UsageGroupBy;

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UsageStatus {
    /// The response reached its end.
    #[default]
    Complete,
    /// Cut off before its end: the client left, or the provider broke off.
    Incomplete,
    /// Ended by Carrel because the stream ran past its reservation.
    Cut,
    /// The provider answered with an error status; nothing was used.
    UpstreamError,
}

impl UsageStatus {
    /// The status a stored name stands for (an unknown one reads as incomplete).
    pub fn parse(s: &str) -> UsageStatus {
        match s {
            "complete" => UsageStatus::Complete,
            "cut" => UsageStatus::Cut,
            "upstream_error" => UsageStatus::UpstreamError,
            _ => UsageStatus::Incomplete,
        }
    }

    /// Every status, by [`UsageStatus::code`].
    pub const ALL: [UsageStatus; 4] = [
        UsageStatus::Complete,
        UsageStatus::Incomplete,
        UsageStatus::Cut,
        UsageStatus::UpstreamError,
    ];

    /// The status's number in an encoded batch (two bits).
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            UsageStatus::Complete => "complete",
            UsageStatus::Incomplete => "incomplete",
            UsageStatus::Cut => "cut",
            UsageStatus::UpstreamError => "upstream_error",
        }
    }
}

/// What one forwarded request used. The default is an empty complete record, for building
/// one field by field.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageRecord {
    /// The request id: unique, and sorts by time.
    pub request_id: String,
    /// Unix seconds when the response ended.
    pub at: i64,
    /// The institution's local date (`YYYY-MM-DD`) when the response ended.
    pub day: String,
    /// The institution that pays.
    pub institution_id: Arc<str>,
    /// The key's site, if any.
    pub site_id: Option<Arc<str>>,
    /// The key's group, if any.
    pub group_id: Option<Arc<str>>,
    /// The API key.
    pub key_id: Arc<str>,
    /// The patron reference, when a patron made the request.
    pub patron_ref: Option<Arc<str>>,
    /// Public model name.
    pub model: Arc<str>,
    /// How it ended.
    pub status: UsageStatus,
    /// Prompt tokens, as the upstream reported them, or estimated.
    pub prompt_tokens: u64,
    /// Completion tokens, as the upstream reported them, or estimated.
    pub completion_tokens: u64,
    /// Whether the counts are Carrel's estimate (the provider reported none).
    pub estimated: bool,
    /// Whether the answer came from the response cache.
    pub cached: bool,
    /// Milliseconds from the request to the end of the response.
    pub latency_ms: u64,
    /// Cost at the model's prices, in billionths of a US dollar (a cheap model's request costs
    /// a few millionths, so millionths would round it away).
    pub cost_nano_usd: i64,
    /// For an answer from the response cache: what the provider would have charged for it at
    /// the price in force, in billionths of a US dollar (0 otherwise).
    pub saved_nano_usd: i64,
}

/// One line of a usage report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageLine {
    /// The day, site, group, key or model this line is about; `null` for requests with no site
    /// or group when grouping by those.
    pub group: Option<String>,
    /// Requests forwarded.
    pub requests: u64,
    /// Of those, responses cut off before their end (the client left, or the provider broke
    /// off); they count what was reported before the cut.
    pub incomplete: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Cost in US dollars at the models' prices.
    pub cost_usd: f64,
    /// Of the requests, those answered from the response cache.
    pub cached: u64,
    /// What the cached answers would have cost from the provider, in US dollars.
    pub savings_usd: f64,
}

/// Migration 15: the daily sums count cached answers and what they saved.
pub(super) const MIGRATION_SAVINGS: &str = r#"
ALTER TABLE usage_daily ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN saved_nano_usd INTEGER NOT NULL DEFAULT 0;
"#;

impl Store {
    /// Adds usage records to the ledger in one transaction, and waits until this store's
    /// reports include them. Returns how many were written.
    pub async fn record_usage(&self, records: Vec<UsageRecord>) -> Result<usize, StoreError> {
        let store = self.clone();
        let n = tokio::task::spawn_blocking(move || store.record_usage_blocking(&records))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        self.usage_visible().await;
        Ok(n)
    }

    /// [`Store::record_usage`] for a thread of its own (the ledger writer), outside any runtime.
    ///
    /// On the Redis backend the batch goes to the shared usage stream (or, while Redis is
    /// away, to the local journal) and reaches this replica's view from there.
    pub fn record_usage_blocking(&self, records: &[UsageRecord]) -> Result<usize, StoreError> {
        match &self.replica {
            None => self.blocking(|c| insert_usage(c, records)),
            Some(r) => {
                self.refresh_patron_windows(r, records);
                r.publish_usage(records)
            }
        }
    }

    /// Gives the replica the institutions' patron windows, which decide how long Redis keeps
    /// the patron references of what it sends, unless it read them within the last minute and
    /// they cover `records`. On failure the windows read before stay in use.
    fn refresh_patron_windows(&self, r: &super::replica::Replica, records: &[UsageRecord]) {
        if r.windows_stale(records) {
            match self.blocking(|c| super::retention::windows(c)) {
                Ok(windows) => r.set_windows(windows),
                Err(e) => tracing::warn!(error = %e, "could not read the patron windows"),
            }
        }
    }

    /// Sends the usage journaled while Redis was away, if any and if Redis answers now. The
    /// ledger writer calls it when it wakes (`now`: also when Redis failed moments ago, for a
    /// flush); nothing to do on the embedded backend.
    pub fn retry_usage_journal_blocking(&self, now: bool) {
        if let Some(r) = &self.replica {
            self.refresh_patron_windows(r, &[]);
            r.retry_journal(now);
        }
    }

    /// Deletes the per-request records of every batch that ended before `before` (Unix
    /// seconds); the daily sums stay. Returns how many records went.
    pub fn prune_usage_records_blocking(&self, before: i64) -> Result<u64, StoreError> {
        if let Some(r) = &self.replica
            && let Err(e) = r.trim_usage(before)
        {
            tracing::warn!(error = %e, "could not trim the shared usage stream; trying later");
        }
        self.blocking(|c| {
            let mut stmt =
                c.prepare_cached("DELETE FROM usage_batches WHERE last_at < ?1 RETURNING records")?;
            let gone = stmt.query_map([before], |r| r.get::<_, i64>(0))?;
            gone.map(|n| Ok(n?.max(0) as u64)).sum()
        })
    }

    /// An institution's per-request records, oldest first (request ids sort by time), at most
    /// `limit`. Scans every batch: for audits and tests.
    pub async fn usage_records(
        &self,
        institution_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare_cached("SELECT data FROM usage_batches ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let data: Vec<u8> = row.get(0)?;
                out.extend(
                    decode_batch(&data)?
                        .into_iter()
                        .filter(|r| *r.institution_id == *inst),
                );
            }
            out.sort_by(|a, b| a.request_id.cmp(&b.request_id));
            out.truncate(limit as usize);
            Ok(out)
        })
        .await
    }

    /// Usage of an institution from local day `from` to `to` (inclusive, `YYYY-MM-DD`), one line
    /// per value of `group_by`, in that value's order.
    pub async fn usage_report(
        &self,
        institution_id: &str,
        from: &str,
        to: &str,
        group_by: UsageGroupBy,
    ) -> Result<Vec<UsageLine>, StoreError> {
        let (inst, from, to) = (institution_id.to_owned(), from.to_owned(), to.to_owned());
        // A closed set of column expressions, never caller text. No site or group is stored as
        // '' (so that it takes part in the primary key) and reported as null.
        let column = match group_by {
            UsageGroupBy::Day => "day",
            UsageGroupBy::Site => "NULLIF(site_id, '')",
            UsageGroupBy::Group => "NULLIF(group_id, '')",
            UsageGroupBy::Key => "key_id",
            UsageGroupBy::Model => "model",
        };
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {column} AS g, SUM(requests), SUM(incomplete), SUM(prompt_tokens),
                    SUM(completion_tokens), SUM(cost_nano_usd), SUM(cached), SUM(saved_nano_usd)
                 FROM usage_daily WHERE institution_id = ?1 AND day >= ?2 AND day <= ?3
                 GROUP BY g ORDER BY g"
            ))?;
            let rows = stmt.query_map(params![inst, from, to], |r| {
                let prompt: i64 = r.get(3)?;
                let completion: i64 = r.get(4)?;
                let cost: i64 = r.get(5)?;
                Ok(UsageLine {
                    group: r.get(0)?,
                    requests: r.get::<_, i64>(1)? as u64,
                    incomplete: r.get::<_, i64>(2)? as u64,
                    prompt_tokens: prompt as u64,
                    completion_tokens: completion as u64,
                    total_tokens: (prompt + completion) as u64,
                    cost_usd: cost as f64 / 1e9,
                    cached: r.get::<_, i64>(6)? as u64,
                    savings_usd: r.get::<_, i64>(7)? as f64 / 1e9,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

/// The sums of one ledger row.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    requests: i64,
    incomplete: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_nano_usd: i64,
    cached: i64,
    saved_nano_usd: i64,
}

pub(super) fn insert_usage(
    c: &mut Connection,
    records: &[UsageRecord],
) -> Result<usize, StoreError> {
    if records.is_empty() {
        return Ok(0);
    }
    let tx = c.savepoint()?;
    insert_batch(&tx, records)?;
    // Fold the records: one upsert per row of the daily sums they touch.
    let mut rows: FxHashMap<[&str; 6], Sums> = FxHashMap::default();
    let mut patrons: FxHashMap<[&str; 3], Vec<(i64, u64)>> = FxHashMap::default();
    for r in records
        .iter()
        .filter(|r| r.status != UsageStatus::UpstreamError)
    {
        let row = [
            &*r.institution_id,
            r.day.as_str(),
            &*r.key_id,
            &*r.model,
            r.site_id.as_deref().unwrap_or(""),
            r.group_id.as_deref().unwrap_or(""),
        ];
        let sums = rows.entry(row).or_default();
        sums.requests += 1;
        sums.incomplete += i64::from(r.status != UsageStatus::Complete);
        sums.prompt_tokens = sums
            .prompt_tokens
            .saturating_add(saturating_i64(r.prompt_tokens));
        sums.completion_tokens = sums
            .completion_tokens
            .saturating_add(saturating_i64(r.completion_tokens));
        sums.cost_nano_usd = sums.cost_nano_usd.saturating_add(r.cost_nano_usd);
        sums.cached += i64::from(r.cached);
        sums.saved_nano_usd = sums.saved_nano_usd.saturating_add(r.saved_nano_usd);
        if let Some(patron) = &r.patron_ref {
            patrons
                .entry([&*r.institution_id, r.day.as_str(), &**patron])
                .or_default()
                .push((r.at, r.prompt_tokens.saturating_add(r.completion_tokens)));
        }
    }
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO usage_daily (institution_id, day, key_id, model, site_id, group_id,
                requests, incomplete, prompt_tokens, completion_tokens, cost_nano_usd, cached,
                saved_nano_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (institution_id, day, key_id, model, site_id, group_id) DO UPDATE SET
                requests = requests + excluded.requests,
                incomplete = incomplete + excluded.incomplete,
                prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                completion_tokens = completion_tokens + excluded.completion_tokens,
                cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd,
                cached = cached + excluded.cached,
                saved_nano_usd = saved_nano_usd + excluded.saved_nano_usd",
        )?;
        for ([inst, day, key, model, site, group], s) in &rows {
            stmt.execute(params![
                inst,
                day,
                key,
                model,
                site,
                group,
                s.requests,
                s.incomplete,
                s.prompt_tokens,
                s.completion_tokens,
                s.cost_nano_usd,
                s.cached,
                s.saved_nano_usd
            ])?;
        }
    }
    if !patrons.is_empty() {
        // A patron's day restarts at a reset: what ended before it no longer counts (a record
        // can reach the ledger up to a writer interval after its response ended).
        let mut reset_at = tx.prepare_cached(
            "SELECT at FROM patron_day_resets
             WHERE institution_id = ?1 AND patron_ref = ?2 AND day = ?3",
        )?;
        let mut upsert = tx.prepare_cached(
            "INSERT INTO patron_daily (institution_id, day, patron_ref, tokens)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (institution_id, day, patron_ref) DO UPDATE SET
                tokens = tokens + excluded.tokens",
        )?;
        for ([inst, day, patron], used) in &patrons {
            let since: Option<i64> = reset_at
                .query_row(params![inst, patron, day], |r| r.get(0))
                .optional()?;
            let tokens = used
                .iter()
                .filter(|(at, _)| since.is_none_or(|since| *at > since))
                .fold(0u64, |sum, (_, t)| sum.saturating_add(*t));
            upsert.execute(params![inst, day, patron, saturating_i64(tokens)])?;
        }
    }
    tx.commit()?;
    Ok(records.len())
}

/// Moves the per-request rows of schema 7 into batches (migration 8); the SQL of the migration
/// has already summed patrons' days.
pub(super) fn after_migration_8(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(
        "SELECT request_id, at, day, institution_id, site_id, group_id, key_id,
            patron_ref, model, prompt_tokens, completion_tokens, cost_nano_usd, cached,
            estimated, status, latency_ms
         FROM usage_records ORDER BY request_id",
    )?;
    let rows = stmt.query_map([], |r| {
        let status: String = r.get(14)?;
        Ok(UsageRecord {
            request_id: r.get(0)?,
            at: r.get(1)?,
            day: r.get(2)?,
            institution_id: r.get(3)?,
            site_id: r.get(4)?,
            group_id: r.get(5)?,
            key_id: r.get(6)?,
            patron_ref: r.get(7)?,
            model: r.get(8)?,
            prompt_tokens: r.get::<_, i64>(9)?.max(0) as u64,
            completion_tokens: r.get::<_, i64>(10)?.max(0) as u64,
            cost_nano_usd: r.get(11)?,
            saved_nano_usd: 0,
            cached: r.get(12)?,
            estimated: r.get(13)?,
            status: UsageStatus::parse(&status),
            latency_ms: r.get::<_, i64>(15)?.max(0) as u64,
        })
    })?;
    // A batch at a time, so a large ledger does not have to fit in memory.
    let mut chunk = Vec::with_capacity(4096);
    for record in rows {
        chunk.push(record?);
        if chunk.len() == chunk.capacity() {
            insert_batch(tx, &chunk)?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        insert_batch(tx, &chunk)?;
    }
    drop(stmt);
    tx.execute_batch("DROP TABLE usage_records;")?;
    Ok(())
}

/// Writes `records` as one `usage_batches` row; `first_at` and `last_at` bound the records'
/// times, for retention by age.
fn insert_batch(tx: &Connection, records: &[UsageRecord]) -> Result<(), StoreError> {
    let (first_at, last_at) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
        (lo.min(r.at), hi.max(r.at))
    });
    tx.prepare_cached(
        "INSERT INTO usage_batches (first_at, last_at, records, data) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        first_at,
        last_at,
        records.len() as i64,
        encode_batch(records)
    ])?;
    Ok(())
}

/// Format of a batch: this byte, then each record in turn. Format 2 added `saved_nano_usd`
/// after the cost; format 1 batches (written before it) still decode, saving nothing.
const BATCH_FORMAT: u8 = 2;

/// Encodes records for one `usage_batches` row. Each record is its strings (LEB128 length,
/// then UTF-8; an optional one stores length + 1, or 0 for none), its numbers as LEB128
/// (signed ones zigzagged), and a flags byte (status in bits 0–1, estimated, cached).
pub fn encode_batch(records: &[UsageRecord]) -> Vec<u8> {
    encode_records(records, true)
}

/// [`encode_batch`], leaving every patron reference out when `patrons` is false.
pub(super) fn encode_records(records: &[UsageRecord], patrons: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + records.len() * 128);
    out.push(BATCH_FORMAT);
    for r in records {
        for s in [
            r.request_id.as_str(),
            r.day.as_str(),
            &r.institution_id,
            &r.key_id,
            &r.model,
        ] {
            put_uint(&mut out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        let patron = if patrons { &r.patron_ref } else { &None };
        for s in [&r.site_id, &r.group_id, patron] {
            match s {
                None => out.push(0),
                Some(s) => {
                    put_uint(&mut out, s.len() as u64 + 1);
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        put_uint(&mut out, zigzag(r.at));
        put_uint(&mut out, r.prompt_tokens);
        put_uint(&mut out, r.completion_tokens);
        put_uint(&mut out, r.latency_ms);
        put_uint(&mut out, zigzag(r.cost_nano_usd));
        put_uint(&mut out, zigzag(r.saved_nano_usd));
        out.push(r.status.code() | u8::from(r.estimated) << 2 | u8::from(r.cached) << 3);
    }
    out
}

/// Decodes what [`encode_batch`] wrote.
pub fn decode_batch(data: &[u8]) -> Result<Vec<UsageRecord>, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("usage batch: {what}"));
    let (&format, mut rest) = data.split_first().ok_or_else(|| corrupt("empty"))?;
    if !(1..=BATCH_FORMAT).contains(&format) {
        return Err(corrupt(&format!("unknown format {format}")));
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let mut text = |optional: bool| -> Result<Option<&str>, StoreError> {
            let mut len = get_uint(&mut rest).ok_or_else(|| corrupt("truncated length"))?;
            if optional {
                if len == 0 {
                    return Ok(None);
                }
                len -= 1;
            }
            let len = usize::try_from(len)
                .ok()
                .filter(|&n| n <= rest.len())
                .ok_or_else(|| corrupt("length past the end"))?;
            let (bytes, tail) = rest.split_at(len);
            rest = tail;
            let s = std::str::from_utf8(bytes).map_err(|_| corrupt("text is not UTF-8"))?;
            Ok(Some(s))
        };
        let mut required = || -> Result<&str, StoreError> { Ok(text(false)?.unwrap_or_default()) };
        let (request_id, day) = (required()?.to_owned(), required()?.to_owned());
        let (institution_id, key_id, model) =
            (required()?.into(), required()?.into(), required()?.into());
        let mut optional =
            || -> Result<Option<Arc<str>>, StoreError> { Ok(text(true)?.map(Arc::from)) };
        let (site_id, group_id, patron_ref) = (optional()?, optional()?, optional()?);
        let mut num = || get_uint(&mut rest).ok_or_else(|| corrupt("truncated number"));
        let at = unzigzag(num()?);
        let (prompt_tokens, completion_tokens, latency_ms) = (num()?, num()?, num()?);
        let cost_nano_usd = unzigzag(num()?);
        let saved_nano_usd = if format >= 2 { unzigzag(num()?) } else { 0 };
        let (&flags, tail) = rest
            .split_first()
            .filter(|(flags, _)| **flags <= 0x0f)
            .ok_or_else(|| corrupt("truncated or unknown flags"))?;
        rest = tail;
        out.push(UsageRecord {
            request_id,
            at,
            day,
            institution_id,
            site_id,
            group_id,
            key_id,
            patron_ref,
            model,
            status: UsageStatus::ALL[usize::from(flags & 3)],
            prompt_tokens,
            completion_tokens,
            estimated: flags & 4 != 0,
            cached: flags & 8 != 0,
            latency_ms,
            cost_nano_usd,
            saved_nano_usd,
        });
    }
    Ok(out)
}

fn put_uint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_uint(input: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        if shift == 63 && b > 1 {
            return None; // more than 64 bits
        }
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    fn record() -> impl Strategy<Value = UsageRecord> {
        (
            (
                text(),
                any::<i64>(),
                text(),
                text(),
                proptest::option::of(text()),
            ),
            (
                proptest::option::of(text()),
                text(),
                proptest::option::of(text()),
                text(),
            ),
            (
                0u8..4,
                any::<u64>(),
                any::<u64>(),
                any::<bool>(),
                any::<bool>(),
            ),
            (any::<u64>(), any::<i64>(), any::<i64>()),
        )
            .prop_map(
                |(
                    (request_id, at, day, institution_id, site_id),
                    (group_id, key_id, patron_ref, model),
                    (status, prompt_tokens, completion_tokens, estimated, cached),
                    (latency_ms, cost_nano_usd, saved_nano_usd),
                )| UsageRecord {
                    request_id,
                    at,
                    day,
                    institution_id: institution_id.into(),
                    site_id: site_id.map(Into::into),
                    group_id: group_id.map(Into::into),
                    key_id: key_id.into(),
                    patron_ref: patron_ref.map(Into::into),
                    model: model.into(),
                    status: UsageStatus::ALL[usize::from(status)],
                    prompt_tokens,
                    completion_tokens,
                    estimated,
                    cached,
                    latency_ms,
                    cost_nano_usd,
                    saved_nano_usd,
                },
            )
    }

    proptest! {
        #[test]
        fn batches_decode_to_what_was_encoded(records in proptest::collection::vec(record(), 0..20)) {
            let data = encode_batch(&records);
            prop_assert_eq!(decode_batch(&data).unwrap(), records);
        }

        #[test]
        fn a_cut_or_damaged_batch_is_an_error_not_a_panic(
            records in proptest::collection::vec(record(), 1..5),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let data = encode_batch(&records);
            let at = cut.index(data.len() - 1) + 1;
            // Cut short: an error, unless the cut fell between two records.
            if let Ok(got) = decode_batch(&data[..at]) {
                prop_assert!(got.len() < records.len());
                prop_assert_eq!(&got[..], &records[..got.len()]);
            }
            let mut damaged = data.clone();
            damaged[flip.index(data.len())] ^= 0xff;
            let _ = decode_batch(&damaged);
        }
    }

    /// A batch written before savings were recorded (format 1, in a view or a journal made by
    /// an older Carrel) still reads, saving nothing.
    #[test]
    fn a_format_1_batch_still_decodes() {
        let record = UsageRecord {
            request_id: "req_1".into(),
            at: 1_796_000_000,
            day: "2026-12-07".into(),
            institution_id: "inst_1".into(),
            key_id: "key_1".into(),
            model: "m".into(),
            prompt_tokens: 7,
            completion_tokens: 5,
            cost_nano_usd: 4_050,
            cached: true,
            ..UsageRecord::default()
        };
        let v2 = encode_batch(std::slice::from_ref(&record));
        // Format 1 is format 2 without the saved amount (one zero byte before the flags).
        let (flags, rest) = v2.split_last().unwrap();
        assert_eq!(rest.last(), Some(&0));
        let mut v1 = vec![1];
        v1.extend_from_slice(&rest[1..rest.len() - 1]);
        v1.push(*flags);
        assert_eq!(decode_batch(&v1).unwrap(), [record]);
        assert!(
            decode_batch(&[3]).is_err(),
            "a later format is not guessed at"
        );
    }

    #[test]
    fn numbers_take_their_full_range() {
        for n in [0, 1, 127, 128, u64::MAX] {
            let mut out = Vec::new();
            put_uint(&mut out, n);
            assert_eq!(get_uint(&mut &out[..]), Some(n));
        }
        for n in [0, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(n)), n);
        }
        // An eleventh byte, or a tenth that carries more than the 64th bit, is refused.
        assert_eq!(get_uint(&mut &[0xff; 11][..]), None);
        assert_eq!(
            get_uint(&mut &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]),
            None
        );
        assert_eq!(
            decode_batch(&[9]).unwrap_err().to_string(),
            "corrupt record: usage batch: unknown format 9"
        );
    }
}
