//! Who is calling the admin API, and what they may do — decided here and nowhere else.
//!
//! [`require_admin`] turns the bearer token into an [`AdminPrincipal`]: the operator's token
//! from `CARREL_ADMIN_TOKEN`, or a session token from `POST /admin/v1/login` (stored only as a
//! keyed hash). Handlers then ask [`AdminPrincipal::authorize`] for an [`Action`] on an
//! institution; the policy table is the one `match` below. A principal asking about another
//! institution gets 404, as if it did not exist; a role that may see but not change gets 403.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use carrel_core::domain::{AdminUser, Role};
use subtle::ConstantTimeEq;

use crate::AdminState;
use crate::error::AdminError;

/// Environment variable holding the operator's bearer token.
pub const ADMIN_TOKEN_ENV: &str = "CARREL_ADMIN_TOKEN";
/// Prefix of session tokens.
pub const SESSION_PREFIX: &str = "crs_";

/// The caller of an admin request.
#[derive(Debug, Clone)]
pub enum AdminPrincipal {
    /// The operator's bearer token.
    Operator,
    /// A signed-in admin account.
    User(AdminUser),
}

/// Something a handler is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create providers or models.
    ManageCatalog,
    /// List providers (their endpoints are deployment internals).
    ReadProviders,
    /// List models.
    ReadModels,
    /// Create institutions.
    CreateInstitution,
    /// Read an institution's record, keys or users.
    Read,
    /// Create or revoke an institution's keys.
    ManageKeys,
    /// Create admin accounts of an institution (or operators, with no institution).
    ManageUsers,
    /// Read an institution's audit trail.
    ReadAudit,
    /// Create an institution's sites and groups.
    ManageStructure,
}

impl AdminPrincipal {
    /// The account, when the caller is one.
    pub fn user(&self) -> Option<&AdminUser> {
        match self {
            AdminPrincipal::Operator => None,
            AdminPrincipal::User(u) => Some(u),
        }
    }

    /// The institution the caller is bound to; `None` for operators.
    pub fn institution(&self) -> Option<&str> {
        self.user().and_then(|u| u.institution_id.as_deref())
    }

    fn role(&self) -> Role {
        match self {
            AdminPrincipal::Operator => Role::Operator,
            AdminPrincipal::User(u) => u.role,
        }
    }

    /// Allows or refuses `action` on `institution` (`None`: not about one institution).
    pub fn authorize(&self, action: Action, institution: Option<&str>) -> Result<(), AdminError> {
        let role = self.role();
        if role == Role::Operator {
            return Ok(());
        }
        // Another tenant's resources do not exist for this caller.
        if let Some(target) = institution
            && self.institution() != Some(target)
        {
            return Err(AdminError::NotFound(format!("institution `{target}`")));
        }
        let allowed = match action {
            Action::ManageCatalog | Action::ReadProviders | Action::CreateInstitution => false,
            Action::ReadModels | Action::Read => true,
            Action::ManageKeys | Action::ManageUsers | Action::ManageStructure => {
                role == Role::InstitutionAdmin && institution.is_some()
            }
            Action::ReadAudit => matches!(role, Role::InstitutionAdmin | Role::Auditor),
        };
        if allowed {
            Ok(())
        } else {
            Err(AdminError::Forbidden)
        }
    }
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Resolves the caller and stores the [`AdminPrincipal`] in the request, or answers 401.
pub async fn require_admin(
    State(state): State<AdminState>,
    mut req: Request,
    next: Next,
) -> Response {
    let principal = match resolve(&state, bearer(&req)).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

async fn resolve(state: &AdminState, token: Option<&str>) -> Result<AdminPrincipal, AdminError> {
    let Some(token) = token else {
        return Err(if state.operator_token.is_some() {
            AdminError::Unauthorized
        } else {
            AdminError::Locked
        });
    };
    if let Some(expected) = state.operator_token.as_deref()
        && bool::from(token.as_bytes().ct_eq(expected.as_bytes()))
    {
        return Ok(AdminPrincipal::Operator);
    }
    if token.starts_with(SESSION_PREFIX) {
        let now = carrel_core::domain::unix_now();
        let hash = state.pepper.hash_secret(token);
        if let Some(user) = state.store.session_user(hash, now).await? {
            return Ok(AdminPrincipal::User(user));
        }
    }
    Err(AdminError::Unauthorized)
}
