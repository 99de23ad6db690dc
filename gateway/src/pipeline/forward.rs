//! Stage 9, forward + meter: send the request to where the model is served, stream the answer
//! back, and meter it: a 2xx body settles the reservation and is recorded when it ends; a
//! refusal by the provider refunds it and is recorded as such.

use std::sync::Arc;
use std::time::Instant;

use carrel_core::quota::Reservation;
use http::Response;
use http_body_util::BodyExt;

use crate::app::AppState;
use crate::body::ResponseBody;
use crate::demo;
use crate::error::GatewayError;
use crate::metering::MeteredBody;
use crate::metering::body::{Meter, StreamReading};
use crate::openai::Rewrite;
use crate::pipeline::{Endpoint, RequestCtx};
use crate::safeguards::containment::Subject;
use crate::safeguards::screening::{ScreenedStream, answer_text};
use crate::upstream::catalog::{ModelRoute, Target};
use crate::upstream::routing::{self, Tried};

/// What meters this request: from here on it has a usage record, and the client learns its id
/// (`x-carrel-request-id`).
pub fn meter(state: &AppState, ctx: &mut RequestCtx, reservation: Option<Reservation>) -> Meter {
    let route = Arc::clone(ctx.route());
    ctx.recorded_as = http::HeaderValue::from_str(&ctx.request_id).ok();
    Meter {
        ledger: state.ledger.clone(),
        principal: Arc::clone(ctx.principal()),
        patron_ref: ctx.patron_ref.clone(),
        model: Arc::clone(&route.name),
        price: ctx.price,
        request_id: std::mem::take(&mut ctx.request_id),
        started: ctx.started,
        prompt_estimate: ctx.prompt_tokens,
        tokenizer: route.tokenizer,
        reservation,
    }
}

/// Sends the request to one of the model's deployments, and on a failure that reached no client
/// byte and left no work done (a connect error, a 429, a 502, a 503) to another, up to
/// `upstream.retries` more times (see [`crate::upstream::routing`]). Returns the last answer
/// and the deployment that gave it, or the error of a body the rewrite cannot read (then
/// nothing was sent).
async fn send(
    state: &AppState,
    ctx: &RequestCtx,
    route: &ModelRoute,
    requested: &str,
    rewrite: &Rewrite<'_>,
) -> Result<(Result<Response<ResponseBody>, GatewayError>, usize), GatewayError> {
    let mut tried = Tried::default();
    // A provider an operator contained is not tried (its model's own provider stops the
    // model at authorize, so a model with one deployment has nothing to check here).
    if route.deployments.len() > 1 {
        let contained = state.containment.load();
        for (i, d) in route.deployments.iter().enumerate().skip(1) {
            if contained.stops_provider(&d.provider) {
                tried.exclude(i);
            }
        }
    }
    let mut attempt = 0;
    loop {
        let i = routing::pick(route, tried);
        tried.add(i);
        let d = &route.deployments[i];
        let rewrite = Rewrite {
            model: route.renamed_at(i, requested),
            ..*rewrite
        };
        let body = if rewrite.is_needed() {
            rewrite.apply(&ctx.body)?
        } else {
            ctx.body.clone()
        };
        let resp = match &d.target {
            Target::Http(target) => {
                state
                    .upstream
                    .forward(target, ctx.endpoint, ctx.accept.as_ref(), body, d.timeout)
                    .await
            }
            Target::Demo => Ok(demo::respond(
                ctx.endpoint,
                ctx.fields(),
                &body,
                state.demo_word_delay,
            )),
        };
        // A refusal (429, 5xx) or no connection: the provider did not do the work, so trying
        // again costs nothing twice. A timeout or a connection broken mid-request may have
        // been worked on (and billed): it marks the deployment but is not sent again.
        // Any 429 or 5xx, or no answer, marks the deployment; only some may be sent again.
        let failed = match &resp {
            Ok(r) => {
                r.status() == http::StatusCode::TOO_MANY_REQUESTS || r.status().is_server_error()
            }
            Err(e) => e.is_upstream_failure(),
        };
        let retryable = refused_or_unreachable(&resp);
        if !failed {
            d.breaker.succeeded();
            return Ok((resp, i));
        }
        d.breaker.failed();
        attempt += 1;
        if !retryable || attempt > state.upstream_config().retries {
            return Ok((resp, i));
        }
        state
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Nothing of this answer reached the client: drop it and try again.
        drop(resp);
        tokio::time::sleep(routing::backoff(attempt, routing::roll())).await;
    }
}

/// Whether an attempt's outcome left no work done at the provider: it refused (429, 502, 503)
/// or could not be reached. Such a request may be sent again, or to another model. A 500 or a
/// 504 may come after the work was done (and billed), so it is not.
fn refused_or_unreachable(resp: &Result<Response<ResponseBody>, GatewayError>) -> bool {
    match resp {
        Ok(r) => matches!(
            r.status(),
            http::StatusCode::TOO_MANY_REQUESTS
                | http::StatusCode::BAD_GATEWAY
                | http::StatusCode::SERVICE_UNAVAILABLE
        ),
        Err(e) => e.is_connect_failure(),
    }
}

/// Tries the model's fallbacks in order, for an institution that allows it: each must be in
/// the catalog, of the model's tier or lower, allowed to the key and not contained. The first
/// that answers, with its route and deployment.
async fn fall_back(
    state: &AppState,
    ctx: &RequestCtx,
    route: &ModelRoute,
    rewrite: &Rewrite<'_>,
) -> Option<(
    Arc<ModelRoute>,
    Result<Response<ResponseBody>, GatewayError>,
    usize,
)> {
    let catalog = state.catalog.load();
    let contained = state.containment.load();
    let p = ctx.principal();
    for name in route.fallback.iter() {
        let Some(fallback) = catalog.get(name) else {
            continue;
        };
        let allowed = p
            .allowed_models
            .as_ref()
            .is_none_or(|m| m.iter().any(|m| **m == **name));
        let stopped = contained
            .stops(&Subject {
                model: Arc::clone(&fallback.name),
                provider: Arc::clone(&fallback.provider),
                institution: Arc::clone(&p.institution_id),
                key: Arc::clone(&p.key_id),
            })
            .is_some();
        if fallback.tier > route.tier || !allowed || stopped {
            continue;
        }
        let Ok((resp, i)) = send(state, ctx, fallback, &route.name, rewrite).await else {
            continue;
        };
        if !refused_or_unreachable(&resp) {
            state
                .fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(model = %route.name, fallback = %name, "answered by a fallback model");
            return Some((Arc::clone(fallback), resp, i));
        }
    }
    None
}

/// Stage 9.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
) -> Result<Response<ResponseBody>, GatewayError> {
    let route = Arc::clone(ctx.route());
    let reservation = ctx.reservation.take();
    let fields = ctx.fields();
    // A usage event at the end of every stream, so streams are settled to the provider's count.
    let ask_usage = fields.stream && !fields.include_usage && ctx.endpoint != Endpoint::Embeddings;
    let rewrite = Rewrite {
        model: None,
        max_tokens: reservation
            .as_ref()
            .and_then(|r| r.clamped_to())
            .map(|n| (fields.max_tokens_param, n)),
        include_usage: ask_usage,
        drop_user: fields.user.is_some(),
    };
    let requested = Arc::clone(&route.name);
    // A body the rewrite cannot read is the client's mistake: refused with no usage record.
    let asked = Instant::now();
    let (mut resp, mut served_by) = send(state, ctx, &route, &requested, &rewrite).await?;
    let mut route = route;
    if refused_or_unreachable(&resp) && ctx.principal().economy.allow_fallback {
        if let Some((fallback, r, i)) = fall_back(state, ctx, &route, &rewrite).await {
            // The fallback answered: the answer, its record, its price and its signature are
            // the fallback model's; the reservation stays the one the request was admitted
            // with (the limits of the model asked for).
            ctx.price = fallback.prices.now();
            ctx.route = Some(Arc::clone(&fallback));
            // Not the answer of the model the cache key names: identical requests waiting for
            // it ask for themselves.
            ctx.cache_leader = None;
            route = fallback;
            (resp, served_by) = (r, i);
        }
    }
    ctx.upstream_wait += asked.elapsed();
    let meter = meter(state, ctx, reservation);
    let resp = match resp {
        Ok(resp) if resp.status().is_success() => resp,
        Ok(refusal) => {
            // The provider refused: nothing was used. Its answer is signed as it is relayed.
            meter.refused();
            return sign(state, ctx, refusal).await;
        }
        Err(e) => {
            // The provider could not be reached: nothing was used.
            meter.refused();
            return Err(e);
        }
    };
    let is_sse = crate::body::is_event_stream(resp.headers());
    let watch = is_sse.then(|| {
        let p = ctx.principal();
        state.containment.watch(Subject {
            model: Arc::clone(&route.name),
            provider: Arc::clone(&route.deployments[served_by].provider),
            institution: Arc::clone(&p.institution_id),
            key: Arc::clone(&p.key_id),
        })
    });
    let allowance = meter
        .reservation
        .as_ref()
        .map_or(u64::MAX / 2, |r| r.output_tokens());
    let screen = ctx.output_screen.take();
    let screener = Arc::clone(&state.screener);
    let resp = resp.map(|body| {
        if is_sse {
            let reading = StreamReading {
                strip_usage: ask_usage,
                allowance,
            };
            let body = MeteredBody::sse(body, meter, reading);
            let body = match watch {
                Some(watch) => body.stopped_by(watch).boxed(),
                None => body.boxed(),
            };
            match &screen {
                Some(screen) => {
                    ScreenedStream::new(body, Arc::clone(&screener), screen.clone()).boxed()
                }
                None => body,
            }
        } else {
            MeteredBody::json(body, meter).boxed()
        }
    });
    // The leader of identical cacheable requests reads the answer whole, stores it and hands it
    // to the others; one too large to keep goes on as it is, and they ask for themselves.
    let resp = match ctx.cache_leader.take() {
        Some(leader)
            if !is_sse
                && resp.status() == http::StatusCode::OK
                && !resp.headers().contains_key(http::header::CONTENT_ENCODING) =>
        {
            let (parts, body) = resp.into_parts();
            match ctx
                .waiting(crate::body::read_up_to(body, leader.max_bytes()))
                .await
                .map_err(GatewayError::UpstreamFailed)?
            {
                Ok(bytes) => {
                    leader.publish(bytes.clone());
                    Response::from_parts(parts, crate::body::full(bytes))
                }
                Err(body) => Response::from_parts(parts, body),
            }
        }
        _ => resp,
    };
    let resp = match screen {
        Some(screen) if !is_sse => {
            // The answer is read whole and screened; a blocked one becomes the 400 (its tokens
            // were spent, and are settled all the same). One too large to hold is refused.
            let (parts, body) = resp.into_parts();
            let bytes = ctx
                .waiting(crate::body::read_whole(
                    body,
                    crate::signing::MAX_SIGNED_BODY,
                ))
                .await
                .map_err(GatewayError::UpstreamFailed)?
                .ok_or_else(|| GatewayError::ContentBlocked {
                    message: "The answer was too long to check, so it was not shown.".into(),
                })?;
            let text = answer_text(&bytes);
            screener.screen_answer(&screen, &text)?;
            screener.moderate_answer(&screen, &text).await?;
            Response::from_parts(parts, crate::body::full(bytes))
        }
        _ => resp,
    };
    sign(state, ctx, resp).await
}

/// Signs an answer when `signing.enabled`, over the request's id (`x-carrel-request-id`, set
/// by [`meter`]) and the public model name.
/// A JSON answer is read whole first, for its digest: waiting for the rest of a provider's
/// body is the provider's time, not Carrel's (a body already held reads at once).
pub async fn sign(
    state: &AppState,
    ctx: &mut RequestCtx,
    resp: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let (Some(signer), Some(id)) = (&state.signer, ctx.recorded_as.clone()) else {
        return Ok(resp);
    };
    let resp = if crate::body::is_event_stream(resp.headers()) {
        resp
    } else {
        let (parts, body) = resp.into_parts();
        let body = match ctx
            .waiting(crate::body::read_up_to(
                body,
                crate::signing::MAX_SIGNED_BODY,
            ))
            .await
            .map_err(GatewayError::UpstreamFailed)?
        {
            Ok(bytes) => crate::body::full(bytes),
            // Too large to hold: the signer sends it on unsigned.
            Err(body) => body,
        };
        Response::from_parts(parts, body)
    };
    match id.to_str() {
        Ok(id) => signer.sign(resp, id, &ctx.route().name).await,
        Err(_) => Ok(resp),
    }
}
