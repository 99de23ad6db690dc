//! Signed responses on the data plane: every inference response carries an RFC 9421 signature
//! by the gateway's Ed25519 key over `@status`, `content-digest`, `x-request-id`,
//! `carrel-model` and `date` (the contract is in [`carrel_core::signing`]); public keys are at
//! `GET /.well-known/carrel/keys`.
//!
//! - A JSON response is read whole before its head goes out (the digest is a header): bodies of
//!   up to [`MAX_SIGNED_BODY`] bytes are signed; a larger one is sent on unsigned rather than
//!   held, and counted.
//! - A stream's bytes are digested as they pass, and a final `event: carrel.signature` carries
//!   the signature over the digest of everything before it.
//!
//! The key is a PKCS#8 PEM file (`signing.key_file`), made at first start; replicas share it.
//! `carrel rotate-signing-key` moves its public half into `signing.retired_keys_file`, which
//! stays published, and writes a new key.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use carrel_core::config::SigningConfig;
use carrel_core::signing::{
    ContentDigester, Jwks, KeyRing, PublicKey, ResponseComponents, SigningKey, content_digest,
    http_date,
};
use http::{HeaderName, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::ResponseBody;
use crate::error::{BoxError, GatewayError};

/// Largest JSON body held to be signed.
pub const MAX_SIGNED_BODY: usize = 32 * 1024 * 1024;

/// The header naming the public model a signed response came from.
pub const MODEL_HEADER: HeaderName = HeaderName::from_static("carrel-model");
/// The request id under the name the signature covers (the same value as
/// `x-carrel-request-id`).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Why the signing key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum SigningSetupError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key or the retired set does not parse.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SigningSetupError + '_ {
    move |source| SigningSetupError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, message: impl ToString) -> SigningSetupError {
    SigningSetupError::Invalid {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Writes `bytes` to `path` readable by the owner only, through a temporary file and a rename,
/// so a crash never leaves half a key.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SigningSetupError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads the key ring the config names, making the key at first start.
pub fn load_ring(config: &SigningConfig, data_dir: &Path) -> Result<KeyRing, SigningSetupError> {
    let path = &config.key_path(data_dir);
    let current = match std::fs::read_to_string(path) {
        Ok(pem) => SigningKey::from_pem(&pem).map_err(|e| invalid(path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate().map_err(|e| invalid(path, e))?;
            write_private(path, key.to_pem().as_bytes())?;
            tracing::info!(kid = key.kid(), path = %path.display(), "made a response signing key");
            key
        }
        Err(e) => return Err(io(path)(e)),
    };
    let mut ring = KeyRing::new(current);
    ring.retired = read_retired(&config.retired_path(data_dir))?;
    Ok(ring)
}

fn read_retired(path: &Path) -> Result<Vec<PublicKey>, SigningSetupError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let jwks: Jwks = serde_json::from_slice(&bytes).map_err(|e| invalid(path, e))?;
            jwks.keys
                .iter()
                .map(|jwk| PublicKey::from_jwk(jwk).map_err(|e| invalid(path, e)))
                .collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(path)(e)),
    }
}

/// `carrel rotate-signing-key`: the current key's public half joins the retired set (still
/// published), and a new key replaces it. Returns (old kid, new kid). Every replica must be
/// restarted with the new files.
pub fn rotate(
    config: &SigningConfig,
    data_dir: &Path,
) -> Result<(String, String), SigningSetupError> {
    let ring = load_ring(config, data_dir)?;
    let (key_file, retired_file) = (config.key_path(data_dir), config.retired_path(data_dir));
    let old = ring.current.kid().to_owned();
    let mut retired = ring.retired;
    retired.insert(0, ring.current.public_key());
    retired.dedup_by(|a, b| a.kid() == b.kid());
    let jwks = Jwks {
        keys: retired.iter().map(PublicKey::to_jwk).collect(),
    };
    let json = serde_json::to_vec_pretty(&jwks).map_err(|e| invalid(&retired_file, e))?;
    write_private(&retired_file, &json)?;
    let next = SigningKey::generate().map_err(|e| invalid(&key_file, e))?;
    write_private(&key_file, next.to_pem().as_bytes())?;
    Ok((old, next.kid().to_owned()))
}

/// Signs responses with the current key and publishes every key.
#[derive(Debug)]
pub struct ResponseSigner {
    ring: KeyRing,
    /// `GET /.well-known/carrel/keys`, rendered once.
    jwks: Bytes,
    /// JSON bodies sent unsigned because they were larger than [`MAX_SIGNED_BODY`], or a value
    /// could not be signed.
    unsigned: AtomicU64,
}

impl ResponseSigner {
    /// A signer over `ring`.
    pub fn new(ring: KeyRing) -> Self {
        let jwks = serde_json::to_vec(&ring.jwks()).unwrap_or_default();
        ResponseSigner {
            ring,
            jwks: Bytes::from(jwks),
            unsigned: AtomicU64::new(0),
        }
    }

    /// The published key set, as JSON.
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// Signs the audit log's head of `tree_size` leaves with `root`, now.
    pub fn sign_tree_head(
        &self,
        tree_size: u64,
        root: &carrel_core::merkle::Hash,
    ) -> carrel_core::audit::TreeHead {
        let at = carrel_core::domain::rfc3339(carrel_core::domain::unix_now());
        carrel_core::audit::TreeHead::sign(&self.ring.current, tree_size, root, at)
    }

    /// The published keys.
    pub fn published(&self) -> Jwks {
        self.ring.jwks()
    }

    /// The current key's id.
    pub fn kid(&self) -> &str {
        self.ring.current.kid()
    }

    /// Responses sent unsigned so far.
    pub fn unsigned(&self) -> u64 {
        self.unsigned.load(Ordering::Relaxed)
    }

    /// Signs a response to an inference request: a stream as it goes, JSON whole. `model`
    /// becomes the `carrel-model` header the signature covers; the `x-request-id` it covers is
    /// the provider's when it sent one (so the signature ties the answer to the provider's
    /// record too), else `request_id`, Carrel's own (always also in `x-carrel-request-id`).
    pub async fn sign(
        self: &Arc<Self>,
        resp: Response<ResponseBody>,
        request_id: &str,
        model: &str,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        let (mut parts, body) = resp.into_parts();
        let upstream_id = parts
            .headers
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let request_id = upstream_id.as_deref().unwrap_or(request_id);
        let (Ok(id), Ok(model_value)) = (
            HeaderValue::from_str(request_id),
            HeaderValue::from_str(model),
        ) else {
            self.unsigned.fetch_add(1, Ordering::Relaxed);
            return Ok(Response::from_parts(parts, body));
        };
        let created = carrel_core::domain::unix_now();
        let date = http_date(created);
        let is_sse = crate::body::is_event_stream(&parts.headers);
        let headers = &mut parts.headers;
        headers.insert(X_REQUEST_ID, id);
        headers.insert(MODEL_HEADER, model_value);
        headers.insert(
            http::header::DATE,
            HeaderValue::from_str(&date).expect("an HTTP date is a valid header value"),
        );
        if is_sse {
            // A stream's signature is its last event: no header may claim to be one (a
            // provider's own would otherwise pass through).
            for name in ["content-digest", "signature-input", "signature"] {
                parts.headers.remove(name);
            }
            let body = SignedStream {
                inner: body,
                digest: Some(ContentDigester::new()),
                signer: Arc::clone(self),
                status: parts.status.as_u16(),
                request_id: request_id.to_owned(),
                model: model.to_owned(),
                date,
                created,
                done: false,
            };
            return Ok(Response::from_parts(parts, body.boxed()));
        }
        let collected = match crate::body::read_up_to(body, MAX_SIGNED_BODY).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(body)) => {
                self.unsigned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    limit = MAX_SIGNED_BODY,
                    "response too large to hold for signing; sent unsigned"
                );
                return Ok(Response::from_parts(parts, body));
            }
            Err(e) => return Err(GatewayError::UpstreamFailed(e)),
        };
        let digest = content_digest(&collected);
        let components = ResponseComponents {
            status: parts.status.as_u16(),
            content_digest: &digest,
            request_id,
            model,
            date: &date,
        };
        match self.ring.current.sign_response(&components, created) {
            Ok(signed) => {
                for (name, value) in signed.headers() {
                    if let Ok(value) = HeaderValue::from_str(value) {
                        parts.headers.insert(HeaderName::from_static(name), value);
                    }
                }
            }
            Err(e) => {
                self.unsigned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "response could not be signed; sent unsigned");
            }
        }
        Ok(Response::from_parts(parts, crate::body::full(collected)))
    }
}

/// A stream whose bytes are digested as they pass, with the signature event at its end.
struct SignedStream {
    inner: ResponseBody,
    /// `None` once the signature event has been sent.
    digest: Option<ContentDigester>,
    signer: Arc<ResponseSigner>,
    status: u16,
    request_id: String,
    model: String,
    date: String,
    created: i64,
    done: bool,
}

impl SignedStream {
    fn signature_event(&mut self) -> Option<Bytes> {
        let digest = self.digest.take()?.finish();
        let components = ResponseComponents {
            status: self.status,
            content_digest: &digest,
            request_id: &self.request_id,
            model: &self.model,
            date: &self.date,
        };
        match self
            .signer
            .ring
            .current
            .sign_response(&components, self.created)
        {
            Ok(signed) => Some(Bytes::from(signed.sse_event())),
            Err(e) => {
                self.signer.unsigned.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "stream could not be signed");
                None
            }
        }
    }
}

impl Body for SignedStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(digest)) = (frame.data_ref(), this.digest.as_mut()) {
                    digest.update(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(this.signature_event().map(|e| Ok(Frame::data(e))))
            }
            // A stream that broke off is not vouched for.
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
