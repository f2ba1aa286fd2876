//! The role catalogue: `Role` aggregates, with the seeded roles of API.md defined at start.
//! Tokens carry permissions computed here at sign-in and refresh, so a change to a role reaches
//! its holders' next tokens.

use cairn_domain::roles::seeded_roles;
use cairn_domain::{Role, RoleCommand, RoleName};
use cairn_platform::auth::SessionVersions;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_relay::RelayWakeup;
use sqlx::PgPool;
use uuid::Uuid;

use crate::executor::Executor;

/// Reads and changes roles.
#[derive(Clone)]
pub struct RoleCatalog {
    executor: Executor<Role>,
}

impl RoleCatalog {
    /// A catalogue over `pool`.
    #[must_use]
    pub fn new(pool: PgPool, sessions: SessionVersions, wake: RelayWakeup) -> Self {
        Self { executor: Executor::new(pool, sessions, wake) }
    }

    /// Defines the seeded roles that do not exist yet. Safe to run from every process at start.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn seed(&self) -> Result<(), ApiError> {
        let ctx = RequestContext::operator("cairn seed");
        for (name, permissions) in seeded_roles() {
            if self.executor.load(name).await?.defined {
                continue;
            }
            let command = RoleCommand::DefineRole { permissions: permissions.into_iter().map(str::to_owned).collect() };
            match self.executor.execute(name, command, &ctx, None).await {
                // Another process seeded it first.
                Ok(_) | Err(ApiError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The permissions of `role`: its aggregate, or the seeded definition before seeding ran.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn permissions_of(&self, role: &str) -> Result<Option<Vec<String>>, ApiError> {
        let aggregate = self.executor.load(role).await?;
        if aggregate.defined {
            return Ok(Some(aggregate.permissions));
        }
        Ok(cairn_domain::roles::permissions_of(role).map(|p| p.into_iter().map(str::to_owned).collect()))
    }

    /// The union of the permissions of `roles`, sorted.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn permissions_for(&self, roles: &[String]) -> Result<Vec<String>, ApiError> {
        let mut perms = Vec::new();
        for role in roles {
            perms.extend(self.permissions_of(role).await?.unwrap_or_default());
        }
        perms.sort();
        perms.dedup();
        Ok(perms)
    }

    /// `raw` as a role name, if such a role exists.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn existing(&self, raw: &str) -> Result<Option<RoleName>, ApiError> {
        let Ok(name) = RoleName::parse(raw) else { return Ok(None) };
        Ok(self.permissions_of(name.as_str()).await?.map(|_| name))
    }

    /// Runs a role command.
    ///
    /// # Errors
    /// The role's refusal, or 503.
    pub async fn execute(
        &self,
        name: &RoleName,
        command: RoleCommand,
        ctx: &RequestContext,
        actor: Uuid,
    ) -> Result<ConsistencyToken, ApiError> {
        self.executor.execute(name.as_str(), command, ctx, Some(actor)).await
    }
}
