//! The auditors' interface: the immutable log with its metadata, exports that end with the signed
//! head covering them, proofs (inclusion, consistency), the published audit keys, and `verify`.
//!
//! - [`routes`]: `/api/v1/audit/events`, `/audit/checkpoints/latest`, `/audit/proof/{event_id}`,
//!   `/audit/consistency`, `/.well-known/audit-keys.json`.
//! - [`export`]: the streamed export, `/api/v1/audit/events/export`.
//! - [`events`]: the log as auditors read it (filters, pages, the time-filter semantics).
//! - [`verify`]: recomputing the tree, `/api/v1/audit/verify`.

pub mod events;
pub mod export;
pub mod routes;
pub mod verify;

use utoipa_axum::router::OpenApiRouter;

use crate::QueryState;

/// Every audit route.
pub fn routes() -> OpenApiRouter<QueryState> {
    routes::routes().merge(verify::routes())
}
