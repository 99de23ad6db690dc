//! Versioned model prices: a model's prices change at an effective time, and a request is
//! priced at the version in force when it ran.
//!
//! A model's own prices (`models.input_price_per_mtok`, `output_price_per_mtok`, from the
//! config file or `POST /admin/v1/models`) are in force until its first version; each version
//! is in force from its `effective_at` until the next. Versions are control data, written as
//! commands like every other admin change, so each replica's catalog holds the same table. A
//! version never takes effect in the past: the admin API refuses one (requests already priced
//! stay as they were), and a write never reads the clock (a version without a time takes the
//! time of its write).

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::write::WriteCtx;
use super::{Store, StoreError};

/// Migration 14: price versions of models.
pub(super) const MIGRATION: &str = r#"
CREATE TABLE model_prices (
    model                        TEXT NOT NULL,
    effective_at                 INTEGER NOT NULL,
    input_price_per_mtok         REAL NOT NULL,
    output_price_per_mtok        REAL NOT NULL,
    cached_input_price_per_mtok  REAL NOT NULL,
    created_by                   TEXT NOT NULL,
    created_at                   TEXT NOT NULL,
    PRIMARY KEY (model, effective_at)
) WITHOUT ROWID;
"#;

/// One version of a model's prices, in US dollars per million tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceVersion {
    /// The public model name.
    pub model: String,
    /// Unix seconds from which this version prices requests.
    pub effective_at: i64,
    /// A million prompt tokens.
    pub input_price_per_mtok: f64,
    /// A million completion tokens.
    pub output_price_per_mtok: f64,
    /// A million prompt tokens the provider served from its prompt cache
    /// (`usage.prompt_tokens_details.cached_tokens`).
    pub cached_input_price_per_mtok: f64,
    /// Who added it.
    pub created_by: String,
    /// RFC 3339 time it was added.
    pub created_at: String,
}

/// A version to add.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewPrice {
    /// The public model name.
    pub model: String,
    /// Unix seconds from which it applies; `None`: from the time of the write.
    pub effective_at: Option<i64>,
    /// A million prompt tokens.
    pub input_price_per_mtok: f64,
    /// A million completion tokens.
    pub output_price_per_mtok: f64,
    /// A million cached prompt tokens.
    pub cached_input_price_per_mtok: f64,
    /// Who adds it.
    pub created_by: String,
}

pub(super) fn add_price(
    c: &mut Connection,
    w: &WriteCtx,
    new: NewPrice,
) -> Result<PriceVersion, StoreError> {
    let exists: bool = c.query_row(
        "SELECT EXISTS(SELECT 1 FROM models WHERE name = ?1)",
        [&new.model],
        |r| r.get(0),
    )?;
    if !exists {
        return Err(StoreError::NotFound(format!("model `{}`", new.model)));
    }
    let version = PriceVersion {
        effective_at: new.effective_at.unwrap_or_else(|| w.unix()),
        model: new.model,
        input_price_per_mtok: new.input_price_per_mtok,
        output_price_per_mtok: new.output_price_per_mtok,
        cached_input_price_per_mtok: new.cached_input_price_per_mtok,
        created_by: new.created_by,
        created_at: w.now(),
    };
    c.execute(
        "INSERT INTO model_prices (model, effective_at, input_price_per_mtok,
            output_price_per_mtok, cached_input_price_per_mtok, created_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            version.model,
            version.effective_at,
            version.input_price_per_mtok,
            version.output_price_per_mtok,
            version.cached_input_price_per_mtok,
            version.created_by,
            version.created_at
        ],
    )
    .map_err(|e| {
        super::unique_conflict(e, || {
            format!(
                "a price of `{}` effective at {}",
                version.model, version.effective_at
            )
        })
    })?;
    Ok(version)
}

/// Drops the versions of models that are gone, so a model added again under an old name does
/// not inherit them.
pub(super) fn drop_orphans(c: &Connection) -> Result<usize, StoreError> {
    Ok(c.execute(
        "DELETE FROM model_prices WHERE model NOT IN (SELECT name FROM models)",
        [],
    )?)
}

impl Store {
    /// Adds a version of a model's prices.
    pub async fn add_price(&self, new: NewPrice) -> Result<PriceVersion, StoreError> {
        self.write(super::write::Command::AddPrice(new)).await
    }

    /// Price versions, of one model or of all, by model and then effective time.
    pub async fn price_versions(
        &self,
        model: Option<&str>,
    ) -> Result<Vec<PriceVersion>, StoreError> {
        let model = model.map(str::to_owned);
        self.call(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT model, effective_at, input_price_per_mtok, output_price_per_mtok,
                    cached_input_price_per_mtok, created_by, created_at
                 FROM model_prices WHERE ?1 IS NULL OR model = ?1
                 ORDER BY model, effective_at",
            )?;
            let rows = stmt.query_map([&model], |r| {
                Ok(PriceVersion {
                    model: r.get(0)?,
                    effective_at: r.get(1)?,
                    input_price_per_mtok: r.get(2)?,
                    output_price_per_mtok: r.get(3)?,
                    cached_input_price_per_mtok: r.get(4)?,
                    created_by: r.get(5)?,
                    created_at: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}
