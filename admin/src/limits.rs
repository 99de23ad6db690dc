//! Limits by level — institution, site, group, key and model — each shown with what its level
//! has used in the current local day and month; and the front desk's two patron actions: a
//! time-boxed extension of a patron's daily allotment, and a fresh start of their day.
//!
//! A write goes to the store, which checks ranges and the carving rule (the allotments of a
//! level's children never add up to more than its own limit) in one transaction; then the
//! quota engine the data plane counts with is reloaded, so a 2xx means "in effect".
//!
//! Patrons are named to this API by the id their institution knows them by (a card number, an
//! application's user id). That id goes straight into [`Pepper::patron_ref`] and nowhere else:
//! not the store, the audit trail, the logs or the response, which all carry the reference.
//!
//! [`Pepper::patron_ref`]: carrel_core::keys::Pepper::patron_ref

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{Institution, local_date};
use carrel_core::quota::limits::MAX_COST_NANO_USD;
use carrel_core::quota::{Level, LevelUsage, LimitKind, Limits, LimitsPatch};
use carrel_core::store::{PageRequest, PatronExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::{AdminJson, present};

/// Nano-dollars in a US dollar.
const NANO_PER_USD: u64 = 1_000_000_000;
/// Most tokens one extension adds.
pub const MAX_EXTENSION_TOKENS: i64 = 1_000_000_000;
/// Longest an extension lasts, in minutes (a day).
pub const MAX_EXTENSION_MINUTES: i64 = 24 * 60;
/// Longest patron id accepted, in characters.
pub const MAX_PATRON_CHARS: usize = 256;

/// Body of `PUT /admin/v1/{level}/{id}/limits`: a limit absent stays as it is, `null` removes
/// it, a number sets it.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLimits {
    /// Requests per minute (a minute's worth may come at once).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 10_000_000, example = 60)]
    pub requests_per_minute: Option<Option<Value>>,
    /// Tokens (prompt and completion) per local day.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_000_000_000_000.0, example = 200000)]
    pub tokens_per_day: Option<Option<Value>>,
    /// Tokens (prompt and completion) per local month.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_000_000_000_000.0)]
    pub tokens_per_month: Option<Option<Value>>,
    /// Cost per local month in US dollars at the models' prices (rounded to a billionth of a
    /// dollar).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<f64>, exclusive_minimum = 0, maximum = 1_000_000_000, example = 50.0)]
    pub cost_per_month_usd: Option<Option<Value>>,
    /// Streamed responses open at once.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_000_000)]
    pub concurrent_streams: Option<Option<Value>>,
    /// Tokens per local day for each patron (a cap for each one, not a share of the level's).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1_000_000_000_000.0, example = 20000)]
    pub patron_tokens_per_day: Option<Option<Value>>,
}

impl SetLimits {
    fn get(&self, kind: LimitKind) -> Option<Option<&Value>> {
        let field = match kind {
            LimitKind::RequestsPerMinute => &self.requests_per_minute,
            LimitKind::TokensPerDay => &self.tokens_per_day,
            LimitKind::TokensPerMonth => &self.tokens_per_month,
            LimitKind::CostPerMonth => &self.cost_per_month_usd,
            LimitKind::ConcurrentStreams => &self.concurrent_streams,
            LimitKind::PatronTokensPerDay => &self.patron_tokens_per_day,
        };
        field.as_ref().map(Option::as_ref)
    }

    /// The change the body asks for, each value checked: a whole number from 1 to the kind's
    /// largest (dollars for the cost), or `null`. An error names the field.
    pub fn patch(&self) -> Result<LimitsPatch, AdminError> {
        let mut patch = LimitsPatch::default();
        for kind in LimitKind::ALL {
            let Some(value) = self.get(kind) else {
                continue;
            };
            let value = match value {
                None => None,
                Some(v) if kind == LimitKind::CostPerMonth => Some(nano_usd(v)?),
                Some(v) => Some(whole(kind, v)?),
            };
            patch.set(kind, value);
        }
        Ok(patch)
    }
}

/// A whole-number limit: 1 to the kind's largest. Negative numbers, fractions (`1.5`, but also
/// `2.0`) and anything not a number are refused.
fn whole(kind: LimitKind, value: &Value) -> Result<u64, AdminError> {
    let (field, max) = (kind.field(), kind.max());
    value
        .as_u64()
        .filter(|v| (1..=max).contains(v))
        .ok_or_else(|| {
            AdminError::field(
                field,
                format!("{field}: must be a whole number from 1 to {max}, or null to remove it"),
            )
        })
}

/// A monthly budget in US dollars, as nano-dollars (rounded to the nearest): at least one
/// nano-dollar, at most [`MAX_COST_NANO_USD`].
fn nano_usd(value: &Value) -> Result<u64, AdminError> {
    let field = LimitKind::CostPerMonth.field();
    let max = MAX_COST_NANO_USD;
    let nano = value
        .as_f64()
        .filter(|usd| usd.is_finite())
        .map(|usd| (usd * NANO_PER_USD as f64).round())
        .filter(|nano| *nano >= 1.0 && *nano <= max as f64);
    match nano {
        // A whole number from 1 to `max`: the cast neither truncates nor saturates.
        Some(nano) => Ok(nano as u64),
        None => Err(AdminError::field(
            field,
            format!(
                "{field}: must be a number of US dollars from 0.000000001 to {}, or null to \
                 remove it",
                max / NANO_PER_USD
            ),
        )),
    }
}

/// The limits of one level; `null`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, ToSchema)]
pub struct LimitValues {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per local day.
    pub tokens_per_day: Option<u64>,
    /// Tokens per local month.
    pub tokens_per_month: Option<u64>,
    /// Cost per local month, US dollars.
    pub cost_per_month_usd: Option<f64>,
    /// Streamed responses open at once.
    pub concurrent_streams: Option<u64>,
    /// Tokens per local day for each patron.
    pub patron_tokens_per_day: Option<u64>,
}

impl From<Limits> for LimitValues {
    fn from(l: Limits) -> Self {
        LimitValues {
            requests_per_minute: l.requests_per_minute,
            tokens_per_day: l.tokens_per_day,
            tokens_per_month: l.tokens_per_month,
            cost_per_month_usd: l.cost_per_month_nano_usd.map(usd),
            concurrent_streams: l.concurrent_streams,
            patron_tokens_per_day: l.patron_tokens_per_day,
        }
    }
}

fn usd(nano: u64) -> f64 {
    nano as f64 / NANO_PER_USD as f64
}

/// What a level has used in its institution's current local day and month.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LimitsUsage {
    /// Tokens today, those reserved by responses still running included.
    pub tokens_today: u64,
    /// Tokens this month.
    pub tokens_this_month: u64,
    /// Cost this month, US dollars.
    pub cost_this_month_usd: f64,
    /// Streamed responses open now.
    pub concurrent_streams: u64,
    /// RFC 3339 time the day ends (the institution's local midnight).
    #[schema(example = "2026-11-27T06:00:00Z")]
    pub day_resets_at: String,
    /// RFC 3339 time the month ends.
    #[schema(example = "2026-12-01T06:00:00Z")]
    pub month_resets_at: String,
}

impl From<LevelUsage> for LimitsUsage {
    fn from(u: LevelUsage) -> Self {
        LimitsUsage {
            tokens_today: u.day_tokens,
            tokens_this_month: u.month_tokens,
            cost_this_month_usd: usd(u.month_cost_nano_usd),
            concurrent_streams: u.streams,
            day_resets_at: u.day_resets_at.to_string(),
            month_resets_at: u.month_resets_at.to_string(),
        }
    }
}

/// The limits of one level, and what it has used.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LimitsReport {
    /// The level: `institution`, `site`, `group`, `key` or `model`.
    #[schema(inline)]
    pub level: Level,
    /// The level's id (for a model, its public name).
    pub id: String,
    /// Its limits.
    pub limits: LimitValues,
    /// What it has used; for a model, the caller's own institution's use of it, `null` for a
    /// caller bound to no institution (or not allowed to read usage).
    pub usage: Option<LimitsUsage>,
}

/// What a limits route is about.
struct Target {
    level: Level,
    id: String,
    /// The institution the level belongs to; `None` for a model, whose limits hold within
    /// every institution.
    institution: Option<Institution>,
}

/// Serializes limit writes with the engine reloads after them, so that a slower reload never
/// puts an older table in force after a newer one.
static RELOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The level `id` names, after checking it exists and that the caller may do `action` to it.
/// A record of another institution is "not found", exactly like an id that does not exist.
async fn target(
    state: &AdminState,
    principal: &AdminPrincipal,
    level: Level,
    id: &str,
    action: Action,
) -> Result<Target, AdminError> {
    let not_found = || AdminError::NotFound(format!("{} `{id}`", level.as_str()));
    // Another tenant's record is not found, like an unknown id; a role refusal stays 403.
    let authorize = |institution: &str| {
        principal
            .authorize(action, Some(institution))
            .map_err(|e| match e {
                AdminError::NotFound(_) => not_found(),
                other => other,
            })
    };
    let institution_id = match level {
        Level::Institution => {
            principal.authorize(action, Some(id))?;
            id.to_owned()
        }
        Level::Key => {
            let key = state
                .store
                .get_key(id)
                .await?
                .filter(|k| k.revoked_at.is_none())
                .ok_or_else(not_found)?;
            authorize(&key.institution_id)?;
            key.institution_id
        }
        Level::Site | Level::Group => {
            let owner = state.store.owner(level, id).await?.ok_or_else(not_found)?;
            authorize(&owner)?;
            owner
        }
        Level::Model => {
            principal.authorize(action, None)?;
            let models = state.store.list_models(PageRequest::ALL).await?.data;
            if !models.iter().any(|m| m.name == id) {
                return Err(not_found());
            }
            return Ok(Target {
                level,
                id: id.to_owned(),
                institution: None,
            });
        }
        Level::Patron => return Err(not_found()),
    };
    Ok(Target {
        level,
        id: id.to_owned(),
        institution: Some(state.institution(&institution_id).await?),
    })
}

/// What `inst`'s level `id` has used, from the live engine.
async fn usage_in(state: &AdminState, inst: &Institution, level: Level, id: &str) -> LimitsUsage {
    let (inst_id, tz): (Arc<str>, Arc<str>) =
        (inst.id.as_str().into(), inst.timezone.as_str().into());
    state.quota.usage_now(&inst_id, &tz, level, id).await.into()
}

/// The report of a target with `limits`.
async fn report(
    state: &AdminState,
    principal: &AdminPrincipal,
    target: Target,
    limits: Limits,
) -> Result<LimitsReport, AdminError> {
    let usage = match &target.institution {
        Some(inst) => Some(usage_in(state, inst, target.level, &target.id).await),
        // A model's use is counted per institution: the caller's own, when it has one and may
        // read its usage.
        None => match principal.institution() {
            Some(own) if principal.authorize(Action::ReadUsage, Some(own)).is_ok() => {
                match state.store.get_institution(own).await? {
                    Some(inst) => Some(usage_in(state, &inst, target.level, &target.id).await),
                    None => None,
                }
            }
            _ => None,
        },
    };
    Ok(LimitsReport {
        level: target.level,
        id: target.id,
        limits: limits.into(),
        usage,
    })
}

/// `GET`: the limits and usage of a level.
async fn read(
    state: AdminState,
    principal: AdminPrincipal,
    level: Level,
    id: String,
) -> Result<Json<LimitsReport>, AdminError> {
    let action = match level {
        Level::Model => Action::ReadModels,
        _ => Action::ReadUsage,
    };
    let target = target(&state, &principal, level, &id, action).await?;
    let limits = state.store.limits(level, &id).await?;
    Ok(Json(report(&state, &principal, target, limits).await?))
}

/// `PUT`: changes the limits of a level, reloads the engine, audits, answers with the report.
async fn write(
    state: AdminState,
    principal: AdminPrincipal,
    level: Level,
    id: String,
    body: SetLimits,
) -> Result<Json<LimitsReport>, AdminError> {
    let action = match level {
        Level::Institution => Action::ManageInstitution,
        Level::Site | Level::Group => Action::ManageStructure,
        Level::Key => Action::ManageKeys,
        Level::Model | Level::Patron => Action::ManageCatalog,
    };
    let target = target(&state, &principal, level, &id, action).await?;
    let patch = body.patch()?;
    let limits = {
        let _reload = RELOAD.lock().await;
        let limits = state.store.set_limits(level, &id, patch).await?;
        state.quota.set_limits(state.store.limits_table().await?);
        limits
    };
    let institution = target.institution.as_ref().map(|i| i.id.clone());
    tracing::info!(level = level.as_str(), id = %id, limits = %summary(&limits), "limits set");
    state
        .audit(
            principal.actor(),
            "limits.set",
            format!("{}:{id} {}", level.as_str(), summary(&limits)),
            institution.as_deref(),
        )
        .await;
    Ok(Json(report(&state, &principal, target, limits).await?))
}

/// The limits in force, for the audit trail and logs: `tokens_per_day=1000 cost_per_month_usd=50`,
/// or `no limits`.
fn summary(limits: &Limits) -> String {
    let mut out = String::new();
    for kind in LimitKind::ALL {
        let Some(v) = limits.get(kind) else {
            continue;
        };
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = match kind {
            LimitKind::CostPerMonth => write!(out, "{}={}", kind.field(), usd(v)),
            _ => write!(out, "{}={v}", kind.field()),
        };
    }
    if out.is_empty() {
        out.push_str("no limits");
    }
    out
}

/// Sets an institution's limits: its whole pool. Lowering one below what its sites, groups and
/// keys of its own are allotted is refused with 409. Admins of the institution may.
#[utoipa::path(put, path = "/admin/v1/institutions/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Institution id")),
    request_body = SetLimits,
    responses(
        (status = 200, body = LimitsReport),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The allotments carved out of this level would add up to \
            more than its limit; `param` names the limit, the message both levels and numbers",
            body = ErrorBody),
        (status = 422, description = "A limit is not a whole number in range (or dollars); \
            `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_institution_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<SetLimits>,
) -> Result<Json<LimitsReport>, AdminError> {
    write(state, principal, Level::Institution, id, body).await
}

/// An institution's limits, and what it has used in its current local day and month. Staff,
/// auditors and admins of the institution may read it.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Institution id")),
    responses((status = 200, body = LimitsReport), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_institution_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<LimitsReport>, AdminError> {
    read(state, principal, Level::Institution, id).await
}

/// Sets a site's limits, carved out of its institution's: the sites' allotments may not add
/// up to more than the institution's limit, nor the site's own be set below what its keys are
/// allotted (409). Admins of the institution may.
#[utoipa::path(put, path = "/admin/v1/sites/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Site id")),
    request_body = SetLimits,
    responses(
        (status = 200, body = LimitsReport),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such site", body = ErrorBody),
        (status = 409, description = "The allotments would add up to more than the level \
            above allows; `param` names the limit, the message both levels and numbers",
            body = ErrorBody),
        (status = 422, description = "A limit is not a whole number in range (or dollars); \
            `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_site_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<SetLimits>,
) -> Result<Json<LimitsReport>, AdminError> {
    write(state, principal, Level::Site, id, body).await
}

/// A site's limits, and what it has used in its institution's current local day and month.
#[utoipa::path(get, path = "/admin/v1/sites/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Site id")),
    responses((status = 200, body = LimitsReport), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such site", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_site_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<LimitsReport>, AdminError> {
    read(state, principal, Level::Site, id).await
}

/// Sets a group's limits, carved out of its institution's like a site's (409 when they would
/// not fit). Admins of the institution may.
#[utoipa::path(put, path = "/admin/v1/groups/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Group id")),
    request_body = SetLimits,
    responses(
        (status = 200, body = LimitsReport),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody),
        (status = 409, description = "The allotments would add up to more than the level \
            above allows; `param` names the limit, the message both levels and numbers",
            body = ErrorBody),
        (status = 422, description = "A limit is not a whole number in range (or dollars); \
            `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_group_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<SetLimits>,
) -> Result<Json<LimitsReport>, AdminError> {
    write(state, principal, Level::Group, id, body).await
}

/// A group's limits, and what it has used in its institution's current local day and month.
#[utoipa::path(get, path = "/admin/v1/groups/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Group id")),
    responses((status = 200, body = LimitsReport), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_group_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<LimitsReport>, AdminError> {
    read(state, principal, Level::Group, id).await
}

/// Sets a key's limits, carved out of its group's, else its site's, else its institution's
/// (409 when they would not fit). Admins of the institution may.
#[utoipa::path(put, path = "/admin/v1/keys/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Key id")),
    request_body = SetLimits,
    responses(
        (status = 200, body = LimitsReport),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody),
        (status = 409, description = "The allotments would add up to more than the level \
            above allows; `param` names the limit, the message both levels and numbers",
            body = ErrorBody),
        (status = 422, description = "A limit is not a whole number in range (or dollars); \
            `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_key_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<SetLimits>,
) -> Result<Json<LimitsReport>, AdminError> {
    write(state, principal, Level::Key, id, body).await
}

/// A key's limits, and what it has used in its institution's current local day and month.
#[utoipa::path(get, path = "/admin/v1/keys/{id}/limits", tag = "limits",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = LimitsReport), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_key_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<LimitsReport>, AdminError> {
    read(state, principal, Level::Key, id).await
}

/// Sets a model's limits: operators only. They hold within each institution on its own (a
/// `tokens_per_day` of 100000 lets every institution use the model for 100000 tokens a day),
/// and are not carved from anything. The response's `usage` is `null` for a caller bound to
/// no institution.
#[utoipa::path(put, path = "/admin/v1/models/{name}/limits", tag = "limits",
    params(("name" = String, Path,
        description = "Public model name (a `/` in it percent-encoded as `%2F`)")),
    request_body = SetLimits,
    responses(
        (status = 200, body = LimitsReport),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 422, description = "A limit is not a whole number in range (or dollars); \
            `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn put_model_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
    AdminJson(body): AdminJson<SetLimits>,
) -> Result<Json<LimitsReport>, AdminError> {
    write(state, principal, Level::Model, name, body).await
}

/// A model's limits, which hold within each institution on its own. Anyone who may list
/// models may read them. A model is not counted across institutions, so `usage` is the
/// caller's own institution's use of the model (for a caller who may read its usage), and
/// `null` for a caller bound to no institution, such as the operator.
#[utoipa::path(get, path = "/admin/v1/models/{name}/limits", tag = "limits",
    params(("name" = String, Path,
        description = "Public model name (a `/` in it percent-encoded as `%2F`)")),
    responses((status = 200, body = LimitsReport), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_model_limits(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
) -> Result<Json<LimitsReport>, AdminError> {
    read(state, principal, Level::Model, name).await
}

/// Deserializes the patron id without ever echoing it: a wrong type is refused with a message
/// that does not quote the value (serde's own would).
fn patron_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        _ => Err(serde::de::Error::custom(
            "must be a string (send a card number as text)",
        )),
    }
}

/// Checks a patron id: not blank, at most [`MAX_PATRON_CHARS`] characters. The message never
/// quotes it.
fn check_patron(patron: &str) -> Result<(), AdminError> {
    if patron.trim().is_empty() || patron.chars().count() > MAX_PATRON_CHARS {
        return Err(AdminError::field(
            "patron",
            format!("patron: must be 1 to {MAX_PATRON_CHARS} characters, not all blank"),
        ));
    }
    Ok(())
}

/// Body of `POST /admin/v1/institutions/{id}/patron-extensions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendPatron {
    /// The id the institution knows the patron by (a card number, an application's user id).
    /// Used only to compute the patron's reference; never stored, logged or returned.
    #[serde(deserialize_with = "patron_id")]
    #[schema(example = "21234000123456", min_length = 1, max_length = 256)]
    pub patron: String,
    /// Tokens added to the patron's daily allotment while the extension runs.
    #[schema(minimum = 1, maximum = 1_000_000_000, example = 5000)]
    pub tokens: i64,
    /// How long the extension runs, in minutes: 1 to 1440.
    #[schema(minimum = 1, maximum = 1440, example = 60)]
    pub expires_in_minutes: i64,
}

/// Body of `POST /admin/v1/institutions/{id}/patron-day-resets`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPatronDay {
    /// The id the institution knows the patron by (a card number, an application's user id).
    /// Used only to compute the patron's reference; never stored, logged or returned.
    #[serde(deserialize_with = "patron_id")]
    #[schema(example = "21234000123456", min_length = 1, max_length = 256)]
    pub patron: String,
}

/// A patron's day started afresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct PatronDayReset {
    /// The patron's reference (a keyed hash of the id; never the id itself).
    #[schema(example = "pat_3f0c9a1b2c4d5e6f708192a3b4c5d6e7")]
    pub patron_ref: String,
    /// The institution's local day that starts afresh.
    #[schema(example = "2026-11-26")]
    pub day: String,
}

/// Grants a patron extra tokens on top of their daily allotment, for a while (at the front
/// desk: "I need to finish this application"). Staff and admins of the institution may;
/// auditors may not. In effect before the response.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/patron-extensions", tag = "limits",
    params(("id" = String, Path, description = "Institution id")),
    request_body = ExtendPatron,
    responses(
        (status = 201, body = PatronExtension),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn extend_patron(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<ExtendPatron>,
) -> Result<(StatusCode, Json<PatronExtension>), AdminError> {
    principal.authorize(Action::ServePatrons, Some(&id))?;
    check_patron(&body.patron)?;
    if !(1..=MAX_EXTENSION_TOKENS).contains(&body.tokens) {
        return Err(AdminError::field(
            "tokens",
            format!("tokens: must be a whole number from 1 to {MAX_EXTENSION_TOKENS}"),
        ));
    }
    if !(1..=MAX_EXTENSION_MINUTES).contains(&body.expires_in_minutes) {
        return Err(AdminError::field(
            "expires_in_minutes",
            format!("expires_in_minutes: must be a whole number from 1 to {MAX_EXTENSION_MINUTES}"),
        ));
    }
    let inst = state.institution(&id).await?;
    let patron_ref = state.pepper.patron_ref(&inst.id, &body.patron);
    let expires_at = state.quota.now().as_second() + body.expires_in_minutes * 60;
    let ext = state
        .store
        .add_patron_extension(
            &inst.id,
            &patron_ref,
            body.tokens.unsigned_abs(),
            expires_at,
            &principal.actor(),
        )
        .await?;
    carrel_core::quota::refresh_extensions(
        &state.quota,
        &state.store,
        Some((&inst.id, &patron_ref)),
    )
    .await?;
    tracing::info!(institution = %inst.id, patron = %patron_ref, extension = %ext.id,
        tokens = ext.tokens, expires_at, "patron extension granted");
    state
        .audit(
            principal.actor(),
            "patron.extend",
            format!(
                "patron:{patron_ref} extension:{} tokens:{} until:{}",
                ext.id,
                ext.tokens,
                carrel_core::domain::rfc3339(expires_at)
            ),
            Some(&inst.id),
        )
        .await;
    Ok((StatusCode::CREATED, Json(ext)))
}

/// Starts a patron's local day afresh: what they used today no longer counts against their
/// daily allotment (it still counts against the key's, site's, group's and institution's).
/// Staff and admins of the institution may; auditors may not. In effect before the response.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/patron-day-resets", tag = "limits",
    params(("id" = String, Path, description = "Institution id")),
    request_body = ResetPatronDay,
    responses(
        (status = 200, body = PatronDayReset),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn reset_patron_day(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<ResetPatronDay>,
) -> Result<Json<PatronDayReset>, AdminError> {
    principal.authorize(Action::ServePatrons, Some(&id))?;
    check_patron(&body.patron)?;
    let inst = state.institution(&id).await?;
    let patron_ref = state.pepper.patron_ref(&inst.id, &body.patron);
    let now = state.quota.now().as_second();
    let day = local_date(now, &inst.timezone).to_string();
    state
        .store
        .reset_patron_day(&inst.id, &patron_ref, &day, now)
        .await?;
    let (inst_id, tz): (Arc<str>, Arc<str>) =
        (inst.id.as_str().into(), inst.timezone.as_str().into());
    state
        .quota
        .reset_patron_day_now(&inst_id, &tz, &patron_ref)
        .await
        .map_err(|_| {
            AdminError::StateUnavailable(carrel_core::store::StoreError::Unavailable(
                "the shared counters (Redis) cannot be reached".into(),
            ))
        })?;
    tracing::info!(institution = %inst.id, patron = %patron_ref, day = %day, "patron day reset");
    state
        .audit(
            principal.actor(),
            "patron.reset_day",
            format!("patron:{patron_ref} day:{day}"),
            Some(&inst.id),
        )
        .await;
    Ok(Json(PatronDayReset { patron_ref, day }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;
    use carrel_core::quota::limits::{
        MAX_CONCURRENT_STREAMS, MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_LIMIT,
    };

    fn patch(body: &str) -> Result<LimitsPatch, AdminError> {
        parse::<SetLimits>(body.as_bytes())?.patch()
    }

    fn param(body: &str) -> String {
        match patch(body).unwrap_err() {
            AdminError::InvalidField { field, .. } => field,
            other => panic!("{body}: expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn absent_leaves_null_removes_a_number_sets() {
        let p = patch(r#"{"tokens_per_day": 1000, "requests_per_minute": null}"#).unwrap();
        assert_eq!(p.get(LimitKind::TokensPerDay), Some(Some(1000)));
        assert_eq!(p.get(LimitKind::RequestsPerMinute), Some(None));
        for kind in [
            LimitKind::TokensPerMonth,
            LimitKind::CostPerMonth,
            LimitKind::ConcurrentStreams,
            LimitKind::PatronTokensPerDay,
        ] {
            assert_eq!(p.get(kind), None, "{kind:?} was not in the body");
        }
        assert_eq!(patch("{}").unwrap(), LimitsPatch::default());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (body, field) in [
            (r#"{"tokens_per_day": 0}"#, "tokens_per_day"),
            (r#"{"tokens_per_day": -5}"#, "tokens_per_day"),
            (r#"{"tokens_per_day": 1.5}"#, "tokens_per_day"),
            (r#"{"tokens_per_day": 2.0}"#, "tokens_per_day"),
            (r#"{"tokens_per_day": "x"}"#, "tokens_per_day"),
            (r#"{"tokens_per_day": true}"#, "tokens_per_day"),
            (r#"{"tokens_per_month": 1000000000001}"#, "tokens_per_month"),
            (
                r#"{"requests_per_minute": 10000001}"#,
                "requests_per_minute",
            ),
            (r#"{"concurrent_streams": 1000001}"#, "concurrent_streams"),
            (r#"{"patron_tokens_per_day": [1]}"#, "patron_tokens_per_day"),
            (r#"{"cost_per_month_usd": 0}"#, "cost_per_month_usd"),
            (r#"{"cost_per_month_usd": -1}"#, "cost_per_month_usd"),
            (
                r#"{"cost_per_month_usd": 0.0000000001}"#,
                "cost_per_month_usd",
            ),
            (
                r#"{"cost_per_month_usd": 1000000000.01}"#,
                "cost_per_month_usd",
            ),
            (r#"{"cost_per_month_usd": "5"}"#, "cost_per_month_usd"),
            (r#"{"tokens_per_week": 5}"#, "tokens_per_week"),
        ] {
            assert_eq!(param(body), field, "{body}");
        }
        assert!(matches!(
            patch(r#"{"tokens_per_day": 1"#).unwrap_err(),
            AdminError::MalformedJson(_)
        ));
    }

    #[test]
    fn limits_at_the_maxima_are_accepted() {
        let p = patch(
            r#"{"requests_per_minute": 10000000, "tokens_per_day": 1000000000000,
                "concurrent_streams": 1000000, "cost_per_month_usd": 1000000000}"#,
        )
        .unwrap();
        assert_eq!(
            p.get(LimitKind::RequestsPerMinute),
            Some(Some(MAX_REQUESTS_PER_MINUTE))
        );
        assert_eq!(p.get(LimitKind::TokensPerDay), Some(Some(MAX_TOKENS_LIMIT)));
        assert_eq!(
            p.get(LimitKind::ConcurrentStreams),
            Some(Some(MAX_CONCURRENT_STREAMS))
        );
        assert_eq!(
            p.get(LimitKind::CostPerMonth),
            Some(Some(MAX_COST_NANO_USD))
        );
    }

    #[test]
    fn dollars_become_rounded_nano_dollars_and_back() {
        let p = patch(r#"{"cost_per_month_usd": 12.34}"#).unwrap();
        assert_eq!(p.get(LimitKind::CostPerMonth), Some(Some(12_340_000_000)));
        let p = patch(r#"{"cost_per_month_usd": 50}"#).unwrap();
        assert_eq!(p.get(LimitKind::CostPerMonth), Some(Some(50_000_000_000)));
        let p = patch(r#"{"cost_per_month_usd": 0.0000000016}"#).unwrap();
        assert_eq!(p.get(LimitKind::CostPerMonth), Some(Some(2)));
        let values = LimitValues::from(Limits {
            cost_per_month_nano_usd: Some(12_340_000_000),
            ..Limits::default()
        });
        assert_eq!(values.cost_per_month_usd, Some(12.34));
        assert_eq!(values.tokens_per_day, None);
    }

    #[test]
    fn the_documented_maxima_are_the_core_ones() {
        let doc =
            serde_json::to_value(<crate::doc::AdminApi as utoipa::OpenApi>::openapi()).unwrap();
        let props = &doc["components"]["schemas"]["SetLimits"]["properties"];
        for kind in LimitKind::ALL {
            let max = match kind {
                LimitKind::CostPerMonth => (kind.max() / NANO_PER_USD) as f64,
                _ => kind.max() as f64,
            };
            assert_eq!(
                props[kind.field()]["maximum"].as_f64(),
                Some(max),
                "{}",
                kind.field()
            );
        }
    }

    #[test]
    fn the_audit_summary_lists_what_is_set() {
        let limits = Limits {
            tokens_per_day: Some(1000),
            cost_per_month_nano_usd: Some(50_500_000_000),
            ..Limits::default()
        };
        assert_eq!(
            summary(&limits),
            "tokens_per_day=1000 cost_per_month_usd=50.5"
        );
        assert_eq!(summary(&Limits::default()), "no limits");
    }

    #[test]
    fn a_patron_id_is_never_quoted_back() {
        for body in [
            r#"{"patron": 21234000123456}"#,
            r#"{"patron": ["21234000123456"]}"#,
        ] {
            let err = parse::<ResetPatronDay>(body.as_bytes()).unwrap_err();
            let AdminError::InvalidField { field, message } = err else {
                panic!("{body}: expected a field error");
            };
            assert_eq!(field, "patron");
            assert!(!message.contains("1234000"), "{message}");
        }
        let long = "9".repeat(MAX_PATRON_CHARS + 1);
        for patron in ["", "   ", long.as_str()] {
            let err = check_patron(patron).unwrap_err();
            assert!(!err.to_string().contains("9999"), "{err}");
        }
        assert!(check_patron(&"é".repeat(MAX_PATRON_CHARS)).is_ok());
    }
}
