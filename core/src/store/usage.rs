//! The usage ledger: one record per forwarded request (`usage_records`), and the daily sums by
//! key (with its site and group) and model that reports read (`usage_daily`). Records hold ids
//! and numbers only — never prompt text, and a patron only as a keyed-hash reference.
//!
//! Writers hand over [`UsageRecord`]s in batches; [`Store::record_usage`] writes a batch in one
//! transaction (group commit). A record is idempotent by its request id: one written twice (a
//! replay) is ignored, and only records written for the first time are added to the sums.

use std::collections::HashMap;

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{Store, StoreError};
use crate::domain::UsageGroupBy;

/// How a forwarded request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStatus {
    /// The response reached its end.
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

/// What one forwarded request used.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// The request id; a record is written once per id.
    pub request_id: String,
    /// Unix seconds when the response ended.
    pub at: i64,
    /// The institution's local date (`YYYY-MM-DD`) when the response ended.
    pub day: String,
    /// The institution that pays.
    pub institution_id: String,
    /// The key's site, if any.
    pub site_id: Option<String>,
    /// The key's group, if any.
    pub group_id: Option<String>,
    /// The API key.
    pub key_id: String,
    /// The patron reference, when a patron made the request.
    pub patron_ref: Option<String>,
    /// Public model name.
    pub model: String,
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
}

impl Store {
    /// Adds usage records to the ledger in one transaction. Returns how many were new (a
    /// record whose request id is already there is ignored).
    pub async fn record_usage(&self, records: Vec<UsageRecord>) -> Result<usize, StoreError> {
        self.call(move |c| insert_usage(c, &records)).await
    }

    /// [`Store::record_usage`] for a thread of its own (the ledger writer), outside any runtime.
    pub fn record_usage_blocking(&self, records: &[UsageRecord]) -> Result<usize, StoreError> {
        self.blocking(|c| insert_usage(c, records))
    }

    /// An institution's per-request records, oldest first (request ids sort by time), at most
    /// `limit`.
    pub async fn usage_records(
        &self,
        institution_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT request_id, at, day, institution_id, site_id, group_id, key_id,
                    patron_ref, model, prompt_tokens, completion_tokens, cost_nano_usd, cached,
                    estimated, status, latency_ms
                 FROM usage_records WHERE institution_id = ?1 ORDER BY request_id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![inst, limit], |r| {
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
                    cached: r.get(12)?,
                    estimated: r.get(13)?,
                    status: UsageStatus::parse(&status),
                    latency_ms: r.get::<_, i64>(15)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
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
                    SUM(completion_tokens), SUM(cost_nano_usd)
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
}

fn insert_usage(c: &mut Connection, records: &[UsageRecord]) -> Result<usize, StoreError> {
    let tx = c.transaction()?;
    let mut fresh = Vec::with_capacity(records.len());
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO usage_records (request_id, at, day, institution_id, site_id,
                group_id, key_id, patron_ref, model, prompt_tokens, completion_tokens,
                cost_nano_usd, cached, estimated, status, latency_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        for r in records {
            let added = stmt.execute(params![
                r.request_id,
                r.at,
                r.day,
                r.institution_id,
                r.site_id,
                r.group_id,
                r.key_id,
                r.patron_ref,
                r.model,
                saturating_i64(r.prompt_tokens),
                saturating_i64(r.completion_tokens),
                r.cost_nano_usd,
                r.cached,
                r.estimated,
                r.status.as_str(),
                saturating_i64(r.latency_ms)
            ])?;
            if added == 1 && r.status != UsageStatus::UpstreamError {
                fresh.push(r);
            }
        }
    }
    // Fold the new records: one upsert per row of the daily sums they touch.
    let mut rows: HashMap<[&str; 6], Sums> = HashMap::new();
    for r in fresh.iter().copied() {
        let row = [
            r.institution_id.as_str(),
            r.day.as_str(),
            r.key_id.as_str(),
            r.model.as_str(),
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
    }
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO usage_daily (institution_id, day, key_id, model, site_id, group_id,
                requests, incomplete, prompt_tokens, completion_tokens, cost_nano_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (institution_id, day, key_id, model, site_id, group_id) DO UPDATE SET
                requests = requests + excluded.requests,
                incomplete = incomplete + excluded.incomplete,
                prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                completion_tokens = completion_tokens + excluded.completion_tokens,
                cost_nano_usd = cost_nano_usd + excluded.cost_nano_usd",
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
                s.cost_nano_usd
            ])?;
        }
    }
    tx.commit()?;
    Ok(fresh.len())
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
