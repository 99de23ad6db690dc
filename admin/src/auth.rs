//! The admin credential check.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::AdminState;
use crate::error::AdminError;

/// Environment variable holding the operator's bearer token.
pub const ADMIN_TOKEN_ENV: &str = "CARREL_ADMIN_TOKEN";

/// Lets a request through only with `Authorization: Bearer <operator token>`.
pub async fn require_admin(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.operator_token.as_deref() else {
        return AdminError::Locked.into_response();
    };
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => {
            next.run(req).await
        }
        _ => AdminError::Unauthorized.into_response(),
    }
}
