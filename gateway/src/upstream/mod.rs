//! Talking to providers: the pooled keep-alive client, request forwarding with timeouts, and
//! the streaming response body that passes upstream bytes through chunk by chunk.
//!
//! # Layout
//!
//! - [`catalog`]: the swappable snapshot of models and where they are served.
//! - [`body`]: the upstream response body with an idle timeout.
//! - [`routing`]: deployments, circuit breakers, retries and health checks.

pub mod body;
pub mod catalog;
pub mod routing;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use carrel_core::config::UpstreamConfig;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ResponseBody;
use crate::error::GatewayError;
use crate::pipeline::Endpoint;
use catalog::HttpTarget;

const USER_AGENT: &str = concat!("carrel/", env!("CARGO_PKG_VERSION"));

/// Response headers never passed back to the client: hop-by-hop headers (RFC 9110 §7.6.1),
/// cookies (a kiosk is shared by many patrons) and the provider's own rate-limit state, which
/// describes Carrel's account, not the caller's.
fn dropped_response_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "set-cookie"
            | "alt-svc"
    ) || name.as_str().starts_with("x-ratelimit-")
}

/// The shared upstream client.
#[derive(Clone)]
pub struct Upstream {
    /// Pooled keep-alive client; cloning shares the pool.
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    response_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("response_timeout", &self.response_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Builds the client from `[upstream]`.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)?
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(https);
        Ok(Upstream {
            client,
            response_timeout: cfg.response_timeout,
            idle_timeout: cfg.idle_timeout,
        })
    }

    /// Sends `body` to the target's endpoint and returns its response, streaming. Only the
    /// headers the upstream needs are sent: nothing about the client (address, cookies, its
    /// credential) crosses to the provider.
    /// `timeout`: the deployment's time to the response head, if not the configured one.
    pub async fn forward(
        &self,
        target: &HttpTarget,
        endpoint: Endpoint,
        accept: Option<&HeaderValue>,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = target.uri(endpoint).clone();
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::HOST, target.host.clone());
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        if let Some(accept) = accept {
            headers.insert(header::ACCEPT, accept.clone());
        }
        if let Some(auth) = &target.authorization {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }

        let wait = timeout.unwrap_or(self.response_timeout);
        let resp = match tokio::time::timeout(wait, self.client.request(req)).await {
            Err(_elapsed) => return Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) if e.is_connect() => {
                return Err(GatewayError::UpstreamUnreachable(Box::new(e)));
            }
            Ok(Err(e)) => return Err(GatewayError::UpstreamFailed(Box::new(e))),
            Ok(Ok(resp)) => resp,
        };

        let (mut parts, incoming) = resp.into_parts();
        strip_headers(&mut parts.headers);
        let sse = crate::body::is_event_stream(&parts.headers);
        let body = body::UpstreamBody::new(
            incoming,
            self.idle_timeout,
            sse,
            Arc::clone(&target.provider),
        );
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

impl Upstream {
    /// Whether the provider answers `GET {base}/models` within the response timeout (or 5 s)
    /// with anything but a 5xx.
    pub async fn probe(&self, target: &HttpTarget) -> bool {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = target.models.clone();
        let headers = req.headers_mut();
        headers.insert(header::HOST, target.host.clone());
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        if let Some(auth) = &target.authorization {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        let wait = self.response_timeout.min(Duration::from_secs(5));
        match tokio::time::timeout(wait, self.client.request(req)).await {
            Ok(Ok(resp)) => !resp.status().is_server_error(),
            _ => false,
        }
    }
}

fn strip_headers(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|n| dropped_response_header(n))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// A small HTTP(S) client for Carrel's own calls out (JWKS, moderation, incident webhooks):
/// webpki roots, HTTP/1.1, a connect timeout. Not the providers' pooled client.
pub type SideClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// Builds a [`SideClient`].
pub fn side_client<B>(connect_timeout: Duration) -> Result<SideClient<B>, rustls::Error>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_cookies_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("set-cookie", HeaderValue::from_static("a=b"));
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("9"),
        );
        h.insert("x-request-id", HeaderValue::from_static("req_1"));
        strip_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-request-id"]);
    }
}
