//! Read-your-writes: `X-Consistency-Token` makes a read wait until the projections it reads from
//! have applied the command that returned the token.
//!
//! The rules a read follows:
//! - The wait comes after authorization: a handler takes a [`ConsistencyRequest`] (the token,
//!   parsed but not acted on) and calls [`ConsistencyRequest::wait`] once the caller is allowed
//!   to read, so a caller who will be refused is refused at once.
//! - A read waits only for the read models it reads ([`ReadModel`]); a projection that is behind
//!   holds back only the reads of its own tables.
//! - A token past the newest event in the log can never be satisfied: it is refused at once
//!   (`VALIDATION_FAILED` naming `X-Consistency-Token`) instead of being held for the whole wait.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use cairn_platform::checkpoint::{self, CheckpointWatcher};
use cairn_platform::envelope::ConsistencyToken;
use cairn_platform::http::{ApiError, ApiResponse};
use serde::Serialize;
use sqlx::PgPool;

/// The header a read sends its token in.
pub const HEADER: &str = "x-consistency-token";

/// The header's name as clients write it, for error details.
const HEADER_NAME: &str = "X-Consistency-Token";

/// A read model a read can wait for; each is built by the projection of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModel {
    /// `users`: profiles, roles held, status.
    Users,
    /// `sessions`: sign-in sessions.
    Sessions,
    /// `roles`: the role catalogue.
    Roles,
    /// `rooms`, `room_members`, `messages`: chat rooms, their members and their messages.
    Rooms,
    /// `files`, `file_shares`: uploaded files and whom they are shared with.
    Files,
    /// `analytics_daily`, `analytics_active`: the daily figures.
    Analytics,
}

impl ReadModel {
    /// Every read model.
    pub const ALL: [Self; 6] = [Self::Users, Self::Sessions, Self::Roles, Self::Rooms, Self::Files, Self::Analytics];

    /// The name of the projection that builds it (its checkpoint's name).
    #[must_use]
    pub fn projection(self) -> &'static str {
        match self {
            Self::Users => "users",
            Self::Sessions => "sessions",
            Self::Roles => "roles",
            Self::Rooms => "rooms",
            Self::Files => "files",
            Self::Analytics => "analytics",
        }
    }

    /// The read model built by projection `name`, if it is one.
    #[must_use]
    pub fn of_projection(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.projection() == name)
    }
}

/// How long a read waits on its projections for a token above the log head seen so far before it
/// reads the head to see whether the token exists at all.
pub const HEAD_CHECK_AFTER: Duration = Duration::from_millis(100);

/// Waits on the projections' checkpoints, and knows how far the log goes.
#[derive(Clone)]
pub struct Consistency {
    watchers: Arc<Vec<(&'static str, CheckpointWatcher)>>,
    head: LogHead,
    max_wait: Duration,
}

impl Consistency {
    /// Waits of at most `max_wait` on `watchers` (one per projection, by name); the log's head is
    /// read from `pool`.
    #[must_use]
    pub fn new(pool: PgPool, watchers: Vec<(&'static str, CheckpointWatcher)>, max_wait: Duration) -> Self {
        Self { watchers: Arc::new(watchers), head: LogHead::new(pool), max_wait }
    }

    fn watcher(&self, model: ReadModel) -> Option<&CheckpointWatcher> {
        self.watchers.iter().find(|(name, _)| *name == model.projection()).map(|(_, w)| w)
    }

    /// Waits until the projections of `models` have applied `token`, at most `max_wait` in all.
    /// Returns whether they did (false for a read model this process does not follow).
    pub async fn wait_for(&self, token: ConsistencyToken, models: &[ReadModel]) -> bool {
        let deadline = tokio::time::Instant::now() + self.max_wait;
        for model in models {
            let Some(watcher) = self.watcher(*model) else {
                tracing::error!(projection = model.projection(), "no checkpoint watcher for this read model");
                return false;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !watcher.wait_for(token, left).await {
                return false;
            }
        }
        true
    }

    /// Whether the projections of `models` have applied `token` by now, without waiting.
    #[must_use]
    pub fn applied(&self, token: ConsistencyToken, models: &[ReadModel]) -> bool {
        models.iter().all(|m| self.watcher(*m).is_some_and(|w| w.current() >= token))
    }

    /// Waits (bounded) until the projections of `models` have applied `token`, and refuses a
    /// token past the newest event in the log. A token above the head this process has seen is
    /// most often one a command has just returned, which the projections reach within
    /// milliseconds: the read waits for that first, and asks the log whether the token exists
    /// only if it takes longer than [`HEAD_CHECK_AFTER`]. So a fresh token costs no query, and a
    /// forged one is refused after that short moment rather than the whole wait.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming the header; a database failure as itself.
    pub async fn wait_checked(&self, token: ConsistencyToken, models: &[ReadModel]) -> Result<bool, ApiError> {
        if self.head.covers_seen(token) {
            return Ok(self.wait_for(token, models).await);
        }
        let wait = self.wait_for(token, models);
        tokio::pin!(wait);
        tokio::select! {
            applied = &mut wait => return Ok(applied),
            () = tokio::time::sleep(HEAD_CHECK_AFTER) => {}
        }
        self.check_in_log(token).await?;
        Ok(wait.await)
    }

    /// Refuses a token past the newest event in the log: no projection can ever reach it.
    ///
    /// # Errors
    /// VALIDATION_FAILED naming the header; a database failure as itself.
    pub async fn check_in_log(&self, token: ConsistencyToken) -> Result<(), ApiError> {
        if self.head.covers(token).await? {
            Ok(())
        } else {
            Err(ApiError::field(
                HEADER_NAME,
                "is past the newest event in the log; send the token a command returned in meta.consistency_token",
            ))
        }
    }
}

/// The position of the newest committed event in the log, remembered between reads: a token at
/// or below the remembered head needs no query, and one above it reads the head again (the log
/// only grows), so a genuine fresh token is never refused for a stale memory.
#[derive(Clone)]
struct LogHead {
    pool: PgPool,
    seen: Arc<Mutex<ConsistencyToken>>,
}

impl LogHead {
    fn new(pool: PgPool) -> Self {
        Self { pool, seen: Arc::new(Mutex::new(ConsistencyToken::default())) }
    }

    /// Whether `token` is at or below the newest head read so far (no query).
    fn covers_seen(&self, token: ConsistencyToken) -> bool {
        token <= *self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `token` is at or below the log's head.
    async fn covers(&self, token: ConsistencyToken) -> sqlx::Result<bool> {
        if token <= *self.seen.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(true);
        }
        let head = checkpoint::log_head(&self.pool).await?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if head > *seen {
            *seen = head;
        }
        Ok(token <= *seen)
    }
}

/// The outcome of a read's wait: `None` when no token was sent (or nothing could be waited for).
#[derive(Debug, Clone, Copy)]
pub struct ReadConsistency(pub Option<bool>);

impl ReadConsistency {
    /// Adds `meta.consistent` when a token was waited for.
    pub fn annotate<T: Serialize>(self, response: ApiResponse<T>) -> ApiResponse<T> {
        match self.0 {
            Some(consistent) => response.meta("consistent", consistent),
            None => response,
        }
    }
}

/// A read's `X-Consistency-Token`, read but not yet acted on: extracting it never refuses a
/// request. The handler calls [`ConsistencyRequest::wait`] after it has authorised the
/// caller, naming the read models it reads, and gets the [`ReadConsistency`] it annotates its
/// answer with.
#[must_use = "a read waits for its token with `wait` after authorising the caller"]
pub struct ConsistencyRequest {
    sent: Sent,
    consistency: Consistency,
}

/// What the header held.
enum Sent {
    Nothing,
    Malformed,
    Token(ConsistencyToken),
}

impl ConsistencyRequest {
    /// The token sent, if any; a malformed header is refused here, after authorization too.
    fn token(&self) -> Result<Option<ConsistencyToken>, ApiError> {
        match self.sent {
            Sent::Nothing => Ok(None),
            Sent::Malformed => Err(ApiError::field(HEADER_NAME, "is not a consistency token from a command's meta")),
            Sent::Token(token) => Ok(Some(token)),
        }
    }
}

impl ConsistencyRequest {
    /// Refuses a token past the log's head, then waits (bounded) until the projections of
    /// `models` have applied it.
    ///
    /// # Errors
    /// VALIDATION_FAILED for a token past the log's head.
    pub async fn wait(self, models: &[ReadModel]) -> Result<ReadConsistency, ApiError> {
        let Some(token) = self.token()? else { return Ok(ReadConsistency(None)) };
        Ok(ReadConsistency(Some(self.consistency.wait_checked(token, models).await?)))
    }

    /// Refuses a token past the log's head, and says whether the projections of `models` have
    /// applied it by now, without waiting (for views of the projections themselves, which must
    /// answer while a projection is stuck).
    ///
    /// # Errors
    /// VALIDATION_FAILED for a token past the log's head.
    pub async fn now(self, models: &[ReadModel]) -> Result<ReadConsistency, ApiError> {
        let Some(token) = self.token()? else { return Ok(ReadConsistency(None)) };
        self.consistency.check_in_log(token).await?;
        Ok(ReadConsistency(Some(self.consistency.applied(token, models))))
    }

    /// Refuses a token past the log's head, for reads of what no projection builds (nothing to
    /// wait for, so no `meta.consistent`).
    ///
    /// # Errors
    /// VALIDATION_FAILED for a token past the log's head.
    pub async fn unchecked(self) -> Result<ReadConsistency, ApiError> {
        if let Some(token) = self.token()? {
            self.consistency.check_in_log(token).await?;
        }
        Ok(ReadConsistency(None))
    }
}

impl<S> FromRequestParts<S> for ConsistencyRequest
where
    Consistency: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let sent = match parts.headers.get(HEADER) {
            None => Sent::Nothing,
            Some(raw) => raw.to_str().ok().and_then(|s| s.parse().ok()).map_or(Sent::Malformed, Sent::Token),
        };
        Ok(Self { sent, consistency: Consistency::from_ref(state) })
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
