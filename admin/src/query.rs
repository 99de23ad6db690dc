//! Query strings: every parameter is checked, unknown ones are refused with a 422 naming them,
//! and list routes share one cursor pagination (`after`, `limit`).

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use carrel_core::domain::UsageGroupBy;
use carrel_core::store::PageRequest;
use utoipa::IntoParams;

use crate::error::AdminError;

/// Most rows one page returns.
pub const MAX_PAGE: u32 = 500;
/// Rows a page returns when `limit` is not given.
pub const DEFAULT_PAGE: u32 = 100;

/// The parameters of a query string.
#[derive(Debug, Default)]
pub struct AdminQuery(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for AdminQuery {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let pairs = url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes());
        Ok(AdminQuery(pairs.into_owned().collect()))
    }
}

impl AdminQuery {
    /// Refuses any parameter not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<&Self, AdminError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(AdminError::field(
                unknown.clone(),
                format!("{unknown}: unknown query parameter"),
            )),
            None => Ok(self),
        }
    }

    /// A text parameter.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// An integer parameter.
    pub fn int(&self, name: &'static str) -> Result<Option<i64>, AdminError> {
        self.text(name)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| AdminError::field(name, format!("{name}: expected an integer")))
            })
            .transpose()
    }

    /// A parameter parsed with `FromStr`, its error message naming the parameter.
    pub fn parsed<T>(&self, name: &'static str) -> Result<Option<T>, AdminError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.text(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| AdminError::field(name, format!("{name}: {e}")))
            })
            .transpose()
    }

    /// `limit`: 1 to [`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
    pub fn limit(&self) -> Result<u32, AdminError> {
        match self.int("limit")? {
            None => Ok(DEFAULT_PAGE),
            Some(n) if (1..=i64::from(MAX_PAGE)).contains(&n) => Ok(n as u32),
            Some(_) => Err(AdminError::field(
                "limit",
                format!("limit: must be 1 to {MAX_PAGE}"),
            )),
        }
    }

    /// The page a list route is asked for: `after` and `limit`, nothing else.
    pub fn page(&self) -> Result<PageRequest, AdminError> {
        self.only(&["after", "limit"])?;
        let after = match self.text("after") {
            None => None,
            Some(cursor) => Some(cursor.parse::<i64>().map_err(|_| {
                AdminError::field("after", "after: not a cursor from an earlier page")
            })?),
        };
        Ok(PageRequest {
            after,
            limit: self.limit()?,
        })
    }
}

/// The query parameters of every list route, for the OpenAPI document.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Cursor: `next_cursor` of the previous page.
    pub after: Option<String>,
    /// Page size, 1 to 500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// Query of `GET /admin/v1/institutions/{id}/usage`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read through `AdminQuery`; this struct only describes the parameters.
pub struct UsageParams {
    /// First local day (`YYYY-MM-DD`, in the institution's time zone); default 29 days before
    /// `to`.
    #[param(format = Date)]
    from: Option<String>,
    /// Last local day, inclusive; default today. At most 366 days after `from`.
    #[param(format = Date)]
    to: Option<String>,
    /// Break the report down by `day` (default), `site`, `group`, `key` or `model`.
    group_by: Option<UsageGroupBy>,
    /// `json` (default) or `csv`.
    #[param(pattern = "^(json|csv)$")]
    format: Option<String>,
}

/// Parameters of `GET /admin/v1/reports/sectors`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read through `AdminQuery`; this struct only describes the parameters.
pub struct SectorParams {
    /// The month (`YYYY-MM`, each institution's local days): one that is over everywhere;
    /// default the last such month.
    #[param(pattern = "^[0-9]{4}-[0-9]{2}$")]
    month: Option<String>,
    /// The fewest distinct patrons or keys a shown row stands for: 10 (default) or more.
    #[param(minimum = 10, maximum = 1_000_000)]
    k: Option<u64>,
    /// `json` (default) or `csv`.
    #[param(pattern = "^(json|csv)$")]
    format: Option<String>,
}
