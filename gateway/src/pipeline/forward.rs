//! Stage 9, forward + meter: send the request to where the model is served, stream the answer
//! back, and meter a successful answer into the usage ledger.

use std::sync::Arc;

use http::Response;
use http_body_util::BodyExt;

use crate::app::AppState;
use crate::body::ResponseBody;
use crate::demo;
use crate::error::GatewayError;
use crate::metering::MeteredBody;
use crate::metering::body::Meter;
use crate::openai::rewrite_model;
use crate::pipeline::RequestCtx;
use crate::upstream::catalog::Target;

/// Stage 9.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    let route = Arc::clone(ctx.route());
    let resp = match &route.target {
        Target::Http(target) => {
            let body = if route.renames() {
                rewrite_model(&ctx.body, &route.upstream_model)?
            } else {
                ctx.body.clone()
            };
            state
                .upstream
                .forward(target, ctx.endpoint, ctx.accept.as_ref(), body)
                .await
        }
        Target::Demo => Ok(demo::respond(
            ctx.endpoint,
            ctx.fields(),
            &ctx.body,
            state.demo_word_delay,
        )),
    }?;
    if !resp.status().is_success() {
        // The provider refused: nothing was used.
        return Ok(resp);
    }
    let meter = Meter {
        ledger: state.ledger.clone(),
        principal: ctx.principal().clone(),
        model: route.name.clone(),
        prices: (route.input_price_per_mtok, route.output_price_per_mtok),
    };
    Ok(resp.map(|body| MeteredBody::new(body, meter).boxed()))
}
