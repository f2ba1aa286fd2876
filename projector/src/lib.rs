//! Projectors: durable consumers of EVENTS that keep read-model tables.
//!
//! Each projection applies a batch of events and advances its checkpoint in **one** Postgres
//! transaction, skips anything at or below the checkpoint, and is acknowledged only after commit:
//! exactly-once effect on top of at-least-once delivery. When an event arrives whose predecessor
//! is not the checkpoint (a redelivery overtaken by later messages, say), the gap is filled from
//! the events table, the source of truth, in the same transaction.
//!
//! - [`users`]: the `users` read model.
//! - [`runner`]: the checkpointed apply loop shared by every projection, and rebuilds.

pub mod runner;
pub mod users;

pub use runner::{rebuild, run, Projection};
pub use users::UsersProjection;
