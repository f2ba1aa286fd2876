//! `bench`: measures cairn against the raw database and broker, side by side, in the same run.
//!
//! `cargo run --release -p cairn-bench -- <scenario> [--quick] [--out DIR]`. Each scenario gets
//! its own database and NATS namespace, starts `cairn serve` as a separate process, warms up,
//! measures, measures its baseline, prints a Markdown table and writes `<out>/<scenario>.json`.
//! BENCHMARKS.md describes every scenario, its baseline and the targets.

mod api;
mod env;
mod load;
mod report;
mod scenarios;
mod seed;
mod service;
// The SMTP server the end-to-end tests stall the email worker with; one copy for both.
#[allow(dead_code)]
#[path = "../../tests/common/stalling_smtp.rs"]
mod stalling_smtp;
mod stats;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};

use crate::env::BenchEnv;
use crate::report::{Machine, Report};
use crate::scenarios::{Ctx, Output};

/// Benchmarks of cairn beside raw Postgres and NATS baselines.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Smaller counts and shorter windows (each scenario well under a minute), for smoke runs.
    #[arg(long)]
    quick: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Build the release `cairn` binary first even when one exists.
    #[arg(long)]
    build: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Commands/s for a cheap command at 1, 16 and 64 clients, and registration latency.
    Write,
    /// The cheap command on 10,000-event streams beside fresh ones.
    WriteLong,
    /// Command 2xx to read model, at half the maximum write rate.
    Lag,
    /// Relay and projector catching up a backlog.
    Relay,
    /// Rebuilding the users projection with `cairn replay`.
    Rebuild,
    /// GET requests/s for a list page and a single user.
    Read,
    /// Sign-ins/s and a cheap GET's latency under them.
    Login,
    /// Idle and loaded resident memory.
    Memory,
    /// The lag while the mail server stalls the email worker at DATA, beside a responsive one.
    StalledSmtp,
    /// Memory after 20,000 unknown emails from 20,000 forwarded addresses; sign-in timing of
    /// unknown, locked and ordinary accounts.
    Hostile,
    /// 1,000 sockets over two processes in 10 rooms: send → every receiver, beside plain NATS
    /// publish/subscribe.
    Realtime,
    /// Upload and download MiB/s of 1 MiB and 100 MiB files at 1 and 8 clients on each store,
    /// beside aws-sdk-s3 directly and plain file I/O; RSS moved by a 1 GiB upload.
    Files,
    /// `noop` jobs/s at 1, 16 and 64 workers and enqueue → start latency, beside raw JetStream
    /// and a raw Postgres SKIP LOCKED loop.
    Jobs,
    /// Relay throughput with the audit tree on against off; exporting 1,000,000 events (events/s,
    /// RSS growth); `cairn audit verify` events/s; inclusion proof latency at 1,000,000 leaves.
    Audit,
    /// Every scenario, one after another.
    All,
}

impl Scenario {
    const EACH: [Self; 14] = [
        Self::Write,
        Self::WriteLong,
        Self::Lag,
        Self::Relay,
        Self::Rebuild,
        Self::Read,
        Self::Login,
        Self::Memory,
        Self::StalledSmtp,
        Self::Hostile,
        Self::Realtime,
        Self::Files,
        Self::Jobs,
        Self::Audit,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::WriteLong => "write-long",
            Self::Lag => "lag",
            Self::Relay => "relay",
            Self::Rebuild => "rebuild",
            Self::Read => "read",
            Self::Login => "login",
            Self::Memory => "memory",
            Self::StalledSmtp => "stalled-smtp",
            Self::Hostile => "hostile",
            Self::Realtime => "realtime",
            Self::Files => "files",
            Self::Jobs => "jobs",
            Self::Audit => "audit",
            Self::All => "all",
        }
    }

    async fn run(self, ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
        match self {
            Self::Write => scenarios::write::run(ctx, env, out).await,
            Self::WriteLong => scenarios::write_long::run(ctx, env, out).await,
            Self::Lag => scenarios::lag::run(ctx, env, out).await,
            Self::Relay => scenarios::relay::run(ctx, env, out).await,
            Self::Rebuild => scenarios::rebuild::run(ctx, env, out).await,
            Self::Read => scenarios::read::run(ctx, env, out).await,
            Self::Login => scenarios::login::run(ctx, env, out).await,
            Self::Memory => scenarios::memory::run(ctx, env, out).await,
            Self::StalledSmtp => scenarios::stalled_smtp::run(ctx, env, out).await,
            Self::Hostile => scenarios::hostile::run(ctx, env, out).await,
            Self::Realtime => scenarios::realtime::run(ctx, env, out).await,
            Self::Files => scenarios::files::run(ctx, env, out).await,
            Self::Jobs => scenarios::jobs::run(ctx, env, out).await,
            Self::Audit => scenarios::audit::run(ctx, env, out).await,
            Self::All => anyhow::bail!("`all` is not a single scenario"),
        }
    }
}

/// Runs one scenario in its own environment, always cleaning up.
async fn run_scenario(ctx: &Ctx, scenario: Scenario) -> anyhow::Result<Report> {
    let started = Instant::now();
    let load_at_start = report::load_average();
    report::note(&format!("{}: setting up", scenario.name()));
    let env = BenchEnv::create(&ctx.cairn).await?;
    let mut out = Output::default();
    report::note(&format!("{}: running (database {}, namespace {})", scenario.name(), env.database, env.namespace));
    let result = scenario.run(ctx, &env, &mut out).await;
    env.cleanup().await;
    result?;
    Ok(Report {
        scenario: scenario.name().to_owned(),
        finished_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        quick: ctx.quick,
        seconds: started.elapsed().as_secs_f64(),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            load_at_start,
            load_at_end: report::load_average(),
        },
        rows: out.rows,
        notes: out.notes,
    })
}

fn print(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            report::note(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs what was asked; `Ok(false)` when some scenario failed.
async fn run(args: Args) -> anyhow::Result<bool> {
    let ctx =
        Ctx { quick: args.quick, cairn: service::cairn_binary(args.build).await?, ticks: service::clock_ticks().await };
    let scenarios: Vec<Scenario> =
        if args.scenario == Scenario::All { Scenario::EACH.to_vec() } else { vec![args.scenario] };
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut all_ok = true;
    for scenario in scenarios {
        match run_scenario(&ctx, scenario).await {
            Ok(report) => {
                print(&report.markdown());
                report.write_json(&args.out)?;
                reports.push(report);
            }
            Err(e) => {
                all_ok = false;
                report::note(&format!("{} failed: {e:#}", scenario.name()));
            }
        }
    }
    if args.scenario == Scenario::All {
        let mut table = format!(
            "\n## All scenarios{} ({:.0} s)\n\n{}",
            if args.quick { " --quick" } else { "" },
            started.elapsed().as_secs_f64(),
            report::TABLE_HEAD
        );
        for report in &reports {
            for row in &report.rows {
                table.push_str(&report::row_markdown(&report.scenario, row));
            }
        }
        print(&table);
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("all.json"), serde_json::to_vec_pretty(&reports)?)?;
    }
    report::note(&format!("results in {}", args.out.display()));
    Ok(all_ok)
}
