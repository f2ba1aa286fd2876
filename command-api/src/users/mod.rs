//! Users: the command service every entry point shares (HTTP and the operator CLI), and its routes.

mod commands;
pub(crate) mod routes;

pub use commands::{RegisterUser, UserCommands};
pub use routes::routes;
