//! Stages 4 and 5: the request rate of the credential, then the reservation of tokens, money
//! and a stream slot at every level the request counts against; and the `x-ratelimit-*`
//! headers that tell the client where it stands.
//!
//! The credential's rate (institution, site, group, key) is counted right after authenticate,
//! before the body is read, so a request that then fails — bad input, a refused model, an
//! upstream error — still counts, and a client over its rate costs no body read. The model's
//! rate and the budgets need the body and the route, and come after authorize.

use std::sync::Arc;

use carrel_core::domain::{OverQuota, Principal, Tier};
use carrel_core::quota::{
    Demand, Denial, Headroom, Level, LimitKind, OverPolicy, Refusal, Subject,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::app::AppState;
use crate::error::GatewayError;
use crate::pipeline::{Endpoint, Flow, RequestCtx};

/// The credential's levels, counted before the body is read.
const CREDENTIAL_LEVELS: [Level; 4] = [Level::Institution, Level::Site, Level::Group, Level::Key];

/// Where a request stands against its tightest limits, for the response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Standing {
    /// The tightest request rate.
    pub requests: Option<Headroom>,
    /// The tightest token allowance.
    pub tokens: Option<Headroom>,
}

fn subject(p: &Arc<Principal>, patron: Option<Arc<str>>, model: Option<Arc<str>>) -> Subject {
    Subject {
        principal: Arc::clone(p),
        patron,
        model,
    }
}

/// The patron a request counts against: a session's own patron (whatever `user` says), else
/// the one `user` names.
fn patron_of(state: &AppState, principal: &Principal, user: Option<&str>) -> Option<Arc<str>> {
    match &principal.patron {
        Some(p) => Some(Arc::clone(&p.patron_ref)),
        None => user.map(|u| Arc::from(state.pepper.patron_ref(&principal.institution_id, u))),
    }
}

fn tighter(a: Option<Headroom>, b: Option<Headroom>) -> Option<Headroom> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Stage 4: counts the request against its credential's request rates.
pub async fn rate_limit(state: &AppState, ctx: &mut RequestCtx) -> Result<Flow, GatewayError> {
    let s = subject(ctx.principal(), None, None);
    match state.quota.check_rate(&s, &CREDENTIAL_LEVELS).await {
        Ok(room) => {
            ctx.standing.requests = room;
            Ok(Flow::Continue)
        }
        Err(Denial::Refused(refusal)) => {
            ctx.standing.requests = Some(refused_headroom(&refusal));
            Err(over_limit(refusal, ctx.principal()))
        }
        Err(Denial::Unavailable) => Err(GatewayError::StateUnavailable),
    }
}

/// Where a refused request stands against the limit that refused it.
fn refused_headroom(refusal: &Refusal) -> Headroom {
    Headroom {
        limit: refusal.limit,
        remaining: refusal.remaining,
        reset_ns: refusal.retry_after_secs.saturating_mul(1_000_000_000),
    }
}

/// Stage 5: the model's rate, then the reservation.
pub async fn reserve(state: &AppState, ctx: &mut RequestCtx) -> Result<Flow, GatewayError> {
    let route = Arc::clone(ctx.route());
    let fields = ctx.fields();
    let principal = ctx.principal();
    let cap = u64::from(route.max_output_tokens);
    if let Some(asked) = fields.max_tokens
        && asked > cap
    {
        return Err(GatewayError::InvalidParameter {
            param: fields.max_tokens_param,
            message: format!(
                "'{}' is too large: {asked}. The model `{}` produces at most {cap} tokens per choice.",
                fields.max_tokens_param, route.name
            ),
        });
    }
    let patron = patron_of(state, principal, fields.user.as_deref());
    let s = subject(principal, patron.clone(), Some(Arc::clone(&route.name)));
    let requests = match state.quota.check_rate(&s, &[Level::Model]).await {
        Ok(room) => room,
        Err(Denial::Refused(refusal)) => {
            ctx.standing.requests = Some(refused_headroom(&refusal));
            return Err(over_limit(refusal, ctx.principal()));
        }
        Err(Denial::Unavailable) => return Err(GatewayError::StateUnavailable),
    };
    let embeddings = ctx.endpoint == Endpoint::Embeddings;
    let prompt_tokens = fields.prompt.estimate(route.tokenizer);
    let demand = Demand {
        prompt_tokens,
        max_output_tokens: if embeddings {
            0
        } else {
            fields.max_tokens.unwrap_or(cap)
        },
        choices: if embeddings { 1 } else { fields.n },
        // Reserved at the full prompt price: the provider's prompt cache is known only after.
        input_nano_per_token: ctx.price.input * 1000.0,
        output_nano_per_token: ctx.price.output * 1000.0,
        stream: fields.stream,
    };
    let policy = match principal.over_quota {
        OverQuota::Reject => OverPolicy::Reject,
        OverQuota::Clamp => OverPolicy::Clamp,
    };
    ctx.standing.requests = tighter(ctx.standing.requests, requests);
    let frontier = route.tier == Tier::Frontier;
    let reservation = match state.quota.take(&s, demand, policy, frontier).await {
        Ok(reservation) => reservation,
        Err(Denial::Unavailable) => return Err(GatewayError::StateUnavailable),
        Err(Denial::Refused(refusal)) => {
            if matches!(
                refusal.kind,
                LimitKind::TokensPerDay | LimitKind::TokensPerMonth | LimitKind::PatronTokensPerDay
            ) {
                ctx.standing.tokens = Some(refused_headroom(&refusal));
            }
            return Err(over_limit(refusal, ctx.principal()));
        }
    };
    ctx.standing.tokens = reservation.tokens_headroom();
    ctx.prompt_tokens = prompt_tokens;
    ctx.patron_ref = patron;
    ctx.reservation = Some(reservation);
    Ok(Flow::Continue)
}

/// The 429 for a refusal, with a message a person can act on.
fn over_limit(refusal: Refusal, principal: &Principal) -> GatewayError {
    let whose = match refusal.level {
        Level::Patron => "Your".to_owned(),
        Level::Institution => "The institution's".to_owned(),
        level => format!("This {}'s", level.as_str()),
    };
    let when = refusal
        .resets_at
        .map(|at| {
            let zone =
                jiff::tz::TimeZone::get(&principal.timezone).unwrap_or(jiff::tz::TimeZone::UTC);
            let local = at.to_zoned(zone);
            format!(
                "it renews at {} {} (in {})",
                local.strftime("%Y-%m-%d %H:%M"),
                principal.timezone,
                duration_text(refusal.retry_after_secs.saturating_mul(1_000_000_000))
            )
        })
        .unwrap_or_default();
    let limit = refusal.limit;
    let message = match refusal.kind {
        LimitKind::RequestsPerMinute => format!(
            "Rate limit reached at the {} level: {limit} requests per minute. Please try again in {}s.",
            refusal.level.as_str(),
            refusal.retry_after_secs
        ),
        LimitKind::ConcurrentStreams => format!(
            "Too many streams open at once at the {} level (limit {limit}). Please try again when one finishes.",
            refusal.level.as_str()
        ),
        LimitKind::TokensPerDay | LimitKind::PatronTokensPerDay => format!(
            "{whose} daily allowance of {limit} tokens is used up (or too small for this request); {when}."
        ),
        LimitKind::TokensPerMonth => format!(
            "{whose} monthly allowance of {limit} tokens is used up (or too small for this request); {when}."
        ),
        LimitKind::CostPerMonth => format!(
            "{whose} monthly budget of ${:.2} is spent (or too small for this request); {when}.",
            limit as f64 / 1e9
        ),
    };
    GatewayError::OverLimit { refusal, message }
}

/// A duration as OpenAI writes its reset headers: `20ms`, `1s`, `6m0s`, `2h3m4s`.
pub fn duration_text(ns: u64) -> String {
    if ns < 1_000_000_000 {
        return format!("{}ms", ns.div_ceil(1_000_000));
    }
    let secs = ns.div_ceil(1_000_000_000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The `x-ratelimit-*` header names: limit, remaining, reset; parsed once.
const REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Adds the `x-ratelimit-*` headers for the tightest limits that apply; a kind with no limit
/// at any level has no headers.
pub fn add_headers(standing: &Standing, headers: &mut HeaderMap) {
    for (room, [limit, remaining, reset]) in [
        (standing.requests, REQUEST_HEADERS),
        (standing.tokens, TOKEN_HEADERS),
    ] {
        let Some(room) = room else { continue };
        headers.insert(limit, HeaderValue::from(room.limit));
        headers.insert(remaining, HeaderValue::from(room.remaining));
        // The header value takes over the string's buffer: one allocation.
        if let Ok(v) = HeaderValue::try_from(duration_text(room.reset_ns)) {
            headers.insert(reset, v);
        }
    }
}

/// `GET /v1/quota`: what the caller has left at each level that limits it, and when each
/// renews, with a sentence a person at a kiosk can read. `?user=` names the patron (as in a
/// request's `user`), `?model=` adds the model's limits.
pub async fn status(
    state: &AppState,
    req: &http::Request<hyper::body::Incoming>,
) -> Result<http::Response<crate::body::ResponseBody>, GatewayError> {
    let principal = crate::pipeline::authenticate::principal(state, req.headers()).await?;
    let mut user = None;
    let mut model = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "user" if !v.trim().is_empty() => user = Some(v.into_owned()),
            "model" if !v.is_empty() => model = Some(v.into_owned()),
            _ => {}
        }
    }
    if user
        .as_ref()
        .is_some_and(|u| u.len() > crate::openai::MAX_USER_LEN)
    {
        return Err(GatewayError::InvalidParameter {
            param: "user",
            message: format!(
                "Invalid 'user': expected a string of at most {} bytes.",
                crate::openai::MAX_USER_LEN
            ),
        });
    }
    if let Some(name) = &model {
        let catalog = state.catalog.load();
        let known = catalog
            .get(name)
            .is_some_and(|m| principal.may_use(&m.name, m.tier));
        if !known {
            return Err(GatewayError::ModelNotFound(name.clone()));
        }
    }
    let patron = patron_of(state, &principal, user.as_deref());
    let s = subject(&principal, patron, model.as_deref().map(Arc::from));
    let levels = state.quota.status_now(&s).await;
    let body = QuotaReport::new(&principal, &levels, state.quota.now());
    Ok(crate::body::json(
        http::StatusCode::OK,
        serde_json::to_vec(&body).expect("the quota report serialises"),
    ))
}

/// The body of `GET /v1/quota`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct QuotaReport {
    /// Always `quota`.
    pub object: &'static str,
    /// One or two sentences for the person using the key: the tightest allowance and when it
    /// renews.
    pub summary: String,
    /// The institution's time zone; days and months renew at its midnight.
    pub timezone: String,
    /// Each level that limits the caller, widest first (levels with no limits are left out).
    pub levels: Vec<QuotaLevel>,
}

/// What is left at one level.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct QuotaLevel {
    /// `institution`, `site`, `group`, `key`, `patron` or `model`.
    pub level: &'static str,
    /// The level's id (not given for a patron).
    pub id: Option<String>,
    /// Requests a minute.
    pub requests_per_minute: Option<Allowance>,
    /// Tokens today.
    pub tokens_per_day: Option<Allowance>,
    /// Tokens this month.
    pub tokens_per_month: Option<Allowance>,
    /// US dollars this month.
    pub cost_per_month_usd: Option<MoneyAllowance>,
    /// Streams open at once.
    pub concurrent_streams: Option<Allowance>,
}

/// A limit, what is used of it and what is left.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Allowance {
    /// The limit.
    pub limit: u64,
    /// Used (reservations of requests in flight included).
    pub used: u64,
    /// Left.
    pub remaining: u64,
    /// When it renews (RFC 3339), for daily and monthly limits.
    pub resets_at: Option<String>,
}

/// A money limit, in US dollars.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct MoneyAllowance {
    /// The budget.
    pub limit: f64,
    /// Spent (reservations included).
    pub used: f64,
    /// Left.
    pub remaining: f64,
    /// When it renews (RFC 3339).
    pub resets_at: String,
}

impl QuotaReport {
    fn new(
        principal: &Principal,
        levels: &[carrel_core::quota::LevelStatus],
        now: jiff::Timestamp,
    ) -> Self {
        let allowance = |limit: u64, used: u64, resets: Option<jiff::Timestamp>| Allowance {
            limit,
            used: used.min(limit),
            remaining: limit.saturating_sub(used),
            resets_at: resets.map(|t| t.to_string()),
        };
        let mut out = Vec::new();
        // The tightest token allowance: (remaining, renews at, daily?).
        let mut tightest: Option<(u64, jiff::Timestamp, bool)> = None;
        let mut money: Option<f64> = None;
        for l in levels.iter().filter(|l| !l.limits.is_empty()) {
            let u = &l.usage;
            let day = l
                .limits
                .tokens_per_day
                .map(|lim| allowance(lim, u.day_tokens, Some(u.day_resets_at)));
            let month = l
                .limits
                .tokens_per_month
                .map(|lim| allowance(lim, u.month_tokens, Some(u.month_resets_at)));
            for (a, at, daily) in [
                (&day, u.day_resets_at, true),
                (&month, u.month_resets_at, false),
            ] {
                if let Some(a) = a
                    && tightest.is_none_or(|(r, _, _)| a.remaining < r)
                {
                    tightest = Some((a.remaining, at, daily));
                }
            }
            let cost = l.limits.cost_per_month_nano_usd.map(|lim| {
                let left = lim.saturating_sub(u.month_cost_nano_usd) as f64 / 1e9;
                money = Some(money.map_or(left, |m: f64| m.min(left)));
                MoneyAllowance {
                    limit: lim as f64 / 1e9,
                    used: u.month_cost_nano_usd.min(lim) as f64 / 1e9,
                    remaining: left,
                    resets_at: u.month_resets_at.to_string(),
                }
            });
            out.push(QuotaLevel {
                level: l.level.as_str(),
                id: (l.level != Level::Patron).then(|| l.id.to_string()),
                requests_per_minute: l.limits.requests_per_minute.map(|lim| Allowance {
                    limit: lim,
                    used: lim.saturating_sub(u.requests_remaining.unwrap_or(lim)),
                    remaining: u.requests_remaining.unwrap_or(lim),
                    resets_at: None,
                }),
                tokens_per_day: day,
                tokens_per_month: month,
                cost_per_month_usd: cost,
                concurrent_streams: l
                    .limits
                    .concurrent_streams
                    .map(|lim| allowance(lim, u.streams, None)),
            });
        }
        let zone = jiff::tz::TimeZone::get(&principal.timezone).unwrap_or(jiff::tz::TimeZone::UTC);
        let mut summary = match tightest {
            None => "No token allowance limits you right now.".to_owned(),
            Some((0, at, daily)) => format!(
                "Your {} allowance is used up. It renews at {} ({}), in {}.",
                if daily { "daily" } else { "monthly" },
                at.to_zoned(zone.clone()).strftime("%Y-%m-%d %H:%M"),
                principal.timezone,
                duration_text(nanos(now, at)),
            ),
            Some((left, at, daily)) => format!(
                "You have {} tokens left {}. {} at {} ({}), in {}.",
                group_thousands(left),
                if daily { "today" } else { "this month" },
                if daily {
                    "Your allowance renews"
                } else {
                    "It renews"
                },
                at.to_zoned(zone).strftime("%Y-%m-%d %H:%M"),
                principal.timezone,
                duration_text(nanos(now, at)),
            ),
        };
        if let Some(left) = money {
            summary.push_str(&format!(" ${left:.2} of this month's budget is left."));
        }
        QuotaReport {
            object: "quota",
            summary,
            timezone: principal.timezone.to_string(),
            levels: out,
        }
    }
}

fn nanos(now: jiff::Timestamp, then: jiff::Timestamp) -> u64 {
    u64::try_from(then.as_nanosecond().saturating_sub(now.as_nanosecond())).unwrap_or(0)
}

/// `4200000` as `4,200,000`.
fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai_s() {
        assert_eq!(duration_text(20_000_000), "20ms");
        assert_eq!(duration_text(1_000_000_000), "1s");
        assert_eq!(duration_text(360_000_000_000), "6m0s");
        assert_eq!(duration_text(7_384_000_000_000), "2h3m4s");
        assert_eq!(duration_text(u64::MAX), "5124095h34m34s");
        assert_eq!(group_thousands(4_200_000), "4,200,000");
        assert_eq!(group_thousands(999), "999");
    }
}
