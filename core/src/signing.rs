//! Signed responses: HTTP Message Signatures ([RFC 9421]) with Ed25519, over an [RFC 9530]
//! `Content-Digest` of the body.
//!
//! Every response Carrel sends is signed, so that a patron, a library or an auditor holding a
//! saved response can prove later that this gateway sent exactly this status, body, request id
//! and model at that time. This module is the whole contract; the gateway only adds the headers
//! it returns, and `carrel verify` (and `tests/python/verify_signature.py`, an independent
//! implementation) only check them.
//!
//! # What is signed
//!
//! The signature label is `carrel`. The covered components are, in this order:
//!
//! | component          | value in the signature base                                   |
//! |--------------------|---------------------------------------------------------------|
//! | `"@status"`        | the three-digit status code (RFC 9421 §2.2.9)                 |
//! | `"content-digest"` | `sha-256=:<base64 of SHA-256(body)>:` (RFC 9530 §2)           |
//! | `"x-request-id"`   | the response's `X-Request-Id` header                          |
//! | `"carrel-model"`   | the response's `Carrel-Model` header                          |
//! | `"date"`           | the response's `Date` header (IMF-fixdate, see [`http_date`]) |
//!
//! The signature parameters are `created` (Unix seconds), `keyid` (the key's `kid`, see
//! [`SigningKey::kid`]) and `alg="ed25519"`, in that order. A plain response carries three
//! headers:
//!
//! ```text
//! Content-Digest: sha-256=:<base64 of SHA-256(body)>:
//! Signature-Input: carrel=("@status" "content-digest" "x-request-id" "carrel-model" "date");created=1618884475;keyid="<kid>";alg="ed25519"
//! Signature: carrel=:<base64 of the 64-byte Ed25519 signature>:
//! ```
//!
//! The signature base (RFC 9421 §2.5) is one line per covered component, `"name": value`,
//! then `"@signature-params": ` followed by the Signature-Input member value (the inner list
//! with its parameters), lines joined by `\n`, no trailing newline. Header values are trimmed of
//! leading and trailing spaces and tabs, and several field lines of one name are joined with
//! `", "`. For example:
//!
//! ```text
//! "@status": 200
//! "content-digest": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:
//! "x-request-id": req-1
//! "carrel-model": llama-3.1-8b
//! "date": Tue, 20 Apr 2021 02:07:55 GMT
//! "@signature-params": ("@status" "content-digest" "x-request-id" "carrel-model" "date");created=1618884475;keyid="<kid>";alg="ed25519"
//! ```
//!
//! Component values must be visible ASCII, spaces and tabs: a line break or control character
//! could forge extra lines of the base, and non-ASCII text has no single byte form in HTTP. The
//! signer refuses such values ([`SignError::InvalidComponentValue`]) rather than clean them.
//!
//! The digest is over the body bytes exactly as sent: if the gateway compresses a response, it
//! must digest the compressed bytes (RFC 9530 digests the content after content coding).
//!
//! # Streams (server-sent events)
//!
//! A streamed body cannot be digested before it is sent. After the last upstream event the
//! gateway appends one final event (render it with [`SignatureHeaders::sse_event`]):
//!
//! ```text
//! event: carrel.signature
//! data: {"content_digest":"sha-256=:…:","signature_input":"carrel=(…);created=…;keyid=\"…\";alg=\"ed25519\"","signature":"carrel=:…:"}
//!
//! ```
//!
//! (one `data:` line, then a blank line). `content_digest` is over ALL the bytes of the body sent
//! before this event (feed them to a [`ContentDigester`] as they go out); the signature base is
//! built as above with `@status`, that digest as the `content-digest` value, and the response's
//! `X-Request-Id`, `Carrel-Model` and `Date` headers. [`verify_stream`] finds the last
//! `event: carrel.signature` event that starts a line and ends the body, digests the bytes before
//! it, and checks both.
//!
//! # Keys
//!
//! A [`SigningKey`] is an Ed25519 key pair stored as PKCS#8 (DER, or PEM
//! `-----BEGIN PRIVATE KEY-----`). Its `kid` is by default the RFC 7638 JWK thumbprint of its
//! public key (SHA-256 of `{"crv":"Ed25519","kty":"OKP","x":"…"}`, base64url without padding,
//! 43 characters), so anyone can recompute it from the published key. A [`KeyRing`] holds the
//! current key and the retired public keys; its [`KeyRing::jwks`] is what the gateway serves at
//! [`JWKS_PATH`]. Rotation keeps old public keys listed so that old responses still verify.
//!
//! # Verifying
//!
//! [`verify_response`] and [`verify_stream`] parse only what Carrel emits: the `carrel` member of
//! `Signature-Input` must cover exactly the five components above, in order, with exactly the
//! parameters `created`, `keyid` and `alg="ed25519"`; anything else is refused with a
//! [`VerifyError`] that says what is wrong. Other signature labels (a proxy's, say) are ignored.
//! The signature is checked before the digest, so a [`VerifyError::DigestMismatch`] means the
//! signed headers are intact and only the body changed. The `created` time is reported, not
//! judged: a saved response may be checked years later. A response kept for checking is a
//! [`SavedResponse`], `{"status": 200, "headers": {"name": "value", …}, "body_b64": "…"}`, the
//! format `carrel verify` and `tests/python/verify_signature.py` read.
//!
//! [RFC 9421]: https://www.rfc-editor.org/rfc/rfc9421
//! [RFC 9530]: https://www.rfc-editor.org/rfc/rfc9530

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
// AWS-LC rather than ring (used elsewhere): its Ed25519 signs in 11 µs where ring takes 28 µs
// on the benchmark machine, and every response is signed.
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The signature label: the key of Carrel's member in `Signature-Input` and `Signature`.
pub const LABEL: &str = "carrel";
/// The RFC 9421 `alg` parameter value Carrel signs with (HTTP Signature Algorithms registry).
pub const ALG: &str = "ed25519";
/// The covered components, in signing order. Changing them breaks every verifier.
pub const COVERED_COMPONENTS: [&str; 5] =
    ["@status", CONTENT_DIGEST, X_REQUEST_ID, CARREL_MODEL, DATE];
/// Header name of the RFC 9530 body digest.
pub const CONTENT_DIGEST: &str = "content-digest";
/// Header name of the RFC 9421 signature metadata.
pub const SIGNATURE_INPUT: &str = "signature-input";
/// Header name of the RFC 9421 signature value.
pub const SIGNATURE: &str = "signature";
/// Header name of the request id the gateway assigns; covered by the signature.
pub const X_REQUEST_ID: &str = "x-request-id";
/// Header name of the model that answered; covered by the signature.
pub const CARREL_MODEL: &str = "carrel-model";
/// Header name of the response date; covered by the signature. The gateway must send the very
/// value it signed (set it explicitly: hyper only adds its own `Date` when none is present).
pub const DATE: &str = "date";
/// The SSE event name of the final signature event of a stream.
pub const SSE_EVENT: &str = "carrel.signature";
/// Where the gateway serves [`KeyRing::jwks`].
pub const JWKS_PATH: &str = "/.well-known/carrel/keys";

/// The serialized inner list of covered components, as it appears in `Signature-Input`.
const COMPONENT_LIST: &str = r#"("@status" "content-digest" "x-request-id" "carrel-model" "date")"#;
/// Everything of a `Signature-Input` value before the `created` number.
const INPUT_PREFIX: &str =
    r#"carrel=("@status" "content-digest" "x-request-id" "carrel-model" "date");created="#;
/// The start of the final SSE event; it must begin a line.
const EVENT_START: &[u8] = b"event: carrel.signature\ndata: ";
/// Largest `created` accepted: the Structured Fields integer limit (15 digits).
const MAX_CREATED: i64 = 999_999_999_999_999;
/// Longest `kid` a [`SigningKey`] accepts.
const MAX_KID_LEN: usize = 128;

// ---------------------------------------------------------------------------------------------
// Content-Digest
// ---------------------------------------------------------------------------------------------

/// The RFC 9530 `Content-Digest` value of a whole body: `sha-256=:<base64 of SHA-256(body)>:`.
pub fn content_digest(body: &[u8]) -> String {
    digest_value(&Sha256::digest(body))
}

/// Renders a SHA-256 output as a `Content-Digest` dictionary with one `sha-256` member.
fn digest_value(hash: &[u8]) -> String {
    let mut out = String::with_capacity(54);
    out.push_str("sha-256=:");
    STANDARD.encode_string(hash, &mut out);
    out.push(':');
    out
}

/// An incremental [`content_digest`], for a streamed body digested chunk by chunk as it is
/// sent, so that the final `carrel.signature` event can carry the digest of everything before it.
#[derive(Clone, Default)]
pub struct ContentDigester {
    hasher: Sha256,
}

impl fmt::Debug for ContentDigester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContentDigester").finish_non_exhaustive()
    }
}

impl ContentDigester {
    /// Starts a digest of an empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes sent, in order.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
    }

    /// The `Content-Digest` value of all the bytes added, as [`content_digest`] would give.
    pub fn finish(self) -> String {
        digest_value(&self.hasher.finalize())
    }
}

// ---------------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------------

/// The values a response signature covers, named so that two `&str` cannot be swapped unseen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseComponents<'a> {
    /// The HTTP status code (100 to 999).
    pub status: u16,
    /// The `Content-Digest` value, from [`content_digest`] or [`ContentDigester::finish`].
    pub content_digest: &'a str,
    /// The `X-Request-Id` header value sent with the response.
    pub request_id: &'a str,
    /// The `Carrel-Model` header value sent with the response.
    pub model: &'a str,
    /// The `Date` header value sent with the response (see [`http_date`]).
    pub date: &'a str,
}

impl<'a> ResponseComponents<'a> {
    /// The status digits and the four header values as they go into the base: trimmed and
    /// checked to be visible ASCII, spaces or tabs.
    fn base_values(&self) -> Result<([u8; 3], [&'a str; 4]), SignError> {
        let status = status_digits(self.status).ok_or(SignError::InvalidStatus(self.status))?;
        let check = |value: &'a str, component: &'static str| {
            base_value(value).ok_or(SignError::InvalidComponentValue { component })
        };
        Ok((
            status,
            [
                check(self.content_digest, CONTENT_DIGEST)?,
                check(self.request_id, X_REQUEST_ID)?,
                check(self.model, CARREL_MODEL)?,
                check(self.date, DATE)?,
            ],
        ))
    }
}

/// What [`SigningKey::sign_response`] gives: the three header values of a signed response, which
/// are also the three fields of the final SSE event of a stream (hence the serde derive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureHeaders {
    /// The `Content-Digest` value that was signed.
    pub content_digest: String,
    /// The `Signature-Input` value: `carrel=(…);created=…;keyid="…";alg="ed25519"`.
    pub signature_input: String,
    /// The `Signature` value: `carrel=:<base64>:`.
    pub signature: String,
}

impl SignatureHeaders {
    /// The (lower-case name, value) pairs to add to a plain response.
    pub fn headers(&self) -> [(&'static str, &str); 3] {
        [
            (CONTENT_DIGEST, &self.content_digest),
            (SIGNATURE_INPUT, &self.signature_input),
            (SIGNATURE, &self.signature),
        ]
    }

    /// The final event of a signed stream, as bytes to send after the last upstream event:
    /// `event: carrel.signature\ndata: {"content_digest":…,"signature_input":…,"signature":…}\n\n`.
    pub fn sse_event(&self) -> Vec<u8> {
        let mut out = String::with_capacity(
            EVENT_START.len()
                + 64
                + self.content_digest.len()
                + self.signature_input.len() * 11 / 10
                + self.signature.len(),
        );
        out.push_str("event: ");
        out.push_str(SSE_EVENT);
        out.push_str("\ndata: {\"content_digest\":");
        push_json_string(&mut out, &self.content_digest);
        out.push_str(",\"signature_input\":");
        push_json_string(&mut out, &self.signature_input);
        out.push_str(",\"signature\":");
        push_json_string(&mut out, &self.signature);
        out.push_str("}\n\n");
        out.into_bytes()
    }
}

/// An Ed25519 signing key with its `kid`, ready to sign responses.
///
/// Not `Clone` (the key pair is not); share it behind an `Arc`. Its `Debug` shows only the
/// `kid`.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// The PKCS#8 document it was made from, kept for [`SigningKey::to_pkcs8_der`].
    pkcs8: Vec<u8>,
    kid: String,
    /// `;keyid="<kid>";alg="ed25519"`: the end of every `Signature-Input`, computed once.
    input_suffix: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a new key with the system's secure random source. Save it with
    /// [`SigningKey::to_pem`] or [`SigningKey::to_pkcs8_der`] (a PKCS#8 v2 document).
    pub fn generate() -> Result<Self, KeyError> {
        let document =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Rng)?;
        Self::from_pkcs8_der(document.as_ref())
    }

    /// Loads a key from an unencrypted PKCS#8 DER document: v2 (with the public key, which is
    /// checked against the private key, as AWS-LC and ring generate) or v1 (as `openssl genpkey -algorithm
    /// ED25519` writes). The `kid` is the RFC 7638 thumbprint ([`jwk_thumbprint`]).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        let kid = jwk_thumbprint(&public_bytes(&pair));
        Ok(Self {
            input_suffix: input_suffix(&kid),
            pair,
            pkcs8: der.to_vec(),
            kid,
        })
    }

    /// Loads a key from PEM text holding a `-----BEGIN PRIVATE KEY-----` block (PKCS#8, as
    /// [`SigningKey::from_pkcs8_der`] takes it). Encrypted keys are refused.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
        const END: &str = "-----END PRIVATE KEY-----";
        let start = pem.find(BEGIN).ok_or(KeyError::Pem(
            "no `-----BEGIN PRIVATE KEY-----` line (an encrypted or non-PKCS#8 key is not accepted)",
        ))? + BEGIN.len();
        let len = pem[start..]
            .find(END)
            .ok_or(KeyError::Pem("no `-----END PRIVATE KEY-----` line"))?;
        let b64: String = pem[start..start + len]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = STANDARD
            .decode(b64)
            .map_err(|_| KeyError::Pem("the text between the PEM lines is not base64"))?;
        Self::from_pkcs8_der(&der)
    }

    /// The PKCS#8 DER document of the key, as loaded or generated. Secret: store it like a
    /// password.
    pub fn to_pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as PEM (`-----BEGIN PRIVATE KEY-----`, base64 lines of 64). Secret.
    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.pkcs8);
        let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
        out.push_str("-----BEGIN PRIVATE KEY-----\n");
        for (i, c) in b64.chars().enumerate() {
            if i > 0 && i % 64 == 0 {
                out.push('\n');
            }
            out.push(c);
        }
        out.push('\n');
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    /// Replaces the default `kid` (the thumbprint) with one of the operator's choosing: 1 to 128
    /// of `A-Z a-z 0-9 - _ . ~`, so that it needs no escaping anywhere. A retired key keeps the
    /// `kid` it had, so choose once.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Result<Self, KeyError> {
        let kid = kid.into();
        if !valid_kid(&kid) {
            return Err(KeyError::InvalidKid(kid));
        }
        self.input_suffix = input_suffix(&kid);
        self.kid = kid;
        Ok(self)
    }

    /// The key id, sent as the `keyid` signature parameter and listed in the JWKS.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half, to keep listed in the JWKS after rotation ([`KeyRing::rotate`]).
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            bytes: public_bytes(&self.pair),
        }
    }

    /// The public key as a JWK: `{"kty":"OKP","crv":"Ed25519","x":…,"kid":…,"alg":"EdDSA","use":"sig"}`.
    pub fn public_jwk(&self) -> Jwk {
        self.public_key().to_jwk()
    }

    /// Signs a response: builds the RFC 9421 signature base over `components` with `created`
    /// (Unix seconds, 0 to 999999999999999) and this key's `kid`, signs it with Ed25519 and
    /// returns the three header values. For a stream, render the result with
    /// [`SignatureHeaders::sse_event`].
    pub fn sign_response(
        &self,
        components: &ResponseComponents<'_>,
        created: i64,
    ) -> Result<SignatureHeaders, SignError> {
        let (status, values) = components.base_values()?;
        if !(0..=MAX_CREATED).contains(&created) {
            return Err(SignError::InvalidCreated(created));
        }
        let mut signature_input =
            String::with_capacity(INPUT_PREFIX.len() + 15 + self.input_suffix.len());
        signature_input.push_str(INPUT_PREFIX);
        push_decimal(&mut signature_input, created.unsigned_abs());
        signature_input.push_str(&self.input_suffix);
        // The base's last line is the member value: everything after `carrel=`.
        let base = build_base(status, &values, &signature_input[LABEL.len() + 1..]);
        let sig = self.sign_bytes(base.as_bytes());
        let mut signature = String::with_capacity(LABEL.len() + 3 + 88);
        signature.push_str(LABEL);
        signature.push_str("=:");
        STANDARD.encode_string(sig, &mut signature);
        signature.push(':');
        Ok(SignatureHeaders {
            content_digest: values[0].to_owned(),
            signature_input,
            signature,
        })
    }

    /// The raw Ed25519 signature of `message`: for other things Carrel vouches for with the
    /// same key, such as the audit log's signed tree heads. Sign only messages with a prefix
    /// of their own, so that no signature can pass for another kind.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }
}

/// The signature base Carrel signs for `components`, `created` and `keyid` (RFC 9421 §2.5), for
/// showing what a signature covers (as `carrel verify` may) and for tests.
/// [`SigningKey::sign_response`] signs exactly this string.
pub fn signature_base(
    components: &ResponseComponents<'_>,
    created: i64,
    keyid: &str,
) -> Result<String, SignError> {
    let (status, values) = components.base_values()?;
    if !(0..=MAX_CREATED).contains(&created) {
        return Err(SignError::InvalidCreated(created));
    }
    if !keyid.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(SignError::InvalidKeyId);
    }
    let params = serialize_params(created, keyid);
    Ok(build_base(status, &values, &params))
}

/// Why a response could not be signed. These are programming errors in the gateway (a status
/// out of range, a header value with a line break), never the patron's doing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// `@status` must be a three-digit status code.
    #[error("status {0} is not a three-digit HTTP status code, so it cannot be signed")]
    InvalidStatus(u16),
    /// A value had a line break, a control character or non-ASCII text.
    #[error(
        "the {component} value contains a character other than visible ASCII, space or tab \
         (a line break, control character or non-ASCII text); it cannot go into a signature base"
    )]
    InvalidComponentValue {
        /// The component whose value was refused.
        component: &'static str,
    },
    /// `created` must be a Unix time in seconds, 0 to 999999999999999.
    #[error("created={0} is not a Unix time in seconds between 0 and 999999999999999")]
    InvalidCreated(i64),
    /// A `keyid` given to [`signature_base`] was not printable ASCII.
    #[error("the keyid contains a character other than printable ASCII")]
    InvalidKeyId,
}

// ---------------------------------------------------------------------------------------------
// Keys and key sets
// ---------------------------------------------------------------------------------------------

/// Why a key could not be made, loaded or read from a JWK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The system random source failed while generating a key.
    #[error("the system random source failed while generating a signing key")]
    Rng,
    /// The PKCS#8 document was refused.
    #[error("not an unencrypted Ed25519 PKCS#8 private key: {0}")]
    Rejected(String),
    /// The PEM text had no private key block, or its body was not base64.
    #[error("not a PEM private key: {0}")]
    Pem(&'static str),
    /// A `kid` given to [`SigningKey::with_kid`] or [`PublicKey::new`] was not acceptable.
    #[error("invalid kid {0:?}: use 1 to 128 of the characters A-Z a-z 0-9 - _ . ~")]
    InvalidKid(String),
    /// A JWK was not an Ed25519 signing key.
    #[error("not an Ed25519 signing JWK: {0}")]
    BadJwk(String),
}

/// An Ed25519 public key and its `kid`: what stays published after a key is retired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    kid: String,
    bytes: [u8; 32],
}

impl PublicKey {
    /// A public key from its 32 raw bytes and its `kid` (same rule as [`SigningKey::with_kid`]).
    pub fn new(kid: impl Into<String>, bytes: [u8; 32]) -> Result<Self, KeyError> {
        let kid = kid.into();
        if !valid_kid(&kid) {
            return Err(KeyError::InvalidKid(kid));
        }
        Ok(Self { kid, bytes })
    }

    /// Reads a JWK: `kty` must be `OKP`, `crv` `Ed25519`, `x` 32 bytes of base64url without
    /// padding, `kid` present; `alg`, if given, `EdDSA`, and `use`, if given, `sig`.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        let bad = |reason: &str| KeyError::BadJwk(format!("kid {:?}: {reason}", jwk.kid));
        if jwk.kty != "OKP" {
            return Err(bad(&format!("kty is {:?}, not \"OKP\"", jwk.kty)));
        }
        if jwk.crv != "Ed25519" {
            return Err(bad(&format!("crv is {:?}, not \"Ed25519\"", jwk.crv)));
        }
        if jwk.kid.is_empty() {
            return Err(bad("it has no kid"));
        }
        if jwk.alg.as_deref().is_some_and(|alg| alg != "EdDSA") {
            return Err(bad("alg is not \"EdDSA\""));
        }
        if jwk.key_use.as_deref().is_some_and(|u| u != "sig") {
            return Err(bad("use is not \"sig\""));
        }
        let x = URL_SAFE_NO_PAD
            .decode(&jwk.x)
            .map_err(|_| bad("x is not base64url without padding"))?;
        let bytes: [u8; 32] = x.try_into().map_err(|_| bad("x is not 32 bytes long"))?;
        Ok(Self {
            kid: jwk.kid.clone(),
            bytes,
        })
    }

    /// The key as a JWK (RFC 8037): `{"kty":"OKP","crv":"Ed25519","x":…,"kid":…,"alg":"EdDSA","use":"sig"}`.
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: URL_SAFE_NO_PAD.encode(self.bytes),
            kid: self.kid.clone(),
            alg: Some("EdDSA".to_owned()),
            key_use: Some("sig".to_owned()),
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Whether `signature` is this key's Ed25519 signature of `message`.
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.as_bytes())
            .verify(message, signature)
            .is_ok()
    }

    /// The 32 raw bytes of the key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

/// One JSON Web Key (RFC 7517, RFC 8037 for Ed25519). Parsing is lenient (missing `crv`, `x` or
/// `kid` read as empty, unknown members ignored) so that a set holding other kinds of keys still
/// parses; [`PublicKey::from_jwk`] does the checking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `OKP` for Ed25519.
    pub kty: String,
    /// Curve: `Ed25519`.
    #[serde(default)]
    pub crv: String,
    /// The public key, base64url without padding.
    #[serde(default)]
    pub x: String,
    /// The key id, matched against the `keyid` signature parameter.
    #[serde(default)]
    pub kid: String,
    /// JOSE algorithm: `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Public key use: `sig`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

/// A JSON Web Key Set, `{"keys":[…]}`: what the gateway serves at [`JWKS_PATH`] and what a
/// verifier reads back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys, current first.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The first key with this `kid`.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// The gateway's keys: the one that signs now and the retired public keys that must stay
/// published so that responses signed before a rotation still verify.
#[derive(Debug)]
pub struct KeyRing {
    /// The key that signs new responses.
    pub current: SigningKey,
    /// Public keys of former signing keys, newest first.
    pub retired: Vec<PublicKey>,
}

impl KeyRing {
    /// A ring with one key and nothing retired.
    pub fn new(current: SigningKey) -> Self {
        Self {
            current,
            retired: Vec::new(),
        }
    }

    /// Makes `next` the signing key and keeps the former one's public key listed (newest
    /// first). A retired key with the same `kid` as `next` is dropped, so no `kid` is listed twice.
    pub fn rotate(&mut self, next: SigningKey) {
        let old = std::mem::replace(&mut self.current, next).public_key();
        self.retired
            .retain(|k| k.kid != old.kid && k.kid != self.current.kid);
        if old.kid != self.current.kid {
            self.retired.insert(0, old);
        }
    }

    /// The key set to publish: the current key, then every retired key whose `kid` differs from
    /// those before it.
    pub fn jwks(&self) -> Jwks {
        let mut keys = Vec::with_capacity(1 + self.retired.len());
        keys.push(self.current.public_jwk());
        for key in &self.retired {
            if !keys.iter().any(|k: &Jwk| k.kid == key.kid) {
                keys.push(key.to_jwk());
            }
        }
        Jwks { keys }
    }
}

/// The RFC 7638 JWK thumbprint of an Ed25519 public key: base64url (no padding) of the SHA-256
/// of `{"crv":"Ed25519","kty":"OKP","x":"<base64url of the key>"}`. The default `kid`.
pub fn jwk_thumbprint(public_key: &[u8; 32]) -> String {
    let mut canonical = String::with_capacity(80);
    canonical.push_str(r#"{"crv":"Ed25519","kty":"OKP","x":""#);
    URL_SAFE_NO_PAD.encode_string(public_key, &mut canonical);
    canonical.push_str(r#""}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Verifying
// ---------------------------------------------------------------------------------------------

/// What a successful verification tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The `kid` of the key that signed.
    pub kid: String,
    /// When it was signed (the `created` parameter, Unix seconds), as the signer claimed.
    pub created: i64,
}

/// Why a response did not verify. Each message says what is wrong and what to look at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header the check needs is absent.
    #[error(
        "the response has no {name} header, so it cannot be checked (was it removed by a proxy, \
         or saved without its headers?)"
    )]
    MissingHeader {
        /// The missing header (lower case).
        name: &'static str,
    },
    /// A header or field does not have the form Carrel emits.
    #[error("the {field} is malformed: {reason}")]
    Malformed {
        /// Which header or field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `Signature-Input` or `Signature` has members, but none labelled `carrel`.
    #[error(
        "the {field} has no `carrel` member (it has: {labels}); this response was not signed by Carrel"
    )]
    NoCarrelSignature {
        /// Which header or field.
        field: &'static str,
        /// The labels it does have.
        labels: String,
    },
    /// The signature covers other components than Carrel's five.
    #[error(
        "the carrel signature covers {found}, not Carrel's (\"@status\" \"content-digest\" \
         \"x-request-id\" \"carrel-model\" \"date\"), so it is not accepted"
    )]
    UnexpectedComponents {
        /// The covered components found, as listed.
        found: String,
    },
    /// The `alg` parameter is not `ed25519`.
    #[error("the carrel signature says alg={alg:?}; Carrel signs only with \"ed25519\"")]
    UnsupportedAlgorithm {
        /// The algorithm named.
        alg: String,
    },
    /// No key in the JWKS has the signature's `keyid`.
    #[error(
        "no key with kid {kid:?} in the key set; fetch the key set of the gateway that sent the \
         response (/.well-known/carrel/keys); a key removed from it can no longer be checked"
    )]
    UnknownKeyId {
        /// The `keyid` of the signature.
        kid: String,
    },
    /// The JWKS entry for the `keyid` is not an Ed25519 key.
    #[error("the key set entry for kid {kid:?} is unusable: {reason}")]
    BadJwk {
        /// The `keyid` of the signature.
        kid: String,
        /// What is wrong with the entry.
        reason: String,
    },
    /// A covered value has a line break, control character or non-ASCII text.
    #[error(
        "the {name} value contains a character other than visible ASCII, space or tab; \
         Carrel never signs such a value, so the response was altered"
    )]
    InvalidComponentValue {
        /// The component (lower case).
        name: &'static str,
    },
    /// The status is outside 100 to 999.
    #[error("status {0} is not a three-digit HTTP status code")]
    InvalidStatus(u16),
    /// The Ed25519 signature does not match the signature base.
    #[error(
        "the signature does not match (kid {kid:?}): the status, Content-Digest, X-Request-Id, \
         Carrel-Model or Date differs from what was signed, or another key was used under this kid"
    )]
    BadSignature {
        /// The `keyid` of the signature.
        kid: String,
    },
    /// The body does not hash to the signed digest.
    #[error(
        "the body does not match the signed digest: signed {signed}, but the body gives {computed}; \
         the body was changed after signing (or saved decoded, e.g. decompressed)"
    )]
    DigestMismatch {
        /// The signed `Content-Digest` value.
        signed: String,
        /// The digest of the body at hand.
        computed: String,
    },
    /// The `Content-Digest` has no `sha-256` member.
    #[error(
        "the Content-Digest has no sha-256 member (it has: {found}); Carrel digests with sha-256"
    )]
    UnsupportedDigest {
        /// The members it does have.
        found: String,
    },
    /// A stream body does not end with a `carrel.signature` event.
    #[error("the stream does not end with an `event: carrel.signature` event: {reason}")]
    MissingSignatureEvent {
        /// What was found instead.
        reason: &'static str,
    },
    /// A saved response (see [`SavedResponse`]) could not be read.
    #[error("the saved response is unusable: {reason}")]
    BadSavedResponse {
        /// What is wrong with it.
        reason: String,
    },
}

/// Checks a plain (non-streamed) response: the `carrel` signature in `Signature-Input` and
/// `Signature` against the key of its `keyid` in `jwks`, over `status` and the headers, then the
/// `Content-Digest` against `body`. Header names match case-insensitively; several lines of one
/// name are joined with `", "`.
pub fn verify_response(
    jwks: &Jwks,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Verified, VerifyError> {
    let digest = required_header(headers, CONTENT_DIGEST)?;
    let input = required_header(headers, SIGNATURE_INPUT)?;
    let signature = required_header(headers, SIGNATURE)?;
    let verified = verify_signature(jwks, status, &digest, &input, &signature, headers)?;
    check_digest(&digest, body)?;
    Ok(verified)
}

/// Checks a streamed (SSE) response whose `body` is everything received, the final
/// `event: carrel.signature` event included: splits that event off, checks its signature over
/// `status`, its `content_digest` and the `X-Request-Id`, `Carrel-Model` and `Date` headers, then
/// that digest against the bytes before the event.
pub fn verify_stream(
    jwks: &Jwks,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Verified, VerifyError> {
    let (content, event) = split_signature_event(body)?;
    let verified = verify_signature(
        jwks,
        status,
        &event.content_digest,
        &event.signature_input,
        &event.signature,
        headers,
    )?;
    check_digest(&event.content_digest, content)?;
    Ok(verified)
}

/// Splits a stream body into the bytes before its final `carrel.signature` event and that
/// event's fields.
fn split_signature_event(body: &[u8]) -> Result<(&[u8], SignatureHeaders), VerifyError> {
    if !body.ends_with(b"\n\n") {
        return Err(VerifyError::MissingSignatureEvent {
            reason: "the body does not end with a blank line (was the stream cut off?)",
        });
    }
    let start = body
        .windows(EVENT_START.len())
        .enumerate()
        .rev()
        .find(|&(i, w)| w == EVENT_START && (i == 0 || matches!(body[i - 1], b'\n' | b'\r')))
        .map(|(i, _)| i)
        .ok_or(VerifyError::MissingSignatureEvent {
            reason: "no line `event: carrel.signature` followed by a `data:` line",
        })?;
    let data = &body[start + EVENT_START.len()..body.len() - 2];
    if data.contains(&b'\n') || data.contains(&b'\r') {
        return Err(VerifyError::MissingSignatureEvent {
            reason: "the carrel.signature event is not the last one, or has more than one data line",
        });
    }
    let event =
        serde_json::from_slice::<SignatureHeaders>(data).map_err(|e| VerifyError::Malformed {
            field: "carrel.signature event data",
            reason: format!("not the expected JSON object: {e}"),
        })?;
    Ok((&body[..start], event))
}

/// Checks the `carrel` signature; the digest itself is checked by the caller.
fn verify_signature(
    jwks: &Jwks,
    status: u16,
    content_digest: &str,
    signature_input: &str,
    signature: &str,
    headers: &[(&str, &str)],
) -> Result<Verified, VerifyError> {
    let input_member = carrel_member(signature_input, "Signature-Input")?;
    let params = parse_signature_input(input_member)?;
    let sig_member = carrel_member(signature, "Signature")?;
    let sig = parse_byte_sequence(sig_member).map_err(|reason| VerifyError::Malformed {
        field: "Signature",
        reason: reason.to_owned(),
    })?;
    if sig.len() != 64 {
        return Err(VerifyError::Malformed {
            field: "Signature",
            reason: format!(
                "an Ed25519 signature is 64 bytes, this one is {}",
                sig.len()
            ),
        });
    }

    let jwk = jwks
        .find(&params.keyid)
        .ok_or_else(|| VerifyError::UnknownKeyId {
            kid: params.keyid.clone(),
        })?;
    let key = PublicKey::from_jwk(jwk).map_err(|e| VerifyError::BadJwk {
        kid: params.keyid.clone(),
        reason: e.to_string(),
    })?;

    let status_digits = status_digits(status).ok_or(VerifyError::InvalidStatus(status))?;
    let request_id = required_header(headers, X_REQUEST_ID)?;
    let model = required_header(headers, CARREL_MODEL)?;
    let date = required_header(headers, DATE)?;
    fn check<'a>(value: &'a str, name: &'static str) -> Result<&'a str, VerifyError> {
        base_value(value).ok_or(VerifyError::InvalidComponentValue { name })
    }
    let values = [
        check(content_digest, CONTENT_DIGEST)?,
        check(&request_id, X_REQUEST_ID)?,
        check(&model, CARREL_MODEL)?,
        check(&date, DATE)?,
    ];
    let base = build_base(status_digits, &values, &params.serialized);
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(base.as_bytes(), &sig)
        .map_err(|_| VerifyError::BadSignature {
            kid: params.keyid.clone(),
        })?;
    Ok(Verified {
        kid: params.keyid,
        created: params.created,
    })
}

/// Checks a `Content-Digest` value's `sha-256` member against `body`.
fn check_digest(content_digest: &str, body: &[u8]) -> Result<(), VerifyError> {
    let malformed = |reason: String| VerifyError::Malformed {
        field: "Content-Digest",
        reason,
    };
    let members = dictionary_members(content_digest).map_err(|r| malformed(r.to_owned()))?;
    let value = members
        .iter()
        .find(|(k, _)| *k == "sha-256")
        .map(|(_, v)| *v)
        .ok_or_else(|| VerifyError::UnsupportedDigest {
            found: member_keys(&members),
        })?;
    let signed = parse_byte_sequence(value).map_err(|r| malformed(r.to_owned()))?;
    let computed = Sha256::digest(body);
    if signed.as_slice() != computed.as_slice() {
        return Err(VerifyError::DigestMismatch {
            signed: content_digest.trim_matches(is_ows).to_owned(),
            computed: digest_value(&computed),
        });
    }
    Ok(())
}

/// The `Signature-Input` member, parsed.
struct SignatureParams {
    created: i64,
    keyid: String,
    /// The member value re-serialized (RFC 8941 §4.1): the `@signature-params` line's value.
    serialized: String,
}

/// Parses the value of the `carrel` member of `Signature-Input`: exactly Carrel's inner list of
/// components and the parameters `created`, `keyid`, `alg` (each once, any order).
fn parse_signature_input(value: &str) -> Result<SignatureParams, VerifyError> {
    let malformed = |reason: String| VerifyError::Malformed {
        field: "Signature-Input",
        reason,
    };
    let mut p = Parser::new(value);
    if !p.eat(b'(') {
        return Err(malformed(
            "the carrel member is not an inner list `(\"@status\" …)`".to_owned(),
        ));
    }
    let mut components: Vec<String> = Vec::with_capacity(5);
    loop {
        p.skip_spaces();
        if p.eat(b')') {
            break;
        }
        if !components.is_empty() && !p.after_space() {
            return Err(malformed(
                "components must be separated by spaces".to_owned(),
            ));
        }
        let name = p.string().map_err(|r| malformed(r.to_owned()))?;
        if p.peek() == Some(b';') {
            return Err(malformed(format!(
                "component \"{name}\" has parameters, which Carrel never uses"
            )));
        }
        components.push(name);
    }
    if components.len() != COVERED_COMPONENTS.len()
        || components
            .iter()
            .zip(COVERED_COMPONENTS)
            .any(|(a, b)| a != b)
    {
        let found = components
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(VerifyError::UnexpectedComponents {
            found: format!("({found})"),
        });
    }

    let mut serialized = String::with_capacity(value.len());
    serialized.push_str(COMPONENT_LIST);
    let (mut created, mut keyid, mut alg) = (None, None, None);
    while p.eat(b';') {
        p.skip_spaces();
        let key = p.key().map_err(|r| malformed(r.to_owned()))?;
        if !p.eat(b'=') {
            return Err(malformed(format!("parameter `{key}` has no value")));
        }
        serialized.push(';');
        serialized.push_str(key);
        serialized.push('=');
        let duplicate = match key {
            "created" => {
                let n = p.integer().map_err(|r| malformed(r.to_owned()))?;
                push_decimal(&mut serialized, n.unsigned_abs());
                created.replace(n).is_some()
            }
            "keyid" => {
                let s = p.string().map_err(|r| malformed(r.to_owned()))?;
                push_sf_string(&mut serialized, &s);
                keyid.replace(s).is_some()
            }
            "alg" => {
                let s = p.string().map_err(|r| malformed(r.to_owned()))?;
                push_sf_string(&mut serialized, &s);
                alg.replace(s).is_some()
            }
            other => {
                return Err(malformed(format!(
                    "unknown parameter `{other}`; Carrel signatures carry only created, keyid and alg"
                )));
            }
        };
        if duplicate {
            return Err(malformed(format!("parameter `{key}` appears twice")));
        }
    }
    if !p.at_end() {
        return Err(malformed(format!(
            "unexpected text {:?} after the parameters",
            p.rest()
        )));
    }
    let missing = |name: &str| malformed(format!("the `{name}` parameter is missing"));
    let created = created.ok_or_else(|| missing("created"))?;
    let keyid = keyid.ok_or_else(|| missing("keyid"))?;
    let alg = alg.ok_or_else(|| missing("alg"))?;
    if alg != ALG {
        return Err(VerifyError::UnsupportedAlgorithm { alg });
    }
    Ok(SignatureParams {
        created,
        keyid,
        serialized,
    })
}

/// The value of the one `carrel` member of a `Signature-Input` or `Signature` dictionary.
fn carrel_member<'v>(value: &'v str, field: &'static str) -> Result<&'v str, VerifyError> {
    let members = dictionary_members(value).map_err(|reason| VerifyError::Malformed {
        field,
        reason: reason.to_owned(),
    })?;
    let mut found = members.iter().filter(|(k, _)| *k == LABEL);
    match (found.next(), found.next()) {
        (Some((_, v)), None) => Ok(*v),
        (Some(_), Some(_)) => Err(VerifyError::Malformed {
            field,
            reason: "it has more than one `carrel` member".to_owned(),
        }),
        (None, _) => Err(VerifyError::NoCarrelSignature {
            field,
            labels: member_keys(&members),
        }),
    }
}

/// Splits a Structured Fields dictionary (RFC 8941 §3.2) into (key, raw member value) pairs,
/// without parsing the values beyond finding where each ends. A member without `=` (a boolean)
/// gets its parameters, if any, as its raw value.
fn dictionary_members(value: &str) -> Result<Vec<(&str, &str)>, &'static str> {
    let mut members = Vec::new();
    let mut p = Parser::new(value.trim_matches(is_ows));
    if p.at_end() {
        return Err("it is empty");
    }
    loop {
        let key = p.key()?;
        let has_value = p.eat(b'=');
        let start = p.pos;
        p.skip_member_value()?;
        let raw = p.src[start..p.pos].trim_end_matches(is_ows);
        if !has_value && !raw.is_empty() && !raw.starts_with(';') {
            return Err("a member key is followed by something other than `=`");
        }
        members.push((key, raw));
        p.skip_ows();
        if p.at_end() {
            return Ok(members);
        }
        if !p.eat(b',') {
            return Err("members must be separated by commas");
        }
        p.skip_ows();
        if p.at_end() {
            return Err("it ends with a comma");
        }
    }
}

/// The keys of dictionary members, for error messages.
fn member_keys(members: &[(&str, &str)]) -> String {
    if members.is_empty() {
        return "nothing".to_owned();
    }
    members
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decodes a Structured Fields byte sequence `:<base64>:` with no parameters.
fn parse_byte_sequence(value: &str) -> Result<Vec<u8>, &'static str> {
    let inner = value
        .strip_prefix(':')
        .and_then(|v| v.strip_suffix(':'))
        .ok_or("the value is not a byte sequence `:<base64>:` (or has parameters)")?;
    STANDARD
        .decode(inner)
        .map_err(|_| "the byte sequence is not valid base64")
}

/// A cursor over a header value, for the Structured Fields subset Carrel reads.
struct Parser<'s> {
    src: &'s str,
    pos: usize,
}

impl<'s> Parser<'s> {
    fn new(src: &'s str) -> Self {
        Self { src, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.src.len()
    }

    fn rest(&self) -> &'s str {
        &self.src[self.pos..]
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Whether the byte just before the cursor is a space (the separator of inner list items).
    fn after_space(&self) -> bool {
        self.pos > 0 && self.src.as_bytes()[self.pos - 1] == b' '
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// A key: `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
    fn key(&mut self) -> Result<&'s str, &'static str> {
        let start = self.pos;
        match self.peek() {
            Some(b'a'..=b'z' | b'*') => self.pos += 1,
            _ => return Err("a key must start with a lower-case letter or `*`"),
        }
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')
        ) {
            self.pos += 1;
        }
        Ok(&self.src[start..self.pos])
    }

    /// A string `"…"` with `\"` and `\\` escapes, printable ASCII only.
    fn string(&mut self) -> Result<String, &'static str> {
        if !self.eat(b'"') {
            return Err("expected a quoted string");
        }
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err("a quoted string is not closed"),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(char::from(c));
                            self.pos += 1;
                        }
                        _ => {
                            return Err(
                                "a quoted string has a backslash before something other than `\"` or `\\`",
                            );
                        }
                    }
                }
                Some(c @ 0x20..=0x7e) => {
                    out.push(char::from(c));
                    self.pos += 1;
                }
                Some(_) => {
                    return Err("a quoted string has a character other than printable ASCII");
                }
            }
        }
    }

    /// A non-negative integer of 1 to 15 digits (`created`).
    fn integer(&mut self) -> Result<i64, &'static str> {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        let digits = &self.src[start..self.pos];
        if digits.is_empty() || digits.len() > 15 {
            return Err("`created` must be a non-negative integer of 1 to 15 digits");
        }
        digits
            .parse()
            .map_err(|_| "`created` must be a non-negative integer of 1 to 15 digits")
    }

    /// Moves past one dictionary member value: everything up to a comma outside quotes and
    /// parentheses.
    fn skip_member_value(&mut self) -> Result<(), &'static str> {
        let bytes = self.src.as_bytes();
        let mut in_string = false;
        let mut depth = 0usize;
        while let Some(&c) = bytes.get(self.pos) {
            if in_string {
                match c {
                    b'\\' => self.pos += 1,
                    b'"' => in_string = false,
                    _ => {}
                }
            } else {
                match c {
                    b'"' => in_string = true,
                    b'(' => depth += 1,
                    b')' => depth = depth.checked_sub(1).ok_or("a `)` has no matching `(`")?,
                    b',' if depth == 0 => break,
                    _ => {}
                }
            }
            self.pos += 1;
        }
        if in_string {
            return Err("a quoted string is not closed");
        }
        if depth != 0 {
            return Err("a `(` is not closed");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Saved responses
// ---------------------------------------------------------------------------------------------

/// A response saved for later checking, as `carrel verify` and `tests/python/verify_signature.py`
/// read it: `{"status": 200, "headers": {"name": "value", …}, "body_b64": "…"}`. A header sent on
/// several lines is saved as one value joined with `", "`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers; names in any case.
    pub headers: BTreeMap<String, String>,
    /// The body as received (for a stream: all events, the signature event included), in
    /// standard base64 with padding.
    pub body_b64: String,
}

impl SavedResponse {
    /// Records a response.
    pub fn new<'h>(
        status: u16,
        headers: impl IntoIterator<Item = (&'h str, &'h str)>,
        body: &[u8],
    ) -> Self {
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            map.entry(name.to_ascii_lowercase())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(value);
                })
                .or_insert_with(|| value.to_owned());
        }
        Self {
            status,
            headers: map,
            body_b64: STANDARD.encode(body),
        }
    }

    /// The decoded body.
    pub fn body(&self) -> Result<Vec<u8>, VerifyError> {
        STANDARD
            .decode(&self.body_b64)
            .map_err(|e| VerifyError::BadSavedResponse {
                reason: format!("body_b64 is not standard base64: {e}"),
            })
    }

    /// Whether the response is a server-sent event stream (`Content-Type: text/event-stream`),
    /// to choose between [`SavedResponse::verify`] and [`SavedResponse::verify_stream`].
    pub fn is_event_stream(&self) -> bool {
        self.headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("content-type")
                && v.trim_start()
                    .get(..17)
                    .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"))
        })
    }

    /// [`verify_response`] on the saved response.
    pub fn verify(&self, jwks: &Jwks) -> Result<Verified, VerifyError> {
        let body = self.body()?;
        verify_response(jwks, self.status, &self.header_pairs(), &body)
    }

    /// [`verify_stream`] on the saved response.
    pub fn verify_stream(&self, jwks: &Jwks) -> Result<Verified, VerifyError> {
        let body = self.body()?;
        verify_stream(jwks, self.status, &self.header_pairs(), &body)
    }

    fn header_pairs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------------------------

/// An HTTP `Date` value (IMF-fixdate, RFC 9110 §5.6.7) for a Unix time in seconds, e.g.
/// `Tue, 20 Apr 2021 02:07:55 GMT`: sign and send the same string, from the same clock reading
/// as `created`.
pub fn http_date(unix_seconds: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's days_from_civil, inverted).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Builds the signature base from the status digits, the four header values (content-digest,
/// x-request-id, carrel-model, date; already trimmed and checked) and the serialized inner list
/// with parameters.
fn build_base(status: [u8; 3], values: &[&str; 4], params: &str) -> String {
    const STATUS: &str = "\"@status\": ";
    const NAMES: [&str; 4] = [
        "\n\"content-digest\": ",
        "\n\"x-request-id\": ",
        "\n\"carrel-model\": ",
        "\n\"date\": ",
    ];
    const PARAMS: &str = "\n\"@signature-params\": ";
    let len = STATUS.len()
        + 3
        + NAMES.iter().map(|n| n.len()).sum::<usize>()
        + values.iter().map(|v| v.len()).sum::<usize>()
        + PARAMS.len()
        + params.len();
    let mut base = String::with_capacity(len);
    base.push_str(STATUS);
    for digit in status {
        base.push(char::from(digit));
    }
    for (name, value) in NAMES.iter().zip(values) {
        base.push_str(name);
        base.push_str(value);
    }
    base.push_str(PARAMS);
    base.push_str(params);
    base
}

/// The three ASCII digits of a status code, if it has three.
fn status_digits(status: u16) -> Option<[u8; 3]> {
    if !(100..=999).contains(&status) {
        return None;
    }
    // Each quotient is below 10, so the casts cannot truncate.
    Some([
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ])
}

/// A header value as it goes into a signature base: trimmed of spaces and tabs, and only if the
/// rest is visible ASCII, spaces and tabs.
fn base_value(value: &str) -> Option<&str> {
    let trimmed = value.trim_matches(is_ows);
    trimmed
        .bytes()
        .all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
        .then_some(trimmed)
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A header's value from `(name, value)` pairs: names compared case-insensitively, each value
/// trimmed, several joined with `", "` (RFC 9421 §2.1).
fn header_value<'h>(headers: &[(&str, &'h str)], name: &str) -> Option<Cow<'h, str>> {
    let mut values = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim_matches(is_ows));
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = format!("{first}, {second}");
            for v in values {
                joined.push_str(", ");
                joined.push_str(v);
            }
            Some(Cow::Owned(joined))
        }
    }
}

fn required_header<'h>(
    headers: &[(&str, &'h str)],
    name: &'static str,
) -> Result<Cow<'h, str>, VerifyError> {
    header_value(headers, name).ok_or(VerifyError::MissingHeader { name })
}

/// `("@status" …);created=N;keyid="…";alg="ed25519"` for [`signature_base`].
fn serialize_params(created: i64, keyid: &str) -> String {
    let mut out = String::with_capacity(COMPONENT_LIST.len() + 64 + keyid.len());
    out.push_str(COMPONENT_LIST);
    out.push_str(";created=");
    push_decimal(&mut out, created.unsigned_abs());
    out.push_str(";keyid=");
    push_sf_string(&mut out, keyid);
    out.push_str(";alg=");
    push_sf_string(&mut out, ALG);
    out
}

/// `;keyid="<kid>";alg="ed25519"`, precomputed per key.
fn input_suffix(kid: &str) -> String {
    let mut out = String::with_capacity(kid.len() + 32);
    out.push_str(";keyid=");
    push_sf_string(&mut out, kid);
    out.push_str(";alg=");
    push_sf_string(&mut out, ALG);
    out
}

/// Appends a Structured Fields string: quoted, `"` and `\` escaped.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Appends a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let b = u32::from(c) as usize;
                out.push_str("\\u00");
                out.push(char::from(HEX[b >> 4]));
                out.push(char::from(HEX[b & 15]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Appends a non-negative integer in decimal without allocating.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // n % 10 is below 10, so the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

fn public_bytes(pair: &Ed25519KeyPair) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(pair.public_key().as_ref());
    out
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

#[cfg(test)]
mod tests {
    use super::*;
    // Signatures made with AWS-LC are checked here with ring, an implementation of its own.

    /// RFC 9421 Appendix B.1.4, `test-key-ed25519` (a PKCS#8 v1 document).
    const RFC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n\
        -----END PRIVATE KEY-----\n";
    /// Its public key, SubjectPublicKeyInfo DER in base64 (the last 32 bytes are the key).
    const RFC_PUBLIC_SPKI: &str = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";

    const DATE_VALUE: &str = "Tue, 20 Apr 2021 02:07:55 GMT";
    const CREATED: i64 = 1_618_884_475;

    fn key() -> SigningKey {
        SigningKey::generate().expect("generate")
    }

    fn components<'a>(digest: &'a str) -> ResponseComponents<'a> {
        ResponseComponents {
            status: 200,
            content_digest: digest,
            request_id: "req-7f3a",
            model: "llama-3.1-8b",
            date: DATE_VALUE,
        }
    }

    /// The headers of a signed plain response, as owned pairs.
    fn signed_plain(key: &SigningKey, body: &[u8]) -> Vec<(String, String)> {
        let digest = content_digest(body);
        let signed = key
            .sign_response(&components(&digest), CREATED)
            .expect("sign");
        let mut headers: Vec<(String, String)> = vec![
            ("content-type".into(), "application/json".into()),
            ("x-request-id".into(), "req-7f3a".into()),
            ("carrel-model".into(), "llama-3.1-8b".into()),
            ("date".into(), DATE_VALUE.into()),
        ];
        for (name, value) in signed.headers() {
            headers.push((name.to_owned(), value.to_owned()));
        }
        headers
    }

    fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
        headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    fn set(headers: &mut [(String, String)], name: &str, value: &str) {
        for (n, v) in headers.iter_mut() {
            if n.eq_ignore_ascii_case(name) {
                *v = value.to_owned();
            }
        }
    }

    fn jwks_of(key: &SigningKey) -> Jwks {
        KeyRing::new(SigningKey::from_pkcs8_der(key.to_pkcs8_der()).expect("reload")).jwks()
    }

    // (a) RFC vectors ------------------------------------------------------------------------

    #[test]
    fn rfc9421_b26_ed25519_signature_is_reproduced() {
        // RFC 9421 Appendix B.2.6: signature base (RFC 8792 line wrapping undone) and signature.
        let base = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\
                    \"@method\": POST\n\
                    \"@path\": /foo\n\
                    \"@authority\": example.com\n\
                    \"content-type\": application/json\n\
                    \"content-length\": 18\n\
                    \"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" \
                    \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\"";
        let expected = "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==";

        let key = SigningKey::from_pem(RFC_PRIVATE_PEM).expect("RFC key loads (PKCS#8 v1)");
        let spki = STANDARD.decode(RFC_PUBLIC_SPKI).expect("spki");
        assert_eq!(key.public_key().as_bytes()[..], spki[spki.len() - 32..]);

        let sig = key.sign_bytes(base.as_bytes());
        assert_eq!(STANDARD.encode(sig), expected);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            key.public_key().as_bytes(),
        )
        .verify(base.as_bytes(), &sig)
        .expect("verifies");
    }

    #[test]
    fn default_kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 Appendix A.1 key (d, x) and its RFC 7638 thumbprint from Appendix A.3.
        let seed = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .expect("d");
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let key = SigningKey::from_pkcs8_der(&der).expect("v1 key");
        let jwk = key.public_jwk();
        assert_eq!(jwk.x, "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(jwk.kid, key.kid());
    }

    // (d) digests and dates -------------------------------------------------------------------

    #[test]
    fn content_digest_matches_independent_values() {
        // Computed with Python: base64.b64encode(hashlib.sha256(b).digest()).
        assert_eq!(
            content_digest(b""),
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
        );
        assert_eq!(
            content_digest(b"hello"),
            "sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:"
        );
        // Also the example of RFC 9530 §2.
        assert_eq!(
            content_digest(b"{\"hello\": \"world\"}"),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
    }

    #[test]
    fn content_digester_equals_one_shot() {
        let mut d = ContentDigester::new();
        d.update(b"hel");
        d.update(b"");
        d.update(b"lo");
        assert_eq!(d.finish(), content_digest(b"hello"));
        assert_eq!(ContentDigester::new().finish(), content_digest(b""));
    }

    #[test]
    fn http_date_matches_independent_values() {
        // Computed with Python: email.utils.formatdate(t, usegmt=True).
        for (t, expected) in [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (1_618_884_475, "Tue, 20 Apr 2021 02:07:55 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 GMT"),
            (4_102_444_799, "Thu, 31 Dec 2099 23:59:59 GMT"),
        ] {
            assert_eq!(http_date(t), expected, "{t}");
        }
    }

    // Formats --------------------------------------------------------------------------------

    #[test]
    fn signature_base_is_exactly_rfc9421_text() {
        let digest = content_digest(b"{\"hello\": \"world\"}");
        let base = signature_base(&components(&digest), CREATED, "k1").expect("base");
        assert_eq!(
            base,
            "\"@status\": 200\n\
             \"content-digest\": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n\
             \"x-request-id\": req-7f3a\n\
             \"carrel-model\": llama-3.1-8b\n\
             \"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\
             \"@signature-params\": (\"@status\" \"content-digest\" \"x-request-id\" \
             \"carrel-model\" \"date\");created=1618884475;keyid=\"k1\";alg=\"ed25519\""
        );
    }

    #[test]
    fn sign_response_signs_signature_base_and_emits_contract_headers() {
        let key = key().with_kid("k1").expect("kid");
        let digest = content_digest(b"{}");
        let c = components(&digest);
        let signed = key.sign_response(&c, CREATED).expect("sign");
        assert_eq!(signed.content_digest, digest);
        assert_eq!(
            signed.signature_input,
            "carrel=(\"@status\" \"content-digest\" \"x-request-id\" \"carrel-model\" \"date\");\
             created=1618884475;keyid=\"k1\";alg=\"ed25519\""
        );
        assert!(signed.signature.starts_with("carrel=:") && signed.signature.ends_with(':'));
        let sig = STANDARD
            .decode(&signed.signature["carrel=:".len()..signed.signature.len() - 1])
            .expect("b64");
        let base = signature_base(&c, CREATED, "k1").expect("base");
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            key.public_key().as_bytes(),
        )
        .verify(base.as_bytes(), &sig)
        .expect("the signature is over signature_base()");
        let names: Vec<&str> = signed.headers().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["content-digest", "signature-input", "signature"]);
    }

    #[test]
    fn sign_trims_values_and_refuses_unsafe_ones() {
        let key = key();
        let digest = content_digest(b"x");
        let mut c = components(&digest);
        c.model = "  llama-3.1-8b\t";
        let trimmed = key.sign_response(&c, CREATED).expect("trimmed");
        assert_eq!(
            trimmed,
            key.sign_response(&components(&digest), CREATED)
                .expect("plain")
        );

        for model in ["a\r\nx-evil: 1", "a\nb", "modèle", "a\0b"] {
            c.model = model;
            assert_eq!(
                key.sign_response(&c, CREATED),
                Err(SignError::InvalidComponentValue {
                    component: CARREL_MODEL
                }),
                "{model:?}"
            );
        }
        let mut c = components(&digest);
        for status in [0, 99, 1000] {
            c.status = status;
            assert_eq!(
                key.sign_response(&c, CREATED),
                Err(SignError::InvalidStatus(status))
            );
        }
        assert_eq!(
            key.sign_response(&components(&digest), -1),
            Err(SignError::InvalidCreated(-1))
        );
    }

    // (b) round trips -------------------------------------------------------------------------

    #[test]
    fn plain_round_trip() {
        let key = key();
        let body = b"{\"choices\":[{\"text\":\"hi\"}]}";
        let headers = signed_plain(&key, body);
        let v = verify_response(&jwks_of(&key), 200, &pairs(&headers), body).expect("verifies");
        assert_eq!(
            v,
            Verified {
                kid: key.kid().to_owned(),
                created: CREATED
            }
        );
    }

    #[test]
    fn verify_tolerates_case_whitespace_and_other_labels() {
        let key = key();
        let body = b"ok";
        let mut headers = signed_plain(&key, body);
        for (name, value) in headers.iter_mut() {
            *name = name.to_ascii_uppercase();
            *value = format!("  {value}\t");
        }
        // A proxy's signature beside Carrel's, on another line of the same headers.
        headers.push((
            "Signature-Input".into(),
            "proxy=(\"@status\" \"x,y\");created=1;keyid=\"p\"".into(),
        ));
        headers.push(("Signature".into(), "proxy=:AAAA:".into()));
        verify_response(&jwks_of(&key), 200, &pairs(&headers), body).expect("verifies");
    }

    #[test]
    fn multi_line_headers_are_joined_as_signed() {
        let key = key();
        let digest = content_digest(b"");
        let mut c = components(&digest);
        c.request_id = "a, b";
        let signed = key.sign_response(&c, CREATED).expect("sign");
        let mut headers = vec![
            ("x-request-id", "a"),
            ("carrel-model", c.model),
            ("date", c.date),
            ("x-request-id", " b "),
        ];
        headers.extend(signed.headers());
        verify_response(&jwks_of(&key), 200, &headers, b"").expect("joined with \", \"");
    }

    fn signed_stream(key: &SigningKey) -> (Vec<(String, String)>, Vec<u8>) {
        let chunks: [&[u8]; 4] = [
            // An upstream event of the same name is just content: only the last one counts.
            b"event: carrel.signature\ndata: {}\n\n",
            b"data: {\"delta\":\"Hel\"}\n\n",
            b"data: {\"delta\":\"lo\"}\n\n",
            b"data: [DONE]\n\n",
        ];
        let mut digester = ContentDigester::new();
        let mut body = Vec::new();
        for chunk in chunks {
            digester.update(chunk);
            body.extend_from_slice(chunk);
        }
        let digest = digester.finish();
        let signed = key
            .sign_response(&components(&digest), CREATED)
            .expect("sign");
        body.extend_from_slice(&signed.sse_event());
        let headers = vec![
            ("content-type".into(), "text/event-stream".into()),
            ("x-request-id".into(), "req-7f3a".into()),
            ("carrel-model".into(), "llama-3.1-8b".into()),
            ("date".into(), DATE_VALUE.into()),
        ];
        (headers, body)
    }

    #[test]
    fn stream_round_trip() {
        let key = key();
        let (headers, body) = signed_stream(&key);
        let v = verify_stream(&jwks_of(&key), 200, &pairs(&headers), &body).expect("verifies");
        assert_eq!(v.kid, key.kid());
        assert_eq!(v.created, CREATED);
    }

    #[test]
    fn sse_event_has_the_contract_shape() {
        let key = key().with_kid("k1").expect("kid");
        let signed = key
            .sign_response(&components(&content_digest(b"")), CREATED)
            .expect("sign");
        let event = String::from_utf8(signed.sse_event()).expect("utf-8");
        let data = event
            .strip_prefix("event: carrel.signature\ndata: ")
            .and_then(|e| e.strip_suffix("\n\n"))
            .expect("shape");
        assert!(!data.contains('\n'));
        assert!(data.starts_with("{\"content_digest\":\"sha-256=:"));
        let json: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(json["content_digest"], signed.content_digest.as_str());
        assert_eq!(json["signature_input"], signed.signature_input.as_str());
        assert_eq!(json["signature"], signed.signature.as_str());
        // The escaper against serde_json, on awkward text.
        let odd = SignatureHeaders {
            content_digest: "\"\\\n\t\u{1}é".into(),
            signature_input: String::new(),
            signature: "x".into(),
        };
        let e = odd.sse_event();
        let data = &e[EVENT_START.len()..e.len() - 2];
        assert_eq!(
            serde_json::from_slice::<SignatureHeaders>(data).expect("json"),
            odd
        );
    }

    // (c) failures ----------------------------------------------------------------------------

    #[test]
    fn flipped_body_byte_is_a_digest_mismatch() {
        let key = key();
        let body = b"{\"answer\":42}".to_vec();
        let headers = signed_plain(&key, &body);
        let mut tampered = body.clone();
        tampered[11] ^= 1;
        let err = verify_response(&jwks_of(&key), 200, &pairs(&headers), &tampered).unwrap_err();
        assert_eq!(
            err,
            VerifyError::DigestMismatch {
                signed: content_digest(&body),
                computed: content_digest(&tampered),
            }
        );
    }

    #[test]
    fn changed_status_or_header_is_a_bad_signature() {
        let key = key();
        let jwks = jwks_of(&key);
        let body = b"{}";
        let headers = signed_plain(&key, body);
        let bad = VerifyError::BadSignature {
            kid: key.kid().to_owned(),
        };
        assert_eq!(
            verify_response(&jwks, 201, &pairs(&headers), body),
            Err(bad.clone())
        );
        for (name, value) in [
            ("carrel-model", "gpt-4o"),
            ("x-request-id", "req-other"),
            ("date", "Wed, 21 Apr 2021 02:07:55 GMT"),
        ] {
            let mut h = headers.clone();
            set(&mut h, name, value);
            assert_eq!(
                verify_response(&jwks, 200, &pairs(&h), body),
                Err(bad.clone()),
                "{name}"
            );
        }
        // A new body with a matching new digest: the signature no longer matches.
        let mut h = headers.clone();
        set(&mut h, "content-digest", &content_digest(b"[]"));
        assert_eq!(
            verify_response(&jwks, 200, &pairs(&h), b"[]"),
            Err(bad.clone())
        );
        // created changed in Signature-Input.
        let mut h = headers.clone();
        let input = key
            .sign_response(&components(&content_digest(body)), CREATED + 1)
            .expect("sign")
            .signature_input;
        set(&mut h, "signature-input", &input);
        assert_eq!(verify_response(&jwks, 200, &pairs(&h), body), Err(bad));
    }

    #[test]
    fn unknown_kid_and_missing_headers() {
        let key = key();
        let body = b"{}";
        let headers = signed_plain(&key, body);
        let other = jwks_of(&self::key());
        assert_eq!(
            verify_response(&other, 200, &pairs(&headers), body),
            Err(VerifyError::UnknownKeyId {
                kid: key.kid().to_owned()
            })
        );
        for name in [
            CONTENT_DIGEST,
            SIGNATURE_INPUT,
            SIGNATURE,
            X_REQUEST_ID,
            CARREL_MODEL,
            DATE,
        ] {
            let h: Vec<(String, String)> =
                headers.iter().filter(|(n, _)| n != name).cloned().collect();
            assert_eq!(
                verify_response(&jwks_of(&key), 200, &pairs(&h), body),
                Err(VerifyError::MissingHeader { name }),
                "{name}"
            );
        }
    }

    #[test]
    fn wrong_key_under_the_same_kid_is_a_bad_signature() {
        let signer = key().with_kid("shared").expect("kid");
        let impostor = key().with_kid("shared").expect("kid");
        let headers = signed_plain(&signer, b"{}");
        assert_eq!(
            verify_response(&KeyRing::new(impostor).jwks(), 200, &pairs(&headers), b"{}"),
            Err(VerifyError::BadSignature {
                kid: "shared".into()
            })
        );
    }

    #[test]
    fn retired_keys_still_verify_after_rotation() {
        let first = key();
        let first_kid = first.kid().to_owned();
        let old_headers = signed_plain(&first, b"old");
        let mut ring = KeyRing::new(first);
        ring.rotate(key());
        let new_headers = signed_plain(&ring.current, b"new");
        ring.rotate(key());
        let jwks = ring.jwks();
        assert_eq!(jwks.keys.len(), 3);
        assert_eq!(jwks.keys[0].kid, ring.current.kid());
        assert_eq!(jwks.keys[2].kid, first_kid);
        let v = verify_response(&jwks, 200, &pairs(&old_headers), b"old").expect("old key");
        assert_eq!(v.kid, first_kid);
        verify_response(&jwks, 200, &pairs(&new_headers), b"new").expect("middle key");
        // The JWKS survives a trip through JSON, as a verifier fetches it.
        let json = serde_json::to_string(&jwks).expect("json");
        let parsed: Jwks = serde_json::from_str(&json).expect("parse");
        verify_response(&parsed, 200, &pairs(&old_headers), b"old").expect("parsed");
    }

    #[test]
    fn rotation_never_lists_a_kid_twice() {
        let a = key().with_kid("a").expect("kid");
        let mut ring = KeyRing::new(a);
        ring.rotate(key().with_kid("b").expect("kid"));
        ring.rotate(key().with_kid("a").expect("kid"));
        let kids: Vec<String> = ring.jwks().keys.into_iter().map(|k| k.kid).collect();
        assert_eq!(kids, ["a", "b"]);
    }

    #[test]
    fn malformed_signature_input_is_refused_with_the_reason() {
        let key = key().with_kid("k1").expect("kid");
        let jwks = jwks_of(&key);
        let body = b"{}";
        let headers = signed_plain(&key, body);
        let list = "(\"@status\" \"content-digest\" \"x-request-id\" \"carrel-model\" \"date\")";
        type Expect = fn(&VerifyError) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            ("".into(), |e| matches!(e, VerifyError::Malformed { .. })),
            ("carrel".into(), |e| matches!(e, VerifyError::Malformed { .. })),
            ("carrel=\"x\"".into(), |e| matches!(e, VerifyError::Malformed { .. })),
            (format!("carrel={list};created=1;keyid=\"k1"), |e| {
                matches!(e, VerifyError::Malformed { .. })
            }),
            (format!("carrel={list};created=1;keyid=\"k1\""), |e| {
                matches!(e, VerifyError::Malformed { reason, .. } if reason.contains("alg"))
            }),
            (format!("carrel={list};created=1;keyid=\"k1\";alg=\"ed25519\";expires=2"), |e| {
                matches!(e, VerifyError::Malformed { reason, .. } if reason.contains("expires"))
            }),
            (format!("carrel={list};created=1;created=2;keyid=\"k1\";alg=\"ed25519\""), |e| {
                matches!(e, VerifyError::Malformed { reason, .. } if reason.contains("twice"))
            }),
            (format!("carrel={list};created=-1;keyid=\"k1\";alg=\"ed25519\""), |e| {
                matches!(e, VerifyError::Malformed { .. })
            }),
            (format!("carrel={list};created=1;keyid=\"k1\";alg=\"rsa-pss-sha512\""), |e| {
                matches!(e, VerifyError::UnsupportedAlgorithm { alg } if alg == "rsa-pss-sha512")
            }),
            ("carrel=(\"@status\" \"date\");created=1;keyid=\"k1\";alg=\"ed25519\"".into(), |e| {
                matches!(e, VerifyError::UnexpectedComponents { found } if found == "(\"@status\" \"date\")")
            }),
            (
                "carrel=(\"@status\" \"content-digest\";sf \"x-request-id\" \"carrel-model\" \"date\")\
                 ;created=1;keyid=\"k1\";alg=\"ed25519\""
                    .into(),
                |e| matches!(e, VerifyError::Malformed { reason, .. } if reason.contains("parameters")),
            ),
            ("sig1=(\"@status\");created=1".into(), |e| {
                matches!(e, VerifyError::NoCarrelSignature { labels, .. } if labels == "sig1")
            }),
            (
                format!(
                    "carrel={list};created=1;keyid=\"k1\";alg=\"ed25519\", \
                     carrel={list};created=1;keyid=\"k1\";alg=\"ed25519\""
                ),
                |e| matches!(e, VerifyError::Malformed { reason, .. } if reason.contains("more than one")),
            ),
        ];
        for (input, expected) in cases {
            let mut h = headers.clone();
            set(&mut h, "signature-input", &input);
            let err = verify_response(&jwks, 200, &pairs(&h), body).unwrap_err();
            assert!(expected(&err), "{input:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn malformed_signature_and_digest_are_refused() {
        let key = key();
        let jwks = jwks_of(&key);
        let body = b"{}";
        let headers = signed_plain(&key, body);
        for sig in [
            "carrel=:AAAA:",
            "carrel=:not base64!:",
            "carrel=abc",
            "carrel=:AAAA:;x=1",
        ] {
            let mut h = headers.clone();
            set(&mut h, "signature", sig);
            assert!(
                matches!(
                    verify_response(&jwks, 200, &pairs(&h), body),
                    Err(VerifyError::Malformed {
                        field: "Signature",
                        ..
                    })
                ),
                "{sig}"
            );
        }
        let mut h = headers.clone();
        set(&mut h, "content-digest", "sha-512=:AAAA:");
        // The signature covers the digest header, so changing it breaks the signature first.
        assert!(matches!(
            verify_response(&jwks, 200, &pairs(&h), body),
            Err(VerifyError::BadSignature { .. })
        ));
        assert_eq!(
            check_digest("sha-512=:AAAA:, md5=:AAAA:", body),
            Err(VerifyError::UnsupportedDigest {
                found: "sha-512, md5".into()
            })
        );
        let mut h = headers.clone();
        set(&mut h, "carrel-model", "a\nb");
        assert_eq!(
            verify_response(&jwks, 200, &pairs(&h), body),
            Err(VerifyError::InvalidComponentValue { name: CARREL_MODEL })
        );
        assert_eq!(
            verify_response(&jwks, 42, &pairs(&headers), body),
            Err(VerifyError::InvalidStatus(42))
        );
    }

    #[test]
    fn stream_failures() {
        let key = key();
        let jwks = jwks_of(&key);
        let (headers, body) = signed_stream(&key);
        let h = pairs(&headers);

        let mut tampered = body.clone();
        tampered[20] ^= 1;
        assert!(matches!(
            verify_stream(&jwks, 200, &h, &tampered),
            Err(VerifyError::DigestMismatch { .. })
        ));

        // Cut off before the signature event.
        let end = body
            .windows(EVENT_START.len())
            .position(|w| w == EVENT_START)
            .expect("event");
        assert!(matches!(
            verify_stream(&jwks, 200, &h, &body[..end]),
            Err(VerifyError::MissingSignatureEvent { .. })
        ));
        assert!(matches!(
            verify_stream(&jwks, 200, &h, &body[..body.len() - 1]),
            Err(VerifyError::MissingSignatureEvent { .. })
        ));

        // An event after the signature event.
        let mut extra = body.clone();
        extra.extend_from_slice(b"data: more\n\n");
        assert!(matches!(
            verify_stream(&jwks, 200, &h, &extra),
            Err(VerifyError::MissingSignatureEvent { .. })
        ));

        // Garbage JSON.
        let mut garbage = body[..end].to_vec();
        garbage.extend_from_slice(b"event: carrel.signature\ndata: {\"nope\":1}\n\n");
        assert!(matches!(
            verify_stream(&jwks, 200, &h, &garbage),
            Err(VerifyError::Malformed { .. })
        ));

        // Another model claimed in the headers.
        let mut other = headers.clone();
        set(&mut other, "carrel-model", "other");
        assert!(matches!(
            verify_stream(&jwks, 200, &pairs(&other), &body),
            Err(VerifyError::BadSignature { .. })
        ));

        // A plain-response check of a stream finds no Content-Digest header.
        assert_eq!(
            verify_response(&jwks, 200, &h, &body),
            Err(VerifyError::MissingHeader {
                name: CONTENT_DIGEST
            })
        );
    }

    // Keys and saved responses ----------------------------------------------------------------

    #[test]
    fn keys_survive_pem_and_der() {
        let key = key();
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(pem.ends_with("\n-----END PRIVATE KEY-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let from_pem = SigningKey::from_pem(&pem).expect("pem");
        let from_der = SigningKey::from_pkcs8_der(key.to_pkcs8_der()).expect("der");
        assert_eq!(from_pem.kid(), key.kid());
        assert_eq!(from_der.public_key(), key.public_key());
        // Ed25519 is deterministic: the same key signs the same bytes the same way.
        assert_eq!(from_pem.sign_bytes(b"m"), key.sign_bytes(b"m"));
        assert_eq!(key.kid().len(), 43);
        assert!(format!("{key:?}").contains(key.kid()));

        assert!(matches!(
            SigningKey::from_pem(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----"
            ),
            Err(KeyError::Pem(_))
        ));
        assert!(matches!(
            SigningKey::from_pkcs8_der(b"not a key"),
            Err(KeyError::Rejected(_))
        ));
        for kid in ["", "has space", "quote\"", "é", &"x".repeat(129)] {
            assert!(
                matches!(key_with(kid), Err(KeyError::InvalidKid(_))),
                "{kid:?}"
            );
        }
        assert_eq!(
            key_with("2025-01.key_a~").expect("ok").kid(),
            "2025-01.key_a~"
        );
    }

    fn key_with(kid: &str) -> Result<SigningKey, KeyError> {
        key().with_kid(kid)
    }

    #[test]
    fn jwk_shape_and_checks() {
        let key = SigningKey::from_pem(RFC_PRIVATE_PEM)
            .expect("key")
            .with_kid("test-key-ed25519")
            .expect("kid");
        let json = serde_json::to_string(&key.public_jwk()).expect("json");
        assert_eq!(
            json,
            "{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs\",\
             \"kid\":\"test-key-ed25519\",\"alg\":\"EdDSA\",\"use\":\"sig\"}"
        );
        let parsed: Jwks = serde_json::from_str(
            "{\"keys\":[{\"kty\":\"RSA\",\"n\":\"x\",\"e\":\"AQAB\",\"kid\":\"r\"},\
             {\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs\",\"kid\":\"e\"}]}",
        )
        .expect("lenient parse");
        assert_eq!(
            PublicKey::from_jwk(parsed.find("e").expect("e"))
                .expect("ed25519")
                .as_bytes(),
            key.public_key().as_bytes()
        );
        assert!(matches!(
            PublicKey::from_jwk(parsed.find("r").expect("r")),
            Err(KeyError::BadJwk(_))
        ));
        let mut jwk = key.public_jwk();
        jwk.x.pop();
        assert!(matches!(
            PublicKey::from_jwk(&jwk),
            Err(KeyError::BadJwk(_))
        ));
        let mut jwk = key.public_jwk();
        jwk.alg = Some("ES256".into());
        assert!(matches!(
            PublicKey::from_jwk(&jwk),
            Err(KeyError::BadJwk(_))
        ));

        // A JWKS entry that is not Ed25519 under the signature's kid.
        let headers = signed_plain(&key, b"{}");
        let mut jwks = KeyRing::new(key).jwks();
        jwks.keys[0].crv = "X25519".into();
        assert!(matches!(
            verify_response(&jwks, 200, &pairs(&headers), b"{}"),
            Err(VerifyError::BadJwk { .. })
        ));
    }

    #[test]
    fn saved_responses_round_trip() {
        let key = key();
        let jwks = jwks_of(&key);
        let body = b"{\"ok\":true}";
        let headers = signed_plain(&key, body);
        let saved = SavedResponse::new(200, pairs(&headers), body);
        assert!(!saved.is_event_stream());
        let json = serde_json::to_string(&saved).expect("json");
        let back: SavedResponse = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.verify(&jwks).expect("ok").kid, key.kid());

        let (headers, body) = signed_stream(&key);
        let saved = SavedResponse::new(200, pairs(&headers), &body);
        assert!(saved.is_event_stream());
        saved.verify_stream(&jwks).expect("stream ok");

        let broken = SavedResponse {
            body_b64: "%%%".into(),
            ..saved
        };
        assert!(matches!(
            broken.verify_stream(&jwks),
            Err(VerifyError::BadSavedResponse { .. })
        ));
    }
}
