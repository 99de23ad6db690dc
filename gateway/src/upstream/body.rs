//! The upstream response body, passed through frame by frame (never buffered whole), with a
//! bound on the silence between frames.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;
use crate::openai::{ErrorBody, ErrorDetail};

pin_project_lite::pin_project! {
    /// An upstream body with an idle timeout. When the upstream fails or goes quiet mid-stream,
    /// an SSE client gets a final `data: {"error": ...}` event (the status line is long gone, so
    /// this is the only way to tell it why); any other client sees the body end in an error,
    /// which aborts the response.
    ///
    /// The timer is re-armed lazily: a frame only records the time, and the sleep is moved to
    /// `last_frame + idle_timeout` when it fires early. Re-registering the timer on every frame
    /// cost a timer-wheel update per SSE event.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        #[pin]
        idle: Sleep,
        last_frame: Instant,
        idle_timeout: Duration,
        sse: bool,
        done: bool,
        provider: Arc<str>,
    }
}

impl UpstreamBody {
    /// Wraps an upstream body.
    pub fn new(inner: Incoming, idle_timeout: Duration, sse: bool, provider: Arc<str>) -> Self {
        UpstreamBody {
            inner,
            idle: tokio::time::sleep(idle_timeout),
            last_frame: Instant::now(),
            idle_timeout,
            sse,
            done: false,
            provider,
        }
    }
}

/// Why a stream ended early.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("the model provider sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the model provider's stream broke")]
    Broken(#[source] hyper::Error),
}

impl StreamError {
    fn code(&self) -> &'static str {
        match self {
            StreamError::Idle(_) => "upstream_idle_timeout",
            StreamError::Broken(_) => "upstream_stream_failed",
        }
    }
}

fn sse_error_event(err: &StreamError) -> Bytes {
    let message = err.to_string();
    ErrorBody {
        error: ErrorDetail {
            message: Cow::Borrowed(&message),
            kind: "api_error",
            param: None,
            code: err.code(),
        },
    }
    .sse_event()
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let failure = match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.last_frame = Instant::now();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                *this.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => StreamError::Broken(e),
            Poll::Pending => loop {
                ready!(this.idle.as_mut().poll(cx));
                let deadline = *this.last_frame + *this.idle_timeout;
                if deadline <= Instant::now() {
                    break StreamError::Idle(*this.idle_timeout);
                }
                // A frame arrived since the sleep was armed: wait out the rest.
                this.idle.as_mut().reset(deadline);
            },
        };
        *this.done = true;
        tracing::warn!(provider = %this.provider, code = failure.code(), error = %failure, "upstream stream ended early");
        if *this.sse {
            Poll::Ready(Some(Ok(Frame::data(sse_error_event(&failure)))))
        } else {
            Poll::Ready(Some(Err(Box::new(failure))))
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
