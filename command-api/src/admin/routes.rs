//! `POST /api/v1/admin/projections/{name}/parked/{event_id}/retry` and `…/skip`.

use axum::extract::State;
use axum::http::StatusCode;
use cairn_domain::{parked_event_id, ParkedEvent, ParkedEventCommand};
use cairn_platform::auth::{Caller, SessionVersions};
use cairn_platform::http::{ApiError, ApiJson, ApiPath, ApiResponse, RequestContext};
use cairn_relay::RelayWakeup;
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::answers::ParkedDecisionData;
use crate::executor::{Executor, Refusal};
use crate::CommandState;
use cairn_platform::http::Envelope;

/// Operators' decisions about parked events.
#[derive(Clone)]
pub struct ParkedEvents {
    executor: Executor<ParkedEvent>,
}

impl ParkedEvents {
    /// Decisions recorded through `pool`.
    #[must_use]
    pub fn new(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup) -> Self {
        Self { executor: Executor::new(pool, sessions, wake) }
    }

    async fn decide(
        &self,
        consumer: &str,
        event_id: Uuid,
        command: ParkedEventCommand,
        ctx: &RequestContext,
        caller: &Caller,
    ) -> Result<ApiResponse<serde_json::Value>, ApiError> {
        caller.require("projections:manage")?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM parked_events WHERE consumer = $1 AND event_id = $2")
                .bind(consumer)
                .bind(event_id)
                .fetch_optional(self.executor.pool())
                .await?;
        match status.as_deref() {
            None => return Err(ApiError::NotFound(format!("{consumer} has not parked event {event_id}"))),
            Some("parked") => {}
            Some(other) => {
                return Err(ApiError::Conflict(format!("event {event_id} is no longer parked by {consumer}: {other}")))
            }
        }
        let id = parked_event_id(consumer, event_id);
        let token = self.executor.execute(&id, command, ctx, Some(caller.id())).await?;
        Ok(ApiResponse::with_status(
            StatusCode::ACCEPTED,
            json!({ "consumer": consumer, "event_id": event_id, "accepted": true }),
        )
        .consistency(token))
    }
}

impl Refusal for cairn_domain::ParkedEventError {
    fn to_api(&self) -> ApiError {
        use cairn_domain::ParkedEventError as E;
        match self {
            E::AlreadySkipped => ApiError::Conflict(self.to_string()),
            E::ReasonTooLong => ApiError::field("reason", self.to_string()),
        }
    }
}

/// The operator routes of the command side.
pub fn routes() -> OpenApiRouter<CommandState> {
    OpenApiRouter::new().routes(routes!(retry_parked)).routes(routes!(skip_parked))
}

/// `POST …/skip` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipBody {
    /// Why the event is left unapplied (kept in the log).
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// Asks the consumer to apply a parked event again (ParkedEventRetryRequested). It does so when
/// it reaches the request in its stream: the parked list read with the returned consistency token
/// shows whether it applied (`resolved`) or failed again (still `parked`, with the new error).
#[utoipa::path(post, path = "/api/v1/admin/projections/{name}/parked/{event_id}/retry", tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "projection or worker", pattern = r"^[a-z0-9_-]{1,64}$"), ("event_id" = Uuid, Path, description = "the parked event")),
    responses((status = 202, description = "retry requested", body = Envelope<ParkedDecisionData>), (status = 403, description = "lacks projections:manage"),
              (status = 404, description = "not parked by this consumer"), (status = 409, description = "resolved or skipped already")))]
async fn retry_parked(
    State(parked): State<ParkedEvents>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath((name, event_id)): ApiPath<(String, Uuid)>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let command = ParkedEventCommand::Retry { consumer: name.clone(), event_id };
    parked.decide(&name, event_id, command, &ctx, &caller).await
}

/// Leaves a parked event unapplied for good (ParkedEventSkipped), with an optional reason.
#[utoipa::path(post, path = "/api/v1/admin/projections/{name}/parked/{event_id}/skip", tag = "admin",
    security(("bearer" = [])), request_body(content = Option<SkipBody>),
    params(("name" = String, Path, description = "projection or worker", pattern = r"^[a-z0-9_-]{1,64}$"), ("event_id" = Uuid, Path, description = "the parked event")),
    responses((status = 202, description = "skipped", body = Envelope<ParkedDecisionData>), (status = 403, description = "lacks projections:manage"),
              (status = 404, description = "not parked by this consumer"), (status = 409, description = "resolved or skipped already")))]
async fn skip_parked(
    State(parked): State<ParkedEvents>,
    caller: Caller,
    ctx: RequestContext,
    ApiPath((name, event_id)): ApiPath<(String, Uuid)>,
    body: Option<ApiJson<SkipBody>>,
) -> Result<ApiResponse<serde_json::Value>, ApiError> {
    let reason = body.and_then(|ApiJson(b)| b.reason);
    let command = ParkedEventCommand::Skip { consumer: name.clone(), event_id, reason };
    parked.decide(&name, event_id, command, &ctx, &caller).await
}
