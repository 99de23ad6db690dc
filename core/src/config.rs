//! Configuration: a TOML file, overridden by `CARREL__SECTION__KEY` environment variables.
//!
//! Parsing is two steps. The raw tree ([`RawConfig`]) mirrors the file with
//! `deny_unknown_fields`, so a typo is an error, and is read through `serde_path_to_error` so
//! every error names its dotted key. [`Config::try_from`] then checks values and cross-field rules
//! and produces typed settings (`SocketAddr`, `Duration`, resolved secrets).
//!
//! `deploy/carrel.example.toml` documents every key; keep it in step with this file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{ProviderKind, Tier, TierBasis};

/// Prefix of environment overrides: `CARREL__SERVER__LISTEN=0.0.0.0:8080` sets `server.listen`.
pub const ENV_PREFIX: &str = "CARREL__";

/// A configuration that cannot be used. Its `Display` is the one line printed before exiting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key is unknown or has a bad value.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key path, e.g. `server.listen` or `models[2].tier`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// A bad value at `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the error is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw tree: what the file may say.

/// The file as written. Every section is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    auth: RawAuth,
    log: RawLog,
    usage: RawUsage,
    store: RawStore,
    patrons: RawPatrons,
    signing: RawSigning,
    safeguards: RawSafeguards,
    cache: RawCache,
    providers: Vec<RawProvider>,
    models: Vec<RawModel>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    data_dir: Option<PathBuf>,
    max_body_bytes: Option<i64>,
    header_read_timeout_ms: Option<i64>,
    shutdown_grace_ms: Option<i64>,
    h2_max_concurrent_streams: Option<i64>,
    workers: Option<i64>,
    overhead_header: Option<bool>,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    connect_timeout_ms: Option<i64>,
    response_timeout_ms: Option<i64>,
    idle_timeout_ms: Option<i64>,
    pool_max_idle_per_host: Option<i64>,
    pool_idle_timeout_ms: Option<i64>,
    retries: Option<i64>,
    breaker_failures: Option<i64>,
    breaker_open_ms: Option<i64>,
    health_check_interval_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    key_cache_ttl_ms: Option<i64>,
    key_cache_capacity: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPatrons {
    session_idle_secs: Option<i64>,
    session_max_secs: Option<i64>,
    sign_ins_per_kiosk_per_minute: Option<i64>,
    sip2_plaintext_hosts: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSafeguards {
    sets: Vec<crate::safeguards::RuleSetConfig>,
    minor_refusal: Option<String>,
    moderation: Option<RawModeration>,
    frontier_rate_divisor: Option<i64>,
    frontier_requests_per_minute: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModeration {
    url: String,
    api_key_env: Option<String>,
    model: Option<String>,
    timeout_ms: Option<i64>,
    on_failure: Option<ModerationFailure>,
    tiers: Option<Vec<Tier>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSigning {
    enabled: Option<bool>,
    key_file: Option<PathBuf>,
    retired_keys_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    enabled: Option<bool>,
    max_mib: Option<i64>,
    max_entry_kib: Option<i64>,
    ttl_secs: Option<i64>,
    wait_ms: Option<i64>,
    shared: Option<bool>,
    shared_redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUsage {
    record_retention_days: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    kind: Option<StoreKind>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    redis_timeout_ms: Option<i64>,
    expected_replicas: Option<i64>,
    lease_requests: Option<i64>,
    on_redis_failure: RawOnFailure,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawOnFailure {
    requests_per_minute: Option<OnFailure>,
    tokens_per_day: Option<OnFailure>,
    tokens_per_month: Option<OnFailure>,
    cost_per_month_usd: Option<OnFailure>,
    concurrent_streams: Option<OnFailure>,
    patron_tokens_per_day: Option<OnFailure>,
    frontier_models: Option<OnFailure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    #[serde(default)]
    kind: Option<ProviderKind>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    provider: String,
    #[serde(default)]
    upstream_model: Option<String>,
    tier: Tier,
    #[serde(default)]
    tier_basis: Option<TierBasis>,
    #[serde(default)]
    input_price_per_mtok: f64,
    #[serde(default)]
    output_price_per_mtok: f64,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<i64>,
    #[serde(default)]
    deployments: Vec<RawDeployment>,
    #[serde(default)]
    fallback: Vec<String>,
    #[serde(default)]
    public_cache: Vec<crate::domain::PromptClass>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    provider: String,
    #[serde(default)]
    upstream_model: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<i64>,
}

/// The most weight one deployment may have.
pub const MAX_DEPLOYMENT_WEIGHT: u32 = 1000;

// ---------------------------------------------------------------------------------------------
// Validated settings.

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners, limits and the data directory.
    pub server: ServerConfig,
    /// How Carrel talks to providers.
    pub upstream: UpstreamConfig,
    /// API key verification.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// The usage ledger.
    pub usage: UsageConfig,
    /// `[store]`.
    pub store: StoreConfig,
    /// `[patrons]`.
    pub patrons: PatronsConfig,
    /// `[signing]`.
    pub signing: SigningConfig,
    /// `[safeguards]`.
    pub safeguards: SafeguardsConfig,
    /// `[cache]`.
    pub cache: CacheConfig,
    /// Providers declared in the file (re-applied to the store at every start).
    pub providers: Vec<ProviderConfig>,
    /// Models declared in the file (re-applied to the store at every start).
    pub models: Vec<ModelConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Public (data plane) listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Where the embedded store and the pepper live.
    pub data_dir: PathBuf,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Time a client has to send a whole HTTP/1 request head (slowloris bound).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// HTTP/2 streams one client connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Threads serving the public listener, each with its own runtime and upstream pool.
    pub workers: usize,
    /// Whether inference responses carry `x-carrel-overhead-us`: the microseconds Carrel spent
    /// on the request before its response head, less the time it waited on providers.
    pub overhead_header: bool,
    /// TLS on the public listener, when configured.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: PEM files.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// TCP (and TLS) connect timeout; past it the request gets 502.
    pub connect_timeout: Duration,
    /// Time from sending the request to the upstream's response head; past it, 504.
    pub response_timeout: Duration,
    /// Longest silence between two body chunks of an upstream response.
    pub idle_timeout: Duration,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Further attempts a request may make, on another deployment when there is one, after a
    /// connect error, a 429, a 502 or a 503 that reached no client byte (default 2).
    pub retries: u32,
    /// Failures in a row that open a deployment's circuit breaker (default 5).
    pub breaker_failures: u32,
    /// How long an open breaker keeps requests away before one trial request (default 30 s).
    pub breaker_open: Duration,
    /// How often each provider is probed (`GET {base_url}/models`); `None`: never.
    pub health_check_interval: Option<Duration>,
}

/// `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// How long a verified key stays cached; revocation also evicts it at once.
    pub key_cache_ttl: Duration,
    /// Most keys cached at once.
    pub key_cache_capacity: u64,
}

/// `[patrons]`: patron sessions and sign-in.
#[derive(Debug, Clone)]
pub struct PatronsConfig {
    /// A patron session ends after this long without a request (default 10 minutes).
    pub session_idle: Duration,
    /// A patron session ends this long after sign-in, however busy (default 4 hours).
    pub session_max: Duration,
    /// Sign-in attempts one kiosk key may make per minute (default 20).
    pub sign_ins_per_kiosk_per_minute: u64,
    /// Hosts that SIP2 may reach without TLS besides loopback (each is warned about at start).
    pub sip2_plaintext_hosts: Vec<String>,
}

impl Default for PatronsConfig {
    fn default() -> Self {
        PatronsConfig {
            session_idle: Duration::from_secs(600),
            session_max: Duration::from_secs(4 * 3600),
            sign_ins_per_kiosk_per_minute: 20,
            sip2_plaintext_hosts: Vec::new(),
        }
    }
}

/// `[safeguards]`: the operator's screening rules, which every institution's build on.
#[derive(Debug, Clone, Default)]
pub struct SafeguardsConfig {
    /// The operator's rule sets (`[[safeguards.sets]]`; see `carrel_core::safeguards`),
    /// checked at start: they compile on their own.
    pub sets: Vec<crate::safeguards::RuleSetConfig>,
    /// What a minor reads when something is blocked, unless the institution set its own.
    pub minor_refusal: String,
    /// An external moderation service speaking OpenAI's `/v1/moderations`, if configured.
    pub moderation: Option<ModerationConfig>,
    /// A key's frontier requests per minute are its tightest requests-per-minute limit divided
    /// by this (default 10: a tenth), and at least 1.
    pub frontier_rate_divisor: u64,
    /// A key's frontier requests per minute when no requests-per-minute limit applies to it
    /// (default 6: a tenth of 60).
    pub frontier_requests_per_minute: u64,
}

/// `[safeguards.moderation]`: a prompt is also sent to this service, and refused when it
/// flags it.
#[derive(Debug, Clone)]
pub struct ModerationConfig {
    /// The full URL of the moderations endpoint (`…/v1/moderations`).
    pub url: url::Url,
    /// Sent as `Authorization: Bearer`, from the environment (`api_key_env`).
    pub api_key: Option<String>,
    /// The `model` field of the request, if the service wants one.
    pub model: Option<String>,
    /// How long one check may take (default 2 s).
    pub timeout: Duration,
    /// What happens when the service cannot be consulted (times out, errs, answers nonsense)
    /// for a model below the frontier tier; frontier requests always fail closed.
    pub on_failure: ModerationFailure,
    /// The tiers whose prompts are checked (default all).
    pub tiers: Vec<Tier>,
}

/// What a failed moderation check does below the frontier tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModerationFailure {
    /// Send the request on, logged and counted (the default: rules still apply).
    Allow,
    /// Refuse it: 403 `safeguard_unavailable`.
    Block,
}

/// What a minor reads when something is blocked, by default.
pub const DEFAULT_MINOR_REFUSAL: &str = "That's not something I can help with here. If something \
    is worrying you, a librarian, teacher or another adult you trust can help.";

/// `[cache]`: the exact-match response cache (in this process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Whether answers are cached at all (default true).
    pub enabled: bool,
    /// Most bytes of answers held (default 64 MiB).
    pub max_bytes: u64,
    /// Largest answer kept (default 512 KiB).
    pub max_entry_bytes: usize,
    /// How long an answer is kept (default 10 minutes).
    pub ttl: Duration,
    /// How long identical requests wait for the one in flight before asking the provider
    /// themselves (default 30 s).
    pub wait: Duration,
    /// The tier shared by every replica, in Redis (`cache.shared`); `None`: this process only.
    pub shared: Option<SharedCacheConfig>,
}

/// Where the shared cache tier is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCacheConfig {
    /// Redis (`cache.shared_redis_url`, default `store.redis_url`).
    pub url: String,
    /// The key prefix (`store.redis_prefix`).
    pub prefix: String,
    /// How long a lookup waits for Redis before it counts as a miss (`store.redis_timeout_ms`).
    pub timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_bytes: 64 << 20,
            max_entry_bytes: 512 << 10,
            ttl: Duration::from_secs(600),
            wait: Duration::from_secs(30),
            shared: None,
        }
    }
}

/// `[signing]`: signed responses (RFC 9421, Ed25519).
#[derive(Debug, Clone)]
pub struct SigningConfig {
    /// Sign inference responses (default on).
    pub enabled: bool,
    /// The private key, PKCS#8 PEM; made at first start when missing. Replicas must share it
    /// (default `<data_dir>/signing-key.pem`, see [`SigningConfig::key_path`]).
    pub key_file: Option<PathBuf>,
    /// Public keys of earlier signing keys, a JWKS that `carrel rotate-signing-key` appends
    /// to; still published so old responses verify (default
    /// `<data_dir>/signing-retired.json`).
    pub retired_keys_file: Option<PathBuf>,
}

impl SigningConfig {
    /// The key file, under `data_dir` unless configured (the data directory may be set on the
    /// command line after the file is read).
    pub fn key_path(&self, data_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("signing-key.pem"))
    }

    /// The retired keys' file, under `data_dir` unless configured.
    pub fn retired_path(&self, data_dir: &Path) -> PathBuf {
        self.retired_keys_file
            .clone()
            .unwrap_or_else(|| data_dir.join("signing-retired.json"))
    }
}

/// `[usage]`.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// How long per-request usage records are kept; the daily sums that reports read are
    /// kept for good.
    pub record_retention: Duration,
}

/// `[store]`: where control data, counters and usage live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `embedded` (one process, SQLite in the data directory) or `redis` (several replicas).
    pub kind: StoreKind,
    /// Where Redis is, for `kind = "redis"`.
    pub redis_url: String,
    /// The hash tag every Redis key starts with: replicas of one deployment share it.
    pub redis_prefix: String,
    /// How long a request waits for Redis on its path before the failure policy applies.
    pub redis_timeout: Duration,
    /// Replicas expected to share the load: a limit falling back to `local` is divided by it.
    pub expected_replicas: u32,
    /// What each kind of limit does while Redis cannot be reached.
    pub on_redis_failure: FailurePolicy,
    /// Most requests a replica's lease of a budget or rate is sized for; 0 or 1: no leases,
    /// a round trip to Redis per request.
    pub lease_requests: u64,
}

/// What a limit does while the shared counters cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refuse the request: `503` with code `state_unavailable`.
    FailClosed,
    /// Count on this replica alone, against the limit divided by `store.expected_replicas`.
    Local,
}

impl OnFailure {
    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::FailClosed => "fail_closed",
            OnFailure::Local => "local",
        }
    }
}

/// `[store.on_redis_failure]`: a policy per kind of limit, and one for frontier models
/// whatever their limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// `requests_per_minute` (default `local`).
    pub requests_per_minute: OnFailure,
    /// `tokens_per_day` (default `local`).
    pub tokens_per_day: OnFailure,
    /// `tokens_per_month` (default `local`).
    pub tokens_per_month: OnFailure,
    /// `cost_per_month_usd`, money (default `fail_closed`).
    pub cost_per_month: OnFailure,
    /// `concurrent_streams` (default `local`).
    pub concurrent_streams: OnFailure,
    /// `patron_tokens_per_day` (default `local`).
    pub patron_tokens_per_day: OnFailure,
    /// Any request for a frontier-tier model (default `fail_closed`).
    pub frontier_models: OnFailure,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            requests_per_minute: OnFailure::Local,
            tokens_per_day: OnFailure::Local,
            tokens_per_month: OnFailure::Local,
            cost_per_month: OnFailure::FailClosed,
            concurrent_streams: OnFailure::Local,
            patron_tokens_per_day: OnFailure::Local,
            frontier_models: OnFailure::FailClosed,
        }
    }
}

impl std::fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests_per_minute={} tokens_per_day={} tokens_per_month={} cost_per_month_usd={} \
             concurrent_streams={} patron_tokens_per_day={} frontier_models={}",
            self.requests_per_minute.as_str(),
            self.tokens_per_day.as_str(),
            self.tokens_per_month.as_str(),
            self.cost_per_month.as_str(),
            self.concurrent_streams.as_str(),
            self.patron_tokens_per_day.as_str(),
            self.frontier_models.as_str()
        )
    }
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// One process; SQLite in the data directory.
    Embedded,
    /// Several replicas sharing one Redis.
    Redis,
}

/// Default of `usage.record_retention_days`.
pub const DEFAULT_RECORD_RETENTION_DAYS: i64 = 90;

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `carrel_gateway=debug,info`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[providers]]`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ProviderConfig {
    /// Unique name.
    pub name: String,
    /// How it is reached.
    pub kind: ProviderKind,
    /// Base URL including the version path, for `openai` providers.
    pub base_url: Option<String>,
    /// The API key read from the environment variable named by `api_key_env`. Never
    /// serialised: it stays in this process's memory, out of every store and log.
    #[serde(skip)]
    pub api_key: Option<String>,
}

/// `[[models]]`.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct ModelConfig {
    /// Public model name.
    pub name: String,
    /// Provider name.
    pub provider: String,
    /// The provider's name for it (defaults to `name`).
    pub upstream_model: String,
    /// Tier.
    pub tier: Tier,
    /// Why it has that tier (default `operator_judgement`).
    pub tier_basis: TierBasis,
    /// Price per million prompt tokens.
    pub input_price_per_mtok: f64,
    /// Price per million completion tokens.
    pub output_price_per_mtok: f64,
    /// Most output tokens one choice may ask for: the reservation when a request sets no
    /// `max_tokens`, and the largest `max_tokens` accepted.
    pub max_output_tokens: u32,
    /// Its deployments (absent from log entries of earlier builds: the provider alone).
    #[serde(default)]
    pub routing: crate::domain::Routing,
    /// Prompt classes whose cached answers every institution shares.
    #[serde(default)]
    pub public_cache: Vec<crate::domain::PromptClass>,
}

/// A model's output cap when its config does not set one.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 4096;
/// The largest output cap a model may declare.
pub const MAX_OUTPUT_TOKENS_CAP: u32 = 1_000_000;

/// Checks a model's output cap.
pub fn validate_max_output_tokens(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_OUTPUT_TOKENS_CAP {
        return Err(format!(
            "must be between 1 and {MAX_OUTPUT_TOKENS_CAP}, got {n}"
        ));
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        Config::from_raw(RawConfig::default(), &|_| None).expect("the defaults are valid")
    }
}

impl Config {
    /// Reads `path` (or nothing: all defaults), applies `CARREL__…` overrides from `vars`, and
    /// validates. `lookup` resolves the environment variables that hold provider API keys.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(path) => {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: origin.clone(),
                    source,
                })?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        path: origin.clone(),
                        message: e.to_string().trim().replace('\n', " "),
                    })?;
                (table, origin)
            }
            None => (toml::Table::new(), "defaults".to_owned()),
        };
        apply_env_overrides(&mut table, vars)?;
        tracing::debug!(%origin, "configuration read");
        let raw = deserialize_raw(toml::Value::Table(table))?;
        Config::from_raw(raw, lookup)
    }

    /// Reads the configuration from the process environment.
    pub fn load_from_env(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load(path, std::env::vars(), &|name| std::env::var(name).ok())
    }

    fn from_raw(
        raw: RawConfig,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let s = raw.server;
        let server = ServerConfig {
            listen: socket_addr("server.listen", s.listen.as_deref(), "127.0.0.1:8080")?,
            admin_listen: socket_addr(
                "server.admin_listen",
                s.admin_listen.as_deref(),
                "127.0.0.1:8081",
            )?,
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("./carrel-data")),
            max_body_bytes: bounded(
                "server.max_body_bytes",
                s.max_body_bytes,
                2 * 1024 * 1024,
                1024,
                256 * 1024 * 1024,
            )? as usize,
            header_read_timeout: millis(
                "server.header_read_timeout_ms",
                s.header_read_timeout_ms,
                10_000,
            )?,
            shutdown_grace: millis("server.shutdown_grace_ms", s.shutdown_grace_ms, 30_000)?,
            h2_max_concurrent_streams: bounded(
                "server.h2_max_concurrent_streams",
                s.h2_max_concurrent_streams,
                100,
                1,
                10_000,
            )? as u32,
            workers: match bounded("server.workers", s.workers, 0, 0, 256)? {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n as usize,
            },
            overhead_header: s.overhead_header.unwrap_or(false),
            tls: s.tls.map(|t| TlsConfig {
                cert: t.cert,
                key: t.key,
            }),
        };
        let u = raw.upstream;
        let upstream = UpstreamConfig {
            connect_timeout: millis("upstream.connect_timeout_ms", u.connect_timeout_ms, 5_000)?,
            response_timeout: millis(
                "upstream.response_timeout_ms",
                u.response_timeout_ms,
                300_000,
            )?,
            idle_timeout: millis("upstream.idle_timeout_ms", u.idle_timeout_ms, 120_000)?,
            pool_max_idle_per_host: bounded(
                "upstream.pool_max_idle_per_host",
                u.pool_max_idle_per_host,
                512,
                0,
                1_000_000,
            )? as usize,
            pool_idle_timeout: millis(
                "upstream.pool_idle_timeout_ms",
                u.pool_idle_timeout_ms,
                90_000,
            )?,
            retries: bounded("upstream.retries", u.retries, 2, 0, 5)? as u32,
            breaker_failures: bounded("upstream.breaker_failures", u.breaker_failures, 5, 1, 1000)?
                as u32,
            breaker_open: millis("upstream.breaker_open_ms", u.breaker_open_ms, 30_000)?,
            health_check_interval: match bounded(
                "upstream.health_check_interval_ms",
                u.health_check_interval_ms,
                10_000,
                0,
                3_600_000,
            )? {
                0 => None,
                ms => Some(Duration::from_millis(ms as u64)),
            },
        };
        let a = raw.auth;
        let auth = AuthConfig {
            key_cache_ttl: millis("auth.key_cache_ttl_ms", a.key_cache_ttl_ms, 60_000)?,
            key_cache_capacity: bounded(
                "auth.key_cache_capacity",
                a.key_cache_capacity,
                100_000,
                1,
                100_000_000,
            )? as u64,
        };
        let log = LogConfig {
            level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
            format: raw.log.format.unwrap_or(LogFormat::Text),
        };
        let retention_days = bounded(
            "usage.record_retention_days",
            raw.usage.record_retention_days,
            DEFAULT_RECORD_RETENTION_DAYS,
            1,
            3660,
        )?;
        let usage = UsageConfig {
            record_retention: Duration::from_secs(retention_days as u64 * 86_400),
        };
        let st = raw.store;
        let store = StoreConfig {
            kind: st.kind.unwrap_or(StoreKind::Embedded),
            redis_url: match st.redis_url {
                None => "redis://127.0.0.1:6379".to_owned(),
                Some(u) => validate_redis_url(&u)
                    .map_err(|m| ConfigError::invalid("store.redis_url", m))?,
            },
            redis_prefix: match st.redis_prefix {
                None => "carrel".to_owned(),
                Some(p) => {
                    validate_redis_prefix(&p)
                        .map_err(|m| ConfigError::invalid("store.redis_prefix", m))?;
                    p
                }
            },
            redis_timeout: Duration::from_millis(bounded(
                "store.redis_timeout_ms",
                st.redis_timeout_ms,
                20,
                1,
                10_000,
            )? as u64),
            expected_replicas: bounded("store.expected_replicas", st.expected_replicas, 2, 1, 1000)?
                as u32,
            lease_requests: bounded("store.lease_requests", st.lease_requests, 64, 0, 10_000)?
                as u64,
            on_redis_failure: {
                let f = st.on_redis_failure;
                let d = FailurePolicy::default();
                FailurePolicy {
                    requests_per_minute: f.requests_per_minute.unwrap_or(d.requests_per_minute),
                    tokens_per_day: f.tokens_per_day.unwrap_or(d.tokens_per_day),
                    tokens_per_month: f.tokens_per_month.unwrap_or(d.tokens_per_month),
                    cost_per_month: f.cost_per_month_usd.unwrap_or(d.cost_per_month),
                    concurrent_streams: f.concurrent_streams.unwrap_or(d.concurrent_streams),
                    patron_tokens_per_day: f
                        .patron_tokens_per_day
                        .unwrap_or(d.patron_tokens_per_day),
                    frontier_models: f.frontier_models.unwrap_or(d.frontier_models),
                }
            },
        };

        let mut names = HashSet::new();
        let mut providers = Vec::with_capacity(raw.providers.len());
        for (i, p) in raw.providers.into_iter().enumerate() {
            let key = |field: &str| format!("providers[{i}].{field}");
            if p.name.trim().is_empty() {
                return Err(ConfigError::invalid(key("name"), "must not be empty"));
            }
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("provider `{}` is declared twice", p.name),
                ));
            }
            let kind = p.kind.unwrap_or(ProviderKind::Openai);
            let base_url = match (kind, p.base_url) {
                (ProviderKind::Openai, None) => {
                    return Err(ConfigError::invalid(
                        key("base_url"),
                        "missing: an `openai` provider needs a base URL such as https://api.openai.com/v1",
                    ));
                }
                (ProviderKind::Openai, Some(url)) => Some(
                    validate_base_url(&url)
                        .map_err(|m| ConfigError::invalid(key("base_url"), m))?,
                ),
                (ProviderKind::Demo, Some(_)) => {
                    return Err(ConfigError::invalid(
                        key("base_url"),
                        "the built-in `demo` provider takes no base URL",
                    ));
                }
                (ProviderKind::Demo, None) => None,
            };
            let api_key = p
                .api_key_env
                .map(|var| env_secret(&key("api_key_env"), &var, lookup))
                .transpose()?;
            providers.push(ProviderConfig {
                name: p.name,
                kind,
                base_url,
                api_key,
            });
        }

        let mut model_names = HashSet::new();
        let mut models = Vec::with_capacity(raw.models.len());
        for (i, m) in raw.models.into_iter().enumerate() {
            let key = |field: &str| format!("models[{i}].{field}");
            if let Err(message) = validate_model_name(&m.name) {
                return Err(ConfigError::invalid(key("name"), message));
            }
            if !model_names.insert(m.name.clone()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("model `{}` is declared twice", m.name),
                ));
            }
            if !names.contains(&m.provider) {
                return Err(ConfigError::invalid(
                    key("provider"),
                    format!("no provider named `{}` is declared", m.provider),
                ));
            }
            for (field, price) in [
                ("input_price_per_mtok", m.input_price_per_mtok),
                ("output_price_per_mtok", m.output_price_per_mtok),
            ] {
                if let Err(message) = validate_price(price) {
                    return Err(ConfigError::invalid(key(field), message));
                }
            }
            let max_output_tokens = m.max_output_tokens.unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
            if let Err(message) = validate_max_output_tokens(max_output_tokens) {
                return Err(ConfigError::invalid(key("max_output_tokens"), message));
            }
            let upstream_model = m.upstream_model.unwrap_or_else(|| m.name.clone());
            let timeout = |field: String, ms: Option<i64>| match ms {
                None => Ok(None),
                Some(ms) if (1..=3_600_000).contains(&ms) => Ok(Some(ms as u64)),
                Some(ms) => Err(ConfigError::invalid(
                    field,
                    format!("invalid value: {ms}, expected 1 to 3600000 (ms)"),
                )),
            };
            let weight = |field: String, w: Option<u32>| match w.unwrap_or(1) {
                w if w <= MAX_DEPLOYMENT_WEIGHT => Ok(w),
                w => Err(ConfigError::invalid(
                    field,
                    format!("invalid value: {w}, expected 0 to {MAX_DEPLOYMENT_WEIGHT}"),
                )),
            };
            let mut routing = crate::domain::Routing {
                weight: weight(key("weight"), m.weight)?,
                timeout_ms: timeout(key("timeout_ms"), m.timeout_ms)?,
                deployments: Vec::with_capacity(m.deployments.len()),
                // Checked against the other models once all are read.
                fallback: m.fallback,
            };
            let mut seen = HashSet::from([(m.provider.clone(), upstream_model.clone())]);
            for (j, d) in m.deployments.into_iter().enumerate() {
                let key = |field: &str| format!("models[{i}].deployments[{j}].{field}");
                if !names.contains(&d.provider) {
                    return Err(ConfigError::invalid(
                        key("provider"),
                        format!("no provider named `{}` is declared", d.provider),
                    ));
                }
                let upstream = d.upstream_model.unwrap_or_else(|| upstream_model.clone());
                if let Err(message) = validate_model_name(&upstream) {
                    return Err(ConfigError::invalid(key("upstream_model"), message));
                }
                if !seen.insert((d.provider.clone(), upstream.clone())) {
                    return Err(ConfigError::invalid(
                        key("provider"),
                        format!("`{}` serves `{upstream}` twice", d.provider),
                    ));
                }
                routing.deployments.push(crate::domain::Deployment {
                    weight: weight(key("weight"), d.weight)?,
                    timeout_ms: timeout(key("timeout_ms"), d.timeout_ms)?,
                    provider: d.provider,
                    upstream_model: upstream,
                });
            }
            if routing.weight == 0 && routing.deployments.iter().all(|d| d.weight == 0) {
                return Err(ConfigError::invalid(
                    key("weight"),
                    "every deployment is a standby (weight 0): give one a weight",
                ));
            }
            models.push(ModelConfig {
                upstream_model,
                routing,
                public_cache: m.public_cache,
                max_output_tokens,
                name: m.name,
                provider: m.provider,
                tier: m.tier,
                tier_basis: m.tier_basis.unwrap_or(TierBasis::OperatorJudgement),
                input_price_per_mtok: m.input_price_per_mtok,
                output_price_per_mtok: m.output_price_per_mtok,
            });
        }

        // A fallback is another declared model, of the same tier or lower: falling back never
        // reaches a model the request's own could not.
        for (i, m) in models.iter().enumerate() {
            for (j, name) in m.routing.fallback.iter().enumerate() {
                let key = format!("models[{i}].fallback[{j}]");
                let Some(other) = models.iter().find(|o| o.name == *name && o.name != m.name)
                else {
                    return Err(ConfigError::invalid(
                        key,
                        format!("no other model named `{name}` is declared"),
                    ));
                };
                if other.tier > m.tier {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "`{name}` is {}, above `{}` ({}): a fallback may not raise the tier",
                            other.tier, m.name, m.tier
                        ),
                    ));
                }
            }
        }

        let p = raw.patrons;
        let session_idle = bounded(
            "patrons.session_idle_secs",
            p.session_idle_secs,
            600,
            30,
            86_400,
        )?;
        let session_max = bounded(
            "patrons.session_max_secs",
            p.session_max_secs,
            4 * 3600,
            session_idle,
            7 * 86_400,
        )?;
        let patrons = PatronsConfig {
            session_idle: Duration::from_secs(session_idle as u64),
            session_max: Duration::from_secs(session_max as u64),
            sign_ins_per_kiosk_per_minute: bounded(
                "patrons.sign_ins_per_kiosk_per_minute",
                p.sign_ins_per_kiosk_per_minute,
                20,
                1,
                10_000,
            )? as u64,
            sip2_plaintext_hosts: p
                .sip2_plaintext_hosts
                .into_iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        };
        let signing = SigningConfig {
            enabled: raw.signing.enabled.unwrap_or(true),
            key_file: raw.signing.key_file,
            retired_keys_file: raw.signing.retired_keys_file,
        };
        if let Err(e) = crate::safeguards::compile(&raw.safeguards.sets, &[]) {
            return Err(ConfigError::invalid("safeguards.sets", e.to_string()));
        }
        let moderation = match raw.safeguards.moderation {
            None => None,
            Some(m) => {
                let url = url::Url::parse(&m.url)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        ConfigError::invalid(
                            "safeguards.moderation.url",
                            "an http(s) URL of a /v1/moderations endpoint",
                        )
                    })?;
                let api_key = m
                    .api_key_env
                    .map(|var| env_secret("safeguards.moderation.api_key_env", &var, lookup))
                    .transpose()?;
                let timeout = bounded(
                    "safeguards.moderation.timeout_ms",
                    m.timeout_ms,
                    2000,
                    50,
                    60_000,
                )?;
                Some(ModerationConfig {
                    url,
                    api_key,
                    model: m.model,
                    timeout: Duration::from_millis(timeout as u64),
                    on_failure: m.on_failure.unwrap_or(ModerationFailure::Allow),
                    tiers: m.tiers.unwrap_or_else(|| Tier::ALL.to_vec()),
                })
            }
        };
        let frontier_rate_divisor = bounded(
            "safeguards.frontier_rate_divisor",
            raw.safeguards.frontier_rate_divisor,
            10,
            1,
            1000,
        )? as u64;
        let frontier_requests_per_minute = bounded(
            "safeguards.frontier_requests_per_minute",
            raw.safeguards.frontier_requests_per_minute,
            6,
            1,
            1_000_000,
        )? as u64;
        let safeguards = SafeguardsConfig {
            frontier_rate_divisor,
            frontier_requests_per_minute,
            moderation,
            sets: raw.safeguards.sets,
            minor_refusal: raw
                .safeguards
                .minor_refusal
                .unwrap_or_else(|| DEFAULT_MINOR_REFUSAL.to_owned()),
        };
        let c = raw.cache;
        let defaults = CacheConfig::default();
        let cache = CacheConfig {
            enabled: c.enabled.unwrap_or(defaults.enabled),
            max_bytes: (bounded("cache.max_mib", c.max_mib, 64, 1, 65_536)? as u64) << 20,
            max_entry_bytes: (bounded("cache.max_entry_kib", c.max_entry_kib, 512, 1, 65_536)?
                as usize)
                << 10,
            ttl: Duration::from_secs(bounded("cache.ttl_secs", c.ttl_secs, 600, 1, 86_400)? as u64),
            wait: Duration::from_millis(
                bounded("cache.wait_ms", c.wait_ms, 30_000, 0, 600_000)? as u64
            ),
            shared: match (c.shared.unwrap_or(false), c.shared_redis_url) {
                (false, _) => None,
                (true, url) => {
                    let url = match url {
                        Some(url) => url,
                        None if store.kind == StoreKind::Redis => store.redis_url.clone(),
                        None => {
                            return Err(ConfigError::invalid(
                                "cache.shared",
                                "a shared cache needs Redis: set cache.shared_redis_url, or \
                                 store.kind = \"redis\"",
                            ));
                        }
                    };
                    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                        return Err(ConfigError::invalid(
                            "cache.shared_redis_url",
                            format!("invalid value: \"{url}\", expected redis:// or rediss://"),
                        ));
                    }
                    Some(SharedCacheConfig {
                        url,
                        prefix: store.redis_prefix.clone(),
                        timeout: store.redis_timeout,
                    })
                }
            },
        };
        Ok(Config {
            server,
            upstream,
            auth,
            log,
            usage,
            store,
            patrons,
            signing,
            safeguards,
            cache,
            providers,
            models,
        })
    }
}

/// A Redis URL: `redis://`, `rediss://` (TLS) or `redis+unix://` / `unix://` (a socket).
/// Returns it trimmed.
pub fn validate_redis_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match parsed.scheme() {
        "redis" | "rediss" | "redis+unix" | "unix" => Ok(url.to_owned()),
        other => Err(format!(
            "scheme `{other}` is not one of redis, rediss, redis+unix, unix"
        )),
    }
}

/// A Redis key prefix: 1 to 64 of `A-Z a-z 0-9 _ - . :` (it becomes a hash tag, so no braces).
pub fn validate_redis_prefix(prefix: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 64 of A-Z a-z 0-9 _ - . :".to_owned())
    }
}

/// Checks an OpenAI-compatible base URL and returns it without a trailing slash.
pub fn validate_base_url(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not supported, use http or https",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".to_owned());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("the URL must not have a query or fragment".to_owned());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("put credentials in api_key, not in the URL".to_owned());
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Checks a public model name: what clients send in `model`.
pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("must be 1 to 128 characters".to_owned());
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".to_owned());
    }
    Ok(())
}

/// Checks a price per million tokens.
pub fn validate_price(price: f64) -> Result<(), String> {
    if price.is_finite() && (0.0..=MAX_PRICE_PER_MTOK).contains(&price) {
        Ok(())
    } else {
        Err(format!(
            "invalid value: {price}, expected a number from 0 to {MAX_PRICE_PER_MTOK} \
             (US dollars per million tokens)"
        ))
    }
}

/// The highest price per million tokens a model may have: far above any model sold, low
/// enough that a slip of the decimal point is caught rather than billed.
pub const MAX_PRICE_PER_MTOK: f64 = 10_000.0;

fn socket_addr(key: &str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let text = value.unwrap_or(default);
    text.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("invalid value: \"{text}\", expected an IP:port such as 127.0.0.1:8080"),
        )
    })
}

/// The secret in the environment variable `var` that the config key `key` names.
fn env_secret(
    key: &str,
    var: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    lookup(var)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ConfigError::invalid(key, format!("environment variable {var} is not set")))
}

fn bounded(
    key: &str,
    value: Option<i64>,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    let v = value.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::invalid(
            key,
            format!("invalid value: integer {v}, expected a number from {min} to {max}"),
        ))
    }
}

fn millis(key: &str, value: Option<i64>, default: i64) -> Result<Duration, ConfigError> {
    let v = value.unwrap_or(default);
    if v > 0 {
        Ok(Duration::from_millis(v as u64))
    } else {
        Err(ConfigError::invalid(
            key,
            format!("invalid value: integer {v}, expected a positive number of milliseconds"),
        ))
    }
}

fn deserialize_raw(value: toml::Value) -> Result<RawConfig, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut key = dotted(e.path());
        let message = e.inner().to_string();
        // A missing key is reported at its parent; name the key itself. (An unknown key's path
        // already ends in the key.)
        if let Some(rest) = message.strip_prefix("missing field `")
            && let Some((field, _)) = rest.split_once('`')
        {
            key = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
        }
        if key.is_empty() || key == "." {
            key = "(top level)".to_owned();
        }
        ConfigError::invalid(key, message.trim().replace('\n', " "))
    })
}

fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// Applies `CARREL__SECTION__KEY=value` variables onto the parsed file. Values are read as TOML
/// when they parse as a TOML value (`8080`, `true`, `"text"`) and as plain strings otherwise.
fn apply_env_overrides(
    table: &mut toml::Table,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut overrides: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (name, raw_value) in overrides {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let dotted_key = path.join(".");
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(
                dotted_key,
                format!("environment variable {name} is not of the form CARREL__SECTION__KEY"),
            ));
        }
        let value = format!("v = {raw_value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw_value));
        let (last, parents) = path.split_last().expect("split yields at least one part");
        let mut cursor = &mut *table;
        for part in parents {
            let entry = cursor
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry.as_table_mut().ok_or_else(|| {
                ConfigError::invalid(
                    dotted_key.clone(),
                    format!("{name} sets a key inside `{part}`, which is not a table"),
                )
            })?;
        }
        cursor.insert(last.clone(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("carrel.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), std::iter::empty(), &lookup)
    }

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("carrel.toml");
        std::fs::write(&path, text).unwrap();
        let vars = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), vars, &|name| {
            (name == "UPSTREAM_KEY").then(|| "sk-test".to_owned())
        })
    }

    fn key_of(err: ConfigError) -> String {
        err.key().expect("an error about a key").to_owned()
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.server.data_dir, PathBuf::from("./carrel-data"));
        assert!(c.providers.is_empty());
        assert_eq!(c.usage.record_retention, Duration::from_secs(90 * 86_400));
    }

    #[test]
    fn usage_records_are_kept_one_day_to_ten_years() {
        let days = |n: i64| load(&format!("[usage]\nrecord_retention_days = {n}\n"), &[]);
        assert_eq!(
            days(1).unwrap().usage.record_retention,
            Duration::from_secs(86_400)
        );
        for bad in [0, -1, 3661] {
            assert_eq!(
                key_of(days(bad).unwrap_err()),
                "usage.record_retention_days"
            );
        }
    }

    #[test]
    fn a_model_may_have_several_deployments_and_each_is_checked() {
        let file = |deployments: &str, weight: &str| {
            format!(
                "[[providers]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                 [[providers]]\nname = \"b\"\nbase_url = \"http://127.0.0.1:10/v1\"\n\
                 [[models]]\nname = \"m\"\nprovider = \"a\"\ntier = \"baseline\"\n{weight}\n\
                 {deployments}"
            )
        };
        let ok = load(
            &file(
                "[[models.deployments]]\nprovider = \"b\"\nupstream_model = \"m-eu\"\n\
                 weight = 3\ntimeout_ms = 2000\n",
                "timeout_ms = 500",
            ),
            &[],
        )
        .unwrap();
        let r = &ok.models[0].routing;
        assert_eq!((r.weight, r.timeout_ms), (1, Some(500)));
        assert_eq!(
            r.deployments,
            [crate::domain::Deployment {
                provider: "b".into(),
                upstream_model: "m-eu".into(),
                weight: 3,
                timeout_ms: Some(2000),
            }]
        );
        let bad = |deployments: &str, weight: &str| {
            key_of(load(&file(deployments, weight), &[]).unwrap_err())
        };
        assert_eq!(
            bad("[[models.deployments]]\nprovider = \"c\"\n", ""),
            "models[0].deployments[0].provider"
        );
        assert_eq!(
            bad("[[models.deployments]]\nprovider = \"a\"\n", ""),
            "models[0].deployments[0].provider",
            "the model's own deployment twice"
        );
        assert_eq!(
            bad(
                "[[models.deployments]]\nprovider = \"b\"\nweight = 0\n",
                "weight = 0"
            ),
            "models[0].weight",
            "every deployment a standby"
        );
        assert_eq!(
            bad(
                "[[models.deployments]]\nprovider = \"b\"\nweight = 1001\n",
                ""
            ),
            "models[0].deployments[0].weight"
        );
        assert_eq!(
            bad(
                "[[models.deployments]]\nprovider = \"b\"\ntimeout_ms = 0\n",
                ""
            ),
            "models[0].deployments[0].timeout_ms"
        );
    }

    #[test]
    fn a_fallback_is_another_model_of_the_same_tier_or_lower() {
        let file = |fallback: &str| {
            format!(
                "[[providers]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
                 [[models]]\nname = \"m\"\nprovider = \"a\"\ntier = \"advanced\"\n\
                 fallback = [{fallback}]\n\
                 [[models]]\nname = \"small\"\nprovider = \"a\"\ntier = \"baseline\"\n\
                 [[models]]\nname = \"big\"\nprovider = \"a\"\ntier = \"frontier\"\n"
            )
        };
        let ok = load(&file("\"small\""), &[]).unwrap();
        assert_eq!(ok.models[0].routing.fallback, ["small"]);
        for bad in ["\"big\"", "\"m\"", "\"nope\""] {
            assert_eq!(
                key_of(load(&file(bad), &[]).unwrap_err()),
                "models[0].fallback[0]",
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            key_of(load("[server]\nlisen = \"x\"\n", &[]).unwrap_err()),
            "server.lisen"
        );
        assert_eq!(key_of(load("[sever]\n", &[]).unwrap_err()), "sever");
        let err = load(
            "[[providers]]\nname = \"a\"\nbase_url = \"http://h/v1\"\nbase = 1\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(key_of(err), "providers[0].base");
    }

    #[test]
    fn bad_values_are_named() {
        let err = load("[server]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "server.listen: invalid value: \"nowhere\", expected an IP:port such as 127.0.0.1:8080"
        );
        let err = load("[upstream]\nconnect_timeout_ms = 0\n", &[]).unwrap_err();
        assert_eq!(key_of(err), "upstream.connect_timeout_ms");
        let err = load("[server]\nmax_body_bytes = \"big\"\n", &[]).unwrap_err();
        assert_eq!(key_of(err), "server.max_body_bytes");
    }

    #[test]
    fn models_are_checked_against_providers() {
        let base = "[[providers]]\nname = \"up\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key_env = \"UPSTREAM_KEY\"\n";
        let ok = load(
            &format!("{base}[[models]]\nname = \"m\"\nprovider = \"up\"\ntier = \"baseline\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(ok.models[0].upstream_model, "m");
        assert_eq!(ok.providers[0].api_key.as_deref(), Some("sk-test"));

        let err = load(
            &format!("{base}[[models]]\nname = \"m\"\nprovider = \"nope\"\ntier = \"baseline\"\n"),
            &[],
        )
        .unwrap_err();
        assert_eq!(key_of(err), "models[0].provider");
        let err = load(
            &format!("{base}[[models]]\nname = \"m\"\nprovider = \"up\"\ntier = \"ultra\"\n"),
            &[],
        )
        .unwrap_err();
        assert_eq!(key_of(err), "models[0].tier");
        let err = load(
            "[[providers]]\nname = \"up\"\nbase_url = \"http://h/v1\"\napi_key_env = \"MISSING\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "providers[0].api_key_env: environment variable MISSING is not set"
        );
        let err = load(
            "[[providers]]\nname = \"up\"\nbase_url = \"ftp://h\"\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(key_of(err), "providers[0].base_url");
    }

    #[test]
    fn environment_overrides_win_and_are_checked() {
        let c = load(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            &[
                ("CARREL__SERVER__LISTEN", "127.0.0.1:2"),
                ("CARREL__SERVER__MAX_BODY_BYTES", "4096"),
                ("CARREL_ADMIN_TOKEN", "ignored: single underscore"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 2);
        assert_eq!(c.server.max_body_bytes, 4096);
        let err = load("", &[("CARREL__SERVER__NOPE", "1")]).unwrap_err();
        assert_eq!(key_of(err), "server.nope");
        let err = load("", &[("CARREL__UPSTREAM__IDLE_TIMEOUT_MS", "-5")]).unwrap_err();
        assert_eq!(key_of(err), "upstream.idle_timeout_ms");
    }

    #[test]
    fn cache_bounds_are_checked() {
        let c = load("[cache]\nenabled = false\nmax_mib = 2\nttl_secs = 5\n", &[]).unwrap();
        assert!(!c.cache.enabled);
        assert_eq!(c.cache.max_bytes, 2 << 20);
        assert_eq!(c.cache.ttl, Duration::from_secs(5));
        for bad in [
            "max_mib = 0",
            "ttl_secs = 0",
            "max_entry_kib = 0",
            "wait_ms = -1",
        ] {
            let err = load(&format!("[cache]\n{bad}\n"), &[]).unwrap_err();
            let key = format!("cache.{}", bad.split(' ').next().unwrap());
            assert_eq!(err.key(), Some(key.as_str()), "{err}");
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = load("[server\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("carrel.toml"));
    }

    #[test]
    fn the_example_file_documents_real_keys_and_their_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/carrel.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let as_file = Config::load(Some(&path), std::iter::empty(), &|_| None).unwrap();
        let defaults = Config::default();
        assert_eq!(
            format!("{:?}", as_file.server),
            format!("{:?}", defaults.server)
        );
        assert_eq!(
            format!("{:?}", as_file.upstream),
            format!("{:?}", defaults.upstream)
        );
        assert_eq!(
            format!("{:?}", as_file.auth),
            format!("{:?}", defaults.auth)
        );
        assert_eq!(as_file.cache, defaults.cache);
        assert_eq!(defaults.cache, CacheConfig::default());

        // Uncommenting every example line must still give a valid config: the commented keys
        // are real keys too.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = load_with(&uncommented, |_| Some("sk-example".to_owned())).unwrap();
        assert!(c.server.tls.is_some());
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.models.len(), 1);
    }
}
