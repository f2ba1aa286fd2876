//! The domain of cairn: aggregates, their commands and events, and the rules that refuse
//! commands. Pure: no I/O, no clock, no randomness. Everything that changes state is an event
//! appended by `cqrs-es`; everything a client reads is a projection of those events.
//!
//! - [`user`]: the `User` aggregate (registration, roles, deactivation, profile, password, lockout).
//! - [`session`]: the `Session` aggregate (a sign-in and its rotating refresh-token family).
//! - [`role`]: the `Role` aggregate (a named set of permissions).
//! - [`roles`]: the seeded role catalogue and its permissions.
//! - [`parked`]: the `ParkedEvent` aggregate (operators' retries and skips of parked events).
//! - [`upcast`]: reading events stored under older versions as the current shape.
//! - [`values`]: newtypes that parse input (`Email`, `DisplayName`, `RoleName`).

pub mod parked;
pub mod role;
pub mod roles;
pub mod session;
pub mod upcast;
pub mod user;
pub mod values;

pub use parked::{parked_event_id, ParkedEvent, ParkedEventCommand, ParkedEventError, ParkedEventEvent};
pub use role::{Role, RoleCommand, RoleError, RoleEvent};
pub use session::{RefreshOutcome, RevokeReason, Session, SessionCommand, SessionError, SessionEvent, SessionPolicy};
pub use user::{AccountLock, LockoutPolicy, SessionsEndedReason, User, UserCommand, UserError, UserEvent, UserStatus};
pub use values::{DisplayName, Email, RoleName, ValueError};
