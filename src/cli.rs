//! The command line of the operator binary.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use cairn_command_api::passwords::Passwords;
use cairn_command_api::users::RegisterUser;
use cairn_command_api::UserCommands;
use cairn_embedded::{EmbeddedOptions, EmbeddedServices};
use cairn_platform::auth::{KeySet, SessionVersions};
use cairn_platform::http::RequestContext;
use cairn_platform::{db, telemetry, Settings};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{Application, Services};

/// cairn: an event-sourced CQRS backend. Configuration comes from the environment (see README).
#[derive(Debug, Parser)]
#[command(name = "cairn", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)] // the names are the subcommands users type
enum Command {
    /// Run every service in one process on one port: command API, relay, projectors, query API, workers.
    Serve {
        /// When nothing answers at DATABASE_URL or NATS_URL, start a private PostgreSQL
        /// (initdb, pg_ctl) and nats-server under CAIRN_DATA_DIR, and stop them on exit.
        #[arg(long)]
        embedded: bool,
    },
    /// Run the command API (and a relay, single-active) alone.
    CommandApi,
    /// Run the query API alone.
    QueryApi,
    /// Run the projectors alone (health and metrics on CAIRN_LISTEN).
    Projector,
    /// Run the workers alone (health and metrics on CAIRN_LISTEN).
    Workers,
    /// Run the relay alone (health and metrics on CAIRN_LISTEN).
    Relay,
    /// Create the database if missing and apply migrations.
    Migrate,
    /// Rebuild a projection from the events table and swap it in without taking reads down.
    Replay {
        /// The projection (`users`, `sessions`, `roles`, `rooms`, `files` or `analytics`).
        #[arg(long)]
        projection: String,
    },
    /// Show every projection's checkpoint, lag, state and parked count, and the workers' parked
    /// counts (as `GET /api/v1/admin/projections`); with `--parked NAME`, the events NAME parked.
    Projections {
        /// List the events this projection or worker parked (and not yet resolved or skipped).
        #[arg(long, value_name = "NAME")]
        parked: Option<String>,
    },
    /// List, show, retry and cancel background jobs (as the `/api/v1/jobs` routes do).
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Operator tasks.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Exit 0 when the local server's /health answers 200 (for container health checks).
    Healthcheck,
    /// Auditors' tasks on the verifiable log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Recompute the tree from the events table and compare it with the stored tree and every
    /// signed head (public keys from CAIRN_AUDIT_KEYS_DIR). Exit 0 intact, 2 changed, 1 on error.
    Verify {
        /// Print the report as JSON (as GET /api/v1/audit/verify's data).
        #[arg(long)]
        json: bool,
    },
}

/// `cairn audit verify` found the log changed: exit code 2, the report already printed.
#[derive(Debug)]
struct Tampered;

impl std::fmt::Display for Tampered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the log does not match its tree")
    }
}

impl std::error::Error for Tampered {}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Jobs, newest first.
    List {
        /// Only jobs in this status: scheduled, queued, running, done, failed, dead, cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only jobs of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// How many, 1 to 100.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One job with every attempt's error.
    Show {
        /// The job's id.
        id: uuid::Uuid,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a dead or failed job again (attempts back to 0).
    Retry {
        /// The job's id.
        id: uuid::Uuid,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or scheduled job.
    Cancel {
        /// The job's id.
        id: uuid::Uuid,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create a user through the same command path as the API. The password is read from
    /// CAIRN_ADMIN_PASSWORD or standard input, never from the command line.
    CreateUser {
        /// Email address.
        #[arg(long)]
        email: String,
        /// Role to hold (repeatable).
        #[arg(long = "role", default_value = "admin")]
        roles: Vec<String>,
        /// Display name (default: the part of the email before '@').
        #[arg(long)]
        display_name: Option<String>,
    },
    /// Add a new signing key; the newest key signs, older ones keep verifying.
    RotateKey,
    /// Add a new audit signing key (Ed25519) to CAIRN_AUDIT_KEYS_DIR (created when missing; the
    /// key file is mode 0600) and print its id. Running relays sign tree heads with it within a
    /// minute; older keys stay published, so heads they signed still verify.
    RotateAuditKey,
    /// Run one pass of the file sweeper now: remove stored bytes that no event names (uploads that
    /// died) and that are older than CAIRN_FILES_ORPHAN_GRACE_SECS. Does nothing while a running
    /// process is sweeping.
    SweepFiles,
    /// Add a new master key to CAIRN_FILES_MASTER_KEY_FILE (created, mode 0600, when missing):
    /// new files are encrypted under it once processes restart, older files stay readable.
    RotateFilesKey,
}

/// Parses the command line and runs it.
pub async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<Tampered>() => std::process::ExitCode::from(2),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cairn failed");
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut settings = Settings::from_env()?;
    telemetry::init_tracing(settings.log_format);
    let services = match cli.command {
        Command::Serve { embedded } => {
            let mut private = None;
            if embedded {
                let data_dir =
                    std::env::var("CAIRN_DATA_DIR").map_or_else(|_| PathBuf::from(".cairn/data"), PathBuf::from);
                let started = EmbeddedServices::start(EmbeddedOptions {
                    data_dir,
                    database_url: settings.database_url.clone(),
                    nats_url: settings.nats_url.clone(),
                })
                .await?;
                settings.database_url = started.database_url().to_owned();
                settings.nats_url = started.nats_url().to_owned();
                private = Some(started);
            }
            let result = serve(settings, Services::all()).await;
            if let Some(mut started) = private {
                started.stop().await?;
            }
            return result;
        }
        Command::CommandApi => Services { command_api: true, relay: true, ..Services::none() },
        Command::QueryApi => Services { query_api: true, ..Services::none() },
        Command::Projector => Services { projector: true, ..Services::none() },
        Command::Workers => Services { workers: true, ..Services::none() },
        Command::Relay => Services { relay: true, ..Services::none() },
        Command::Migrate => {
            db::connect_and_migrate(&settings.database_url, 2).await?;
            tracing::info!("database is up to date");
            return Ok(());
        }
        Command::Replay { projection } => return replay(&settings, &projection).await,
        Command::Projections { parked } => return projections(&settings, parked.as_deref()).await,
        Command::Jobs { command } => return jobs(&settings, command).await,
        Command::Admin { command } => return admin(&settings, command).await,
        Command::Healthcheck => return healthcheck(&settings).await,
        Command::Audit { command } => return audit(&settings, command).await,
    };
    serve(settings, services).await
}

async fn serve(settings: Settings, services: Services) -> anyhow::Result<()> {
    let grace = settings.shutdown_grace;
    let app = Application::build(settings, services).await?;
    let token = app.shutdown_token();
    tokio::spawn(stop_on_signal(token, grace));
    app.run_until_stopped().await
}

/// How long after the grace period a process that has still not exited is ended by force.
const FORCED_EXIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Stops the process gracefully on SIGTERM or Ctrl-C. A second signal, or the grace period plus
/// a margin without the process having exited, ends it at once: the graceful path is bounded
/// already, and this is the backstop should some dependency hang where it cannot be aborted.
async fn stop_on_signal(token: CancellationToken, grace: std::time::Duration) {
    if !stop_signal().await {
        return;
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down");
    token.cancel();
    tokio::select! {
        received = stop_signal() => {
            if !received {
                return;
            }
            tracing::warn!("second stop signal; exiting now");
        }
        () = tokio::time::sleep(grace + FORCED_EXIT_MARGIN) => {
            tracing::error!("still running long after the grace period; exiting now");
        }
    }
    std::process::exit(1);
}

/// Waits for SIGTERM or Ctrl-C; false when no signal can be received at all.
async fn stop_signal() -> bool {
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return tokio::signal::ctrl_c().await.is_ok();
        };
        tokio::select! {
            received = tokio::signal::ctrl_c() => received.is_ok(),
            received = term.recv() => received.is_some(),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.is_ok()
    }
}

async fn replay(settings: &Settings, projection: &str) -> anyhow::Result<()> {
    use cairn_projector::rebuild::{self, RebuildOptions, StartError};
    let pool = db::connect_and_migrate(&settings.database_url, 4).await?;
    let claim = match rebuild::claim(&pool, projection, "cli").await {
        Ok(claim) => claim,
        Err(StartError::Unknown(other)) => {
            bail!("unknown projection '{other}' (known: {})", cairn_projector::PROJECTIONS.join(", "))
        }
        Err(e) => return Err(e.into()),
    };
    let shutdown = CancellationToken::new();
    let options = RebuildOptions {
        batch: settings.rebuild_batch,
        swap: true,
        pause: settings.fault_rebuild_pause,
        shutdown: shutdown.clone(),
    };
    let signals = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if stop_signal().await {
                shutdown.cancel();
            }
        }
    });
    let started = std::time::Instant::now();
    let name = claim.name();
    let run = tokio::spawn({
        let pool = pool.clone();
        async move { claim.run(&pool, &options).await }
    });
    let outcome = show_progress(&pool, name, run).await;
    signals.abort();
    let events = outcome?;
    writeln!(std::io::stdout(), "rebuilt {name} from {events} events in {:.1} s", started.elapsed().as_secs_f64())?;
    Ok(())
}

/// Shows a rebuild's progress, read from its row, until `run` ends: a progress bar on a terminal,
/// a line every few seconds otherwise.
async fn show_progress(
    pool: &sqlx::PgPool,
    name: &str,
    mut run: tokio::task::JoinHandle<anyhow::Result<u64>>,
) -> anyhow::Result<u64> {
    use cairn_query_api::admin::RebuildStatus;
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} events {msg}",
        )?);
        bar.set_prefix(format!("rebuilding {name}"));
        Some(bar)
    } else {
        None
    };
    let every = if terminal { std::time::Duration::from_millis(200) } else { std::time::Duration::from_secs(1) };
    let mut tick = tokio::time::interval(every);
    let outcome = loop {
        tokio::select! {
            joined = &mut run => break joined.context("the rebuild task failed")?,
            _ = tick.tick() => {
                let Ok(Some(row)) = cairn_projector::rebuild::latest(pool, name).await else { continue };
                if row.state != "running" {
                    continue;
                }
                let status = RebuildStatus::of(&row, chrono::Utc::now());
                let eta = status.eta_secs.map_or_else(|| "?".to_owned(), |s| format!("{s} s"));
                if let Some(bar) = &bar {
                    bar.set_length(u64::try_from(status.events_total).unwrap_or(0));
                    bar.set_position(u64::try_from(status.events_done).unwrap_or(0));
                    bar.set_message(format!("{:.0} events/s, ETA {eta}", status.rate_per_sec));
                } else {
                    let _ = writeln!(
                        std::io::stderr(),
                        "rebuilding {name}: {} of {} events, {:.0} events/s, ETA {eta}",
                        status.events_done, status.events_total, status.rate_per_sec
                    );
                }
            }
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    outcome.with_context(|| format!("rebuild of {name} failed; the live tables are untouched"))
}

async fn projections(settings: &Settings, parked: Option<&str>) -> anyhow::Result<()> {
    use cairn_query_api::admin::status;
    let pool = db::connect_and_migrate(&settings.database_url, 2).await?;
    let mut out = std::io::stdout().lock();
    if let Some(name) = parked {
        if !cairn_projector::PROJECTIONS.contains(&name) && !cairn_workers::PARKING_CONSUMERS.contains(&name) {
            bail!("unknown projection or worker '{name}'");
        }
        let (rows, more) = status::parked(&pool, name, Some("parked"), None, 100).await?;
        writeln!(out, "{:<36}  {:<14}  {:<28}  {:>8}  error", "event id", "position", "event", "attempts")?;
        for row in &rows {
            let event = format!("{}/{} v{}", row.aggregate_type, row.event_type, row.event_version);
            writeln!(
                out,
                "{:<36}  {:<14}  {:<28}  {:>8}  {}",
                row.event_id, row.position, event, row.attempts, row.error
            )?;
        }
        if more {
            writeln!(out, "… more: see GET /api/v1/admin/projections/{name}/parked")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  {:>6}  rebuild",
        "projection", "checkpoint", "lag", "lag ms", "state", "parked"
    )?;
    for p in status::projections(&pool, cairn_projector::PROJECTIONS).await? {
        let rebuild = p.rebuild.as_ref().map_or_else(String::new, |r| match r.state {
            "running" => format!(
                "running: {} of {} events, {:.0}/s, ETA {}",
                r.events_done,
                r.events_total,
                r.rate_per_sec,
                r.eta_secs.map_or_else(|| "?".to_owned(), |s| format!("{s} s"))
            ),
            "failed" => format!("failed at {}: {}", r.heartbeat_at.to_rfc3339(), r.error.as_deref().unwrap_or("")),
            state => format!(
                "{state} at {} ({} events)",
                r.finished_at.unwrap_or(r.heartbeat_at).to_rfc3339(),
                r.events_done
            ),
        });
        writeln!(
            out,
            "{:<12}  {:<20}  {:>10}  {:>10}  {:<12}  {:>6}  {}",
            p.name, p.checkpoint, p.lag_events, p.lag_ms, p.state, p.parked, rebuild
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:<12}  {:>6}", "worker", "parked")?;
    for w in status::workers(&pool, cairn_workers::PARKING_CONSUMERS).await? {
        writeln!(out, "{:<12}  {:>6}", w.name, w.parked)?;
    }
    Ok(())
}

async fn jobs(settings: &Settings, command: JobsCommand) -> anyhow::Result<()> {
    use cairn_command_api::jobs::commands;
    use cairn_query_api::jobs::store;
    let pool = db::connect_and_migrate(&settings.database_url, 2).await?;
    let now = settings.clock.now();
    let metadata = || commands::metadata(&RequestContext::operator("cairn jobs"), None);
    let mut out = std::io::stdout().lock();
    match command {
        JobsCommand::List { status, kind, limit, json } => {
            if !(1..=100).contains(&limit) {
                bail!("--limit must be between 1 and 100");
            }
            let status = match status.as_deref() {
                None => None,
                Some(s) => Some(cairn_platform::jobs::JobStatus::parse(s).with_context(|| {
                    format!("unknown status '{s}' (scheduled, queued, running, done, failed, dead, cancelled)")
                })?),
            };
            let filter = store::JobFilter { status, kind };
            let (jobs, more) = store::list(&pool, &filter, None, i64::from(limit), now).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&jobs)?)?;
                return Ok(());
            }
            writeln!(
                out,
                "{:<36}  {:<18}  {:<9}  {:>8}  {:<20}  last error",
                "id", "kind", "status", "attempts", "run at"
            )?;
            for job in &jobs {
                let last_error: String = job.last_error.as_deref().unwrap_or("").chars().take(60).collect();
                writeln!(
                    out,
                    "{:<36}  {:<18}  {:<9}  {:>8}  {:<20}  {}",
                    job.id,
                    job.kind,
                    job.status,
                    format!("{}/{}", job.attempts, job.max_attempts),
                    job.run_at.format("%Y-%m-%d %H:%M:%S"),
                    last_error
                )?;
            }
            if more.is_some() {
                writeln!(out, "… more: raise --limit, or page with GET /api/v1/jobs")?;
            }
            Ok(())
        }
        JobsCommand::Show { id, json } => {
            let job = store::find(&pool, id, now).await?.with_context(|| format!("no job {id}"))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&job)?)?;
                return Ok(());
            }
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map_or("-".to_owned(), |t| t.to_rfc3339());
            writeln!(out, "id            {}", job.id)?;
            writeln!(out, "kind          {}", job.kind)?;
            writeln!(out, "status        {}", job.status)?;
            writeln!(out, "args          {}", job.args)?;
            writeln!(out, "priority      {}", job.priority)?;
            writeln!(out, "attempts      {}/{}", job.attempts, job.max_attempts)?;
            writeln!(out, "run at        {}", job.run_at.to_rfc3339())?;
            writeln!(out, "enqueued by   {}", job.enqueued_by.as_deref().unwrap_or("-"))?;
            writeln!(out, "created       {}", job.created_at.to_rfc3339())?;
            writeln!(out, "started       {}", time(job.started_at))?;
            writeln!(out, "finished      {}", time(job.finished_at))?;
            if let Some(owner) = &job.lease_owner {
                writeln!(out, "lease         {owner} until {}", time(job.lease_expires_at))?;
            }
            writeln!(out, "last error    {}", job.last_error.as_deref().unwrap_or("-"))?;
            for e in &job.errors {
                writeln!(out, "  attempt {:>3}  {}  {}", e.attempt, e.at.to_rfc3339(), e.error)?;
            }
            Ok(())
        }
        JobsCommand::Retry { id, json } => {
            let token =
                commands::retry(&pool, id, metadata(), now).await.map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "job_id": id, "status": "queued", "consistency_token": token.to_string() })
                )?;
            } else {
                writeln!(out, "job {id} is queued again")?;
            }
            Ok(())
        }
        JobsCommand::Cancel { id, json } => {
            let token =
                commands::cancel(&pool, id, metadata(), now).await.map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "job_id": id, "status": "cancelled", "consistency_token": token.to_string() })
                )?;
            } else {
                writeln!(out, "job {id} is cancelled")?;
            }
            Ok(())
        }
    }
}

async fn admin(settings: &Settings, command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::RotateKey => {
            let kid = KeySet::rotate(&settings.keys_dir)?;
            let _ = writeln!(
                std::io::stdout(),
                "created signing key {kid} in {}; running processes sign with it within a minute",
                settings.keys_dir.display()
            );
            Ok(())
        }
        AdminCommand::RotateAuditKey => {
            // Never a development key: production refuses those.
            let kid = cairn_platform::audit::keys::generate(&settings.audit.keys_dir, false)?;
            let _ = writeln!(
                std::io::stdout(),
                "created audit key {kid} in {}; running processes sign tree heads with it within a minute",
                settings.audit.keys_dir.display()
            );
            Ok(())
        }
        AdminCommand::SweepFiles => {
            let pool = db::connect_and_migrate(&settings.database_url, 2).await?;
            let store = cairn_storage::FileStore::open(&settings.files, settings.is_production()).await?;
            let report = cairn_workers::FileSweeper::new(pool, store, settings).sweep().await?;
            let mut out = std::io::stdout().lock();
            if !report.swept {
                writeln!(out, "another process is sweeping the file store right now; nothing done")?;
                return Ok(());
            }
            writeln!(
                out,
                "uploads that died: {}; objects removed: {}; kept (a file or an upload names them): {}; \
                 keys of another shape left: {}; removals that failed (left for the next pass): {}",
                report.uploads_reaped,
                report.objects_removed,
                report.objects_kept,
                report.foreign_keys,
                report.failures
            )?;
            Ok(())
        }
        AdminCommand::RotateFilesKey => {
            let file = settings.files.master_key_file.as_deref().context(
                "set CAIRN_FILES_MASTER_KEY_FILE to the file that holds (or is to hold) the local store's master keys",
            )?;
            let id = cairn_storage::keys::append_new_key(file, settings.clock.now())?;
            let _ = writeln!(
                std::io::stdout(),
                "added master key {id} to {}; processes encrypt new files with it once restarted, and keep reading files under the older keys",
                file.display()
            );
            Ok(())
        }
        AdminCommand::CreateUser { email, roles, display_name } => {
            let password = match std::env::var("CAIRN_ADMIN_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => read_password()?,
            };
            let pool = db::connect_and_migrate(&settings.database_url, 2).await?;
            // A relay in a running service is woken by the NOTIFY this process sends after the commit.
            let wake = cairn_relay::RelayWakeup::local();
            let users = UserCommands::new(pool.clone(), Passwords::new(1), SessionVersions::default(), wake);
            let display_name = display_name.unwrap_or_else(|| email.split('@').next().unwrap_or("admin").to_owned());
            let input = RegisterUser { email, password, display_name, roles };
            let (id, token) = users
                .register(input, &RequestContext::operator("cairn admin create-user"), None)
                .await
                .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
            if let Err(e) = cairn_relay::wakeup::notify(&pool).await {
                tracing::debug!(error = %e, "cannot wake the relay; it polls");
            }
            let _ = writeln!(std::io::stdout(), "{id}");
            tracing::info!(user_id = %id, consistency_token = %token, "user created");
            Ok(())
        }
    }
}

async fn audit(settings: &Settings, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { json } => {
            let keys = cairn_platform::audit::AuditKeys::read_dir(&settings.audit.keys_dir)?;
            let pool = db::connect_and_migrate(&settings.database_url, 4).await?;
            let on_terminal = std::io::stderr().is_terminal() && !json;
            let mut last_shown = std::time::Instant::now();
            let report = cairn_platform::audit::verify::verify_with_progress(&pool, &keys, |done, total| {
                if on_terminal && last_shown.elapsed() >= std::time::Duration::from_secs(1) {
                    last_shown = std::time::Instant::now();
                    let _ = write!(std::io::stderr(), "\rchecked {done} of {total} events");
                }
            })
            .await?;
            if on_terminal {
                let _ = write!(std::io::stderr(), "\r\x1b[K");
            }
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write_verify_report(&mut out, &report)?;
            }
            out.flush()?;
            if report.intact {
                Ok(())
            } else {
                Err(Tampered.into())
            }
        }
    }
}

fn write_verify_report(
    out: &mut impl Write,
    report: &cairn_platform::audit::verify::VerifyReport,
) -> std::io::Result<()> {
    if report.intact {
        return writeln!(
            out,
            "intact: {} events recomputed, {} signed heads checked (tree size {})",
            report.events_checked, report.heads_checked, report.tree_size
        );
    }
    writeln!(
        out,
        "CHANGED: {} events recomputed, {} signed heads checked (tree size {})",
        report.events_checked, report.heads_checked, report.tree_size
    )?;
    if let Some(d) = &report.first_difference {
        writeln!(out, "first difference: {} at leaf index {}", d.kind, d.leaf_index)?;
        writeln!(out, "  event id   {}", d.event_id)?;
        writeln!(out, "  position   {}", d.position.as_deref().unwrap_or("- (not in the log)"))?;
        writeln!(out, "  recorded   {}", d.recorded_position.as_deref().unwrap_or("- (not in the tree)"))?;
        if let Some(found) = d.found_event_id {
            writeln!(out, "  found here {found}")?;
        }
        writeln!(out, "  {}", d.detail)?;
    } else {
        writeln!(out, "the stored leaves match the log")?;
    }
    if let Some(h) = &report.first_head_mismatch {
        writeln!(out, "first signed head that no longer matches: tree size {}", h.tree_size)?;
        writeln!(out, "  signed root     {}", h.signed_root)?;
        writeln!(out, "  recomputed root {}", h.recomputed_root.as_deref().unwrap_or("-"))?;
        writeln!(out, "  last matching head: tree size {}", h.last_matching_size)?;
        writeln!(out, "  {}", h.detail)?;
    }
    if report.bad_signature_count > 0 {
        writeln!(out, "heads whose signature fails: {}", report.bad_signature_count)?;
        for b in &report.bad_signatures {
            writeln!(out, "  tree size {}  key {}  {}", b.tree_size, b.key_id, b.detail)?;
        }
    }
    Ok(())
}

fn describe(e: &cairn_platform::http::ApiError) -> String {
    match e {
        cairn_platform::http::ApiError::Validation { details, .. } => {
            details.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ")
        }
        other => other.to_string(),
    }
}

fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let _ = write!(std::io::stderr(), "password (input is visible; prefer CAIRN_ADMIN_PASSWORD or a pipe): ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        bail!("no password: set CAIRN_ADMIN_PASSWORD or pipe it on standard input");
    }
    Ok(password)
}

async fn healthcheck(settings: &Settings) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = settings.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut stream =
        tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await??;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    if &head[9..12] == b"200" {
        Ok(())
    } else {
        bail!("health check answered {}", String::from_utf8_lossy(&head))
    }
}
