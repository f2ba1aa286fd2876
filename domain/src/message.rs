//! The `Message` aggregate: one chat message, its edits and its deletion. Each message is its
//! own short stream, so sending never loads a room's history.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What happened to a message. Every event names its room, so fan-out needs no lookup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageEvent {
    /// Sent to a room by a member.
    MessageSent {
        /// The room.
        room_id: Uuid,
        /// Who sent it.
        author_id: Uuid,
        /// The text: trimmed, 1 to 4,000 characters, no control characters but newline and tab.
        body: String,
        /// The sender's idempotency key, when it gave one.
        client_id: Option<String>,
        /// Files attached (ids).
        attachments: Vec<Uuid>,
    },
    /// Its author changed the text.
    MessageEdited {
        /// The room.
        room_id: Uuid,
        /// The new text.
        body: String,
    },
    /// Deleted by its author, the room's owner or an admin: the body leaves the reads, the events stay.
    MessageDeleted {
        /// The room.
        room_id: Uuid,
        /// Who deleted it.
        by: Uuid,
    },
}

impl DomainEvent for MessageEvent {
    fn event_type(&self) -> String {
        match self {
            Self::MessageSent { .. } => "MessageSent",
            Self::MessageEdited { .. } => "MessageEdited",
            Self::MessageDeleted { .. } => "MessageDeleted",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}
