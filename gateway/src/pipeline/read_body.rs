//! Stage 2, read body: a bounded read of the request body, then a parse of only the fields
//! Carrel needs ([`RequestFields`]). The original bytes are kept for forwarding.
//!
//! An oversize body is read to its end and thrown away (up to [`DRAIN_CAP`] bytes and
//! [`DRAIN_TIME`]) before the 413 goes out. Closing a socket with unread data makes the kernel
//! reset the connection, and the reset can destroy the 413 before the client reads it; nginx
//! avoids the same trap with its lingering close.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::app::AppState;
use crate::error::GatewayError;
use crate::openai::RequestFields;
use crate::pipeline::{Flow, RequestCtx};

/// Most bytes of an oversize body read and discarded before answering 413.
const DRAIN_CAP: u64 = 16 * 1024 * 1024;
/// Longest time spent discarding an oversize body.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Stage 2.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Flow, GatewayError> {
    let limit = state.limits.max_body_bytes;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = match declared {
        // Refuse a declared oversize body without keeping a byte of it.
        Some(len) if len > limit as u64 => {
            if len <= DRAIN_CAP {
                drain(body).await;
            }
            return Err(GatewayError::BodyTooLarge { limit });
        }
        _ => read_bounded(body, limit).await?,
    };
    ctx.fields = Some(RequestFields::parse(&bytes)?);
    ctx.body = bytes;
    Ok(Flow::Continue)
}

/// Reads the whole body if it is at most `limit` bytes. A single-chunk body (the common case)
/// is kept as received, without a copy.
async fn read_bounded(mut body: Incoming, limit: usize) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| GatewayError::BodyReadFailed)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing Carrel reads
        };
        total += data.len();
        if total > limit {
            drain(body).await;
            return Err(GatewayError::BodyTooLarge { limit });
        }
        match (&mut first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut buf = BytesMut::with_capacity(total.max(head.len() * 2));
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
            (Some(_), Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match (joined, first) {
        (Some(buf), _) => buf.freeze(),
        (None, Some(head)) => head,
        (None, None) => Bytes::new(),
    })
}

/// Reads and discards the rest of a body, bounded in bytes and time.
async fn drain(mut body: Incoming) {
    let deadline = Instant::now() + DRAIN_TIME;
    let mut seen = 0u64;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        if let Some(data) = frame.data_ref() {
            seen += data.len() as u64;
            if seen > DRAIN_CAP {
                break;
            }
        }
    }
}
