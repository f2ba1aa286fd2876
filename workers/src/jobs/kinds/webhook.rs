//! `webhook.deliver`: POSTs `{body}` to `{url}`, signed as Standard Webhooks do.
//!
//! The URL is checked against `CAIRN_WEBHOOK_ALLOWED_HOSTS` again at every attempt (the list may
//! have changed since the job was accepted), and every redirect is checked the same way: at most
//! five are followed, and one that leaves the list is not followed at all. The job id is the
//! `webhook-id`, the same on every attempt, so a receiver can drop a delivery it already has.
//!
//! Outcomes: 2xx is done; 410 Gone gives up at once (the receiver says the endpoint is gone for
//! good); 429 and 503 with `Retry-After: N` retry after N seconds (capped at the longest
//! backoff); any other status, a refused redirect or a network error retries after the usual
//! backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use base64::Engine as _;
use cairn_platform::jobs::kinds::{webhook_target, WEBHOOK_DELIVER};
use cairn_platform::jobs::JobsSettings;
use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::jobs::{JobContext, JobError, JobHandler};

/// Redirects followed at most, each to an allowed host.
const MAX_REDIRECTS: usize = 5;

/// How much of a refusing receiver's body is kept in the attempt's error.
const BODY_EXCERPT: usize = 200;

/// The arguments.
#[derive(Debug, Deserialize)]
struct Args {
    url: String,
    body: serde_json::Value,
}

/// The `webhook.deliver` handler.
#[derive(Clone)]
pub struct WebhookDeliver {
    client: reqwest::Client,
    allowed: Arc<Vec<String>>,
    secret: Arc<Vec<u8>>,
    backoff_max: Duration,
}

impl std::fmt::Debug for WebhookDeliver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookDeliver").field("allowed", &self.allowed).finish_non_exhaustive()
    }
}

impl WebhookDeliver {
    /// A handler with the allow-list, the secret and the longest backoff of `settings`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (its TLS set-up).
    pub fn new(settings: &JobsSettings) -> anyhow::Result<Self> {
        let allowed = Arc::new(settings.webhook_allowed_hosts.clone());
        let policy_allowed = Arc::clone(&allowed);
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                let error = anyhow!("more than {MAX_REDIRECTS} redirects; the last to {}", attempt.url());
                return attempt.error(error);
            }
            match webhook_target(attempt.url().as_str(), &policy_allowed) {
                Ok(_) => attempt.follow(),
                Err(why) => {
                    let error = anyhow!("redirected to {}, which is not followed: {why}", attempt.url());
                    attempt.error(error)
                }
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cairn-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            allowed,
            secret: Arc::new(settings.webhook_secret.clone()),
            backoff_max: settings.backoff_max,
        })
    }

    async fn deliver(&self, job: &JobContext) -> Result<(), JobError> {
        let args: Args = serde_json::from_value(job.args.clone())
            .map_err(|e| JobError::Permanent(anyhow!("args must be {{url, body}}: {e}")))?;
        let url = webhook_target(&args.url, &self.allowed).map_err(|why| JobError::Permanent(anyhow!(why)))?;
        let body = serde_json::to_vec(&args.body).map_err(|e| JobError::Permanent(e.into()))?;
        let id = job.id.to_string();
        let timestamp = job.clock.now().timestamp();
        let signature = sign(&self.secret, &id, timestamp, &body);
        let reply = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| JobError::Retry(anyhow!("cannot deliver: {}", error_chain(&e))))?;
        let status = reply.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = retry_after(reply.headers());
        let excerpt = excerpt(reply).await;
        let error = anyhow!("the receiver answered {status}: {excerpt}");
        if status == StatusCode::GONE {
            return Err(JobError::Permanent(error));
        }
        match retry_after {
            Some(after) if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE => {
                Err(JobError::RetryAfter(after.min(self.backoff_max), error))
            }
            _ => Err(JobError::Retry(error)),
        }
    }
}

impl JobHandler for WebhookDeliver {
    fn kind(&self) -> &'static str {
        WEBHOOK_DELIVER
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            tokio::select! {
                () = job.cancel.cancelled() => Err(JobError::Retry(anyhow!("the delivery was stopped before the receiver answered"))),
                outcome = self.deliver(job) => outcome,
            }
        })
    }
}

/// The `webhook-signature` value: `v1,` and the base64 of HMAC-SHA256 over
/// `{id}.{timestamp}.{body}`, keyed by the secret's decoded bytes.
#[must_use]
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
}

/// `Retry-After` in seconds (the HTTP-date form is not used by the receivers this is for, and is
/// treated as absent: the usual backoff applies).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?;
    raw.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// At most [`BODY_EXCERPT`] bytes of the body, read no further than that.
async fn excerpt(mut reply: reqwest::Response) -> String {
    let mut kept = Vec::with_capacity(BODY_EXCERPT);
    while kept.len() < BODY_EXCERPT {
        match reply.chunk().await {
            Ok(Some(chunk)) => kept.extend_from_slice(&chunk[..chunk.len().min(BODY_EXCERPT - kept.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    if kept.is_empty() {
        return "(no body)".to_owned();
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The error with its causes (reqwest's own text alone hides which redirect was refused).
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_matches_the_standard_webhooks_example() {
        // The example in the Standard Webhooks specification and its reference libraries.
        let secret = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap_or_else(|e| panic!("{e}"));
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_is_read_in_seconds_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(retry_after(&headers), None);
    }
}
