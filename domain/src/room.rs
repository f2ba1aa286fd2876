//! The `Room` aggregate: a chat room's settings and membership. Messages are aggregates of their
//! own ([`crate::message`]), so a room's stream grows with membership changes, never with its history.

use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who may see and join a room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomVisibility {
    /// Listed for everyone with `rooms:write`; anyone may join.
    #[default]
    Public,
    /// Seen only by its members; joined only by invitation.
    Private,
}

impl RoomVisibility {
    /// `public` or `private`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// What happened to a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomEvent {
    /// The room was created; its owner is its first member.
    RoomCreated {
        /// Name (trimmed, 1 to 100 characters).
        name: String,
        /// Topic (up to 500 characters).
        topic: Option<String>,
        /// Public or private.
        visibility: RoomVisibility,
        /// The creator, who owns it.
        owner_id: Uuid,
    },
    /// New name.
    RoomRenamed {
        /// Name.
        name: String,
    },
    /// New topic (`None` clears it).
    RoomTopicChanged {
        /// Topic.
        topic: Option<String>,
    },
    /// Archived: read-only from then on.
    RoomArchived {},
    /// A user joined a public room.
    MemberJoined {
        /// Who.
        user_id: Uuid,
    },
    /// A member left.
    MemberLeft {
        /// Who.
        user_id: Uuid,
    },
    /// The owner or an admin added a user.
    MemberInvited {
        /// Who was added.
        user_id: Uuid,
        /// Who added them.
        by: Uuid,
    },
    /// The owner or an admin removed a member.
    MemberRemoved {
        /// Who was removed.
        user_id: Uuid,
        /// Who removed them.
        by: Uuid,
    },
}

impl DomainEvent for RoomEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RoomCreated { .. } => "RoomCreated",
            Self::RoomRenamed { .. } => "RoomRenamed",
            Self::RoomTopicChanged { .. } => "RoomTopicChanged",
            Self::RoomArchived {} => "RoomArchived",
            Self::MemberJoined { .. } => "MemberJoined",
            Self::MemberLeft { .. } => "MemberLeft",
            Self::MemberInvited { .. } => "MemberInvited",
            Self::MemberRemoved { .. } => "MemberRemoved",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}
