//! Containment switches on the data plane: which models, providers, institutions and keys are
//! stopped, checked on every request and watched by every stream in flight.
//!
//! The set is small and read on every request, so it lives in an [`ArcSwap`] (a lock-free load)
//! and is replaced whole when a switch changes: by the admin handler on the replica where the
//! operator flipped it, and from the store's events on every other replica (the Redis log
//! reaches them within milliseconds). Each replacement bumps a [`watch`] generation; a stream
//! holds a receiver and, when the generation moves, checks the new set against what it serves,
//! ending with a final SSE error event if it is now contained.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use carrel_core::domain::ContainmentKind;
use carrel_core::store::{Store, StoreError};
use tokio::sync::watch;

/// Completes when a switch stops what a stream serves ([`Containment::watch`]). `Sync` because
/// response bodies are.
pub type ContainmentWatch = Pin<Box<dyn Future<Output = ContainmentKind> + Send + Sync>>;

/// What a request touches that a switch may stop.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Public model name.
    pub model: Arc<str>,
    /// Provider name.
    pub provider: Arc<str>,
    /// Institution id.
    pub institution: Arc<str>,
    /// API key id (a patron session's kiosk key).
    pub key: Arc<str>,
}

/// The switches that are on.
#[derive(Debug, Default)]
pub struct ContainedSet {
    models: HashSet<String>,
    providers: HashSet<String>,
    institutions: HashSet<String>,
    keys: HashSet<String>,
}

impl ContainedSet {
    /// Whether no switch is on (the common case: one branch per request).
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
            && self.providers.is_empty()
            && self.institutions.is_empty()
            && self.keys.is_empty()
    }

    /// Whether provider `p` is contained.
    pub fn stops_provider(&self, p: &str) -> bool {
        self.providers.contains(p)
    }

    /// The first switch that stops `s`, model first.
    pub fn stops(&self, s: &Subject) -> Option<ContainmentKind> {
        if self.is_empty() {
            return None;
        }
        [
            (ContainmentKind::Model, &self.models, &s.model),
            (ContainmentKind::Provider, &self.providers, &s.provider),
            (
                ContainmentKind::Institution,
                &self.institutions,
                &s.institution,
            ),
            (ContainmentKind::Key, &self.keys, &s.key),
        ]
        .into_iter()
        .find_map(|(kind, set, id)| set.contains(&**id).then_some(kind))
    }
}

/// The data plane's view of the switches.
#[derive(Debug)]
pub struct Containment {
    set: ArcSwap<ContainedSet>,
    generation: watch::Sender<u64>,
    /// Serialises reloads so an older read cannot replace a newer one.
    reload: tokio::sync::Mutex<()>,
}

impl Default for Containment {
    fn default() -> Self {
        Containment {
            set: ArcSwap::from_pointee(ContainedSet::default()),
            generation: watch::Sender::new(0),
            reload: tokio::sync::Mutex::new(()),
        }
    }
}

impl Containment {
    /// The current set.
    pub fn load(&self) -> arc_swap::Guard<Arc<ContainedSet>> {
        self.set.load()
    }

    /// Reads the switches from the store, swaps them in and wakes every stream to check.
    pub async fn reload(&self, store: &Store) -> Result<usize, StoreError> {
        let _serial = self.reload.lock().await;
        let mut set = ContainedSet::default();
        let all = store.containment().await?;
        let n = all.len();
        for c in all {
            match c.kind {
                ContainmentKind::Model => set.models.insert(c.target),
                ContainmentKind::Provider => set.providers.insert(c.target),
                ContainmentKind::Institution => set.institutions.insert(c.target),
                ContainmentKind::Key => set.keys.insert(c.target),
            };
        }
        self.set.store(Arc::new(set));
        self.generation.send_modify(|g| *g += 1);
        if n > 0 {
            tracing::warn!(switches = n, "containment switches on");
        }
        Ok(n)
    }

    /// A future that completes when a switch that stops `subject` is turned on while it runs:
    /// what a stream in flight selects on.
    pub fn watch(self: &Arc<Self>, subject: Subject) -> ContainmentWatch {
        let mut rx = self.generation.subscribe();
        let this = Arc::clone(self);
        Box::pin(async move {
            loop {
                if let Some(kind) = this.load().stops(&subject) {
                    return kind;
                }
                if rx.changed().await.is_err() {
                    // The state is gone (shutdown): never fires.
                    return std::future::pending().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            model: "m".into(),
            provider: "p".into(),
            institution: "i".into(),
            key: "k".into(),
        }
    }

    #[test]
    fn each_switch_stops_what_it_names() {
        let mut set = ContainedSet::default();
        assert_eq!(set.stops(&subject()), None);
        set.keys.insert("k".into());
        assert_eq!(set.stops(&subject()), Some(ContainmentKind::Key));
        set.institutions.insert("i".into());
        assert_eq!(set.stops(&subject()), Some(ContainmentKind::Institution));
        set.providers.insert("p".into());
        assert_eq!(set.stops(&subject()), Some(ContainmentKind::Provider));
        set.models.insert("m".into());
        assert_eq!(set.stops(&subject()), Some(ContainmentKind::Model));
        set.models.clear();
        set.models.insert("other".into());
        assert_eq!(set.stops(&subject()), Some(ContainmentKind::Provider));
    }
}
