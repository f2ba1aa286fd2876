//! The relay: the events table is the outbox, and this crate carries it to JetStream.
//!
//! - [`reader`]: reading the events table in the global `(transaction_id, global_position)`
//!   order, never past a transaction still running (gap safety). Projectors and rebuilds read
//!   the log through it too.
//! - [`publisher`]: the single-active [`Relay`] that publishes the log, waits for every PubAck
//!   and stores its checkpoint.
//! - [`wakeup`]: [`RelayWakeup`], how commands wake the relay after they commit.

pub mod publisher;
pub mod reader;
pub mod wakeup;

pub use publisher::Relay;
pub use wakeup::RelayWakeup;
