//! Usage across institutions by sector and region, with small-cell suppression: for operators
//! and the programs that fund access, who need to see how access is used without any person in
//! it being seen.
//!
//! # What is suppressed
//!
//! The report is a hierarchy: the total, each sector, each region within a sector. Every row
//! it shows stands for at least `k` subjects (distinct patrons or keys, counted low: see
//! `carrel_core::store::SectorCell`); default `k` = 10, and a caller may ask for more, never
//! less. A row with fewer is not shown on its own: it is pooled with the other small rows of its
//! level into one `other` row. When that pool is itself smaller than `k`, the smallest shown row
//! joins it, and so on until it is large enough — otherwise a small row could be recovered by
//! subtracting the shown rows from their parent. A sector that goes into the pool shows no
//! regions. If the whole report stands for fewer than `k`, nothing is shown.
//!
//! What this gives: each level's rows add up to their parent exactly (nothing is dropped, so
//! the totals are true), and any sum or difference of shown rows is a union of pooled or shown
//! groups, each of at least `k` subjects. The hierarchy is fixed (sector, then region) so
//! that two reports cannot be crossed to isolate a cell, and a report covers one whole month
//! that is over everywhere, so reports never overlap and never grow: two reports of
//! overlapping spans, or of one month at two times, could otherwise be subtracted to isolate a
//! few days.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use carrel_core::domain::unix_now;
use carrel_core::store::SectorCell;
use jiff::civil::Date;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::query::{AdminQuery, SectorParams};
use crate::usage::{csv_field, wants_csv};

/// The smallest number of subjects a shown row stands for, unless a caller asks for more.
pub const DEFAULT_K: u64 = 10;
/// The most a caller may ask for.
pub const MAX_K: u64 = 1_000_000;

/// Sums of one row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Sums {
    /// Institutions with usage.
    pub institutions: u64,
    /// Distinct patrons and keys, at least; never fewer than `k`.
    pub subjects: u64,
    /// Requests.
    pub requests: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Cost in US dollars.
    pub cost_usd: f64,
    /// Requests answered from the response cache.
    pub cached: u64,
    /// What those would have cost from the provider, in US dollars.
    pub savings_usd: f64,
    /// Billionths of a dollar, summed exactly and converted once.
    #[serde(skip)]
    cost_nano_usd: i64,
    #[serde(skip)]
    saved_nano_usd: i64,
}

impl Sums {
    fn of(cell: &SectorCell) -> Sums {
        Sums {
            institutions: cell.institutions,
            subjects: cell.subjects,
            requests: cell.requests,
            prompt_tokens: cell.prompt_tokens,
            completion_tokens: cell.completion_tokens,
            cost_nano_usd: cell.cost_nano_usd,
            cached: cell.cached,
            saved_nano_usd: cell.saved_nano_usd,
            ..Sums::default()
        }
        .finish()
    }

    fn add(&mut self, other: &Sums) {
        self.institutions += other.institutions;
        self.subjects += other.subjects;
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_nano_usd += other.cost_nano_usd;
        self.cached += other.cached;
        self.saved_nano_usd += other.saved_nano_usd;
        *self = std::mem::take(self).finish();
    }

    fn finish(mut self) -> Sums {
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
        self.cost_usd = self.cost_nano_usd as f64 / 1e9;
        self.savings_usd = self.saved_nano_usd as f64 / 1e9;
        self
    }
}

/// A region of a sector, or (`region` null) the pooled regions too small to show apart.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RegionRow {
    /// ISO 3166-2 region; `null` for the pool.
    pub region: Option<String>,
    /// How many regions this row stands for.
    pub cells: u64,
    /// Its sums.
    #[serde(flatten)]
    pub sums: Sums,
}

/// A sector, or (`sector` null) the pooled sectors too small to show apart.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SectorRow {
    /// The institutions' sector (their kind when they set none); `null` for the pool.
    pub sector: Option<String>,
    /// How many sector-and-region cells this row stands for.
    pub cells: u64,
    /// Its sums.
    #[serde(flatten)]
    pub sums: Sums,
    /// Its regions, adding up to it (none for the pool).
    pub regions: Vec<RegionRow>,
}

/// The report.
#[derive(Debug, Serialize, ToSchema)]
pub struct SectorReport {
    /// The month (`YYYY-MM`): its first local day, inclusive.
    pub from: String,
    /// Last local day, inclusive.
    pub to: String,
    /// The fewest subjects a shown row stands for.
    pub k: u64,
    /// Everything; `null` when the whole report stands for fewer than `k` subjects.
    pub total: Option<Sums>,
    /// The sectors, adding up to the total.
    pub sectors: Vec<SectorRow>,
}

/// Rows of one level: what each is about, and its sums.
type Rows<T> = Vec<(T, Sums)>;

/// Pools the rows with fewer than `k` subjects, and then the smallest shown ones until the
/// pool has `k` (see the module). Returns the rows shown, in their order, and the pool.
fn pool<T>(rows: Rows<T>, k: u64) -> (Rows<T>, Rows<T>) {
    let (mut pooled, mut shown): (Vec<_>, Vec<_>) =
        rows.into_iter().partition(|(_, s)| s.subjects < k);
    let mut size: u64 = pooled.iter().map(|(_, s)| s.subjects).sum();
    while !pooled.is_empty() && size < k && !shown.is_empty() {
        let smallest = (0..shown.len())
            .min_by_key(|&i| shown[i].1.subjects)
            .expect("not empty");
        let row = shown.remove(smallest);
        size += row.1.subjects;
        pooled.push(row);
    }
    (shown, pooled)
}

/// The report of `cells` (in sector, region order) with rows of fewer than `k` pooled.
pub fn suppress(cells: &[SectorCell], k: u64) -> (Option<Sums>, Vec<SectorRow>) {
    let mut total = Sums::default();
    let mut sectors: Vec<(String, Vec<(String, Sums)>)> = Vec::new();
    for cell in cells {
        let sums = Sums::of(cell);
        total.add(&sums);
        match sectors.last_mut() {
            Some((sector, regions)) if *sector == cell.sector => {
                regions.push((cell.region.clone(), sums));
            }
            _ => sectors.push((cell.sector.clone(), vec![(cell.region.clone(), sums)])),
        }
    }
    if total.subjects < k {
        return (None, Vec::new());
    }
    let sector_rows: Vec<_> = sectors
        .into_iter()
        .map(|(sector, regions)| {
            let mut sums = Sums::default();
            regions.iter().for_each(|(_, s)| sums.add(s));
            ((sector, regions), sums)
        })
        .collect();
    let (shown, pooled) = pool(sector_rows, k);
    let mut rows: Vec<SectorRow> = shown
        .into_iter()
        .map(|((sector, regions), sums)| {
            let (shown, pooled) = pool(regions, k);
            let mut regions: Vec<RegionRow> = shown
                .into_iter()
                .map(|(region, sums)| RegionRow {
                    region: Some(region),
                    cells: 1,
                    sums,
                })
                .collect();
            if !pooled.is_empty() {
                let mut sums = Sums::default();
                pooled.iter().for_each(|(_, s)| sums.add(s));
                regions.push(RegionRow {
                    region: None,
                    cells: pooled.len() as u64,
                    sums,
                });
            }
            SectorRow {
                sector: Some(sector),
                cells: regions.iter().map(|r| r.cells).sum(),
                sums,
                regions,
            }
        })
        .collect();
    if !pooled.is_empty() {
        let mut sums = Sums::default();
        pooled.iter().for_each(|(_, s)| sums.add(s));
        rows.push(SectorRow {
            sector: None,
            cells: pooled.iter().map(|((_, r), _)| r.len() as u64).sum(),
            sums,
            regions: Vec::new(),
        });
    }
    (Some(total), rows)
}

/// The first and last day of the report's month: `month` (`YYYY-MM`), or by default the last
/// one that is over everywhere. Only whole months that are over: two reports of overlapping
/// spans, or of one span at two times, could otherwise be subtracted to isolate a few days.
fn month(query: &AdminQuery) -> Result<(Date, Date), AdminError> {
    let over = carrel_core::domain::last_day_over_everywhere(unix_now());
    let first = match query.text("month") {
        Some(v) => format!("{v}-01").parse::<Date>().map_err(|_| {
            AdminError::field(
                "month",
                format!("month: `{v}` is not a month such as 2026-09"),
            )
        })?,
        None => {
            let this = over.first_of_month();
            // The month holding `over` is over only on its last day.
            if over == this.last_of_month() {
                this
            } else {
                this.checked_sub(jiff::Span::new().months(1))
                    .unwrap_or(this)
            }
        }
    };
    let last = first.last_of_month();
    if last > over {
        return Err(AdminError::field(
            "month",
            format!(
                "month: {} is not over everywhere yet",
                &first.to_string()[..7]
            ),
        ));
    }
    Ok((first, last))
}

/// Usage of every institution by sector and region, with every row standing for at least `k`
/// distinct patrons or keys (smaller ones pooled, see the reference). Operators only.
#[utoipa::path(get, path = "/admin/v1/reports/sectors", tag = "institutions",
    params(SectorParams),
    responses(
        (status = 200, content(
            (SectorReport = "application/json"),
            (String = "text/csv", example = "level,sector,region,cells,institutions,subjects,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd,cached,savings_usd\r\ntotal,,,2,3,25,40,900,1200,2100,0.0012,4,0.0001\r\n"),
        )),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, description = "A parameter is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn sector_report(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Response, AdminError> {
    principal.authorize(Action::ReadAggregates, None)?;
    query.only(&["month", "k", "format"])?;
    let csv = wants_csv(&query)?;
    let k = query.parsed::<u64>("k")?.unwrap_or(DEFAULT_K);
    if k < DEFAULT_K {
        return Err(AdminError::field(
            "k",
            format!("k: at least {DEFAULT_K}; a smaller cell could single a person out"),
        ));
    }
    if k > MAX_K {
        return Err(AdminError::field("k", format!("k: at most {MAX_K}")));
    }
    let (from, to) = month(&query)?;
    state.hooks.usage_flush().await;
    let cells = state
        .store
        .sector_cells(&from.to_string(), &to.to_string())
        .await?;
    let (total, sectors) = suppress(&cells, k);
    if csv {
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(total.as_ref(), &sectors),
        )
            .into_response());
    }
    Ok(Json(SectorReport {
        from: from.to_string(),
        to: to.to_string(),
        k,
        total,
        sectors,
    })
    .into_response())
}

/// The report as CSV: one line per row, `level` naming its place (`total`, `sector`,
/// `region`), a pool's name empty.
fn to_csv(total: Option<&Sums>, sectors: &[SectorRow]) -> String {
    let mut out = String::from(
        "level,sector,region,cells,institutions,subjects,requests,prompt_tokens,\
         completion_tokens,total_tokens,cost_usd,cached,savings_usd\r\n",
    );
    let mut line = |level: &str, sector: Option<&str>, region: Option<&str>, cells, s: &Sums| {
        out.push_str(&format!(
            "{level},{},{},{cells},{},{},{},{},{},{},{},{},{}\r\n",
            csv_field(sector.unwrap_or("")),
            csv_field(region.unwrap_or("")),
            s.institutions,
            s.subjects,
            s.requests,
            s.prompt_tokens,
            s.completion_tokens,
            s.total_tokens,
            s.cost_usd,
            s.cached,
            s.savings_usd
        ));
    };
    if let Some(total) = total {
        let cells = sectors.iter().map(|s| s.cells).sum::<u64>();
        line("total", None, None, cells, total);
    }
    for s in sectors {
        line("sector", s.sector.as_deref(), None, s.cells, &s.sums);
        for r in &s.regions {
            line(
                "region",
                s.sector.as_deref(),
                r.region.as_deref(),
                r.cells,
                &r.sums,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cell(sector: &str, region: &str, subjects: u64) -> SectorCell {
        SectorCell {
            sector: sector.into(),
            region: region.into(),
            institutions: 1,
            subjects,
            requests: subjects * 3,
            prompt_tokens: subjects * 100,
            completion_tokens: subjects * 50,
            cost_nano_usd: subjects as i64 * 1000,
            cached: subjects,
            saved_nano_usd: subjects as i64 * 7,
        }
    }

    /// A shown row's name and subjects.
    type Named = (Option<String>, u64);

    /// Each shown sector's name and subjects, with its regions'.
    fn shape(sectors: &[SectorRow]) -> Vec<(Option<String>, u64, Vec<Named>)> {
        sectors
            .iter()
            .map(|s| {
                (
                    s.sector.clone(),
                    s.sums.subjects,
                    s.regions
                        .iter()
                        .map(|r| (r.region.clone(), r.sums.subjects))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_small_cell_is_pooled_with_the_next_smallest() {
        let cells = [
            cell("library", "US-IL", 12),
            cell("library", "US-MN", 10),
            cell("library", "US-WI", 3),
            cell("school", "US-IL", 11),
        ];
        let (total, sectors) = suppress(&cells, 10);
        assert_eq!(total.unwrap().subjects, 36);
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            shape(&sectors),
            [
                (s("library"), 25, vec![(s("US-IL"), 12), (None, 13)]),
                (s("school"), 11, vec![(s("US-IL"), 11)]),
            ]
        );
        assert_eq!(sectors[0].regions[1].cells, 2);
    }

    #[test]
    fn a_small_sector_takes_the_next_smallest_with_it_and_shows_no_regions() {
        let cells = [
            cell("business", "US-IL", 2),
            cell("library", "US-IL", 30),
            cell("school", "US-IL", 11),
        ];
        let (_, sectors) = suppress(&cells, 10);
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            shape(&sectors),
            [
                (s("library"), 30, vec![(s("US-IL"), 30)]),
                (None, 13, vec![]),
            ]
        );
    }

    #[test]
    fn a_report_of_too_few_shows_nothing() {
        let (total, sectors) = suppress(&[cell("library", "US-IL", 9)], 10);
        assert_eq!((total, sectors.len()), (None, 0));
        assert_eq!(suppress(&[], 10), (None, Vec::new()));
    }

    fn cells() -> impl Strategy<Value = Vec<SectorCell>> {
        proptest::collection::btree_map((0u8..4, 0u8..5), 0u64..30, 0..16).prop_map(|m| {
            m.into_iter()
                .map(|((s, r), n)| cell(&format!("s{s}"), &format!("r{r}"), n))
                .collect()
        })
    }

    proptest! {
        /// Every shown row stands for at least k; rows add up to their parents; a small cell
        /// never shows by name; pools take no more than they must.
        #[test]
        fn shown_rows_are_large_and_add_up(cells in cells(), k in 10u64..25) {
            let (total, sectors) = suppress(&cells, k);
            let all: u64 = cells.iter().map(|c| c.subjects).sum();
            let Some(total) = total else {
                prop_assert!(all < k);
                prop_assert!(sectors.is_empty());
                return Ok(());
            };
            prop_assert_eq!(total.subjects, all);
            prop_assert_eq!(total.requests, cells.iter().map(|c| c.requests).sum::<u64>());
            let mut sum = Sums::default();
            for s in &sectors {
                prop_assert!(s.sums.subjects >= k, "sector {:?}", s.sector);
                sum.add(&s.sums);
                if s.sector.is_none() {
                    prop_assert!(s.regions.is_empty());
                    continue;
                }
                let mut regions = Sums::default();
                for r in &s.regions {
                    prop_assert!(r.sums.subjects >= k, "region {:?}", r.region);
                    regions.add(&r.sums);
                    if let Some(region) = &r.region {
                        let c = cells
                            .iter()
                            .find(|c| Some(&c.sector) == s.sector.as_ref() && c.region == *region)
                            .unwrap();
                        prop_assert!(c.subjects >= k);
                    }
                }
                prop_assert_eq!(&regions, &s.sums);
            }
            prop_assert_eq!(&sum, &total);
            prop_assert!(sectors.iter().filter(|s| s.sector.is_none()).count() <= 1);
        }
    }
}
