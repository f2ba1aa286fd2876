//! The `Session` aggregate: one sign-in and its refresh-token family.
//!
//! A refresh token is `<session id>.<secret>`; only SHA-256 hashes of secrets are stored. Each
//! refresh rotates the secret. Presenting an older secret is reuse: the family is revoked, except
//! that the secret rotated away from in the last few seconds (two browser tabs refreshing at once)
//! is answered with the current session instead. A session also dies when its user's session
//! version moves past the one it is bound to (sign-out everywhere, password reset, deactivation).

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::Secret;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevokeReason {
    /// The user signed out.
    Logout,
    /// The user ended it from their session list.
    UserRevoked,
    /// A rotated refresh token was presented again: the family may be stolen.
    RefreshTokenReuse,
}

/// How long sessions live and how refreshes are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// Longest life from sign-in.
    pub absolute: Duration,
    /// Longest gap between refreshes.
    pub idle: Duration,
    /// How long the secret just rotated away from is still answered with the current session.
    pub grace: Duration,
}

/// A session as the command side sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Whose.
    pub user_id: Option<Uuid>,
    /// The user session version it is bound to.
    pub session_version: u64,
    /// Hash of the current secret.
    pub current_hash: Secret,
    /// Hashes of every secret rotated away from, oldest first.
    pub previous_hashes: Vec<Secret>,
    /// When it began.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ends whatever happens.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last sign-in or refresh.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Why it ended, if it did.
    pub revoked: Option<RevokeReason>,
}

/// What can be asked of a session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionCommand {
    /// Sign-in: a new session and token family.
    StartSession {
        /// Whose.
        user_id: Uuid,
        /// The user's current session version.
        session_version: u64,
        /// Hash of the first secret.
        refresh_hash: Secret,
        /// Now.
        at: DateTime<Utc>,
        /// Absolute lifetime.
        lifetime: Duration,
        /// User agent.
        device: Option<String>,
        /// Client IP.
        ip: Option<String>,
    },
    /// Exchange a secret for the next one.
    RefreshSession {
        /// Hash of the presented secret.
        presented_hash: Secret,
        /// Hash of the next secret.
        new_hash: Secret,
        /// Now.
        at: DateTime<Utc>,
        /// The user's current session version.
        user_session_version: u64,
        /// Lifetimes and grace.
        policy: SessionPolicy,
        /// Client IP.
        ip: Option<String>,
    },
    /// Keep this session alive across a password change that ended the others.
    RebindSession {
        /// The user's new session version.
        session_version: u64,
    },
    /// End the session.
    RevokeSession {
        /// Why.
        reason: RevokeReason,
    },
}

/// What happened to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEvent {
    /// A user signed in.
    SessionStarted {
        /// Whose.
        user_id: Uuid,
        /// The user session version it is bound to.
        session_version: u64,
        /// Hash of the first secret.
        refresh_hash: Secret,
        /// When.
        started_at: DateTime<Utc>,
        /// Absolute end.
        expires_at: DateTime<Utc>,
        /// User agent.
        device: Option<String>,
        /// Client IP.
        ip: Option<String>,
    },
    /// The refresh token was rotated.
    SessionRefreshed {
        /// Hash of the new secret.
        refresh_hash: Secret,
        /// When.
        at: DateTime<Utc>,
        /// Client IP.
        ip: Option<String>,
    },
    /// Bound to a new user session version (password change from this session).
    SessionRebound {
        /// The version.
        session_version: u64,
    },
    /// The session ended.
    SessionRevoked {
        /// Whose (so consumers need no lookup).
        user_id: Uuid,
        /// Why.
        reason: RevokeReason,
    },
}

impl DomainEvent for SessionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::SessionStarted { .. } => "SessionStarted",
            Self::SessionRefreshed { .. } => "SessionRefreshed",
            Self::SessionRebound { .. } => "SessionRebound",
            Self::SessionRevoked { .. } => "SessionRevoked",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a session command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// No such session, or the token does not belong to it.
    #[error("refresh token is not valid")]
    UnknownToken,
    /// Already started.
    #[error("session already exists")]
    AlreadyStarted,
    /// Ended.
    #[error("session has ended")]
    Revoked,
    /// Past its absolute lifetime.
    #[error("session has expired; sign in again")]
    Expired,
    /// Not refreshed for too long.
    #[error("session was idle too long; sign in again")]
    IdleTimeout,
    /// The user's sessions were ended after it began.
    #[error("session has ended; sign in again")]
    Superseded,
}

/// How a refresh will be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The current secret: rotate it.
    Rotate,
    /// The secret rotated away from moments ago: answer with the current session, no rotation.
    Grace,
    /// An older secret: revoke the family.
    Reuse,
    /// Refused.
    Refused(SessionError),
}

impl Session {
    /// Whether the session is usable at `at` for a user now at `user_session_version`.
    ///
    /// # Errors
    /// Why not.
    pub fn check_alive(
        &self,
        at: DateTime<Utc>,
        user_session_version: u64,
        idle: Duration,
    ) -> Result<(), SessionError> {
        if self.user_id.is_none() {
            return Err(SessionError::UnknownToken);
        }
        if self.revoked.is_some() {
            return Err(SessionError::Revoked);
        }
        if self.expires_at.is_some_and(|e| at >= e) {
            return Err(SessionError::Expired);
        }
        if self.last_used_at.is_some_and(|u| at - u >= idle) {
            return Err(SessionError::IdleTimeout);
        }
        if user_session_version > self.session_version {
            return Err(SessionError::Superseded);
        }
        Ok(())
    }

    /// Judges a refresh with `presented_hash` at `at`.
    #[must_use]
    pub fn refresh_outcome(
        &self,
        presented_hash: &str,
        at: DateTime<Utc>,
        user_session_version: u64,
        policy: SessionPolicy,
    ) -> RefreshOutcome {
        if self.user_id.is_none() {
            return RefreshOutcome::Refused(SessionError::UnknownToken);
        }
        let is_current = presented_hash == self.current_hash.expose();
        let position = self.previous_hashes.iter().position(|h| h.expose() == presented_hash);
        if !is_current && position.is_none() {
            return RefreshOutcome::Refused(SessionError::UnknownToken);
        }
        if let Err(e) = self.check_alive(at, user_session_version, policy.idle) {
            return RefreshOutcome::Refused(e);
        }
        if is_current {
            return RefreshOutcome::Rotate;
        }
        let just_rotated = position == Some(self.previous_hashes.len() - 1)
            && self.last_used_at.is_some_and(|u| at - u <= policy.grace);
        if just_rotated {
            RefreshOutcome::Grace
        } else {
            RefreshOutcome::Reuse
        }
    }
}

impl Aggregate for Session {
    const TYPE: &'static str = "Session";
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = SessionError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            SessionCommand::StartSession { user_id, session_version, refresh_hash, at, lifetime, device, ip } => {
                if self.user_id.is_some() {
                    return Err(SessionError::AlreadyStarted);
                }
                SessionEvent::SessionStarted {
                    user_id,
                    session_version,
                    refresh_hash,
                    started_at: at,
                    expires_at: at + lifetime,
                    device,
                    ip,
                }
            }
            SessionCommand::RefreshSession { presented_hash, new_hash, at, user_session_version, policy, ip } => {
                match self.refresh_outcome(presented_hash.expose(), at, user_session_version, policy) {
                    RefreshOutcome::Rotate => SessionEvent::SessionRefreshed { refresh_hash: new_hash, at, ip },
                    RefreshOutcome::Grace => return Ok(()),
                    RefreshOutcome::Reuse => SessionEvent::SessionRevoked {
                        user_id: self.user_id.unwrap_or_default(),
                        reason: RevokeReason::RefreshTokenReuse,
                    },
                    RefreshOutcome::Refused(e) => return Err(e),
                }
            }
            SessionCommand::RebindSession { session_version } => {
                if self.user_id.is_none() {
                    return Err(SessionError::UnknownToken);
                }
                if self.revoked.is_some() {
                    return Err(SessionError::Revoked);
                }
                SessionEvent::SessionRebound { session_version }
            }
            SessionCommand::RevokeSession { reason } => {
                let Some(user_id) = self.user_id else { return Err(SessionError::UnknownToken) };
                if self.revoked.is_some() {
                    return Err(SessionError::Revoked);
                }
                SessionEvent::SessionRevoked { user_id, reason }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            SessionEvent::SessionStarted { user_id, session_version, refresh_hash, started_at, expires_at, .. } => {
                self.user_id = Some(user_id);
                self.session_version = session_version;
                self.current_hash = refresh_hash;
                self.started_at = Some(started_at);
                self.expires_at = Some(expires_at);
                self.last_used_at = Some(started_at);
            }
            SessionEvent::SessionRefreshed { refresh_hash, at, .. } => {
                let old = std::mem::replace(&mut self.current_hash, refresh_hash);
                self.previous_hashes.push(old);
                self.last_used_at = Some(at);
            }
            SessionEvent::SessionRebound { session_version } => self.session_version = session_version,
            SessionEvent::SessionRevoked { reason, .. } => self.revoked = Some(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type SessionTest = TestFramework<Session>;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn user() -> Uuid {
        Uuid::from_u128(7)
    }

    fn policy() -> SessionPolicy {
        SessionPolicy { absolute: Duration::days(7), idle: Duration::hours(24), grace: Duration::seconds(10) }
    }

    fn started() -> SessionEvent {
        SessionEvent::SessionStarted {
            user_id: user(),
            session_version: 0,
            refresh_hash: "h1".into(),
            started_at: t(0),
            expires_at: t(7 * 86_400),
            device: None,
            ip: None,
        }
    }

    fn refreshed(hash: &str, at: i64) -> SessionEvent {
        SessionEvent::SessionRefreshed { refresh_hash: hash.into(), at: t(at), ip: None }
    }

    fn refresh(presented: &str, at: i64, user_sv: u64) -> SessionCommand {
        SessionCommand::RefreshSession {
            presented_hash: presented.into(),
            new_hash: "next".into(),
            at: t(at),
            user_session_version: user_sv,
            policy: policy(),
            ip: None,
        }
    }

    #[test]
    fn start_session() {
        SessionTest::with(())
            .given_no_previous_events()
            .when(SessionCommand::StartSession {
                user_id: user(),
                session_version: 0,
                refresh_hash: "h1".into(),
                at: t(0),
                lifetime: Duration::days(7),
                device: None,
                ip: None,
            })
            .then_expect_events(vec![started()]);
    }

    #[test]
    fn refresh_with_the_current_secret_rotates() {
        SessionTest::with(())
            .given(vec![started()])
            .when(refresh("h1", 60, 0))
            .then_expect_events(vec![refreshed("next", 60)]);
    }

    #[test]
    fn the_secret_just_rotated_away_from_is_answered_within_the_grace_interval() {
        SessionTest::with(())
            .given(vec![started(), refreshed("h2", 60)])
            .when(refresh("h1", 65, 0))
            .then_expect_events(vec![]);
    }

    #[test]
    fn reuse_after_the_grace_interval_revokes_the_family() {
        SessionTest::with(())
            .given(vec![started(), refreshed("h2", 60)])
            .when(refresh("h1", 80, 0))
            .then_expect_events(vec![SessionEvent::SessionRevoked {
                user_id: user(),
                reason: RevokeReason::RefreshTokenReuse,
            }]);
    }

    #[test]
    fn reuse_of_an_older_secret_revokes_even_within_the_grace_interval() {
        SessionTest::with(())
            .given(vec![started(), refreshed("h2", 60), refreshed("h3", 61)])
            .when(refresh("h1", 62, 0))
            .then_expect_events(vec![SessionEvent::SessionRevoked {
                user_id: user(),
                reason: RevokeReason::RefreshTokenReuse,
            }]);
    }

    #[test]
    fn unknown_secret_is_refused() {
        SessionTest::with(())
            .given(vec![started()])
            .when(refresh("nope", 60, 0))
            .then_expect_error(SessionError::UnknownToken);
    }

    #[test]
    fn expired_idle_revoked_and_superseded_sessions_refuse_refresh() {
        SessionTest::with(())
            .given(vec![started()])
            .when(refresh("h1", 7 * 86_400, 0))
            .then_expect_error(SessionError::Expired);
        SessionTest::with(())
            .given(vec![started()])
            .when(refresh("h1", 86_400, 0))
            .then_expect_error(SessionError::IdleTimeout);
        SessionTest::with(())
            .given(vec![started(), SessionEvent::SessionRevoked { user_id: user(), reason: RevokeReason::Logout }])
            .when(refresh("h1", 60, 0))
            .then_expect_error(SessionError::Revoked);
        SessionTest::with(())
            .given(vec![started()])
            .when(refresh("h1", 60, 1))
            .then_expect_error(SessionError::Superseded);
    }

    #[test]
    fn a_rebound_session_survives_the_version_it_was_rebound_to() {
        SessionTest::with(())
            .given(vec![started(), SessionEvent::SessionRebound { session_version: 1 }])
            .when(refresh("h1", 60, 1))
            .then_expect_events(vec![refreshed("next", 60)]);
    }

    #[test]
    fn revoke_twice_is_refused() {
        SessionTest::with(())
            .given(vec![started()])
            .when(SessionCommand::RevokeSession { reason: RevokeReason::Logout })
            .then_expect_events(vec![SessionEvent::SessionRevoked { user_id: user(), reason: RevokeReason::Logout }]);
        SessionTest::with(())
            .given(vec![started(), SessionEvent::SessionRevoked { user_id: user(), reason: RevokeReason::Logout }])
            .when(SessionCommand::RevokeSession { reason: RevokeReason::Logout })
            .then_expect_error(SessionError::Revoked);
    }
}
