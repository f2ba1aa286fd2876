//! The socket protocol's frames: what a client may send (parsed strictly: anything else is
//! garbage and closes the socket 4400) and the JSON of what the server sends.

use axum::extract::ws::Utf8Bytes;
use cairn_platform::http::ApiError;
use cairn_platform::rooms::MessageView;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

/// Close codes the server uses (besides the standard 1001, 1003, 1007 and 1009).
pub mod close {
    /// Not authenticated, token expired or session revoked.
    pub const UNAUTHENTICATED: u16 = 4401;
    /// The user was deactivated or deleted.
    pub const USER_GONE: u16 = 4403;
    /// Not JSON, not an object, unknown `type`, missing fields.
    pub const GARBAGE: u16 = 4400;
    /// More frames per second than `CAIRN_WS_FRAME_RATE`.
    pub const RATE: u16 = 4429;
    /// The outbound queue is full: the client reads too slowly.
    pub const TOO_SLOW: u16 = 4408;
    /// The server is shutting down: reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame.
    pub const UNSUPPORTED: u16 = 1003;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Authenticates (first), or extends the socket with a fresh token (later).
    Auth {
        /// An access token.
        token: String,
    },
    /// Subscribes to a room, replaying what came after `after` first.
    Join {
        /// The room.
        room_id: Uuid,
        /// The position of the last message the client saw, `<tx>.<pos>`.
        #[serde(default)]
        after: Option<String>,
    },
    /// Unsubscribes.
    Leave {
        /// The room.
        room_id: Uuid,
    },
    /// The user is typing in a joined room.
    Typing {
        /// The room.
        room_id: Uuid,
    },
    /// The user stopped typing.
    StopTyping {
        /// The room.
        room_id: Uuid,
    },
    /// Sends a message, as `POST /api/v1/rooms/{id}/messages` would.
    Send {
        /// The room.
        room_id: Uuid,
        /// The text.
        body: String,
        /// The idempotency key; echoed in the `ack` or `error`.
        client_id: String,
        /// Attached file ids.
        #[serde(default)]
        attachments: Vec<Uuid>,
    },
    /// Keep-alive at the application level.
    Ping,
}

impl ClientFrame {
    /// Parses a text frame; `None` for garbage.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

fn text(value: &Value) -> Utf8Bytes {
    Utf8Bytes::from(value.to_string())
}

/// `{"type":"ready","user_id"}`.
#[must_use]
pub fn ready(user: Uuid) -> Utf8Bytes {
    text(&json!({"type": "ready", "user_id": user}))
}

/// `{"type":"pong"}`.
#[must_use]
pub fn pong() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"type":"pong"}"#)
}

/// `{"type":"joined","room_id","presence":[…]}`.
#[must_use]
pub fn joined(room: Uuid, presence: &[Uuid]) -> Utf8Bytes {
    text(&json!({"type": "joined", "room_id": room, "presence": presence}))
}

/// `{"type":"left","room_id"}`.
#[must_use]
pub fn left(room: Uuid) -> Utf8Bytes {
    text(&json!({"type": "left", "room_id": room}))
}

/// `{"type":"ack","client_id","message_id","position"}`.
#[must_use]
pub fn ack(client_id: &str, message: &MessageView) -> Utf8Bytes {
    text(&json!({"type": "ack", "client_id": client_id, "message_id": message.id, "position": message.position}))
}

/// `{"type":"message", …MessageView}`.
#[must_use]
pub fn message(view: &MessageView) -> Utf8Bytes {
    let mut value = serde_json::to_value(view).unwrap_or_else(|_| json!({}));
    if let Value::Object(map) = &mut value {
        map.insert("type".to_owned(), Value::from("message"));
    }
    text(&value)
}

/// `{"type":"message_edited","id","room_id","body","edited_at","position"}`.
#[must_use]
pub fn message_edited(id: Uuid, room: Uuid, body: Option<&str>, at: DateTime<Utc>, position: &str) -> Utf8Bytes {
    text(
        &json!({"type": "message_edited", "id": id, "room_id": room, "body": body, "edited_at": at, "position": position}),
    )
}

/// `{"type":"message_deleted","id","room_id","deleted_at","position"}`.
#[must_use]
pub fn message_deleted(id: Uuid, room: Uuid, at: DateTime<Utc>, position: &str) -> Utf8Bytes {
    text(&json!({"type": "message_deleted", "id": id, "room_id": room, "deleted_at": at, "position": position}))
}

/// `{"type":"member_joined"|"member_left","room_id","user_id","by"?}`.
#[must_use]
pub fn member(kind: &str, room: Uuid, user: Uuid, by: Option<Uuid>) -> Utf8Bytes {
    let mut value = json!({"type": kind, "room_id": room, "user_id": user});
    if let (Some(by), Value::Object(map)) = (by, &mut value) {
        map.insert("by".to_owned(), json!(by));
    }
    text(&value)
}

/// `{"type":"room_updated","room_id", …changes}`.
#[must_use]
pub fn room_updated(room: Uuid, changes: serde_json::Map<String, Value>) -> Utf8Bytes {
    let mut map = changes;
    map.insert("type".to_owned(), Value::from("room_updated"));
    map.insert("room_id".to_owned(), json!(room));
    text(&Value::Object(map))
}

/// `{"type":"typing"|"stop_typing","room_id","user_id"}`.
#[must_use]
pub fn typing(kind: TypingKind, room: Uuid, user: Uuid) -> Utf8Bytes {
    text(&json!({"type": kind.as_str(), "room_id": room, "user_id": user}))
}

/// `{"type":"presence","room_id","user_id","online"}`.
#[must_use]
pub fn presence(room: Uuid, user: Uuid, online: bool) -> Utf8Bytes {
    text(&json!({"type": "presence", "room_id": room, "user_id": user, "online": online}))
}

/// `{"type":"error","code","message","room_id"?,"client_id"?}`.
#[must_use]
pub fn error(code: &str, message: &str, room: Option<Uuid>, client_id: Option<&str>) -> Utf8Bytes {
    let mut value = json!({"type": "error", "code": code, "message": message});
    if let Value::Object(map) = &mut value {
        if let Some(room) = room {
            map.insert("room_id".to_owned(), json!(room));
        }
        if let Some(client_id) = client_id {
            map.insert("client_id".to_owned(), json!(client_id));
        }
    }
    text(&value)
}

/// The `error` frame of an API error: the same code the HTTP API would answer with.
#[must_use]
pub fn api_error(error: &ApiError, room: Option<Uuid>, client_id: Option<&str>) -> Utf8Bytes {
    let (status, code) = error.status_and_code();
    // 5xx details are logged, never sent, as over HTTP.
    let message = if status.is_server_error() {
        tracing::error!(error = %error, "socket request failed");
        "the server could not do this now; try again".to_owned()
    } else {
        error.to_string()
    };
    self::error(code, &message, room, client_id)
}

/// Typing started or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingKind {
    /// `typing`.
    Typing,
    /// `stop_typing`.
    StopTyping,
}

impl TypingKind {
    /// The frame type.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Typing => "typing",
            Self::StopTyping => "stop_typing",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn client_frames_parse_strictly() {
        let room = Uuid::now_v7();
        assert_eq!(ClientFrame::parse(r#"{"type":"ping"}"#), Some(ClientFrame::Ping));
        assert_eq!(
            ClientFrame::parse(&format!(r#"{{"type":"join","room_id":"{room}","after":"1.2"}}"#)),
            Some(ClientFrame::Join { room_id: room, after: Some("1.2".into()) })
        );
        assert_eq!(ClientFrame::parse("not json"), None);
        assert_eq!(ClientFrame::parse("[1]"), None);
        assert_eq!(ClientFrame::parse(r#"{"type":"dance"}"#), None);
        assert_eq!(ClientFrame::parse(r#"{"type":"join"}"#), None, "room_id missing");
        assert_eq!(ClientFrame::parse(&format!(r#"{{"type":"send","room_id":"{room}","body":"x"}}"#)), None);
    }

    #[test]
    fn server_frames_carry_their_type() {
        let room = Uuid::now_v7();
        let v: Value = serde_json::from_str(&error("NOT_FOUND", "no", Some(room), Some("c1"))).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["client_id"], "c1");
        assert_eq!(v["room_id"], room.to_string());
        let v: Value = serde_json::from_str(&member("member_left", room, room, None)).unwrap();
        assert!(v.get("by").is_none());
    }
}
