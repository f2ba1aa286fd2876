//! Private PostgreSQL and NATS servers for `cairn serve --embedded`.
//!
//! [`EmbeddedServices::start`] probes the configured database and NATS
//! addresses. For each one where nothing answers, it starts a private server
//! under the data directory, listening on a free port on `127.0.0.1`:
//!
//! * PostgreSQL: a cluster in `<data_dir>/postgres`, created with `initdb` on
//!   first use and run with `pg_ctl`. Its log is `<data_dir>/postgres/server.log`.
//!   PostgreSQL will not run as root, so when cairn runs as root the server
//!   runs as the `postgres` system user through `runuser`.
//! * NATS: `nats-server -js` as a child process, with its JetStream store in
//!   `<data_dir>/nats`.
//!
//! [`EmbeddedServices::database_url`] and [`EmbeddedServices::nats_url`] give
//! the addresses to connect to, whether they are the configured ones or the
//! private servers. [`EmbeddedServices::stop`] stops whatever was started.
//! Dropping the value also stops it, as a best effort.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// How long a probe of a configured address may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `nats-server` may take to accept connections.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `nats-server` may take to exit after SIGTERM.
const NATS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a synchronous stop (from `Drop`) waits for `nats-server`.
const NATS_DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How many free ports are tried when one is taken between choosing and binding it.
const PORT_ATTEMPTS: usize = 3;
/// How many lines of `nats-server` output are kept for error messages.
const NATS_LOG_LINES: usize = 40;
/// How many lines of the PostgreSQL log are quoted in error messages.
const PG_LOG_LINES: usize = 20;

/// Default port of a PostgreSQL URL without one.
const PG_DEFAULT_PORT: u16 = 5432;
/// Default port of a NATS URL without one.
const NATS_DEFAULT_PORT: u16 = 4222;
/// Database named in the returned URL when the configured URL names none.
const DEFAULT_DATABASE: &str = "cairn";
/// Superuser of the private cluster, and the system user it runs as under root.
const PG_USER: &str = "postgres";
/// Longest socket directory that leaves room for `/.s.PGSQL.<port>` in a
/// Unix socket path (104 bytes on macOS, 108 on Linux, including the NUL).
const MAX_SOCKET_DIR_LEN: usize = 88;

/// The PostgreSQL programs a private cluster needs, all from one directory.
const PG_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// Advice shared by the "binaries not found" errors.
const COMPOSE_HINT: &str = "or start the services with `docker compose up -d postgres nats`";

/// What serve --embedded needs to know.
#[derive(Clone)]
pub struct EmbeddedOptions {
    /// Directory that holds the private servers' data (`postgres/` and `nats/` below it).
    pub data_dir: PathBuf,
    /// The configured PostgreSQL URL (`DATABASE_URL`).
    pub database_url: String,
    /// The configured NATS URL (`NATS_URL`); may list several servers separated by commas.
    pub nats_url: String,
}

impl std::fmt::Debug for EmbeddedOptions {
    // The URLs may carry passwords, so only the data directory is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedOptions").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

/// The services it started (either may be None when the configured address already answered).
pub struct EmbeddedServices {
    database_url: String,
    nats_url: String,
    postgres: Option<Postgres>,
    nats: Option<Nats>,
}

impl std::fmt::Debug for EmbeddedServices {
    // The URLs may carry passwords, so only what was started is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedServices")
            .field("postgres", &self.postgres.as_ref().map(|pg| pg.port))
            .field("nats", &self.nats.as_ref().map(|nats| nats.port))
            .finish_non_exhaustive()
    }
}

impl EmbeddedServices {
    /// Probe `database_url` and `nats_url` (TCP connect to host:port, 1 s timeout); for each that does not answer,
    /// start a private one under `data_dir` (`data_dir/postgres`, `data_dir/nats`) on a free 127.0.0.1 port and
    /// return the URLs to use. Errors name exactly what is missing and how to get it.
    pub async fn start(opts: EmbeddedOptions) -> Result<Self> {
        let pg_endpoints = parse_endpoints(&opts.database_url, PG_DEFAULT_PORT)
            .context("DATABASE_URL is not a valid PostgreSQL URL")?;
        let nats_endpoints =
            parse_endpoints(&opts.nats_url, NATS_DEFAULT_PORT).context("NATS_URL is not a valid NATS URL")?;

        let pg_answers = any_answers(&pg_endpoints).await;
        let nats_answers = any_answers(&nats_endpoints).await;
        if pg_answers {
            tracing::info!(address = %list(&pg_endpoints), "PostgreSQL answers; using it");
        }
        if nats_answers {
            tracing::info!(address = %list(&nats_endpoints), "NATS answers; using it");
        }

        // Find every program needed before starting anything, so that one
        // error can name everything that is missing.
        let mut missing = Vec::new();
        let pg_bin = if pg_answers {
            None
        } else {
            match postgres_bin_dir() {
                Some(dir) => Some(dir),
                None => {
                    missing.push(format!(
                        "nothing answers at {} (DATABASE_URL) and the PostgreSQL server binaries \
                         ({}) were not found in PATH or /usr/lib/postgresql/*/bin: install them \
                         (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql@16) \
                         {COMPOSE_HINT}, or point DATABASE_URL at a running server",
                        list(&pg_endpoints),
                        PG_PROGRAMS.join(", "),
                    ));
                    None
                }
            }
        };
        let nats_bin = if nats_answers {
            None
        } else {
            match find_nats_server() {
                Some(path) => Some(path),
                None => {
                    missing.push(format!(
                        "nothing answers at {} (NATS_URL) and nats-server was not found in PATH \
                         or /usr/sbin: install it (Debian/Ubuntu: apt-get install nats-server; \
                         macOS: brew install nats-server) {COMPOSE_HINT}, or point NATS_URL at a \
                         running server",
                        list(&nats_endpoints),
                    ));
                    None
                }
            }
        };
        if !missing.is_empty() {
            bail!("{}", missing.join("\n"));
        }

        let data_dir = std::path::absolute(&opts.data_dir)
            .with_context(|| format!("invalid data dir {}", opts.data_dir.display()))?;

        let mut services = Self {
            database_url: opts.database_url.clone(),
            nats_url: opts.nats_url.clone(),
            postgres: None,
            nats: None,
        };

        if let Some(bin_dir) = pg_bin {
            let run_as = RunAs::detect().await?;
            let pg = Postgres::start(bin_dir, run_as, data_dir.join("postgres")).await?;
            services.database_url =
                format!("postgres://{PG_USER}@127.0.0.1:{}/{}", pg.port, database_name(&opts.database_url));
            services.postgres = Some(pg);
        }

        if let Some(program) = nats_bin {
            match Nats::start(&program, &data_dir.join("nats")).await {
                Ok(nats) => {
                    services.nats_url = format!("nats://127.0.0.1:{}", nats.port);
                    services.nats = Some(nats);
                }
                Err(err) => {
                    if let Err(stop_err) = services.stop().await {
                        tracing::warn!(error = %format!("{stop_err:#}"), "could not stop the private PostgreSQL server");
                    }
                    return Err(err);
                }
            }
        }

        Ok(services)
    }

    /// The PostgreSQL URL to connect to: the configured one, or the private server's.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The NATS URL to connect to: the configured one, or the private server's.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// Stop whatever was started (pg_ctl stop -m fast; SIGTERM to nats-server then wait), idempotent.
    pub async fn stop(&mut self) -> Result<()> {
        let nats = match self.nats.take() {
            Some(nats) => nats.stop().await,
            None => Ok(()),
        };
        let pg = match self.postgres.take() {
            Some(pg) => pg.stop().await,
            None => Ok(()),
        };
        match (nats, pg) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
            (Err(nats), Err(pg)) => Err(anyhow!("{nats:#}; {pg:#}")),
        }
    }
}

impl Drop for EmbeddedServices {
    fn drop(&mut self) {
        if let Some(nats) = self.nats.take() {
            nats.stop_blocking();
        }
        if let Some(pg) = self.postgres.take() {
            pg.stop_blocking();
        }
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------

/// A private PostgreSQL server started with `pg_ctl`.
struct Postgres {
    pg_ctl: PathBuf,
    run_as: RunAs,
    dir: PathBuf,
    port: u16,
}

impl Postgres {
    /// Create the cluster in `dir` if needed and start it on a free port.
    async fn start(bin_dir: PathBuf, run_as: RunAs, dir: PathBuf) -> Result<Self> {
        let initdb = bin_dir.join("initdb");
        let pg_ctl = bin_dir.join("pg_ctl");

        tokio::fs::create_dir_all(&dir).await.with_context(|| format!("could not create {}", dir.display()))?;
        if let RunAs::User { .. } = run_as {
            run(plain_command("chown").arg("-R").arg(PG_USER).arg(&dir), "chown")
                .await
                .with_context(|| format!("could not hand {} to the `{PG_USER}` user", dir.display()))?;
            let writable = run_as
                .command(Path::new("test"), &dir)
                .arg("-w")
                .arg(&dir)
                .arg("-a")
                .arg("-x")
                .arg(&dir)
                .stdin(Stdio::null())
                .status()
                .await
                .context("could not run `test` as the postgres user")?;
            if !writable.success() {
                bail!(
                    "running as root, so PostgreSQL runs as the `{PG_USER}` user, which cannot \
                     write to {}: make the data dir and every directory above it accessible to \
                     that user (chmod o+x), choose another data dir, or run cairn as a non-root user",
                    dir.display()
                );
            }
        }

        if !dir.join("PG_VERSION").exists() {
            init_cluster(&initdb, &run_as, &dir).await?;
        }

        let pg = |port| Self { pg_ctl: pg_ctl.clone(), run_as: run_as.clone(), dir: dir.clone(), port };

        // A server left running by an earlier run that did not stop it would
        // hold the data dir: stop it so this one can start.
        if pg(0).is_running().await {
            tracing::info!(data_dir = %dir.display(), "stopping a PostgreSQL server left running on the data dir");
            pg(0).stop().await?;
        }

        let log = dir.join("server.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let log_start = tokio::fs::metadata(&log).await.map(|m| m.len()).unwrap_or(0);
            let socket_dir = if dir.as_os_str().len() <= MAX_SOCKET_DIR_LEN {
                shell_quote(&dir.to_string_lossy())
            } else {
                // Too long for a Unix socket path: TCP only.
                "''".to_owned()
            };
            let server_opts = format!("-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1");
            let output = run_as
                .command(&pg_ctl, &dir)
                .arg("-D")
                .arg(&dir)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(&server_opts)
                .arg("-t")
                .arg(PG_CTL_TIMEOUT_SECS)
                .arg("-w")
                .arg("start")
                .stdin(Stdio::null())
                .output()
                .await
                .with_context(|| format!("could not run {}", pg_ctl.display()))?;
            if output.status.success() {
                tracing::info!(
                    data_dir = %dir.display(),
                    port,
                    log = %log.display(),
                    "started a private PostgreSQL server"
                );
                return Ok(pg(port));
            }
            let log_tail = read_log_since(&log, log_start, PG_LOG_LINES).await;
            if attempt < PORT_ATTEMPTS && log_tail.contains("already in use") {
                tracing::debug!(port, "port was taken before PostgreSQL could bind it; trying another");
                continue;
            }
            bail!(
                "pg_ctl could not start PostgreSQL in {} ({}): {}\n{}",
                dir.display(),
                output.status,
                output_text(&output),
                if log_tail.is_empty() {
                    format!("(nothing in {})", log.display())
                } else {
                    format!("{}:\n{log_tail}", log.display())
                }
            );
        }
    }

    /// Whether a server is running on the data dir (`pg_ctl status`).
    async fn is_running(&self) -> bool {
        self.run_as
            .command(&self.pg_ctl, &self.dir)
            .arg("-D")
            .arg(&self.dir)
            .arg("status")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|status| status.success())
    }

    /// Stop the server (`pg_ctl stop -m fast`); succeeds when it is not running.
    async fn stop(self) -> Result<()> {
        let output = self
            .run_as
            .command(&self.pg_ctl, &self.dir)
            .args(self.stop_args())
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("could not run {}", self.pg_ctl.display()))?;
        if output.status.success() {
            tracing::info!(data_dir = %self.dir.display(), "stopped the private PostgreSQL server");
            return Ok(());
        }
        if !self.is_running().await {
            return Ok(());
        }
        bail!(
            "pg_ctl could not stop PostgreSQL in {} ({}): {}",
            self.dir.display(),
            output.status,
            output_text(&output)
        )
    }

    /// Stop the server without an async runtime, logging failures.
    fn stop_blocking(self) {
        let (program, args) = self.run_as.argv(&self.pg_ctl);
        let result = std::process::Command::new(program)
            .args(args)
            .args(self.stop_args())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output();
        match result {
            Ok(output) if output.status.success() => {
                tracing::info!(data_dir = %self.dir.display(), "stopped the private PostgreSQL server");
            }
            Ok(output) => tracing::warn!(
                data_dir = %self.dir.display(),
                "pg_ctl stop failed ({}): {}",
                output.status,
                output_text(&output)
            ),
            Err(err) => tracing::warn!(
                data_dir = %self.dir.display(),
                "could not run {}: {err}",
                self.pg_ctl.display()
            ),
        }
    }

    /// Arguments of `pg_ctl` that stop the server.
    fn stop_args(&self) -> Vec<OsString> {
        vec![
            "-D".into(),
            self.dir.clone().into_os_string(),
            "-m".into(),
            "fast".into(),
            "-t".into(),
            PG_CTL_TIMEOUT_SECS.into(),
            "-w".into(),
            "stop".into(),
        ]
    }
}

/// Run `initdb` on `dir`, with the options this `initdb` supports.
async fn init_cluster(initdb: &Path, run_as: &RunAs, dir: &Path) -> Result<()> {
    let help = run(run_as.command(initdb, dir).arg("--help"), &format!("{} --help", initdb.display())).await?;
    let help = String::from_utf8_lossy(&help.stdout);

    let mut cmd = run_as.command(initdb, dir);
    cmd.arg("-D").arg(dir).arg("-U").arg(PG_USER).arg("--auth=trust").arg("-E").arg("UTF8");
    // The C locale works everywhere, whatever locales the host has installed.
    if help.contains("--no-locale") {
        cmd.arg("--no-locale");
    }
    if help.contains("--no-instructions") {
        cmd.arg("--no-instructions");
    }
    run(&mut cmd, "initdb")
        .await
        .with_context(|| format!("could not create a PostgreSQL cluster in {}", dir.display()))?;
    tracing::info!(data_dir = %dir.display(), "created a PostgreSQL cluster");
    Ok(())
}

/// The last `lines` lines written to `log` after byte `start`.
async fn read_log_since(log: &Path, start: u64, lines: usize) -> String {
    let Ok(bytes) = tokio::fs::read(log).await else {
        return String::new();
    };
    let start = usize::try_from(start).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    tail(text.lines(), lines)
}

/// Who runs the PostgreSQL programs.
#[derive(Clone, Debug)]
enum RunAs {
    /// The current user, which is not root.
    Current,
    /// The `postgres` system user, through `runuser`, because the current user is root.
    User { runuser: PathBuf },
}

impl RunAs {
    /// Decide from the effective uid (`id -u`).
    async fn detect() -> Result<Self> {
        if !effective_uid_is_root().await? {
            return Ok(Self::Current);
        }
        let user_exists = plain_command("id")
            .arg("-u")
            .arg(PG_USER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        let user_exists = match user_exists {
            Ok(status) => status.success(),
            // No `id` to ask: look in the local user database.
            Err(_) => tokio::fs::read_to_string("/etc/passwd")
                .await
                .is_ok_and(|passwd| passwd.lines().any(|line| line.split(':').next() == Some(PG_USER))),
        };
        if !user_exists {
            bail!(
                "running as root: PostgreSQL refuses to run as root and there is no `{PG_USER}` \
                 user to run it as: create an unprivileged user (e.g. useradd --system {PG_USER}) \
                 or run cairn as a non-root user"
            );
        }
        let runuser = find_program("runuser", &["/usr/sbin", "/sbin"]).ok_or_else(|| {
            anyhow!(
                "running as root: PostgreSQL refuses to run as root and `runuser` (util-linux) \
                 was not found to run it as the `{PG_USER}` user: install util-linux or run cairn \
                 as a non-root user"
            )
        })?;
        Ok(Self::User { runuser })
    }

    /// Program and leading arguments that run `program` as this user.
    fn argv(&self, program: &Path) -> (OsString, Vec<OsString>) {
        match self {
            Self::Current => (program.as_os_str().to_owned(), Vec::new()),
            Self::User { runuser } => (
                runuser.as_os_str().to_owned(),
                vec!["-u".into(), PG_USER.into(), "--".into(), program.as_os_str().to_owned()],
            ),
        }
    }

    /// A command that runs `program` as this user, in `cwd`.
    ///
    /// The working directory matters under `runuser`: the `postgres` user may
    /// not be allowed into the caller's.
    fn command(&self, program: &Path, cwd: &Path) -> Command {
        let (program, args) = self.argv(program);
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(cwd);
        cmd
    }
}

/// Whether the effective uid is 0: `id -u`, or `/proc/self/status` where `id` cannot be run.
async fn effective_uid_is_root() -> Result<bool> {
    let id_error = match plain_command("id").arg("-u").stdin(Stdio::null()).output().await {
        Ok(output) if output.status.success() => {
            return Ok(String::from_utf8_lossy(&output.stdout).trim() == "0");
        }
        Ok(output) => format!("`id -u` failed ({}): {}", output.status, output_text(&output)),
        Err(err) => format!("could not run `id -u`: {err}"),
    };
    // "Uid:\t<real>\t<effective>\t<saved>\t<filesystem>"
    let status = tokio::fs::read_to_string("/proc/self/status").await.ok();
    let effective = status.as_deref().and_then(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            .map(str::to_owned)
    });
    match effective {
        Some(uid) => Ok(uid == "0"),
        None => {
            bail!("could not tell whether cairn runs as root, which PostgreSQL refuses: {id_error}")
        }
    }
}

// ---------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------

/// Last lines `nats-server` wrote, shared with the task that reads them.
type LogTail = Arc<Mutex<VecDeque<String>>>;

/// A private `nats-server` child process.
struct Nats {
    child: Child,
    port: u16,
    log: LogTail,
    reader: JoinHandle<()>,
}

impl Nats {
    /// Start `nats-server -js` with its store in `store_dir`, on a free port.
    async fn start(program: &Path, store_dir: &Path) -> Result<Self> {
        tokio::fs::create_dir_all(store_dir)
            .await
            .with_context(|| format!("could not create {}", store_dir.display()))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(program, store_dir).await? {
                Ok(nats) => {
                    tracing::info!(
                        store_dir = %store_dir.display(),
                        port = nats.port,
                        "started a private nats-server"
                    );
                    return Ok(nats);
                }
                Err(err) if attempt < PORT_ATTEMPTS && format!("{err:#}").contains("in use") => {
                    tracing::debug!("port was taken before nats-server could bind it; trying another");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// One attempt on one free port. The inner error is a failed start.
    async fn try_start(program: &Path, store_dir: &Path) -> Result<Result<Self>> {
        let port = free_port()?;
        let mut child = Command::new(program)
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("could not run {}", program.display()))?;

        let log = LogTail::default();
        let reader = match child.stderr.take() {
            Some(stderr) => {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let mut lines = BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!(target: "nats_server", "{line}");
                        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                        if log.len() == NATS_LOG_LINES {
                            log.pop_front();
                        }
                        log.push_back(line);
                    }
                })
            }
            None => tokio::spawn(async {}),
        };
        let mut nats = Self { child, port, log, reader };

        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            if let Some(status) = nats.child.try_wait().context("could not check nats-server")? {
                return Ok(Err(nats.exited_early(status).await));
            }
            let connect = TcpStream::connect(("127.0.0.1", port));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(250), connect).await {
                return Ok(Ok(nats));
            }
            if Instant::now() >= deadline {
                let log = match nats.log_text() {
                    log if log.is_empty() => "(no output)".to_owned(),
                    log => log,
                };
                if let Err(err) = nats.stop().await {
                    tracing::warn!(error = %format!("{err:#}"), "could not stop nats-server");
                }
                return Ok(Err(anyhow!(
                    "nats-server did not accept connections on 127.0.0.1:{port} within {} s:\n{log}",
                    NATS_READY_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The error for a `nats-server` that exited during start-up.
    async fn exited_early(self, status: ExitStatus) -> anyhow::Error {
        // Its output ends with the exit; let the reader catch up.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.reader).await;
        let log = {
            let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
            tail(log.iter().map(String::as_str), NATS_LOG_LINES)
        };
        let log = if log.is_empty() { "(no output)".to_owned() } else { log };
        anyhow!("nats-server exited during start-up ({status}):\n{log}")
    }

    /// The output kept so far, for error messages.
    fn log_text(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        tail(log.iter().map(String::as_str), NATS_LOG_LINES)
    }

    /// SIGTERM, then wait for the exit (SIGKILL after a timeout).
    async fn stop(mut self) -> Result<()> {
        if self.child.try_wait().context("could not check nats-server")?.is_some() {
            return Ok(());
        }
        if let Some(pid) = self.child.id() {
            let term = plain_command("kill").arg("-TERM").arg(pid.to_string()).stdin(Stdio::null()).output().await;
            if let Err(err) = term {
                tracing::warn!("could not run kill: {err}");
            }
        }
        match tokio::time::timeout(NATS_STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                status.context("could not wait for nats-server")?;
            }
            Err(_) => {
                tracing::warn!(
                    "nats-server did not exit within {} s of SIGTERM; killing it",
                    NATS_STOP_TIMEOUT.as_secs()
                );
                self.child.kill().await.context("could not kill nats-server")?;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.reader).await;
        tracing::info!(port = self.port, "stopped the private nats-server");
        Ok(())
    }

    /// SIGTERM and a bounded wait without an async runtime; SIGKILL if it is still running.
    fn stop_blocking(mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Some(pid) = self.child.id() {
            let term = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if term.is_ok() {
                let deadline = Instant::now() + NATS_DROP_TIMEOUT;
                while Instant::now() < deadline {
                    if !matches!(self.child.try_wait(), Ok(None)) {
                        tracing::info!(port = self.port, "stopped the private nats-server");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if let Err(err) = self.child.start_kill() {
            tracing::warn!("could not kill nats-server: {err}");
        }
    }
}

// ---------------------------------------------------------------------------
// Finding programs
// ---------------------------------------------------------------------------

/// The first directory holding all of [`PG_PROGRAMS`]: PATH, then the
/// versioned install directories, highest version first.
fn postgres_bin_dir() -> Option<PathBuf> {
    let path_dirs =
        std::env::var_os("PATH").map(|path| std::env::split_paths(&path).collect::<Vec<_>>()).unwrap_or_default();
    let versioned = versioned_dirs(Path::new("/usr/lib/postgresql"), "")
        .into_iter()
        .chain(versioned_dirs(Path::new("/opt/homebrew/opt"), "postgresql@"))
        .chain(versioned_dirs(Path::new("/usr/local/opt"), "postgresql@"))
        .map(|dir| dir.join("bin"));
    path_dirs.into_iter().chain(versioned).find(|dir| PG_PROGRAMS.iter().all(|name| is_executable(&dir.join(name))))
}

/// Entries of `parent` named `<prefix><version>`, highest version first.
fn versioned_dirs(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut dirs: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = parse_version(name.strip_prefix(prefix)?)?;
            Some((version, entry.path()))
        })
        .collect();
    dirs.sort_by(|a, b| b.0.cmp(&a.0));
    dirs.into_iter().map(|(_, dir)| dir).collect()
}

/// `"16"` → `[16]`, `"9.6"` → `[9, 6]`; anything else is not a version.
fn parse_version(text: &str) -> Option<Vec<u64>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// `nats-server` in PATH or `/usr/sbin`.
fn find_nats_server() -> Option<PathBuf> {
    find_program("nats-server", &["/usr/sbin"])
}

/// `name` in PATH, then in `extra_dirs`.
fn find_program(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path_dirs =
        std::env::var_os("PATH").map(|path| std::env::split_paths(&path).collect::<Vec<_>>()).unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

/// Whether `path` is a file someone may execute.
fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).is_ok_and(|meta| meta.is_file())
    }
}

/// A command for a system utility, run as the current user.
fn plain_command(program: &str) -> Command {
    Command::new(program)
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// A host and port taken from a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// Host name or IP address, without IPv6 brackets.
    host: String,
    port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The servers a URL names; a NATS URL may list several, separated by commas.
fn parse_endpoints(url: &str, default_port: u16) -> Result<Vec<Endpoint>> {
    let endpoints = url
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| parse_endpoint(part, default_port))
        .collect::<Result<Vec<_>>>()?;
    if endpoints.is_empty() {
        bail!("the URL is empty");
    }
    Ok(endpoints)
}

/// Host and port of `scheme://[user[:password]@]host[:port][/path][?query]`.
fn parse_endpoint(url: &str, default_port: u16) -> Result<Endpoint> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);

    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (host, after) =
            bracketed.split_once(']').ok_or_else(|| anyhow!("unclosed `[` in the host of {host_port:?}"))?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(|| anyhow!("unexpected {after:?} after the host"))?),
        };
        (host, port)
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    let port = match port {
        None | Some("") => default_port,
        Some(port) => port.parse().with_context(|| format!("invalid port {port:?}"))?,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    Ok(Endpoint { host: host.to_owned(), port })
}

/// The database a PostgreSQL URL names, or [`DEFAULT_DATABASE`].
fn database_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let name = match rest.find(['/', '?', '#']) {
        Some(start) if rest[start..].starts_with('/') => rest[start + 1..].split(['?', '#']).next().unwrap_or_default(),
        _ => "",
    };
    if name.is_empty() {
        DEFAULT_DATABASE.to_owned()
    } else {
        name.to_owned()
    }
}

/// Whether any of `endpoints` accepts a TCP connection within [`PROBE_TIMEOUT`].
async fn any_answers(endpoints: &[Endpoint]) -> bool {
    for endpoint in endpoints {
        let connect = TcpStream::connect(endpoint.to_string());
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, connect).await {
            return true;
        }
    }
    false
}

/// `endpoints` for messages.
fn list(endpoints: &[Endpoint]) -> String {
    endpoints.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("could not find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// Processes and text
// ---------------------------------------------------------------------------

/// Run `cmd` to completion; a non-zero exit is an error quoting its output.
async fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let output = cmd.stdin(Stdio::null()).output().await.with_context(|| format!("could not run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed ({}): {}", output.status, output_text(&output));
    }
    Ok(output)
}

/// stderr and stdout of a finished command, trimmed.
fn output_text(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let text =
        [stderr.trim(), stdout.trim()].into_iter().filter(|part| !part.is_empty()).collect::<Vec<_>>().join("\n");
    if text.is_empty() {
        "(no output)".to_owned()
    } else {
        text
    }
}

/// The last `count` of `lines`, joined.
fn tail<'a>(lines: impl Iterator<Item = &'a str>, count: usize) -> String {
    let lines: Vec<&str> = lines.collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// `text` as one single-quoted shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, port: u16) -> Endpoint {
        Endpoint { host: host.to_owned(), port }
    }

    #[test]
    fn parses_postgres_urls() -> Result<()> {
        assert_eq!(
            parse_endpoint("postgres://cairn:secret@db.example:6543/cairn?sslmode=disable", 5432)?,
            endpoint("db.example", 6543)
        );
        assert_eq!(parse_endpoint("postgresql://localhost/cairn", 5432)?, endpoint("localhost", 5432));
        assert_eq!(parse_endpoint("postgres://u:p%40ss@[::1]:5433/x", 5432)?, endpoint("::1", 5433));
        assert_eq!(parse_endpoint("postgres:///cairn", 5432)?, endpoint("localhost", 5432));
        assert!(parse_endpoint("postgres://host:port/x", 5432).is_err());
        Ok(())
    }

    #[test]
    fn parses_nats_urls() -> Result<()> {
        assert_eq!(parse_endpoints("nats://127.0.0.1:4222", 4222)?, vec![endpoint("127.0.0.1", 4222)]);
        assert_eq!(parse_endpoints("nats://a:1, tls://user:pw@b", 4222)?, vec![endpoint("a", 1), endpoint("b", 4222)]);
        assert_eq!(parse_endpoints("localhost", 4222)?, vec![endpoint("localhost", 4222)]);
        assert!(parse_endpoints("", 4222).is_err());
        Ok(())
    }

    #[test]
    fn database_name_defaults_to_cairn() {
        assert_eq!(database_name("postgres://u@h:1/app?sslmode=disable"), "app");
        assert_eq!(database_name("postgres://u@h:1/"), "cairn");
        assert_eq!(database_name("postgres://u@h:1"), "cairn");
        assert_eq!(database_name("postgres://u@h:1?x=y"), "cairn");
        assert_eq!(database_name("postgres://h?host=/tmp"), "cairn");
    }

    #[test]
    fn endpoints_display_with_brackets_for_ipv6() {
        assert_eq!(endpoint("::1", 5432).to_string(), "[::1]:5432");
        assert_eq!(endpoint("localhost", 5432).to_string(), "localhost:5432");
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(parse_version("16"), Some(vec![16]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("main"), None);
        assert!(parse_version("16").cmp(&parse_version("9.6")).is_gt());
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/data dir"), "'/data dir'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc".lines(), 2), "b\nc");
        assert_eq!(tail("a".lines(), 5), "a");
    }
}
