//! Admin API tokens for automation: scoped, expiring, revocable, stored only as a keyed hash.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::write::{Command, WriteCtx};
use super::{Page, PageRequest, Store, StoreError, paged, parse};
use crate::domain::{AdminToken, Role, Scope};

/// A token to record; the caller minted it and hashed it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewAdminToken {
    /// What it is for.
    pub name: String,
    /// HMAC of the whole token.
    pub token_hash: [u8; 32],
    /// The role it acts with.
    pub role: Role,
    /// Its institution (`None` only for operators).
    pub institution_id: Option<String>,
    /// What it may do; not empty.
    pub scopes: Vec<Scope>,
    /// Who made it.
    pub created_by: String,
    /// Unix seconds after which it stops working.
    pub expires_at: Option<i64>,
}

const COLS: &str =
    "id, name, role, institution_id, scopes, created_by, created_at, expires_at, revoked_at";

impl Store {
    /// Records a new token.
    pub async fn create_admin_token(&self, new: NewAdminToken) -> Result<AdminToken, StoreError> {
        self.write(Command::CreateAdminToken(new)).await
    }

    /// Tokens of one institution or of all, oldest first.
    pub async fn list_admin_tokens(
        &self,
        institution_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<AdminToken>, StoreError> {
        let inst = institution_id.map(str::to_owned);
        self.call(move |c| {
            let sql = format!(
                "SELECT {COLS}, rowid FROM admin_tokens
                 WHERE (:inst IS NULL OR institution_id = :inst)"
            );
            paged(c, &sql, &[(":inst", &inst)], page, token_row)
        })
        .await
    }

    /// One token, revoked or not.
    pub async fn get_admin_token(&self, id: &str) -> Result<Option<AdminToken>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            c.query_row(
                &format!("SELECT {COLS} FROM admin_tokens WHERE id = ?1"),
                [id],
                |r| Ok(token_row(r)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// The live token with this hash at `now` (Unix seconds).
    pub async fn admin_token_by_hash(
        &self,
        token_hash: [u8; 32],
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError> {
        self.call(move |c| {
            c.query_row(
                &format!(
                    "SELECT {COLS} FROM admin_tokens WHERE token_hash = ?1
                     AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?2)"
                ),
                params![&token_hash[..], now],
                |r| Ok(token_row(r)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Revokes a token. `Ok(false)` when no live token has that id.
    pub async fn revoke_admin_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(Command::RevokeAdminToken { id }).await
    }
}

pub(super) fn create_admin_token(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewAdminToken,
) -> Result<AdminToken, StoreError> {
    let tx = c.savepoint()?;
    // A token outlives no account: its maker must still exist when it is recorded (deleting
    // an account revokes its tokens in one transaction too).
    if let Some(user) = new.created_by.strip_prefix("user:") {
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM admin_users WHERE id = ?1)",
            [user],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(StoreError::NotFound(format!("user `{user}`")));
        }
    }
    let token = AdminToken {
        id: w.id("tok"),
        name: new.name,
        role: new.role,
        institution_id: new.institution_id,
        scopes: new.scopes,
        created_by: new.created_by,
        created_at: w.now(),
        expires_at: new.expires_at.map(crate::domain::rfc3339),
        revoked_at: None,
    };
    tx.execute(
        "INSERT INTO admin_tokens (id, name, token_hash, role, institution_id, scopes,
            created_by, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            token.id,
            token.name,
            &new.token_hash[..],
            token.role.as_str(),
            token.institution_id,
            scopes_text(&token.scopes),
            token.created_by,
            token.created_at,
            new.expires_at
        ],
    )?;
    tx.commit()?;
    Ok(token)
}

pub(super) fn revoke_admin_token(
    c: &mut Connection,
    w: &WriteCtx,
    id: &str,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE admin_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, w.now()],
    )?;
    Ok(n == 1)
}

fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn token_row(r: &Row<'_>) -> Result<AdminToken, StoreError> {
    let scopes: String = r.get(4)?;
    Ok(AdminToken {
        id: r.get(0)?,
        name: r.get(1)?,
        role: parse("admin_tokens.role", r.get(2)?)?,
        institution_id: r.get(3)?,
        scopes: scopes
            .split_ascii_whitespace()
            .map(|s| parse("admin_tokens.scopes", s.to_owned()))
            .collect::<Result<_, _>>()?,
        created_by: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get::<_, Option<i64>>(7)?.map(crate::domain::rfc3339),
        revoked_at: r.get(8)?,
    })
}
