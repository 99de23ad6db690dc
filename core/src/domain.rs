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
    /// Price of a million prompt tokens, in the operator's currency.
    pub input_price_per_mtok: f64,
    /// Price of a million completion tokens, in the operator's currency.
    pub output_price_per_mtok: f64,
    /// Most output tokens one choice may ask for, and what is reserved when a request does not
    /// say.
    pub max_output_tokens: u32,
    /// Where the record came from.
    pub source: Source,
    /// RFC 3339 creation time.
    pub created_at: String,
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
    /// RFC 3339 creation time.
    pub created_at: String,
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
    /// The API key the request came in with.
    pub key_id: std::sync::Arc<str>,
    /// The key's site, if any.
    pub site_id: Option<std::sync::Arc<str>>,
    /// The key's group, if any.
    pub group_id: Option<std::sync::Arc<str>>,
    /// The highest model tier this principal may reach.
    pub tier_ceiling: Tier,
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
            key_id: cred.key.id.as_str().into(),
            site_id: cred.key.site_id.as_deref().map(Into::into),
            group_id: cred.key.group_id.as_deref().map(Into::into),
            tier_ceiling: cred.key.tier_ceiling,
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

    /// Whether this principal may use the model `name` of `tier`: within its tier ceiling and
    /// allowed models, and a frontier model only for an institution an operator verified.
    pub fn may_use(&self, name: &str, tier: Tier) -> bool {
        tier <= self.tier_ceiling
            && (tier < Tier::Frontier || self.frontier_verified)
            && self
                .allowed_models
                .as_deref()
                .is_none_or(|allowed| allowed.iter().any(|m| m == name))
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
