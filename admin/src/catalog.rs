//! Providers and models: what Carrel can route to.

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use carrel_core::config::{validate_base_url, validate_model_name, validate_price};
use carrel_core::domain::{Model, Provider, ProviderKind, Source, Tier, TierBasis, unix_now};
use carrel_core::store::{NewModel, NewPrice, NewProvider, Page, PageRequest};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::json::AdminJson;
use crate::query::{AdminQuery, PageParams};

/// Body of `POST /admin/v1/providers`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProvider {
    /// Unique name that models refer to.
    #[schema(example = "openai", min_length = 1, max_length = 64)]
    pub name: String,
    /// How the provider is reached; `openai` (default) for any OpenAI-compatible server.
    #[serde(default)]
    pub kind: Option<ProviderKind>,
    /// Base URL including the version path; required for `openai` providers.
    #[schema(example = "https://api.openai.com/v1")]
    #[serde(default)]
    pub base_url: Option<String>,
    /// The provider's API key. Stored, never returned.
    #[serde(default)]
    pub api_key: Option<String>,
}

/// A provider as the admin API shows it: the API key is never returned.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderView {
    /// Stable id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// How it is reached.
    pub kind: ProviderKind,
    /// Base URL.
    pub base_url: Option<String>,
    /// Whether an API key is set.
    pub has_api_key: bool,
    /// Config file or admin API.
    pub source: Source,
    /// RFC 3339 creation time.
    pub created_at: String,
}

impl ProviderView {
    /// The view of a stored provider. `config_key` says whether the config supplied a key.
    pub fn of(p: Provider, config_key: bool) -> Self {
        ProviderView {
            has_api_key: p.api_key.is_some() || config_key,
            id: p.id,
            name: p.name,
            kind: p.kind,
            base_url: p.base_url,
            source: p.source,
            created_at: p.created_at,
        }
    }
}

/// Body of `POST /admin/v1/models`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateModel {
    /// Public model name that clients send.
    #[schema(example = "gpt-4o-mini")]
    pub name: String,
    /// Name of the provider that serves it.
    pub provider: String,
    /// The provider's own name for the model (defaults to `name`).
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// How much control the model needs.
    pub tier: Tier,
    /// Why it has that tier (default `operator_judgement`).
    #[serde(default)]
    pub tier_basis: Option<TierBasis>,
    /// Price of a million prompt tokens.
    #[serde(default)]
    pub input_price_per_mtok: f64,
    /// Price of a million completion tokens.
    #[serde(default)]
    pub output_price_per_mtok: f64,
    /// Most output tokens one choice may ask for; reserved when a request sets no
    /// `max_tokens` (default 4096).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_output_tokens: Option<u32>,
}

/// Creates a provider.
#[utoipa::path(post, path = "/admin/v1/providers", tag = "catalog",
    request_body = CreateProvider,
    responses(
        (status = 201, body = ProviderView),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_provider(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreateProvider>,
) -> Result<(StatusCode, Json<ProviderView>), AdminError> {
    principal.authorize(Action::ManageCatalog, None)?;
    AdminError::check_name("name", &body.name, 64)?;
    let kind = body.kind.unwrap_or(ProviderKind::Openai);
    let base_url = match (kind, body.base_url) {
        (ProviderKind::Openai, None) => {
            return Err(AdminError::field(
                "base_url",
                "base_url: required for an `openai` provider",
            ));
        }
        (ProviderKind::Openai, Some(url)) => {
            let url = validate_base_url(&url)
                .and_then(|url| refuse_link_local(&url).map(|()| url))
                .map_err(|m| AdminError::field("base_url", format!("base_url: {m}")))?;
            Some(url)
        }
        (ProviderKind::Demo, Some(_)) => {
            return Err(AdminError::field(
                "base_url",
                "base_url: the built-in `demo` provider takes none",
            ));
        }
        (ProviderKind::Demo, None) => None,
    };
    let provider = state
        .store
        .create_provider(NewProvider {
            name: body.name,
            kind,
            base_url,
            api_key: body.api_key.filter(|k| !k.is_empty()),
        })
        .await?;
    tracing::info!(provider = %provider.name, id = %provider.id, "provider created");
    state
        .audit(
            principal.actor(),
            "provider.create",
            format!("provider:{}", provider.id),
            None,
        )
        .await;
    state.hooks.catalog_changed().await;
    Ok((StatusCode::CREATED, Json(ProviderView::of(provider, false))))
}

/// Refuses link-local and cloud metadata addresses as upstreams (SSRF, OWASP API7).
fn refuse_link_local(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let blocked = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_link_local() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => {
            (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip.is_unspecified()
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| IpAddr::V4(v4).is_unspecified() || v4.is_link_local())
        }
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("metadata.google.internal"),
        None => true,
    };
    if blocked {
        Err("link-local and metadata addresses are not allowed as upstreams".to_owned())
    } else {
        Ok(())
    }
}

/// Lists providers, oldest first.
#[utoipa::path(get, path = "/admin/v1/providers", tag = "catalog",
    params(PageParams),
    responses((status = 200, body = Page<ProviderView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_providers(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Page<ProviderView>>, AdminError> {
    principal.authorize(Action::ReadProviders, None)?;
    let page = state.store.list_providers(query.page()?).await?;
    Ok(Json(Page {
        next_cursor: page.next_cursor,
        data: page
            .data
            .into_iter()
            // Config-declared providers may hold a key from the environment, in memory only.
            .map(|p| {
                let env_key =
                    p.source == Source::Config && state.env_keyed_providers.contains(&p.name);
                ProviderView::of(p, env_key)
            })
            .collect(),
    }))
}

/// Creates a model.
#[utoipa::path(post, path = "/admin/v1/models", tag = "catalog",
    request_body = CreateModel,
    responses(
        (status = 201, body = Model),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, description = "A field is invalid or the provider is unknown", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_model(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    AdminJson(body): AdminJson<CreateModel>,
) -> Result<(StatusCode, Json<Model>), AdminError> {
    principal.authorize(Action::ManageCatalog, None)?;
    validate_model_name(&body.name).map_err(|m| AdminError::field("name", format!("name: {m}")))?;
    let upstream_model = body.upstream_model.unwrap_or_else(|| body.name.clone());
    validate_model_name(&upstream_model)
        .map_err(|m| AdminError::field("upstream_model", format!("upstream_model: {m}")))?;
    for (field, price) in [
        ("input_price_per_mtok", body.input_price_per_mtok),
        ("output_price_per_mtok", body.output_price_per_mtok),
    ] {
        validate_price(price).map_err(|m| AdminError::field(field, format!("{field}: {m}")))?;
    }
    let max_output_tokens = body
        .max_output_tokens
        .unwrap_or(carrel_core::config::DEFAULT_MAX_OUTPUT_TOKENS);
    carrel_core::config::validate_max_output_tokens(max_output_tokens)
        .map_err(|m| AdminError::field("max_output_tokens", format!("max_output_tokens: {m}")))?;
    let provider = body.provider.clone();
    let model = state
        .store
        .create_model(NewModel {
            name: body.name,
            provider: body.provider,
            upstream_model,
            tier: body.tier,
            tier_basis: body.tier_basis.unwrap_or(TierBasis::OperatorJudgement),
            input_price_per_mtok: body.input_price_per_mtok,
            output_price_per_mtok: body.output_price_per_mtok,
            max_output_tokens,
            routing: Default::default(),
            public_cache: Vec::new(),
        })
        .await
        .map_err(|e| match e {
            carrel_core::store::StoreError::NotFound(_) => AdminError::field(
                "provider",
                format!("provider: no provider named `{provider}`"),
            ),
            other => other.into(),
        })?;
    tracing::info!(model = %model.name, id = %model.id, tier = %model.tier, "model created");
    state
        .audit(
            principal.actor(),
            "model.create",
            format!("model:{}", model.id),
            None,
        )
        .await;
    state.hooks.catalog_changed().await;
    Ok((StatusCode::CREATED, Json(model)))
}

/// Lists models, oldest first.
#[utoipa::path(get, path = "/admin/v1/models", tag = "catalog",
    params(PageParams),
    responses((status = 200, body = Page<Model>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list_models(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<Page<Model>>, AdminError> {
    principal.authorize(Action::ReadModels, None)?;
    Ok(Json(state.store.list_models(query.page()?).await?))
}

/// Body of `POST /admin/v1/models/{name}/prices`, in US dollars per million tokens.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePrice {
    /// A million prompt tokens.
    #[schema(example = 0.15, minimum = 0, maximum = 10000)]
    pub input_price_per_mtok: f64,
    /// A million completion tokens.
    #[schema(example = 0.6, minimum = 0, maximum = 10000)]
    pub output_price_per_mtok: f64,
    /// A million prompt tokens the provider reports as served from its prompt cache; at most
    /// the input price (default: the input price).
    #[serde(default)]
    #[schema(example = 0.075, minimum = 0, maximum = 10000)]
    pub cached_input_price_per_mtok: Option<f64>,
    /// RFC 3339 time from which requests are priced by it (default: now). Not in the past:
    /// requests already priced stay as they were.
    #[serde(default)]
    #[schema(example = "2027-01-01T06:00:00Z")]
    pub effective_at: Option<String>,
}

/// One version of a model's prices.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceView {
    /// RFC 3339 time from which it applies; `null` for the model's own prices, in force until
    /// its first version.
    pub effective_at: Option<String>,
    /// A million prompt tokens, in US dollars.
    pub input_price_per_mtok: f64,
    /// A million completion tokens.
    pub output_price_per_mtok: f64,
    /// A million cached prompt tokens.
    pub cached_input_price_per_mtok: f64,
    /// Who added it (`null` for the model's own prices).
    pub created_by: Option<String>,
    /// Whether requests are priced by it now.
    pub in_force: bool,
}

/// A model's prices over time.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelPrices {
    /// The public model name.
    pub model: String,
    /// Its own prices, then each version by effective time.
    pub data: Vec<PriceView>,
}

/// Adds a version of a model's prices. Requests are priced at the version in force when they
/// ran, so a change never reprices what was already used. Operators only.
#[utoipa::path(post, path = "/admin/v1/models/{name}/prices", tag = "catalog",
    params(("name" = String, Path, description = "Public model name")),
    request_body = CreatePrice,
    responses(
        (status = 201, body = ModelPrices),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
        (status = 409, description = "A version with that effective time exists", body = ErrorBody),
        (status = 422, description = "A price or the time is invalid; `param` names it", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn create_price(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
    AdminJson(body): AdminJson<CreatePrice>,
) -> Result<(StatusCode, Json<ModelPrices>), AdminError> {
    principal.authorize(Action::ManageCatalog, None)?;
    let cached = body
        .cached_input_price_per_mtok
        .unwrap_or(body.input_price_per_mtok);
    for (field, price) in [
        ("input_price_per_mtok", body.input_price_per_mtok),
        ("output_price_per_mtok", body.output_price_per_mtok),
        ("cached_input_price_per_mtok", cached),
    ] {
        validate_price(price).map_err(|m| AdminError::field(field, format!("{field}: {m}")))?;
    }
    if cached > body.input_price_per_mtok {
        return Err(AdminError::field(
            "cached_input_price_per_mtok",
            "cached_input_price_per_mtok: must not exceed input_price_per_mtok",
        ));
    }
    let effective_at = body
        .effective_at
        .as_deref()
        .map(|text| {
            let at = text.parse::<Timestamp>().map_err(|_| {
                AdminError::field(
                    "effective_at",
                    format!("effective_at: `{text}` is not an RFC 3339 time"),
                )
            })?;
            if at.as_second() < unix_now() {
                return Err(AdminError::field(
                    "effective_at",
                    "effective_at: must not be in the past; requests already priced stay as \
                     they were",
                ));
            }
            Ok(at.as_second())
        })
        .transpose()?;
    let version = state
        .store
        .add_price(NewPrice {
            model: name.clone(),
            effective_at,
            input_price_per_mtok: body.input_price_per_mtok,
            output_price_per_mtok: body.output_price_per_mtok,
            cached_input_price_per_mtok: cached,
            created_by: principal.actor(),
        })
        .await?;
    tracing::info!(model = %name, effective_at = version.effective_at, "price version added");
    state
        .audit(
            principal.actor(),
            "model.price",
            format!("model:{name}@{}", version.effective_at),
            None,
        )
        .await;
    state.hooks.catalog_changed().await;
    Ok((StatusCode::CREATED, Json(model_prices(&state, name).await?)))
}

/// A model's prices: its own, then each version, and which is in force now.
#[utoipa::path(get, path = "/admin/v1/models/{name}/prices", tag = "catalog",
    params(("name" = String, Path, description = "Public model name")),
    responses(
        (status = 200, body = ModelPrices),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such model", body = ErrorBody),
    ),
    security(("admin_token" = [])))]
pub async fn list_prices(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    Path(name): Path<String>,
) -> Result<Json<ModelPrices>, AdminError> {
    principal.authorize(Action::ReadModels, None)?;
    Ok(Json(model_prices(&state, name).await?))
}

async fn model_prices(state: &AdminState, name: String) -> Result<ModelPrices, AdminError> {
    let models = state.store.list_models(PageRequest::ALL).await?.data;
    let model = models
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| AdminError::NotFound(format!("model `{name}`")))?;
    let versions = state.store.price_versions(Some(&name)).await?;
    let now = unix_now();
    let current = versions.iter().rposition(|v| v.effective_at <= now);
    let mut data = vec![PriceView {
        effective_at: None,
        input_price_per_mtok: model.input_price_per_mtok,
        output_price_per_mtok: model.output_price_per_mtok,
        cached_input_price_per_mtok: model.input_price_per_mtok,
        created_by: None,
        in_force: current.is_none(),
    }];
    data.extend(versions.into_iter().enumerate().map(|(i, v)| {
        PriceView {
            effective_at: Timestamp::from_second(v.effective_at)
                .ok()
                .map(|t| t.to_string()),
            input_price_per_mtok: v.input_price_per_mtok,
            output_price_per_mtok: v.output_price_per_mtok,
            cached_input_price_per_mtok: v.cached_input_price_per_mtok,
            created_by: Some(v.created_by),
            in_force: current == Some(i),
        }
    }));
    Ok(ModelPrices { model: name, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_upstreams_are_refused() {
        assert!(refuse_link_local("http://169.254.169.254/v1").is_err());
        assert!(refuse_link_local("http://[fe80::1]/v1").is_err());
        assert!(refuse_link_local("http://metadata.google.internal/v1").is_err());
        assert!(refuse_link_local("http://0.0.0.0/v1").is_err());
        assert!(refuse_link_local("http://127.0.0.1:9000/v1").is_ok());
        assert!(refuse_link_local("https://api.openai.com/v1").is_ok());
    }
}
