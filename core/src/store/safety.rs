//! What the safeguards keep: frontier attestations of service keys and containment switches.
//!
//! Both are control data, written as commands (so on the Redis backend every replica applies
//! them in the same order) and read by the data plane: an attestation with its key's
//! credential, the containment set whole, into a snapshot each replica swaps in when the set
//! changes. A switch that is off is no row; its history is the audit log.

use rusqlite::{Connection, OptionalExtension, params};

use super::write::WriteCtx;
use super::{Store, StoreError};
use crate::domain::{ContainmentKind, FrontierAttestation, KeyKind};

/// Migration 10: tier ceilings on institutions and groups, why each model has its tier,
/// frontier attestations, containment switches.
pub(super) const MIGRATION: &str = r#"
ALTER TABLE institutions ADD COLUMN tier_ceiling TEXT NOT NULL DEFAULT 'frontier';
ALTER TABLE institutions ADD COLUMN minor_tier_ceiling TEXT NOT NULL DEFAULT 'baseline';
ALTER TABLE member_groups ADD COLUMN tier_ceiling TEXT;
ALTER TABLE models ADD COLUMN tier_basis TEXT NOT NULL DEFAULT 'operator_judgement';
CREATE TABLE frontier_attestations (
    key_id       TEXT PRIMARY KEY REFERENCES api_keys(id),
    use_case     TEXT NOT NULL,
    approved_by  TEXT NOT NULL,
    approved_at  TEXT NOT NULL,
    expires_at   TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE containment (
    kind          TEXT NOT NULL,
    target        TEXT NOT NULL,
    contained_by  TEXT NOT NULL,
    contained_at  TEXT NOT NULL,
    PRIMARY KEY (kind, target)
) WITHOUT ROWID;
"#;

/// One switch that is on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Containment {
    /// What it stops.
    pub kind: ContainmentKind,
    /// The model or provider name, or the institution or key id.
    pub target: String,
    /// Who turned it on.
    pub contained_by: String,
    /// RFC 3339 time it was turned on.
    pub contained_at: String,
}

pub(super) fn set_attestation(
    c: &mut Connection,
    w: &WriteCtx,
    key_id: String,
    use_case: String,
    approved_by: String,
    expires_at: String,
) -> Result<Option<FrontierAttestation>, StoreError> {
    let live_service_key: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM api_keys WHERE id = ?1 AND revoked_at IS NULL
            AND kind = ?2)",
        params![key_id, KeyKind::Service.as_str()],
        |r| r.get(0),
    )?;
    if !live_service_key {
        return Ok(None);
    }
    let attestation = FrontierAttestation {
        key_id,
        use_case,
        approved_by,
        approved_at: w.now(),
        expires_at,
    };
    c.execute(
        "INSERT INTO frontier_attestations (key_id, use_case, approved_by, approved_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(key_id) DO UPDATE SET use_case = excluded.use_case,
            approved_by = excluded.approved_by, approved_at = excluded.approved_at,
            expires_at = excluded.expires_at",
        params![
            attestation.key_id,
            attestation.use_case,
            attestation.approved_by,
            attestation.approved_at,
            attestation.expires_at
        ],
    )?;
    Ok(Some(attestation))
}

pub(super) fn revoke_attestation(c: &mut Connection, key_id: &str) -> Result<bool, StoreError> {
    Ok(c.execute(
        "DELETE FROM frontier_attestations WHERE key_id = ?1",
        [key_id],
    )? > 0)
}

/// Turns a switch on or off; `true` when that changed anything.
pub(super) fn set_contained(
    c: &mut Connection,
    w: &WriteCtx,
    kind: ContainmentKind,
    target: &str,
    contained: bool,
    by: &str,
) -> Result<bool, StoreError> {
    let changed = if contained {
        c.execute(
            "INSERT INTO containment (kind, target, contained_by, contained_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(kind, target) DO NOTHING",
            params![kind.as_str(), target, by, w.now()],
        )?
    } else {
        c.execute(
            "DELETE FROM containment WHERE kind = ?1 AND target = ?2",
            params![kind.as_str(), target],
        )?
    };
    Ok(changed > 0)
}

impl Store {
    /// Approves (or replaces) a service key's frontier attestation. `Ok(None)` when no live
    /// service key has that id (the caller says which it was).
    pub async fn set_attestation(
        &self,
        key_id: &str,
        use_case: String,
        approved_by: String,
        expires_at: String,
    ) -> Result<Option<FrontierAttestation>, StoreError> {
        self.write(super::write::Command::SetAttestation {
            key_id: key_id.to_owned(),
            use_case,
            approved_by,
            expires_at,
        })
        .await
    }

    /// The tier ceiling of a group, if it has one (`None` too for an unknown group).
    pub async fn group_tier_ceiling(
        &self,
        group_id: &str,
    ) -> Result<Option<crate::domain::Tier>, StoreError> {
        let id = group_id.to_owned();
        self.call(move |c| {
            let ceiling: Option<Option<String>> = c
                .query_row(
                    "SELECT tier_ceiling FROM member_groups WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            ceiling
                .flatten()
                .map(|t| super::parse("member_groups.tier_ceiling", t))
                .transpose()
        })
        .await
    }

    /// Withdraws a key's attestation; `false` when it had none.
    pub async fn revoke_attestation(&self, key_id: &str) -> Result<bool, StoreError> {
        self.write(super::write::Command::RevokeAttestation {
            key_id: key_id.to_owned(),
        })
        .await
    }

    /// A key's attestation, current or expired.
    pub async fn attestation(
        &self,
        key_id: &str,
    ) -> Result<Option<FrontierAttestation>, StoreError> {
        let id = key_id.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT key_id, use_case, approved_by, approved_at, expires_at
                 FROM frontier_attestations WHERE key_id = ?1",
                [id],
                |r| {
                    Ok(FrontierAttestation {
                        key_id: r.get(0)?,
                        use_case: r.get(1)?,
                        approved_by: r.get(2)?,
                        approved_at: r.get(3)?,
                        expires_at: r.get(4)?,
                    })
                },
            )
            .optional()?)
        })
        .await
    }

    /// Turns a containment switch on or off; `true` when that changed anything. The caller
    /// checks that the target exists.
    pub async fn set_contained(
        &self,
        kind: ContainmentKind,
        target: &str,
        contained: bool,
        by: String,
    ) -> Result<bool, StoreError> {
        self.write(super::write::Command::SetContained {
            kind,
            target: target.to_owned(),
            contained,
            by,
        })
        .await
    }

    /// Every switch that is on, oldest first.
    pub async fn containment(&self) -> Result<Vec<Containment>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT kind, target, contained_by, contained_at FROM containment
                 ORDER BY contained_at, kind, target",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            rows.map(|row| {
                let (kind, target, contained_by, contained_at) = row?;
                Ok(Containment {
                    kind: super::parse("containment.kind", kind)?,
                    target,
                    contained_by,
                    contained_at,
                })
            })
            .collect()
        })
        .await
    }
}
