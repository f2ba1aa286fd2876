//! Account mails over SMTP: welcome and address verification, password reset, and the notices
//! that follow (address verified, password changed). A durable consumer on EVENTS, idempotent by
//! event id; the links carry single-use tokens stored only as hashes in `email_tokens`.
//!
//! - [`settings`]: the SMTP server, sender and public URL, from the environment.
//! - [`templates`]: subject, plain-text and HTML body of every mail.
//! - `mailer`: delivery through lettre over rustls.
//! - `worker`: the consumer and its exactly-once bookkeeping.
//! - `claim`: the per-event lock that keeps two worker processes from mailing one event.

mod claim;
mod mailer;
pub mod settings;
pub mod templates;
mod worker;

pub use settings::{EmailSettings, SmtpPassword, SmtpTls};
pub use worker::{EmailWorker, CONSUMER, RESET_PASSWORD_TTL, VERIFY_EMAIL_TTL};
