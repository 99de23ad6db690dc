//! The admin audit trail: every mutation and sign-in, with who, what, to what and when — and
//! never a secret, a password or a typed-in username that matched no account.

use axum::extract::State;
use axum::{Extension, Json};
use carrel_core::store::AuditEntry;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::query::AdminQuery;

impl AdminState {
    /// Appends an entry. The change it records is already committed, so a failure here is
    /// logged loudly rather than turned into an error response.
    pub async fn audit(
        &self,
        actor: String,
        action: &'static str,
        target: String,
        institution: Option<&str>,
    ) {
        if let Err(e) = self
            .store
            .append_audit(actor, action, target, institution.map(str::to_owned))
            .await
        {
            tracing::error!(error = %e, action, "could not append to the audit trail");
        }
    }
}

impl AdminPrincipal {
    /// How the audit trail names this caller.
    pub fn actor(&self) -> String {
        match self {
            AdminPrincipal::Operator => "operator".to_owned(),
            AdminPrincipal::User(u) => format!("user:{}", u.id),
            AdminPrincipal::Token(t) => format!("token:{}", t.id),
        }
    }
}

/// A page of the audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, newest first.
    pub data: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<i64>,
}

/// Reads the audit trail: all of it for the operator; the caller's institution's for its admins
/// and auditors.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "accounts",
    params(
        ("before" = Option<i64>, Query, description = "Cursor: return entries older than this `seq`"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500 (default 100)"),
    ),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<AuditPage>, AdminError> {
    let scope = principal.institution().map(str::to_owned);
    principal.authorize(Action::ReadAudit, scope.as_deref())?;
    query.only(&["before", "limit"])?;
    let before = query.int("before")?;
    let limit = query.limit()?;
    let data = state
        .store
        .list_audit(scope.as_deref(), before, limit)
        .await?;
    let next_cursor = (data.len() == limit as usize)
        .then(|| data.last().map(|e| e.seq))
        .flatten();
    Ok(Json(AuditPage { data, next_cursor }))
}
