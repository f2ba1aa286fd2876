//! File clean-up: the bytes of deleted files, and of uploads that never became files.
//!
//! - [`remover`]: a durable consumer on EVENTS that enqueues a `files.remove` job once FileDeleted
//!   is in the log (reads stopped at the append; the job removes the bytes afterwards,
//!   idempotently, retried by the queue while the store is away).
//! - [`sweeper`]: a pass, run as the scheduled `files.sweep` job, that removes stored bytes no
//!   event names (an upload that died between storing its bytes and appending FileUploaded),
//!   after a grace period.

pub mod remover;
pub mod sweeper;

pub use remover::FileRemover;
pub use sweeper::{FileSweeper, SweepReport};
