//! Infrastructure shared by every cairn service.
//!
//! - [`settings`]: configuration from the environment.
//! - [`telemetry`]: tracing and the Prometheus recorder.
//! - [`db`]: the Postgres pool, database creation and migrations.
//! - [`nats`]: namespaced JetStream names, the EVENTS stream and its consumers.
//! - [`envelope`]: the event envelope published on NATS, and the consistency token.
//! - [`log`]: reading the events table in the global order.
//! - [`relay`]: the gap-safe relay from the events table to JetStream.
//! - [`wake`]: waking the relay after events commit.
//! - [`checkpoint`]: projection checkpoints and waiting for one to reach a consistency token.
//! - [`secrets`]: random tokens and their hashes.
//! - [`auth`]: signing keys, access tokens, the session-version map, the authenticated caller.
//! - [`http`]: the response envelope, the error type, extractors and the layers every router shares.

pub mod auth;
pub mod checkpoint;
pub mod db;
pub mod envelope;
pub mod http;
pub mod log;
pub mod nats;
pub mod relay;
pub mod roles;
pub mod secrets;
pub mod settings;
pub mod telemetry;
pub mod wake;

pub use settings::Settings;
