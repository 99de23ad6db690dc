//! The audit trail in order, and the signed tree heads kept over it ([`crate::audit`]).

use rusqlite::{Connection, params};

use super::write::Command;
use super::{AuditEntry, Store, StoreError, audit_row};
use crate::audit::TreeHead;

/// Migration 11: signed tree heads of the audit log.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE audit_tree_heads (
    tree_size  INTEGER PRIMARY KEY,
    root       TEXT NOT NULL,
    at         TEXT NOT NULL,
    kid        TEXT NOT NULL,
    signature  TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// Keeps a head; a second head of the same size is ignored (the first is as good, and a
/// different root for the same size is for [`crate::audit::check`] to report).
pub(super) fn record_tree_head(c: &mut Connection, head: &TreeHead) -> Result<bool, StoreError> {
    Ok(c.execute(
        "INSERT INTO audit_tree_heads (tree_size, root, at, kid, signature)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(tree_size) DO NOTHING",
        params![
            head.tree_size as i64,
            head.root,
            head.at,
            head.kid,
            head.signature
        ],
    )? > 0)
}

/// The whole audit trail, oldest first.
pub(crate) fn read_entries(c: &Connection) -> Result<Vec<AuditEntry>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT seq, at, actor, action, target, institution_id FROM admin_audit ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| Ok(audit_row(r)))?;
    rows.map(|r| r?).collect()
}

/// Every kept tree head, smallest first.
pub(crate) fn read_heads(c: &Connection) -> Result<Vec<TreeHead>, StoreError> {
    let mut stmt = c.prepare(
        "SELECT tree_size, root, at, kid, signature FROM audit_tree_heads ORDER BY tree_size",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(TreeHead {
            tree_size: r.get::<_, i64>(0)? as u64,
            root: r.get(1)?,
            at: r.get(2)?,
            kid: r.get(3)?,
            signature: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

impl Store {
    /// The whole audit trail, oldest first: the leaves of the tree.
    pub async fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.call(|c| read_entries(c)).await
    }

    /// How many entries the audit trail has: the size of its tree.
    pub async fn audit_len(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            Ok(c.query_row("SELECT COUNT(*) FROM admin_audit", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
        })
        .await
    }

    /// Keeps a signed tree head (on every replica).
    pub async fn record_tree_head(&self, head: TreeHead) -> Result<bool, StoreError> {
        self.write(Command::RecordTreeHead(head)).await
    }

    /// Every kept tree head, smallest first.
    pub async fn tree_heads(&self) -> Result<Vec<TreeHead>, StoreError> {
        self.call(|c| read_heads(c)).await
    }
}
