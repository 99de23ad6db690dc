//! API keys: the `crl_` format, the server pepper and the keyed hash of secrets.
//!
//! A key reads `crl_<id>_<secret><check>`: a 16-character public id (the lookup handle, safe to
//! log), a 32-character secret (≈190 bits from the OS CSPRNG) and a 6-character CRC32 checksum of
//! everything before it, so scanners and the gateway can reject noise without a store lookup. All
//! parts are base62, so a double-click selects the whole key.
//!
//! Secrets are high-entropy, so a slow KDF buys nothing: the store keeps
//! HMAC-SHA256(pepper, secret) and the gateway compares digests in constant time.

use std::fs;
use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::ids;

/// The prefix every Carrel key starts with.
pub const KEY_PREFIX: &str = "crl_";
/// The prefix of a patron session token: the same layout as a key, told apart at a glance.
pub const SESSION_PREFIX: &str = "crs_";
/// Length of the public id.
pub const ID_LEN: usize = 16;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Length of a whole key string.
pub const KEY_LEN: usize = KEY_PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECK_LEN;

/// Environment variable that supplies the pepper (64 hex characters) instead of the data dir.
pub const PEPPER_ENV: &str = "CARREL_PEPPER";
const PEPPER_FILE: &str = "pepper";

/// A freshly minted key: the string is shown to its owner once and never stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// The public id.
    pub id: String,
    /// The whole key string, `crl_…`.
    pub token: String,
}

impl NewKey {
    /// Mints a key with a new random id and secret.
    pub fn generate() -> Self {
        NewKey::generate_with(KEY_PREFIX)
    }

    /// Mints a token of the same layout under another prefix ([`SESSION_PREFIX`]).
    pub fn generate_with(prefix: &'static str) -> Self {
        let id = ids::random_base62(ID_LEN);
        let token = compose_with(prefix, &id, &ids::random_base62(SECRET_LEN));
        NewKey { id, token }
    }

    /// The secret part of the token.
    pub fn secret(&self) -> &str {
        ParsedKey::parse_with(&self.token[..KEY_PREFIX.len()], &self.token)
            .expect("a generated key parses")
            .secret
    }
}

/// The key string for an id and a secret, with its checksum.
pub fn compose(id: &str, secret: &str) -> String {
    compose_with(KEY_PREFIX, id, secret)
}

fn compose_with(prefix: &str, id: &str, secret: &str) -> String {
    let body = format!("{prefix}{id}_{secret}");
    let check = checksum(&body);
    body + &check
}

/// A presented key, split into its parts after the format and checksum were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// The public id.
    pub id: &'a str,
    /// The secret.
    pub secret: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// Splits a key string; `None` for anything that is not a well-formed Carrel key.
    pub fn parse(token: &'a str) -> Option<Self> {
        ParsedKey::parse_with(KEY_PREFIX, token)
    }

    /// Splits a token of the key layout under another four-character prefix.
    pub fn parse_with(prefix: &str, token: &'a str) -> Option<Self> {
        // ASCII first: the splits below are at byte offsets.
        if prefix.len() != KEY_PREFIX.len()
            || token.len() != KEY_LEN
            || !token.is_ascii()
            || !token.starts_with(prefix)
        {
            return None;
        }
        let rest = &token[prefix.len()..];
        let (id, tail) = rest.split_at(ID_LEN);
        let tail = tail.strip_prefix('_')?;
        let (secret, check) = tail.split_at(SECRET_LEN);
        if !ids::is_base62(id) || !ids::is_base62(secret) || !ids::is_base62(check) {
            return None;
        }
        let body = &token[..token.len() - CHECK_LEN];
        if checksum(body) != check {
            return None;
        }
        Some(ParsedKey { id, secret })
    }
}

fn checksum(body: &str) -> String {
    ids::base62_fixed(u64::from(crc32fast::hash(body.as_bytes())), CHECK_LEN)
}

/// The server-wide secret that keys the hash of API key secrets, held as the HMAC state it
/// keys: every request hashes its key's secret, and keying HMAC-SHA256 is half of that work.
#[derive(Clone)]
pub struct Pepper(Hmac<Sha256>);

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper(..)")
    }
}

/// Why the pepper could not be had.
#[derive(Debug, thiserror::Error)]
pub enum PepperError {
    /// The environment variable is not 64 hex characters.
    #[error("{PEPPER_ENV}: expected 64 hex characters (32 bytes)")]
    BadEnv,
    /// The file in the data dir could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The pepper file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file in the data dir is not 32 bytes.
    #[error("{0}: expected exactly 32 bytes")]
    BadFile(String),
}

impl Pepper {
    /// A pepper from raw bytes (tests and tools).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Pepper(Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC takes a key of any length"))
    }

    /// The pepper from `CARREL_PEPPER` when given, else from `<data_dir>/pepper`, created with
    /// fresh random bytes (mode 0600) at first start.
    pub fn load_or_create(data_dir: &Path, env: Option<&str>) -> Result<Self, PepperError> {
        if let Some(hex_text) = env {
            let bytes = hex::decode(hex_text.trim()).map_err(|_| PepperError::BadEnv)?;
            return bytes
                .try_into()
                .map(Pepper::from_bytes)
                .map_err(|_| PepperError::BadEnv);
        }
        let path = data_dir.join(PEPPER_FILE);
        let io = |source| PepperError::Io {
            path: path.display().to_string(),
            source,
        };
        match fs::read(&path) {
            Ok(bytes) => bytes
                .try_into()
                .map(Pepper::from_bytes)
                .map_err(|_| PepperError::BadFile(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = ids::random_bytes::<32>();
                let mut options = fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&path).map_err(io)?;
                file.write_all(&bytes).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(Pepper::from_bytes(bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// HMAC-SHA256 of a key secret.
    pub fn hash_secret(&self, secret: &str) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The reference a patron is known by inside one institution: a keyed hash of the id the
    /// institution knows them by (a card number, a student id, an application's user id), so
    /// the id itself is never stored, logged or sent upstream. Surrounding whitespace is not
    /// part of the id.
    pub fn patron_ref(&self, institution_id: &str, patron_id: &str) -> String {
        let mut mac = self.0.clone();
        // Domain-separated from key secrets, and from other institutions' patrons.
        mac.update(b"carrel patron\0");
        mac.update(institution_id.as_bytes());
        mac.update(b"\0");
        mac.update(patron_id.trim().as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("pat_{}", hex::encode(&digest[..16]))
    }

    /// The key an incident's request hash is made with: the content hash
    /// (`carrel_core::safeguards::request_hash`, already per institution) keyed again with the
    /// pepper, so that no one without the server's secret can confirm a guessed prompt from an
    /// exported record or a webhook.
    pub fn incident_hash(&self, content_hash: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(b"carrel incident\0");
        mac.update(content_hash.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether `secret` hashes to `stored`, compared in constant time.
    pub fn verify_secret(&self, secret: &str, stored: &[u8; 32]) -> bool {
        self.hash_secret(secret).ct_eq(stored).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored key hashes and patron references must never change: HMAC-SHA256 as any other
    /// implementation computes it (these values are from Python's `hmac`).
    #[test]
    fn hashes_are_plain_hmac_sha256() {
        let pepper = Pepper::from_bytes([7; 32]);
        assert_eq!(
            hex::encode(pepper.hash_secret("abc")),
            "127da4ced6a839b8f6118bc244684d2663e70cb5ff0adeefca89d7e74d5a0525"
        );
        // The keyed state is reused, not consumed.
        assert_eq!(pepper.hash_secret("abc"), pepper.hash_secret("abc"));
        assert_eq!(
            pepper.patron_ref("inst_a", "21234000123456"),
            "pat_3a053f257ea59fec2522e393f53510b7"
        );
    }

    #[test]
    fn patron_refs_are_stable_per_institution_and_hide_the_id() {
        let pepper = Pepper::from_bytes([7; 32]);
        let a = pepper.patron_ref("inst_a", " 21234000123456 ");
        assert_eq!(a, pepper.patron_ref("inst_a", "21234000123456"));
        assert_ne!(a, pepper.patron_ref("inst_b", "21234000123456"));
        assert!(a.starts_with("pat_") && a.len() == 36 && !a.contains("1234000"));
    }

    #[test]
    fn generated_keys_parse_back() {
        let key = NewKey::generate();
        assert_eq!(key.token.len(), KEY_LEN);
        let parsed = ParsedKey::parse(&key.token).unwrap();
        assert_eq!(parsed.id, key.id);
        assert_eq!(parsed.secret, key.secret());

        let session = NewKey::generate_with(SESSION_PREFIX);
        assert!(session.token.starts_with("crs_"));
        assert_eq!(ParsedKey::parse(&session.token), None, "not a key");
        let parsed = ParsedKey::parse_with(SESSION_PREFIX, &session.token).unwrap();
        assert_eq!((parsed.id, parsed.secret), (&*session.id, session.secret()));
        assert_eq!(ParsedKey::parse_with(SESSION_PREFIX, &key.token), None);
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let key = NewKey::generate();
        let mut bytes = key.token.clone().into_bytes();
        let i = KEY_PREFIX.len() + ID_LEN + 5;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        assert!(ParsedKey::parse(std::str::from_utf8(&bytes).unwrap()).is_none());
        assert!(ParsedKey::parse("crl_short").is_none());
        assert!(ParsedKey::parse("sk-not-a-carrel-key").is_none());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}", n in 0usize..80) {
            let _ = ParsedKey::parse(&s);
            // Strings of exactly the key's length, multi-byte characters included.
            let padded: String = s.chars().chain(std::iter::repeat('é')).take(n).collect();
            let _ = ParsedKey::parse(&padded);
            let mut exact = format!("{KEY_PREFIX}{s}");
            while exact.len() < KEY_LEN {
                exact.push('é');
            }
            let _ = ParsedKey::parse(&exact);
        }

        #[test]
        fn composed_keys_round_trip(id in "[0-9A-Za-z]{16}", secret in "[0-9A-Za-z]{32}") {
            let token = compose(&id, &secret);
            let parsed = ParsedKey::parse(&token).expect("a composed key parses");
            proptest::prop_assert_eq!(parsed.id, id.as_str());
            proptest::prop_assert_eq!(parsed.secret, secret.as_str());
        }

        #[test]
        fn any_one_changed_character_is_caught(
            id in "[0-9A-Za-z]{16}",
            secret in "[0-9A-Za-z]{32}",
            at in KEY_PREFIX.len()..KEY_LEN,
            with in "[0-9A-Za-z_]",
        ) {
            let token = compose(&id, &secret);
            let mut changed = token.clone().into_bytes();
            changed[at] = with.as_bytes()[0];
            let changed = String::from_utf8(changed).unwrap();
            proptest::prop_assume!(changed != token);
            proptest::prop_assert!(ParsedKey::parse(&changed).is_none());
        }
    }

    #[test]
    fn verify_accepts_only_the_right_secret_and_pepper() {
        let pepper = Pepper::from_bytes([7; 32]);
        let stored = pepper.hash_secret("s3cret");
        assert!(pepper.verify_secret("s3cret", &stored));
        assert!(!pepper.verify_secret("s3cres", &stored));
        assert!(!Pepper::from_bytes([8; 32]).verify_secret("s3cret", &stored));
    }

    #[test]
    fn pepper_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pepper::load_or_create(dir.path(), None).unwrap();
        let b = Pepper::load_or_create(dir.path(), None).unwrap();
        assert_eq!(a.hash_secret("x"), b.hash_secret("x"));
        let other = Pepper::load_or_create(tempfile::tempdir().unwrap().path(), None).unwrap();
        assert_ne!(a.hash_secret("x"), other.hash_secret("x"));
        let from_env = Pepper::load_or_create(dir.path(), Some(&"ab".repeat(32))).unwrap();
        assert_eq!(
            from_env.hash_secret("x"),
            Pepper::from_bytes([0xab; 32]).hash_secret("x")
        );
        assert!(Pepper::load_or_create(dir.path(), Some("nothex")).is_err());
    }
}
