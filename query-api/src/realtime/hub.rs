//! The hub: one per process. It turns the events of the log (in the log's one order, from the
//! process's single ordered consumer) into frames, serialised once, and hands each to the queue of
//! every socket subscribed to the room with a non-blocking `try_send`: a full queue closes that
//! socket as too slow, so one slow socket never holds back another.
//!
//! It also keeps what typing and presence need (only for rooms with sockets here, and swept), and
//! decides when a socket must close: its user deactivated (4403), its session over or its token
//! expired (4401).
//!
//! A join registers its subscription first in *replaying* mode: live frames of the room are then
//! held for it (bounded) while the socket replays what it missed from the read model; going live
//! hands the held frames back, and the socket keeps those the replay did not cover. Since the hub
//! fans out in log order under one lock, a subscription made when the last fanned-out position
//! was `D` receives (held) exactly the events after `D`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use cairn_platform::auth::SessionVersions;
use cairn_platform::clock::SharedClock;
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::rooms::MessageView;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use uuid::Uuid;

use super::protocol::{self, close, TypingKind};

/// A socket's number within this process.
pub type SocketId = u64;

/// How long a `typing` lasts without another one.
pub const TYPING_TTL: Duration = Duration::from_secs(5);

/// Presence entries not re-announced within this many heartbeats are dropped.
pub const PRESENCE_MISSED_HEARTBEATS: u32 = 3;

/// A frame for the sockets of one room.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The JSON, serialised once for every receiver.
    pub text: Utf8Bytes,
    /// What it is about, for the join's de-duplication.
    pub kind: FrameKind,
}

/// What a frame is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A message sent, edited or deleted: the message and the event's position.
    Message {
        /// The message.
        id: Uuid,
        /// The event's position.
        position: ConsistencyToken,
    },
    /// A change of the room (membership, name, topic, archive), at the event's position.
    Room {
        /// The event's position.
        position: ConsistencyToken,
    },
    /// Typing and presence: never stored, and not held while a join replays.
    Ephemeral,
}

/// Why a socket is being closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The WebSocket close code.
    pub code: u16,
    /// The close frame's reason.
    pub reason: String,
    /// The `error` frame's code sent before the close, when there is one.
    pub error: Option<&'static str>,
}

impl CloseReason {
    /// A close with an `error` frame first.
    #[must_use]
    pub fn with_error(code: u16, error: &'static str, reason: &str) -> Self {
        Self { code, reason: reason.to_owned(), error: Some(error) }
    }
}

/// What a socket's token says about its session, re-checked when user or session events arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAuth {
    /// Session version of the token.
    pub sv: u64,
    /// Session id.
    pub sid: Uuid,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
}

/// The hub's side of one socket: its bounded outbound queue and its close signal.
#[derive(Debug)]
pub struct SocketHandle {
    /// Its number.
    pub id: SocketId,
    /// The authenticated user.
    pub user: Uuid,
    auth: Mutex<SocketAuth>,
    queue: mpsc::Sender<Utf8Bytes>,
    closed: OnceLock<CloseReason>,
    wake: Notify,
}

impl SocketHandle {
    /// A handle whose frames go to `queue`.
    #[must_use]
    pub fn new(id: SocketId, user: Uuid, auth: SocketAuth, queue: mpsc::Sender<Utf8Bytes>) -> Arc<Self> {
        Arc::new(Self { id, user, auth: Mutex::new(auth), queue, closed: OnceLock::new(), wake: Notify::new() })
    }

    /// Asks the socket to close (the first reason wins); counted under `metric`.
    pub fn close(&self, reason: CloseReason, metric: &'static str) {
        if self.closed.set(reason).is_ok() {
            metrics::counter!("cairn_ws_dropped_total", "reason" => metric).increment(1);
            self.wake.notify_one();
        }
    }

    /// Why the socket must close, once it must.
    #[must_use]
    pub fn closing(&self) -> Option<&CloseReason> {
        self.closed.get()
    }

    /// Resolves when [`Self::close`] is called (or was, before).
    pub async fn woken(&self) {
        if self.closed.get().is_none() {
            self.wake.notified().await;
        }
    }

    /// What its current token says.
    #[must_use]
    pub fn auth(&self) -> SocketAuth {
        *self.auth.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A fresh token was accepted.
    pub fn set_auth(&self, auth: SocketAuth) {
        *self.auth.lock().unwrap_or_else(PoisonError::into_inner) = auth;
    }

    /// Queues `text` without waiting; a full queue closes the socket as too slow.
    fn deliver(&self, text: &Utf8Bytes) -> bool {
        match self.queue.try_send(text.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::with_error(close::TOO_SLOW, "TOO_SLOW", "too slow"), "slow");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A presence change this process announces to every process (over plain NATS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    /// The room.
    pub room: Uuid,
    /// The user.
    pub user: Uuid,
    /// Whether they have a socket in the room here.
    pub online: bool,
}

/// The hub's limits.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Per-socket outbound queue, and the bound of a join's held frames.
    pub queue: usize,
    /// Rooms per socket.
    pub max_rooms: usize,
    /// Open sockets per process.
    pub max_sockets: usize,
    /// The heartbeat period (presence re-announcements and expiry).
    pub heartbeat: Duration,
}

/// Why a join cannot subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    /// The socket is in `max_rooms` rooms already.
    TooManyRooms,
    /// The socket is gone.
    Gone,
}

struct Subscription {
    socket: Arc<SocketHandle>,
    /// `Some` while the join replays: live frames held for it.
    held: Option<Vec<Frame>>,
}

#[derive(Default)]
struct Room {
    subs: HashMap<SocketId, Subscription>,
    /// User → when their typing expires (settings' clock).
    typing: HashMap<Uuid, DateTime<Utc>>,
    /// User → process → when it last announced them online.
    online: HashMap<Uuid, HashMap<Uuid, Instant>>,
}

impl Room {
    fn has_live(&self, user: Uuid) -> bool {
        self.subs.values().any(|s| s.held.is_none() && s.socket.user == user)
    }
}

#[derive(Default)]
struct HubState {
    sockets: HashMap<SocketId, Arc<SocketHandle>>,
    by_user: HashMap<Uuid, HashSet<SocketId>>,
    rooms: HashMap<Uuid, Room>,
    socket_rooms: HashMap<SocketId, HashSet<Uuid>>,
    /// The position of the last event fanned out.
    last_dispatched: ConsistencyToken,
}

/// The process's fan-out. Cheap to share as `Arc<Hub>`.
pub struct Hub {
    state: Mutex<HubState>,
    limits: HubLimits,
    sessions: SessionVersions,
    clock: SharedClock,
    process: Uuid,
    announcements: mpsc::Sender<Announcement>,
    next_id: AtomicU64,
    open: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("process", &self.process).field("open", &self.open).finish_non_exhaustive()
    }
}

/// One open socket counted against `max_sockets`; released when dropped.
#[derive(Debug)]
pub struct OpenSocket(Arc<AtomicUsize>);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        let open = self.0.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!("cairn_ws_sockets").set(open as f64);
    }
}

/// Presence announcements waiting to be published; beyond this they are dropped (the next
/// heartbeat's re-announcement and the 3-heartbeat expiry repair what was lost).
const ANNOUNCEMENT_QUEUE: usize = 4096;

impl Hub {
    /// A hub; the receiver gets the presence announcements to publish.
    #[must_use]
    pub fn new(
        limits: HubLimits,
        sessions: SessionVersions,
        clock: SharedClock,
    ) -> (Arc<Self>, mpsc::Receiver<Announcement>) {
        let (announcements, receiver) = mpsc::channel(ANNOUNCEMENT_QUEUE);
        let hub = Self {
            state: Mutex::default(),
            limits,
            sessions,
            clock,
            process: Uuid::new_v4(),
            announcements,
            next_id: AtomicU64::new(1),
            open: Arc::default(),
        };
        (Arc::new(hub), receiver)
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This process's id in typing and presence notes.
    #[must_use]
    pub fn process(&self) -> Uuid {
        self.process
    }

    /// The limits.
    #[must_use]
    pub fn limits(&self) -> HubLimits {
        self.limits
    }

    /// The clock time rules read.
    #[must_use]
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The session map sockets are checked against.
    #[must_use]
    pub fn sessions(&self) -> &SessionVersions {
        &self.sessions
    }

    /// Counts a new socket, or `None` when `max_sockets` are open.
    #[must_use]
    pub fn try_open(&self) -> Option<OpenSocket> {
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        if before >= self.limits.max_sockets {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        metrics::gauge!("cairn_ws_sockets").set((before + 1) as f64);
        Some(OpenSocket(Arc::clone(&self.open)))
    }

    /// A new socket number.
    #[must_use]
    pub fn next_id(&self) -> SocketId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers an authenticated socket.
    pub fn register(&self, socket: &Arc<SocketHandle>) {
        let mut state = self.state();
        state.sockets.insert(socket.id, Arc::clone(socket));
        state.by_user.entry(socket.user).or_default().insert(socket.id);
    }

    /// Forgets a socket that ended, leaving its rooms (presence offline at once).
    pub fn unregister(&self, id: SocketId) {
        let mut state = self.state();
        let Some(socket) = state.sockets.remove(&id) else { return };
        if let Some(ids) = state.by_user.get_mut(&socket.user) {
            ids.remove(&id);
            if ids.is_empty() {
                state.by_user.remove(&socket.user);
            }
        }
        let rooms = state.socket_rooms.remove(&id).unwrap_or_default();
        for room in rooms {
            self.remove_sub(&mut state, room, id);
        }
    }

    /// Subscribes a socket to `room` in replaying mode (a join's first step). Returns the position
    /// of the last event fanned out: every later one is held for the join.
    ///
    /// # Errors
    /// When the socket is in too many rooms, or gone.
    pub fn subscribe(&self, room: Uuid, socket: &Arc<SocketHandle>) -> Result<ConsistencyToken, SubscribeError> {
        let mut state = self.state();
        if !state.sockets.contains_key(&socket.id) {
            return Err(SubscribeError::Gone);
        }
        let joined = state.socket_rooms.entry(socket.id).or_default();
        if !joined.contains(&room) && joined.len() >= self.limits.max_rooms {
            return Err(SubscribeError::TooManyRooms);
        }
        joined.insert(room);
        if state.rooms.get(&room).is_some_and(|r| r.subs.contains_key(&socket.id)) {
            // A join of a room already joined starts over.
            self.remove_sub(&mut state, room, socket.id);
            state.socket_rooms.entry(socket.id).or_default().insert(room);
        }
        let entry = state.rooms.entry(room).or_default();
        entry.subs.insert(socket.id, Subscription { socket: Arc::clone(socket), held: Some(Vec::new()) });
        Ok(state.last_dispatched)
    }

    /// Ends a join's replay: returns the frames held meanwhile and fans out live from now on;
    /// `None` when the subscription was dropped in between (removed from the room, too slow).
    #[must_use]
    pub fn go_live(&self, room: Uuid, id: SocketId) -> Option<Vec<Frame>> {
        let mut state = self.state();
        let entry = state.rooms.get_mut(&room)?;
        let user = entry.subs.get(&id)?.socket.user;
        let was_live = entry.has_live(user);
        let held = entry.subs.get_mut(&id)?.held.take().unwrap_or_default();
        if !was_live {
            self.announce(Announcement { room, user, online: true });
        }
        Some(held)
    }

    /// Unsubscribes; false when the socket was not subscribed.
    pub fn unsubscribe(&self, room: Uuid, id: SocketId) -> bool {
        let mut state = self.state();
        let known = state.socket_rooms.get_mut(&id).is_some_and(|rooms| rooms.remove(&room));
        self.remove_sub(&mut state, room, id) || known
    }

    /// Whether the socket is subscribed to `room` (live or replaying).
    #[must_use]
    pub fn is_subscribed(&self, room: Uuid, id: SocketId) -> bool {
        self.state().rooms.get(&room).is_some_and(|r| r.subs.contains_key(&id))
    }

    fn remove_sub(&self, state: &mut HubState, room: Uuid, id: SocketId) -> bool {
        let Some(entry) = state.rooms.get_mut(&room) else { return false };
        let Some(sub) = entry.subs.remove(&id) else { return false };
        let user = sub.socket.user;
        if sub.held.is_none() && !entry.has_live(user) {
            self.announce(Announcement { room, user, online: false });
        }
        if entry.subs.is_empty() {
            // Typing and presence are kept only for rooms with sockets here.
            state.rooms.remove(&room);
        }
        if let Some(rooms) = state.socket_rooms.get_mut(&id) {
            rooms.remove(&room);
        }
        true
    }

    fn announce(&self, announcement: Announcement) {
        if self.announcements.try_send(announcement).is_err() {
            metrics::counter!("cairn_ws_presence_dropped_total").increment(1);
        }
    }

    /// Who is online in `room` now: announced by any process, or with a socket here.
    #[must_use]
    pub fn presence(&self, room: Uuid) -> Vec<Uuid> {
        let state = self.state();
        let Some(entry) = state.rooms.get(&room) else { return Vec::new() };
        let mut users: Vec<Uuid> = entry.online.keys().copied().collect();
        for sub in entry.subs.values() {
            if sub.held.is_none() && !users.contains(&sub.socket.user) {
                users.push(sub.socket.user);
            }
        }
        users.sort();
        users
    }

    /// The (room, user) pairs with a live socket here, re-announced every heartbeat.
    #[must_use]
    pub fn local_presence(&self) -> Vec<Announcement> {
        let state = self.state();
        let mut out = Vec::new();
        for (room, entry) in &state.rooms {
            let mut users: Vec<Uuid> =
                entry.subs.values().filter(|s| s.held.is_none()).map(|s| s.socket.user).collect();
            users.sort();
            users.dedup();
            out.extend(users.into_iter().map(|user| Announcement { room: *room, user, online: true }));
        }
        out
    }

    /// Number of registered sockets.
    #[must_use]
    pub fn sockets(&self) -> usize {
        self.state().sockets.len()
    }

    /// Closes every socket (shutdown).
    pub fn close_all(&self, reason: &CloseReason, metric: &'static str) {
        for socket in self.state().sockets.values() {
            socket.close(reason.clone(), metric);
        }
    }

    fn fan_out(&self, entry: &mut Room, frame: &Frame, except: Option<SocketId>) {
        let limit = self.limits.queue;
        for (id, sub) in &mut entry.subs {
            if Some(*id) == except {
                continue;
            }
            match &mut sub.held {
                Some(_) if frame.kind == FrameKind::Ephemeral => {}
                Some(held) => {
                    if held.len() >= limit {
                        sub.socket.close(CloseReason::with_error(close::TOO_SLOW, "TOO_SLOW", "too slow"), "slow");
                    } else {
                        held.push(frame.clone());
                    }
                }
                None => {
                    sub.socket.deliver(&frame.text);
                }
            }
        }
    }

    /// Fans out one event of the log; events must come in the log's order.
    pub fn dispatch(&self, event: &EventEnvelope) {
        let mut state = self.state();
        match event.aggregate_type.as_str() {
            "Room" => self.room_event(&mut state, event),
            "Message" => self.message_event(&mut state, event),
            "User" => self.user_event(&state, event),
            "Session" => self.session_event(&state, event),
            _ => {}
        }
        if event.position() > state.last_dispatched {
            state.last_dispatched = event.position();
        }
    }

    fn room_event(&self, state: &mut HubState, event: &EventEnvelope) {
        let Ok(room) = event.aggregate_id.parse::<Uuid>() else { return };
        let body = event.body();
        let user = uuid_field(body, "user_id");
        let by = uuid_field(body, "by");
        let text = match (event.event_type.as_str(), user) {
            ("RoomRenamed", _) => protocol::room_updated(room, pick(body, "name")),
            ("RoomTopicChanged", _) => protocol::room_updated(room, pick(body, "topic")),
            ("RoomArchived", _) => {
                let mut changes = serde_json::Map::new();
                changes.insert("archived".to_owned(), Value::Bool(true));
                protocol::room_updated(room, changes)
            }
            ("MemberJoined" | "MemberInvited", Some(user)) => protocol::member("member_joined", room, user, by),
            (kind @ ("MemberLeft" | "MemberRemoved"), Some(user)) => {
                // That user's sockets stop getting the room at once, and are told why.
                let told = if kind == "MemberLeft" {
                    protocol::left(room)
                } else {
                    protocol::error("FORBIDDEN", "you were removed from this room", Some(room), None)
                };
                let ids: Vec<SocketId> = state
                    .rooms
                    .get(&room)
                    .map(|r| r.subs.values().filter(|s| s.socket.user == user).map(|s| s.socket.id).collect())
                    .unwrap_or_default();
                for id in ids {
                    if let Some(socket) = state.sockets.get(&id).cloned() {
                        socket.deliver(&told);
                    }
                    self.remove_sub(state, room, id);
                }
                protocol::member("member_left", room, user, by)
            }
            _ => return,
        };
        if let Some(entry) = state.rooms.get_mut(&room) {
            self.fan_out(entry, &Frame { text, kind: FrameKind::Room { position: event.position() } }, None);
        }
    }

    fn message_event(&self, state: &mut HubState, event: &EventEnvelope) {
        let Ok(id) = event.aggregate_id.parse::<Uuid>() else { return };
        let body = event.body();
        let Some(room) = uuid_field(body, "room_id") else { return };
        let Some(entry) = state.rooms.get_mut(&room) else { return };
        let position = event.position();
        let at = position.to_string();
        let text = match event.event_type.as_str() {
            "MessageSent" => {
                let Some(view) = MessageView::from_sent(event) else { return };
                protocol::message(&view)
            }
            "MessageEdited" => {
                protocol::message_edited(id, room, body.get("body").and_then(Value::as_str), event.recorded_at, &at)
            }
            "MessageDeleted" => protocol::message_deleted(id, room, event.recorded_at, &at),
            _ => return,
        };
        let receivers = entry.subs.len() as u64;
        self.fan_out(entry, &Frame { text, kind: FrameKind::Message { id, position } }, None);
        metrics::counter!("cairn_ws_messages_delivered_total").increment(receivers);
        let lag = (Utc::now() - event.recorded_at).to_std().unwrap_or_default();
        metrics::histogram!("cairn_ws_delivery_lag_seconds").record(lag.as_secs_f64());
    }

    /// A user event that ends sessions carries the new session version: the user's sockets
    /// holding an older one close (4403 for a deactivated or deleted user, 4401 otherwise).
    /// Decided from the event itself, in the log's order, not from the session map, which its
    /// own consumer may have moved further already.
    fn user_event(&self, state: &HubState, event: &EventEnvelope) {
        self.sessions.apply(event);
        let Ok(user) = event.aggregate_id.parse::<Uuid>() else { return };
        let Some(ids) = state.by_user.get(&user) else { return };
        let Some(version) = event.body().get("session_version").and_then(Value::as_u64) else { return };
        let reason = match event.event_type.as_str() {
            "UserDeactivated" => CloseReason::with_error(close::USER_GONE, "FORBIDDEN", "user deactivated"),
            "UserDeleted" => CloseReason::with_error(close::USER_GONE, "FORBIDDEN", "user deleted"),
            _ => CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "session ended"),
        };
        let metric = if reason.code == close::USER_GONE { "user" } else { "session" };
        for socket in ids.iter().filter_map(|id| state.sockets.get(id)) {
            if socket.auth().sv < version {
                socket.close(reason.clone(), metric);
            }
        }
    }

    /// A revoked session (sign-out) closes the sockets opened with its tokens.
    fn session_event(&self, state: &HubState, event: &EventEnvelope) {
        self.sessions.apply(event);
        if event.event_type != "SessionRevoked" {
            return;
        }
        let Ok(sid) = event.aggregate_id.parse::<Uuid>() else { return };
        for socket in state.sockets.values().filter(|s| s.auth().sid == sid) {
            socket.close(
                CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "session revoked"),
                "session",
            );
        }
    }

    /// A typing note from any process (this one included).
    pub fn on_typing(&self, room: Uuid, user: Uuid, kind: TypingKind, from: Option<SocketId>) {
        let mut state = self.state();
        let Some(entry) = state.rooms.get_mut(&room) else { return };
        match kind {
            TypingKind::Typing => {
                entry
                    .typing
                    .insert(user, self.clock.now() + chrono::Duration::from_std(TYPING_TTL).unwrap_or_default());
            }
            TypingKind::StopTyping => {
                entry.typing.remove(&user);
            }
        }
        let frame = Frame { text: protocol::typing(kind, room, user), kind: FrameKind::Ephemeral };
        self.fan_out(entry, &frame, from);
    }

    /// A presence note from any process (this one included).
    pub fn on_presence(&self, process: Uuid, note: Announcement, at: Instant) {
        let mut state = self.state();
        let Some(entry) = state.rooms.get_mut(&note.room) else { return };
        let was_online = entry.online.contains_key(&note.user);
        if note.online {
            entry.online.entry(note.user).or_default().insert(process, at);
        } else if let Some(processes) = entry.online.get_mut(&note.user) {
            processes.remove(&process);
            if processes.is_empty() {
                entry.online.remove(&note.user);
            }
        }
        let is_online = entry.online.contains_key(&note.user);
        if was_online != is_online {
            let frame = Frame { text: protocol::presence(note.room, note.user, is_online), kind: FrameKind::Ephemeral };
            self.fan_out(entry, &frame, None);
        }
    }

    /// Expires typing (by the settings' clock), presence not re-announced within
    /// [`PRESENCE_MISSED_HEARTBEATS`] heartbeats, and sockets whose token expired.
    pub fn sweep(&self, at: Instant) {
        let now = self.clock.now();
        let stale = self.limits.heartbeat * PRESENCE_MISSED_HEARTBEATS;
        let mut state = self.state();
        for socket in state.sockets.values() {
            if socket.auth().exp <= now.timestamp() {
                socket.close(
                    CloseReason::with_error(close::UNAUTHENTICATED, "UNAUTHENTICATED", "token expired"),
                    "expired",
                );
            }
        }
        for (room, entry) in &mut state.rooms {
            let expired: Vec<Uuid> = entry.typing.iter().filter(|(_, until)| **until <= now).map(|(u, _)| *u).collect();
            for user in expired {
                entry.typing.remove(&user);
                let frame =
                    Frame { text: protocol::typing(TypingKind::StopTyping, *room, user), kind: FrameKind::Ephemeral };
                self.fan_out(entry, &frame, None);
            }
            let mut gone = Vec::new();
            for (user, processes) in &mut entry.online {
                processes.retain(|_, seen| at.saturating_duration_since(*seen) < stale);
                if processes.is_empty() {
                    gone.push(*user);
                }
            }
            for user in gone {
                entry.online.remove(&user);
                let frame = Frame { text: protocol::presence(*room, user, false), kind: FrameKind::Ephemeral };
                self.fan_out(entry, &frame, None);
            }
        }
    }
}

fn uuid_field(body: &Value, name: &str) -> Option<Uuid> {
    body.get(name).and_then(Value::as_str).and_then(|s| s.parse().ok())
}

fn pick(body: &Value, name: &str) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert(name.to_owned(), body.get(name).cloned().unwrap_or(Value::Null));
    map
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use cairn_platform::clock::TestClock;
    use serde_json::json;

    fn hub(queue: usize) -> (Arc<Hub>, mpsc::Receiver<Announcement>) {
        let limits = HubLimits { queue, max_rooms: 2, max_sockets: 3, heartbeat: Duration::from_secs(10) };
        Hub::new(limits, SessionVersions::default(), TestClock::new())
    }

    fn socket(hub: &Hub, user: Uuid, queue: usize) -> (Arc<SocketHandle>, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(queue);
        let auth = SocketAuth { sv: 0, sid: Uuid::new_v4(), exp: i64::MAX };
        let handle = SocketHandle::new(hub.next_id(), user, auth, tx);
        hub.register(&handle);
        (handle, rx)
    }

    fn event(aggregate: &str, id: Uuid, kind: &str, body: Value, tx: u64, pos: i64) -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::new_v4(),
            aggregate_type: aggregate.to_owned(),
            aggregate_id: id.to_string(),
            sequence: 1,
            event_type: kind.to_owned(),
            event_version: "1".to_owned(),
            transaction_id: tx,
            global_position: pos,
            recorded_at: Utc::now(),
            payload: Value::Object(serde_json::Map::from_iter([(kind.to_owned(), body)])),
            metadata: json!({}),
            previous_transaction_id: 0,
            previous_global_position: 0,
        }
    }

    fn sent(room: Uuid, pos: i64) -> EventEnvelope {
        let body = json!({"room_id": room, "author_id": Uuid::new_v4(), "body": format!("m{pos}"), "client_id": null, "attachments": []});
        event("Message", Uuid::new_v4(), "MessageSent", body, pos as u64, pos)
    }

    fn live(hub: &Hub, room: Uuid, socket: &Arc<SocketHandle>) {
        hub.subscribe(room, socket).unwrap();
        assert!(hub.go_live(room, socket.id).unwrap().is_empty());
    }

    fn frame(rx: &mut mpsc::Receiver<Utf8Bytes>) -> Option<Value> {
        rx.try_recv().ok().map(|t| serde_json::from_str(&t).unwrap())
    }

    #[test]
    fn a_message_reaches_every_subscriber_of_its_room_only() {
        let (hub, _ann) = hub(8);
        let (room, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (a, mut ra) = socket(&hub, Uuid::new_v4(), 8);
        let (b, mut rb) = socket(&hub, Uuid::new_v4(), 8);
        let (c, mut rc) = socket(&hub, Uuid::new_v4(), 8);
        live(&hub, room, &a);
        live(&hub, room, &b);
        live(&hub, other, &c);
        hub.dispatch(&sent(room, 1));
        assert_eq!(frame(&mut ra).unwrap()["body"], "m1");
        assert_eq!(frame(&mut rb).unwrap()["position"], "1.1");
        assert!(frame(&mut rc).is_none());
        hub.dispatch(&sent(other, 2));
        assert_eq!(frame(&mut rc).unwrap()["type"], "message");
    }

    #[test]
    fn a_full_queue_closes_only_that_socket() {
        let (hub, _ann) = hub(64);
        let room = Uuid::new_v4();
        let (slow, _never_read) = socket(&hub, Uuid::new_v4(), 2);
        let (fast, mut rf) = socket(&hub, Uuid::new_v4(), 64);
        live(&hub, room, &slow);
        live(&hub, room, &fast);
        for pos in 1..=5 {
            hub.dispatch(&sent(room, pos));
        }
        assert_eq!(slow.closing().map(|c| c.code), Some(close::TOO_SLOW));
        assert!(fast.closing().is_none());
        let mut got = 0;
        while frame(&mut rf).is_some() {
            got += 1;
        }
        assert_eq!(got, 5);
    }

    #[test]
    fn a_replaying_join_holds_live_frames_until_it_goes_live() {
        let (hub, _ann) = hub(3);
        let room = Uuid::new_v4();
        let (a, mut ra) = socket(&hub, Uuid::new_v4(), 8);
        hub.dispatch(&sent(room, 1));
        let before = hub.subscribe(room, &a).unwrap();
        assert_eq!(before, ConsistencyToken { tx: 1, pos: 1 });
        hub.dispatch(&sent(room, 2));
        hub.dispatch(&sent(room, 3));
        assert!(frame(&mut ra).is_none(), "held while replaying");
        let held = hub.go_live(room, a.id).unwrap();
        assert_eq!(held.len(), 2);
        assert!(matches!(held[0].kind, FrameKind::Message { position, .. } if position.pos == 2));
        hub.dispatch(&sent(room, 4));
        assert_eq!(frame(&mut ra).unwrap()["position"], "4.4");
    }

    #[test]
    fn a_replay_holding_too_much_drops_the_socket() {
        let (hub, _ann) = hub(2);
        let room = Uuid::new_v4();
        let (a, _ra) = socket(&hub, Uuid::new_v4(), 8);
        hub.subscribe(room, &a).unwrap();
        for pos in 1..=3 {
            hub.dispatch(&sent(room, pos));
        }
        assert_eq!(a.closing().map(|c| c.code), Some(close::TOO_SLOW));
    }

    #[test]
    fn a_removed_member_stops_receiving_and_is_told() {
        let (hub, _ann) = hub(8);
        let room = Uuid::new_v4();
        let (gone_user, kept_user) = (Uuid::new_v4(), Uuid::new_v4());
        let (a, mut ra) = socket(&hub, gone_user, 8);
        let (b, mut rb) = socket(&hub, kept_user, 8);
        live(&hub, room, &a);
        live(&hub, room, &b);
        let removed = json!({"user_id": gone_user, "by": kept_user});
        hub.dispatch(&event("Room", room, "MemberRemoved", removed, 1, 1));
        let told = frame(&mut ra).unwrap();
        assert_eq!((told["type"].as_str(), told["code"].as_str()), (Some("error"), Some("FORBIDDEN")));
        assert_eq!(frame(&mut rb).unwrap()["type"], "member_left");
        hub.dispatch(&sent(room, 2));
        assert!(frame(&mut ra).is_none());
        assert_eq!(frame(&mut rb).unwrap()["type"], "message");
    }

    #[test]
    fn a_deactivated_user_is_closed_4403() {
        let (hub, _ann) = hub(8);
        let user = Uuid::new_v4();
        let (a, _ra) = socket(&hub, user, 8);
        let (b, _rb) = socket(&hub, Uuid::new_v4(), 8);
        hub.dispatch(&event("User", user, "UserDeactivated", json!({"session_version": 5}), 1, 1));
        assert_eq!(a.closing().map(|c| c.code), Some(close::USER_GONE));
        assert!(b.closing().is_none());
    }

    #[test]
    fn limits_on_rooms_and_sockets() {
        let (hub, _ann) = hub(8);
        let (a, _ra) = socket(&hub, Uuid::new_v4(), 8);
        hub.subscribe(Uuid::new_v4(), &a).unwrap();
        hub.subscribe(Uuid::new_v4(), &a).unwrap();
        assert_eq!(hub.subscribe(Uuid::new_v4(), &a), Err(SubscribeError::TooManyRooms));
        let open: Vec<_> = (0..3).map_while(|_| hub.try_open()).collect();
        assert_eq!(open.len(), 3);
        assert!(hub.try_open().is_none());
        drop(open);
        assert!(hub.try_open().is_some());
    }

    #[test]
    fn typing_expires_by_the_clock_and_presence_by_missed_heartbeats() {
        let clock = TestClock::new();
        let limits = HubLimits { queue: 8, max_rooms: 8, max_sockets: 8, heartbeat: Duration::from_secs(10) };
        let (hub, mut ann) = Hub::new(limits, SessionVersions::default(), clock.clone());
        let room = Uuid::new_v4();
        let (typist, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (a, mut ra) = socket(&hub, typist, 8);
        let (b, mut rb) = socket(&hub, other, 8);
        live(&hub, room, &a);
        live(&hub, room, &b);
        assert_eq!(ann.try_recv().ok(), Some(Announcement { room, user: typist, online: true }));
        hub.on_typing(room, typist, TypingKind::Typing, Some(a.id));
        assert!(frame(&mut ra).is_none(), "not echoed to the typist's own socket");
        assert_eq!(frame(&mut rb).unwrap()["type"], "typing");
        let start = Instant::now();
        hub.sweep(start);
        assert!(frame(&mut rb).is_none());
        clock.advance(Duration::from_secs(6));
        hub.sweep(start);
        assert_eq!(frame(&mut rb).unwrap()["type"], "stop_typing");

        let remote = Uuid::new_v4();
        hub.on_presence(Uuid::new_v4(), Announcement { room, user: remote, online: true }, start);
        assert_eq!(frame(&mut rb).unwrap()["online"], true);
        assert!(hub.presence(room).contains(&remote));
        hub.sweep(start + Duration::from_secs(29));
        assert!(frame(&mut rb).is_none());
        hub.sweep(start + Duration::from_secs(31));
        assert_eq!(frame(&mut rb).unwrap()["online"], false);
        assert!(!hub.presence(room).contains(&remote));
    }
}
