//! Carrel's data plane: an OpenAI-compatible reverse proxy with policy, and the `carrel`
//! binary that also mounts the admin plane.
//!
//! A request on the public listener goes through [`pipeline::handle`], which runs these stages
//! in order over a typed [`pipeline::RequestCtx`] (the order lives in `pipeline/mod.rs` only):
//!
//! 1. authenticate: API key → principal
//! 2. rate limit: the credential's request rates (institution, site, group, key), before the
//!    body is read, so failed requests count too
//! 3. read body: bounded read; parse only the fields Carrel needs (`model`, `stream`,
//!    `max_tokens`, `n`, `user`, the prompt's text for the estimate)
//! 4. authorize: model exists, no containment switch stops it, the tier gate (ceilings of
//!    institution, group, key and minors; frontier: named principal, verified, attested)
//! 5. quota reserve: the model's rate, then tokens, money and a stream slot reserved at every
//!    level at once (institution, site, group, key, patron, model)
//! 6. safeguards: the frontier rate, prompt screening, the moderation hook
//! 7. cache: an answer already bought (exact match, per institution), or the answer of an
//!    identical request in flight ([`response_cache`])
//! 8. route: arriving with issue 8
//! 9. forward + meter: to the provider (or the built-in demo model), streamed back chunk by
//!    chunk; the response's usage settles the reservation and goes to the usage ledger
//!
//! # Layout
//!
//! - [`cli`]: the `carrel` command line (`serve`, `demo`, `openapi`).
//! - [`server`]: listeners, thread-per-core workers, HTTP/1.1 + HTTP/2, TLS, graceful shutdown.
//! - [`startup`]: config → ready [`startup::App`]; the demo seed; [`startup::InitError`].
//! - [`app`]: [`app::AppState`], the swappable catalog, the control-plane hooks.
//! - [`pipeline`]: routing and the stages.
//! - [`upstream`]: the pooled provider client, the catalog, the streaming upstream body.
//! - [`openai`]: the wire types Carrel reads and writes.
//! - [`error`]: [`error::GatewayError`] and its status, type, code and metric label.
//! - [`api_doc`]: the public API's OpenAPI description, merged with the admin API's.
//! - [`body`]: the response body type.
//! - [`metering`]: the metered body (settlement, stream counting and cutting) and the usage
//!   ledger writer.
//! - [`metrics`]: `/metrics` on the admin listener (the ledger, the shared store and counters).
//! - [`tokens`]: token estimates (tiktoken for OpenAI models, four bytes a token otherwise).
//! - [`demo`]: the built-in demo model.
//! - [`safeguards`]: containment switches, checked per request and watched by streams.
//! - [`signing`]: signed responses (RFC 9421, Ed25519), the key files, `/.well-known/carrel/keys`.

pub mod api_doc;
pub mod app;
pub mod body;
pub mod cache;
pub mod cli;
pub mod demo;
pub mod error;
pub mod metering;
pub mod metrics;
pub mod openai;
pub mod patrons;
pub mod pipeline;
pub mod response_cache;
pub mod safeguards;
pub mod server;
pub mod signing;
pub mod startup;
pub mod tokens;
pub mod upstream;
