//! Sponsor pools: money a funder (a state library, a foundation) puts up for chosen
//! institutions' use, and its ledger of top-ups and draws.
//!
//! # The order of payment
//!
//! An institution's spend of a local day is paid first by the sponsor pools it is a member of,
//! in the order it joined them, each up to the pool's balance and the member's monthly cap, and
//! each only for days from the one it joined on (UTC date); what they do not cover is the
//! institution's own spend. Settling (hourly, or at once through the admin API) pays each day
//! the difference between its spend so far and what pools already paid for it, so a day settled
//! while it runs, or usage that reaches the ledger late, is paid when the next settlement sees
//! it, and settling again with nothing new pays nothing.
//!
//! What a pool paid also gives the institution room: its own `cost_per_month_usd` limit is
//! raised by the month's draws ([`Store::limits_table`] adds them), so subsidised spend does
//! not use up the institution's own budget.
//!
//! The settling replica reads each member's daily spend from its view of the ledger and writes
//! it in a command; applying the command computes the draws from the pools' ledger, which every
//! replica holds alike, so every replica records the same draws, and two replicas settling at
//! once cannot pay a day twice or overdraw a pool.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::write::WriteCtx;
use super::{Store, StoreError};

/// Migration 18: pools, their members and their ledger.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE sponsor_pools (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    funder      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE sponsor_members (
    pool_id               TEXT NOT NULL REFERENCES sponsor_pools(id),
    institution_id        TEXT NOT NULL REFERENCES institutions(id),
    monthly_cap_nano_usd  INTEGER,
    joined_at             TEXT NOT NULL,
    PRIMARY KEY (pool_id, institution_id)
) WITHOUT ROWID;
CREATE TABLE sponsor_ledger (
    id               TEXT PRIMARY KEY,
    pool_id          TEXT NOT NULL REFERENCES sponsor_pools(id),
    kind             TEXT NOT NULL,
    amount_nano_usd  INTEGER NOT NULL,
    institution_id   TEXT,
    day              TEXT,
    note             TEXT,
    by               TEXT NOT NULL,
    at               TEXT NOT NULL
);
CREATE INDEX sponsor_draws ON sponsor_ledger (institution_id, day) WHERE kind = 'draw';
"#;

/// A pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SponsorPool {
    /// Stable id (`pool_…`).
    pub id: String,
    /// Display name, unique.
    pub name: String,
    /// Who funds it.
    pub funder: String,
    /// Top-ups less draws, in US dollars.
    pub balance_usd: f64,
    /// Its members, in the order they joined.
    pub members: Vec<SponsorMember>,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// An institution a pool subsidises.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SponsorMember {
    /// The institution.
    pub institution_id: String,
    /// Most the pool pays for it in a month, in US dollars; `null`: no cap.
    pub monthly_cap_usd: Option<f64>,
    /// RFC 3339 time it joined.
    pub joined_at: String,
}

/// One line of a pool's ledger.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SponsorEntry {
    /// Stable id.
    pub id: String,
    /// `top_up` or `draw`.
    pub kind: String,
    /// US dollars (positive for both kinds).
    pub amount_usd: f64,
    /// For a draw: the institution it paid for.
    pub institution_id: Option<String>,
    /// For a draw: the institution's local day it paid for.
    pub day: Option<String>,
    /// For a top-up: what the funder wrote.
    pub note: Option<String>,
    /// Who recorded it (a draw: `carrel`).
    pub by: String,
    /// RFC 3339 time it was recorded.
    pub at: String,
}

/// A member institution's spend on one of its local days, as the settling replica's ledger
/// has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCost {
    /// The institution.
    pub institution_id: String,
    /// Its local day.
    pub day: String,
    /// What it spent that day so far, nano-dollars.
    pub cost_nano_usd: i64,
}

pub(super) fn create_pool(
    c: &mut Connection,
    w: &mut WriteCtx,
    name: &str,
    funder: &str,
) -> Result<String, StoreError> {
    let id = w.id("pool");
    c.execute(
        "INSERT INTO sponsor_pools (id, name, funder, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![id, name, funder, w.now()],
    )
    .map_err(|e| super::unique_conflict(e, || format!("pool `{name}`")))?;
    Ok(id)
}

fn require_pool(c: &Connection, pool_id: &str) -> Result<(), StoreError> {
    let exists: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM sponsor_pools WHERE id = ?1)",
        [pool_id],
        |r| r.get(0),
    )?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!("pool `{pool_id}`")))
    }
}

pub(super) fn set_member(
    c: &mut Connection,
    w: &WriteCtx,
    pool_id: &str,
    institution_id: &str,
    monthly_cap_nano_usd: Option<i64>,
) -> Result<(), StoreError> {
    require_pool(c, pool_id)?;
    super::require_institution(c, institution_id)?;
    c.execute(
        "INSERT INTO sponsor_members (pool_id, institution_id, monthly_cap_nano_usd, joined_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (pool_id, institution_id) DO UPDATE SET
            monthly_cap_nano_usd = excluded.monthly_cap_nano_usd",
        params![pool_id, institution_id, monthly_cap_nano_usd, w.now()],
    )?;
    Ok(())
}

pub(super) fn top_up(
    c: &mut Connection,
    w: &mut WriteCtx,
    pool_id: &str,
    amount_nano_usd: i64,
    note: Option<&str>,
    by: &str,
) -> Result<(), StoreError> {
    require_pool(c, pool_id)?;
    c.execute(
        "INSERT INTO sponsor_ledger (id, pool_id, kind, amount_nano_usd, note, by, at)
         VALUES (?1, ?2, 'top_up', ?3, ?4, ?5, ?6)",
        params![w.id("spl"), pool_id, amount_nano_usd, note, by, w.now()],
    )?;
    Ok(())
}

/// Pays `days` from the members' pools, in the documented order: each day what its spend is
/// beyond what pools already paid for it. Returns the draws recorded.
pub(super) fn settle_days(
    c: &mut Connection,
    w: &mut WriteCtx,
    days: &[DayCost],
) -> Result<usize, StoreError> {
    let tx = c.savepoint()?;
    let mut balance = balances(&tx)?;
    let mut drawn = drawn_by_pool_member_month(&tx)?;
    let mut n = 0;
    {
        let mut paid_stmt = tx.prepare_cached(
            "SELECT COALESCE(SUM(amount_nano_usd), 0) FROM sponsor_ledger
             WHERE kind = 'draw' AND institution_id = ?1 AND day = ?2",
        )?;
        let mut members_stmt = tx.prepare_cached(
            "SELECT pool_id, monthly_cap_nano_usd FROM sponsor_members
             WHERE institution_id = ?1 AND substr(joined_at, 1, 10) <= ?2
             ORDER BY joined_at, pool_id",
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO sponsor_ledger
                (id, pool_id, kind, amount_nano_usd, institution_id, day, by, at)
             VALUES (?1, ?2, 'draw', ?3, ?4, ?5, 'carrel', ?6)",
        )?;
        for d in days {
            let paid: i64 = paid_stmt.query_row(params![d.institution_id, d.day], |r| r.get(0))?;
            let mut due = d.cost_nano_usd - paid;
            if due <= 0 {
                continue;
            }
            let month = d.day.get(..7).unwrap_or_default().to_owned();
            let pools: Vec<(String, Option<i64>)> = members_stmt
                .query_map(params![d.institution_id, d.day], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<Result<_, _>>()?;
            for (pool, cap) in pools {
                if due == 0 {
                    break;
                }
                let key = (pool.clone(), d.institution_id.clone(), month.clone());
                let used = drawn.get(&key).copied().unwrap_or(0);
                let room = cap.map_or(i64::MAX, |cap| (cap - used).max(0));
                let have = balance.get(&pool).copied().unwrap_or(0).max(0);
                let amount = due.min(room).min(have);
                if amount > 0 {
                    due -= amount;
                    *balance.entry(pool.clone()).or_default() -= amount;
                    *drawn.entry(key).or_default() += amount;
                    insert.execute(params![
                        w.id("spl"),
                        pool,
                        amount,
                        d.institution_id,
                        d.day,
                        w.now()
                    ])?;
                    n += 1;
                }
            }
        }
    }
    tx.commit()?;
    Ok(n)
}

/// Each pool's balance, in nano-dollars.
fn balances(c: &Connection) -> Result<HashMap<String, i64>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT p.id, COALESCE(SUM(CASE l.kind WHEN 'top_up' THEN l.amount_nano_usd
                                               ELSE -l.amount_nano_usd END), 0)
         FROM sponsor_pools p LEFT JOIN sponsor_ledger l ON l.pool_id = p.id
         GROUP BY p.id",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What pools drew for each institution in each month (`YYYY-MM`), in nano-dollars.
pub(super) fn drawn_by_month(c: &Connection) -> Result<HashMap<(String, String), i64>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT institution_id, substr(day, 1, 7), SUM(amount_nano_usd) FROM sponsor_ledger
         WHERE kind = 'draw' GROUP BY institution_id, substr(day, 1, 7)",
    )?;
    let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Member institutions' spend on each of their days from `first_day` to `last_day` (local
/// dates), oldest first.
pub(super) fn member_days(
    c: &Connection,
    first_day: &str,
    last_day: &str,
) -> Result<Vec<DayCost>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT institution_id, day, SUM(cost_nano_usd) FROM usage_daily
         WHERE institution_id IN (SELECT institution_id FROM sponsor_members)
           AND day >= ?1 AND day <= ?2
         GROUP BY institution_id, day ORDER BY day, institution_id",
    )?;
    let days = stmt.query_map(params![first_day, last_day], |r| {
        Ok(DayCost {
            institution_id: r.get(0)?,
            day: r.get(1)?,
            cost_nano_usd: r.get(2)?,
        })
    })?;
    Ok(days.collect::<Result<_, _>>()?)
}

/// What each pool drew for each member in each month.
fn drawn_by_pool_member_month(
    c: &Connection,
) -> Result<HashMap<(String, String, String), i64>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT pool_id, institution_id, substr(day, 1, 7), SUM(amount_nano_usd)
         FROM sponsor_ledger WHERE kind = 'draw'
         GROUP BY pool_id, institution_id, substr(day, 1, 7)",
    )?;
    let rows = stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get(3)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl Store {
    /// Creates a pool; returns it.
    pub async fn create_sponsor_pool(
        &self,
        name: &str,
        funder: &str,
    ) -> Result<SponsorPool, StoreError> {
        let id: String = self
            .write(super::write::Command::CreateSponsorPool {
                name: name.to_owned(),
                funder: funder.to_owned(),
            })
            .await?;
        self.sponsor_pool(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("pool `{id}`")))
    }

    /// Adds an institution to a pool, or changes its monthly cap.
    pub async fn set_sponsor_member(
        &self,
        pool_id: &str,
        institution_id: &str,
        monthly_cap_nano_usd: Option<i64>,
    ) -> Result<(), StoreError> {
        self.write(super::write::Command::SetSponsorMember {
            pool_id: pool_id.to_owned(),
            institution_id: institution_id.to_owned(),
            monthly_cap_nano_usd,
        })
        .await
    }

    /// Adds money to a pool.
    pub async fn top_up_sponsor_pool(
        &self,
        pool_id: &str,
        amount_nano_usd: i64,
        note: Option<String>,
        by: &str,
    ) -> Result<(), StoreError> {
        self.write(super::write::Command::TopUpSponsorPool {
            pool_id: pool_id.to_owned(),
            amount_nano_usd,
            note,
            by: by.to_owned(),
        })
        .await
    }

    /// Pays member institutions' days from `first_day` to `last_day` (local dates) from their
    /// pools, in the documented order. Returns the draws recorded.
    pub async fn settle_sponsor_draws(
        &self,
        first_day: &str,
        last_day: &str,
    ) -> Result<usize, StoreError> {
        let (first, last) = (first_day.to_owned(), last_day.to_owned());
        let days = self.call(move |c| member_days(c, &first, &last)).await?;
        if days.is_empty() {
            return Ok(0);
        }
        self.write(super::write::Command::SettleSponsorDays { days })
            .await
    }

    /// One pool, with its balance and members.
    pub async fn sponsor_pool(&self, id: &str) -> Result<Option<SponsorPool>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            let Some((name, funder, created_at)) = c
                .query_row(
                    "SELECT name, funder, created_at FROM sponsor_pools WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?
            else {
                return Ok(None);
            };
            let balance = balances(c)?.get(&id).copied().unwrap_or(0);
            let mut stmt = c.prepare_cached(
                "SELECT institution_id, monthly_cap_nano_usd, joined_at FROM sponsor_members
                 WHERE pool_id = ?1 ORDER BY joined_at, institution_id",
            )?;
            let members = stmt
                .query_map([&id], |r| {
                    Ok(SponsorMember {
                        institution_id: r.get(0)?,
                        monthly_cap_usd: r.get::<_, Option<i64>>(1)?.map(|n| n as f64 / 1e9),
                        joined_at: r.get(2)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(SponsorPool {
                id,
                name,
                funder,
                balance_usd: balance as f64 / 1e9,
                members,
                created_at,
            }))
        })
        .await
    }

    /// Every pool's id, oldest first.
    pub async fn sponsor_pool_ids(&self) -> Result<Vec<String>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare_cached("SELECT id FROM sponsor_pools ORDER BY rowid")?;
            let ids = stmt.query_map([], |r| r.get(0))?;
            Ok(ids.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// A pool's ledger, oldest first.
    pub async fn sponsor_ledger(&self, pool_id: &str) -> Result<Vec<SponsorEntry>, StoreError> {
        let pool_id = pool_id.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, kind, amount_nano_usd, institution_id, day, note, by, at
                 FROM sponsor_ledger WHERE pool_id = ?1 ORDER BY rowid",
            )?;
            let rows = stmt.query_map([&pool_id], |r| {
                Ok(SponsorEntry {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    amount_usd: r.get::<_, i64>(2)? as f64 / 1e9,
                    institution_id: r.get(3)?,
                    day: r.get(4)?,
                    note: r.get(5)?,
                    by: r.get(6)?,
                    at: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
