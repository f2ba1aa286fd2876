//! The command service for users: the one path by which HTTP handlers and the operator CLI
//! change a user.

use std::collections::BTreeMap;

use cairn_domain::roles::DEFAULT_ROLE;
use cairn_domain::{DisplayName, Email, RoleName, User, UserCommand};
use cairn_platform::auth::SessionVersions;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cairn_relay::RelayWakeup;
use sqlx::PgPool;
use uuid::Uuid;

use crate::executor::Executor;
use crate::passwords::{check_policy, Passwords};
use crate::roles::RoleCatalog;

/// A registration request, as received.
#[derive(Clone)]
pub struct RegisterUser {
    /// Email as typed.
    pub email: String,
    /// Password in clear (hashed here, never stored or logged).
    pub password: String,
    /// Display name as typed.
    pub display_name: String,
    /// Initial roles; empty means the default role.
    pub roles: Vec<String>,
}

impl std::fmt::Debug for RegisterUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterUser")
            .field("email", &self.email)
            .field("display_name", &self.display_name)
            .field("roles", &self.roles)
            .field("password", &"REDACTED")
            .finish()
    }
}

/// Executes user commands.
#[derive(Clone)]
pub struct UserCommands {
    executor: Executor<User>,
    passwords: Passwords,
    roles: RoleCatalog,
    wake: RelayWakeup,
}

impl UserCommands {
    /// A service over `pool`.
    #[must_use]
    pub fn new(pool: PgPool, passwords: Passwords, sessions: SessionVersions, wake: RelayWakeup) -> Self {
        Self {
            roles: RoleCatalog::new(pool.clone(), sessions.clone(), wake.clone()),
            executor: Executor::new(pool, sessions, wake.clone()),
            passwords,
            wake,
        }
    }

    /// What this process's commands signal after they commit.
    #[must_use]
    pub fn wake(&self) -> &RelayWakeup {
        &self.wake
    }

    /// The hashing pool (sign-in verifies through it too).
    #[must_use]
    pub fn passwords(&self) -> &Passwords {
        &self.passwords
    }

    /// The role catalogue.
    #[must_use]
    pub fn roles(&self) -> &RoleCatalog {
        &self.roles
    }

    /// Registers a user. Email uniqueness is enforced by the event store's unique index, so
    /// concurrent registrations of one address yield exactly one account.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming each bad field, CONFLICT when the email is taken.
    pub async fn register(
        &self,
        input: RegisterUser,
        ctx: &RequestContext,
        actor: Option<Uuid>,
    ) -> Result<(Uuid, ConsistencyToken), ApiError> {
        let mut problems = BTreeMap::new();
        let email = Email::parse(&input.email).map_err(|e| problems.insert("email".to_owned(), e.0)).ok();
        let display_name =
            DisplayName::parse(&input.display_name).map_err(|e| problems.insert("display_name".to_owned(), e.0)).ok();
        if let Err(p) = check_policy(&input.password, &[&input.email, &input.display_name]) {
            problems.insert("password".to_owned(), p);
        }
        let role_names = if input.roles.is_empty() { vec![DEFAULT_ROLE.to_owned()] } else { input.roles };
        let mut roles = Vec::new();
        for role in &role_names {
            match self.roles.existing(role).await? {
                Some(r) => roles.push(r),
                None => {
                    problems.insert("roles".to_owned(), format!("unknown role '{role}'"));
                }
            }
        }
        let (Some(email), Some(display_name), true) = (email, display_name, problems.is_empty()) else {
            return Err(ApiError::Validation { message: "registration is invalid".to_owned(), details: problems });
        };
        // Cheap early answer for the common duplicate; the index still decides races.
        if self.find_id_by_email(&email).await?.is_some() {
            return Err(email_taken());
        }
        let password_hash = self.passwords.hash(input.password).await?;
        let id = Uuid::now_v7();
        let command = UserCommand::RegisterUser { email, display_name, password_hash: password_hash.into(), roles };
        let token = self.execute(id, command, ctx, actor.or(Some(id))).await.map_err(|e| match e {
            ApiError::Conflict(_) => email_taken(),
            other => other,
        })?;
        Ok((id, token))
    }

    /// Runs `command` on user `id`.
    ///
    /// # Errors
    /// NOT_FOUND, CONFLICT for refused commands; SERVICE_UNAVAILABLE when Postgres is down.
    pub async fn execute(
        &self,
        id: Uuid,
        command: UserCommand,
        ctx: &RequestContext,
        actor: Option<Uuid>,
    ) -> Result<ConsistencyToken, ApiError> {
        self.executor.execute(&id.to_string(), command, ctx, actor).await
    }

    /// Runs `command` on user `id`, deciding it again on the new state when another command
    /// appended first, up to `attempts` times in all.
    ///
    /// # Errors
    /// As [`Self::execute`].
    pub async fn execute_retrying(
        &self,
        id: Uuid,
        command: UserCommand,
        ctx: &RequestContext,
        actor: Option<Uuid>,
        attempts: u32,
    ) -> Result<ConsistencyToken, ApiError> {
        self.executor.execute_retrying(&id.to_string(), command, ctx, actor, attempts).await
    }

    /// The id of the account registered with `email`, read from the event store's email index.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn find_id_by_email(&self, email: &Email) -> Result<Option<Uuid>, ApiError> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM events WHERE aggregate_type = 'User' AND event_type = 'UserRegistered' \
             AND (payload -> 'UserRegistered' ->> 'email') = $1",
        )
        .bind(email.as_str())
        .fetch_optional(self.executor.pool())
        .await?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    /// Loads user `id` from its events (always current, unlike the read model).
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn load(&self, id: Uuid) -> Result<User, ApiError> {
        self.executor.load(&id.to_string()).await
    }

    /// Hashes a new password after checking the policy against the user's own details.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming `field` when the password is too short, long or weak.
    pub async fn hash_new_password(&self, password: String, user: &User, field: &str) -> Result<String, ApiError> {
        check_policy(&password, &[&user.email, &user.display_name]).map_err(|p| ApiError::field(field, p))?;
        self.passwords.hash(password).await
    }
}

fn email_taken() -> ApiError {
    ApiError::Conflict("email is already registered".to_owned())
}

/// Parses a role name that must exist.
pub(crate) fn role_name(raw: &str) -> Result<RoleName, ApiError> {
    RoleName::parse(raw).map_err(|e| ApiError::field("role", e.0))
}
