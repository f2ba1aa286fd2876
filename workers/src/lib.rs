//! Background workers: each concern is its own durable consumer on EVENTS, idempotent by event id.
//!
//! - [`audit`]: writes every event into the `audit_log` table.

pub mod audit;

pub use audit::AuditWorker;
