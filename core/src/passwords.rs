//! Admin passwords: argon2id at OWASP's parameters (m = 19 MiB, t = 2, p = 1), stored as PHC
//! strings so the parameters travel with each hash and can be raised later.
//!
//! Verification is deliberately slow (tens of milliseconds); it runs on the blocking pool.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::ids;

/// Shortest password accepted for an admin account.
pub const MIN_LENGTH: usize = 12;
/// Longest password accepted (bounds the hashing work a request can ask for).
pub const MAX_LENGTH: usize = 256;

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP's argon2id parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string.
pub fn hash(password: &str) -> String {
    let salt = SaltString::encode_b64(&ids::random_bytes::<16>()).expect("16 bytes make a salt");
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("hashing with valid parameters succeeds")
        .to_string()
}

/// Whether `password` matches the PHC string `stored`. A malformed stored hash never matches.
pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|parsed| {
            argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Spends the same work as [`verify`] for a user that does not exist, so response times do not
/// tell which usernames are real.
pub fn verify_nobody(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash("carrel-timing-equaliser"));
    let _ = verify(password, dummy);
}

/// Checks a new password's length.
pub fn check_new(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if (MIN_LENGTH..=MAX_LENGTH).contains(&n) {
        Ok(())
    } else {
        Err(format!("must be {MIN_LENGTH} to {MAX_LENGTH} characters"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_carry_their_parameters() {
        let stored = hash("correct horse battery staple");
        assert!(
            stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{stored}"
        );
        assert!(verify("correct horse battery staple", &stored));
        assert!(!verify("correct horse battery stapler", &stored));
        assert!(!verify("anything", "not a phc string"));
        assert_ne!(hash("same"), hash("same"), "salted");
        verify_nobody("whatever");
    }

    #[test]
    fn new_passwords_have_bounded_length() {
        assert!(check_new("short").is_err());
        assert!(check_new(&"x".repeat(12)).is_ok());
        assert!(check_new(&"x".repeat(257)).is_err());
    }
}
