//! The write side: validates requests, authenticates callers and turns each accepted request
//! into a command on an aggregate. Every command answers with a consistency token.
//!
//! - [`users`]: registration, sign-in, profile, roles, deactivation (the `User` aggregate).
//! - [`passwords`]: argon2id hashing on a bounded blocking pool.

pub mod passwords;
pub mod users;

use axum::extract::FromRef;
use cairn_platform::auth::AuthState;
use utoipa_axum::router::OpenApiRouter;

pub use users::UserCommands;

/// Everything the command handlers share.
#[derive(Clone, FromRef)]
pub struct CommandState {
    /// User commands.
    pub users: UserCommands,
    /// Token issuing and verification.
    pub auth: AuthState,
}

/// The command API's routes, documented.
pub fn router(state: CommandState) -> OpenApiRouter {
    users::routes().with_state(state)
}
