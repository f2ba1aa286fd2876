//! The `User` aggregate: an account, its roles and its status.
//!
//! Events carry what projections and the session-version map need: a session-ending event
//! (`RoleRevoked`, `UserDeactivated`, `UserDeleted`) carries the new `session_version`, so
//! every process can apply it idempotently with `max`, in any order.

use std::collections::BTreeSet;

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::values::{DisplayName, Email, RoleName};

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
    /// The argon2id PHC string of the password.
    pub password_hash: String,
    /// Roles held.
    pub roles: BTreeSet<String>,
    /// Tokens carrying a lower session version are refused.
    pub session_version: u64,
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
        password_hash: String,
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
        password_hash: String,
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
}

impl UserEvent {
    /// The session version this event sets, if it ends sessions.
    #[must_use]
    pub fn session_version(&self) -> Option<u64> {
        match self {
            Self::RoleRevoked {
                session_version, ..
            }
            | Self::UserDeactivated { session_version }
            | Self::UserDeleted { session_version } => Some(*session_version),
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
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
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
}

impl User {
    /// Whether the account exists and is not deleted.
    fn ensure_live(&self) -> Result<(), UserError> {
        match self.status {
            UserStatus::Unregistered => Err(UserError::NotFound),
            UserStatus::Deleted => Err(UserError::Deleted),
            UserStatus::Active | UserStatus::Deactivated => Ok(()),
        }
    }

    fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        if let UserCommand::RegisterUser {
            email,
            display_name,
            password_hash,
            roles,
        } = command
        {
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
            UserCommand::ChangeDisplayName { display_name } => UserEvent::DisplayNameChanged {
                display_name: display_name.as_str().to_owned(),
            },
            UserCommand::GrantRole { role } => {
                if self.roles.contains(role.as_str()) {
                    return Err(UserError::RoleAlreadyGranted(role.as_str().to_owned()));
                }
                UserEvent::RoleGranted {
                    role: role.as_str().to_owned(),
                }
            }
            UserCommand::RevokeRole { role } => {
                if !self.roles.contains(role.as_str()) {
                    return Err(UserError::RoleNotGranted(role.as_str().to_owned()));
                }
                UserEvent::RoleRevoked {
                    role: role.as_str().to_owned(),
                    session_version: next_version,
                }
            }
            UserCommand::DeactivateUser => {
                if self.status == UserStatus::Deactivated {
                    return Err(UserError::AlreadyDeactivated);
                }
                UserEvent::UserDeactivated {
                    session_version: next_version,
                }
            }
            UserCommand::ReactivateUser => {
                if self.status != UserStatus::Deactivated {
                    return Err(UserError::NotDeactivated);
                }
                UserEvent::UserReactivated {}
            }
            UserCommand::DeleteUser => UserEvent::UserDeleted {
                session_version: next_version,
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
            UserEvent::UserRegistered {
                email,
                display_name,
                password_hash,
                roles,
            } => {
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
        UserTest::with(())
            .given_no_previous_events()
            .when(register_command())
            .then_expect_events(vec![registered()]);
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
            .when(UserCommand::GrantRole {
                role: role("admin"),
            })
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn change_display_name() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::ChangeDisplayName {
                display_name: DisplayName::parse("Countess").expect("valid"),
            })
            .then_expect_events(vec![UserEvent::DisplayNameChanged {
                display_name: "Countess".into(),
            }]);
    }

    #[test]
    fn grant_role() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::GrantRole {
                role: role("admin"),
            })
            .then_expect_events(vec![UserEvent::RoleGranted {
                role: "admin".into(),
            }]);
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
            .given(vec![
                registered(),
                UserEvent::RoleGranted {
                    role: "admin".into(),
                },
            ])
            .when(UserCommand::RevokeRole {
                role: role("admin"),
            })
            .then_expect_events(vec![UserEvent::RoleRevoked {
                role: "admin".into(),
                session_version: 1,
            }]);
    }

    #[test]
    fn revoke_a_missing_role_is_refused() {
        UserTest::with(())
            .given(vec![registered()])
            .when(UserCommand::RevokeRole {
                role: role("admin"),
            })
            .then_expect_error(UserError::RoleNotGranted("admin".into()));
    }

    #[test]
    fn deactivate_bumps_past_every_earlier_version() {
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::RoleGranted {
                    role: "admin".into(),
                },
                UserEvent::RoleRevoked {
                    role: "admin".into(),
                    session_version: 1,
                },
            ])
            .when(UserCommand::DeactivateUser)
            .then_expect_events(vec![UserEvent::UserDeactivated { session_version: 2 }]);
    }

    #[test]
    fn deactivate_twice_is_refused() {
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::UserDeactivated { session_version: 1 },
            ])
            .when(UserCommand::DeactivateUser)
            .then_expect_error(UserError::AlreadyDeactivated);
    }

    #[test]
    fn reactivate() {
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::UserDeactivated { session_version: 1 },
            ])
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
            .given(vec![
                registered(),
                UserEvent::UserDeleted { session_version: 1 },
            ])
            .when(UserCommand::ReactivateUser)
            .then_expect_error(UserError::Deleted);
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::UserDeleted { session_version: 1 },
            ])
            .when(UserCommand::DeleteUser)
            .then_expect_error(UserError::Deleted);
    }

    #[test]
    fn a_deactivated_user_can_still_have_roles_changed() {
        UserTest::with(())
            .given(vec![
                registered(),
                UserEvent::UserDeactivated { session_version: 1 },
            ])
            .when(UserCommand::GrantRole {
                role: role("auditor"),
            })
            .then_expect_events(vec![UserEvent::RoleGranted {
                role: "auditor".into(),
            }]);
    }

    #[test]
    fn events_round_trip_through_json_with_their_type_as_tag() {
        let json = serde_json::to_value(registered()).expect("serialises");
        assert_eq!(json["UserRegistered"]["email"], "ada@example.com");
        let back: UserEvent = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, registered());
        assert_eq!(registered().event_type(), "UserRegistered");
    }
}
