//! Every change to control data, as data: a [`Command`] and the [`WriteCtx`] it runs with.
//!
//! A write is a pure function of the database, the command and its context, so it can be run
//! again elsewhere with the same result. That is what lets several replicas share one truth:
//! on the Redis backend a write is appended to a log in Redis and every replica applies the
//! log, in order, to its own SQLite view (see [`super::replica`]). The embedded backend runs the
//! same function directly. The time and the randomness a write needs (record ids, the
//! creation time) come from its context, chosen once by the replica that proposed it; a write
//! never reads the clock or the random source itself.
//!
//! Commands are JSON in the log, so an entry written by one version of Carrel is read by the
//! next: add fields with `#[serde(default)]`, never rename or reorder the meaning of one.

use std::any::Any;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::patrons::{LocalPatron, NewGuestPass, NewPatronSession};
use super::{
    InstitutionPatch, KeyPatch, NewAdminToken, NewApiKey, NewInstitution, NewModel, NewProvider,
    NewUser, StoreError,
};
use crate::config::{ModelConfig, ProviderConfig};
use crate::domain::{ContainmentKind, GroupKind, Tier};
use crate::patrons::PatronAuth;
use crate::quota::{Level, LimitsPatch};

/// The time and the seed of the record ids of one write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WriteCtx {
    /// RFC 3339 time of the write, for `created_at` and the like.
    at: String,
    /// Seed of the ids the write creates.
    seed: [u8; 16],
    /// How many ids have been drawn from the seed.
    #[serde(skip)]
    drawn: u32,
}

impl WriteCtx {
    /// A context for a write proposed now.
    pub(crate) fn fresh() -> WriteCtx {
        WriteCtx {
            at: jiff::Timestamp::now().to_string(),
            seed: crate::ids::random_bytes(),
            drawn: 0,
        }
    }

    /// The time of the write.
    pub(crate) fn now(&self) -> String {
        self.at.clone()
    }

    /// The time of the write, Unix seconds.
    pub(crate) fn unix(&self) -> i64 {
        self.at
            .parse::<jiff::Timestamp>()
            .map_or(0, |t| t.as_second())
    }

    /// The next record id of this write, such as `inst_4fQ9…`: the same on every replica.
    pub(crate) fn id(&mut self, prefix: &str) -> String {
        let digest = Sha256::new()
            .chain_update(self.seed)
            .chain_update(self.drawn.to_le_bytes())
            .finalize();
        self.drawn += 1;
        let n = u128::from_le_bytes(digest[..16].try_into().expect("16 of 32 bytes"));
        crate::ids::prefixed_base62(prefix, n)
    }
}

/// One change to control data. Each variant names the store method that proposes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Command {
    ApplyConfig {
        providers: Vec<ProviderConfig>,
        models: Vec<ModelConfig>,
    },
    CreateProvider(NewProvider),
    CreateModel(NewModel),
    CreateInstitution(NewInstitution),
    UpdateInstitution {
        id: String,
        patch: InstitutionPatch,
    },
    CreateKey(NewApiKey),
    UpdateKey {
        id: String,
        patch: KeyPatch,
    },
    RevokeKey {
        id: String,
    },
    RotateKey {
        old_id: String,
        new: NewApiKey,
        old_expires_at: String,
    },
    CreateSite {
        institution_id: String,
        name: String,
    },
    CreateGroup {
        institution_id: String,
        name: String,
        kind: GroupKind,
        #[serde(default)]
        tier_ceiling: Option<Tier>,
    },
    CreateUser(NewUser),
    DeleteUser {
        id: String,
    },
    RecordLoginFailure {
        user_id: String,
        now: i64,
    },
    ClearLoginFailures {
        user_id: String,
    },
    CreateSession {
        token_hash: [u8; 32],
        user_id: String,
        expires_at: i64,
    },
    DeleteSession {
        token_hash: [u8; 32],
    },
    AppendAudit {
        actor: String,
        action: String,
        target: String,
        institution_id: Option<String>,
    },
    CreateAdminToken(NewAdminToken),
    RevokeAdminToken {
        id: String,
    },
    SetLimits {
        level: Level,
        id: String,
        patch: LimitsPatch,
    },
    AddPatronExtension {
        institution_id: String,
        patron_ref: String,
        tokens: u64,
        expires_at: i64,
        created_by: String,
    },
    ResetPatronDay {
        institution_id: String,
        patron_ref: String,
        day: String,
        at: i64,
    },
    SetPatronAuth {
        institution_id: String,
        auth: PatronAuth,
    },
    ImportLocalPatrons {
        institution_id: String,
        patrons: Vec<LocalPatron>,
    },
    CreateGuestPasses {
        institution_id: String,
        passes: Vec<NewGuestPass>,
        created_by: String,
    },
    CreatePatronSession(NewPatronSession),
    EndPatronSession {
        id: String,
    },
    SetAttestation {
        key_id: String,
        use_case: String,
        approved_by: String,
        expires_at: String,
    },
    RevokeAttestation {
        key_id: String,
    },
    SetContained {
        kind: ContainmentKind,
        target: String,
        contained: bool,
        by: String,
    },
    RecordTreeHead(crate::audit::TreeHead),
    SetSafeguards {
        institution_id: String,
        settings: super::incidents::SafeguardSettings,
    },
    RecordIncident(super::incidents::NewIncident),
    AddPrice(super::prices::NewPrice),
    CreateSponsorPool {
        name: String,
        funder: String,
    },
    SetSponsorMember {
        pool_id: String,
        institution_id: String,
        monthly_cap_nano_usd: Option<i64>,
    },
    TopUpSponsorPool {
        pool_id: String,
        amount_nano_usd: i64,
        note: Option<String>,
        by: String,
    },
    SettleSponsorDays {
        days: Vec<super::sponsors::DayCost>,
    },
}

/// The result of a write, typed by the method that proposed it.
pub(crate) type Outcome = Result<Box<dyn Any + Send>, StoreError>;

fn boxed<T: Send + 'static>(r: Result<T, StoreError>) -> Outcome {
    r.map(|v| Box::new(v) as Box<dyn Any + Send>)
}

impl Command {
    /// Runs the write on `c`. Writes of several statements take a savepoint, so they nest in
    /// the transaction of a replica applying a run of log entries.
    pub(crate) fn apply(self, c: &mut Connection, w: &mut WriteCtx) -> Outcome {
        use super::{audit_tree, control, incidents, limits, patrons, safety, tokens};
        match self {
            Command::ApplyConfig { providers, models } => {
                boxed(control::apply_config(c, w, &providers, &models))
            }
            Command::CreateProvider(new) => boxed(control::create_provider(c, w, new)),
            Command::CreateModel(new) => boxed(control::create_model(c, w, new)),
            Command::CreateInstitution(new) => boxed(control::create_institution(c, w, new)),
            Command::UpdateInstitution { id, patch } => {
                boxed(control::update_institution(c, &id, patch))
            }
            Command::CreateKey(new) => boxed(control::create_key(c, w, new)),
            Command::UpdateKey { id, patch } => boxed(control::update_key(c, &id, patch)),
            Command::RevokeKey { id } => boxed(control::revoke_key(c, w, &id)),
            Command::RotateKey {
                old_id,
                new,
                old_expires_at,
            } => boxed(control::rotate_key(c, w, &old_id, new, &old_expires_at)),
            Command::CreateSite {
                institution_id,
                name,
            } => boxed(control::create_site(c, w, institution_id, name)),
            Command::CreateGroup {
                institution_id,
                name,
                kind,
                tier_ceiling,
            } => boxed(control::create_group(
                c,
                w,
                institution_id,
                name,
                kind,
                tier_ceiling,
            )),
            Command::CreateUser(new) => boxed(control::create_user(c, w, new)),
            Command::DeleteUser { id } => boxed(control::delete_user(c, w, &id)),
            Command::RecordLoginFailure { user_id, now } => {
                boxed(control::record_login_failure(c, &user_id, now))
            }
            Command::ClearLoginFailures { user_id } => {
                boxed(control::clear_login_failures(c, &user_id))
            }
            Command::CreateSession {
                token_hash,
                user_id,
                expires_at,
            } => boxed(control::create_session(
                c,
                &token_hash,
                &user_id,
                expires_at,
            )),
            Command::DeleteSession { token_hash } => boxed(control::delete_session(c, &token_hash)),
            Command::AppendAudit {
                actor,
                action,
                target,
                institution_id,
            } => boxed(control::append_audit(
                c,
                w,
                &actor,
                &action,
                &target,
                institution_id.as_deref(),
            )),
            Command::CreateAdminToken(new) => boxed(tokens::create_admin_token(c, w, new)),
            Command::RevokeAdminToken { id } => boxed(tokens::revoke_admin_token(c, w, &id)),
            Command::SetLimits { level, id, patch } => {
                boxed(limits::set_limits(c, level, &id, patch))
            }
            Command::AddPatronExtension {
                institution_id,
                patron_ref,
                tokens,
                expires_at,
                created_by,
            } => boxed(limits::add_patron_extension(
                c,
                w,
                institution_id,
                patron_ref,
                tokens,
                expires_at,
                created_by,
            )),
            Command::ResetPatronDay {
                institution_id,
                patron_ref,
                day,
                at,
            } => boxed(limits::reset_patron_day(
                c,
                &institution_id,
                &patron_ref,
                &day,
                at,
            )),
            Command::SetPatronAuth {
                institution_id,
                auth,
            } => boxed(patrons::set_patron_auth(c, w, &institution_id, &auth)),
            Command::ImportLocalPatrons {
                institution_id,
                patrons,
            } => boxed(patrons::import_local_patrons(c, &institution_id, &patrons)),
            Command::CreateGuestPasses {
                institution_id,
                passes,
                created_by,
            } => boxed(patrons::create_guest_passes(
                c,
                w,
                &institution_id,
                &passes,
                &created_by,
            )),
            Command::CreatePatronSession(session) => {
                boxed(patrons::create_patron_session(c, &session))
            }
            Command::EndPatronSession { id } => boxed(patrons::end_patron_session(c, &id)),
            Command::SetAttestation {
                key_id,
                use_case,
                approved_by,
                expires_at,
            } => boxed(safety::set_attestation(
                c,
                w,
                key_id,
                use_case,
                approved_by,
                expires_at,
            )),
            Command::RevokeAttestation { key_id } => boxed(safety::revoke_attestation(c, &key_id)),
            Command::SetContained {
                kind,
                target,
                contained,
                by,
            } => boxed(safety::set_contained(c, w, kind, &target, contained, &by)),
            Command::RecordTreeHead(head) => boxed(audit_tree::record_tree_head(c, &head)),
            Command::SetSafeguards {
                institution_id,
                settings,
            } => boxed(incidents::set_settings(c, &institution_id, &settings)),
            Command::RecordIncident(new) => boxed(incidents::record_incident(c, w, new)),
            Command::AddPrice(new) => boxed(super::prices::add_price(c, w, new)),
            Command::CreateSponsorPool { name, funder } => {
                boxed(super::sponsors::create_pool(c, w, &name, &funder))
            }
            Command::SetSponsorMember {
                pool_id,
                institution_id,
                monthly_cap_nano_usd,
            } => boxed(super::sponsors::set_member(
                c,
                w,
                &pool_id,
                &institution_id,
                monthly_cap_nano_usd,
            )),
            Command::TopUpSponsorPool {
                pool_id,
                amount_nano_usd,
                note,
                by,
            } => boxed(super::sponsors::top_up(
                c,
                w,
                &pool_id,
                amount_nano_usd,
                note.as_deref(),
                &by,
            )),
            Command::SettleSponsorDays { days } => boxed(super::sponsors::settle_days(c, w, &days)),
        }
    }

    /// What the data plane of another replica must hear about once this write is applied
    /// there (the replica that proposed it tells its own data plane directly).
    pub(crate) fn event(&self) -> Option<StoreEvent> {
        Some(match self {
            Command::ApplyConfig { .. }
            | Command::CreateProvider(_)
            | Command::CreateModel(_)
            | Command::AddPrice(_) => StoreEvent::CatalogChanged,
            Command::UpdateInstitution { id, .. } => StoreEvent::InstitutionChanged(id.clone()),
            Command::UpdateKey { id, .. } | Command::RevokeKey { id } => {
                StoreEvent::KeyChanged(id.clone())
            }
            Command::RotateKey { old_id, .. } => StoreEvent::KeyChanged(old_id.clone()),
            // Draws raise the institutions' own money limits (see `sponsors`).
            Command::SetLimits { .. } | Command::SettleSponsorDays { .. } => {
                StoreEvent::LimitsChanged
            }
            Command::AddPatronExtension {
                institution_id,
                patron_ref,
                ..
            } => StoreEvent::ExtensionsChanged {
                institution_id: institution_id.clone(),
                patron_ref: patron_ref.clone(),
            },
            Command::ResetPatronDay {
                institution_id,
                patron_ref,
                ..
            } => StoreEvent::PatronDayReset {
                institution_id: institution_id.clone(),
                patron_ref: patron_ref.clone(),
            },
            Command::CreatePatronSession(session) => StoreEvent::KioskSessionsEnded {
                kiosk_key_id: session.kiosk_key_id.clone(),
            },
            Command::EndPatronSession { id } => StoreEvent::PatronSessionEnded(id.clone()),
            Command::SetAttestation { key_id, .. } | Command::RevokeAttestation { key_id } => {
                StoreEvent::KeyChanged(key_id.clone())
            }
            Command::SetContained { .. } => StoreEvent::ContainmentChanged,
            Command::SetSafeguards { institution_id, .. } => {
                StoreEvent::SafeguardsChanged(institution_id.clone())
            }
            Command::RecordTreeHead(_) | Command::RecordIncident(_) => return None,
            Command::CreateSponsorPool { .. }
            | Command::SetSponsorMember { .. }
            | Command::TopUpSponsorPool { .. } => return None,
            // SIP2 pools follow their settings at the next sign-in, on every replica.
            Command::SetPatronAuth { .. }
            | Command::ImportLocalPatrons { .. }
            | Command::CreateGuestPasses { .. } => return None,
            Command::CreateInstitution(_)
            | Command::CreateKey(_)
            | Command::CreateSite { .. }
            | Command::CreateGroup { .. }
            | Command::CreateUser(_)
            | Command::DeleteUser { .. }
            | Command::RecordLoginFailure { .. }
            | Command::ClearLoginFailures { .. }
            | Command::CreateSession { .. }
            | Command::DeleteSession { .. }
            | Command::AppendAudit { .. }
            | Command::CreateAdminToken(_)
            | Command::RevokeAdminToken { .. } => return None,
        })
    }
}

/// A change made through another replica that this replica's data plane must apply: caches to
/// drop, snapshots to reload. Admin handlers do the same for their own changes before they
/// answer; these arrive from the Redis log within milliseconds of the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A key was revoked, rotated or changed.
    KeyChanged(String),
    /// An institution's status, time zone or policy changed.
    InstitutionChanged(String),
    /// Providers, models or their prices changed.
    CatalogChanged,
    /// A level's limits changed.
    LimitsChanged,
    /// A patron was granted an extension.
    ExtensionsChanged {
        /// The institution.
        institution_id: String,
        /// The patron.
        patron_ref: String,
    },
    /// A patron's day was started afresh.
    PatronDayReset {
        /// The institution.
        institution_id: String,
        /// The patron.
        patron_ref: String,
    },
    /// A session opened on a kiosk, ending that kiosk's earlier sessions.
    KioskSessionsEnded {
        /// The kiosk key.
        kiosk_key_id: String,
    },
    /// A patron session ended (sign-out).
    PatronSessionEnded(String),
    /// A containment switch was turned on or off: reload the set and stop what it covers.
    ContainmentChanged,
    /// An institution's safeguard rules changed: recompile them.
    SafeguardsChanged(String),
}

/// `Option<Option<T>>` fields as JSON: absent keeps, `null` clears, a value sets. Plain serde
/// would read both absent and `null` as `None`, losing "clear".
pub(crate) mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer, T: Serialize>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            // Skipped by `skip_serializing_if`; reached only without it.
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_same_for_the_same_context_and_differ_within_it() {
        let mut a = WriteCtx::fresh();
        let mut b: WriteCtx = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let (a1, a2) = (a.id("inst"), a.id("key"));
        assert_eq!((a1.clone(), a2.clone()), (b.id("inst"), b.id("key")));
        assert!(a1.starts_with("inst_") && a1.len() == 5 + 16, "{a1}");
        assert_ne!(a1[5..], a2[4..]);
        assert_ne!(WriteCtx::fresh().id("inst"), a1);
    }

    #[test]
    fn patches_keep_clear_and_set_apart_through_json() {
        let patch = KeyPatch {
            name: None,
            tier_ceiling: None,
            expires_at: Some(None),
            allowed_models: Some(Some(vec!["m".into()])),
        };
        let cmd = Command::UpdateKey {
            id: "k".into(),
            patch,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        let Command::UpdateKey { patch, .. } = serde_json::from_str(&json).unwrap() else {
            panic!("{json}");
        };
        assert_eq!(patch.name, None);
        assert_eq!(patch.expires_at, Some(None));
        assert_eq!(patch.allowed_models, Some(Some(vec!["m".to_owned()])));

        let limits = LimitsPatch([Some(None), Some(Some(7)), None, None, None, Some(Some(0))]);
        let cmd = Command::SetLimits {
            level: Level::Key,
            id: "k".into(),
            patch: limits,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        let Command::SetLimits { patch, .. } = serde_json::from_str(&json).unwrap() else {
            panic!("{json}");
        };
        assert_eq!(patch, limits);
    }

    #[test]
    fn provider_keys_from_the_environment_never_enter_the_log() {
        let cmd = Command::ApplyConfig {
            providers: vec![ProviderConfig {
                name: "p".into(),
                kind: crate::domain::ProviderKind::Openai,
                base_url: Some("https://example.invalid/v1".into()),
                api_key: Some("sk-secret".into()),
            }],
            models: vec![],
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert!(!json.contains("sk-secret"), "{json}");
    }
}
