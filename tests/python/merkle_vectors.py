"""Test vectors for Carrel's Merkle tree (core/src/merkle.rs), computed independently.

This is a second implementation of the Merkle Hash Tree of RFC 9162 (Certificate
Transparency version 2.0), section 2.1, written from the RFC's text with nothing but
the standard library (hashlib). It builds the tree heads, inclusion proofs and
consistency proofs of a fixed, deterministic list of leaf entries, checks every proof
with the RFC's own verification algorithms, and prints everything as JSON. The Rust
unit tests load that JSON (include_str!) and must reproduce it byte for byte.

Regenerate from the workspace root with:

    python3 tests/python/merkle_vectors.py > core/src/merkle_vectors.json

The output is deterministic: running it again must produce an identical file.

JSON layout (all hashes and entries are lowercase hex):
  leaves        entries d(0) .. d(N-1), the data hashed as leaves
  leaf_hashes   SHA-256(0x00 || d(i)) for each entry
  roots         roots[n] = MTH(D[n]) for n = 0 .. N (roots[0] is the empty tree)
  inclusion     {tree_size, leaf_index, path} for every 0 <= leaf_index < tree_size <= N
  consistency   {old_size, new_size, proof} for every 1 <= old_size <= new_size <= N
"""

import hashlib
import json
import sys

# The first eight entries are the leaves of the RFC 6962 reference test suite
# (certificate-transparency, merkle_tree_test.cc); the rest look like Carrel's
# audit entries (canonical JSON bytes) so the tree goes past a power of two.
CT_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
N = 17


def entries():
    out = [bytes.fromhex(h) for h in CT_LEAVES]
    i = len(out)
    while len(out) < N:
        out.append(b'{"seq":%d,"event":"audit.entry"}' % i)
        i += 1
    return out


def sha256(data):
    return hashlib.sha256(data).digest()


def split_point(n):
    """k, the largest power of two smaller than n (n > 1): k < n <= 2k."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d):
    """MTH(D[n]), RFC 9162 section 2.1.1, over the entries themselves."""
    n = len(d)
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + d[0])
    k = split_point(n)
    return sha256(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m, d):
    """PATH(m, D[n]), RFC 9162 section 2.1.3.1: the inclusion proof of leaf m."""
    n = len(d)
    if n == 1:
        assert m == 0
        return []
    k = split_point(n)
    if m < k:
        return path(m, d[:k]) + [mth(d[k:])]
    return path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m, d, b):
    """SUBPROOF(m, D[n], b), RFC 9162 section 2.1.4.1."""
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = split_point(n)
    if m <= k:
        return subproof(m, d[:k], b) + [mth(d[k:])]
    return subproof(m - k, d[k:], False) + [mth(d[:k])]


def proof(m, d):
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true): consistency of D[0:m] with D[n]."""
    return subproof(m, d, True)


def verify_inclusion(leaf_index, tree_size, leaf_hash, inclusion_path, root_hash):
    """The verification algorithm of RFC 9162 section 2.1.3.2."""
    if leaf_index >= tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash
    for p in inclusion_path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def verify_consistency(first, second, first_hash, second_hash, consistency_path):
    """The verification algorithm of RFC 9162 section 2.1.4.2 (for 0 < first < second)."""
    if not consistency_path:
        return False
    path_ = list(consistency_path)
    if first & (first - 1) == 0:
        path_.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path_[0]
    for c in path_[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = sha256(b"\x01" + c + fr)
            sr = sha256(b"\x01" + c + sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha256(b"\x01" + sr + c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


def main():
    d = entries()
    roots = [mth(d[:n]) for n in range(N + 1)]
    leaf_hashes = [sha256(b"\x00" + e) for e in d]

    inclusion = []
    for n in range(1, N + 1):
        for m in range(n):
            p = path(m, d[:n])
            assert verify_inclusion(m, n, leaf_hashes[m], p, roots[n]), (m, n)
            inclusion.append({"tree_size": n, "leaf_index": m, "path": [h.hex() for h in p]})

    consistency = []
    for n in range(1, N + 1):
        for m in range(1, n + 1):
            p = proof(m, d[:n])
            if m == n:
                assert p == []
            else:
                assert verify_consistency(m, n, roots[m], roots[n], p), (m, n)
            consistency.append({"old_size": m, "new_size": n, "proof": [h.hex() for h in p]})

    out = {
        "description": "RFC 9162 section 2.1 Merkle tree vectors; generated by "
        "tests/python/merkle_vectors.py, do not edit by hand",
        "leaves": [e.hex() for e in d],
        "leaf_hashes": [h.hex() for h in leaf_hashes],
        "roots": [r.hex() for r in roots],
        "inclusion": inclusion,
        "consistency": consistency,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


def check_log():
    """`--check-log`: reads {"entries": [hex], "inclusion": {...}, "consistency": {...}} on
    stdin (a live audit log's leaf data and proofs the gateway served), computes the root of
    every entry with this file's own tree, checks the proofs with the RFC's algorithms, and
    prints {"root": hex, "inclusion_ok": bool, "consistency_ok": bool}."""
    given = json.load(sys.stdin)
    d = [bytes.fromhex(e) for e in given["entries"]]
    out = {"root": mth(d).hex()}
    inc = given.get("inclusion")
    if inc:
        n, m = inc["tree_size"], inc["leaf_index"]
        out["inclusion_ok"] = verify_inclusion(
            m,
            n,
            sha256(b"\x00" + d[m]),
            [bytes.fromhex(h) for h in inc["audit_path"]],
            mth(d[:n]),
        ) and inc["root"] == mth(d[:n]).hex()
    con = given.get("consistency")
    if con:
        m, n = con["first"], con["second"]
        out["consistency_ok"] = verify_consistency(
            m,
            n,
            mth(d[:m]),
            mth(d[:n]),
            [bytes.fromhex(h) for h in con["proof"]],
        )
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check-log"]:
        check_log()
    else:
        main()
