//! `GET /api/v1/audit/verify`: recomputes the tree from the events table and compares it with
//! the stored tree and every signed head (see [`cairn_platform::audit::verify`]).
//!
//! One verification runs at a time per process: it reads the whole log, and a second request
//! while one runs gets 429 `RATE_LIMITED` with `Retry-After` instead of doubling the load. A
//! client that disconnects stops it (the handler is dropped with its connection). The request
//! is bound by `CAIRN_REQUEST_TIMEOUT_SECS` like every other; `cairn audit verify` has no limit.

use std::sync::Arc;

use axum::extract::State;
use axum::Extension;
use cairn_platform::audit::verify::{self, VerifyReport};
use cairn_platform::audit::AuditKeys;
use cairn_platform::auth::Caller;
use cairn_platform::http::{ApiError, ApiResponse, Envelope};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::QueryState;

/// Seconds a client is asked to wait while another verification runs.
const RETRY_AFTER_SECS: u64 = 5;

/// The verify route.
pub fn routes() -> OpenApiRouter<QueryState> {
    OpenApiRouter::new().routes(routes!(verify_log)).layer(Extension(VerifyGate(Arc::new(Semaphore::new(1)))))
}

/// At most one verification at a time in this process.
#[derive(Clone)]
struct VerifyGate(Arc<Semaphore>);

/// Recomputes the tree from the events table and compares it with the stored leaves and every
/// signed head: `intact`, or the first leaf index where the log differs and how (`altered`,
/// `missing`, `inserted`, `reordered`), the first signed head whose root no longer matches, and
/// any head whose signature fails. Reads the whole log (at constant memory): one at a time per
/// process. Needs `audit:read`.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit", security(("bearer" = [])),
    responses((status = 200, description = "the report (intact or not)", body = Envelope<VerifyReport>),
              (status = 401, description = "no or a bad token"),
              (status = 403, description = "lacks audit:read"),
              (status = 429, description = "a verification is already running in this process; Retry-After")))]
async fn verify_log(
    State(pool): State<PgPool>,
    State(keys): State<Arc<AuditKeys>>,
    Extension(gate): Extension<VerifyGate>,
    caller: Caller,
) -> Result<ApiResponse<VerifyReport>, ApiError> {
    caller.require("audit:read")?;
    let Ok(_permit) = gate.0.try_acquire() else {
        return Err(ApiError::RateLimited { retry_after_s: RETRY_AFTER_SECS });
    };
    let started = std::time::Instant::now();
    let report = verify::verify(&pool, &keys).await?;
    metrics::histogram!("cairn_audit_verify_seconds").record(started.elapsed().as_secs_f64());
    if !report.intact {
        tracing::warn!(
            difference = ?report.first_difference,
            head = ?report.first_head_mismatch,
            bad_signatures = report.bad_signature_count,
            "audit verification found the log changed"
        );
    }
    Ok(ApiResponse::ok(report))
}
