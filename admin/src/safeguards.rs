//! Safeguard controls: containment switches (operator only) and frontier attestations of
//! service keys (the operator's approval of a named use case, which expires).
//!
//! A switch stops what it names on every replica: the replica that took the call swaps its
//! set in before answering, and the others apply the change from the store's log within
//! milliseconds. Every flip and every attestation is in the audit log.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::domain::{ContainmentKind, FrontierAttestation, KeyKind};
use carrel_core::store::{Containment, PageRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;

/// Body of `PATCH /admin/v1/models/{name}` and `PATCH /admin/v1/providers/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainBody {
    /// `true` stops it on every replica within a second (new requests get 503, streams in
    /// flight end with an error event); `false` releases it.
    pub contained: bool,
}

/// Where a switch stands after a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContainmentState {
    /// What the switch stops.
    pub kind: ContainmentKind,
    /// The model or provider name, or the institution or key id.
    pub target: String,
    /// Whether it is stopped.
    pub contained: bool,
}

/// Every switch that is on.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContainmentList {
    /// The switches, oldest first.
    pub data: Vec<Containment>,
}

/// Turns a switch on or off, for the handlers of each kind: operator only, audited, and in
/// force on this replica before the answer.
pub(crate) async fn switch(
    state: &AdminState,
    principal: &AdminPrincipal,
    kind: ContainmentKind,
    target: &str,
    institution: Option<&str>,
    contained: bool,
) -> Result<ContainmentState, AdminError> {
    principal.authorize(Action::Contain, institution)?;
    let changed = state
        .store
        .set_contained(kind, target, contained, principal.actor())
        .await?;
    state.hooks.containment_changed().await;
    tracing::warn!(kind = %kind, target, contained, changed, "containment switch");
    if changed {
        state
            .audit(
                principal.actor(),
                if contained {
                    "containment.on"
                } else {
                    "containment.off"
                },
                format!("{kind}:{target}"),
                institution,
            )
            .await;
    }
    Ok(ContainmentState {
        kind,
        target: target.to_owned(),
        contained,
    })
}

/// Contains or releases a model (operator only).
#[utoipa::path(patch, path = "/admin/v1/models/{name}", tag = "safeguards",
    params(("name" = String, Path,
        description = "Public model name (a `/` in it percent-encoded as `%2F`)")),
    request_body = ContainBody,
    responses((status = 200, body = ContainmentState), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn contain_model(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
    AdminJson(body): AdminJson<ContainBody>,
) -> Result<Json<ContainmentState>, AdminError> {
    contain_catalog_entry(
        &state,
        &principal,
        ContainmentKind::Model,
        &name,
        body.contained,
    )
    .await
}

/// Contains or releases a provider: every model it serves (operator only).
#[utoipa::path(patch, path = "/admin/v1/providers/{name}", tag = "safeguards",
    params(("name" = String, Path, description = "Provider name")),
    request_body = ContainBody,
    responses((status = 200, body = ContainmentState), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No such provider", body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn contain_provider(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
    AdminJson(body): AdminJson<ContainBody>,
) -> Result<Json<ContainmentState>, AdminError> {
    contain_catalog_entry(
        &state,
        &principal,
        ContainmentKind::Provider,
        &name,
        body.contained,
    )
    .await
}

/// A model's or a provider's switch: the name must be in the catalog.
async fn contain_catalog_entry(
    state: &AdminState,
    principal: &AdminPrincipal,
    kind: ContainmentKind,
    name: &str,
    contained: bool,
) -> Result<Json<ContainmentState>, AdminError> {
    principal.authorize(Action::Contain, None)?;
    let exists = match kind {
        ContainmentKind::Model => (state.store.list_models(PageRequest::ALL).await?.data)
            .iter()
            .any(|m| m.name == name),
        ContainmentKind::Provider => (state.store.list_providers(PageRequest::ALL).await?.data)
            .iter()
            .any(|p| p.name == name),
        ContainmentKind::Institution | ContainmentKind::Key => false,
    };
    if !exists {
        return Err(AdminError::NotFound(format!("{kind} `{name}`")));
    }
    Ok(Json(
        switch(state, principal, kind, name, None, contained).await?,
    ))
}

/// Lists the switches that are on (operator only).
#[utoipa::path(get, path = "/admin/v1/containment", tag = "safeguards",
    responses((status = 200, body = ContainmentList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_containment(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
) -> Result<Json<ContainmentList>, AdminError> {
    principal.authorize(Action::Contain, None)?;
    Ok(Json(ContainmentList {
        data: state.store.containment().await?,
    }))
}

/// Body of `PUT /admin/v1/keys/{id}/frontier-attestation`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttestationBody {
    /// What the key will use frontier models for, as approved.
    #[schema(
        example = "Grant-writing assistant for the county library's development office",
        min_length = 1,
        max_length = 2000
    )]
    pub use_case: String,
    /// RFC 3339 end of the approval: in the future, at most a year away.
    #[schema(example = "2027-06-30T23:59:59Z")]
    pub expires_at: String,
}

/// Longest an attestation may run before it must be approved again.
pub const MAX_ATTESTATION_SECS: i64 = 366 * 86_400;

/// The key of an attestation call: a live key the operator addresses (institution admins may
/// read their own keys' attestations).
async fn attested_key(
    state: &AdminState,
    principal: &AdminPrincipal,
    id: &str,
    action: Action,
) -> Result<carrel_core::domain::ApiKey, AdminError> {
    let key = crate::institutions::key_for(state, principal, id, action).await?;
    if key.revoked_at.is_some() {
        return Err(AdminError::NotFound(format!("key `{id}`")));
    }
    Ok(key)
}

/// Approves a service key's frontier use case until a time (operator only): with a verified
/// institution, what lets the key reach frontier models. Replaces an earlier approval.
#[utoipa::path(put, path = "/admin/v1/keys/{id}/frontier-attestation", tag = "safeguards",
    params(("id" = String, Path, description = "Key id")),
    request_body = AttestationBody,
    responses((status = 200, body = FrontierAttestation), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "No live key with that id", body = ErrorBody),
        (status = 422, description = "Not a service key, or a field is invalid", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn put_attestation(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<AttestationBody>,
) -> Result<Json<FrontierAttestation>, AdminError> {
    let key = attested_key(&state, &principal, &id, Action::AttestFrontier).await?;
    if key.kind != KeyKind::Service {
        return Err(AdminError::field(
            "kind",
            format!(
                "a frontier attestation is for a service key; this is a {} key \
                 (staff keys need none; kiosks can never reach frontier models)",
                key.kind
            ),
        ));
    }
    let use_case = body.use_case.trim();
    if use_case.is_empty() || use_case.chars().count() > 2000 {
        return Err(AdminError::field(
            "use_case",
            "use_case: 1 to 2000 characters describing the approved use",
        ));
    }
    let now = carrel_core::domain::unix_now();
    let until = body
        .expires_at
        .parse::<jiff::Timestamp>()
        .map_err(|e| {
            AdminError::field(
                "expires_at",
                format!("expires_at: not an RFC 3339 time ({e})"),
            )
        })?
        .as_second();
    if until <= now || until > now + MAX_ATTESTATION_SECS {
        return Err(AdminError::field(
            "expires_at",
            "expires_at: must be in the future and at most a year away",
        ));
    }
    let attestation = state
        .store
        .set_attestation(
            &id,
            use_case.to_owned(),
            principal.actor(),
            carrel_core::domain::rfc3339(until),
        )
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("key `{id}`")))?;
    state.hooks.key_changed(&id).await;
    tracing::info!(key = %id, expires_at = %attestation.expires_at, "frontier attestation approved");
    state
        .audit(
            principal.actor(),
            "frontier.grant",
            format!("key:{id}"),
            Some(&key.institution_id),
        )
        .await;
    Ok(Json(attestation))
}

/// A key's frontier attestation, current or expired.
#[utoipa::path(get, path = "/admin/v1/keys/{id}/frontier-attestation", tag = "safeguards",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = FrontierAttestation), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such key, or it has no attestation", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_attestation(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<Json<FrontierAttestation>, AdminError> {
    attested_key(&state, &principal, &id, Action::Read).await?;
    state
        .store
        .attestation(&id)
        .await?
        .map(Json)
        .ok_or_else(|| AdminError::NotFound(format!("frontier attestation of key `{id}`")))
}

/// Withdraws a key's frontier attestation (operator only): its frontier requests stop at once.
#[utoipa::path(delete, path = "/admin/v1/keys/{id}/frontier-attestation", tag = "safeguards",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204, description = "Withdrawn"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such key, or it has no attestation", body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn delete_attestation(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(id): Path<String>,
) -> Result<StatusCode, AdminError> {
    let key = attested_key(&state, &principal, &id, Action::AttestFrontier).await?;
    if !state.store.revoke_attestation(&id).await? {
        return Err(AdminError::NotFound(format!(
            "frontier attestation of key `{id}`"
        )));
    }
    state.hooks.key_changed(&id).await;
    state
        .audit(
            principal.actor(),
            "frontier.revoke",
            format!("key:{id}"),
            Some(&key.institution_id),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
