//! [`GatewayError`]: everything the data plane can answer with instead of the upstream's answer.
//!
//! Every variant decides its status, OpenAI `type`, `code` and metric label in exhaustive
//! matches (no `_` arm), so a new variant forces each decision. Errors are logged once, here, at
//! the response boundary; a 5xx never carries internals to the client.

use carrel_core::quota::LimitKind;
use http::StatusCode;

/// A request the gateway answers itself, with the OpenAI error body.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No `Authorization: Bearer` header.
    #[error("You didn't provide an API key. Send it as 'Authorization: Bearer crl_...'.")]
    MissingApiKey,
    /// The key is malformed, unknown or revoked.
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    /// The key was valid but has expired (or was rotated and its overlap ended).
    #[error("This API key has expired; ask your administrator for a new one.")]
    ExpiredApiKey,
    /// The key's institution is suspended.
    #[error("This key's institution is suspended. Contact the institution's administrator.")]
    InstitutionSuspended,
    /// No such path.
    #[error("Unknown request URL: {method} {path}.")]
    UnknownRoute {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
    },
    /// The path exists but not with this method.
    #[error("Method {method} is not allowed on {path}.")]
    MethodNotAllowed {
        /// Request method.
        method: String,
        /// Request path.
        path: String,
        /// The method the path takes, for the `Allow` header.
        allow: &'static str,
    },
    /// The body is larger than `server.max_body_bytes`.
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The client stopped sending the body.
    #[error("The request body could not be read.")]
    BodyReadFailed,
    /// The body is not JSON (or not a JSON object).
    #[error("We could not parse the JSON body of your request: {0}")]
    MalformedJson(String),
    /// A field Carrel reads has the wrong type or is missing.
    #[error("{message}")]
    InvalidParameter {
        /// The field.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No model of that name is configured.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// A frontier model, for an institution no operator has verified for frontier models.
    #[error(
        "The model `{0}` is a frontier model; this institution is not verified for frontier models."
    )]
    FrontierNotVerified(String),
    /// The model is outside the key's allowed models.
    #[error("The model `{model}` is not among the models this key may use.")]
    ModelNotPermitted {
        /// The model.
        model: String,
    },
    /// The model's tier is above a ceiling that applies, or it is a frontier model and the
    /// caller is a shared kiosk session or guest pass.
    #[error("{}", tier_refusal_message(.model, *.tier, .why))]
    TierNotAllowed {
        /// The model.
        model: String,
        /// Its tier.
        tier: carrel_core::domain::Tier,
        /// Which ceiling, or the shared-session rule.
        why: TierWhy,
    },
    /// A frontier model through a service key without a current approved attestation.
    #[error(
        "The model `{0}` is a frontier model; this key needs a current use-case attestation \
         approved by the operator."
    )]
    AttestationRequired(String),
    /// The safeguards blocked the request or the answer.
    #[error("{message}")]
    ContentBlocked {
        /// What the caller reads (a minor: the institution's friendly refusal).
        message: String,
    },
    /// A safeguard a frontier request needs could not be consulted: it fails closed.
    #[error(
        "A safeguard this frontier model needs is unavailable, so the request was not sent. \
         Please try again shortly."
    )]
    SafeguardUnavailable,
    /// A switch stops the model, its provider, the institution or the key.
    #[error("{}", contained_message(.model, *.by))]
    Contained {
        /// The model asked for.
        model: String,
        /// Which switch.
        by: carrel_core::domain::ContainmentKind,
    },
    /// The upstream could not be connected to.
    #[error("The model provider could not be reached.")]
    UpstreamUnreachable(#[source] BoxError),
    /// The upstream connection broke before a response head arrived.
    #[error("The model provider failed to answer.")]
    UpstreamFailed(#[source] BoxError),
    /// The upstream sent no response head within `upstream.response_timeout_ms`.
    #[error("The model provider did not answer in time.")]
    UpstreamTimeout,
    /// A request rate, token, money or stream limit was reached.
    #[error("{message}")]
    OverLimit {
        /// Which limit, where, and when it resets.
        refusal: carrel_core::quota::Refusal,
        /// What a person reads: the level, the limit and when it resets.
        message: String,
    },
    /// The state store failed while checking the key.
    #[error("The service is temporarily unable to check credentials.")]
    StoreUnavailable(#[source] std::sync::Arc<carrel_core::store::StoreError>),
    /// The shared counters (Redis) cannot be reached and a limit this request meets fails
    /// closed (`store.on_redis_failure`).
    #[error("The service cannot check this request's limits right now. Please try again shortly.")]
    StateUnavailable,
    /// A patron sign-in or session was refused ([`crate::patrons`]).
    #[error(transparent)]
    SignIn(crate::patrons::SignInError),
}

/// Why a tier was refused: a ceiling, or the rule that frontier models need a named person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierWhy {
    /// Above this ceiling.
    Ceiling(carrel_core::domain::CeilingLevel),
    /// A frontier model through a kiosk or a patron session.
    SharedSession,
}

fn tier_refusal_message(model: &str, tier: carrel_core::domain::Tier, why: &TierWhy) -> String {
    match why {
        TierWhy::Ceiling(level) => format!(
            "The model `{model}` is a {tier}-tier model, above {}.",
            level.describe()
        ),
        TierWhy::SharedSession => format!(
            "The model `{model}` is a frontier model; frontier models are only for named staff \
             and approved service keys, never a shared kiosk session or guest pass."
        ),
    }
}

fn contained_message(model: &str, by: carrel_core::domain::ContainmentKind) -> String {
    use carrel_core::domain::ContainmentKind;
    let what = match by {
        ContainmentKind::Model => "this model",
        ContainmentKind::Provider => "this model's provider",
        ContainmentKind::Institution => "this institution",
        ContainmentKind::Key => "this key",
    };
    format!(
        "The model `{model}` is not available: the operator has contained {what}. \
         Try again later or contact your administrator."
    )
}

/// A boxed error from a lower layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl GatewayError {
    /// Whether no connection to the provider could be made: the request never reached it.
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, GatewayError::UpstreamUnreachable(_))
    }

    /// Whether the provider failed to answer (unreachable, broken off, too slow): a mark
    /// against its deployment.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamUnreachable(_)
                | GatewayError::UpstreamFailed(_)
                | GatewayError::UpstreamTimeout
        )
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::UnknownRoute { .. } | GatewayError::ModelNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyReadFailed
            | GatewayError::MalformedJson(_)
            | GatewayError::ContentBlocked { .. }
            | GatewayError::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            GatewayError::ModelNotPermitted { .. }
            | GatewayError::TierNotAllowed { .. }
            | GatewayError::AttestationRequired(_)
            | GatewayError::SafeguardUnavailable
            | GatewayError::FrontierNotVerified(_)
            | GatewayError::InstitutionSuspended => StatusCode::FORBIDDEN,
            GatewayError::Contained { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable(_) | GatewayError::UpstreamFailed(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::StoreUnavailable(_) | GatewayError::StateUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::OverLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::SignIn(e) => e.status(),
        }
    }

    /// OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::UnknownRoute { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyReadFailed
            | GatewayError::MalformedJson(_)
            | GatewayError::InvalidParameter { .. }
            | GatewayError::ContentBlocked { .. }
            | GatewayError::ModelNotFound(_) => "invalid_request_error",
            GatewayError::ModelNotPermitted { .. }
            | GatewayError::TierNotAllowed { .. }
            | GatewayError::AttestationRequired(_)
            | GatewayError::SafeguardUnavailable
            | GatewayError::FrontierNotVerified(_)
            | GatewayError::InstitutionSuspended => "permission_error",
            GatewayError::Contained { .. }
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamFailed(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::StoreUnavailable(_)
            | GatewayError::StateUnavailable => "api_error",
            GatewayError::OverLimit { refusal, .. } => match refusal.kind {
                LimitKind::RequestsPerMinute | LimitKind::ConcurrentStreams => "requests",
                LimitKind::TokensPerDay
                | LimitKind::TokensPerMonth
                | LimitKind::PatronTokensPerDay => "tokens",
                LimitKind::CostPerMonth => "insufficient_quota",
            },
            GatewayError::SignIn(e) => e.openai_type(),
        }
    }

    /// Stable machine-readable `code`, distinct per variant.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "missing_api_key",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::ExpiredApiKey => "expired_api_key",
            GatewayError::InstitutionSuspended => "institution_suspended",
            GatewayError::UnknownRoute { .. } => "unknown_url",
            GatewayError::MethodNotAllowed { .. } => "method_not_allowed",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::BodyReadFailed => "body_read_failed",
            GatewayError::MalformedJson(_) => "invalid_json",
            GatewayError::InvalidParameter { .. } => "invalid_parameter",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::ModelNotPermitted { .. } => "model_not_permitted",
            GatewayError::TierNotAllowed { .. } => "tier_not_allowed",
            GatewayError::AttestationRequired(_) => "attestation_required",
            GatewayError::ContentBlocked { .. } => "content_blocked",
            GatewayError::SafeguardUnavailable => "safeguard_unavailable",
            // The contract names `model_contained`; a provider's switch stops its models, so
            // it answers the same. An institution's or a key's says which.
            GatewayError::Contained { by, .. } => match by {
                carrel_core::domain::ContainmentKind::Model
                | carrel_core::domain::ContainmentKind::Provider => "model_contained",
                carrel_core::domain::ContainmentKind::Institution => "institution_contained",
                carrel_core::domain::ContainmentKind::Key => "key_contained",
            },
            GatewayError::FrontierNotVerified(_) => "frontier_not_verified",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamFailed(_) => "upstream_failed",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::StoreUnavailable(_) => "store_unavailable",
            GatewayError::StateUnavailable => "state_unavailable",
            GatewayError::OverLimit { refusal, .. } => match refusal.kind {
                LimitKind::RequestsPerMinute | LimitKind::ConcurrentStreams => {
                    "rate_limit_exceeded"
                }
                LimitKind::TokensPerDay
                | LimitKind::TokensPerMonth
                | LimitKind::PatronTokensPerDay => "insufficient_quota",
                LimitKind::CostPerMonth => "budget_exceeded",
            },
            GatewayError::SignIn(e) => e.code(),
        }
    }

    /// Label for the error counter (low cardinality, no request data).
    pub fn metric_label(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::InstitutionSuspended => "auth",
            GatewayError::UnknownRoute { .. } | GatewayError::MethodNotAllowed { .. } => "route",
            GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyReadFailed
            | GatewayError::MalformedJson(_)
            | GatewayError::InvalidParameter { .. } => "bad_request",
            GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotPermitted { .. }
            | GatewayError::FrontierNotVerified(_) => "model",
            GatewayError::TierNotAllowed { .. } | GatewayError::AttestationRequired(_) => "tier",
            GatewayError::ContentBlocked { .. } | GatewayError::SafeguardUnavailable => {
                "safeguards"
            }
            GatewayError::Contained { .. } => "contained",
            GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamFailed(_)
            | GatewayError::UpstreamTimeout => "upstream",
            GatewayError::StoreUnavailable(_) => "store",
            GatewayError::StateUnavailable => "state",
            GatewayError::OverLimit { .. } => "limit",
            GatewayError::SignIn(_) => "sign_in",
        }
    }

    /// Seconds the client should wait before retrying (`Retry-After`), for 429s.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::OverLimit { refusal, .. } => Some(refusal.retry_after_secs),
            GatewayError::SignIn(e) => e.retry_after(),
            _ => None,
        }
    }

    /// The request field the error is about.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidParameter { param, .. } => Some(param),
            GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotPermitted { .. }
            | GatewayError::TierNotAllowed { .. }
            | GatewayError::AttestationRequired(_)
            | GatewayError::Contained { .. }
            | GatewayError::FrontierNotVerified(_) => Some("model"),
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::InstitutionSuspended
            | GatewayError::UnknownRoute { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::BodyReadFailed
            | GatewayError::MalformedJson(_)
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamFailed(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::StoreUnavailable(_)
            | GatewayError::StateUnavailable
            | GatewayError::OverLimit { .. }
            | GatewayError::ContentBlocked { .. }
            | GatewayError::SafeguardUnavailable
            | GatewayError::SignIn(_) => None,
        }
    }

    /// One error of each variant, for tests. A new variant must be added here (the match has
    /// no `_` arm), and the tests then check its code is distinct and it is documented.
    #[cfg(test)]
    pub(crate) fn one_of_each() -> Vec<GatewayError> {
        let all = vec![
            GatewayError::MissingApiKey,
            GatewayError::InvalidApiKey,
            GatewayError::ExpiredApiKey,
            GatewayError::InstitutionSuspended,
            GatewayError::UnknownRoute {
                method: "GET".into(),
                path: "/x".into(),
            },
            GatewayError::MethodNotAllowed {
                method: "GET".into(),
                path: "/x".into(),
                allow: "POST",
            },
            GatewayError::BodyTooLarge { limit: 1 },
            GatewayError::BodyReadFailed,
            GatewayError::MalformedJson(String::new()),
            GatewayError::InvalidParameter {
                param: "stream",
                message: String::new(),
            },
            GatewayError::ModelNotFound("m".into()),
            GatewayError::ModelNotPermitted { model: "m".into() },
            GatewayError::TierNotAllowed {
                model: "m".into(),
                tier: carrel_core::domain::Tier::Frontier,
                why: TierWhy::SharedSession,
            },
            GatewayError::AttestationRequired("m".into()),
            GatewayError::ContentBlocked {
                message: String::new(),
            },
            GatewayError::SafeguardUnavailable,
            GatewayError::FrontierNotVerified("m".into()),
            GatewayError::UpstreamUnreachable("x".into()),
            GatewayError::UpstreamFailed("x".into()),
            GatewayError::UpstreamTimeout,
            GatewayError::StoreUnavailable(std::sync::Arc::new(
                carrel_core::store::StoreError::Task("x".into()),
            )),
            GatewayError::StateUnavailable,
        ];
        let mut all = all;
        // One containment error per distinct code.
        for by in [
            carrel_core::domain::ContainmentKind::Model,
            carrel_core::domain::ContainmentKind::Institution,
            carrel_core::domain::ContainmentKind::Key,
        ] {
            all.push(GatewayError::Contained {
                model: "m".into(),
                by,
            });
        }
        // One limit error per distinct code.
        for kind in [
            LimitKind::RequestsPerMinute,
            LimitKind::TokensPerDay,
            LimitKind::CostPerMonth,
        ] {
            all.push(GatewayError::OverLimit {
                refusal: carrel_core::quota::Refusal {
                    level: carrel_core::quota::Level::Key,
                    kind,
                    limit: 1,
                    remaining: 0,
                    retry_after_secs: 1,
                    resets_at: None,
                },
                message: String::new(),
            });
        }
        all.extend(
            crate::patrons::SignInError::one_of_each()
                .into_iter()
                .map(GatewayError::SignIn),
        );
        for e in &all {
            match e {
                GatewayError::MissingApiKey
                | GatewayError::InvalidApiKey
                | GatewayError::ExpiredApiKey
                | GatewayError::InstitutionSuspended
                | GatewayError::UnknownRoute { .. }
                | GatewayError::MethodNotAllowed { .. }
                | GatewayError::BodyTooLarge { .. }
                | GatewayError::BodyReadFailed
                | GatewayError::MalformedJson(_)
                | GatewayError::InvalidParameter { .. }
                | GatewayError::ModelNotFound(_)
                | GatewayError::ModelNotPermitted { .. }
                | GatewayError::TierNotAllowed { .. }
                | GatewayError::AttestationRequired(_)
                | GatewayError::Contained { .. }
                | GatewayError::ContentBlocked { .. }
                | GatewayError::SafeguardUnavailable
                | GatewayError::FrontierNotVerified(_)
                | GatewayError::UpstreamUnreachable(_)
                | GatewayError::UpstreamFailed(_)
                | GatewayError::UpstreamTimeout
                | GatewayError::StoreUnavailable(_)
                | GatewayError::StateUnavailable
                | GatewayError::OverLimit { .. }
                | GatewayError::SignIn(_) => {}
            }
        }
        all
    }

    /// Logs the error once: server-side failures at warn with their cause, client errors at
    /// debug. Only codes and causes are logged, never request content.
    pub fn log(&self) {
        let status = self.status().as_u16();
        let kind = self.metric_label();
        if self.status().is_server_error() {
            let cause = std::error::Error::source(self).map(|s| s.to_string());
            tracing::warn!(status, code = self.code(), kind, cause, "request failed");
        } else {
            tracing::debug!(status, code = self.code(), kind, "request refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let all = GatewayError::one_of_each();
        let codes: std::collections::HashSet<_> = all.iter().map(GatewayError::code).collect();
        assert_eq!(codes.len(), all.len());
        assert!(
            all.iter()
                .all(|e| e.status().is_client_error() || e.status().is_server_error())
        );
    }
}
