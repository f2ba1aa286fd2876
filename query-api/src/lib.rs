//! The read side: serves read-model tables built by the projectors. A read that carries a
//! consistency token (`X-Consistency-Token`) first waits, bounded, until the projection has
//! applied it, and says in `meta.consistent` whether it did.
//!
//! - [`users`]: the users read model, the caller's profile, the role catalogue.
//! - [`rooms`]: chat rooms, their members and their messages.
//! - [`files`]: uploaded files the caller may read, their metadata and their download.
//! - [`analytics`]: the daily figures and DAU/WAU/MAU.
//! - [`jobs`]: operators' view of the job queue and the schedules.
//! - [`admin`]: operators' view of projections and parked events.
//! - [`audit`]: auditors' view of the log: events, exports, proofs, signed heads, verify.
//! - [`consistency`]: the consistency-token wait.
//! - [`realtime`]: the WebSocket route, its hub and the ordered consumer that feeds it.

pub mod admin;
pub mod analytics;
pub mod audit;
pub mod consistency;
pub mod files;
pub mod jobs;
pub mod realtime;
pub mod rooms;
pub mod users;

use axum::extract::FromRef;
use cairn_platform::auth::AuthState;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

pub use consistency::Consistency;

/// Everything the query handlers share.
#[derive(Clone, FromRef)]
pub struct QueryState {
    /// Read-model database (a replica in large deployments).
    pub pool: PgPool,
    /// Token verification.
    pub auth: AuthState,
    /// Consistency-token waits.
    pub consistency: Consistency,
    /// The consumers this deployment runs, for the operators' view.
    pub consumers: admin::Consumers,
    /// Where uploaded files' bytes are read from.
    pub files: cairn_storage::FileStore,
    /// How downloads are answered (token and presigned URL lifetime, inline types).
    pub downloads: files::FileDownloads,
    /// Where time comes from: what "today" is, and a scheduled job whose time has come is shown as queued.
    pub clock: cairn_platform::clock::SharedClock,
    /// The audit keys whose heads this API serves and checks (public halves published).
    pub audit_keys: std::sync::Arc<cairn_platform::audit::AuditKeys>,
    /// The audit tree's settings (the log's origin).
    pub audit: cairn_platform::audit::AuditSettings,
    /// How the projection rebuilds this process starts run.
    pub rebuilds: admin::Rebuilds,
}

/// The query API's routes, documented.
pub fn router(state: QueryState) -> OpenApiRouter {
    users::routes()
        .merge(rooms::routes())
        .merge(files::routes())
        .merge(admin::routes())
        .merge(jobs::routes())
        .merge(analytics::routes())
        .merge(audit::routes())
        .with_state(state)
}
