//! The tamper-evident audit log end to end: signed tree heads and RFC 9162 proofs served by the
//! admin API, checked by Carrel's verifier and by an independent one (Python's hashlib, in
//! `tests/python/merkle_vectors.py`); then `carrel audit verify` on the stored log, intact,
//! with one byte of one entry changed, and with the last entry dropped.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use carrel_core::audit::{TreeHead, leaf_bytes};
use carrel_core::merkle;
use carrel_tests::mock::MockUpstream;
use carrel_tests::{Gateway, config_for};
use reqwest::Method;
use serde_json::{Value, json};

const CARREL: &str = env!("CARGO_BIN_EXE_carrel-e2e");

fn hash(hex_str: &str) -> merkle::Hash {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

fn hashes(list: &Value) -> Vec<merkle::Hash> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|h| hash(h.as_str().unwrap()))
        .collect()
}

/// The independent check: Python computes the root and checks the proofs itself.
fn python_check(input: &Value) -> Value {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/merkle_vectors.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg("--check-log")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

fn audit_verify(data: &Path, heads: &[&Path]) -> (i32, String) {
    let mut cmd = Command::new(CARREL);
    cmd.args(["audit", "verify", "--data-dir"]).arg(data);
    for h in heads {
        cmd.arg("--head").arg(h);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn heads_and_proofs_verify_independently_and_tampering_is_detected() {
    let mock = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let keep = data.path().to_owned();
    let gw = Gateway::start_with(&config_for(&mock.base_url(), ""), |c| {
        c.server.data_dir = keep.clone();
    })
    .await;
    // Mutations: each becomes an entry.
    let mut institutions = Vec::new();
    for name in ["North", "South", "East"] {
        institutions.push(gw.institution(name).await);
    }
    let (_, first) = gw
        .admin(Method::GET, "/admin/v1/audit/tree-head", None)
        .await;
    let first: TreeHead = serde_json::from_value(first).unwrap();
    for inst in &institutions {
        gw.admin(
            Method::PATCH,
            &format!("/admin/v1/institutions/{inst}"),
            Some(json!({"frontier_verified": true})),
        )
        .await;
    }
    let (status, second) = gw
        .admin(Method::GET, "/admin/v1/audit/tree-head", None)
        .await;
    assert_eq!(status, 200, "{second}");
    let second: TreeHead = serde_json::from_value(second).unwrap();
    assert_eq!((first.tree_size, second.tree_size), (3, 6));

    // The heads are signed by the published key.
    let jwks: carrel_core::signing::Jwks = gw
        .http
        .get(gw.url("/.well-known/carrel/keys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log = gw.app.state.store.audit_log().await.unwrap();
    let checked = carrel_core::audit::check(&log, &[first.clone(), second.clone()], &jwks)
        .expect("the live log holds to its heads");
    assert_eq!(checked.covered, 6);

    // A consistency proof from the first head to the second.
    let (status, consistency) = gw
        .admin(
            Method::GET,
            &format!(
                "/admin/v1/audit/proof/consistency?first={}&second={}",
                first.tree_size, second.tree_size
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{consistency}");
    assert_eq!(consistency["first_root"], first.root.as_str());
    assert_eq!(consistency["second_root"], second.root.as_str());
    merkle::verify_consistency(
        first.tree_size,
        second.tree_size,
        &hash(&first.root),
        &hash(&second.root),
        &hashes(&consistency["proof"]),
    )
    .expect("consistent");

    // An inclusion proof for the second institution's creation.
    let created = log
        .iter()
        .find(|e| e.action == "institution.create" && e.target.contains(&institutions[1]))
        .unwrap();
    let (status, inclusion) = gw
        .admin(
            Method::GET,
            &format!(
                "/admin/v1/audit/proof/inclusion?seq={}&tree_size={}",
                created.seq, second.tree_size
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{inclusion}");
    let leaf = merkle::leaf_hash(&leaf_bytes(created));
    assert_eq!(inclusion["leaf_hash"], hex::encode(leaf));
    merkle::verify_inclusion(
        inclusion["leaf_index"].as_u64().unwrap(),
        second.tree_size,
        &leaf,
        &hashes(&inclusion["audit_path"]),
        &hash(&second.root),
    )
    .expect("included");

    // Python, with its own tree, gets the same root and accepts both proofs.
    let entries: Vec<String> = log[..6]
        .iter()
        .map(|e| hex::encode(leaf_bytes(e)))
        .collect();
    let python = python_check(&json!({"entries": entries, "inclusion": inclusion,
                                      "consistency": consistency}));
    assert_eq!(python["root"], second.root.as_str());
    assert_eq!(python["inclusion_ok"], true);
    assert_eq!(python["consistency_ok"], true);

    // Another institution's admin cannot ask about North's entries.
    let south_admin = gw
        .session("south-admin", "institution_admin", Some(&institutions[1]))
        .await;
    let north = log
        .iter()
        .find(|e| e.institution_id.as_deref() == Some(&institutions[0]))
        .unwrap();
    let (status, _) = gw
        .admin_as(
            &south_admin,
            Method::GET,
            &format!("/admin/v1/audit/proof/inclusion?seq={}", north.seq),
            None,
        )
        .await;
    assert_eq!(status, 404);
    for bad in [
        "/admin/v1/audit/proof/consistency?first=0",
        "/admin/v1/audit/proof/consistency?first=999",
        "/admin/v1/audit/proof/inclusion",
    ] {
        let (status, _) = gw.admin(Method::GET, bad, None).await;
        assert_eq!(status, 422, "{bad}");
    }

    // The latest head, saved somewhere the database's owner cannot reach.
    let (_, latest) = gw
        .admin(Method::GET, "/admin/v1/audit/tree-head", None)
        .await;
    let latest: TreeHead = serde_json::from_value(latest).unwrap();
    let entries = gw.app.state.store.audit_log().await.unwrap().len() as u64;
    assert_eq!(latest.tree_size, entries);
    let saved = tempfile::tempdir().unwrap();
    let saved_head = saved.path().join("head.json");
    std::fs::write(&saved_head, serde_json::to_vec(&latest).unwrap()).unwrap();
    drop(gw);

    let (code, out) = audit_verify(data.path(), &[&saved_head]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ok: {entries} entries")) && out.contains(&format!("to {entries}")),
        "{out}"
    );

    let db = data.path().join(carrel_core::store::DB_FILE);
    let sql = |statement: &str| {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(statement).unwrap();
    };
    // One byte of one entry changed.
    sql(&format!(
        "UPDATE admin_audit SET actor = 'operatos' WHERE seq = {}",
        created.seq
    ));
    let (code, out) = audit_verify(data.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rewritten"), "{out}");
    sql(&format!(
        "UPDATE admin_audit SET actor = 'operator' WHERE seq = {}",
        created.seq
    ));
    assert_eq!(audit_verify(data.path(), &[]).0, 0);

    // The last entry dropped, and the kept heads with it, as someone covering tracks would:
    // the head saved elsewhere still catches it.
    sql("DELETE FROM admin_audit WHERE seq = (SELECT MAX(seq) FROM admin_audit)");
    let (code, out) = audit_verify(data.path(), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("removed"), "{out}");
    sql("DELETE FROM audit_tree_heads");
    let (code, out) = audit_verify(data.path(), &[]);
    assert_eq!(code, 1, "nothing left to hold it to is not a pass: {out}");
    assert!(out.contains("--head"), "{out}");
    let (code, out) = audit_verify(data.path(), &[&saved_head]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("removed"), "{out}");
}
