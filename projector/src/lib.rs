//! Projectors: durable consumers of EVENTS that keep read-model tables.
//!
//! Each projection applies a batch of events and advances its checkpoint in **one** Postgres
//! transaction, skips anything at or below the checkpoint, and is acknowledged only after commit:
//! exactly-once effect on top of at-least-once delivery. When an event arrives whose predecessor
//! is not the checkpoint (a redelivery overtaken by later messages, say), the gap is filled from
//! the events table, the source of truth, in the same transaction.
//!
//! - [`users`]: the `users` read model.
//! - [`sessions`]: the `sessions` read model.
//! - [`roles`]: the `roles` read model.
//! - [`rooms`]: the `rooms`, `room_members` and `messages` read models.
//! - [`files`]: the `files` and `file_shares` read models.
//! - [`analytics`]: daily sign-ups, active users, messages, uploads and job runs.
//! - [`runner`]: the checkpointed apply loop shared by every projection.
//! - [`rebuild`]: rebuilds from the log beside the live tables, one per projection at a time.

pub mod analytics;
pub mod files;
pub mod rebuild;
pub mod roles;
pub mod rooms;
pub mod runner;
pub mod sessions;
pub mod users;

pub use analytics::AnalyticsProjection;
pub use files::FilesProjection;
pub use rebuild::rebuild;
pub use roles::RolesProjection;
pub use rooms::RoomsProjection;
pub use runner::{run, Projection};
pub use sessions::SessionsProjection;
pub use users::UsersProjection;

/// The names of every projection, for checkpoints and rebuilds.
pub const PROJECTIONS: &[&str] = &[
    UsersProjection::NAME,
    SessionsProjection::NAME,
    RolesProjection::NAME,
    RoomsProjection::NAME,
    FilesProjection::NAME,
    AnalyticsProjection::NAME,
];
