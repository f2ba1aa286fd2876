//! The success envelope `{"success": true, "data": …, "meta": {…}}` and cursor pages.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ApiError;

/// A successful answer.
#[derive(Debug)]
pub struct ApiResponse<T> {
    status: StatusCode,
    data: T,
    meta: Map<String, Value>,
}

impl<T: Serialize> ApiResponse<T> {
    /// 200 with `data`.
    pub fn ok(data: T) -> Self {
        Self { status: StatusCode::OK, data, meta: Map::new() }
    }

    /// `status` with `data`.
    pub fn with_status(status: StatusCode, data: T) -> Self {
        Self { status, data, meta: Map::new() }
    }

    /// Adds `meta.consistency_token`: the position a read can wait for with `X-Consistency-Token`.
    #[must_use]
    pub fn consistency(self, token: crate::envelope::ConsistencyToken) -> Self {
        self.meta("consistency_token", token.to_string())
    }

    /// Adds a `meta` field.
    #[must_use]
    pub fn meta(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.meta.insert(key.to_owned(), value.into());
        self
    }
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    success: bool,
    data: &'a T,
    meta: &'a Map<String, Value>,
}

impl<T: Serialize> IntoResponse for ApiResponse<T> {
    fn into_response(self) -> Response {
        let body = Envelope { success: true, data: &self.data, meta: &self.meta };
        (self.status, Json(body)).into_response()
    }
}

/// `?limit=&cursor=`: limit defaults to 20, at most 100.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
pub struct PageParams {
    /// Page size, 1 to 100 (default 20).
    pub limit: Option<u32>,
    /// Opaque cursor from the previous page's `meta.next_cursor`.
    pub cursor: Option<String>,
}

impl PageParams {
    /// The limit, checked.
    ///
    /// # Errors
    /// VALIDATION_FAILED when outside 1..=100.
    pub fn limit(&self) -> Result<i64, ApiError> {
        match self.limit {
            None => Ok(20),
            Some(n @ 1..=100) => Ok(i64::from(n)),
            Some(_) => Err(ApiError::field("limit", "must be between 1 and 100")),
        }
    }
}

/// One page of a list and the cursor of the next.
#[derive(Debug)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// The next page's cursor; `None` on the last page.
    pub next_cursor: Option<String>,
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        ApiResponse::ok(self.items).meta("next_cursor", self.next_cursor).into_response()
    }
}
