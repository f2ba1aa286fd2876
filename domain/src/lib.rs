//! The domain of cairn: aggregates, their commands and events, and the rules that refuse
//! commands. Pure: no I/O, no clock, no randomness. Everything that changes state is an event
//! appended by `cqrs-es`; everything a client reads is a projection of those events.
//!
//! - [`user`]: the `User` aggregate (registration, roles, deactivation, profile, password, lockout).
//! - [`session`]: the `Session` aggregate (a sign-in and its rotating refresh-token family).
//! - [`role`]: the `Role` aggregate (a named set of permissions).
//! - [`roles`]: the seeded role catalogue and its permissions.
//! - [`room`]: the `Room` aggregate (settings and membership of a chat room).
//! - [`message`]: the `Message` aggregate (one chat message, its edits and deletion).
//! - [`file`]: the `File` aggregate (a stored file's facts, its shares and its deletion).
//! - [`job`]: the `Job` aggregate (what was asked of the workers, operators' retries and cancels, how runs ended).
//! - [`schedule`]: the `Schedule` aggregate (cron schedules defined over the API).
//! - [`parked`]: the `ParkedEvent` aggregate (operators' retries and skips of parked events).
//! - [`upcast`]: reading events stored under older versions as the current shape.
//! - [`values`]: newtypes that parse input (`Email`, `DisplayName`, `RoleName`, `RoomName`, `Topic`, `MessageBody`, `FileName`), and `Secret`, which never prints.

pub mod file;
pub mod job;
pub mod message;
pub mod parked;
pub mod role;
pub mod roles;
pub mod room;
pub mod schedule;
pub mod session;
pub mod upcast;
pub mod user;
pub mod values;

pub use file::{File, FileActor, FileCommand, FileError, FileEvent, FileVisibility};
pub use job::{Job, JobCommand, JobError, JobEvent, JobOutcome, JobRequest};
pub use message::{Message, MessageCommand, MessageError, MessageEvent, RoomAccess};
pub use parked::{parked_event_id, ParkedEvent, ParkedEventCommand, ParkedEventError, ParkedEventEvent};
pub use role::{Role, RoleCommand, RoleError, RoleEvent};
pub use room::{Actor, Room, RoomCommand, RoomError, RoomEvent, RoomVisibility};
pub use schedule::{Schedule, ScheduleCommand, ScheduleError, ScheduleEvent, ScheduleSpec};
pub use session::{RefreshOutcome, RevokeReason, Session, SessionCommand, SessionError, SessionEvent, SessionPolicy};
pub use user::{AccountLock, LockoutPolicy, SessionsEndedReason, User, UserCommand, UserError, UserEvent, UserStatus};
pub use values::{DisplayName, Email, FileName, MessageBody, RoleName, RoomName, Secret, Topic, ValueError};

#[cfg(test)]
mod redaction_tests {
    use chrono::{DateTime, Duration, Utc};
    use cqrs_es::Aggregate;
    use uuid::Uuid;

    use super::*;

    const PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$secret-password-hash";
    const REFRESH_HASH: &str = "5f4dcc3b5aa765d61d8327deb882cf99-secret-refresh-hash";

    fn assert_redacted(printed: &str) {
        assert!(!printed.contains("secret-password-hash"), "a password hash printed: {printed}");
        assert!(!printed.contains("secret-refresh-hash"), "a refresh-token hash printed: {printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }

    #[test]
    fn users_their_commands_and_events_print_no_password_hash() {
        let registered = UserEvent::UserRegistered {
            email: "ada@example.com".into(),
            display_name: "Ada".into(),
            password_hash: PASSWORD_HASH.into(),
            roles: vec!["user".into()],
        };
        let mut user = User::default();
        user.apply(registered.clone());
        assert_eq!(user.password_hash.expose(), PASSWORD_HASH, "the hash itself is kept");
        let events = [
            registered,
            UserEvent::PasswordChanged { password_hash: PASSWORD_HASH.into(), session_version: 1 },
            UserEvent::PasswordReset { password_hash: PASSWORD_HASH.into(), session_version: 2 },
        ];
        let commands = [
            UserCommand::RegisterUser {
                email: Email::parse("ada@example.com").expect("valid"),
                display_name: DisplayName::parse("Ada").expect("valid"),
                password_hash: PASSWORD_HASH.into(),
                roles: vec![],
            },
            UserCommand::ChangePassword { password_hash: PASSWORD_HASH.into() },
            UserCommand::ResetPassword { password_hash: PASSWORD_HASH.into() },
        ];
        assert_redacted(&format!("{user:?} {user:#?}"));
        assert_redacted(&format!("{events:?} {events:#?}"));
        assert_redacted(&format!("{commands:?}"));
        // Stored events keep the bare string.
        let json = serde_json::to_value(&events[1]).expect("serialisable");
        assert_eq!(json["PasswordChanged"]["password_hash"], PASSWORD_HASH);
    }

    #[test]
    fn sessions_their_commands_and_events_print_no_token_hash() {
        let at: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let started = SessionEvent::SessionStarted {
            user_id: Uuid::from_u128(1),
            session_version: 0,
            refresh_hash: REFRESH_HASH.into(),
            started_at: at,
            expires_at: at + Duration::days(7),
            device: None,
            ip: None,
        };
        let refreshed = SessionEvent::SessionRefreshed { refresh_hash: REFRESH_HASH.into(), at, ip: None };
        let mut session = Session::default();
        session.apply(started.clone());
        session.apply(refreshed.clone());
        let command = SessionCommand::RefreshSession {
            presented_hash: REFRESH_HASH.into(),
            new_hash: REFRESH_HASH.into(),
            at,
            user_session_version: 0,
            policy: SessionPolicy {
                absolute: Duration::days(7),
                idle: Duration::days(1),
                grace: Duration::seconds(10),
            },
            ip: None,
        };
        assert_redacted(&format!("{session:?} {started:?} {refreshed:?} {command:?}"));
    }
}
