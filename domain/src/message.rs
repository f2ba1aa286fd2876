//! The `Message` aggregate: one chat message, its edits and its deletion. Each message is its
//! own short stream, so sending never loads a room's history.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::MessageBody;

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

/// A message as the command side sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Whether MessageSent happened.
    pub sent: bool,
    /// Its room.
    pub room_id: Uuid,
    /// Who sent it.
    pub author_id: Uuid,
    /// The current text.
    pub body: String,
    /// Whether it was deleted.
    pub deleted: bool,
}

/// What the sender's standing in the room was when the send was decided, as the handler found
/// it in the `Room` aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomAccess {
    /// The sender is a member of a room that takes messages.
    Member,
    /// The sender is not a member.
    NotMember {
        /// Whether the room is private (then it is "not found" to the sender).
        private: bool,
    },
    /// The room is archived.
    Archived,
    /// There is no such room.
    Missing,
}

/// What can be asked of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageCommand {
    /// Send it.
    SendMessage {
        /// The room.
        room_id: Uuid,
        /// The sender.
        author_id: Uuid,
        /// The text.
        body: MessageBody,
        /// The sender's idempotency key.
        client_id: Option<String>,
        /// Attached file ids.
        attachments: Vec<Uuid>,
        /// The sender's standing in the room.
        room: RoomAccess,
    },
    /// Change its text (the author only).
    EditMessage {
        /// Who asks.
        actor: Uuid,
        /// The new text.
        body: MessageBody,
        /// Whether the room is archived now.
        room_archived: bool,
    },
    /// Delete it (the author, or a moderator: the room's owner or an admin).
    DeleteMessage {
        /// Who asks.
        actor: Uuid,
        /// Whether `actor` is the room's owner or an admin.
        moderator: bool,
    },
}

/// Why a message command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// This id was sent already (a retry with the same `client_id`): answered with the first message.
    #[error("message already sent")]
    AlreadySent,
    /// No such message (404).
    #[error("message not found")]
    NotFound,
    /// No such room, or a private room the sender is not in (404).
    #[error("room not found")]
    RoomNotFound,
    /// Only the author may do this (403).
    #[error("only the author may do this")]
    NotAuthor,
    /// The message was deleted (404).
    #[error("message was deleted")]
    Deleted,
    /// The room is archived and read-only (409).
    #[error("room is archived")]
    RoomArchived,
    /// The sender has not joined the (public) room (403).
    #[error("join the room first")]
    NotMember,
    /// An edit to the text it already has (409).
    #[error("the message already has this text")]
    Unchanged,
}

impl Aggregate for Message {
    const TYPE: &'static str = "Message";
    type Command = MessageCommand;
    type Event = MessageEvent;
    type Error = MessageError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            MessageCommand::SendMessage { room_id, author_id, body, client_id, attachments, room } => {
                // First: a retry of a message that got in is answered with it, whatever the room is now.
                if self.sent {
                    return Err(MessageError::AlreadySent);
                }
                match room {
                    RoomAccess::Member => {}
                    RoomAccess::Missing | RoomAccess::NotMember { private: true } => {
                        return Err(MessageError::RoomNotFound)
                    }
                    RoomAccess::NotMember { private: false } => return Err(MessageError::NotMember),
                    RoomAccess::Archived => return Err(MessageError::RoomArchived),
                }
                MessageEvent::MessageSent { room_id, author_id, body: body.into_string(), client_id, attachments }
            }
            MessageCommand::EditMessage { actor, body, room_archived } => {
                self.check_live()?;
                if actor != self.author_id {
                    return Err(MessageError::NotAuthor);
                }
                if room_archived {
                    return Err(MessageError::RoomArchived);
                }
                if body.as_str() == self.body {
                    return Err(MessageError::Unchanged);
                }
                MessageEvent::MessageEdited { room_id: self.room_id, body: body.into_string() }
            }
            MessageCommand::DeleteMessage { actor, moderator } => {
                self.check_live()?;
                if actor != self.author_id && !moderator {
                    return Err(MessageError::NotAuthor);
                }
                MessageEvent::MessageDeleted { room_id: self.room_id, by: actor }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            MessageEvent::MessageSent { room_id, author_id, body, .. } => {
                self.sent = true;
                self.room_id = room_id;
                self.author_id = author_id;
                self.body = body;
            }
            MessageEvent::MessageEdited { body, .. } => self.body = body,
            MessageEvent::MessageDeleted { .. } => {
                self.deleted = true;
                self.body.clear();
            }
        }
    }
}

impl Message {
    fn check_live(&self) -> Result<(), MessageError> {
        if !self.sent {
            return Err(MessageError::NotFound);
        }
        if self.deleted {
            return Err(MessageError::Deleted);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type MessageTest = TestFramework<Message>;

    const ROOM: Uuid = Uuid::from_u128(10);
    const AUTHOR: Uuid = Uuid::from_u128(1);
    const OTHER: Uuid = Uuid::from_u128(2);

    fn body(raw: &str) -> MessageBody {
        MessageBody::parse(raw).expect("valid body")
    }

    fn send(room: RoomAccess) -> MessageCommand {
        MessageCommand::SendMessage {
            room_id: ROOM,
            author_id: AUTHOR,
            body: body(" <b>hi</b> "),
            client_id: Some("c-1".into()),
            attachments: vec![Uuid::from_u128(99)],
            room,
        }
    }

    fn sent() -> Vec<MessageEvent> {
        vec![MessageEvent::MessageSent {
            room_id: ROOM,
            author_id: AUTHOR,
            body: "<b>hi</b>".into(),
            client_id: Some("c-1".into()),
            attachments: vec![],
        }]
    }

    fn deleted() -> Vec<MessageEvent> {
        let mut events = sent();
        events.push(MessageEvent::MessageDeleted { room_id: ROOM, by: AUTHOR });
        events
    }

    #[test]
    fn a_member_sends_the_trimmed_text_verbatim() {
        MessageTest::with(()).given_no_previous_events().when(send(RoomAccess::Member)).then_expect_events(vec![
            MessageEvent::MessageSent {
                room_id: ROOM,
                author_id: AUTHOR,
                body: "<b>hi</b>".into(),
                client_id: Some("c-1".into()),
                attachments: vec![Uuid::from_u128(99)],
            },
        ]);
    }

    #[test]
    fn sends_outside_membership_are_refused() {
        MessageTest::with(())
            .given_no_previous_events()
            .when(send(RoomAccess::NotMember { private: false }))
            .then_expect_error(MessageError::NotMember);
        MessageTest::with(())
            .given_no_previous_events()
            .when(send(RoomAccess::NotMember { private: true }))
            .then_expect_error(MessageError::RoomNotFound);
        MessageTest::with(())
            .given_no_previous_events()
            .when(send(RoomAccess::Missing))
            .then_expect_error(MessageError::RoomNotFound);
        MessageTest::with(())
            .given_no_previous_events()
            .when(send(RoomAccess::Archived))
            .then_expect_error(MessageError::RoomArchived);
    }

    #[test]
    fn a_second_send_of_one_id_is_already_sent_whatever_the_room_is_now() {
        MessageTest::with(()).given(sent()).when(send(RoomAccess::Member)).then_expect_error(MessageError::AlreadySent);
        MessageTest::with(())
            .given(sent())
            .when(send(RoomAccess::Archived))
            .then_expect_error(MessageError::AlreadySent);
    }

    #[test]
    fn the_author_edits() {
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::EditMessage { actor: AUTHOR, body: body("new\ntext"), room_archived: false })
            .then_expect_events(vec![MessageEvent::MessageEdited { room_id: ROOM, body: "new\ntext".into() }]);
    }

    #[test]
    fn edits_are_refused_to_others_on_deleted_missing_archived_or_unchanged_messages() {
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::EditMessage { actor: OTHER, body: body("mine now"), room_archived: false })
            .then_expect_error(MessageError::NotAuthor);
        MessageTest::with(())
            .given(deleted())
            .when(MessageCommand::EditMessage { actor: AUTHOR, body: body("back"), room_archived: false })
            .then_expect_error(MessageError::Deleted);
        MessageTest::with(())
            .given_no_previous_events()
            .when(MessageCommand::EditMessage { actor: AUTHOR, body: body("x"), room_archived: false })
            .then_expect_error(MessageError::NotFound);
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::EditMessage { actor: AUTHOR, body: body("later"), room_archived: true })
            .then_expect_error(MessageError::RoomArchived);
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::EditMessage { actor: AUTHOR, body: body("<b>hi</b>"), room_archived: false })
            .then_expect_error(MessageError::Unchanged);
    }

    #[test]
    fn the_author_or_a_moderator_deletes_once() {
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::DeleteMessage { actor: AUTHOR, moderator: false })
            .then_expect_events(vec![MessageEvent::MessageDeleted { room_id: ROOM, by: AUTHOR }]);
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::DeleteMessage { actor: OTHER, moderator: true })
            .then_expect_events(vec![MessageEvent::MessageDeleted { room_id: ROOM, by: OTHER }]);
        MessageTest::with(())
            .given(sent())
            .when(MessageCommand::DeleteMessage { actor: OTHER, moderator: false })
            .then_expect_error(MessageError::NotAuthor);
        MessageTest::with(())
            .given(deleted())
            .when(MessageCommand::DeleteMessage { actor: AUTHOR, moderator: false })
            .then_expect_error(MessageError::Deleted);
        MessageTest::with(())
            .given_no_previous_events()
            .when(MessageCommand::DeleteMessage { actor: AUTHOR, moderator: true })
            .then_expect_error(MessageError::NotFound);
    }

    #[test]
    fn a_deleted_message_forgets_its_text() {
        let mut message = Message::default();
        for event in deleted() {
            message.apply(event);
        }
        assert!(message.deleted && message.body.is_empty());
    }
}
