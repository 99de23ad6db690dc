//! Stage 9, forward: send the request to where the model is served and stream the answer back.

use http::Response;

use crate::app::AppState;
use crate::body::ResponseBody;
use crate::demo;
use crate::error::GatewayError;
use crate::openai::rewrite_model;
use crate::pipeline::RequestCtx;
use crate::upstream::catalog::Target;

/// Stage 9.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    let route = ctx.route();
    match &route.target {
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
    }
}
