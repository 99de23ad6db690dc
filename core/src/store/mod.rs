//! The embedded state store: one SQLite file in WAL mode in the data directory.
//!
//! Control data (providers, models, institutions, API keys) lives here. SQLite calls block, so
//! every method runs its statement on tokio's blocking pool; one connection behind a mutex is
//! plenty for control-plane traffic, and the data plane only reaches the store on a key-cache
//! miss. Schema changes are numbered migrations tracked in `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::config::{ModelConfig, ProviderConfig};
use crate::domain::{
    AdminUser, ApiKey, Economy, Group, GroupKind, Institution, InstitutionKind, InstitutionStatus,
    KeyCredential, KeyKind, Model, OverQuota, Provider, ProviderKind, Role, Site, Source, Tier,
};

pub(crate) mod audit_tree;
mod control;
mod ephemeral;
mod incidents;
mod journal;
mod limits;
mod patrons;
mod prices;
mod replica;
mod reports;
mod retention;
mod safety;
mod sponsors;
mod tokens;
mod usage;
mod write;

pub use incidents::{
    AutomaticIncident, Incident, MAX_TEXT_RETENTION_DAYS, NewIncident, PromptRetention,
    SafeguardSettings,
};
pub use limits::{PatronExtension, PeriodUsage};
pub use patrons::{
    GuestPass, ImportCounts, LocalPatron, NewGuestPass, NewPatronSession, PatronSession,
};
pub use prices::{NewPrice, PriceVersion};
pub use replica::{JOURNAL_FILE, RedisSettings, ReplicaCounters, VIEW_FILE};
pub use reports::SectorCell;
pub use retention::{DEFAULT_PATRON_RETENTION_HOURS, Forgotten, MAX_PATRON_RETENTION_HOURS};
pub use safety::Containment;
pub use sponsors::{DayCost, SponsorEntry, SponsorMember, SponsorPool};
pub use tokens::NewAdminToken;
pub use usage::{UsageLine, UsageRecord, UsageStatus};
pub use write::StoreEvent;

use write::{Command, WriteCtx};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "carrel.db";

/// Work in Rust that a migration does after its SQL, in the same transaction.
type MigrationStep = fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>;

/// One schema migration: SQL, then optionally a step in Rust, in one transaction.
struct Migration {
    sql: &'static str,
    then: Option<MigrationStep>,
}

impl Migration {
    const fn sql(sql: &'static str) -> Migration {
        Migration { sql, then: None }
    }

    const fn then(step: MigrationStep, sql: &'static str) -> Migration {
        Migration {
            sql,
            then: Some(step),
        }
    }
}

/// Numbered schema migrations; entry `i` moves the schema from version `i` to `i + 1`.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration::sql(
        r#"
CREATE TABLE providers (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    base_url    TEXT,
    api_key     TEXT,
    source      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE models (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL UNIQUE,
    provider              TEXT NOT NULL REFERENCES providers(name) ON UPDATE CASCADE,
    upstream_model        TEXT NOT NULL,
    tier                  TEXT NOT NULL,
    input_price_per_mtok  REAL NOT NULL,
    output_price_per_mtok REAL NOT NULL,
    source                TEXT NOT NULL,
    created_at            TEXT NOT NULL
);
CREATE TABLE institutions (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    region      TEXT NOT NULL,
    timezone    TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    name            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    tier_ceiling    TEXT NOT NULL,
    secret_hash     BLOB NOT NULL,
    created_at      TEXT NOT NULL,
    revoked_at      TEXT
);
CREATE INDEX api_keys_by_institution ON api_keys(institution_id);
"#,
    ),
    Migration::sql(
        r#"
CREATE TABLE admin_users (
    id              TEXT PRIMARY KEY,
    username        TEXT NOT NULL UNIQUE,
    password_hash   TEXT NOT NULL,
    role            TEXT NOT NULL,
    institution_id  TEXT REFERENCES institutions(id),
    created_at      TEXT NOT NULL,
    locked_until    INTEGER
);
CREATE TABLE admin_sessions (
    token_hash  BLOB PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES admin_users(id),
    expires_at  INTEGER NOT NULL
);
CREATE TABLE login_failures (
    user_id  TEXT NOT NULL REFERENCES admin_users(id),
    at       INTEGER NOT NULL
);
CREATE INDEX login_failures_by_user ON login_failures(user_id, at);
"#,
    ),
    Migration::sql(
        r#"
CREATE TABLE admin_audit (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    at              TEXT NOT NULL,
    actor           TEXT NOT NULL,
    action          TEXT NOT NULL,
    target          TEXT NOT NULL,
    institution_id  TEXT
);
CREATE INDEX admin_audit_by_institution ON admin_audit(institution_id, seq);
"#,
    ),
    Migration::sql(
        r#"
ALTER TABLE api_keys ADD COLUMN expires_at TEXT;
"#,
    ),
    Migration::sql(
        r#"
CREATE TABLE sites (
    id              TEXT PRIMARY KEY,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    name            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    UNIQUE (institution_id, name)
);
CREATE TABLE member_groups (
    id              TEXT PRIMARY KEY,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    name            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    UNIQUE (institution_id, name)
);
ALTER TABLE api_keys ADD COLUMN site_id TEXT REFERENCES sites(id);
ALTER TABLE api_keys ADD COLUMN group_id TEXT REFERENCES member_groups(id);
"#,
    ),
    Migration::sql(
        r#"
ALTER TABLE institutions ADD COLUMN sector TEXT;
ALTER TABLE institutions ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
ALTER TABLE institutions ADD COLUMN frontier_verified INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
CREATE TABLE admin_tokens (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    token_hash      BLOB NOT NULL UNIQUE,
    role            TEXT NOT NULL,
    institution_id  TEXT REFERENCES institutions(id),
    scopes          TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    expires_at      INTEGER,
    revoked_at      TEXT
);
CREATE TABLE usage_daily (
    institution_id     TEXT NOT NULL,
    day                TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    site_id            TEXT NOT NULL,
    group_id           TEXT NOT NULL,
    requests           INTEGER NOT NULL,
    incomplete         INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cost_nano_usd      INTEGER NOT NULL,
    PRIMARY KEY (institution_id, day, key_id, model, site_id, group_id)
) WITHOUT ROWID;
"#,
    ),
    Migration::sql(
        r#"
ALTER TABLE institutions ADD COLUMN over_quota TEXT NOT NULL DEFAULT 'reject';
ALTER TABLE models ADD COLUMN max_output_tokens INTEGER NOT NULL DEFAULT 4096;
CREATE TABLE limits (
    level                    TEXT NOT NULL,
    id                       TEXT NOT NULL,
    requests_per_minute      INTEGER,
    tokens_per_day           INTEGER,
    tokens_per_month         INTEGER,
    cost_per_month_nano_usd  INTEGER,
    concurrent_streams       INTEGER,
    patron_tokens_per_day    INTEGER,
    PRIMARY KEY (level, id)
) WITHOUT ROWID;
-- Keyed by the request id, which sorts by time, so a record is one append to one b-tree.
CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,
    at                 INTEGER NOT NULL,
    day                TEXT NOT NULL,
    institution_id     TEXT NOT NULL,
    site_id            TEXT,
    group_id           TEXT,
    key_id             TEXT NOT NULL,
    patron_ref         TEXT,
    model              TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cost_nano_usd      INTEGER NOT NULL,
    cached             INTEGER NOT NULL,
    estimated          INTEGER NOT NULL,
    status             TEXT NOT NULL,
    latency_ms         INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX usage_records_patron_day ON usage_records (institution_id, day, patron_ref)
    WHERE patron_ref IS NOT NULL;
CREATE TABLE patron_extensions (
    id              TEXT PRIMARY KEY,
    institution_id  TEXT NOT NULL REFERENCES institutions(id),
    patron_ref      TEXT NOT NULL,
    tokens          INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    created_by      TEXT NOT NULL,
    created_at      TEXT NOT NULL
);
CREATE INDEX patron_extensions_patron ON patron_extensions (institution_id, patron_ref);
CREATE TABLE patron_day_resets (
    institution_id  TEXT NOT NULL,
    patron_ref      TEXT NOT NULL,
    day             TEXT NOT NULL,
    at              INTEGER NOT NULL,
    PRIMARY KEY (institution_id, patron_ref, day)
) WITHOUT ROWID;
"#,
    ),
    // 8: per-request records move into one row per written batch (`usage::encode_batch`), and
    // patrons' daily sums get a table of their own. `usage::after_migration_8` moves the rows.
    Migration::then(
        usage::after_migration_8,
        r#"
CREATE TABLE usage_batches (
    seq         INTEGER PRIMARY KEY,
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    records     INTEGER NOT NULL,
    data        BLOB NOT NULL
);
CREATE TABLE patron_daily (
    institution_id  TEXT NOT NULL,
    day             TEXT NOT NULL,
    patron_ref      TEXT NOT NULL,
    tokens          INTEGER NOT NULL,
    PRIMARY KEY (institution_id, day, patron_ref)
) WITHOUT ROWID;
INSERT INTO patron_daily (institution_id, day, patron_ref, tokens)
    SELECT r.institution_id, r.day, r.patron_ref, SUM(r.prompt_tokens + r.completion_tokens)
    FROM usage_records r LEFT JOIN patron_day_resets x
      ON x.institution_id = r.institution_id AND x.patron_ref = r.patron_ref AND x.day = r.day
    WHERE r.patron_ref IS NOT NULL AND r.status != 'upstream_error'
      AND (x.at IS NULL OR r.at > x.at)
    GROUP BY r.institution_id, r.day, r.patron_ref;
"#,
    ),
    // 9: patron sign-in: settings, local lists, guest passes, sessions.
    Migration::sql(patrons::MIGRATION),
    // 10: tier ceilings and bases, frontier attestations, containment switches.
    Migration::sql(safety::MIGRATION),
    // 11: signed tree heads of the audit log.
    Migration::sql(audit_tree::MIGRATION),
    // 12: safeguard settings of institutions, and incidents.
    Migration::sql(incidents::MIGRATION),
    // 13: patrons' usage metadata kept for a window, then rolled up.
    Migration::sql(retention::MIGRATION),
    // 14: versioned model prices.
    Migration::sql(prices::MIGRATION),
    // 15: cached answers and their savings, and requests that named a patron, in daily sums.
    Migration::sql(usage::MIGRATION_SAVINGS),
    // 16: models served by several deployments.
    Migration::sql("ALTER TABLE models ADD COLUMN routing TEXT NOT NULL DEFAULT '{}';"),
    // 17: institutions' cache and fallback choices.
    Migration::sql(
        r#"
ALTER TABLE institutions ADD COLUMN cache_all INTEGER NOT NULL DEFAULT 0;
ALTER TABLE institutions ADD COLUMN cache_price_percent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE institutions ADD COLUMN allow_fallback INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    // 18: sponsor pools, their members and their ledger.
    Migration::sql(sponsors::MIGRATION),
    // 19: prompt classes whose cached answers every institution shares.
    Migration::sql("ALTER TABLE models ADD COLUMN public_cache TEXT NOT NULL DEFAULT '[]';"),
];

/// Columns of an institution, in [`institution_row`]'s order.
const INSTITUTION_COLS: [&str; 16] = [
    "id",
    "name",
    "kind",
    "region",
    "timezone",
    "created_at",
    "sector",
    "status",
    "frontier_verified",
    "over_quota",
    "tier_ceiling",
    "minor_tier_ceiling",
    "patron_retention_hours",
    "cache_all",
    "cache_price_percent",
    "allow_fallback",
];

/// Columns of a key, in [`key_row`]'s order.
const KEY_COLS: [&str; 11] = [
    "id",
    "institution_id",
    "name",
    "kind",
    "tier_ceiling",
    "created_at",
    "revoked_at",
    "expires_at",
    "site_id",
    "group_id",
    "allowed_models",
];

/// `cols` as a select list, each prefixed with `table.` when a table is given.
fn select_list(table: Option<&str>, cols: &[&str]) -> String {
    cols.iter()
        .map(|c| match table {
            Some(t) => format!("{t}.{c}"),
            None => (*c).to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Failed logins within [`LOCKOUT_WINDOW_SECS`] that lock an account.
pub const LOCKOUT_FAILURES: i64 = 5;
/// The window over which failed logins are counted, and how long a lock lasts.
pub const LOCKOUT_WINDOW_SECS: i64 = 15 * 60;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A record with the same unique name exists.
    #[error("{0} already exists")]
    Conflict(String),
    /// A record that the operation refers to does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A stored value does not parse (the file was edited by hand or is from a newer version).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The database file is from a newer Carrel.
    #[error("the database schema is version {found}, newer than this build knows ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Highest version this build knows.
        known: i64,
    },
    /// A limit breaks a rule (out of range, or more than the parent's).
    #[error(transparent)]
    Limit(#[from] crate::quota::LimitError),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The blocking task running the statement panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
    /// The shared store (Redis) did not answer in time; nothing was changed, or the change
    /// is logged but not yet applied here.
    #[error("shared store unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the error follows from the data alone, so that every replica applying the
    /// same write to the same view meets it too (rather than from a disk, a lock or a task).
    pub(crate) fn is_deterministic(&self) -> bool {
        match self {
            StoreError::Conflict(_)
            | StoreError::NotFound(_)
            | StoreError::Corrupt(_)
            | StoreError::Limit(_) => true,
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            StoreError::Sqlite(_)
            | StoreError::TooNew { .. }
            | StoreError::Io { .. }
            | StoreError::Task(_)
            | StoreError::Unavailable(_) => false,
        }
    }
}

/// A provider to create through the admin API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewProvider {
    /// Unique name.
    pub name: String,
    /// How it is reached.
    pub kind: ProviderKind,
    /// Validated base URL for `openai` providers.
    pub base_url: Option<String>,
    /// Upstream API key.
    pub api_key: Option<String>,
}

/// A model to create through the admin API: the same fields as a config entry.
pub type NewModel = ModelConfig;

/// An institution to create.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewInstitution {
    /// Display name.
    pub name: String,
    /// Sector.
    pub kind: InstitutionKind,
    /// ISO 3166-2 code.
    pub region: String,
    /// IANA time zone.
    pub timezone: String,
    /// Validated sector label.
    pub sector: Option<String>,
}

/// Changes to an institution; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct InstitutionPatch {
    /// New display name.
    pub name: Option<String>,
    /// New sector label, or `Some(None)` to clear it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "write::double_option"
    )]
    pub sector: Option<Option<String>>,
    /// New IANA time zone.
    pub timezone: Option<String>,
    /// New status.
    pub status: Option<InstitutionStatus>,
    /// New verification flag (operators only; the caller checks).
    pub frontier_verified: Option<bool>,
    /// New policy for requests larger than what is left.
    pub over_quota: Option<OverQuota>,
    /// New ceiling for every key of the institution.
    #[serde(default)]
    pub tier_ceiling: Option<Tier>,
    /// New ceiling for the institution's minors.
    #[serde(default)]
    pub minor_tier_ceiling: Option<Tier>,
    /// New window for patrons' usage metadata, in hours.
    #[serde(default)]
    pub patron_retention_hours: Option<u32>,
    /// Cache every request's answer, not only deterministic ones.
    #[serde(default)]
    pub cache_all: Option<bool>,
    /// New price of a cached answer, in percent of the provider's.
    #[serde(default)]
    pub cache_price_percent: Option<u8>,
    /// Let fallback models answer.
    #[serde(default)]
    pub allow_fallback: Option<bool>,
}

/// Changes to a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyPatch {
    /// New display name.
    pub name: Option<String>,
    /// New tier ceiling.
    pub tier_ceiling: Option<Tier>,
    /// New RFC 3339 expiry, or `Some(None)` for none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "write::double_option"
    )]
    pub expires_at: Option<Option<String>>,
    /// New allow-list of models, or `Some(None)` for any model within the ceiling.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "write::double_option"
    )]
    pub allowed_models: Option<Option<Vec<String>>>,
}

/// Which page of a list to read: the rows after `after` (a cursor from an earlier page), at
/// most `limit` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Cursor of the last row already seen.
    pub after: Option<i64>,
    /// Most rows to return.
    pub limit: u32,
}

impl PageRequest {
    /// Every row at once, for internal readers such as the routing catalog.
    pub const ALL: PageRequest = PageRequest {
        after: None,
        limit: u32::MAX,
    };

    /// The first page of `limit` rows.
    pub fn first(limit: u32) -> Self {
        PageRequest { after: None, limit }
    }
}

/// One page of a list, in the list's order; `next_cursor` reads the next page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Page<T> {
    /// The rows of this page.
    pub data: Vec<T>,
    /// Pass as `after` to read the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page holding everything.
    pub fn whole(data: Vec<T>) -> Self {
        Page {
            data,
            next_cursor: None,
        }
    }
}

/// An API key to record; the caller minted it and hashed its secret.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewApiKey {
    /// Public id from the key string.
    pub id: String,
    /// Owning institution.
    pub institution_id: String,
    /// Display name.
    pub name: String,
    /// What it is for.
    pub kind: KeyKind,
    /// Highest tier it may reach.
    pub tier_ceiling: Tier,
    /// HMAC of the secret.
    pub secret_hash: [u8; 32],
    /// RFC 3339 expiry, if the key expires.
    pub expires_at: Option<String>,
    /// Site, already checked to belong to the institution.
    pub site_id: Option<String>,
    /// Group, already checked to belong to the institution.
    pub group_id: Option<String>,
    /// Models the key is limited to, if any.
    pub allowed_models: Option<Vec<String>>,
}

/// An admin account to create; the caller hashed the password.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewUser {
    /// Unique login name.
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Role.
    pub role: Role,
    /// Institution (required for every role but operator).
    pub institution_id: Option<String>,
}

/// What a login attempt needs about an account.
#[derive(Debug, Clone)]
pub struct LoginRecord {
    /// The account.
    pub user: AdminUser,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Unix seconds until which the account is locked, if it is.
    pub locked_until: Option<i64>,
}

/// One entry of the admin audit trail: who did what to what, when. Never secrets.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Position in the trail; also the pagination cursor.
    pub seq: i64,
    /// RFC 3339 time.
    pub at: String,
    /// `operator` or `user:<id>`.
    pub actor: String,
    /// What was done, e.g. `key.revoke`.
    pub action: String,
    /// What it was done to, e.g. `key:<id>`.
    pub target: String,
    /// The institution concerned, if any.
    pub institution_id: Option<String>,
}

/// Handle to the store. Cheap to clone.
///
/// Two backends behind one API: **embedded** (one SQLite file, one process) and **redis**
/// (several replicas; see [`replica`]). Reads always run on the local SQLite database (the
/// whole store, or a replica's view of the shared one); writes are [`Command`]s, run here or
/// appended to the shared log.
#[derive(Clone)]
pub struct Store {
    /// The one connection. A `std` mutex is right: it is only ever held inside a blocking-pool
    /// task, for one statement or transaction, never across an `.await`.
    conn: Arc<Mutex<Connection>>,
    /// The Redis backend's side, when this is a replica.
    replica: Option<Arc<replica::Replica>>,
    /// Counters and flags that live minutes, not in the log.
    ephemeral: Arc<ephemeral::Ephemeral>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.replica {
            None => "Store(embedded)",
            Some(_) => "Store(redis)",
        })
    }
}

/// Opens a SQLite file with the settings every Carrel database uses.
fn open_file(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The usage ledger writes every 20 ms under load. When it wrote a row per request,
    // checkpointing the WAL every 1000 pages (SQLite's default) made each row cost twice as
    // much (4.8 against 2.2 µs measured on the benchmark machine); a WAL of up to ~40 MB
    // between checkpoints is cheap for a server, and durability is the same.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    Ok(conn)
}

impl Store {
    /// Opens (creating if needed) `<dir>/carrel.db` and brings its schema up to date.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Store::init(open_file(&dir.join(DB_FILE))?)
    }

    /// A private in-memory store, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        Store::from_parts(conn, None)
    }

    fn from_parts(
        mut conn: Connection,
        replica: Option<Arc<replica::Replica>>,
    ) -> Result<Store, StoreError> {
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        let ephemeral = match &replica {
            None => ephemeral::Ephemeral::memory(),
            Some(r) => r.ephemeral(),
        };
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            replica,
            ephemeral: Arc::new(ephemeral),
        })
    }

    /// Whether this is a replica of the Redis backend (else the embedded store).
    pub fn is_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// Which backend this is, for logs and metrics: `"embedded"` or `"redis"`.
    pub fn kind(&self) -> &'static str {
        if self.is_replica() {
            "redis"
        } else {
            "embedded"
        }
    }

    /// Runs a write: here on the embedded backend, through the shared log on the Redis one.
    async fn write<T: Send + 'static>(&self, cmd: Command) -> Result<T, StoreError> {
        let outcome = match &self.replica {
            None => {
                self.call(move |c| Ok(cmd.apply(c, &mut WriteCtx::fresh())))
                    .await?
            }
            Some(replica) => replica.propose(cmd).await?,
        };
        outcome?
            .downcast::<T>()
            .map(|v| *v)
            .map_err(|_| StoreError::Task("a write returned an unexpected type".into()))
    }

    /// The schema version in the file.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.call(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .await
    }

    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves the connection usable: SQLite rolls back
            // any open transaction when the statement handle drops.
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` on the connection on the calling thread, for a thread of its own that is not a
    /// runtime's (async callers use `call`).
    pub(crate) fn blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Cheap liveness check for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    /// Upserts the providers and models declared in the config file. Config wins over an
    /// admin-made record of the same name. Provider API keys from the environment are not
    /// written to disk: they stay in memory (see [`Store::list_providers`] callers).
    pub async fn apply_config(
        &self,
        providers: Vec<ProviderConfig>,
        models: Vec<ModelConfig>,
    ) -> Result<(), StoreError> {
        self.write(Command::ApplyConfig { providers, models }).await
    }

    /// Creates a provider; a taken name is a conflict.
    pub async fn create_provider(&self, new: NewProvider) -> Result<Provider, StoreError> {
        self.write(Command::CreateProvider(new)).await
    }

    /// Providers, oldest first.
    pub async fn list_providers(&self, page: PageRequest) -> Result<Page<Provider>, StoreError> {
        self.call(move |c| {
            paged(
                c,
                "SELECT id, name, kind, base_url, api_key, source, created_at, rowid
                 FROM providers WHERE 1",
                &[],
                page,
                provider_row,
            )
        })
        .await
    }

    /// Creates a model; its provider must exist and its name must be free.
    pub async fn create_model(&self, new: NewModel) -> Result<Model, StoreError> {
        self.write(Command::CreateModel(new)).await
    }

    /// Models, oldest first.
    pub async fn list_models(&self, page: PageRequest) -> Result<Page<Model>, StoreError> {
        self.call(move |c| {
            paged(
                c,
                "SELECT id, name, provider, upstream_model, tier, input_price_per_mtok,
                    output_price_per_mtok, source, created_at, max_output_tokens, tier_basis,
                    routing, public_cache, rowid
                 FROM models WHERE 1",
                &[],
                page,
                model_row,
            )
        })
        .await
    }

    /// Creates an institution.
    pub async fn create_institution(&self, new: NewInstitution) -> Result<Institution, StoreError> {
        self.write(Command::CreateInstitution(new)).await
    }

    /// One institution.
    pub async fn get_institution(&self, id: &str) -> Result<Option<Institution>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| get_institution(c, &id)).await
    }

    /// Institutions, oldest first.
    pub async fn list_institutions(
        &self,
        page: PageRequest,
    ) -> Result<Page<Institution>, StoreError> {
        self.call(move |c| {
            let sql = format!(
                "SELECT {}, rowid FROM institutions WHERE 1",
                select_list(None, &INSTITUTION_COLS)
            );
            paged(c, &sql, &[], page, |r| institution_row(r, 0))
        })
        .await
    }

    /// Changes an institution; `Ok(None)` when there is no such institution.
    pub async fn update_institution(
        &self,
        id: &str,
        patch: InstitutionPatch,
    ) -> Result<Option<Institution>, StoreError> {
        let id = id.to_owned();
        self.write(Command::UpdateInstitution { id, patch }).await
    }

    /// Records a new API key for an existing institution.
    pub async fn create_key(&self, new: NewApiKey) -> Result<ApiKey, StoreError> {
        self.write(Command::CreateKey(new)).await
    }

    /// The keys of one institution, oldest first.
    pub async fn list_keys(
        &self,
        institution_id: &str,
        page: PageRequest,
    ) -> Result<Page<ApiKey>, StoreError> {
        let id = institution_id.to_owned();
        self.call(move |c| {
            require_institution(c, &id)?;
            let sql = format!(
                "SELECT {}, rowid FROM api_keys WHERE institution_id = :inst",
                select_list(None, &KEY_COLS)
            );
            paged(c, &sql, &[(":inst", &id)], page, key_row)
        })
        .await
    }

    /// Changes a live key; `Ok(None)` when no live key has that id.
    pub async fn update_key(
        &self,
        key_id: &str,
        patch: KeyPatch,
    ) -> Result<Option<ApiKey>, StoreError> {
        let id = key_id.to_owned();
        self.write(Command::UpdateKey { id, patch }).await
    }

    /// What is needed to verify a presented key: `None` when the id is unknown or revoked.
    pub async fn key_credential(&self, key_id: &str) -> Result<Option<KeyCredential>, StoreError> {
        let id = key_id.to_owned();
        self.call(move |c| {
            let sql = format!(
                "SELECT {}, k.secret_hash, {}, g.tier_ceiling, a.expires_at
                 FROM api_keys k JOIN institutions i ON i.id = k.institution_id
                 LEFT JOIN member_groups g ON g.id = k.group_id
                 LEFT JOIN frontier_attestations a ON a.key_id = k.id
                 WHERE k.id = ?1 AND k.revoked_at IS NULL",
                select_list(Some("k"), &KEY_COLS),
                select_list(Some("i"), &INSTITUTION_COLS)
            );
            let hash_at = KEY_COLS.len();
            let group_at = hash_at + 1 + INSTITUTION_COLS.len();
            c.query_row(&sql, [id], |r| {
                let hash: Vec<u8> = r.get(hash_at)?;
                let group_ceiling: Option<String> = r.get(group_at)?;
                let attested_until: Option<String> = r.get(group_at + 1)?;
                Ok((
                    key_row(r),
                    hash,
                    institution_row(r, hash_at + 1),
                    group_ceiling,
                    attested_until,
                ))
            })
            .optional()?
            .map(|(key, hash, inst, group_ceiling, attested_until)| {
                Ok(KeyCredential {
                    group_tier_ceiling: group_ceiling
                        .map(|t| parse("member_groups.tier_ceiling", t))
                        .transpose()?,
                    attested_until,
                    key: key?,
                    secret_hash: hash
                        .try_into()
                        .map_err(|_| StoreError::Corrupt("api_keys.secret_hash".into()))?,
                    institution: inst?,
                })
            })
            .transpose()
        })
        .await
    }

    /// Revokes a key. `Ok(false)` when no live key has that id.
    pub async fn revoke_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let id = key_id.to_owned();
        self.write(Command::RevokeKey { id }).await
    }

    /// Creates a site of an existing institution; names are unique per institution.
    pub async fn create_site(
        &self,
        institution_id: &str,
        name: String,
    ) -> Result<Site, StoreError> {
        let institution_id = institution_id.to_owned();
        self.write(Command::CreateSite {
            institution_id,
            name,
        })
        .await
    }

    /// The sites of an institution, oldest first.
    pub async fn list_sites(
        &self,
        institution_id: &str,
        page: PageRequest,
    ) -> Result<Page<Site>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            require_institution(c, &inst)?;
            paged(
                c,
                "SELECT id, institution_id, name, created_at, rowid FROM sites
                 WHERE institution_id = :inst",
                &[(":inst", &inst)],
                page,
                site_row,
            )
        })
        .await
    }

    /// Creates a group of an existing institution; names are unique per institution.
    pub async fn create_group(
        &self,
        institution_id: &str,
        name: String,
        kind: GroupKind,
        tier_ceiling: Option<Tier>,
    ) -> Result<Group, StoreError> {
        let institution_id = institution_id.to_owned();
        self.write(Command::CreateGroup {
            institution_id,
            name,
            kind,
            tier_ceiling,
        })
        .await
    }

    /// The groups of an institution, oldest first.
    pub async fn list_groups(
        &self,
        institution_id: &str,
        page: PageRequest,
    ) -> Result<Page<Group>, StoreError> {
        let inst = institution_id.to_owned();
        self.call(move |c| {
            require_institution(c, &inst)?;
            paged(
                c,
                "SELECT id, institution_id, name, kind, created_at, tier_ceiling, rowid
                 FROM member_groups
                 WHERE institution_id = :inst",
                &[(":inst", &inst)],
                page,
                group_row,
            )
        })
        .await
    }

    /// Whether a site and a group (each optional) belong to an institution: (site ok, group ok).
    pub async fn belongs_to(
        &self,
        institution_id: &str,
        site_id: Option<&str>,
        group_id: Option<&str>,
    ) -> Result<(bool, bool), StoreError> {
        let (inst, site, group) = (
            institution_id.to_owned(),
            site_id.map(str::to_owned),
            group_id.map(str::to_owned),
        );
        self.call(move |c| {
            let site_ok = match &site {
                None => true,
                Some(id) => c.query_row(
                    "SELECT EXISTS(SELECT 1 FROM sites WHERE id = ?1 AND institution_id = ?2)",
                    params![id, inst],
                    |r| r.get(0),
                )?,
            };
            let group_ok = match &group {
                None => true,
                Some(id) => c.query_row(
                    "SELECT EXISTS(SELECT 1 FROM member_groups WHERE id = ?1 AND institution_id = ?2)",
                    params![id, inst],
                    |r| r.get(0),
                )?,
            };
            Ok((site_ok, group_ok))
        })
        .await
    }

    /// One key (revoked or not).
    pub async fn get_key(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError> {
        let id = key_id.to_owned();
        self.call(move |c| get_key(c, &id)).await
    }

    /// Replaces a live key with `new` in one transaction; the old key keeps working until
    /// `old_expires_at` (RFC 3339; never later than an expiry it already had).
    pub async fn rotate_key(
        &self,
        old_id: &str,
        new: NewApiKey,
        old_expires_at: String,
    ) -> Result<ApiKey, StoreError> {
        let old_id = old_id.to_owned();
        self.write(Command::RotateKey {
            old_id,
            new,
            old_expires_at,
        })
        .await
    }

    /// Creates an admin account; a taken username is a conflict.
    pub async fn create_user(&self, new: NewUser) -> Result<AdminUser, StoreError> {
        self.write(Command::CreateUser(new)).await
    }

    /// Admin accounts, of one institution or of all, oldest first.
    pub async fn list_users(
        &self,
        institution_id: Option<&str>,
        page: PageRequest,
    ) -> Result<Page<AdminUser>, StoreError> {
        let inst = institution_id.map(str::to_owned);
        self.call(move |c| {
            paged(
                c,
                "SELECT id, username, role, institution_id, created_at, rowid FROM admin_users
                 WHERE (:inst IS NULL OR institution_id = :inst)",
                &[(":inst", &inst)],
                page,
                user_row,
            )
        })
        .await
    }

    /// One admin account.
    pub async fn get_user(&self, id: &str) -> Result<Option<AdminUser>, StoreError> {
        let id = id.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT id, username, role, institution_id, created_at FROM admin_users
                 WHERE id = ?1",
                [id],
                |r| Ok(user_row(r)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Deletes an admin account with its sessions, and revokes the automation tokens it made.
    /// `Ok(false)` when there is no such account.
    pub async fn delete_user(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(Command::DeleteUser { id }).await
    }

    /// What a login attempt for `username` needs.
    pub async fn login_record(&self, username: &str) -> Result<Option<LoginRecord>, StoreError> {
        let name = username.to_owned();
        self.call(move |c| {
            c.query_row(
                "SELECT id, username, role, institution_id, created_at, password_hash, locked_until
                 FROM admin_users WHERE username = ?1",
                [name],
                |r| {
                    Ok((
                        user_row(r),
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                },
            )
            .optional()?
            .map(|(user, password_hash, locked_until)| {
                Ok(LoginRecord {
                    user: user?,
                    password_hash,
                    locked_until,
                })
            })
            .transpose()
        })
        .await
    }

    /// Records a failed login at `now` (Unix seconds). When it is the
    /// [`LOCKOUT_FAILURES`]th within [`LOCKOUT_WINDOW_SECS`], locks the account for that long
    /// and returns the time the lock ends.
    pub async fn record_login_failure(
        &self,
        user_id: &str,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let user_id = user_id.to_owned();
        self.write(Command::RecordLoginFailure { user_id, now })
            .await
    }

    /// Forgets failed logins after a successful one.
    pub async fn clear_login_failures(&self, user_id: &str) -> Result<(), StoreError> {
        let user_id = user_id.to_owned();
        self.write(Command::ClearLoginFailures { user_id }).await
    }

    /// Stores a session (only the token's keyed hash).
    pub async fn create_session(
        &self,
        token_hash: [u8; 32],
        user_id: &str,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let user_id = user_id.to_owned();
        self.write(Command::CreateSession {
            token_hash,
            user_id,
            expires_at,
        })
        .await
    }

    /// The account of a live session; expired sessions are deleted on sight. (On the Redis
    /// backend that deletion stays in this replica's view: every replica deletes the same
    /// expired rows when it sees them, so views differ only in rows no read returns.)
    pub async fn session_user(
        &self,
        token_hash: [u8; 32],
        now: i64,
    ) -> Result<Option<AdminUser>, StoreError> {
        self.call(move |c| {
            c.execute(
                "DELETE FROM admin_sessions WHERE token_hash = ?1 AND expires_at <= ?2",
                params![&token_hash[..], now],
            )?;
            c.query_row(
                "SELECT u.id, u.username, u.role, u.institution_id, u.created_at
                 FROM admin_sessions s JOIN admin_users u ON u.id = s.user_id
                 WHERE s.token_hash = ?1",
                [&token_hash[..]],
                |r| Ok(user_row(r)),
            )
            .optional()?
            .transpose()
        })
        .await
    }

    /// Appends to the admin audit trail.
    pub async fn append_audit(
        &self,
        actor: String,
        action: &'static str,
        target: String,
        institution_id: Option<String>,
    ) -> Result<i64, StoreError> {
        self.write(Command::AppendAudit {
            actor,
            action: action.to_owned(),
            target,
            institution_id,
        })
        .await
    }

    /// Audit entries, newest first: of one institution or all, before `before` (a `seq`), at most
    /// `limit`.
    pub async fn list_audit(
        &self,
        institution_id: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let inst = institution_id.map(str::to_owned);
        self.call(move |c| {
            let mut stmt = c.prepare(
                "SELECT seq, at, actor, action, target, institution_id FROM admin_audit
                 WHERE (?1 IS NULL OR institution_id = ?1) AND (?2 IS NULL OR seq < ?2)
                 ORDER BY seq DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![inst, before, limit], |r| Ok(audit_row(r)))?;
            rows.map(|r| r?).collect()
        })
        .await
    }

    /// Ends a session.
    pub async fn delete_session(&self, token_hash: [u8; 32]) -> Result<(), StoreError> {
        self.write(Command::DeleteSession { token_hash }).await
    }
}

/// Reads one page: `select` is a query whose last column is the `rowid` and that ends in a
/// `WHERE` clause, with named parameters `params`; rows come in `rowid` order (creation order).
pub(crate) fn paged<T>(
    c: &Connection,
    select: &str,
    params: &[(&str, &dyn rusqlite::ToSql)],
    page: PageRequest,
    row: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Page<T>, StoreError> {
    let sql =
        format!("{select} AND (:after IS NULL OR rowid > :after) ORDER BY rowid LIMIT :limit");
    // One row more than asked tells whether there is a next page.
    let limit = i64::from(page.limit).saturating_add(1);
    let mut all: Vec<(&str, &dyn rusqlite::ToSql)> = params.to_vec();
    all.push((":after", &page.after));
    all.push((":limit", &limit));
    let mut stmt = c.prepare(&sql)?;
    let cursor_at = stmt.column_count() - 1;
    let mut rows = stmt.query(all.as_slice())?;
    let mut data = Vec::new();
    let mut last = None;
    while let Some(r) = rows.next()? {
        if data.len() == page.limit as usize {
            // The extra row: there is a next page, which starts after the last row kept.
            return Ok(Page {
                data,
                next_cursor: last.map(|c: i64| c.to_string()),
            });
        }
        data.push(row(r)?);
        last = Some(r.get(cursor_at)?);
    }
    Ok(Page::whole(data))
}

/// `NotFound("institution `id`")` unless the institution exists.
fn require_institution(c: &Connection, id: &str) -> Result<(), StoreError> {
    let exists: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM institutions WHERE id = ?1)",
        [id],
        |r| r.get(0),
    )?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!("institution `{id}`")))
    }
}

fn get_institution(c: &Connection, id: &str) -> Result<Option<Institution>, StoreError> {
    let sql = format!(
        "SELECT {} FROM institutions WHERE id = ?1",
        select_list(None, &INSTITUTION_COLS)
    );
    c.query_row(&sql, [id], |r| Ok(institution_row(r, 0)))
        .optional()?
        .transpose()
}

fn get_key(c: &Connection, id: &str) -> Result<Option<ApiKey>, StoreError> {
    let sql = format!(
        "SELECT {} FROM api_keys WHERE id = ?1",
        select_list(None, &KEY_COLS)
    );
    c.query_row(&sql, [id], |r| Ok(key_row(r)))
        .optional()?
        .transpose()
}

/// An allow-list of models as stored: a JSON array, or NULL for none.
fn models_json(models: Option<&[String]>) -> Option<String> {
    models.map(|m| serde_json::to_string(m).expect("strings serialise"))
}

/// A JSON array of names, for `json_each` in a `NOT IN` filter.
fn json_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    serde_json::to_string(&names.collect::<Vec<_>>()).expect("strings serialise")
}

fn site_row(r: &Row<'_>) -> Result<Site, StoreError> {
    Ok(Site {
        id: r.get(0)?,
        institution_id: r.get(1)?,
        name: r.get(2)?,
        created_at: r.get(3)?,
    })
}

fn group_row(r: &Row<'_>) -> Result<Group, StoreError> {
    Ok(Group {
        id: r.get(0)?,
        institution_id: r.get(1)?,
        name: r.get(2)?,
        kind: parse("member_groups.kind", r.get(3)?)?,
        created_at: r.get(4)?,
        tier_ceiling: r
            .get::<_, Option<String>>(5)?
            .map(|t| parse("member_groups.tier_ceiling", t))
            .transpose()?,
    })
}

pub(crate) fn audit_row(r: &Row<'_>) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: r.get(0)?,
        at: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        institution_id: r.get(5)?,
    })
}

fn user_row(r: &Row<'_>) -> Result<AdminUser, StoreError> {
    Ok(AdminUser {
        id: r.get(0)?,
        username: r.get(1)?,
        role: parse("admin_users.role", r.get(2)?)?,
        institution_id: r.get(3)?,
        created_at: r.get(4)?,
    })
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration.sql)?;
        if let Some(step) = migration.then {
            step(&tx)?;
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    Ok(())
}

fn unique_conflict(e: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(err, _)
            if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict(what())
        }
        other => StoreError::Sqlite(other),
    }
}

pub(crate) fn parse<T: std::str::FromStr>(column: &str, value: String) -> Result<T, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("{column} = `{value}`")))
}

fn provider_row(r: &Row<'_>) -> Result<Provider, StoreError> {
    Ok(Provider {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: parse("providers.kind", r.get(2)?)?,
        base_url: r.get(3)?,
        api_key: r.get(4)?,
        source: Source::parse(&r.get::<_, String>(5)?),
        created_at: r.get(6)?,
    })
}

fn model_row(r: &Row<'_>) -> Result<Model, StoreError> {
    Ok(Model {
        id: r.get(0)?,
        name: r.get(1)?,
        provider: r.get(2)?,
        upstream_model: r.get(3)?,
        tier: parse("models.tier", r.get(4)?)?,
        input_price_per_mtok: r.get(5)?,
        output_price_per_mtok: r.get(6)?,
        source: Source::parse(&r.get::<_, String>(7)?),
        created_at: r.get(8)?,
        max_output_tokens: r.get(9)?,
        tier_basis: parse("models.tier_basis", r.get(10)?)?,
        routing: serde_json::from_str(&r.get::<_, String>(11)?)
            .map_err(|e| StoreError::Corrupt(format!("models.routing: {e}")))?,
        public_cache: serde_json::from_str(&r.get::<_, String>(12)?)
            .map_err(|e| StoreError::Corrupt(format!("models.public_cache: {e}")))?,
    })
}

fn institution_row(r: &Row<'_>, at: usize) -> Result<Institution, StoreError> {
    Ok(Institution {
        id: r.get(at)?,
        name: r.get(at + 1)?,
        kind: parse("institutions.kind", r.get(at + 2)?)?,
        region: r.get(at + 3)?,
        timezone: r.get(at + 4)?,
        created_at: r.get(at + 5)?,
        sector: r.get(at + 6)?,
        status: parse("institutions.status", r.get(at + 7)?)?,
        frontier_verified: r.get(at + 8)?,
        over_quota: parse("institutions.over_quota", r.get(at + 9)?)?,
        tier_ceiling: parse("institutions.tier_ceiling", r.get(at + 10)?)?,
        minor_tier_ceiling: parse("institutions.minor_tier_ceiling", r.get(at + 11)?)?,
        patron_retention_hours: r.get(at + 12)?,
        economy: Economy {
            cache_all: r.get(at + 13)?,
            cache_price_percent: r.get(at + 14)?,
            allow_fallback: r.get(at + 15)?,
        },
    })
}

fn key_row(r: &Row<'_>) -> Result<ApiKey, StoreError> {
    Ok(ApiKey {
        id: r.get(0)?,
        institution_id: r.get(1)?,
        name: r.get(2)?,
        kind: parse("api_keys.kind", r.get(3)?)?,
        tier_ceiling: parse("api_keys.tier_ceiling", r.get(4)?)?,
        created_at: r.get(5)?,
        revoked_at: r.get(6)?,
        expires_at: r.get(7)?,
        site_id: r.get(8)?,
        group_id: r.get(9)?,
        allowed_models: r
            .get::<_, Option<String>>(10)?
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|_| StoreError::Corrupt(format!("api_keys.allowed_models = `{json}`")))
            })
            .transpose()?,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::AgeBand;
    use crate::keys::{NewKey, Pepper};

    /// The backend a conformance test runs on.
    #[derive(Clone, Copy, Debug)]
    enum Backend {
        Embedded,
        Redis,
    }

    tokio::task_local! {
        static BACKEND: Backend;
    }

    /// Every test below the macro runs once per backend, each time on a fresh store (on
    /// Redis: a key prefix of its own and a data directory of its own).
    macro_rules! conformance {
        ($($name:ident),* $(,)?) => {
            mod embedded {
                $(#[tokio::test]
                async fn $name() {
                    super::BACKEND.scope(super::Backend::Embedded, super::$name()).await
                })*
            }
            mod redis {
                $(#[tokio::test]
                async fn $name() {
                    super::BACKEND.scope(super::Backend::Redis, super::$name()).await
                })*
            }
        };
    }

    conformance!(
        keys_verify_until_revoked,
        five_failures_lock_an_account_for_the_window,
        sessions_expire_and_end,
        the_audit_trail_pages_newest_first,
        keys_need_an_institution,
        config_upserts_and_admin_conflicts,
        pages_follow_cursors_to_the_end,
        usage_is_summed_per_day_and_key_across_batches,
        old_usage_records_are_pruned_and_the_sums_stay,
        a_patron_s_day_restarts_at_a_reset_even_for_late_records,
        carved_limits_never_add_up_to_more_than_their_parent,
        admin_tokens_stop_at_expiry_and_revocation,
        patron_sign_in_settings_lists_and_passes_round_trip,
        a_new_patron_session_ends_the_kiosk_s_previous_one,
        short_lived_counts_and_flags_are_shared
    );

    /// The Redis the tests use: `CARREL_TEST_REDIS_URL`, else the machine's.
    pub(crate) fn test_redis_url() -> String {
        std::env::var("CARREL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// A replica on a fresh prefix, with a data directory that lives as long as the test
    /// process.
    pub(crate) async fn test_replica(prefix: &str) -> Store {
        let dir = tempfile::tempdir().unwrap().keep();
        Store::open_replica(RedisSettings {
            url: test_redis_url(),
            prefix: prefix.to_owned(),
            data_dir: dir,
        })
        .await
        .expect("the tests need Redis (tests/run.sh starts one)")
    }

    async fn fresh_store() -> Store {
        match BACKEND.try_with(|b| *b).unwrap_or(Backend::Embedded) {
            Backend::Embedded => Store::open_in_memory().unwrap(),
            Backend::Redis => {
                test_replica(&format!("test-store-{}", crate::ids::random_base62(10))).await
            }
        }
    }

    async fn seeded() -> (Store, Institution) {
        let store = fresh_store().await;
        let inst = store
            .create_institution(NewInstitution {
                name: "Springfield Library".into(),
                kind: InstitutionKind::Library,
                region: "US-IL".into(),
                timezone: "America/Chicago".into(),
                sector: None,
            })
            .await
            .unwrap();
        (store, inst)
    }

    #[tokio::test]
    async fn migrations_run_once_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.schema_version().await.unwrap(),
            MIGRATIONS.len() as i64
        );
        drop(store);
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(
            again.schema_version().await.unwrap(),
            MIGRATIONS.len() as i64
        );
    }

    /// A schema-7 database with per-request rows: migration 8 moves them into batches and sums
    /// patrons' days, leaving out what a day reset wiped.
    #[tokio::test]
    async fn migration_8_moves_usage_rows_into_batches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            for migration in &MIGRATIONS[..7] {
                conn.execute_batch(migration.sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 7).unwrap();
            let tx = conn.transaction().unwrap();
            for (id, at, patron, tokens, status) in [
                ("req_1", 100, Some("pat_a"), 10, "complete"),
                ("req_2", 200, Some("pat_a"), 20, "cut"),
                ("req_3", 300, Some("pat_a"), 40, "complete"),
                ("req_4", 300, None, 80, "incomplete"),
                ("req_5", 300, Some("pat_a"), 0, "upstream_error"),
            ] {
                tx.execute(
                    "INSERT INTO usage_records VALUES (?1, ?2, '2026-11-26', 'inst_a', 'site_a',
                        NULL, 'key_a', ?3, 'm', ?4, 1, 7, 0, 1, ?5, 12)",
                    params![id, at, patron, tokens, status],
                )
                .unwrap();
            }
            tx.execute(
                "INSERT INTO patron_day_resets VALUES ('inst_a', 'pat_a', '2026-11-26', 150)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let records = store.usage_records("inst_a", 10).await.unwrap();
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.request_id.as_str(), r.prompt_tokens, r.status.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("req_1", 10, "complete"),
                ("req_2", 20, "cut"),
                ("req_3", 40, "complete"),
                ("req_4", 80, "incomplete"),
                ("req_5", 0, "upstream_error"),
            ]
        );
        assert_eq!(records[0].site_id.as_deref(), Some("site_a"));
        assert_eq!(records[0].group_id, None);
        assert!(records[0].estimated && !records[0].cached);
        assert_eq!((records[0].latency_ms, records[0].cost_nano_usd), (12, 7));
        let period = store
            .period_usage("inst_a", "2026-11-26", "2026-11-01")
            .await
            .unwrap();
        let patron = period
            .iter()
            .find(|p| p.level == crate::quota::Level::Patron)
            .unwrap();
        // Requests 2 and 3 ended after the reset at 150: 21 + 41 tokens.
        assert_eq!((patron.id.as_str(), patron.day_tokens), ("pat_a", 62));
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    async fn keys_verify_until_revoked() {
        let (store, inst) = seeded().await;
        let pepper = Pepper::from_bytes([1; 32]);
        let minted = NewKey::generate();
        store
            .create_key(NewApiKey {
                id: minted.id.clone(),
                institution_id: inst.id.clone(),
                name: "front desk".into(),
                kind: KeyKind::Kiosk,
                tier_ceiling: Tier::Advanced,
                secret_hash: pepper.hash_secret(minted.secret()),
                expires_at: None,
                site_id: None,
                group_id: None,
                allowed_models: None,
            })
            .await
            .unwrap();
        let cred = store.key_credential(&minted.id).await.unwrap().unwrap();
        assert!(pepper.verify_secret(minted.secret(), &cred.secret_hash));
        assert_eq!(cred.institution, inst);
        assert!(store.revoke_key(&minted.id).await.unwrap());
        assert!(!store.revoke_key(&minted.id).await.unwrap());
        assert!(store.key_credential(&minted.id).await.unwrap().is_none());
        let listed = store
            .list_keys(&inst.id, PageRequest::ALL)
            .await
            .unwrap()
            .data;
        assert!(listed[0].revoked_at.is_some());
    }

    async fn five_failures_lock_an_account_for_the_window() {
        let (store, inst) = seeded().await;
        let user = store
            .create_user(NewUser {
                username: "desk".into(),
                password_hash: "x".into(),
                role: Role::Staff,
                institution_id: Some(inst.id.clone()),
            })
            .await
            .unwrap();
        let t0 = 1_000_000;
        for i in 0..4 {
            assert_eq!(
                store.record_login_failure(&user.id, t0 + i).await.unwrap(),
                None
            );
        }
        // Failures older than the window do not count.
        store.clear_login_failures(&user.id).await.unwrap();
        for i in 0..4 {
            store.record_login_failure(&user.id, t0 + i).await.unwrap();
        }
        let late = t0 + LOCKOUT_WINDOW_SECS + 10;
        assert_eq!(
            store.record_login_failure(&user.id, late).await.unwrap(),
            None
        );
        for i in 1..4 {
            assert_eq!(
                store
                    .record_login_failure(&user.id, late + i)
                    .await
                    .unwrap(),
                None
            );
        }
        let locked = store
            .record_login_failure(&user.id, late + 4)
            .await
            .unwrap();
        assert_eq!(locked, Some(late + 4 + LOCKOUT_WINDOW_SECS));
        let record = store.login_record("desk").await.unwrap().unwrap();
        assert_eq!(record.locked_until, locked);
        assert!(store.login_record("nobody").await.unwrap().is_none());
    }

    async fn sessions_expire_and_end() {
        let (store, inst) = seeded().await;
        let user = store
            .create_user(NewUser {
                username: "admin".into(),
                password_hash: "x".into(),
                role: Role::InstitutionAdmin,
                institution_id: Some(inst.id.clone()),
            })
            .await
            .unwrap();
        store.create_session([1; 32], &user.id, 100).await.unwrap();
        assert_eq!(
            store.session_user([1; 32], 99).await.unwrap(),
            Some(user.clone())
        );
        assert_eq!(
            store.session_user([1; 32], 100).await.unwrap(),
            None,
            "expired"
        );
        store.create_session([2; 32], &user.id, 100).await.unwrap();
        store.delete_session([2; 32]).await.unwrap();
        assert_eq!(
            store.session_user([2; 32], 0).await.unwrap(),
            None,
            "logged out"
        );
        let dup = store
            .create_user(NewUser {
                username: "admin".into(),
                password_hash: "x".into(),
                role: Role::Staff,
                institution_id: Some(inst.id),
            })
            .await
            .unwrap_err();
        assert!(matches!(dup, StoreError::Conflict(_)));
    }

    async fn the_audit_trail_pages_newest_first() {
        let (store, inst) = seeded().await;
        for i in 0..5 {
            let scope = (i % 2 == 0).then(|| inst.id.clone());
            store
                .append_audit("operator".into(), "test.act", format!("t:{i}"), scope)
                .await
                .unwrap();
        }
        let all = store.list_audit(None, None, 10).await.unwrap();
        let targets: Vec<&str> = all.iter().map(|e| e.target.as_str()).collect();
        assert_eq!(targets, ["t:4", "t:3", "t:2", "t:1", "t:0"]);
        let mine = store.list_audit(Some(&inst.id), None, 2).await.unwrap();
        assert_eq!(
            mine.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
            ["t:4", "t:2"]
        );
        let older = store
            .list_audit(Some(&inst.id), Some(mine[1].seq), 2)
            .await
            .unwrap();
        assert_eq!(older.len(), 1);
        assert_eq!(older[0].target, "t:0");
    }

    async fn keys_need_an_institution() {
        let store = fresh_store().await;
        let err = store
            .create_key(NewApiKey {
                id: "x".into(),
                institution_id: "inst_missing".into(),
                name: "k".into(),
                kind: KeyKind::Service,
                tier_ceiling: Tier::Baseline,
                secret_hash: [0; 32],
                expires_at: None,
                site_id: None,
                group_id: None,
                allowed_models: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)));
    }

    async fn config_upserts_and_admin_conflicts() {
        let store = fresh_store().await;
        let provider = ProviderConfig {
            name: "up".into(),
            kind: ProviderKind::Openai,
            base_url: Some("http://127.0.0.1:9/v1".into()),
            api_key: Some("sk-secret".into()),
        };
        let model = ModelConfig {
            name: "m".into(),
            provider: "up".into(),
            upstream_model: "m-upstream".into(),
            tier: Tier::Baseline,
            tier_basis: crate::domain::TierBasis::OperatorJudgement,
            input_price_per_mtok: 0.5,
            output_price_per_mtok: 1.5,
            max_output_tokens: 4096,
            routing: Default::default(),
            public_cache: Vec::new(),
        };
        store
            .apply_config(vec![provider.clone()], vec![model.clone()])
            .await
            .unwrap();
        store
            .apply_config(vec![provider], vec![model])
            .await
            .unwrap();
        let providers = store.list_providers(PageRequest::ALL).await.unwrap().data;
        assert_eq!(providers.len(), 1);
        assert_eq!(
            providers[0].api_key, None,
            "env secrets are not written to disk"
        );
        assert_eq!(
            store.list_models(PageRequest::ALL).await.unwrap().data[0].upstream_model,
            "m-upstream"
        );

        // Dropping the model from the config file stops it being served; the provider goes
        // too, since nothing else uses it.
        store.apply_config(vec![], vec![]).await.unwrap();
        assert!(
            store
                .list_models(PageRequest::ALL)
                .await
                .unwrap()
                .data
                .is_empty()
        );
        assert!(
            store
                .list_providers(PageRequest::ALL)
                .await
                .unwrap()
                .data
                .is_empty()
        );
        let provider = ProviderConfig {
            name: "up".into(),
            kind: ProviderKind::Openai,
            base_url: Some("http://127.0.0.1:9/v1".into()),
            api_key: None,
        };
        store.apply_config(vec![provider], vec![]).await.unwrap();
        store
            .create_model(NewModel {
                name: "admin-made".into(),
                provider: "up".into(),
                upstream_model: "x".into(),
                tier: Tier::Baseline,
                tier_basis: crate::domain::TierBasis::OperatorJudgement,
                input_price_per_mtok: 0.0,
                output_price_per_mtok: 0.0,
                max_output_tokens: 4096,
                routing: Default::default(),
                public_cache: Vec::new(),
            })
            .await
            .unwrap();
        store.apply_config(vec![], vec![]).await.unwrap();
        let providers = store.list_providers(PageRequest::ALL).await.unwrap().data;
        assert_eq!(providers.len(), 1, "still used by an admin-made model");
        assert_eq!(providers[0].source, Source::Admin);

        let dup = store
            .create_provider(NewProvider {
                name: "up".into(),
                kind: ProviderKind::Openai,
                base_url: Some("http://h/v1".into()),
                api_key: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(dup, StoreError::Conflict(_)), "{dup}");
        let orphan = store
            .create_model(NewModel {
                name: "n".into(),
                provider: "nope".into(),
                upstream_model: "n".into(),
                tier: Tier::Frontier,
                tier_basis: crate::domain::TierBasis::EuSystemicRisk,
                input_price_per_mtok: 0.0,
                output_price_per_mtok: 0.0,
                max_output_tokens: 4096,
                routing: Default::default(),
                public_cache: Vec::new(),
            })
            .await
            .unwrap_err();
        assert!(matches!(orphan, StoreError::NotFound(_)));
    }

    async fn pages_follow_cursors_to_the_end() {
        let (store, inst) = seeded().await;
        for i in 0..5 {
            store
                .create_site(&inst.id, format!("site {i}"))
                .await
                .unwrap();
        }
        let mut names = Vec::new();
        let mut page = PageRequest::first(2);
        loop {
            let got = store.list_sites(&inst.id, page).await.unwrap();
            assert!(got.data.len() <= 2);
            names.extend(got.data.into_iter().map(|s| s.name));
            match got.next_cursor {
                Some(c) => page.after = Some(c.parse().unwrap()),
                None => break,
            }
        }
        assert_eq!(names, ["site 0", "site 1", "site 2", "site 3", "site 4"]);
        // An exact multiple of the page size ends without an empty extra page.
        let four = store
            .list_sites(&inst.id, PageRequest::first(5))
            .await
            .unwrap();
        assert_eq!((four.data.len(), four.next_cursor), (5, None));
    }

    async fn usage_is_summed_per_day_and_key_across_batches() {
        let (store, inst) = seeded().await;
        let n = std::sync::atomic::AtomicU32::new(0);
        let record = |day: &str, key: &str, complete: bool| UsageRecord {
            request_id: format!(
                "req_{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            at: 0,
            day: day.into(),
            institution_id: inst.id.as_str().into(),
            key_id: key.into(),
            model: "m".into(),
            status: if complete {
                UsageStatus::Complete
            } else {
                UsageStatus::Incomplete
            },
            prompt_tokens: 10,
            completion_tokens: 4,
            latency_ms: 3,
            cost_nano_usd: 1500,
            ..UsageRecord::default()
        };
        let added = store
            .record_usage(vec![
                record("2026-11-25", "k1", true),
                record("2026-11-26", "k1", true),
                record("2026-11-26", "k1", false),
            ])
            .await
            .unwrap();
        assert_eq!(added, 3);
        let k2 = record("2026-11-26", "k2", true);
        assert_eq!(
            store
                .record_usage_blocking(std::slice::from_ref(&k2))
                .unwrap(),
            1
        );
        // A provider error is kept as a record but adds nothing to the sums.
        let mut failed = record("2026-11-26", "k2", true);
        failed.status = UsageStatus::UpstreamError;
        assert_eq!(store.record_usage(vec![failed]).await.unwrap(), 1);
        assert_eq!(store.record_usage(Vec::new()).await.unwrap(), 0);
        let records = store.usage_records(&inst.id, 100).await.unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[4].status, UsageStatus::UpstreamError);
        assert_eq!(records[3], k2);
        let by_key = |from: &'static str| {
            let store = store.clone();
            let inst = inst.id.clone();
            async move {
                store
                    .usage_report(&inst, from, "2026-11-30", crate::domain::UsageGroupBy::Key)
                    .await
                    .unwrap()
            }
        };
        let lines = by_key("2026-11-26").await;
        let got: Vec<_> = lines
            .iter()
            .map(|l| {
                (
                    l.group.as_deref().unwrap(),
                    l.requests,
                    l.incomplete,
                    l.total_tokens,
                )
            })
            .collect();
        assert_eq!(got, [("k1", 2, 1, 28), ("k2", 1, 0, 14)]);
        assert!((lines[0].cost_usd - 3e-6).abs() < 1e-12);
        assert_eq!(by_key("2026-11-25").await[0].requests, 3);
        let by_site = store
            .usage_report(
                &inst.id,
                "2026-11-01",
                "2026-11-30",
                crate::domain::UsageGroupBy::Site,
            )
            .await
            .unwrap();
        assert_eq!(
            (by_site[0].group.as_deref(), by_site[0].requests),
            (None, 4)
        );
        let period = store
            .period_usage(&inst.id, "2026-11-26", "2026-11-01")
            .await
            .unwrap();
        let key1 = period
            .iter()
            .find(|p| p.level == crate::quota::Level::Key && p.id == "k1")
            .unwrap();
        assert_eq!((key1.day_tokens, key1.month_tokens), (28, 42));
    }

    async fn old_usage_records_are_pruned_and_the_sums_stay() {
        let (store, inst) = seeded().await;
        let record = |id: &str, at: i64| UsageRecord {
            request_id: id.into(),
            at,
            day: "2026-11-26".into(),
            institution_id: inst.id.as_str().into(),
            key_id: "k".into(),
            model: "m".into(),
            prompt_tokens: 5,
            latency_ms: 1,
            ..UsageRecord::default()
        };
        store
            .record_usage(vec![record("req_1", 100), record("req_2", 150)])
            .await
            .unwrap();
        store
            .record_usage(vec![record("req_3", 300)])
            .await
            .unwrap();
        // A batch goes only when all of it is past the line.
        assert_eq!(store.prune_usage_records_blocking(150).unwrap(), 0);
        assert_eq!(store.prune_usage_records_blocking(151).unwrap(), 2);
        let left = store.usage_records(&inst.id, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request_id, "req_3");
        let sums = store
            .usage_report(
                &inst.id,
                "2026-11-26",
                "2026-11-26",
                crate::domain::UsageGroupBy::Key,
            )
            .await
            .unwrap();
        assert_eq!(sums[0].requests, 3);
    }

    /// A patron's day as the quota engine will be seeded with it: a reset wipes what came
    /// before, and a record that reaches the ledger late counts only if it ended after the reset.
    async fn a_patron_s_day_restarts_at_a_reset_even_for_late_records() {
        let (store, inst) = seeded().await;
        // Times of today: on the Redis backend a record older than the institution's window
        // no longer names its patron.
        let t0 = crate::domain::unix_now();
        let record = |id: &str, at: i64, tokens: u64| UsageRecord {
            request_id: id.into(),
            at: t0 + at,
            day: "2026-11-26".into(),
            institution_id: inst.id.as_str().into(),
            key_id: "k".into(),
            patron_ref: Some("pat_a".into()),
            model: "m".into(),
            prompt_tokens: tokens,
            latency_ms: 1,
            ..UsageRecord::default()
        };
        let patron_today = || async {
            store
                .period_usage(&inst.id, "2026-11-26", "2026-11-01")
                .await
                .unwrap()
                .into_iter()
                .find(|p| p.level == crate::quota::Level::Patron)
                .map(|p| (p.id, p.day_tokens))
        };
        store
            .record_usage(vec![record("req_1", 100, 10)])
            .await
            .unwrap();
        assert_eq!(patron_today().await, Some(("pat_a".into(), 10)));
        store
            .reset_patron_day(&inst.id, "pat_a", "2026-11-26", t0 + 150)
            .await
            .unwrap();
        assert_eq!(patron_today().await, Some(("pat_a".into(), 0)));
        // Ended before the reset but written after it; then one that ended after it.
        store
            .record_usage(vec![record("req_2", 120, 20)])
            .await
            .unwrap();
        store
            .record_usage(vec![record("req_3", 200, 40)])
            .await
            .unwrap();
        assert_eq!(patron_today().await, Some(("pat_a".into(), 40)));
        // The key still counts all of them.
        let key = store
            .period_usage(&inst.id, "2026-11-26", "2026-11-01")
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.level == crate::quota::Level::Key)
            .unwrap();
        assert_eq!(key.day_tokens, 70);
    }

    async fn carved_limits_never_add_up_to_more_than_their_parent() {
        use crate::quota::{Level, LimitKind, LimitsPatch};
        let (store, inst) = seeded().await;
        let patch = |kind: LimitKind, v: Option<u64>| {
            let mut p = LimitsPatch::default();
            p.set(kind, v);
            p
        };
        let day = |v| patch(LimitKind::TokensPerDay, Some(v));
        let a = store.create_site(&inst.id, "A".into()).await.unwrap();
        let b = store.create_site(&inst.id, "B".into()).await.unwrap();
        store
            .set_limits(Level::Institution, &inst.id, day(1000))
            .await
            .unwrap();
        store
            .set_limits(Level::Site, &a.id, day(600))
            .await
            .unwrap();
        let err = store
            .set_limits(Level::Site, &b.id, day(500))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("would add up to 1100, more than the institution's 1000"),
            "{err}"
        );
        store
            .set_limits(Level::Site, &b.id, day(400))
            .await
            .unwrap();
        // Nor may the parent shrink below its children.
        assert!(
            store
                .set_limits(Level::Institution, &inst.id, day(999))
                .await
                .is_err()
        );
        // Removing a limit is always allowed; other kinds are untouched.
        store
            .set_limits(
                Level::Institution,
                &inst.id,
                patch(LimitKind::RequestsPerMinute, Some(60)),
            )
            .await
            .unwrap();
        let limits = store
            .set_limits(
                Level::Institution,
                &inst.id,
                patch(LimitKind::TokensPerDay, None),
            )
            .await
            .unwrap();
        assert_eq!(
            (limits.tokens_per_day, limits.requests_per_minute),
            (None, Some(60))
        );
        assert!(store.set_limits(Level::Site, &a.id, day(0)).await.is_err());
        let table = store.limits_table().await.unwrap();
        assert_eq!(
            table.get(Level::Site, &b.id).unwrap().tokens_per_day,
            Some(400)
        );
    }

    async fn admin_tokens_stop_at_expiry_and_revocation() {
        let (store, inst) = seeded().await;
        let hash = [7u8; 32];
        let token = store
            .create_admin_token(NewAdminToken {
                name: "t".into(),
                token_hash: hash,
                role: Role::InstitutionAdmin,
                institution_id: Some(inst.id.clone()),
                scopes: vec![crate::domain::Scope::Read],
                created_by: "operator".into(),
                expires_at: Some(1000),
            })
            .await
            .unwrap();
        assert!(
            store
                .admin_token_by_hash(hash, 999)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .admin_token_by_hash(hash, 1000)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .admin_token_by_hash([8u8; 32], 0)
                .await
                .unwrap()
                .is_none()
        );
        assert!(store.revoke_admin_token(&token.id).await.unwrap());
        assert!(store.admin_token_by_hash(hash, 0).await.unwrap().is_none());
        assert!(!store.revoke_admin_token(&token.id).await.unwrap());
    }

    async fn patron_sign_in_settings_lists_and_passes_round_trip() {
        use crate::patrons::PatronAuth;
        let (store, inst) = seeded().await;
        assert_eq!(store.patron_auth(&inst.id).await.unwrap(), None);
        store
            .set_patron_auth(&inst.id, PatronAuth::Local {})
            .await
            .unwrap();
        assert_eq!(
            store.patron_auth(&inst.id).await.unwrap(),
            Some(PatronAuth::Local {})
        );
        assert!(matches!(
            store
                .set_patron_auth("inst_nope", PatronAuth::Local {})
                .await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.all_patron_auth().await.unwrap().len(), 1);

        let patron = |r: &str, band| LocalPatron {
            patron_ref: r.into(),
            pin_hash: format!("hash-of-{r}"),
            age_band: band,
        };
        let counts = store
            .import_local_patrons(
                &inst.id,
                vec![
                    patron("pat_a", AgeBand::Adult),
                    patron("pat_b", AgeBand::Minor),
                ],
            )
            .await
            .unwrap();
        assert_eq!((counts.added, counts.updated), (2, 0));
        let counts = store
            .import_local_patrons(&inst.id, vec![patron("pat_b", AgeBand::Adult)])
            .await
            .unwrap();
        assert_eq!((counts.added, counts.updated), (0, 1));
        assert_eq!(
            store.local_patron(&inst.id, "pat_b").await.unwrap(),
            Some(("hash-of-pat_b".into(), AgeBand::Adult))
        );
        assert_eq!(store.local_patron(&inst.id, "pat_c").await.unwrap(), None);
        assert_eq!(store.count_local_patrons(&inst.id).await.unwrap(), 2);

        let now = jiff::Timestamp::now().as_second();
        let pass = |id: &str, expires_at| NewGuestPass {
            id: id.into(),
            code_hash: "h".into(),
            tokens: 500,
            expires_at,
        };
        let made = store
            .create_guest_passes(
                &inst.id,
                vec![pass("gp_AAAAAA", now + 600), pass("gp_BBBBBB", now - 1)],
                "user:u".into(),
            )
            .await
            .unwrap();
        assert_eq!(made.len(), 2);
        assert_eq!(
            store.guest_pass("gp_AAAAAA").await.unwrap().unwrap().tokens,
            500
        );
        let live = store.list_guest_passes(&inst.id, now).await.unwrap();
        assert_eq!(
            live.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["gp_AAAAAA"]
        );
        assert!(matches!(
            store
                .create_guest_passes(&inst.id, vec![pass("gp_AAAAAA", now)], "x".into())
                .await,
            Err(StoreError::Conflict(_))
        ));
    }

    async fn a_new_patron_session_ends_the_kiosk_s_previous_one() {
        let (store, inst) = seeded().await;
        let session = |id: &str, kiosk: &str, expires_at| NewPatronSession {
            id: id.into(),
            secret_hash: [7; 32],
            institution_id: inst.id.clone(),
            kiosk_key_id: kiosk.into(),
            patron_ref: "pat_a".into(),
            age_band: AgeBand::Minor,
            group_id: None,
            guest_pass_id: Some("gp_AAAAAA".into()),
            allowance: Some(300),
            created_at: 1000,
            expires_at,
            sealed_end: Some(vec![1, 2, 3]),
        };
        assert!(
            store
                .create_patron_session(session("s1", "k1", 5000))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .create_patron_session(session("s2", "k2", 5000))
                .await
                .unwrap()
                .is_empty()
        );
        let got = store.patron_session("s1").await.unwrap().unwrap();
        assert_eq!(
            (got.secret_hash, got.age_band, got.allowance, got.sealed_end),
            ([7; 32], AgeBand::Minor, Some(300), Some(vec![1, 2, 3]))
        );
        let ended = store
            .create_patron_session(session("s3", "k1", 5000))
            .await
            .unwrap();
        assert_eq!(ended, ["s1"]);
        assert!(store.patron_session("s1").await.unwrap().is_none());
        assert!(store.patron_session("s2").await.unwrap().is_some());
        assert!(store.end_patron_session("s2").await.unwrap());
        assert!(!store.end_patron_session("s2").await.unwrap());
        assert!(store.patron_session("s2").await.unwrap().is_none());
    }

    async fn short_lived_counts_and_flags_are_shared() {
        let store = fresh_store().await;
        let name = format!("lock:{}", crate::ids::random_base62(8));
        let window = std::time::Duration::from_secs(60);
        assert_eq!(store.attempts(&name).await.unwrap(), 0);
        assert_eq!(store.count_attempt(&name, window).await.unwrap(), 1);
        assert_eq!(store.count_attempt(&name, window).await.unwrap(), 2);
        assert_eq!(store.attempts(&name).await.unwrap(), 2);
        assert!(store.take_flag(&name).await.unwrap());
        assert_eq!(store.attempts(&name).await.unwrap(), 0);
        assert!(!store.touch_flag(&name, window).await.unwrap());
        store.set_flag(&name, window).await.unwrap();
        assert!(store.touch_flag(&name, window).await.unwrap());
        assert!(store.take_flag(&name).await.unwrap());
        assert!(!store.take_flag(&name).await.unwrap());
    }
}
