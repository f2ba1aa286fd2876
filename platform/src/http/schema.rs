//! The OpenAPI schemas of the envelope: what every answer looks like, for the document the
//! service serves and the clients generated from it.

use std::collections::BTreeMap;

use utoipa::ToSchema;

/// A successful answer: `{"success": true, "data": …, "meta": {…}}`.
#[derive(Debug, ToSchema)]
pub struct Envelope<T> {
    /// Always `true`.
    pub success: bool,
    /// What the operation returns.
    pub data: T,
    /// About the answer rather than the data.
    pub meta: Meta,
}

/// `meta` of a successful answer.
#[derive(Debug, ToSchema)]
pub struct Meta {
    /// On an accepted command: the position a read can wait for with `X-Consistency-Token`.
    #[schema(pattern = r"^[0-9]+\.[0-9]+$")]
    pub consistency_token: Option<String>,
    /// On a list: the next page's cursor; null on the last page.
    pub next_cursor: Option<String>,
    /// On a read that sent `X-Consistency-Token`: whether the read model had applied it in time.
    pub consistent: Option<bool>,
}

/// A refused or failed request: `{"success": false, "error": {…}}`.
#[derive(Debug, ToSchema)]
pub struct ErrorEnvelope {
    /// Always `false`.
    pub success: bool,
    /// What went wrong.
    pub error: ErrorObject,
}

/// `error` of a refused or failed request.
#[derive(Debug, ToSchema)]
pub struct ErrorObject {
    /// What kind of failure it is; clients branch on it.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub message: String,
    /// Field → problem for validation failures; `retry_after_s` for 423 and 429.
    pub details: Option<BTreeMap<String, serde_json::Value>>,
    /// The request's id, also in `X-Request-Id`: quote it when reporting a problem.
    pub request_id: String,
}

/// The error codes, each with one status.
#[derive(Debug, ToSchema)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub enum ErrorCode {
    /// 400: a field fails validation; `details` names each.
    VALIDATION_FAILED,
    /// 400: not JSON, or unknown fields.
    MALFORMED_REQUEST,
    /// 401.
    UNAUTHENTICATED,
    /// 403: the action needs a verified email.
    EMAIL_NOT_VERIFIED,
    /// 403.
    FORBIDDEN,
    /// 404.
    NOT_FOUND,
    /// 405.
    METHOD_NOT_ALLOWED,
    /// 409.
    CONFLICT,
    /// 413.
    PAYLOAD_TOO_LARGE,
    /// 415.
    UNSUPPORTED_MEDIA_TYPE,
    /// 416: the `Range` starts past the end of the file; `Content-Range: bytes */<size>`.
    RANGE_NOT_SATISFIABLE,
    /// 423: `details.retry_after_s`.
    ACCOUNT_LOCKED,
    /// 429: `Retry-After`.
    RATE_LIMITED,
    /// 503: nothing was written.
    SERVICE_UNAVAILABLE,
    /// 500.
    INTERNAL,
}

/// Statuses every operation can answer because of the layers every router gets, besides those its
/// handler declares: 400 when it takes input, 401 when it needs a token, 413 and 415 when it takes
/// a body, 429 (rate limits) and 503 (time limit, a backing service down) always. Every error
/// answer, declared here or by a handler, gets the error envelope as its body and `X-Request-Id`.
pub fn document_errors(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{PathItem, RefOr};
    let mut schemas = Vec::new();
    <ErrorEnvelope as ToSchema>::schemas(&mut schemas);
    let components = openapi.components.get_or_insert_with(Default::default);
    components.schemas.insert("ErrorEnvelope".to_owned(), <ErrorEnvelope as utoipa::PartialSchema>::schema());
    for (name, schema) in schemas {
        components.schemas.insert(name, schema);
    }
    for item in openapi.paths.paths.values_mut() {
        let PathItem { get, put, post, delete, patch, .. } = item;
        for operation in [get, put, post, delete, patch].into_iter().flatten() {
            let takes_input = operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let takes_body = operation.request_body.is_some();
            let signed_in = operation.security.as_ref().is_some_and(|s| !s.is_empty());
            let implied = [
                ("400", takes_input || takes_body, "VALIDATION_FAILED or MALFORMED_REQUEST; `details` names each field"),
                ("401", signed_in, "UNAUTHENTICATED: no token, or one that is malformed, expired, revoked or wrongly signed"),
                ("413", takes_body, "PAYLOAD_TOO_LARGE"),
                ("415", takes_body, "UNSUPPORTED_MEDIA_TYPE: the body must be application/json"),
                ("429", true, "RATE_LIMITED; `Retry-After` says when to try again"),
                ("503", true, "SERVICE_UNAVAILABLE: a backing service is down or the request ran out of time; nothing was written"),
            ];
            let responses = &mut operation.responses.responses;
            for (status, applies, description) in implied {
                if applies && !responses.contains_key(status) {
                    responses.insert(status.to_owned(), RefOr::T(utoipa::openapi::Response::new(description)));
                }
            }
            for (status, response) in responses.iter_mut() {
                let RefOr::T(response) = response else { continue };
                let is_error = status.starts_with('4') || status.starts_with('5');
                if is_error && response.content.is_empty() {
                    let schema = RefOr::Ref(utoipa::openapi::Ref::from_schema_name("ErrorEnvelope"));
                    response.content.insert(
                        "application/json".to_owned(),
                        utoipa::openapi::content::ContentBuilder::new().schema(Some(schema)).build(),
                    );
                }
                let header = |description: &str, schema: utoipa::openapi::Type| {
                    utoipa::openapi::HeaderBuilder::new()
                        .schema(utoipa::openapi::ObjectBuilder::new().schema_type(schema))
                        .description(Some(description))
                        .build()
                };
                response.headers.entry(super::context::REQUEST_ID_HEADER.to_owned()).or_insert_with(|| {
                    header("the request's id (the client's own when it sent a sane one)", utoipa::openapi::Type::String)
                });
                if matches!(status.as_str(), "423" | "429") {
                    response
                        .headers
                        .entry("retry-after".to_owned())
                        .or_insert_with(|| header("seconds to wait", utoipa::openapi::Type::Integer));
                }
            }
        }
    }
}
