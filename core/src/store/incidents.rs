//! Safeguard settings of institutions and the incident register: automatic records of every
//! block or flag, and reports people file.
//!
//! An automatic record never holds prompt text unless the institution opted in for that tier,
//! with a retention limit: then the text is kept with its expiry and removed when it passes
//! ([`Store::purge_incident_text`]).

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::write::{Command, WriteCtx};
use super::{Store, StoreError};
use crate::safeguards::RuleSetConfig;

/// Migration 12: safeguard settings per institution, and incidents.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE institution_safeguards (
    institution_id  TEXT PRIMARY KEY REFERENCES institutions(id),
    settings        TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE incidents (
    id                TEXT PRIMARY KEY,
    at                TEXT NOT NULL,
    institution_id    TEXT,
    source            TEXT NOT NULL,
    record            TEXT NOT NULL,
    prompt_text       TEXT,
    text_expires_at   INTEGER
);
CREATE INDEX incidents_by_institution ON incidents (institution_id, at);
"#;

/// An institution's safeguard settings (`PUT /admin/v1/institutions/{id}/safeguards`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SafeguardSettings {
    /// Rule sets added on top of the operator's, and overrides of the operator's rules within
    /// bounds (see `carrel_core::safeguards`).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub sets: Vec<RuleSetConfig>,
    /// What a minor reads when a request or an answer is blocked (default: a friendly
    /// sentence of Carrel's).
    #[serde(default)]
    pub minor_refusal: Option<String>,
    /// Where high-severity flags and blocks are sent (HTTPS webhooks, JSON POST). Empty: no
    /// one is notified; there is no default recipient.
    #[serde(default)]
    pub notify_urls: Vec<String>,
    /// Tiers whose incident records keep the prompt text, and for how long. Empty (the
    /// default): no record holds any text.
    #[serde(default)]
    pub retain_prompts: Vec<PromptRetention>,
}

/// An opt-in to keep prompt text in incident records of one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PromptRetention {
    /// `baseline`, `advanced` or `frontier`.
    pub tier: crate::domain::Tier,
    /// Days the text is kept, 1 to 90.
    pub days: u32,
}

/// Most days an institution may keep prompt text in incident records.
pub const MAX_TEXT_RETENTION_DAYS: u32 = 90;

/// An incident as stored and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Incident {
    /// `inc_…`.
    pub id: String,
    /// RFC 3339 time it was recorded.
    pub at: String,
    /// `automatic` (a safeguard blocked or flagged) or `report` (a person filed it).
    pub source: String,
    /// The institution concerned, if any.
    pub institution_id: Option<String>,
    /// The record: [`AutomaticIncident`] or a filed report, as JSON.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub record: serde_json::Value,
    /// The prompt text, only when the institution opted in for the tier, until it expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<String>,
}

/// What an automatic record holds: never a patron, a key secret or (unless opted in) text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomaticIncident {
    /// The institution.
    pub institution: String,
    /// Its sector label, if any.
    pub sector: Option<String>,
    /// Its region (ISO 3166-2).
    pub region: String,
    /// The model asked for.
    pub model: String,
    /// Its tier.
    pub tier: String,
    /// The categories of the rules that matched.
    pub category: String,
    /// `block` or `flag`.
    pub action: String,
    /// The highest severity.
    pub severity: String,
    /// `true` when the safeguard stopped it (a block): harm that nearly happened.
    pub near_miss: bool,
    /// `input` (the request) or `output` (the answer).
    pub direction: String,
    /// Keyed hash of the institution and the normalised text: correlates repeats without the
    /// text (`carrel_core::safeguards::request_hash`).
    pub request_hash: String,
}

/// A new incident, as a command carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewIncident {
    /// `automatic` or `report`.
    pub source: String,
    /// The institution, if any.
    pub institution_id: Option<String>,
    /// The record.
    pub record: serde_json::Value,
    /// Text kept by opt-in, and until when (Unix seconds).
    pub prompt_text: Option<(String, i64)>,
}

pub(super) fn set_settings(
    c: &mut Connection,
    institution_id: &str,
    settings: &SafeguardSettings,
) -> Result<bool, StoreError> {
    let json = serde_json::to_string(settings)
        .map_err(|e| StoreError::Corrupt(format!("safeguard settings: {e}")))?;
    let exists: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM institutions WHERE id = ?1)",
        [institution_id],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(false);
    }
    c.execute(
        "INSERT INTO institution_safeguards (institution_id, settings) VALUES (?1, ?2)
         ON CONFLICT(institution_id) DO UPDATE SET settings = excluded.settings",
        params![institution_id, json],
    )?;
    Ok(true)
}

pub(super) fn record_incident(
    c: &mut Connection,
    w: &mut WriteCtx,
    new: NewIncident,
) -> Result<Incident, StoreError> {
    let incident = Incident {
        id: w.id("inc"),
        at: w.now(),
        source: new.source,
        institution_id: new.institution_id,
        record: new.record,
        prompt_text: new.prompt_text.as_ref().map(|(t, _)| t.clone()),
    };
    c.execute(
        "INSERT INTO incidents (id, at, institution_id, source, record, prompt_text,
            text_expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            incident.id,
            incident.at,
            incident.institution_id,
            incident.source,
            incident.record.to_string(),
            incident.prompt_text,
            new.prompt_text.map(|(_, until)| until)
        ],
    )?;
    Ok(incident)
}

pub(super) fn purge_text(c: &mut Connection, now: i64) -> Result<usize, StoreError> {
    Ok(c.execute(
        "UPDATE incidents SET prompt_text = NULL, text_expires_at = NULL
         WHERE text_expires_at IS NOT NULL AND text_expires_at <= ?1",
        [now],
    )?)
}

impl Store {
    /// Sets an institution's safeguard settings (validated by the caller); `false` when there
    /// is no such institution.
    pub async fn set_safeguard_settings(
        &self,
        institution_id: &str,
        settings: SafeguardSettings,
    ) -> Result<bool, StoreError> {
        self.write(Command::SetSafeguards {
            institution_id: institution_id.to_owned(),
            settings,
        })
        .await
    }

    /// An institution's safeguard settings (the defaults when it set none).
    pub async fn safeguard_settings(
        &self,
        institution_id: &str,
    ) -> Result<SafeguardSettings, StoreError> {
        let id = institution_id.to_owned();
        self.call(move |c| {
            let json: Option<String> = c
                .query_row(
                    "SELECT settings FROM institution_safeguards WHERE institution_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            json.map(|j| {
                serde_json::from_str(&j)
                    .map_err(|e| StoreError::Corrupt(format!("safeguard settings: {e}")))
            })
            .transpose()
            .map(Option::unwrap_or_default)
        })
        .await
    }

    /// Records an incident (on every replica).
    pub async fn record_incident(&self, new: NewIncident) -> Result<Incident, StoreError> {
        self.write(Command::RecordIncident(new)).await
    }

    /// Incidents, newest first: an institution's, or all (`None`), at most `limit`.
    pub async fn incidents(
        &self,
        institution_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Incident>, StoreError> {
        let inst = institution_id.map(str::to_owned);
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, at, source, institution_id, record,
                    CASE WHEN text_expires_at > ?3 THEN prompt_text END FROM incidents
                 WHERE (?1 IS NULL OR institution_id = ?1)
                 ORDER BY at DESC, id DESC LIMIT ?2",
            )?;
            // Text past its retention is never shown, even before the purge removes it.
            let now = crate::domain::unix_now();
            let rows = stmt.query_map(params![inst, limit, now], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            rows.map(|row| {
                let (id, at, source, institution_id, record, prompt_text) = row?;
                Ok(Incident {
                    id,
                    at,
                    source,
                    institution_id,
                    record: serde_json::from_str(&record)
                        .map_err(|e| StoreError::Corrupt(format!("incidents.record: {e}")))?,
                    prompt_text,
                })
            })
            .collect()
        })
        .await
    }

    /// Removes prompt text whose retention ended; returns how many records lost it. Local to
    /// this replica's view (each replica purges its own), so it is not a logged command.
    pub async fn purge_incident_text(&self, now: i64) -> Result<usize, StoreError> {
        self.call(move |c| purge_text(c, now)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{InstitutionKind, unix_now};
    use crate::store::NewInstitution;

    #[tokio::test]
    async fn kept_text_is_hidden_once_expired_and_then_purged() {
        let store = Store::open_in_memory().unwrap();
        let inst = store
            .create_institution(NewInstitution {
                name: "Library".into(),
                kind: InstitutionKind::Library,
                region: "US-IL".into(),
                timezone: "America/Chicago".into(),
                sector: None,
            })
            .await
            .unwrap();
        let now = unix_now();
        for (text, until) in [("kept", now + 3600), ("expired", now - 1)] {
            store
                .record_incident(NewIncident {
                    source: "automatic".into(),
                    institution_id: Some(inst.id.clone()),
                    record: serde_json::json!({"action": "block"}),
                    prompt_text: Some((text.into(), until)),
                })
                .await
                .unwrap();
        }
        let texts = |list: Vec<Incident>| {
            let mut t: Vec<Option<String>> = list.into_iter().map(|i| i.prompt_text).collect();
            t.sort();
            t
        };
        let listed = store.incidents(Some(&inst.id), 10).await.unwrap();
        assert_eq!(texts(listed), [None, Some("kept".into())]);
        assert_eq!(store.purge_incident_text(now).await.unwrap(), 1);
        assert_eq!(store.purge_incident_text(now).await.unwrap(), 0);
        assert_eq!(store.purge_incident_text(now + 7200).await.unwrap(), 1);
        let listed = store.incidents(None, 10).await.unwrap();
        assert_eq!(texts(listed), [None, None]);
    }
}
