//! The audit read routes: the log with filters, its export, the latest signed head, inclusion and
//! consistency proofs, and the published audit keys. Every route but the keys document needs
//! `audit:read`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use cairn_platform::audit::keys::PublicAuditKey;
use cairn_platform::audit::store::{self, ProofError};
use cairn_platform::audit::{to_hex, AuditKeys, SignedHead};
use cairn_platform::auth::Caller;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiPath, ApiQuery, ApiResponse, Envelope};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::events::{self, AuditEvent, EventFilter, Window};
use crate::QueryState;

/// The permission every audit route but the keys document needs.
pub const AUDIT_READ: &str = "audit:read";

/// The audit read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
        .routes(routes!(list_events))
        .merge(super::export::routes())
        .routes(routes!(latest_checkpoint))
        .routes(routes!(inclusion_proof))
        .routes(routes!(consistency_proof))
        .routes(routes!(audit_keys))
}

/// The longest value a text filter takes.
const MAX_FILTER_CHARS: usize = 200;

/// The filters the list and the export share, as given.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawFilter {
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    pub actor_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

fn text_filter(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v.is_empty() => Err(ApiError::field(field, "must not be empty")),
        Some(v) if v.chars().count() > MAX_FILTER_CHARS => {
            Err(ApiError::field(field, format!("must be at most {MAX_FILTER_CHARS} characters")))
        }
        Some(v) => Ok(Some(v)),
    }
}

fn time_filter(field: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|raw| {
            DateTime::parse_from_rfc3339(raw)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| ApiError::field(field, "must be an RFC 3339 time such as 2026-01-31T09:30:00Z"))
        })
        .transpose()
}

impl RawFilter {
    /// The filter, checked: texts not empty and not too long, times RFC 3339, `to` not before `from`.
    pub(super) fn check(self) -> Result<EventFilter, ApiError> {
        let from = time_filter("from", self.from.as_deref())?;
        let to = time_filter("to", self.to.as_deref())?;
        if let (Some(from), Some(to)) = (from, to) {
            if to < from {
                return Err(ApiError::field("to", "must not be before from"));
            }
        }
        Ok(EventFilter {
            aggregate_type: text_filter("aggregate_type", self.aggregate_type)?,
            aggregate_id: text_filter("aggregate_id", self.aggregate_id)?,
            event_type: text_filter("event_type", self.event_type)?,
            actor_id: text_filter("actor_id", self.actor_id)?,
            from,
            to,
        })
    }
}

/// `GET /api/v1/audit/events` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// This aggregate type only (`User`, `Room`, …).
    #[param(min_length = 1, max_length = 200)]
    aggregate_type: Option<String>,
    /// This aggregate only.
    #[param(min_length = 1, max_length = 200)]
    aggregate_id: Option<String>,
    /// This event type only (`UserRegistered`, …).
    #[param(min_length = 1, max_length = 200)]
    event_type: Option<String>,
    /// Events caused by this user (`metadata.actor_id`).
    #[param(min_length = 1, max_length = 200)]
    actor_id: Option<String>,
    /// Log time at or after this (RFC 3339). An event's log time is the latest `recorded_at` of
    /// it and every event before it in the log.
    #[param(value_type = Option<String>, format = DateTime)]
    from: Option<String>,
    /// Log time before this (RFC 3339); `[from, to)` windows hold every event exactly once.
    #[param(value_type = Option<String>, format = DateTime)]
    to: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Cursor from `meta.next_cursor` (the position of the last event shown).
    #[param(pattern = r"^[0-9]{1,20}\.[0-9]{1,19}$")]
    cursor: Option<String>,
}

/// The immutable log, oldest first by log position, each event with its metadata lifted out, its
/// leaf index (null until folded into the audit tree) and the canonical text its leaf hashes.
/// Needs `audit:read`. Filters combine; `from`/`to` select by log time (see the parameters).
#[utoipa::path(get, path = "/api/v1/audit/events", tag = "audit", security(("bearer" = [])),
    params(EventsQuery),
    responses((status = 200, description = "a page of events; meta.next_cursor", body = Envelope<Vec<AuditEvent>>),
              (status = 400, description = "an unknown parameter, or a bad filter, limit or cursor"),
              (status = 403, description = "lacks audit:read")))]
#[tracing::instrument(skip_all)]
async fn list_events(
    State(pool): State<PgPool>,
    caller: Caller,
    query: Result<ApiQuery<EventsQuery>, ApiError>,
) -> Result<ApiResponse<Vec<AuditEvent>>, ApiError> {
    caller.require(AUDIT_READ)?;
    // Who may not read the log learns nothing about its parameters.
    let ApiQuery(query) = query?;
    let limit = match query.limit {
        None => 100,
        Some(n @ 1..=1000) => i64::from(n),
        Some(_) => return Err(ApiError::field("limit", "must be between 1 and 1000")),
    };
    let after = query
        .cursor
        .as_deref()
        .map(|raw| {
            raw.parse::<ConsistencyToken>()
                .map_err(|_| ApiError::field("cursor", "is not a cursor from meta.next_cursor"))
        })
        .transpose()?;
    let filter = RawFilter {
        aggregate_type: query.aggregate_type,
        aggregate_id: query.aggregate_id,
        event_type: query.event_type,
        actor_id: query.actor_id,
        from: query.from,
        to: query.to,
    }
    .check()?;
    let (items, more) = events::page(&pool, &filter, Window { after, through: None }, limit).await?;
    let next = if more { items.last().map(|e| e.position.clone()) } else { None };
    Ok(ApiResponse::ok(items).meta("next_cursor", next))
}

/// The latest signed tree head: the tree of `tree_size` events has root `root_hash`, signed by
/// the audit key `key_id` (see `/.well-known/audit-keys.json`). Needs `audit:read`.
#[utoipa::path(get, path = "/api/v1/audit/checkpoints/latest", tag = "audit", security(("bearer" = [])),
    responses((status = 200, description = "the latest signed head", body = Envelope<SignedHead>),
              (status = 403, description = "lacks audit:read"),
              (status = 404, description = "no head signed yet")))]
#[tracing::instrument(skip_all)]
async fn latest_checkpoint(State(pool): State<PgPool>, caller: Caller) -> Result<ApiResponse<SignedHead>, ApiError> {
    caller.require(AUDIT_READ)?;
    let head = store::latest_head(&pool)
        .await?
        .ok_or_else(|| ApiError::NotFound("no tree head has been signed yet".to_owned()))?;
    Ok(ApiResponse::ok(head))
}

/// `GET /api/v1/audit/proof/{event_id}` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ProofQuery {
    /// The tree the proof is for: more than the event's leaf index, at most the folded tree's
    /// size. Default: the latest signed head's size when it covers the event, else the folded
    /// tree's.
    #[param(minimum = 1)]
    tree_size: Option<u64>,
}

/// An inclusion proof (RFC 9162 §2.1.3).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InclusionProof {
    /// The event.
    pub event_id: Uuid,
    /// Its leaf.
    pub leaf_index: u64,
    /// The tree the proof is for.
    pub tree_size: u64,
    /// The leaf hash as folded, hex: `SHA-256(0x00 || canonical)` unless the event was altered.
    pub leaf_hash: String,
    /// The event's canonical text as stored now.
    pub canonical: String,
    /// The sibling hashes from the leaf up, hex.
    pub audit_path: Vec<String>,
    /// The root of the tree of `tree_size` leaves, hex.
    pub root_hash: String,
    /// The signed head of exactly that size, if one was signed.
    pub head: Option<SignedHead>,
}

fn proof_error(field: &str, e: ProofError) -> ApiError {
    match e {
        ProofError::OutOfRange(message) => ApiError::field(field, message),
        ProofError::Db(e) => e.into(),
    }
}

/// An inclusion proof of one event in the tree of `tree_size` leaves, with the event's canonical
/// text, its leaf hash, the root, and the signed head of that size if there is one. Needs
/// `audit:read`.
#[utoipa::path(get, path = "/api/v1/audit/proof/{event_id}", tag = "audit", security(("bearer" = [])),
    params(("event_id" = Uuid, Path, description = "the event"), ProofQuery),
    responses((status = 200, description = "the proof", body = Envelope<InclusionProof>),
              (status = 400, description = "tree_size is not more than the leaf index, or more than the folded tree"),
              (status = 403, description = "lacks audit:read"),
              (status = 404, description = "no such event, or not folded into the tree yet")))]
#[tracing::instrument(skip_all, fields(event = %event_id))]
async fn inclusion_proof(
    State(pool): State<PgPool>,
    caller: Caller,
    ApiPath(event_id): ApiPath<Uuid>,
    query: Result<ApiQuery<ProofQuery>, ApiError>,
) -> Result<ApiResponse<InclusionProof>, ApiError> {
    caller.require(AUDIT_READ)?;
    let ApiQuery(query) = query?;
    let (leaf_index, leaf_hash) = store::leaf_of(&pool, event_id).await?.ok_or_else(|| {
        ApiError::NotFound(format!("event {event_id} is not in the audit tree (unknown, or not folded yet)"))
    })?;
    let folded = store::tree_size(&pool).await?;
    let tree_size = match query.tree_size {
        Some(size) => size,
        None => match store::latest_head(&pool).await? {
            Some(head) if head.tree_size > leaf_index => head.tree_size,
            _ => folded,
        },
    };
    if tree_size <= leaf_index {
        return Err(ApiError::field("tree_size", format!("must be more than the event's leaf index {leaf_index}")));
    }
    if tree_size > folded {
        return Err(ApiError::field("tree_size", format!("must be at most the folded tree's size {folded}")));
    }
    let audit_path =
        store::inclusion_proof(&pool, leaf_index, tree_size).await.map_err(|e| proof_error("tree_size", e))?;
    let root = store::root_at(&pool, tree_size).await.map_err(|e| proof_error("tree_size", e))?;
    let head = store::head_at(&pool, tree_size).await?;
    let canonical = events::canonical(&pool, event_id).await?.unwrap_or_default();
    Ok(ApiResponse::ok(InclusionProof {
        event_id,
        leaf_index,
        tree_size,
        leaf_hash: to_hex(&leaf_hash),
        canonical,
        audit_path: audit_path.iter().map(|h| to_hex(h)).collect(),
        root_hash: to_hex(&root),
        head,
    }))
}

/// `GET /api/v1/audit/consistency` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ConsistencyQuery {
    /// The older tree's size (at least 1).
    #[param(minimum = 1)]
    from: u64,
    /// The newer tree's size (at least `from`, at most the folded tree's).
    #[param(minimum = 1)]
    to: u64,
}

/// A consistency proof (RFC 9162 §2.1.4).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConsistencyProof {
    /// The older tree's size.
    pub from: u64,
    /// The newer tree's size.
    pub to: u64,
    /// The proof's hashes, hex.
    pub proof: Vec<String>,
    /// The older tree's root, hex.
    pub from_root: String,
    /// The newer tree's root, hex.
    pub to_root: String,
    /// The signed head of size `from`, if one was signed.
    pub from_head: Option<SignedHead>,
    /// The signed head of size `to`, if one was signed.
    pub to_head: Option<SignedHead>,
}

/// A proof that the tree of `to` leaves extends the tree of `from` leaves (nothing before `from`
/// changed), with both roots and the signed heads of those sizes. Needs `audit:read`.
#[utoipa::path(get, path = "/api/v1/audit/consistency", tag = "audit", security(("bearer" = [])),
    params(ConsistencyQuery),
    responses((status = 200, description = "the proof", body = Envelope<ConsistencyProof>),
              (status = 400, description = "from is 0, from is more than to, or to is more than the folded tree"),
              (status = 403, description = "lacks audit:read")))]
#[tracing::instrument(skip_all)]
async fn consistency_proof(
    State(pool): State<PgPool>,
    caller: Caller,
    query: Result<ApiQuery<ConsistencyQuery>, ApiError>,
) -> Result<ApiResponse<ConsistencyProof>, ApiError> {
    caller.require(AUDIT_READ)?;
    let ApiQuery(ConsistencyQuery { from, to }) = query?;
    if from == 0 {
        return Err(ApiError::field("from", "must be at least 1"));
    }
    if from > to {
        return Err(ApiError::field("to", "must not be less than from"));
    }
    let folded = store::tree_size(&pool).await?;
    if to > folded {
        return Err(ApiError::field("to", format!("must be at most the folded tree's size {folded}")));
    }
    let proof = store::consistency_proof(&pool, from, to).await.map_err(|e| proof_error("to", e))?;
    let from_root = store::root_at(&pool, from).await.map_err(|e| proof_error("from", e))?;
    let to_root = store::root_at(&pool, to).await.map_err(|e| proof_error("to", e))?;
    let from_head = store::head_at(&pool, from).await?;
    let to_head = store::head_at(&pool, to).await?;
    Ok(ApiResponse::ok(ConsistencyProof {
        from,
        to,
        proof: proof.iter().map(|h| to_hex(h)).collect(),
        from_root: to_hex(&from_root),
        to_root: to_hex(&to_root),
        from_head,
        to_head,
    }))
}

/// `/.well-known/audit-keys.json`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditKeysDocument {
    /// Every audit key whose heads this deployment serves; the newest signs.
    pub keys: Vec<PublicAuditKey>,
}

/// The public audit keys that sign tree heads (Ed25519, hex), kept apart from the token keys.
/// Public, no envelope (like `/.well-known/jwks.json`).
#[utoipa::path(get, path = "/.well-known/audit-keys.json", tag = "audit",
    responses((status = 200, description = "the audit keys", body = AuditKeysDocument)))]
async fn audit_keys(State(keys): State<Arc<AuditKeys>>) -> Json<AuditKeysDocument> {
    Json(AuditKeysDocument { keys: keys.public_keys() })
}
