//! API tokens for automation: a script that rotates kiosk keys every night, a district's
//! provisioning job. A token acts with its creator's role and institution, only within the
//! scopes it was given, until it expires or is revoked. Only its keyed hash is stored; a token
//! never creates or revokes tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{AdminToken, Role, Scope};
use carrel_core::ids::random_base62;
use carrel_core::store::{NewAdminToken, Page};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal, TOKEN_PREFIX};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::{AdminQuery, PageParams};

/// Longest lifetime of a token: one year.
pub const MAX_TOKEN_SECS: i64 = 366 * 24 * 60 * 60;

/// Body of `POST /admin/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for.
    #[schema(
        example = "nightly kiosk key rotation",
        min_length = 1,
        max_length = 200
    )]
    pub name: String,
    /// What it may do (at least one).
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
    /// Lifetime in seconds, 60 to 31622400 (366 days); default 90 days.
    #[serde(default)]
    #[schema(minimum = 60, maximum = 31622400)]
    pub ttl_seconds: Option<i64>,
    /// The institution the token acts on. Operators may name any (the token then acts as its
    /// admin; without one an operator's token acts as operator); everyone else only their own,
    /// which is also the default.
    #[serde(default)]
    pub institution_id: Option<String>,
}

/// A token just created: the only response that carries it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    #[serde(flatten)]
    pub record: AdminToken,
    /// The token (`cra_…`) to send as `Authorization: Bearer`. Shown once.
    pub token: String,
}

/// Creates a token acting with the caller's role and institution.
#[utoipa::path(post, path = "/admin/v1/tokens", tag = "accounts",
    request_body = CreateToken,
    responses(
        (status = 201, body = CreatedToken),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Tokens cannot make tokens; only admins can", body = ErrorBody),
        (status = 404, description = "No such institution", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_token(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), AdminError> {
    let operator = principal.role() == Role::Operator;
    let (role, institution) = match body.institution_id {
        None => (principal.role(), principal.institution().map(str::to_owned)),
        // An operator's token for an institution acts as that institution's admin.
        Some(inst) if operator => {
            state.institution(&inst).await?;
            (Role::InstitutionAdmin, Some(inst))
        }
        // Anyone else acts on their own institution; another one does not exist for them.
        Some(inst) if principal.institution() != Some(inst.as_str()) => {
            return Err(AdminError::NotFound(format!("institution `{inst}`")));
        }
        Some(inst) => (principal.role(), Some(inst)),
    };
    principal.authorize(Action::ManageTokens, institution.as_deref())?;
    AdminError::check_name("name", &body.name, 200)?;
    if body.scopes.is_empty() {
        return Err(AdminError::field("scopes", "scopes: give at least one"));
    }
    let mut scopes = body.scopes;
    scopes.sort_by_key(|s| s.as_str());
    scopes.dedup();
    let ttl = body.ttl_seconds.unwrap_or(90 * 24 * 60 * 60);
    if !(60..=MAX_TOKEN_SECS).contains(&ttl) {
        return Err(AdminError::field(
            "ttl_seconds",
            format!("ttl_seconds: must be 60 to {MAX_TOKEN_SECS}"),
        ));
    }
    let token = format!("{TOKEN_PREFIX}{}", random_base62(43));
    let record = state
        .store
        .create_admin_token(NewAdminToken {
            name: body.name,
            token_hash: state.pepper.hash_secret(&token),
            role,
            institution_id: institution,
            scopes,
            created_by: principal.actor(),
            expires_at: Some(carrel_core::domain::unix_now() + ttl),
        })
        .await?;
    tracing::info!(token = %record.id, role = %record.role, "admin token created");
    state
        .audit(
            principal.actor(),
            "token.create",
            format!("token:{}", record.id),
            record.institution_id.as_deref(),
        )
        .await;
    Ok((StatusCode::CREATED, Json(CreatedToken { record, token })))
}

/// Lists tokens, oldest first (never the tokens themselves): all for the operator, the
/// caller's institution's otherwise.
#[utoipa::path(get, path = "/admin/v1/tokens", tag = "accounts",
    params(PageParams),
    responses((status = 200, body = Page<AdminToken>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_tokens(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Page<AdminToken>>, AdminError> {
    let scope = principal.institution().map(str::to_owned);
    principal.authorize(Action::ManageTokens, scope.as_deref())?;
    let page = query.page()?;
    Ok(Json(
        state
            .store
            .list_admin_tokens(scope.as_deref(), page)
            .await?,
    ))
}

/// Revokes a token; it stops working at once.
#[utoipa::path(delete, path = "/admin/v1/tokens/{id}", tag = "accounts",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No live token with that id", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn revoke_token(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let not_found = || AdminError::NotFound(format!("token `{id}`"));
    let token = state
        .store
        .get_admin_token(&id)
        .await?
        .ok_or_else(not_found)?;
    // An operator's own tokens belong to no institution: to anyone else they do not exist.
    if token.institution_id.is_none() && principal.role() != Role::Operator {
        return Err(not_found());
    }
    principal
        .authorize(Action::ManageTokens, token.institution_id.as_deref())
        .map_err(|e| match e {
            AdminError::NotFound(_) => not_found(),
            other => other,
        })?;
    if !state.store.revoke_admin_token(&id).await? {
        return Err(not_found());
    }
    tracing::info!(token = %id, "admin token revoked");
    state
        .audit(
            principal.actor(),
            "token.revoke",
            format!("token:{id}"),
            token.institution_id.as_deref(),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
