//! A scriptable OpenAI-compatible upstream for tests and benchmarks, on port 0.
//!
//! By default it answers like a model server: chat, completions and embeddings in JSON, or SSE
//! when the request says `"stream": true` (with a usage chunk when the request asks for
//! `stream_options.include_usage`). Per-model scripts replace that with fixed JSON, a custom
//! stream (usage in the final chunk or absent, pacing, a gate that holds the stream after its
//! first chunk), latency, or faults: an error status, a connection reset, a hang. Every request
//! is logged so tests can check what crossed to the provider.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Body = BoxBody<Bytes, Infallible>;

/// What the mock does for a request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Answer like a model server (JSON, or SSE when the request streams).
    Auto,
    /// Answer with this status and JSON body.
    Json {
        /// Status code.
        status: u16,
        /// Body.
        body: Value,
    },
    /// Stream these content pieces as chat-completion chunks.
    Stream(StreamScript),
    /// Close the connection without answering.
    Reset,
    /// Read the request and never answer.
    Hang,
    /// These replies, one a request, in order (then `Auto`).
    Sequence(Arc<Mutex<VecDeque<Reply>>>),
}

impl Reply {
    /// [`Reply::Sequence`] of `replies`.
    pub fn sequence(replies: Vec<Reply>) -> Reply {
        Reply::Sequence(Arc::new(Mutex::new(replies.into())))
    }
}

/// A scripted SSE stream.
#[derive(Clone, Debug, Default)]
pub struct StreamScript {
    /// Content pieces, one chunk each.
    pub pieces: Vec<String>,
    /// Send a usage chunk before `[DONE]`.
    pub usage: bool,
    /// Pause between chunks.
    pub chunk_delay: Duration,
    /// When set, the stream stops after its first chunk until the gate is opened.
    pub gate: Option<Gate>,
}

/// A gate a test opens to let a held stream continue; it also tells whether the stream finished.
#[derive(Clone, Debug, Default)]
pub struct Gate {
    open: Arc<Notify>,
    finished: Arc<AtomicBool>,
    dropped: Arc<Notify>,
}

/// Notifies a gate's `dropped` when a stream's body goes away unfinished.
struct DropAlarm(Option<Gate>);

impl Drop for DropAlarm {
    fn drop(&mut self) {
        if let Some(gate) = &self.0
            && !gate.finished()
        {
            gate.dropped.notify_one();
        }
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Gate::default()
    }

    /// Lets the held stream continue.
    pub fn open(&self) {
        self.open.notify_one();
    }

    /// Waits until the stream's response body is dropped before its end: the gateway went
    /// away, which is how a provider sees a cancelled request.
    pub async fn dropped(&self) {
        self.dropped.notified().await;
    }

    /// Whether the stream has sent its last byte.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }
}

/// A request the mock received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Shared {
    /// Reply and latency by (upstream) model name; unscripted models get `Reply::Auto`.
    scripts: Mutex<HashMap<String, (Reply, Duration)>>,
    /// `None` when logging is off (the benchmark: an unbounded log would skew it).
    log: Option<Mutex<Vec<Received>>>,
}

/// A running mock upstream. Dropping it stops the server.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl MockUpstream {
    /// Starts the mock on `127.0.0.1:0`.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        MockUpstream::serve(listener)
    }

    /// Serves on a bound listener, logging every request.
    pub fn serve(listener: TcpListener) -> MockUpstream {
        MockUpstream::serve_with(listener, true)
    }

    /// Serves on a bound listener; `log` keeps every request for [`MockUpstream::received`].
    pub fn serve_with(listener: TcpListener, log: bool) -> MockUpstream {
        let addr = listener.local_addr().expect("mock address");
        let shared = Arc::new(Shared {
            scripts: Mutex::default(),
            log: log.then(Mutex::default),
        });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (s, st, tr) = (Arc::clone(&shared), stop.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = st.cancelled() => break,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let _ = tcp.set_nodelay(true);
                let shared = Arc::clone(&s);
                let stop = st.clone();
                tr.spawn(async move {
                    let svc = service_fn(move |req| handle(Arc::clone(&shared), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {},
                        () = stop.cancelled() => {},
                    }
                });
            }
        });
        MockUpstream { addr, shared, stop }
    }

    /// `http://127.0.0.1:port/v1`, the base URL to configure.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Scripts the reply for requests naming `model` (the upstream model name).
    pub fn script(&self, model: &str, reply: Reply) {
        self.script_with_latency(model, reply, Duration::ZERO);
    }

    /// Scripts the reply for `model`, sent after `latency`.
    pub fn script_with_latency(&self, model: &str, reply: Reply, latency: Duration) {
        self.shared
            .scripts
            .lock()
            .unwrap()
            .insert(model.to_owned(), (reply, latency));
    }

    /// Every request received so far (empty when logging is off).
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .log
            .as_ref()
            .map(|log| log.lock().unwrap().clone())
            .unwrap_or_default()
    }
}

/// The error that makes hyper drop a connection without answering (the `Reset` fault).
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted connection reset")
    }
}

impl std::error::Error for ResetConnection {}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let received = Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let path = parts.uri.path().to_owned();
    if let Some(log) = &shared.log {
        log.lock().unwrap().push(received);
    }

    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let (reply, latency) = shared
        .scripts
        .lock()
        .unwrap()
        .get(&model)
        .cloned()
        .unwrap_or((Reply::Auto, Duration::ZERO));
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let reply = match reply {
        Reply::Sequence(queue) => queue.lock().unwrap().pop_front().unwrap_or(Reply::Auto),
        other => other,
    };
    let streaming = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(match reply {
        Reply::Auto if path.ends_with("/models") => json_response(200, model_list()),
        Reply::Auto if path.ends_with("/embeddings") => json_response(200, embeddings(&model)),
        Reply::Auto if streaming => sse(
            &model,
            StreamScript {
                pieces: ["Hello", " from", " the", " mock", "."]
                    .map(String::from)
                    .to_vec(),
                usage: include_usage,
                ..StreamScript::default()
            },
        ),
        Reply::Auto if path.ends_with("/chat/completions") => {
            json_response(200, chat_completion(&model))
        }
        Reply::Auto => json_response(200, text_completion(&model)),
        Reply::Json { status, body } => json_response(status, body),
        Reply::Stream(script) => sse(&model, script),
        // A service error makes hyper close the connection without a response.
        Reply::Reset => return Err(ResetConnection),
        Reply::Hang => std::future::pending().await,
        Reply::Sequence(_) => json_response(500, json!({"error": "nested sequence"})),
    })
}

fn json_response(status: u16, body: Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = StatusCode::from_u16(status).expect("a valid status");
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut()
        .insert("x-request-id", "req_mock".parse().unwrap());
    resp.headers_mut()
        .insert("set-cookie", "upstream=1".parse().unwrap());
    resp
}

/// Usage that the mock reports for every answer.
pub const MOCK_USAGE: (u64, u64) = (7, 5);

fn usage() -> Value {
    json!({"prompt_tokens": MOCK_USAGE.0, "completion_tokens": MOCK_USAGE.1,
           "total_tokens": MOCK_USAGE.0 + MOCK_USAGE.1})
}

/// The chat completion the mock answers with.
pub fn chat_completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock."},
                     "finish_reason": "stop", "logprobs": null}],
        "usage": usage(),
    })
}

fn text_completion(model: &str) -> Value {
    json!({
        "id": "cmpl-mock", "object": "text_completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "text": "Hello from the mock.", "finish_reason": "stop",
                     "logprobs": null}],
        "usage": usage(),
    })
}

fn embeddings(model: &str) -> Value {
    json!({
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
        "usage": {"prompt_tokens": MOCK_USAGE.0, "total_tokens": MOCK_USAGE.0},
    })
}

fn model_list() -> Value {
    json!({"object": "list", "data": []})
}

fn sse(model: &str, script: StreamScript) -> Response<Body> {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                       "created": 1_700_000_000, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut events: Vec<Bytes> = script
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": p})
            } else {
                json!({"content": p})
            };
            chunk(delta, Value::Null)
        })
        .collect();
    events.push(chunk(json!({}), json!("stop")));
    if script.usage {
        let c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                       "created": 1_700_000_000, "model": model, "choices": [], "usage": usage()});
        events.push(Bytes::from(format!("data: {c}\n\n")));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let total = events.len();
    let alarm = Arc::new(DropAlarm(script.gate.clone()));
    let frames = stream::unfold(
        (0usize, events, script, alarm),
        move |(i, events, script, alarm)| async move {
            if i == total {
                if let Some(gate) = &script.gate {
                    gate.finished.store(true, Ordering::SeqCst);
                }
                return None;
            }
            if i == 1
                && let Some(gate) = &script.gate
            {
                gate.open.notified().await;
            }
            if i > 0 && !script.chunk_delay.is_zero() {
                tokio::time::sleep(script.chunk_delay).await;
            }
            let frame = Frame::data(events[i].clone());
            Some((Ok::<_, Infallible>(frame), (i + 1, events, script, alarm)))
        },
    );
    let mut resp = Response::new(StreamBody::new(frames).boxed());
    resp.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    resp
}
