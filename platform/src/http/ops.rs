//! `/health`, `/ready` and `/metrics`, served by every process. `/metrics` is internal: with
//! `CAIRN_METRICS_LISTEN` it is served only on that address ([`metrics_router`]), and the main
//! listener answers 404 for it.
//!
//! Readiness means "can take requests": Postgres answers. NATS is not required for that: commands
//! append to Postgres and the relay publishes when NATS returns, so a process without NATS says
//! it is ready but degraded, and the gauges `cairn_ready` and `cairn_nats_connected` show both.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sqlx::PgPool;

use super::{ApiError, ApiResponse};

/// How long `/ready` waits for Postgres: a probe must answer quickly even when the database
/// (or the pool, every connection busy) does not.
const POSTGRES_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness depends on.
#[derive(Clone)]
pub struct OpsState {
    /// Postgres.
    pub pool: PgPool,
    /// NATS.
    pub nats: async_nats::Client,
}

/// The operational routes, as (method, path): [`probes_router`] and [`metrics_router`] together
/// serve exactly these.
pub const OPS_ROUTES: &[(&str, &str)] = &[("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")];

/// The operational routes, `/metrics` included.
pub fn ops_router(state: OpsState) -> Router {
    probes_router(state.clone()).merge(metrics_router(state))
}

/// `/health` and `/ready` alone (the main listener's, when `/metrics` has its own).
pub fn probes_router(state: OpsState) -> Router {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).with_state(state)
}

/// `/metrics` alone.
pub fn metrics_router(state: OpsState) -> Router {
    Router::new().route("/metrics", get(metrics_text)).with_state(state)
}

async fn health() -> ApiResponse<serde_json::Value> {
    ApiResponse::ok(json!({ "status": "ok" }))
}

/// 200 when Postgres answers within [`POSTGRES_PROBE_TIMEOUT`] (`degraded: true` when NATS is
/// not connected), 503 `SERVICE_UNAVAILABLE` when it does not.
async fn ready(State(state): State<OpsState>) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool);
    let postgres = matches!(tokio::time::timeout(POSTGRES_PROBE_TIMEOUT, probe).await, Ok(Ok(_)));
    let nats = nats_connected(&state.nats);
    metrics::gauge!("cairn_ready").set(if postgres { 1.0 } else { 0.0 });
    if !postgres {
        tracing::warn!(nats, "not ready: Postgres does not answer");
        return Err(ApiError::ServiceUnavailable(format!("not ready: postgres=false nats={nats}")));
    }
    let status = if nats { "ready" } else { "degraded" };
    Ok(ApiResponse::ok(json!({ "status": status, "postgres": true, "nats": nats, "degraded": !nats })))
}

/// Whether the NATS client is connected now, kept in the `cairn_nats_connected` gauge too.
fn nats_connected(client: &async_nats::Client) -> bool {
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    metrics::gauge!("cairn_nats_connected").set(if connected { 1.0 } else { 0.0 });
    connected
}

async fn metrics_text(State(state): State<OpsState>) -> impl IntoResponse {
    // Costs nothing and keeps the gauge current for scrapers that never call /ready.
    nats_connected(&state.nats);
    let handle = crate::telemetry::metrics_handle();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
}
