//! The command service for users: the one path by which HTTP handlers and the operator CLI
//! change a user. It loads the aggregate through postgres-es, runs the command with the
//! request's metadata, and returns the consistency token of the appended event.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_domain::roles::DEFAULT_ROLE;
use cairn_domain::{DisplayName, Email, RoleName, User, UserCommand, UserError};
use cairn_platform::auth::SessionVersions;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, RequestContext};
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, CqrsFramework, EventStore};
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;
use uuid::Uuid;

use crate::passwords::{check_policy, Passwords};

type Store = PersistedEventStore<PostgresEventRepository, User>;

/// A registration request, as received.
#[derive(Debug, Clone)]
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

/// Executes user commands.
#[derive(Clone)]
pub struct UserCommands {
    cqrs: Arc<CqrsFramework<User, Store>>,
    store: Arc<Store>,
    pool: PgPool,
    passwords: Passwords,
    sessions: SessionVersions,
}

impl UserCommands {
    /// A service over `pool`. `sessions` is updated as soon as a session-ending command commits,
    /// so this process refuses old tokens at once; other processes learn it from the stream.
    #[must_use]
    pub fn new(pool: PgPool, passwords: Passwords, sessions: SessionVersions) -> Self {
        let store = || PersistedEventStore::new_event_store(PostgresEventRepository::new(pool.clone()));
        Self {
            cqrs: Arc::new(CqrsFramework::new(store(), vec![], ())),
            store: Arc::new(store()),
            pool,
            passwords,
            sessions,
        }
    }

    /// The hashing pool (sign-in verifies through it too).
    #[must_use]
    pub fn passwords(&self) -> &Passwords {
        &self.passwords
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
        if let Err(p) = check_policy(&input.password) {
            problems.insert("password".to_owned(), p);
        }
        let role_names = if input.roles.is_empty() { vec![DEFAULT_ROLE.to_owned()] } else { input.roles };
        let mut roles = Vec::new();
        for role in &role_names {
            match RoleName::parse(role) {
                Ok(r) if cairn_domain::roles::permissions_of(r.as_str()).is_some() => roles.push(r),
                _ => {
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
        let command = UserCommand::RegisterUser { email, display_name, password_hash, roles };
        let token = self.execute(id, command, ctx, actor.or(Some(id))).await.map_err(|e| match e {
            ApiError::Conflict(_) => email_taken(),
            other => other,
        })?;
        Ok((id, token))
    }

    /// Runs `command` on user `id` and returns the position of the event it appended.
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
        let actor = actor.map(|a| a.to_string());
        let aggregate_id = id.to_string();
        self.cqrs
            .execute_with_metadata(&aggregate_id, command, ctx.command_metadata(actor.as_deref()))
            .await
            .map_err(map_aggregate_error)?;
        metrics::counter!("cairn_events_appended_total", "aggregate" => "User").increment(1);
        let (tx, pos, version): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT transaction_id::text::bigint, global_position, (payload -> event_type ->> 'session_version')::bigint \
             FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1 ORDER BY sequence DESC LIMIT 1",
        )
        .bind(&aggregate_id)
        .fetch_one(&self.pool)
        .await?;
        if let Some(version) = version {
            self.sessions.observe(id, u64::try_from(version).unwrap_or(0));
        }
        Ok(ConsistencyToken { tx: u64::try_from(tx).unwrap_or(0), pos })
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
        .fetch_optional(&self.pool)
        .await?;
        Ok(id.and_then(|s| s.parse().ok()))
    }

    /// Loads user `id` from its events (always current, unlike the read model).
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn load(&self, id: Uuid) -> Result<User, ApiError> {
        let context = self.store.load_aggregate(&id.to_string()).await.map_err(map_aggregate_error)?;
        Ok(context.aggregate)
    }
}

fn email_taken() -> ApiError {
    ApiError::Conflict("email is already registered".to_owned())
}

/// Domain refusals are 4xx; infrastructure failures are 5xx.
fn map_aggregate_error(e: AggregateError<UserError>) -> ApiError {
    match e {
        AggregateError::UserError(e @ (UserError::NotFound | UserError::Deleted)) => ApiError::NotFound(e.to_string()),
        AggregateError::UserError(e) => ApiError::Conflict(e.to_string()),
        AggregateError::AggregateConflict => ApiError::Conflict("the user was modified concurrently; retry".to_owned()),
        AggregateError::DatabaseConnectionError(e) => ApiError::ServiceUnavailable(e.to_string()),
        AggregateError::DeserializationError(e) | AggregateError::UnexpectedError(e) => {
            // postgres-es reports a pool timeout as an unexpected error.
            if e.to_string().contains("pool timed out") {
                ApiError::ServiceUnavailable(e.to_string())
            } else {
                ApiError::Internal(anyhow::anyhow!("{e}"))
            }
        }
    }
}
