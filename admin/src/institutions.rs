//! Institutions and their API keys.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{
    ApiKey, Institution, InstitutionKind, KeyKind, Tier, validate_region, validate_timezone,
};
use carrel_core::keys::NewKey;
use carrel_core::store::{NewApiKey, NewInstitution};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;

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
    let inst = state
        .store
        .create_institution(NewInstitution {
            name: body.name,
            kind: body.kind,
            region: body.region,
            timezone: body.timezone,
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

/// Lists institutions.
#[utoipa::path(get, path = "/admin/v1/institutions", tag = "institutions",
    responses((status = 200, body = [Institution]), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_institutions(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
) -> Result<Json<Vec<Institution>>, AdminError> {
    let mut all = state.store.list_institutions().await?;
    // Everyone but the operator sees only their own institution.
    all.retain(|inst| principal.authorize(Action::Read, Some(&inst.id)).is_ok());
    Ok(Json(all))
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
    let inst = state
        .store
        .get_institution(&id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("institution `{id}`")))?;
    Ok(Json(inst))
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

/// Lists an institution's keys (never their secrets).
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/keys", tag = "keys",
    params(("id" = String, Path, description = "Institution id")),
    responses((status = 200, body = [ApiKey]), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_keys(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(institution_id): Path<String>,
) -> Result<Json<Vec<ApiKey>>, AdminError> {
    principal.authorize(Action::Read, Some(&institution_id))?;
    if state
        .store
        .get_institution(&institution_id)
        .await?
        .is_none()
    {
        return Err(AdminError::NotFound(format!(
            "institution `{institution_id}`"
        )));
    }
    Ok(Json(state.store.list_keys(&institution_id).await?))
}

/// A key the caller may manage. Another institution's key is "not found", exactly like a key
/// that does not exist.
async fn managed_key(
    state: &AdminState,
    principal: &AdminPrincipal,
    id: &str,
) -> Result<ApiKey, AdminError> {
    let not_found = || AdminError::NotFound(format!("key `{id}`"));
    let key = state.store.get_key(id).await?.ok_or_else(not_found)?;
    principal
        .authorize(Action::ManageKeys, Some(&key.institution_id))
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
