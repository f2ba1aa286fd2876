//! The domain of cairn: aggregates, their commands and events, and the rules that refuse
//! commands. Pure: no I/O, no clock, no randomness. Everything that changes state is an event
//! appended by `cqrs-es`; everything a client reads is a projection of those events.
//!
//! - [`user`]: the `User` aggregate (registration, roles, deactivation, profile).
//! - [`roles`]: the seeded role catalogue and its permissions.
//! - [`values`]: newtypes that parse input (`Email`, `DisplayName`, `RoleName`).

pub mod roles;
pub mod user;
pub mod values;

pub use user::{User, UserCommand, UserError, UserEvent, UserStatus};
pub use values::{DisplayName, Email, RoleName, ValueError};
