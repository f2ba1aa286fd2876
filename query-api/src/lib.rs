//! The read side: serves read-model tables built by the projectors. A read that carries a
//! consistency token (`X-Consistency-Token`) first waits, bounded, until the projection has
//! applied it, and says in `meta.consistent` whether it did.
//!
//! - [`users`]: the users read model, the caller's profile, the role catalogue.
//! - [`consistency`]: the consistency-token wait.

pub mod consistency;
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
}

/// The query API's routes, documented.
pub fn router(state: QueryState) -> OpenApiRouter {
    users::routes().with_state(state)
}
