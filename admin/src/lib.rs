//! Carrel's control plane: the admin API that institutions and operators script against.
//!
//! Served on the admin listener, never on the public one. Every route but `/healthz`, login and
//! the published API document (`/admin/openapi.json`, `/admin/docs`) needs an admin credential;
//! today that is the operator's bearer token from `CARREL_ADMIN_TOKEN`.
//! The router is axum: the admin plane is not the hot path, and axum + utoipa keep handlers and
//! the published OpenAPI contract (`openapi/openapi.json`) side by side.
//!
//! # Layout
//!
//! - [`error`]: [`error::AdminError`], rendered as the OpenAI-shaped error body.
//! - [`json`]: the JSON body extractor: 400 for malformed JSON, 422 naming the bad field.
//! - [`auth`]: who the caller is ([`auth::AdminPrincipal`]) and the one policy table of what
//!   each role may do to which institution.
//! - [`accounts`]: admin accounts, login, logout, `me`.
//! - [`audit`]: the audit trail of admin actions.
//! - [`catalog`]: providers and models.
//! - [`institutions`]: institutions and their API keys.
//! - [`structure`]: sites and groups of an institution.
//! - [`limits`]: limits by level with their current usage, and patrons' extensions and day
//!   resets.
//! - [`tokens`]: scoped API tokens for automation.
//! - [`usage`]: usage reports of an institution.
//! - [`query`]: query strings and the cursor pagination every list shares.
//! - [`doc`]: the OpenAPI document.
//! - [`reference`]: `/admin/docs`, the API reference page (Swagger UI, embedded).

pub mod accounts;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod doc;
pub mod error;
pub mod incidents;
pub mod institutions;
pub mod json;
pub mod limits;
pub mod patrons;
pub mod query;
pub mod reference;
pub mod reports;
pub mod safeguards;
pub mod sponsors;
pub mod structure;
pub mod tokens;
pub mod usage;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, patch, post, put};
use carrel_core::keys::Pepper;
use carrel_core::store::Store;

/// A hook's work; the admin handler awaits it before answering, so a 2xx means "in effect".
pub type HookFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What the data plane must hear about at once when the control plane changes something.
/// The gateway implements it; on several replicas the same calls arrive from pub/sub.
pub trait ControlHooks: Send + Sync + 'static {
    /// A key was revoked or its expiry changed: drop it from every cache now.
    fn key_changed(&self, key_id: &str) -> HookFuture;
    /// Providers or models changed: reload the routing catalog.
    fn catalog_changed(&self) -> HookFuture;
    /// An institution's status or time zone changed: drop its keys from every cache now.
    fn institution_changed(&self, institution_id: &str) -> HookFuture;
    /// A usage report is about to be read: write every usage record already metered, so the
    /// report includes every response that has ended.
    fn usage_flush(&self) -> HookFuture;
    /// An institution's safeguard settings changed: recompile its rules.
    fn safeguards_changed(&self, institution_id: &str) -> HookFuture;
    /// Whether an institution's rule sets compile with the operator's (the message says why
    /// not, naming the rule).
    fn check_safeguards(
        &self,
        settings: &carrel_core::store::SafeguardSettings,
    ) -> Result<(), String>;
    /// Signs the audit log's head of `tree_size` leaves with `root`, with the gateway's key.
    fn sign_tree_head(
        &self,
        tree_size: u64,
        root: &carrel_core::merkle::Hash,
    ) -> carrel_core::audit::TreeHead;
    /// A containment switch changed: reload the set and stop what it now covers, streams in
    /// flight included.
    fn containment_changed(&self) -> HookFuture;
    /// Changes may have been missed (a replica fell behind the store's events): drop every
    /// cache and reload every snapshot.
    fn everything_changed(&self) -> HookFuture;
}

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct AdminState {
    /// The control-data store.
    pub store: Store,
    /// Keys the hash of new API key secrets.
    pub pepper: Pepper,
    /// The operator's bearer token; `None` locks every admin route.
    pub operator_token: Option<Arc<str>>,
    /// Tells the data plane about changes.
    pub hooks: Arc<dyn ControlHooks>,
    /// Names of config-declared providers whose API key came from the environment (kept in
    /// memory only, so the store cannot tell).
    pub env_keyed_providers: Arc<HashSet<String>>,
    /// Login attempts per client address.
    pub login_throttle: Arc<accounts::LoginThrottle>,
    /// The quota engine the data plane counts with: admin changes to limits, extensions and
    /// patron days are applied to it, and limit reports read current usage from it.
    pub quota: carrel_core::quota::QuotaEngine,
    /// Hosts SIP2 may reach without TLS besides loopback (`patrons.sip2_plaintext_hosts`).
    pub sip2_plaintext_hosts: Arc<[String]>,
    /// The OpenAPI document served at `/admin/openapi.json`. The gateway fills it with the
    /// admin and public APIs together; [`doc::AdminApi`] is the admin part alone.
    pub openapi: Arc<str>,
}

impl AdminState {
    /// An institution, or 404 naming it.
    pub async fn institution(
        &self,
        id: &str,
    ) -> Result<carrel_core::domain::Institution, error::AdminError> {
        self.store
            .get_institution(id)
            .await?
            .ok_or_else(|| error::AdminError::NotFound(format!("institution `{id}`")))
    }
}

/// The admin router: `/healthz`, `/admin/v1/...`, `/admin/openapi.json` and `/admin/docs`.
/// Every route but `/healthz`, `POST /admin/v1/login` and the published document with its
/// reference page goes through [`auth::require_admin`].
pub fn router(state: AdminState) -> Router {
    let admin = Router::new()
        .route(
            "/admin/v1/providers",
            get(catalog::list_providers).post(catalog::create_provider),
        )
        .route(
            "/admin/v1/models",
            get(catalog::list_models).post(catalog::create_model),
        )
        .route(
            "/admin/v1/institutions",
            get(institutions::list_institutions).post(institutions::create_institution),
        )
        .route(
            "/admin/v1/institutions/{id}",
            get(institutions::get_institution).patch(institutions::update_institution),
        )
        .route(
            "/admin/v1/institutions/{id}/usage",
            get(usage::usage_report),
        )
        .route("/admin/v1/reports/sectors", get(reports::sector_report))
        .route(
            "/admin/v1/sponsor-pools",
            get(sponsors::list_pools).post(sponsors::create_pool),
        )
        .route("/admin/v1/sponsor-pools/settle", post(sponsors::settle_now))
        .route("/admin/v1/sponsor-pools/{pool}", get(sponsors::get_pool))
        .route(
            "/admin/v1/sponsor-pools/{pool}/members/{institution_id}",
            put(sponsors::set_member),
        )
        .route(
            "/admin/v1/sponsor-pools/{pool}/top-ups",
            post(sponsors::top_up),
        )
        .route(
            "/admin/v1/sponsor-pools/{pool}/ledger",
            get(sponsors::ledger),
        )
        .route(
            "/admin/v1/institutions/{id}/keys",
            get(institutions::list_keys).post(institutions::create_key),
        )
        .route(
            "/admin/v1/institutions/{id}/sites",
            get(structure::list_sites).post(structure::create_site),
        )
        .route(
            "/admin/v1/institutions/{id}/groups",
            get(structure::list_groups).post(structure::create_group),
        )
        .route(
            "/admin/v1/keys/{id}",
            delete(institutions::revoke_key).patch(institutions::update_key),
        )
        .route("/admin/v1/keys/{id}/rotate", post(institutions::rotate_key))
        .route(
            "/admin/v1/keys/{id}/frontier-attestation",
            get(safeguards::get_attestation)
                .put(safeguards::put_attestation)
                .delete(safeguards::delete_attestation),
        )
        .route("/admin/v1/models/{name}", patch(safeguards::contain_model))
        .route(
            "/admin/v1/models/{name}/prices",
            get(catalog::list_prices).post(catalog::create_price),
        )
        .route(
            "/admin/v1/providers/{name}",
            patch(safeguards::contain_provider),
        )
        .route("/admin/v1/containment", get(safeguards::list_containment))
        .route(
            "/admin/v1/institutions/{id}/safeguards",
            get(incidents::get_safeguards).put(incidents::put_safeguards),
        )
        .route(
            "/admin/v1/incidents",
            get(incidents::list_incidents).post(incidents::report_incident),
        )
        .route(
            "/admin/v1/institutions/{id}/limits",
            get(limits::get_institution_limits).put(limits::put_institution_limits),
        )
        .route(
            "/admin/v1/sites/{id}/limits",
            get(limits::get_site_limits).put(limits::put_site_limits),
        )
        .route(
            "/admin/v1/groups/{id}/limits",
            get(limits::get_group_limits).put(limits::put_group_limits),
        )
        .route(
            "/admin/v1/keys/{id}/limits",
            get(limits::get_key_limits).put(limits::put_key_limits),
        )
        .route(
            "/admin/v1/models/{name}/limits",
            get(limits::get_model_limits).put(limits::put_model_limits),
        )
        .route(
            "/admin/v1/institutions/{id}/patron-extensions",
            post(limits::extend_patron),
        )
        .route(
            "/admin/v1/institutions/{id}/patron-day-resets",
            post(limits::reset_patron_day),
        )
        .route(
            "/admin/v1/institutions/{id}/patron-auth",
            get(patrons::get_patron_auth).put(patrons::put_patron_auth),
        )
        .route(
            "/admin/v1/institutions/{id}/patrons",
            post(patrons::import_patrons),
        )
        .route(
            "/admin/v1/institutions/{id}/guest-passes",
            get(patrons::list_guest_passes).post(patrons::create_guest_passes),
        )
        .route(
            "/admin/v1/users",
            get(accounts::list_users).post(accounts::create_user),
        )
        .route("/admin/v1/users/{id}", delete(accounts::delete_user))
        .route("/admin/v1/logout", post(accounts::logout))
        .route("/admin/v1/me", get(accounts::me))
        .route(
            "/admin/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route("/admin/v1/tokens/{id}", delete(tokens::revoke_token))
        .route("/admin/v1/audit", get(audit::list))
        .route("/admin/v1/audit/tree-head", get(audit::tree_head))
        .route("/admin/v1/audit/tree-heads", get(audit::tree_heads))
        .route(
            "/admin/v1/audit/proof/inclusion",
            get(audit::inclusion_proof),
        )
        .route(
            "/admin/v1/audit/proof/consistency",
            get(audit::consistency_proof),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/v1/login", post(accounts::login))
        .route("/admin/openapi.json", get(doc::serve))
        .route(
            "/admin/schemas/incident-report.json",
            get(incidents::incident_schema),
        )
        .merge(reference::routes())
        .merge(admin)
        .fallback(error::not_found)
        .with_state(state)
}
