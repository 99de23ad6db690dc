//! Who is calling the admin API, and what they may do — decided here and nowhere else.
//!
//! [`require_admin`] turns the bearer token into an [`AdminPrincipal`]: the operator's token
//! from `CARREL_ADMIN_TOKEN`, or a session token from `POST /admin/v1/login` (stored only as a
//! keyed hash). Handlers then ask [`AdminPrincipal::authorize`] for an [`Action`] on an
//! institution; the policy table is the one `match` below. A principal asking about another
//! institution gets 404, as if it did not exist; a role that may see but not change gets 403.
//! An automation token (`cra_…`) acts with its creator's role and institution, and further only
//! within its scopes ([`Action::scope`]); a token never makes tokens or admin accounts.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use carrel_core::domain::{AdminToken, AdminUser, Role, Scope};
use subtle::ConstantTimeEq;

use crate::AdminState;
use crate::error::AdminError;

/// Environment variable holding the operator's bearer token.
pub const ADMIN_TOKEN_ENV: &str = "CARREL_ADMIN_TOKEN";
/// Prefix of session tokens.
pub const SESSION_PREFIX: &str = "crs_";
/// Prefix of automation tokens.
pub const TOKEN_PREFIX: &str = "cra_";

/// The caller of an admin request.
#[derive(Debug, Clone)]
pub enum AdminPrincipal {
    /// The operator's bearer token.
    Operator,
    /// A signed-in admin account.
    User(AdminUser),
    /// An automation token.
    Token(AdminToken),
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
    /// Change an institution's own settings (name, sector, time zone).
    ManageInstitution,
    /// Suspend or reactivate an institution, or mark it verified for frontier models.
    GovernInstitution,
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
    /// Read an institution's usage.
    ReadUsage,
    /// Create sponsor pools, add members, record top-ups and settle draws: operators only, on
    /// the funder's behalf.
    ManageSponsors,
    /// Read usage across institutions, by sector and region (suppressed to cells of at least
    /// `k` subjects): operators, for themselves and for the programs that fund access.
    ReadAggregates,
    /// Create or revoke automation tokens.
    ManageTokens,
    /// Serve patrons at the front desk: extend a patron's daily allotment for a while, or
    /// start their day afresh.
    ServePatrons,
    /// Turn a containment switch on or off, or list them: operators only, and never through
    /// an automation token (a switch is a person's decision, see `deploy/CONTAINMENT.md`).
    Contain,
    /// Approve or withdraw a service key's frontier attestation: operators only, never through
    /// an automation token (the approval must be a named person's).
    AttestFrontier,
}

impl Action {
    /// The scope an automation token needs for this action; `None`: no token may do it.
    pub fn scope(self) -> Option<Scope> {
        Some(match self {
            Action::ReadModels | Action::Read => Scope::Read,
            Action::ManageKeys => Scope::Keys,
            // No scope of its own (scopes are fixed in core): it changes what a patron may
            // spend, so it takes a write scope, `keys` — what a key, and the patrons behind it,
            // may use. Never the read-only `usage`.
            Action::ServePatrons => Scope::Keys,
            Action::ManageStructure => Scope::Structure,
            Action::ReadUsage | Action::ReadAggregates => Scope::Usage,
            Action::ReadAudit => Scope::Audit,
            Action::CreateInstitution
            | Action::ManageInstitution
            | Action::GovernInstitution
            | Action::ManageSponsors => Scope::Institutions,
            Action::ManageCatalog | Action::ReadProviders => Scope::Catalog,
            // An account or a token made by a token would outgrow its scopes: a session of the
            // new account (or the new token) is not bound by them.
            Action::ManageTokens
            | Action::ManageUsers
            | Action::Contain
            | Action::AttestFrontier => return None,
        })
    }
}

impl AdminPrincipal {
    /// The account, when the caller is one.
    pub fn user(&self) -> Option<&AdminUser> {
        match self {
            AdminPrincipal::User(u) => Some(u),
            AdminPrincipal::Operator | AdminPrincipal::Token(_) => None,
        }
    }

    /// The institution the caller is bound to; `None` for operators (and their tokens).
    pub fn institution(&self) -> Option<&str> {
        match self {
            AdminPrincipal::Operator => None,
            AdminPrincipal::User(u) => u.institution_id.as_deref(),
            AdminPrincipal::Token(t) => t.institution_id.as_deref(),
        }
    }

    /// The role the caller acts with.
    pub fn role(&self) -> Role {
        match self {
            AdminPrincipal::Operator => Role::Operator,
            AdminPrincipal::User(u) => u.role,
            AdminPrincipal::Token(t) => t.role,
        }
    }

    /// Allows or refuses `action` on `institution` (`None`: not about one institution).
    pub fn authorize(&self, action: Action, institution: Option<&str>) -> Result<(), AdminError> {
        let role = self.role();
        // Another tenant's resources do not exist for this caller — checked first, so that no
        // later answer (403 for a scope or a role) tells them apart from unknown ids.
        if role != Role::Operator
            && let Some(target) = institution
            && self.institution() != Some(target)
        {
            return Err(AdminError::NotFound(format!("institution `{target}`")));
        }
        if let AdminPrincipal::Token(token) = self
            && !action.scope().is_some_and(|s| token.scopes.contains(&s))
        {
            return Err(AdminError::Forbidden);
        }
        if role == Role::Operator {
            return Ok(());
        }
        let allowed = match action {
            Action::ManageCatalog
            | Action::ReadProviders
            | Action::CreateInstitution
            | Action::GovernInstitution
            | Action::Contain
            | Action::AttestFrontier
            | Action::ReadAggregates
            | Action::ManageSponsors => false,
            Action::ReadModels | Action::Read => true,
            Action::ManageKeys
            | Action::ManageUsers
            | Action::ManageStructure
            | Action::ManageInstitution
            | Action::ManageTokens => role == Role::InstitutionAdmin && institution.is_some(),
            Action::ReadAudit => matches!(role, Role::InstitutionAdmin | Role::Auditor),
            Action::ReadUsage => {
                matches!(role, Role::InstitutionAdmin | Role::Staff | Role::Auditor)
            }
            Action::ServePatrons => {
                matches!(role, Role::InstitutionAdmin | Role::Staff) && institution.is_some()
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(AdminError::Forbidden)
        }
    }
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
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
    let principal = match resolve(&state, bearer(req.headers())).await {
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
    let now = carrel_core::domain::unix_now();
    if token.starts_with(SESSION_PREFIX) {
        let hash = state.pepper.hash_secret(token);
        if let Some(user) = state.store.session_user(hash, now).await? {
            return Ok(AdminPrincipal::User(user));
        }
    } else if token.starts_with(TOKEN_PREFIX) {
        let hash = state.pepper.hash_secret(token);
        if let Some(token) = state.store.admin_token_by_hash(hash, now).await? {
            return Ok(AdminPrincipal::Token(token));
        }
    }
    Err(AdminError::Unauthorized)
}
