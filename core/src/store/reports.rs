//! Usage across institutions by sector and region, for operators and the programs that fund
//! access. The sums here are whole; which of them may be shown (small-cell suppression) is
//! decided by the admin API's report, which needs each cell's number of distinct subjects.
//!
//! A cell's subjects are a lower bound on the people (or keys) behind its usage, summed over its
//! institutions: for each, the larger of the patrons it served on its busiest day in the span
//! (a patron counted once however many days they came; patrons' daily sums and, once rolled
//! up, patrons served per day, see [`super::retention`]) and the keys other than kiosks it
//! used (a kiosk is a terminal many share, never a subject). The larger, not the sum: the same
//! people may be behind both. Erring low means a doubtful cell is suppressed, never shown.

use std::collections::HashMap;

use rusqlite::params;

use super::{Store, StoreError};

/// The usage of one sector and region over a span of days.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SectorCell {
    /// The institutions' `sector`, or their kind when they set none.
    pub sector: String,
    /// The institutions' ISO 3166-2 region.
    pub region: String,
    /// Institutions with usage.
    pub institutions: u64,
    /// Distinct patrons and keys, at least (see the module).
    pub subjects: u64,
    /// Requests forwarded or answered from the cache.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost, in billionths of a US dollar.
    pub cost_nano_usd: i64,
    /// Requests answered from the response cache.
    pub cached: u64,
    /// What those would have cost, in billionths of a US dollar.
    pub saved_nano_usd: i64,
}

impl Store {
    /// Usage of every institution from `from` to `to` (local days, inclusive), summed by
    /// sector and region, with each cell's subjects; in sector and region order.
    pub async fn sector_cells(&self, from: &str, to: &str) -> Result<Vec<SectorCell>, StoreError> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.call(move |c| {
            let mut cells: Vec<SectorCell> = Vec::new();
            let mut of_institution: HashMap<String, usize> = HashMap::new();
            {
                let mut stmt = c.prepare_cached(
                    "SELECT COALESCE(i.sector, i.kind), i.region, i.id, SUM(d.requests),
                        SUM(d.prompt_tokens), SUM(d.completion_tokens), SUM(d.cost_nano_usd),
                        SUM(d.cached), SUM(d.saved_nano_usd)
                     FROM usage_daily d JOIN institutions i ON i.id = d.institution_id
                     WHERE d.day >= ?1 AND d.day <= ?2
                     GROUP BY i.id ORDER BY 1, 2",
                )?;
                let mut rows = stmt.query(params![from, to])?;
                while let Some(r) = rows.next()? {
                    let (sector, region, inst): (String, String, String) =
                        (r.get(0)?, r.get(1)?, r.get(2)?);
                    let i = match cells.last() {
                        Some(last) if last.sector == sector && last.region == region => {
                            cells.len() - 1
                        }
                        _ => {
                            cells.push(SectorCell {
                                sector,
                                region,
                                ..SectorCell::default()
                            });
                            cells.len() - 1
                        }
                    };
                    let cell = &mut cells[i];
                    cell.institutions += 1;
                    cell.requests += r.get::<_, i64>(3)? as u64;
                    cell.prompt_tokens += r.get::<_, i64>(4)? as u64;
                    cell.completion_tokens += r.get::<_, i64>(5)? as u64;
                    cell.cost_nano_usd += r.get::<_, i64>(6)?;
                    cell.cached += r.get::<_, i64>(7)? as u64;
                    cell.saved_nano_usd += r.get::<_, i64>(8)?;
                    of_institution.insert(inst, i);
                }
            }
            // Keys other than kiosks that were used.
            let mut own_keys = c.prepare_cached(
                "SELECT d.institution_id, COUNT(DISTINCT d.key_id) FROM usage_daily d
                 JOIN api_keys k ON k.id = d.key_id
                 WHERE d.day >= ?1 AND d.day <= ?2 AND k.kind != 'kiosk'
                 GROUP BY d.institution_id",
            )?;
            // Patrons served on each institution's busiest day.
            let mut patrons = c.prepare_cached(
                "SELECT institution_id, MAX(n) FROM (
                    SELECT institution_id, patrons AS n FROM patron_counts
                    WHERE day >= ?1 AND day <= ?2
                    UNION ALL
                    SELECT institution_id, COUNT(*) AS n FROM patron_daily
                    WHERE day >= ?1 AND day <= ?2 GROUP BY institution_id, day)
                 GROUP BY institution_id",
            )?;
            // Each institution's subjects: the larger of its keys and its patrons.
            let mut subjects: HashMap<String, u64> = HashMap::new();
            for stmt in [&mut own_keys, &mut patrons] {
                let mut rows = stmt.query(params![from, to])?;
                while let Some(r) = rows.next()? {
                    let n = r.get::<_, i64>(1)?.max(0) as u64;
                    let entry = subjects.entry(r.get(0)?).or_default();
                    *entry = (*entry).max(n);
                }
            }
            for (inst, n) in subjects {
                if let Some(&i) = of_institution.get(&inst) {
                    cells[i].subjects += n;
                }
            }
            Ok(cells)
        })
        .await
    }
}
