//! The exact-match response cache (issue 8): the same answer is not bought twice.
//!
//! - **What is cached.** The whole JSON answer (status 200) to a request whose answer is fixed by
//!   policy: an embedding, or a completion asked for at `temperature` 0, or one whose client
//!   opted in with `x-carrel-cache: allow`. Never a minor's request, an answer the safeguards
//!   screen, or (unless opted in) a conversation with history. [`policy`] decides.
//! - **The key.** SHA-256 over the institution, the public model name, the endpoint and a
//!   canonical form of the body: every field, keys sorted, without those that do not change the
//!   answer (`stream`, `stream_options`, `user`). So no answer crosses institutions, and a stream
//!   and a plain request for the same thing share one entry. The exception is the operator's:
//!   a model may mark prompt classes public (`[[models]] public_cache`: `embeddings`,
//!   `single_turn`), and their answers are keyed without the institution, shared by all. That
//!   lets one institution tell, by a hit, that another asked the same; marking a class public
//!   is the operator's judgement that this does not matter for it.
//! - **Coalescing.** The first cacheable request for a key that is not cached leads: it asks the
//!   provider, and identical requests that arrive meanwhile wait for its answer (at most
//!   `cache.wait_ms`) instead of asking too. If the leader gets no cacheable answer, each waiter
//!   asks the provider itself: an error is never shared.
//! - **Bounds.** moka holds at most `cache.max_mib` of answers, each at most
//!   `cache.max_entry_kib`, for `cache.ttl_secs`.
//! - **The shared tier** (`cache.shared`). Every replica also keeps its answers in Redis, at
//!   `{P:cache:<key>}` for `cache.ttl_secs`, and looks there when its own memory has nothing, so
//!   an answer one replica bought serves every replica. An answer given to a patron is kept in
//!   memory only, never in Redis (which may write it to disk). Coalescing stays per replica. Redis
//!   that does not answer within `store.redis_timeout_ms` is a miss (counted, logged once a
//!   minute): the cache is a saving, never a dependency. Size it in Redis: see
//!   `deploy/REDIS.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use carrel_core::config::CacheConfig;
use carrel_core::domain::Principal;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::metering::body::{Usage, find_usage};
use crate::openai::RequestFields;
use crate::pipeline::Endpoint;

/// A cache key: SHA-256 of what the answer depends on.
pub type Key = [u8; 32];

/// A cached answer: the JSON body the provider sent.
#[derive(Debug)]
pub struct Answer {
    /// The body, as the first client got it.
    pub body: Bytes,
    /// The usage the provider reported for it: what each hit saves.
    pub usage: Option<Usage>,
}

/// What a request does with the cache, for the `x-carrel-cache` header and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from the cache (or from an identical request in flight).
    Hit,
    /// Cacheable, not cached: asked the provider.
    Miss,
    /// Not cacheable by policy.
    Bypass,
}

impl CacheStatus {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Answered from a stored answer (counted by the cache stage, once it served it).
    pub hits: AtomicU64,
    /// Answered with the answer of an identical request in flight.
    pub coalesced: AtomicU64,
    /// Cacheable but not cached.
    pub misses: AtomicU64,
    /// Not cacheable by policy.
    pub bypasses: AtomicU64,
    /// Answers stored.
    pub stored: AtomicU64,
}

type Waiting = watch::Receiver<Option<Arc<Answer>>>;

/// The tier in Redis that every replica shares.
pub struct SharedTier {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    timeout: std::time::Duration,
    ttl_ms: u64,
    /// Answers found there and not in this process.
    pub hits: AtomicU64,
    /// Answers stored there.
    pub stored: AtomicU64,
    /// Lookups and stores that failed or took too long.
    pub errors: AtomicU64,
    /// When an error was last logged (Unix seconds).
    last_logged: AtomicU64,
}

impl SharedTier {
    /// Connects to the shared tier.
    pub async fn connect(
        config: &carrel_core::config::SharedCacheConfig,
        ttl: std::time::Duration,
    ) -> Result<SharedTier, redis::RedisError> {
        let client = redis::Client::open(config.url.as_str())?;
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            redis::aio::ConnectionManager::new(client),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from((redis::ErrorKind::Io, "no answer from the shared cache"))
        })??;
        Ok(SharedTier {
            conn,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            ttl_ms: ttl.as_millis() as u64,
            hits: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            last_logged: AtomicU64::new(0),
        })
    }

    /// `{P:cache:<hex>}`: each answer its own hash tag, so answers spread over a cluster.
    fn redis_key(&self, key: &Key) -> String {
        format!("{{{}:cache:{}}}", self.prefix, hex::encode(key))
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = carrel_core::domain::unix_now().max(0) as u64;
        let last = self.last_logged.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, what, "shared response cache unavailable; local only");
        }
    }

    async fn get(&self, key: &Key) -> Option<Bytes> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.redis_key(key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(found)) => found.map(Bytes::from),
            Ok(Err(e)) => {
                self.failed("lookup", &e);
                None
            }
            Err(_) => {
                self.failed("lookup", &"no answer in time");
                None
            }
        }
    }

    async fn put(&self, key: Key, body: Bytes) {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key(&key))
            .arg(&body[..])
            .arg("PX")
            .arg(self.ttl_ms);
        let set = cmd.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.timeout * 5, set).await {
            Ok(Ok(())) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => self.failed("store", &e),
            Err(_) => self.failed("store", &"no answer in time"),
        }
    }
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// The cache of one process.
pub struct ResponseCache {
    answers: moka::sync::Cache<Key, Arc<Answer>>,
    /// The tier every replica shares, once connected.
    shared: std::sync::OnceLock<Arc<SharedTier>>,
    /// Keys a leader is asking the provider for, and how to wait for its answer.
    in_flight: Mutex<HashMap<Key, Waiting>>,
    max_entry_bytes: usize,
    wait: std::time::Duration,
    /// What the cache did.
    pub counters: CacheCounters,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.answers.entry_count())
            .field("bytes", &self.answers.weighted_size())
            .finish_non_exhaustive()
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// The answer: stored, or (`coalesced`) that of an identical request in flight.
    Hit {
        /// The answer.
        answer: Arc<Answer>,
        /// Whether it came from the request in flight rather than the store.
        coalesced: bool,
    },
    /// Not cached, and this request asks the provider for everyone: it must hand the answer
    /// to [`Leader::publish`] (dropping the leader lets the waiters ask themselves).
    Lead(Leader),
    /// Not cached; ask the provider, nobody waits for this request.
    Miss,
}

/// The request that asks the provider for a key; see [`Lookup::Lead`].
#[derive(Debug)]
pub struct Leader {
    cache: Arc<ResponseCache>,
    key: Key,
    tx: watch::Sender<Option<Arc<Answer>>>,
    /// Whether the answer may go to the shared tier as well as this process's memory.
    share: bool,
}

impl Leader {
    /// Keeps the answer in this process only: an answer given to a patron never goes to
    /// Redis, which may write it to disk.
    pub fn keep_local(&mut self) {
        self.share = false;
    }

    /// The largest answer the cache keeps: a leader reads at most this much before giving up
    /// on caching.
    pub fn max_bytes(&self) -> usize {
        self.cache.max_entry_bytes
    }

    /// Stores the answer and hands it to the requests waiting for it.
    pub fn publish(self, body: Bytes) {
        if let Some(tier) = self.cache.shared.get().filter(|_| self.share) {
            let (tier, key, body) = (Arc::clone(tier), self.key, body.clone());
            #[expect(
                clippy::disallowed_methods,
                reason = "a store to the shared tier must not hold up the answer; one lost at \
                          shutdown is only a saving missed"
            )]
            tokio::spawn(async move { tier.put(key, body).await });
        }
        let usage = find_usage(&body);
        let answer = Arc::new(Answer { body, usage });
        self.cache.answers.insert(self.key, Arc::clone(&answer));
        self.cache.counters.stored.fetch_add(1, Ordering::Relaxed);
        self.tx.send_replace(Some(answer));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Answered or not, the next request for the key looks in the cache again.
        let mut in_flight = self
            .cache
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        in_flight.remove(&self.key);
    }
}

impl ResponseCache {
    /// A cache with `config`'s bounds, or `None` when it is off.
    pub fn new(config: &CacheConfig) -> Option<ResponseCache> {
        config.enabled.then(|| ResponseCache {
            answers: moka::sync::Cache::builder()
                .max_capacity(config.max_bytes)
                .weigher(|_, a: &Arc<Answer>| u32::try_from(a.body.len() + 64).unwrap_or(u32::MAX))
                .time_to_live(config.ttl)
                .build(),
            in_flight: Mutex::default(),
            shared: std::sync::OnceLock::new(),
            max_entry_bytes: config.max_entry_bytes,
            wait: config.wait,
            counters: CacheCounters::default(),
        })
    }

    /// Adds the tier every replica shares.
    pub fn attach_shared(&self, tier: SharedTier) {
        let _ = self.shared.set(Arc::new(tier));
    }

    /// The shared tier, if attached.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.get().map(|t| &**t)
    }

    /// Looks `key` up: in this process, then in the shared tier. With `lead`, a request that
    /// finds nothing either waits for the identical request in flight or becomes the one the
    /// others wait for.
    pub async fn lookup(self: &Arc<Self>, key: Key, lead: bool) -> Lookup {
        if let Some(answer) = self.answers.get(&key) {
            return Lookup::Hit {
                answer,
                coalesced: false,
            };
        }
        if let Some(tier) = self.shared.get()
            && let Some(body) = tier.get(&key).await
        {
            tier.hits.fetch_add(1, Ordering::Relaxed);
            let usage = find_usage(&body);
            let answer = Arc::new(Answer { body, usage });
            self.answers.insert(key, Arc::clone(&answer));
            return Lookup::Hit {
                answer,
                coalesced: false,
            };
        }
        if !lead {
            return Lookup::Miss;
        }
        let waiting = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            // Again under the lock: a leader stores its answer before it leaves the map.
            if let Some(answer) = self.answers.get(&key) {
                return Lookup::Hit {
                    answer,
                    coalesced: false,
                };
            }
            match in_flight.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(key, rx);
                    return Lookup::Lead(Leader {
                        cache: Arc::clone(self),
                        key,
                        tx,
                        share: true,
                    });
                }
            }
        };
        let mut waiting = waiting;
        let answer = tokio::time::timeout(self.wait, waiting.wait_for(Option::is_some)).await;
        match answer {
            Ok(Ok(answer)) => Lookup::Hit {
                answer: Arc::clone(answer.as_ref().expect("waited for an answer")),
                coalesced: true,
            },
            // The leader got no cacheable answer, or took too long: ask the provider.
            Ok(Err(_)) | Err(_) => Lookup::Miss,
        }
    }

    /// Answers held, and their bytes (for metrics).
    pub fn size(&self) -> (u64, u64) {
        self.answers.run_pending_tasks();
        (self.answers.entry_count(), self.answers.weighted_size())
    }
}

/// The request header a client uses to steer the cache: `bypass` (never use it) or `allow`
/// (cache this answer although the request is not deterministic or has history).
pub const REQUEST_HEADER: &str = "x-carrel-cache";
/// The response header: `hit`, `miss` or `bypass`.
pub const RESPONSE_HEADER: http::HeaderName = http::HeaderName::from_static("x-carrel-cache");

/// Whether a request may be answered from the cache, before its body is looked at: whether
/// the client opted in (`x-carrel-cache: allow`), or why it may not.
pub fn policy(
    endpoint: Endpoint,
    fields: &RequestFields,
    principal: &Principal,
    header: Option<&[u8]>,
    screened: bool,
) -> Result<bool, &'static str> {
    // An institution that chose `cache_all` opts every request in, as the header does.
    let allow = match header {
        Some(b"bypass") => return Err("the client asked to bypass the cache"),
        Some(b"allow") => true,
        _ => principal.economy.cache_all,
    };
    if principal.is_minor() {
        return Err("minors' requests are not cached");
    }
    if screened {
        return Err("screened answers are not cached");
    }
    let deterministic = endpoint == Endpoint::Embeddings || fields.temperature == Some(0.0);
    if !deterministic && !allow {
        return Err("not deterministic (temperature is not 0)");
    }
    Ok(allow)
}

/// Whether a chat request carries earlier turns of a conversation (a message from the
/// assistant or a tool).
pub fn has_history(body: &serde_json::Value) -> bool {
    body.get("messages")
        .and_then(serde_json::Value::as_array)
        .is_some_and(|messages| {
            messages.iter().any(|m| {
                matches!(
                    m.get("role").and_then(serde_json::Value::as_str),
                    Some("assistant" | "tool" | "function")
                )
            })
        })
}

/// What a public answer's key has in place of an institution: no institution id is empty.
pub const PUBLIC: &str = "";

/// The cache key of a request (see the module docs); `institution` is [`PUBLIC`] for an answer
/// every institution shares.
pub fn key(institution: &str, model: &str, endpoint: Endpoint, mut body: serde_json::Value) -> Key {
    if let Some(object) = body.as_object_mut() {
        for field in ["stream", "stream_options", "user"] {
            object.remove(field);
        }
    }
    let mut hash = Sha256::new();
    for part in [institution, model, endpoint.label()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    // serde_json's map is ordered by key: the same fields serialise the same way.
    hash.update(serde_json::to_vec(&body).expect("a parsed body serialises"));
    hash.finalize().into()
}

/// A cached answer replayed as the server-sent events of a stream: a chunk per choice with its
/// whole text, the usage when the client asked for it, and `[DONE]`.
pub fn as_stream(endpoint: Endpoint, answer: &[u8], include_usage: bool) -> Option<Bytes> {
    let capacity = answer.len() + 256;
    let answer: serde_json::Value = serde_json::from_slice(answer).ok()?;
    let chunk_object = match endpoint {
        Endpoint::ChatCompletions => "chat.completion.chunk",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => return None,
    };
    let head = |choices: serde_json::Value| {
        serde_json::json!({
            "id": answer.get("id").cloned().unwrap_or_default(),
            "object": chunk_object,
            "created": answer.get("created").cloned().unwrap_or_default(),
            "model": answer.get("model").cloned().unwrap_or_default(),
            "system_fingerprint": answer.get("system_fingerprint").cloned().unwrap_or_default(),
            "choices": choices,
        })
    };
    let mut out = Vec::with_capacity(capacity);
    let mut event = |value: &serde_json::Value| {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(value.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    };
    for choice in answer.get("choices")?.as_array()? {
        let index = choice.get("index").cloned().unwrap_or(0.into());
        let finish = choice.get("finish_reason").cloned().unwrap_or_default();
        let piece = match endpoint {
            Endpoint::ChatCompletions => {
                let mut delta = choice.get("message").cloned().unwrap_or_default();
                // In a stream each tool call names its place.
                if let Some(calls) = delta
                    .get_mut("tool_calls")
                    .and_then(serde_json::Value::as_array_mut)
                {
                    for (i, call) in calls.iter_mut().enumerate() {
                        if let Some(call) = call.as_object_mut() {
                            call.insert("index".into(), i.into());
                        }
                    }
                }
                serde_json::json!({"index": index, "delta": delta, "logprobs": null,
                                   "finish_reason": finish})
            }
            _ => serde_json::json!({"index": index, "text": choice.get("text").cloned()
                                   .unwrap_or_default(), "logprobs": null,
                                   "finish_reason": finish}),
        };
        event(&head(serde_json::json!([piece])));
    }
    if include_usage && let Some(usage) = answer.get("usage") {
        let mut last = head(serde_json::json!([]));
        last["usage"] = usage.clone();
        event(&last);
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CacheConfig {
        CacheConfig {
            wait: std::time::Duration::from_secs(5),
            ..CacheConfig::default()
        }
    }

    #[test]
    fn the_key_ignores_what_does_not_change_the_answer_and_nothing_else() {
        let body = |v: serde_json::Value| key("inst_a", "m", Endpoint::ChatCompletions, v);
        let base = body(serde_json::json!({"model": "m", "temperature": 0, "messages": [1]}));
        let same = body(
            serde_json::json!({"messages": [1], "temperature": 0, "model": "m",
                                           "stream": true, "user": "x",
                                           "stream_options": {"include_usage": true}}),
        );
        assert_eq!(base, same);
        let other = body(serde_json::json!({"model": "m", "temperature": 0, "messages": [2]}));
        assert_ne!(base, other);
        let v = serde_json::json!({"model": "m", "temperature": 0, "messages": [1]});
        assert_ne!(
            base,
            key("inst_b", "m", Endpoint::ChatCompletions, v.clone())
        );
        assert_ne!(
            base,
            key("inst_a", "m2", Endpoint::ChatCompletions, v.clone())
        );
        assert_ne!(base, key("inst_a", "m", Endpoint::Completions, v));
    }

    #[test]
    fn history_is_an_assistant_or_tool_turn() {
        let chat = |roles: &[&str]| {
            serde_json::json!({"messages": roles.iter()
                .map(|r| serde_json::json!({"role": r, "content": "x"})).collect::<Vec<_>>()})
        };
        assert!(!has_history(&chat(&["system", "user"])));
        assert!(has_history(&chat(&["user", "assistant", "user"])));
        assert!(has_history(&chat(&["user", "tool"])));
        assert!(!has_history(&serde_json::json!({"input": "x"})));
    }

    #[tokio::test]
    async fn identical_requests_wait_for_the_leader_and_an_error_is_not_shared() {
        let cache = Arc::new(ResponseCache::new(&config()).unwrap());
        let Lookup::Lead(leader) = cache.lookup([1; 32], true).await else {
            panic!("the first request leads");
        };
        let waiter = cache.lookup([1; 32], true);
        let (found, ()) = tokio::join!(waiter, async { leader.publish(Bytes::from("A")) });
        let Lookup::Hit {
            answer,
            coalesced: true,
        } = found
        else {
            panic!("the waiter gets the leader's answer");
        };
        assert_eq!(answer.body, "A");
        assert!(matches!(
            cache.lookup([1; 32], true).await,
            Lookup::Hit {
                coalesced: false,
                ..
            }
        ));

        // A leader that gives up leaves its waiters to ask for themselves.
        let Lookup::Lead(leader) = cache.lookup([2; 32], true).await else {
            panic!("the first request leads");
        };
        let waiter = cache.lookup([2; 32], true);
        let (found, ()) = tokio::join!(waiter, async { drop(leader) });
        assert!(matches!(found, Lookup::Miss));
        // Not leading: nobody waits for a stream's request.
        assert!(matches!(cache.lookup([3; 32], false).await, Lookup::Miss));
        assert_eq!(cache.size().0, 1);
    }

    #[test]
    fn a_cached_chat_answer_replays_as_a_stream() {
        let answer = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
        });
        let bytes = serde_json::to_vec(&answer).unwrap();
        let stream = as_stream(Endpoint::ChatCompletions, &bytes, true).unwrap();
        let text = std::str::from_utf8(&stream).unwrap();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.len(), 3, "{text}");
        let first: serde_json::Value = serde_json::from_str(events[0]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["content"], "Hello");
        assert_eq!(first["choices"][0]["finish_reason"], "stop");
        let usage: serde_json::Value = serde_json::from_str(events[1]).unwrap();
        assert_eq!(usage["usage"]["total_tokens"], 4);
        assert_eq!(events[2], "[DONE]");
        let without = as_stream(Endpoint::ChatCompletions, &bytes, false).unwrap();
        assert!(!std::str::from_utf8(&without).unwrap().contains("usage"));
    }
}
