//! Background workers: each concern is its own durable consumer on EVENTS, idempotent by event id.
//!
//! - [`audit`]: writes every event into the `audit_log` table.
//! - [`email`]: mails users about their account (verification, password reset, notices) over SMTP.

pub mod audit;
pub mod email;

pub use audit::AuditWorker;
pub use email::{EmailSettings, EmailWorker};
