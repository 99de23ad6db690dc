//! The usage ledger: one row per request forwarded upstream, counted in the institution's local
//! days. Rows carry ids and numbers only — never prompt text, never who the patron was.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{Store, StoreError};
use crate::domain::UsageGroupBy;

/// What one forwarded request used. `request_id` makes recording idempotent: the same record
/// written twice counts once.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// The gateway's request id.
    pub request_id: String,
    /// Unix seconds when the response ended.
    pub at: i64,
    /// The institution's local date (`YYYY-MM-DD`) at `at`.
    pub day: String,
    /// The institution that pays.
    pub institution_id: String,
    /// The key's site, if any.
    pub site_id: Option<String>,
    /// The key's group, if any.
    pub group_id: Option<String>,
    /// The API key.
    pub key_id: String,
    /// Public model name.
    pub model: String,
    /// HTTP status the upstream answered with.
    pub status: u16,
    /// Prompt tokens, as the upstream reported them (0 when it did not).
    pub prompt_tokens: u64,
    /// Completion tokens, as the upstream reported them (0 when it did not).
    pub completion_tokens: u64,
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
    /// Appends usage records in one transaction; a record whose request id is already in the
    /// ledger is skipped. Returns how many were new.
    pub async fn record_usage(&self, records: Vec<UsageRecord>) -> Result<usize, StoreError> {
        self.call(move |c| insert_usage(c, &records)).await
    }

    /// [`Store::record_usage`] for a thread of its own (the ledger writer), outside any runtime.
    pub fn record_usage_blocking(&self, records: &[UsageRecord]) -> Result<usize, StoreError> {
        self.blocking(|c| insert_usage(c, records))
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
        // A closed set of column names, never caller text.
        let column = match group_by {
            UsageGroupBy::Day => "day",
            UsageGroupBy::Site => "site_id",
            UsageGroupBy::Group => "group_id",
            UsageGroupBy::Key => "key_id",
            UsageGroupBy::Model => "model",
        };
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens),
                    SUM(cost_nano_usd)
                 FROM usage_events WHERE institution_id = ?1 AND day >= ?2 AND day <= ?3
                 GROUP BY {column} ORDER BY {column}"
            ))?;
            let rows = stmt.query_map(params![inst, from, to], |r| {
                let prompt: i64 = r.get(2)?;
                let completion: i64 = r.get(3)?;
                let cost: i64 = r.get(4)?;
                Ok(UsageLine {
                    group: r.get(0)?,
                    requests: r.get::<_, i64>(1)? as u64,
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

fn insert_usage(c: &mut Connection, records: &[UsageRecord]) -> Result<usize, StoreError> {
    let tx = c.transaction()?;
    let mut added = 0;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO usage_events (request_id, at, day, institution_id, site_id,
                group_id, key_id, model, status, prompt_tokens, completion_tokens, cost_nano_usd)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        for r in records {
            added += stmt.execute(params![
                r.request_id,
                r.at,
                r.day,
                r.institution_id,
                r.site_id,
                r.group_id,
                r.key_id,
                r.model,
                r.status,
                saturating_i64(r.prompt_tokens),
                saturating_i64(r.completion_tokens),
                r.cost_nano_usd
            ])?;
        }
    }
    tx.commit()?;
    Ok(added)
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
