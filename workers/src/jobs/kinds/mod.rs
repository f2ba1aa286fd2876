//! The kinds that ship with cairn (their names and argument checks are in
//! `cairn_platform::jobs::kinds`).
//!
//! - [`analytics`]: `analytics.rollup`, DAU/WAU/MAU stored for finished days.
//! - [`noop`]: `noop`, nothing (tests and benchmarks).
//! - [`webhook`]: `webhook.deliver`, a signed POST to an allowed host.
//! - [`files_remove`]: `files.remove`, the bytes of one deleted file.
//! - [`files_sweep`]: `files.sweep`, one pass of the orphan sweeper.
//! - [`sessions_purge`]: `sessions.purge`, ended sessions out of the read model.

pub mod analytics;
pub mod files_remove;
pub mod files_sweep;
pub mod noop;
pub mod sessions_purge;
pub mod webhook;

pub use analytics::AnalyticsRollup;

use cairn_platform::Settings;
use cairn_storage::FileStore;
use sqlx::PgPool;

pub use files_remove::FilesRemove;
pub use files_sweep::FilesSweep;
pub use sessions_purge::SessionsPurge;
pub use webhook::WebhookDeliver;

use super::Registry;
use crate::files::FileSweeper;

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
///
/// # Errors
/// When the webhook client cannot be built (its TLS set-up).
pub fn shipped(deps: &KindDeps) -> anyhow::Result<Registry> {
    let KindDeps { pool, settings, files } = deps;
    Ok(Registry::new()
        .with(noop::Noop)
        .with(AnalyticsRollup)
        .with(WebhookDeliver::new(&settings.jobs)?)
        .with(FilesRemove::new(files.clone()))
        .with(FilesSweep::new(FileSweeper::new(pool.clone(), files.clone(), settings)))
        .with(SessionsPurge::new(settings.sessions_purge_after, settings.session_idle)))
}
