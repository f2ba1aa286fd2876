//! Operators' view of the consumers: each projection's checkpoint, lag and state, and the
//! events each consumer (projection or worker) parked.
//!
//! - [`status`]: the figures, shared by the HTTP routes and `cairn projections`.
//! - `routes`: `GET /api/v1/admin/projections`, `GET …/{name}/parked` and
//!   `POST …/{name}/rebuild`.

mod routes;
pub mod status;

pub use routes::{routes, Rebuilds};
pub use status::{Consumers, ParkedRow, ProjectionStatus, RebuildStatus, WorkerStatus};
