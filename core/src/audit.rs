//! The tamper-evident audit log: the admin audit trail as the leaves of an RFC 9162 Merkle tree
//! ([`crate::merkle`]), with signed tree heads.
//!
//! - **Leaves.** Entry `i` of the trail (in `seq` order, from 0) is the leaf
//!   `H(0x00 ‖ leaf_bytes(entry))`, where [`leaf_bytes`] is the entry's canonical JSON:
//!   `{"seq":…,"at":"…","actor":"…","action":"…","target":"…","institution_id":…}`, fields in
//!   that order, no spaces. Every replica applies the same entries in the same order, so every
//!   replica has the same tree.
//! - **Tree heads.** A [`TreeHead`] is the tree's size and root at a time, signed with the
//!   gateway's Ed25519 response key (so it is checked against the same published JWKS) over
//!   [`TreeHead::message`], a text of its own kind (`carrel-audit-tree-head:v1`) that no
//!   response signature can pass for. Heads are made on demand and at least hourly, and kept.
//! - **Checking** ([`check`]): every kept head (and any head saved elsewhere, which an attacker
//!   with the database cannot reach) must be signed by a published key and must match the root
//!   of that many leaves of the log as it is now. An entry rewritten after a head covered it
//!   changes that root; a log cut back below a head's size cannot produce it; and the heads
//!   must be consistent with each other (each one an extension of the one before).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::merkle::{self, Hash};
use crate::signing::{Jwks, PublicKey};
use crate::store::AuditEntry;

/// The canonical bytes of an entry: what its leaf hashes.
pub fn leaf_bytes(entry: &AuditEntry) -> Vec<u8> {
    // A struct's fields serialise in declaration order, and strings and numbers one way.
    serde_json::to_vec(entry).unwrap_or_default()
}

/// The leaf hashes of a trail, in order.
pub fn leaf_hashes(entries: &[AuditEntry]) -> Vec<Hash> {
    entries
        .iter()
        .map(|e| merkle::leaf_hash(&leaf_bytes(e)))
        .collect()
}

/// A signed tree head: the log's size and root at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TreeHead {
    /// Entries the tree covers.
    pub tree_size: u64,
    /// The root, hex.
    pub root: String,
    /// RFC 3339 time it was signed.
    pub at: String,
    /// The key that signed it (a `kid` of `GET /.well-known/carrel/keys`).
    pub kid: String,
    /// Ed25519 signature of [`TreeHead::message`], base64.
    pub signature: String,
}

impl TreeHead {
    /// What the signature covers.
    pub fn message(tree_size: u64, root_hex: &str, at: &str) -> Vec<u8> {
        format!("carrel-audit-tree-head:v1\n{tree_size}\n{root_hex}\n{at}\n").into_bytes()
    }

    /// Signs the head of a tree of `tree_size` leaves with `root`.
    pub fn sign(
        key: &crate::signing::SigningKey,
        tree_size: u64,
        root: &Hash,
        at: String,
    ) -> TreeHead {
        let root = hex::encode(root);
        let signature = STANDARD.encode(key.sign_bytes(&TreeHead::message(tree_size, &root, &at)));
        TreeHead {
            tree_size,
            root,
            at,
            kid: key.kid().to_owned(),
            signature,
        }
    }

    /// The root as bytes.
    pub fn root_hash(&self) -> Option<Hash> {
        hex::decode(&self.root).ok()?.try_into().ok()
    }

    fn signed_by(&self, jwks: &Jwks) -> Result<(), Tampered> {
        let bad = || Tampered::BadSignature {
            tree_size: self.tree_size,
        };
        let jwk = jwks.find(&self.kid).ok_or(Tampered::UnknownKey {
            tree_size: self.tree_size,
            kid: self.kid.clone(),
        })?;
        let key = PublicKey::from_jwk(jwk).map_err(|_| bad())?;
        let signature = STANDARD.decode(&self.signature).map_err(|_| bad())?;
        let message = TreeHead::message(self.tree_size, &self.root, &self.at);
        if key.verify_bytes(&message, &signature) {
            Ok(())
        } else {
            Err(bad())
        }
    }
}

/// Reads the audit trail and the kept tree heads from a store's SQLite file (the embedded
/// store's, or a replica's view), read-only: no migration, no file created, nothing written.
pub fn read_log(
    path: &std::path::Path,
) -> Result<(Vec<AuditEntry>, Vec<TreeHead>), crate::store::StoreError> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    Ok((
        crate::store::audit_tree::read_entries(&c)?,
        crate::store::audit_tree::read_heads(&c)?,
    ))
}

/// What [`check`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tampered {
    /// The log has fewer entries than a head covered: entries were removed.
    #[error(
        "the log has {entries} entries but a head signed at {at} covered {tree_size}: entries \
         were removed"
    )]
    Truncated {
        /// Entries now.
        entries: u64,
        /// The head's size.
        tree_size: u64,
        /// When it was signed.
        at: String,
    },
    /// The first `tree_size` entries no longer hash to the head's root: one was changed, added
    /// in the middle or removed and replaced.
    #[error(
        "the first {tree_size} entries no longer hash to the root signed at {at}: an entry was \
         rewritten{}",
        first_changed.map(|s| format!(" (the first difference is at or before seq {s})")).unwrap_or_default()
    )]
    Rewritten {
        /// The head's size.
        tree_size: u64,
        /// When it was signed.
        at: String,
        /// The earliest entry seq that may have changed, when an earlier head narrows it.
        first_changed: Option<i64>,
    },
    /// A head's signature does not verify.
    #[error("the tree head of size {tree_size} has a bad signature")]
    BadSignature {
        /// The head's size.
        tree_size: u64,
    },
    /// A head names a key that is not published.
    #[error("the tree head of size {tree_size} is signed by `{kid}`, which is not published")]
    UnknownKey {
        /// The head's size.
        tree_size: u64,
        /// The key.
        kid: String,
    },
}

/// What [`check`] verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Entries in the log.
    pub entries: u64,
    /// Heads verified.
    pub heads: usize,
    /// The largest verified head's size (entries after it are not yet covered by a head).
    pub covered: u64,
}

/// Checks a log against tree heads (see the module docs): each head is signed by a key in
/// `jwks`, no head is larger than the log, and each head's root is the root of that many
/// leaves now.
pub fn check(entries: &[AuditEntry], heads: &[TreeHead], jwks: &Jwks) -> Result<Checked, Tampered> {
    let leaves = leaf_hashes(entries);
    let mut heads: Vec<&TreeHead> = heads.iter().collect();
    heads.sort_by_key(|h| h.tree_size);
    let mut covered = 0;
    let mut last_good: Option<u64> = None;
    for head in &heads {
        head.signed_by(jwks)?;
        let n = head.tree_size as usize;
        if n > leaves.len() {
            return Err(Tampered::Truncated {
                entries: leaves.len() as u64,
                tree_size: head.tree_size,
                at: head.at.clone(),
            });
        }
        if head.root_hash() != Some(merkle::root(&leaves[..n])) {
            // The earliest entry that may differ is after the largest head that still matched.
            let first_changed = entries
                .get(last_good.unwrap_or(0) as usize)
                .map(|e| e.seq)
                .filter(|_| last_good.is_some());
            return Err(Tampered::Rewritten {
                tree_size: head.tree_size,
                at: head.at.clone(),
                first_changed,
            });
        }
        last_good = Some(head.tree_size);
        covered = head.tree_size;
    }
    Ok(Checked {
        entries: leaves.len() as u64,
        heads: heads.len(),
        covered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::{KeyRing, SigningKey};

    fn entry(seq: i64) -> AuditEntry {
        AuditEntry {
            seq,
            at: format!("2026-11-27T10:00:{:02}Z", seq % 60),
            actor: "operator".into(),
            action: "key.revoke".into(),
            target: format!("key:{seq}"),
            institution_id: Some("inst_1".into()),
        }
    }

    fn signed(key: &SigningKey, entries: &[AuditEntry]) -> TreeHead {
        let root = merkle::root(&leaf_hashes(entries));
        TreeHead::sign(
            key,
            entries.len() as u64,
            &root,
            "2026-11-27T11:00:00Z".into(),
        )
    }

    #[test]
    fn leaf_bytes_are_canonical_json_in_field_order() {
        let mut e = entry(7);
        e.institution_id = None;
        assert_eq!(
            String::from_utf8(leaf_bytes(&e)).unwrap(),
            r#"{"seq":7,"at":"2026-11-27T10:00:07Z","actor":"operator","action":"key.revoke","target":"key:7","institution_id":null}"#
        );
    }

    #[test]
    fn an_intact_log_checks_and_each_kind_of_tampering_is_named() {
        let key = SigningKey::generate().unwrap();
        let jwks = KeyRing::new(SigningKey::from_pkcs8_der(key.to_pkcs8_der()).unwrap()).jwks();
        let log: Vec<AuditEntry> = (1..=10).map(entry).collect();
        let heads = [signed(&key, &log[..4]), signed(&key, &log)];
        let ok = check(&log, &heads, &jwks).unwrap();
        assert_eq!((ok.entries, ok.heads, ok.covered), (10, 2, 10));

        // One byte of one entry changed.
        let mut rewritten = log.clone();
        rewritten[6].target = "key:X".into();
        let err = check(&rewritten, &heads, &jwks).unwrap_err();
        assert!(
            matches!(
                err,
                Tampered::Rewritten {
                    tree_size: 10,
                    first_changed: Some(5),
                    ..
                }
            ),
            "{err:?}"
        );
        // The last entry dropped.
        let err = check(&log[..9], &heads, &jwks).unwrap_err();
        assert!(matches!(
            err,
            Tampered::Truncated {
                entries: 9,
                tree_size: 10,
                ..
            }
        ));
        // Dropped and replaced by another: same size, different root.
        let mut replaced = log[..9].to_vec();
        replaced.push(entry(11));
        assert!(matches!(
            check(&replaced, &heads, &jwks),
            Err(Tampered::Rewritten { .. })
        ));
        // A head whose root was edited to match a rewritten log.
        let mut forged = signed(&key, &rewritten);
        forged.signature = heads[1].signature.clone();
        assert_eq!(
            check(&rewritten, &[forged], &jwks),
            Err(Tampered::BadSignature { tree_size: 10 })
        );
        // A head from a key nobody published.
        let other = SigningKey::generate().unwrap();
        let err = check(&log, &[signed(&other, &log)], &jwks).unwrap_err();
        assert!(matches!(err, Tampered::UnknownKey { .. }));
    }
}
