//! Patrons: how an institution signs them in, and the few secrets that sign-in handles.
//!
//! A patron is never stored as who they are. Every way in — a library card checked over SIP2,
//! a card on a local list, a school's ID token, a guest code — ends in a **patron reference**,
//! `HMAC-SHA256(pepper, institution ‖ canonical id)` ([`crate::keys::Pepper::patron_ref`]), an
//! [`AgeBand`], and perhaps a group. Card numbers, PINs, names and birth dates stay in the
//! request that carried them.
//!
//! This module holds the settings of each way in ([`PatronAuth`]), the guest-code format, and
//! the sealing of what sign-out must give back to the library's system.

use std::collections::BTreeMap;

use ring::aead;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::AgeBand;
use crate::oidc::OidcSettings;
use crate::sip2::client::Sip2Settings;
use crate::sip2::{Charset, Framing};

/// How an institution's patrons sign in (`PUT /admin/v1/institutions/{id}/patron-auth`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PatronAuth {
    /// Library card and PIN, checked against the library's own system over SIP2.
    Sip2(Sip2Auth),
    /// Library card and PIN, checked against a list the institution imported.
    Local {},
    /// A school's identity provider: the app signs the student in and hands over the ID token.
    Oidc(OidcSettings),
}

impl PatronAuth {
    /// The `kind` name.
    pub fn kind(&self) -> &'static str {
        match self {
            PatronAuth::Sip2(_) => "sip2",
            PatronAuth::Local {} => "local",
            PatronAuth::Oidc(_) => "oidc",
        }
    }
}

/// SIP2 settings of one institution. The two passwords are write-only in the admin API.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sip2Auth {
    /// The ILS's SIP2 host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// TLS (native). Plaintext only to loopback or an allow-listed host.
    pub tls: bool,
    /// `CN` of 93 Login.
    pub login_user: String,
    /// `CO` of 93 Login.
    pub login_password: String,
    /// `CP` of 93 Login.
    pub location_code: String,
    /// `AO`: the institution id the ILS expects.
    pub institution_id: String,
    /// `AC`, when the ILS wants one.
    #[serde(default)]
    pub terminal_password: Option<String>,
    /// Error detection (`AY`/`AZ`).
    pub checksums: bool,
    /// The wire charset.
    pub charset: Charset,
    /// The message terminator: `"\r"` (the default) or `"\r\n"`.
    #[serde(default = "default_terminator")]
    pub terminator: String,
    /// Per-request timeout, milliseconds (default 5000).
    #[serde(default = "default_sip2_timeout_ms")]
    pub timeout_ms: u64,
    /// Patron type (`ZY`, `PT` or `PC` of the reply) → age band. A patron whose type is not
    /// listed gets the band of their `PB` birth date when the ILS sends one, else `unknown`.
    #[serde(default)]
    pub age_bands: BTreeMap<String, AgeBand>,
}

impl std::fmt::Debug for Sip2Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client settings' Debug already hides both passwords.
        f.debug_struct("Sip2Auth")
            .field("client", &self.client_settings())
            .field("age_bands", &self.age_bands)
            .finish()
    }
}

fn default_terminator() -> String {
    "\r".to_owned()
}

fn default_sip2_timeout_ms() -> u64 {
    5000
}

/// Most a SIP2 request may be given, milliseconds.
pub const MAX_SIP2_TIMEOUT_MS: u64 = 30_000;

impl Sip2Auth {
    /// The framing these settings ask for.
    pub fn framing(&self) -> Framing {
        Framing {
            terminator: b'\r',
            line_feed: self.terminator == "\r\n",
            error_detection: self.checksums,
            charset: self.charset,
        }
    }

    /// What the SIP2 client needs of these settings.
    pub fn client_settings(&self) -> Sip2Settings {
        Sip2Settings {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            login_user: self.login_user.clone(),
            login_password: self.login_password.clone(),
            location_code: self.location_code.clone(),
            institution_id: self.institution_id.clone(),
            terminal_password: self.terminal_password.clone(),
            framing: self.framing(),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            max_connections: crate::sip2::client::DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// Checks what serde cannot: a reason per field, named by its key.
    pub fn validate(&self, plaintext_allowed: impl Fn(&str) -> bool) -> Result<(), String> {
        let text = |name: &str, value: &str, max: usize| {
            if value.is_empty() || value.len() > max {
                Err(format!("`{name}` must be 1 to {max} bytes"))
            } else if value.contains(['|', '\r', '\n']) {
                Err(format!("`{name}` may not contain `|` or line breaks"))
            } else {
                Ok(())
            }
        };
        text("host", &self.host, 253)?;
        if self.port == 0 {
            return Err("`port` must be 1 to 65535".into());
        }
        text("login_user", &self.login_user, 128)?;
        text("login_password", &self.login_password, 128)?;
        text("location_code", &self.location_code, 128)?;
        text("institution_id", &self.institution_id, 128)?;
        if let Some(ac) = &self.terminal_password {
            text("terminal_password", ac, 128)?;
        }
        if !matches!(self.terminator.as_str(), "\r" | "\r\n") {
            return Err(r#"`terminator` must be "\r" or "\r\n""#.into());
        }
        if !(100..=MAX_SIP2_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(format!("`timeout_ms` must be 100 to {MAX_SIP2_TIMEOUT_MS}"));
        }
        if !self.tls && !plaintext_allowed(&self.host) {
            return Err(format!(
                "plaintext SIP2 to `{}` is refused: use \"tls\": true, or add the host to \
                 `patrons.sip2_plaintext_hosts` in the config",
                self.host
            ));
        }
        Ok(())
    }

    /// The band of a patron from what the ILS said about them (neither is kept).
    pub fn age_band(
        &self,
        patron_type: Option<&str>,
        birth_date: Option<jiff::civil::Date>,
        today: jiff::civil::Date,
    ) -> AgeBand {
        if let Some(band) = patron_type.and_then(|t| self.age_bands.get(t.trim())) {
            return *band;
        }
        birth_date
            .map(|born| AgeBand::of_age(years_between(born, today)))
            .unwrap_or(AgeBand::Unknown)
    }
}

/// Whole years from `born` to `today` (negative if `born` is later).
pub fn years_between(born: jiff::civil::Date, today: jiff::civil::Date) -> i64 {
    let mut years = i64::from(today.year()) - i64::from(born.year());
    if (today.month(), today.day()) < (born.month(), born.day()) {
        years -= 1;
    }
    years
}

/// The alphabet of guest codes: Crockford's base 32, which has no I, L, O or U, so a code read
/// aloud or off paper is typed right.
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters of a guest code that name the pass (looked up) and that prove it (hashed).
const CODE_ID_LEN: usize = 6;
const CODE_SECRET_LEN: usize = 6;

/// A guest code as printed: `XXXX-XXXX-XXXX`. The first six characters name the pass, the
/// other six (30 bits, argon2id-hashed at rest, behind the kiosk throttle and the lockout)
/// prove it.
#[derive(Clone, PartialEq, Eq)]
pub struct GuestCode {
    /// The pass's lookup id (`gp_` + the first six characters).
    pub pass_id: String,
    /// The secret part.
    pub secret: String,
}

impl std::fmt::Debug for GuestCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestCode")
            .field("pass_id", &self.pass_id)
            .finish_non_exhaustive()
    }
}

impl GuestCode {
    /// A new random code.
    pub fn generate() -> GuestCode {
        let bytes = crate::ids::random_bytes::<{ CODE_ID_LEN + CODE_SECRET_LEN }>();
        let text: String = bytes
            .iter()
            .map(|b| char::from(CODE_ALPHABET[usize::from(b & 31)]))
            .collect();
        let (id, secret) = text.split_at(CODE_ID_LEN);
        GuestCode {
            pass_id: format!("gp_{id}"),
            secret: secret.to_owned(),
        }
    }

    /// Reads a code as a person typed it: any case, with or without dashes and spaces, `O` for
    /// zero and `I`/`L` for one. `None` when it cannot be a code.
    pub fn parse(typed: &str) -> Option<GuestCode> {
        let mut text = String::with_capacity(CODE_ID_LEN + CODE_SECRET_LEN);
        for c in typed.chars() {
            let c = match c.to_ascii_uppercase() {
                '-' | ' ' => continue,
                'O' => '0',
                'I' | 'L' => '1',
                c => c,
            };
            if !c.is_ascii() || !CODE_ALPHABET.contains(&(c as u8)) {
                return None;
            }
            text.push(c);
            if text.len() > CODE_ID_LEN + CODE_SECRET_LEN {
                return None;
            }
        }
        if text.len() != CODE_ID_LEN + CODE_SECRET_LEN {
            return None;
        }
        let (id, secret) = text.split_at(CODE_ID_LEN);
        Some(GuestCode {
            pass_id: format!("gp_{id}"),
            secret: secret.to_owned(),
        })
    }

    /// The code as printed for the guest.
    pub fn printed(&self) -> String {
        let id = self.pass_id.trim_start_matches("gp_");
        let all = format!("{id}{}", self.secret);
        format!("{}-{}-{}", &all[..4], &all[4..8], &all[8..])
    }
}

/// What sign-out must send the library's system (the card, for SIP2 35 End Patron Session),
/// sealed under a key derived from the session token's secret. The store keeps only the sealed
/// bytes; the secret lives in the patron's token alone, so nothing kept at rest — in SQLite,
/// in Redis, in a backup — gives the card back.
pub fn seal_for_sign_out(session_secret: &str, card: &str) -> Vec<u8> {
    let key = sealing_key(session_secret);
    let nonce = crate::ids::random_bytes::<12>();
    let mut data = card.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::empty(),
        &mut data,
    )
    .expect("sealing a short text cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    out
}

/// Opens what [`seal_for_sign_out`] sealed; `None` for the wrong secret or damaged bytes.
pub fn open_for_sign_out(session_secret: &str, sealed: &[u8]) -> Option<String> {
    if sealed.len() < 12 + aead::CHACHA20_POLY1305.tag_len() {
        return None;
    }
    let (nonce, data) = sealed.split_at(12);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut data = data.to_vec();
    let plain = sealing_key(session_secret)
        .open_in_place(nonce, aead::Aad::empty(), &mut data)
        .ok()?;
    String::from_utf8(plain.to_vec()).ok()
}

fn sealing_key(session_secret: &str) -> aead::LessSafeKey {
    let digest = Sha256::new()
        .chain_update(b"carrel patron sign-out\0")
        .chain_update(session_secret.as_bytes())
        .finalize();
    let key = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &digest)
        .expect("a 32-byte key fits ChaCha20-Poly1305");
    aead::LessSafeKey::new(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_by_kind_and_hide_passwords() {
        let json = r#"{"kind":"sip2","host":"127.0.0.1","port":6001,"tls":false,
            "login_user":"kiosk","login_password":"s3cret-login","location_code":"main",
            "institution_id":"lib","terminal_password":"s3cret-ac","checksums":true,
            "charset":"utf-8"}"#;
        let auth: PatronAuth = serde_json::from_str(json).unwrap();
        let PatronAuth::Sip2(sip2) = &auth else {
            panic!("{auth:?}")
        };
        assert_eq!((sip2.terminator.as_str(), sip2.timeout_ms), ("\r", 5000));
        assert!(!sip2.framing().line_feed);
        let mut crlf = sip2.clone();
        crlf.terminator = "\r\n".into();
        assert!(crlf.framing().line_feed && crlf.validate(|_| true).is_ok());
        let debug = format!("{auth:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert_eq!(sip2.validate(|_| true), Ok(()));
        assert!(sip2.validate(|_| false).unwrap_err().contains("plaintext"));

        let local: PatronAuth = serde_json::from_str(r#"{"kind":"local"}"#).unwrap();
        assert_eq!(local, PatronAuth::Local {});
        let unknown = serde_json::from_str::<PatronAuth>(r#"{"kind":"local","x":1}"#);
        assert!(unknown.is_err());
        let oidc: PatronAuth = serde_json::from_str(
            r#"{"kind":"oidc","issuer":"https://idp","audience":"carrel","jwks_url":"https://idp/jwks"}"#,
        )
        .unwrap();
        assert_eq!(oidc.kind(), "oidc");
    }

    #[test]
    fn age_bands_come_from_the_patron_type_then_the_birth_date() {
        let mut sip2: Sip2Auth = serde_json::from_str(
            r#"{"host":"h","port":1,"tls":true,"login_user":"u","login_password":"p",
            "location_code":"l","institution_id":"i","checksums":false,"charset":"utf-8",
            "age_bands":{"JUV":"minor","ADULT":"adult"}}"#,
        )
        .unwrap();
        let today = jiff::civil::date(2026, 11, 27);
        assert_eq!(sip2.age_band(Some("JUV"), None, today), AgeBand::Minor);
        let born = jiff::civil::date(2016, 11, 28);
        assert_eq!(
            sip2.age_band(Some("X"), Some(born), today),
            AgeBand::Under13
        );
        let born = jiff::civil::date(2008, 11, 27);
        assert_eq!(sip2.age_band(None, Some(born), today), AgeBand::Adult);
        assert_eq!(sip2.age_band(None, None, today), AgeBand::Unknown);
        sip2.terminator = "\n".into();
        assert!(sip2.validate(|_| true).is_err());
    }

    #[test]
    fn guest_codes_print_and_parse_forgivingly() {
        for _ in 0..50 {
            let code = GuestCode::generate();
            let printed = code.printed();
            assert_eq!(printed.len(), 14, "{printed}");
            assert_eq!(GuestCode::parse(&printed), Some(code.clone()));
            let sloppy = printed.to_lowercase().replace('-', " ");
            assert_eq!(GuestCode::parse(&sloppy), Some(code.clone()));
            assert!(!format!("{code:?}").contains(&code.secret));
        }
        let read = GuestCode::parse("0O1I-L000-0000").unwrap();
        assert_eq!(read.pass_id, "gp_001110");
        assert_eq!(GuestCode::parse("ABCD-EFGH-JKM"), None);
        assert_eq!(GuestCode::parse("ABCD-EFGH-JKMNP"), None);
        assert_eq!(
            GuestCode::parse("ABCD-EFGH-JKMU"),
            None,
            "U is not in the alphabet"
        );
    }

    #[test]
    fn the_card_opens_only_with_the_session_secret() {
        let sealed = seal_for_sign_out("secret-a", "21234000123456");
        assert!(!sealed.windows(14).any(|w| w == b"21234000123456"));
        assert_eq!(
            open_for_sign_out("secret-a", &sealed).as_deref(),
            Some("21234000123456")
        );
        assert_eq!(open_for_sign_out("secret-b", &sealed), None);
        let mut damaged = sealed.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(open_for_sign_out("secret-a", &damaged), None);
        assert_eq!(open_for_sign_out("secret-a", &sealed[..10]), None);
    }

    #[test]
    fn years_count_birthdays() {
        let d = jiff::civil::date;
        assert_eq!(years_between(d(2000, 2, 29), d(2026, 2, 28)), 25);
        assert_eq!(years_between(d(2000, 2, 29), d(2026, 3, 1)), 26);
    }
}
