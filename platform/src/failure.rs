//! Telling a failure that will pass (Postgres restarting, NATS away, an SMTP server down) from one
//! that never will (a payload this release cannot read, a rule an event breaks).
//!
//! Consumers retry the first kind with backoff for as long as it lasts, since no event is to
//! blame; the second kind is never retried for ever: the event is parked and the consumer moves on.

use std::fmt;

/// Wraps an error that says nothing about the event being handled: the consumer retries it.
#[derive(Debug)]
pub struct Transient(pub anyhow::Error);

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Transient {}

/// Marks `e` as transient.
#[must_use]
pub fn transient(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Transient(e.into()))
}

/// Whether `e` is worth retrying as it is: a [`Transient`] anywhere in its chain, a connection,
/// pool or I/O failure, or a Postgres error of a class that passes (connection exceptions,
/// insufficient resources, operator intervention, serialization failures, deadlocks, lock
/// timeouts). Everything else (decoding, constraint violations, type errors) is the event's own.
#[must_use]
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if cause.is::<Transient>() || cause.is::<std::io::Error>() {
            return true;
        }
        match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => db.code().is_some_and(|code| {
                ["08", "53", "57", "58"].iter().any(|class| code.starts_with(class))
                    || ["40001", "40P01", "55P03", "55006"].contains(&code.as_ref())
            }),
            Some(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_errors_are_the_events_own_and_outages_are_transient() {
        let decode = serde_json::from_str::<u32>("\"x\"").map_err(anyhow::Error::from);
        assert!(decode.is_err_and(|e| !is_transient(&e)));
        assert!(is_transient(&anyhow::Error::from(sqlx::Error::PoolTimedOut)));
        assert!(is_transient(&transient(anyhow::anyhow!("smtp down")).context("mail for event")));
        assert!(!is_transient(&anyhow::anyhow!("rule broken")));
    }
}
