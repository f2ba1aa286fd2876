//! File clean-up: the bytes of deleted files, and of uploads that never became files.
//!
//! - [`remover`]: a durable consumer on EVENTS that removes a file's bytes once FileDeleted is in
//!   the log (reads stopped at the append; the bytes go afterwards, idempotently).
//! - [`sweeper`]: a periodic pass that removes stored bytes no event names (an upload that died
//!   between storing its bytes and appending FileUploaded), after a grace period.

pub mod remover;
pub mod sweeper;

pub use remover::FileRemover;
pub use sweeper::{FileSweeper, SweepReport};
