//! Shared application state: long-lived handles, and the swappable routing catalog.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use carrel_admin::{ControlHooks, HookFuture};
use carrel_core::config::UpstreamConfig;
use carrel_core::keys::Pepper;
use carrel_core::quota::QuotaEngine;
use carrel_core::store::{PageRequest, Store, StoreError};

use crate::metering::UsageLedger;
use crate::patrons::PatronDesk;
use crate::patrons::sessions::SessionCache;
use crate::pipeline::authenticate::KeyCache;
use crate::safeguards::containment::Containment;
use crate::safeguards::screening::Screener;
use crate::signing::ResponseSigner;
use crate::upstream::Upstream;
use crate::upstream::catalog::Catalog;

/// Handle to the state a request runs with: the shared [`Inner`] plus this worker thread's own
/// upstream client. Each worker owns a client so its pooled connections are driven by the same
/// thread as the requests that use them (see `server.rs`).
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
    /// Pooled upstream client of this worker; cloning shares its pool.
    pub upstream: Upstream,
}

/// Request limits from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

/// The state itself.
#[derive(Debug)]
pub struct Inner {
    /// Control data.
    pub store: Store,
    /// Keys the hash of API key secrets.
    pub pepper: Pepper,
    /// Models and their routes. Loaded once per request (`load()` is lock-free); replaced whole
    /// by [`AppState::reload_catalog`], so a request sees one consistent snapshot.
    pub catalog: ArcSwap<Catalog>,
    /// Verified API keys.
    pub keys: KeyCache,
    /// Verified patron sessions.
    pub sessions: SessionCache,
    /// Containment switches: checked by authorize, watched by streams in flight.
    pub containment: Arc<Containment>,
    /// The gateway's Ed25519 keys: they sign the audit log's tree heads always, and inference
    /// responses when `signing.enabled`.
    pub signing_keys: Arc<ResponseSigner>,
    /// Screening with the safeguard rules, and the incident queue.
    pub screener: Arc<Screener>,
    /// Sign inference responses (`signing.enabled`); `None` when off.
    pub signer: Option<Arc<ResponseSigner>>,
    /// Patron sign-in: SIP2 pools, the JWKS cache, lockouts and counters.
    pub patron_desk: PatronDesk,
    /// Where metered usage goes.
    pub ledger: UsageLedger,
    /// Rates, budgets and reservations.
    pub quota: QuotaEngine,
    /// Answers already bought (`None` when `cache.enabled` is false).
    pub cache: Option<Arc<crate::response_cache::ResponseCache>>,
    /// Settings for each worker's upstream client.
    upstream_config: UpstreamConfig,
    /// Each deployment's circuit breaker, kept across catalog rebuilds.
    pub breakers: crate::upstream::routing::Breakers,
    /// Attempts made again after a deployment failed.
    pub retries: std::sync::atomic::AtomicU64,
    /// Requests answered by a fallback model.
    pub fallbacks: std::sync::atomic::AtomicU64,
    /// Carrel's own time per inference request (`carrel_overhead_seconds`).
    pub overhead: crate::metrics::Histogram,
    /// Whether inference responses carry `x-carrel-overhead-us` (`server.overhead_header`).
    pub overhead_header: bool,
    /// Request limits.
    pub limits: Limits,
    /// Pause between the demo model's streamed words.
    pub demo_word_delay: Duration,
    /// Provider API keys from the environment, by provider name (never written to the store).
    env_keys: HashMap<String, String>,
    /// Serialises catalog rebuilds, so two concurrent reloads cannot store an older snapshot
    /// after a newer one. Held across the store reads of one rebuild.
    reload_lock: tokio::sync::Mutex<()>,
    /// Set when shutdown begins; `/readyz` turns 503 so load balancers stop sending traffic.
    draining: AtomicBool,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// Everything [`AppState::new`] needs.
#[derive(Debug)]
pub struct StateParts {
    /// Control data.
    pub store: Store,
    /// The pepper.
    pub pepper: Pepper,
    /// Verified-key cache.
    pub keys: KeyCache,
    /// Patron sign-in.
    pub patron_desk: PatronDesk,
    /// The usage ledger.
    pub ledger: UsageLedger,
    /// The quota engine.
    pub quota: QuotaEngine,
    /// Upstream client settings.
    pub upstream: UpstreamConfig,
    /// Request limits.
    pub limits: Limits,
    /// Demo pacing.
    pub demo_word_delay: Duration,
    /// Provider API keys from the environment.
    pub env_keys: HashMap<String, String>,
    /// The gateway's signing keys.
    pub signing_keys: Arc<ResponseSigner>,
    /// Whether inference responses are signed.
    pub sign_responses: bool,
    /// `[cache]`.
    pub cache: carrel_core::config::CacheConfig,
    /// The safeguard screener.
    pub screener: Arc<Screener>,
    /// `server.overhead_header`.
    pub overhead_header: bool,
}

impl AppState {
    /// State with an empty catalog; call [`AppState::reload_catalog`] before serving.
    pub fn new(parts: StateParts) -> Result<Self, rustls::Error> {
        let upstream = Upstream::new(&parts.upstream)?;
        let inner = Arc::new(Inner {
            store: parts.store,
            pepper: parts.pepper,
            catalog: ArcSwap::from_pointee(Catalog::default()),
            keys: parts.keys,
            sessions: SessionCache::default(),
            containment: Arc::default(),
            signer: parts
                .sign_responses
                .then(|| Arc::clone(&parts.signing_keys)),
            signing_keys: parts.signing_keys,
            screener: parts.screener,
            patron_desk: parts.patron_desk,
            ledger: parts.ledger,
            quota: parts.quota,
            cache: crate::response_cache::ResponseCache::new(&parts.cache).map(Arc::new),
            breakers: crate::upstream::routing::Breakers::new(
                parts.upstream.breaker_failures,
                parts.upstream.breaker_open,
            ),
            retries: std::sync::atomic::AtomicU64::new(0),
            fallbacks: std::sync::atomic::AtomicU64::new(0),
            overhead: crate::metrics::Histogram::new(crate::metrics::OVERHEAD_BOUNDS),
            overhead_header: parts.overhead_header,
            upstream_config: parts.upstream,
            limits: parts.limits,
            demo_word_delay: parts.demo_word_delay,
            env_keys: parts.env_keys,
            reload_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
        });
        Ok(AppState { inner, upstream })
    }

    /// The same shared state with a fresh upstream client, for one worker thread.
    pub fn for_worker(&self) -> Result<Self, rustls::Error> {
        Ok(AppState {
            inner: Arc::clone(&self.inner),
            upstream: Upstream::new(&self.upstream_config)?,
        })
    }

    /// Rebuilds the catalog from the store and swaps it in. Returns the number of models.
    pub async fn reload_catalog(&self) -> Result<usize, StoreError> {
        let _serial = self.reload_lock.lock().await;
        let providers = self.store.list_providers(PageRequest::ALL).await?.data;
        let models = self.store.list_models(PageRequest::ALL).await?.data;
        let prices = self.store.price_versions(None).await?;
        let catalog = Catalog::build(&providers, &models, &prices, &self.env_keys, &self.breakers);
        // Load the tokenizers the models need now, off the async threads, rather than on a
        // patron's first request.
        let mut tokenizers: Vec<_> = catalog.iter().map(|m| m.tokenizer).collect();
        tokenizers.dedup();
        let _ = tokio::task::spawn_blocking(move || tokenizers.into_iter().for_each(|t| t.warm()))
            .await;
        let n = catalog.len();
        self.catalog.store(Arc::new(catalog));
        tracing::debug!(models = n, "catalog reloaded");
        Ok(n)
    }

    /// `[upstream]`.
    pub fn upstream_config(&self) -> &UpstreamConfig {
        &self.upstream_config
    }

    /// Names of providers whose API key came from the environment.
    pub fn env_keyed_providers(&self) -> impl Iterator<Item = &String> {
        self.env_keys.keys()
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Marks the start of shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// The gateway's side of the control-plane hooks.
#[derive(Debug, Clone)]
pub struct GatewayHooks(pub AppState);

impl ControlHooks for GatewayHooks {
    fn key_changed(&self, key_id: &str) -> HookFuture {
        let state = self.0.clone();
        let id = key_id.to_owned();
        Box::pin(async move {
            state.keys.evict(&id).await;
            state.sessions.evict_kiosk(&id);
        })
    }

    fn usage_flush(&self) -> HookFuture {
        let ledger = self.0.ledger.clone();
        let store = self.0.store.clone();
        Box::pin(async move {
            ledger.flush().await;
            // On the Redis backend the records reach this replica's view through Redis.
            store.usage_visible().await;
        })
    }

    fn everything_changed(&self) -> HookFuture {
        self.0.keys.evict_all();
        self.0.sessions.evict_all();
        self.0.screener.evict_all();
        let catalog = self.catalog_changed();
        let containment = self.containment_changed();
        Box::pin(async move {
            containment.await;
            catalog.await;
        })
    }

    fn containment_changed(&self) -> HookFuture {
        let state = self.0.clone();
        Box::pin(async move {
            // The switch is committed; a failed reload keeps the previous set and says so.
            if let Err(e) = state.containment.reload(&state.store).await {
                tracing::error!(error = %e, "containment reload failed; the previous set stands");
            }
        })
    }

    fn safeguards_changed(&self, institution_id: &str) -> HookFuture {
        self.0.screener.evict(institution_id);
        Box::pin(std::future::ready(()))
    }

    fn check_safeguards(
        &self,
        settings: &carrel_core::store::SafeguardSettings,
    ) -> Result<(), String> {
        self.0.screener.check_settings(settings)
    }

    fn sign_tree_head(
        &self,
        tree_size: u64,
        root: &carrel_core::merkle::Hash,
    ) -> carrel_core::audit::TreeHead {
        self.0.signing_keys.sign_tree_head(tree_size, root)
    }

    fn institution_changed(&self, institution_id: &str) -> HookFuture {
        self.0.keys.evict_institution(institution_id);
        self.0.sessions.evict_institution(institution_id);
        Box::pin(std::future::ready(()))
    }

    fn catalog_changed(&self) -> HookFuture {
        let state = self.0.clone();
        Box::pin(async move {
            // The change is committed; a failed reload keeps the previous snapshot and says so.
            if let Err(e) = state.reload_catalog().await {
                tracing::error!(error = %e, "catalog reload failed; serving the previous catalog");
            }
        })
    }
}
