//! The data-plane pipeline: one [`handle`] function that routes a request and, for inference
//! endpoints, runs the stages below **in this order** over a typed [`RequestCtx`].
//!
//! | # | stage | module | may answer with |
//! |---|-------|--------|-----------------|
//! | 1 | authenticate | [`authenticate`] | 401 `missing_api_key`, 401 `invalid_api_key`, 401 `expired_api_key`, 401 `session_expired` (a patron session token), 403 `institution_suspended`, 503 `store_unavailable` |
//! | 2 | rate limit (credential) | [`quota::rate_limit`] | 429 `rate_limit_exceeded` |
//! | 3 | read body | [`read_body`] | 413 `request_too_large`, 400 `body_read_failed`, 400 `invalid_json`, 400 `invalid_parameter` |
//! | 4 | authorize | [`authorize`] | 404 `model_not_found`, 503 `model_contained` / `institution_contained` / `key_contained`, 403 `model_not_permitted`, 403 `tier_not_allowed`, 403 `frontier_not_verified`, 403 `attestation_required` |
//! | 4½ | safeguards | [`safeguards`] | 429 `rate_limit_exceeded` (the frontier rate: a tenth of the key's), 400 `content_blocked`, 403 `safeguard_unavailable` (frontier, fails closed) |
//! | 5 | quota reserve | [`quota::reserve`] | 400 `invalid_parameter` (`max_tokens` over the model's cap), 429 `rate_limit_exceeded`, 429 `insufficient_quota`, 429 `budget_exceeded` |
//! | 6 | cache | [`cache`] | a stored answer (`x-carrel-cache: hit`), settled at no cost; or it waits for an identical request in flight ([`crate::response_cache`]) |
//! | 7–8 | routing | [`forward`] with [`crate::upstream::routing`] | nothing of its own: a deployment is picked by weight among those whose breaker is closed; a failure before the first byte is retried on another (the last attempt's answer is relayed) |
//! | 9 | forward + meter | [`forward`] | the upstream's own status, 502 `upstream_unreachable`, 502 `upstream_failed`, 504 `upstream_timeout`; a 2xx body settles the reservation and is recorded in the usage ledger ([`crate::metering`]) |
//!
//! The credential's request rate is counted before the body is read (DESIGN.md put it after
//! authorize): so requests that fail later still count, as rate limits must, and a client over
//! its rate costs no body read. Every response after authenticate carries the
//! `x-ratelimit-*` headers of the tightest limits ([`quota::add_headers`]); a 429 carries
//! `Retry-After`. A request that reached the provider is answered with `x-carrel-request-id`,
//! the id of its usage record.
//!
//! Patron sign-in (`/v1/patron/…`) and the kiosk page (`/kiosk`) are in [`crate::patrons`].
//!
//! Routing itself answers 404 `unknown_url` and 405 `method_not_allowed`. Adding a stage means
//! editing [`inference`] and this table, nowhere else.

pub mod authenticate;
pub mod authorize;
pub mod cache;
pub mod forward;
pub mod quota;
pub mod read_body;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use carrel_core::domain::Principal;
use carrel_core::quota::Reservation;

use crate::upstream::catalog::Price;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::body::{self, ResponseBody};
use crate::error::GatewayError;
use crate::openai::{ModelList, ModelObject, RequestFields};
use crate::upstream::catalog::ModelRoute;

/// An inference endpoint of the OpenAI API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// Short label for logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// What a stage tells the pipeline.
#[derive(Debug)]
pub enum Flow {
    /// Go on to the next stage.
    Continue,
    /// Answer now with this response (a cache hit, say); later stages do not run.
    Respond(Response<ResponseBody>),
}

/// Per-request state, filled in stage by stage.
#[derive(Debug)]
pub struct RequestCtx {
    /// Which endpoint was called.
    pub endpoint: Endpoint,
    /// The client's `Accept` header, forwarded as is.
    pub accept: Option<HeaderValue>,
    /// Set by authenticate.
    pub principal: Option<Arc<Principal>>,
    /// Set by read body: the fields Carrel reads.
    pub fields: Option<RequestFields>,
    /// Set by read body: the original request bytes, forwarded unless a field must change.
    pub body: Bytes,
    /// Set by authorize: where the model is served.
    pub route: Option<Arc<ModelRoute>>,
    /// Set by safeguards: the answer is screened too.
    pub output_screen: Option<crate::safeguards::screening::OutputScreen>,
    /// Set by the quota stages: the tightest limits, for the response headers.
    pub standing: quota::Standing,
    /// Set with the route: the model's price in force when the request arrived, which its
    /// reservation and its usage record are priced at.
    pub price: Price,
    /// Set by quota reserve: what the request holds until it settles (refunded if dropped).
    pub reservation: Option<Reservation>,
    /// Set by quota reserve: Carrel's estimate of the prompt.
    pub prompt_tokens: u64,
    /// Set by quota reserve: the patron, by reference.
    pub patron_ref: Option<Arc<str>>,
    /// Set by cache: what the cache did, for the `x-carrel-cache` header.
    pub cache: Option<crate::response_cache::CacheStatus>,
    /// Set by cache: this request asks the provider for identical ones waiting, and stores
    /// the answer.
    pub cache_leader: Option<crate::response_cache::Leader>,
    /// This request's id in the usage ledger.
    pub request_id: String,
    /// Set by forward: the request id, for the `x-carrel-request-id` header of a request that
    /// reached the provider (and so has a usage record).
    pub recorded_as: Option<HeaderValue>,
    /// When the request arrived.
    pub started: Instant,
    /// Time spent waiting on providers (every attempt, and reading a body held whole) or on
    /// an identical request in flight: what `carrel_overhead_seconds` leaves out.
    pub upstream_wait: std::time::Duration,
}

impl RequestCtx {
    fn new(endpoint: Endpoint, accept: Option<HeaderValue>) -> Self {
        RequestCtx {
            endpoint,
            accept,
            principal: None,
            fields: None,
            body: Bytes::new(),
            route: None,
            price: Price::default(),
            output_screen: None,
            standing: quota::Standing::default(),
            reservation: None,
            prompt_tokens: 0,
            patron_ref: None,
            cache: None,
            cache_leader: None,
            request_id: crate::metering::request_id(),
            recorded_as: None,
            started: Instant::now(),
            upstream_wait: std::time::Duration::ZERO,
        }
    }

    /// Awaits `f`, counting the time as spent waiting on a provider.
    pub async fn waiting<T>(&mut self, f: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = f.await;
        self.upstream_wait += start.elapsed();
        out
    }

    /// The authenticated principal. Stages after authenticate may rely on it.
    pub fn principal(&self) -> &Arc<Principal> {
        self.principal
            .as_ref()
            .expect("stage order: authenticate runs before this stage")
    }

    /// The parsed request fields. Stages after read body may rely on them.
    pub fn fields(&self) -> &RequestFields {
        self.fields
            .as_ref()
            .expect("stage order: read body runs before this stage")
    }

    /// The model's route. Stages after authorize may rely on it.
    pub fn route(&self) -> &Arc<ModelRoute> {
        self.route
            .as_ref()
            .expect("stage order: authorize runs before this stage")
    }
}

/// What a request path and method name.
enum Route<'a> {
    Inference(Endpoint),
    Models,
    Model(&'a str),
    Quota,
    Healthz,
    Readyz,
    SignIn,
    CurrentSession,
    SignOut,
    OidcNonce,
    Kiosk,
    SigningKeys,
}

fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, GatewayError> {
    if path == "/v1/patron/sessions/current" {
        return match method.as_str() {
            "GET" => Ok(Route::CurrentSession),
            "DELETE" => Ok(Route::SignOut),
            _ => Err(GatewayError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_owned(),
                allow: "GET, DELETE",
            }),
        };
    }
    let (route, allowed) = match path {
        "/v1/patron/sessions" => (Route::SignIn, "POST"),
        "/v1/patron/oidc-nonce" => (Route::OidcNonce, "POST"),
        _ if crate::patrons::kiosk::is_asset(path) => (Route::Kiosk, "GET"),
        "/v1/chat/completions" => (Route::Inference(Endpoint::ChatCompletions), "POST"),
        "/v1/completions" => (Route::Inference(Endpoint::Completions), "POST"),
        "/v1/embeddings" => (Route::Inference(Endpoint::Embeddings), "POST"),
        "/v1/models" => (Route::Models, "GET"),
        "/v1/quota" => (Route::Quota, "GET"),
        "/healthz" => (Route::Healthz, "GET"),
        "/readyz" => (Route::Readyz, "GET"),
        carrel_core::signing::JWKS_PATH => (Route::SigningKeys, "GET"),
        _ => match path.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() => (Route::Model(id), "GET"),
            _ => {
                return Err(GatewayError::UnknownRoute {
                    method: method.to_string(),
                    path: path.to_owned(),
                });
            }
        },
    };
    if method.as_str() == allowed {
        Ok(route)
    } else {
        Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow: allowed,
        })
    }
}

/// Answers one data-plane request. Never fails: every error becomes its OpenAI-shaped response,
/// logged once here.
pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<ResponseBody> {
    let result = match route(req.method(), req.uri().path()) {
        Ok(Route::Inference(endpoint)) => return inference(state, endpoint, req).await,
        Ok(Route::Models) => list_models(state, req).await,
        Ok(Route::Model(id)) => {
            let id = id.to_owned();
            get_model(state, req, &id).await
        }
        Ok(Route::Quota) => quota::status(state, &req).await,
        Ok(Route::Healthz) => Ok(body::json(StatusCode::OK, &br#"{"status":"ok"}"#[..])),
        Ok(Route::Readyz) => Ok(readyz(state).await),
        Ok(Route::SigningKeys) => Ok(signing_keys(state)),
        Ok(Route::SignIn) => crate::patrons::sign_in(state, req).await,
        Ok(Route::CurrentSession) => crate::patrons::current(state, &req).await,
        Ok(Route::SignOut) => crate::patrons::sign_out(state, &req).await,
        Ok(Route::OidcNonce) => crate::patrons::oidc_nonce(state, &req).await,
        Ok(Route::Kiosk) => crate::patrons::kiosk::serve(req.uri().path()).ok_or_else(|| {
            GatewayError::UnknownRoute {
                method: "GET".into(),
                path: req.uri().path().to_owned(),
            }
        }),
        Err(e) => Err(e),
    };
    result.unwrap_or_else(|err| {
        err.log();
        body::error(&err)
    })
}

/// `GET /.well-known/carrel/keys`: the JWKS of every key that signed or signs responses and
/// the audit log's tree heads. Public, like any published key.
fn signing_keys(state: &AppState) -> Response<ResponseBody> {
    let mut resp = body::json(StatusCode::OK, state.signing_keys.jwks());
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

/// An inference request: the stages, then the rate-limit headers on whatever the answer is.
async fn inference(
    state: &AppState,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let mut ctx = RequestCtx::new(endpoint, parts.headers.get(http::header::ACCEPT).cloned());
    let mut resp = stages(state, &mut ctx, &parts.headers, body)
        .await
        .unwrap_or_else(|err| {
            err.log();
            body::error(&err)
        });
    quota::add_headers(&ctx.standing, resp.headers_mut());
    if let Some(id) = ctx.recorded_as.take() {
        resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    if let Some(status) = ctx.cache {
        resp.headers_mut().insert(
            crate::response_cache::RESPONSE_HEADER,
            HeaderValue::from_static(status.as_str()),
        );
    }
    let overhead = ctx.started.elapsed().saturating_sub(ctx.upstream_wait);
    state.overhead.observe(overhead);
    if state.overhead_header {
        resp.headers_mut().insert(
            OVERHEAD_HEADER,
            HeaderValue::from(u64::try_from(overhead.as_micros()).unwrap_or(u64::MAX)),
        );
    }
    resp
}

/// With `server.overhead_header`: the microseconds Carrel spent on the request before its
/// response head, less the time it waited on providers (see `carrel_overhead_seconds`).
pub const OVERHEAD_HEADER: http::HeaderName = http::HeaderName::from_static("x-carrel-overhead-us");

/// The id of a request's usage record, on every response to a request that reached the
/// provider: what a patron or an institution quotes when asking about one request.
pub const REQUEST_ID_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-carrel-request-id");

/// The inference stages, in order.
async fn stages(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Response<ResponseBody>, GatewayError> {
    macro_rules! stage {
        ($stage:expr) => {
            if let Flow::Respond(resp) = $stage? {
                return Ok(resp);
            }
        };
    }

    stage!(authenticate::run(state, ctx, headers).await);
    stage!(quota::rate_limit(state, ctx).await);
    stage!(read_body::run(state, ctx, headers, body).await);
    stage!(authorize::run(state, ctx));
    stage!(safeguards(state, ctx).await);
    stage!(quota::reserve(state, ctx).await);
    stage!(cache::run(state, ctx, headers).await);
    forward::run(state, ctx).await
}

/// The safeguards stage: screens the prompt with the rules for the model's tier and the
/// caller's audience, and notes whether the answer is screened too.
async fn safeguards(state: &AppState, ctx: &mut RequestCtx) -> Result<Flow, GatewayError> {
    let route = Arc::clone(ctx.route());
    if route.tier == carrel_core::domain::Tier::Frontier {
        state
            .screener
            .frontier_rate(&state.store, &state.quota.limits(), ctx.principal())
            .await?;
    }
    let output = state
        .screener
        .screen_request(
            &state.store,
            ctx.principal(),
            &route.name,
            route.tier,
            &ctx.fields().prompt.text,
        )
        .await?;
    ctx.output_screen = output;
    Ok(Flow::Continue)
}

async fn list_models(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let principal = authenticate::principal(state, req.headers()).await?;
    let catalog = state.catalog.load();
    let list = ModelList {
        object: "list",
        data: catalog
            .iter()
            .filter(|m| principal.may_use(&m.name, m.tier))
            .map(|m| model_object(m))
            .collect(),
    };
    Ok(body::json(
        StatusCode::OK,
        serde_json::to_vec(&list).expect("the model list serialises"),
    ))
}

async fn get_model(
    state: &AppState,
    req: Request<Incoming>,
    id: &str,
) -> Result<Response<ResponseBody>, GatewayError> {
    let principal = authenticate::principal(state, req.headers()).await?;
    let catalog = state.catalog.load();
    let model = catalog
        .get(id)
        .filter(|m| principal.may_use(&m.name, m.tier))
        .ok_or_else(|| GatewayError::ModelNotFound(id.to_owned()))?;
    Ok(body::json(
        StatusCode::OK,
        serde_json::to_vec(&model_object(model)).expect("a model serialises"),
    ))
}

fn model_object(m: &ModelRoute) -> ModelObject<'_> {
    ModelObject {
        id: &m.name,
        object: "model",
        created: m.created,
        owned_by: &m.provider,
    }
}

async fn readyz(state: &AppState) -> Response<ResponseBody> {
    let draining = state.is_draining();
    let store = state.store.ping().await;
    let ready = !draining && store.is_ok();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not_ready" },
        "store": if store.is_ok() { "ok" } else { "unavailable" },
        "draining": draining,
        "models": state.catalog.load().len(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    body::json(status, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_methods() {
        assert!(matches!(
            route(&Method::POST, "/v1/chat/completions"),
            Ok(Route::Inference(Endpoint::ChatCompletions))
        ));
        assert!(matches!(
            route(&Method::GET, "/v1/models/gpt-x"),
            Ok(Route::Model("gpt-x"))
        ));
        assert_eq!(
            route(&Method::GET, "/v1/chat/completions")
                .err()
                .unwrap()
                .code(),
            "method_not_allowed"
        );
        assert_eq!(
            route(&Method::GET, "/v2/nothing").err().unwrap().code(),
            "unknown_url"
        );
        assert_eq!(
            route(&Method::GET, "/v1/models/").err().unwrap().code(),
            "unknown_url"
        );
    }
}
