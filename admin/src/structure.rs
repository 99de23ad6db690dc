//! Sites (branches, campuses, offices) and groups (classes, patron types, business plans) of
//! an institution: the middle of the budget hierarchy institution → site/group → key → patron.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{Group, GroupKind, Site, Tier};
use carrel_core::store::Page;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::{AdminQuery, PageParams};

/// Body of `POST /admin/v1/institutions/{id}/sites`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    /// Name, unique within the institution.
    #[schema(example = "Main Branch", min_length = 1, max_length = 200)]
    pub name: String,
}

/// Body of `POST /admin/v1/institutions/{id}/groups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// Name, unique within the institution.
    #[schema(example = "Year 9 Science", min_length = 1, max_length = 200)]
    pub name: String,
    /// What the group stands for.
    pub kind: GroupKind,
    /// The highest tier the group's keys may reach (none of its own by default).
    #[serde(default)]
    pub tier_ceiling: Option<Tier>,
}

/// Creates a site.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/sites", tag = "institutions",
    params(("id" = String, Path, description = "Institution id")),
    request_body = CreateSite,
    responses((status = 201, body = Site), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_site(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<CreateSite>,
) -> Result<(StatusCode, Json<Site>), AdminError> {
    principal.authorize(Action::ManageStructure, Some(&id))?;
    AdminError::check_name("name", &body.name, 200)?;
    let site = state.store.create_site(&id, body.name).await?;
    state
        .audit(
            principal.actor(),
            "site.create",
            format!("site:{}", site.id),
            Some(&id),
        )
        .await;
    Ok((StatusCode::CREATED, Json(site)))
}

/// Lists an institution's sites.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/sites", tag = "institutions",
    params(("id" = String, Path, description = "Institution id"), PageParams),
    responses((status = 200, body = Page<Site>), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_sites(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    query: AdminQuery,
) -> Result<Json<Page<Site>>, AdminError> {
    principal.authorize(Action::Read, Some(&id))?;
    let page = query.page()?;
    Ok(Json(state.store.list_sites(&id, page).await?))
}

/// Creates a group.
#[utoipa::path(post, path = "/admin/v1/institutions/{id}/groups", tag = "institutions",
    params(("id" = String, Path, description = "Institution id")),
    request_body = CreateGroup,
    responses((status = 201, body = Group), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn create_group(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<CreateGroup>,
) -> Result<(StatusCode, Json<Group>), AdminError> {
    principal.authorize(Action::ManageStructure, Some(&id))?;
    AdminError::check_name("name", &body.name, 200)?;
    let group = state
        .store
        .create_group(&id, body.name, body.kind, body.tier_ceiling)
        .await?;
    state
        .audit(
            principal.actor(),
            "group.create",
            format!("group:{}", group.id),
            Some(&id),
        )
        .await;
    Ok((StatusCode::CREATED, Json(group)))
}

/// Lists an institution's groups.
#[utoipa::path(get, path = "/admin/v1/institutions/{id}/groups", tag = "institutions",
    params(("id" = String, Path, description = "Institution id"), PageParams),
    responses((status = 200, body = Page<Group>), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_groups(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    query: AdminQuery,
) -> Result<Json<Page<Group>>, AdminError> {
    principal.authorize(Action::Read, Some(&id))?;
    let page = query.page()?;
    Ok(Json(state.store.list_groups(&id, page).await?))
}
