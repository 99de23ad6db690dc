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
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use carrel_core::domain::{PatronPrincipal, Principal, unix_now};
use carrel_core::keys::{ParsedKey, SESSION_PREFIX};
use carrel_core::store::PatronSession;

use crate::app::AppState;
use crate::cache::Evictable;
use crate::error::GatewayError;
use crate::patrons::SignInError;
use crate::pipeline::authenticate::CATCH_UP;

/// How often one replica renews a busy session's idle timer.
const TOUCH_EVERY: i64 = 15;

/// `last_touch` of a session this replica has not renewed yet (far enough from any `now` that
/// the difference cannot overflow).
const NEVER_TOUCHED: i64 = i64::MIN / 2;

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
#[derive(Clone, Debug)]
pub struct SessionCache(Evictable<CachedSession>);

impl Default for SessionCache {
    fn default() -> Self {
        SessionCache(Evictable::new(100_000, Duration::from_secs(60)))
    }
}

impl SessionCache {
    /// Forgets one session.
    pub async fn evict(&self, id: &str) {
        self.0.evict(id).await;
    }

    /// Forgets the sessions opened on a kiosk key (a new sign-in there, the key changed).
    pub fn evict_kiosk(&self, kiosk_key_id: &str) {
        let id: Arc<str> = kiosk_key_id.into();
        self.0.evict_if(move |s| s.kiosk_key_id == id);
    }

    /// Forgets an institution's sessions (suspended, time zone changed).
    pub fn evict_institution(&self, institution_id: &str) {
        let id: Arc<str> = institution_id.into();
        self.0.evict_if(move |s| s.principal.institution_id == id);
    }

    /// Forgets every session.
    pub fn evict_all(&self) {
        self.0.evict_all();
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
    let cache = &state.sessions.0;
    if let Some(hit) = cache.get(id).await {
        return Ok(Some(hit));
    }
    let generation = cache.generation();
    let read = || async {
        state
            .store
            .patron_session(id)
            .await
            .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))
    };
    let mut row = read().await?;
    // Opened through another replica a moment ago: catch up briefly and look again.
    if row.is_none() && state.store.caught_up_within(CATCH_UP).await {
        row = read().await?;
    }
    let Some(row) = row else { return Ok(None) };
    // Loaded, not opened here: its timer is renewed on its first request.
    let Some(session) = build(state, row, NEVER_TOUCHED).await? else {
        return Ok(None);
    };
    let session = Arc::new(session);
    cache.insert(id, Arc::clone(&session), generation).await;
    Ok(Some(session))
}

/// The cached form of a stored session, its idle timer last renewed (from this replica) at
/// `last_touch`; `None` when its kiosk key no longer works.
async fn build(
    state: &AppState,
    row: PatronSession,
    last_touch: i64,
) -> Result<Option<CachedSession>, GatewayError> {
    let Some(kiosk) = state
        .keys
        .principal_by_id(&row.kiosk_key_id, &state.store)
        .await?
    else {
        return Ok(None);
    };
    let mut principal = (*kiosk).clone();
    if let Some(group) = &row.group_id {
        // The patron's own group (from the school's ID token) replaces the kiosk key's, and
        // its tier ceiling with it.
        principal.group_id = Some(group.as_str().into());
        principal.group_tier_ceiling = state
            .store
            .group_tier_ceiling(group)
            .await
            .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?;
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
        last_touch: AtomicI64::new(last_touch),
    }))
}

/// Whether a bearer token is a patron session token (rather than a key).
pub fn is_session_token(token: &str) -> bool {
    token.starts_with(SESSION_PREFIX)
}

/// Opens a session at sign-in: stored (ending the kiosk's earlier ones everywhere), its idle
/// timer started, and cached here as it was just written, with no second read.
pub(crate) async fn open(
    state: &AppState,
    session: carrel_core::store::NewPatronSession,
) -> Result<Arc<CachedSession>, GatewayError> {
    let unavailable = |e| GatewayError::StoreUnavailable(Arc::new(e));
    let id = session.id.clone();
    let kiosk = session.kiosk_key_id.clone();
    let ended = state
        .store
        .create_patron_session(session.clone())
        .await
        .map_err(unavailable)?;
    for old in &ended {
        let _ = state.store.take_flag(&idle_flag(old)).await;
    }
    state
        .store
        .set_flag(&idle_flag(&id), state.patron_desk.config.session_idle)
        .await
        .map_err(unavailable)?;
    state.sessions.evict_kiosk(&kiosk);
    let generation = state.sessions.0.generation();
    let cached = build(state, session, unix_now())
        .await?
        .ok_or(GatewayError::InvalidApiKey)?;
    let cached = Arc::new(cached);
    state
        .sessions
        .0
        .insert(&id, Arc::clone(&cached), generation)
        .await;
    Ok(cached)
}
