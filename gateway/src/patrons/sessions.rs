//! Patron session tokens (`crs_…`) on the data plane: verified like API keys, cached like
//! them, and held to two clocks — an idle timeout that each request renews, and an absolute
//! end.
//!
//! The idle timer lives in the store's short-lived state (`idle:<session>`), so on the Redis
//! backend every replica renews and reads the same timer. A request renews it at most every
//! [`TOUCH_EVERY`] per replica, so idle is exact to within that, at one Redis call per
//! session per interval. When Redis cannot be reached, this replica's own view of the
//! session's last request decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use carrel_core::domain::{PatronPrincipal, Principal, unix_now};
use carrel_core::keys::{ParsedKey, SESSION_PREFIX};
use carrel_core::store::{PatronSession, Store};

use crate::app::AppState;
use crate::error::GatewayError;
use crate::patrons::SignInError;

/// How often one replica renews a busy session's idle timer.
const TOUCH_EVERY: i64 = 15;

/// The idle timer's name.
pub(crate) fn idle_flag(session_id: &str) -> String {
    format!("idle:{session_id}")
}

/// A verified session as cached.
#[derive(Debug)]
pub struct CachedSession {
    secret_hash: [u8; 32],
    /// The kiosk's principal with the patron on top.
    pub principal: Arc<Principal>,
    /// The kiosk key it was opened on.
    pub kiosk_key_id: Arc<str>,
    /// Unix seconds: the absolute end.
    pub expires_at: i64,
    /// What sign-out gives back to the ILS, sealed under the token's secret.
    pub sealed_end: Option<Vec<u8>>,
    /// Unix seconds of the last request this replica saw.
    last_seen: AtomicI64,
    /// Unix seconds of the last renewal of the idle timer from this replica.
    last_touch: AtomicI64,
}

/// Verified sessions by id.
#[derive(Clone)]
pub struct SessionCache {
    cache: moka::future::Cache<Arc<str>, Arc<CachedSession>>,
    /// Bumped before every eviction, as in the key cache.
    generation: Arc<AtomicU64>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Default for SessionCache {
    fn default() -> Self {
        SessionCache::new(100_000, Duration::from_secs(60))
    }
}

impl SessionCache {
    /// A cache of at most `capacity` sessions, each kept at most `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        SessionCache {
            cache: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            generation: Arc::default(),
        }
    }

    /// Forgets one session.
    pub async fn evict(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(id).await;
    }

    /// Forgets every session matching `pred` (a kiosk's, an institution's).
    fn evict_if(&self, pred: impl Fn(&CachedSession) -> bool + Send + Sync + 'static) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self
            .cache
            .invalidate_entries_if(move |_, s| pred(s))
            .is_err()
        {
            self.cache.invalidate_all();
        }
    }

    /// Forgets the sessions opened on a kiosk key (a new sign-in there, the key changed).
    pub fn evict_kiosk(&self, kiosk_key_id: &str) {
        let id: Arc<str> = kiosk_key_id.into();
        self.evict_if(move |s| s.kiosk_key_id == id);
    }

    /// Forgets an institution's sessions (suspended, time zone changed).
    pub fn evict_institution(&self, institution_id: &str) {
        let id: Arc<str> = institution_id.into();
        self.evict_if(move |s| s.principal.institution_id == id);
    }

    /// Forgets every session.
    pub fn evict_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }
}

/// The principal of a session token, or why there is none. `token` starts with `crs_`.
pub async fn principal(state: &AppState, token: &str) -> Result<Arc<Principal>, GatewayError> {
    Ok(Arc::clone(&live_session(state, token).await?.principal))
}

/// The live session of a token: verified, within both clocks, its idle timer renewed.
pub async fn live_session(
    state: &AppState,
    token: &str,
) -> Result<Arc<CachedSession>, GatewayError> {
    let parsed = ParsedKey::parse_with(SESSION_PREFIX, token).ok_or(SignInError::SessionExpired)?;
    let session = load(state, parsed.id)
        .await?
        .ok_or(SignInError::SessionExpired)?;
    if !state
        .pepper
        .verify_secret(parsed.secret, &session.secret_hash)
    {
        return Err(SignInError::SessionExpired.into());
    }
    let now = unix_now();
    if now >= session.expires_at {
        end(state, parsed.id).await;
        return Err(SignInError::SessionExpired.into());
    }
    if !still_active(state, parsed.id, &session, now).await {
        end(state, parsed.id).await;
        return Err(SignInError::SessionExpired.into());
    }
    Ok(session)
}

/// Whether the session's idle timer is still running, renewing it.
async fn still_active(state: &AppState, id: &str, session: &CachedSession, now: i64) -> bool {
    let idle = state.patron_desk.config.session_idle;
    let last_touch = session.last_touch.load(Ordering::Relaxed);
    let alive = if now - last_touch < TOUCH_EVERY {
        true
    } else {
        match state.store.touch_flag(&idle_flag(id), idle).await {
            Ok(alive) => {
                session.last_touch.store(now, Ordering::Relaxed);
                alive
            }
            Err(e) => {
                // The shared timer cannot be read: this replica's own view decides.
                tracing::warn!(error = %e, "patron session idle timer unavailable; using this replica's");
                now - session.last_seen.load(Ordering::Relaxed) < idle.as_secs() as i64
            }
        }
    };
    if alive {
        session.last_seen.store(now, Ordering::Relaxed);
    }
    alive
}

/// Ends a session everywhere: the row, the idle timer, this replica's cache.
pub(crate) async fn end(state: &AppState, id: &str) {
    if let Err(e) = state.store.end_patron_session(id).await {
        tracing::warn!(error = %e, "could not end a patron session in the store");
    }
    let _ = state.store.take_flag(&idle_flag(id)).await;
    state.sessions.evict(id).await;
}

async fn load(state: &AppState, id: &str) -> Result<Option<Arc<CachedSession>>, GatewayError> {
    let cache = &state.sessions;
    if let Some(hit) = cache.cache.get(id).await {
        return Ok(Some(hit));
    }
    let generation = cache.generation.load(Ordering::Acquire);
    let mut row = state
        .store
        .patron_session(id)
        .await
        .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?;
    if row.is_none() && state.store.is_replica() {
        // Opened through another replica a moment ago: catch up briefly and look again.
        if let Ok(Ok(())) = tokio::time::timeout(CATCH_UP, state.store.catch_up()).await {
            row = state
                .store
                .patron_session(id)
                .await
                .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?;
        }
    }
    let Some(row) = row else { return Ok(None) };
    let Some(session) = build(state, row).await? else {
        return Ok(None);
    };
    let session = Arc::new(session);
    cache
        .cache
        .insert(Arc::from(id), Arc::clone(&session))
        .await;
    if cache.generation.load(Ordering::Acquire) != generation {
        cache.cache.invalidate(id).await;
    }
    Ok(Some(session))
}

/// How long an unknown session waits for this replica to catch up with the shared log.
const CATCH_UP: Duration = Duration::from_millis(250);

/// The cached form of a stored session; `None` when its kiosk key no longer works.
async fn build(
    state: &AppState,
    row: PatronSession,
) -> Result<Option<CachedSession>, GatewayError> {
    let Some(kiosk) = state
        .keys
        .principal_by_id(&row.kiosk_key_id, &state.store)
        .await?
    else {
        return Ok(None);
    };
    let mut principal = (*kiosk).clone();
    if row.group_id.is_some() {
        principal.group_id = row.group_id.as_deref().map(Into::into);
    }
    principal.patron = Some(PatronPrincipal {
        session_id: row.id.as_str().into(),
        patron_ref: row.patron_ref.as_str().into(),
        age_band: row.age_band,
        allowance: row.allowance,
    });
    let now = unix_now();
    Ok(Some(CachedSession {
        secret_hash: row.secret_hash,
        principal: Arc::new(principal),
        kiosk_key_id: row.kiosk_key_id.as_str().into(),
        expires_at: row.expires_at,
        sealed_end: row.sealed_end,
        last_seen: AtomicI64::new(now),
        // A session just loaded renews its timer on its first request.
        last_touch: AtomicI64::new(i64::MIN / 2),
    }))
}

/// Whether a bearer token is a patron session token (rather than a key).
pub fn is_session_token(token: &str) -> bool {
    token.starts_with(SESSION_PREFIX)
}

/// The store a session lives in, for sign-in.
pub(crate) async fn open(
    store: &Store,
    session: carrel_core::store::NewPatronSession,
    idle: Duration,
) -> Result<Vec<String>, carrel_core::store::StoreError> {
    let id = session.id.clone();
    let ended = store.create_patron_session(session).await?;
    store.set_flag(&idle_flag(&id), idle).await?;
    Ok(ended)
}
