//! The routing catalog: an immutable snapshot of every public model and how to reach it,
//! rebuilt from the store whenever providers or models change and swapped in atomically.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::tokens::Tokenizer;

use carrel_core::domain::{Model, PromptClass, Provider, ProviderKind, Tier};
use carrel_core::store::PriceVersion;
use http::{HeaderValue, Uri};

use super::routing::{Breakers, Deployment};
use crate::pipeline::Endpoint;

/// How one model is reached.
#[derive(Debug, Clone)]
pub enum Target {
    /// An OpenAI-compatible HTTP server.
    Http(Arc<HttpTarget>),
    /// The built-in demo model.
    Demo,
}

/// A provider's endpoints, parsed once per catalog build rather than once per request.
#[derive(Debug)]
pub struct HttpTarget {
    /// Provider name (for logs and metrics); shared by every response body from it.
    pub provider: Arc<str>,
    /// `{base}/chat/completions`.
    pub chat: Uri,
    /// `{base}/completions`.
    pub completions: Uri,
    /// `{base}/embeddings`.
    pub embeddings: Uri,
    /// `{base}/models`, for health checks.
    pub models: Uri,
    /// `Authorization: Bearer <provider key>`, marked sensitive so it is never logged.
    pub authorization: Option<HeaderValue>,
    /// `Host` for HTTP/1 requests, built once here; otherwise the client formats it per request.
    pub host: HeaderValue,
}

impl HttpTarget {
    /// The upstream URI for an endpoint.
    pub fn uri(&self, endpoint: Endpoint) -> &Uri {
        match endpoint {
            Endpoint::ChatCompletions => &self.chat,
            Endpoint::Completions => &self.completions,
            Endpoint::Embeddings => &self.embeddings,
        }
    }
}

/// A public model and its route.
#[derive(Debug)]
pub struct ModelRoute {
    /// Public name.
    pub name: Arc<str>,
    /// The provider's name for it.
    pub upstream_model: String,
    /// Tier.
    pub tier: Tier,
    /// Provider name.
    pub provider: Arc<str>,
    /// Unix seconds when it was added.
    pub created: i64,
    /// Its prices, by version.
    pub prices: Prices,
    /// Most output tokens per choice; reserved when a request does not say.
    pub max_output_tokens: u32,
    /// How its prompts are counted before forwarding.
    pub tokenizer: Tokenizer,
    /// Where requests go.
    pub target: Target,
    /// Every deployment, the model's own provider first (see [`super::routing`]).
    pub deployments: Box<[Deployment]>,
    /// Models that may answer instead when every deployment refused or could not be reached,
    /// for institutions that allow it.
    pub fallback: Box<[Arc<str>]>,
    /// Prompt classes whose cached answers every institution shares.
    pub public_cache: Box<[PromptClass]>,
}

/// What a million tokens cost, in US dollars.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    /// Prompt tokens.
    pub input: f64,
    /// Completion tokens.
    pub output: f64,
    /// Prompt tokens the provider served from its prompt cache.
    pub cached_input: f64,
}

impl Price {
    /// What `prompt` (of which `cached` came from the provider's prompt cache) and
    /// `completion` tokens cost, in billionths of a US dollar (unrounded).
    pub fn nano_usd(&self, prompt: u64, cached: u64, completion: u64) -> f64 {
        let cached = cached.min(prompt);
        // Per million tokens: tokens × price is in millionths of a dollar.
        ((prompt - cached) as f64 * self.input
            + cached as f64 * self.cached_input
            + completion as f64 * self.output)
            * 1000.0
    }
}

/// A model's prices over time: its own until its first version, then each version from its
/// effective time (see `carrel_core::store::PriceVersion`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prices {
    base: Price,
    /// (Unix seconds from which it applies, the price), by time.
    versions: Box<[(i64, Price)]>,
}

impl Prices {
    /// A model's own prices with its versions (in any order).
    pub fn new(base: Price, versions: impl IntoIterator<Item = (i64, Price)>) -> Prices {
        let mut versions: Vec<_> = versions.into_iter().collect();
        versions.sort_by_key(|(at, _)| *at);
        Prices {
            base,
            versions: versions.into(),
        }
    }

    /// The price in force now: the clock is read only when the model has versions.
    pub fn now(&self) -> Price {
        if self.versions.is_empty() {
            self.base
        } else {
            self.at(carrel_core::domain::unix_now())
        }
    }

    /// The price in force at `unix` seconds.
    pub fn at(&self, unix: i64) -> Price {
        match self.versions.partition_point(|(from, _)| *from <= unix) {
            0 => self.base,
            i => self.versions[i - 1].1,
        }
    }
}

impl ModelRoute {
    /// The provider's name for the model at deployment `i`, when a body that asks for
    /// `requested` must be rewritten to it before forwarding.
    pub fn renamed_at(&self, i: usize, requested: &str) -> Option<&str> {
        let upstream = &*self.deployments[i].upstream_model;
        (requested != upstream).then_some(upstream)
    }
}

/// The snapshot: public model name → route.
#[derive(Debug, Default)]
pub struct Catalog {
    models: HashMap<String, Arc<ModelRoute>>,
    /// Model names in order, for `GET /v1/models`.
    ordered: Vec<Arc<ModelRoute>>,
}

impl Catalog {
    /// Builds a snapshot. `env_keys` holds provider API keys that came from the environment
    /// (config providers), which the store deliberately does not keep. A model whose provider
    /// cannot be routed is left out and logged.
    pub fn build(
        providers: &[Provider],
        models: &[Model],
        prices: &[PriceVersion],
        env_keys: &HashMap<String, String>,
        breakers: &Breakers,
    ) -> Catalog {
        let mut targets: HashMap<&str, Target> = HashMap::new();
        for p in providers {
            let target = match p.kind {
                ProviderKind::Demo => Target::Demo,
                ProviderKind::Openai => {
                    let Some(base) = p.base_url.as_deref() else {
                        tracing::warn!(provider = %p.name, "provider has no base_url; skipped");
                        continue;
                    };
                    let key = p
                        .api_key
                        .as_deref()
                        .or(env_keys.get(&p.name).map(String::as_str));
                    match http_target(&p.name, base, key) {
                        Ok(t) => Target::Http(Arc::new(t)),
                        Err(e) => {
                            tracing::warn!(provider = %p.name, error = %e, "provider skipped");
                            continue;
                        }
                    }
                }
            };
            targets.insert(&p.name, target);
        }
        let mut versions: HashMap<&str, Vec<(i64, Price)>> = HashMap::new();
        for v in prices {
            versions.entry(&v.model).or_default().push((
                v.effective_at,
                Price {
                    input: v.input_price_per_mtok,
                    output: v.output_price_per_mtok,
                    cached_input: v.cached_input_price_per_mtok,
                },
            ));
        }
        let mut catalog = Catalog::default();
        for m in models {
            let Some(target) = targets.get(m.provider.as_str()) else {
                tracing::warn!(model = %m.name, provider = %m.provider, "model's provider is not routable; skipped");
                continue;
            };
            let created = carrel_core::domain::unix_seconds(&m.created_at).unwrap_or(0);
            let deployment = |provider: &str, upstream: &str, weight, timeout_ms: Option<u64>| {
                let target = targets.get(provider)?;
                Some(Deployment {
                    provider: provider.into(),
                    upstream_model: upstream.into(),
                    weight,
                    timeout: timeout_ms.map(Duration::from_millis),
                    target: target.clone(),
                    breaker: breakers.of(provider, upstream),
                })
            };
            let r = &m.routing;
            let mut deployments: Vec<Deployment> =
                deployment(&m.provider, &m.upstream_model, r.weight, r.timeout_ms)
                    .into_iter()
                    .collect();
            for d in &r.deployments {
                match deployment(&d.provider, &d.upstream_model, d.weight, d.timeout_ms) {
                    Some(d) => deployments.push(d),
                    None => tracing::warn!(model = %m.name, provider = %d.provider,
                        "deployment's provider is not routable; skipped"),
                }
            }
            let route = Arc::new(ModelRoute {
                name: m.name.as_str().into(),
                upstream_model: m.upstream_model.clone(),
                tier: m.tier,
                provider: m.provider.as_str().into(),
                created,
                prices: Prices::new(
                    Price {
                        input: m.input_price_per_mtok,
                        output: m.output_price_per_mtok,
                        // No discount until a version says so.
                        cached_input: m.input_price_per_mtok,
                    },
                    versions.remove(m.name.as_str()).unwrap_or_default(),
                ),
                max_output_tokens: m.max_output_tokens,
                tokenizer: Tokenizer::for_model(&m.upstream_model),
                target: target.clone(),
                deployments: deployments.into(),
                fallback: m
                    .routing
                    .fallback
                    .iter()
                    .map(|f| f.as_str().into())
                    .collect(),
                public_cache: m.public_cache.iter().copied().collect(),
            });
            catalog.models.insert(m.name.clone(), Arc::clone(&route));
            catalog.ordered.push(route);
        }
        catalog
    }

    /// The route of a public model name.
    pub fn get(&self, model: &str) -> Option<&Arc<ModelRoute>> {
        self.models.get(model)
    }

    /// Every model, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.ordered.iter()
    }

    /// Number of models.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether there are no models.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

fn http_target(name: &str, base: &str, key: Option<&str>) -> Result<HttpTarget, String> {
    let uri = |suffix: &str| -> Result<Uri, String> {
        format!("{base}/{suffix}")
            .parse::<Uri>()
            .map_err(|e| format!("bad base_url {base}: {e}"))
    };
    let authorization = key
        .map(|k| {
            let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                .map_err(|_| "the API key has characters not allowed in a header".to_owned())?;
            v.set_sensitive(true);
            Ok::<_, String>(v)
        })
        .transpose()?;
    let chat = uri("chat/completions")?;
    let host = chat
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .ok_or_else(|| format!("bad base_url {base}: no host"))?;
    Ok(HttpTarget {
        provider: name.into(),
        host,
        chat,
        completions: uri("completions")?,
        embeddings: uri("embeddings")?,
        models: uri("models")?,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64) -> Price {
        Price {
            input,
            output: input * 2.0,
            cached_input: input / 2.0,
        }
    }

    #[test]
    fn the_version_in_force_prices_a_request() {
        let prices = Prices::new(price(1.0), [(2_000, price(3.0)), (1_000, price(2.0))]);
        assert_eq!(prices.at(i64::MIN), price(1.0));
        assert_eq!(prices.at(999), price(1.0));
        // A version applies from its second on.
        assert_eq!(prices.at(1_000), price(2.0));
        assert_eq!(prices.at(1_999), price(2.0));
        assert_eq!(prices.at(2_000), price(3.0));
        assert_eq!(prices.at(i64::MAX), price(3.0));
        assert_eq!(Prices::new(price(1.0), []).at(5), price(1.0));
    }

    #[test]
    fn cached_prompt_tokens_are_priced_apart() {
        let p = price(1.0);
        // 400 at 1.0, 600 at 0.5, 10 at 2.0 per million: 720 millionths, in billionths.
        assert_eq!(p.nano_usd(1000, 600, 10), 720_000.0);
        // A provider reporting more cached tokens than prompt tokens is held to the prompt.
        assert_eq!(p.nano_usd(10, 50, 0), 5_000.0);
    }
}
