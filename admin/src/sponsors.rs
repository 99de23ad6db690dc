//! Sponsor pools: a funder's money for chosen institutions (see
//! `carrel_core::store::sponsors` for the order in which spend is paid). Operators manage them
//! on the funder's behalf; every change is in the audit trail, and top-ups and draws are in the
//! pool's ledger.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{local_date, unix_now};
use carrel_core::store::{SponsorEntry, SponsorPool};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::AdminQuery;

/// The most one top-up or monthly cap may be, in US dollars.
pub const MAX_AMOUNT_USD: f64 = 100_000_000.0;

/// Body of `POST /admin/v1/sponsor-pools`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    /// Display name, unique.
    #[schema(example = "State library AI access fund 2027")]
    pub name: String,
    /// Who funds it.
    #[schema(example = "Illinois State Library")]
    pub funder: String,
}

/// Body of `PUT /admin/v1/sponsor-pools/{pool}/members/{institution_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    /// Most the pool pays for the institution in a month, in US dollars; `null` or absent: no
    /// cap.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000_000)]
    pub monthly_cap_usd: Option<f64>,
}

/// Body of `POST /admin/v1/sponsor-pools/{pool}/top-ups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUp {
    /// US dollars, more than 0.
    #[schema(example = 5000.0, maximum = 100_000_000)]
    pub amount_usd: f64,
    /// What the funder wants recorded (a grant number, say).
    #[serde(default)]
    #[schema(max_length = 500)]
    pub note: Option<String>,
}

/// A pool's ledger.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolLedger {
    /// Top-ups and draws, oldest first.
    pub data: Vec<SponsorEntry>,
}

/// Every pool.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolList {
    /// Oldest first.
    pub data: Vec<SponsorPool>,
}

/// What a settlement did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Settled {
    /// The last local day paid for.
    pub through: String,
    /// Draws recorded.
    pub draws: usize,
}

fn dollars(field: &'static str, usd: f64, zero_ok: bool) -> Result<i64, AdminError> {
    let ok = usd.is_finite() && usd <= MAX_AMOUNT_USD && (usd > 0.0 || (zero_ok && usd == 0.0));
    if !ok {
        return Err(AdminError::field(
            field,
            format!(
                "{field}: {} to {MAX_AMOUNT_USD} US dollars",
                if zero_ok { "0" } else { "more than 0" }
            ),
        ));
    }
    Ok((usd * 1e9).round() as i64)
}

async fn pool(state: &AdminState, id: &str) -> Result<SponsorPool, AdminError> {
    state
        .store
        .sponsor_pool(id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("pool `{id}`")))
}

/// Creates a pool. Operators only.
#[utoipa::path(post, path = "/admin/v1/sponsor-pools", tag = "sponsors",
    request_body = CreatePool,
    responses(
        (status = 201, body = SponsorPool),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_pool(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreatePool>,
) -> Result<(StatusCode, Json<SponsorPool>), AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    AdminError::check_name("name", &body.name, 200)?;
    AdminError::check_name("funder", &body.funder, 200)?;
    let pool = state
        .store
        .create_sponsor_pool(&body.name, &body.funder)
        .await?;
    state
        .audit(
            principal.actor(),
            "sponsor_pool.create",
            format!("pool:{}", pool.id),
            None,
        )
        .await;
    Ok((StatusCode::CREATED, Json(pool)))
}

/// Lists pools with their balances and members. Operators only.
#[utoipa::path(get, path = "/admin/v1/sponsor-pools", tag = "sponsors",
    responses((status = 200, body = PoolList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_pools(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
) -> Result<Json<PoolList>, AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    let mut data = Vec::new();
    for id in state.store.sponsor_pool_ids().await? {
        data.push(pool(&state, &id).await?);
    }
    Ok(Json(PoolList { data }))
}

/// One pool. Operators only.
#[utoipa::path(get, path = "/admin/v1/sponsor-pools/{pool}", tag = "sponsors",
    params(("pool" = String, Path, description = "Pool id")),
    responses((status = 200, body = SponsorPool), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_pool(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<SponsorPool>, AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    Ok(Json(pool(&state, &id).await?))
}

/// Makes an institution a member of a pool (last in its order of pools), or changes its
/// monthly cap. Operators only.
#[utoipa::path(put, path = "/admin/v1/sponsor-pools/{pool}/members/{institution_id}",
    tag = "sponsors",
    params(("pool" = String, Path, description = "Pool id"),
        ("institution_id" = String, Path, description = "Institution id")),
    request_body = SetMember,
    responses(
        (status = 200, body = SponsorPool),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such pool or institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn set_member(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path((id, institution_id)): Path<(String, String)>,
    AdminJson(body): AdminJson<SetMember>,
) -> Result<Json<SponsorPool>, AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    let cap = body
        .monthly_cap_usd
        .map(|usd| dollars("monthly_cap_usd", usd, true))
        .transpose()?;
    state
        .store
        .set_sponsor_member(&id, &institution_id, cap)
        .await?;
    state
        .audit(
            principal.actor(),
            "sponsor_pool.member",
            format!("pool:{id}"),
            Some(&institution_id),
        )
        .await;
    Ok(Json(pool(&state, &id).await?))
}

/// Adds money to a pool. Operators only, for the funder.
#[utoipa::path(post, path = "/admin/v1/sponsor-pools/{pool}/top-ups", tag = "sponsors",
    params(("pool" = String, Path, description = "Pool id")),
    request_body = TopUp,
    responses(
        (status = 201, body = SponsorPool),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn top_up(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<TopUp>,
) -> Result<(StatusCode, Json<SponsorPool>), AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    let amount = dollars("amount_usd", body.amount_usd, false)?;
    if let Some(note) = &body.note {
        AdminError::check_name("note", note, 500)?;
    }
    state
        .store
        .top_up_sponsor_pool(&id, amount, body.note, &principal.actor())
        .await?;
    state
        .audit(
            principal.actor(),
            "sponsor_pool.top_up",
            format!("pool:{id}"),
            None,
        )
        .await;
    Ok((StatusCode::CREATED, Json(pool(&state, &id).await?)))
}

/// A pool's top-ups and draws, oldest first. Operators only.
#[utoipa::path(get, path = "/admin/v1/sponsor-pools/{pool}/ledger", tag = "sponsors",
    params(("pool" = String, Path, description = "Pool id")),
    responses((status = 200, body = PoolLedger), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn ledger(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<PoolLedger>, AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    pool(&state, &id).await?;
    Ok(Json(PoolLedger {
        data: state.store.sponsor_ledger(&id).await?,
    }))
}

/// How far back a settlement looks for spend not yet paid: a little over two months.
const SETTLE_DAYS: i64 = 62;

/// The latest local day anywhere: tomorrow in UTC (UTC+14 is a day ahead).
fn latest_day() -> jiff::civil::Date {
    let today = local_date(unix_now(), "UTC");
    today.tomorrow().unwrap_or(today)
}

/// Pays member institutions' spend from their pools for their days up to `through` (and back
/// [`SETTLE_DAYS`]), each day what pools have not paid for it yet, and gives the institutions
/// the room in their own money budgets. Runs hourly by itself.
pub async fn settle(state: &AdminState, through: jiff::civil::Date) -> Result<usize, AdminError> {
    // Most deployments have no pools: then nothing to flush, pay or reload, hourly or at start.
    if state.store.sponsor_pool_ids().await?.is_empty() {
        return Ok(0);
    }
    state.hooks.usage_flush().await;
    let first = through
        .checked_sub(jiff::Span::new().days(SETTLE_DAYS))
        .unwrap_or(through);
    let draws = state
        .store
        .settle_sponsor_draws(&first.to_string(), &through.to_string())
        .await?;
    // Reloaded every time: a new month drops last month's room.
    state.quota.set_limits(state.store.limits_table().await?);
    if draws > 0 {
        tracing::info!(draws, through = %through, "sponsor pools paid for member institutions");
    }
    Ok(draws)
}

/// [`settle`] through every day so far, for the hourly upkeep.
pub async fn settle_due(state: &AdminState) -> Result<usize, AdminError> {
    settle(state, latest_day()).await
}

/// Settles draws now, rather than at the next hourly settlement. Operators only.
#[utoipa::path(post, path = "/admin/v1/sponsor-pools/settle", tag = "sponsors",
    params(("through" = Option<String>, Query, format = Date,
        description = "The last local day to pay for (default: every day so far); a day still \
                       running is paid for what it has spent, and the rest at a later \
                       settlement")),
    responses((status = 200, body = Settled), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 422, description = "`through` is not a date, or is in the future", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn settle_now(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Settled>, AdminError> {
    principal.authorize(Action::ManageSponsors, None)?;
    query.only(&["through"])?;
    let through = match query.text("through") {
        None => latest_day(),
        Some(v) => v
            .parse::<jiff::civil::Date>()
            .map_err(|_| AdminError::field("through", format!("through: `{v}` is not a date")))?,
    };
    if through > latest_day() {
        return Err(AdminError::field("through", "through: not in the future"));
    }
    let draws = settle(&state, through).await?;
    state
        .audit(
            principal.actor(),
            "sponsor_pool.settle",
            format!("through:{through}"),
            None,
        )
        .await;
    Ok(Json(Settled {
        through: through.to_string(),
        draws,
    }))
}
