//! Patron sign-in on the data plane: `POST /v1/patron/sessions` (with a kiosk key),
//! `GET`/`DELETE /v1/patron/sessions/current` (with the session token), and
//! `POST /v1/patron/oidc-nonce`; plus the kiosk page ([`kiosk`]).
//!
//! | way in | body | checked against |
//! |---|---|---|
//! | library card | `{"card","pin"}` | the ILS over SIP2 (63 Patron Information: BL=Y and CQ=Y), or the local list (argon2id) |
//! | school | `{"id_token"}` | the issuer's JWKS; `iss`, `aud`, `exp` and a nonce Carrel issued, used once |
//! | guest | `{"guest_code"}` | the pass (argon2id), its day and its allotment |
//!
//! Whatever the way in, a session holds a patron reference (`HMAC(pepper, institution ‖ id)`),
//! an age band and perhaps a group — never a card number, a PIN, a name or a birth date — and
//! those never reach a log, a metric or the provider. Wrong PINs lock a card (by reference)
//! after [`LOCKOUT_FAILURES`] in [`LOCKOUT_WINDOW`] for as long; each kiosk key may try
//! `patrons.sign_ins_per_kiosk_per_minute` sign-ins a minute. A new sign-in on a kiosk ends
//! the kiosk's previous session.

pub mod kiosk;
pub mod sessions;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use carrel_core::config::PatronsConfig;
use carrel_core::domain::{AgeBand, KeyKind, Principal, unix_now};
use carrel_core::keys::{NewKey, SESSION_PREFIX};
use carrel_core::oidc::{JwksFetcher, OidcError, Verifier};
use carrel_core::patrons::{GuestCode, PatronAuth, Sip2Auth};
use carrel_core::quota::{Level, Subject};
use carrel_core::sip2::client::{PatronCheck, Sip2Client, Sip2ClientError};
use carrel_core::store::NewPatronSession;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::body::{self, ResponseBody};
use crate::error::GatewayError;

/// Wrong PINs (or guest codes) that lock a card (or pass)…
pub const LOCKOUT_FAILURES: u64 = 5;
/// …within this window, and for this long.
pub const LOCKOUT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How long an OIDC nonce Carrel issued stays usable.
pub const NONCE_TTL: Duration = Duration::from_secs(10 * 60);
/// Largest sign-in body.
const MAX_SIGN_IN_BYTES: usize = 16 * 1024;

/// Why a sign-in (or a session) was refused. Each has its own status and code.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The body is not one of the three forms.
    #[error("{0}")]
    InvalidRequest(String),
    /// Sign-in needs a kiosk key.
    #[error("Patron sign-in needs a kiosk key (a key of kind `kiosk`).")]
    NotAKiosk,
    /// The institution does not sign patrons in this way.
    #[error("This library does not sign patrons in with {0}.")]
    NotEnabled(&'static str),
    /// Unknown card, or wrong PIN.
    #[error("The card number or PIN is not right.")]
    InvalidCredentials,
    /// The library's system blocks the card.
    #[error("This card cannot be used here right now. Please ask library staff.")]
    PatronBlocked,
    /// Too many wrong PINs.
    #[error("Too many wrong PINs for this card. Try again in {0} minutes, or ask library staff.")]
    CardLocked(u64),
    /// Too many sign-ins on this kiosk.
    #[error("Too many sign-in attempts on this computer. Wait a minute and try again.")]
    Throttled,
    /// The guest code is not one.
    #[error("That guest code is not right.")]
    InvalidGuestCode,
    /// The guest pass's day is over.
    #[error("That guest code has expired.")]
    GuestPassExpired,
    /// The guest pass's allotment is used up.
    #[error("That guest code's allowance for today is used up.")]
    GuestPassExhausted,
    /// The ID token failed a check.
    #[error("The sign-in from your school could not be accepted ({}).", .0.code())]
    IdToken(OidcError),
    /// The ID token's nonce is not one Carrel issued, or was used.
    #[error("The sign-in from your school was not started here, or was already used.")]
    NonceInvalid,
    /// The library's system did not answer (timeout, refused, circuit open).
    #[error("The library's system cannot be reached right now. Please try again shortly.")]
    IlsUnavailable,
    /// The library's system refused Carrel's own SIP2 login: a configuration problem.
    #[error("The library's system refused this service's login. Please tell library staff.")]
    IlsLoginRefused,
    /// The library's system answered with replies that stayed malformed.
    #[error("The library's system sent an answer that could not be read. Please try again.")]
    IlsBadReply,
    /// The session token is unknown, ended, idle too long or past its end.
    #[error("Your session has ended. Please sign in again.")]
    SessionExpired,
}

impl SignInError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            SignInError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            SignInError::InvalidCredentials
            | SignInError::InvalidGuestCode
            | SignInError::GuestPassExpired
            | SignInError::NonceInvalid
            | SignInError::SessionExpired => StatusCode::UNAUTHORIZED,
            SignInError::IdToken(OidcError::JwksUnavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            SignInError::IdToken(_) => StatusCode::UNAUTHORIZED,
            SignInError::NotAKiosk
            | SignInError::NotEnabled(_)
            | SignInError::PatronBlocked
            | SignInError::CardLocked(_)
            | SignInError::GuestPassExhausted => StatusCode::FORBIDDEN,
            SignInError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            SignInError::IlsUnavailable
            | SignInError::IlsLoginRefused
            | SignInError::IlsBadReply => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            SignInError::InvalidRequest(_) => "invalid_sign_in",
            SignInError::NotAKiosk => "not_a_kiosk_key",
            SignInError::NotEnabled(_) => "sign_in_method_not_enabled",
            SignInError::InvalidCredentials => "invalid_credentials",
            SignInError::PatronBlocked => "patron_blocked",
            SignInError::CardLocked(_) => "card_locked",
            SignInError::Throttled => "sign_in_throttled",
            SignInError::InvalidGuestCode => "invalid_guest_code",
            SignInError::GuestPassExpired => "guest_pass_expired",
            SignInError::GuestPassExhausted => "guest_pass_exhausted",
            SignInError::IdToken(e) => e.code(),
            SignInError::NonceInvalid => "id_token_nonce_invalid",
            SignInError::IlsUnavailable => "ils_unavailable",
            SignInError::IlsLoginRefused => "ils_login_refused",
            SignInError::IlsBadReply => "ils_bad_reply",
            SignInError::SessionExpired => "session_expired",
        }
    }

    /// OpenAI error `type`.
    pub fn openai_type(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "requests",
            _ => "api_error",
        }
    }

    /// `Retry-After`, seconds.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            SignInError::CardLocked(minutes) => Some(minutes * 60),
            SignInError::Throttled => Some(60),
            _ => None,
        }
    }

    /// One of each, for tests.
    #[cfg(test)]
    pub(crate) fn one_of_each() -> Vec<SignInError> {
        vec![
            SignInError::InvalidRequest(String::new()),
            SignInError::NotAKiosk,
            SignInError::NotEnabled("x"),
            SignInError::InvalidCredentials,
            SignInError::PatronBlocked,
            SignInError::CardLocked(1),
            SignInError::Throttled,
            SignInError::InvalidGuestCode,
            SignInError::GuestPassExpired,
            SignInError::GuestPassExhausted,
            SignInError::IdToken(OidcError::Expired),
            SignInError::IdToken(OidcError::JwksUnavailable(String::new())),
            SignInError::NonceInvalid,
            SignInError::IlsUnavailable,
            SignInError::IlsLoginRefused,
            SignInError::IlsBadReply,
            SignInError::SessionExpired,
        ]
    }
}

impl From<SignInError> for GatewayError {
    fn from(e: SignInError) -> Self {
        GatewayError::SignIn(e)
    }
}

/// Sign-in outcomes, for `/metrics` (never by patron).
#[derive(Debug, Default)]
pub struct SignInCounters {
    /// Count by outcome: `ok`, or the refusal's code.
    counts: std::sync::Mutex<HashMap<&'static str, u64>>,
    /// SIP2 35 End Patron Session messages sent at sign-out.
    pub sip2_end_sessions: AtomicU64,
}

impl SignInCounters {
    fn count(&self, outcome: &'static str) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    /// Every `(outcome, count)`, by outcome.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut all: Vec<_> = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&c, &n)| (c, n))
            .collect();
        all.sort_unstable();
        all
    }
}

/// What sign-in keeps between requests: SIP2 connection pools, the JWKS cache, counters.
pub struct PatronDesk {
    /// `[patrons]`.
    pub config: PatronsConfig,
    /// SIP2 clients by institution, with the settings they were built from.
    sip2: std::sync::Mutex<HashMap<String, (Sip2Auth, Sip2Client)>>,
    oidc: Verifier,
    /// Outcomes.
    pub counters: SignInCounters,
}

impl std::fmt::Debug for PatronDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatronDesk").finish_non_exhaustive()
    }
}

impl PatronDesk {
    /// A desk with no pools yet; JWKS documents are fetched with `fetcher`.
    pub fn new(config: PatronsConfig, fetcher: Arc<dyn JwksFetcher>) -> Self {
        PatronDesk {
            config,
            sip2: std::sync::Mutex::default(),
            oidc: Verifier::new(fetcher),
            counters: SignInCounters::default(),
        }
    }

    /// Whether SIP2 may go to `host` without TLS: loopback, or a host the config lists.
    pub fn plaintext_allowed(&self, host: &str) -> bool {
        carrel_core::sip2::client::plaintext_allowed(host, &self.config.sip2_plaintext_hosts)
    }

    /// The institution's SIP2 client, built (or rebuilt, when the settings changed) on demand.
    fn sip2_client(&self, institution_id: &str, auth: &Sip2Auth) -> Sip2Client {
        let mut pools = self.sip2.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((settings, client)) = pools.get(institution_id)
            && settings == auth
        {
            return client.clone();
        }
        let client = Sip2Client::new(auth.client_settings(), None);
        pools.insert(institution_id.to_owned(), (auth.clone(), client.clone()));
        client
    }

    /// The counters of every SIP2 pool, for `/metrics`.
    pub fn sip2_stats(&self) -> Vec<carrel_core::sip2::client::Sip2Stats> {
        let pools = self.sip2.lock().unwrap_or_else(|p| p.into_inner());
        pools.values().map(|(_, c)| c.stats()).collect()
    }
}

/// Fetches JWKS documents over HTTP(S): 5 s per fetch, at most 1 MiB, redirects not followed.
#[derive(Clone)]
pub struct HttpJwksFetcher {
    client: crate::upstream::SideClient<http_body_util::Empty<Bytes>>,
}

impl std::fmt::Debug for HttpJwksFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpJwksFetcher")
    }
}

/// How long one JWKS fetch may take: sign-ins needing the keys wait on it.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

impl HttpJwksFetcher {
    /// A client with the webpki roots.
    pub fn new() -> Result<Self, rustls::Error> {
        let client = crate::upstream::side_client(JWKS_TIMEOUT)?;
        Ok(HttpJwksFetcher { client })
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("jwks_url: {e}"))?;
        let resp = self
            .client
            .get(uri)
            .await
            .map_err(|e| format!("fetching the JWKS: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("the JWKS answered {}", resp.status()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the JWKS: {e}"))?;
        Ok(body.to_bytes().to_vec())
    }
}

impl JwksFetcher for HttpJwksFetcher {
    fn fetch(
        &self,
        url: &str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + '_>> {
        let url = url.to_owned();
        Box::pin(async move {
            tokio::time::timeout(JWKS_TIMEOUT, self.get(&url))
                .await
                .map_err(|_| "the JWKS did not answer in time".to_owned())?
        })
    }
}

/// A sign-in body: exactly one of the three forms.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInBody {
    card: Option<String>,
    pin: Option<String>,
    id_token: Option<String>,
    guest_code: Option<String>,
}

enum Way {
    Card { card: String, pin: String },
    IdToken(String),
    Guest(String),
}

fn parse_body(bytes: &[u8]) -> Result<Way, SignInError> {
    let body: SignInBody = serde_json::from_slice(bytes).map_err(|e| {
        // serde's message names the field, never its value.
        SignInError::InvalidRequest(format!("The sign-in body is not valid: {e}"))
    })?;
    let bounded = |name: &str, v: &str, max: usize| {
        if v.trim().is_empty() || v.len() > max {
            Err(SignInError::InvalidRequest(format!(
                "`{name}` must be 1 to {max} characters."
            )))
        } else {
            Ok(())
        }
    };
    match body {
        SignInBody {
            card: Some(card),
            pin: Some(pin),
            id_token: None,
            guest_code: None,
        } => {
            bounded("card", &card, 64)?;
            bounded("pin", &pin, 64)?;
            Ok(Way::Card {
                card: card.trim().to_owned(),
                pin,
            })
        }
        SignInBody {
            card: None,
            pin: None,
            id_token: Some(t),
            guest_code: None,
        } => {
            bounded("id_token", &t, 8192)?;
            Ok(Way::IdToken(t))
        }
        SignInBody {
            card: None,
            pin: None,
            id_token: None,
            guest_code: Some(c),
        } => {
            bounded("guest_code", &c, 64)?;
            Ok(Way::Guest(c))
        }
        _ => Err(SignInError::InvalidRequest(
            "Send {\"card\",\"pin\"}, {\"id_token\"} or {\"guest_code\"}.".into(),
        )),
    }
}

/// Who signed in, before the session is made.
struct Patron {
    patron_ref: String,
    age_band: AgeBand,
    group_id: Option<String>,
    guest_pass: Option<(String, u64, i64)>,
    /// The card, for SIP2's End Patron Session at sign-out (sealed, never stored as is).
    sip2_card: Option<String>,
}

/// `POST /v1/patron/sessions`, counted by outcome.
pub async fn sign_in(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let result = open_session(state, req).await;
    let outcome = result.as_ref().map_or_else(GatewayError::code, |_| "ok");
    state.patron_desk.counters.count(outcome);
    result
}

async fn open_session(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let token = crate::pipeline::authenticate::bearer(req.headers())
        .ok_or(GatewayError::MissingApiKey)?
        .to_owned();
    let kiosk = crate::pipeline::authenticate::key_principal(state, &token).await?;
    if kiosk.key_kind != KeyKind::Kiosk {
        return Err(SignInError::NotAKiosk.into());
    }
    let bytes = read_small(req.into_body()).await?;
    let desk = &state.patron_desk;
    let attempts = state
        .store
        .count_attempt(&format!("kiosk:{}", kiosk.key_id), Duration::from_secs(60))
        .await
        .map_err(|_| GatewayError::StateUnavailable)?;
    if attempts > desk.config.sign_ins_per_kiosk_per_minute {
        return Err(SignInError::Throttled.into());
    }
    let way = parse_body(&bytes)?;
    let patron = check(state, &kiosk, way).await?;

    let now = unix_now();
    let mut expires_at = now + desk.config.session_max.as_secs() as i64;
    if let Some((_, _, pass_end)) = &patron.guest_pass {
        expires_at = expires_at.min(*pass_end);
    }
    let token = NewKey::generate_with(SESSION_PREFIX);
    let secret = token.secret();
    let session = NewPatronSession {
        id: token.id.clone(),
        secret_hash: state.pepper.hash_secret(secret),
        institution_id: kiosk.institution_id.to_string(),
        kiosk_key_id: kiosk.key_id.to_string(),
        patron_ref: patron.patron_ref,
        age_band: patron.age_band,
        group_id: patron.group_id,
        guest_pass_id: patron.guest_pass.as_ref().map(|(id, _, _)| id.clone()),
        allowance: patron.guest_pass.as_ref().map(|(_, tokens, _)| *tokens),
        created_at: now,
        expires_at,
        sealed_end: patron
            .sip2_card
            .as_deref()
            .map(|card| carrel_core::patrons::seal_for_sign_out(secret, card)),
    };
    let live = sessions::open(state, session).await?;
    let body = SessionCreated {
        token: token.token,
        session: SessionView::of(state, &live).await,
    };
    Ok(body::json(
        StatusCode::CREATED,
        serde_json::to_vec(&body).expect("a new session serialises"),
    ))
}

async fn read_small(body: Incoming) -> Result<Bytes, GatewayError> {
    let limited = http_body_util::Limited::new(body, MAX_SIGN_IN_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(GatewayError::BodyTooLarge {
            limit: MAX_SIGN_IN_BYTES,
        }),
        Err(_) => Err(GatewayError::BodyReadFailed),
    }
}

/// Checks the credentials of one sign-in.
async fn check(state: &AppState, kiosk: &Principal, way: Way) -> Result<Patron, GatewayError> {
    let institution = &*kiosk.institution_id;
    let auth = || async {
        state
            .store
            .patron_auth(institution)
            .await
            .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))
    };
    match way {
        // Any institution's staff may hand out guest passes, whatever its patrons sign in with.
        Way::Guest(code) => guest(state, kiosk, &code).await,
        Way::Card { card, pin } => {
            let patron_ref = state.pepper.patron_ref(institution, &card);
            let lock = format!("lock:{patron_ref}");
            locked(state, &lock).await?;
            let result = match &auth().await? {
                Some(PatronAuth::Sip2(sip2)) => sip2_check(state, kiosk, sip2, &card, &pin).await,
                Some(PatronAuth::Local {}) => {
                    local_check(state, institution, &patron_ref, pin).await
                }
                _ => Err(SignInError::NotEnabled("a library card").into()),
            };
            match result {
                Ok(mut patron) => {
                    let _ = state.store.take_flag(&format!("fail:{patron_ref}")).await;
                    patron.patron_ref = patron_ref;
                    Ok(patron)
                }
                Err(GatewayError::SignIn(SignInError::InvalidCredentials)) => {
                    failed(state, &patron_ref, &lock).await;
                    Err(SignInError::InvalidCredentials.into())
                }
                Err(e) => Err(e),
            }
        }
        Way::IdToken(id_token) => {
            let Some(PatronAuth::Oidc(settings)) = &auth().await? else {
                return Err(SignInError::NotEnabled("a school sign-in").into());
            };
            let today = today(&kiosk.timezone);
            let identity = state
                .patron_desk
                .oidc
                .verify(settings, &id_token, unix_now(), today)
                .await
                .map_err(SignInError::IdToken)?;
            let nonce = identity.nonce.as_deref().ok_or(SignInError::NonceInvalid)?;
            if nonce.len() > 128
                || !state
                    .store
                    .take_flag(&format!("nonce:{nonce}"))
                    .await
                    .map_err(|_| GatewayError::StateUnavailable)?
            {
                return Err(SignInError::NonceInvalid.into());
            }
            let group_id = match &identity.group {
                Some(name) => group_by_name(state, institution, name).await?,
                None => None,
            };
            Ok(Patron {
                patron_ref: state.pepper.patron_ref(institution, &identity.canonical_id),
                age_band: identity.age_band,
                group_id,
                guest_pass: None,
                sip2_card: None,
            })
        }
    }
}

/// Refuses a locked card or pass.
async fn locked(state: &AppState, lock: &str) -> Result<(), GatewayError> {
    match state.store.attempts(lock).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(SignInError::CardLocked(LOCKOUT_WINDOW.as_secs() / 60).into()),
        // Without the shared counts a lockout cannot be honoured: refuse rather than let a
        // PIN be guessed on every replica.
        Err(_) => Err(GatewayError::StateUnavailable),
    }
}

/// Counts a wrong PIN or code; the last allowed one locks.
async fn failed(state: &AppState, subject: &str, lock: &str) {
    match state
        .store
        .count_attempt(&format!("fail:{subject}"), LOCKOUT_WINDOW)
        .await
    {
        Ok(n) if n >= LOCKOUT_FAILURES => {
            if let Err(e) = state.store.set_flag(lock, LOCKOUT_WINDOW).await {
                tracing::warn!(error = %e, "could not set a sign-in lockout");
            }
            let _ = state.store.take_flag(&format!("fail:{subject}")).await;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not count a failed sign-in"),
    }
}

async fn sip2_check(
    state: &AppState,
    kiosk: &Principal,
    auth: &Sip2Auth,
    card: &str,
    pin: &str,
) -> Result<Patron, GatewayError> {
    if !auth.tls && !state.patron_desk.plaintext_allowed(&auth.host) {
        tracing::error!(
            institution = %kiosk.institution_id,
            "SIP2 settings ask for plaintext to a host no longer allowed; refusing sign-in"
        );
        return Err(SignInError::IlsUnavailable.into());
    }
    let client = state.patron_desk.sip2_client(&kiosk.institution_id, auth);
    let check = client.check_patron(card, pin).await.map_err(|e| {
        tracing::warn!(institution = %kiosk.institution_id, error = ?e, "SIP2 patron check failed");
        match e {
            Sip2ClientError::Unavailable(_) => SignInError::IlsUnavailable,
            Sip2ClientError::LoginRefused => SignInError::IlsLoginRefused,
            Sip2ClientError::BadReply => SignInError::IlsBadReply,
        }
    })?;
    match check {
        PatronCheck::Authenticated {
            patron_type,
            birth_date,
        } => Ok(Patron {
            patron_ref: String::new(),
            age_band: auth.age_band(patron_type.as_deref(), birth_date, today(&kiosk.timezone)),
            group_id: None,
            guest_pass: None,
            sip2_card: Some(card.to_owned()),
        }),
        PatronCheck::UnknownPatron | PatronCheck::WrongPin => {
            Err(SignInError::InvalidCredentials.into())
        }
        PatronCheck::Blocked => Err(SignInError::PatronBlocked.into()),
    }
}

async fn local_check(
    state: &AppState,
    institution: &str,
    patron_ref: &str,
    pin: String,
) -> Result<Patron, GatewayError> {
    let found = state
        .store
        .local_patron(institution, patron_ref)
        .await
        .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?;
    let (hash, band) = match found {
        Some((hash, band)) => (Some(hash), band),
        None => (None, AgeBand::Unknown),
    };
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(hash) => carrel_core::passwords::verify(&pin, &hash),
        None => {
            // The same work for an unknown card, so timing does not tell which cards exist.
            carrel_core::passwords::verify_nobody(&pin);
            false
        }
    })
    .await
    .unwrap_or(false);
    if !ok {
        return Err(SignInError::InvalidCredentials.into());
    }
    Ok(Patron {
        patron_ref: String::new(),
        age_band: band,
        group_id: None,
        guest_pass: None,
        sip2_card: None,
    })
}

async fn guest(state: &AppState, kiosk: &Principal, typed: &str) -> Result<Patron, GatewayError> {
    let code = GuestCode::parse(typed).ok_or(SignInError::InvalidGuestCode)?;
    let lock = format!("lock:{}", code.pass_id);
    locked(state, &lock).await?;
    let pass = state
        .store
        .guest_pass(&code.pass_id)
        .await
        .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?
        .filter(|p| *p.institution_id == *kiosk.institution_id);
    let hash = pass.as_ref().map(|p| p.code_hash.clone());
    let secret = code.secret.clone();
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(hash) => carrel_core::passwords::verify(&secret, &hash),
        None => {
            carrel_core::passwords::verify_nobody(&secret);
            false
        }
    })
    .await
    .unwrap_or(false);
    let Some(pass) = pass.filter(|_| ok) else {
        failed(state, &code.pass_id, &lock).await;
        return Err(SignInError::InvalidGuestCode.into());
    };
    if unix_now() >= pass.expires_at {
        return Err(SignInError::GuestPassExpired.into());
    }
    let patron_ref = state
        .pepper
        .patron_ref(&kiosk.institution_id, &format!("guest:{}", pass.id));
    let used = state
        .quota
        .usage_now(
            &kiosk.institution_id,
            &kiosk.timezone,
            Level::Patron,
            &patron_ref,
        )
        .await
        .day_tokens;
    if used >= pass.tokens {
        return Err(SignInError::GuestPassExhausted.into());
    }
    Ok(Patron {
        patron_ref,
        age_band: AgeBand::Unknown,
        group_id: None,
        guest_pass: Some((pass.id, pass.tokens, pass.expires_at)),
        sip2_card: None,
    })
}

async fn group_by_name(
    state: &AppState,
    institution: &str,
    name: &str,
) -> Result<Option<String>, GatewayError> {
    let groups = state
        .store
        .list_groups(institution, carrel_core::store::PageRequest::ALL)
        .await
        .map_err(|e| GatewayError::StoreUnavailable(Arc::new(e)))?;
    Ok(groups
        .data
        .into_iter()
        .find(|g| g.name == name)
        .map(|g| g.id))
}

fn today(timezone: &str) -> jiff::civil::Date {
    let zone = jiff::tz::TimeZone::get(timezone).unwrap_or(jiff::tz::TimeZone::UTC);
    jiff::Timestamp::now().to_zoned(zone).date()
}

/// `POST /v1/patron/sessions`'s answer: the token, and the session as the patron sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionCreated {
    /// The session token (`crs_…`): a bearer token on `/v1/*` until the session ends. Not
    /// shown again.
    pub token: String,
    /// The session.
    #[serde(flatten)]
    pub session: SessionView,
}

/// A session as the patron sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    /// RFC 3339: the session's absolute end.
    pub expires_at: String,
    /// Seconds without a request after which the session ends.
    pub idle_timeout_seconds: u64,
    /// `under13`, `minor`, `adult` or `unknown`.
    pub age_band: &'static str,
    /// The patron's day.
    pub quota: PatronQuota,
}

/// What a patron has left today.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PatronQuota {
    /// Tokens a day, or `null` for no daily limit.
    pub limit: Option<u64>,
    /// Tokens used today (requests in flight included).
    pub used: u64,
    /// Tokens left today, or `null` for no daily limit.
    pub remaining: Option<u64>,
    /// RFC 3339: when the day renews (local midnight).
    pub resets_at: Option<String>,
}

impl SessionView {
    async fn of(state: &AppState, session: &sessions::CachedSession) -> SessionView {
        let principal = &session.principal;
        let patron = principal
            .patron
            .as_ref()
            .expect("a session's principal has a patron");
        let subject = Subject {
            principal: Arc::clone(principal),
            patron: Some(Arc::clone(&patron.patron_ref)),
            model: None,
        };
        let levels = state.quota.status_now(&subject).await;
        let quota = levels
            .iter()
            .find(|l| l.level == Level::Patron)
            .map(|l| PatronQuota {
                limit: l.limits.tokens_per_day,
                used: l.usage.day_tokens,
                remaining: l
                    .limits
                    .tokens_per_day
                    .map(|lim| lim.saturating_sub(l.usage.day_tokens)),
                resets_at: Some(l.usage.day_resets_at.to_string()),
            })
            .unwrap_or(PatronQuota {
                limit: None,
                used: 0,
                remaining: None,
                resets_at: None,
            });
        SessionView {
            expires_at: jiff::Timestamp::from_second(session.expires_at)
                .map(|t| t.to_string())
                .unwrap_or_default(),
            idle_timeout_seconds: state.patron_desk.config.session_idle.as_secs(),
            age_band: patron.age_band.as_str(),
            quota,
        }
    }
}

/// `GET /v1/patron/sessions/current`.
pub async fn current(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let token = session_token(req)?;
    let session = sessions::live_session(state, token).await?;
    let view = SessionView::of(state, &session).await;
    Ok(body::json(
        StatusCode::OK,
        serde_json::to_vec(&view).expect("a session view serialises"),
    ))
}

/// `DELETE /v1/patron/sessions/current`: ends the session, and the patron's SIP2 session.
pub async fn sign_out(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let token = session_token(req)?;
    let session = sessions::live_session(state, token).await?;
    let principal = &session.principal;
    let id = principal
        .patron
        .as_ref()
        .map(|p| Arc::clone(&p.session_id))
        .expect("a session's principal has a patron");
    sessions::end(state, &id).await;
    if let Some(sealed) = &session.sealed_end {
        let secret = carrel_core::keys::ParsedKey::parse_with(SESSION_PREFIX, token)
            .map(|p| p.secret)
            .unwrap_or_default();
        if let (Some(card), Ok(Some(PatronAuth::Sip2(auth)))) = (
            carrel_core::patrons::open_for_sign_out(secret, sealed),
            state.store.patron_auth(&principal.institution_id).await,
        ) {
            let client = state
                .patron_desk
                .sip2_client(&principal.institution_id, &auth);
            // Best effort, within the client's own timeout: the session here has ended
            // whatever the ILS says.
            match client.end_session(&card).await {
                Ok(()) => {
                    state
                        .patron_desk
                        .counters
                        .sip2_end_sessions
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::info!(error = ?e, "SIP2 end patron session failed"),
            }
        }
    }
    let mut resp = Response::new(body::full(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    Ok(resp)
}

fn session_token(req: &Request<Incoming>) -> Result<&str, GatewayError> {
    let token =
        crate::pipeline::authenticate::bearer(req.headers()).ok_or(GatewayError::MissingApiKey)?;
    if sessions::is_session_token(token) {
        Ok(token)
    } else {
        Err(SignInError::SessionExpired.into())
    }
}

/// `POST /v1/patron/oidc-nonce`: a single-use nonce for the app to put in its OIDC request.
pub async fn oidc_nonce(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let token =
        crate::pipeline::authenticate::bearer(req.headers()).ok_or(GatewayError::MissingApiKey)?;
    let kiosk = crate::pipeline::authenticate::key_principal(state, token).await?;
    if kiosk.key_kind != KeyKind::Kiosk {
        return Err(SignInError::NotAKiosk.into());
    }
    let nonce = carrel_core::ids::random_base62(32);
    state
        .store
        .set_flag(&format!("nonce:{nonce}"), NONCE_TTL)
        .await
        .map_err(|_| GatewayError::StateUnavailable)?;
    let expires_at =
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(NONCE_TTL.as_secs() as i64);
    let body = OidcNonce {
        nonce,
        expires_at: expires_at.to_string(),
    };
    Ok(body::json(
        StatusCode::CREATED,
        serde_json::to_vec(&body).expect("a nonce serialises"),
    ))
}

/// `POST /v1/patron/oidc-nonce`'s answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OidcNonce {
    /// Put it in the OIDC request; the ID token must carry it. Usable once.
    pub nonce: String,
    /// RFC 3339: after this it is refused.
    pub expires_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_statuses_are_client_or_server_errors() {
        let all = SignInError::one_of_each();
        let codes: std::collections::HashSet<_> = all.iter().map(SignInError::code).collect();
        assert_eq!(codes.len(), all.len());
        for e in &all {
            assert!(e.status().is_client_error() || e.status().is_server_error());
        }
    }

    #[test]
    fn a_sign_in_body_is_exactly_one_form() {
        assert!(matches!(
            parse_body(br#"{"card":" 123 ","pin":"1"}"#),
            Ok(Way::Card { card, .. }) if card == "123"
        ));
        assert!(matches!(
            parse_body(br#"{"id_token":"x"}"#),
            Ok(Way::IdToken(_))
        ));
        assert!(matches!(
            parse_body(br#"{"guest_code":"x"}"#),
            Ok(Way::Guest(_))
        ));
        for bad in [
            &br#"{"card":"1"}"#[..],
            br#"{"card":"1","pin":"2","guest_code":"x"}"#,
            br#"{}"#,
            br#"{"card":"","pin":"1"}"#,
            br#"{"card":1,"pin":"1"}"#,
            br#"{"card":"1","pin":"1","name":"Ana"}"#,
            b"not json",
        ] {
            let err = parse_body(bad).err().expect("refused");
            assert_eq!(err.code(), "invalid_sign_in");
        }
        // The message names fields, never what was typed.
        let err = parse_body(br#"{"card":"2123400","pin":7}"#).err().unwrap();
        assert!(!err.to_string().contains("2123400"));
    }
}
