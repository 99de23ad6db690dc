//! The admin audit trail: every mutation and sign-in, with who, what, to what and when — and
//! never a secret, a password or a typed-in username that matched no account.

use axum::extract::State;
use axum::{Extension, Json};
use carrel_core::store::AuditEntry;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AdminState;
use crate::auth::{Action, AdminPrincipal};
use crate::error::{AdminError, ErrorBody};
use crate::query::AdminQuery;

impl AdminState {
    /// Appends an entry. The change it records is already committed, so a failure here is
    /// logged loudly rather than turned into an error response.
    pub async fn audit(
        &self,
        actor: String,
        action: &'static str,
        target: String,
        institution: Option<&str>,
    ) {
        if let Err(e) = self
            .store
            .append_audit(actor, action, target, institution.map(str::to_owned))
            .await
        {
            tracing::error!(error = %e, action, "could not append to the audit trail");
        }
    }
}

impl AdminPrincipal {
    /// How the audit trail names this caller.
    pub fn actor(&self) -> String {
        match self {
            AdminPrincipal::Operator => "operator".to_owned(),
            AdminPrincipal::User(u) => format!("user:{}", u.id),
            AdminPrincipal::Token(t) => format!("token:{}", t.id),
        }
    }
}

/// A page of the audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, newest first.
    pub data: Vec<AuditEntry>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<i64>,
}

/// Reads the audit trail: all of it for the operator; the caller's institution's for its admins
/// and auditors.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "accounts",
    params(
        ("before" = Option<i64>, Query, description = "Cursor: return entries older than this `seq`"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500 (default 100)"),
    ),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn list(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<AuditPage>, AdminError> {
    let scope = principal.institution().map(str::to_owned);
    principal.authorize(Action::ReadAudit, scope.as_deref())?;
    query.only(&["before", "limit"])?;
    let before = query.int("before")?;
    let limit = query.limit()?;
    let data = state
        .store
        .list_audit(scope.as_deref(), before, limit)
        .await?;
    let next_cursor = (data.len() == limit as usize)
        .then(|| data.last().map(|e| e.seq))
        .flatten();
    Ok(Json(AuditPage { data, next_cursor }))
}

/// A signed tree head of the audit log (see `carrel_core::audit`).
pub use carrel_core::audit::TreeHead;

/// Kept tree heads, smallest first: save them somewhere the database's owner cannot reach, and
/// `carrel audit verify --head` checks the log against them.
#[derive(Debug, Serialize, ToSchema)]
pub struct TreeHeadList {
    /// The heads.
    pub data: Vec<TreeHead>,
}

/// An inclusion proof (RFC 9162 §2.1.3): the entry is leaf `leaf_index` of the tree of
/// `tree_size` leaves whose root is `root`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InclusionProof {
    /// The entry's `seq`.
    pub seq: i64,
    /// Its leaf index (0-based position in the log).
    pub leaf_index: u64,
    /// The tree's size.
    pub tree_size: u64,
    /// `SHA-256(0x00 ‖ canonical JSON of the entry)`, hex.
    pub leaf_hash: String,
    /// The audit path, hex, leaf to root.
    pub audit_path: Vec<String>,
    /// The root of the tree of `tree_size` leaves, hex.
    pub root: String,
    /// The entry, whose canonical JSON the leaf hashes.
    pub entry: AuditEntry,
}

/// A consistency proof (RFC 9162 §2.1.4): the tree of `first` leaves is a prefix of the tree of
/// `second` leaves.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsistencyProof {
    /// The older size.
    pub first: u64,
    /// The newer size.
    pub second: u64,
    /// The older root, hex.
    pub first_root: String,
    /// The newer root, hex.
    pub second_root: String,
    /// The proof, hex.
    pub proof: Vec<String>,
}

/// The leaf hashes of the whole log.
async fn leaves(
    state: &AdminState,
) -> Result<(Vec<AuditEntry>, Vec<carrel_core::merkle::Hash>), AdminError> {
    let log = state.store.audit_log().await?;
    let leaves = carrel_core::audit::leaf_hashes(&log);
    Ok((log, leaves))
}

/// The signed head of the log as it is now: the kept one when the log has not grown since,
/// else a new one, signed and kept. Also made at least hourly.
pub async fn make_tree_head(state: &AdminState) -> Result<TreeHead, AdminError> {
    let (_, leaves) = leaves(state).await?;
    let root = carrel_core::merkle::root(&leaves);
    let kept = state.store.tree_heads().await?;
    if let Some(last) = kept.last()
        && last.tree_size == leaves.len() as u64
        && last.root_hash() == Some(root)
    {
        return Ok(last.clone());
    }
    let head = state.hooks.sign_tree_head(leaves.len() as u64, &root);
    if head.tree_size > 0 {
        state.store.record_tree_head(head.clone()).await?;
    }
    Ok(head)
}

/// The audit log's current signed tree head (kept, so later checks can hold the log to it).
#[utoipa::path(get, path = "/admin/v1/audit/tree-head", tag = "accounts",
    responses((status = 200, body = TreeHead), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn tree_head(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
) -> Result<Json<TreeHead>, AdminError> {
    principal.authorize(Action::ReadAudit, None)?;
    Ok(Json(make_tree_head(&state).await?))
}

/// Every kept tree head, as JSON to export.
#[utoipa::path(get, path = "/admin/v1/audit/tree-heads", tag = "accounts",
    responses((status = 200, body = TreeHeadList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn tree_heads(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
) -> Result<Json<TreeHeadList>, AdminError> {
    principal.authorize(Action::ReadAudit, None)?;
    Ok(Json(TreeHeadList {
        data: state.store.tree_heads().await?,
    }))
}

fn size_param(
    query: &AdminQuery,
    name: &'static str,
    log_len: usize,
) -> Result<Option<usize>, AdminError> {
    match query.int(name)? {
        None => Ok(None),
        Some(n) if n >= 1 && n as usize <= log_len => Ok(Some(n as usize)),
        Some(_) => Err(AdminError::field(
            name,
            format!("{name}: between 1 and the log's size ({log_len})"),
        )),
    }
}

/// Proves an entry is in the log: an RFC 9162 inclusion proof. Operators may ask about any
/// entry; an institution's admins and auditors about their institution's.
#[utoipa::path(get, path = "/admin/v1/audit/proof/inclusion", tag = "accounts",
    params(
        ("seq" = i64, Query, description = "The entry's `seq`"),
        ("tree_size" = Option<u64>, Query, description = "Size of the tree to prove it in (default: the whole log)"),
    ),
    responses((status = 200, body = InclusionProof), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn inclusion_proof(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<InclusionProof>, AdminError> {
    principal.authorize(Action::ReadAudit, None)?;
    query.only(&["seq", "tree_size"])?;
    let seq = query
        .int("seq")?
        .ok_or_else(|| AdminError::field("seq", "seq: required"))?;
    let (log, leaves) = leaves(&state).await?;
    let not_found = || AdminError::NotFound(format!("audit entry {seq}"));
    let index = log
        .iter()
        .position(|e| e.seq == seq)
        .ok_or_else(not_found)?;
    let entry = log[index].clone();
    if principal.institution().is_some()
        && principal.institution() != entry.institution_id.as_deref()
    {
        return Err(not_found());
    }
    let size = size_param(&query, "tree_size", leaves.len())?.unwrap_or(leaves.len());
    if index >= size {
        return Err(AdminError::field(
            "tree_size",
            format!("tree_size: the entry is leaf {index}, after a tree of {size}"),
        ));
    }
    let path = carrel_core::merkle::inclusion_proof(&leaves[..size], index)
        .map_err(|e| AdminError::field("seq", e.to_string()))?;
    Ok(Json(InclusionProof {
        seq,
        leaf_index: index as u64,
        tree_size: size as u64,
        leaf_hash: hex::encode(leaves[index]),
        audit_path: path.iter().map(hex::encode).collect(),
        root: hex::encode(carrel_core::merkle::root(&leaves[..size])),
        entry,
    }))
}

/// Proves a smaller tree is a prefix of a larger one: an RFC 9162 consistency proof.
#[utoipa::path(get, path = "/admin/v1/audit/proof/consistency", tag = "accounts",
    params(
        ("first" = u64, Query, description = "The older tree size"),
        ("second" = Option<u64>, Query, description = "The newer tree size (default: the whole log)"),
    ),
    responses((status = 200, body = ConsistencyProof), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn consistency_proof(
    State(state): State<AdminState>,
    Extension(principal): Extension<AdminPrincipal>,
    query: AdminQuery,
) -> Result<Json<ConsistencyProof>, AdminError> {
    principal.authorize(Action::ReadAudit, None)?;
    query.only(&["first", "second"])?;
    let (_, leaves) = leaves(&state).await?;
    let first = size_param(&query, "first", leaves.len())?
        .ok_or_else(|| AdminError::field("first", "first: required"))?;
    let second = size_param(&query, "second", leaves.len())?.unwrap_or(leaves.len());
    if first > second {
        return Err(AdminError::field("first", "first: at most second"));
    }
    let proof = carrel_core::merkle::consistency_proof(&leaves[..second], first)
        .map_err(|e| AdminError::field("first", e.to_string()))?;
    Ok(Json(ConsistencyProof {
        first: first as u64,
        second: second as u64,
        first_root: hex::encode(carrel_core::merkle::root(&leaves[..first])),
        second_root: hex::encode(carrel_core::merkle::root(&leaves[..second])),
        proof: proof.iter().map(hex::encode).collect(),
    }))
}
