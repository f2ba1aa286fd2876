//! `GET /api/v1/audit/verify`.

use utoipa_axum::router::OpenApiRouter;

use crate::QueryState;

/// The verify route.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new()
}
