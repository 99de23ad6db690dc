//! Stage 4, authorize: the model exists, no containment switch stops the request, the key may
//! use the model, and the tier gate lets the principal through (ceilings of institution, group,
//! key and minors; for frontier models a named principal, a verified institution and a current
//! attestation).

use std::sync::Arc;

use carrel_core::domain::{TierRefusal, unix_now};

use crate::app::AppState;
use crate::error::{GatewayError, TierWhy};
use crate::pipeline::{Flow, RequestCtx};
use crate::safeguards::containment::Subject;

/// Stage 4.
pub fn run(state: &AppState, ctx: &mut RequestCtx) -> Result<Flow, GatewayError> {
    let catalog = state.catalog.load();
    let model = &ctx.fields().model;
    let route = catalog
        .get(model)
        .ok_or_else(|| GatewayError::ModelNotFound(model.clone()))?;
    let principal = ctx.principal();
    let contained = state.containment.load();
    if !contained.is_empty()
        && let Some(by) = contained.stops(&Subject {
            model: Arc::clone(&route.name),
            provider: Arc::clone(&route.provider),
            institution: Arc::clone(&principal.institution_id),
            key: Arc::clone(&principal.key_id),
        })
    {
        return Err(GatewayError::Contained {
            model: model.clone(),
            by,
        });
    }
    if !principal.allows_model(&route.name) {
        return Err(GatewayError::ModelNotPermitted {
            model: model.clone(),
        });
    }
    if let Err(refusal) = principal.tier_gate(route.tier, unix_now()) {
        let model = model.clone();
        return Err(match refusal {
            TierRefusal::Ceiling(level) => GatewayError::TierNotAllowed {
                model,
                tier: route.tier,
                why: TierWhy::Ceiling(level),
            },
            TierRefusal::SharedSession => GatewayError::TierNotAllowed {
                model,
                tier: route.tier,
                why: TierWhy::SharedSession,
            },
            TierRefusal::NotVerified => GatewayError::FrontierNotVerified(model),
            TierRefusal::AttestationRequired => GatewayError::AttestationRequired(model),
        });
    }
    ctx.price = route.prices.now();
    ctx.route = Some(Arc::clone(route));
    Ok(Flow::Continue)
}
