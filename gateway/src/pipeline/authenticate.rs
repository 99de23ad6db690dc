//! Stage 1, authenticate: `Authorization: Bearer crl_…` → [`Principal`].
//!
//! The key's format and checksum are checked first, so noise never reaches the store. Verified
//! keys are cached by public id (the cache holds the secret's keyed hash, never the secret); the
//! secret is compared against it in constant time on every request. Revocation evicts the entry
//! at once ([`KeyCache::evict`]), and a load that raced an eviction is not kept; the TTL bounds
//! staleness if an eviction is ever missed.

use std::sync::Arc;

use carrel_core::domain::{InstitutionStatus, Principal};
use carrel_core::keys::ParsedKey;
use carrel_core::store::Store;
use http::HeaderMap;

use crate::app::AppState;
use crate::cache::Evictable;
use crate::error::GatewayError;
use crate::pipeline::{Flow, RequestCtx};

/// A verified key as cached.
#[derive(Debug)]
pub struct CachedKey {
    secret_hash: [u8; 32],
    principal: Arc<Principal>,
}

/// Verified keys by public id.
#[derive(Clone, Debug)]
pub struct KeyCache(Evictable<CachedKey>);

/// Why a lookup found no key; shared by every waiter of a coalesced miss.
enum Miss {
    Unknown,
    Store(Arc<carrel_core::store::StoreError>),
}

fn cached(cred: &carrel_core::domain::KeyCredential) -> Arc<CachedKey> {
    Arc::new(CachedKey {
        secret_hash: cred.secret_hash,
        principal: Arc::new(Principal::for_key(cred)),
    })
}

impl KeyCache {
    /// A cache of at most `capacity` keys, each kept at most `ttl`.
    pub fn new(capacity: u64, ttl: std::time::Duration) -> Self {
        KeyCache(Evictable::new(capacity, ttl))
    }

    /// The cached key, loading it from the store on a miss. Concurrent misses for one id share
    /// one store lookup. Unknown and revoked ids are not cached.
    async fn get(&self, id: &str, store: &Store) -> Result<Option<Arc<CachedKey>>, GatewayError> {
        let loaded = self
            .0
            .get_or_load(id, async {
                match store.key_credential(id).await {
                    Ok(Some(cred)) => Ok(cached(&cred)),
                    Ok(None) => Err(Miss::Unknown),
                    Err(e) => Err(Miss::Store(Arc::new(e))),
                }
            })
            .await;
        match loaded {
            Ok(key) => Ok(Some(key)),
            Err(miss) => match &*miss {
                Miss::Unknown => self.after_catch_up(id, store).await,
                Miss::Store(e) => Err(GatewayError::StoreUnavailable(Arc::clone(e))),
            },
        }
    }

    /// A key unknown to this replica's view may have been made through another replica a
    /// moment ago: catch up with the shared log (briefly) and look once more. Nothing is
    /// cached on a second miss, as on the first.
    async fn after_catch_up(
        &self,
        id: &str,
        store: &Store,
    ) -> Result<Option<Arc<CachedKey>>, GatewayError> {
        let generation = self.0.generation();
        if !store.caught_up_within(CATCH_UP).await {
            return Ok(None);
        }
        match store.key_credential(id).await {
            Ok(Some(cred)) => {
                let key = cached(&cred);
                self.0.insert(id, Arc::clone(&key), generation).await;
                Ok(Some(key))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(GatewayError::StoreUnavailable(Arc::new(e))),
        }
    }

    /// The principal of a key by its id, without its secret: what a patron session opened on
    /// the key runs as. `None` for an unknown, revoked or expired key, or one whose
    /// institution is suspended.
    pub async fn principal_by_id(
        &self,
        id: &str,
        store: &Store,
    ) -> Result<Option<Arc<Principal>>, GatewayError> {
        Ok(self.get(id, store).await?.and_then(|key| {
            let p = &key.principal;
            let usable = !p.expired(carrel_core::domain::unix_now())
                && p.institution_status != InstitutionStatus::Suspended;
            usable.then(|| Arc::clone(p))
        }))
    }

    /// Forgets a key at once (revocation).
    pub async fn evict(&self, id: &str) {
        self.0.evict(id).await;
    }

    /// Forgets every key.
    pub fn evict_all(&self) {
        self.0.evict_all();
    }

    /// Forgets every key of an institution at once (suspension, time zone change).
    pub fn evict_institution(&self, institution_id: &str) {
        let id: Arc<str> = institution_id.into();
        self.0
            .evict_if(move |key| key.principal.institution_id == id);
    }
}

/// How long an unknown key waits for this replica to catch up with the shared log.
pub(crate) const CATCH_UP: std::time::Duration = std::time::Duration::from_millis(250);

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Verifies the request's key and returns who it runs as.
pub async fn principal(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<Arc<Principal>, GatewayError> {
    let token = bearer(headers).ok_or(GatewayError::MissingApiKey)?;
    if crate::patrons::sessions::is_session_token(token) {
        return crate::patrons::sessions::principal(state, token).await;
    }
    key_principal(state, token).await
}

/// Verifies an API key (never a session token) and returns who it runs as.
pub async fn key_principal(state: &AppState, token: &str) -> Result<Arc<Principal>, GatewayError> {
    let parsed = ParsedKey::parse(token).ok_or(GatewayError::InvalidApiKey)?;
    let key = state
        .keys
        .get(parsed.id, &state.store)
        .await?
        .ok_or(GatewayError::InvalidApiKey)?;
    if !state.pepper.verify_secret(parsed.secret, &key.secret_hash) {
        return Err(GatewayError::InvalidApiKey);
    }
    if key.principal.expires_at.is_some() && key.principal.expired(carrel_core::domain::unix_now())
    {
        return Err(GatewayError::ExpiredApiKey);
    }
    if key.principal.institution_status == InstitutionStatus::Suspended {
        return Err(GatewayError::InstitutionSuspended);
    }
    Ok(Arc::clone(&key.principal))
}

/// Stage 1.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
) -> Result<Flow, GatewayError> {
    ctx.principal = Some(principal(state, headers).await?);
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_is_case_insensitive_and_trimmed() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", HeaderValue::from_static("bearer  crl_x "));
        assert_eq!(bearer(&h), Some("crl_x"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
