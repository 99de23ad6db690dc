//! Stage 6, cache: answer from the response cache when policy allows
//! ([`crate::response_cache`]). A hit is settled at no cost (the reservation made for it is
//! refunded) and recorded as cached; it is signed like any answer. A stream asked for an answer
//! that is cached gets it replayed as events.

use carrel_core::domain::PromptClass;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::app::AppState;
use crate::error::GatewayError;
use crate::pipeline::{Endpoint, Flow, RequestCtx, forward};
use crate::response_cache::{self, CacheStatus, Lookup};

/// Stage 6.
pub async fn run(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
) -> Result<Flow, GatewayError> {
    let Some(cache) = &state.cache else {
        return Ok(Flow::Continue);
    };
    let Some(key) = cacheable(ctx, headers) else {
        cache
            .counters
            .bypasses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.cache = Some(CacheStatus::Bypass);
        return Ok(Flow::Continue);
    };
    // A stream is not read whole, so it never leads; it takes what is already stored.
    let stream = ctx.fields().stream;
    let looked = std::time::Instant::now();
    let (answer, coalesced) = match cache.lookup(key, !stream).await {
        Lookup::Hit { answer, coalesced } => {
            if coalesced {
                // Waited for an identical request's provider: the provider's time.
                ctx.upstream_wait += looked.elapsed();
            }
            (answer, coalesced)
        }
        Lookup::Lead(mut leader) => {
            if ctx.patron_ref.is_some() {
                leader.keep_local();
            }
            ctx.cache_leader = Some(leader);
            return Ok(miss(cache, ctx));
        }
        Lookup::Miss => return Ok(miss(cache, ctx)),
    };
    let body = if stream {
        match response_cache::as_stream(ctx.endpoint, &answer.body, ctx.fields().include_usage) {
            Some(events) => events,
            // Not an answer a stream can replay: ask the provider.
            None => return Ok(miss(cache, ctx)),
        }
    } else {
        answer.body.clone()
    };
    let served = if coalesced {
        &cache.counters.coalesced
    } else {
        &cache.counters.hits
    };
    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.cache = Some(CacheStatus::Hit);
    let reservation = ctx.reservation.take();
    forward::meter(state, ctx, reservation).cached(answer.usage);
    let mut resp = crate::body::json(StatusCode::OK, body);
    if stream {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
    }
    let resp = forward::sign(state, ctx, resp).await?;
    Ok(Flow::Respond(resp))
}

fn miss(cache: &response_cache::ResponseCache, ctx: &mut RequestCtx) -> Flow {
    cache
        .counters
        .misses
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.cache = Some(CacheStatus::Miss);
    Flow::Continue
}

/// The request's cache key, if policy lets its answer be cached.
fn cacheable(ctx: &RequestCtx, headers: &HeaderMap) -> Option<response_cache::Key> {
    // A request whose `max_tokens` the quota lowered asks for less than its body says: its
    // answer is this caller's alone, and it must not take a whole one another caller paid for.
    if ctx
        .reservation
        .as_ref()
        .and_then(|r| r.clamped_to())
        .is_some()
    {
        return None;
    }
    let header = headers
        .get(response_cache::REQUEST_HEADER)
        .map(HeaderValue::as_bytes);
    let allow = response_cache::policy(
        ctx.endpoint,
        ctx.fields(),
        ctx.principal(),
        header,
        ctx.output_screen.is_some(),
    )
    .ok()?;
    // Only a request that may be cached pays for parsing its whole body.
    let body: serde_json::Value = serde_json::from_slice(&ctx.body).ok()?;
    let history = response_cache::has_history(&body);
    if !allow && history {
        return None;
    }
    // The operator may have marked the request's prompt class public for the model: then its
    // answer is every institution's.
    let route = ctx.route();
    let class = match ctx.endpoint {
        Endpoint::Embeddings => Some(PromptClass::Embeddings),
        _ if !history => Some(PromptClass::SingleTurn),
        _ => None,
    };
    let owner = match class {
        Some(class) if route.public_cache.contains(&class) => response_cache::PUBLIC,
        _ => &ctx.principal().institution_id,
    };
    Some(response_cache::key(owner, &route.name, ctx.endpoint, body))
}
