//! The files read models: the caller's files and the files shared with them, one file's metadata
//! (with a download URL that needs no header), and the download itself: a stream with `Range`,
//! `ETag` and `If-None-Match` from the local store, a redirect to a presigned URL from S3.
//!
//! - [`access`]: who may read a file, the one rule every file read follows.
//! - `store`: the list and share queries.
//! - `headers`: `Range`, entity tags and `Content-Disposition`.
//! - `routes`, `download`: the handlers.

pub mod access;
mod download;
mod headers;
mod routes;
mod store;

use std::sync::Arc;
use std::time::Duration;

use utoipa_axum::router::OpenApiRouter;

pub use store::{FileCursor, Listing, SHARED_WITH_CAP};

use crate::QueryState;

/// How downloads are answered (`CAIRN_FILES_URL_TTL_SECS`, `CAIRN_FILES_INLINE_TYPES`).
#[derive(Debug, Clone)]
pub struct FileDownloads {
    /// How long a download token or a presigned URL lives.
    pub url_ttl: Duration,
    /// Content types served `inline` (shown by the browser) rather than as an attachment.
    pub inline_types: Arc<Vec<String>>,
}

impl FileDownloads {
    /// From the files settings.
    #[must_use]
    pub fn from_settings(settings: &cairn_platform::settings::FilesSettings) -> Self {
        Self { url_ttl: settings.url_ttl, inline_types: Arc::new(settings.inline_types.clone()) }
    }

    /// Whether files of `content_type` are served inline.
    #[must_use]
    pub fn inline(&self, content_type: &str) -> bool {
        self.inline_types.iter().any(|t| t.eq_ignore_ascii_case(content_type))
    }
}

/// The files read routes.
pub fn routes() -> OpenApiRouter<QueryState> {
    routes::routes().merge(download::routes())
}
