//! The email worker against a real SMTP server: Debian's `python3-aiosmtpd`, started by each test
//! on a free port with a maildir, which the test reads back. Every test has its own database; the
//! events the worker needs are written to the events table directly and handed to the worker as
//! envelopes, except in the last test, which runs the durable consumer through NATS.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::{EventBatchHandler, Namespace};
use cairn_platform::secrets::hash_token;
use cairn_workers::email::{EmailSettings, EmailWorker, RESET_PASSWORD_TTL, VERIFY_EMAIL_TTL};
use chrono::{DateTime, Utc};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn pg_base() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The system Python, which has Debian's aiosmtpd (a `python3` earlier on PATH may be another one).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

const PUBLIC_URL: &str = "https://app.example.test";

// ---------------------------------------------------------------------------------------------
// The SMTP server

/// An aiosmtpd process delivering into a maildir; killed when dropped.
struct SmtpServer {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl SmtpServer {
    /// Plain SMTP with aiosmtpd's own Mailbox handler.
    fn start() -> Self {
        Self::start_with(&["-c", "aiosmtpd.handlers.Mailbox"])
    }

    /// aiosmtpd with `args` before the maildir (the handler's one argument).
    fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server =
            Self { port: free_port(), dir, args: args.iter().map(|a| (*a).to_owned()).collect(), child: None };
        server.spawn();
        server
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("maildir")
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("smtpd.log")).unwrap();
        let child = Command::new(python())
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{}", self.port)])
            .args(&self.args)
            .arg(self.maildir())
            // For the test's own handler module.
            .env("PYTHONPATH", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("aiosmtpd must be installed (apt-get install python3-aiosmtpd)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("aiosmtpd exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "aiosmtpd did not listen on {}: {}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }

    /// Writes a Python module next to the maildir, importable by the server.
    fn module(dir: &Path, name: &str, source: &str) {
        std::fs::write(dir.join(format!("{name}.py")), source).unwrap();
    }

    /// Every delivered message, in no particular order.
    fn messages(&self) -> Vec<Delivered> {
        let new = self.maildir().join("new");
        let files: Vec<_> =
            std::fs::read_dir(&new).map(|entries| entries.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
        files.iter().map(|p| Delivered::parse(&std::fs::read(p).unwrap())).collect()
    }

    fn settings(&self, extra: &[(&str, &str)]) -> EmailSettings {
        let port = self.port.to_string();
        let mut vars = vec![("SMTP_HOST", "127.0.0.1"), ("SMTP_PORT", port.as_str()), ("CAIRN_PUBLIC_URL", PUBLIC_URL)];
        vars.extend_from_slice(extra);
        EmailSettings::from_lookup(|k| vars.iter().rev().find(|(name, _)| *name == k).map(|(_, v)| (*v).to_owned()))
            .unwrap()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap().local_addr().unwrap().port()
}

/// One delivered message, decoded.
#[derive(Debug)]
struct Delivered {
    /// The envelope recipient, as aiosmtpd recorded it.
    rcpt_to: String,
    to_address: String,
    to_name: String,
    subject: String,
    content_type: String,
    auto_submitted: String,
    text: String,
    html: String,
}

impl Delivered {
    fn parse(raw: &[u8]) -> Self {
        let message = MessageParser::default().parse(raw).unwrap();
        let to = message.to().and_then(|a| a.first()).unwrap();
        let content_type = message.root_part().content_type().unwrap();
        // Both alternatives must really be there: the parser would derive a missing one from the other.
        let text = match &message.text_part(0).unwrap().body {
            PartType::Text(t) => t.to_string(),
            other => panic!("text part is {other:?}"),
        };
        let html = match &message.html_part(0).unwrap().body {
            PartType::Html(h) => h.to_string(),
            other => panic!("html part is {other:?}"),
        };
        Self {
            rcpt_to: message.header_raw("X-RcptTo").unwrap_or_default().trim().to_owned(),
            to_address: to.address().unwrap_or_default().to_owned(),
            to_name: to.name().unwrap_or_default().to_owned(),
            subject: message.subject().unwrap_or_default().to_owned(),
            content_type: format!("{}/{}", content_type.ctype(), content_type.subtype().unwrap_or_default()),
            auto_submitted: message.header_raw("Auto-Submitted").unwrap_or_default().trim().to_owned(),
            text,
            html,
        }
    }

    /// The token of the link to `path` in the text body, checking the HTML body has the same link.
    fn token(&self, path: &str) -> String {
        let prefix = format!("{PUBLIC_URL}{path}?token=");
        let start =
            self.text.find(&prefix).unwrap_or_else(|| panic!("no {prefix} link in {}", self.text)) + prefix.len();
        let token: String =
            self.text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || "-_".contains(*c)).collect();
        assert!(token.len() >= 43, "a 256-bit token, not '{token}'");
        assert!(self.html.contains(&format!("href=\"{prefix}{token}\"")), "the HTML link differs: {}", self.html);
        token
    }
}

// ---------------------------------------------------------------------------------------------
// The database

struct TestDb {
    name: String,
    pool: PgPool,
}

impl TestDb {
    async fn create() -> Self {
        let name = format!("cairn_test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let pool = cairn_platform::db::connect_and_migrate(&format!("{}/{name}", pg_base()), 5).await.unwrap();
        Self { name, pool }
    }

    async fn drop(self) {
        self.pool.close().await;
        let admin = PgPool::connect(&format!("{}/postgres", pg_base())).await.unwrap();
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).execute(&admin).await.unwrap();
        admin.close().await;
    }

    /// Appends a User event as the command side would, and returns its envelope.
    async fn append(&self, user: Uuid, sequence: i64, event_type: &str, body: Value, metadata: Value) -> EventEnvelope {
        self.append_to("User", &user.to_string(), sequence, event_type, body, metadata).await
    }

    async fn append_to(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
        event_type: &str,
        body: Value,
        metadata: Value,
    ) -> EventEnvelope {
        let payload = json!({ event_type: body });
        let (event_id, transaction_id, global_position, recorded_at): (Uuid, String, i64, DateTime<Utc>) =
            sqlx::query_as(
                "INSERT INTO events \
                        (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
                 VALUES ($1, $2, $3, $4, '1.0', $5, $6) \
                 RETURNING event_id, transaction_id::text, global_position, recorded_at",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .bind(event_type)
            .bind(&payload)
            .bind(&metadata)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        EventEnvelope {
            event_id,
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            event_type: event_type.to_owned(),
            event_version: "1.0".to_owned(),
            transaction_id: transaction_id.parse().unwrap(),
            global_position,
            recorded_at,
            payload,
            metadata,
            previous_transaction_id: 0,
            previous_global_position: 0,
        }
    }

    async fn register(&self, user: Uuid, email: &str, name: &str) -> EventEnvelope {
        let body =
            json!({ "email": email, "display_name": name, "password_hash": "$argon2id$v=19$x", "roles": ["user"] });
        self.append(user, 1, "UserRegistered", body, json!({ "request_id": "r1" })).await
    }

    /// The stored token row for `token`: user, purpose, seconds left, used.
    async fn token_row(&self, token: &str) -> Option<(Uuid, String, f64, bool)> {
        sqlx::query_as(
            "SELECT user_id, purpose, EXTRACT(EPOCH FROM expires_at - now())::float8, used_at IS NOT NULL \
               FROM email_tokens WHERE token_hash = $1",
        )
        .bind(hash_token(token))
        .fetch_optional(&self.pool)
        .await
        .unwrap()
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&self.pool).await.unwrap()
    }

    async fn delivery_kind(&self, event_id: Uuid) -> Option<(String, String)> {
        sqlx::query_as("SELECT kind, recipient FROM email_deliveries WHERE event_id = $1")
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }
}

/// Asserts a token row belongs to `user`, has `purpose`, is unused and expires `ttl` from now.
async fn assert_token(db: &TestDb, token: &str, user: Uuid, purpose: &str, ttl: Duration) {
    let (owner, stored_purpose, seconds_left, used) =
        db.token_row(token).await.unwrap_or_else(|| panic!("no email_tokens row hashes to the mailed token"));
    assert_eq!(owner, user);
    assert_eq!(stored_purpose, purpose);
    assert!(!used);
    let ttl = ttl.as_secs_f64();
    assert!(seconds_left > ttl - 60.0 && seconds_left <= ttl + 1.0, "expires in {seconds_left} s, expected {ttl} s");
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn registration_mails_a_welcome_with_a_verification_link() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let user = Uuid::new_v4();
    // Non-ASCII and markup in the name: encoded in headers, escaped in HTML.
    let registered = db.register(user, "zoe@example.com", "Zoë <b>Ann</b> & co").await;

    worker.handle(std::slice::from_ref(&registered)).await.unwrap();

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert_eq!(mail.rcpt_to, "zoe@example.com");
    assert_eq!((mail.to_address.as_str(), mail.to_name.as_str()), ("zoe@example.com", "Zoë <b>Ann</b> & co"));
    assert_eq!(mail.subject, "Welcome to cairn: please verify your email address");
    assert_eq!(mail.content_type, "multipart/alternative");
    assert_eq!(mail.auto_submitted, "auto-generated");
    assert!(mail.text.contains("Hello Zoë <b>Ann</b> & co,"), "{}", mail.text);
    assert!(mail.html.contains("Hello Zoë &lt;b&gt;Ann&lt;/b&gt; &amp; co,"), "{}", mail.html);
    assert!(!mail.html.contains("<b>Ann"));
    assert!(mail.text.contains("valid for 24 hours"));

    let token = mail.token("/verify-email");
    assert_token(&db, &token, user, "verify_email", VERIFY_EMAIL_TTL).await;
    assert_eq!(db.delivery_kind(registered.event_id).await, Some(("welcome".to_owned(), "zoe@example.com".to_owned())));
    db.drop().await;
}

#[tokio::test]
async fn an_event_handled_twice_is_mailed_once() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let user = Uuid::new_v4();
    let registered = db.register(user, "ada@example.com", "Ada").await;

    // Twice in one batch (a redelivery overtaking its ack), then again as a later batch.
    worker.handle(&[registered.clone(), registered.clone()]).await.unwrap();
    worker.handle(std::slice::from_ref(&registered)).await.unwrap();

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    assert_eq!(db.count("email_tokens").await, 1);
    assert_eq!(db.count("email_deliveries").await, 1);
    assert_token(&db, &mails[0].token("/verify-email"), user, "verify_email", VERIFY_EMAIL_TTL).await;
    db.drop().await;
}

#[tokio::test]
async fn reset_and_resend_go_to_the_address_from_the_log_with_the_current_name() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let user = Uuid::new_v4();
    db.register(user, "grace@example.com", "Grace").await;
    db.append(user, 2, "DisplayNameChanged", json!({ "display_name": "Admiral Grace" }), json!({})).await;
    let reset = db.append(user, 3, "PasswordResetRequested", json!({}), json!({})).await;
    let resend = db.append(user, 4, "EmailVerificationRequested", json!({}), json!({})).await;

    worker.handle(&[reset.clone(), resend.clone()]).await.unwrap();

    let mails = smtp.messages();
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let reset_mail = mails.iter().find(|m| m.subject == "Reset your cairn password").unwrap();
    let resend_mail = mails.iter().find(|m| m.subject == "Verify your email address").unwrap();
    for mail in &mails {
        assert_eq!(mail.rcpt_to, "grace@example.com");
        assert_eq!(mail.to_name, "Admiral Grace");
        assert!(mail.text.starts_with("Hello Admiral Grace,"), "{}", mail.text);
    }
    assert!(reset_mail.text.contains("valid for 30 minutes"));
    let reset_token = reset_mail.token("/reset-password");
    assert_token(&db, &reset_token, user, "reset_password", RESET_PASSWORD_TTL).await;

    let verify_token = resend_mail.token("/verify-email");
    assert_ne!(verify_token, reset_token);
    assert_token(&db, &verify_token, user, "verify_email", VERIFY_EMAIL_TTL).await;
    assert_eq!(db.delivery_kind(reset.event_id).await.unwrap().0, "reset_password");
    assert_eq!(db.delivery_kind(resend.event_id).await.unwrap().0, "verify_email");
    db.drop().await;
}

#[tokio::test]
async fn verification_and_password_changes_send_notices_without_tokens() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let user = Uuid::new_v4();
    db.register(user, "linus@example.com", "Linus").await;
    let verified = db.append(user, 2, "EmailVerified", json!({}), json!({})).await;
    let changed = db
        .append(
            user,
            3,
            "PasswordChanged",
            json!({ "password_hash": "$argon2id$v=19$y", "session_version": 2 }),
            json!({ "client_ip": "203.0.113.7" }),
        )
        .await;
    let reset = db
        .append(
            user,
            4,
            "PasswordReset",
            json!({ "password_hash": "$argon2id$v=19$z", "session_version": 3 }),
            json!({}),
        )
        .await;

    worker.handle(&[verified, changed, reset]).await.unwrap();

    let mails = smtp.messages();
    let mut subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort_unstable();
    assert_eq!(
        subjects,
        ["Your cairn password was changed", "Your cairn password was changed", "Your email address is verified"]
    );
    assert!(mails.iter().all(|m| m.rcpt_to == "linus@example.com" && !m.text.contains("token=")));
    let changed = mails.iter().find(|m| m.text.contains("was changed on")).unwrap();
    assert!(changed.text.contains("from 203.0.113.7"), "{}", changed.text);
    let reset = mails.iter().find(|m| m.text.contains("was reset with a link")).unwrap();
    assert!(!reset.text.contains(" from "), "{}", reset.text);
    for notice in [changed, reset] {
        assert!(notice.text.contains("If this wasn't you, reset your password now"));
        assert!(notice.text.contains(&format!("{PUBLIC_URL}/reset-password\n")));
    }
    assert_eq!(db.count("email_tokens").await, 0);
    assert_eq!(db.count("email_deliveries").await, 3);
    db.drop().await;
}

#[tokio::test]
async fn other_aggregates_and_events_are_ignored() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let user = Uuid::new_v4();
    let registered = db.register(user, "ken@example.com", "Ken").await;
    let granted = db.append(user, 2, "RoleGranted", json!({ "role": "auditor" }), json!({})).await;
    // A Session event whose type a User event also has must not be mistaken for one.
    let foreign =
        db.append_to("Session", &Uuid::new_v4().to_string(), 1, "PasswordResetRequested", json!({}), json!({})).await;

    worker.handle(&[granted, foreign]).await.unwrap();
    assert!(smtp.messages().is_empty());
    assert_eq!(db.count("email_deliveries").await, 0);

    worker.handle(&[registered]).await.unwrap();
    assert_eq!(smtp.messages().len(), 1);
    db.drop().await;
}

#[tokio::test]
async fn an_smtp_outage_fails_the_batch_and_the_retry_mails_each_event_once() {
    let mut smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[("SMTP_TIMEOUT_SECS", "2")])).unwrap();
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let first = db.register(ada, "ada@example.com", "Ada").await;
    let second = db.register(bob, "bob@example.com", "Bob").await;
    let batch = [first.clone(), second.clone()];

    // The first event goes out (and leaves a pooled connection behind), then the server dies.
    worker.handle(std::slice::from_ref(&first)).await.unwrap();
    smtp.stop();
    let failed = worker.handle(&batch).await;
    assert!(failed.is_err(), "a batch must fail while the SMTP server is down");
    assert!(format!("{:#}", failed.unwrap_err()).contains(&second.event_id.to_string()));
    assert!(db.delivery_kind(second.event_id).await.is_none());
    assert_eq!(db.count("email_tokens").await, 1, "the failed mail's token must not survive");

    // The consume loop retries the same batch: the first event is not mailed again.
    smtp.restart();
    worker.handle(&batch).await.unwrap();
    worker.handle(&batch).await.unwrap();

    let mails = smtp.messages();
    let mut recipients: Vec<&str> = mails.iter().map(|m| m.rcpt_to.as_str()).collect();
    recipients.sort_unstable();
    assert_eq!(recipients, ["ada@example.com", "bob@example.com"]);
    for (user, address) in [(ada, "ada@example.com"), (bob, "bob@example.com")] {
        let mail = mails.iter().find(|m| m.rcpt_to == address).unwrap();
        assert_token(&db, &mail.token("/verify-email"), user, "verify_email", VERIFY_EMAIL_TTL).await;
    }
    assert_eq!(db.count("email_deliveries").await, 2);
    db.drop().await;
}

#[tokio::test]
async fn competing_workers_mail_each_event_once() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    // Two processes' worth of workers, each with its own SMTP pool, given the same redelivered batch.
    let first = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let second = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let mut batch = Vec::new();
    for i in 0..10 {
        batch.push(db.register(Uuid::new_v4(), &format!("user{i}@example.com"), "Twin").await);
    }

    let (a, b) = tokio::join!(first.handle(&batch), second.handle(&batch));
    a.unwrap();
    b.unwrap();

    assert_eq!(smtp.messages().len(), 10);
    assert_eq!(db.count("email_deliveries").await, 10);
    assert_eq!(db.count("email_tokens").await, 10);
    db.drop().await;
}

/// A Mailbox that refuses `nobody@…` at RCPT like a final mail server with no such user, and
/// every sender when the file `refuse-all` exists (a server-wide refusal, like "relaying denied").
const REFUSING_HANDLER: &str = r#"
import os
from aiosmtpd.handlers import Mailbox

class RefusingMailbox(Mailbox):
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if os.path.exists(os.path.join(os.path.dirname(__file__), "refuse-all")):
            return "550 5.7.1 Relaying denied"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"
"#;

#[tokio::test]
async fn a_refused_recipient_is_dropped_but_a_refusing_server_holds_the_mails() {
    let mut smtp = SmtpServer::start();
    // Swap in the refusing handler (the module must sit on the server's PYTHONPATH: its own dir).
    SmtpServer::module(smtp.dir.path(), "refusing", REFUSING_HANDLER);
    smtp.args = vec!["-c".to_owned(), "refusing.RefusingMailbox".to_owned()];
    smtp.restart();
    let db = TestDb::create().await;
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let ghost = db.register(Uuid::new_v4(), "nobody@example.com", "Ghost").await;
    let real = db.register(Uuid::new_v4(), "real@example.com", "Real").await;

    // The unknown mailbox cannot ever be mailed: it is dropped so later mails still go out.
    worker.handle(&[ghost.clone(), real.clone()]).await.unwrap();
    let recipients: Vec<String> = smtp.messages().into_iter().map(|m| m.rcpt_to).collect();
    assert_eq!(recipients, ["real@example.com"]);
    assert!(db.delivery_kind(ghost.event_id).await.is_none());
    assert_eq!(db.count("email_tokens").await, 1);

    // A refusal of everything is our problem, not the message's: the batch fails and is retried.
    let later = db.register(Uuid::new_v4(), "later@example.com", "Later").await;
    std::fs::write(smtp.dir.path().join("refuse-all"), "").unwrap();
    assert!(worker.handle(std::slice::from_ref(&later)).await.is_err());
    std::fs::remove_file(smtp.dir.path().join("refuse-all")).unwrap();
    worker.handle(std::slice::from_ref(&later)).await.unwrap();
    assert_eq!(smtp.messages().len(), 2);
    db.drop().await;
}

/// A private CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn starttls_and_implicit_tls_verify_the_server_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path());
    let (ca, cert, key) = (ca.display().to_string(), cert.display().to_string(), key.display().to_string());
    let db = TestDb::create().await;

    // aiosmtpd refuses mail before STARTTLS when given a certificate, so a delivery proves the upgrade.
    let starttls = SmtpServer::start_with(&["--tlscert", &cert, "--tlskey", &key, "-c", "aiosmtpd.handlers.Mailbox"]);
    let smtps = SmtpServer::start_with(&["--smtpscert", &cert, "--smtpskey", &key, "-c", "aiosmtpd.handlers.Mailbox"]);
    for (server, mode) in [(&starttls, "starttls"), (&smtps, "tls")] {
        let user = Uuid::new_v4();
        let registered = db.register(user, &format!("{mode}@example.com"), "Tess").await;

        // Without the private CA the certificate is not trusted and nothing is sent.
        let untrusting = EmailWorker::new(db.pool.clone(), server.settings(&[("SMTP_TLS", mode)])).unwrap();
        let refused = untrusting.handle(std::slice::from_ref(&registered)).await;
        assert!(refused.is_err(), "{mode}: an unknown certificate must be refused");

        let trusting =
            EmailWorker::new(db.pool.clone(), server.settings(&[("SMTP_TLS", mode), ("SMTP_TLS_CA_FILE", &ca)]))
                .unwrap();
        trusting.handle(std::slice::from_ref(&registered)).await.unwrap();
        let mails = server.messages();
        assert_eq!(mails.len(), 1, "{mode}: {}", server.log());
        assert_eq!(mails[0].rcpt_to, format!("{mode}@example.com"));
        assert_token(&db, &mails[0].token("/verify-email"), user, "verify_email", VERIFY_EMAIL_TTL).await;
    }

    // Plain SMTP to a server that insists on STARTTLS is refused by the server.
    let plain = EmailWorker::new(db.pool.clone(), starttls.settings(&[])).unwrap();
    let registered = db.register(Uuid::new_v4(), "plain@example.com", "Pat").await;
    assert!(plain.handle(&[registered]).await.is_err());
    db.drop().await;
}

#[tokio::test]
async fn the_durable_consumer_mails_events_published_on_nats() {
    let smtp = SmtpServer::start();
    let db = TestDb::create().await;
    let ns = Namespace::new(&format!("t{}", &Uuid::new_v4().simple().to_string()[..12]));
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let worker = EmailWorker::new(db.pool.clone(), smtp.settings(&[])).unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(worker.run(js.clone(), ns.clone(), 100, 1, shutdown.clone()));

    let user = Uuid::new_v4();
    let registered = db.register(user, "nats@example.com", "Nat").await;
    let reset = db.append(user, 2, "PasswordResetRequested", json!({}), json!({})).await;
    // The stream may not exist until the worker made it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while js.get_stream(ns.events_stream()).await.is_err() {
        assert!(Instant::now() < deadline, "the worker did not create the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The third is a re-publication the stream does not catch as a duplicate (another message id):
    // the worker itself must skip it.
    let republished = format!("again-{}", registered.event_id);
    for (event, msg_id) in [
        (&registered, registered.event_id.to_string()),
        (&reset, reset.event_id.to_string()),
        (&registered, republished),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let subject = ns.event_subject(&event.aggregate_type, &event.event_type);
        js.publish_with_headers(subject, headers, serde_json::to_vec(event).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    while smtp.messages().len() < 2 {
        assert!(Instant::now() < deadline, "mails did not arrive: {}", smtp.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a wrongly repeated delivery the chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    let mails = smtp.messages();
    assert_eq!(mails.len(), 2);
    let welcome = mails.iter().find(|m| m.text.contains("/verify-email?")).unwrap();
    let reset_mail = mails.iter().find(|m| m.text.contains("/reset-password?")).unwrap();
    assert_token(&db, &welcome.token("/verify-email"), user, "verify_email", VERIFY_EMAIL_TTL).await;
    assert_token(&db, &reset_mail.token("/reset-password"), user, "reset_password", RESET_PASSWORD_TTL).await;
    let info = js.get_stream(ns.events_stream()).await.unwrap().consumer_info("worker_email").await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "everything acknowledged");

    js.delete_stream(ns.events_stream()).await.unwrap();
    db.drop().await;
}

/// Advisory locks of the worker's per-event claims ("mail" is their first key), in this database.
async fn claims(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
          WHERE l.locktype = 'advisory' AND l.classid::bigint = 1835100524 AND d.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_send_that_times_out_or_is_abandoned_leaves_no_claim_and_no_open_transaction() {
    // A server that accepts connections and never says a word.
    let silent = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    let db = TestDb::create().await;
    let vars = |timeout: &'static str| {
        let port = port.clone();
        move |k: &str| match k {
            "SMTP_HOST" => Some("127.0.0.1".to_owned()),
            "SMTP_PORT" => Some(port.clone()),
            "SMTP_TIMEOUT_SECS" => Some(timeout.to_owned()),
            "CAIRN_PUBLIC_URL" => Some(PUBLIC_URL.to_owned()),
            _ => None,
        }
    };
    let registered = db.register(Uuid::new_v4(), "silent@example.com", "Sil").await;

    // A send that times out fails the batch as transient, keeps no token and no claim.
    let impatient = EmailWorker::new(db.pool.clone(), EmailSettings::from_lookup(vars("1")).unwrap()).unwrap();
    let failed = impatient.handle(std::slice::from_ref(&registered)).await.unwrap_err();
    assert!(cairn_platform::failure::is_transient(&failed), "{failed:#}");
    assert_eq!(db.count("email_tokens").await, 0);
    assert_eq!(claims(&db).await, 0);

    // A send abandoned mid-way (the task aborted, as at shutdown): while it waits, its claim is
    // held by a connection with no transaction; once aborted, the claim goes with the connection.
    let patient = EmailWorker::new(db.pool.clone(), EmailSettings::from_lookup(vars("600")).unwrap()).unwrap();
    let event = registered.clone();
    let sending = tokio::spawn(async move { patient.handle(std::slice::from_ref(&event)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while claims(&db).await == 0 {
        assert!(Instant::now() < deadline, "the worker never claimed the event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
            AND (backend_xid IS NOT NULL OR state LIKE 'idle in transaction%')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0, "no transaction may be open while the mail is being sent");
    sending.abort();
    assert!(sending.await.unwrap_err().is_cancelled());
    let deadline = Instant::now() + Duration::from_secs(10);
    while claims(&db).await != 0 {
        assert!(Instant::now() < deadline, "the abandoned claim was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(silent);
    db.drop().await;
}
