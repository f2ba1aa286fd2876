//! The audit read routes.

use utoipa_axum::router::OpenApiRouter;

use crate::QueryState;

/// The audit read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
}
