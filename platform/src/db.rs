//! The Postgres pool: creates the database when missing and runs the migrations.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connects to `url`, creating its database first when it does not exist.
///
/// # Errors
/// When Postgres cannot be reached or the database cannot be created.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url).with_context(|| "DATABASE_URL is not a valid Postgres URL")?;
    // Named, so `pg_stat_activity` (and the relay's warning about what holds it back) says which
    // process a backend serves; an `application_name` in the URL wins.
    if options.get_application_name().is_none() {
        options = options.application_name(&application_name());
    }
    create_database_if_missing(&options).await?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before each use: it is a round trip per acquire, and a broken connection fails
        // its statement and is dropped from the pool anyway.
        .test_before_acquire(false)
        .connect_with(options.log_statements(tracing::log::LevelFilter::Trace))
        .await
        .with_context(|| format!("cannot connect to Postgres at {}", redact(url)))
}

/// Connects and brings the schema up to date.
///
/// # Errors
/// As [`connect`], or when a migration fails.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let pool = connect(url, max_connections).await?;
    MIGRATOR.run(&pool).await.context("database migration failed")?;
    Ok(pool)
}

/// `cairn <role> <pid>`: the role is the subcommand (`serve`, `relay`, …) when this is the `cairn`
/// binary, otherwise the program's name; the OS pid tells processes of one role apart.
#[must_use]
pub fn application_name() -> String {
    let mut args = std::env::args();
    let program = args
        .next()
        .and_then(|p| std::path::Path::new(&p).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let role = match args.next() {
        Some(command) if program == "cairn" && !command.starts_with('-') => command,
        _ => program,
    };
    name_for(&role, std::process::id())
}

/// The application name of a process of `role` with OS pid `pid`: printable ASCII, within
/// Postgres's 63 bytes (longer names are cut by the server, which would lose the pid).
fn name_for(role: &str, pid: u32) -> String {
    let role: String =
        role.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(40).collect();
    format!("cairn {role} {pid}")
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(database) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("cannot connect to Postgres at {}:{}", options.get_host(), options.get_port()))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&database)
        .fetch_one(&mut admin)
        .await?;
    if !exists {
        let quoted = database.replace('"', "\"\"");
        match sqlx::query(&format!("CREATE DATABASE \"{quoted}\"")).execute(&mut admin).await {
            Ok(_) => tracing::info!(database, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("cannot create the database"),
        }
    }
    admin.close().await?;
    Ok(())
}

/// The advisory-lock key of `label` (`cairn-relay:<ns>`, `cairn-projection:<name>`…): FNV-1a,
/// stable across processes and versions, unlike std's hasher, so every process agrees on it.
#[must_use]
pub fn advisory_key(label: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in label.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The URL with any password replaced, for messages.
#[must_use]
pub fn redact(url: &str) -> String {
    match url::parse_password(url) {
        Some((before, after)) => format!("{before}REDACTED{after}"),
        None => url.to_owned(),
    }
}

mod url {
    /// Splits `scheme://user:password@host` around the password.
    pub fn parse_password(url: &str) -> Option<(&str, &str)> {
        let scheme_end = url.find("://")? + 3;
        let at = url[scheme_end..].find('@')? + scheme_end;
        let colon = url[scheme_end..at].find(':')? + scheme_end;
        Some((&url[..=colon], &url[at..]))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn application_names_carry_the_role_and_pid_within_postgres_limit() {
        assert_eq!(super::name_for("relay", 4242), "cairn relay 4242");
        let long = super::name_for(&"x".repeat(200), u32::MAX);
        assert!(long.len() <= 63 && long.ends_with(&u32::MAX.to_string()), "{long}");
        assert_eq!(super::name_for("r\u{e9}lay\n", 1), "cairn rlay 1");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(super::redact("postgres://u:secret@h:5432/d"), "postgres://u:REDACTED@h:5432/d");
        assert_eq!(super::redact("postgres://u@h/d"), "postgres://u@h/d");
    }
}
