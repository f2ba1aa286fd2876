//! The write side: validates requests, authenticates callers and turns each accepted request
//! into a command on an aggregate. Every command answers with a consistency token.
//!
//! - [`admin`]: operators' retries and skips of parked events (the `ParkedEvent` aggregate).
//! - [`executor`]: runs commands on any aggregate through postgres-es, with request metadata.
//! - [`users`]: registration, profile, roles held, deactivation (the `User` aggregate).
//! - [`auth`]: sign-in with lockout, sessions and refresh rotation, password change and reset,
//!   email verification (the `Session` aggregate).
//! - [`oauth`]: OAuth 2.0 / OpenID Connect sign-in with PKCE.
//! - [`roles`]: defining and editing roles (the `Role` aggregate).
//! - [`files`]: uploads streamed to the file store, sharing and deleting files (the `File`
//!   aggregate), and the quota.
//! - [`jobs`]: enqueueing jobs, operators' retries and cancels, cron schedules (the `Job` and
//!   `Schedule` aggregates, appended with their state rows).
//! - [`rooms`]: chat rooms, their members and their messages (the `Room` and `Message` aggregates),
//!   and read markers; [`MessageCommands`] is also the socket's send path.
//! - [`answers`]: the shapes of the answers, for the OpenAPI document.
//! - [`passwords`]: argon2id hashing on a bounded blocking pool, and the password policy.

pub mod admin;
pub mod answers;
pub mod auth;
pub mod executor;
pub mod files;
pub mod jobs;
pub mod oauth;
pub mod passwords;
pub mod roles;
pub mod rooms;
pub mod store;
pub mod users;

use std::sync::Arc;

use axum::extract::FromRef;
use cairn_domain::{LockoutPolicy, SessionPolicy};
use cairn_platform::auth::AuthState;
use cairn_platform::clock::SharedClock;
use cairn_platform::http::limits::Limiter;
use cairn_platform::settings::Settings;
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

pub use auth::{LoginGuard, RefreshCookie, SessionService};
pub use files::FileCommands;
pub use roles::RoleCatalog;
pub use rooms::{MessageCommands, RoomCommands};
pub use users::UserCommands;

/// Everything the command handlers share.
#[derive(Clone, FromRef)]
pub struct CommandState {
    /// User commands.
    pub users: UserCommands,
    /// Sessions.
    pub sessions: SessionService,
    /// Roles.
    pub roles: RoleCatalog,
    /// Rooms and their members.
    pub rooms: RoomCommands,
    /// Messages (the same service a socket's `send` goes through).
    pub messages: MessageCommands,
    /// Operators' decisions about parked events.
    pub parked: admin::ParkedEvents,
    /// Token issuing and verification.
    pub auth: AuthState,
    /// The refresh cookie.
    pub cookie: RefreshCookie,
    /// The database (emailed tokens).
    pub pool: PgPool,
    /// OAuth providers.
    pub oauth: oauth::OAuth,
    /// Verification and reset mails asked for, per address (`CAIRN_RATE_LIMIT_MAIL`; none when `off`).
    pub mail_requests: Option<Arc<Limiter<String>>>,
    /// Mail requests being looked up now (at most [`auth::MAIL_REQUESTS_IN_FLIGHT`]).
    pub mail_lookups: Arc<tokio::sync::Semaphore>,
    /// Absolute session lifetime, for the cookie's Max-Age.
    #[from_ref(skip)]
    pub sessions_lifetime_secs: i64,
    /// Which sign-in attempts get their password checked (the lockout).
    pub guard: LoginGuard,
    /// Where uploaded files' bytes go.
    pub files: cairn_storage::FileStore,
    /// Uploads, shares and deletions of files.
    pub file_commands: FileCommands,
    /// Where time comes from.
    pub clock: SharedClock,
    /// How jobs are checked (the kinds, the webhook hosts).
    pub jobs: Arc<cairn_platform::jobs::JobsSettings>,
}

impl CommandState {
    /// Builds the command side's services from settings; `messages` is shared with the sockets.
    ///
    /// # Errors
    /// When a duration is out of range.
    pub fn new(
        pool: PgPool,
        settings: &Settings,
        auth: AuthState,
        users: UserCommands,
        messages: MessageCommands,
        files: cairn_storage::FileStore,
    ) -> anyhow::Result<Self> {
        let policy = SessionPolicy {
            absolute: chrono::Duration::from_std(settings.session_lifetime)?,
            idle: chrono::Duration::from_std(settings.session_idle)?,
            grace: chrono::Duration::from_std(settings.refresh_grace)?,
        };
        Ok(Self {
            sessions: SessionService::new(
                pool.clone(),
                auth.sessions.clone(),
                users.wake().clone(),
                policy,
                settings.clock.clone(),
            ),
            guard: LoginGuard::new(
                pool.clone(),
                settings.clock.clone(),
                LockoutPolicy {
                    threshold: settings.lockout_threshold,
                    base_secs: i64::try_from(settings.lockout_base.as_secs()).unwrap_or(60),
                    max_secs: i64::try_from(settings.lockout_max.as_secs()).unwrap_or(900),
                },
                // An admitted guess counts for longer than any request can take.
                settings.request_timeout + std::time::Duration::from_secs(30),
            ),
            clock: settings.clock.clone(),
            jobs: Arc::new(settings.jobs.clone()),
            file_commands: FileCommands::new(
                pool.clone(),
                auth.sessions.clone(),
                users.wake().clone(),
                files.clone(),
                files::UploadLimits::from_settings(&settings.files, settings.request_timeout),
                settings.clock.clone(),
            ),
            files,
            roles: users.roles().clone(),
            rooms: RoomCommands::new(pool.clone(), auth.sessions.clone(), users.wake().clone()),
            messages,
            parked: admin::ParkedEvents::new(pool.clone(), auth.sessions.clone(), users.wake().clone()),
            users,
            auth,
            cookie: RefreshCookie { secure: settings.cookie_secure, allowed_origins: settings.allowed_origins.clone() },
            oauth: oauth::OAuth::new(pool.clone(), &settings.oauth_providers, &settings.oauth_redirect_uri)?,
            pool,
            mail_requests: settings
                .rate_limit_mail
                .and_then(|rate| Limiter::swept("mail", rate, settings.rate_limit_sweep)),
            mail_lookups: Arc::new(tokio::sync::Semaphore::new(auth::MAIL_REQUESTS_IN_FLIGHT)),
            sessions_lifetime_secs: i64::try_from(settings.session_lifetime.as_secs()).unwrap_or(i64::MAX),
        })
    }
}

/// The command API's routes, documented.
pub fn router(state: CommandState) -> OpenApiRouter {
    let upload_body_limit = state.file_commands.limits().body_limit();
    users::routes()
        .merge(auth::routes())
        .merge(oauth::routes())
        .merge(roles::routes())
        .merge(admin::routes())
        .merge(rooms::routes())
        .merge(files::routes(upload_body_limit))
        .merge(jobs::routes())
        .with_state(state)
}
