//! Typing and presence over plain NATS (never stored, never in the log): one subscription per
//! process on `<ns>.rt.typing` and one on `<ns>.rt.presence`. Every process, this one included,
//! applies the notes to its hub, which relays them to its own sockets of the room.
//!
//! A process announces a user online in a room when their first socket here joins it, offline
//! when their last one leaves or dies, and re-announces every heartbeat; every process forgets an
//! announcement not renewed within three heartbeats, so a dead process's users drop out on their
//! own. A sweeper (every 250 ms of real time) expires typing by the settings' clock, stale
//! presence, and sockets whose token expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_platform::nats::Namespace;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::hub::{Announcement, Hub, SocketId};
use super::protocol::TypingKind;

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Serialize, Deserialize)]
struct TypingNote {
    room_id: Uuid,
    user_id: Uuid,
    kind: TypingKind,
    process: Uuid,
    socket: SocketId,
}

#[derive(Debug, Serialize, Deserialize)]
struct PresenceNote {
    room_id: Uuid,
    user_id: Uuid,
    online: bool,
    process: Uuid,
}

/// The subject `[<ns>.]rt.<name>`.
#[must_use]
pub fn subject(ns: &Namespace, name: &str) -> String {
    if ns.as_str().is_empty() {
        format!("rt.{name}")
    } else {
        format!("{}.rt.{name}", ns.as_str())
    }
}

/// Publishes typing notes for this process's sockets.
#[derive(Debug, Clone)]
pub struct TypingPublisher {
    client: async_nats::Client,
    subject: String,
    process: Uuid,
}

impl TypingPublisher {
    /// Publishes that `user` (on socket `socket`) started or stopped typing in `room`.
    pub async fn publish(&self, room: Uuid, user: Uuid, kind: TypingKind, socket: SocketId) {
        let note = TypingNote { room_id: room, user_id: user, kind, process: self.process, socket };
        let Ok(payload) = serde_json::to_vec(&note) else { return };
        if let Err(e) = self.client.publish(self.subject.clone(), payload.into()).await {
            tracing::warn!(error = %e, "typing note not published");
        }
    }
}

/// Starts the typing and presence subscriptions, the presence publisher, the heartbeat
/// re-announcements and the sweeper, in `tasks`, until `shutdown`.
///
/// # Errors
/// When NATS refuses the subscriptions.
pub async fn start(
    hub: Arc<Hub>,
    client: async_nats::Client,
    ns: &Namespace,
    mut announcements: mpsc::Receiver<Announcement>,
    tasks: &mut JoinSet<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<TypingPublisher> {
    let typing_subject = subject(ns, "typing");
    let presence_subject = subject(ns, "presence");
    let mut typing = client.subscribe(typing_subject.clone()).await?;
    let mut presence = client.subscribe(presence_subject.clone()).await?;

    let (h, token) = (Arc::clone(&hub), shutdown.clone());
    tasks.spawn(async move {
        loop {
            let message = tokio::select! {
                () = token.cancelled() => return,
                next = typing.next() => match next { Some(m) => m, None => return },
            };
            if let Ok(note) = serde_json::from_slice::<TypingNote>(&message.payload) {
                let from = (note.process == h.process()).then_some(note.socket);
                h.on_typing(note.room_id, note.user_id, note.kind, from);
            }
        }
    });
    let (h, token) = (Arc::clone(&hub), shutdown.clone());
    tasks.spawn(async move {
        loop {
            let message = tokio::select! {
                () = token.cancelled() => return,
                next = presence.next() => match next { Some(m) => m, None => return },
            };
            if let Ok(note) = serde_json::from_slice::<PresenceNote>(&message.payload) {
                let announcement = Announcement { room: note.room_id, user: note.user_id, online: note.online };
                h.on_presence(note.process, announcement, Instant::now());
            }
        }
    });
    let (h, token, c, s) = (Arc::clone(&hub), shutdown.clone(), client.clone(), presence_subject.clone());
    tasks.spawn(async move {
        let mut heartbeat = tokio::time::interval(h.limits().heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                () = token.cancelled() => return,
                next = announcements.recv() => match next { Some(a) => vec![a], None => return },
                _ = heartbeat.tick() => h.local_presence(),
            };
            for a in batch {
                let note = PresenceNote { room_id: a.room, user_id: a.user, online: a.online, process: h.process() };
                let Ok(payload) = serde_json::to_vec(&note) else { continue };
                if let Err(e) = c.publish(s.clone(), payload.into()).await {
                    tracing::warn!(error = %e, "presence note not published");
                }
            }
        }
    });
    let (h, token) = (Arc::clone(&hub), shutdown);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => h.sweep(Instant::now()),
            }
        }
    });
    Ok(TypingPublisher { client, subject: typing_subject, process: hub.process() })
}
