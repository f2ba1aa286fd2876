//! Extractors whose rejections are [`ApiError`]s, so malformed input gets the envelope.

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::ApiError;

/// JSON body. Wrong content type → 415, syntax or unknown fields → MALFORMED_REQUEST,
/// missing or mistyped fields → VALIDATION_FAILED naming the field, too large → 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

/// An optional JSON body: a request with neither a body nor a `Content-Type` is `None`; anything else
/// is read as [`ApiJson`], with the same errors.
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let headers = req.headers();
        let length = headers.get(axum::http::header::CONTENT_LENGTH);
        let empty = length.is_none_or(|v| v.as_bytes() == b"0");
        if empty && !headers.contains_key(axum::http::header::CONTENT_TYPE) {
            return Ok(None);
        }
        <Self as FromRequest<S>>::from_request(req, state).await.map(Some)
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("expected Content-Type: application/json".to_owned())
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::Malformed(format!("body is not valid JSON: {}", e.body_text())),
        JsonRejection::JsonDataError(e) => {
            let text = e.body_text();
            if text.contains("unknown field") {
                ApiError::Malformed(strip_prefix(&text))
            } else {
                let field = backticked(&text).unwrap_or_else(|| "body".to_owned());
                ApiError::Validation {
                    message: strip_prefix(&text),
                    details: BTreeMap::from([(field, strip_prefix(&text))]),
                }
            }
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        other => ApiError::Malformed(other.body_text()),
    }
}

/// serde names the field in backticks: "missing field `email` at line 1 column 2".
fn backticked(text: &str) -> Option<String> {
    let start = text.find('`')? + 1;
    let end = text[start..].find('`')? + start;
    Some(text[start..end].to_owned())
}

/// The serde message without axum's prefix or serde's " at line 1 column 19" suffix.
fn strip_prefix(text: &str) -> String {
    let text = text.trim_start_matches("Failed to deserialize the JSON body into the target type: ");
    let text = text.split(" at line ").next().unwrap_or(text);
    // serde prefixes the path of a nested error ("email: invalid type…"); keep the message.
    text.to_owned()
}

/// Path parameters; a bad id is VALIDATION_FAILED naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                let text = e.body_text();
                let field = backticked(&text).unwrap_or_else(|| "path".to_owned());
                Err(ApiError::Validation {
                    message: format!("invalid path parameter: {}", text.trim_start_matches("Invalid URL: ")),
                    details: BTreeMap::from([(field, "has the wrong format (ids are UUIDs)".to_owned())]),
                })
            }
            Err(other) => Err(ApiError::Malformed(other.body_text())),
        }
    }
}

/// Query string; bad values are VALIDATION_FAILED.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let text = e.body_text();
                let message = text.trim_start_matches("Failed to deserialize query string: ").to_owned();
                let field = message.split(':').next().unwrap_or("query").trim().to_owned();
                Err(ApiError::Validation { details: BTreeMap::from([(field, message.clone())]), message })
            }
            Err(other) => Err(ApiError::Malformed(other.body_text())),
        }
    }
}
