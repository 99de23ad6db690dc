//! The routing catalog: an immutable snapshot of every public model and how to reach it,
//! rebuilt from the store whenever providers or models change and swapped in atomically.

use std::collections::HashMap;
use std::sync::Arc;

use crate::tokens::Tokenizer;

use carrel_core::domain::{Model, Provider, ProviderKind, Tier};
use http::{HeaderValue, Uri};

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
    /// Price of a million prompt tokens, in US dollars.
    pub input_price_per_mtok: f64,
    /// Price of a million completion tokens, in US dollars.
    pub output_price_per_mtok: f64,
    /// Most output tokens per choice; reserved when a request does not say.
    pub max_output_tokens: u32,
    /// How its prompts are counted before forwarding.
    pub tokenizer: Tokenizer,
    /// Where requests go.
    pub target: Target,
}

impl ModelRoute {
    /// Whether the body's `model` must be rewritten before forwarding.
    pub fn renames(&self) -> bool {
        *self.name != *self.upstream_model
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
        env_keys: &HashMap<String, String>,
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
        let mut catalog = Catalog::default();
        for m in models {
            let Some(target) = targets.get(m.provider.as_str()) else {
                tracing::warn!(model = %m.name, provider = %m.provider, "model's provider is not routable; skipped");
                continue;
            };
            let created = carrel_core::domain::unix_seconds(&m.created_at).unwrap_or(0);
            let route = Arc::new(ModelRoute {
                name: m.name.as_str().into(),
                upstream_model: m.upstream_model.clone(),
                tier: m.tier,
                provider: m.provider.as_str().into(),
                created,
                input_price_per_mtok: m.input_price_per_mtok,
                output_price_per_mtok: m.output_price_per_mtok,
                max_output_tokens: m.max_output_tokens,
                tokenizer: Tokenizer::for_model(&m.upstream_model),
                target: target.clone(),
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
        authorization,
    })
}
