//! Read-your-writes: `X-Consistency-Token` makes a read wait until the projection has applied it.

use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use cairn_platform::checkpoint::CheckpointWatcher;
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiResponse};
use serde::Serialize;

/// The header a read sends its token in.
pub const HEADER: &str = "x-consistency-token";

/// Waits on the projections' checkpoints. Every projection consumes the whole stream, so a
/// token is visible once each has passed it.
#[derive(Clone)]
pub struct Consistency {
    /// One watcher per projection.
    pub projections: Vec<CheckpointWatcher>,
    /// Longest wait.
    pub max_wait: Duration,
}

impl Consistency {
    /// Waits until every projection has applied `token`, at most `max_wait`. Returns whether they did.
    pub async fn wait_for(&self, token: ConsistencyToken) -> bool {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        for watcher in &self.projections {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !watcher.wait_for(token, left).await {
                return false;
            }
        }
        true
    }
}

/// The outcome of a read's wait: `None` when no token was sent.
#[derive(Debug, Clone, Copy)]
pub struct ReadConsistency(pub Option<bool>);

impl ReadConsistency {
    /// Adds `meta.consistent` when a token was sent.
    pub fn annotate<T: Serialize>(self, response: ApiResponse<T>) -> ApiResponse<T> {
        match self.0 {
            Some(consistent) => response.meta("consistent", consistent),
            None => response,
        }
    }
}

impl<S> FromRequestParts<S> for ReadConsistency
where
    Consistency: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Some(raw) = parts.headers.get(HEADER) else {
            return Ok(Self(None));
        };
        let token: ConsistencyToken = raw.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
            ApiError::field("X-Consistency-Token", "is not a consistency token from a command's meta")
        })?;
        Ok(Self(Some(Consistency::from_ref(state).wait_for(token).await)))
    }
}

/// `X-Consistency-Token`, as the OpenAPI document declares it on every read.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
pub struct ConsistencyHeader {
    /// `meta.consistency_token` of a command: the read waits (bounded) until it is visible.
    #[param(rename = "X-Consistency-Token", nullable = false, pattern = r"^[0-9]{1,19}\.[0-9]{1,18}$")]
    pub x_consistency_token: Option<String>,
}
