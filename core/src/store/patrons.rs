//! Patron sign-in data: each institution's sign-in settings, its local patron list, guest
//! passes and patron sessions. Nothing here names a person: patrons are references, PINs and
//! guest codes argon2id hashes, session tokens keyed hashes, and the one thing a session keeps
//! for sign-out is sealed under the patron's own token ([`crate::patrons::seal_for_sign_out`]).

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::write::{Command, WriteCtx};
use super::{Store, StoreError};
use crate::domain::AgeBand;
use crate::patrons::PatronAuth;

/// The schema of patron sign-in (migration 9).
pub(super) const MIGRATION: &str = r#"
CREATE TABLE patron_auth (
    institution_id  TEXT PRIMARY KEY REFERENCES institutions(id),
    settings        TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE TABLE local_patrons (
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    patron_ref      TEXT NOT NULL,
    pin_hash        TEXT NOT NULL,
    age_band        TEXT NOT NULL,
    PRIMARY KEY (institution_id, patron_ref)
) WITHOUT ROWID;
CREATE TABLE guest_passes (
    id              TEXT PRIMARY KEY,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    code_hash       TEXT NOT NULL,
    tokens          INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE INDEX guest_passes_by_institution ON guest_passes (institution_id, expires_at);
CREATE TABLE patron_sessions (
    id              TEXT PRIMARY KEY,
    secret_hash     BLOB NOT NULL,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    kiosk_key_id    TEXT NOT NULL,
    patron_ref      TEXT NOT NULL,
    age_band        TEXT NOT NULL,
    group_id        TEXT,
    guest_pass_id   TEXT,
    allowance       INTEGER,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    sealed_end      BLOB
);
CREATE INDEX patron_sessions_by_kiosk ON patron_sessions (kiosk_key_id);
"#;

/// A patron on an institution's local list, as imported (the PIN already hashed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalPatron {
    /// The patron reference of the card.
    pub patron_ref: String,
    /// argon2id PHC string of the PIN.
    pub pin_hash: String,
    /// The patron's band.
    pub age_band: AgeBand,
}

/// What an import of a local list did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCounts {
    /// Patrons new to the list.
    pub added: u64,
    /// Patrons already on it, whose PIN or band was replaced.
    pub updated: u64,
}

/// A guest pass to store (the code already hashed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewGuestPass {
    /// `gp_` + the first six characters of the code.
    pub id: String,
    /// argon2id PHC string of the code's secret part.
    pub code_hash: String,
    /// Tokens the guest may use.
    pub tokens: u64,
    /// Unix seconds: the institution's next local midnight.
    pub expires_at: i64,
}

/// A guest pass as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestPass {
    /// `gp_…`.
    pub id: String,
    /// The institution.
    pub institution_id: String,
    /// Tokens the guest may use.
    pub tokens: u64,
    /// Unix seconds after which the code no longer signs in.
    pub expires_at: i64,
    /// Who made it (`user:<id>`, `token:<id>` or `operator`).
    pub created_by: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// argon2id PHC string of the secret part (never serialised).
    #[serde(skip)]
    pub code_hash: String,
}

/// A patron session to store.
#[derive(Clone, Serialize, Deserialize)]
pub struct NewPatronSession {
    /// The token's public id.
    pub id: String,
    /// HMAC-SHA256 of the token's secret under the pepper.
    pub secret_hash: [u8; 32],
    /// The institution.
    pub institution_id: String,
    /// The kiosk key it was opened on; a new session there ends this one.
    pub kiosk_key_id: String,
    /// The patron.
    pub patron_ref: String,
    /// The patron's band.
    pub age_band: AgeBand,
    /// The group the sign-in placed the patron in (a school class), if any.
    pub group_id: Option<String>,
    /// The guest pass signed in with, if any.
    pub guest_pass_id: Option<String>,
    /// A fixed allotment for the day (a guest pass's), if any.
    pub allowance: Option<u64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: the absolute end of the session.
    pub expires_at: i64,
    /// What sign-out gives back to the ILS, sealed under the token's secret.
    pub sealed_end: Option<Vec<u8>>,
}

impl std::fmt::Debug for NewPatronSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatronSession")
            .field("id", &self.id)
            .field("institution_id", &self.institution_id)
            .field("kiosk_key_id", &self.kiosk_key_id)
            .field("age_band", &self.age_band)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A patron session as stored.
pub type PatronSession = NewPatronSession;

impl Store {
    /// Sets how an institution's patrons sign in.
    pub async fn set_patron_auth(
        &self,
        institution_id: &str,
        auth: PatronAuth,
    ) -> Result<(), StoreError> {
        self.write(Command::SetPatronAuth {
            institution_id: institution_id.to_owned(),
            auth,
        })
        .await
    }

    /// How an institution's patrons sign in, if it said.
    pub async fn patron_auth(
        &self,
        institution_id: &str,
    ) -> Result<Option<PatronAuth>, StoreError> {
        let id = institution_id.to_owned();
        self.call(move |c| {
            let json: Option<String> = c
                .query_row(
                    "SELECT settings FROM patron_auth WHERE institution_id = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .optional()?;
            json.map(|j| {
                serde_json::from_str(&j)
                    .map_err(|e| StoreError::Corrupt(format!("patron_auth of {id}: {e}")))
            })
            .transpose()
        })
        .await
    }

    /// Every institution's sign-in settings (for warnings at start).
    pub async fn all_patron_auth(&self) -> Result<Vec<(String, PatronAuth)>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare("SELECT institution_id, settings FROM patron_auth")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            rows.map(|row| {
                let (id, json) = row?;
                let auth = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("patron_auth of {id}: {e}")))?;
                Ok((id, auth))
            })
            .collect()
        })
        .await
    }

    /// Adds patrons to an institution's local list, replacing the PIN and band of any already
    /// on it.
    pub async fn import_local_patrons(
        &self,
        institution_id: &str,
        patrons: Vec<LocalPatron>,
    ) -> Result<ImportCounts, StoreError> {
        self.write(Command::ImportLocalPatrons {
            institution_id: institution_id.to_owned(),
            patrons,
        })
        .await
    }

    /// A patron on the local list: their PIN hash and band.
    pub async fn local_patron(
        &self,
        institution_id: &str,
        patron_ref: &str,
    ) -> Result<Option<(String, AgeBand)>, StoreError> {
        let (inst, pat) = (institution_id.to_owned(), patron_ref.to_owned());
        self.call(move |c| {
            let row: Option<(String, String)> = c
                .query_row(
                    "SELECT pin_hash, age_band FROM local_patrons
                     WHERE institution_id = ?1 AND patron_ref = ?2",
                    [&inst, &pat],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            row.map(|(hash, band)| Ok((hash, band_of(&band)?)))
                .transpose()
        })
        .await
    }

    /// How many patrons an institution's local list holds.
    pub async fn count_local_patrons(&self, institution_id: &str) -> Result<u64, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM local_patrons WHERE institution_id = ?1",
                [&inst],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Stores guest passes.
    pub async fn create_guest_passes(
        &self,
        institution_id: &str,
        passes: Vec<NewGuestPass>,
        created_by: String,
    ) -> Result<Vec<GuestPass>, StoreError> {
        self.write(Command::CreateGuestPasses {
            institution_id: institution_id.to_owned(),
            passes,
            created_by,
        })
        .await
    }

    /// A guest pass by id.
    pub async fn guest_pass(&self, id: &str) -> Result<Option<GuestPass>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            Ok(c.query_row(
                &format!("SELECT {GUEST_COLS} FROM guest_passes WHERE id = ?1"),
                [&id],
                guest_row,
            )
            .optional()?)
        })
        .await
    }

    /// An institution's guest passes that have not expired at `now`, newest first.
    pub async fn list_guest_passes(
        &self,
        institution_id: &str,
        now: i64,
    ) -> Result<Vec<GuestPass>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {GUEST_COLS} FROM guest_passes
                 WHERE institution_id = ?1 AND expires_at > ?2 ORDER BY rowid DESC"
            ))?;
            let rows = stmt.query_map(params![inst, now], guest_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    /// Opens a patron session, ending the kiosk's previous one(s). Returns the ids it ended.
    pub async fn create_patron_session(
        &self,
        session: NewPatronSession,
    ) -> Result<Vec<String>, StoreError> {
        self.write(Command::CreatePatronSession(session)).await
    }

    /// A patron session by its token's id, if it has not ended (its absolute end is the
    /// caller's to check).
    pub async fn patron_session(&self, id: &str) -> Result<Option<PatronSession>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT id, secret_hash, institution_id, kiosk_key_id, patron_ref, age_band,
                        group_id, guest_pass_id, allowance, created_at, expires_at, sealed_end
                 FROM patron_sessions WHERE id = ?1",
                [&id],
                |r| {
                    let hash: Vec<u8> = r.get(1)?;
                    let band: String = r.get(5)?;
                    Ok((
                        hash,
                        band,
                        NewPatronSession {
                            id: r.get(0)?,
                            secret_hash: [0; 32],
                            institution_id: r.get(2)?,
                            kiosk_key_id: r.get(3)?,
                            patron_ref: r.get(4)?,
                            age_band: AgeBand::Unknown,
                            group_id: r.get(6)?,
                            guest_pass_id: r.get(7)?,
                            allowance: r.get::<_, Option<i64>>(8)?.map(|n| n.max(0) as u64),
                            created_at: r.get(9)?,
                            expires_at: r.get(10)?,
                            sealed_end: r.get(11)?,
                        },
                    ))
                },
            )
            .optional()?
            .map(|(hash, band, mut s)| {
                s.secret_hash = hash
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("patron session {}", s.id)))?;
                s.age_band = band_of(&band)?;
                Ok(s)
            })
            .transpose()
        })
        .await
    }

    /// Ends a patron session; whether there was one.
    pub async fn end_patron_session(&self, id: &str) -> Result<bool, StoreError> {
        self.write(Command::EndPatronSession { id: id.to_owned() })
            .await
    }

    /// Counts `name` over `window` in the short-lived shared state; returns the count.
    pub async fn count_attempt(&self, name: &str, window: Duration) -> Result<u64, StoreError> {
        self.ephemeral.count(name, window).await
    }

    /// The count of `name` now.
    pub async fn attempts(&self, name: &str) -> Result<u64, StoreError> {
        self.ephemeral.get(name).await
    }

    /// Sets the flag `name` for `ttl`.
    pub async fn set_flag(&self, name: &str, ttl: Duration) -> Result<(), StoreError> {
        self.ephemeral.set(name, ttl).await
    }

    /// Gives the flag `name` a fresh `ttl` if it is still set; whether it was.
    pub async fn touch_flag(&self, name: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.ephemeral.touch(name, ttl).await
    }

    /// Clears the flag or count `name`; whether it was set (a single-use name is taken once).
    pub async fn take_flag(&self, name: &str) -> Result<bool, StoreError> {
        self.ephemeral.take(name).await
    }
}

const GUEST_COLS: &str =
    "id, institution_id, tokens, expires_at, created_by, created_at, code_hash";

fn guest_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GuestPass> {
    Ok(GuestPass {
        id: r.get(0)?,
        institution_id: r.get(1)?,
        tokens: r.get::<_, i64>(2)?.max(0) as u64,
        expires_at: r.get(3)?,
        created_by: r.get(4)?,
        created_at: r.get(5)?,
        code_hash: r.get(6)?,
    })
}

fn band_of(text: &str) -> Result<AgeBand, StoreError> {
    text.parse()
        .map_err(|e| StoreError::Corrupt(format!("age band: {e}")))
}

fn institution_exists(c: &Connection, id: &str) -> Result<(), StoreError> {
    let found: Option<i64> = c
        .query_row("SELECT 1 FROM institutions WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    found
        .map(|_| ())
        .ok_or_else(|| StoreError::NotFound(format!("institution {id}")))
}

pub(super) fn set_patron_auth(
    c: &mut Connection,
    w: &WriteCtx,
    institution_id: &str,
    auth: &PatronAuth,
) -> Result<(), StoreError> {
    institution_exists(c, institution_id)?;
    let json = serde_json::to_string(auth).expect("settings serialise");
    c.execute(
        "INSERT INTO patron_auth (institution_id, settings, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (institution_id) DO UPDATE SET settings = ?2, updated_at = ?3",
        params![institution_id, json, w.now()],
    )?;
    Ok(())
}

pub(super) fn import_local_patrons(
    c: &mut Connection,
    institution_id: &str,
    patrons: &[LocalPatron],
) -> Result<ImportCounts, StoreError> {
    institution_exists(c, institution_id)?;
    let tx = c.savepoint()?;
    let mut counts = ImportCounts {
        added: 0,
        updated: 0,
    };
    {
        let mut exists = tx
            .prepare("SELECT 1 FROM local_patrons WHERE institution_id = ?1 AND patron_ref = ?2")?;
        let mut upsert = tx.prepare(
            "INSERT INTO local_patrons (institution_id, patron_ref, pin_hash, age_band)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (institution_id, patron_ref) DO UPDATE SET pin_hash = ?3, age_band = ?4",
        )?;
        for p in patrons {
            if exists.exists(params![institution_id, p.patron_ref])? {
                counts.updated += 1;
            } else {
                counts.added += 1;
            }
            upsert.execute(params![
                institution_id,
                p.patron_ref,
                p.pin_hash,
                p.age_band.as_str()
            ])?;
        }
    }
    tx.commit()?;
    Ok(counts)
}

pub(super) fn create_guest_passes(
    c: &mut Connection,
    w: &WriteCtx,
    institution_id: &str,
    passes: &[NewGuestPass],
    created_by: &str,
) -> Result<Vec<GuestPass>, StoreError> {
    institution_exists(c, institution_id)?;
    let tx = c.savepoint()?;
    let mut made = Vec::with_capacity(passes.len());
    for p in passes {
        let taken: Option<i64> = tx
            .query_row("SELECT 1 FROM guest_passes WHERE id = ?1", [&p.id], |r| {
                r.get(0)
            })
            .optional()?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!("guest pass {}", p.id)));
        }
        let tokens = i64::try_from(p.tokens).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO guest_passes (id, institution_id, code_hash, tokens, expires_at,
                                       created_by, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                p.id,
                institution_id,
                p.code_hash,
                tokens,
                p.expires_at,
                created_by,
                w.now()
            ],
        )?;
        made.push(GuestPass {
            id: p.id.clone(),
            institution_id: institution_id.to_owned(),
            tokens: p.tokens,
            expires_at: p.expires_at,
            created_by: created_by.to_owned(),
            created_at: w.now(),
            code_hash: p.code_hash.clone(),
        });
    }
    // Expired passes are of no further use; they go when new ones come.
    let now = w.unix();
    tx.execute(
        "DELETE FROM guest_passes WHERE institution_id = ?1 AND expires_at <= ?2",
        params![institution_id, now],
    )?;
    tx.commit()?;
    Ok(made)
}

pub(super) fn create_patron_session(
    c: &mut Connection,
    s: &NewPatronSession,
) -> Result<Vec<String>, StoreError> {
    let tx = c.savepoint()?;
    let ended: Vec<String> = {
        // The kiosk's previous session ends, and every session past its absolute end goes.
        let mut stmt = tx.prepare(
            "DELETE FROM patron_sessions WHERE kiosk_key_id = ?1 OR expires_at <= ?2 RETURNING id",
        )?;
        let rows = stmt.query_map(params![s.kiosk_key_id, s.created_at], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    tx.execute(
        "INSERT INTO patron_sessions (id, secret_hash, institution_id, kiosk_key_id, patron_ref,
                                      age_band, group_id, guest_pass_id, allowance, created_at,
                                      expires_at, sealed_end)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            s.id,
            &s.secret_hash[..],
            s.institution_id,
            s.kiosk_key_id,
            s.patron_ref,
            s.age_band.as_str(),
            s.group_id,
            s.guest_pass_id,
            s.allowance.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
            s.created_at,
            s.expires_at,
            s.sealed_end,
        ],
    )?;
    tx.commit()?;
    Ok(ended)
}

pub(super) fn end_patron_session(c: &mut Connection, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute("DELETE FROM patron_sessions WHERE id = ?1", [id])? == 1)
}
