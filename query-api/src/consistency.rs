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

/// Waits on the users projection's checkpoint.
#[derive(Clone)]
pub struct Consistency {
    /// The users projection's checkpoint.
    pub users: CheckpointWatcher,
    /// Longest wait.
    pub max_wait: Duration,
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
        let consistency = Consistency::from_ref(state);
        Ok(Self(Some(consistency.users.wait_for(token, consistency.max_wait).await)))
    }
}
