//! Retention of patrons' usage metadata: per-request records name a patron (by keyed-hash
//! reference) for the institution's window only (24 hours by default, at most 7 days); after
//! it the reference is removed from the record, which stays, anonymous, for the institution's
//! reports. Patrons' daily sums (what their daily allotment counts) are rolled into a count of
//! patrons per institution and day, and deleted, once their day is over everywhere.
//!
//! This pass keeps each replica's view to the window. On the Redis backend the shared usage
//! stream never holds a patron reference: they travel beside it in keys that Redis deletes
//! when the window ends ([`super::replica`]).

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::usage::{decode_batch, encode_batch};
use super::{Store, StoreError};

/// Migration 13: each institution's window for patrons' usage metadata; which usage batches
/// have no patron references left; patrons served per day.
pub(super) const MIGRATION: &str = r#"
ALTER TABLE institutions ADD COLUMN patron_retention_hours INTEGER NOT NULL DEFAULT 24;
ALTER TABLE usage_batches ADD COLUMN patrons_cleared INTEGER NOT NULL DEFAULT 0;
CREATE TABLE patron_counts (
    institution_id  TEXT NOT NULL,
    day             TEXT NOT NULL,
    patrons         INTEGER NOT NULL,
    PRIMARY KEY (institution_id, day)
) WITHOUT ROWID;
"#;

/// The default window, in hours.
pub const DEFAULT_PATRON_RETENTION_HOURS: u32 = 24;
/// The longest window an institution may set, in hours (7 days).
pub const MAX_PATRON_RETENTION_HOURS: u32 = 7 * 24;

/// The default window, in seconds.
pub(super) const DEFAULT_WINDOW: i64 = DEFAULT_PATRON_RETENTION_HOURS as i64 * 3600;
/// The shortest window an institution may set, in seconds: what an institution whose window
/// is not known gets, so that not knowing never keeps a patron longer.
pub(super) const SHORTEST_WINDOW: i64 = 3600;

/// Each institution's window, in seconds.
pub(super) fn windows(c: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = c.prepare_cached("SELECT id, patron_retention_hours FROM institutions")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? * 3600)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What one pass of [`Store::forget_patrons_blocking`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// Records whose patron reference was removed.
    pub references: u64,
    /// Patrons' daily sums rolled up and deleted.
    pub daily_sums: u64,
}

impl Store {
    /// Removes patron references from usage records older than their institution's window,
    /// and rolls patrons' daily sums of days over everywhere (two days ago in UTC and before:
    /// no time zone is that far behind) into `patron_counts`. Run by the ledger's writer.
    pub fn forget_patrons_blocking(&self, now: i64) -> Result<Forgotten, StoreError> {
        self.blocking(move |c| {
            let tx = c.transaction()?;
            let windows = windows(&tx)?;
            let shortest = windows
                .values()
                .copied()
                .min()
                .unwrap_or(DEFAULT_WINDOW)
                .max(3600);
            let longest = i64::from(MAX_PATRON_RETENTION_HOURS) * 3600;
            let mut done = Forgotten::default();
            let batches: Vec<(i64, i64, Vec<u8>)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT seq, last_at, data FROM usage_batches
                     WHERE patrons_cleared = 0 AND first_at < ?1",
                )?;
                let rows =
                    stmt.query_map([now - shortest], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            for (seq, last_at, data) in batches {
                let mut records = decode_batch(&data)?;
                let mut changed = 0;
                let mut left = 0;
                for r in &mut records {
                    if r.patron_ref.is_none() {
                        continue;
                    }
                    let window = windows
                        .get(&*r.institution_id)
                        .copied()
                        .unwrap_or(DEFAULT_WINDOW);
                    if r.at < now - window {
                        r.patron_ref = None;
                        changed += 1;
                    } else {
                        left += 1;
                    }
                }
                let cleared = left == 0 || last_at < now - longest;
                if changed > 0 {
                    tx.execute(
                        "UPDATE usage_batches SET data = ?2, patrons_cleared = ?3 WHERE seq = ?1",
                        params![seq, encode_batch(&records), cleared],
                    )?;
                } else if cleared {
                    tx.execute(
                        "UPDATE usage_batches SET patrons_cleared = 1 WHERE seq = ?1",
                        [seq],
                    )?;
                }
                done.references += changed;
            }
            let before = crate::domain::last_day_over_everywhere(now).to_string();
            tx.execute(
                "INSERT INTO patron_counts (institution_id, day, patrons)
                 SELECT institution_id, day, COUNT(*) FROM patron_daily WHERE day <= ?1
                 GROUP BY institution_id, day
                 ON CONFLICT (institution_id, day) DO UPDATE SET
                    patrons = patrons + excluded.patrons",
                [&before],
            )?;
            done.daily_sums =
                tx.execute("DELETE FROM patron_daily WHERE day <= ?1", [&before])? as u64;
            tx.commit()?;
            Ok(done)
        })
    }

    /// Patrons served per day (from the rolled-up counts), for reports.
    pub async fn patron_counts(
        &self,
        institution_id: &str,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT day, patrons FROM patron_counts WHERE institution_id = ?1 ORDER BY day",
            )?;
            let rows = stmt.query_map([inst], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::{InstitutionKind, unix_now};
    use crate::store::{InstitutionPatch, NewInstitution, UsageRecord, UsageStatus};

    fn record(inst: &str, at: i64, day: &str, patron: &str) -> UsageRecord {
        UsageRecord {
            request_id: format!("req_{inst}_{at}"),
            at,
            day: day.to_owned(),
            institution_id: inst.into(),
            site_id: None,
            group_id: None,
            key_id: "key".into(),
            patron_ref: Some(Arc::from(patron)),
            model: "m".into(),
            status: UsageStatus::Complete,
            prompt_tokens: 10,
            completion_tokens: 5,
            estimated: false,
            cached: false,
            latency_ms: 1,
            cost_nano_usd: 0,
            saved_nano_usd: 0,
        }
    }

    #[tokio::test]
    async fn patrons_are_forgotten_after_their_institution_s_window() {
        let store = Store::open_in_memory().unwrap();
        let mut ids = Vec::new();
        for name in ["Short", "Long"] {
            let inst = store
                .create_institution(NewInstitution {
                    name: name.into(),
                    kind: InstitutionKind::Library,
                    region: "US-IL".into(),
                    timezone: "UTC".into(),
                    sector: None,
                })
                .await
                .unwrap();
            ids.push(inst.id);
        }
        let (short, long) = (&ids[0], &ids[1]);
        assert_eq!(
            store
                .get_institution(short)
                .await
                .unwrap()
                .unwrap()
                .patron_retention_hours,
            24
        );
        store
            .update_institution(
                long,
                InstitutionPatch {
                    patron_retention_hours: Some(72),
                    ..InstitutionPatch::default()
                },
            )
            .await
            .unwrap();
        // Noon UTC today: which days are over everywhere (two days ago in UTC and before)
        // must not depend on the hour the test runs at.
        let now = {
            let today = jiff::Timestamp::from_second(unix_now())
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date();
            today
                .at(12, 0, 0, 0)
                .to_zoned(jiff::tz::TimeZone::UTC)
                .unwrap()
                .timestamp()
                .as_second()
        };
        let day = |secs_ago: i64| {
            jiff::Timestamp::from_second(now - secs_ago)
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::UTC)
                .date()
                .to_string()
        };
        let hour = 3600;
        store
            .record_usage(vec![
                record(short, now - 25 * hour, &day(25 * hour), "pat_a"),
                record(short, now - hour, &day(hour), "pat_b"),
                record(long, now - 25 * hour, &day(25 * hour), "pat_c"),
                record(long, now - 73 * hour, &day(73 * hour), "pat_d"),
            ])
            .await
            .unwrap();
        let done = store.forget_patrons_blocking(now).unwrap();
        assert_eq!(
            done.references, 2,
            "pat_a (past 24 h) and pat_d (past 72 h)"
        );
        let named = |inst: &str| {
            let store = store.clone();
            let inst = inst.to_owned();
            async move {
                let mut refs: Vec<Option<String>> = store
                    .usage_records(&inst, 10)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.patron_ref.map(|p| p.to_string()))
                    .collect();
                refs.sort();
                refs
            }
        };
        assert_eq!(named(short).await, [None, Some("pat_b".into())]);
        assert_eq!(named(long).await, [None, Some("pat_c".into())]);
        // The daily sum of three days ago is rolled into a count and deleted; the others stay.
        assert_eq!(done.daily_sums, 1);
        assert_eq!(
            store.patron_counts(long).await.unwrap(),
            [(day(73 * hour), 1)]
        );
        // Nothing more to do until time passes.
        assert_eq!(
            store.forget_patrons_blocking(now).unwrap(),
            Forgotten::default()
        );
        let later = store.forget_patrons_blocking(now + 2 * 86_400).unwrap();
        assert_eq!(later.references, 2);
    }
}
