//! Stage 2, read body: a bounded read of the request body, then a parse of only the fields
//! Carrel needs ([`RequestFields`]). The original bytes are kept for forwarding.

use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::error::GatewayError;
use crate::openai::RequestFields;
use crate::pipeline::{Flow, RequestCtx};

/// Stage 2.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Flow, GatewayError> {
    let limit = state.limits.max_body_bytes;
    // Refuse a declared oversize body before reading a byte of it.
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let collected = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.is::<LengthLimitError>() {
            GatewayError::BodyTooLarge { limit }
        } else {
            GatewayError::BodyReadFailed
        }
    })?;
    let bytes = collected.to_bytes();
    ctx.fields = Some(RequestFields::parse(&bytes)?);
    ctx.body = bytes;
    Ok(Flow::Continue)
}
