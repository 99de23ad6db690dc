//! Start-up: from a validated [`Config`] to a ready [`App`] (store opened and migrated, config
//! catalog applied, catalog loaded), plus the demo seed. Failures are [`InitError`]s: one line,
//! non-zero exit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use carrel_admin::AdminState;
use carrel_core::config::{Config, ConfigError, ModelConfig, ProviderConfig, StoreKind};
use carrel_core::domain::{InstitutionKind, KeyKind, ProviderKind, Tier};
use carrel_core::keys::{NewKey, Pepper, PepperError};
use carrel_core::quota::{QuotaEngine, SharedSettings, SystemClock};
use carrel_core::store::{NewApiKey, NewInstitution, RedisSettings, Store, StoreError};

use crate::app::{AppState, GatewayHooks, Limits, StateParts};
use crate::demo;
use crate::metering::UsageLedger;
use crate::patrons::{HttpJwksFetcher, PatronDesk};
use crate::pipeline::authenticate::KeyCache;

/// Why Carrel could not start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The configuration is invalid.
    #[error("config error: {0}")]
    Config(#[from] ConfigError),
    /// The store could not be opened or migrated.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The pepper could not be read or created.
    #[error("pepper: {0}")]
    Pepper(#[from] PepperError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("tls: {0}")]
    Tls(String),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start a worker: {0}")]
    Runtime(#[source] std::io::Error),
    /// The response signing key could not be read or made.
    #[error("signing: {0}")]
    Signing(#[from] crate::signing::SigningSetupError),
}

/// Settings that come from the process rather than the config file.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// `CARREL_PEPPER`, if set.
    pub pepper_env: Option<String>,
    /// `CARREL_ADMIN_TOKEN`, if set.
    pub admin_token: Option<String>,
    /// Pause between the demo model's streamed words.
    pub demo_word_delay: Duration,
}

impl StartOptions {
    /// Options read from the process environment.
    pub fn from_env() -> Self {
        StartOptions {
            pepper_env: std::env::var(carrel_core::keys::PEPPER_ENV).ok(),
            admin_token: std::env::var(carrel_admin::auth::ADMIN_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty()),
            demo_word_delay: demo::DEFAULT_WORD_DELAY,
        }
    }
}

/// A started-up application, ready to serve.
#[derive(Clone)]
pub struct App {
    /// Data-plane state.
    pub state: AppState,
    /// Control-plane state.
    pub admin: AdminState,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Opens the store in `server.data_dir`, applies the config's providers and models, and
    /// loads the catalog.
    pub async fn build(config: &Config, opts: &StartOptions) -> Result<App, InitError> {
        let store = open_store(config, opts).await?;
        App::build_with_store(config, opts, store).await
    }

    /// Like [`App::build`] with a given store (tests use an in-memory one).
    pub async fn build_with_store(
        config: &Config,
        opts: &StartOptions,
        store: Store,
    ) -> Result<App, InitError> {
        std::fs::create_dir_all(&config.server.data_dir).map_err(|source| StoreError::Io {
            path: config.server.data_dir.display().to_string(),
            source,
        })?;
        let pepper = Pepper::load_or_create(&config.server.data_dir, opts.pepper_env.as_deref())?;
        store
            .apply_config(config.providers.clone(), config.models.clone())
            .await?;
        let env_keys: HashMap<String, String> = config
            .providers
            .iter()
            .filter_map(|p| p.api_key.clone().map(|k| (p.name.clone(), k)))
            .collect();
        let clock = Arc::new(SystemClock::default());
        let quota = if store.is_replica() {
            QuotaEngine::with_shared_counters(
                clock,
                &SharedSettings {
                    url: config.store.redis_url.clone(),
                    prefix: config.store.redis_prefix.clone(),
                    timeout: config.store.redis_timeout,
                    expected_replicas: config.store.expected_replicas,
                    policy: config.store.on_redis_failure,
                    lease_requests: config.store.lease_requests,
                },
            )
            .await
            .map_err(|e| StoreError::Unavailable(format!("quota counters: {e}")))?
        } else {
            QuotaEngine::new(clock)
        };
        carrel_core::quota::load(&quota, &store).await?;
        let signing_keys = Arc::new(crate::signing::ResponseSigner::new(
            crate::signing::load_ring(&config.signing, &config.server.data_dir)?,
        ));
        if config.signing.enabled {
            tracing::info!(kid = signing_keys.kid(), "responses are signed");
        } else {
            tracing::warn!("signing.enabled = false: responses are not signed");
        }
        let store_for_incidents = store.clone();
        let (screener, incidents) = crate::safeguards::screening::Screener::new(
            config.safeguards.clone(),
            config.store.kind == StoreKind::Embedded,
            pepper.clone(),
        )
        .map_err(|e| ConfigError::invalid("safeguards.sets", e.to_string()))?;
        let state = AppState::new(StateParts {
            screener: Arc::new(screener),
            signing_keys,
            sign_responses: config.signing.enabled,
            cache: config.cache.clone(),
            store: store.clone(),
            quota: quota.clone(),
            pepper: pepper.clone(),
            keys: KeyCache::new(config.auth.key_cache_capacity, config.auth.key_cache_ttl),
            patron_desk: PatronDesk::new(
                config.patrons.clone(),
                Arc::new(
                    HttpJwksFetcher::new()
                        .map_err(|e| InitError::Tls(format!("jwks client: {e}")))?,
                ),
            ),
            ledger: UsageLedger::start(store.clone(), config.usage.record_retention)
                .map_err(InitError::Runtime)?,
            upstream: config.upstream.clone(),
            limits: Limits {
                max_body_bytes: config.server.max_body_bytes,
            },
            demo_word_delay: opts.demo_word_delay,
            env_keys,
            overhead_header: config.server.overhead_header,
        })
        .map_err(|e| InitError::Tls(format!("upstream client: {e}")))?;
        if let (Some(cache), Some(shared)) = (&state.cache, &config.cache.shared) {
            // A saving, not a dependency: without it the cache is this process's alone.
            match crate::response_cache::SharedTier::connect(shared, config.cache.ttl).await {
                Ok(tier) => cache.attach_shared(tier),
                Err(e) => tracing::warn!(error = %e,
                    "shared response cache unreachable at start; this replica caches alone"),
            }
        }
        let models = state.reload_catalog().await?;
        tracing::info!(models, "catalog loaded");
        state.containment.reload(&state.store).await?;
        let env_keyed: HashSet<String> = state.env_keyed_providers().cloned().collect();
        let admin = AdminState {
            store,
            pepper,
            operator_token: opts.admin_token.as_deref().map(Arc::from),
            hooks: Arc::new(GatewayHooks(state.clone())),
            env_keyed_providers: Arc::new(env_keyed),
            login_throttle: Arc::default(),
            sip2_plaintext_hosts: Arc::from(config.patrons.sip2_plaintext_hosts.clone()),
            quota,
            openapi: Arc::from(crate::api_doc::openapi_json()),
        };
        if admin.operator_token.is_none() {
            tracing::warn!(
                "CARREL_ADMIN_TOKEN is not set: only existing admin accounts can sign in"
            );
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "applies other replicas' changes for the life of the runtime; nothing to \
                      drain at shutdown"
        )]
        tokio::spawn(follow_store_events(admin.clone(), state.clone()));
        #[expect(
            clippy::disallowed_methods,
            reason = "hourly upkeep for the life of the runtime; what is not done at shutdown \
                      is done at the next start"
        )]
        tokio::spawn(hourly_upkeep(admin.clone()));
        #[expect(
            clippy::disallowed_methods,
            reason = "writes incident records for the life of the runtime; the queue is \
                      bounded and a record not yet written at exit is lost, as is counted"
        )]
        tokio::spawn(crate::safeguards::screening::run_incident_desk(
            incidents,
            store_for_incidents,
        ));
        if let Some(every) = state.upstream_config().health_check_interval {
            #[expect(
                clippy::disallowed_methods,
                reason = "probes providers for the life of the runtime; a probe cut short at \
                          shutdown changes nothing"
            )]
            tokio::spawn(check_health(state.clone(), every));
        }
        warn_of_plaintext_sip2(&state).await;
        Ok(App { state, admin })
    }

    /// The admin router over this app's state, with `/metrics`.
    pub fn admin_router(&self) -> axum::Router {
        carrel_admin::router(self.admin.clone()).merge(crate::metrics::router(self.state.clone()))
    }
}

/// Says at start which institutions' SIP2 goes without TLS (to loopback or an allow-listed
/// host): card numbers and PINs cross that network in the clear.
async fn warn_of_plaintext_sip2(state: &AppState) {
    for host in &state.patron_desk.config.sip2_plaintext_hosts {
        tracing::warn!(host = %host, "patrons.sip2_plaintext_hosts allows plaintext SIP2 to this host");
    }
    match state.store.all_patron_auth().await {
        Ok(all) => {
            for (institution, auth) in all {
                if let carrel_core::patrons::PatronAuth::Sip2(sip2) = auth
                    && !sip2.tls
                {
                    tracing::warn!(
                        institution = %institution,
                        host = %sip2.host,
                        "SIP2 without TLS: card numbers and PINs cross the network in the clear"
                    );
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read patron sign-in settings"),
    }
}

/// Opens the store `store.kind` names, and says which at start.
pub async fn open_store(config: &Config, opts: &StartOptions) -> Result<Store, InitError> {
    let store = match config.store.kind {
        StoreKind::Embedded => Store::open(&config.server.data_dir)?,
        StoreKind::Redis => {
            // Keys are hashed and patrons named with the pepper: replicas that each made their
            // own would not recognise each other's keys.
            if opts.pepper_env.is_none() {
                return Err(InitError::Config(ConfigError::invalid(
                    "store.kind",
                    format!(
                        "\"redis\" needs {}: every replica must share one pepper",
                        carrel_core::keys::PEPPER_ENV
                    ),
                )));
            }
            Store::open_replica(RedisSettings {
                url: config.store.redis_url.clone(),
                prefix: config.store.redis_prefix.clone(),
                data_dir: config.server.data_dir.clone(),
            })
            .await?
        }
    };
    tracing::info!(
        store = store.kind(),
        redis_prefix =
            (config.store.kind == StoreKind::Redis).then_some(config.store.redis_prefix.as_str()),
        "store open"
    );
    Ok(store)
}

/// Applies to this replica's data plane what other replicas changed (on the Redis backend;
/// the embedded store sends nothing). A replica that falls behind the events reloads
/// everything the events would have touched.
async fn follow_store_events(admin: AdminState, state: AppState) {
    use carrel_core::store::StoreEvent;
    use tokio::sync::broadcast::error::RecvError;
    let mut events = admin.store.events();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "fell behind the store's events; reloading");
                admin.hooks.everything_changed().await;
                reload_quota(&admin).await;
                continue;
            }
        };
        tracing::debug!(?event, "change from another replica");
        match event {
            StoreEvent::KeyChanged(id) => admin.hooks.key_changed(&id).await,
            StoreEvent::InstitutionChanged(id) => admin.hooks.institution_changed(&id).await,
            StoreEvent::CatalogChanged => admin.hooks.catalog_changed().await,
            StoreEvent::ContainmentChanged => admin.hooks.containment_changed().await,
            StoreEvent::SafeguardsChanged(id) => admin.hooks.safeguards_changed(&id).await,
            StoreEvent::LimitsChanged => reload_quota(&admin).await,
            StoreEvent::KioskSessionsEnded { kiosk_key_id } => {
                state.sessions.evict_kiosk(&kiosk_key_id);
            }
            StoreEvent::PatronSessionEnded(id) => state.sessions.evict(&id).await,
            StoreEvent::ExtensionsChanged {
                institution_id,
                patron_ref,
            } => {
                let patron = Some((institution_id.as_str(), patron_ref.as_str()));
                if let Err(e) =
                    carrel_core::quota::refresh_extensions(&admin.quota, &admin.store, patron).await
                {
                    tracing::error!(error = %e, "could not load a patron's extensions");
                }
            }
            StoreEvent::PatronDayReset {
                institution_id,
                patron_ref,
            } => match admin.store.get_institution(&institution_id).await {
                Ok(Some(inst)) => {
                    let (id, tz): (Arc<str>, Arc<str>) =
                        (inst.id.as_str().into(), inst.timezone.as_str().into());
                    admin.quota.reset_patron_day(&id, &tz, &patron_ref);
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "could not read an institution"),
            },
        }
    }
}

/// How often the audit log's head is signed and kept, when it grew.
pub const TREE_HEAD_EVERY: Duration = Duration::from_secs(3600);

/// Probes every provider every `every` (see [`crate::upstream::routing`]).
async fn check_health(state: AppState, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let catalog = state.catalog.load_full();
        crate::upstream::routing::probe_all(&state.upstream, &catalog).await;
    }
}

/// Every [`TREE_HEAD_EVERY`] (and once at start): pays member institutions' finished days from
/// their sponsor pools, removes incident text whose retention ended (reads already hide it),
/// and signs and keeps the audit log's head when entries were added since the last one.
async fn hourly_upkeep(admin: AdminState) {
    let mut every = tokio::time::interval(TREE_HEAD_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = carrel_admin::sponsors::settle_due(&admin).await {
            tracing::warn!(error = %e, "could not settle sponsor pools' draws");
        }
        match admin
            .store
            .purge_incident_text(carrel_core::domain::unix_now())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "incident text past its retention removed"),
            Err(e) => tracing::warn!(error = %e, "could not remove expired incident text"),
        }
        let last = match admin.store.tree_heads().await {
            Ok(heads) => heads.last().map_or(0, |h| h.tree_size),
            Err(e) => {
                tracing::warn!(error = %e, "could not read the audit log's tree heads");
                continue;
            }
        };
        match admin.store.audit_len().await {
            Ok(len) if len > last => match carrel_admin::audit::make_tree_head(&admin).await {
                Ok(head) => {
                    tracing::info!(tree_size = head.tree_size, "audit log tree head signed");
                }
                Err(e) => tracing::warn!(error = %e, "could not sign the audit log's head"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read the audit log"),
        }
    }
}

async fn reload_quota(admin: &AdminState) {
    match admin.store.limits_table().await {
        Ok(table) => admin.quota.set_limits(table),
        Err(e) => tracing::error!(error = %e, "could not reload limits"),
    }
    if let Err(e) = carrel_core::quota::refresh_extensions(&admin.quota, &admin.store, None).await {
        tracing::error!(error = %e, "could not reload extensions");
    }
}

/// Adds the built-in demo provider and model to a config.
pub fn add_demo_model(config: &mut Config) {
    if !config.providers.iter().any(|p| p.name == "demo") {
        config.providers.push(ProviderConfig {
            name: "demo".to_owned(),
            kind: ProviderKind::Demo,
            base_url: None,
            api_key: None,
        });
    }
    if !config.models.iter().any(|m| m.name == demo::DEMO_MODEL) {
        config.models.push(ModelConfig {
            name: demo::DEMO_MODEL.to_owned(),
            provider: "demo".to_owned(),
            upstream_model: demo::DEMO_MODEL.to_owned(),
            tier: Tier::Baseline,
            tier_basis: carrel_core::domain::TierBasis::OperatorJudgement,
            input_price_per_mtok: 0.0,
            output_price_per_mtok: 0.0,
            max_output_tokens: carrel_core::config::DEFAULT_MAX_OUTPUT_TOKENS,
            routing: Default::default(),
            public_cache: Vec::new(),
        });
    }
}

/// The demo institution and its key.
#[derive(Debug, Clone)]
pub struct DemoTenant {
    /// Institution id.
    pub institution_id: String,
    /// The API key string.
    pub api_key: String,
}

/// Seeds a demo institution and a service key for `carrel demo`.
pub async fn seed_demo_tenant(app: &App) -> Result<DemoTenant, InitError> {
    let store = &app.state.store;
    let inst = store
        .create_institution(NewInstitution {
            name: "Carrel Demo Library".to_owned(),
            kind: InstitutionKind::Library,
            region: "US-IL".to_owned(),
            timezone: "America/Chicago".to_owned(),
            sector: Some("public_library".to_owned()),
        })
        .await?;
    let minted = NewKey::generate();
    store
        .create_key(NewApiKey {
            id: minted.id.clone(),
            institution_id: inst.id.clone(),
            name: "demo key".to_owned(),
            kind: KeyKind::Service,
            tier_ceiling: Tier::Advanced,
            secret_hash: app.state.pepper.hash_secret(minted.secret()),
            expires_at: None,
            site_id: None,
            group_id: None,
            allowed_models: None,
        })
        .await?;
    Ok(DemoTenant {
        institution_id: inst.id,
        api_key: minted.token,
    })
}
