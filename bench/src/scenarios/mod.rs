//! The scenarios, one module each, and what they share: the run's settings, a started service
//! with an administrator signed in, and the rows they produce.

pub mod audit;
pub mod files;
pub mod hostile;
pub mod jobs;
pub mod lag;
pub mod login;
pub mod memory;
pub mod read;
pub mod realtime;
pub mod rebuild;
pub mod relay;
pub mod stalled_smtp;
pub mod write;
pub mod write_long;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::api::Api;
use crate::env::BenchEnv;
use crate::load::Window;
use crate::report::Row;
use crate::service::Service;

/// Settings of one benchmark run.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Smaller counts and shorter windows, for CI smoke runs.
    pub quick: bool,
    /// The release `cairn` binary.
    pub cairn: PathBuf,
    /// Clock ticks per second, for CPU time from `/proc`.
    pub ticks: f64,
}

impl Ctx {
    /// The warm-up and measured window of a closed-loop load.
    #[must_use]
    pub fn window(&self) -> Window {
        if self.quick {
            Window { warmup: Duration::from_millis(500), measure: Duration::from_secs(2) }
        } else {
            Window { warmup: Duration::from_secs(3), measure: Duration::from_secs(10) }
        }
    }

    /// `quick` or `full`, whichever this run is.
    #[must_use]
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// CPU used while a load ran, in percent of one core.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// By the service.
    pub service: f64,
    /// By this benchmark process (the clients), which shares the machine.
    pub bench: f64,
}

/// Runs `load` and returns its result with the CPU the service (`pid`) and this process used
/// meanwhile.
///
/// # Errors
/// When `load` fails or the process is gone.
pub async fn with_cpu<T>(
    ctx: &Ctx,
    pid: u32,
    load: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, CpuUse)> {
    let me = std::process::id();
    let (service_before, bench_before) =
        (crate::service::cpu_seconds_of(pid, ctx.ticks)?, crate::service::cpu_seconds_of(me, ctx.ticks)?);
    let started = Instant::now();
    let result = load.await?;
    let seconds = started.elapsed().as_secs_f64();
    let service = (crate::service::cpu_seconds_of(pid, ctx.ticks)? - service_before) / seconds * 100.0;
    let bench = (crate::service::cpu_seconds_of(me, ctx.ticks)? - bench_before) / seconds * 100.0;
    Ok((result, CpuUse { service, bench }))
}

impl crate::report::Row {
    /// Keeps the CPU figures of a load.
    #[must_use]
    pub fn cpu(self, cpu: CpuUse) -> Self {
        self.extra("service_cpu_percent", cpu.service).extra("bench_cpu_percent", cpu.bench)
    }
}

/// What a scenario produces.
#[derive(Debug, Default)]
pub struct Output {
    /// The table's rows.
    pub rows: Vec<Row>,
    /// Sizes and remarks printed under the table.
    pub notes: Vec<String>,
}

impl Output {
    /// Adds a note and shows it as progress too.
    pub fn note(&mut self, note: String) {
        crate::report::note(&note);
        self.notes.push(note);
    }
}

/// The administrator the scenarios create.
pub const ADMIN_EMAIL: &str = "admin@bench.local";
const ADMIN_PASSWORD: &str = "bench-admin-password-0001";

/// A started service with an administrator signed in.
pub struct Running {
    /// The service process.
    pub service: Service,
    /// A client of it.
    pub api: Api,
    /// The administrator's access token.
    pub admin_token: String,
}

impl Running {
    /// Creates the administrator with `cairn admin create-user` (unless it exists), starts
    /// `cairn serve` and signs the administrator in.
    ///
    /// # Errors
    /// When any step fails.
    pub async fn start(env: &BenchEnv, extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE event_type = 'UserRegistered' \
             AND payload -> 'UserRegistered' ->> 'email' = $1)",
        )
        .bind(ADMIN_EMAIL)
        .fetch_one(&env.pool)
        .await?;
        if !exists {
            env.run_cairn(
                &["admin", "create-user", "--email", ADMIN_EMAIL, "--role", "admin"],
                &[("CAIRN_ADMIN_PASSWORD", ADMIN_PASSWORD)],
            )
            .await
            .context("creating the administrator")?;
        }
        let service = Service::start(env, extra_env).await?;
        let api = Api::new(&service.base_url)?;
        let admin_token = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await.context("signing the administrator in")?;
        Ok(Self { service, api, admin_token })
    }
}
