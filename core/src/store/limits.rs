//! Limits by level, the carving rule enforced where they are written, the usage of the current
//! periods (to seed the quota engine at start), and patrons' extensions and day resets.

use rusqlite::{Connection, OptionalExtension, params};

use super::write::{Command, WriteCtx};
use super::{Store, StoreError, get_key};
use crate::quota::limits::{check_carving, check_range};
use crate::quota::{Level, LimitKind, Limits, LimitsPatch, LimitsTable};

/// Stored columns, in [`LimitKind::ALL`] order.
const COLUMNS: [&str; 6] = [
    "requests_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "cost_per_month_nano_usd",
    "concurrent_streams",
    "patron_tokens_per_day",
];

fn column(kind: LimitKind) -> &'static str {
    COLUMNS[kind as usize]
}

/// What one level used in the current day and month, from the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodUsage {
    /// The level.
    pub level: Level,
    /// Its id.
    pub id: String,
    /// Tokens today.
    pub day_tokens: u64,
    /// Tokens this month.
    pub month_tokens: u64,
    /// Cost this month, nano-dollars.
    pub month_cost_nano_usd: u64,
}

/// A time-boxed addition to a patron's daily allotment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PatronExtension {
    /// Extension id (`ext_…`).
    pub id: String,
    /// The institution.
    pub institution_id: String,
    /// The patron reference (a keyed hash; never the card or user id itself).
    pub patron_ref: String,
    /// Tokens added to today's allotment.
    pub tokens: u64,
    /// Unix seconds when it lapses.
    pub expires_at: i64,
    /// Who granted it (`user:<id>`, `token:<id>` or `operator`).
    pub created_by: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

impl Store {
    /// The limits set on one level (none set: all `None`).
    pub async fn limits(&self, level: Level, id: &str) -> Result<Limits, StoreError> {
        let id = id.to_owned();
        self.call(move |c| read_limits(c, level, &id)).await
    }

    /// Applies `patch` to one level's limits, checking ranges and the carving rule against
    /// the parent and the children in the same transaction. Returns the limits now in force.
    pub async fn set_limits(
        &self,
        level: Level,
        id: &str,
        patch: LimitsPatch,
    ) -> Result<Limits, StoreError> {
        check_range(&patch)?;
        let id = id.to_owned();
        self.write(Command::SetLimits { level, id, patch }).await
    }

    /// The institution a site, group or key belongs to (`None` when there is no such record;
    /// an institution is its own).
    pub async fn owner(&self, level: Level, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            Ok(match level {
                Level::Institution => super::get_institution(c, &id)?.map(|i| i.id),
                Level::Key => get_key(c, &id)?.map(|k| k.institution_id),
                Level::Site | Level::Group => parent_of(c, level, &id)?.map(|(_, inst)| inst),
                Level::Model | Level::Patron => None,
            })
        })
        .await
    }

    /// Every limit, for the quota engine.
    pub async fn limits_table(&self) -> Result<LimitsTable, StoreError> {
        self.call(|c| {
            let drawn = super::sponsors::drawn_by_month(c)?;
            let mut stmt = c.prepare(&format!(
                "SELECT level, id, {} FROM limits",
                COLUMNS.join(", ")
            ))?;
            let mut rows = stmt.query([])?;
            let mut table = LimitsTable::default();
            while let Some(r) = rows.next()? {
                let level: String = r.get(0)?;
                let Some(level) = level_from(&level) else {
                    return Err(StoreError::Corrupt(format!("limits.level `{level}`")));
                };
                let id: String = r.get(1)?;
                let mut limits = limits_row(r, 2)?;
                if level == Level::Institution
                    && let Some(cap) = limits.cost_per_month_nano_usd
                {
                    // What sponsor pools paid this month gives the institution that much room
                    // in its own money budget (see `sponsors`).
                    let timezone: Option<String> = c
                        .query_row(
                            "SELECT timezone FROM institutions WHERE id = ?1",
                            [&id],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if let Some(tz) = timezone {
                        let month = crate::domain::local_date(crate::domain::unix_now(), &tz)
                            .to_string()[..7]
                            .to_owned();
                        let paid = drawn.get(&(id.clone(), month)).copied().unwrap_or(0);
                        limits.cost_per_month_nano_usd =
                            Some(cap.saturating_add(paid.max(0) as u64));
                    }
                }
                table.insert(level, &id, limits);
            }
            Ok(table)
        })
        .await
    }

    /// What each level of an institution used on local day `day` and in the month from
    /// `month_first` to `day` (dates as `YYYY-MM-DD`), from the ledger. Patrons' usage counts
    /// only after their last day reset.
    pub async fn period_usage(
        &self,
        institution_id: &str,
        day: &str,
        month_first: &str,
    ) -> Result<Vec<PeriodUsage>, StoreError> {
        let (inst, day, first) = (
            institution_id.to_owned(),
            day.to_owned(),
            month_first.to_owned(),
        );
        self.call(move |c| {
            let mut out = Vec::new();
            // A closed set of column expressions, never caller text.
            for (level, col) in [
                (Level::Institution, "institution_id"),
                (Level::Site, "NULLIF(site_id, '')"),
                (Level::Group, "NULLIF(group_id, '')"),
                (Level::Key, "key_id"),
                (Level::Model, "model"),
            ] {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {col} AS g,
                        SUM(CASE WHEN day = ?2 THEN prompt_tokens + completion_tokens ELSE 0 END),
                        SUM(prompt_tokens + completion_tokens), SUM(cost_nano_usd)
                     FROM usage_daily WHERE institution_id = ?1 AND day >= ?3 AND day <= ?2
                     GROUP BY g HAVING g IS NOT NULL"
                ))?;
                let rows = stmt.query_map(params![inst, day, first], |r| {
                    Ok(PeriodUsage {
                        level,
                        id: r.get(0)?,
                        day_tokens: r.get::<_, i64>(1)?.max(0) as u64,
                        month_tokens: r.get::<_, i64>(2)?.max(0) as u64,
                        month_cost_nano_usd: r.get::<_, i64>(3)?.max(0) as u64,
                    })
                })?;
                for row in rows {
                    out.push(row?);
                }
            }
            let mut stmt = c.prepare_cached(
                "SELECT patron_ref, tokens FROM patron_daily
                 WHERE institution_id = ?1 AND day = ?2",
            )?;
            let rows = stmt.query_map(params![inst, day], |r| {
                Ok(PeriodUsage {
                    level: Level::Patron,
                    id: r.get(0)?,
                    day_tokens: r.get::<_, i64>(1)?.max(0) as u64,
                    month_tokens: 0,
                    month_cost_nano_usd: 0,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
            Ok(out)
        })
        .await
    }

    /// Grants a patron extra tokens until `expires_at` (Unix seconds).
    pub async fn add_patron_extension(
        &self,
        institution_id: &str,
        patron_ref: &str,
        tokens: u64,
        expires_at: i64,
        created_by: &str,
    ) -> Result<PatronExtension, StoreError> {
        self.write(Command::AddPatronExtension {
            institution_id: institution_id.to_owned(),
            patron_ref: patron_ref.to_owned(),
            tokens,
            expires_at,
            created_by: created_by.to_owned(),
        })
        .await
    }

    /// Extensions still running at `now` (Unix seconds), of one patron or of everyone.
    pub async fn active_extensions(
        &self,
        patron: Option<(&str, &str)>,
        now: i64,
    ) -> Result<Vec<PatronExtension>, StoreError> {
        let patron = patron.map(|(i, p)| (i.to_owned(), p.to_owned()));
        self.call(move |c| {
            let (inst, pref) = patron.unzip();
            let mut stmt = c.prepare_cached(
                "SELECT id, institution_id, patron_ref, tokens, expires_at, created_by, created_at
                 FROM patron_extensions WHERE expires_at > ?1
                   AND (?2 IS NULL OR (institution_id = ?2 AND patron_ref = ?3))
                 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![now, inst, pref], |r| {
                Ok(PatronExtension {
                    id: r.get(0)?,
                    institution_id: r.get(1)?,
                    patron_ref: r.get(2)?,
                    tokens: r.get::<_, i64>(3)?.max(0) as u64,
                    expires_at: r.get(4)?,
                    created_by: r.get(5)?,
                    created_at: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Records that a patron's local day `day` starts afresh at `at` (Unix seconds), so a
    /// restart does not count the earlier usage again.
    pub async fn reset_patron_day(
        &self,
        institution_id: &str,
        patron_ref: &str,
        day: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.write(Command::ResetPatronDay {
            institution_id: institution_id.to_owned(),
            patron_ref: patron_ref.to_owned(),
            day: day.to_owned(),
            at,
        })
        .await
    }
}

pub(super) fn set_limits(
    c: &mut Connection,
    level: Level,
    id: &str,
    patch: LimitsPatch,
) -> Result<Limits, StoreError> {
    check_range(&patch)?;
    let tx = c.savepoint()?;
    let limits = patch.apply(read_limits(&tx, level, id)?);
    let parent = parent_of(&tx, level, id)?;
    for kind in LimitKind::ALL {
        let Some(Some(value)) = patch.get(kind) else {
            continue;
        };
        if let Some((plevel, pid)) = &parent {
            let plimit = read_limits(&tx, *plevel, pid)?.get(kind);
            let others = sum_children(&tx, (*plevel, pid), level, Some(id), kind)?;
            check_carving(kind, level, *plevel, plimit, [others, value])?;
        }
        for child in child_levels(level) {
            let sum = sum_children(&tx, (level, id), *child, None, kind)?;
            check_carving(kind, *child, level, Some(value), [sum])?;
        }
    }
    write_limits(&tx, level, id, &limits)?;
    tx.commit()?;
    Ok(limits)
}

pub(super) fn add_patron_extension(
    c: &mut Connection,
    w: &mut WriteCtx,
    institution_id: String,
    patron_ref: String,
    tokens: u64,
    expires_at: i64,
    created_by: String,
) -> Result<PatronExtension, StoreError> {
    super::require_institution(c, &institution_id)?;
    let ext = PatronExtension {
        id: w.id("ext"),
        institution_id,
        patron_ref,
        tokens,
        expires_at,
        created_by,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO patron_extensions
            (id, institution_id, patron_ref, tokens, expires_at, created_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            ext.id,
            ext.institution_id,
            ext.patron_ref,
            i64::try_from(ext.tokens).unwrap_or(i64::MAX),
            ext.expires_at,
            ext.created_by,
            ext.created_at
        ],
    )?;
    Ok(ext)
}

pub(super) fn reset_patron_day(
    c: &mut Connection,
    inst: &str,
    pref: &str,
    day: &str,
    at: i64,
) -> Result<(), StoreError> {
    // One transaction: a crash never leaves the reset recorded but the day's sum standing, and
    // no ledger batch lands between the two.
    let tx = c.savepoint()?;
    super::require_institution(&tx, inst)?;
    tx.execute(
        "INSERT INTO patron_day_resets (institution_id, patron_ref, day, at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (institution_id, patron_ref, day) DO UPDATE SET at = excluded.at",
        params![inst, pref, day, at],
    )?;
    // What the ledger wrote before the reset no longer counts; what it writes later counts
    // only if it ended after the reset (see `usage::insert_usage`).
    tx.execute(
        "UPDATE patron_daily SET tokens = 0
         WHERE institution_id = ?1 AND day = ?2 AND patron_ref = ?3",
        params![inst, day, pref],
    )?;
    tx.commit()?;
    Ok(())
}

fn level_from(s: &str) -> Option<Level> {
    Level::SETTABLE
        .into_iter()
        .chain([Level::Patron])
        .find(|l| l.as_str() == s)
}

fn limits_row(r: &rusqlite::Row<'_>, at: usize) -> Result<Limits, StoreError> {
    let mut limits = Limits::default();
    for (i, kind) in LimitKind::ALL.into_iter().enumerate() {
        let v: Option<i64> = r.get(at + i)?;
        limits.set(kind, v.map(|v| v.max(0) as u64));
    }
    Ok(limits)
}

fn read_limits(c: &Connection, level: Level, id: &str) -> Result<Limits, StoreError> {
    c.query_row(
        &format!(
            "SELECT {} FROM limits WHERE level = ?1 AND id = ?2",
            COLUMNS.join(", ")
        ),
        params![level.as_str(), id],
        |r| Ok(limits_row(r, 0)),
    )
    .optional()?
    .transpose()
    .map(Option::unwrap_or_default)
}

fn write_limits(
    tx: &Connection,
    level: Level,
    id: &str,
    limits: &Limits,
) -> Result<(), StoreError> {
    if limits.is_empty() {
        tx.execute(
            "DELETE FROM limits WHERE level = ?1 AND id = ?2",
            params![level.as_str(), id],
        )?;
        return Ok(());
    }
    let v = |k: LimitKind| limits.get(k).map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO limits (level, id, {}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            COLUMNS.join(", ")
        ),
        params![
            level.as_str(),
            id,
            v(LimitKind::RequestsPerMinute),
            v(LimitKind::TokensPerDay),
            v(LimitKind::TokensPerMonth),
            v(LimitKind::CostPerMonth),
            v(LimitKind::ConcurrentStreams),
            v(LimitKind::PatronTokensPerDay)
        ],
    )?;
    Ok(())
}

/// The level a level's allotments are carved from: sites and groups from their institution; a
/// key from its group, else its site, else its institution.
fn parent_of(
    c: &Connection,
    level: Level,
    id: &str,
) -> Result<Option<(Level, String)>, StoreError> {
    Ok(match level {
        Level::Institution | Level::Model | Level::Patron => None,
        Level::Site => c
            .query_row(
                "SELECT institution_id FROM sites WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .map(|i| (Level::Institution, i)),
        Level::Group => c
            .query_row(
                "SELECT institution_id FROM member_groups WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .map(|i| (Level::Institution, i)),
        Level::Key => get_key(c, id)?.map(|k| match (k.group_id, k.site_id) {
            (Some(g), _) => (Level::Group, g),
            (None, Some(s)) => (Level::Site, s),
            (None, None) => (Level::Institution, k.institution_id),
        }),
    })
}

/// The levels carved directly from `level`.
fn child_levels(level: Level) -> &'static [Level] {
    match level {
        Level::Institution => &[Level::Site, Level::Group, Level::Key],
        Level::Site | Level::Group => &[Level::Key],
        Level::Key | Level::Model | Level::Patron => &[],
    }
}

/// The sum of `kind` over the `child` level's members carved from `parent`, leaving out
/// `except`.
fn sum_children(
    c: &Connection,
    parent: (Level, &str),
    child: Level,
    except: Option<&str>,
    kind: LimitKind,
) -> Result<u64, StoreError> {
    // A closed set of queries, never caller text.
    let members = match (parent.0, child) {
        (Level::Institution, Level::Site) => "SELECT id FROM sites WHERE institution_id = ?1",
        (Level::Institution, Level::Group) => {
            "SELECT id FROM member_groups WHERE institution_id = ?1"
        }
        (Level::Institution, Level::Key) => {
            "SELECT id FROM api_keys WHERE institution_id = ?1 AND site_id IS NULL
                AND group_id IS NULL AND revoked_at IS NULL"
        }
        (Level::Site, Level::Key) => {
            "SELECT id FROM api_keys WHERE site_id = ?1 AND group_id IS NULL
                AND revoked_at IS NULL"
        }
        (Level::Group, Level::Key) => {
            "SELECT id FROM api_keys WHERE group_id = ?1 AND revoked_at IS NULL"
        }
        _ => return Ok(0),
    };
    let sum: i64 = c.query_row(
        &format!(
            "SELECT COALESCE(SUM({col}), 0) FROM limits
             WHERE level = ?2 AND id IN ({members}) AND (?3 IS NULL OR id != ?3)",
            col = column(kind)
        ),
        params![parent.1, child.as_str(), except],
        |r| r.get(0),
    )?;
    Ok(sum.max(0) as u64)
}
