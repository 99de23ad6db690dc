//! [`Evictable`]: a moka cache of verified credentials (keys, patron sessions) that an
//! eviction never leaves stale.
//!
//! A revocation evicts an entry at once. But a load that read the store just before the
//! revocation committed could insert the old record just after the eviction ran. So every
//! eviction first bumps a generation counter, and a load reads the counter before it starts;
//! if the counter moved meanwhile, what the load inserted is dropped again. That request goes on
//! with what it read, as it would have a moment earlier. The TTL bounds staleness should an
//! eviction ever be missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Entries by id, with the eviction guard described in the module docs. Cloning shares it.
pub struct Evictable<V> {
    cache: moka::future::Cache<Arc<str>, Arc<V>>,
    generation: Arc<AtomicU64>,
}

impl<V> Clone for Evictable<V> {
    fn clone(&self) -> Self {
        Evictable {
            cache: self.cache.clone(),
            generation: Arc::clone(&self.generation),
        }
    }
}

impl<V> std::fmt::Debug for Evictable<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evictable")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl<V: Send + Sync + 'static> Evictable<V> {
    /// At most `capacity` entries, each kept at most `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Evictable {
            cache: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            generation: Arc::default(),
        }
    }

    /// The entry for `id`, if cached.
    pub async fn get(&self, id: &str) -> Option<Arc<V>> {
        self.cache.get(id).await
    }

    /// Read before a load starts; hand it to [`Evictable::insert`] or [`Evictable::guard`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Drops `id` again if an eviction ran since `generation` was read.
    pub async fn guard(&self, id: &str, generation: u64) {
        if self.generation() != generation {
            self.cache.invalidate(id).await;
        }
    }

    /// Caches what a load that started at `generation` found.
    pub async fn insert(&self, id: &str, value: Arc<V>, generation: u64) {
        self.cache.insert(Arc::from(id), value).await;
        self.guard(id, generation).await;
    }

    /// The entry for `id`, loading it with `load` on a miss; concurrent misses for one id share
    /// one load. A failed load caches nothing.
    pub async fn get_or_load<E: Send + Sync + 'static>(
        &self,
        id: &str,
        load: impl Future<Output = Result<Arc<V>, E>>,
    ) -> Result<Arc<V>, Arc<E>> {
        if let Some(hit) = self.cache.get(id).await {
            return Ok(hit);
        }
        let generation = self.generation();
        let loaded = self.cache.try_get_with(Arc::from(id), load).await;
        self.guard(id, generation).await;
        loaded
    }

    /// Forgets `id` at once.
    pub async fn evict(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate(id).await;
    }

    /// Forgets every entry `pred` picks.
    pub fn evict_if(&self, pred: impl Fn(&V) -> bool + Send + Sync + 'static) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.cache.invalidate_entries_if(move |_, v| pred(v)) {
            // Only when the cache was built without closure support, which `new` never does.
            tracing::error!(error = %e, "could not evict selected entries; clearing all");
            self.cache.invalidate_all();
        }
    }

    /// Forgets everything.
    pub fn evict_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_load_that_raced_an_eviction_is_not_kept() {
        let cache: Evictable<u32> = Evictable::new(10, Duration::from_secs(60));
        let before = cache.generation();
        cache.evict("a").await;
        cache.insert("a", Arc::new(1), before).await;
        assert!(cache.get("a").await.is_none(), "loaded before the eviction");
        cache.insert("a", Arc::new(2), cache.generation()).await;
        assert_eq!(cache.get("a").await.as_deref(), Some(&2));
        cache.evict_if(|v| *v == 2);
        assert!(cache.get("a").await.is_none());
        let loaded = cache
            .get_or_load("b", async { Ok::<_, ()>(Arc::new(3)) })
            .await;
        assert_eq!(loaded.as_deref().ok(), Some(&3));
        cache.evict_all();
        assert!(cache.get("b").await.is_none());
    }
}
