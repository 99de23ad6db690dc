//! The domain: who calls Carrel, which models they reach, and through which providers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Declares a closed string enum: serde names, `as_str`, `FromStr` and `Display` in one place.
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        // serde and utoipa both take the wire names from `rename_all`; utoipa cannot read a
        // per-variant `rename` that comes through a macro literal. A test checks that the
        // snake_case names equal the literals.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownVariant {
                        got: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

/// A string that is not one of an enum's wire names.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown value `{got}`, expected one of {}", expected.join(", "))]
pub struct UnknownVariant {
    got: String,
    expected: &'static [&'static str],
}

string_enum! {
    /// How much control a model needs: ordinary models are broadly available, frontier ones are
    /// gated. Ordered, so a principal's ceiling is a plain comparison.
    #[derive(PartialOrd, Ord)]
    pub enum Tier {
        /// Ordinary models, open to every principal.
        Baseline => "baseline",
        /// Stronger models, open to principals whose ceiling allows them.
        Advanced => "advanced",
        /// Frontier models, behind the thickest controls.
        Frontier => "frontier",
    }
}

string_enum! {
    /// Why a model has its tier: the record a reviewer checks a tier against.
    pub enum TierBasis {
        /// The vendor's own capability framework puts the model at a level that calls for
        /// these controls (a responsible-scaling or preparedness level).
        VendorFramework => "vendor_framework",
        /// The EU AI Act presumes systemic risk (general-purpose AI trained with more than
        /// 10^25 FLOP, Art. 51) or the Commission designated it.
        EuSystemicRisk => "eu_systemic_risk",
        /// The operator's judgement, with no outside classification (the default).
        OperatorJudgement => "operator_judgement",
    }
}

string_enum! {
    /// A class of prompts whose cached answers an operator may mark public for a model:
    /// shared by every institution rather than kept per institution.
    pub enum PromptClass {
        /// Embeddings: the vector depends on the input alone.
        Embeddings => "embeddings",
        /// A completion asked for in one turn (no earlier assistant or tool message).
        SingleTurn => "single_turn",
    }
}

string_enum! {
    /// What a containment switch stops.
    pub enum ContainmentKind {
        /// One model (public name).
        Model => "model",
        /// Every model of one provider (provider name).
        Provider => "provider",
        /// Every request of one institution (id).
        Institution => "institution",
        /// Every request made with one API key (id), patron sessions on it included.
        Key => "key",
    }
}

string_enum! {
    /// What sort of institution an account belongs to; drives defaults and reports.
    pub enum InstitutionKind {
        /// A public or academic library.
        Library => "library",
        /// A school or school district.
        School => "school",
        /// A small business.
        SmallBusiness => "small_business",
        /// A nonprofit organisation.
        Nonprofit => "nonprofit",
    }
}

string_enum! {
    /// Whether an institution's keys work.
    pub enum InstitutionStatus {
        /// Its keys work.
        Active => "active",
        /// Its keys are refused (403 `institution_suspended`) until an operator reactivates it;
        /// nothing is deleted.
        Suspended => "suspended",
    }
}

string_enum! {
    /// What happens to a request whose estimate is more than what is left of a token or money
    /// limit.
    pub enum OverQuota {
        /// Refuse it with 429.
        Reject => "reject",
        /// Lower its `max_tokens` to what is left (refusing only when not even one token per
        /// choice is left).
        Clamp => "clamp",
    }
}

string_enum! {
    /// What an API key is for.
    pub enum KeyKind {
        /// A back-office tool or application calling with a long-lived key.
        Service => "service",
        /// A public kiosk; patrons sign in on top of it.
        Kiosk => "kiosk",
        /// A member of staff's own key.
        Staff => "staff",
    }
}

string_enum! {
    /// How old a signed-in patron is, as far as the sign-in could tell; never a birth date.
    /// Later stages choose safeguards by it.
    pub enum AgeBand {
        /// Under 13.
        Under13 => "under13",
        /// 13 to 17.
        Minor => "minor",
        /// 18 or over.
        Adult => "adult",
        /// The sign-in did not say. Counts as a minor at schools.
        Unknown => "unknown",
    }
}

impl AgeBand {
    /// The band of someone `years` old.
    pub fn of_age(years: i64) -> AgeBand {
        match years {
            ..13 => AgeBand::Under13,
            13..18 => AgeBand::Minor,
            _ => AgeBand::Adult,
        }
    }

    /// Whether safeguards for minors apply: `unknown` counts as a minor at a school.
    pub fn treat_as_minor(self, institution: InstitutionKind) -> bool {
        match self {
            AgeBand::Under13 | AgeBand::Minor => true,
            AgeBand::Adult => false,
            AgeBand::Unknown => institution == InstitutionKind::School,
        }
    }
}

string_enum! {
    /// What an admin account may do. Every role but `operator` is bound to one institution.
    pub enum Role {
        /// Runs the deployment: everything, across institutions.
        Operator => "operator",
        /// Manages one institution: its keys, users and settings.
        InstitutionAdmin => "institution_admin",
        /// Front-desk staff of one institution: usage, guest passes, extensions.
        Staff => "staff",
        /// Read-only view of one institution: usage, incidents, audit.
        Auditor => "auditor",
    }
}

string_enum! {
    /// What an automation token may do, on top of what its role allows.
    pub enum Scope {
        /// Read the institution's records: institution, keys, sites, groups, users, models.
        Read => "read",
        /// Create, change, rotate and revoke keys.
        Keys => "keys",
        /// Create and change sites and groups.
        Structure => "structure",
        /// Read usage reports.
        Usage => "usage",
        /// Read the audit trail.
        Audit => "audit",
        /// Change the institution's own settings (and, for operators, create institutions).
        Institutions => "institutions",
        /// Manage providers and models (operators only).
        Catalog => "catalog",
    }
}

string_enum! {
    /// How a usage report is broken down.
    pub enum UsageGroupBy {
        /// By the institution's local day.
        Day => "day",
        /// By site.
        Site => "site",
        /// By group.
        Group => "group",
        /// By API key.
        Key => "key",
        /// By model.
        Model => "model",
    }
}

string_enum! {
    /// What a group of an institution stands for.
    pub enum GroupKind {
        /// A school class.
        Class => "class",
        /// A library's patron type (adult, teen, staff, ...).
        PatronType => "patron_type",
        /// A small business's plan or team.
        BusinessPlan => "business_plan",
        /// Anything else.
        Other => "other",
    }
}

string_enum! {
    /// How Carrel reaches a provider.
    pub enum ProviderKind {
        /// Any OpenAI-compatible HTTP server (OpenAI, Azure OpenAI, vLLM, llama.cpp, Ollama, ...).
        Openai => "openai",
        /// The built-in, in-process demo model: deterministic, free, clearly labelled.
        Demo => "demo",
    }
}

/// Where a control-plane record came from: config records are re-applied at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Declared in the config file.
    Config,
    /// Created through the admin API.
    Admin,
}

impl Source {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Admin => "admin",
        }
    }

    /// Parses the stored name; anything unknown is treated as admin-made.
    pub fn parse(s: &str) -> Self {
        if s == "config" {
            Source::Config
        } else {
            Source::Admin
        }
    }
}

/// A model provider, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    /// Stable identifier (`prov_…`).
    pub id: String,
    /// Unique name that models refer to.
    pub name: String,
    /// How the provider is reached.
    pub kind: ProviderKind,
    /// Base URL of the OpenAI-compatible API, including its version path (e.g. `…/v1`).
    pub base_url: Option<String>,
    /// The upstream API key. Never returned by the admin API, never logged.
    pub api_key: Option<String>,
    /// Where the record came from.
    pub source: Source,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A public model name, mapped onto one provider's model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Model {
    /// Stable identifier (`model_…`).
    pub id: String,
    /// The public name clients send in `model`.
    pub name: String,
    /// Name of the provider that serves it.
    pub provider: String,
    /// The provider's own name for the model.
    pub upstream_model: String,
    /// How much control it needs.
    pub tier: Tier,
    /// Why it has that tier.
    pub tier_basis: TierBasis,
    /// Price of a million prompt tokens, in the operator's currency.
    pub input_price_per_mtok: f64,
    /// Price of a million completion tokens, in the operator's currency.
    pub output_price_per_mtok: f64,
    /// Most output tokens one choice may ask for, and what is reserved when a request does not
    /// say.
    pub max_output_tokens: u32,
    /// Where else it is served, and how requests are shared among its deployments.
    pub routing: Routing,
    /// Prompt classes whose cached answers every institution shares (operator's choice;
    /// empty: each institution's answers are its own).
    pub public_cache: Vec<PromptClass>,
    /// Where the record came from.
    pub source: Source,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// How a model's requests are shared among its deployments: the model's own provider (the
/// first deployment) and any others. A request goes to a deployment picked by weight among
/// those whose circuit breaker is closed, and on a connect error, a 429, a 502 or a 503
/// before anything reached the client, to another (see `upstream.retries`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Routing {
    /// The first deployment's weight (default 1; 0: a standby, tried only when another fails).
    #[serde(default = "one")]
    pub weight: u32,
    /// The first deployment's time to the response head, in ms (default
    /// `upstream.response_timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The other deployments.
    #[serde(default)]
    pub deployments: Vec<Deployment>,
    /// Models that may answer, in this order, when every deployment refused or could not be
    /// reached (a connect error, 429, 502 or 503) — for institutions that allow it
    /// (`allow_fallback`). Each of the same tier or lower.
    #[serde(default)]
    pub fallback: Vec<String>,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            weight: 1,
            timeout_ms: None,
            deployments: Vec::new(),
            fallback: Vec::new(),
        }
    }
}

/// Another provider serving a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Deployment {
    /// Name of the provider.
    pub provider: String,
    /// The provider's name for the model.
    pub upstream_model: String,
    /// Its weight (default 1; 0: a standby).
    #[serde(default = "one")]
    pub weight: u32,
    /// Its time to the response head, in ms (default `upstream.response_timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

/// An institution: a library system, a school district, a small business.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Institution {
    /// Stable identifier (`inst_…`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// What sort of institution it is.
    pub kind: InstitutionKind,
    /// ISO 3166-2 subdivision code, e.g. `US-CA`.
    pub region: String,
    /// IANA time zone that its days and months are counted in.
    pub timezone: String,
    /// Free label for reports by sector, e.g. `public_library` or `k12` (lower case, digits,
    /// `_` and `-`).
    pub sector: Option<String>,
    /// Whether its keys work.
    pub status: InstitutionStatus,
    /// Set only by an operator, after checking the institution: a precondition for frontier
    /// models.
    pub frontier_verified: bool,
    /// What happens to a request larger than what is left of a limit.
    pub over_quota: OverQuota,
    /// The highest tier any of its keys may reach (default `frontier`: the keys' own
    /// ceilings and the frontier gate decide).
    pub tier_ceiling: Tier,
    /// The highest tier its minors may reach (default `baseline`); raising it is an explicit
    /// decision of the institution.
    pub minor_tier_ceiling: Tier,
    /// Hours a usage record names its patron (by reference) before the reference is removed:
    /// 24 by default, at most 168.
    pub patron_retention_hours: u32,
    /// How it saves: the response cache and fallback models.
    #[serde(flatten)]
    pub economy: Economy,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// An institution's choices about saving: which requests the response cache may answer,
/// what a cached answer costs, and whether another model may answer when a model's
/// deployments all fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Economy {
    /// Cache every request's answer as if it said `x-carrel-cache: allow` (not minors', not
    /// screened ones), not only deterministic ones (default `false`).
    pub cache_all: bool,
    /// What a cached answer costs, as a percentage of what the provider charged for it,
    /// counted against the institution's money budgets (default 0: free).
    pub cache_price_percent: u8,
    /// When every deployment of a model fails before answering, let the model's fallback
    /// models answer (default `false`).
    pub allow_fallback: bool,
}

/// A site of an institution: a library branch, a school campus, an office.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Site {
    /// Stable id (`site_…`).
    pub id: String,
    /// The institution.
    pub institution_id: String,
    /// Name, unique within the institution.
    pub name: String,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// A group of an institution: a class, a patron type, a business plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Group {
    /// Stable id (`group_…`).
    pub id: String,
    /// The institution.
    pub institution_id: String,
    /// Name, unique within the institution.
    pub name: String,
    /// What the group stands for.
    pub kind: GroupKind,
    /// The highest tier its keys may reach, if the group has a ceiling of its own.
    pub tier_ceiling: Option<Tier>,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// An API key as stored: only a keyed hash of its secret is ever kept.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKey {
    /// The public identifier, also embedded in the key string.
    pub id: String,
    /// The institution the key belongs to.
    pub institution_id: String,
    /// Display name.
    pub name: String,
    /// What the key is for.
    pub kind: KeyKind,
    /// The highest model tier the key may reach.
    pub tier_ceiling: Tier,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 revocation time, once revoked.
    pub revoked_at: Option<String>,
    /// RFC 3339 time after which the key stops working, if it expires.
    pub expires_at: Option<String>,
    /// The site the key belongs to, if any.
    pub site_id: Option<String>,
    /// The group the key belongs to, if any.
    pub group_id: Option<String>,
    /// When set, the only models (public names) the key may use, within its tier ceiling.
    pub allowed_models: Option<Vec<String>>,
}

/// An admin account (never with its password hash).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminUser {
    /// Stable id (`user_…`).
    pub id: String,
    /// Unique login name.
    pub username: String,
    /// What the account may do.
    pub role: Role,
    /// The institution the account belongs to; `None` only for operators.
    pub institution_id: Option<String>,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// An API token for automation: acts with a role on one institution (or, made by an operator,
/// on all), limited to its scopes. Only a keyed hash of the token is stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AdminToken {
    /// Stable id (`tok_…`).
    pub id: String,
    /// What it is for, e.g. `nightly key rotation`.
    pub name: String,
    /// The role it acts with: its creator's.
    pub role: Role,
    /// Its institution; `None` only for an operator's token.
    pub institution_id: Option<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// `operator` or `user:<id>` of the creator.
    pub created_by: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 expiry, if it expires.
    pub expires_at: Option<String>,
    /// RFC 3339 revocation time, once revoked.
    pub revoked_at: Option<String>,
}

/// What the authenticate stage needs to check a presented key and build its principal.
#[derive(Debug, Clone)]
pub struct KeyCredential {
    /// The key record.
    pub key: ApiKey,
    /// HMAC-SHA256 of the secret under the server pepper.
    pub secret_hash: [u8; 32],
    /// The institution the key belongs to.
    pub institution: Institution,
    /// The ceiling of the key's group, if it has one.
    pub group_tier_ceiling: Option<Tier>,
    /// RFC 3339 end of the key's approved frontier use-case attestation, if it has one.
    pub attested_until: Option<String>,
}

/// An operator's approval of what a service key will use frontier models for: the named
/// principal the frontier gate asks for. It expires; a new approval replaces it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FrontierAttestation {
    /// The service key it is for.
    pub key_id: String,
    /// What the key will use frontier models for, as approved.
    pub use_case: String,
    /// Who approved it (`operator`).
    pub approved_by: String,
    /// RFC 3339 approval time.
    pub approved_at: String,
    /// RFC 3339 time the approval ends.
    pub expires_at: String,
}

/// Why a principal may not use a model of some tier ([`Principal::tier_gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierRefusal {
    /// Above a ceiling: which one.
    Ceiling(CeilingLevel),
    /// A frontier model through a kiosk key or a patron session: shared, never a named person.
    SharedSession,
    /// A frontier model, for an institution no operator verified.
    NotVerified,
    /// A frontier model through a service key without a current approved attestation.
    AttestationRequired,
}

/// Which ceiling refused a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeilingLevel {
    /// The institution's.
    Institution,
    /// The key's group's.
    Group,
    /// The key's own.
    Key,
    /// The institution's ceiling for minors, for a patron counted as a minor.
    Minor,
}

impl CeilingLevel {
    /// How a refusal names the ceiling.
    pub const fn describe(self) -> &'static str {
        match self {
            CeilingLevel::Institution => "the institution's tier ceiling",
            CeilingLevel::Group => "the tier ceiling of this key's group",
            CeilingLevel::Key => "this key's tier ceiling",
            CeilingLevel::Minor => "the tier ceiling for minors",
        }
    }
}

/// Who a request runs as, after authentication. Cheap to clone (shared strings).
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The institution whose pool pays.
    pub institution_id: std::sync::Arc<str>,
    /// The institution's sector, for metrics and defaults.
    pub institution_kind: InstitutionKind,
    /// IANA time zone of the institution: usage days are its local days.
    pub timezone: std::sync::Arc<str>,
    /// Whether the institution's keys work.
    pub institution_status: InstitutionStatus,
    /// Whether an operator verified the institution for frontier models.
    pub frontier_verified: bool,
    /// What happens to a request larger than what is left of a limit.
    pub over_quota: OverQuota,
    /// The institution's cache and fallback choices.
    pub economy: Economy,
    /// The API key the request came in with.
    pub key_id: std::sync::Arc<str>,
    /// The key's site, if any.
    pub site_id: Option<std::sync::Arc<str>>,
    /// The key's group, if any.
    pub group_id: Option<std::sync::Arc<str>>,
    /// The highest model tier the key may reach.
    pub tier_ceiling: Tier,
    /// The ceiling of the key's group, if any.
    pub group_tier_ceiling: Option<Tier>,
    /// The institution's ceiling.
    pub institution_tier_ceiling: Tier,
    /// The institution's ceiling for minors (applies to a patron counted as a minor).
    pub minor_tier_ceiling: Tier,
    /// Unix seconds at which the key's frontier attestation ends, if it has one.
    pub attested_until: Option<i64>,
    /// When set, the only models this principal may use.
    pub allowed_models: Option<std::sync::Arc<[String]>>,
    /// Unix seconds after which the credential stops working.
    pub expires_at: Option<i64>,
    /// What the key is for.
    pub key_kind: KeyKind,
    /// Set for a patron session: who signed in, as far as Carrel knows them.
    pub patron: Option<PatronPrincipal>,
}

/// The patron of a session, on top of the kiosk key it was opened on. Never a name, a card or
/// a birth date.
#[derive(Debug, Clone, PartialEq)]
pub struct PatronPrincipal {
    /// The session (its token's public id).
    pub session_id: std::sync::Arc<str>,
    /// The patron reference.
    pub patron_ref: std::sync::Arc<str>,
    /// The patron's band.
    pub age_band: AgeBand,
    /// A fixed allotment for the day, in tokens (a guest pass's): the patron's daily limit
    /// is at most this.
    pub allowance: Option<u64>,
}

impl Principal {
    /// The principal a valid key runs as.
    pub fn for_key(cred: &KeyCredential) -> Self {
        Principal {
            institution_id: cred.institution.id.as_str().into(),
            institution_kind: cred.institution.kind,
            timezone: cred.institution.timezone.as_str().into(),
            institution_status: cred.institution.status,
            frontier_verified: cred.institution.frontier_verified,
            over_quota: cred.institution.over_quota,
            economy: cred.institution.economy,
            key_id: cred.key.id.as_str().into(),
            site_id: cred.key.site_id.as_deref().map(Into::into),
            group_id: cred.key.group_id.as_deref().map(Into::into),
            tier_ceiling: cred.key.tier_ceiling,
            group_tier_ceiling: cred.group_tier_ceiling,
            institution_tier_ceiling: cred.institution.tier_ceiling,
            minor_tier_ceiling: cred.institution.minor_tier_ceiling,
            attested_until: cred.attested_until.as_deref().and_then(unix_seconds),
            allowed_models: cred.key.allowed_models.as_deref().map(Into::into),
            expires_at: cred.key.expires_at.as_deref().and_then(unix_seconds),
            key_kind: cred.key.kind,
            patron: None,
        }
    }

    /// Whether the credential has expired at `now` (Unix seconds).
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether the model `name` is in the key's allowed models (any model when unset).
    pub fn allows_model(&self, name: &str) -> bool {
        self.allowed_models
            .as_deref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == name))
    }

    /// Whether this principal is a patron counted as a minor at its institution.
    pub fn is_minor(&self) -> bool {
        self.patron
            .as_ref()
            .is_some_and(|p| p.age_band.treat_as_minor(self.institution_kind))
    }

    /// The tier gate: whether this principal may reach a model of `tier` at `now` (Unix
    /// seconds), and if not, the first reason in a fixed order: the ceilings (institution,
    /// group, key, minors), then for frontier models the shared-session rule, the operator's
    /// verification of the institution, and the key's attestation (staff keys are named
    /// people and need none).
    pub fn tier_gate(&self, tier: Tier, now: i64) -> Result<(), TierRefusal> {
        let ceilings = [
            (
                CeilingLevel::Institution,
                Some(self.institution_tier_ceiling),
            ),
            (CeilingLevel::Group, self.group_tier_ceiling),
            (CeilingLevel::Key, Some(self.tier_ceiling)),
            (
                CeilingLevel::Minor,
                self.is_minor().then_some(self.minor_tier_ceiling),
            ),
        ];
        for (level, ceiling) in ceilings {
            if ceiling.is_some_and(|c| tier > c) {
                return Err(TierRefusal::Ceiling(level));
            }
        }
        if tier < Tier::Frontier {
            return Ok(());
        }
        if self.patron.is_some() || self.key_kind == KeyKind::Kiosk {
            return Err(TierRefusal::SharedSession);
        }
        if !self.frontier_verified {
            return Err(TierRefusal::NotVerified);
        }
        match self.key_kind {
            KeyKind::Staff => Ok(()),
            KeyKind::Service if self.attested_until.is_some_and(|until| until > now) => Ok(()),
            KeyKind::Service | KeyKind::Kiosk => Err(TierRefusal::AttestationRequired),
        }
    }

    /// Whether this principal may use the model `name` of `tier` now: allowed, and through the
    /// tier gate. Lists of models (`/v1/models`) show only these.
    pub fn may_use(&self, name: &str, tier: Tier) -> bool {
        self.allows_model(name) && self.tier_gate(tier, unix_now()).is_ok()
    }
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Unix seconds as whole-second RFC 3339, the form the store keeps times in, so stored times
/// also sort as text.
pub fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Unix seconds of an RFC 3339 timestamp as the store writes them.
pub fn unix_seconds(rfc3339: &str) -> Option<i64> {
    rfc3339
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}

/// The local date at Unix second `at` in the IANA time zone `tz` (UTC when the zone is unknown,
/// which validation at the admin API prevents): the day usage is counted in.
pub fn local_date(at: i64, tz: &str) -> jiff::civil::Date {
    let zone = jiff::tz::TimeZone::get(tz).unwrap_or(jiff::tz::TimeZone::UTC);
    jiff::Timestamp::from_second(at)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(zone)
        .date()
}

/// The last local day that is over in every time zone at `at` (Unix seconds): two days ago in
/// UTC, since no zone is that far behind.
pub fn last_day_over_everywhere(at: i64) -> jiff::civil::Date {
    local_date(at - 2 * 86_400, "UTC")
}

/// ISO 3166-1 alpha-2 country codes: the first part of every ISO 3166-2 region code.
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI \
BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE \
DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS \
GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW \
KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW \
MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO \
RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM \
TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Checks an ISO 3166-2 subdivision code such as `US-CA` or `GB-LND`: an assigned country code,
/// a hyphen, and one to three upper-case letters or digits.
pub fn validate_region(code: &str) -> Result<(), String> {
    let expected = || format!("`{code}` is not an ISO 3166-2 code such as US-CA or GB-LND");
    let (country, subdivision) = code.split_once('-').ok_or_else(expected)?;
    let country_ok = country.len() == 2
        && country.bytes().all(|b| b.is_ascii_uppercase())
        && COUNTRIES.split_ascii_whitespace().any(|c| c == country);
    let subdivision_ok = (1..=3).contains(&subdivision.len())
        && subdivision
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if country_ok && subdivision_ok {
        Ok(())
    } else {
        Err(expected())
    }
}

/// Checks a sector label: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
pub fn validate_sector(label: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{label}` is not a sector label: 1 to 64 of a-z, 0-9, `_` and `-`, e.g. public_library"
        ))
    }
}

/// Checks an IANA time zone name such as `America/Chicago` against the bundled tz database.
pub fn validate_timezone(name: &str) -> Result<(), String> {
    // Only names the database knows; fixed offsets and POSIX strings are not time zones.
    if name.is_empty() || name.starts_with(['+', '-']) || jiff::tz::TimeZone::get(name).is_err() {
        return Err(format!(
            "`{name}` is not an IANA time zone such as Europe/Paris"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_bands_follow_birthdays_and_unknown_counts_as_minor_at_schools() {
        assert_eq!(
            [12, 13, 17, 18].map(AgeBand::of_age),
            [
                AgeBand::Under13,
                AgeBand::Minor,
                AgeBand::Minor,
                AgeBand::Adult
            ]
        );
        assert!(AgeBand::Unknown.treat_as_minor(InstitutionKind::School));
        assert!(!AgeBand::Unknown.treat_as_minor(InstitutionKind::Library));
        assert!(AgeBand::Under13.treat_as_minor(InstitutionKind::Library));
        assert!(!AgeBand::Adult.treat_as_minor(InstitutionKind::School));
    }

    #[test]
    fn regions_and_time_zones_are_checked() {
        for ok in ["US-CA", "GB-LND", "FR-75", "DE-BY"] {
            assert!(validate_region(ok).is_ok(), "{ok}");
        }
        for bad in ["US", "us-ca", "XX-CA", "US-CALI", "US_CA", ""] {
            assert!(validate_region(bad).is_err(), "{bad}");
        }
        assert!(validate_timezone("America/Chicago").is_ok());
        assert!(validate_timezone("UTC").is_ok());
        assert!(validate_timezone("Mars/Olympus").is_err());
        assert!(validate_timezone("").is_err());
    }

    #[test]
    fn tiers_are_ordered_and_round_trip() {
        assert!(Tier::Baseline < Tier::Advanced && Tier::Advanced < Tier::Frontier);
        for t in Tier::ALL {
            assert_eq!(t.as_str().parse::<Tier>().unwrap(), *t);
        }
        let err = "ultra".parse::<Tier>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown value `ultra`, expected one of baseline, advanced, frontier"
        );
    }

    #[test]
    fn serde_names_are_the_declared_wire_names() {
        fn check<T: Serialize + Copy>(all: &[T], name: fn(T) -> &'static str) {
            for v in all {
                assert_eq!(serde_json::to_value(v).unwrap(), name(*v));
            }
        }
        check(Tier::ALL, Tier::as_str);
        check(InstitutionKind::ALL, InstitutionKind::as_str);
        check(KeyKind::ALL, KeyKind::as_str);
        check(ProviderKind::ALL, ProviderKind::as_str);
        check(Role::ALL, Role::as_str);
        check(GroupKind::ALL, GroupKind::as_str);
        check(InstitutionStatus::ALL, InstitutionStatus::as_str);
        check(Scope::ALL, Scope::as_str);
        check(UsageGroupBy::ALL, UsageGroupBy::as_str);
        check(TierBasis::ALL, TierBasis::as_str);
        check(ContainmentKind::ALL, ContainmentKind::as_str);
    }

    fn principal(kind: KeyKind) -> Principal {
        Principal {
            institution_id: "inst".into(),
            institution_kind: InstitutionKind::Library,
            timezone: "UTC".into(),
            institution_status: InstitutionStatus::Active,
            frontier_verified: true,
            over_quota: OverQuota::Reject,
            economy: Default::default(),
            key_id: "key".into(),
            site_id: None,
            group_id: None,
            tier_ceiling: Tier::Frontier,
            group_tier_ceiling: None,
            institution_tier_ceiling: Tier::Frontier,
            minor_tier_ceiling: Tier::Baseline,
            attested_until: None,
            allowed_models: None,
            expires_at: None,
            key_kind: kind,
            patron: None,
        }
    }

    fn patron(p: &mut Principal, age_band: AgeBand) {
        p.patron = Some(PatronPrincipal {
            session_id: "s".into(),
            patron_ref: "p".into(),
            age_band,
            allowance: None,
        });
    }

    #[test]
    fn ceilings_refuse_in_a_fixed_order_and_name_the_level() {
        let now = 1_000;
        let mut p = principal(KeyKind::Staff);
        assert_eq!(p.tier_gate(Tier::Frontier, now), Ok(()));
        p.tier_ceiling = Tier::Advanced;
        assert_eq!(
            p.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::Ceiling(CeilingLevel::Key))
        );
        p.group_tier_ceiling = Some(Tier::Baseline);
        assert_eq!(
            p.tier_gate(Tier::Advanced, now),
            Err(TierRefusal::Ceiling(CeilingLevel::Group))
        );
        p.institution_tier_ceiling = Tier::Baseline;
        assert_eq!(
            p.tier_gate(Tier::Advanced, now),
            Err(TierRefusal::Ceiling(CeilingLevel::Institution))
        );
        assert_eq!(p.tier_gate(Tier::Baseline, now), Ok(()));
    }

    #[test]
    fn minors_stop_at_baseline_unless_the_institution_raises_it() {
        let mut p = principal(KeyKind::Kiosk);
        patron(&mut p, AgeBand::Minor);
        assert_eq!(
            p.tier_gate(Tier::Advanced, 0),
            Err(TierRefusal::Ceiling(CeilingLevel::Minor))
        );
        assert_eq!(p.tier_gate(Tier::Baseline, 0), Ok(()));
        p.minor_tier_ceiling = Tier::Advanced;
        assert_eq!(p.tier_gate(Tier::Advanced, 0), Ok(()));
        // An unknown age is a minor at a school, an adult at a library.
        patron(&mut p, AgeBand::Unknown);
        p.minor_tier_ceiling = Tier::Baseline;
        assert_eq!(p.tier_gate(Tier::Advanced, 0), Ok(()));
        p.institution_kind = InstitutionKind::School;
        assert_eq!(
            p.tier_gate(Tier::Advanced, 0),
            Err(TierRefusal::Ceiling(CeilingLevel::Minor))
        );
    }

    #[test]
    fn the_frontier_gate_wants_a_named_principal_a_verified_institution_and_an_attestation() {
        let now = 1_000;
        // Kiosks and patron sessions never, even adults at a verified institution.
        let kiosk = principal(KeyKind::Kiosk);
        assert_eq!(
            kiosk.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::SharedSession)
        );
        let mut session = principal(KeyKind::Kiosk);
        patron(&mut session, AgeBand::Adult);
        session.minor_tier_ceiling = Tier::Frontier;
        assert_eq!(
            session.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::SharedSession)
        );
        // A service key needs a current attestation.
        let mut service = principal(KeyKind::Service);
        assert_eq!(
            service.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::AttestationRequired)
        );
        service.attested_until = Some(now);
        assert_eq!(
            service.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::AttestationRequired),
            "an attestation ending now has ended"
        );
        service.attested_until = Some(now + 1);
        assert_eq!(service.tier_gate(Tier::Frontier, now), Ok(()));
        // ...at a verified institution.
        service.frontier_verified = false;
        assert_eq!(
            service.tier_gate(Tier::Frontier, now),
            Err(TierRefusal::NotVerified)
        );
        // Below frontier none of this applies.
        assert_eq!(service.tier_gate(Tier::Advanced, now), Ok(()));
        assert_eq!(kiosk.tier_gate(Tier::Advanced, now), Ok(()));
    }

    #[test]
    fn serde_uses_the_wire_names() {
        assert_eq!(
            serde_json::to_string(&InstitutionKind::SmallBusiness).unwrap(),
            "\"small_business\""
        );
        assert_eq!(
            serde_json::from_str::<ProviderKind>("\"openai\"").unwrap(),
            ProviderKind::Openai
        );
    }
}
