//! The email worker: a durable consumer on EVENTS that mails users about their account (welcome
//! and verification, resend, password reset, verified, password changed), idempotent by event id.
//!
//! Per event, holding a claim on the event id (see `claim`: a session-level advisory lock):
//! 1. a row in `email_deliveries` means the mail went out: skip;
//! 2. for a link mail, a fresh token is stored hashed in `email_tokens`, keyed by the event id
//!    (an earlier token for the same event is replaced), in a statement of its own;
//! 3. the mail is sent, with no transaction open;
//! 4. the delivery is recorded, in a statement of its own.
//!
//! No transaction stays open across the SMTP exchange: a transaction that holds a transaction id
//! holds back the relay's horizon for the whole cluster, so one slow SMTP server would delay the
//! publication of every event. A mail that fails or is refused takes its token back with it.
//!
//! Delivery is exactly-once except in one window: a crash (or a lost write) after the SMTP server
//! accepted the mail and before the delivery row is stored. The event is then redelivered and
//! mailed again, with a new token, and only the newest link works. Mail cannot do better: SMTP
//! has no transaction to join.
//!
//! The claim matters with several worker processes: a batch that keeps failing (SMTP down) outlives
//! JetStream's ack wait and is handed to a second process too; when the server returns, both
//! retry the same events, and the claim makes the second one wait, then find the first one's
//! delivery row.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::failure::transient;
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use cairn_platform::secrets::{hash_token, random_token};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::claim::EventClaim;
use super::mailer::{Mailer, SendError};
use super::settings::EmailSettings;
use super::templates::{self, Mail, PasswordChange};

/// The durable consumer's name.
pub const CONSUMER: &str = "worker_email";

/// How long a verification link works.
pub const VERIFY_EMAIL_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a password-reset link works.
pub const RESET_PASSWORD_TTL: Duration = Duration::from_secs(30 * 60);

/// How much longer than one SMTP timeout a worker waits for another that holds an event's claim,
/// before it gives up for now (the batch is retried).
const CLAIM_PATIENCE_MARGIN: Duration = Duration::from_secs(5);

/// Sends the account mails.
#[derive(Clone)]
pub struct EmailWorker {
    pool: PgPool,
    settings: Arc<EmailSettings>,
    mailer: Arc<Mailer>,
}

/// What an event asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `UserRegistered`: welcome, with a verification link.
    Welcome,
    /// `EmailVerificationRequested`: a new verification link.
    VerifyEmail,
    /// `PasswordResetRequested`: a reset link.
    ResetPassword,
    /// `EmailVerified`: confirmation.
    EmailVerified,
    /// `PasswordChanged`: security notice.
    PasswordChanged,
    /// `PasswordReset`: security notice.
    PasswordReset,
}

impl Kind {
    fn of(event_type: &str) -> Option<Self> {
        Some(match event_type {
            "UserRegistered" => Self::Welcome,
            "EmailVerificationRequested" => Self::VerifyEmail,
            "PasswordResetRequested" => Self::ResetPassword,
            "EmailVerified" => Self::EmailVerified,
            "PasswordChanged" => Self::PasswordChanged,
            "PasswordReset" => Self::PasswordReset,
            _ => return None,
        })
    }

    /// The `email_deliveries.kind` value, and the metrics label.
    fn as_str(self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
            Self::EmailVerified => "email_verified",
            Self::PasswordChanged => "password_changed",
            Self::PasswordReset => "password_reset",
        }
    }

    /// The token this mail carries: `email_tokens.purpose` and lifetime.
    fn token(self) -> Option<(&'static str, Duration)> {
        match self {
            Self::Welcome | Self::VerifyEmail => Some(("verify_email", VERIFY_EMAIL_TTL)),
            Self::ResetPassword => Some(("reset_password", RESET_PASSWORD_TTL)),
            Self::EmailVerified | Self::PasswordChanged | Self::PasswordReset => None,
        }
    }
}

/// Who a mail goes to.
struct Recipient {
    email: String,
    display_name: String,
}

impl EmailWorker {
    /// A worker reading and writing `pool`, sending as `settings` say. Call it inside a Tokio
    /// runtime (the SMTP connection pool starts a task); it does not connect yet.
    ///
    /// # Errors
    /// Outside a Tokio runtime, or when the TLS set-up (`SMTP_TLS_CA_FILE`) is unusable.
    pub fn new(pool: PgPool, settings: EmailSettings) -> anyhow::Result<Self> {
        let mailer = Mailer::new(&settings)?;
        Ok(Self { pool, settings: Arc::new(settings), mailer: Arc::new(mailer) })
    }

    /// Runs as a durable consumer until `shutdown`. An unreachable SMTP server is logged, not
    /// fatal: mails wait in the stream until it answers.
    ///
    /// # Errors
    /// When the consumer cannot be created.
    pub async fn run(
        self,
        js: jetstream::Context,
        ns: Namespace,
        batch: usize,
        replicas: usize,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let stream = nats::ensure_events_stream(&js, &ns, replicas).await?;
        let consumer = nats::ensure_durable_consumer(&stream, CONSUMER).await?;
        match self.mailer.check().await {
            Ok(()) => tracing::info!(smtp = self.mailer.server(), "email worker running"),
            Err(e) => tracing::warn!(
                smtp = self.mailer.server(),
                error = %format!("{e:#}"),
                "email worker running, but the SMTP server is unusable; mails wait until it answers"
            ),
        }
        let pool = self.pool.clone();
        nats::consume(consumer, batch, self, "email", pool, shutdown).await;
        Ok(())
    }

    /// Mails what `event` asks for, unless that was done already, holding the event's claim.
    async fn deliver(&self, event: &EventEnvelope, kind: Kind) -> anyhow::Result<()> {
        let Ok(user_id) = Uuid::parse_str(&event.aggregate_id) else {
            // Cannot happen for events the command side wrote; retrying would not change it.
            tracing::error!(
                event_id = %event.event_id,
                aggregate_id = %event.aggregate_id,
                "User event with a non-uuid id; no mail"
            );
            return Ok(());
        };
        // Another worker holding the claim is in its own send, which lasts at most a few SMTP timeouts.
        let patience = self.settings.timeout + CLAIM_PATIENCE_MARGIN;
        let mut claim = EventClaim::take(&self.pool, event.event_id, patience).await?;
        let outcome = self.deliver_claimed(claim.conn(), event, kind, user_id).await;
        claim.release(event.event_id).await;
        outcome
    }

    /// The body of [`Self::deliver`]: every statement on `conn` is its own transaction, so none
    /// is open while the mail is sent.
    async fn deliver_claimed(
        &self,
        conn: &mut PgConnection,
        event: &EventEnvelope,
        kind: Kind,
        user_id: Uuid,
    ) -> anyhow::Result<()> {
        let sent: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM email_deliveries WHERE event_id = $1)")
            .bind(event.event_id)
            .fetch_one(&mut *conn)
            .await?;
        if sent {
            return Ok(());
        }
        let Some(recipient) = recipient(conn, event, kind).await? else {
            // Every User stream starts with UserRegistered; without it there is nobody to mail, ever.
            tracing::error!(
                event_id = %event.event_id,
                user_id = %user_id,
                "no UserRegistered event for this user; no mail"
            );
            return Ok(());
        };

        // Stored (hashed) before the mail goes out, so the link works as soon as it arrives.
        let token = match kind.token() {
            Some((purpose, ttl)) => Some(issue_token(conn, event.event_id, user_id, purpose, ttl).await?),
            None => None,
        };
        let mail = self.render(kind, event, &recipient, token.as_deref());
        let sent = self.mailer.send(&recipient.display_name, &recipient.email, &mail).await;
        if sent.is_err() && token.is_some() {
            // The mail did not go out (as far as we know): its link must not work.
            withdraw_token(conn, event.event_id).await;
        }
        match sent {
            Ok(()) => {}
            Err(SendError::Rejected(reason)) => {
                // Dropped: retrying could never succeed and would hold up every mail behind it.
                // The user can ask again.
                metrics::counter!("cairn_emails_rejected_total", "kind" => kind.as_str()).increment(1);
                tracing::error!(
                    event_id = %event.event_id,
                    kind = kind.as_str(),
                    %reason,
                    "mail rejected; not retried"
                );
                return Ok(());
            }
            // The server is down, slow or refusing everything: nothing about this event; retried.
            Err(SendError::Failed(e)) => return Err(transient(e)),
        }
        sqlx::query(
            "INSERT INTO email_deliveries (event_id, kind, recipient) VALUES ($1, $2, $3) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id)
        .bind(kind.as_str())
        .bind(&recipient.email)
        .execute(&mut *conn)
        .await
        .context("mail sent but its delivery not recorded; it will be sent again")?;
        metrics::counter!("cairn_emails_sent_total", "kind" => kind.as_str()).increment(1);
        tracing::info!(event_id = %event.event_id, kind = kind.as_str(), "mail sent");
        Ok(())
    }

    fn render(&self, kind: Kind, event: &EventEnvelope, to: &Recipient, token: Option<&str>) -> Mail {
        let s = &self.settings;
        let name = to.display_name.as_str();
        let token = token.unwrap_or_default();
        match kind {
            Kind::Welcome => templates::welcome(name, &s.verify_email_link(token), VERIFY_EMAIL_TTL),
            Kind::VerifyEmail => templates::verify_email(name, &s.verify_email_link(token), VERIFY_EMAIL_TTL),
            Kind::ResetPassword => templates::reset_password(name, &s.reset_password_link(token), RESET_PASSWORD_TTL),
            Kind::EmailVerified => templates::email_verified(name),
            Kind::PasswordChanged | Kind::PasswordReset => templates::password_changed(
                name,
                if kind == Kind::PasswordReset { PasswordChange::Reset } else { PasswordChange::Changed },
                event.recorded_at,
                event.meta("client_ip"),
                &s.reset_password_page(),
            ),
        }
    }
}

impl EventBatchHandler for EmailWorker {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        for event in events {
            if event.aggregate_type != "User" {
                continue;
            }
            let Some(kind) = Kind::of(&event.event_type) else { continue };
            // Stops at the first failure: the batch is retried whole, and what was sent is skipped then.
            self.deliver(event, kind)
                .await
                .with_context(|| format!("{} mail for event {}", kind.as_str(), event.event_id))?;
        }
        Ok(())
    }
}

/// Stores a fresh token for `event_id`'s mail, replacing one an earlier, unfinished attempt
/// stored, and returns the token itself (only its hash is kept).
async fn issue_token(
    conn: &mut PgConnection,
    event_id: Uuid,
    user_id: Uuid,
    purpose: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    let token = random_token()?;
    let ttl = chrono::Duration::from_std(ttl)?;
    sqlx::query(
        "INSERT INTO email_tokens (token_hash, user_id, purpose, event_id, expires_at) \
         VALUES ($1, $2, $3, $4, now() + $5) \
         ON CONFLICT (event_id) DO UPDATE \
         SET token_hash = EXCLUDED.token_hash, expires_at = EXCLUDED.expires_at, used_at = NULL, created_at = now()",
    )
    .bind(hash_token(&token))
    .bind(user_id)
    .bind(purpose)
    .bind(event_id)
    .bind(ttl)
    .execute(&mut *conn)
    .await?;
    Ok(token)
}

/// Deletes the token stored for `event_id`'s mail after the mail failed. Best effort: a token
/// left behind is one nobody received, and the next attempt replaces it.
async fn withdraw_token(conn: &mut PgConnection, event_id: Uuid) {
    if let Err(e) = sqlx::query("DELETE FROM email_tokens WHERE event_id = $1").bind(event_id).execute(&mut *conn).await
    {
        tracing::warn!(%event_id, error = %e, "cannot withdraw the token of a mail that was not sent");
    }
}

/// The address and name to mail. `UserRegistered` carries both; for later events they come from
/// the events table (the `users` read model may lag behind this worker), with the newest display
/// name before the event.
async fn recipient(conn: &mut PgConnection, event: &EventEnvelope, kind: Kind) -> anyhow::Result<Option<Recipient>> {
    if kind == Kind::Welcome {
        let body = event.body();
        let field = |name: &str| body.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
        return Ok(
            field("email").map(|email| Recipient { email, display_name: field("display_name").unwrap_or_default() })
        );
    }
    let row: Option<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT r.payload -> 'UserRegistered' ->> 'email', \
                r.payload -> 'UserRegistered' ->> 'display_name', \
                (SELECT c.payload -> 'DisplayNameChanged' ->> 'display_name' FROM events c \
                  WHERE c.aggregate_type = 'User' AND c.aggregate_id = $1 AND c.event_type = 'DisplayNameChanged' \
                    AND c.sequence < $2 \
                  ORDER BY c.sequence DESC LIMIT 1) \
           FROM events r \
          WHERE r.aggregate_type = 'User' AND r.aggregate_id = $1 AND r.event_type = 'UserRegistered'",
    )
    .bind(&event.aggregate_id)
    .bind(event.sequence)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.and_then(|(email, registered_name, changed_name)| {
        Some(Recipient { email: email?, display_name: changed_name.or(registered_name).unwrap_or_default() })
    }))
}
