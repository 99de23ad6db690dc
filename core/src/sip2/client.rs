//! The SIP2 client: the self-check side of the protocol, signing patrons in against one
//! institution's library system (its ACS) over TCP or TLS.
//!
//! Connections are pooled: each new one logs in with 93 first, then serves many 63 (patron
//! information) and 35 (end patron session) exchanges; idle ones are reused newest first and
//! closed after [`IDLE_LIMIT`]. With error detection on, damaged replies are asked for again
//! (97), and the ACS's requests to resend (96) are honoured, [`MAX_RESENDS`] times each. Every
//! operation, waiting for a connection included, is bounded by [`Sip2Settings::timeout`], and a
//! circuit breaker stops calling a system that keeps failing ([`BREAKER_THRESHOLD`] failures in
//! a row open it for [`BREAKER_COOL_DOWN`]).
//!
//! Card numbers, PINs, passwords and what the system says about a patron are never logged, and
//! the `Debug` output of every type here leaves them out.

use std::fmt;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::{Framing, Reply, Request, transaction_date};

/// How long one operation may take by default, waiting for a connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many connections to one system may be open at once by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;
/// The longest reply accepted; a longer one is a [`Sip2ClientError::BadReply`].
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// How many times a damaged reply is asked for again (97), and how many times the ACS may ask
/// for a message again (96), before the exchange fails.
pub const MAX_RESENDS: u32 = 3;
/// How long a connection may sit idle and still be reused: systems often end quiet sessions.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How many failed operations in a row open the circuit breaker.
pub const BREAKER_THRESHOLD: u32 = 5;
/// How long an open circuit breaker fails calls before it lets one trial call through.
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(30);

/// Settings for one institution's ILS connection.
#[derive(Clone)]
pub struct Sip2Settings {
    /// The ACS's host name or IP address (also the TLS server name).
    pub host: String,
    /// The ACS's port.
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
    /// The terminal's login user (`CN`).
    pub login_user: String,
    /// The terminal's login password (`CO`); a secret.
    pub login_password: String,
    /// The terminal's location code (`CP`).
    pub location_code: String,
    /// The institution id (`AO`).
    pub institution_id: String,
    /// The terminal password (`AC`), sent when configured; a secret.
    pub terminal_password: Option<String>,
    /// Terminator, error detection and character set.
    pub framing: Framing,
    /// The bound on one operation: waiting for a connection, connecting, logging in and the
    /// exchange itself.
    pub timeout: Duration,
    /// How many connections may be open at once (at least one is).
    pub max_connections: usize,
}

impl Default for Sip2Settings {
    /// Port 6001, no TLS, the default framing, [`DEFAULT_TIMEOUT`] and
    /// [`DEFAULT_MAX_CONNECTIONS`]; every name empty.
    fn default() -> Self {
        Sip2Settings {
            host: String::new(),
            port: 6001,
            tls: false,
            login_user: String::new(),
            login_password: String::new(),
            location_code: String::new(),
            institution_id: String::new(),
            terminal_password: None,
            framing: Framing::default(),
            timeout: DEFAULT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl fmt::Debug for Sip2Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sip2Settings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("login_user", &self.login_user)
            .field("login_password", &"<redacted>")
            .field("location_code", &self.location_code)
            .field("institution_id", &self.institution_id)
            .field(
                "terminal_password",
                &self.terminal_password.as_ref().map(|_| "<redacted>"),
            )
            .field("framing", &self.framing)
            .field("timeout", &self.timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// What the library system said about a card and its PIN.
#[derive(Clone, PartialEq, Eq)]
pub enum PatronCheck {
    /// The card is valid (`BL=Y`), the PIN right (`CQ=Y`), and the patron not blocked.
    Authenticated {
        /// The patron's type or group: the first of the vendor fields `ZY` (patron type), `PT`
        /// (patron group) and `PC` present. Only for the caller's age band; never logged.
        patron_type: Option<String>,
        /// The birth date (`PB`, `YYYYMMDD`) when it parses. Only for the caller's age band;
        /// never logged.
        birth_date: Option<jiff::civil::Date>,
    },
    /// The card is not a patron's (`BL` is not `Y`).
    UnknownPatron,
    /// The card is valid but the PIN is wrong (`CQ` is not `Y`, or missing).
    WrongPin,
    /// A valid card and PIN, but the library blocks it: charge privileges denied (patron status
    /// position 0) or card reported lost (position 4).
    Blocked,
}

impl fmt::Debug for PatronCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What the library knows of a patron is not for logs.
        f.write_str(match self {
            PatronCheck::Authenticated { .. } => "Authenticated { .. }",
            PatronCheck::UnknownPatron => "UnknownPatron",
            PatronCheck::WrongPin => "WrongPin",
            PatronCheck::Blocked => "Blocked",
        })
    }
}

/// Why the library system could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnavailableReason {
    /// The TCP connection could not be made.
    Connect,
    /// The operation took longer than [`Sip2Settings::timeout`].
    Timeout,
    /// The connection was closed or failed mid-exchange.
    Closed,
    /// The circuit breaker is open: the call was refused without touching the network.
    CircuitOpen,
    /// The TLS handshake failed (or the host is not a valid TLS server name).
    Tls,
}

impl UnavailableReason {
    /// A short name for logs and metrics: `connect`, `timeout`, `closed`, `circuit_open`, `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnavailableReason::Connect => "connect",
            UnavailableReason::Timeout => "timeout",
            UnavailableReason::Closed => "closed",
            UnavailableReason::CircuitOpen => "circuit_open",
            UnavailableReason::Tls => "tls",
        }
    }
}

impl fmt::Display for UnavailableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Sip2ClientError {
    /// Could not connect, timed out, connection dropped, or the circuit breaker is open.
    #[error("the library system is unavailable ({0})")]
    Unavailable(UnavailableReason),
    /// The ILS refused the 93 login (94 ok is not 1), or the login cannot be written in the
    /// configured charset: a configuration problem.
    #[error("the library system refused the SIP2 login")]
    LoginRefused,
    /// Replies stayed malformed, failed their checksum or answered another request after the
    /// allowed resends, or were too long.
    #[error("the library system's SIP2 replies stayed malformed")]
    BadReply,
}

/// Counters for metrics, since the client was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sip2Stats {
    /// Operations asked for (patron checks and session ends).
    pub requests: u64,
    /// Operations that failed (refusals by the circuit breaker included).
    pub failures: u64,
    /// Whether the circuit breaker is open (or letting its trial call through).
    pub breaker_open: bool,
    /// Messages sent again: 97 requests for a damaged reply, and messages the ACS asked for
    /// again with 96.
    pub resends: u64,
}

/// Whether plain TCP (no TLS) may be used to reach `host`: only on this machine (`localhost`,
/// 127.0.0.0/8, `::1`) or to a host named in `allow_list` (compared case-insensitively).
pub fn plaintext_allowed(host: &str, allow_list: &[String]) -> bool {
    let bare = unbracket(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if bare
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
    {
        return true;
    }
    allow_list
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(host))
}

/// `::1` from `[::1]`: how IPv6 addresses are written in URLs.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A pooled SIP2 client for one institution's system. Cloning is cheap and shares the pool.
#[derive(Clone)]
pub struct Sip2Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Sip2Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sip2Client")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: Sip2Settings,
    /// Set when `settings.tls`; `None` then only if no TLS configuration could be made.
    tls: Option<TlsConnector>,
    /// One permit per open connection, idle or in use.
    permits: Arc<Semaphore>,
    /// Idle, logged-in connections, the most recently used last.
    idle: Mutex<Vec<Conn>>,
    /// Signalled when a connection goes back to `idle`.
    returned: Notify,
    breaker: Mutex<Breaker>,
    requests: AtomicU64,
    failures: AtomicU64,
    resends: AtomicU64,
    clock: Clock,
}

impl Sip2Client {
    /// A client for the system `settings` name. `tls` is the rustls client configuration used
    /// when `settings.tls` (`None`: the webpki roots). No connection is made until needed.
    pub fn new(settings: Sip2Settings, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        Self::with_clock(settings, tls, Clock::default())
    }

    fn with_clock(
        mut settings: Sip2Settings,
        tls: Option<Arc<rustls::ClientConfig>>,
        clock: Clock,
    ) -> Self {
        settings.max_connections = settings.max_connections.max(1);
        let tls = if settings.tls {
            let config = tls.or_else(default_tls_config);
            if config.is_none() {
                tracing::warn!(host = %settings.host, "no TLS configuration for SIP2");
            }
            config.map(TlsConnector::from)
        } else {
            None
        };
        let permits = Arc::new(Semaphore::new(settings.max_connections));
        Sip2Client {
            inner: Arc::new(Inner {
                settings,
                tls,
                permits,
                idle: Mutex::new(Vec::new()),
                returned: Notify::new(),
                breaker: Mutex::new(Breaker::default()),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                resends: AtomicU64::new(0),
                clock,
            }),
        }
    }

    /// 63 Patron Information (`AO`, `AA`, `AC` when configured, `AD`) on a pooled, logged-in
    /// connection: is this card a patron's, and is this its PIN?
    ///
    /// A card or PIN that cannot be written on the wire (holding `|`, a control character, or a
    /// character outside the charset) is no patron's: it is [`PatronCheck::UnknownPatron`],
    /// without asking the library system or counting against the circuit breaker.
    pub async fn check_patron(
        &self,
        card: &str,
        pin: &str,
    ) -> Result<PatronCheck, Sip2ClientError> {
        let s = &self.inner.settings;
        let request = Request::patron_information(
            &now_date(),
            &s.institution_id,
            card,
            pin,
            s.terminal_password.as_deref(),
        );
        match self.inner.call(&request, "64").await? {
            Some(reply) => Ok(classify(&reply)),
            None => Ok(PatronCheck::UnknownPatron),
        }
    }

    /// 35 End Patron Session for the card (`AO`, `AA`, `AC` when configured). Best effort: the
    /// caller may ignore a failure. A card that cannot be written on the wire had no session:
    /// nothing is sent.
    pub async fn end_session(&self, card: &str) -> Result<(), Sip2ClientError> {
        let s = &self.inner.settings;
        let request = Request::end_session(
            &now_date(),
            &s.institution_id,
            card,
            s.terminal_password.as_deref(),
        );
        self.inner.call(&request, "36").await.map(drop)
    }

    /// The counters since the client was made, and the circuit breaker's state.
    pub fn stats(&self) -> Sip2Stats {
        let inner = &self.inner;
        Sip2Stats {
            requests: inner.requests.load(Ordering::Relaxed),
            failures: inner.failures.load(Ordering::Relaxed),
            breaker_open: lock(&inner.breaker).is_open(),
            resends: inner.resends.load(Ordering::Relaxed),
        }
    }
}

/// The transaction date now, in local time.
fn now_date() -> String {
    transaction_date(jiff::Zoned::now().datetime())
}

/// A rustls configuration trusting the webpki roots, with ring.
fn default_tls_config() -> Option<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(Arc::new(config))
}

/// What a 64 reply says of the patron. The PIN is judged before any block, so a wrong PIN
/// learns nothing of the account.
fn classify(reply: &Reply) -> PatronCheck {
    if !reply.patron_valid() {
        return PatronCheck::UnknownPatron;
    }
    if !reply.patron_authenticated() {
        return PatronCheck::WrongPin;
    }
    let denied = |at: usize| {
        reply
            .privileges_denied()
            .and_then(|flags| flags.get(at))
            .is_some_and(|&flag| flag == b'Y')
    };
    // Position 0: charge privileges denied; position 4: card reported lost.
    if denied(0) || denied(4) {
        return PatronCheck::Blocked;
    }
    let patron_type = [b"ZY", b"PT", b"PC"].into_iter().find_map(|tag| {
        reply
            .field(tag)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    });
    let birth_date = reply
        .field(b"PB")
        .and_then(|value| parse_birth_date(&value));
    PatronCheck::Authenticated {
        patron_type,
        birth_date,
    }
}

/// `YYYYMMDD` (surrounding blanks ignored), when it is a date.
fn parse_birth_date(value: &str) -> Option<jiff::civil::Date> {
    let value = value.trim();
    if value.len() != 8 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year = value[..4].parse().ok()?;
    let month = value[4..6].parse().ok()?;
    let day = value[6..].parse().ok()?;
    jiff::civil::Date::new(year, month, day).ok()
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    /// One operation: checked by the circuit breaker, bounded by the timeout, counted. `None`
    /// when the request cannot be written (a patron's field holds what the wire cannot carry):
    /// then neither the breaker nor the network sees it.
    async fn call(
        &self,
        request: &Request,
        expect: &'static str,
    ) -> Result<Option<Reply>, Sip2ClientError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if request.encode(&self.settings.framing, 0).is_err() {
            return Ok(None);
        }
        let Some(admission) = lock(&self.breaker).admit(self.clock.now()) else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(Sip2ClientError::Unavailable(UnavailableReason::CircuitOpen));
        };
        let mut ticket = Ticket {
            inner: self,
            admission,
            settled: false,
        };
        let result = tokio::time::timeout(self.settings.timeout, self.attempt(request, expect))
            .await
            .unwrap_or(Err(Sip2ClientError::Unavailable(
                UnavailableReason::Timeout,
            )));
        ticket.settle(result.is_ok());
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        result.map(Some)
    }

    /// The exchange on a pooled connection; when a reused connection turns out to have been
    /// closed before answering, once more on a new one.
    async fn attempt(
        &self,
        request: &Request,
        expect: &'static str,
    ) -> Result<Reply, Sip2ClientError> {
        let mut conn = self.checkout().await?;
        match conn.exchange(request, expect, self).await {
            Ok(reply) => {
                self.checkin(conn);
                return Ok(reply);
            }
            Err(Failure::Stale) => {}
            Err(failure) => return Err(failure.into_error()),
        }
        tracing::debug!(host = %self.settings.host, "idle SIP2 connection was closed; reconnecting");
        // The others idle longer still: they are likely closed too.
        drop(std::mem::take(&mut *lock(&self.idle)));
        let mut conn = self.connect(conn.permit).await?;
        match conn.exchange(request, expect, self).await {
            Ok(reply) => {
                self.checkin(conn);
                Ok(reply)
            }
            Err(failure) => Err(failure.into_error()),
        }
    }

    /// An idle connection, or a new one when a permit frees up, whichever comes first.
    async fn checkout(&self) -> Result<Conn, Sip2ClientError> {
        loop {
            let returned = self.returned.notified();
            let mut returned = pin!(returned);
            // Registered before looking, so a connection returned meanwhile is not missed.
            returned.as_mut().enable();
            if let Some(conn) = self.take_idle() {
                return Ok(conn);
            }
            tokio::select! {
                biased;
                () = &mut returned => {}
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    let permit = permit
                        .map_err(|_| Sip2ClientError::Unavailable(UnavailableReason::Closed))?;
                    return self.connect(permit).await;
                }
            }
        }
    }

    /// The most recently used idle connection, closing those idle too long.
    fn take_idle(&self) -> Option<Conn> {
        let now = self.clock.now();
        let (conn, expired) = {
            let mut idle = lock(&self.idle);
            let live_from = idle
                .iter()
                .position(|c| now.saturating_duration_since(c.idle_since) < IDLE_LIMIT)
                .unwrap_or(idle.len());
            let expired: Vec<Conn> = idle.drain(..live_from).collect();
            (idle.pop(), expired)
        };
        drop(expired);
        conn
    }

    /// Back to the pool after a complete exchange.
    fn checkin(&self, mut conn: Conn) {
        conn.idle_since = self.clock.now();
        conn.reused = true;
        lock(&self.idle).push(conn);
        self.returned.notify_one();
    }

    /// A new connection, logged in.
    async fn connect(&self, permit: OwnedSemaphorePermit) -> Result<Conn, Sip2ClientError> {
        let s = &self.settings;
        let host = unbracket(&s.host);
        let tcp = TcpStream::connect((host, s.port))
            .await
            .map_err(|_| Sip2ClientError::Unavailable(UnavailableReason::Connect))?;
        // Messages are small and each waits for its reply.
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if s.tls {
            let tls_error = Sip2ClientError::Unavailable(UnavailableReason::Tls);
            let connector = self.tls.as_ref().ok_or(tls_error)?;
            let name = ServerName::try_from(host.to_owned()).map_err(|_| tls_error)?;
            Box::new(connector.connect(name, tcp).await.map_err(|_| tls_error)?)
        } else {
            Box::new(tcp)
        };
        let mut conn = Conn {
            io,
            buf: Vec::new(),
            seq: 0,
            idle_since: self.clock.now(),
            reused: false,
            permit,
        };
        let login = Request::login(&s.login_user, &s.login_password, &s.location_code);
        let reply = match conn.exchange(&login, "94", self).await {
            Ok(reply) => reply,
            // Credentials that cannot be written are a configuration problem too.
            Err(Failure::Unsendable) => {
                return Err(Sip2ClientError::LoginRefused);
            }
            Err(failure) => return Err(failure.into_error()),
        };
        if !reply.login_ok() {
            tracing::warn!(host = %s.host, "the library system refused the SIP2 login");
            return Err(Sip2ClientError::LoginRefused);
        }
        tracing::debug!(host = %s.host, port = s.port, "SIP2 connection opened");
        Ok(conn)
    }
}

/// A call let through by the circuit breaker, whose outcome it must hear.
struct Ticket<'a> {
    inner: &'a Inner,
    admission: Admission,
    settled: bool,
}

impl Ticket<'_> {
    fn settle(&mut self, ok: bool) {
        self.settled = true;
        let opened = lock(&self.inner.breaker).record(self.admission, ok, self.inner.clock.now());
        if opened {
            tracing::warn!(
                host = %self.inner.settings.host,
                "SIP2 circuit breaker opened after repeated failures"
            );
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // A trial call abandoned by its caller proves nothing: let the next one try.
        if !self.settled {
            lock(&self.inner.breaker).abandon(self.admission, self.inner.clock.now());
        }
    }
}

/// The time source for the breaker and idle ages: tokio's clock, or a hand-set one in tests.
#[derive(Clone, Default)]
struct Clock {
    #[cfg(test)]
    manual: Option<Arc<Mutex<Instant>>>,
}

impl Clock {
    fn now(&self) -> Instant {
        #[cfg(test)]
        if let Some(manual) = &self.manual {
            return *lock(manual);
        }
        Instant::now()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// Calls fail fast until `until`.
    Open { until: Instant },
    /// One trial call is out; others fail fast.
    Trial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Normal,
    Trial,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// Whether a call may go through now, and as what.
    fn admit(&mut self, now: Instant) -> Option<Admission> {
        match self.state {
            BreakerState::Closed { .. } => Some(Admission::Normal),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::Trial;
                Some(Admission::Trial)
            }
            BreakerState::Open { .. } | BreakerState::Trial => None,
        }
    }

    /// A call's outcome; true when it opened the breaker.
    fn record(&mut self, admission: Admission, ok: bool, now: Instant) -> bool {
        if ok {
            self.state = BreakerState::Closed { failures: 0 };
            return false;
        }
        let open = BreakerState::Open {
            until: now + BREAKER_COOL_DOWN,
        };
        match self.state {
            BreakerState::Closed { failures } if failures + 1 >= BREAKER_THRESHOLD => {
                self.state = open;
                true
            }
            BreakerState::Closed { failures } => {
                self.state = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            BreakerState::Trial if admission == Admission::Trial => {
                self.state = open;
                true
            }
            // A call let in before the breaker opened, failing late: it already counted.
            BreakerState::Trial | BreakerState::Open { .. } => false,
        }
    }

    /// A call dropped before its outcome: a trial's place goes to the next call.
    fn abandon(&mut self, admission: Admission, now: Instant) {
        if admission == Admission::Trial && self.state == BreakerState::Trial {
            self.state = BreakerState::Open { until: now };
        }
    }

    fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed { .. })
    }
}

/// A byte stream: TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A logged-in connection.
struct Conn {
    io: Box<dyn Io>,
    /// Bytes read past the end of the last message.
    buf: Vec<u8>,
    /// The next sequence number, 0–9.
    seq: u8,
    idle_since: Instant,
    /// Whether it served an exchange before this one (so may have been closed while idle).
    reused: bool,
    /// Its place among the open connections, given back when it closes.
    permit: OwnedSemaphorePermit,
}

/// How an exchange failed.
enum Failure {
    /// A reused connection failed before any reply came: closed while idle, likely.
    Stale,
    /// The request cannot be written in the framing's charset, or holds a delimiter.
    Unsendable,
    /// Anything else.
    Fatal(Sip2ClientError),
}

impl Failure {
    fn into_error(self) -> Sip2ClientError {
        match self {
            Failure::Stale => Sip2ClientError::Unavailable(UnavailableReason::Closed),
            // Patrons' requests are checked before any exchange; the login's is mapped to
            // `LoginRefused` where it is sent.
            Failure::Unsendable => Sip2ClientError::BadReply,
            Failure::Fatal(error) => error,
        }
    }
}

/// How reading a message failed.
enum ReadFailure {
    /// The connection failed or was closed.
    Lost,
    /// No terminator within [`MAX_REPLY_BYTES`].
    TooLong,
}

impl Conn {
    /// Sends `request` and reads its reply, a `expect` reply, asking for damaged replies again
    /// and sending the request again when the ACS asks.
    async fn exchange(
        &mut self,
        request: &Request,
        expect: &'static str,
        inner: &Inner,
    ) -> Result<Reply, Failure> {
        let framing = &inner.settings.framing;
        // Anything left over belongs to no request of ours.
        self.buf.clear();
        let seq = self.seq;
        self.seq = (seq + 1) % 10;
        let wire = request
            .encode(framing, seq)
            .map_err(|_| Failure::Unsendable)?;
        let mut heard = false;
        if self.send(&wire).await.is_err() {
            return Err(self.lost(heard));
        }
        let mut asked_again = 0;
        let mut resent = 0;
        loop {
            let raw = match self.read_message(framing.terminator, &mut heard).await {
                Ok(raw) => raw,
                Err(ReadFailure::TooLong) => return Err(Failure::Fatal(Sip2ClientError::BadReply)),
                Err(ReadFailure::Lost) => return Err(self.lost(heard)),
            };
            let good = match Reply::parse(&raw, framing) {
                // The ACS could not read our message: the same bytes again.
                Ok(reply) if reply.command == "96" => {
                    if resent >= MAX_RESENDS {
                        return Err(Failure::Fatal(Sip2ClientError::BadReply));
                    }
                    resent += 1;
                    inner.resends.fetch_add(1, Ordering::Relaxed);
                    if self.send(&wire).await.is_err() {
                        return Err(self.lost(heard));
                    }
                    continue;
                }
                Ok(reply) => {
                    let answers_ours = !framing.error_detection
                        || reply.sequence().is_none_or(|theirs| theirs == seq);
                    (answers_ours && reply.command == expect).then_some(reply)
                }
                Err(_) => None,
            };
            if let Some(reply) = good {
                return Ok(reply);
            }
            // Damaged, or an answer to something else: without error detection, nothing to
            // ask for.
            if !framing.error_detection || asked_again >= MAX_RESENDS {
                return Err(Failure::Fatal(Sip2ClientError::BadReply));
            }
            asked_again += 1;
            inner.resends.fetch_add(1, Ordering::Relaxed);
            let resend = Request::resend()
                .encode(framing, 0)
                .map_err(|_| Failure::Fatal(Sip2ClientError::BadReply))?;
            if self.send(&resend).await.is_err() {
                return Err(self.lost(heard));
            }
        }
    }

    /// The failure for a connection lost, `heard` telling whether any reply had begun.
    fn lost(&self, heard: bool) -> Failure {
        if self.reused && !heard {
            Failure::Stale
        } else {
            Failure::Fatal(Sip2ClientError::Unavailable(UnavailableReason::Closed))
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// The next message, without its terminator. Line ends before a message (the `\n` of a
    /// `\r\n`) are skipped. `heard` becomes true when any other byte arrives.
    async fn read_message(
        &mut self,
        terminator: u8,
        heard: &mut bool,
    ) -> Result<Vec<u8>, ReadFailure> {
        let mut chunk = [0u8; 4096];
        loop {
            let blank = self
                .buf
                .iter()
                .take_while(|&&b| b == b'\n' || b == b'\r')
                .count();
            self.buf.drain(..blank);
            if let Some(end) = self.buf.iter().position(|&b| b == terminator) {
                let mut message: Vec<u8> = self.buf.drain(..=end).collect();
                message.pop();
                return Ok(message);
            }
            if self.buf.len() > MAX_REPLY_BYTES {
                return Err(ReadFailure::TooLong);
            }
            let n = self
                .io
                .read(&mut chunk)
                .await
                .map_err(|_| ReadFailure::Lost)?;
            if n == 0 {
                return Err(ReadFailure::Lost);
            }
            let got = &chunk[..n];
            *heard |= got.iter().any(|&b| b != b'\n' && b != b'\r');
            self.buf.extend_from_slice(got);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use tokio::net::TcpListener;

    use super::super::{Charset, checksum};
    use super::*;

    const DATE: &str = "20261127    101500";

    /// How the fake ACS behaves; counters count down as they are used.
    #[derive(Default)]
    struct Script {
        /// Answers 93 with `940`.
        refuse_login: AtomicBool,
        /// Never answers.
        silent: bool,
        /// Ends replies with `\r\n`.
        crlf: bool,
        /// How many 64 replies (first sends and resends) to damage.
        corrupt: AtomicUsize,
        /// How many 64 replies to number wrongly.
        wrong_seq: AtomicUsize,
        /// How many 63 requests to answer with 96.
        ask_again: AtomicUsize,
        /// Closes the connection after this many 64 replies.
        close_after: Option<usize>,
    }

    /// An ACS on a local port, speaking the wire format by hand.
    struct Fake {
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
        /// Every message received, in order, without its terminator.
        seen: Arc<Mutex<Vec<Vec<u8>>>>,
        script: Arc<Script>,
    }

    impl Fake {
        async fn start(script: Script) -> Fake {
            Self::start_with(script, None).await
        }

        #[expect(
            clippy::disallowed_methods,
            reason = "the fake ACS lives as long as its test's runtime; nothing to drain"
        )]
        async fn start_with(script: Script, tls: Option<tokio_rustls::TlsAcceptor>) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let fake = Fake {
                addr: listener.local_addr().unwrap(),
                accepts: Arc::default(),
                seen: Arc::default(),
                script: Arc::new(script),
            };
            let (accepts, seen, script) = (
                Arc::clone(&fake.accepts),
                Arc::clone(&fake.seen),
                Arc::clone(&fake.script),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    accepts.fetch_add(1, Ordering::SeqCst);
                    let (seen, script, tls) = (Arc::clone(&seen), Arc::clone(&script), tls.clone());
                    tokio::spawn(async move {
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(tcp).await {
                                    serve(stream, &script, &seen).await;
                                }
                            }
                            None => serve(tcp, &script, &seen).await,
                        }
                    });
                }
            });
            fake
        }

        fn seen(&self) -> Vec<Vec<u8>> {
            lock(&self.seen).clone()
        }

        fn count(&self, command: &[u8]) -> usize {
            self.seen()
                .iter()
                .filter(|m| m.starts_with(command))
                .count()
        }

        fn settings(&self) -> Sip2Settings {
            Sip2Settings {
                host: "127.0.0.1".to_owned(),
                port: self.addr.port(),
                login_user: "kiosk".to_owned(),
                login_password: "s3cret-login".to_owned(),
                location_code: "MAIN".to_owned(),
                institution_id: "MAIN".to_owned(),
                ..Sip2Settings::default()
            }
        }

        fn client(&self) -> Sip2Client {
            Sip2Client::new(self.settings(), None)
        }
    }

    /// The value of variable field `tag` in a request whose fixed part ends at `from`.
    fn request_field(message: &[u8], from: usize, tag: &str) -> Option<String> {
        let text = String::from_utf8_lossy(message.get(from..)?).into_owned();
        text.split('|')
            .find_map(|f| f.strip_prefix(tag).map(str::to_owned))
    }

    /// `body` framed as the request was: with `AY`/`AZ` when it had them.
    fn frame(body: &str, seq: Option<u8>, crlf: bool) -> Vec<u8> {
        let mut out = body.as_bytes().to_vec();
        if let Some(seq) = seq {
            out.extend_from_slice(format!("AY{seq}AZ").as_bytes());
            let sum = checksum(&out);
            out.extend_from_slice(&sum);
        }
        out.extend_from_slice(if crlf { b"\r\n" } else { b"\r" });
        out
    }

    /// The 64 reply for a card and PIN. Cards: 1001 (with patron type and birth date), 1004
    /// (group and an unparsable date), 1002 (charge privileges denied), 1003 (card lost); PIN
    /// 1234. Any other card is unknown.
    fn patron_reply(card: &str, pin: &str) -> String {
        let (status, extra) = match card {
            "1001" => ("              ", "ZYadult|PTgroup|PB20100215|"),
            "1004" => ("              ", "PCstaff|PTgroup|PBsoon|"),
            "1002" => ("Y             ", ""),
            "1003" => ("    Y         ", ""),
            _ => {
                return format!(
                    "64              000{DATE}000000000000000000000000AOMAIN|AA{card}|AE|BLN|CQN|"
                );
            }
        };
        let cq = if pin == "1234" { "Y" } else { "N" };
        format!(
            "64{status}000{DATE}000000000000000000000000AOMAIN|AA{card}|AEAna Example|BLY|CQ{cq}|{extra}"
        )
    }

    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        script: &Script,
        seen: &Mutex<Vec<Vec<u8>>>,
    ) {
        let mut buf = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        let mut patron_replies = 0;
        let mut chunk = [0u8; 1024];
        loop {
            let message = loop {
                while buf.first() == Some(&b'\n') {
                    buf.remove(0);
                }
                if let Some(end) = buf.iter().position(|&b| b == b'\r') {
                    let mut message: Vec<u8> = buf.drain(..=end).collect();
                    message.pop();
                    break message;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            lock(seen).push(message.clone());
            if script.silent {
                continue;
            }
            // Mirror the request: error detection's fields when it had them.
            let n = message.len();
            let seq = (n >= 9 && &message[n - 9..n - 7] == b"AY")
                .then(|| message[n - 7].wrapping_sub(b'0'));
            let crlf = script.crlf;
            let (good, sent) = match message.get(..2) {
                Some(b"93") => {
                    let ok = if script.refuse_login.load(Ordering::SeqCst) {
                        "940"
                    } else {
                        "941"
                    };
                    let reply = frame(ok, seq, crlf);
                    (reply.clone(), reply)
                }
                Some(b"63") => {
                    if take(&script.ask_again) {
                        let mut ask = b"96AZFEF6".to_vec();
                        ask.extend_from_slice(if crlf { b"\r\n" } else { b"\r" });
                        stream.write_all(&ask).await.unwrap();
                        continue;
                    }
                    let card = request_field(&message, 33, "AA").unwrap_or_default();
                    let pin = request_field(&message, 33, "AD").unwrap_or_default();
                    let body = patron_reply(&card, &pin);
                    let good = frame(&body, seq, crlf);
                    let sent = if take(&script.wrong_seq) {
                        frame(&body, seq.map(|s| (s + 1) % 10), crlf)
                    } else {
                        damaged(&good, &script.corrupt)
                    };
                    patron_replies += 1;
                    (good, sent)
                }
                Some(b"35") => {
                    let card = request_field(&message, 20, "AA").unwrap_or_default();
                    let reply = frame(&format!("36Y{DATE}AOMAIN|AA{card}|"), seq, crlf);
                    (reply.clone(), reply)
                }
                Some(b"97") => {
                    let Some(good) = last.clone() else { continue };
                    let sent = damaged(&good, &script.corrupt);
                    (good, sent)
                }
                _ => continue,
            };
            stream.write_all(&sent).await.unwrap();
            last = Some(good);
            if script.close_after == Some(patron_replies) {
                return;
            }
        }
    }

    /// `reply`, with one byte changed while `corrupt` counts down.
    fn damaged(reply: &[u8], corrupt: &AtomicUsize) -> Vec<u8> {
        let mut out = reply.to_vec();
        if take(corrupt) {
            // In the patron's name: only the checksum tells.
            out[60] ^= 0x01;
        }
        out
    }

    fn authenticated(patron_type: &str, birth: Option<&str>) -> PatronCheck {
        PatronCheck::Authenticated {
            patron_type: Some(patron_type.to_owned()),
            birth_date: birth.map(|b| b.parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn a_patron_with_a_valid_card_and_pin_is_authenticated() {
        let fake = Fake::start(Script::default()).await;
        let client = fake.client();
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        // PT before PC; a birth date that is not one is left out.
        assert_eq!(
            client.check_patron("1004", "1234").await,
            Ok(authenticated("group", None))
        );
        let stats = client.stats();
        assert_eq!((stats.requests, stats.failures, stats.resends), (2, 0, 0));
        assert!(!stats.breaker_open);
    }

    #[tokio::test]
    async fn the_messages_are_the_standard_ones() {
        let fake = Fake::start(Script::default()).await;
        let client = Sip2Client::new(
            Sip2Settings {
                terminal_password: Some("term-pw".to_owned()),
                ..fake.settings()
            },
            None,
        );
        client.check_patron("1001", "1234").await.unwrap();
        client.end_session("1001").await.unwrap();
        let seen = fake.seen();
        let text: Vec<String> = seen
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("9300CNkiosk|COs3cret-login|CPMAIN|AY0AZ"),
            "{}",
            text[0]
        );
        // 63, language, an 18-character date, a blank summary, then the fields.
        let date = &text[1][5..23];
        assert!(date.is_ascii() && &date[8..12] == "    ", "{date:?}");
        assert_eq!(&text[1][..5], "63000");
        assert_eq!(&text[1][23..33], "          ");
        assert!(
            text[1][33..].starts_with("AOMAIN|AA1001|ACterm-pw|AD1234|AY1AZ"),
            "{}",
            text[1]
        );
        assert_eq!(&text[2][..2], "35");
        assert!(
            text[2][20..].starts_with("AOMAIN|AA1001|ACterm-pw|AY2AZ"),
            "{}",
            text[2]
        );
        for message in &seen {
            let (body, sum) = message.split_at(message.len() - 4);
            assert_eq!(checksum(body), sum);
        }
    }

    #[tokio::test]
    async fn a_wrong_pin_an_unknown_card_and_blocked_cards_are_told_apart() {
        let fake = Fake::start(Script::default()).await;
        let client = fake.client();
        assert_eq!(
            client.check_patron("1001", "0000").await,
            Ok(PatronCheck::WrongPin)
        );
        assert_eq!(
            client.check_patron("9999", "1234").await,
            Ok(PatronCheck::UnknownPatron)
        );
        assert_eq!(
            client.check_patron("1002", "1234").await,
            Ok(PatronCheck::Blocked)
        );
        assert_eq!(
            client.check_patron("1003", "1234").await,
            Ok(PatronCheck::Blocked)
        );
        // A blocked card with a wrong PIN learns nothing of the block.
        assert_eq!(
            client.check_patron("1002", "0000").await,
            Ok(PatronCheck::WrongPin)
        );
    }

    #[tokio::test]
    async fn a_refused_login_is_a_configuration_problem() {
        let fake = Fake::start(Script {
            refuse_login: AtomicBool::new(true),
            ..Script::default()
        })
        .await;
        assert_eq!(
            fake.client().check_patron("1001", "1234").await,
            Err(Sip2ClientError::LoginRefused)
        );
        assert_eq!(fake.count(b"63"), 0);
    }

    #[tokio::test]
    async fn a_damaged_reply_is_asked_for_again() {
        let fake = Fake::start(Script {
            corrupt: AtomicUsize::new(1),
            ..Script::default()
        })
        .await;
        let client = fake.client();
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        assert_eq!(fake.count(b"97"), 1);
        assert!(fake.seen().contains(&b"97AZFEF5".to_vec()));
        assert_eq!(client.stats().resends, 1);
        // The connection is still good.
        client.check_patron("1001", "1234").await.unwrap();
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reply_to_another_request_is_asked_for_again() {
        let fake = Fake::start(Script {
            wrong_seq: AtomicUsize::new(1),
            ..Script::default()
        })
        .await;
        assert_eq!(
            fake.client().check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        assert_eq!(fake.count(b"97"), 1);
    }

    #[tokio::test]
    async fn replies_that_stay_damaged_are_a_bad_reply_and_close_the_connection() {
        let fake = Fake::start(Script {
            corrupt: AtomicUsize::new(usize::MAX),
            ..Script::default()
        })
        .await;
        let client = fake.client();
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Err(Sip2ClientError::BadReply)
        );
        assert_eq!(fake.count(b"97"), MAX_RESENDS as usize);
        let stats = client.stats();
        assert_eq!((stats.failures, stats.resends), (1, 3));
        // The next check opens a new connection.
        let _ = client.check_patron("1001", "1234").await;
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn the_same_bytes_are_sent_again_when_the_acs_asks() {
        let fake = Fake::start(Script {
            ask_again: AtomicUsize::new(1),
            ..Script::default()
        })
        .await;
        let client = fake.client();
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        let requests: Vec<Vec<u8>> = fake
            .seen()
            .into_iter()
            .filter(|m| m.starts_with(b"63"))
            .collect();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0], requests[1]);
        assert_eq!(client.stats().resends, 1);
    }

    #[tokio::test]
    async fn an_acs_that_keeps_asking_again_is_a_bad_reply() {
        let fake = Fake::start(Script {
            ask_again: AtomicUsize::new(usize::MAX),
            ..Script::default()
        })
        .await;
        assert_eq!(
            fake.client().check_patron("1001", "1234").await,
            Err(Sip2ClientError::BadReply)
        );
        assert_eq!(fake.count(b"63"), 1 + MAX_RESENDS as usize);
    }

    #[tokio::test]
    async fn a_silent_acs_times_out() {
        let fake = Fake::start(Script {
            silent: true,
            ..Script::default()
        })
        .await;
        let client = Sip2Client::new(
            Sip2Settings {
                timeout: Duration::from_millis(200),
                ..fake.settings()
            },
            None,
        );
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Err(Sip2ClientError::Unavailable(UnavailableReason::Timeout))
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client = Sip2Client::new(
            Sip2Settings {
                host: "127.0.0.1".to_owned(),
                port,
                ..Sip2Settings::default()
            },
            None,
        );
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Err(Sip2ClientError::Unavailable(UnavailableReason::Connect))
        );
        assert_eq!(
            client.end_session("1001").await,
            Err(Sip2ClientError::Unavailable(UnavailableReason::Connect))
        );
    }

    #[tokio::test]
    async fn input_that_cannot_be_sent_is_no_patron_and_is_not_sent() {
        let fake = Fake::start(Script::default()).await;
        let client = Sip2Client::new(
            Sip2Settings {
                framing: Framing {
                    charset: Charset::Ibm850,
                    ..Framing::default()
                },
                ..fake.settings()
            },
            None,
        );
        for (card, pin) in [("1001|AD1234", "x"), ("1001", "12\r34"), ("1001", "日本")] {
            assert_eq!(
                client.check_patron(card, pin).await,
                Ok(PatronCheck::UnknownPatron)
            );
        }
        assert_eq!(client.end_session("1001\n").await, Ok(()));
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 0);
        let stats = client.stats();
        assert_eq!((stats.requests, stats.failures), (4, 0));
        // Login credentials that cannot be written are a configuration problem.
        let client = Sip2Client::new(
            Sip2Settings {
                login_password: "pass|word".to_owned(),
                ..fake.settings()
            },
            None,
        );
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Err(Sip2ClientError::LoginRefused)
        );
    }

    fn manual_clock() -> (Clock, Arc<Mutex<Instant>>) {
        let now = Arc::new(Mutex::new(Instant::now()));
        (
            Clock {
                manual: Some(Arc::clone(&now)),
            },
            now,
        )
    }

    #[tokio::test]
    async fn the_breaker_opens_after_repeated_failures_and_closes_after_a_good_trial() {
        let fake = Fake::start(Script {
            refuse_login: AtomicBool::new(true),
            ..Script::default()
        })
        .await;
        let (clock, now) = manual_clock();
        let client = Sip2Client::with_clock(fake.settings(), None, clock);
        for _ in 0..BREAKER_THRESHOLD {
            assert_eq!(
                client.check_patron("1001", "1234").await,
                Err(Sip2ClientError::LoginRefused)
            );
        }
        assert!(client.stats().breaker_open);
        let circuit_open = Err(Sip2ClientError::Unavailable(UnavailableReason::CircuitOpen));
        // Open: calls fail without connecting.
        assert_eq!(client.check_patron("1001", "1234").await, circuit_open);
        assert_eq!(
            client
                .end_session("1001")
                .await
                .map(|()| PatronCheck::Blocked),
            circuit_open
        );
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 5);
        *lock(&now) += BREAKER_COOL_DOWN - Duration::from_secs(1);
        assert_eq!(client.check_patron("1001", "1234").await, circuit_open);
        // After the cool-down one trial goes through; it fails, and the breaker reopens.
        *lock(&now) += Duration::from_secs(1);
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Err(Sip2ClientError::LoginRefused)
        );
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 6);
        assert_eq!(client.check_patron("1001", "1234").await, circuit_open);
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 6);
        // The next trial succeeds and closes it.
        fake.script.refuse_login.store(false, Ordering::SeqCst);
        *lock(&now) += BREAKER_COOL_DOWN;
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        assert!(!client.stats().breaker_open);
        assert_eq!(
            client.check_patron("1001", "0000").await,
            Ok(PatronCheck::WrongPin)
        );
        let stats = client.stats();
        assert_eq!((stats.requests, stats.failures), (12, 10));
    }

    #[test]
    fn a_success_resets_the_count_of_failures() {
        let mut breaker = Breaker::default();
        let now = Instant::now();
        for _ in 0..BREAKER_THRESHOLD - 1 {
            assert_eq!(breaker.admit(now), Some(Admission::Normal));
            assert!(!breaker.record(Admission::Normal, false, now));
        }
        breaker.record(Admission::Normal, true, now);
        for _ in 0..BREAKER_THRESHOLD - 1 {
            breaker.record(Admission::Normal, false, now);
        }
        assert!(!breaker.is_open());
        assert!(breaker.record(Admission::Normal, false, now));
        assert_eq!(breaker.admit(now), None);
        // A trial abandoned by its caller lets the next call try.
        let later = now + BREAKER_COOL_DOWN;
        assert_eq!(breaker.admit(later), Some(Admission::Trial));
        assert_eq!(breaker.admit(later), None);
        breaker.abandon(Admission::Trial, later);
        assert_eq!(breaker.admit(later), Some(Admission::Trial));
    }

    #[tokio::test]
    async fn sequential_checks_share_one_logged_in_connection() {
        let fake = Fake::start(Script::default()).await;
        let client = fake.client();
        client.check_patron("1001", "1234").await.unwrap();
        client.clone().check_patron("9999", "1234").await.unwrap();
        client.end_session("1001").await.unwrap();
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
        assert_eq!(fake.count(b"93"), 1);
        assert_eq!(fake.count(b"63"), 2);
        // Sequence numbers go on from the login's.
        let seqs: Vec<u8> = fake.seen().iter().map(|m| m[m.len() - 7] - b'0').collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
    }

    #[tokio::test]
    async fn concurrent_checks_wait_for_the_only_connection() {
        let fake = Fake::start(Script::default()).await;
        let client = Sip2Client::new(
            Sip2Settings {
                max_connections: 1,
                ..fake.settings()
            },
            None,
        );
        let (a, b, c) = tokio::join!(
            client.check_patron("1001", "1234"),
            client.check_patron("1002", "1234"),
            client.check_patron("9999", "1234"),
        );
        assert_eq!(a, Ok(authenticated("adult", Some("2010-02-15"))));
        assert_eq!(b, Ok(PatronCheck::Blocked));
        assert_eq!(c, Ok(PatronCheck::UnknownPatron));
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_replaced() {
        let fake = Fake::start(Script::default()).await;
        let (clock, now) = manual_clock();
        let client = Sip2Client::with_clock(fake.settings(), None, clock);
        client.check_patron("1001", "1234").await.unwrap();
        *lock(&now) += IDLE_LIMIT;
        client.check_patron("1001", "1234").await.unwrap();
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 2);
        assert_eq!(fake.count(b"93"), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_once() {
        let fake = Fake::start(Script {
            close_after: Some(1),
            ..Script::default()
        })
        .await;
        let client = fake.client();
        client.check_patron("1001", "1234").await.unwrap();
        assert_eq!(
            client.check_patron("1002", "1234").await,
            Ok(PatronCheck::Blocked)
        );
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 2);
        assert_eq!(client.stats().failures, 0);
    }

    #[tokio::test]
    async fn replies_ending_in_crlf_are_read() {
        let fake = Fake::start(Script {
            crlf: true,
            ..Script::default()
        })
        .await;
        // Carrel sends `\r\n` too, as a system that ends its replies so may want.
        let client = Sip2Client::new(
            Sip2Settings {
                framing: Framing {
                    line_feed: true,
                    ..Framing::default()
                },
                ..fake.settings()
            },
            None,
        );
        for _ in 0..2 {
            assert_eq!(
                client.check_patron("1001", "1234").await,
                Ok(authenticated("adult", Some("2010-02-15")))
            );
        }
        client.end_session("1001").await.unwrap();
        assert_eq!(fake.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn without_error_detection_messages_carry_no_checksum() {
        let fake = Fake::start(Script::default()).await;
        let client = Sip2Client::new(
            Sip2Settings {
                framing: Framing {
                    error_detection: false,
                    ..Framing::default()
                },
                ..fake.settings()
            },
            None,
        );
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        assert!(
            fake.seen()
                .iter()
                .all(|m| !m.windows(2).any(|w| w == b"AZ"))
        );
    }

    #[tokio::test]
    async fn a_patron_is_checked_over_tls() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = certified.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let fake = Fake::start_with(
            Script::default(),
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
        )
        .await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let settings = Sip2Settings {
            host: "localhost".to_owned(),
            tls: true,
            ..fake.settings()
        };
        let client = Sip2Client::new(settings.clone(), Some(Arc::new(client_config)));
        assert_eq!(
            client.check_patron("1001", "1234").await,
            Ok(authenticated("adult", Some("2010-02-15")))
        );
        // The webpki roots do not trust a self-signed certificate.
        let untrusting = Sip2Client::new(settings, None);
        assert_eq!(
            untrusting.check_patron("1001", "1234").await,
            Err(Sip2ClientError::Unavailable(UnavailableReason::Tls))
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let settings = Sip2Settings {
            host: "ils.example.org".to_owned(),
            login_password: "login-secret".to_owned(),
            terminal_password: Some("terminal-secret".to_owned()),
            ..Sip2Settings::default()
        };
        let client = Sip2Client::new(settings.clone(), None);
        for shown in [format!("{settings:?}"), format!("{client:?}")] {
            assert!(shown.contains("ils.example.org"), "{shown}");
            assert!(
                !shown.contains("login-secret") && !shown.contains("terminal-secret"),
                "{shown}"
            );
        }
        let check = authenticated("adult", Some("2010-02-15"));
        let shown = format!("{check:?}");
        assert!(
            !shown.contains("adult") && !shown.contains("2010"),
            "{shown}"
        );
    }

    #[test]
    fn plaintext_is_allowed_only_on_this_machine_or_where_configured() {
        let allow = vec!["ils.internal".to_owned()];
        for host in [
            "localhost",
            "LocalHost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(plaintext_allowed(host, &[]), "{host}");
        }
        assert!(plaintext_allowed("ILS.Internal", &allow));
        for host in [
            "ils.example.org",
            "10.0.0.1",
            "::2",
            "localhost.example.org",
            "",
        ] {
            assert!(!plaintext_allowed(host, &allow), "{host}");
        }
    }

    #[test]
    fn birth_dates_parse_only_when_they_are_dates() {
        assert_eq!(
            parse_birth_date("20100215"),
            Some(jiff::civil::date(2010, 2, 15))
        );
        for value in ["2010021", "20101315", "2010-02-15", "", "２０１００２１５"] {
            assert_eq!(parse_birth_date(value), None, "{value}");
        }
    }
}
