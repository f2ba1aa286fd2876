//! The relay: the events table is the outbox, and this crate carries it to JetStream.
//!
//! - [`reader`]: reading the events table in the global `(transaction_id, global_position)`
//!   order, never past a transaction still running (gap safety). Projectors and rebuilds read
//!   the log through it too.
//! - [`publisher`]: the single-active [`Relay`] that publishes the log, waits for every PubAck
//!   and stores its checkpoint; on take-over it reconciles the checkpoint with the stream's last
//!   message, so a batch published but not checkpointed is never appended twice.
//! - [`checkpoint`]: the relay's checkpoint row (`relay_checkpoints`).
//! - [`horizon`]: what holds the relay back when committed events wait behind a transaction
//!   still running ([`HeldBack`]): the backend's pid, transaction age and `application_name`, in
//!   a watch, gauges and a rate-limited warning.
//! - [`wakeup`]: [`RelayWakeup`], how commands wake the relay after they commit.
//! - [`audit`]: [`AuditFold`], the loop beside the publishing one that folds the log into the
//!   audit Merkle tree (Postgres only, so a NATS outage does not stop it) and signs tree heads.

pub mod audit;
pub mod checkpoint;
pub mod horizon;
pub mod publisher;
pub mod reader;
pub mod wakeup;

pub use audit::AuditFold;
pub use horizon::{HeldBack, Holder};
pub use publisher::Relay;
pub use wakeup::RelayWakeup;
