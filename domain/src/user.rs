//! The `User` aggregate: an account, its roles and its status.
//!
//! Events carry what projections and the session-version map need: a session-ending event
//! (`RoleRevoked`, `UserDeactivated`, `UserDeleted`) carries the new `session_version`, so
//! every process can apply it idempotently with `max`, in any order.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::values::{DisplayName, Email, RoleName, Secret};

/// Whether an account may sign in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    /// Not registered yet (the state of a fresh aggregate).
    #[default]
    Unregistered,
    /// Registered and allowed to sign in.
    Active,
    /// Deactivated by an administrator; may be reactivated.
    Deactivated,
    /// Soft-deleted; final.
    Deleted,
}

impl UserStatus {
    /// The name used in read models and query filters.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unregistered => "unregistered",
            Self::Active => "active",
            Self::Deactivated => "deactivated",
            Self::Deleted => "deleted",
        }
    }
}

/// A user account as the command side sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Lifecycle state.
    pub status: UserStatus,
    /// The normalised email.
    pub email: String,
    /// The display name.
    pub display_name: String,
    /// The argon2id PHC string of the password; empty when the account has none (its password
    /// was removed when a provider was linked), so no password signs it in.
    pub password_hash: Secret,
    /// Roles held.
    pub roles: BTreeSet<String>,
    /// Tokens carrying a lower session version are refused.
    pub session_version: u64,
    /// Whether the email address is verified.
    pub email_verified: bool,
    /// Failed sign-ins since the last success or lock.
    pub failed_logins: u32,
    /// How many locks in a row (each doubles the next one), reset by a successful sign-in.
    pub lock_level: u32,
    /// Locked until then.
    pub locked_until: Option<DateTime<Utc>>,
}

/// When failed sign-ins lock an account, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Failures in a row that lock the account.
    pub threshold: u32,
    /// The first lock's length in seconds; each later one doubles, up to `max_secs`.
    pub base_secs: i64,
    /// The longest lock: never permanent, so nobody can lock a victim out for good.
    pub max_secs: i64,
}

impl Default for LockoutPolicy {
    /// 5 failures; 1 minute, doubling up to 15 minutes.
    fn default() -> Self {
        Self { threshold: 5, base_secs: 60, max_secs: 15 * 60 }
    }
}

impl LockoutPolicy {
    /// The length in seconds of the `level`-th lock in a row (from 1): the base, doubling, never
    /// past the maximum.
    #[must_use]
    pub fn lock_secs(&self, level: u32) -> i64 {
        let doublings = level.saturating_sub(1).min(40);
        self.base_secs.saturating_mul(1_i64 << doublings).min(self.max_secs).max(1)
    }

    /// The length of each lock in a row, from the first to the first one at the maximum; every
    /// later lock is as long as the last.
    #[must_use]
    pub fn lock_lengths(&self) -> Vec<i64> {
        let mut lengths = Vec::new();
        for level in 1..=41 {
            let secs = self.lock_secs(level);
            lengths.push(secs);
            if secs >= self.max_secs {
                break;
            }
        }
        lengths
    }
}

/// A lock the sign-in guard imposed after the last guess it allowed was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountLock {
    /// End of the lock.
    pub until: DateTime<Utc>,
    /// Which lock in a row this is.
    pub level: u32,
}

/// Why a user's sessions were all ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionsEndedReason {
    /// The user signed out everywhere.
    LogoutAll,
    /// An administrator ended them.
    Administrator,
}

/// What can be asked of a user.
#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    /// Open an account. The password is already hashed: hashing is slow work for the edge.
    RegisterUser {
        /// Normalised email.
        email: Email,
        /// Display name.
        display_name: DisplayName,
        /// argon2id PHC string.
        password_hash: Secret,
        /// Roles the account starts with.
        roles: Vec<RoleName>,
    },
    /// Change the display name.
    ChangeDisplayName {
        /// The new name.
        display_name: DisplayName,
    },
    /// Grant a role.
    GrantRole {
        /// The role.
        role: RoleName,
    },
    /// Revoke a role; ends the user's sessions so tokens carrying it stop working.
    RevokeRole {
        /// The role.
        role: RoleName,
    },
    /// Stop the account from signing in; ends its sessions.
    DeactivateUser,
    /// Allow a deactivated account to sign in again.
    ReactivateUser,
    /// Soft-delete the account; ends its sessions.
    DeleteUser,
    /// Ask for a (new) verification mail.
    RequestEmailVerification,
    /// The emailed token was presented: the address is verified.
    VerifyEmail,
    /// Ask for a password-reset mail.
    RequestPasswordReset,
    /// Set a new password after checking the current one; ends the other sessions.
    ChangePassword {
        /// argon2id PHC string.
        password_hash: Secret,
    },
    /// Set a new password with a reset token; ends every session.
    ResetPassword {
        /// argon2id PHC string.
        password_hash: Secret,
    },
    /// End every session (sign out everywhere, or an administrator's decision).
    EndAllSessions {
        /// Why.
        reason: SessionsEndedReason,
    },
    /// A provider vouched for the account's address at sign-in. An address never verified
    /// until now may have been registered by someone else (pre-hijacking): its password is
    /// removed and every session ends before the address counts as verified. An account already
    /// verified keeps its password and sessions, and nothing is recorded.
    LinkProvider {
        /// The provider's name, as configured.
        provider: String,
    },
    /// A sign-in with the wrong password, as the sign-in guard counted it. The guard (in the
    /// database, keyed by email) decides; the account's events record what it decided.
    RecordLoginFailure {
        /// Wrong guesses in a row, this one included.
        failures: u32,
        /// The lock this guess started, if it was the last one allowed.
        lock: Option<AccountLock>,
    },
    /// A successful sign-in: clears the failure count.
    RecordLoginSuccess,
    /// A sign-in attempt after the lock ran out.
    UnlockAccount {
        /// When.
        at: DateTime<Utc>,
    },
}

/// What happened to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserEvent {
    /// An account was opened.
    UserRegistered {
        /// Normalised email (unique across users, enforced by the event store).
        email: String,
        /// Display name.
        display_name: String,
        /// argon2id PHC string.
        password_hash: Secret,
        /// Initial roles.
        roles: Vec<String>,
    },
    /// The display name changed.
    DisplayNameChanged {
        /// The new name.
        display_name: String,
    },
    /// A role was granted.
    RoleGranted {
        /// The role.
        role: String,
    },
    /// A role was revoked.
    RoleRevoked {
        /// The role.
        role: String,
        /// The session version from now on.
        session_version: u64,
    },
    /// The account was deactivated.
    UserDeactivated {
        /// The session version from now on.
        session_version: u64,
    },
    /// The account was reactivated.
    UserReactivated {},
    /// The account was soft-deleted.
    UserDeleted {
        /// The session version from now on.
        session_version: u64,
    },
    /// A verification mail was asked for (the mail worker issues the token).
    EmailVerificationRequested {},
    /// The email address was verified.
    EmailVerified {},
    /// A password-reset mail was asked for (the mail worker issues the token).
    PasswordResetRequested {},
    /// The password was changed by its owner.
    PasswordChanged {
        /// argon2id PHC string.
        password_hash: Secret,
        /// The session version from now on (the session that changed it is rebound to it).
        session_version: u64,
    },
    /// The password was reset with an emailed token.
    PasswordReset {
        /// argon2id PHC string.
        password_hash: Secret,
        /// The session version from now on.
        session_version: u64,
    },
    /// The password was removed: a provider vouched for an address nobody had verified, so
    /// whoever set the password never proved they own it. No password signs the account in
    /// until a reset sets one.
    PasswordRemoved {
        /// The provider that vouched for the address.
        provider: String,
        /// The session version from now on.
        session_version: u64,
    },
    /// Every session was ended.
    SessionsEnded {
        /// The session version from now on.
        session_version: u64,
        /// Why.
        reason: SessionsEndedReason,
    },
    /// A sign-in failed.
    LoginFailed {
        /// Failures in a row.
        failures: u32,
    },
    /// Too many failures: sign-in is refused until `until`.
    AccountLocked {
        /// End of the lock.
        until: DateTime<Utc>,
        /// Which lock in a row this is.
        level: u32,
    },
    /// A lock ran out.
    AccountUnlocked {},
    /// A sign-in succeeded after failures.
    LoginSucceeded {},
}

impl UserEvent {
    /// The events after which a password-reset link mailed earlier no longer works: a newer link
    /// was asked for, or the password changed (by its owner, by a reset, or by linking a provider).
    pub const ENDS_RESET_LINKS: &'static [&'static str] =
        &["PasswordResetRequested", "PasswordChanged", "PasswordReset", "PasswordRemoved"];

    /// The session version this event sets, if it ends sessions.
    #[must_use]
    pub fn session_version(&self) -> Option<u64> {
        match self {
            Self::RoleRevoked { session_version, .. }
            | Self::UserDeactivated { session_version }
            | Self::UserDeleted { session_version }
            | Self::PasswordChanged { session_version, .. }
            | Self::PasswordReset { session_version, .. }
            | Self::PasswordRemoved { session_version, .. }
            | Self::SessionsEnded { session_version, .. } => Some(*session_version),
            _ => None,
        }
    }
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "UserRegistered",
            Self::DisplayNameChanged { .. } => "DisplayNameChanged",
            Self::RoleGranted { .. } => "RoleGranted",
            Self::RoleRevoked { .. } => "RoleRevoked",
            Self::UserDeactivated { .. } => "UserDeactivated",
            Self::UserReactivated { .. } => "UserReactivated",
            Self::UserDeleted { .. } => "UserDeleted",
            Self::EmailVerificationRequested { .. } => "EmailVerificationRequested",
            Self::EmailVerified { .. } => "EmailVerified",
            Self::PasswordResetRequested { .. } => "PasswordResetRequested",
            Self::PasswordChanged { .. } => "PasswordChanged",
            Self::PasswordReset { .. } => "PasswordReset",
            Self::PasswordRemoved { .. } => "PasswordRemoved",
            Self::SessionsEnded { .. } => "SessionsEnded",
            Self::LoginFailed { .. } => "LoginFailed",
            Self::AccountLocked { .. } => "AccountLocked",
            Self::AccountUnlocked { .. } => "AccountUnlocked",
            Self::LoginSucceeded { .. } => "LoginSucceeded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        // Older versions are read through `crate::upcast`.
        match self {
            Self::UserRegistered { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }
}

/// Why a user command was refused. Each maps to a 4xx at the HTTP edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    /// Registering an id that already has an account (409).
    #[error("user already registered")]
    AlreadyRegistered,
    /// The aggregate has no account (404).
    #[error("user not found")]
    NotFound,
    /// The account was deleted (404).
    #[error("user was deleted")]
    Deleted,
    /// Granting a role already held (409).
    #[error("role '{0}' is already granted")]
    RoleAlreadyGranted(String),
    /// Revoking a role not held (409).
    #[error("role '{0}' is not granted")]
    RoleNotGranted(String),
    /// Deactivating a deactivated account (409).
    #[error("user is already deactivated")]
    AlreadyDeactivated,
    /// Reactivating an active account (409).
    #[error("user is not deactivated")]
    NotDeactivated,
    /// Verifying or asking to verify an address already verified (409).
    #[error("email is already verified")]
    AlreadyVerified,
    /// An account that is not active cannot do this (409).
    #[error("user is not active")]
    NotActive,
    /// Unlocking an account that is not locked, or whose lock has not run out (409).
    #[error("account is not due to unlock")]
    NotLocked,
}

impl User {
    /// Seconds left on the lock at `at`, if locked.
    #[must_use]
    pub fn locked_for(&self, at: DateTime<Utc>) -> Option<i64> {
        self.locked_until.filter(|until| *until > at).map(|until| (until - at).num_seconds().max(1))
    }

    fn ensure_active(&self) -> Result<(), UserError> {
        if self.status == UserStatus::Active {
            Ok(())
        } else {
            Err(UserError::NotActive)
        }
    }

    fn login_failed(&self, failures: u32, lock: Option<AccountLock>) -> Vec<UserEvent> {
        let mut events = vec![UserEvent::LoginFailed { failures }];
        // Recorded once, however often it is reported.
        if let Some(lock) = lock.filter(|lock| self.locked_until != Some(lock.until)) {
            events.push(UserEvent::AccountLocked { until: lock.until, level: lock.level });
        }
        events
    }

    /// Whether the account exists and is not deleted.
    fn ensure_live(&self) -> Result<(), UserError> {
        match self.status {
            UserStatus::Unregistered => Err(UserError::NotFound),
            UserStatus::Deleted => Err(UserError::Deleted),
            UserStatus::Active | UserStatus::Deactivated => Ok(()),
        }
    }

    fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        if let UserCommand::RegisterUser { email, display_name, password_hash, roles } = command {
            if self.status != UserStatus::Unregistered {
                return Err(UserError::AlreadyRegistered);
            }
            let mut roles: Vec<String> = roles.into_iter().map(|r| r.as_str().to_owned()).collect();
            roles.sort();
            roles.dedup();
            return Ok(vec![UserEvent::UserRegistered {
                email: email.as_str().to_owned(),
                display_name: display_name.as_str().to_owned(),
                password_hash,
                roles,
            }]);
        }
        self.ensure_live()?;
        let next_version = self.session_version + 1;
        let event = match command {
            UserCommand::RegisterUser { .. } => return Err(UserError::AlreadyRegistered),
            UserCommand::ChangeDisplayName { display_name } => {
                UserEvent::DisplayNameChanged { display_name: display_name.as_str().to_owned() }
            }
            UserCommand::GrantRole { role } => {
                if self.roles.contains(role.as_str()) {
                    return Err(UserError::RoleAlreadyGranted(role.as_str().to_owned()));
                }
                UserEvent::RoleGranted { role: role.as_str().to_owned() }
            }
            UserCommand::RevokeRole { role } => {
                if !self.roles.contains(role.as_str()) {
                    return Err(UserError::RoleNotGranted(role.as_str().to_owned()));
                }
                UserEvent::RoleRevoked { role: role.as_str().to_owned(), session_version: next_version }
            }
            UserCommand::DeactivateUser => {
                if self.status == UserStatus::Deactivated {
                    return Err(UserError::AlreadyDeactivated);
                }
                UserEvent::UserDeactivated { session_version: next_version }
            }
            UserCommand::ReactivateUser => {
                if self.status != UserStatus::Deactivated {
                    return Err(UserError::NotDeactivated);
                }
                UserEvent::UserReactivated {}
            }
            UserCommand::DeleteUser => UserEvent::UserDeleted { session_version: next_version },
            UserCommand::RequestEmailVerification => {
                if self.email_verified {
                    return Err(UserError::AlreadyVerified);
                }
                UserEvent::EmailVerificationRequested {}
            }
            UserCommand::VerifyEmail => {
                if self.email_verified {
                    return Err(UserError::AlreadyVerified);
                }
                UserEvent::EmailVerified {}
            }
            UserCommand::RequestPasswordReset => {
                self.ensure_active()?;
                UserEvent::PasswordResetRequested {}
            }
            UserCommand::ChangePassword { password_hash } => {
                self.ensure_active()?;
                UserEvent::PasswordChanged { password_hash, session_version: next_version }
            }
            UserCommand::ResetPassword { password_hash } => {
                self.ensure_active()?;
                // A reset also clears any lock: the owner proved control of the mailbox.
                UserEvent::PasswordReset { password_hash, session_version: next_version }
            }
            UserCommand::LinkProvider { provider } => {
                self.ensure_active()?;
                if self.email_verified {
                    return Ok(vec![]);
                }
                return Ok(vec![
                    UserEvent::PasswordRemoved { provider, session_version: next_version },
                    UserEvent::EmailVerified {},
                ]);
            }
            UserCommand::EndAllSessions { reason } => {
                UserEvent::SessionsEnded { session_version: next_version, reason }
            }
            UserCommand::RecordLoginFailure { failures, lock } => return Ok(self.login_failed(failures, lock)),
            UserCommand::RecordLoginSuccess => {
                if self.failed_logins == 0 && self.lock_level == 0 {
                    return Ok(vec![]);
                }
                UserEvent::LoginSucceeded {}
            }
            UserCommand::UnlockAccount { at } => match self.locked_until {
                Some(until) if until <= at => UserEvent::AccountUnlocked {},
                _ => return Err(UserError::NotLocked),
            },
        };
        Ok(vec![event])
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "User";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        if let Some(version) = event.session_version() {
            self.session_version = self.session_version.max(version);
        }
        match event {
            UserEvent::UserRegistered { email, display_name, password_hash, roles } => {
                self.status = UserStatus::Active;
                self.email = email;
                self.display_name = display_name;
                self.password_hash = password_hash;
                self.roles = roles.into_iter().collect();
            }
            UserEvent::DisplayNameChanged { display_name } => self.display_name = display_name,
            UserEvent::RoleGranted { role } => {
                self.roles.insert(role);
            }
            UserEvent::RoleRevoked { role, .. } => {
                self.roles.remove(&role);
            }
            UserEvent::UserDeactivated { .. } => self.status = UserStatus::Deactivated,
            UserEvent::UserReactivated {} => self.status = UserStatus::Active,
            UserEvent::UserDeleted { .. } => self.status = UserStatus::Deleted,
            UserEvent::EmailVerificationRequested {}
            | UserEvent::PasswordResetRequested {}
            | UserEvent::SessionsEnded { .. } => {}
            UserEvent::EmailVerified {} => self.email_verified = true,
            UserEvent::PasswordChanged { password_hash, .. } => self.password_hash = password_hash,
            UserEvent::PasswordRemoved { .. } => self.password_hash.clear(),
            UserEvent::PasswordReset { password_hash, .. } => {
                self.password_hash = password_hash;
                self.failed_logins = 0;
                self.locked_until = None;
            }
            UserEvent::LoginFailed { failures } => self.failed_logins = failures,
            UserEvent::AccountLocked { until, level } => {
                self.locked_until = Some(until);
                self.lock_level = level;
                self.failed_logins = 0;
            }
            UserEvent::AccountUnlocked {} => self.locked_until = None,
            UserEvent::LoginSucceeded {} => {
                self.failed_logins = 0;
                self.lock_level = 0;
                self.locked_until = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type UserTest = TestFramework<User>;

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            email: "ada@example.com".into(),
            display_name: "Ada".into(),
            password_hash: "$argon2id$hash".into(),
            roles: vec!["user".into()],
        }
    }

    fn role(name: &str) -> RoleName {
        RoleName::parse(name).expect("valid role in test")
    }

    fn register_command() -> UserCommand {
        UserCommand::RegisterUser {
            email: Email::parse("Ada@Example.com").expect("valid email in test"),
            display_name: DisplayName::parse("Ada").expect("valid name in test"),
            password_hash: "$argon2id$hash".into(),
            roles: vec![role("user"), role("user")],
        }
    }

    #[test]
    fn register_opens_an_account_with_normalised_email_and_unique_roles() {
        UserTest::with(()).given_no_previous_events().when(register_command()).then_expect_events(vec![registered()]);
    }

    #[test]
    fn register_twice_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(register_command())
            .then_expect_error(UserError::AlreadyRegistered);
    }

    #[test]
    fn commands_on_a_missing_user_are_refused() {
        UserTest::with(())
            .given_no_previous_events()
            .when(UserCommand::GrantRole { role: role("admin") })
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn change_display_name() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::ChangeDisplayName { display_name: DisplayName::parse("Countess").expect("valid") })
            .then_expect_events(vec![UserEvent::DisplayNameChanged { display_name: "Countess".into() }]);
    }

    #[test]
    fn grant_role() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantRole { role: role("admin") })
            .then_expect_events(vec![UserEvent::RoleGranted { role: "admin".into() }]);
    }

    #[test]
    fn grant_a_held_role_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantRole { role: role("user") })
            .then_expect_error(UserError::RoleAlreadyGranted("user".into()));
    }

    #[test]
    fn revoke_role_bumps_the_session_version() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::RoleGranted { role: "admin".into() }])
            .when(UserCommand::RevokeRole { role: role("admin") })
            .then_expect_events(vec![UserEvent::RoleRevoked { role: "admin".into(), session_version: 1 }]);
    }

    #[test]
    fn revoke_a_missing_role_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeRole { role: role("admin") })
            .then_expect_error(UserError::RoleNotGranted("admin".into()));
    }

    #[test]
    fn deactivate_bumps_past_every_earlier_version() {
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::RoleGranted { role: "admin".into() },
                UserEvent::RoleRevoked { role: "admin".into(), session_version: 1 },
            ])
            .when(UserCommand::DeactivateUser)
            .then_expect_events(vec![UserEvent::UserDeactivated { session_version: 2 }]);
    }

    #[test]
    fn deactivate_twice_is_refused() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated { session_version: 1 }])
            .when(UserCommand::DeactivateUser)
            .then_expect_error(UserError::AlreadyDeactivated);
    }

    #[test]
    fn reactivate() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated { session_version: 1 }])
            .when(UserCommand::ReactivateUser)
            .then_expect_events(vec![UserEvent::UserReactivated {}]);
    }

    #[test]
    fn reactivate_an_active_user_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::ReactivateUser)
            .then_expect_error(UserError::NotDeactivated);
    }

    #[test]
    fn delete() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::DeleteUser)
            .then_expect_events(vec![UserEvent::UserDeleted { session_version: 1 }]);
    }

    #[test]
    fn a_deleted_user_refuses_everything() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeleted { session_version: 1 }])
            .when(UserCommand::ReactivateUser)
            .then_expect_error(UserError::Deleted);
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeleted { session_version: 1 }])
            .when(UserCommand::DeleteUser)
            .then_expect_error(UserError::Deleted);
    }

    #[test]
    fn a_deactivated_user_can_still_have_roles_changed() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated { session_version: 1 }])
            .when(UserCommand::GrantRole { role: role("auditor") })
            .then_expect_events(vec![UserEvent::RoleGranted { role: "auditor".into() }]);
    }

    #[test]
    fn events_round_trip_through_json_with_their_type_as_tag() {
        let json = serde_json::to_value(registered()).expect("serialises");
        assert_eq!(json["UserRegistered"]["email"], "ada@example.com");
        let back: UserEvent = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, registered());
        assert_eq!(registered().event_type(), "UserRegistered");
    }
    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    #[test]
    fn locks_last_a_minute_and_double_up_to_fifteen_minutes() {
        let policy = LockoutPolicy::default();
        assert_eq!(policy.lock_lengths(), [60, 120, 240, 480, 900]);
        assert_eq!((policy.lock_secs(1), policy.lock_secs(6), policy.lock_secs(1000)), (60, 900, 900));
        let odd = LockoutPolicy { threshold: 3, base_secs: 7, max_secs: 20 };
        assert_eq!(odd.lock_lengths(), [7, 14, 20]);
    }

    #[test]
    fn a_failure_records_the_lock_the_guard_imposed_once() {
        let lock = AccountLock { until: at(60), level: 1 };
        UserTest::with(())
            .given(vec![registered(), UserEvent::LoginFailed { failures: 4 }])
            .when(UserCommand::RecordLoginFailure { failures: 5, lock: Some(lock) })
            .then_expect_events(vec![
                UserEvent::LoginFailed { failures: 5 },
                UserEvent::AccountLocked { until: at(60), level: 1 },
            ]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::AccountLocked { until: at(60), level: 1 }])
            .when(UserCommand::RecordLoginFailure { failures: 5, lock: Some(lock) })
            .then_expect_events(vec![UserEvent::LoginFailed { failures: 5 }]);
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::RecordLoginFailure { failures: 1, lock: None })
            .then_expect_events(vec![UserEvent::LoginFailed { failures: 1 }]);
    }

    #[test]
    fn a_lock_ends_only_when_it_has_run_out() {
        let locked = vec![registered(), UserEvent::AccountLocked { until: at(60), level: 1 }];
        UserTest::with(())
            .given(locked.clone())
            .when(UserCommand::UnlockAccount { at: at(30) })
            .then_expect_error(UserError::NotLocked);
        UserTest::with(())
            .given(locked)
            .when(UserCommand::UnlockAccount { at: at(60) })
            .then_expect_events(vec![UserEvent::AccountUnlocked {}]);
    }

    #[test]
    fn success_after_failures_clears_them_and_success_alone_records_nothing() {
        UserTest::with(())
            .given(vec![registered(), UserEvent::LoginFailed { failures: 2 }])
            .when(UserCommand::RecordLoginSuccess)
            .then_expect_events(vec![UserEvent::LoginSucceeded {}]);
        UserTest::with(()).given(vec![registered()]).when(UserCommand::RecordLoginSuccess).then_expect_events(vec![]);
    }

    #[test]
    fn password_change_and_reset_move_the_session_version() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::ChangePassword { password_hash: "new".into() })
            .then_expect_events(vec![UserEvent::PasswordChanged { password_hash: "new".into(), session_version: 1 }]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated { session_version: 1 }])
            .when(UserCommand::ResetPassword { password_hash: "new".into() })
            .then_expect_error(UserError::NotActive);
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::EndAllSessions { reason: SessionsEndedReason::LogoutAll })
            .then_expect_events(vec![UserEvent::SessionsEnded {
                session_version: 1,
                reason: SessionsEndedReason::LogoutAll,
            }]);
    }

    #[test]
    fn every_session_ending_event_moves_the_version_past_it() {
        for ended in [
            UserEvent::PasswordChanged { password_hash: "h".into(), session_version: 1 },
            UserEvent::PasswordReset { password_hash: "h".into(), session_version: 1 },
            UserEvent::SessionsEnded { session_version: 1, reason: SessionsEndedReason::LogoutAll },
            UserEvent::RoleRevoked { role: "user".into(), session_version: 1 },
            UserEvent::PasswordRemoved { provider: "google".into(), session_version: 1 },
        ] {
            UserTest::with(())
                .given(vec![registered(), UserEvent::RoleGranted { role: "user2".into() }, ended])
                .when(UserCommand::DeactivateUser)
                .then_expect_events(vec![UserEvent::UserDeactivated { session_version: 2 }]);
        }
    }

    #[test]
    fn linking_a_provider_to_an_unverified_address_removes_the_password_and_ends_sessions() {
        let link = || UserCommand::LinkProvider { provider: "google".into() };
        UserTest::with(())
            .given(vec![registered(), UserEvent::RoleRevoked { role: "user".into(), session_version: 1 }])
            .when(link())
            .then_expect_events(vec![
                UserEvent::PasswordRemoved { provider: "google".into(), session_version: 2 },
                UserEvent::EmailVerified {},
            ]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::EmailVerified {}])
            .when(link())
            .then_expect_events(vec![]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::UserDeactivated { session_version: 1 }])
            .when(link())
            .then_expect_error(UserError::NotActive);
        let mut user = User::default();
        user.apply(registered());
        user.apply(UserEvent::PasswordRemoved { provider: "google".into(), session_version: 1 });
        assert!(user.password_hash.is_empty());
        assert_eq!(user.session_version, 1);
    }

    #[test]
    fn email_verification_happens_once() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::VerifyEmail)
            .then_expect_events(vec![UserEvent::EmailVerified {}]);
        UserTest::with(())
            .given(vec![registered(), UserEvent::EmailVerified {}])
            .when(UserCommand::RequestEmailVerification)
            .then_expect_error(UserError::AlreadyVerified);
    }
}
