//! `/health`, `/ready` and `/metrics`, served by every process.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sqlx::PgPool;

use super::{ApiError, ApiResponse};

/// What readiness depends on.
#[derive(Clone)]
pub struct OpsState {
    /// Postgres.
    pub pool: PgPool,
    /// NATS.
    pub nats: async_nats::Client,
}

/// The operational routes.
pub fn ops_router(state: OpsState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn health() -> ApiResponse<serde_json::Value> {
    ApiResponse::ok(json!({ "status": "ok" }))
}

async fn ready(State(state): State<OpsState>) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let postgres = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool).await.is_ok();
    let nats = state.nats.connection_state() == async_nats::connection::State::Connected;
    if postgres && nats {
        Ok(ApiResponse::ok(json!({ "status": "ready", "postgres": true, "nats": true })))
    } else {
        Err(ApiError::ServiceUnavailable(format!("not ready: postgres={postgres} nats={nats}")))
    }
}

async fn metrics_text() -> impl IntoResponse {
    let handle = crate::telemetry::metrics_handle();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
}
