//! Extractors whose rejections are [`ApiError`]s, so malformed input gets the envelope.
//!
//! Every rejection speaks the API's words: it names the field (`details`) and says what was
//! wrong with it, never serde's or axum's text, and never echoes raw input. No string holding a
//! NUL reaches a handler (Postgres refuses NUL in text, which would be a 500), and no control
//! character reaches one through a path or query parameter.

use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// JSON body. Wrong content type → 415, syntax → MALFORMED_REQUEST, unknown fields →
/// MALFORMED_REQUEST naming the field, missing or mistyped fields and strings holding NUL →
/// VALIDATION_FAILED naming the field, too large → 413.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::Json::<Value>::from_request(req, state).await {
            Ok(axum::Json(value)) => value,
            Err(rejection) => return Err(json_rejection(&rejection)),
        };
        from_value(value).map(Self)
    }
}

/// Reads an optional JSON body that a handler holds as bytes, with the errors of [`ApiJson`]: no
/// body, or the body `null`, is `None`.
///
/// # Errors
/// MALFORMED_REQUEST when the bytes are not JSON; as [`ApiJson`] otherwise.
pub fn json_from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice(bytes) {
        Ok(Value::Null) => Ok(None),
        Ok(value) => from_value(value).map(Some),
        Err(_) => Err(ApiError::Malformed("the body is not valid JSON".to_owned())),
    }
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    if let Some(field) = nul_in(&value, "") {
        return Err(ApiError::field(&field, "must not contain NUL characters"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        field_error(&path, &e.into_inner().to_string(), "body")
    })
}

/// An optional JSON body: a request with neither a body nor a `Content-Type`, or with the body
/// `null`, is `None`; anything else is read as [`ApiJson`], with the same errors.
impl<T: DeserializeOwned, S: Send + Sync> axum::extract::OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let headers = req.headers();
        let length = headers.get(axum::http::header::CONTENT_LENGTH);
        let empty = length.is_none_or(|v| v.as_bytes() == b"0");
        if empty && !headers.contains_key(axum::http::header::CONTENT_TYPE) {
            return Ok(None);
        }
        match <axum::Json<Value> as FromRequest<S>>::from_request(req, state).await {
            Ok(axum::Json(Value::Null)) => Ok(None),
            Ok(axum::Json(value)) => from_value(value).map(|v| Some(Self(v))),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::UnsupportedMediaType("expected Content-Type: application/json".to_owned())
        }
        JsonRejection::JsonSyntaxError(_) => ApiError::Malformed("the body is not valid JSON".to_owned()),
        // Only reachable for a `Value` target when serde_json gives up (nesting too deep).
        JsonRejection::JsonDataError(_) => ApiError::Malformed("the body is not valid JSON".to_owned()),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::Malformed("the body could not be read".to_owned()),
    }
}

/// The path (`a.b[0]`) of the first string in `value`, key or element, that holds a NUL.
fn nul_in(value: &Value, at: &str) -> Option<String> {
    let here = || if at.is_empty() { "body".to_owned() } else { at.to_owned() };
    match value {
        Value::String(s) if s.contains('\0') => Some(here()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| nul_in(item, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let path = if at.is_empty() { printable(key) } else { format!("{at}.{}", printable(key)) };
            if key.contains('\0') {
                Some(path)
            } else {
                nul_in(item, &path)
            }
        }),
        _ => None,
    }
}

/// A client-supplied name fit to appear in a message: control characters escaped, at most 64 characters.
fn printable(raw: &str) -> String {
    let mut out: String = raw.chars().take(64).flat_map(char::escape_debug).collect();
    if raw.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// The first backticked word of a serde message ("missing field `email`").
fn backticked(text: &str) -> Option<&str> {
    let start = text.find('`')? + 1;
    let end = text[start..].find('`')? + start;
    Some(&text[start..end])
}

/// Joins a serde path (`.` for the root) and a field name.
fn join(path: &str, field: &str) -> String {
    match path {
        "." | "" => printable(field),
        path => format!("{path}.{}", printable(field)),
    }
}

/// Turns a deserialisation failure at `path` into the API's error. serde's errors carry no kind
/// beyond their (stable, documented) message forms, so those forms are matched here, once; anything
/// else becomes a plain "has an invalid value" and its text is dropped.
fn field_error(path: &str, serde_message: &str, root: &str) -> ApiError {
    let at_root = path == "." || path.is_empty();
    // Known fields are the API's own names; an unknown one is the client's, so it is made printable.
    let name = if at_root { root.to_owned() } else { printable(path) };
    if serde_message.starts_with("missing field") {
        let field = join(path, backticked(serde_message).unwrap_or(root));
        return ApiError::field(&field, "is required");
    }
    if serde_message.starts_with("unknown field") {
        // The path already ends with the unknown key, except at the root of a query string.
        let field = if at_root { backticked(serde_message).map_or_else(|| name.clone(), printable) } else { name };
        return ApiError::UnknownField(field);
    }
    if serde_message.starts_with("duplicate field") {
        let field = join(path, backticked(serde_message).unwrap_or(root));
        return ApiError::field(&field, "is given more than once");
    }
    if serde_message.starts_with("unknown variant") {
        let choices = serde_message.split_once("expected ").map_or("", |(_, e)| e).replace('`', "");
        return ApiError::field(&name, format!("must be {choices}"));
    }
    let expected = serde_message.rsplit_once(", expected ").map(|(_, e)| e);
    let problem = match expected {
        Some(e) if e.starts_with("struct ") || e == "a map" => "must be an object".to_owned(),
        Some("a string" | "a borrowed string") => "must be a string".to_owned(),
        Some("a sequence") => "must be a list".to_owned(),
        Some("a boolean") => "must be true or false".to_owned(),
        Some(e) if is_integer_type(e) => "must be a whole number in range".to_owned(),
        Some(e) if e.contains("UUID") => "must be a UUID".to_owned(),
        Some(e) if e.contains("date") => "must be an RFC 3339 timestamp".to_owned(),
        _ if is_integer_parse_error(serde_message) => "must be a whole number in range".to_owned(),
        _ => "has an invalid value".to_owned(),
    };
    ApiError::field(&name, problem)
}

fn is_integer_type(expected: &str) -> bool {
    matches!(expected, "u8" | "u16" | "u32" | "u64" | "i8" | "i16" | "i32" | "i64" | "usize" | "isize")
        || expected.contains("integer")
}

/// The messages of `std::num::ParseIntError`, which is how a query string's numbers fail.
fn is_integer_parse_error(message: &str) -> bool {
    ["invalid digit found in string", "cannot parse integer from empty string", "number too large", "number too small"]
        .iter()
        .any(|m| message.starts_with(m))
}

/// Path parameters; a bad id is VALIDATION_FAILED naming the parameter, and so is a parameter
/// holding a control character.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let raw = match RawPathParams::from_request_parts(parts, state).await {
            Ok(raw) => raw,
            Err(axum::extract::rejection::RawPathParamsRejection::InvalidUtf8InPathParam(_)) => {
                return Err(ApiError::field("path", "must be valid UTF-8"));
            }
            Err(_) => return Err(ApiError::Malformed("the path could not be read".to_owned())),
        };
        let params: Vec<(String, String)> = raw.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        if let Some((key, _)) = params.iter().find(|(_, value)| value.chars().any(char::is_control)) {
            return Err(ApiError::field(key, "must not contain control characters"));
        }
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(path_error(e.kind(), &params)),
            Err(_) => Err(ApiError::Malformed("the path could not be read".to_owned())),
        }
    }
}

/// Names the parameter a path failed at. Ids (`id`, `…_id`) are UUIDs; the other parameters are
/// names, which deserialise from any text, so a failure the kind does not place is an id's.
fn path_error(kind: &ErrorKind, params: &[(String, String)]) -> ApiError {
    let key_at = |i: usize| params.get(i).map_or_else(|| "path".to_owned(), |(k, _)| k.clone());
    let (key, expected) = match kind {
        ErrorKind::ParseErrorAtKey { key, expected_type, .. } => (key.clone(), Some(*expected_type)),
        ErrorKind::ParseErrorAtIndex { index, expected_type, .. } => (key_at(*index), Some(*expected_type)),
        ErrorKind::ParseError { expected_type, .. } => (key_at(0), Some(*expected_type)),
        ErrorKind::DeserializeError { key, .. } => (key.clone(), None),
        _ => {
            let bad_id =
                params.iter().find(|(k, v)| (k == "id" || k.ends_with("_id")) && v.parse::<uuid::Uuid>().is_err());
            (bad_id.map_or_else(|| key_at(0), |(k, _)| k.clone()), None)
        }
    };
    let is_id = key == "id" || key.ends_with("_id");
    let problem = match expected {
        Some(t) if t.contains("Uuid") => "must be a UUID",
        None if is_id => "must be a UUID",
        _ => "has an invalid value",
    };
    ApiError::field(&key, problem)
}

/// Query string; bad values, unknown parameters and values holding control characters are
/// VALIDATION_FAILED naming the parameter.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if key.chars().any(char::is_control) || value.chars().any(char::is_control) {
                return Err(ApiError::field(&printable(&key), "must not contain control characters"));
            }
        }
        let deserializer = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer).map(Self).map_err(|e| {
            let path = e.path().to_string();
            match field_error(&path, &e.into_inner().to_string(), "query") {
                // A query has no body: an unknown parameter is a validation failure of the query.
                ApiError::UnknownField(field) => ApiError::field(&field, "is not a known parameter"),
                other => other,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(e: &ApiError) -> Vec<(String, String)> {
        match e {
            ApiError::Validation { details, .. } => details.clone().into_iter().collect(),
            ApiError::UnknownField(f) => vec![(f.clone(), "unknown".to_owned())],
            other => vec![("?".to_owned(), other.to_string())],
        }
    }

    #[test]
    fn serde_failures_become_field_problems_in_the_apis_words() {
        let cases = [
            (".", "missing field `email`", "email", "is required"),
            ("user", "missing field `name`", "user.name", "is required"),
            ("email", "invalid type: integer `5`, expected a string", "email", "must be a string"),
            (".", "invalid type: sequence, expected struct RegisterBody", "body", "must be an object"),
            ("limit", "invalid digit found in string", "limit", "must be a whole number in range"),
            ("permissions", "invalid type: string \"x\", expected a sequence", "permissions", "must be a list"),
            ("x", "something a Deserialize impl said", "x", "has an invalid value"),
        ];
        for (path, message, field, problem) in cases {
            assert_eq!(details(&field_error(path, message, "body")), vec![(field.to_owned(), problem.to_owned())]);
        }
        assert!(matches!(field_error(".", "unknown field `admin`, expected one of `a`", "body"),
            ApiError::UnknownField(f) if f == "admin"));
        assert!(matches!(field_error("admin", "unknown field `admin`, expected one of `a`", "body"),
            ApiError::UnknownField(f) if f == "admin"));
    }

    #[test]
    fn nul_is_found_anywhere_and_named_by_its_path() {
        let value = serde_json::json!({"a": "ok", "b": [{"c": "x\u{0}y"}]});
        assert_eq!(nul_in(&value, "").as_deref(), Some("b[0].c"));
        assert_eq!(nul_in(&serde_json::json!({"ok": ["fine"]}), ""), None);
        assert_eq!(printable("a\u{1b}[31m"), "a\\u{1b}[31m");
    }
}
