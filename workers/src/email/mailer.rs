//! SMTP delivery with lettre over rustls: a pooled connection to the configured server, and the
//! line between failures worth retrying (the server is down, stalls or refuses everything) and
//! failures of one message that no retry will fix (the server rejects that recipient).
//!
//! lettre's async transport bounds only the TCP connect with its timeout: a server that accepts
//! and then stops answering (at the greeting, or at DATA) would hold a send for ever. So every
//! exchange is bounded here as a whole by `SMTP_TIMEOUT_SECS`, and a send cut short replaces the
//! connection pool, since the connection it was using is in the middle of a conversation and
//! must never be handed out again.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::settings::{EmailSettings, SmtpTls};
use super::templates::Mail;

/// Why a message was not sent.
#[derive(Debug)]
pub enum SendError {
    /// This message can never be sent as it is (malformed or refused recipient): retrying would
    /// block every later mail behind it.
    Rejected(String),
    /// Anything else (server unreachable, timeout, TLS or login failure, temporary refusal): retry later.
    Failed(anyhow::Error),
}

/// Sends mails through the configured SMTP server.
pub struct Mailer {
    /// Replaced after a send was cut short; a clone is cheap (the pool is shared).
    transport: Mutex<AsyncSmtpTransport<Tokio1Executor>>,
    settings: EmailSettings,
    from: Mailbox,
    server: String,
    timeout: Duration,
}

impl Mailer {
    /// A mailer for `settings`. Needs a running Tokio runtime: the connection pool starts a
    /// housekeeping task.
    ///
    /// # Errors
    /// When called outside a Tokio runtime, or the TLS set-up (`SMTP_TLS_CA_FILE`) is unusable.
    pub fn new(settings: &EmailSettings) -> anyhow::Result<Self> {
        // lettre's pool spawns on the current runtime and would panic without one.
        tokio::runtime::Handle::try_current().context("the mailer must be created inside a Tokio runtime")?;
        Ok(Self {
            transport: Mutex::new(transport(settings)?),
            settings: settings.clone(),
            from: settings.from.clone(),
            server: format!("{}:{}", settings.host, settings.port),
            timeout: settings.timeout,
        })
    }

    /// `host:port` of the SMTP server, for messages.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the server answers (connects, greets, logs in).
    ///
    /// # Errors
    /// When it does not.
    pub async fn check(&self) -> anyhow::Result<()> {
        let transport = self.current()?;
        match tokio::time::timeout(self.timeout, transport.test_connection()).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => anyhow::bail!("SMTP server {} does not answer", self.server),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("SMTP server {} is unusable", self.server))),
            Err(_) => {
                self.replace_transport();
                anyhow::bail!("SMTP server {} did not answer within {:?}", self.server, self.timeout)
            }
        }
    }

    /// The transport to use now.
    fn current(&self) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
        self.transport.lock().map(|t| t.clone()).map_err(|_| anyhow::anyhow!("the SMTP transport lock is poisoned"))
    }

    /// Drops the connection pool (and with it the connection of a send that was cut short) for a
    /// fresh one. The settings were usable once, so building again only fails if they stopped being.
    fn replace_transport(&self) {
        match (transport(&self.settings), self.transport.lock()) {
            (Ok(fresh), Ok(mut current)) => *current = fresh,
            (Err(e), _) => tracing::error!(error = %format!("{e:#}"), "cannot rebuild the SMTP transport"),
            (_, Err(_)) => tracing::error!("the SMTP transport lock is poisoned"),
        }
    }

    /// Sends `mail` to `address` (greeted as `name`) as multipart/alternative, plain text first.
    ///
    /// # Errors
    /// [`SendError::Rejected`] when no retry can deliver this message, [`SendError::Failed`] otherwise.
    pub async fn send(&self, name: &str, address: &str, mail: &Mail) -> Result<(), SendError> {
        let to_address = address
            .parse()
            .map_err(|e| SendError::Rejected(format!("'{address}' is not an address lettre can send to: {e}")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(Some(name.to_owned()), to_address))
            .subject(mail.subject.clone())
            // RFC 3834: tells mail servers and vacation responders not to answer.
            .raw_header(HeaderValue::new(HeaderName::new_from_ascii_str("Auto-Submitted"), "auto-generated".to_owned()))
            .multipart(MultiPart::alternative_plain_html(mail.text.clone(), mail.html.clone()))
            .map_err(|e| SendError::Rejected(format!("cannot build the message: {e}")))?;
        let transport = self.current().map_err(SendError::Failed)?;
        match tokio::time::timeout(self.timeout, transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if rejects_this_message(&e, address) => Err(SendError::Rejected(format!("{e}"))),
            Ok(Err(e)) => Err(SendError::Failed(anyhow::Error::new(e).context(format!("SMTP server {}", self.server)))),
            Err(_) => {
                self.replace_transport();
                Err(SendError::Failed(anyhow::anyhow!(
                    "SMTP server {} did not finish taking the message within {:?}",
                    self.server,
                    self.timeout
                )))
            }
        }
    }
}

/// A pooled transport to the server `settings` name.
fn transport(settings: &EmailSettings) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.as_str())
        .port(settings.port)
        .timeout(Some(settings.timeout))
        // Idle connections are dropped well before typical server-side idle limits (about 5 minutes).
        .pool_config(PoolConfig::new().max_size(4).idle_timeout(Duration::from_secs(60)));
    if settings.tls != SmtpTls::None {
        let mut params = TlsParameters::builder(settings.host.clone());
        if let Some(path) = &settings.ca_file {
            let pem =
                std::fs::read(path).with_context(|| format!("cannot read SMTP_TLS_CA_FILE {}", path.display()))?;
            let certificate = Certificate::from_pem(&pem)
                .with_context(|| format!("SMTP_TLS_CA_FILE {} holds no PEM certificate", path.display()))?;
            params = params.add_root_certificate(certificate);
        }
        let params = params.build_rustls().context("cannot set up TLS for SMTP")?;
        // Required, never opportunistic: a server that stops offering STARTTLS is an attack, not a fallback.
        builder = builder.tls(match settings.tls {
            SmtpTls::Tls => Tls::Wrapper(params),
            _ => Tls::Required(params),
        });
    }
    if let (Some(username), Some(password)) = (&settings.username, &settings.password) {
        builder = builder.credentials(Credentials::new(username.clone(), password.expose().to_owned()));
    }
    Ok(builder.build())
}

/// Whether an SMTP failure is about this one message rather than the server or our configuration.
///
/// Only two cases qualify: a permanent refusal whose enhanced status code (RFC 3463) is about the
/// destination address (`5.1.x`, except 5.1.7 and 5.1.8, which are about our sender address), and a
/// non-ASCII address the server cannot take (no SMTPUTF8). Everything else, including permanent
/// refusals such as a failed login or "relaying denied", is a configuration or server problem that
/// affects every mail alike, so mails wait for it to be fixed rather than being dropped.
fn rejects_this_message(e: &lettre::transport::smtp::Error, address: &str) -> bool {
    if e.is_client() && !address.is_ascii() {
        return true;
    }
    if !e.is_permanent() {
        return false;
    }
    let text = std::error::Error::source(e).map(ToString::to_string).unwrap_or_default();
    let enhanced = text.split_whitespace().next().unwrap_or("");
    enhanced.starts_with("5.1.") && enhanced != "5.1.7" && enhanced != "5.1.8"
}
