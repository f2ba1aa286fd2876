//! Realtime sockets (`GET /api/v1/ws`): every process fans out from one ordered JetStream
//! consumer to its own sockets; typing and presence travel on plain NATS subjects.
//!
//! - [`hub`]: the fan-out, the per-socket queues and the decisions to close a socket.
//! - [`feed`]: the process's one ordered consumer of the log, feeding the hub.
//! - [`presence`]: typing and presence notes over NATS, heartbeats and the sweeper.
//! - [`socket`]: one socket's task (authentication, frames, join with replay, send).
//! - [`protocol`]: the frames.
//!
//! Metrics: `cairn_ws_sockets` (open), `cairn_ws_frames_in_total`, `cairn_ws_frames_out_total`,
//! `cairn_ws_messages_delivered_total`, `cairn_ws_delivery_lag_seconds` (event recorded → queued
//! to the sockets), `cairn_ws_dropped_total{reason}`, `cairn_ws_consumer_restarts_total`.

pub mod feed;
pub mod hub;
pub mod presence;
pub mod protocol;
pub mod socket;

use std::sync::Arc;

use async_nats::jetstream;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::Response;
use cairn_platform::auth::AuthState;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_platform::nats::Namespace;
use cairn_platform::rooms::MessagePort;
use cairn_platform::settings::RateLimit;
use cairn_platform::Settings;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::consistency::ReadModel;

/// The read models a join reads (membership, messages).
const ROOMS: &[ReadModel] = &[ReadModel::Rooms];
use crate::Consistency;
use hub::{Hub, HubLimits};
use presence::TypingPublisher;

/// The largest frame a client may send (and the largest message): 16 KiB. Larger ones close the
/// socket with 1009.
pub const MAX_FRAME: usize = 16 * 1024;

/// What the WebSocket layer reads at most before refusing on its own. Above [`MAX_FRAME`] so a
/// frame somewhat too large is read whole and refused by the socket with its close frame, rather
/// than cut off mid-frame, which leaves unread bytes and resets the connection before the client
/// reads the close.
const READ_LIMIT: usize = 4 * MAX_FRAME;

/// Read buffer per socket: small, so an idle socket costs little.
const READ_BUFFER: usize = 4 * 1024;

/// What the sockets of a process share. Cheap to clone.
#[derive(Clone)]
pub struct Realtime {
    hub: Arc<Hub>,
    pool: PgPool,
    auth: AuthState,
    consistency: Consistency,
    port: Option<Arc<dyn MessagePort>>,
    typing: TypingPublisher,
    frame_rate: Option<RateLimit>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realtime").field("hub", &self.hub).finish_non_exhaustive()
    }
}

/// What [`Realtime::start`] needs.
pub struct RealtimeDeps {
    /// The read-model database.
    pub pool: PgPool,
    /// Token verification and the session map.
    pub auth: AuthState,
    /// Waits for the rooms projection.
    pub consistency: Consistency,
    /// The command path of a socket's `send`; `None` where this process takes no messages.
    pub port: Option<Arc<dyn MessagePort>>,
    /// NATS.
    pub client: async_nats::Client,
    /// The deployment's namespace.
    pub ns: Namespace,
}

impl Realtime {
    /// Starts the hub, its consumer of the log, typing and presence, in `tasks`, until `shutdown`
    /// (which also closes every socket with 1001).
    ///
    /// # Errors
    /// When NATS or JetStream cannot be reached.
    pub async fn start(
        deps: RealtimeDeps,
        settings: &Settings,
        tasks: &mut JoinSet<()>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let limits = HubLimits {
            queue: settings.ws_queue,
            max_rooms: settings.ws_max_rooms,
            max_sockets: settings.ws_max_sockets,
            heartbeat: settings.ws_heartbeat,
        };
        let (hub, announcements) = Hub::new(limits, deps.auth.sessions.clone(), settings.clock.clone());
        let js = jetstream::new(deps.client.clone());
        let feed = feed::start(Arc::clone(&hub), js, deps.ns.clone(), shutdown.clone()).await;
        let token = shutdown.clone();
        tasks.spawn(async move {
            token.cancelled().await;
            let _ = feed.await;
        });
        let typing =
            presence::start(Arc::clone(&hub), deps.client, &deps.ns, announcements, tasks, shutdown.clone()).await?;
        Ok(Self {
            hub,
            pool: deps.pool,
            auth: deps.auth,
            consistency: deps.consistency,
            port: deps.port,
            typing,
            frame_rate: settings.ws_frame_rate,
            shutdown,
        })
    }

    /// The hub.
    #[must_use]
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Waits (bounded) until the rooms projection has applied `head`.
    async fn rooms_current(&self, head: ConsistencyToken) -> bool {
        self.consistency.wait_for(head, ROOMS).await
    }
}

/// The socket route.
pub fn router(realtime: Realtime) -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(connect)).with_state(realtime)
}

/// Opens a realtime socket (WebSocket, JSON text frames). The first frame must be
/// `{"type":"auth","token":"<access token>"}` within 5 s; the protocol is described in the API
/// guide (frames `join`, `leave`, `typing`, `stop_typing`, `send`, `ping`; close codes 4401,
/// 4403, 4400, 4429, 4408, 1001, 1003, 1007, 1009).
#[utoipa::path(get, path = "/api/v1/ws", tag = "realtime",
    responses((status = 101, description = "switched to the WebSocket protocol"),
              (status = 400, description = "MALFORMED_REQUEST: not a WebSocket upgrade"),
              (status = 503, description = "SERVICE_UNAVAILABLE: this process has as many sockets open as it takes")))]
async fn connect(
    State(realtime): State<Realtime>,
    ctx: RequestContext,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| ApiError::Malformed(format!("this route takes a WebSocket upgrade: {e}")))?;
    let open = realtime
        .hub
        .try_open()
        .ok_or_else(|| ApiError::ServiceUnavailable("too many sockets open on this server; try again".to_owned()))?;
    let upgrade = upgrade.max_message_size(READ_LIMIT).max_frame_size(READ_LIMIT).read_buffer_size(READ_BUFFER);
    Ok(upgrade.write_buffer_size(0).on_upgrade(move |socket| socket::serve(socket, realtime, ctx, open)))
}
