//! One benchmark's private world: its own database (`cairn_bench_<random>`), its own NATS
//! namespace (`bench<random>`), a scratch directory for signing keys and logs, and the way to run
//! the `cairn` binary against them. [`BenchEnv::cleanup`] drops the database and the streams.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::process::Command;

/// Where Postgres listens (a server URL without a database name).
pub fn postgres_server_url() -> String {
    std::env::var("BENCH_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Where NATS listens.
pub fn nats_url() -> String {
    std::env::var("BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A database, a namespace and a scratch directory for one scenario.
pub struct BenchEnv {
    /// The database's name.
    pub database: String,
    /// `DATABASE_URL` of the service.
    pub database_url: String,
    /// `CAIRN_NAMESPACE` of the service.
    pub namespace: String,
    /// The `cairn` binary.
    pub cairn: PathBuf,
    /// A small pool for set-up, seeding and polling.
    pub pool: PgPool,
    /// JetStream, for the broker baselines and clean-up.
    pub jetstream: async_nats::jetstream::Context,
    scratch: tempfile::TempDir,
    extra_streams: std::sync::Mutex<Vec<String>>,
}

impl BenchEnv {
    /// Creates the database, applies cairn's migrations with `cairn migrate`, and connects.
    ///
    /// # Errors
    /// When Postgres or NATS cannot be reached or the migration fails.
    pub async fn create(cairn: &Path) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("cairn_bench_{}", &suffix[..12]);
        let namespace = format!("bench{}", &suffix[..12]);
        let server = postgres_server_url();
        let database_url = format!("{}/{database}", server.trim_end_matches('/'));
        let nats = async_nats::ConnectOptions::new()
            .name("cairn-bench")
            .connect(nats_url())
            .await
            .with_context(|| format!("cannot connect to NATS at {}", nats_url()))?;
        let jetstream = async_nats::jetstream::new(nats);
        let scratch = tempfile::Builder::new().prefix("cairn-bench-").tempdir()?;
        let mut admin = admin_connection().await?;
        sqlx::query(&format!("CREATE DATABASE \"{database}\"")).execute(&mut admin).await?;
        admin.close().await?;
        // From here on a failure must not leave the database behind.
        let connected = PgConnectOptions::from_str(&database_url).map(ConnectOptions::disable_statement_logging);
        let pool = match connected {
            Ok(options) => PgPoolOptions::new().max_connections(8).connect_with(options).await,
            Err(e) => Err(e),
        };
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                drop_database(&database).await;
                return Err(anyhow::Error::from(e).context(format!("cannot connect to {database}")));
            }
        };
        let env = Self {
            database,
            database_url,
            namespace,
            cairn: cairn.to_owned(),
            pool,
            jetstream,
            scratch,
            extra_streams: std::sync::Mutex::new(Vec::new()),
        };
        if let Err(e) = env.run_cairn(&["migrate"], &[]).await {
            env.cleanup().await;
            return Err(e.context("cairn migrate"));
        }
        Ok(env)
    }

    /// The JetStream stream cairn publishes to: `<NAMESPACE>_EVENTS`.
    #[must_use]
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.namespace.to_uppercase())
    }

    /// Remembers a scratch stream to delete at clean-up.
    pub fn track_stream(&self, name: &str) {
        if let Ok(mut streams) = self.extra_streams.lock() {
            streams.push(name.to_owned());
        }
    }

    /// Where the service's signing keys live.
    #[must_use]
    pub fn keys_dir(&self) -> PathBuf {
        self.scratch.path().join("keys")
    }

    /// A scratch file path (service logs and the like).
    #[must_use]
    pub fn scratch_file(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A pool of `connections` to the bench database, for baselines: one round trip per
    /// statement (no ping before each acquire).
    ///
    /// # Errors
    /// When Postgres refuses.
    pub async fn pool_of(&self, connections: u32) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(connections)
            .min_connections(connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(PgConnectOptions::from_str(&self.database_url)?.disable_statement_logging())
            .await
            .context("cannot open the baseline pool")
    }

    /// A `cairn` command with the service's environment.
    #[must_use]
    pub fn cairn_command(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(&self.cairn);
        command
            .args(args)
            .current_dir(self.scratch.path())
            .env("DATABASE_URL", &self.database_url)
            .env("NATS_URL", nats_url())
            .env("CAIRN_NAMESPACE", &self.namespace)
            .env("CAIRN_KEYS_DIR", self.keys_dir())
            .env("CAIRN_AUDIT_KEYS_DIR", self.keys_dir().join("audit"))
            .env("CAIRN_ENV", "development")
            .env("RUST_LOG", std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()))
            // The bench is one client address sending thousands of requests a second: per-IP
            // and per-user limits would measure the limiter, not the service.
            .env("CAIRN_RATE_LIMIT_AUTH", "off")
            .env("CAIRN_RATE_LIMIT_PUBLIC", "off")
            .env("CAIRN_RATE_LIMIT_API", "off")
            .env("CAIRN_RATE_LIMIT_USER", "off")
            .stdin(Stdio::null());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        command
    }

    /// Runs `cairn <args>` to completion and returns its standard output.
    ///
    /// # Errors
    /// When it cannot start or exits unsuccessfully (its standard error is in the message).
    pub async fn run_cairn(&self, args: &[&str], extra_env: &[(&str, &str)]) -> anyhow::Result<String> {
        let output = self
            .cairn_command(args, extra_env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .with_context(|| format!("cannot run {}", self.cairn.display()))?;
        if !output.status.success() {
            bail!(
                "cairn {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Drops the database (closing whatever is still connected) and deletes the streams.
    pub async fn cleanup(self) {
        self.pool.close().await;
        let mut streams = vec![self.events_stream()];
        if let Ok(extra) = self.extra_streams.lock() {
            streams.extend(extra.iter().cloned());
        }
        for stream in streams {
            // A stream that was never created is fine.
            let _ = self.jetstream.delete_stream(&stream).await;
        }
        drop_database(&self.database).await;
    }
}

/// Drops `database`, closing whatever is still connected to it; failures are only reported.
async fn drop_database(database: &str) {
    match admin_connection().await {
        Ok(mut admin) => {
            let dropped =
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).execute(&mut admin).await;
            if let Err(e) = dropped {
                crate::report::note(&format!("could not drop database {database}: {e}"));
            }
            let _ = admin.close().await;
        }
        Err(e) => crate::report::note(&format!("could not drop database {database}: {e:#}")),
    }
}

/// A connection to the `postgres` maintenance database.
async fn admin_connection() -> anyhow::Result<sqlx::PgConnection> {
    let url = format!("{}/postgres", postgres_server_url().trim_end_matches('/'));
    PgConnectOptions::from_str(&url)?
        .disable_statement_logging()
        .connect()
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", postgres_server_url()))
}
