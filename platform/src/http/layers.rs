//! The layers every router gets: CORS and security headers, request context and id, per-IP rate
//! limits, one log line and metrics per request, the error envelope for everything (including
//! 404, 405, 413, timeouts and panics), body limit and timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::Instrument;

use super::context::{client_ip, REQUEST_ID_HEADER};
use super::error::ErrorBody;
use super::limits::IpLimits;
use super::{ApiError, RequestContext};
use crate::settings::Settings;

#[derive(Clone)]
struct EdgeState {
    trusted_proxies: Arc<Vec<std::net::IpAddr>>,
    limits: IpLimits,
}

/// Adds the fallback and the shared layers to a finished router.
pub fn finish_router(router: Router, settings: &Settings) -> Router {
    let edge = EdgeState {
        trusted_proxies: Arc::new(settings.trusted_proxies.clone()),
        limits: IpLimits::from_settings(settings),
    };
    let mut router = router
        .fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(CatchPanicLayer::new())
        .layer(middleware::from_fn_with_state(settings.request_timeout, request_timeout))
        .layer(middleware::from_fn_with_state(edge, request_envelope))
        .layer(cors(&settings.allowed_origins))
        .layer(header_layer(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header_layer(header::REFERRER_POLICY, "no-referrer"))
        .layer(header_layer(header::X_FRAME_OPTIONS, "DENY"))
        .layer(header_layer(header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"));
    if settings.hsts {
        router = router.layer(header_layer(header::STRICT_TRANSPORT_SECURITY, "max-age=63072000; includeSubDomains"));
    }
    router
}

/// Routes whose request body is a file: they take as long as their bytes take, and cut a body
/// that stalls for `CAIRN_REQUEST_TIMEOUT_SECS` themselves instead.
pub const STREAMED_UPLOADS: &[(&str, &str)] = &[("POST", "/api/v1/files")];

/// Every other request gets `CAIRN_REQUEST_TIMEOUT_SECS` as a whole; past it, 503 (the envelope
/// layer words it).
async fn request_timeout(State(limit): State<std::time::Duration>, req: Request, next: Next) -> Response {
    let streamed =
        STREAMED_UPLOADS.iter().any(|(method, path)| req.method().as_str() == *method && req.uri().path() == *path);
    if streamed {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::ServiceUnavailable("the request timed out".to_owned()).into_response(),
    }
}

fn header_layer(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
}

/// Browsers may call from the allowlisted origins only, with credentials (the refresh cookie).
fn cors(origins: &[String]) -> CorsLayer {
    let allowed: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static(REQUEST_ID_HEADER),
            HeaderName::from_static("x-consistency-token"),
            HeaderName::from_static("x-correlation-id"),
        ])
        .expose_headers([HeaderName::from_static(REQUEST_ID_HEADER), header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(600))
}

async fn request_envelope(State(edge): State<EdgeState>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let ip = client_ip(req.headers(), peer, &edge.trusted_proxies);
    let ctx = RequestContext::from_request(req.headers(), ip);
    let request_id = ctx.request_id.clone();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    req.extensions_mut().insert(ctx);
    let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let started = Instant::now();
    let limited = ip.map_or(Ok(()), |ip| edge.limits.check(&path, ip));
    let mut response = match limited {
        Ok(()) => next.run(req).instrument(span.clone()).await,
        Err(e) => e.into_response(),
    };
    let elapsed = started.elapsed();
    let status = response.status();

    if let Some(body) = response.extensions_mut().remove::<ErrorBody>() {
        response = render_error(response, body, &request_id, &span);
    } else if status.is_client_error() || status.is_server_error() {
        response = render_error(response, ApiError::body_for_status(status), &request_id, &span);
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    // API answers are personal (and some carry tokens): never cache them.
    if path.starts_with("/api/") && !response.headers().contains_key(header::CACHE_CONTROL) {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let status_label = status.as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status_label)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| tracing::info!(status = status.as_u16(), latency_ms = elapsed.as_secs_f64() * 1000.0, "request"));
    response
}

/// Replaces the body of an error response with the envelope. The headers stay: `Allow` of a 405,
/// a `Set-Cookie` that clears a refused refresh cookie, CORS headers.
fn render_error(response: Response, body: ErrorBody, request_id: &str, span: &tracing::Span) -> Response {
    let status = response.status();
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
        error["details"] = details;
    }
    let (mut parts, _) = response.into_parts();
    let envelope = Json(json!({ "success": false, "error": error })).into_response();
    let (envelope_parts, envelope_body) = envelope.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Some(content_type) = envelope_parts.headers.get(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, content_type.clone());
    }
    if let Some(secs) = body.retry_after {
        parts.headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Response::from_parts(parts, envelope_body)
}
