//! OpenID Connect ID tokens: verifying a school's sign-in.
//!
//! A student signs in at the school's identity provider; the app hands Carrel the ID token;
//! [`Verifier::verify`] checks it against the issuer's published keys (JWKS) and the
//! institution's [`OidcSettings`], and returns an [`Identity`]: a canonical `iss`/`sub` pair the
//! caller turns into a pseudonymous patron reference, an [`AgeBand`], an optional group and the
//! token's nonce. Birthdates, names and e-mail addresses never leave this module; the token and
//! its subject are never logged.
//!
//! core has no HTTP client, so fetching the JWKS is injected through [`JwksFetcher`].
//!
//! # Checks
//!
//! - The header `alg` must be one of RS256/RS384/RS512, PS256/PS384/PS512, ES256, ES384 or
//!   EdDSA; `none` and HMAC are refused before any key is looked up. A `crit` header is refused.
//! - The key is chosen by `kid` (or, without a `kid`, the only key of the right type); its `kty`,
//!   curve, `alg`, `use` and `key_ops` must agree with the header. The token cannot name a key
//!   source (`jku`, `jwk`, `x5u` are ignored).
//! - `iss` must equal the configured issuer; `aud` (string or array) must contain the configured
//!   audience, and when `aud` lists several audiences a present `azp` must be that audience.
//! - `exp`, `nbf` and `iat` are checked against the caller's `now` with 60 s of leeway; `sub`
//!   must be a non-empty string; a `nonce` is required.
//!
//! # JWKS cache
//!
//! Per URL, timed by the caller's `now` (so tests need no sleeps): a set is fresh for 10
//! minutes; a `kid` the fresh set lacks triggers a refetch, but at most one fetch per URL every
//! 30 s, so forged `kid`s cannot hammer the identity provider. A failed refetch keeps serving the
//! last good set for up to 24 hours; with nothing cached the failure is remembered for 5 s.
//! Concurrent misses for one URL share one fetch.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use dashmap::DashMap;
use jiff::civil::Date;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::AgeBand;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
const LEEWAY_SECS: i64 = 60;
/// How long a fetched JWKS is used without refetching.
const JWKS_FRESH_SECS: u64 = 10 * 60;
/// The least time between two fetches of one JWKS URL (unknown `kid`s, failed refreshes).
const JWKS_MIN_REFETCH_SECS: u64 = 30;
/// How long a cached JWKS may still be used while refetching it fails.
const JWKS_STALE_MAX_SECS: u64 = 24 * 60 * 60;
/// How long a failed fetch with nothing cached is remembered (and answered without a fetch).
const JWKS_FAILURE_BACKOFF_SECS: u64 = 5;
/// The longest ID token looked at; real ones are a few kilobytes.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// The largest JWKS document parsed.
const MAX_JWKS_LEN: usize = 1024 * 1024;
/// Ages outside `0..=MAX_AGE` (from a number, a string or a birthdate) give no band.
const MAX_AGE: i64 = 150;

/// One institution's OIDC settings (from the admin API: `{"kind":"oidc","issuer","audience",
/// "jwks_url","age_claim"?,"group_claim"?}` plus optional `"age_bands"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OidcSettings {
    /// The expected `iss`, compared exactly.
    pub issuer: String,
    /// The expected audience: Carrel's (or the app's) client id at the identity provider.
    pub audience: String,
    /// Where the issuer publishes its signing keys.
    pub jwks_url: String,
    /// The claim the age band is read from (a role, an age or a birthdate), if any.
    #[serde(default)]
    pub age_claim: Option<String>,
    /// The claim holding the patron's group name, if any.
    #[serde(default)]
    pub group_claim: Option<String>,
    /// Claim value → band, e.g. `{"student": "minor", "teacher": "adult"}`.
    #[serde(default)]
    pub age_bands: BTreeMap<String, AgeBand>,
}

/// Fetches a JWKS document (raw JSON bytes) from a URL. The gateway implements it with its HTTP
/// client (and its timeouts: a fetch holds up the sign-ins waiting on that URL's keys).
pub trait JwksFetcher: Send + Sync + 'static {
    /// Fetches `url`; an error is a short, loggable description.
    fn fetch(
        &self,
        url: &str,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>>;
}

/// A verified sign-in.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// `iss` and `sub` joined canonically (`"<iss>\0<sub>"`): the caller HMACs it into the
    /// patron reference. Never logged; `Debug` redacts it.
    pub canonical_id: String,
    /// The band read from the configured age claim; [`AgeBand::Unknown`] when it says nothing.
    pub age_band: AgeBand,
    /// The group claim's value (a group name), if configured and present; the first string of
    /// an array.
    pub group: Option<String>,
    /// The token's `nonce` (the caller checks it is one Carrel issued and unused). Always
    /// `Some` on a verified token.
    pub nonce: Option<String>,
    /// The token's `exp`, Unix seconds.
    pub expires_at: i64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("canonical_id", &"<redacted>")
            .field("age_band", &self.age_band)
            .field("group", &self.group)
            .field("nonce", &self.nonce)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why an ID token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// Not a JWT, a bad header, bad JSON or a missing/ill-typed required claim.
    #[error("the ID token is malformed")]
    Malformed,
    /// The header's algorithm is not accepted (never `none` or HMAC), or disagrees with the key.
    #[error("the ID token's signing algorithm is not accepted")]
    UnsupportedAlgorithm,
    /// No key of the issuer's JWKS matches the token (after one refetch).
    #[error("the ID token was signed with an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the ID token's signature is invalid")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("the ID token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("the ID token is not valid yet")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("the ID token is from another issuer")]
    WrongIssuer,
    /// `aud` does not contain the configured audience, or `azp` names another party.
    #[error("the ID token is for another audience")]
    WrongAudience,
    /// The token carries no nonce.
    #[error("the ID token has no nonce")]
    MissingNonce,
    /// The JWKS could not be fetched or parsed and no usable copy is cached.
    #[error("the identity provider's keys are unavailable: {0}")]
    JwksUnavailable(String),
}

impl OidcError {
    /// A stable snake_case code for API errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::Malformed => "id_token_malformed",
            OidcError::UnsupportedAlgorithm => "id_token_algorithm",
            OidcError::UnknownKey => "id_token_unknown_key",
            OidcError::BadSignature => "id_token_bad_signature",
            OidcError::Expired => "id_token_expired",
            OidcError::NotYetValid => "id_token_not_yet_valid",
            OidcError::WrongIssuer => "id_token_wrong_issuer",
            OidcError::WrongAudience => "id_token_wrong_audience",
            OidcError::MissingNonce => "id_token_missing_nonce",
            OidcError::JwksUnavailable(_) => "identity_provider_unavailable",
        }
    }
}

/// Verifies ID tokens, caching each issuer's JWKS. Cheap to clone (clones share the cache).
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    fetcher: Arc<dyn JwksFetcher>,
    cache: DashMap<String, Arc<CacheEntry>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("cached_jwks_urls", &self.inner.cache.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier with an empty cache, fetching JWKS documents through `fetcher`.
    pub fn new(fetcher: Arc<dyn JwksFetcher>) -> Self {
        Verifier {
            inner: Arc::new(Inner {
                fetcher,
                cache: DashMap::new(),
            }),
        }
    }

    /// Verifies an ID token at `now` (Unix seconds, also the cache's clock); `today` is the
    /// institution's local date (for birthdate claims).
    pub async fn verify(
        &self,
        settings: &OidcSettings,
        id_token: &str,
        now: i64,
        today: Date,
    ) -> Result<Identity, OidcError> {
        let header = parse_header(id_token)?;
        let key = self
            .key_for(&settings.jwks_url, now, header.alg, header.kid.as_deref())
            .await?;

        let mut validation = Validation::new(header.alg);
        // Time claims are checked below against the caller's `now`, not the system clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.required_spec_claims = ["iss", "aud", "sub"]
            .into_iter()
            .map(str::to_owned)
            .collect::<HashSet<_>>();
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        let claims = jsonwebtoken::decode::<Map<String, Value>>(id_token, &key, &validation)
            .map_err(map_jwt_error)?
            .claims;

        let checked = check_claims(&claims, settings, now)?;
        Ok(Identity {
            canonical_id: format!("{}\0{}", settings.issuer, checked.sub),
            age_band: age_band_of(settings, &claims, today),
            group: group_of(settings, &claims),
            nonce: Some(checked.nonce),
            expires_at: checked.exp,
        })
    }

    fn entry(&self, url: &str) -> Arc<CacheEntry> {
        if let Some(entry) = self.inner.cache.get(url) {
            return Arc::clone(&entry);
        }
        Arc::clone(&self.inner.cache.entry(url.to_owned()).or_default())
    }

    /// The key to verify a token with `alg` and `kid` against, fetching the JWKS if need be.
    async fn key_for(
        &self,
        url: &str,
        now: i64,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<DecodingKey, OidcError> {
        let entry = self.entry(url);
        match plan(&entry.snapshot(), now, alg, kid) {
            Plan::Use(key) => return Ok(key),
            Plan::Fail(error) => return Err(error),
            Plan::Fetch => {}
        }

        // One fetch per URL at a time; whoever waited re-plans on what the fetch brought.
        let _fetching = entry.fetch.lock().await;
        match plan(&entry.snapshot(), now, alg, kid) {
            Plan::Use(key) => return Ok(key),
            Plan::Fail(error) => return Err(error),
            Plan::Fetch => {}
        }

        tracing::debug!(
            jwks_url = url,
            kid = kid.unwrap_or(""),
            "fetching the identity provider's keys"
        );
        let fetched = self.fetch_keys(url).await;
        let keys = {
            let mut snapshot = entry.lock_snapshot();
            snapshot.last_attempt = Some(now);
            match fetched {
                Ok(keys) => {
                    let keys = Arc::new(keys);
                    snapshot.keys = Some(Arc::clone(&keys));
                    snapshot.fetched_at = now;
                    snapshot.last_error = None;
                    keys
                }
                Err(error) => {
                    tracing::warn!(jwks_url = url, %error, "could not refresh the identity provider's keys");
                    snapshot.last_error = Some(error.clone());
                    match &snapshot.keys {
                        Some(keys) if now.abs_diff(snapshot.fetched_at) < JWKS_STALE_MAX_SECS => {
                            Arc::clone(keys)
                        }
                        _ => return Err(OidcError::JwksUnavailable(error)),
                    }
                }
            }
        };
        match keys.lookup(alg, kid) {
            Lookup::Found(key) => Ok(key.key.clone()),
            Lookup::Incompatible => Err(OidcError::UnsupportedAlgorithm),
            Lookup::Missing => Err(OidcError::UnknownKey),
        }
    }

    async fn fetch_keys(&self, url: &str) -> Result<KeySet, String> {
        let body = self.inner.fetcher.fetch(url).await?;
        KeySet::parse(&body)
    }
}

/// One JWKS URL's cache slot.
#[derive(Default)]
struct CacheEntry {
    /// What is known; never held across an await.
    snapshot: Mutex<Snapshot>,
    /// Held while fetching, so concurrent misses share one fetch.
    fetch: tokio::sync::Mutex<()>,
}

impl CacheEntry {
    fn lock_snapshot(&self) -> MutexGuard<'_, Snapshot> {
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshot(&self) -> Snapshot {
        self.lock_snapshot().clone()
    }
}

#[derive(Clone, Default)]
struct Snapshot {
    /// The last good set.
    keys: Option<Arc<KeySet>>,
    /// When `keys` was fetched.
    fetched_at: i64,
    /// When a fetch was last tried, successful or not.
    last_attempt: Option<i64>,
    /// Why the last fetch failed, if it did.
    last_error: Option<String>,
}

enum Plan {
    Use(DecodingKey),
    Fetch,
    Fail(OidcError),
}

/// What to do for a token with `alg` and `kid`, given what the cache holds at `now`.
fn plan(snapshot: &Snapshot, now: i64, alg: Algorithm, kid: Option<&str>) -> Plan {
    let may_fetch = snapshot
        .last_attempt
        .is_none_or(|at| now.abs_diff(at) >= JWKS_MIN_REFETCH_SECS);
    let Some(keys) = &snapshot.keys else {
        let recently_failed = snapshot
            .last_attempt
            .is_some_and(|at| now.abs_diff(at) < JWKS_FAILURE_BACKOFF_SECS);
        return if recently_failed {
            Plan::Fail(unavailable(snapshot))
        } else {
            Plan::Fetch
        };
    };
    let age = now.abs_diff(snapshot.fetched_at);
    if age >= JWKS_FRESH_SECS {
        if may_fetch {
            return Plan::Fetch;
        }
        if age >= JWKS_STALE_MAX_SECS {
            return Plan::Fail(unavailable(snapshot));
        }
        // A refresh failed moments ago: keep serving the stale set until the next try.
    }
    match keys.lookup(alg, kid) {
        Lookup::Found(key) => Plan::Use(key.key.clone()),
        Lookup::Incompatible => Plan::Fail(OidcError::UnsupportedAlgorithm),
        Lookup::Missing if may_fetch && age < JWKS_FRESH_SECS => Plan::Fetch,
        Lookup::Missing => Plan::Fail(OidcError::UnknownKey),
    }
}

fn unavailable(snapshot: &Snapshot) -> OidcError {
    OidcError::JwksUnavailable(
        snapshot
            .last_error
            .clone()
            .unwrap_or_else(|| "the cached keys are too old".to_owned()),
    )
}

/// The key types a verifiable signature can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn for_algorithm(alg: Algorithm) -> Option<KeyKind> {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(KeyKind::Rsa),
            Algorithm::ES256 => Some(KeyKind::P256),
            Algorithm::ES384 => Some(KeyKind::P384),
            Algorithm::EdDSA => Some(KeyKind::Ed25519),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        }
    }
}

/// The accepted signing algorithms, by their JOSE names. Nothing else (`none`, `HS*`) passes.
fn accepted_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

fn key_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// A usable signing key of a JWKS.
struct CachedKey {
    kid: Option<String>,
    kind: KeyKind,
    /// The JWK's `alg`, if it names one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl CachedKey {
    /// The key, if `jwk` is a public signing key of a kind Carrel verifies.
    fn from_jwk(jwk: &Jwk) -> Option<CachedKey> {
        let common = &jwk.common;
        if !matches!(common.public_key_use, None | Some(PublicKeyUse::Signature)) {
            return None;
        }
        if let Some(ops) = &common.key_operations {
            if !ops.contains(&KeyOperations::Verify) {
                return None;
            }
        }
        let alg = match common.key_algorithm {
            None => None,
            Some(alg) => Some(key_algorithm(alg)?),
        };
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => KeyKind::P256,
                EllipticCurve::P384 => KeyKind::P384,
                EllipticCurve::P521 | EllipticCurve::Ed25519 => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
                EllipticCurve::Ed25519 => KeyKind::Ed25519,
                _ => return None,
            },
            AlgorithmParameters::OctetKey(_) => return None,
        };
        if alg.is_some_and(|alg| KeyKind::for_algorithm(alg) != Some(kind)) {
            return None;
        }
        Some(CachedKey {
            kid: common.key_id.clone(),
            kind,
            alg,
            key: DecodingKey::from_jwk(jwk).ok()?,
        })
    }

    fn fits(&self, alg: Algorithm) -> bool {
        KeyKind::for_algorithm(alg) == Some(self.kind) && self.alg.is_none_or(|own| own == alg)
    }
}

/// The usable keys of one JWKS document.
struct KeySet {
    keys: Vec<CachedKey>,
}

enum Lookup<'a> {
    Found(&'a CachedKey),
    /// The `kid` exists, but for another key type or algorithm.
    Incompatible,
    Missing,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys that cannot verify signatures (one odd key does not
    /// spoil the set). A set without any usable key is an error.
    fn parse(body: &[u8]) -> Result<KeySet, String> {
        if body.len() > MAX_JWKS_LEN {
            return Err("the JWKS document is too large".to_owned());
        }
        let document: Value =
            serde_json::from_slice(body).map_err(|_| "the JWKS document is not JSON".to_owned())?;
        let Some(entries) = document.get("keys").and_then(Value::as_array) else {
            return Err("the JWKS document has no \"keys\" array".to_owned());
        };
        let keys: Vec<CachedKey> = entries
            .iter()
            .filter_map(|entry| serde_json::from_value::<Jwk>(entry.clone()).ok())
            .filter_map(|jwk| CachedKey::from_jwk(&jwk))
            .collect();
        if keys.is_empty() {
            return Err("the JWKS document has no usable signing key".to_owned());
        }
        if keys.len() < entries.len() {
            tracing::debug!(
                usable = keys.len(),
                total = entries.len(),
                "skipped JWKS entries that are not signing keys Carrel verifies"
            );
        }
        Ok(KeySet { keys })
    }

    fn lookup(&self, alg: Algorithm, kid: Option<&str>) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|key| key.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Lookup::Missing;
                }
                match named.find(|key| key.fits(alg)) {
                    Some(key) => Lookup::Found(key),
                    None => Lookup::Incompatible,
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|key| key.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Lookup::Found(key),
                    _ => Lookup::Missing,
                }
            }
        }
    }
}

/// What the verifier needs from the header, read before any key is touched.
struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

fn parse_header(token: &str) -> Result<Header, OidcError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(OidcError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::Malformed);
    };
    if header.is_empty() || payload.is_empty() {
        return Err(OidcError::Malformed);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| OidcError::Malformed)?;
    let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(OidcError::Malformed);
    };
    let Some(alg) = header.get("alg").and_then(Value::as_str) else {
        return Err(OidcError::Malformed);
    };
    let alg = accepted_algorithm(alg).ok_or(OidcError::UnsupportedAlgorithm)?;
    // No header extensions are understood, so none that must be may be present (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(OidcError::Malformed);
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(OidcError::Malformed),
    };
    Ok(Header { alg, kid })
}

fn map_jwt_error(error: jsonwebtoken::errors::Error) -> OidcError {
    match error.kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Crypto(_) => OidcError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => OidcError::UnsupportedAlgorithm,
        ErrorKind::ExpiredSignature => OidcError::Expired,
        ErrorKind::ImmatureSignature => OidcError::NotYetValid,
        ErrorKind::InvalidIssuer => OidcError::WrongIssuer,
        ErrorKind::InvalidAudience => OidcError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => OidcError::WrongIssuer,
            "aud" => OidcError::WrongAudience,
            _ => OidcError::Malformed,
        },
        // InvalidToken, Base64, Json, Utf8, InvalidSubject and anything added later.
        _ => OidcError::Malformed,
    }
}

struct CheckedClaims {
    sub: String,
    nonce: String,
    exp: i64,
}

/// The claim checks, done here (after jsonwebtoken's) for exact errors and the caller's clock.
fn check_claims(
    claims: &Map<String, Value>,
    settings: &OidcSettings,
    now: i64,
) -> Result<CheckedClaims, OidcError> {
    if claims.get("iss").and_then(Value::as_str) != Some(settings.issuer.as_str()) {
        return Err(OidcError::WrongIssuer);
    }
    check_audience(claims, &settings.audience)?;

    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or(OidcError::Malformed)?;
    if exp <= now.saturating_sub(LEEWAY_SECS) {
        return Err(OidcError::Expired);
    }
    for name in ["nbf", "iat"] {
        match claims.get(name) {
            None | Some(Value::Null) => {}
            Some(value) => {
                let at = numeric_date(value).ok_or(OidcError::Malformed)?;
                if at > now.saturating_add(LEEWAY_SECS) {
                    return Err(OidcError::NotYetValid);
                }
            }
        }
    }

    let sub = match claims.get("sub").and_then(Value::as_str) {
        Some(sub) if !sub.is_empty() => sub.to_owned(),
        _ => return Err(OidcError::Malformed),
    };
    let nonce = match claims.get("nonce") {
        None | Some(Value::Null) => return Err(OidcError::MissingNonce),
        Some(Value::String(nonce)) if nonce.is_empty() => return Err(OidcError::MissingNonce),
        Some(Value::String(nonce)) => nonce.clone(),
        Some(_) => return Err(OidcError::Malformed),
    };
    Ok(CheckedClaims { sub, nonce, exp })
}

/// `aud` must contain `audience`; with several audiences, a present `azp` must be `audience`.
fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), OidcError> {
    let several = match claims.get("aud") {
        Some(Value::String(aud)) if aud == audience => false,
        Some(Value::Array(auds)) if auds.iter().any(|aud| aud.as_str() == Some(audience)) => {
            auds.len() > 1
        }
        _ => return Err(OidcError::WrongAudience),
    };
    if several {
        match claims.get("azp") {
            None | Some(Value::Null) => {}
            Some(azp) if azp.as_str() == Some(audience) => {}
            Some(_) => return Err(OidcError::WrongAudience),
        }
    }
    Ok(())
}

/// A JWT NumericDate (integer or fractional seconds), floored.
fn numeric_date(value: &Value) -> Option<i64> {
    let number = value.as_number()?;
    number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|secs| secs.is_finite())
            .map(|secs| secs.floor() as i64)
    })
}

/// The band the configured age claim gives; [`AgeBand::Unknown`] when it gives none.
fn age_band_of(settings: &OidcSettings, claims: &Map<String, Value>, today: Date) -> AgeBand {
    let Some(value) = settings
        .age_claim
        .as_deref()
        .and_then(|name| claims.get(name))
    else {
        return AgeBand::Unknown;
    };
    let band = match value {
        Value::String(text) => settings
            .age_bands
            .get(text)
            .copied()
            .or_else(|| band_of_age(text.trim().parse::<i64>().ok()?))
            .or_else(|| band_of_age(age_on(parse_birthdate(text)?, today)?)),
        Value::Number(number) => number
            .as_i64()
            .or_else(|| {
                number
                    .as_f64()
                    .filter(|years| years.is_finite())
                    .map(|years| years.floor() as i64)
            })
            .and_then(band_of_age),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .find_map(|item| settings.age_bands.get(item).copied()),
        _ => None,
    };
    band.unwrap_or(AgeBand::Unknown)
}

fn band_of_age(years: i64) -> Option<AgeBand> {
    (0..=MAX_AGE)
        .contains(&years)
        .then(|| AgeBand::of_age(years))
}

/// A `YYYY-MM-DD` date; nothing looser (no times, no year-only or `0000-` forms).
fn parse_birthdate(text: &str) -> Option<Date> {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, &b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !shaped {
        return None;
    }
    text.parse::<Date>().ok()
}

/// Completed years from `birth` to `today`; none for a birthdate in the future.
fn age_on(birth: Date, today: Date) -> Option<i64> {
    if birth > today {
        return None;
    }
    let mut years = i64::from(today.year()) - i64::from(birth.year());
    if (today.month(), today.day()) < (birth.month(), birth.day()) {
        years -= 1;
    }
    Some(years)
}

/// The group claim's value: a non-empty string, or the first one of an array.
fn group_of(settings: &OidcSettings, claims: &Map<String, Value>) -> Option<String> {
    let value = claims.get(settings.group_claim.as_deref()?)?;
    let group = match value {
        Value::String(group) => group.as_str(),
        Value::Array(items) => items.iter().find_map(Value::as_str)?,
        _ => return None,
    };
    (!group.is_empty()).then(|| group.to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header as JwtHeader, encode};
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair,
        RsaPublicKeyComponents,
    };
    use serde_json::json;

    use super::*;

    /// A test-only RSA-2048 key (`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`);
    /// its JWK `n`/`e` are derived from it with ring in [`rsa_key`]. It signs nothing real.
    const TEST_RSA_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEuwIBADANBgkqhkiG9w0BAQEFAASCBKUwggShAgEAAoIBAQDssOuCUWfCWek4
GIWc8byT+TuTDiplMuTjYxbmzjmHFLfa/vILa439EmpHejse8y5ZebDY5zKC6RDF
VDXtQQbRfJrAUgFHqFcdj3wNDSyPDQzpLFSN6ww7RF8hxV83W4JV71OnFmuuqxP9
yWKLzNGYx8BNAcDHRH0qBemBRJKCFqSzuspa83WbHcudzETmWfte3MvUZptvsj7u
fArqGfJpbS9heamMTKdPHGJLm0OlRmOLjU4A+NskZnQSTs9NY89wPg8Db/of7IjD
dCpCMQgnshRYkxLHRc/xRlpBcA/HCWWrsl9RtguCZ0cqHIuCqgm9Iea4OZfNcMK9
/XxnVbKtAgMBAAECgf9hFC+EQ99K15XQbD5hIMU37AGDT0wUNcurd/jssajmvpiq
OecMyBB0vBjbOEcHaraX/FGMpUcSaoV2ahO0O/eP9IuEVh4wRdt1RGSc9cpQ4glp
mcUUcFOT+3cJYuqqyd2rYX3uCkQgYArTDMZekKNnBobZDt8C3BR6J/KeEoIE2Hqz
HWjGOiqRZnRAdHZ/RoIQeItbTgGAQHCbhjHjMQUAcOvhHayHOWpXU62Y2XtKhVbX
C3jembnGZk2tad44ehvY5qTNQsCQNeIBeiz71JZtR+hmhPGLKPrdW4+ydSlCJQ+Z
6fHOSV/+ryH366HzZiuIbTKIsTYda8x/7G9H7KECgYEA/VM/9hqckwDZduhIj95M
6qxl2YLgB42rmvbfJMQm8urKx7NhCdw/UPAQ5e8MOFxEugvEBhwMSyh7+5j9SuJl
k3mKg8Wk0qKhB9zFryhoEvGrKh4tAepUaW77qGgRUl+U7/lZzUQYES0VN5Gpftmo
rXfirObLwYcS2Am2sTKPRuUCgYEA7zC1E+l0SYCBOr0M76madkTNO+G9xR5ZrhAU
2PQ+zkL/PXN9rL7tx5VPtJ+J+eApkq0se02VxyUO2c9XgG8HLvuNxnr6kMGnEDiy
6iEVlX99kMuknh6E2QoAg2RLlKYZeMEJOIb1Tvr3iljt7Udnd0Fas9GyuXzmqRGZ
2VYIeCkCgYBP0+gX+ZLVkDL3EYOsMnUyjlkaDe/i8XXeQ2VWBKnxaqO0AobVwJ4D
N2Nb0dSb/hd6OTLwae5F0OAhDLjk3Cr+KhLIK4QhDDaKb7ur0qPZNGanwxKTw/AN
uXd8Pi8XMh+Q75ao5IhhAT/qXvB2lMhewaSgr6oNti7t/UGg3TnhMQKBgGZlW5+i
mX293ZTfyeHvoYhv+8xe33a7f3jcuZAHP7vdQpd0EaEaO4DtkqmogtDN/f4k1J4U
oMIYQztLYBJDdbfPSOpnS00dGf//xdglQbA2W/LYuyhVuFmRxpZ5IUIJuW3QdboV
TH77QW2glHq3zrtm5wWECBcQOU63kj1Qb1/BAoGBALcVRRSsLwtiDpSm9nF/GcuV
VE2bTC1zsW8cnfXg4UfdoaX4AAHKUjf+UZfhO+K09GYb4gq5cf/LtrlWbzM1Pbd5
ALIVozpkYxxeIljjtindWiHQaUntJtG/Ex12IIhftholLTu0hZCUq56DsFSaXlZF
M4bGPpb70L4Fe9yZs9Qr
-----END PRIVATE KEY-----
";

    const ISS: &str = "https://idp.school.example";
    const AUD: &str = "carrel-app";
    const JWKS_URL: &str = "https://idp.school.example/jwks";
    const SUB: &str = "student-4711";
    const NOW: i64 = 1_750_000_000;

    fn today() -> Date {
        jiff::civil::date(2025, 6, 15)
    }

    struct TestKey {
        alg: Algorithm,
        kid: String,
        encoding: EncodingKey,
        jwk: Value,
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_key(kid: &str) -> TestKey {
        let body: String = TEST_RSA_PEM
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        let pair = RsaKeyPair::from_pkcs8(&der).unwrap();
        let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        TestKey {
            alg: Algorithm::RS256,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_rsa_pem(TEST_RSA_PEM.as_bytes()).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                        "n": b64(&public.n), "e": b64(&public.e)}),
        }
    }

    fn ec_key(kid: &str) -> TestKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let point = pair.public_key().as_ref();
        assert_eq!(point.len(), 65);
        TestKey {
            alg: Algorithm::ES256,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": b64(&point[1..33]), "y": b64(&point[33..])}),
        }
    }

    fn ed_key(kid: &str) -> TestKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        TestKey {
            alg: Algorithm::EdDSA,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                        "x": b64(pair.public_key().as_ref())}),
        }
    }

    fn jwks(keys: &[&TestKey]) -> Value {
        json!({"keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>()})
    }

    fn sign(key: &TestKey, claims: &Value) -> String {
        let mut header = JwtHeader::new(key.alg);
        header.kid = Some(key.kid.clone());
        encode(&header, claims, &key.encoding).unwrap()
    }

    fn sign_without_kid(key: &TestKey, claims: &Value) -> String {
        encode(&JwtHeader::new(key.alg), claims, &key.encoding).unwrap()
    }

    /// A token with a hand-made header and an arbitrary signature part.
    fn forge(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        )
    }

    fn claims() -> Value {
        json!({
            "iss": ISS, "aud": AUD, "sub": SUB, "nonce": "nonce-1",
            "iat": NOW - 10, "exp": NOW + 300,
            "email": "kid@school.example", "name": "A. Student",
            "role": "student", "groups": ["class-7b", "choir"],
        })
    }

    fn with(mut claims: Value, changes: Value) -> Value {
        for (name, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value.clone();
            }
        }
        claims
    }

    fn settings() -> OidcSettings {
        OidcSettings {
            issuer: ISS.to_owned(),
            audience: AUD.to_owned(),
            jwks_url: JWKS_URL.to_owned(),
            age_claim: Some("role".to_owned()),
            group_claim: Some("groups".to_owned()),
            age_bands: BTreeMap::from([
                ("student".to_owned(), AgeBand::Minor),
                ("teacher".to_owned(), AgeBand::Adult),
            ]),
        }
    }

    /// Serves a JWKS from memory, or fails; counts fetches.
    struct FakeFetcher {
        response: Mutex<Result<Vec<u8>, String>>,
        fetches: AtomicUsize,
    }

    impl FakeFetcher {
        fn serving(document: &Value) -> Arc<FakeFetcher> {
            Arc::new(FakeFetcher {
                response: Mutex::new(Ok(document.to_string().into_bytes())),
                fetches: AtomicUsize::new(0),
            })
        }

        fn serve(&self, document: &Value) {
            *self.response.lock().unwrap() = Ok(document.to_string().into_bytes());
        }

        fn serve_raw(&self, body: &[u8]) {
            *self.response.lock().unwrap() = Ok(body.to_vec());
        }

        fn fail(&self) {
            *self.response.lock().unwrap() = Err("connection refused".to_owned());
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }
    }

    impl JwksFetcher for FakeFetcher {
        fn fetch(
            &self,
            url: &str,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
            assert_eq!(url, JWKS_URL);
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let response = self.response.lock().unwrap().clone();
            Box::pin(async move {
                // Let concurrent verifications pile up behind this fetch.
                for _ in 0..5 {
                    tokio::task::yield_now().await;
                }
                response
            })
        }
    }

    fn verifier(keys: &[&TestKey]) -> (Verifier, Arc<FakeFetcher>) {
        let fetcher = FakeFetcher::serving(&jwks(keys));
        (Verifier::new(fetcher.clone()), fetcher)
    }

    async fn verify_at(verifier: &Verifier, token: &str, now: i64) -> Result<Identity, OidcError> {
        verifier.verify(&settings(), token, now, today()).await
    }

    #[tokio::test]
    async fn oidc_rs256_token_verifies() {
        let key = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&key]);
        let identity = verify_at(&verifier, &sign(&key, &claims()), NOW)
            .await
            .unwrap();
        assert_eq!(identity.canonical_id, format!("{ISS}\0{SUB}"));
        assert_eq!(identity.age_band, AgeBand::Minor);
        assert_eq!(identity.group.as_deref(), Some("class-7b"));
        assert_eq!(identity.nonce.as_deref(), Some("nonce-1"));
        assert_eq!(identity.expires_at, NOW + 300);

        // The cached set serves the next sign-in.
        let token = sign(
            &key,
            &with(claims(), json!({"role": "teacher", "groups": "staff"})),
        );
        let identity = verify_at(&verifier, &token, NOW + 60).await.unwrap();
        assert_eq!(identity.age_band, AgeBand::Adult);
        assert_eq!(identity.group.as_deref(), Some("staff"));
        assert_eq!(fetcher.fetches(), 1);
    }

    #[tokio::test]
    async fn oidc_es256_and_eddsa_tokens_verify() {
        let ec = ec_key("ec-1");
        let ed = ed_key("ed-1");
        let rsa = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&rsa, &ec, &ed]);
        let token = sign(&ec, &with(claims(), json!({"groups": "class-9a"})));
        let identity = verify_at(&verifier, &token, NOW).await.unwrap();
        assert_eq!(identity.age_band, AgeBand::Minor);
        assert_eq!(identity.group.as_deref(), Some("class-9a"));

        let identity = verify_at(&verifier, &sign(&ed, &claims()), NOW)
            .await
            .unwrap();
        assert_eq!(identity.canonical_id, format!("{ISS}\0{SUB}"));
    }

    #[tokio::test]
    async fn oidc_time_claims_use_now_with_leeway() {
        let key = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&key]);
        let cases = [
            (json!({"exp": NOW - 61}), Err(OidcError::Expired)),
            (json!({"exp": NOW - LEEWAY_SECS}), Err(OidcError::Expired)),
            (json!({"exp": NOW - 59}), Ok(())),
            (json!({"exp": (NOW + 300) as f64 + 0.5}), Ok(())),
            (json!({"exp": null}), Err(OidcError::Malformed)),
            (json!({"exp": "tomorrow"}), Err(OidcError::Malformed)),
            (json!({"nbf": NOW + 120}), Err(OidcError::NotYetValid)),
            (json!({"iat": NOW + 120}), Err(OidcError::NotYetValid)),
            (json!({"nbf": NOW + 30, "iat": NOW + 30}), Ok(())),
        ];
        for (changes, expected) in cases {
            let token = sign(&key, &with(claims(), changes.clone()));
            let got = verify_at(&verifier, &token, NOW).await.map(|_| ());
            assert_eq!(got, expected, "{changes}");
        }
    }

    #[tokio::test]
    async fn oidc_issuer_and_audience_are_checked() {
        let key = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&key]);
        let cases = [
            (
                json!({"iss": "https://evil.example"}),
                Err(OidcError::WrongIssuer),
            ),
            (json!({"iss": null}), Err(OidcError::WrongIssuer)),
            (json!({"iss": [ISS]}), Err(OidcError::WrongIssuer)),
            (
                json!({"aud": "someone-else"}),
                Err(OidcError::WrongAudience),
            ),
            (json!({"aud": null}), Err(OidcError::WrongAudience)),
            (json!({"aud": ["a", "b"]}), Err(OidcError::WrongAudience)),
            (json!({"aud": [AUD]}), Ok(())),
            (json!({"aud": ["other", AUD]}), Ok(())),
            (json!({"aud": ["other", AUD], "azp": AUD}), Ok(())),
            (
                json!({"aud": [AUD, "other"], "azp": "other"}),
                Err(OidcError::WrongAudience),
            ),
            // With a single audience, azp names the presenter and is not checked.
            (json!({"aud": AUD, "azp": "android-app"}), Ok(())),
            (json!({"sub": null}), Err(OidcError::Malformed)),
            (json!({"sub": ""}), Err(OidcError::Malformed)),
        ];
        for (changes, expected) in cases {
            let token = sign(&key, &with(claims(), changes.clone()));
            let got = verify_at(&verifier, &token, NOW).await.map(|_| ());
            assert_eq!(got, expected, "{changes}");
        }
    }

    #[tokio::test]
    async fn oidc_nonce_is_required() {
        let key = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&key]);
        for (changes, expected) in [
            (json!({"nonce": null}), OidcError::MissingNonce),
            (json!({"nonce": ""}), OidcError::MissingNonce),
            (json!({"nonce": 7}), OidcError::Malformed),
        ] {
            let token = sign(&key, &with(claims(), changes));
            assert_eq!(
                verify_at(&verifier, &token, NOW).await.unwrap_err(),
                expected
            );
        }
    }

    #[tokio::test]
    async fn oidc_bad_signatures_are_refused() {
        let published = ec_key("ec-1");
        let impostor = ec_key("ec-1");
        let rsa = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&published, &rsa]);
        let token = sign(&impostor, &claims());
        assert_eq!(
            verify_at(&verifier, &token, NOW).await.unwrap_err(),
            OidcError::BadSignature
        );

        // A genuine signature over other claims.
        let genuine = sign(&rsa, &claims());
        let parts: Vec<&str> = genuine.split('.').collect();
        let other = b64(with(claims(), json!({"sub": "admin"}))
            .to_string()
            .as_bytes());
        let tampered = format!("{}.{other}.{}", parts[0], parts[2]);
        assert_eq!(
            verify_at(&verifier, &tampered, NOW).await.unwrap_err(),
            OidcError::BadSignature
        );
        let truncated = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(
            verify_at(&verifier, &truncated, NOW).await.unwrap_err(),
            OidcError::BadSignature
        );
    }

    #[tokio::test]
    async fn oidc_none_and_hmac_are_refused_without_a_fetch() {
        let rsa = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&rsa]);
        let none = forge(
            &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
            &claims(),
            "",
        );
        assert_eq!(
            verify_at(&verifier, &none, NOW).await.unwrap_err(),
            OidcError::UnsupportedAlgorithm
        );

        // The classic confusion: HMAC keyed with the public key.
        let mut header = JwtHeader::new(Algorithm::HS256);
        header.kid = Some("rsa-1".to_owned());
        let n = rsa.jwk["n"].as_str().unwrap();
        let hs256 = encode(&header, &claims(), &EncodingKey::from_secret(n.as_bytes())).unwrap();
        assert_eq!(
            verify_at(&verifier, &hs256, NOW).await.unwrap_err(),
            OidcError::UnsupportedAlgorithm
        );

        for alg in ["HS512", "ES512", "RS1", "nOnE"] {
            let token = forge(&json!({"alg": alg, "kid": "rsa-1"}), &claims(), "c2ln");
            assert_eq!(
                verify_at(&verifier, &token, NOW).await.unwrap_err(),
                OidcError::UnsupportedAlgorithm,
                "{alg}"
            );
        }
        assert_eq!(fetcher.fetches(), 0);
    }

    #[tokio::test]
    async fn oidc_key_type_must_match_the_header() {
        let rsa = rsa_key("shared");
        let (verifier, _) = verifier(&[&rsa]);
        // An ES256 token naming the RSA key's kid.
        let ec = ec_key("shared");
        assert_eq!(
            verify_at(&verifier, &sign(&ec, &claims()), NOW)
                .await
                .unwrap_err(),
            OidcError::UnsupportedAlgorithm
        );
        // A PS256 token for a key published as RS256-only.
        let mut header = JwtHeader::new(Algorithm::PS256);
        header.kid = Some("shared".to_owned());
        let ps256 = encode(&header, &claims(), &rsa.encoding).unwrap();
        assert_eq!(
            verify_at(&verifier, &ps256, NOW).await.unwrap_err(),
            OidcError::UnsupportedAlgorithm
        );
    }

    #[tokio::test]
    async fn oidc_malformed_tokens() {
        let rsa = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&rsa]);
        let good = sign(&rsa, &claims());
        let cases = [
            String::new(),
            "not-a-jwt".to_owned(),
            "a.b".to_owned(),
            format!("{good}.extra"),
            format!("!!!.{}", good.split_once('.').unwrap().1),
            forge(&json!(["RS256"]), &claims(), "c2ln"),
            forge(&json!({"kid": "rsa-1"}), &claims(), "c2ln"),
            forge(&json!({"alg": "RS256", "kid": 5}), &claims(), "c2ln"),
            forge(
                &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
                &claims(),
                "c2ln",
            ),
            "x".repeat(MAX_TOKEN_LEN + 1),
        ];
        for token in cases {
            assert_eq!(
                verify_at(&verifier, &token, NOW).await.unwrap_err(),
                OidcError::Malformed,
                "{token:.40}"
            );
        }
        assert_eq!(fetcher.fetches(), 0);
        // A payload that is not a JSON object, under a genuine signature.
        let mut header = JwtHeader::new(Algorithm::RS256);
        header.kid = Some("rsa-1".to_owned());
        let array = encode(&header, &json!([1, 2]), &rsa.encoding).unwrap();
        assert_eq!(
            verify_at(&verifier, &array, NOW).await.unwrap_err(),
            OidcError::Malformed
        );
    }

    #[tokio::test]
    async fn oidc_unknown_kid_refetches_at_most_every_30_seconds() {
        let old = rsa_key("rsa-1");
        let new = ec_key("ec-2");
        let (verifier, fetcher) = verifier(&[&old]);
        verify_at(&verifier, &sign(&old, &claims()), NOW)
            .await
            .unwrap();
        assert_eq!(fetcher.fetches(), 1);

        // The IdP rotates in a new key.
        fetcher.serve(&jwks(&[&old, &new]));
        let rotated = sign(&new, &claims());
        // Within 30 s of the last fetch: no refetch.
        assert_eq!(
            verify_at(&verifier, &rotated, NOW + 10).await.unwrap_err(),
            OidcError::UnknownKey
        );
        assert_eq!(fetcher.fetches(), 1);
        // Later: one refetch picks the new key up.
        verify_at(&verifier, &rotated, NOW + 31).await.unwrap();
        assert_eq!(fetcher.fetches(), 2);
        verify_at(&verifier, &rotated, NOW + 32).await.unwrap();
        assert_eq!(fetcher.fetches(), 2);

        // Forged kids: the first past the window refetches once; the next ones within 30 s don't.
        let forged_a = sign(&ec_key("forged-a"), &claims());
        let forged_b = sign(&ec_key("forged-b"), &claims());
        assert_eq!(
            verify_at(&verifier, &forged_a, NOW + 70).await.unwrap_err(),
            OidcError::UnknownKey
        );
        assert_eq!(fetcher.fetches(), 3);
        assert_eq!(
            verify_at(&verifier, &forged_b, NOW + 80).await.unwrap_err(),
            OidcError::UnknownKey
        );
        assert_eq!(
            verify_at(&verifier, &forged_a, NOW + 99).await.unwrap_err(),
            OidcError::UnknownKey
        );
        assert_eq!(fetcher.fetches(), 3);
    }

    #[tokio::test]
    async fn oidc_jwks_refreshes_after_ten_minutes() {
        let key = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&key]);
        let token = sign(&key, &with(claims(), json!({"exp": NOW + 3600})));
        verify_at(&verifier, &token, NOW).await.unwrap();
        verify_at(&verifier, &token, NOW + 599).await.unwrap();
        assert_eq!(fetcher.fetches(), 1);
        verify_at(&verifier, &token, NOW + 600).await.unwrap();
        assert_eq!(fetcher.fetches(), 2);
    }

    #[tokio::test]
    async fn oidc_fetch_failure_with_nothing_cached() {
        let key = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&key]);
        fetcher.fail();
        let token = sign(&key, &claims());
        let error = verify_at(&verifier, &token, NOW).await.unwrap_err();
        assert_eq!(
            error,
            OidcError::JwksUnavailable("connection refused".to_owned())
        );
        assert_eq!(error.code(), "identity_provider_unavailable");
        // The failure is remembered briefly rather than retried per request.
        assert!(matches!(
            verify_at(&verifier, &token, NOW + 1).await,
            Err(OidcError::JwksUnavailable(_))
        ));
        assert_eq!(fetcher.fetches(), 1);

        // An unparsable or keyless document is no better.
        fetcher.serve_raw(b"<html>maintenance</html>");
        assert!(matches!(
            verify_at(&verifier, &token, NOW + 10).await,
            Err(OidcError::JwksUnavailable(_))
        ));
        fetcher.serve(&json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}));
        assert!(matches!(
            verify_at(&verifier, &token, NOW + 20).await,
            Err(OidcError::JwksUnavailable(_))
        ));
        assert_eq!(fetcher.fetches(), 3);

        // Recovery.
        fetcher.serve(&jwks(&[&key]));
        verify_at(&verifier, &token, NOW + 30).await.unwrap();
        assert_eq!(fetcher.fetches(), 4);
    }

    #[tokio::test]
    async fn oidc_stale_keys_serve_while_refetching_fails() {
        let key = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&key]);
        let token = sign(&key, &with(claims(), json!({"exp": NOW + 2 * 86_400})));
        verify_at(&verifier, &token, NOW).await.unwrap();
        fetcher.fail();
        // Stale after 10 minutes: the refresh fails, the cached set still verifies.
        verify_at(&verifier, &token, NOW + 700).await.unwrap();
        assert_eq!(fetcher.fetches(), 2);
        // Within 30 s of the failed try: no new try.
        verify_at(&verifier, &token, NOW + 710).await.unwrap();
        assert_eq!(fetcher.fetches(), 2);
        verify_at(&verifier, &token, NOW + 740).await.unwrap();
        assert_eq!(fetcher.fetches(), 3);
        // After 24 hours the stale set is no longer trusted.
        let error = verify_at(&verifier, &token, NOW + 86_400)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            OidcError::JwksUnavailable("connection refused".to_owned())
        );
        let error = verify_at(&verifier, &token, NOW + 86_410)
            .await
            .unwrap_err();
        assert!(matches!(error, OidcError::JwksUnavailable(_)));
        assert_eq!(fetcher.fetches(), 4);
    }

    #[tokio::test]
    async fn oidc_concurrent_misses_share_one_fetch() {
        let key = rsa_key("rsa-1");
        let (verifier, fetcher) = verifier(&[&key]);
        let token = sign(&key, &claims());
        // Polled together: the first starts the fetch, the rest wait for it and re-plan.
        let run = || verify_at(&verifier, &token, NOW);
        let results = tokio::join!(run(), run(), run(), run(), run(), run());
        for result in [
            results.0, results.1, results.2, results.3, results.4, results.5,
        ] {
            result.unwrap();
        }
        assert_eq!(fetcher.fetches(), 1);
    }

    #[tokio::test]
    async fn oidc_token_without_kid_uses_the_only_fitting_key() {
        let rsa = rsa_key("rsa-1");
        let ec = ec_key("ec-1");
        let (verifier, fetcher) = verifier(&[&rsa, &ec]);
        verify_at(&verifier, &sign_without_kid(&rsa, &claims()), NOW)
            .await
            .unwrap();
        verify_at(&verifier, &sign_without_kid(&ec, &claims()), NOW)
            .await
            .unwrap();

        // Two EC keys: ambiguous.
        let other = ec_key("ec-2");
        fetcher.serve(&jwks(&[&rsa, &ec, &other]));
        let token = sign_without_kid(&ec, &claims());
        assert_eq!(
            verify_at(&verifier, &token, NOW + 700).await.unwrap_err(),
            OidcError::UnknownKey
        );
    }

    #[tokio::test]
    async fn oidc_jwks_skips_keys_that_cannot_sign() {
        let rsa = rsa_key("rsa-1");
        let mut enc = rsa_key("rsa-enc");
        enc.jwk["use"] = json!("enc");
        let mut verify_ops = ec_key("ec-ops");
        verify_ops.jwk["key_ops"] = json!(["verify"]);
        let mut encrypt_ops = ec_key("ec-encrypt");
        encrypt_ops.jwk["key_ops"] = json!(["encrypt"]);
        let mut mislabelled = ec_key("ec-mislabelled");
        mislabelled.jwk["alg"] = json!("RS256");
        let document = json!({"keys": [
            rsa.jwk.clone(), enc.jwk.clone(), verify_ops.jwk.clone(),
            encrypt_ops.jwk.clone(), mislabelled.jwk.clone(),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "odd", "alg": "RSA-OAEP-512", "n": "AA", "e": "AQAB"},
            "not a key",
        ]});
        let fetcher = FakeFetcher::serving(&document);
        let verifier = Verifier::new(fetcher.clone());
        verify_at(&verifier, &sign(&rsa, &claims()), NOW)
            .await
            .unwrap();
        verify_at(&verifier, &sign(&verify_ops, &claims()), NOW)
            .await
            .unwrap();
        for key in [&enc, &encrypt_ops, &mislabelled] {
            let token = sign(key, &claims());
            assert_eq!(
                verify_at(&verifier, &token, NOW).await.unwrap_err(),
                OidcError::UnknownKey,
                "{}",
                key.kid
            );
        }
    }

    #[test]
    fn oidc_age_bands() {
        let mut settings = settings();
        let band = |settings: &OidcSettings, claims: Value| {
            age_band_of(settings, claims.as_object().unwrap(), today())
        };
        assert_eq!(band(&settings, json!({"role": "student"})), AgeBand::Minor);
        assert_eq!(band(&settings, json!({"role": "teacher"})), AgeBand::Adult);
        assert_eq!(
            band(&settings, json!({"role": "Teacher"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"role": "janitor"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"role": ["staff", "teacher", "student"]})),
            AgeBand::Adult
        );
        assert_eq!(
            band(&settings, json!({"role": ["staff", 3]})),
            AgeBand::Unknown
        );
        assert_eq!(band(&settings, json!({"role": true})), AgeBand::Unknown);
        assert_eq!(
            band(&settings, json!({"other": "teacher"})),
            AgeBand::Unknown
        );

        settings.age_claim = Some("age".to_owned());
        assert_eq!(band(&settings, json!({"age": 12})), AgeBand::Under13);
        assert_eq!(band(&settings, json!({"age": 15})), AgeBand::Minor);
        assert_eq!(band(&settings, json!({"age": 17.9})), AgeBand::Minor);
        assert_eq!(band(&settings, json!({"age": 30})), AgeBand::Adult);
        assert_eq!(band(&settings, json!({"age": "16"})), AgeBand::Minor);
        assert_eq!(band(&settings, json!({"age": " 40 "})), AgeBand::Adult);
        assert_eq!(band(&settings, json!({"age": -3})), AgeBand::Unknown);
        assert_eq!(band(&settings, json!({"age": 2012})), AgeBand::Unknown);

        // Birthdates, on 2025-06-15.
        settings.age_claim = Some("birthdate".to_owned());
        assert_eq!(
            band(&settings, json!({"birthdate": "2012-06-16"})),
            AgeBand::Under13
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2012-06-15"})),
            AgeBand::Minor
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2007-06-16"})),
            AgeBand::Minor
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2007-06-15"})),
            AgeBand::Adult
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2030-01-01"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "0000-03-04"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2012-02-30"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2012-06-15T00:00:00"})),
            AgeBand::Unknown
        );
        assert_eq!(
            band(&settings, json!({"birthdate": "2012"})),
            AgeBand::Unknown
        );

        settings.age_claim = None;
        assert_eq!(
            band(&settings, json!({"role": "teacher"})),
            AgeBand::Unknown
        );
    }

    #[tokio::test]
    async fn oidc_birthdate_band_end_to_end() {
        let key = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&key]);
        let settings = OidcSettings {
            age_claim: Some("birthdate".to_owned()),
            group_claim: None,
            ..settings()
        };
        let token = sign(&key, &with(claims(), json!({"birthdate": "2014-01-31"})));
        let identity = verifier
            .verify(&settings, &token, NOW, today())
            .await
            .unwrap();
        assert_eq!(identity.age_band, AgeBand::Under13);
        assert_eq!(identity.group, None);
    }

    #[test]
    fn oidc_groups() {
        let settings = settings();
        let group = |claims: Value| group_of(&settings, claims.as_object().unwrap());
        assert_eq!(group(json!({"groups": "7b"})).as_deref(), Some("7b"));
        assert_eq!(
            group(json!({"groups": [1, "7b", "8a"]})).as_deref(),
            Some("7b")
        );
        assert_eq!(group(json!({"groups": []})), None);
        assert_eq!(group(json!({"groups": ""})), None);
        assert_eq!(group(json!({"groups": 7})), None);
        assert_eq!(group(json!({})), None);
    }

    #[tokio::test]
    async fn oidc_debug_output_redacts_the_subject() {
        let key = rsa_key("rsa-1");
        let (verifier, _) = verifier(&[&key]);
        let identity = verify_at(&verifier, &sign(&key, &claims()), NOW)
            .await
            .unwrap();
        let debug = format!("{identity:?}");
        assert!(!debug.contains(SUB), "{debug}");
        assert!(!debug.contains(ISS), "{debug}");
        assert!(debug.contains("redacted"));
        assert_eq!(
            format!("{verifier:?}"),
            "Verifier { cached_jwks_urls: 1, .. }"
        );
    }

    #[test]
    fn oidc_verifier_and_its_future_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Verifier>();
        let verifier = Verifier::new(FakeFetcher::serving(&json!({"keys": []})));
        let settings = settings();
        assert_send(&verifier.verify(&settings, "", NOW, today()));
    }

    #[test]
    fn oidc_error_codes_are_stable() {
        let codes = [
            (OidcError::Malformed, "id_token_malformed"),
            (OidcError::UnsupportedAlgorithm, "id_token_algorithm"),
            (OidcError::UnknownKey, "id_token_unknown_key"),
            (OidcError::BadSignature, "id_token_bad_signature"),
            (OidcError::Expired, "id_token_expired"),
            (OidcError::NotYetValid, "id_token_not_yet_valid"),
            (OidcError::WrongIssuer, "id_token_wrong_issuer"),
            (OidcError::WrongAudience, "id_token_wrong_audience"),
            (OidcError::MissingNonce, "id_token_missing_nonce"),
            (
                OidcError::JwksUnavailable("x".to_owned()),
                "identity_provider_unavailable",
            ),
        ];
        for (error, code) in codes {
            assert_eq!(error.code(), code);
        }
    }

    #[test]
    fn oidc_settings_from_admin_json() {
        let parsed: OidcSettings = serde_json::from_value(json!({
            "kind": "oidc", "issuer": ISS, "audience": AUD, "jwks_url": JWKS_URL,
            "age_claim": "role", "group_claim": "groups",
            "age_bands": {"student": "minor", "teacher": "adult"},
        }))
        .unwrap();
        assert_eq!(parsed, settings());
        let minimal: OidcSettings =
            serde_json::from_value(json!({"issuer": ISS, "audience": AUD, "jwks_url": JWKS_URL}))
                .unwrap();
        assert_eq!(minimal.age_claim, None);
        assert!(minimal.age_bands.is_empty());
    }
}
