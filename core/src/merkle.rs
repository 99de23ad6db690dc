//! The Merkle Hash Tree of RFC 9162 (Certificate Transparency version 2.0), section 2.1: tree
//! heads, inclusion proofs and consistency proofs, with SHA-256.
//!
//! Carrel's audit log is append-only and tamper-evident: each audit entry's canonical bytes are a
//! leaf, and the root over all leaves (the tree head) commits to the whole history. An inclusion
//! proof shows that one entry is in the log at a given size; a consistency proof shows that a
//! later head extends an earlier one, so nothing already logged was changed, removed or
//! reordered.
//!
//! - Leaf hash: `SHA-256(0x00 || entry)`; interior node: `SHA-256(0x01 || left || right)`; the
//!   empty tree: `SHA-256("")`. The two prefixes keep a leaf from ever being taken for a node
//!   (second-preimage resistance, RFC 9162 section 2.1.1).
//! - `MTH(D[n])` splits its `n > 1` leaves at `k`, the largest power of two smaller than `n`.
//! - Proofs are built over leaf hashes, not entries, so a store can keep 32 bytes per entry.
//! - Building a root or a proof is O(n) in the number of leaves, with no allocation other than
//!   the proof itself and a recursion depth of about `log2(n)`. Verifying is O(proof length),
//!   and a proof longer than any valid one is rejected within 64 steps.
//!
//! The unit tests check this module against `merkle_vectors.json`, which an independent Python
//! implementation (`tests/python/merkle_vectors.py`) produced from the RFC's text, and against
//! the reference vectors of RFC 6962's test suite.

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// Why a Merkle proof could not be built or did not verify.
///
/// Every verification failure means the same thing to the caller (do not trust the claim); the
/// variants say which check failed, for logs and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size, so the leaf is not in the tree.
    #[error("leaf index {index} is out of range for a tree of size {tree_size}")]
    IndexOutOfRange {
        /// The requested leaf index (zero-based).
        index: u64,
        /// The number of leaves in the tree.
        tree_size: u64,
    },
    /// A consistency proof from the empty tree was asked for or offered. RFC 9162 defines
    /// consistency proofs only for `0 < old_size`: the empty tree (root `SHA-256("")`) is a prefix
    /// of every tree, so there is nothing to prove, and a verifier with no earlier head should
    /// simply take the new head as its first.
    #[error(
        "consistency proofs need an old tree size of at least 1: the empty tree is a prefix of \
         every tree, so there is nothing to prove"
    )]
    EmptyOldTree,
    /// The old tree is larger than the new one: a log only grows, so this is either a mix-up of
    /// the two heads or a log that was truncated.
    #[error("old tree size {old_size} is larger than the new tree size {new_size}")]
    OldTreeLarger {
        /// The size of the earlier tree head.
        old_size: u64,
        /// The size of the later tree head (or the number of leaves held).
        new_size: u64,
    },
    /// The proof holds more or fewer hashes than the tree sizes call for.
    #[error("the proof has the wrong number of hashes for these tree sizes")]
    WrongProofLength,
    /// An inclusion proof did not lead from the leaf hash to the root hash.
    #[error("the inclusion proof does not lead to the root hash")]
    RootMismatch,
    /// A consistency proof did not reproduce the old tree's root hash.
    #[error("the consistency proof does not reproduce the old root hash")]
    OldRootMismatch,
    /// A consistency proof did not reproduce the new tree's root hash.
    #[error("the consistency proof does not reproduce the new root hash")]
    NewRootMismatch,
    /// Two heads of the same size have different roots: the log has forked or been rewritten.
    #[error("two tree heads of size {tree_size} have different root hashes")]
    RootsDiffer {
        /// The size both heads claim.
        tree_size: u64,
    },
}

/// The leaf hash of one entry, `SHA-256(0x00 || entry)`: what the tree stores for an audit
/// entry's canonical bytes (RFC 9162 section 2.1.1).
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(entry);
    hasher.finalize().into()
}

/// The hash of an interior node, `SHA-256(0x01 || left || right)`, from its two children's
/// hashes (RFC 9162 section 2.1.1).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The tree head `MTH(D[n])` over the leaves whose hashes are given, in log order; the empty
/// tree's is `SHA-256("")` (RFC 9162 section 2.1.1).
///
/// Takes leaf hashes (see [`leaf_hash`]), not entries, so a store can keep only those. O(n).
pub fn root(leaf_hashes: &[Hash]) -> Hash {
    match leaf_hashes {
        [] => Sha256::digest(b"").into(),
        [only] => *only,
        _ => {
            let (left, right) = leaf_hashes.split_at(split_point(leaf_hashes.len()));
            node_hash(&root(left), &root(right))
        }
    }
}

/// The inclusion proof `PATH(index, D[n])` of the leaf at `index` in the tree over
/// `leaf_hashes` (RFC 9162 section 2.1.3.1): the sibling hashes from the leaf up to the root,
/// bottom first. Check it with [`verify_inclusion`].
///
/// Fails with [`ProofError::IndexOutOfRange`] if `index >= leaf_hashes.len()`. O(n).
pub fn inclusion_proof(leaf_hashes: &[Hash], index: usize) -> Result<Vec<Hash>, ProofError> {
    if index >= leaf_hashes.len() {
        return Err(ProofError::IndexOutOfRange {
            index: index as u64,
            tree_size: leaf_hashes.len() as u64,
        });
    }
    let mut proof = Vec::with_capacity(max_proof_len(leaf_hashes.len()));
    path(index, leaf_hashes, &mut proof);
    Ok(proof)
}

/// Checks that `proof` shows the leaf with hash `leaf_hash` at `index` in the tree of
/// `tree_size` leaves whose root is `root`, by the algorithm of RFC 9162 section 2.1.3.2.
///
/// `tree_size` must be the size that goes with `root` (both from the same signed tree head):
/// the proof commits to the root, and only through it to the size. Sizes and indices are `u64`,
/// the RFC's wire type, since they come from outside. Ok means the leaf is included.
pub fn verify_inclusion(
    index: u64,
    tree_size: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange { index, tree_size });
    }
    let (mut f_n, mut s_n) = (index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s_n == 0 {
            return Err(ProofError::WrongProofLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongProofLength);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The consistency proof `PROOF(old_size, D[n])` that the tree over the first `old_size` leaves
/// is a prefix of the tree over all of `leaf_hashes` (RFC 9162 section 2.1.4.1). Check it with
/// [`verify_consistency`].
///
/// When `old_size == leaf_hashes.len()` the proof is empty. Fails with
/// [`ProofError::EmptyOldTree`] for `old_size == 0` (the RFC defines proofs only from a
/// non-empty tree; see that variant) and [`ProofError::OldTreeLarger`] if `old_size` exceeds the
/// leaves held. O(n).
pub fn consistency_proof(leaf_hashes: &[Hash], old_size: usize) -> Result<Vec<Hash>, ProofError> {
    if old_size == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    if old_size > leaf_hashes.len() {
        return Err(ProofError::OldTreeLarger {
            old_size: old_size as u64,
            new_size: leaf_hashes.len() as u64,
        });
    }
    let mut proof = Vec::with_capacity(max_proof_len(leaf_hashes.len()) + 1);
    subproof(old_size, leaf_hashes, true, &mut proof);
    Ok(proof)
}

/// Checks that `proof` shows the tree of `old_size` leaves with root `old_root` to be a prefix
/// of the tree of `new_size` leaves with root `new_root`, by the algorithm of RFC 9162 section
/// 2.1.4.2. Ok means the log only appended between the two heads.
///
/// As for [`verify_inclusion`], each size must be the one that goes with its root (from the
/// same signed tree head); the proof commits to the roots, and only through them to the sizes.
///
/// Equal sizes need an empty proof and equal roots (different roots are
/// [`ProofError::RootsDiffer`]: a fork). `old_size == 0` is [`ProofError::EmptyOldTree`] and
/// `old_size > new_size` is [`ProofError::OldTreeLarger`], as for [`consistency_proof`].
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    if old_size > new_size {
        return Err(ProofError::OldTreeLarger { old_size, new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongProofLength);
        }
        if old_root != new_root {
            return Err(ProofError::RootsDiffer {
                tree_size: old_size,
            });
        }
        return Ok(());
    }
    let Some((first, rest)) = proof.split_first() else {
        return Err(ProofError::WrongProofLength);
    };
    // When the old tree is a complete subtree (its size a power of two) its root is left out of
    // the proof, and the verifier starts from the old root it already holds.
    let (start, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (first, rest)
    };
    let (mut f_n, mut s_n) = (old_size - 1, new_size - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (*start, *start);
    for c in rest {
        if s_n == 0 {
            return Err(ProofError::WrongProofLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongProofLength);
    }
    if f_r != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if s_r != *new_root {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

/// `k`, the largest power of two smaller than `n`, for `n >= 2` (so `k < n <= 2k`).
fn split_point(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// An upper bound on the length of an inclusion proof in a tree of `n` leaves, `ceil(log2 n)`,
/// to size the proof's vector once.
fn max_proof_len(n: usize) -> usize {
    (usize::BITS - n.saturating_sub(1).leading_zeros()) as usize
}

/// `PATH(m, D[n])` of RFC 9162 section 2.1.3.1, appended to `out` bottom first.
fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    if leaves.len() <= 1 {
        return;
    }
    let k = split_point(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m < k {
        path(m, left, out);
        out.push(root(right));
    } else {
        path(m - k, right, out);
        out.push(root(left));
    }
}

/// `SUBPROOF(m, D[n], b)` of RFC 9162 section 2.1.4.1, appended to `out` bottom first; `b` says
/// whether `D[0:m]` is the old tree itself (whose root the verifier already has).
fn subproof(m: usize, leaves: &[Hash], b: bool, out: &mut Vec<Hash>) {
    if m == leaves.len() {
        if !b {
            out.push(root(leaves));
        }
        return;
    }
    let k = split_point(leaves.len());
    let (left, right) = leaves.split_at(k);
    if m <= k {
        subproof(m, left, b, out);
        out.push(root(right));
    } else {
        subproof(m - k, right, false, out);
        out.push(root(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hex::FromHex;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Vectors {
        leaves: Vec<String>,
        leaf_hashes: Vec<String>,
        roots: Vec<String>,
        inclusion: Vec<InclusionVector>,
        consistency: Vec<ConsistencyVector>,
    }

    #[derive(Deserialize)]
    struct InclusionVector {
        tree_size: usize,
        leaf_index: usize,
        path: Vec<String>,
    }

    #[derive(Deserialize)]
    struct ConsistencyVector {
        old_size: usize,
        new_size: usize,
        proof: Vec<String>,
    }

    /// The vectors, parsed, with the leaf hashes of their entries (computed here).
    struct Loaded {
        raw: Vectors,
        leaves: Vec<Vec<u8>>,
        leaf_hashes: Vec<Hash>,
        roots: Vec<Hash>,
    }

    fn h(s: &str) -> Hash {
        Hash::from_hex(s).expect("a 32-byte hex hash")
    }

    fn hs(list: &[String]) -> Vec<Hash> {
        list.iter().map(|s| h(s)).collect()
    }

    fn load() -> Loaded {
        let raw: Vectors =
            serde_json::from_str(include_str!("merkle_vectors.json")).expect("vectors parse");
        let leaves: Vec<Vec<u8>> = raw
            .leaves
            .iter()
            .map(|s| hex::decode(s).expect("hex leaf"))
            .collect();
        let leaf_hashes = leaves.iter().map(|e| leaf_hash(e)).collect();
        let roots = hs(&raw.roots);
        Loaded {
            raw,
            leaves,
            leaf_hashes,
            roots,
        }
    }

    /// Leaf hashes of `n` synthetic audit entries, for trees larger than the vectors.
    fn synthetic(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("{{\"seq\":{i}}}").as_bytes()))
            .collect()
    }

    fn flipped(hash: &Hash, byte: usize) -> Hash {
        let mut out = *hash;
        out[byte] ^= 0x01;
        out
    }

    #[test]
    fn vectors_cover_every_size_index_and_pair() {
        let v = load();
        let n = v.leaves.len();
        assert!(n >= 8, "at least 8 leaves");
        assert_eq!(v.raw.leaf_hashes.len(), n);
        assert_eq!(v.roots.len(), n + 1, "roots for sizes 0..=N");
        assert_eq!(v.raw.inclusion.len(), n * (n + 1) / 2);
        assert_eq!(v.raw.consistency.len(), n * (n + 1) / 2);
        for size in 1..=n {
            for index in 0..size {
                assert!(
                    v.raw
                        .inclusion
                        .iter()
                        .any(|c| c.tree_size == size && c.leaf_index == index)
                );
            }
            for old in 1..=size {
                assert!(
                    v.raw
                        .consistency
                        .iter()
                        .any(|c| c.old_size == old && c.new_size == size)
                );
            }
        }
    }

    #[test]
    fn leaf_hashes_and_roots_match_vectors() {
        let v = load();
        assert_eq!(v.leaf_hashes, hs(&v.raw.leaf_hashes));
        for (size, expected) in v.roots.iter().enumerate() {
            assert_eq!(
                root(&v.leaf_hashes[..size]),
                *expected,
                "root of size {size}"
            );
        }
    }

    #[test]
    fn inclusion_proofs_match_vectors_and_verify() {
        let v = load();
        for case in &v.raw.inclusion {
            let (n, i) = (case.tree_size, case.leaf_index);
            let proof = inclusion_proof(&v.leaf_hashes[..n], i).expect("in range");
            assert_eq!(proof, hs(&case.path), "inclusion of {i} in {n}");
            assert!(proof.len() <= max_proof_len(n));
            assert_eq!(
                verify_inclusion(i as u64, n as u64, &v.leaf_hashes[i], &proof, &v.roots[n]),
                Ok(()),
                "inclusion of {i} in {n}"
            );
        }
    }

    #[test]
    fn consistency_proofs_match_vectors_and_verify() {
        let v = load();
        for case in &v.raw.consistency {
            let (m, n) = (case.old_size, case.new_size);
            let proof = consistency_proof(&v.leaf_hashes[..n], m).expect("valid sizes");
            assert_eq!(proof, hs(&case.proof), "consistency {m} -> {n}");
            assert_eq!(
                verify_consistency(m as u64, n as u64, &v.roots[m], &v.roots[n], &proof),
                Ok(()),
                "consistency {m} -> {n}"
            );
        }
    }

    /// RFC 6962's reference vectors (certificate-transparency's merkle_tree_test.cc, with
    /// zero-based leaf indices), which the first eight vector leaves reproduce.
    #[test]
    fn rfc6962_reference_vectors() {
        let leaves: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let lh: Vec<Hash> = leaves.iter().map(|e| leaf_hash(e)).collect();
        let roots = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        for (size, expected) in roots.iter().enumerate() {
            assert_eq!(root(&lh[..size]), h(expected), "root of size {size}");
        }

        let inclusion: [(usize, usize, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, expected) in inclusion {
            let expected: Vec<Hash> = expected.iter().map(|s| h(s)).collect();
            assert_eq!(inclusion_proof(&lh[..size], index), Ok(expected.clone()));
            assert_eq!(
                verify_inclusion(
                    index as u64,
                    size as u64,
                    &lh[index],
                    &expected,
                    &h(roots[size])
                ),
                Ok(())
            );
        }

        let consistency: [(usize, usize, &[&str]); 3] = [
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (old, new, expected) in consistency {
            let expected: Vec<Hash> = expected.iter().map(|s| h(s)).collect();
            assert_eq!(consistency_proof(&lh[..new], old), Ok(expected.clone()));
            assert_eq!(
                verify_consistency(
                    old as u64,
                    new as u64,
                    &h(roots[old]),
                    &h(roots[new]),
                    &expected
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn hashes_are_domain_separated() {
        assert_eq!(
            root(&[]),
            h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        let a = leaf_hash(b"a");
        let b = leaf_hash(b"b");
        assert_ne!(a, <[u8; 32]>::from(Sha256::digest(b"a")));
        assert_eq!(root(&[a]), a);
        assert_eq!(root(&[a, b]), node_hash(&a, &b));
        // A two-leaf tree is not a leaf whose entry is its children's hashes.
        let mut both = a.to_vec();
        both.extend_from_slice(&b);
        assert_ne!(root(&[a, b]), leaf_hash(&both));
    }

    /// Every proof of every tree up to 70 leaves (past 64, so six and seven levels) verifies,
    /// and each root matches the one built by appending leaves one at a time.
    #[test]
    fn all_proofs_verify_beyond_the_vectors() {
        let lh = synthetic(70);
        let roots: Vec<Hash> = (0..=lh.len()).map(|n| root(&lh[..n])).collect();
        for n in 1..=lh.len() {
            for i in 0..n {
                let proof = inclusion_proof(&lh[..n], i).expect("in range");
                assert!(proof.len() <= max_proof_len(n));
                assert_eq!(
                    verify_inclusion(i as u64, n as u64, &lh[i], &proof, &roots[n]),
                    Ok(())
                );
            }
            for m in 1..=n {
                let proof = consistency_proof(&lh[..n], m).expect("valid sizes");
                assert!(proof.len() <= max_proof_len(n) + 1);
                assert_eq!(
                    verify_consistency(m as u64, n as u64, &roots[m], &roots[n], &proof),
                    Ok(()),
                    "consistency {m} -> {n}"
                );
            }
        }
    }

    #[test]
    fn root_scales_to_a_large_log() {
        let lh = synthetic(100_000);
        let r = root(&lh);
        let proof = inclusion_proof(&lh, 77_777).expect("in range");
        assert_eq!(proof.len(), 17);
        assert_eq!(
            verify_inclusion(77_777, 100_000, &lh[77_777], &proof, &r),
            Ok(())
        );
        let proof = consistency_proof(&lh, 65_537).expect("valid sizes");
        assert_eq!(
            verify_consistency(65_537, 100_000, &root(&lh[..65_537]), &r, &proof),
            Ok(())
        );
    }

    #[test]
    fn tampered_inclusion_proofs_fail() {
        let v = load();
        for case in &v.raw.inclusion {
            let (n, i) = (case.tree_size, case.leaf_index);
            let proof = hs(&case.path);
            let leaf = v.leaf_hashes[i];
            let root_n = v.roots[n];
            let (idx, n64) = (i as u64, n as u64);
            // A flipped byte in any proof hash.
            for k in 0..proof.len() {
                for byte in [0, 17, 31] {
                    let mut bad = proof.clone();
                    bad[k] = flipped(&bad[k], byte);
                    assert_eq!(
                        verify_inclusion(idx, n64, &leaf, &bad, &root_n),
                        Err(ProofError::RootMismatch)
                    );
                }
            }
            // A flipped byte in the leaf, a changed entry, or a flipped root.
            assert_eq!(
                verify_inclusion(idx, n64, &flipped(&leaf, 5), &proof, &root_n),
                Err(ProofError::RootMismatch)
            );
            let mut entry = v.leaves[i].clone();
            entry.push(0);
            assert_eq!(
                verify_inclusion(idx, n64, &leaf_hash(&entry), &proof, &root_n),
                Err(ProofError::RootMismatch)
            );
            assert_eq!(
                verify_inclusion(idx, n64, &leaf, &proof, &flipped(&root_n, 31)),
                Err(ProofError::RootMismatch)
            );
            // Another leaf of the same tree.
            for j in (0..n).filter(|&j| j != i) {
                assert!(verify_inclusion(idx, n64, &v.leaf_hashes[j], &proof, &root_n).is_err());
            }
            // The wrong index in the same tree.
            for j in (0..n).filter(|&j| j != i) {
                assert!(
                    verify_inclusion(j as u64, n64, &leaf, &proof, &root_n).is_err(),
                    "proof of {i} in {n} accepted for index {j}"
                );
            }
            // The wrong size, with that size's root.
            for other in (i + 1..v.roots.len()).filter(|&o| o != n) {
                assert!(
                    verify_inclusion(idx, other as u64, &leaf, &proof, &v.roots[other]).is_err(),
                    "proof of {i} in {n} accepted for size {other}"
                );
            }
            // One hash too many or too few.
            let mut longer = proof.clone();
            longer.push(root_n);
            assert_eq!(
                verify_inclusion(idx, n64, &leaf, &longer, &root_n),
                Err(ProofError::WrongProofLength)
            );
            if !proof.is_empty() {
                assert_eq!(
                    verify_inclusion(idx, n64, &leaf, &proof[..proof.len() - 1], &root_n),
                    Err(ProofError::WrongProofLength)
                );
            }
        }
    }

    #[test]
    fn tampered_consistency_proofs_fail() {
        let v = load();
        let max = v.leaves.len();
        for case in v.raw.consistency.iter().filter(|c| c.old_size < c.new_size) {
            let (m, n) = (case.old_size, case.new_size);
            let proof = hs(&case.proof);
            let (old_root, new_root) = (v.roots[m], v.roots[n]);
            let (m64, n64) = (m as u64, n as u64);
            for k in 0..proof.len() {
                for byte in [0, 17, 31] {
                    let mut bad = proof.clone();
                    bad[k] = flipped(&bad[k], byte);
                    assert!(
                        verify_consistency(m64, n64, &old_root, &new_root, &bad).is_err(),
                        "flipped proof {m} -> {n} accepted"
                    );
                }
            }
            assert!(
                verify_consistency(m64, n64, &flipped(&old_root, 0), &new_root, &proof).is_err()
            );
            assert_eq!(
                verify_consistency(m64, n64, &old_root, &flipped(&new_root, 31), &proof),
                Err(ProofError::NewRootMismatch)
            );
            // The wrong old size or new size, with that size's root.
            for other in (1..=n).filter(|&o| o != m) {
                assert!(
                    verify_consistency(other as u64, n64, &v.roots[other], &new_root, &proof)
                        .is_err(),
                    "proof {m} -> {n} accepted from {other}"
                );
            }
            for other in (m..=max).filter(|&o| o != n) {
                assert!(
                    verify_consistency(m64, other as u64, &old_root, &v.roots[other], &proof)
                        .is_err(),
                    "proof {m} -> {n} accepted to {other}"
                );
            }
            // One hash too many or too few; none at all.
            let mut longer = proof.clone();
            longer.push(new_root);
            assert!(verify_consistency(m64, n64, &old_root, &new_root, &longer).is_err());
            assert!(
                verify_consistency(m64, n64, &old_root, &new_root, &proof[..proof.len() - 1])
                    .is_err()
            );
            assert_eq!(
                verify_consistency(m64, n64, &old_root, &new_root, &[]),
                Err(ProofError::WrongProofLength)
            );
        }
    }

    /// A log that drops entries can neither prove consistency with a head it published before,
    /// nor, once it grows again past that size, produce a proof that matches the old root.
    #[test]
    fn truncated_or_rewritten_log_is_detected() {
        let honest = synthetic(20);
        let published = 12;
        let published_root = root(&honest[..published]);

        let truncated = &honest[..9];
        assert_ne!(root(truncated), published_root);
        assert_eq!(
            consistency_proof(truncated, published),
            Err(ProofError::OldTreeLarger {
                old_size: 12,
                new_size: 9
            })
        );
        assert_eq!(
            verify_consistency(12, 9, &published_root, &root(truncated), &[]),
            Err(ProofError::OldTreeLarger {
                old_size: 12,
                new_size: 9
            })
        );

        // Truncated to 9, then 11 other entries appended: same size as the honest log.
        let mut regrown = truncated.to_vec();
        regrown.extend((0..11).map(|i| leaf_hash(format!("forged {i}").as_bytes())));
        let forged_root = root(&regrown);
        assert_ne!(forged_root, root(&honest));
        let forged_proof = consistency_proof(&regrown, published).expect("valid sizes");
        assert_eq!(
            verify_consistency(12, 20, &published_root, &forged_root, &forged_proof),
            Err(ProofError::OldRootMismatch)
        );
        // The honest proof does not carry the forged head either.
        let honest_proof = consistency_proof(&honest, published).expect("valid sizes");
        assert!(verify_consistency(12, 20, &published_root, &forged_root, &honest_proof).is_err());
        // Nor does a head of the published size: it is a fork.
        assert_eq!(
            verify_consistency(12, 12, &published_root, &root(&regrown[..12]), &[]),
            Err(ProofError::RootsDiffer { tree_size: 12 })
        );

        // One entry rewritten in place, log then extended.
        let mut rewritten = honest.clone();
        rewritten[3] = leaf_hash(b"rewritten");
        let proof = consistency_proof(&rewritten, published).expect("valid sizes");
        assert!(verify_consistency(12, 20, &published_root, &root(&rewritten), &proof).is_err());
        let index_proof = inclusion_proof(&rewritten, 3).expect("in range");
        assert_eq!(
            verify_inclusion(3, 20, &honest[3], &index_proof, &root(&rewritten)),
            Err(ProofError::RootMismatch)
        );
    }

    #[test]
    fn edge_cases() {
        let lh = synthetic(5);
        let r = root(&lh);

        assert_eq!(
            inclusion_proof(&[], 0),
            Err(ProofError::IndexOutOfRange {
                index: 0,
                tree_size: 0
            })
        );
        assert_eq!(
            inclusion_proof(&lh, 5),
            Err(ProofError::IndexOutOfRange {
                index: 5,
                tree_size: 5
            })
        );
        assert_eq!(
            verify_inclusion(5, 5, &lh[0], &[], &r),
            Err(ProofError::IndexOutOfRange {
                index: 5,
                tree_size: 5
            })
        );
        assert_eq!(
            verify_inclusion(0, 0, &lh[0], &[], &root(&[])),
            Err(ProofError::IndexOutOfRange {
                index: 0,
                tree_size: 0
            })
        );

        // A one-leaf tree: the empty proof, and the root is the leaf hash.
        assert_eq!(inclusion_proof(&lh[..1], 0), Ok(vec![]));
        assert_eq!(verify_inclusion(0, 1, &lh[0], &[], &lh[0]), Ok(()));
        assert_eq!(
            verify_inclusion(0, 1, &lh[0], &[lh[1]], &lh[0]),
            Err(ProofError::WrongProofLength)
        );

        // Consistency from the empty tree is not a thing; nor is shrinking.
        assert_eq!(consistency_proof(&lh, 0), Err(ProofError::EmptyOldTree));
        assert_eq!(consistency_proof(&[], 0), Err(ProofError::EmptyOldTree));
        assert_eq!(
            verify_consistency(0, 5, &root(&[]), &r, &[]),
            Err(ProofError::EmptyOldTree)
        );
        assert_eq!(
            consistency_proof(&lh, 6),
            Err(ProofError::OldTreeLarger {
                old_size: 6,
                new_size: 5
            })
        );

        // Equal sizes: empty proof, equal roots.
        assert_eq!(consistency_proof(&lh, 5), Ok(vec![]));
        assert_eq!(verify_consistency(5, 5, &r, &r, &[]), Ok(()));
        assert_eq!(
            verify_consistency(5, 5, &r, &r, &[r]),
            Err(ProofError::WrongProofLength)
        );
        assert_eq!(
            verify_consistency(5, 5, &r, &flipped(&r, 0), &[]),
            Err(ProofError::RootsDiffer { tree_size: 5 })
        );

        // A new size that does not fit the new root: the proof runs out before the size does.
        let proof = consistency_proof(&lh[..2], 1).expect("valid sizes");
        assert_eq!(
            verify_consistency(1, 3, &lh[0], &root(&lh[..2]), &proof),
            Err(ProofError::WrongProofLength)
        );
        let proof = inclusion_proof(&lh[..2], 0).expect("in range");
        assert_eq!(
            verify_inclusion(0, 3, &lh[0], &proof, &root(&lh[..2])),
            Err(ProofError::WrongProofLength)
        );

        // Huge claimed sizes end quickly instead of looping.
        assert_eq!(
            verify_inclusion(u64::MAX - 1, u64::MAX, &lh[0], &[r; 100], &r),
            Err(ProofError::WrongProofLength)
        );
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &r, &r, &[r; 100]).is_err());
    }

    #[test]
    fn errors_explain_themselves() {
        assert_eq!(
            ProofError::IndexOutOfRange {
                index: 7,
                tree_size: 7
            }
            .to_string(),
            "leaf index 7 is out of range for a tree of size 7"
        );
        assert!(ProofError::EmptyOldTree.to_string().contains("empty tree"));
    }

    #[test]
    fn split_point_is_largest_power_of_two_below() {
        for n in 2..=1025 {
            let k = split_point(n);
            assert!(k.is_power_of_two() && k < n && n <= 2 * k, "n = {n}");
        }
        assert_eq!(max_proof_len(1), 0);
        assert_eq!(max_proof_len(2), 1);
        assert_eq!(max_proof_len(5), 3);
        assert_eq!(max_proof_len(8), 3);
        assert_eq!(max_proof_len(9), 4);
    }
}
