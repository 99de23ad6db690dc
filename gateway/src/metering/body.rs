//! The metered response body and the reading of `usage` from its tail.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use carrel_core::domain::{Principal, unix_now};
use carrel_core::store::UsageRecord;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;

use super::{PendingUsage, UsageLedger};
use crate::body::ResponseBody;
use crate::error::BoxError;

/// How much of a body's end is kept to find its `usage` (the final SSE events, or the end of a
/// JSON response, however long the embeddings before it).
pub const TAIL_BYTES: usize = 64 * 1024;

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
}

/// What a metered response is about.
#[derive(Debug)]
pub struct Meter {
    /// Where the record goes.
    pub ledger: UsageLedger,
    /// Who made the request.
    pub principal: Principal,
    /// Public model name.
    pub model: String,
    /// Prices per million prompt and completion tokens, in US dollars.
    pub prices: (f64, f64),
}

impl Meter {
    fn finish(self, usage: Usage, complete: bool) {
        // A provider reporting more than this is wrong; one bad number must not overflow an
        // institution's sums.
        let prompt_tokens = usage.prompt_tokens.min(MAX_TOKENS);
        let completion_tokens = usage.completion_tokens.min(MAX_TOKENS);
        let cost = prompt_tokens as f64 * self.prices.0 + completion_tokens as f64 * self.prices.1;
        let p = self.principal;
        self.ledger.record(PendingUsage {
            record: UsageRecord {
                day: String::new(),
                institution_id: p.institution_id.to_string(),
                site_id: p.site_id.as_deref().map(str::to_owned),
                group_id: p.group_id.as_deref().map(str::to_owned),
                key_id: p.key_id.to_string(),
                model: self.model,
                complete,
                prompt_tokens,
                completion_tokens,
                // Prices are per million tokens: tokens × price is in millionths of a dollar.
                cost_nano_usd: ((cost * 1000.0).round() as i64).min(MAX_COST_NANO_USD),
            },
            at: unix_now(),
            timezone: p.timezone,
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
                let mut joined = bytes::BytesMut::with_capacity(self.len);
                for frame in &self.frames {
                    joined.extend_from_slice(frame);
                }
                joined.freeze()
            }
        }
    }
}

/// A response body that records its usage when it ends or is dropped.
pub struct MeteredBody {
    inner: ResponseBody,
    tail: Tail,
    meter: Option<Meter>,
}

impl std::fmt::Debug for MeteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("tail_len", &self.tail.len)
            .finish_non_exhaustive()
    }
}

impl MeteredBody {
    /// Meters `inner`.
    pub fn new(inner: ResponseBody, meter: Meter) -> Self {
        MeteredBody {
            inner,
            tail: Tail::default(),
            meter: Some(meter),
        }
    }

    /// Records the usage once; `complete` when the body reached its end.
    fn finish(&mut self, complete: bool) {
        if let Some(meter) = self.meter.take() {
            let usage = find_usage(&self.tail.bytes()).unwrap_or_default();
            meter.finish(usage, complete);
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tail.push(data);
                }
                // Record before the last bytes go out, so the client cannot outrun the ledger.
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            // The provider broke off.
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. What the provider already reported
        // (or nothing) is recorded.
        self.finish(false);
    }
}

/// The last well-formed `"usage": {...}` object in `tail` with at least one count, if any.
/// The top-level usage of a response (and the usage event of a stream) comes after its content,
/// and a `"usage"` inside generated text is escaped (`\"usage\"`), so searching from the end
/// finds the provider's own.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_json_and_sse() {
        let json = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 9}"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}}"#;
        assert_eq!(
            find_usage(json),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 30
            })
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n\
                    data: [DONE]\n\n";
        assert_eq!(
            find_usage(sse),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 2
            })
        );
        let embeddings =
            br#"{"data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(find_usage(embeddings).unwrap().prompt_tokens, 8);
        assert_eq!(find_usage(b"data: {\"usage\":null}\n\n"), None);
        assert_eq!(find_usage(b"{\"usage\": {\"prompt_tokens\": 3"), None);
        assert_eq!(find_usage(b""), None);
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
            key_id: "key_a".into(),
            site_id: None,
            group_id: None,
            tier_ceiling: carrel_core::domain::Tier::Advanced,
            allowed_models: None,
            expires_at: None,
        }
    }

    fn metered(ledger: &UsageLedger, frames: Vec<&'static str>) -> MeteredBody {
        let stream = futures_util::stream::iter(
            frames
                .into_iter()
                .map(|f| Ok::<_, BoxError>(Frame::data(Bytes::from_static(f.as_bytes())))),
        );
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(stream));
        MeteredBody::new(
            body,
            Meter {
                ledger: ledger.clone(),
                principal: principal(),
                model: "m".to_owned(),
                prices: (1.0, 2.0),
            },
        )
    }

    #[tokio::test]
    async fn a_finished_body_and_a_dropped_one_are_both_recorded_once() {
        use http_body_util::BodyExt;
        let store = carrel_core::store::Store::open_in_memory().unwrap();
        let ledger = UsageLedger::start(store.clone()).unwrap();
        let done = metered(
            &ledger,
            vec![
                "data: {\"choices\":[]}\n\n",
                "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            ],
        );
        let bytes = done.collect().await.unwrap().to_bytes();
        assert!(bytes.ends_with(b"}}\n\n"));
        // The client reads one frame and goes away.
        let mut cut = metered(&ledger, vec!["data: a\n\n", "data: b\n\n"]);
        assert!(cut.frame().await.unwrap().is_ok());
        drop(cut);
        ledger.flush().await;
        let lines = store
            .usage_report(
                "inst_a",
                "2000-01-01",
                "2999-12-31",
                carrel_core::domain::UsageGroupBy::Key,
            )
            .await
            .unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(
            (
                lines[0].requests,
                lines[0].prompt_tokens,
                lines[0].completion_tokens
            ),
            (2, 3, 4)
        );
        // 3 × $1 + 4 × $2 per million tokens.
        assert!(
            (lines[0].cost_usd - 11e-6).abs() < 1e-12,
            "{}",
            lines[0].cost_usd
        );
        assert_eq!(
            ledger
                .counters()
                .written
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }
}
