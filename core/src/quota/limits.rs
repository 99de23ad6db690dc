//! What can be limited, at which level, and the checks a new limit must pass.

use serde::{Deserialize, Serialize};

/// Largest token limit accepted: a trillion tokens a period is beyond any public program.
pub const MAX_TOKENS_LIMIT: u64 = 1_000_000_000_000;
/// Largest request rate accepted.
pub const MAX_REQUESTS_PER_MINUTE: u64 = 10_000_000;
/// Largest monthly budget accepted: a billion US dollars, in nano-dollars.
pub const MAX_COST_NANO_USD: u64 = 1_000_000_000 * 1_000_000_000;
/// Largest number of concurrent streams accepted.
pub const MAX_CONCURRENT_STREAMS: u64 = 1_000_000;

/// Where a limit is set and counted. Patrons are counted under the institution that serves
/// them; models are counted per institution, with limits an operator sets once for every
/// institution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The institution's whole pool.
    Institution,
    /// A site (branch, campus).
    Site,
    /// A group (class, patron type, plan).
    Group,
    /// An API key.
    Key,
    /// One patron, by reference.
    Patron,
    /// One model, within each institution.
    Model,
}

// `Level::ALL[i] as usize == i`: arrays indexed by level rely on it (checked at compile time).
const _: () = {
    let mut i = 0;
    while i < Level::ALL.len() {
        assert!(
            Level::ALL[i] as usize == i,
            "Level::ALL is in declaration order"
        );
        i += 1;
    }
};

impl Level {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Level::Institution => "institution",
            Level::Site => "site",
            Level::Group => "group",
            Level::Key => "key",
            Level::Patron => "patron",
            Level::Model => "model",
        }
    }

    /// Every level, widest first (`level as usize` indexes this).
    pub const ALL: [Level; 6] = [
        Level::Institution,
        Level::Site,
        Level::Group,
        Level::Key,
        Level::Patron,
        Level::Model,
    ];

    /// Levels limits are set on (patrons get theirs through `patron_tokens_per_day`).
    pub const SETTABLE: [Level; 5] = [
        Level::Institution,
        Level::Site,
        Level::Group,
        Level::Key,
        Level::Model,
    ];
}

/// One kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Requests per minute (GCRA, burst of a minute's worth).
    RequestsPerMinute,
    /// Tokens per local day.
    TokensPerDay,
    /// Tokens per local month.
    TokensPerMonth,
    /// Cost per local month, in nano-dollars.
    CostPerMonth,
    /// Streams open at once.
    ConcurrentStreams,
    /// Tokens per local day for each patron.
    PatronTokensPerDay,
}

impl LimitKind {
    /// Every kind.
    pub const ALL: [LimitKind; 6] = [
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerDay,
        LimitKind::TokensPerMonth,
        LimitKind::CostPerMonth,
        LimitKind::ConcurrentStreams,
        LimitKind::PatronTokensPerDay,
    ];

    /// The admin API's field name.
    pub const fn field(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerDay => "tokens_per_day",
            LimitKind::TokensPerMonth => "tokens_per_month",
            LimitKind::CostPerMonth => "cost_per_month_usd",
            LimitKind::ConcurrentStreams => "concurrent_streams",
            LimitKind::PatronTokensPerDay => "patron_tokens_per_day",
        }
    }

    /// The largest value accepted (for the cost, in nano-dollars).
    pub fn max(self) -> u64 {
        match self {
            LimitKind::RequestsPerMinute => MAX_REQUESTS_PER_MINUTE,
            LimitKind::TokensPerDay | LimitKind::TokensPerMonth | LimitKind::PatronTokensPerDay => {
                MAX_TOKENS_LIMIT
            }
            LimitKind::CostPerMonth => MAX_COST_NANO_USD,
            LimitKind::ConcurrentStreams => MAX_CONCURRENT_STREAMS,
        }
    }

    /// Whether children's limits of this kind are carved out of their parent's (their sum may
    /// not exceed it). A per-patron allotment is a cap for each patron, not a share.
    pub const fn carved(self) -> bool {
        !matches!(self, LimitKind::PatronTokensPerDay)
    }
}

/// The limits set on one level; `None` is no limit. Money is in nano-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per local day.
    pub tokens_per_day: Option<u64>,
    /// Tokens per local month.
    pub tokens_per_month: Option<u64>,
    /// Cost per local month, nano-dollars.
    pub cost_per_month_nano_usd: Option<u64>,
    /// Streams open at once.
    pub concurrent_streams: Option<u64>,
    /// Tokens per local day for each patron.
    pub patron_tokens_per_day: Option<u64>,
}

impl Limits {
    /// The limit of `kind`.
    pub fn get(&self, kind: LimitKind) -> Option<u64> {
        match kind {
            LimitKind::RequestsPerMinute => self.requests_per_minute,
            LimitKind::TokensPerDay => self.tokens_per_day,
            LimitKind::TokensPerMonth => self.tokens_per_month,
            LimitKind::CostPerMonth => self.cost_per_month_nano_usd,
            LimitKind::ConcurrentStreams => self.concurrent_streams,
            LimitKind::PatronTokensPerDay => self.patron_tokens_per_day,
        }
    }

    /// Sets the limit of `kind`.
    pub fn set(&mut self, kind: LimitKind, value: Option<u64>) {
        let slot = match kind {
            LimitKind::RequestsPerMinute => &mut self.requests_per_minute,
            LimitKind::TokensPerDay => &mut self.tokens_per_day,
            LimitKind::TokensPerMonth => &mut self.tokens_per_month,
            LimitKind::CostPerMonth => &mut self.cost_per_month_nano_usd,
            LimitKind::ConcurrentStreams => &mut self.concurrent_streams,
            LimitKind::PatronTokensPerDay => &mut self.patron_tokens_per_day,
        };
        *slot = value;
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        LimitKind::ALL.iter().all(|k| self.get(*k).is_none())
    }
}

/// A change to a level's limits: `Some(None)` removes a limit, `None` leaves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsPatch(pub [Option<Option<u64>>; 6]);

/// One kind's change, as written in the store's log: `"keep"`, `"remove"` or `{"set": n}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Change {
    Keep,
    Remove,
    Set(u64),
}

impl Serialize for LimitsPatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0
            .map(|c| match c {
                None => Change::Keep,
                Some(None) => Change::Remove,
                Some(Some(v)) => Change::Set(v),
            })
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for LimitsPatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let changes = <[Change; 6]>::deserialize(d)?;
        Ok(LimitsPatch(changes.map(|c| match c {
            Change::Keep => None,
            Change::Remove => Some(None),
            Change::Set(v) => Some(Some(v)),
        })))
    }
}

impl LimitsPatch {
    /// The change for `kind`.
    pub fn get(&self, kind: LimitKind) -> Option<Option<u64>> {
        self.0[kind as usize]
    }

    /// Records a change for `kind`.
    pub fn set(&mut self, kind: LimitKind, value: Option<u64>) {
        self.0[kind as usize] = Some(value);
    }

    /// `limits` with this change applied.
    pub fn apply(&self, mut limits: Limits) -> Limits {
        for kind in LimitKind::ALL {
            if let Some(value) = self.get(kind) {
                limits.set(kind, value);
            }
        }
        limits
    }
}

/// Why a limit cannot be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Zero or more than the largest accepted value.
    #[error("{field}: must be a positive number no larger than {max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The largest accepted value.
        max: u64,
    },
    /// The children's allotments would add up to more than the parent's.
    #[error(
        "{field}: the {child}s' allotments would add up to {sum}, more than the {parent}'s {limit}"
    )]
    OverParent {
        /// The field.
        field: &'static str,
        /// The level whose limits change, or whose children were counted.
        child: &'static str,
        /// The parent level.
        parent: &'static str,
        /// What the allotments add up to.
        sum: u64,
        /// The parent's limit.
        limit: u64,
    },
}

/// Checks each value of a change is in range.
pub fn check_range(patch: &LimitsPatch) -> Result<(), LimitError> {
    for kind in LimitKind::ALL {
        if let Some(Some(v)) = patch.get(kind)
            && (v == 0 || v > kind.max())
        {
            return Err(LimitError::OutOfRange {
                field: kind.field(),
                max: match kind {
                    LimitKind::CostPerMonth => kind.max() / 1_000_000_000,
                    _ => kind.max(),
                },
            });
        }
    }
    Ok(())
}

/// Checks the carving rule for one kind: `siblings` (the other children's allotments, plus the
/// new one) may not add up to more than `parent`, when the parent has a limit.
pub fn check_carving(
    kind: LimitKind,
    child: Level,
    parent: Level,
    parent_limit: Option<u64>,
    children: impl IntoIterator<Item = u64>,
) -> Result<(), LimitError> {
    let Some(limit) = parent_limit else {
        return Ok(());
    };
    if !kind.carved() {
        return Ok(());
    }
    let sum = children.into_iter().fold(0u64, u64::saturating_add);
    if sum > limit {
        return Err(LimitError::OverParent {
            field: kind.field(),
            child: child.as_str(),
            parent: parent.as_str(),
            sum,
            limit,
        });
    }
    Ok(())
}
