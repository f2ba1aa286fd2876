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
    /// 409 CONFLICT naming in `details` the state that forbids the change (a job's `status`).
    #[error("{message}")]
    ConflictWith {
        /// What cannot be done, and why.
        message: String,
        /// The state found: name → value.
        details: BTreeMap<String, String>,
    },
    /// 413 PAYLOAD_TOO_LARGE.
    #[error("request body is too large")]
    PayloadTooLarge,
    /// 413 PAYLOAD_TOO_LARGE naming the limit passed, with its figures in `details` (an upload
    /// over `CAIRN_MAX_UPLOAD_BYTES`: `max_bytes`; over the owner's quota: `quota_bytes` and
    /// `stored_bytes`).
    #[error("{message}")]
    LimitExceeded {
        /// Which limit was passed.
        message: String,
        /// The limit's figures, in bytes.
        details: BTreeMap<String, u64>,
    },
    /// 415 UNSUPPORTED_MEDIA_TYPE.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 416 RANGE_NOT_SATISFIABLE with `Content-Range: bytes */<size>`: the `Range` asked for
    /// starts past the end of the file.
    #[error("the requested range is outside the file ({size} bytes)")]
    RangeNotSatisfiable {
        /// The file's size.
        size: u64,
    },
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
    /// 503 SERVICE_UNAVAILABLE with `Retry-After` and `details.retry_after_s`: too much work is
    /// already waiting (the password-hashing queue is full); nothing was done.
    #[error("the server is busy; try again shortly")]
    Overloaded {
        /// Seconds to wait before trying again.
        retry_after_s: u64,
    },
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
    /// `Retry-After` seconds, for 423, 429 and an overloaded 503.
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
            Self::Conflict(_) | Self::ConflictWith { .. } => (StatusCode::CONFLICT, "CONFLICT"),
            Self::PayloadTooLarge | Self::LimitExceeded { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
            Self::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_NOT_SATISFIABLE"),
            Self::AccountLocked { .. } => (StatusCode::LOCKED, "ACCOUNT_LOCKED"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            Self::ServiceUnavailable(_) | Self::Overloaded { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE")
            }
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
            StatusCode::RANGE_NOT_SATISFIABLE => ("RANGE_NOT_SATISFIABLE", "the requested range is outside the file"),
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
        // The size a client needs to ask again travels in the header RFC 9110 gives it.
        let content_range = match &self {
            Self::RangeNotSatisfiable { size } => axum::http::HeaderValue::from_str(&format!("bytes */{size}")).ok(),
            _ => None,
        };
        let plain = |message: String| ErrorBody { code, message, details: None, internal: None, retry_after: None };
        let body = match self {
            Self::Internal(e) => {
                ErrorBody { internal: Some(loggable(e.as_ref())), ..plain("internal error".to_owned()) }
            }
            Self::ServiceUnavailable(m) => ErrorBody {
                internal: Some(m),
                ..plain("a backing service is unavailable; nothing was written, try again".to_owned())
            },
            Self::Validation { details, .. } | Self::ConflictWith { details, .. } => {
                ErrorBody { details: Some(serde_json::json!(details)), ..plain(message) }
            }
            Self::LimitExceeded { details, .. } => {
                ErrorBody { details: Some(serde_json::json!(details)), ..plain(message) }
            }
            Self::UnknownField(field) => {
                ErrorBody { details: Some(serde_json::json!({ field: "is not a known field" })), ..plain(message) }
            }
            Self::Overloaded { retry_after_s } => ErrorBody {
                details: Some(serde_json::json!({ "retry_after_s": retry_after_s })),
                retry_after: Some(retry_after_s),
                internal: Some("the password-hashing queue is full".to_owned()),
                ..plain(message)
            },
            Self::AccountLocked { retry_after_s } | Self::RateLimited { retry_after_s } => ErrorBody {
                details: Some(serde_json::json!({ "retry_after_s": retry_after_s })),
                retry_after: Some(retry_after_s),
                ..plain(message)
            },
            _ => plain(message),
        };
        let mut response = status.into_response();
        if let Some(value) = content_range {
            response.headers_mut().insert(axum::http::header::CONTENT_RANGE, value);
        }
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

/// What may be logged of `error` for a 5xx: its chain as text, except that an error from Postgres
/// is described by its SQLSTATE code, constraint, table and column only, and a JSON decoding error
/// by its position only. Their messages and details quote row values (`Key (email)=(…)`, `invalid
/// input syntax for type uuid: "…"`, a payload's text), which logs must never hold.
#[must_use]
pub fn loggable(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(database) = e.downcast_ref::<sqlx::Error>().and_then(|e| match e {
            sqlx::Error::Database(db) => Some(db.as_ref()),
            _ => None,
        }) {
            return describe_database_error(database);
        }
        if let Some(database) = e.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            return describe_database_error(database);
        }
        if let Some(json) = e.downcast_ref::<serde_json::Error>() {
            return format!(
                "JSON does not decode ({:?} error at line {} column {})",
                json.classify(),
                json.line(),
                json.column()
            );
        }
        cause = e.source();
    }
    error_chain(error)
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        // Transparent wrappers repeat their source's text.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

fn describe_database_error(db: &dyn sqlx::error::DatabaseError) -> String {
    let mut text = format!("postgres error {}", db.code().as_deref().unwrap_or("(no code)"));
    if let Some(constraint) = db.constraint() {
        text.push_str(&format!(", constraint {constraint}"));
    }
    if let Some(table) = db.table() {
        text.push_str(&format!(", table {table}"));
    }
    if let Some(column) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().and_then(|pg| pg.column()) {
        text.push_str(&format!(", column {column}"));
    }
    text
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

#[cfg(test)]
mod tests {
    use sqlx::Connection;

    use super::*;

    /// What a 5xx would log for `error`.
    fn logged(error: ApiError) -> String {
        let response = error.into_response();
        let body = response.extensions().get::<ErrorBody>().cloned().expect("an error body");
        body.internal.unwrap_or_default()
    }

    #[tokio::test]
    async fn five_hundreds_log_no_row_values_from_postgres() -> anyhow::Result<()> {
        let base = std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let mut db = sqlx::PgConnection::connect(&format!("{base}/postgres")).await?;
        sqlx::query(
            "CREATE TEMP TABLE accounts (email text CONSTRAINT accounts_email_key UNIQUE, \
             age int CONSTRAINT accounts_age_check CHECK (age >= 0))",
        )
        .execute(&mut db)
        .await?;
        sqlx::query("INSERT INTO accounts VALUES ('victim-row-value@example.com', 1)").execute(&mut db).await?;
        let duplicate = sqlx::query("INSERT INTO accounts VALUES ('victim-row-value@example.com', 2)")
            .execute(&mut db)
            .await
            .expect_err("a unique violation");
        let check = sqlx::query("INSERT INTO accounts VALUES ('checked-row-value@example.com', -7)")
            .execute(&mut db)
            .await
            .expect_err("a check violation");
        let syntax = sqlx::query("SELECT 'not-a-uuid-row-value'::uuid").execute(&mut db).await.expect_err("bad input");
        // The errors do carry the values (message or detail), which is why they must not be logged.
        assert!(format!("{duplicate:?}").contains("victim-row-value"));

        let duplicate = logged(ApiError::from(duplicate));
        assert!(duplicate.contains("23505") && duplicate.contains("accounts_email_key"), "{duplicate}");
        let check = logged(ApiError::Internal(anyhow::Error::from(check).context("saving the account")));
        assert!(check.contains("23514") && check.contains("accounts_age_check"), "{check}");
        let syntax = logged(ApiError::from(syntax));
        assert!(syntax.contains("22P02"), "{syntax}");
        for line in [duplicate, check, syntax] {
            assert!(!line.contains("row-value") && !line.contains("-7"), "a row value logged: {line}");
        }
        Ok(())
    }

    #[test]
    fn five_hundreds_log_no_payload_text_from_json_errors() {
        let error = serde_json::from_str::<u64>("\"payload-secret-text\"").expect_err("not a number");
        let line = logged(ApiError::Internal(anyhow::Error::from(error).context("decoding an event")));
        assert!(!line.contains("payload-secret-text"), "{line}");
        assert!(line.contains("line 1"), "{line}");
    }

    #[test]
    fn other_internal_errors_keep_their_whole_chain() {
        let line = logged(ApiError::Internal(anyhow::anyhow!("the pool stopped").context("hashing a password")));
        assert_eq!(line, "hashing a password: the pool stopped");
    }

    #[test]
    fn a_range_past_the_end_is_a_416_naming_the_size() {
        let response = ApiError::RangeNotSatisfiable { size: 42 }.into_response();
        assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            response.headers().get(axum::http::header::CONTENT_RANGE).map(|v| v.as_bytes()),
            Some(&b"bytes */42"[..])
        );
        let body = response.extensions().get::<ErrorBody>().cloned().expect("an error body");
        assert_eq!(body.code, "RANGE_NOT_SATISFIABLE");
    }

    #[test]
    fn a_full_queue_is_a_503_with_retry_after() {
        let response = ApiError::Overloaded { retry_after_s: 2 }.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = response.extensions().get::<ErrorBody>().cloned().expect("an error body");
        assert_eq!((body.code, body.retry_after), ("SERVICE_UNAVAILABLE", Some(2)));
        assert_eq!(body.details, Some(serde_json::json!({ "retry_after_s": 2 })));
    }
}
