//! One error type for the HTTP edge. Handlers return it; the envelope layer renders it with the
//! request id. 5xx details are logged, never sent.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Every failure a client can see. Each variant documents its status and code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 VALIDATION_FAILED: body, query or path fails validation; `details` names each field.
    #[error("{message}")]
    Validation {
        /// Summary.
        message: String,
        /// Field → problem.
        details: BTreeMap<String, String>,
    },
    /// 400 MALFORMED_REQUEST: not JSON, or the body cannot be read.
    #[error("{0}")]
    Malformed(String),
    /// 400 MALFORMED_REQUEST: the body holds a field the operation does not know; `details` names it.
    #[error("the body holds a field this operation does not take: {0}")]
    UnknownField(String),
    /// 401 UNAUTHENTICATED: missing, malformed, expired, revoked or wrongly signed token.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403 EMAIL_NOT_VERIFIED: the action needs a verified email.
    #[error("this action needs a verified email address")]
    EmailNotVerified,
    /// 403 FORBIDDEN: authenticated but lacking the permission.
    #[error("{0}")]
    Forbidden(String),
    /// 404 NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// 405 METHOD_NOT_ALLOWED.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 CONFLICT: duplicate or concurrent modification.
    #[error("{0}")]
    Conflict(String),
    /// 413 PAYLOAD_TOO_LARGE.
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 415 UNSUPPORTED_MEDIA_TYPE.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 423 ACCOUNT_LOCKED: too many failed sign-ins; `details.retry_after_s` and `Retry-After`.
    #[error("account is locked after too many failed sign-ins; try again later")]
    AccountLocked {
        /// Seconds until the lock ends.
        retry_after_s: u64,
    },
    /// 429 RATE_LIMITED with `Retry-After`.
    #[error("too many requests; slow down")]
    RateLimited {
        /// Seconds until a request would be allowed.
        retry_after_s: u64,
    },
    /// 503 SERVICE_UNAVAILABLE: Postgres or NATS unreachable; nothing was written.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 500 INTERNAL: logged with the request id; the client learns nothing more.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The rendered error, carried in the response extensions until the envelope layer adds the request id.
#[derive(Debug, Clone)]
pub(crate) struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    /// What to log for a 5xx (never sent).
    pub internal: Option<String>,
    /// `Retry-After` seconds, for 423 and 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A single-field validation failure.
    #[must_use]
    pub fn field(field: &str, problem: impl Into<String>) -> Self {
        let problem = problem.into();
        Self::Validation {
            message: format!("{field}: {problem}"),
            details: BTreeMap::from([(field.to_owned(), problem)]),
        }
    }

    /// Status and code of this error.
    #[must_use]
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Validation { .. } => (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"),
            Self::Malformed(_) | Self::UnknownField(_) => (StatusCode::BAD_REQUEST, "MALFORMED_REQUEST"),
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            Self::EmailNotVerified => (StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
            Self::AccountLocked { .. } => (StatusCode::LOCKED, "ACCOUNT_LOCKED"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            Self::ServiceUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        }
    }

    /// The error a bare status maps to (for responses made outside our handlers: 404, 405, 413…).
    #[must_use]
    pub(crate) fn body_for_status(status: StatusCode) -> ErrorBody {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("NOT_FOUND", "no such route"),
            StatusCode::METHOD_NOT_ALLOWED => ("METHOD_NOT_ALLOWED", "method not allowed on this route"),
            StatusCode::PAYLOAD_TOO_LARGE => ("PAYLOAD_TOO_LARGE", "request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("UNSUPPORTED_MEDIA_TYPE", "unsupported media type"),
            StatusCode::UNAUTHORIZED => ("UNAUTHENTICATED", "authentication required"),
            StatusCode::FORBIDDEN => ("FORBIDDEN", "forbidden"),
            StatusCode::TOO_MANY_REQUESTS => ("RATE_LIMITED", "too many requests; slow down"),
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
                ("SERVICE_UNAVAILABLE", "the request timed out")
            }
            StatusCode::SERVICE_UNAVAILABLE => ("SERVICE_UNAVAILABLE", "service unavailable"),
            s if s.is_client_error() => ("MALFORMED_REQUEST", "the request could not be understood"),
            _ => ("INTERNAL", "internal error"),
        };
        ErrorBody { code, message: message.to_owned(), details: None, internal: None, retry_after: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        let plain = |message: String| ErrorBody { code, message, details: None, internal: None, retry_after: None };
        let body = match self {
            Self::Internal(e) => ErrorBody { internal: Some(format!("{e:#}")), ..plain("internal error".to_owned()) },
            Self::ServiceUnavailable(m) => ErrorBody {
                internal: Some(m),
                ..plain("a backing service is unavailable; nothing was written, try again".to_owned())
            },
            Self::Validation { details, .. } => {
                ErrorBody { details: Some(serde_json::json!(details)), ..plain(message) }
            }
            Self::UnknownField(field) => {
                ErrorBody { details: Some(serde_json::json!({ field: "is not a known field" })), ..plain(message) }
            }
            Self::AccountLocked { retry_after_s } | Self::RateLimited { retry_after_s } => ErrorBody {
                details: Some(serde_json::json!({ "retry_after_s": retry_after_s })),
                retry_after: Some(retry_after_s),
                ..plain(message)
            },
            _ => plain(message),
        };
        let mut response = status.into_response();
        response.extensions_mut().insert(body);
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                Self::ServiceUnavailable(format!("postgres: {e}"))
            }
            other => Self::Internal(other.into()),
        }
    }
}

/// Turns a unique violation into a 409 (as realworld-axum-sqlx's `on_constraint`).
pub trait ResultExt<T> {
    /// Maps a violation of `constraint` to `map()`.
    ///
    /// # Errors
    /// The mapped error, or the original one converted.
    fn on_constraint(self, constraint: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError>;
}

impl<T> ResultExt<T> for Result<T, sqlx::Error> {
    fn on_constraint(self, constraint: &str, map: impl FnOnce() -> ApiError) -> Result<T, ApiError> {
        self.map_err(|e| match &e {
            sqlx::Error::Database(db) if db.constraint() == Some(constraint) => map(),
            _ => e.into(),
        })
    }
}
