//! The layers every router gets: request context and id, one log line and metrics per request,
//! the error envelope for everything (including 404, 405, 413, timeouts and panics), body limit.

use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use super::context::{peer_of_request, REQUEST_ID_HEADER};
use super::error::ErrorBody;
use super::{ApiError, RequestContext};

/// Adds the fallback and the shared layers to a finished router.
pub fn finish_router(router: Router, max_body_bytes: usize, request_timeout: Duration) -> Router {
    router
        .fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, request_timeout))
        .layer(middleware::from_fn(request_envelope))
}

async fn request_envelope(mut req: Request, next: Next) -> Response {
    let ctx = RequestContext::from_request(req.headers(), peer_of_request(&req));
    let request_id = ctx.request_id.clone();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    req.extensions_mut().insert(ctx);
    let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = response.status();

    if let Some(body) = response.extensions_mut().remove::<ErrorBody>() {
        response = render_error(status, body, &request_id, &span);
    } else if status.is_client_error() || status.is_server_error() {
        response = render_error(status, ApiError::body_for_status(status), &request_id, &span);
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let status_label = status.as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status_label)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| tracing::info!(status = status.as_u16(), latency_ms = elapsed.as_secs_f64() * 1000.0, "request"));
    response
}

fn render_error(status: StatusCode, body: ErrorBody, request_id: &str, span: &tracing::Span) -> Response {
    if status.is_server_error() {
        span.in_scope(|| {
            tracing::error!(
                status = status.as_u16(),
                code = body.code,
                detail = body.internal.as_deref().unwrap_or(""),
                "request failed"
            );
        });
    }
    let mut error = json!({ "code": body.code, "message": body.message, "request_id": request_id });
    if let Some(details) = body.details {
        error["details"] = json!(details);
    }
    (status, Json(json!({ "success": false, "error": error }))).into_response()
}
