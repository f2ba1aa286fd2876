//! The `Role` aggregate: a named set of permissions. The id is the role's name.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::roles::ALL_PERMISSIONS;

/// A role as the command side sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Whether it exists.
    pub defined: bool,
    /// Its permissions, sorted.
    pub permissions: Vec<String>,
}

/// What can be asked of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleCommand {
    /// Create the role.
    DefineRole {
        /// Permissions.
        permissions: Vec<String>,
    },
    /// Replace its permissions.
    ChangePermissions {
        /// Permissions.
        permissions: Vec<String>,
    },
}

/// What happened to a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoleEvent {
    /// The role was created.
    RoleDefined {
        /// Sorted, without duplicates.
        permissions: Vec<String>,
    },
    /// Its permissions were replaced.
    RolePermissionsChanged {
        /// Sorted, without duplicates.
        permissions: Vec<String>,
    },
}

impl DomainEvent for RoleEvent {
    fn event_type(&self) -> String {
        match self {
            Self::RoleDefined { .. } => "RoleDefined",
            Self::RolePermissionsChanged { .. } => "RolePermissionsChanged",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

/// Why a role command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// Defining an existing role (409).
    #[error("role already exists")]
    AlreadyDefined,
    /// Changing a role that does not exist (404).
    #[error("role not found")]
    NotDefined,
    /// A permission nobody checks (400).
    #[error("unknown permission '{0}'")]
    UnknownPermission(String),
    /// Nothing would change (409).
    #[error("the role already has exactly these permissions")]
    Unchanged,
}

fn normalise(permissions: Vec<String>) -> Result<Vec<String>, RoleError> {
    let mut permissions = permissions;
    if let Some(bad) = permissions.iter().find(|p| !ALL_PERMISSIONS.contains(&p.as_str())) {
        return Err(RoleError::UnknownPermission(bad.clone()));
    }
    permissions.sort();
    permissions.dedup();
    Ok(permissions)
}

impl Aggregate for Role {
    const TYPE: &'static str = "Role";
    type Command = RoleCommand;
    type Event = RoleEvent;
    type Error = RoleError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let event = match command {
            RoleCommand::DefineRole { permissions } => {
                if self.defined {
                    return Err(RoleError::AlreadyDefined);
                }
                RoleEvent::RoleDefined { permissions: normalise(permissions)? }
            }
            RoleCommand::ChangePermissions { permissions } => {
                if !self.defined {
                    return Err(RoleError::NotDefined);
                }
                let permissions = normalise(permissions)?;
                if permissions == self.permissions {
                    return Err(RoleError::Unchanged);
                }
                RoleEvent::RolePermissionsChanged { permissions }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            RoleEvent::RoleDefined { permissions } | RoleEvent::RolePermissionsChanged { permissions } => {
                self.defined = true;
                self.permissions = permissions;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    type RoleTest = TestFramework<Role>;

    #[test]
    fn define_sorts_and_dedups() {
        RoleTest::with(())
            .given_no_previous_events()
            .when(RoleCommand::DefineRole {
                permissions: vec!["files:read".into(), "audit:read".into(), "files:read".into()],
            })
            .then_expect_events(vec![RoleEvent::RoleDefined {
                permissions: vec!["audit:read".into(), "files:read".into()],
            }]);
    }

    #[test]
    fn unknown_permissions_and_redefinition_are_refused() {
        RoleTest::with(())
            .given_no_previous_events()
            .when(RoleCommand::DefineRole { permissions: vec!["root:everything".into()] })
            .then_expect_error(RoleError::UnknownPermission("root:everything".into()));
        RoleTest::with(())
            .given(vec![RoleEvent::RoleDefined { permissions: vec![] }])
            .when(RoleCommand::DefineRole { permissions: vec![] })
            .then_expect_error(RoleError::AlreadyDefined);
    }

    #[test]
    fn change_permissions() {
        RoleTest::with(())
            .given(vec![RoleEvent::RoleDefined { permissions: vec!["files:read".into()] }])
            .when(RoleCommand::ChangePermissions { permissions: vec!["files:write".into()] })
            .then_expect_events(vec![RoleEvent::RolePermissionsChanged { permissions: vec!["files:write".into()] }]);
        RoleTest::with(())
            .given_no_previous_events()
            .when(RoleCommand::ChangePermissions { permissions: vec![] })
            .then_expect_error(RoleError::NotDefined);
        RoleTest::with(())
            .given(vec![RoleEvent::RoleDefined { permissions: vec!["files:read".into()] }])
            .when(RoleCommand::ChangePermissions { permissions: vec!["files:read".into()] })
            .then_expect_error(RoleError::Unchanged);
    }
}
