//! The `Room` aggregate: a chat room's settings and membership. Messages are aggregates of their
//! own ([`crate::message`]), so a room's stream grows with membership changes, never with its history.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::{RoomName, Topic};

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

/// Who asks for a change only a room's owner or an admin may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// The caller.
    pub id: Uuid,
    /// Whether the caller's token holds the `admin` role.
    pub admin: bool,
}

/// A room as the command side sees it: its settings and its current members. Who was a member
/// once is in the stream, not here, so the state stays as small as the membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// Whether RoomCreated happened.
    pub created: bool,
    /// Name.
    pub name: String,
    /// Topic.
    pub topic: Option<String>,
    /// Public or private.
    pub visibility: RoomVisibility,
    /// The creator.
    pub owner_id: Uuid,
    /// Archived rooms are read-only.
    pub archived: bool,
    /// Current members (the owner included).
    pub members: BTreeSet<Uuid>,
}

impl Room {
    /// Whether `user` is a member now.
    #[must_use]
    pub fn is_member(&self, user: Uuid) -> bool {
        self.members.contains(&user)
    }

    /// Whether `user` may know the room exists: any room once created is visible when public; a
    /// private one only to its members and admins.
    #[must_use]
    pub fn visible_to(&self, user: Uuid, admin: bool) -> bool {
        self.created && (self.visibility == RoomVisibility::Public || admin || self.is_member(user))
    }

    /// Whether `actor` may change the room's settings and membership (owner or admin).
    #[must_use]
    pub fn moderated_by(&self, actor: Actor) -> bool {
        actor.admin || actor.id == self.owner_id
    }
}

/// What can be asked of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomCommand {
    /// Create it; the owner becomes its first member.
    CreateRoom {
        /// Name.
        name: RoomName,
        /// Topic.
        topic: Option<Topic>,
        /// Public or private.
        visibility: RoomVisibility,
        /// The creator.
        owner_id: Uuid,
    },
    /// Rename it and/or change its topic (owner or admin).
    UpdateRoom {
        /// New name, when it changes.
        name: Option<RoomName>,
        /// New topic when given (`Some(None)` clears it).
        topic: Option<Option<Topic>>,
        /// Who asks.
        actor: Actor,
    },
    /// Archive it: read-only from then on (owner or admin).
    ArchiveRoom {
        /// Who asks.
        actor: Actor,
    },
    /// Join a public room.
    JoinRoom {
        /// Who joins.
        user_id: Uuid,
    },
    /// Leave a room (the owner cannot: archive instead).
    LeaveRoom {
        /// Who leaves.
        user_id: Uuid,
    },
    /// Add a user (owner or admin); the way into a private room.
    InviteMember {
        /// Who asks.
        actor: Actor,
        /// Who is added.
        user_id: Uuid,
    },
    /// Remove a member other than the owner (owner or admin).
    RemoveMember {
        /// Who asks.
        actor: Actor,
        /// Who is removed.
        user_id: Uuid,
    },
}

/// Why a room command was refused. A private room is "not found" for whoever may not see it, so
/// refusals never reveal that it exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// Creating a room that exists (409).
    #[error("room already exists")]
    AlreadyCreated,
    /// No such room, or a private room the caller is not in (404).
    #[error("room not found")]
    NotFound,
    /// Only the owner or an admin may do this (403).
    #[error("only the room's owner or an admin may do this")]
    NotOwner,
    /// The room is archived and read-only (409).
    #[error("room is archived")]
    Archived,
    /// Joining or inviting someone already in (409).
    #[error("already a member of this room")]
    AlreadyMember,
    /// Leaving or removing someone who is not in a (public) room (409).
    #[error("not a member of this room")]
    NotMember,
    /// The owner cannot leave or be removed; archive the room instead (409).
    #[error("the room's owner cannot leave it; archive it instead")]
    OwnerStays,
    /// Nothing would change (409).
    #[error("nothing to change")]
    Unchanged,
}

impl Room {
    /// The checks every command on an existing room shares, in the order that hides private
    /// rooms first: exists and is visible to `who`, then (for `actor`) owner or admin, then not
    /// archived.
    fn check(&self, who: Uuid, admin: bool, moderation: bool) -> Result<(), RoomError> {
        if !self.visible_to(who, admin) {
            return Err(RoomError::NotFound);
        }
        if moderation && !self.moderated_by(Actor { id: who, admin }) {
            return Err(RoomError::NotOwner);
        }
        if self.archived {
            return Err(RoomError::Archived);
        }
        Ok(())
    }
}

impl Aggregate for Room {
    const TYPE: &'static str = "Room";
    type Command = RoomCommand;
    type Event = RoomEvent;
    type Error = RoomError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let events = match command {
            RoomCommand::CreateRoom { name, topic, visibility, owner_id } => {
                if self.created {
                    return Err(RoomError::AlreadyCreated);
                }
                vec![RoomEvent::RoomCreated {
                    name: name.as_str().to_owned(),
                    topic: topic.map(|t| t.as_str().to_owned()),
                    visibility,
                    owner_id,
                }]
            }
            RoomCommand::UpdateRoom { name, topic, actor } => {
                self.check(actor.id, actor.admin, true)?;
                let mut events = Vec::new();
                if let Some(name) = name.filter(|n| n.as_str() != self.name) {
                    events.push(RoomEvent::RoomRenamed { name: name.as_str().to_owned() });
                }
                if let Some(topic) = topic.map(|t| t.map(|t| t.as_str().to_owned())).filter(|t| *t != self.topic) {
                    events.push(RoomEvent::RoomTopicChanged { topic });
                }
                if events.is_empty() {
                    return Err(RoomError::Unchanged);
                }
                events
            }
            RoomCommand::ArchiveRoom { actor } => {
                self.check(actor.id, actor.admin, true)?;
                vec![RoomEvent::RoomArchived {}]
            }
            RoomCommand::JoinRoom { user_id } => {
                // Nobody joins a private room by themselves, admins included: they are invited.
                if !self.visible_to(user_id, false) {
                    return Err(RoomError::NotFound);
                }
                self.check(user_id, false, false)?;
                if self.is_member(user_id) {
                    return Err(RoomError::AlreadyMember);
                }
                vec![RoomEvent::MemberJoined { user_id }]
            }
            RoomCommand::LeaveRoom { user_id } => {
                self.check(user_id, false, false)?;
                if user_id == self.owner_id {
                    return Err(RoomError::OwnerStays);
                }
                if !self.is_member(user_id) {
                    return Err(RoomError::NotMember);
                }
                vec![RoomEvent::MemberLeft { user_id }]
            }
            RoomCommand::InviteMember { actor, user_id } => {
                self.check(actor.id, actor.admin, true)?;
                if self.is_member(user_id) {
                    return Err(RoomError::AlreadyMember);
                }
                vec![RoomEvent::MemberInvited { user_id, by: actor.id }]
            }
            RoomCommand::RemoveMember { actor, user_id } => {
                self.check(actor.id, actor.admin, true)?;
                if user_id == self.owner_id {
                    return Err(RoomError::OwnerStays);
                }
                if !self.is_member(user_id) {
                    return Err(RoomError::NotMember);
                }
                vec![RoomEvent::MemberRemoved { user_id, by: actor.id }]
            }
        };
        for event in events {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            RoomEvent::RoomCreated { name, topic, visibility, owner_id } => {
                self.created = true;
                self.name = name;
                self.topic = topic;
                self.visibility = visibility;
                self.owner_id = owner_id;
                self.members.insert(owner_id);
            }
            RoomEvent::RoomRenamed { name } => self.name = name,
            RoomEvent::RoomTopicChanged { topic } => self.topic = topic,
            RoomEvent::RoomArchived {} => self.archived = true,
            RoomEvent::MemberJoined { user_id } | RoomEvent::MemberInvited { user_id, .. } => {
                self.members.insert(user_id);
            }
            RoomEvent::MemberLeft { user_id } | RoomEvent::MemberRemoved { user_id, .. } => {
                self.members.remove(&user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type RoomTest = TestFramework<Room>;

    const OWNER: Uuid = Uuid::from_u128(1);
    const MEMBER: Uuid = Uuid::from_u128(2);
    const OUTSIDER: Uuid = Uuid::from_u128(3);
    const ADMIN: Uuid = Uuid::from_u128(4);

    fn owner() -> Actor {
        Actor { id: OWNER, admin: false }
    }
    fn member() -> Actor {
        Actor { id: MEMBER, admin: false }
    }
    fn outsider() -> Actor {
        Actor { id: OUTSIDER, admin: false }
    }
    fn admin() -> Actor {
        Actor { id: ADMIN, admin: true }
    }

    fn created(visibility: RoomVisibility) -> Vec<RoomEvent> {
        vec![
            RoomEvent::RoomCreated { name: "general".into(), topic: None, visibility, owner_id: OWNER },
            RoomEvent::MemberInvited { user_id: MEMBER, by: OWNER },
        ]
    }

    fn archived(visibility: RoomVisibility) -> Vec<RoomEvent> {
        let mut events = created(visibility);
        events.push(RoomEvent::RoomArchived {});
        events
    }

    fn name(raw: &str) -> RoomName {
        RoomName::parse(raw).expect("valid name")
    }

    #[test]
    fn create_makes_the_owner_the_first_member() {
        RoomTest::with(())
            .given_no_previous_events()
            .when(RoomCommand::CreateRoom {
                name: name("general"),
                topic: Topic::parse("hello").expect("valid"),
                visibility: RoomVisibility::Private,
                owner_id: OWNER,
            })
            .then_expect_events(vec![RoomEvent::RoomCreated {
                name: "general".into(),
                topic: Some("hello".into()),
                visibility: RoomVisibility::Private,
                owner_id: OWNER,
            }]);
        let mut room = Room::default();
        for event in created(RoomVisibility::Private) {
            room.apply(event);
        }
        assert!(room.is_member(OWNER) && room.is_member(MEMBER) && !room.is_member(OUTSIDER));
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::CreateRoom {
                name: name("again"),
                topic: None,
                visibility: RoomVisibility::Public,
                owner_id: OWNER,
            })
            .then_expect_error(RoomError::AlreadyCreated);
    }

    #[test]
    fn update_renames_and_changes_the_topic_for_the_owner_or_an_admin() {
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::UpdateRoom {
                name: Some(name("random")),
                topic: Some(Topic::parse("chat").expect("valid")),
                actor: owner(),
            })
            .then_expect_events(vec![
                RoomEvent::RoomRenamed { name: "random".into() },
                RoomEvent::RoomTopicChanged { topic: Some("chat".into()) },
            ]);
        // An admin who is not a member may, even in a private room.
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::UpdateRoom { name: None, topic: Some(None), actor: admin() })
            .then_expect_error(RoomError::Unchanged);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::UpdateRoom { name: Some(name("x")), topic: None, actor: admin() })
            .then_expect_events(vec![RoomEvent::RoomRenamed { name: "x".into() }]);
        // The same name is no change.
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::UpdateRoom { name: Some(name("general")), topic: None, actor: owner() })
            .then_expect_error(RoomError::Unchanged);
    }

    #[test]
    fn update_is_refused_to_members_outsiders_and_on_archived_rooms() {
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::UpdateRoom { name: Some(name("mine")), topic: None, actor: member() })
            .then_expect_error(RoomError::NotOwner);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::UpdateRoom { name: Some(name("mine")), topic: None, actor: outsider() })
            .then_expect_error(RoomError::NotOwner);
        // A private room does not exist for an outsider.
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::UpdateRoom { name: Some(name("mine")), topic: None, actor: outsider() })
            .then_expect_error(RoomError::NotFound);
        RoomTest::with(())
            .given(archived(RoomVisibility::Public))
            .when(RoomCommand::UpdateRoom { name: Some(name("mine")), topic: None, actor: owner() })
            .then_expect_error(RoomError::Archived);
        RoomTest::with(())
            .given_no_previous_events()
            .when(RoomCommand::UpdateRoom { name: Some(name("mine")), topic: None, actor: admin() })
            .then_expect_error(RoomError::NotFound);
    }

    #[test]
    fn archive_by_the_owner_or_an_admin_once() {
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::ArchiveRoom { actor: owner() })
            .then_expect_events(vec![RoomEvent::RoomArchived {}]);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::ArchiveRoom { actor: admin() })
            .then_expect_events(vec![RoomEvent::RoomArchived {}]);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::ArchiveRoom { actor: member() })
            .then_expect_error(RoomError::NotOwner);
        RoomTest::with(())
            .given(archived(RoomVisibility::Public))
            .when(RoomCommand::ArchiveRoom { actor: owner() })
            .then_expect_error(RoomError::Archived);
        RoomTest::with(())
            .given_no_previous_events()
            .when(RoomCommand::ArchiveRoom { actor: owner() })
            .then_expect_error(RoomError::NotFound);
    }

    #[test]
    fn anyone_joins_a_public_room_once_and_nobody_joins_a_private_one() {
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::JoinRoom { user_id: OUTSIDER })
            .then_expect_events(vec![RoomEvent::MemberJoined { user_id: OUTSIDER }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::JoinRoom { user_id: MEMBER })
            .then_expect_error(RoomError::AlreadyMember);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::JoinRoom { user_id: OUTSIDER })
            .then_expect_error(RoomError::NotFound);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::JoinRoom { user_id: ADMIN })
            .then_expect_error(RoomError::NotFound);
        RoomTest::with(())
            .given(archived(RoomVisibility::Public))
            .when(RoomCommand::JoinRoom { user_id: OUTSIDER })
            .then_expect_error(RoomError::Archived);
        RoomTest::with(())
            .given_no_previous_events()
            .when(RoomCommand::JoinRoom { user_id: OUTSIDER })
            .then_expect_error(RoomError::NotFound);
    }

    #[test]
    fn members_leave_but_the_owner_stays() {
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::LeaveRoom { user_id: MEMBER })
            .then_expect_events(vec![RoomEvent::MemberLeft { user_id: MEMBER }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::LeaveRoom { user_id: OWNER })
            .then_expect_error(RoomError::OwnerStays);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::LeaveRoom { user_id: OUTSIDER })
            .then_expect_error(RoomError::NotMember);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::LeaveRoom { user_id: OUTSIDER })
            .then_expect_error(RoomError::NotFound);
        let mut left = created(RoomVisibility::Public);
        left.push(RoomEvent::MemberLeft { user_id: MEMBER });
        RoomTest::with(())
            .given(left)
            .when(RoomCommand::LeaveRoom { user_id: MEMBER })
            .then_expect_error(RoomError::NotMember);
    }

    #[test]
    fn the_owner_or_an_admin_invites_and_removes() {
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: owner(), user_id: OUTSIDER })
            .then_expect_events(vec![RoomEvent::MemberInvited { user_id: OUTSIDER, by: OWNER }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: admin(), user_id: OUTSIDER })
            .then_expect_events(vec![RoomEvent::MemberInvited { user_id: OUTSIDER, by: ADMIN }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: owner(), user_id: MEMBER })
            .then_expect_error(RoomError::AlreadyMember);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::RemoveMember { actor: owner(), user_id: MEMBER })
            .then_expect_events(vec![RoomEvent::MemberRemoved { user_id: MEMBER, by: OWNER }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::RemoveMember { actor: admin(), user_id: MEMBER })
            .then_expect_events(vec![RoomEvent::MemberRemoved { user_id: MEMBER, by: ADMIN }]);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::RemoveMember { actor: admin(), user_id: OWNER })
            .then_expect_error(RoomError::OwnerStays);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::RemoveMember { actor: owner(), user_id: OUTSIDER })
            .then_expect_error(RoomError::NotMember);
    }

    #[test]
    fn members_and_outsiders_cannot_invite_or_remove() {
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: member(), user_id: OUTSIDER })
            .then_expect_error(RoomError::NotOwner);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::RemoveMember { actor: member(), user_id: OWNER })
            .then_expect_error(RoomError::NotOwner);
        RoomTest::with(())
            .given(created(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: outsider(), user_id: OUTSIDER })
            .then_expect_error(RoomError::NotFound);
        RoomTest::with(())
            .given(created(RoomVisibility::Public))
            .when(RoomCommand::RemoveMember { actor: outsider(), user_id: MEMBER })
            .then_expect_error(RoomError::NotOwner);
        RoomTest::with(())
            .given(archived(RoomVisibility::Private))
            .when(RoomCommand::InviteMember { actor: owner(), user_id: OUTSIDER })
            .then_expect_error(RoomError::Archived);
    }
}
