//! Errors of the admin API, as OpenAI-shaped JSON bodies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use carrel_core::quota::LimitError;
use carrel_core::store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// An admin request that failed; each variant has one status and one `code`.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A field is missing, unknown or has a bad value.
    #[error("{message}")]
    InvalidField {
        /// The field, as a dotted path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No or wrong admin credential.
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    /// No admin credential is configured, so nothing can pass.
    #[error("the admin API is locked: set CARREL_ADMIN_TOKEN to enable it")]
    Locked,
    /// The caller's role may not do this.
    #[error("your role may not do this")]
    Forbidden,
    /// Wrong username or password.
    #[error("wrong username or password")]
    InvalidCredentials,
    /// Too many login attempts from one address.
    #[error("too many login attempts from this address; try again in {retry_after} seconds")]
    TooManyLogins {
        /// Seconds until the next attempt is allowed.
        retry_after: i64,
    },
    /// Too many failed logins: the account is locked until the time given.
    #[error("too many failed logins; try again in {retry_after} seconds")]
    AccountLocked {
        /// Seconds until the lock ends.
        retry_after: i64,
    },
    /// The record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The record exists already.
    #[error("{0} already exists")]
    Conflict(String),
    /// A limit would carve more out of the level above than it has: the allotments of a
    /// level's children may not add up to more than its own limit.
    #[error("{message}")]
    OverParent {
        /// The limit's field.
        field: String,
        /// Names both levels and both numbers.
        message: String,
    },
    /// The shared store (Redis) did not answer: try again.
    #[error("the shared state store is unavailable; try again shortly")]
    StateUnavailable(#[source] StoreError),
    /// The store failed; details are logged, not returned.
    #[error("internal error")]
    Internal(#[source] StoreError),
}

/// The error body: `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// Error class, as in the OpenAI API.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The offending field, when there is one.
    pub param: Option<String>,
    /// Stable machine-readable code.
    pub code: &'static str,
}

impl AdminError {
    /// A field error.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        AdminError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Checks a display name: not blank, at most `max` bytes.
    pub fn check_name(field: &str, value: &str, max: usize) -> Result<(), AdminError> {
        if value.trim().is_empty() || value.len() > max {
            return Err(AdminError::field(
                field,
                format!("{field}: must be 1 to {max} characters"),
            ));
        }
        Ok(())
    }

    fn status(&self) -> StatusCode {
        match self {
            AdminError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            AdminError::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Unauthorized | AdminError::Locked | AdminError::InvalidCredentials => {
                StatusCode::UNAUTHORIZED
            }
            AdminError::Forbidden => StatusCode::FORBIDDEN,
            AdminError::AccountLocked { .. } | AdminError::TooManyLogins { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) | AdminError::OverParent { .. } => StatusCode::CONFLICT,
            AdminError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AdminError::MalformedJson(_) => "invalid_json",
            AdminError::InvalidField { .. } => "invalid_field",
            AdminError::Unauthorized => "invalid_admin_token",
            AdminError::Locked => "admin_locked",
            AdminError::Forbidden => "forbidden",
            AdminError::InvalidCredentials => "invalid_credentials",
            AdminError::AccountLocked { .. } => "account_locked",
            AdminError::TooManyLogins { .. } => "too_many_logins",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::OverParent { .. } => "limit_over_parent",
            AdminError::StateUnavailable(_) => "state_unavailable",
            AdminError::Internal(_) => "internal_error",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            AdminError::MalformedJson(_)
            | AdminError::InvalidField { .. }
            | AdminError::NotFound(_)
            | AdminError::Conflict(_)
            | AdminError::OverParent { .. } => "invalid_request_error",
            AdminError::Unauthorized
            | AdminError::Locked
            | AdminError::InvalidCredentials
            | AdminError::AccountLocked { .. } => "authentication_error",
            AdminError::TooManyLogins { .. } => "rate_limit_error",
            AdminError::Forbidden => "permission_error",
            AdminError::StateUnavailable(_) | AdminError::Internal(_) => "api_error",
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => AdminError::Conflict(what),
            StoreError::NotFound(what) => AdminError::NotFound(what),
            StoreError::Limit(e) => match e {
                LimitError::OutOfRange { field, .. } => AdminError::field(field, e.to_string()),
                LimitError::OverParent { field, .. } => AdminError::OverParent {
                    field: field.to_owned(),
                    message: e.to_string(),
                },
            },
            e @ StoreError::Unavailable(_) => AdminError::StateUnavailable(e),
            other => AdminError::Internal(other),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        match &self {
            AdminError::Internal(source) => {
                tracing::error!(error = %source, "admin request failed")
            }
            AdminError::StateUnavailable(source) => {
                tracing::warn!(error = %source, "admin request refused: shared store unavailable");
            }
            _ => {}
        }
        let param = match &self {
            AdminError::InvalidField { field, .. } | AdminError::OverParent { field, .. } => {
                Some(field.clone())
            }
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param,
                code: self.code(),
            },
        };
        let mut resp = (self.status(), Json(body)).into_response();
        if let AdminError::AccountLocked { retry_after }
        | AdminError::TooManyLogins { retry_after } = self
        {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(retry_after.max(1)),
            );
        }
        resp
    }
}

/// Fallback for unknown admin paths.
pub async fn not_found() -> AdminError {
    AdminError::NotFound("route".to_owned())
}
