//! A small client of cairn's HTTP API: the calls the scenarios make, each checking the status and
//! reading the envelope only as far as it needs to.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// The header a read sends a consistency token in.
const CONSISTENCY_HEADER: &str = "x-consistency-token";

/// An accepted command.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// `meta.consistency_token`.
    pub token: String,
}

/// cairn over HTTP. Cheap to clone; clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// A client of the service at `base` (`http://host:port`).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends and returns the body when the status is `expected`.
    async fn send(request: RequestBuilder, expected: StatusCode) -> anyhow::Result<bytes::Bytes> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if status != expected {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        }
        Ok(body)
    }

    async fn send_json(request: RequestBuilder, expected: StatusCode) -> anyhow::Result<Value> {
        let body = Self::send(request, expected).await?;
        serde_json::from_slice(&body).context("the answer is not JSON")
    }

    fn accepted(envelope: &Value) -> anyhow::Result<Accepted> {
        let token = envelope
            .pointer("/meta/consistency_token")
            .and_then(Value::as_str)
            .context("the answer has no meta.consistency_token")?
            .to_owned();
        Ok(Accepted { token })
    }

    /// `POST /api/v1/auth/login`: the access token.
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn login(&self, email: &str, password: &str) -> anyhow::Result<String> {
        let request =
            self.http.post(self.url("/api/v1/auth/login")).json(&json!({ "email": email, "password": password }));
        let envelope = Self::send_json(request, StatusCode::OK).await?;
        envelope
            .pointer("/data/access_token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .context("the login answer has no data.access_token")
    }

    /// `POST /api/v1/auth/register`.
    ///
    /// # Errors
    /// Any answer but 201.
    pub async fn register(&self, email: &str, password: &str, display_name: &str) -> anyhow::Result<Accepted> {
        let request = self
            .http
            .post(self.url("/api/v1/auth/register"))
            .json(&json!({ "email": email, "password": password, "display_name": display_name }));
        Self::accepted(&Self::send_json(request, StatusCode::CREATED).await?)
    }

    /// `POST /api/v1/users/{user}/roles`.
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn grant_role(&self, admin: &str, user: Uuid, role: &str) -> anyhow::Result<Accepted> {
        let request = self
            .http
            .post(self.url(&format!("/api/v1/users/{user}/roles")))
            .bearer_auth(admin)
            .json(&json!({ "role": role }));
        Self::accepted(&Self::send_json(request, StatusCode::OK).await?)
    }

    /// `DELETE /api/v1/users/{user}/roles/{role}`.
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn revoke_role(&self, admin: &str, user: Uuid, role: &str) -> anyhow::Result<Accepted> {
        let request = self.http.delete(self.url(&format!("/api/v1/users/{user}/roles/{role}"))).bearer_auth(admin);
        Self::accepted(&Self::send_json(request, StatusCode::OK).await?)
    }

    /// `GET /api/v1/users/{user}`, waiting for `consistency` when given; returns
    /// `meta.consistent` (true when no token was sent).
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn get_user(&self, token: &str, user: Uuid, consistency: Option<&str>) -> anyhow::Result<bool> {
        let mut request = self.http.get(self.url(&format!("/api/v1/users/{user}"))).bearer_auth(token);
        match consistency {
            Some(wait_for) => {
                request = request.header(CONSISTENCY_HEADER, wait_for);
                let envelope = Self::send_json(request, StatusCode::OK).await?;
                Ok(envelope.pointer("/meta/consistent").and_then(Value::as_bool).unwrap_or(false))
            }
            None => {
                Self::send(request, StatusCode::OK).await?;
                Ok(true)
            }
        }
    }

    /// `GET /api/v1/users?limit={limit}`.
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn list_users(&self, token: &str, limit: u32) -> anyhow::Result<()> {
        let request = self.http.get(self.url(&format!("/api/v1/users?limit={limit}"))).bearer_auth(token);
        Self::send(request, StatusCode::OK).await?;
        Ok(())
    }

    /// Sends and returns the body when the status is any 2xx.
    async fn send_success(request: RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        }
        serde_json::from_slice(&body).context("the answer is not JSON")
    }

    /// `POST /api/v1/rooms` (a public room): the new room's id.
    ///
    /// # Errors
    /// Any answer but a 2xx with the id in `data.room_id` or `data.id`.
    pub async fn create_room(&self, token: &str, name: &str) -> anyhow::Result<Uuid> {
        let request = self
            .http
            .post(self.url("/api/v1/rooms"))
            .bearer_auth(token)
            .json(&json!({ "name": name, "visibility": "public" }));
        let envelope = Self::send_success(request).await?;
        let id = envelope
            .pointer("/data/room_id")
            .or_else(|| envelope.pointer("/data/id"))
            .and_then(Value::as_str)
            .context("the answer has no data.room_id")?;
        Uuid::parse_str(id).context("the room id is not a UUID")
    }

    /// `POST /api/v1/rooms/{room}/join`.
    ///
    /// # Errors
    /// Any answer but a 2xx.
    pub async fn join_room(&self, token: &str, room: Uuid) -> anyhow::Result<()> {
        let request = self.http.post(self.url(&format!("/api/v1/rooms/{room}/join"))).bearer_auth(token);
        Self::send_success(request).await.map(|_| ())
    }

    /// `POST /api/v1/rooms/{room}/messages {body, client_id}`.
    ///
    /// # Errors
    /// Any answer but a 2xx.
    pub async fn send_message(&self, token: &str, room: Uuid, body: &str, client_id: &str) -> anyhow::Result<()> {
        let request = self
            .http
            .post(self.url(&format!("/api/v1/rooms/{room}/messages")))
            .bearer_auth(token)
            .json(&json!({ "body": body, "client_id": client_id }));
        Self::send_success(request).await.map(|_| ())
    }

    /// `GET /api/v1/users/me`.
    ///
    /// # Errors
    /// Any answer but 200.
    pub async fn me(&self, token: &str) -> anyhow::Result<()> {
        let request = self.http.get(self.url("/api/v1/users/me")).bearer_auth(token);
        Self::send(request, StatusCode::OK).await?;
        Ok(())
    }
}
