//! The response body type every data-plane answer uses, and small builders for it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use crate::error::{BoxError, GatewayError};

/// A response body: a full buffer, an upstream stream, or a generated stream.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response.
pub fn json(status: StatusCode, bytes: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The OpenAI-shaped error response for a gateway error.
pub fn error(err: &GatewayError) -> Response<ResponseBody> {
    let mut resp = json(err.status(), err.body());
    if let GatewayError::MethodNotAllowed { allow, .. } = err {
        let allow = HeaderValue::from_static(allow);
        resp.headers_mut().insert(header::ALLOW, allow);
    }
    if let Some(secs) = err.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Reads `body` whole if it is at most `limit` bytes (`None` if longer).
pub async fn read_whole(body: ResponseBody, limit: usize) -> Result<Option<Bytes>, BoxError> {
    Ok(read_up_to(body, limit).await?.ok())
}

/// Reads `body` whole if it is at most `limit` bytes; otherwise gives back (`Err`) a body that
/// replays what was read and goes on with the rest.
pub async fn read_up_to(
    mut body: ResponseBody,
    limit: usize,
) -> Result<Result<Bytes, ResponseBody>, BoxError> {
    let mut frames: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers: not on the responses Carrel reads whole.
            continue;
        };
        len += data.len();
        frames.push_back(data);
        if len > limit {
            return Ok(Err(Replay { frames, rest: body }.boxed()));
        }
    }
    Ok(Ok(match frames.len() {
        0 => Bytes::new(),
        1 => frames.pop_front().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(len);
            frames.iter().for_each(|f| joined.extend_from_slice(f));
            joined.freeze()
        }
    }))
}

/// Frames already read, then the rest of the body.
struct Replay {
    frames: VecDeque<Bytes>,
    rest: ResponseBody,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }
}

/// Whether a response's `Content-Type` says it is a stream of server-sent events.
pub fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}
