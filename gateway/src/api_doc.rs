//! The OpenAPI description of the public API (the OpenAI subset that Carrel serves), and
//! [`openapi_json`]: the one document, admin and public API together, that `carrel openapi`
//! prints, the admin listener serves at `/admin/openapi.json` and `openapi/openapi.json` holds.
//!
//! The public data plane is plain hyper, not axum, so its operations are described here on
//! documentation-only functions rather than on handlers. The types below are schemas only:
//! Carrel reads `model` and `stream` and forwards the rest as the client sent it, so each
//! request and answer schema allows fields it does not list.
//!
//! The error responses name every `code` of [`GatewayError`] with its status; a test below
//! fails when a variant is added and not documented.
//!
//! [`GatewayError`]: crate::error::GatewayError

use std::collections::HashMap;

use crate::patrons::{OidcNonce, PatronQuota, SessionCreated, SessionView};
use crate::pipeline::quota::{Allowance, MoneyAllowance, QuotaLevel, QuotaReport};
use carrel_admin::error::{ErrorBody, ErrorDetail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToResponse, ToSchema};

/// The public API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    paths(
        v1_chat_completions,
        v1_completions,
        v1_embeddings,
        v1_list_models,
        v1_retrieve_model,
        v1_quota,
        v1_patron_sign_in,
        v1_patron_session,
        v1_patron_sign_out,
        v1_patron_oidc_nonce,
        healthz,
        readyz,
        signing_keys
    ),
    components(
        schemas(
            ChatCompletionRequest,
            ChatCompletion,
            ChatCompletionChunk,
            ChatCompletionEvent,
            SignatureEvent,
            SigningKeySet,
            SigningJwk,
            CompletionRequest,
            Completion,
            CompletionEvent,
            EmbeddingRequest,
            EmbeddingList,
            ModelList,
            ModelObject,
            QuotaReport,
            QuotaLevel,
            SignInRequest,
            SessionCreated,
            SessionView,
            PatronQuota,
            OidcNonce,
            Allowance,
            MoneyAllowance,
            Health,
            Readiness,
            ErrorBody,
            ErrorDetail
        ),
        responses(
            BadRequest,
            Unauthorized,
            Forbidden,
            NotFound,
            PayloadTooLarge,
            BadGateway,
            StoreUnavailable,
            GatewayTimeout,
            TooManyRequests,
            Relayed
        )
    ),
    modifiers(&ApiKeyAuth),
    tags((name = "public", description = PUBLIC_TAG))
)]
pub struct PublicApi;

const PUBLIC_TAG: &str = "The OpenAI-compatible API that clients and OpenAI SDKs call, served on \
the **public** listener (`server.listen`, default `127.0.0.1:8080`), not on the admin listener. \
Send the institution's API key as `Authorization: Bearer crl_...`. Every error Carrel makes \
itself has the OpenAI error body with a distinct `code`. Routing answers 404 `unknown_url` for \
an unknown path and 405 `method_not_allowed` for a known path with another method.";

const INTRO: &str = "Carrel is a Right-to-AI public access gateway for libraries, schools, small \
businesses and nonprofits. This document describes both of its listeners:\n\n\
- the **public API** (tag `public`): the OpenAI subset that clients call with an API key;\n\
- the **admin API** (`/admin/...`): the control plane, on the admin listener, which also serves \
this document at `/admin/openapi.json` and a readable reference at `/admin/docs`.";

/// The `api_key` bearer scheme of the public API.
struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("crl_...")
                    .description(Some(
                        "An institution's API key, issued through the admin API: \
                         `Authorization: Bearer crl_...`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The whole document, admin and public API, as pretty JSON with the crate version filled in.
pub fn openapi_json() -> String {
    openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// The admin document with the public paths, components, tags and security scheme merged in.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = carrel_admin::doc::AdminApi::openapi();
    let public = PublicApi::openapi();
    if let (Some(admin), Some(public)) = (&doc.components, &public.components) {
        // `merge` keeps the first of two schemas with one name; a clash would silently point
        // public operations at an admin schema.
        for name in public.schemas.keys() {
            assert!(
                !admin.schemas.contains_key(name)
                    || matches!(name.as_str(), "ErrorBody" | "ErrorDetail"),
                "schema name {name} is used by both the admin and the public API"
            );
        }
    }
    doc.merge(public);
    doc.info.title = "Carrel API".to_owned();
    let admin_description = doc.info.description.take().unwrap_or_default();
    doc.info.description = Some(format!("{INTRO}\n\n**Admin API.** {admin_description}"));
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

// ---------------------------------------------------------------------------------------------
// Operations. Documentation only: `pipeline::handle` serves these paths.

/// Creates a chat completion.
///
/// The request is forwarded to the model's provider as sent, with `model` replaced by the
/// provider's name for it. With `"stream": true` the answer is a stream of server-sent events,
/// each a `ChatCompletionChunk` as JSON, ending with `[DONE]` (with
/// `stream_options.include_usage`, a last chunk before it carries `usage`):
///
/// ```text
/// data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"carrel-demo","choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},"finish_reason":null}]}
///
/// data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"carrel-demo","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}
///
/// data: [DONE]
/// ```
#[utoipa::path(post, path = "/v1/chat/completions", tag = "public",
    request_body = ChatCompletionRequest,
    params(("x-carrel-cache" = Option<String>, Header,
        description = "`bypass`: neither answer from the response cache nor store the answer; \
                       `allow`: use the cache (answer from it, or store the answer) although the \
                       request is not deterministic (`temperature` is not 0) or carries a \
                       conversation's history. Minors' requests never use the cache.")),
    responses(
        (status = 200, description = "The completion: one JSON object, or server-sent events \
                                      when the request set `stream: true`",
            headers(("x-carrel-request-id" = String,
                description = "The id of this request's usage record, to quote when asking about it"),
                ("x-carrel-cache" = String,
                description = "What the response cache did: `hit` (a stored answer, at no cost), \
                               `miss` (cacheable, asked the provider) or `bypass` (not cacheable)")),
            content(
                (ChatCompletion = "application/json"),
                (ChatCompletionEvent = "text/event-stream"),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 429, response = TooManyRequests),
        (status = 502, response = BadGateway),
        (status = 503, response = StoreUnavailable),
        (status = 504, response = GatewayTimeout),
        (status = "default", response = Relayed),
    ),
    security(("api_key" = [])))]
pub fn v1_chat_completions() {}

/// Creates a text completion (the legacy completions API).
///
/// Forwarded like chat completions; with `"stream": true` the answer is server-sent events,
/// each a `Completion` chunk as JSON, ending with `data: [DONE]`.
#[utoipa::path(post, path = "/v1/completions", tag = "public",
    request_body = CompletionRequest,
    params(("x-carrel-cache" = Option<String>, Header,
        description = "`bypass`: neither answer from the response cache nor store the answer; \
                       `allow`: use the cache (answer from it, or store the answer) although the \
                       request is not deterministic (`temperature` is not 0) or carries a \
                       conversation's history. Minors' requests never use the cache.")),
    responses(
        (status = 200, description = "The completion: one JSON object, or server-sent events \
                                      when the request set `stream: true`",
            headers(("x-carrel-request-id" = String,
                description = "The id of this request's usage record, to quote when asking about it"),
                ("x-carrel-cache" = String,
                description = "What the response cache did: `hit` (a stored answer, at no cost), \
                               `miss` (cacheable, asked the provider) or `bypass` (not cacheable)")),
            content(
                (Completion = "application/json"),
                (CompletionEvent = "text/event-stream"),
            )),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 429, response = TooManyRequests),
        (status = 502, response = BadGateway),
        (status = 503, response = StoreUnavailable),
        (status = 504, response = GatewayTimeout),
        (status = "default", response = Relayed),
    ),
    security(("api_key" = [])))]
pub fn v1_completions() {}

/// Creates embeddings of the input.
#[utoipa::path(post, path = "/v1/embeddings", tag = "public",
    request_body = EmbeddingRequest,
    params(("x-carrel-cache" = Option<String>, Header,
        description = "`bypass`: neither answer from the response cache nor store the answer; \
                       `allow`: use the cache (answer from it, or store the answer) although the \
                       request is not deterministic (`temperature` is not 0) or carries a \
                       conversation's history. Minors' requests never use the cache.")),
    responses(
        (status = 200, description = "One embedding per input", body = EmbeddingList,
            headers(("x-carrel-request-id" = String,
                description = "The id of this request's usage record, to quote when asking about it"),
                ("x-carrel-cache" = String,
                description = "What the response cache did: `hit` (a stored answer, at no cost), \
                               `miss` (cacheable, asked the provider) or `bypass` (not cacheable)"))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 429, response = TooManyRequests),
        (status = 502, response = BadGateway),
        (status = 503, response = StoreUnavailable),
        (status = 504, response = GatewayTimeout),
        (status = "default", response = Relayed),
    ),
    security(("api_key" = [])))]
pub fn v1_embeddings() {}

/// What the caller has left: each level that limits this key (institution, site, group, key,
/// and with `user` the patron, with `model` the model), what is used and left of each limit,
/// when daily and monthly limits renew (at the institution's local midnight), and a summary a
/// person can read.
#[utoipa::path(get, path = "/v1/quota", tag = "public",
    params(
        ("user" = Option<String>, Query, description = "The patron, as a request's `user` names them"),
        ("model" = Option<String>, Query, description = "Add this model's limits"),
    ),
    responses(
        (status = 200, description = "What is left", body = QuotaReport),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = StoreUnavailable),
    ),
    security(("api_key" = [])))]
pub fn v1_quota() {}

/// Lists the models this API key may use (those within its tier ceiling).
#[utoipa::path(get, path = "/v1/models", tag = "public",
    responses(
        (status = 200, description = "The models", body = ModelList),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = StoreUnavailable),
    ),
    security(("api_key" = [])))]
pub fn v1_list_models() {}

/// Describes one model. A model above the key's tier ceiling is answered like one that does
/// not exist.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "public",
    params(("id" = String, Path, description = "Public model name", example = "carrel-demo")),
    responses(
        (status = 200, description = "The model", body = ModelObject),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = StoreUnavailable),
    ),
    security(("api_key" = [])))]
pub fn v1_retrieve_model() {}

/// Body of `POST /v1/patron/sessions`: exactly one of `{"card","pin"}`, `{"id_token"}` or
/// `{"guest_code"}`. None of it is kept.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    /// The library card number (with `pin`).
    #[schema(max_length = 64, example = "21234000123456")]
    pub card: Option<String>,
    /// The card's PIN (with `card`).
    #[schema(max_length = 64, example = "4321")]
    pub pin: Option<String>,
    /// An ID token from the school's identity provider, whose `nonce` Carrel issued.
    #[schema(max_length = 8192)]
    pub id_token: Option<String>,
    /// A guest code from the front desk, `XXXX-XXXX-XXXX` (any case; dashes optional).
    #[schema(max_length = 64, example = "7K3M-Q9PD-2XWA")]
    pub guest_code: Option<String>,
}

/// Signs a patron in on a kiosk (called with a key of kind `kiosk`) and opens a session. Its
/// token then works as a bearer token on `/v1/*` with the patron's own daily allotment, until
/// the session is idle too long (`idle_timeout_seconds`), reaches `expires_at`, is signed out,
/// or the kiosk signs someone else in. Five wrong PINs (or codes) in 15 minutes lock a card (or
/// pass) for 15 minutes.
#[utoipa::path(post, path = "/v1/patron/sessions", tag = "public",
    request_body = SignInRequest,
    responses(
        (status = 201, description = "Signed in", body = SessionCreated),
        (status = 400, description = "`invalid_sign_in`: not exactly one of the three forms, or a \
            field empty or too long", body = ErrorBody),
        (status = 401, description = "`missing_api_key`, `invalid_api_key`, `expired_api_key`: the \
            kiosk key. `invalid_credentials`: unknown card or wrong PIN (also BL=Y with CQ=N from \
            the library's system). `invalid_guest_code`, `guest_pass_expired`. \
            `id_token_malformed`, `id_token_algorithm`, `id_token_unknown_key`, \
            `id_token_bad_signature`, `id_token_expired`, `id_token_not_yet_valid`, \
            `id_token_wrong_issuer`, `id_token_wrong_audience`, `id_token_missing_nonce`, \
            `id_token_nonce_invalid` (not issued here, or used)", body = ErrorBody),
        (status = 403, description = "`not_a_kiosk_key`, `institution_suspended`, \
            `sign_in_method_not_enabled`, `patron_blocked` (the library's system blocks the \
            card), `card_locked` (with `Retry-After`), `guest_pass_exhausted`", body = ErrorBody),
        (status = 413, description = "`request_too_large`: over 16 KiB", body = ErrorBody),
        (status = 429, description = "`sign_in_throttled`: too many sign-ins on this kiosk this \
            minute (with `Retry-After`)", body = ErrorBody),
        (status = 503, description = "`ils_unavailable` (the library's system does not answer, \
            or its circuit is open), `ils_login_refused`, `ils_bad_reply`, \
            `identity_provider_unavailable`, `store_unavailable`, `state_unavailable`",
            body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub fn v1_patron_sign_in() {}

/// The patron's session, called with its token: when it ends and what is left today.
#[utoipa::path(get, path = "/v1/patron/sessions/current", tag = "public",
    responses(
        (status = 200, description = "The session", body = SessionView),
        (status = 401, description = "`missing_api_key`; `session_expired`: the token is not a \
            live session", body = ErrorBody),
        (status = 503, response = StoreUnavailable),
    ),
    security(("api_key" = [])))]
pub fn v1_patron_session() {}

/// Signs the patron out: the session ends, and the library's system hears SIP2 35 End Patron
/// Session.
#[utoipa::path(delete, path = "/v1/patron/sessions/current", tag = "public",
    responses(
        (status = 204, description = "Signed out"),
        (status = 401, description = "`missing_api_key`; `session_expired`: the token is not a \
            live session", body = ErrorBody),
        (status = 503, response = StoreUnavailable),
    ),
    security(("api_key" = [])))]
pub fn v1_patron_sign_out() {}

/// A single-use nonce for a school app's OIDC request (called with a kiosk key): the ID token
/// then given to `POST /v1/patron/sessions` must carry it. Valid 10 minutes.
#[utoipa::path(post, path = "/v1/patron/oidc-nonce", tag = "public",
    responses(
        (status = 201, description = "A nonce", body = OidcNonce),
        (status = 401, response = Unauthorized),
        (status = 403, description = "`not_a_kiosk_key`, `institution_suspended`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `state_unavailable`", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub fn v1_patron_oidc_nonce() {}

/// Liveness: the process is up and answering. No API key needed.
#[utoipa::path(get, path = "/healthz", tag = "public",
    responses((status = 200, description = "Alive", body = Health)))]
pub fn healthz() {}

/// Readiness: the store answers and the gateway is not draining for shutdown. No API key
/// needed.
#[utoipa::path(get, path = "/readyz", tag = "public",
    responses(
        (status = 200, description = "Ready to take traffic", body = Readiness),
        (status = 503, description = "Not ready: the store is unavailable or the gateway is \
                                      draining", body = Readiness),
    ))]
pub fn readyz() {}

/// The public keys that sign Carrel's responses (RFC 9421, Ed25519) and its audit log's tree
/// heads: the current key and every retired one, so older signatures still verify. No API key
/// needed.
#[utoipa::path(get, path = "/.well-known/carrel/keys", tag = "public",
    responses((status = 200, description = "A JSON Web Key Set", body = SigningKeySet)))]
pub fn signing_keys() {}

/// A JSON Web Key Set of Ed25519 public keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeySet {
    /// The current key first, then retired ones, newest first.
    pub keys: Vec<SigningJwk>,
}

/// An Ed25519 public key as a JWK (RFC 8037).
#[derive(Debug, Serialize, ToSchema)]
pub struct SigningJwk {
    /// `OKP`.
    pub kty: String,
    /// `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// The key id that a signature's `keyid` names: by default the RFC 7638 thumbprint.
    pub kid: String,
    /// `EdDSA`.
    pub alg: String,
    /// `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

/// The data of a stream's last event, `event: carrel.signature`: the RFC 9421 signature over
/// `@status`, the digest of every byte of the stream before this event, and the response's
/// `x-request-id`, `carrel-model` and `date` headers. Check it with `carrel verify`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignatureEvent {
    /// `sha-256=:<base64>:` (RFC 9530) of the streamed bytes before this event.
    pub content_digest: String,
    /// `carrel=("@status" "content-digest" "x-request-id" "carrel-model" "date");created=…;keyid="…";alg="ed25519"`.
    pub signature_input: String,
    /// `carrel=:<base64 Ed25519 signature>:`.
    pub signature: String,
}

// ---------------------------------------------------------------------------------------------
// Error responses, by status. Each lists the codes `GatewayError` answers with at that status.

/// `invalid_json`: the body is not a JSON object. `invalid_parameter`: `model` is missing, empty
/// or not a string; `stream` is not a boolean; `max_tokens` (or `max_completion_tokens`) is not
/// a positive integer or is more than the model produces; `n` is not between 1 and 128; `user`
/// is not a string of at most 256 bytes. `param` names the field.
/// `body_read_failed`: the client stopped sending the body. `content_blocked`: the
/// safeguards blocked the prompt or the answer (a minor reads the institution's friendly
/// refusal; an adult, the category); a stream blocked on the way ends with a final SSE event
/// carrying this error. Other fields are checked by the
/// provider, whose own 400 is relayed unchanged.
#[derive(ToResponse)]
pub struct BadRequest(pub ErrorBody);

/// `missing_api_key`: no `Authorization: Bearer` header. `invalid_api_key`: the key is
/// malformed, unknown or revoked. `expired_api_key`: the key has expired, or was rotated and
/// its overlap has ended. `session_expired`: a patron session token that has ended (signed out,
/// idle, past its end, or replaced by the kiosk's next sign-in).
#[derive(ToResponse)]
pub struct Unauthorized(pub ErrorBody);

/// `institution_suspended`: the key's institution is suspended. On inference requests (each
/// with `param` `model`): `model_not_permitted`: the model is outside this key's allowed
/// models. `tier_not_allowed`: the model's tier is above a ceiling that applies (the
/// institution's, the key's group's, the key's, or the ceiling for minors — the message says
/// which), or it is a frontier model asked for through a kiosk, a patron session or a guest
/// pass, which never reach frontier models. `frontier_not_verified`: a frontier model, and no
/// operator has verified the key's institution for frontier models. `attestation_required`: a
/// frontier model through a service key without a current use-case attestation approved by
/// the operator. `safeguard_unavailable`: a safeguard a frontier request needs could not be
/// consulted, and frontier requests fail closed.
#[derive(ToResponse)]
pub struct Forbidden(pub ErrorBody);

/// `model_not_found`: no model of that name is configured (`param` is `model`).
/// `unknown_url`: no such path.
#[derive(ToResponse)]
pub struct NotFound(pub ErrorBody);

/// `request_too_large`: the body is larger than `server.max_body_bytes`.
#[derive(ToResponse)]
pub struct PayloadTooLarge(pub ErrorBody);

/// `upstream_unreachable`: the provider could not be connected to. `upstream_failed`: the
/// provider's connection broke before it answered.
#[derive(ToResponse)]
#[response(headers(("x-carrel-request-id" = String, description = "The id of this request's usage record (the provider was asked)")))]
pub struct BadGateway(pub ErrorBody);

/// A limit was reached; `Retry-After` says when trying again can succeed, and the message says
/// which level (institution, site, group, key, patron or model) and when it renews.
/// `rate_limit_exceeded`: a requests-per-minute limit, or too many streams open at once.
/// `insufficient_quota`: a daily or monthly token allowance (or a patron's daily allowance) is
/// used up, or too small for this request's estimate. `budget_exceeded`: a monthly money budget
/// is spent, or too small for this request's estimate. An institution may choose to have
/// `max_tokens` lowered to what is left instead (`over_quota: clamp`).
#[derive(ToResponse)]
#[response(headers(
    ("Retry-After" = u64, description = "Seconds until trying again can succeed"),
    ("x-ratelimit-limit-requests" = u64, description = "The tightest request rate: requests a minute"),
    ("x-ratelimit-remaining-requests" = u64, description = "Requests left before it refuses"),
    ("x-ratelimit-reset-requests" = String, description = "Until the rate is full again, as `1s`, `6m0s`"),
    ("x-ratelimit-limit-tokens" = u64, description = "The tightest token allowance"),
    ("x-ratelimit-remaining-tokens" = u64, description = "Tokens left in it"),
    ("x-ratelimit-reset-tokens" = String, description = "Until it renews, as `5h12m0s`"),
))]
pub struct TooManyRequests(pub ErrorBody);

/// `store_unavailable`: the state store failed while checking the API key; retry later.
/// `state_unavailable`: on several replicas, the shared counters (Redis) cannot be reached and
/// a limit this request meets fails closed (`store.on_redis_failure`); retry later.
/// `model_contained`: the operator has contained the model or its provider;
/// `institution_contained`, `key_contained`: the institution or the key. A stream in flight
/// when a switch is turned on ends with a final SSE event carrying the same error.
#[derive(ToResponse)]
pub struct StoreUnavailable(pub ErrorBody);

/// `upstream_timeout`: the provider sent no answer within `upstream.response_timeout_ms`.
#[derive(ToResponse)]
#[response(headers(("x-carrel-request-id" = String, description = "The id of this request's usage record (the provider was asked)")))]
pub struct GatewayTimeout(pub ErrorBody);

/// Any other status is the provider's own answer, relayed unchanged with its body (usually
/// the OpenAI error body): 500 when the provider fails, for example.
#[derive(ToResponse)]
#[response(headers(("x-carrel-request-id" = String, description = "The id of this request's usage record (the provider was asked)")))]
pub struct Relayed(pub ErrorBody);

// ---------------------------------------------------------------------------------------------
// Request and answer schemas: the parts of the OpenAI API that clients rely on. Fields not
// listed pass through both ways (`additionalProperties`).

/// A chat completion request. Carrel reads `model` and `stream`; the provider checks the rest.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "carrel-demo",
    "messages": [{"role": "user", "content": "Hello, Carrel!"}], "stream": false}))]
pub struct ChatCompletionRequest {
    /// Public model name, as listed by `GET /v1/models`.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// `true` for server-sent events (`text/event-stream`) instead of one JSON object.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate (the older name of `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// Most tokens to generate, reasoning tokens included.
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2: higher is more random.
    pub temperature: Option<f64>,
    /// Nucleus sampling: consider only the tokens in this top probability mass.
    pub top_p: Option<f64>,
    /// How many choices to generate.
    pub n: Option<u32>,
    /// Up to 4 sequences where generation stops.
    pub stop: Option<Stop>,
    /// -2 to 2: positive values favour new topics.
    pub presence_penalty: Option<f64>,
    /// -2 to 2: positive values discourage repetition.
    pub frequency_penalty: Option<f64>,
    /// Seed for best-effort deterministic sampling.
    pub seed: Option<i64>,
    /// Any other OpenAI parameter (`tools`, `response_format`, ...), passed through.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One message of a conversation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: ChatRole,
    /// The text, or an array of content parts; `null` in an assistant message that only calls
    /// tools.
    pub content: Option<MessageContent>,
    /// Optional name of the participant.
    pub name: Option<String>,
    /// Any other message field (`tool_calls`, `tool_call_id`, ...), passed through.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// The author of a chat message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    /// Instructions from the application.
    System,
    /// Instructions from the application (newer models).
    Developer,
    /// The person asking.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// Message content: a string, or an array of content parts (`{"type": "text", ...}`, ...).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts, passed through as sent.
    Parts(Vec<Value>),
}

/// Where generation stops: one sequence or several.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// One sequence.
    One(String),
    /// Several sequences.
    Many(Vec<String>),
}

/// Options of a streamed answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with token `usage` (and empty `choices`) before `data: [DONE]`.
    pub include_usage: Option<bool>,
    /// Any other option, passed through.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// A chat completion.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletion {
    /// Completion id.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that answered.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<ChatChoice>,
    /// Tokens used.
    pub usage: Option<CompletionUsage>,
    /// Any other field the provider sends (`system_fingerprint`, ...).
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One choice of a chat completion.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    /// Position among the choices.
    pub index: u32,
    /// The generated message.
    pub message: ChatMessage,
    /// Why generation stopped: `stop`, `length`, `tool_calls`, `content_filter`.
    pub finish_reason: Option<String>,
    /// Any other field (`logprobs`, ...).
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One server-sent event of a streamed chat completion (`data: {chunk}`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Completion id, the same in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that answers.
    pub model: String,
    /// The pieces of this chunk; empty in the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Tokens used: only in the final chunk, when `stream_options.include_usage` was set.
    pub usage: Option<CompletionUsage>,
    /// Any other field the provider sends.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One choice of a chunk.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChunkChoice {
    /// Position among the choices.
    pub index: u32,
    /// What this chunk adds: `role` in the first, then `content` pieces.
    pub delta: Value,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<String>,
    /// Any other field.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One server-sent event of a streamed chat completion: `data: {ChatCompletionChunk}`, or
/// `data: [DONE]` last.
pub struct ChatCompletionEvent;

impl utoipa::PartialSchema for ChatCompletionEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        sse_event::<ChatCompletionChunk>(
            "One server-sent event of a streamed chat completion: `data: {ChatCompletionChunk}`, \
             or `data: [DONE]` last.",
        )
    }
}

impl ToSchema for ChatCompletionEvent {}

/// One server-sent event of a streamed text completion: `data: {Completion}`, or
/// `data: [DONE]` last.
pub struct CompletionEvent;

impl utoipa::PartialSchema for CompletionEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        sse_event::<Completion>(
            "One server-sent event of a streamed text completion: `data: {Completion}`, or \
             `data: [DONE]` last.",
        )
    }
}

impl ToSchema for CompletionEvent {}

/// An event of `text/event-stream`, described the way OpenAPI 3.1 tools read it: an object whose
/// `data` is `[DONE]`, the JSON text of a `T`, or the JSON text of an error that ends the
/// stream (JSON Schema's `contentMediaType` and `contentSchema`, so a checker can parse and
/// validate each chunk).
fn sse_event<T: ToSchema>(
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    // utoipa 5 has a field for `contentMediaType` but none for `contentSchema`; an
    // `Extensions` map serialises its entries as they are.
    let content_schema = Extensions::from_iter([(
        "contentSchema",
        serde_json::json!({ "$ref": format!("#/components/schemas/{}", T::name()) }),
    )]);
    let json = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .description(Some(format!("A `{}`, as JSON.", T::name())))
        .extensions(Some(content_schema));
    let done = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["[DONE]"]))
        .description(Some("The end of the stream."));
    let error = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .description(Some(
            "An `ErrorBody`, as JSON: the stream ends here without `[DONE]`. Code \
             `reservation_exceeded`: the provider went on past the tokens reserved for the \
             request, and Carrel stopped the stream; `model_contained`, \
             `institution_contained`, `key_contained`: an operator contained what the stream \
             used.",
        ))
        .extensions(Some(Extensions::from_iter([(
            "contentSchema",
            serde_json::json!({ "$ref": "#/components/schemas/ErrorBody" }),
        )])));
    let signature = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .description(Some(
            "A `SignatureEvent`, as JSON, in the last event (`event: carrel.signature`) of a \
             signed stream, after `[DONE]`.",
        ))
        .extensions(Some(Extensions::from_iter([(
            "contentSchema",
            serde_json::json!({ "$ref": "#/components/schemas/SignatureEvent" }),
        )])));
    let data = AnyOfBuilder::new()
        .item(done)
        .item(json)
        .item(error)
        .item(signature);
    let event = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["message", "carrel.signature"]))
        .description(Some(
            "`carrel.signature` on the signature event; absent (`message`) on the others.",
        ));
    ObjectBuilder::new()
        .description(Some(description))
        .property("event", event)
        .property("data", data)
        .required("data")
        .into()
}

/// A text completion request. Carrel reads `model` and `stream`; the provider checks the rest.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "carrel-demo", "prompt": "Once upon a time", "max_tokens": 32}))]
pub struct CompletionRequest {
    /// Public model name.
    pub model: String,
    /// The prompt: a string, an array of strings, or token arrays.
    pub prompt: Option<Prompt>,
    /// `true` for server-sent events (`text/event-stream`) instead of one JSON object.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// How many choices to generate.
    pub n: Option<u32>,
    /// Up to 4 sequences where generation stops.
    pub stop: Option<Stop>,
    /// Any other OpenAI parameter, passed through.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// A completion prompt.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    Text(String),
    /// Several prompts, or token arrays.
    Batch(Vec<Value>),
}

/// A text completion (or, with `stream`, one chunk of it).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Completion {
    /// Completion id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    /// The model that answered.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<CompletionChoice>,
    /// Tokens used.
    pub usage: Option<CompletionUsage>,
    /// Any other field the provider sends.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One choice of a text completion.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    /// Position among the choices.
    pub index: u32,
    /// The generated text.
    pub text: String,
    /// Why generation stopped: `stop`, `length`, `content_filter`.
    pub finish_reason: Option<String>,
    /// Any other field (`logprobs`, ...).
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// Token counts of a request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompletionUsage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated; absent for embeddings.
    pub completion_tokens: Option<u64>,
    /// Their sum.
    pub total_tokens: u64,
    /// Any detail the provider adds (`prompt_tokens_details`, ...).
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// An embeddings request. Carrel reads `model`; the provider checks the rest.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"model": "carrel-demo", "input": ["library hours", "opening times"]}))]
pub struct EmbeddingRequest {
    /// Public model name.
    pub model: String,
    /// Text to embed: a string, an array of strings, or token arrays.
    pub input: EmbeddingInput,
    /// `float` (the default) or `base64`.
    pub encoding_format: Option<String>,
    /// Dimensions of the output, for models that support it.
    pub dimensions: Option<u32>,
    /// Any other OpenAI parameter, passed through.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// The input of an embeddings request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts, or token arrays.
    Batch(Vec<Value>),
}

/// The embeddings of a request's inputs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EmbeddingList {
    /// `list`.
    pub object: String,
    /// One embedding per input, in input order.
    pub data: Vec<Embedding>,
    /// The model that answered.
    pub model: String,
    /// Tokens used.
    pub usage: Option<CompletionUsage>,
    /// Any other field the provider sends.
    #[serde(flatten)]
    pub other: HashMap<String, Value>,
}

/// One embedding.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Embedding {
    /// `embedding`.
    pub object: String,
    /// Position of its input.
    pub index: u32,
    /// The vector: numbers, or a base64 string with `encoding_format: base64`.
    pub embedding: EmbeddingVector,
}

/// An embedding vector.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// Floats.
    Float(Vec<f64>),
    /// Little-endian float32 bytes, base64-encoded.
    Base64(String),
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models this key may use.
    pub data: Vec<ModelObject>,
}

/// A model, as the OpenAI API describes it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "carrel-demo", "object": "model", "created": 1700000000,
    "owned_by": "demo"}))]
pub struct ModelObject {
    /// Public model name: the `model` of requests.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds when the model was added.
    pub created: i64,
    /// The provider that serves it.
    pub owned_by: String,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// `ok` or `unavailable`.
    pub store: String,
    /// Whether the gateway is shutting down and finishing in-flight requests.
    pub draining: bool,
    /// How many models are configured.
    pub models: u64,
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;

    use super::*;
    use crate::error::GatewayError;

    fn doc() -> Value {
        serde_json::from_str(&openapi_json()).unwrap()
    }

    fn every_error() -> Vec<GatewayError> {
        GatewayError::one_of_each()
    }

    #[test]
    fn every_gateway_error_is_documented_under_its_status() {
        let doc = doc();
        let op = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
        for e in every_error() {
            let code = format!("`{}`", e.code());
            if let GatewayError::SignIn(s) = &e
                && s.code() != "session_expired"
            {
                // Refusals of patron sign-in itself: documented on `/v1/patron/sessions`.
                let status = s.status().as_str().to_owned();
                let description = doc["paths"]["/v1/patron/sessions"]["post"]["responses"][&status]
                    ["description"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{status} is documented for sign-in"));
                assert!(
                    description.contains(&code),
                    "{code} under {status}: {description}"
                );
                continue;
            }
            if matches!(e, GatewayError::MethodNotAllowed { .. }) {
                // Any path, any other method: said once, in the tag's description.
                assert!(PUBLIC_TAG.contains(&code));
                continue;
            }
            let status = e.status().as_str().to_owned();
            let reference = op[&status]["$ref"]
                .as_str()
                .unwrap_or_else(|| panic!("{status} is documented for chat completions"));
            let name = reference.trim_start_matches("#/components/responses/");
            let description = doc["components"]["responses"][name]["description"]
                .as_str()
                .unwrap();
            assert!(
                description.contains(&code),
                "{code} under {status}: {description}"
            );
        }
    }

    #[test]
    fn the_merged_document_has_both_apis_and_unique_operation_ids() {
        let doc = doc();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/v1/models/{id}",
            "/healthz",
            "/readyz",
            "/admin/v1/institutions",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["api_key"]["scheme"], "bearer");
        assert_eq!(schemes["admin_token"]["scheme"], "bearer");
        assert!(doc.get("servers").is_none());
        let mut ids = HashSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_owned()), "operationId {id} is not unique");
            }
        }
        let chat = &doc["components"]["schemas"]["ChatCompletionRequest"];
        assert!(chat["additionalProperties"].is_object(), "{chat}");
    }
}
