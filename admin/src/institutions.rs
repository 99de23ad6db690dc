//! Institutions and their API keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{
    ApiKey, Institution, InstitutionKind, InstitutionStatus, KeyKind, OverQuota, Tier,
    validate_region, validate_sector, validate_timezone,
};
use carrel_core::keys::NewKey;
use carrel_core::store::{
    InstitutionPatch, KeyPatch, NewApiKey, NewInstitution, Page, PageRequest,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::{AdminJson, present};
use crate::query::{AdminQuery, PageParams};

/// Body of `POST /admin/v1/institutions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstitution {
    /// Display name.
    #[schema(
        example = "Springfield Public Library",
        min_length = 1,
        max_length = 200
    )]
    pub name: String,
    /// Sector.
    pub kind: InstitutionKind,
    /// ISO 3166-2 subdivision code.
    #[schema(example = "US-IL", pattern = "^[A-Z]{2}-[A-Z0-9]{1,3}$")]
    pub region: String,
    /// IANA time zone its days and months are counted in.
    #[schema(example = "America/Chicago")]
    pub timezone: String,
    /// Label for reports by sector: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
    #[serde(default)]
    #[schema(example = "public_library", pattern = "^[a-z0-9_-]{1,64}$")]
    pub sector: Option<String>,
}

/// Body of `PATCH /admin/v1/institutions/{id}`: only the fields given change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateInstitution {
    /// Display name.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    /// Sector label; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    pub sector: Option<Option<String>>,
    /// IANA time zone.
    #[serde(default)]
    pub timezone: Option<String>,
    /// `suspended` refuses every key of the institution at once (operators only).
    #[serde(default)]
    pub status: Option<InstitutionStatus>,
    /// Verified for frontier models (operators only).
    #[serde(default)]
    pub frontier_verified: Option<bool>,
    /// What happens to a request whose estimate is more than what is left of a token or
    /// money limit: `reject` (429) or `clamp` (lower `max_tokens` to what is left).
    #[serde(default)]
    pub over_quota: Option<OverQuota>,
    /// The highest tier any key of the institution may reach.
    #[serde(default)]
    pub tier_ceiling: Option<Tier>,
    /// The highest tier the institution's minors may reach (default `baseline`): raising it
    /// is the institution's explicit decision.
    #[serde(default)]
    pub minor_tier_ceiling: Option<Tier>,
    /// `true` stops every request of the institution on every replica within a second;
    /// `false` releases it (operators only).
    #[serde(default)]
    pub contained: Option<bool>,
    /// Hours a usage record names its patron (by keyed-hash reference) before the reference
    /// is removed, 1 to 168 (default 24).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 168)]
    pub patron_retention_hours: Option<u32>,
    /// `true`: the response cache may answer any request of the institution, as if it said
    /// `x-carrel-cache: allow` (never minors' or screened ones); `false` (default): only
    /// deterministic requests and those that opt in.
    #[serde(default)]
    pub cache_all: Option<bool>,
    /// What a cached answer costs, in percent of what the provider charged for it: counted
    /// against money budgets and in reports (default 0: free).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub cache_price_percent: Option<u8>,
    /// `true`: when every deployment of a model fails before answering, its fallback models
    /// (set by the operator) may answer instead (default `false`).
    #[serde(default)]
    pub allow_fallback: Option<bool>,
}

/// Body of `PATCH /admin/v1/keys/{id}`: only the fields given change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    /// Display name.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    /// Highest model tier the key may reach.
    #[serde(default)]
    pub tier_ceiling: Option<Tier>,
    /// RFC 3339 time after which the key stops working, in the future; `null`: never.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// Public names of the only models the key may use; `null`: any within its tier ceiling.
    #[serde(default, deserialize_with = "present")]
    pub allowed_models: Option<Option<Vec<String>>>,
    /// `true` stops every request made with the key (patron sessions on it included) on
    /// every replica within a second; `false` releases it (operators only).
    #[serde(default)]
    pub contained: Option<bool>,
}

/// Body of `POST /admin/v1/institutions/{id}/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Display name, e.g. the kiosk's location.
    #[schema(example = "Main branch kiosk 3", min_length = 1, max_length = 200)]
    pub name: String,
    /// What the key is for.
    pub kind: KeyKind,
    /// Highest model tier the key may reach (default `advanced`; `frontier` must be asked for).
    #[serde(default)]
    pub tier_ceiling: Option<Tier>,
    /// RFC 3339 time after which the key stops working; must be in the future.
    #[serde(default)]
    #[schema(example = "2027-06-30T23:59:59Z")]
    pub expires_at: Option<String>,
    /// A site of the same institution the key belongs to.
    #[serde(default)]
    pub site_id: Option<String>,
    /// A group of the same institution the key belongs to.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Public names of the only models the key may use (within its tier ceiling).
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
}

/// Body of `POST /admin/v1/keys/{id}/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working, 0 to 604800 seconds (7 days); default 86400.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 604800)]
    pub overlap_seconds: Option<i64>,
}

/// Longest overlap a rotation allows.
pub const MAX_OVERLAP_SECS: i64 = 7 * 24 * 60 * 60;

/// Parses a future RFC 3339 time into the store's whole-second form.
fn future_time(field: &'static str, value: &str, now: i64) -> Result<String, AdminError> {
    let at = value
        .parse::<jiff::Timestamp>()
        .map_err(|e| AdminError::field(field, format!("{field}: not an RFC 3339 time ({e})")))?;
    if at.as_second() <= now {
        return Err(AdminError::field(
            field,
            format!("{field}: must be in the future"),
        ));
    }
    Ok(carrel_core::domain::rfc3339(at.as_second()))
}

/// Most models a key's allow-list names.
pub const MAX_ALLOWED_MODELS: usize = 100;

/// Checks an allow-list of models: each one exists in the catalog, none twice.
async fn check_allowed_models(state: &AdminState, models: &[String]) -> Result<(), AdminError> {
    if models.len() > MAX_ALLOWED_MODELS {
        return Err(AdminError::field(
            "allowed_models",
            format!("allowed_models: at most {MAX_ALLOWED_MODELS} models"),
        ));
    }
    let catalog = state.store.list_models(PageRequest::ALL).await?.data;
    for (i, name) in models.iter().enumerate() {
        let field = format!("allowed_models[{i}]");
        if !catalog.iter().any(|m| &m.name == name) {
            return Err(AdminError::field(
                field.clone(),
                format!("{field}: no model named `{name}`"),
            ));
        }
        if models[..i].contains(name) {
            return Err(AdminError::field(
                field.clone(),
                format!("{field}: `{name}` is listed twice"),
            ));
        }
    }
    Ok(())
}

/// A key just created: the only response that ever carries its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key.
    #[serde(flatten)]
    pub key: ApiKey,
    /// The whole API key (`crl_…`) to send as `Authorization: Bearer`. Shown once.
    pub secret: String,
}

/// Creates an institution.
#[utoipa::path(post, path = "/admin/v1/institutions", tag = "institutions",
    request_body = CreateInstitution,
    responses(
        (status = 201, body = Institution),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_institution(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreateInstitution>,
) -> Result<(StatusCode, Json<Institution>), AdminError> {
    principal.authorize(Action::CreateInstitution, None)?;
    AdminError::check_name("name", &body.name, 200)?;
    validate_region(&body.region)
        .map_err(|m| AdminError::field("region", format!("region: {m}")))?;
    validate_timezone(&body.timezone)
        .map_err(|m| AdminError::field("timezone", format!("timezone: {m}")))?;
    if let Some(sector) = &body.sector {
        validate_sector(sector).map_err(|m| AdminError::field("sector", format!("sector: {m}")))?;
    }
    let inst = state
        .store
        .create_institution(NewInstitution {
            name: body.name,
            kind: body.kind,
            region: body.region,
            timezone: body.timezone,
            sector: body.sector,
        })
        .await?;
    tracing::info!(institution = %inst.id, kind = %inst.kind, region = %inst.region, "institution created");
    state
        .audit(
            principal.actor(),
            "institution.create",
            format!("institution:{}", inst.id),
            Some(&inst.id),
        )
        .await;
    Ok((StatusCode::CREATED, Json(inst)))
}

/// Lists institutions: all of them for the operator, the caller's own otherwise.
#[utoipa::path(get, path = "/admin/v1/institutions", tag = "institutions",
    params(PageParams),
    responses((status = 200, body = Page<Institution>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_institutions(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Page<Institution>>, AdminError> {
    let page = query.page()?;
    let own = principal.institution().map(str::to_owned);
    principal.authorize(Action::Read, own.as_deref())?;
    match own {
        None => Ok(Json(state.store.list_institutions(page).await?)),
        // The caller's own institution is the whole list: one row, on the first page.
        Some(own) => {
            let data = match page.after {
                None => state
                    .store
                    .get_institution(&own)
                    .await?
                    .into_iter()
                    .collect(),
                Some(_) => Vec::new(),
            };
            Ok(Json(Page::whole(data)))
        }
    }
}

/// Changes an institution. Its admins may change the name, sector and time zone; only an
/// operator may change `status` or `frontier_verified`. Suspending takes effect on every
/// listener before the response.
#[utoipa::path(patch, path = "/admin/v1/institutions/{id}", tag = "institutions",
    params(("id" = String, Path, description = "Institution id")),
    request_body = UpdateInstitution,
    responses(
        (status = 200, body = Institution),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not the caller's to change", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn update_institution(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<UpdateInstitution>,
) -> Result<Json<Institution>, AdminError> {
    principal.authorize(Action::ManageInstitution, Some(&id))?;
    if body.status.is_some() || body.frontier_verified.is_some() {
        principal.authorize(Action::GovernInstitution, Some(&id))?;
    }
    if body.contained.is_some() {
        principal.authorize(Action::Contain, Some(&id))?;
    }
    if let Some(name) = &body.name {
        AdminError::check_name("name", name, 200)?;
    }
    if let Some(Some(sector)) = &body.sector {
        validate_sector(sector).map_err(|m| AdminError::field("sector", format!("sector: {m}")))?;
    }
    if let Some(hours) = body.patron_retention_hours
        && !(1..=carrel_core::store::MAX_PATRON_RETENTION_HOURS).contains(&hours)
    {
        return Err(AdminError::field(
            "patron_retention_hours",
            "patron_retention_hours: 1 to 168 (7 days)",
        ));
    }
    if body.cache_price_percent.is_some_and(|p| p > 100) {
        return Err(AdminError::field(
            "cache_price_percent",
            "cache_price_percent: 0 to 100",
        ));
    }
    if let Some(tz) = &body.timezone {
        validate_timezone(tz)
            .map_err(|m| AdminError::field("timezone", format!("timezone: {m}")))?;
    }
    let governs = body.status.is_some() || body.frontier_verified.is_some();
    let inst = state
        .store
        .update_institution(
            &id,
            InstitutionPatch {
                name: body.name,
                sector: body.sector,
                timezone: body.timezone,
                status: body.status,
                frontier_verified: body.frontier_verified,
                over_quota: body.over_quota,
                tier_ceiling: body.tier_ceiling,
                minor_tier_ceiling: body.minor_tier_ceiling,
                patron_retention_hours: body.patron_retention_hours,
                cache_all: body.cache_all,
                cache_price_percent: body.cache_price_percent,
                allow_fallback: body.allow_fallback,
            },
        )
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("institution `{id}`")))?;
    if let Some(contained) = body.contained {
        crate::safeguards::switch(
            &state,
            &principal,
            carrel_core::domain::ContainmentKind::Institution,
            &id,
            Some(&id),
            contained,
        )
        .await?;
    }
    // Cached principals carry the status and time zone.
    state.hooks.institution_changed(&id).await;
    tracing::info!(institution = %id, status = %inst.status,
        frontier_verified = inst.frontier_verified, "institution updated");
    state
        .audit(
            principal.actor(),
            if governs {
                "institution.govern"
            } else {
                "institution.update"
            },
            format!("institution:{id}"),
            Some(&id),
        )
        .await;
    Ok(Json(inst))
}

/// One institution.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}", tag = "institutions",
    params(("id" = String, Path, description = "Institution id")),
    responses((status = 200, body = Institution), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_institution(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<Institution>, AdminError> {
    principal.authorize(Action::Read, Some(&id))?;
    Ok(Json(state.institution(&id).await?))
}

/// Creates an API key for an institution. The response is the only time the secret is shown.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/keys", tag = "keys",
    params(("id" = String, Path, description = "Institution id")),
    request_body = CreateKey,
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_key(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(institution_id): Path<String>,
    AdminJson(body): AdminJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), AdminError> {
    principal.authorize(Action::ManageKeys, Some(&institution_id))?;
    AdminError::check_name("name", &body.name, 200)?;
    let now = carrel_core::domain::unix_now();
    let expires_at = body
        .expires_at
        .as_deref()
        .map(|v| future_time("expires_at", v, now))
        .transpose()?;
    if let Some(models) = &body.allowed_models {
        check_allowed_models(&state, models).await?;
    }
    let (site_ok, group_ok) = state
        .store
        .belongs_to(
            &institution_id,
            body.site_id.as_deref(),
            body.group_id.as_deref(),
        )
        .await?;
    if !site_ok {
        return Err(AdminError::field(
            "site_id",
            "site_id: no such site in this institution",
        ));
    }
    if !group_ok {
        return Err(AdminError::field(
            "group_id",
            "group_id: no such group in this institution",
        ));
    }
    let minted = NewKey::generate();
    let key = state
        .store
        .create_key(NewApiKey {
            id: minted.id.clone(),
            institution_id,
            name: body.name,
            kind: body.kind,
            tier_ceiling: body.tier_ceiling.unwrap_or(Tier::Advanced),
            secret_hash: state.pepper.hash_secret(minted.secret()),
            expires_at,
            site_id: body.site_id,
            group_id: body.group_id,
            allowed_models: body.allowed_models,
        })
        .await?;
    tracing::info!(key = %key.id, institution = %key.institution_id, kind = %key.kind, "api key created");
    state
        .audit(
            principal.actor(),
            "key.create",
            format!("key:{}", key.id),
            Some(&key.institution_id),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            secret: minted.token,
        }),
    ))
}

/// Lists an institution's keys, oldest first (never their secrets).
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/keys", tag = "keys",
    params(("id" = String, Path, description = "Institution id"), PageParams),
    responses((status = 200, body = Page<ApiKey>), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_keys(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(institution_id): Path<String>,
    query: AdminQuery,
) -> Result<Json<Page<ApiKey>>, AdminError> {
    principal.authorize(Action::Read, Some(&institution_id))?;
    let page = query.page()?;
    Ok(Json(state.store.list_keys(&institution_id, page).await?))
}

/// A key the caller may manage. Another institution's key is "not found", exactly like a key
/// that does not exist.
async fn managed_key(
    state: &AdminState,
    principal: &AdminPrincipal,
    id: &str,
) -> Result<ApiKey, AdminError> {
    key_for(state, principal, id, Action::ManageKeys).await
}

/// A key the caller may do `action` to, revoked or not. Another institution's key is "not
/// found", exactly like a key that does not exist.
pub(crate) async fn key_for(
    state: &AdminState,
    principal: &AdminPrincipal,
    id: &str,
    action: Action,
) -> Result<ApiKey, AdminError> {
    let not_found = || AdminError::NotFound(format!("key `{id}`"));
    let key = state.store.get_key(id).await?.ok_or_else(not_found)?;
    principal
        .authorize(action, Some(&key.institution_id))
        .map_err(|e| match e {
            AdminError::NotFound(_) => not_found(),
            other => other,
        })?;
    Ok(key)
}

/// Revokes a key; it stops working on every listener at once.
#[utoipa::path(delete, path = "/admin/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn revoke_key(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let institution = managed_key(&state, &principal, &id).await?.institution_id;
    if !state.store.revoke_key(&id).await? {
        return Err(AdminError::NotFound(format!("key `{id}`")));
    }
    state.hooks.key_changed(&id).await;
    tracing::info!(key = %id, "api key revoked");
    state
        .audit(
            principal.actor(),
            "key.revoke",
            format!("key:{id}"),
            Some(&institution),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces a key with a new secret. The new key has the old one's settings; the old one keeps
/// working for `overlap_seconds` so deployed clients can be switched over, then expires.
#[utoipa::path(post, path = "/admin/v1/keys/{id}/rotate", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body = RotateKey,
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody),
        (status = 422, body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn rotate_key(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<RotateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), AdminError> {
    let old = managed_key(&state, &principal, &id).await?;
    if old.revoked_at.is_some() {
        return Err(AdminError::NotFound(format!("key `{id}`")));
    }
    let overlap = body.overlap_seconds.unwrap_or(24 * 60 * 60);
    if !(0..=MAX_OVERLAP_SECS).contains(&overlap) {
        return Err(AdminError::field(
            "overlap_seconds",
            format!("overlap_seconds: must be 0 to {MAX_OVERLAP_SECS}"),
        ));
    }
    let now = carrel_core::domain::unix_now();
    let minted = NewKey::generate();
    let key = state
        .store
        .rotate_key(
            &id,
            NewApiKey {
                id: minted.id.clone(),
                institution_id: old.institution_id.clone(),
                name: old.name,
                kind: old.kind,
                tier_ceiling: old.tier_ceiling,
                secret_hash: state.pepper.hash_secret(minted.secret()),
                expires_at: old.expires_at,
                site_id: old.site_id,
                group_id: old.group_id,
                allowed_models: old.allowed_models,
            },
            carrel_core::domain::rfc3339(now + overlap),
        )
        .await?;
    // The old key's cached principal carries its old expiry.
    state.hooks.key_changed(&id).await;
    tracing::info!(old = %id, new = %key.id, overlap, "api key rotated");
    state
        .audit(
            principal.actor(),
            "key.rotate",
            format!("key:{id}"),
            Some(&key.institution_id),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key,
            secret: minted.token,
        }),
    ))
}

/// Changes a key: its name, tier ceiling, expiry (set, move, or clear with `null`) or allowed
/// models. Takes effect on every listener before the response.
#[utoipa::path(patch, path = "/admin/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "Key id")),
    request_body = UpdateKey,
    responses(
        (status = 200, body = ApiKey),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn update_key(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<UpdateKey>,
) -> Result<Json<ApiKey>, AdminError> {
    let old = managed_key(&state, &principal, &id).await?;
    if body.contained.is_some() {
        principal.authorize(Action::Contain, Some(&old.institution_id))?;
    }
    if let Some(name) = &body.name {
        AdminError::check_name("name", name, 200)?;
    }
    let now = carrel_core::domain::unix_now();
    let expires_at = match body.expires_at {
        Some(Some(at)) => Some(Some(future_time("expires_at", &at, now)?)),
        other => other,
    };
    if let Some(Some(models)) = &body.allowed_models {
        check_allowed_models(&state, models).await?;
    }
    let key = state
        .store
        .update_key(
            &id,
            KeyPatch {
                name: body.name,
                tier_ceiling: body.tier_ceiling,
                expires_at,
                allowed_models: body.allowed_models,
            },
        )
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("key `{id}`")))?;
    if let Some(contained) = body.contained {
        crate::safeguards::switch(
            &state,
            &principal,
            carrel_core::domain::ContainmentKind::Key,
            &id,
            Some(&old.institution_id),
            contained,
        )
        .await?;
    }
    state.hooks.key_changed(&id).await;
    tracing::info!(key = %id, "api key updated");
    state
        .audit(
            principal.actor(),
            "key.update",
            format!("key:{id}"),
            Some(&old.institution_id),
        )
        .await;
    Ok(Json(key))
}
