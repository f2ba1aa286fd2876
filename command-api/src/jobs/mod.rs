//! Jobs and schedules on the command side: enqueueing over HTTP, operators' retries and
//! cancels, and cron schedules defined over the API. [`commands`] holds the transactions, which
//! `cairn jobs` runs too; the routes parse and authorize.

pub mod commands;
mod routes;

pub use routes::routes;
