//! The handlers of the kinds that ship with cairn (their names and argument checks are in
//! `cairn_platform::jobs::kinds`).
//!
//! - [`webhook`]: `webhook.deliver`, a signed POST to an allowed host.
//! - [`files_remove`]: `files.remove`, the bytes of one deleted file.
//! - [`files_sweep`]: `files.sweep`, one pass of the orphan sweeper.
//! - [`sessions_purge`]: `sessions.purge`, ended sessions out of the read model.

pub mod files_remove;
pub mod files_sweep;
pub mod sessions_purge;
pub mod webhook;

pub use files_remove::FilesRemove;
pub use files_sweep::FilesSweep;
pub use sessions_purge::SessionsPurge;
pub use webhook::WebhookDeliver;
