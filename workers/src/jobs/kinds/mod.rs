//! The kinds that ship with cairn (their names and argument checks are in
//! `cairn_platform::jobs::kinds`).
//!
//! - [`analytics`]: `analytics.rollup`, DAU/WAU/MAU stored for finished days.
//! - [`noop`]: does nothing, for tests and benchmarks.

pub mod analytics;
pub mod noop;

pub use analytics::AnalyticsRollup;

use cairn_platform::Settings;
use cairn_storage::FileStore;
use sqlx::PgPool;

use super::Registry;

/// What the shipped handlers are built from.
#[derive(Clone)]
pub struct KindDeps {
    /// The database.
    pub pool: PgPool,
    /// The process's settings (`settings.jobs` for the webhooks, the clock).
    pub settings: Settings,
    /// The process's file store.
    pub files: FileStore,
}

/// The registry of every shipped kind.
#[must_use]
pub fn shipped(deps: &KindDeps) -> Registry {
    let KindDeps { pool: _, settings: _, files: _ } = deps;
    Registry::new().with(noop::Noop).with(AnalyticsRollup)
}
