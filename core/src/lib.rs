//! Carrel's core: the domain, its configuration and its state, with no HTTP framework in sight.
//!
//! Everything here is shared by the data plane (`carrel-gateway`) and the control plane
//! (`carrel-admin`); dependencies point only this way.
//!
//! # Layout
//!
//! - [`audit`]: the tamper-evident audit log: leaves, signed tree heads, and the check that
//!   finds a rewritten or truncated log.
//! - [`config`]: the TOML + environment configuration, parsed in two steps (raw serde tree, then
//!   validated types); every error names the dotted key.
//! - [`domain`]: institutions, providers, models, tiers, API keys and the [`domain::Principal`] a
//!   request runs as.
//! - [`merkle`]: the RFC 9162 Merkle tree of the tamper-evident audit log: hashes, inclusion
//!   and consistency proofs.
//! - [`keys`]: the API key format (`crl_…`), the server pepper and the keyed hash of key secrets.
//! - [`oidc`]: verifying OpenID Connect ID tokens against an issuer's keys, for school sign-in.
//! - [`passwords`]: argon2id hashing of admin passwords (and patron PINs, guest codes).
//! - [`patrons`]: how an institution's patrons sign in; guest codes; sealing for sign-out.
//! - [`quota`]: limits, periods, the rate algorithm, the quota engine (in process, or on
//!   counters shared in Redis, with leases and the failure policy).
//! - [`signing`]: signed responses (RFC 9421 with Ed25519, RFC 9530 `Content-Digest`), the
//!   key ring and its JWKS, and verification for `carrel verify`.
//! - [`sip2`]: the SIP2 wire format and a pooled client, for patron sign-in against a library's
//!   system.
//! - [`store`]: the state store: SQLite (WAL, versioned migrations), alone or as a replica's view
//!   of a log in Redis; writes as commands.
//! - [`ids`]: random identifiers and base62 encoding.

pub mod audit;
pub mod config;
pub mod domain;
pub mod ids;
pub mod keys;
pub mod merkle;
pub mod oidc;
pub mod passwords;
pub mod patrons;
pub mod quota;
pub mod safeguards;
pub mod signing;
pub mod sip2;
pub mod store;
