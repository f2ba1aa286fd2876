//! Test harness: every test gets its own database, its own NATS namespace and its own keys,
//! and drives the real HTTP API of an [`Application`] bound to port 0.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::{Application, Services};
use cairn_platform::clock::TestClock;
use cairn_platform::Settings;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery staple";

/// Base URLs of the local services, overridable like the real ones.
pub fn pg_base() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub fn nats_base() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The S3-compatible server `.ci/run` installs and starts (s3s-fs), and its test credentials.
pub fn s3_endpoint() -> String {
    std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8014".to_owned())
}

pub fn s3_credentials() -> (String, String) {
    (
        std::env::var("TEST_S3_ACCESS_KEY_ID").unwrap_or_else(|_| "cairn-test".to_owned()),
        std::env::var("TEST_S3_SECRET_ACCESS_KEY").unwrap_or_else(|_| "cairn-test-secret".to_owned()),
    )
}

/// Fails the test (never skips it) when nothing listens at the S3 endpoint.
pub fn require_s3() {
    let endpoint = s3_endpoint();
    let url =
        reqwest::Url::parse(&endpoint).unwrap_or_else(|e| panic!("TEST_S3_ENDPOINT {endpoint:?} is not a URL: {e}"));
    let addrs =
        url.socket_addrs(|| Some(80)).unwrap_or_else(|e| panic!("cannot resolve the S3 endpoint {endpoint}: {e}"));
    let listening = addrs.iter().any(|addr| std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2)).is_ok());
    assert!(
        listening,
        "no S3-compatible server listens at {endpoint}: run .ci/run (it installs and starts s3s-fs), \
         or point TEST_S3_ENDPOINT at one"
    );
}

/// An isolated environment: database, namespace, keys directory.
pub struct TestEnv {
    pub database: String,
    pub database_url: String,
    pub nats_url: String,
    pub namespace: String,
    pub keys: tempfile::TempDir,
    /// Where the email worker sends mail (nothing listens unless a test starts a catcher there).
    pub smtp_port: u16,
    /// The local file store's directory (shared with siblings).
    pub files: Arc<tempfile::TempDir>,
    /// Set by [`TestEnv::with_s3`]: the bucket of this test on the S3 server (files go to S3).
    pub s3_bucket: Option<String>,
}

impl TestEnv {
    pub fn new() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("cairn_test_{}", &id[..12]);
        Self {
            database_url: format!("{}/{database}", pg_base()),
            database,
            nats_url: nats_base(),
            namespace: format!("t{}", &id[..12]),
            keys: tempfile::tempdir().unwrap(),
            smtp_port: free_port(),
            files: Arc::new(tempfile::tempdir().unwrap()),
            s3_bucket: None,
        }
    }

    /// This environment with its files in the S3 store, in a bucket of its own (named from the
    /// namespace; the application creates it, as development does). Fails when no server listens.
    pub fn with_s3(mut self) -> Self {
        require_s3();
        self.s3_bucket = Some(format!("cairn-{}", self.namespace));
        self
    }

    /// The environment variables a cairn process of this test runs with.
    pub fn vars(&self) -> HashMap<String, String> {
        let mut vars = HashMap::from([
            ("DATABASE_URL".to_owned(), self.database_url.clone()),
            ("NATS_URL".to_owned(), self.nats_url.clone()),
            ("CAIRN_NAMESPACE".to_owned(), self.namespace.clone()),
            ("CAIRN_KEYS_DIR".to_owned(), self.keys.path().display().to_string()),
            ("CAIRN_AUDIT_KEYS_DIR".to_owned(), self.keys.path().join("audit").display().to_string()),
            ("CAIRN_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("CAIRN_HASH_CONCURRENCY".to_owned(), "4".to_owned()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            // Tests that are not about rate limits must not trip them (every client is 127.0.0.1).
            ("CAIRN_RATE_LIMIT_AUTH".to_owned(), "1000000/min".to_owned()),
            ("CAIRN_RATE_LIMIT_API".to_owned(), "1000000/min".to_owned()),
            ("CAIRN_RATE_LIMIT_PUBLIC".to_owned(), "1000000/min".to_owned()),
            ("CAIRN_RATE_LIMIT_USER".to_owned(), "1000000/min".to_owned()),
            ("SMTP_HOST".to_owned(), "127.0.0.1".to_owned()),
            ("SMTP_PORT".to_owned(), self.smtp_port.to_string()),
            ("CAIRN_FILES_DIR".to_owned(), self.files.path().display().to_string()),
        ]);
        if let Some(bucket) = &self.s3_bucket {
            let (access_key_id, secret_access_key) = s3_credentials();
            vars.extend([
                ("CAIRN_FILES_STORE".to_owned(), "s3".to_owned()),
                ("S3_ENDPOINT".to_owned(), s3_endpoint()),
                ("S3_BUCKET".to_owned(), bucket.clone()),
                ("S3_ACCESS_KEY_ID".to_owned(), access_key_id),
                ("S3_SECRET_ACCESS_KEY".to_owned(), secret_access_key),
                ("S3_FORCE_PATH_STYLE".to_owned(), "true".to_owned()),
            ]);
        }
        vars
    }

    pub fn settings(&self, extra: &[(&str, &str)]) -> Settings {
        let mut vars = self.vars();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        Settings::from_lookup(|k| vars.get(k).cloned()).unwrap()
    }

    /// The same database, namespace and keys, for a second process beside the first (its
    /// `cleanup` drops them too: clean up once).
    pub fn sibling(&self) -> Self {
        let keys = tempfile::tempdir().unwrap();
        // The token keys, and the audit keys in their subdirectory.
        for entry in std::fs::read_dir(self.keys.path()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(keys.path().join(entry.file_name())).unwrap();
                for inner in std::fs::read_dir(entry.path()).unwrap() {
                    let inner = inner.unwrap();
                    std::fs::copy(inner.path(), keys.path().join(entry.file_name()).join(inner.file_name())).unwrap();
                }
            } else {
                std::fs::copy(entry.path(), keys.path().join(entry.file_name())).unwrap();
            }
        }
        Self {
            database: self.database.clone(),
            database_url: self.database_url.clone(),
            nats_url: self.nats_url.clone(),
            namespace: self.namespace.clone(),
            keys,
            smtp_port: self.smtp_port,
            files: Arc::clone(&self.files),
            s3_bucket: self.s3_bucket.clone(),
        }
    }

    /// A `cairn` child process with this environment.
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.args(args).envs(self.vars());
        cmd
    }

    /// Drops the database and the stream, and empties the S3 bucket (when there is one).
    pub async fn cleanup(&self) {
        if self.s3_bucket.is_some() {
            let settings = self.settings(&[]);
            if let Ok(store) = cairn_storage::FileStore::open(&settings.files, false).await {
                use futures::TryStreamExt;
                let far_future = chrono::Utc::now() + chrono::Duration::days(1);
                if let Ok(objects) = store.list_before(far_future).try_collect::<Vec<_>>().await {
                    for object in objects {
                        let _ = store.delete(&object.key).await;
                    }
                }
            }
        }
        if let Ok(client) = async_nats::connect(&self.nats_url).await {
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(cairn_platform::nats::Namespace::new(&self.namespace).events_stream()).await;
        }
        if let Ok(pool) = PgPool::connect(&format!("{}/postgres", pg_base())).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database))
                .execute(&pool)
                .await;
        }
    }
}

/// A running application and a client for it.
pub struct TestApp {
    pub env: TestEnv,
    pub address: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    pub shutdown: CancellationToken,
    /// The application's clock: tests move time forward with `clock.advance(…)` instead of sleeping.
    pub clock: Arc<TestClock>,
    /// Every (method, path) the application serves.
    pub routes: Vec<(String, String)>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn token(&self) -> String {
        self.body["meta"]["consistency_token"].as_str().unwrap().to_owned()
    }
}

impl TestApp {
    /// Everything in one process (`serve`).
    pub async fn spawn() -> Self {
        Self::spawn_with(TestEnv::new(), Services::all(), &[]).await
    }

    /// Everything in one process, with files in the S3 store (see [`TestEnv::with_s3`]).
    pub async fn spawn_s3() -> Self {
        Self::spawn_with(TestEnv::new().with_s3(), Services::all(), &[]).await
    }

    /// Builds and serves an application on `env` with `extra` settings (the mail settings,
    /// `SMTP_*`, included).
    pub async fn spawn_with(env: TestEnv, services: Services, extra: &[(&str, &str)]) -> Self {
        Self::spawn_full(env, services, extra, cairn_workers::jobs::Registry::new()).await
    }

    /// Everything in one process, with the job handlers of `jobs` beside the shipped kinds.
    pub async fn spawn_with_jobs(env: TestEnv, extra: &[(&str, &str)], jobs: cairn_workers::jobs::Registry) -> Self {
        Self::spawn_full(env, Services::all(), extra, jobs).await
    }

    async fn spawn_full(
        env: TestEnv,
        services: Services,
        extra: &[(&str, &str)],
        jobs: cairn_workers::jobs::Registry,
    ) -> Self {
        quiet_logs();
        let mut vars = env.vars();
        for (k, v) in extra {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let email = cairn_workers::EmailSettings::from_lookup(|k| vars.get(k).cloned()).unwrap();
        let clock = TestClock::new();
        let mut settings = env.settings(extra);
        settings.clock = clock.clone();
        let app = Application::build_with_jobs(settings, Some(email), services, jobs).await.unwrap();
        let address = format!("http://127.0.0.1:{}", app.port());
        let shutdown = app.shutdown_token();
        let routes = app.routes().to_vec();
        let pool = PgPool::connect(&env.database_url).await.unwrap();
        let handle = tokio::spawn(app.run_until_stopped());
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { env, address, client, pool, shutdown, clock, routes, handle: Some(handle) }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
        self.pool.close().await;
        self.env.cleanup().await;
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.address));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, body, headers }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.request("GET", path, token, None, &[]).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.request("POST", path, token, Some(body), &[]).await
    }

    pub async fn register(&self, email: &str) -> Reply {
        self.post(
            "/api/v1/auth/register",
            None,
            json!({ "email": email, "password": PASSWORD, "display_name": email.split('@').next().unwrap() }),
        )
        .await
    }

    /// Registers and returns the user id.
    pub async fn register_ok(&self, email: &str) -> Uuid {
        let reply = self.register(email).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.data()["user_id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn login(&self, email: &str) -> String {
        let reply = self.post("/api/v1/auth/login", None, json!({ "email": email, "password": PASSWORD })).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.data()["access_token"].as_str().unwrap().to_owned()
    }

    /// Creates an admin with the operator binary, as a newcomer would, and signs in.
    pub fn create_admin_process(&self, email: &str) -> Uuid {
        let output = self
            .env
            .command(&["admin", "create-user", "--email", email, "--role", "admin"])
            .env("CAIRN_ADMIN_PASSWORD", PASSWORD)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().parse().unwrap()
    }

    pub async fn admin_token(&self) -> (Uuid, String) {
        let email = format!("admin-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
        let id = self.create_admin_process(&email);
        (id, self.login(&email).await)
    }

    /// Polls `query` (a scalar count) until it equals `expected`, failing after `timeout`.
    pub async fn wait_count(&self, query: &str, expected: i64, timeout: Duration) {
        wait_count(&self.pool, query, expected, timeout).await;
    }
}

pub async fn wait_count(pool: &PgPool, query: &str, expected: i64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar(query).fetch_one(pool).await.unwrap_or(-1);
        if n == expected {
            return;
        }
        assert!(started.elapsed() < timeout, "`{query}` stayed at {n}, expected {expected}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs at `warn` (or `RUST_LOG`) through the test writer, so passing tests stay quiet.
pub fn quiet_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// A `cairn serve` child process, killed if the test ends before it exits.
pub struct Serve {
    pub child: std::process::Child,
    pub base: String,
    log: tempfile::NamedTempFile,
}

impl Serve {
    pub fn start(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = env
            .command(&["serve"])
            .env("CAIRN_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .envs(extra.iter().copied())
            // The logs go to stdout, panics to stderr: both into the log, appended.
            .stdout(append(log.path()))
            .stderr(append(log.path()))
            .spawn()
            .unwrap();
        Self { child, base: format!("http://127.0.0.1:{port}"), log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Ok(resp) = client.get(format!("{}/ready", self.base)).send().await {
                if resp.status() == StatusCode::OK {
                    return;
                }
            }
            assert!(self.child.try_wait().unwrap().is_none(), "cairn serve exited: {}", self.log());
            assert!(started.elapsed() < Duration::from_secs(60), "cairn serve never became ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `path` opened for appending, so that two writers do not overwrite each other.
fn append(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().append(true).open(path).unwrap()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A private nats-server with JetStream, for tests that stop and start the broker.
pub struct PrivateNats {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let mut nats = Self { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None };
        nats.restart();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let child = std::process::Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM, then waits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real SMTP server (Debian's python3-aiosmtpd) delivering into a maildir, on the port the
/// test's cairn sends mail to.
pub struct MailCatcher {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl MailCatcher {
    pub fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
        let child = std::process::Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("maildir"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd must be installed");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(15), "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, child }
    }

    /// (recipient, subject, plain text) of every delivered message.
    pub fn messages(&self) -> Vec<(String, String, String)> {
        let new = self.dir.path().join("maildir").join("new");
        let Ok(entries) = std::fs::read_dir(new) else { return vec![] };
        entries
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .filter_map(|raw| {
                let message = mail_parser::MessageParser::default().parse(&raw)?;
                let to = message.to()?.first()?.address()?.to_owned();
                let subject = message.subject().unwrap_or_default().to_owned();
                let text = message.body_text(0).map(|t| t.into_owned()).unwrap_or_default();
                Some((to, subject, text))
            })
            .collect()
    }

    /// Waits for the `nth` (from 1) message to `to` whose text contains a `token=` link, and returns the token.
    pub async fn token_for(&self, to: &str, link: &str, nth: usize) -> String {
        let started = Instant::now();
        loop {
            let tokens: Vec<String> = self
                .messages()
                .into_iter()
                .filter(|(rcpt, _, _)| rcpt == to)
                .filter_map(|(_, _, text)| {
                    let at = text.find(&format!("/{link}?token="))? + link.len() + 8;
                    Some(
                        text[at..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                            .collect(),
                    )
                })
                .collect();
            if tokens.len() >= nth {
                // Maildir order is not delivery order; with one mail of a kind per step that is enough.
                return tokens[nth - 1].clone();
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no {link} mail for {to}: {:?}", self.messages());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for MailCatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SMTP server that can hold its answer to DATA (see the module).
pub mod stalling_smtp;

/// The first key of the email worker's per-event advisory locks (ASCII "mail"), as `pg_locks`
/// shows it in `classid`.
pub const MAIL_LOCK_CLASS: i64 = 0x6d61_696c;

/// Waits until `condition` holds, polling every 20 ms, failing with `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
