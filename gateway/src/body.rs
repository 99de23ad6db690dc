//! The response body type every data-plane answer uses, and small builders for it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
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
