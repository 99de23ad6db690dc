//! Stage 3, authorize: the model exists and the principal may use it (tier ceiling, allowed models).

use std::sync::Arc;

use carrel_core::domain::Tier;

use crate::app::AppState;
use crate::error::GatewayError;
use crate::pipeline::{Flow, RequestCtx};

/// Stage 3.
pub fn run(state: &AppState, ctx: &mut RequestCtx) -> Result<Flow, GatewayError> {
    let catalog = state.catalog.load();
    let model = &ctx.fields().model;
    let route = catalog
        .get(model)
        .ok_or_else(|| GatewayError::ModelNotFound(model.clone()))?;
    let principal = ctx.principal();
    if route.tier == Tier::Frontier
        && route.tier <= principal.tier_ceiling
        && !principal.frontier_verified
    {
        return Err(GatewayError::FrontierNotVerified(model.clone()));
    }
    if !principal.may_use(&route.name, route.tier) {
        return Err(GatewayError::ModelNotPermitted {
            model: model.clone(),
            tier: route.tier,
        });
    }
    ctx.route = Some(Arc::clone(route));
    Ok(Flow::Continue)
}
