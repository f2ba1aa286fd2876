//! One socket's task: authentication, the client's frames, and the one writer of the socket
//! (its bounded queue from the hub, its own answers, heartbeats and the close).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use cairn_platform::auth::Caller;
use cairn_platform::checkpoint;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_platform::rooms::{self, MessageView, SendMessage, MESSAGE_COLUMNS};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sqlx::Row;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::hub::{CloseReason, FrameKind, OpenSocket, SocketAuth, SocketHandle, SubscribeError};
use super::protocol::{self, close, ClientFrame, TypingKind};
use super::{Realtime, MAX_FRAME};

/// The first frame must be `auth`, within this.
pub const AUTH_WITHIN: Duration = Duration::from_secs(5);

/// Rows per page of a join's replay.
const REPLAY_PAGE: i64 = 500;

/// How long a close (and the `error` frame before it) may take to write.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// What a read from the socket gave.
enum Inbound {
    Text(Utf8Bytes),
    /// A ping or pong: the peer is alive.
    Alive,
    /// The peer closed, or the connection ended.
    Ended,
    /// A frame that closes the socket.
    Refused(CloseReason, &'static str),
}

fn too_big() -> Inbound {
    Inbound::Refused(CloseReason::with_error(close::TOO_BIG, "PAYLOAD_TOO_LARGE", "frame over 16 KiB"), "too_big")
}

fn classify(read: Option<Result<Message, axum::Error>>) -> Inbound {
    match read {
        Some(Ok(Message::Text(text))) if text.len() > MAX_FRAME => too_big(),
        Some(Ok(Message::Text(text))) => Inbound::Text(text),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Inbound::Alive,
        Some(Ok(Message::Binary(_))) => Inbound::Refused(
            CloseReason::with_error(close::UNSUPPORTED, "MALFORMED_REQUEST", "binary frames are not accepted"),
            "binary",
        ),
        Some(Ok(Message::Close(_))) | None => Inbound::Ended,
        Some(Err(e)) => match e.into_inner().downcast::<tungstenite::Error>().map(|e| *e) {
            Ok(tungstenite::Error::Utf8(_)) => Inbound::Refused(
                CloseReason::with_error(close::INVALID_DATA, "MALFORMED_REQUEST", "text is not UTF-8"),
                "utf8",
            ),
            Ok(tungstenite::Error::Capacity(_)) => too_big(),
            _ => Inbound::Ended,
        },
    }
}

fn garbage() -> (CloseReason, &'static str) {
    (CloseReason::with_error(close::GARBAGE, "MALFORMED_REQUEST", "not a frame of the protocol"), "garbage")
}

/// Runs a freshly upgraded socket until it ends.
pub async fn serve(socket: WebSocket, rt: Realtime, ctx: RequestContext, open: OpenSocket) {
    let mut socket = socket;
    let Some((caller, token)) = authenticate(&mut socket, &rt).await else {
        drop(open);
        return;
    };
    let (queue_tx, queue) = mpsc::channel(rt.hub.limits().queue);
    let handle = SocketHandle::new(rt.hub.next_id(), caller.id(), auth_of(&caller), queue_tx);
    rt.hub.register(&handle);
    let limiter = rt.frame_rate.and_then(|rate| {
        let count = std::num::NonZeroU32::new(rate.count)?;
        Some(RateLimiter::direct(Quota::with_period(rate.period / rate.count)?.allow_burst(count)))
    });
    let mut session = Session { rt, socket, handle, queue, caller, token, ctx, limiter, last_seen: Instant::now() };
    if session.write(protocol::ready(session.caller.id())).await {
        session.run().await;
    }
    session.rt.hub.unregister(session.handle.id);
    drop(open);
}

fn auth_of(caller: &Caller) -> SocketAuth {
    SocketAuth { sv: caller.claims.sv, sid: caller.claims.sid, exp: caller.claims.exp }
}

/// Waits for the `auth` frame; closes the socket and returns `None` on anything else.
async fn authenticate(socket: &mut WebSocket, rt: &Realtime) -> Option<(Caller, String)> {
    let deadline = tokio::time::Instant::now() + AUTH_WITHIN;
    loop {
        let read = tokio::select! {
            read = socket.recv() => read,
            () = tokio::time::sleep_until(deadline) => {
                let reason = CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "authentication timed out");
                close_socket(socket, &reason, "auth").await;
                return None;
            }
            () = rt.shutdown.cancelled() => {
                close_socket(socket, &going_away(), "shutdown").await;
                return None;
            }
        };
        let text = match classify(read) {
            Inbound::Text(text) => text,
            Inbound::Alive => continue,
            Inbound::Ended => return None,
            Inbound::Refused(reason, metric) => {
                close_socket(socket, &reason, metric).await;
                return None;
            }
        };
        metrics::counter!("cairn_ws_frames_in_total").increment(1);
        let reason = match ClientFrame::parse(&text) {
            Some(ClientFrame::Auth { token }) => match rt.auth.caller(&token) {
                Ok(caller) => return Some((caller, token)),
                Err(e) => CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", &e.to_string()),
            },
            Some(_) => CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "send an auth frame first"),
            None => garbage().0,
        };
        let metric = if reason.code == close::GARBAGE { "garbage" } else { "auth" };
        close_socket(socket, &reason, metric).await;
        return None;
    }
}

fn going_away() -> CloseReason {
    CloseReason { code: close::GOING_AWAY, reason: "server shutting down".to_owned(), error: None }
}

/// Sends the `error` frame a close has, then the close frame, each bounded in time.
async fn close_socket(socket: &mut WebSocket, reason: &CloseReason, metric: &'static str) {
    if metric != "shutdown" && metric != "peer" {
        metrics::counter!("cairn_ws_dropped_total", "reason" => metric).increment(1);
    }
    write_close(socket, reason).await;
}

async fn write_close(socket: &mut WebSocket, reason: &CloseReason) {
    let _ = tokio::time::timeout(CLOSE_WITHIN, async {
        if let Some(code) = reason.error {
            if socket.send(Message::Text(protocol::error(code, &reason.reason, None, None))).await.is_err() {
                return;
            }
        }
        let frame = CloseFrame { code: reason.code, reason: Utf8Bytes::from(reason.reason.clone()) };
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // The close handshake: the client's close (or its end) comes back; what it sent
        // meanwhile is read and dropped, so the connection is not reset under its close frame.
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

struct Session {
    rt: Realtime,
    socket: WebSocket,
    handle: Arc<SocketHandle>,
    queue: mpsc::Receiver<Utf8Bytes>,
    caller: Caller,
    token: String,
    ctx: RequestContext,
    limiter: Option<DefaultDirectRateLimiter>,
    last_seen: Instant,
}

impl Session {
    /// Writes one frame; false when the socket is closing or the write failed (a close pending
    /// interrupts a write stuck on a client that does not read).
    async fn write(&mut self, text: Utf8Bytes) -> bool {
        let written = tokio::select! {
            sent = self.socket.send(Message::Text(text)) => sent.is_ok(),
            () = self.handle.woken() => false,
        };
        if written {
            metrics::counter!("cairn_ws_frames_out_total").increment(1);
        }
        written
    }

    async fn run(&mut self) {
        let heartbeat = self.rt.hub.limits().heartbeat;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.rt.shutdown.clone();
        loop {
            if let Some(reason) = self.handle.closing() {
                // The socket's own writer: the close goes out even when its queue is full.
                let reason = reason.clone();
                write_close(&mut self.socket, &reason).await;
                return;
            }
            tokio::select! {
                () = self.handle.woken() => {}
                () = shutdown.cancelled() => self.handle.close(going_away(), "shutdown"),
                out = self.queue.recv() => match out {
                    Some(text) => { self.write(text).await; }
                    None => return,
                },
                read = self.socket.recv() => match classify(read) {
                    Inbound::Text(text) => {
                        self.last_seen = Instant::now();
                        self.on_text(&text).await;
                    }
                    Inbound::Alive => self.last_seen = Instant::now(),
                    // A connection dropped without a close frame ends here too: the hub forgets
                    // the socket at once, so presence goes offline at once.
                    Inbound::Ended => return,
                    Inbound::Refused(reason, metric) => self.handle.close(reason, metric),
                },
                _ = ping.tick() => {
                    if self.last_seen.elapsed() > heartbeat * 3 {
                        self.handle.close(
                            CloseReason::with_error(close::TOO_SLOW, "TIMEOUT", "no heartbeat"),
                            "heartbeat",
                        );
                    } else {
                        let sent = tokio::select! {
                            sent = self.socket.send(Message::Ping(Default::default())) => sent.is_ok(),
                            () = self.handle.woken() => true,
                        };
                        if !sent {
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn on_text(&mut self, text: &str) {
        metrics::counter!("cairn_ws_frames_in_total").increment(1);
        if self.limiter.as_ref().is_some_and(|l| l.check().is_err()) {
            let reason = CloseReason::with_error(close::RATE, "RATE_LIMITED", "too many frames");
            self.handle.close(reason, "rate");
            return;
        }
        let Some(frame) = ClientFrame::parse(text) else {
            let (reason, metric) = garbage();
            self.handle.close(reason, metric);
            return;
        };
        match frame {
            ClientFrame::Ping => {
                self.write(protocol::pong()).await;
            }
            ClientFrame::Auth { token } => self.reauthenticate(token).await,
            ClientFrame::Join { room_id, after } => {
                let after = match after.as_deref().map(str::parse::<ConsistencyToken>).transpose() {
                    Ok(after) => after,
                    Err(_) => {
                        let error = ApiError::field("after", "must be a position '<transaction>.<position>'");
                        self.write(protocol::api_error(&error, Some(room_id), None)).await;
                        return;
                    }
                };
                self.join(room_id, after).await;
            }
            ClientFrame::Leave { room_id } => {
                self.rt.hub.unsubscribe(room_id, self.handle.id);
                self.write(protocol::left(room_id)).await;
            }
            ClientFrame::Typing { room_id } => self.typing(room_id, TypingKind::Typing).await,
            ClientFrame::StopTyping { room_id } => self.typing(room_id, TypingKind::StopTyping).await,
            ClientFrame::Send { room_id, body, client_id, attachments } => {
                self.send(SendMessage { room_id, body, client_id: Some(client_id), attachments }).await;
            }
        }
    }

    async fn reauthenticate(&mut self, token: String) {
        match self.rt.auth.caller(&token) {
            Ok(caller) if caller.id() == self.caller.id() => {
                self.handle.set_auth(auth_of(&caller));
                self.caller = caller;
                self.token = token;
                self.write(protocol::ready(self.caller.id())).await;
            }
            Ok(_) => self.handle.close(
                CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "a token of another user"),
                "auth",
            ),
            Err(e) => self
                .handle
                .close(CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", &e.to_string()), "auth"),
        }
    }

    async fn typing(&mut self, room: Uuid, kind: TypingKind) {
        if self.rt.hub.is_subscribed(room, self.handle.id) {
            self.rt.typing.publish(room, self.caller.id(), kind, self.handle.id).await;
        } else {
            self.write(protocol::error("FORBIDDEN", "join the room first", Some(room), None)).await;
        }
    }

    /// A `send`: the command path HTTP takes, with the caller checked again first (session still
    /// current, permissions still granted).
    async fn send(&mut self, message: SendMessage) {
        let (room, client_id) = (message.room_id, message.client_id.clone().unwrap_or_default());
        let caller = match self.rt.auth.caller(&self.token) {
            Ok(caller) => caller,
            Err(e) => {
                let reason = CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", &e.to_string());
                self.handle.close(reason, "session");
                return;
            }
        };
        let Some(port) = self.rt.port.clone() else {
            let error = ApiError::ServiceUnavailable("this server does not take messages".to_owned());
            self.write(protocol::api_error(&error, Some(room), Some(&client_id))).await;
            return;
        };
        let ctx = RequestContext { request_id: Uuid::new_v4().to_string(), ..self.ctx.clone() };
        let answer = match port.send(&caller, message, &ctx).await {
            Ok(sent) => protocol::ack(&client_id, &sent.message),
            Err(e) => protocol::api_error(&e, Some(room), Some(&client_id)),
        };
        self.write(answer).await;
    }

    /// A join, without a gap or a duplicate between the replay and the live frames.
    async fn join(&mut self, room: Uuid, after: Option<ConsistencyToken>) {
        let fanned_out = match self.rt.hub.subscribe(room, &self.handle) {
            Ok(position) => position,
            Err(SubscribeError::TooManyRooms) => {
                let max = self.rt.hub.limits().max_rooms;
                let error = ApiError::field("room_id", format!("a socket joins at most {max} rooms"));
                self.write(protocol::api_error(&error, Some(room), None)).await;
                return;
            }
            Err(SubscribeError::Gone) => return,
        };
        match self.replay(room, after, fanned_out).await {
            Ok(Some(covered)) => self.go_live(room, after, &covered).await,
            Ok(None) => {}
            Err(e) => {
                self.rt.hub.unsubscribe(room, self.handle.id);
                self.write(protocol::api_error(&e, Some(room), None)).await;
            }
        }
    }

    /// Checks the caller may have the room's frames, sends `joined` and, with `after`, what came
    /// since. Returns, for the messages the replay showed changed after the position the hub had
    /// fanned out when the join subscribed, the last change shown (held frames at or below it are
    /// already shown); `None` when the socket is closing.
    async fn replay(
        &mut self,
        room: Uuid,
        after: Option<ConsistencyToken>,
        fanned_out: ConsistencyToken,
    ) -> Result<Option<HashMap<Uuid, ConsistencyToken>>, ApiError> {
        let pool = self.rt.pool.clone();
        // Everything fanned out before the subscription is at or below the head: once the rooms
        // projection has it, membership and the messages table cover it.
        let head = checkpoint::log_head(&pool).await?;
        if !self.rt.rooms_current(head).await {
            return Err(ApiError::ServiceUnavailable("the rooms read model is behind; try again".to_owned()));
        }
        let row: Option<(String, bool)> = sqlx::query_as(
            "SELECT r.visibility, EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = r.id AND m.user_id = $2) \
             FROM rooms r WHERE r.id = $1",
        )
        .bind(room)
        .bind(self.caller.id())
        .fetch_optional(&pool)
        .await?;
        match row {
            None => return Err(ApiError::NotFound("room not found".to_owned())),
            Some((visibility, false)) if visibility == "private" => {
                return Err(ApiError::NotFound("room not found".to_owned()))
            }
            Some((_, false)) => return Err(ApiError::Forbidden("join the room first".to_owned())),
            Some(_) => {}
        }
        // Online there now: whoever any process announced, and the joiner.
        let mut presence = self.rt.hub.presence(room);
        if !presence.contains(&self.caller.id()) {
            presence.push(self.caller.id());
        }
        if !self.write(protocol::joined(room, &presence)).await {
            return Ok(None);
        }
        let mut covered = HashMap::new();
        let Some(after) = after else { return Ok(Some(covered)) };
        let (after_tx, after_pos) = rooms::columns(after);

        // Older messages changed since `after`, as edit and delete frames, in the order of change.
        let mut cursor = (after_tx, after_pos);
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS}, changed_tx, changed_pos FROM messages \
                 WHERE room_id = $1 AND (tx, pos) <= ($2, $3) AND (changed_tx, changed_pos) > ($4, $5) \
                 ORDER BY changed_tx, changed_pos LIMIT {REPLAY_PAGE}"
            ))
            .bind(room)
            .bind(after_tx)
            .bind(after_pos)
            .bind(cursor.0)
            .bind(cursor.1)
            .fetch_all(&pool)
            .await?;
            for row in &rows {
                let view = MessageView::from_row(row)?;
                let changed = (row.try_get::<i64, _>("changed_tx")?, row.try_get::<i64, _>("changed_pos")?);
                cursor = changed;
                let changed = rooms::position(changed.0, changed.1);
                if changed > fanned_out {
                    covered.insert(view.id, changed);
                }
                let at = changed.to_string();
                let frame = match view.deleted_at {
                    Some(deleted_at) => protocol::message_deleted(view.id, room, deleted_at, &at),
                    None => protocol::message_edited(
                        view.id,
                        room,
                        view.body.as_deref(),
                        view.edited_at.unwrap_or(view.created_at),
                        &at,
                    ),
                };
                if !self.write(frame).await {
                    return Ok(None);
                }
            }
            if rows.len() < REPLAY_PAGE as usize {
                break;
            }
        }

        // Newer messages, oldest first, as they are now.
        let mut cursor = (after_tx, after_pos);
        loop {
            let rows = sqlx::query(&format!(
                "SELECT {MESSAGE_COLUMNS}, changed_tx, changed_pos FROM messages \
                 WHERE room_id = $1 AND (tx, pos) > ($2, $3) ORDER BY tx, pos LIMIT {REPLAY_PAGE}"
            ))
            .bind(room)
            .bind(cursor.0)
            .bind(cursor.1)
            .fetch_all(&pool)
            .await?;
            for row in &rows {
                let view = MessageView::from_row(row)?;
                cursor = (row.try_get("tx")?, row.try_get("pos")?);
                let changed = rooms::position(row.try_get("changed_tx")?, row.try_get("changed_pos")?);
                if changed > fanned_out {
                    covered.insert(view.id, changed);
                }
                if !self.write(protocol::message(&view)).await {
                    return Ok(None);
                }
            }
            if rows.len() < REPLAY_PAGE as usize {
                break;
            }
        }
        Ok(Some(covered))
    }

    /// Switches the subscription to live and sends the frames held meanwhile that the client has
    /// not seen: not at or below `after`, not already shown by the replay.
    async fn go_live(
        &mut self,
        room: Uuid,
        after: Option<ConsistencyToken>,
        covered: &HashMap<Uuid, ConsistencyToken>,
    ) {
        // None: the subscription was dropped meanwhile (removed from the room, too slow), and
        // the client was told by the hub.
        let Some(held) = self.rt.hub.go_live(room, self.handle.id) else { return };
        for frame in held {
            let seen = match frame.kind {
                FrameKind::Message { id, position } => {
                    after.is_some_and(|a| position <= a) || covered.get(&id).is_some_and(|c| position <= *c)
                }
                FrameKind::Room { position } => after.is_some_and(|a| position <= a),
                FrameKind::Ephemeral => false,
            };
            if !seen && !self.write(frame.text).await {
                return;
            }
        }
    }
}
