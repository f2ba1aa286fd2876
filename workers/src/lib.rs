//! Background workers: each concern is its own durable consumer on EVENTS, idempotent by event id.
//!
//! - [`audit`]: writes every event into the `audit_log` table.
//! - [`email`]: mails users about their account (verification, password reset, notices) over SMTP.
//! - [`files`]: turns deleted files into `files.remove` jobs, and sweeps the bytes of uploads that died.
//! - [`jobs`]: Celery-style jobs (handlers, the runner with leases and retries, cron schedules).

pub mod audit;
pub mod email;
pub mod files;
pub mod jobs;

pub use audit::AuditWorker;

/// The names under which the workers (and each API process's session map) park events they
/// cannot apply, as the operators' view lists them.
pub const PARKING_CONSUMERS: &[&str] =
    &["audit", "email", files::remover::PARKING_NAME, cairn_platform::auth::SESSION_MAP];
pub use email::{EmailSettings, EmailWorker};
pub use files::{FileRemover, FileSweeper, SweepReport};
