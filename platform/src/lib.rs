//! Infrastructure shared by every cairn service.
//!
//! - [`settings`]: configuration from the environment.
//! - [`clock`]: the time every time-dependent rule reads, injectable for tests.
//! - [`telemetry`]: tracing and the Prometheus recorder.
//! - [`db`]: the Postgres pool, database creation and migrations.
//! - [`nats`]: namespaced JetStream names, the EVENTS stream and its consumers.
//! - [`failure`]: transient failures (retried) versus an event's own (parked).
//! - [`envelope`]: the event envelope published on NATS, and the consistency token.
//! - [`checkpoint`]: projection checkpoints and waiting for one to reach a consistency token.
//! - [`parking`]: events a consumer could not apply, and operators' retries and skips.
//! - [`files`]: the one shape of a file, as uploads answer and reads show it.
//! - [`rooms`]: the one shape of a chat message, and the port a socket sends messages through.
//! - [`analytics`]: DAU, WAU and MAU as of a day, counted or taken from the rollup.
//! - [`audit`]: the verifiable log: Merkle tree, signed heads, audit keys, proofs, verification.
//! - [`jobs`]: enqueueing background jobs, the shipped kinds and the queue's settings.
//! - [`secrets`]: random tokens and their hashes.
//! - [`auth`]: signing keys, access tokens, the session-version map, the authenticated caller.
//! - [`http`]: the response envelope, the error type, extractors and the layers every router shares.

pub mod analytics;
pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod clock;
pub mod db;
pub mod envelope;
pub mod failure;
pub mod files;
pub mod http;
pub mod jobs;
pub mod nats;
pub mod parking;
pub mod rooms;
pub mod secrets;
pub mod settings;
pub mod telemetry;

pub use settings::Settings;
