//! Usage reports of an institution, by local day, site, group, key or model, as JSON or CSV.
//! The ledger holds ids and numbers only, so a report can never name a patron.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use carrel_core::domain::{UsageGroupBy, local_date, unix_now};
use carrel_core::store::UsageLine;
use jiff::civil::Date;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::query::{AdminQuery, UsageParams};

/// Longest span one report covers, in days.
pub const MAX_SPAN_DAYS: i32 = 366;

/// Sums over a report.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct UsageTotals {
    /// Requests forwarded.
    pub requests: u64,
    /// Of those, responses cut off before their end.
    pub incomplete: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
    /// Cost in US dollars at the models' prices.
    pub cost_usd: f64,
    /// Requests answered from the response cache.
    pub cached: u64,
    /// What those would have cost from the provider, in US dollars.
    pub savings_usd: f64,
}

/// A usage report.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    /// The institution.
    pub institution_id: String,
    /// The time zone its days are counted in.
    pub timezone: String,
    /// First day, inclusive.
    pub from: String,
    /// Last day, inclusive.
    pub to: String,
    /// What each line is about.
    pub group_by: UsageGroupBy,
    /// One line per day, site, group, key or model that had usage, in order.
    pub data: Vec<UsageLine>,
    /// Sums of every line.
    pub totals: UsageTotals,
}

fn day(query: &AdminQuery, name: &'static str) -> Result<Option<Date>, AdminError> {
    query
        .text(name)
        .map(|v| {
            v.parse::<Date>().map_err(|_| {
                AdminError::field(
                    name,
                    format!("{name}: `{v}` is not a date such as 2026-09-01"),
                )
            })
        })
        .transpose()
}

/// Usage of an institution. Staff, auditors and admins of the institution may read it.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/usage", tag = "institutions",
    params(("id" = String, Path, description = "Institution id"), UsageParams),
    responses(
        (status = 200, content(
            (UsageReport = "application/json"),
            (String = "text/csv", example = "day,requests,incomplete,prompt_tokens,completion_tokens,total_tokens,cost_usd,cached,savings_usd\r\n2026-11-26,3,0,120,480,600,0.0009,1,0.0003\r\n"),
        )),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A parameter is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn usage_report(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    query: AdminQuery,
) -> Result<Response, AdminError> {
    principal.authorize(Action::ReadUsage, Some(&id))?;
    query.only(&["from", "to", "group_by", "format"])?;
    let csv = wants_csv(&query)?;
    let group_by = query
        .parsed::<UsageGroupBy>("group_by")?
        .unwrap_or(UsageGroupBy::Day);
    let inst = state.institution(&id).await?;
    let to = match day(&query, "to")? {
        Some(d) => d,
        None => local_date(unix_now(), &inst.timezone),
    };
    let from = match day(&query, "from")? {
        Some(d) => d,
        None => to.checked_sub(jiff::Span::new().days(29)).unwrap_or(to),
    };
    let span = from.until(to).map(|s| s.get_days()).unwrap_or(i32::MAX);
    if span < 0 {
        return Err(AdminError::field("from", "from: must not be after `to`"));
    }
    if span > MAX_SPAN_DAYS {
        return Err(AdminError::field(
            "to",
            format!("to: at most {MAX_SPAN_DAYS} days after `from`"),
        ));
    }
    state.hooks.usage_flush().await;
    let data = state
        .store
        .usage_report(&id, &from.to_string(), &to.to_string(), group_by)
        .await?;
    if csv {
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            to_csv(group_by, &data),
        )
            .into_response());
    }
    let totals = data.iter().fold(UsageTotals::default(), |mut t, l| {
        t.requests += l.requests;
        t.incomplete += l.incomplete;
        t.prompt_tokens += l.prompt_tokens;
        t.completion_tokens += l.completion_tokens;
        t.total_tokens += l.total_tokens;
        t.cost_usd += l.cost_usd;
        t.cached += l.cached;
        t.savings_usd += l.savings_usd;
        t
    });
    Ok(Json(UsageReport {
        institution_id: inst.id,
        timezone: inst.timezone,
        from: from.to_string(),
        to: to.to_string(),
        group_by,
        data,
        totals,
    })
    .into_response())
}

/// Whether a report's `format` asks for CSV (`csv`) rather than JSON (`json`, the default).
pub(crate) fn wants_csv(query: &AdminQuery) -> Result<bool, AdminError> {
    match query.text("format") {
        None | Some("json") => Ok(false),
        Some("csv") => Ok(true),
        Some(other) => Err(AdminError::field(
            "format",
            format!("format: `{other}` is not json or csv"),
        )),
    }
}

/// The report as CSV (RFC 4180), the first column named after `group_by`.
fn to_csv(group_by: UsageGroupBy, lines: &[UsageLine]) -> String {
    let mut out = format!(
        "{},requests,incomplete,prompt_tokens,completion_tokens,total_tokens,cost_usd,cached,\
         savings_usd\r\n",
        group_by.as_str()
    );
    for l in lines {
        out.push_str(&csv_field(l.group.as_deref().unwrap_or("")));
        out.push_str(&format!(
            ",{},{},{},{},{},{},{},{}\r\n",
            l.requests,
            l.incomplete,
            l.prompt_tokens,
            l.completion_tokens,
            l.total_tokens,
            l.cost_usd,
            l.cached,
            l.savings_usd
        ));
    }
    out
}

/// One CSV field: quoted when it holds a separator or quote, and defused when a spreadsheet
/// would read it as a formula.
pub(crate) fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
    }

    #[test]
    fn csv_has_a_header_named_after_the_grouping() {
        let line = UsageLine {
            group: Some("2026-11-26".into()),
            requests: 2,
            incomplete: 0,
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            cost_usd: 0.25,
            cached: 1,
            savings_usd: 0.125,
        };
        assert_eq!(
            to_csv(UsageGroupBy::Day, &[line]),
            "day,requests,incomplete,prompt_tokens,completion_tokens,total_tokens,cost_usd,cached,\
             savings_usd\r\n2026-11-26,2,0,10,5,15,0.25,1,0.125\r\n"
        );
    }
}
