//! The metered response body: it reads what a response used, settles the request's
//! reservation to it, and hands the usage record to the ledger.
//!
//! Two ways of reading, chosen by the response's content type:
//!
//! - **JSON** (`application/json`): the body passes through untouched; the last
//!   [`TAIL_BYTES`] are kept (shared `Bytes`, no copy) and the provider's `usage` object is read
//!   from them when the body ends.
//! - **SSE** (`text/event-stream`): the body is read event by event. Each event's generated
//!   text is counted with the model's tokenizer as it passes, so Carrel knows how much a stream
//!   has produced at any point: enough to estimate the usage when the provider reports none, to
//!   settle what was generated when the client goes away, and to cut a stream that runs past
//!   its reservation with a final SSE error event. The usage event the gateway asked for on the
//!   client's behalf (`stream_options.include_usage`) is read and then dropped, so the client
//!   sees the stream it asked for.
//!
//! Settlement and the record happen exactly once: at the end of the body, when the provider
//! breaks off, or when the body is dropped (the client went away, which also drops the
//! upstream body and so cancels the provider's work).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use carrel_core::domain::{Principal, unix_now};
use carrel_core::quota::Reservation;
use carrel_core::store::{UsageRecord, UsageStatus};
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;

use super::{PendingUsage, UsageLedger};
use crate::body::ResponseBody;
use crate::error::BoxError;
use crate::openai::{ErrorBody, ErrorDetail};
use crate::safeguards::containment::ContainmentWatch;
use crate::tokens::Tokenizer;
use crate::upstream::catalog::Price;

/// How much of a body's end is kept to find its `usage` (the end of a JSON response, however
/// long the embeddings before it).
pub const TAIL_BYTES: usize = 64 * 1024;
/// Most bytes of one unfinished SSE event held while waiting for its end; a stream whose
/// events are longer passes through unread (and is settled at its reservation).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Most tokens one response is counted with.
pub const MAX_TOKENS: u64 = u32::MAX as u64;
/// Most one response is counted to cost: a million dollars, in nano-dollars.
pub const MAX_COST_NANO_USD: i64 = 1_000_000 * 1_000_000_000;

/// Token counts as OpenAI-compatible providers report them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Completion tokens (absent for embeddings).
    #[serde(default)]
    pub completion_tokens: u64,
    /// Of the prompt tokens, those the provider served from its prompt cache
    /// (`prompt_tokens_details.cached_tokens`), priced at the cached input price.
    #[serde(
        default,
        rename = "prompt_tokens_details",
        deserialize_with = "cached_tokens"
    )]
    pub cached_prompt_tokens: u64,
}

/// `prompt_tokens_details.cached_tokens`, 0 when absent or null.
fn cached_tokens<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: Option<u64>,
    }
    Ok(Option::<Details>::deserialize(de)?
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0))
}

/// What a metered response is about, and what it settles.
#[derive(Debug)]
pub struct Meter {
    /// Where the record goes.
    pub ledger: UsageLedger,
    /// Who made the request.
    pub principal: Arc<Principal>,
    /// The patron, by reference.
    pub patron_ref: Option<Arc<str>>,
    /// Public model name.
    pub model: Arc<str>,
    /// The model's price when the request arrived.
    pub price: Price,
    /// The request's id, which its usage record carries.
    pub request_id: String,
    /// When the request arrived.
    pub started: Instant,
    /// Carrel's estimate of the prompt, used when the provider reports no usage.
    pub prompt_estimate: u64,
    /// How the model's output is counted.
    pub tokenizer: Tokenizer,
    /// What the request holds until it settles.
    pub reservation: Option<Reservation>,
}

impl Meter {
    /// Settles and records. `usage` is the provider's report; without one, the prompt estimate
    /// and `counted` output tokens stand in, and the record says so.
    pub fn finish(mut self, usage: Option<Usage>, counted: u64, status: UsageStatus) {
        let (usage, estimated) = match usage {
            Some(u) => (u, false),
            None => (
                Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: counted,
                    cached_prompt_tokens: 0,
                },
                true,
            ),
        };
        self.record(usage, estimated, status, None);
    }

    /// Records a request the provider refused: nothing used, the reservation refunded.
    pub fn refused(mut self) {
        self.record(Usage::default(), false, UsageStatus::UpstreamError, None);
    }

    /// Records a request answered from the response cache: no provider tokens, so no token
    /// budget is charged and the reservation is refunded. `avoided`, the usage the provider
    /// reported for the answer, priced now, is what a hit would have cost; the institution's
    /// cache price (`cache_price_percent` of that, default 0) is its cost, counted against
    /// money budgets, and the rest is what the record says was saved.
    pub fn cached(mut self, avoided: Option<Usage>) {
        let full = avoided.map_or(0.0, |u| {
            self.price.nano_usd(
                u.prompt_tokens.min(MAX_TOKENS),
                u.cached_prompt_tokens,
                u.completion_tokens.min(MAX_TOKENS),
            )
        });
        let full = (full.round() as i64).clamp(0, MAX_COST_NANO_USD);
        let percent = i64::from(self.principal.economy.cache_price_percent.min(100));
        let cost = full * percent / 100;
        self.record(
            Usage::default(),
            false,
            UsageStatus::Complete,
            Some((cost, full - cost)),
        );
    }

    /// `cached`: answered from the response cache, at this cost and saving this much
    /// (nano-dollars).
    fn record(
        &mut self,
        usage: Usage,
        estimated: bool,
        status: UsageStatus,
        cached: Option<(i64, i64)>,
    ) {
        // A provider reporting more than this is wrong; one bad number must not overflow an
        // institution's sums.
        let prompt_tokens = usage.prompt_tokens.min(MAX_TOKENS);
        let completion_tokens = usage.completion_tokens.min(MAX_TOKENS);
        let cost =
            self.price
                .nano_usd(prompt_tokens, usage.cached_prompt_tokens, completion_tokens);
        let cost_nano_usd = match cached {
            Some((cost, _)) => cost,
            None => (cost.round() as i64).clamp(0, MAX_COST_NANO_USD),
        };
        if let Some(reservation) = self.reservation.take() {
            reservation.settle(prompt_tokens + completion_tokens, cost_nano_usd as u64);
        }
        let p = &self.principal;
        self.ledger.record(PendingUsage {
            record: UsageRecord {
                request_id: std::mem::take(&mut self.request_id),
                at: unix_now(),
                day: String::new(),
                institution_id: Arc::clone(&p.institution_id),
                site_id: p.site_id.clone(),
                group_id: p.group_id.clone(),
                key_id: Arc::clone(&p.key_id),
                patron_ref: self.patron_ref.clone(),
                model: Arc::clone(&self.model),
                status,
                prompt_tokens,
                completion_tokens,
                cost_nano_usd,
                saved_nano_usd: cached.map_or(0, |(_, saved)| saved),
                estimated,
                cached: cached.is_some(),
                latency_ms: self.started.elapsed().as_millis() as u64,
            },
            timezone: Arc::clone(&p.timezone),
        });
    }
}

/// The last bytes of a body, as the frames that carried them.
#[derive(Debug, Default)]
struct Tail {
    frames: VecDeque<Bytes>,
    len: usize,
}

impl Tail {
    fn push(&mut self, frame: &Bytes) {
        self.frames.push_back(frame.clone());
        self.len += frame.len();
        while self
            .frames
            .front()
            .is_some_and(|f| self.len - f.len() >= TAIL_BYTES)
        {
            let dropped = self.frames.pop_front().expect("checked non-empty");
            self.len -= dropped.len();
        }
    }

    fn bytes(&self) -> Bytes {
        match self.frames.len() {
            1 => self.frames[0].clone(),
            _ => {
                let mut joined = BytesMut::with_capacity(self.len);
                for frame in &self.frames {
                    joined.extend_from_slice(frame);
                }
                joined.freeze()
            }
        }
    }
}

/// What the SSE reader decided about the events of one frame.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Go on.
    More,
    /// The stream's `[DONE]` went by: settle now, before the last bytes reach the client.
    Done,
    /// The stream ran past its reservation: it ends here.
    Cut,
}

/// Reads a stream event by event (see the module docs).
#[derive(Debug)]
struct SseReader {
    /// The unfinished event at the end of what has arrived.
    partial: BytesMut,
    /// Output tokens counted so far, all choices together.
    counted: u64,
    /// The provider's usage, once reported.
    usage: Option<Usage>,
    /// Drop the usage event: Carrel asked for it, the client did not.
    strip_usage: bool,
    /// Output tokens the stream may produce before it is cut.
    allowance: u64,
    tokenizer: Tokenizer,
    /// Events too long to hold: pass everything through unread.
    blind: bool,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// The end of the first event in `buf` (after its blank line), if it is complete.
pub(crate) fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl SseReader {
    fn new(strip_usage: bool, allowance: u64, tokenizer: Tokenizer) -> Self {
        SseReader {
            partial: BytesMut::new(),
            counted: 0,
            usage: None,
            strip_usage,
            // Providers stop at `max_tokens`; counting chunk by chunk can read a token or two
            // more than they report, so a stream is cut only well past its allowance.
            allowance: allowance + allowance / 20 + 4,
            tokenizer,
            blind: false,
        }
    }

    /// Takes in one frame and queues what goes on to the client.
    fn feed(&mut self, data: &Bytes, out: &mut VecDeque<Bytes>) -> Read {
        if self.blind {
            out.push_back(data.clone());
            return Read::More;
        }
        // Providers usually send whole events per frame: those are read and passed on as
        // slices of the frame, with no copy. Only a split event is gathered in `partial`.
        let mut read = Read::More;
        if self.partial.is_empty() {
            let mut from = 0;
            while let Some(end) = event_end(&data[from..]) {
                let event = data.slice(from..from + end);
                from += end;
                if !self.take(event, out, &mut read) {
                    return Read::Cut;
                }
            }
            self.partial.extend_from_slice(&data[from..]);
        } else {
            self.partial.extend_from_slice(data);
            while let Some(end) = event_end(&self.partial) {
                let event = self.partial.split_to(end).freeze();
                if !self.take(event, out, &mut read) {
                    return Read::Cut;
                }
            }
        }
        if self.partial.len() > MAX_EVENT_BYTES {
            self.blind = true;
            out.push_back(self.partial.split().freeze());
        }
        read
    }

    /// Reads one whole event and queues it unless it is dropped, noting in `read` when the
    /// stream is done; false when the stream must be cut.
    fn take(&mut self, event: Bytes, out: &mut VecDeque<Bytes>, read: &mut Read) -> bool {
        match self.event(&event) {
            Event::Keep => out.push_back(event),
            Event::Drop => {}
            Event::Done => {
                out.push_back(event);
                *read = Read::Done;
            }
            Event::Over => return false,
        }
        true
    }

    /// What is left when the provider ends without a final blank line.
    fn rest(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| self.partial.split().freeze())
    }

    fn event(&mut self, event: &[u8]) -> Event {
        let Some(data) = event.split(|b| *b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            line.strip_prefix(b"data:").map(<[u8]>::trim_ascii)
        }) else {
            return Event::Keep;
        };
        if data == b"[DONE]" {
            return Event::Done;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
            return Event::Keep;
        };
        let choices = chunk.choices.unwrap_or_default();
        for choice in &choices {
            let delta = choice.delta.as_ref().and_then(|d| d.content.as_deref());
            let pieces = [delta, choice.text.as_deref()].into_iter().flatten();
            for text in pieces.filter(|t| !t.is_empty()) {
                self.counted += self.tokenizer.count_piece(text);
            }
        }
        if self.counted > self.allowance {
            return Event::Over;
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
            if self.strip_usage && choices.is_empty() {
                return Event::Drop;
            }
        }
        Event::Keep
    }
}

/// Reads `frames` as a metered stream reads a provider's stream, with no reservation to cut
/// at: the output tokens it counted, the usage the provider reported, and the bytes it passes
/// on. The reader alone, for the micro-benchmarks (`gateway/benches/hot_path.rs`).
pub fn read_stream(
    frames: &[Bytes],
    strip_usage: bool,
    tokenizer: Tokenizer,
) -> (u64, Option<Usage>, usize) {
    let mut reader = SseReader::new(strip_usage, u64::MAX / 4, tokenizer);
    let mut out = VecDeque::new();
    let mut passed = 0;
    for frame in frames {
        reader.feed(frame, &mut out);
        passed += out.drain(..).map(|b| b.len()).sum::<usize>();
    }
    passed += reader.rest().map_or(0, |b| b.len());
    (reader.counted, reader.usage, passed)
}

enum Event {
    Keep,
    Drop,
    Done,
    Over,
}

/// The SSE event that ends a stream cut at its reservation.
fn cut_event() -> Bytes {
    ErrorBody {
        error: ErrorDetail {
            message: Cow::Borrowed(
                "This response reached the tokens reserved for it and was stopped.",
            ),
            kind: "tokens",
            param: None,
            code: "reservation_exceeded",
        },
    }
    .sse_event()
}

/// The SSE event that ends a stream a containment switch stopped.
fn contained_event(by: carrel_core::domain::ContainmentKind) -> Bytes {
    let error = crate::error::GatewayError::Contained {
        model: String::new(),
        by,
    };
    ErrorBody {
        error: ErrorDetail {
            message: Cow::Borrowed(
                "This response was stopped: the operator contained what it was using.",
            ),
            kind: error.openai_type(),
            param: None,
            code: error.code(),
        },
    }
    .sse_event()
}

/// A response body that settles and records its usage when it ends or is dropped.
pub struct MeteredBody {
    /// The provider's body; replaced by an empty one when a stream is cut.
    inner: ResponseBody,
    tail: Tail,
    sse: Option<SseReader>,
    /// Frames ready for the client (SSE).
    ready: VecDeque<Bytes>,
    /// The provider's body has ended (or was cut).
    ended: bool,
    meter: Option<Meter>,
    /// Fires when a containment switch stops this stream (SSE only).
    contained: Option<ContainmentWatch>,
}

impl std::fmt::Debug for MeteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("tail_len", &self.tail.len)
            .field("sse", &self.sse)
            .finish_non_exhaustive()
    }
}

/// How a stream is read.
#[derive(Debug, Clone, Copy)]
pub struct StreamReading {
    /// Drop the usage event (Carrel asked for it on the client's behalf).
    pub strip_usage: bool,
    /// Output tokens the stream may produce, all choices together.
    pub allowance: u64,
}

impl MeteredBody {
    /// Meters a JSON body.
    pub fn json(inner: ResponseBody, meter: Meter) -> Self {
        MeteredBody::new(inner, meter, None)
    }

    /// Meters an SSE body.
    pub fn sse(inner: ResponseBody, meter: Meter, reading: StreamReading) -> Self {
        let sse = SseReader::new(reading.strip_usage, reading.allowance, meter.tokenizer);
        MeteredBody::new(inner, meter, Some(sse))
    }

    /// Ends a stream with a final SSE error event when `watch` fires (a containment switch
    /// stopped what it serves). No effect on a JSON body, which is not cut.
    #[must_use]
    pub fn stopped_by(mut self, watch: ContainmentWatch) -> Self {
        if self.sse.is_some() {
            self.contained = Some(watch);
        }
        self
    }

    fn new(inner: ResponseBody, meter: Meter, sse: Option<SseReader>) -> Self {
        MeteredBody {
            inner,
            tail: Tail::default(),
            sse,
            ready: VecDeque::new(),
            ended: false,
            meter: Some(meter),
            contained: None,
        }
    }

    /// Settles and records once.
    fn finish(&mut self, status: UsageStatus) {
        let Some(meter) = self.meter.take() else {
            return;
        };
        match &self.sse {
            // A stream read blind (events too long to hold) counted only part of its output:
            // without the provider's usage it settles at its reservation.
            Some(sse) if sse.blind && sse.usage.is_none() => {
                let reserved = meter
                    .reservation
                    .as_ref()
                    .map_or(0, Reservation::output_tokens);
                meter.finish(None, sse.counted.max(reserved), status);
            }
            Some(sse) => meter.finish(sse.usage, sse.counted, status),
            None => {
                let tail = self.tail.bytes();
                let usage = find_usage(&tail);
                let counted = match usage {
                    Some(_) => 0,
                    None => count_output(&tail, meter.tokenizer).unwrap_or_else(|| {
                        meter
                            .reservation
                            .as_ref()
                            .map_or(0, Reservation::output_tokens)
                    }),
                };
                meter.finish(usage, counted, status);
            }
        }
    }

    fn poll_json(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.tail.push(data);
                }
                // Settle before the last bytes go out, so the client cannot outrun the ledger.
                if self.inner.is_end_stream() {
                    self.finish(UsageStatus::Complete);
                }
            }
            Poll::Ready(None) => self.finish(UsageStatus::Complete),
            // The provider broke off.
            Poll::Ready(Some(Err(_))) => self.finish(UsageStatus::Incomplete),
            Poll::Pending => {}
        }
        polled
    }

    fn poll_sse(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(bytes) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            if let Some(watch) = &mut self.contained
                && let Poll::Ready(by) = watch.as_mut().poll(cx)
            {
                self.contained = None;
                self.ready.push_back(contained_event(by));
                self.ended = true;
                // Dropping the provider's body cancels its work.
                self.inner = crate::body::full(Bytes::new());
                self.finish(UsageStatus::Cut);
                continue;
            }
            let sse = self.sse.as_mut().expect("SSE mode");
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.ready.extend(sse.rest());
                    self.ended = true;
                    self.finish(UsageStatus::Complete);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    self.finish(UsageStatus::Incomplete);
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    match sse.feed(&data, &mut self.ready) {
                        Read::More => {}
                        Read::Done => self.finish(UsageStatus::Complete),
                        Read::Cut => {
                            self.ready.push_back(cut_event());
                            self.ended = true;
                            // Dropping the provider's body cancels its work.
                            self.inner = crate::body::full(Bytes::new());
                            self.finish(UsageStatus::Cut);
                        }
                    }
                }
            }
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.sse.is_some() {
            this.poll_sse(cx)
        } else {
            this.poll_json(cx)
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.sse.is_some() {
            self.ended && self.ready.is_empty()
        } else {
            self.inner.is_end_stream()
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.sse.is_some() {
            // Events may be dropped or added: the length is not known.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. What the provider reported, or what
        // was counted, is settled.
        self.finish(UsageStatus::Incomplete);
    }
}

/// The last well-formed `"usage": {...}` object in `tail` with at least one count, if any.
/// The top-level usage of a response comes after its content, and a `"usage"` inside
/// generated text is escaped (`\"usage\"`), so searching from the end finds the provider's own.
pub fn find_usage(tail: &[u8]) -> Option<Usage> {
    memchr::memmem::rfind_iter(tail, b"\"usage\"").find_map(|at| {
        if at > 0 && tail[at - 1] == b'\\' {
            return None;
        }
        let rest = tail[at + 7..].trim_ascii_start().strip_prefix(b":")?;
        let rest = rest.trim_ascii_start();
        if !rest.starts_with(b"{") {
            return None;
        }
        let mut de = serde_json::Deserializer::from_slice(rest);
        Usage::deserialize(&mut de)
            .ok()
            .filter(|u| u.prompt_tokens > 0 || u.completion_tokens > 0)
    })
}

/// Output tokens of a whole JSON completion without a usage report: its choices' text.
fn count_output(body: &[u8], tokenizer: Tokenizer) -> Option<u64> {
    #[derive(Deserialize)]
    struct Completion<'a> {
        #[serde(borrow)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        message: Option<Delta<'a>>,
        #[serde(borrow, default)]
        text: Option<Cow<'a, str>>,
    }
    let completion: Completion<'_> = serde_json::from_slice(body).ok()?;
    Some(
        completion
            .choices
            .iter()
            .map(|c| {
                let message = c.message.as_ref().and_then(|m| m.content.as_deref());
                [message, c.text.as_deref()]
                    .into_iter()
                    .flatten()
                    .map(|t| tokenizer.count(t))
                    .sum::<u64>()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use carrel_core::quota::{
        Demand, FakeClock, Level, Limits, LimitsTable, OverPolicy, QuotaEngine, Subject,
    };
    use http_body_util::BodyExt;

    #[test]
    fn usage_is_read_from_json_and_sse() {
        let json = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}"#;
        assert_eq!(
            find_usage(json),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 30,
                cached_prompt_tokens: 0
            })
        );
        let cached = br#"{"usage": {"prompt_tokens": 2000, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 0}}}"#;
        assert_eq!(find_usage(cached).unwrap().cached_prompt_tokens, 1536);
        let null_details = br#"{"usage": {"prompt_tokens": 20, "prompt_tokens_details": null}}"#;
        assert_eq!(find_usage(null_details).unwrap().cached_prompt_tokens, 0);
        let embeddings =
            br#"{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(find_usage(embeddings).unwrap().prompt_tokens, 8);
        assert_eq!(find_usage(b"data: {\"usage\":null}\n\n"), None);
        assert_eq!(find_usage(b"{\"usage\": {\"prompt_tokens\": 3"), None);
        assert_eq!(find_usage(b""), None);
        let no_usage = br#"{"choices":[{"message":{"content":"Hello there"}},{"text":"again"}]}"#;
        assert_eq!(count_output(no_usage, Tokenizer::Bytes), Some(3 + 2));
    }

    #[test]
    fn the_tail_keeps_at_least_the_last_window() {
        let mut tail = Tail::default();
        for i in 0..100u8 {
            tail.push(&Bytes::from(vec![i; 1000]));
        }
        let bytes = tail.bytes();
        assert!(bytes.len() >= TAIL_BYTES && bytes.len() < TAIL_BYTES + 1000);
        assert_eq!(*bytes.last().unwrap(), 99);
    }

    fn principal() -> Principal {
        Principal {
            institution_id: "inst_a".into(),
            institution_kind: carrel_core::domain::InstitutionKind::Library,
            timezone: "America/Chicago".into(),
            institution_status: carrel_core::domain::InstitutionStatus::Active,
            frontier_verified: false,
            over_quota: carrel_core::domain::OverQuota::Reject,
            economy: Default::default(),
            key_id: "key_a".into(),
            site_id: None,
            group_id: None,
            tier_ceiling: carrel_core::domain::Tier::Advanced,
            group_tier_ceiling: None,
            institution_tier_ceiling: carrel_core::domain::Tier::Frontier,
            minor_tier_ceiling: carrel_core::domain::Tier::Baseline,
            attested_until: None,
            allowed_models: None,
            expires_at: None,
            key_kind: carrel_core::domain::KeyKind::Service,
            patron: None,
        }
    }

    struct Rig {
        store: carrel_core::store::Store,
        ledger: UsageLedger,
        engine: QuotaEngine,
    }

    impl Rig {
        fn new() -> Rig {
            let store = carrel_core::store::Store::open_in_memory().unwrap();
            let engine = QuotaEngine::new(FakeClock::at("2026-11-27T16:00:00Z".parse().unwrap()));
            let mut table = LimitsTable::default();
            table.insert(
                Level::Key,
                "key_a",
                Limits {
                    tokens_per_day: Some(1_000_000),
                    ..Limits::default()
                },
            );
            engine.set_limits(table);
            Rig {
                ledger: UsageLedger::start(store.clone(), std::time::Duration::from_secs(86_400))
                    .unwrap(),
                store,
                engine,
            }
        }

        fn meter(&self, id: &str, output: u64) -> Meter {
            let p = Arc::new(principal());
            let subject = Subject {
                principal: Arc::clone(&p),
                patron: None,
                model: Some("m".into()),
            };
            let demand = Demand {
                prompt_tokens: 10,
                max_output_tokens: output,
                choices: 1,
                input_nano_per_token: 1000.0,
                output_nano_per_token: 2000.0,
                stream: true,
            };
            Meter {
                ledger: self.ledger.clone(),
                principal: p,
                patron_ref: None,
                model: "m".into(),
                price: Price {
                    input: 1.0,
                    output: 2.0,
                    cached_input: 0.5,
                },
                request_id: id.to_owned(),
                started: Instant::now(),
                prompt_estimate: 10,
                tokenizer: Tokenizer::O200k,
                reservation: Some(
                    self.engine
                        .reserve(&subject, demand, OverPolicy::Reject)
                        .unwrap(),
                ),
            }
        }

        fn used_today(&self) -> u64 {
            self.engine
                .usage(
                    &"inst_a".into(),
                    &"America/Chicago".into(),
                    Level::Key,
                    "key_a",
                )
                .day_tokens
        }

        async fn records(&self) -> Vec<(String, u64, u64, bool, String)> {
            self.ledger.flush().await;
            self.store
                .usage_records("inst_a", 100)
                .await
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.request_id,
                        r.prompt_tokens,
                        r.completion_tokens,
                        r.estimated,
                        r.status.as_str().to_owned(),
                    )
                })
                .collect()
        }
    }

    fn frames(frames: Vec<String>) -> ResponseBody {
        let stream = futures_util::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from(f)))),
        );
        BodyExt::boxed(http_body_util::StreamBody::new(stream))
    }

    fn chunk(text: &str) -> String {
        format!(
            "data: {}\n\n",
            serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}}]})
        )
    }

    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\n";

    #[tokio::test]
    async fn a_stream_settles_to_the_reported_usage_and_hides_the_usage_it_was_not_asked_for() {
        let rig = Rig::new();
        let body = MeteredBody::sse(
            // Events split across frames, as networks do.
            frames(vec![
                chunk(" hello")[..10].to_owned(),
                chunk(" hello")[10..].to_owned() + &chunk(" world"),
                chunk(" again") + USAGE,
                "data: [DONE]\n\n".to_owned(),
            ]),
            rig.meter("req_1", 100),
            StreamReading {
                strip_usage: true,
                allowance: 100,
            },
        );
        let out = body.collect().await.unwrap().to_bytes();
        let out = std::str::from_utf8(&out).unwrap();
        assert_eq!(out.matches("\"content\"").count(), 3);
        assert!(!out.contains("usage"), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(rig.used_today(), 12);
        assert_eq!(
            rig.records().await,
            [("req_1".to_owned(), 9, 3, false, "complete".to_owned())]
        );
    }

    #[tokio::test]
    async fn without_usage_a_stream_is_counted_and_marked_estimated() {
        let rig = Rig::new();
        let body = MeteredBody::sse(
            frames(vec![
                chunk(" hello"),
                chunk(" world"),
                "data: [DONE]\n\n".to_owned(),
            ]),
            rig.meter("req_1", 100),
            StreamReading {
                strip_usage: false,
                allowance: 100,
            },
        );
        body.collect().await.unwrap();
        assert_eq!(
            rig.records().await,
            [("req_1".to_owned(), 10, 2, true, "complete".to_owned())]
        );
        assert_eq!(rig.used_today(), 12);
    }

    #[tokio::test]
    async fn a_stream_past_its_reservation_is_cut_with_an_error_event() {
        let rig = Rig::new();
        let words: Vec<String> = (0..200).map(|_| chunk(" word")).collect();
        let body = MeteredBody::sse(
            frames(words),
            rig.meter("req_1", 20),
            StreamReading {
                strip_usage: false,
                allowance: 20,
            },
        );
        let out = body.collect().await.unwrap().to_bytes();
        let out = std::str::from_utf8(&out).unwrap();
        let last = out.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.contains("\"code\":\"reservation_exceeded\""), "{last}");
        // 20 + 5% + 4 tokens pass, then the cut.
        assert_eq!(out.matches("\"content\"").count(), 25);
        let records = rig.records().await;
        // The provider produced the 26th token; it is paid for though the client never saw it.
        assert_eq!((records[0].2, records[0].4.as_str()), (26, "cut"));
    }

    #[tokio::test]
    async fn a_stream_too_long_to_read_passes_through_and_settles_at_its_reservation() {
        let rig = Rig::new();
        let huge = format!("data: {}", "x".repeat(MAX_EVENT_BYTES + 1));
        let body = MeteredBody::sse(
            frames(vec![
                chunk(" one"),
                huge.clone(),
                "\n\ndata: [DONE]\n\n".to_owned(),
            ]),
            rig.meter("req_1", 50),
            StreamReading {
                strip_usage: false,
                allowance: 50,
            },
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out.len(), chunk(" one").len() + huge.len() + 16);
        assert_eq!(
            rig.records().await,
            [("req_1".to_owned(), 10, 50, true, "complete".to_owned())]
        );
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_is_settled_once_for_what_it_got() {
        let rig = Rig::new();
        let mut body = MeteredBody::sse(
            frames(vec![chunk(" one"), chunk(" two"), chunk(" three")]),
            rig.meter("req_1", 100),
            StreamReading {
                strip_usage: false,
                allowance: 100,
            },
        );
        assert!(body.frame().await.unwrap().is_ok());
        drop(body);
        assert_eq!(
            rig.records().await,
            [("req_1".to_owned(), 10, 1, true, "incomplete".to_owned())]
        );
        assert_eq!(rig.used_today(), 11);
    }

    #[tokio::test]
    async fn a_json_body_settles_before_its_last_bytes_go_out() {
        let rig = Rig::new();
        let mut body = MeteredBody::json(
            frames(vec![
                "{\"choices\":[],".to_owned(),
                "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}".to_owned(),
            ]),
            rig.meter("req_1", 100),
        );
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        assert_eq!(rig.used_today(), 7);
        drop(body);
        assert_eq!(rig.records().await.len(), 1);
    }
}
