//! Who is asking, from where, under which request id: put on every request by [`super::finish_router`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use uuid::Uuid;

use super::ApiError;

/// The header carrying the request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request's identity, recorded in every event's metadata.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// The client's `X-Request-Id` when it sent a sane one, otherwise a new UUID.
    pub request_id: String,
    /// `X-Correlation-Id` when sent, otherwise the request id.
    pub correlation_id: String,
    /// The peer address (proxies are trusted only when configured, in a later layer).
    pub client_ip: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
}

fn sane_id(value: Option<&HeaderValue>) -> Option<String> {
    let v = value?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| v.to_owned())
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
/// `X-Forwarded-For` that is not itself a trusted proxy.
pub(crate) fn client_ip(headers: &HeaderMap, peer: Option<SocketAddr>, trusted: &[IpAddr]) -> Option<IpAddr> {
    let peer = peer?.ip();
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| part.trim().parse().ok())
        .collect();
    Some(forwarded.into_iter().rev().find(|ip| !trusted.contains(ip)).unwrap_or(peer))
}

impl RequestContext {
    pub(crate) fn from_request(headers: &HeaderMap, client_ip: Option<IpAddr>) -> Self {
        let request_id = sane_id(headers.get(REQUEST_ID_HEADER)).unwrap_or_else(|| Uuid::new_v4().to_string());
        let correlation_id = sane_id(headers.get("x-correlation-id")).unwrap_or_else(|| request_id.clone());
        let user_agent = headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(512).collect());
        Self { request_id, correlation_id, client_ip: client_ip.map(|ip| ip.to_string()), user_agent }
    }

    /// The metadata of a command issued by `actor` in this request. The request is the cause.
    #[must_use]
    pub fn command_metadata(&self, actor: Option<&str>) -> HashMap<String, String> {
        let mut meta = HashMap::from([
            ("request_id".to_owned(), self.request_id.clone()),
            ("correlation_id".to_owned(), self.correlation_id.clone()),
            ("causation_id".to_owned(), self.request_id.clone()),
        ]);
        if let Some(actor) = actor {
            meta.insert("actor_id".to_owned(), actor.to_owned());
        }
        if let Some(ip) = &self.client_ip {
            meta.insert("client_ip".to_owned(), ip.clone());
        }
        if let Some(ua) = &self.user_agent {
            meta.insert("user_agent".to_owned(), ua.clone());
        }
        meta
    }

    /// A context for commands issued outside HTTP (the operator CLI).
    #[must_use]
    pub fn operator(tool: &str) -> Self {
        let id = Uuid::new_v4().to_string();
        Self { request_id: id.clone(), correlation_id: id, client_ip: None, user_agent: Some(tool.to_owned()) }
    }
}

pub(crate) fn peer_of(parts: &Parts) -> Option<SocketAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self::from_request(&parts.headers, peer_of(parts).map(|p| p.ip()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7, 10.0.0.1"));
        let from_proxy = Some(SocketAddr::new(proxy, 5000));
        let from_client = Some(SocketAddr::new(IpAddr::from([198, 51, 100, 2]), 5000));
        assert_eq!(client_ip(&headers, from_proxy, &[proxy]).map(|ip| ip.to_string()).as_deref(), Some("203.0.113.7"));
        assert_eq!(
            client_ip(&headers, from_client, &[proxy]).map(|ip| ip.to_string()).as_deref(),
            Some("198.51.100.2")
        );
        assert_eq!(client_ip(&headers, from_proxy, &[]).map(|ip| ip.to_string()).as_deref(), Some("10.0.0.1"));
    }
}
