//! Starting and stopping the private PostgreSQL and NATS servers.
//!
//! `starts_private_servers_when_nothing_answers` needs the PostgreSQL server
//! binaries (`initdb`, `pg_ctl`, `postgres`), `psql` and `nats-server`; where one is
//! missing it fails, naming it (`.ci/run` installs them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_embedded::{EmbeddedOptions, EmbeddedServices};
use tokio::net::TcpStream;

/// A port on 127.0.0.1 where nothing listens.
fn unused_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// The port of a `scheme://host:port[/path]` URL.
fn port_of(url: &str) -> Result<u16> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let (_, port) = authority.rsplit_once(':').with_context(|| format!("no port in {url}"))?;
    Ok(port.parse()?)
}

/// Whether 127.0.0.1:`port` accepts a TCP connection.
async fn accepts(port: u16) -> bool {
    let connect = TcpStream::connect(("127.0.0.1", port));
    matches!(tokio::time::timeout(Duration::from_secs(1), connect).await, Ok(Ok(_)))
}

/// A temporary data dir that the `postgres` user can use when the tests run as root.
fn world_accessible_tempdir() -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// `psql`, from PATH or the versioned PostgreSQL install directories.
fn find_psql() -> Option<PathBuf> {
    let path_dirs =
        std::env::var_os("PATH").map(|path| std::env::split_paths(&path).collect::<Vec<_>>()).unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versioned.sort();
    versioned.reverse();
    path_dirs.into_iter().chain(versioned).map(|dir| dir.join("psql")).find(|path| path.is_file())
}

/// `psql <url> -c 'select 1'` prints 1.
async fn select_one(psql: &PathBuf, url: &str) -> Result<()> {
    let output = tokio::process::Command::new(psql)
        .arg(url)
        .args(["-X", "-tA", "-c", "select 1"])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .await
        .context("could not run psql")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || stdout.trim() != "1" {
        bail!(
            "psql {url} -c 'select 1' failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn starts_private_servers_when_nothing_answers() -> Result<()> {
    let data = world_accessible_tempdir()?;
    let configured_pg = unused_port()?;
    let configured_nats = unused_port()?;
    let opts = EmbeddedOptions {
        data_dir: data.path().to_path_buf(),
        database_url: format!("postgres://cairn:secret@127.0.0.1:{configured_pg}/postgres"),
        nats_url: format!("nats://127.0.0.1:{configured_nats}"),
    };

    let psql = find_psql().context(
        "psql was not found in PATH or /usr/lib/postgresql/*/bin: install the PostgreSQL client (Debian: postgresql-client)",
    )?;
    // A missing initdb, pg_ctl or nats-server fails here with the error that names it.
    let mut services = EmbeddedServices::start(opts.clone()).await?;

    let pg_port = port_of(services.database_url())?;
    let nats_port = port_of(services.nats_url())?;
    assert_eq!(services.database_url(), format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"));
    assert_eq!(services.nats_url(), format!("nats://127.0.0.1:{nats_port}"));
    assert_ne!(pg_port, configured_pg);
    assert_ne!(nats_port, configured_nats);
    assert!(data.path().join("postgres/PG_VERSION").is_file());
    assert!(data.path().join("nats").is_dir());

    assert!(accepts(pg_port).await, "PostgreSQL does not accept connections");
    assert!(accepts(nats_port).await, "nats-server does not accept connections");
    select_one(&psql, services.database_url()).await?;

    services.stop().await?;
    assert!(!accepts(pg_port).await, "PostgreSQL still accepts connections");
    assert!(!accepts(nats_port).await, "nats-server still accepts connections");
    // Stopping again does nothing.
    services.stop().await?;

    // A second start reuses the cluster; dropping stops both servers.
    let services = EmbeddedServices::start(opts).await?;
    let pg_port = port_of(services.database_url())?;
    let nats_port = port_of(services.nats_url())?;
    select_one(&psql, services.database_url()).await?;
    assert!(accepts(nats_port).await, "nats-server does not accept connections");
    drop(services);
    assert!(!accepts(pg_port).await, "PostgreSQL still accepts connections after drop");
    assert!(!accepts(nats_port).await, "nats-server still accepts connections after drop");
    Ok(())
}

#[tokio::test]
async fn uses_servers_that_already_answer() -> Result<()> {
    let data = tempfile::tempdir()?;
    let pg = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let nats = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let database_url = format!("postgres://cairn:secret@127.0.0.1:{}/app?sslmode=disable", pg.local_addr()?.port());
    let nats_url = format!("nats://127.0.0.1:{}", nats.local_addr()?.port());

    let mut services = EmbeddedServices::start(EmbeddedOptions {
        data_dir: data.path().to_path_buf(),
        database_url: database_url.clone(),
        nats_url: nats_url.clone(),
    })
    .await?;

    assert_eq!(services.database_url(), database_url);
    assert_eq!(services.nats_url(), nats_url);
    assert!(!data.path().join("postgres").exists());
    assert!(!data.path().join("nats").exists());
    services.stop().await?;
    Ok(())
}
