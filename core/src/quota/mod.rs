//! Quotas: request rates, token and money budgets and concurrent streams, at every level a
//! request counts against (institution → site / group → key → patron, and per model).
//!
//! # Layout
//!
//! - [`limits`]: what can be limited, where, and the carving rule (children's allotments never
//!   add up to more than their parent's).
//! - [`period`]: days and months that turn over at the institution's local midnight.
//! - [`gcra`]: the request-rate algorithm.
//! - [`engine`]: the in-process engine that checks and commits all levels at once, and the
//!   [`engine::Reservation`] a request holds until it settles.
//! - [`shared`]: the same counters in Redis, shared by every replica, with the failure policy.
//! - [`lease`]: blocks of those counters a replica holds and spends without a round trip.

pub mod engine;
pub mod gcra;
pub mod lease;
pub mod limits;
pub mod period;
pub mod shared;

pub use engine::{
    Clock, Demand, Extension, FakeClock, Headroom, LevelStatus, LevelUsage, LimitsTable,
    OverPolicy, QuotaEngine, Refusal, Reservation, Subject, SystemClock,
};
pub use limits::{Level, LimitError, LimitKind, Limits, LimitsPatch};
pub use shared::{Denial, SharedCounters, SharedSettings};

use std::sync::Arc;

use crate::store::{PageRequest, Store, StoreError};

/// Loads `engine` from the store at start: the limits, what each institution used in its
/// current day and month (from the ledger; shared counters keep their own in Redis), and
/// patrons' running extensions.
pub async fn load(engine: &QuotaEngine, store: &Store) -> Result<(), StoreError> {
    engine.set_limits(store.limits_table().await?);
    if engine.is_shared() {
        return refresh_extensions(engine, store, None).await;
    }
    let now = engine.now();
    for inst in store.list_institutions(PageRequest::ALL).await?.data {
        let (id, tz): (Arc<str>, Arc<str>) =
            (inst.id.as_str().into(), inst.timezone.as_str().into());
        let zone = jiff::tz::TimeZone::get(&tz).unwrap_or(jiff::tz::TimeZone::UTC);
        let today = now.to_zoned(zone).date();
        let usage = store
            .period_usage(&id, &today.to_string(), &today.first_of_month().to_string())
            .await?;
        for used in &usage {
            engine.seed(&id, &tz, used);
        }
    }
    refresh_extensions(engine, store, None).await
}

/// Gives the engine the running extensions of one patron (`(institution, patron_ref)`), or of
/// everyone.
pub async fn refresh_extensions(
    engine: &QuotaEngine,
    store: &Store,
    patron: Option<(&str, &str)>,
) -> Result<(), StoreError> {
    let extensions = store
        .active_extensions(patron, engine.now().as_second())
        .await?;
    let mut by_patron: std::collections::HashMap<(String, String), Vec<Extension>> =
        std::collections::HashMap::new();
    if let Some((inst, pref)) = patron {
        by_patron
            .entry((inst.to_owned(), pref.to_owned()))
            .or_default();
    }
    for e in extensions {
        by_patron
            .entry((e.institution_id, e.patron_ref))
            .or_default()
            .push(Extension {
                tokens: e.tokens,
                expires_at: jiff::Timestamp::from_second(e.expires_at)
                    .unwrap_or(jiff::Timestamp::MAX),
            });
    }
    // Each institution's time zone, read once however many of its patrons have extensions.
    let mut zones: std::collections::HashMap<String, Option<Arc<str>>> = Default::default();
    for ((inst, pref), list) in by_patron {
        let zone = match zones.get(&inst) {
            Some(zone) => zone.clone(),
            None => {
                let zone = store
                    .get_institution(&inst)
                    .await?
                    .map(|i| Arc::from(i.timezone.as_str()));
                zones.insert(inst.clone(), zone.clone());
                zone
            }
        };
        if let Some(zone) = zone {
            engine.set_extensions(&inst.as_str().into(), &zone, &pref, list);
        }
    }
    Ok(())
}
