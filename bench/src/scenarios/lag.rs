//! `lag`: how long after a command's 2xx the read model shows it, at half the maximum write rate.
//!
//! First a short closed-loop burst at 64 clients finds the maximum rate of the cheap command in
//! this run; then commands are sent open-loop at half that rate, and right after each 2xx a read
//! of the same user is sent with the command's `X-Consistency-Token`. The service holds that read
//! until the users projection has applied the command, so 2xx → consistent answer is the
//! end-to-end lag (relay, JetStream, projector, checkpoint notification), plus one read's round
//! trip.
//!
//! Meanwhile the relay's and the users projection's checkpoints are sampled every 5 ms, which
//! splits the lag into its stages: 2xx → published (relay checkpoint past the command), 2xx →
//! applied (projection checkpoint past it), and the rest (the service noticing, and the read).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use super::write::{toggle_load, Targets, TARGET_USERS};
use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::load::Window;
use crate::report::{Measure, Row};
use crate::stats::Summary;

struct Sample {
    sent: Instant,
    acked: Instant,
    token: (i64, i64),
    command: Duration,
    lag: Duration,
    consistent: bool,
}

/// How often the checkpoints are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// One sample of both checkpoints: when, relay `(tx, pos)`, projection `(tx, pos)`.
type Checkpoints = (Instant, (i64, i64), (i64, i64));

/// Samples the relay's and the users projection's checkpoints until `stop` is set.
async fn sample_checkpoints(
    pool: sqlx::PgPool,
    namespace: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Vec<Checkpoints>> {
    let mut samples = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (relay_tx, relay_pos, users_tx, users_pos): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT coalesce((SELECT last_tx::text::bigint FROM relay_checkpoints WHERE name = $1), 0), \
                    coalesce((SELECT last_pos FROM relay_checkpoints WHERE name = $1), 0), \
                    coalesce((SELECT last_tx::text::bigint FROM projection_checkpoints WHERE name = 'users'), 0), \
                    coalesce((SELECT last_pos FROM projection_checkpoints WHERE name = 'users'), 0)",
        )
        .bind(&namespace)
        .fetch_one(&pool)
        .await?;
        samples.push((Instant::now(), (relay_tx, relay_pos), (users_tx, users_pos)));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Ok(samples)
}

/// Time from `acked` to the first sample whose checkpoint (picked by `which`) reached `token`.
fn reached(
    samples: &[Checkpoints],
    acked: Instant,
    token: (i64, i64),
    which: fn(&Checkpoints) -> (i64, i64),
) -> Option<Duration> {
    // Checkpoints only move forward, so the samples are sorted by both time and position.
    let first = samples.partition_point(|s| which(s) < token);
    samples.get(first).map(|s| s.0.saturating_duration_since(acked))
}

fn parse_token(token: &str) -> Option<(i64, i64)> {
    let (tx, pos) = token.split_once('.')?;
    Some((tx.parse().ok()?, pos.parse().ok()?))
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or nothing was measured.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let targets = Targets::seed(env, "target", TARGET_USERS, 1).await?;
    let running = Running::start(env, &[]).await?;
    let measured = measure(ctx, env, &targets, &running, "", out).await;
    running.service.stop().await?;
    measured.map(|_| ())
}

/// Measures the lag on a running service over `targets` (seeded with [`Targets::seed`]) and adds
/// its rows, their names prefixed by `label`, to `out`; returns the lag's summary. Leaves the
/// service running.
///
/// # Errors
/// When the probe fails or nothing was measured.
pub async fn measure(
    ctx: &Ctx,
    env: &BenchEnv,
    targets: &Targets,
    running: &Running,
    label: &str,
    out: &mut Output,
) -> anyhow::Result<Summary> {
    let probe_window = ctx.pick(
        Window { warmup: Duration::from_millis(500), measure: Duration::from_millis(1500) },
        Window { warmup: Duration::from_secs(2), measure: Duration::from_secs(5) },
    );
    let probe = toggle_load(running, targets, 64, probe_window).await?;
    probe.require_success("maximum-rate probe")?;
    let max_rate = probe.throughput();
    let rate = (max_rate / 2.0).max(1.0);
    let window = ctx.pick(
        Window { warmup: Duration::from_millis(500), measure: Duration::from_secs(3) },
        Window { warmup: Duration::from_secs(3), measure: Duration::from_secs(15) },
    );
    out.note(format!(
        "{label}maximum rate in this run: {max_rate:.0} commands/s (64 clients, {:.1} s); lag measured at {rate:.0} commands/s \
         for {:.0} s; lag = command 2xx → answer of a read carrying its X-Consistency-Token",
        probe_window.measure.as_secs_f64(),
        window.measure.as_secs_f64()
    ));

    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn(sample_checkpoints(env.pool.clone(), env.namespace.clone(), stop_sampling.clone()));
    let free: Arc<Mutex<VecDeque<usize>>> = Arc::new(Mutex::new((0..targets.ids().len()).collect()));
    let admin = Arc::new(running.admin_token.clone());
    let start = Instant::now();
    let measure_from = start + window.warmup;
    let measure_to = measure_from + window.measure;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks: JoinSet<anyhow::Result<Sample>> = JoinSet::new();
    let mut skipped = 0u64;
    loop {
        let tick = ticker.tick().await;
        if tick.into_std() >= measure_to {
            break;
        }
        let Some(i) = free.lock().ok().and_then(|mut f| f.pop_front()) else {
            skipped += 1;
            continue;
        };
        let (api, admin, targets, free) = (running.api.clone(), admin.clone(), targets.clone(), free.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let sample = async {
                let (_, token) = targets.toggle(&api, &admin, i).await?;
                let acked = Instant::now();
                let consistent = api.get_user(&admin, targets.ids()[i], Some(&token)).await?;
                let lag = acked.elapsed();
                let token = parse_token(&token).with_context(|| format!("bad consistency token {token}"))?;
                anyhow::Ok(Sample { sent, acked, token, command: acked - sent, lag, consistent })
            }
            .await;
            if let Ok(mut f) = free.lock() {
                f.push_back(i);
            }
            sample
        });
    }
    let mut samples = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a lag probe panicked")? {
            Ok(sample) if sample.sent >= measure_from => samples.push(sample),
            Ok(_) => {}
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    // Let the checkpoints pass the last commands before the sampler stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let checkpoints = sampler.await.context("the checkpoint sampler panicked")??;
    let memory = running.service.memory().ok();

    let inconsistent = samples.iter().filter(|s| !s.consistent).count();
    let lags: Vec<Duration> = samples.iter().map(|s| s.lag).collect();
    let commands: Vec<Duration> = samples.iter().map(|s| s.command).collect();
    let achieved = samples.len() as f64 / window.measure.as_secs_f64();
    let lag = Summary::of(&lags).with_context(|| {
        format!("no command was measured ({errors} failed; first: {})", first_error.as_deref().unwrap_or("none"))
    })?;
    let met = lag.p99_ms <= 50.0 && inconsistent == 0;
    out.rows.push(
        Row::new(
            format!("{label}2xx → read model, at {rate:.0} commands/s"),
            Measure::rate(achieved, "commands/s", Some(lag)),
        )
        .errors(errors)
        .memory(memory)
        .target("p99 <= 50 ms", met)
        .extra("max_rate", max_rate)
        .extra("offered_rate", rate)
        .extra("skipped_ticks", skipped)
        .extra("inconsistent_reads", inconsistent as u64),
    );
    out.rows.push(
        Row::new(
            format!("{label}command latency at {rate:.0} commands/s"),
            Measure::rate(achieved, "commands/s", Summary::of(&commands)),
        )
        .memory(memory),
    );
    let stage = |which: fn(&Checkpoints) -> (i64, i64)| -> Vec<Duration> {
        samples.iter().filter_map(|s| reached(&checkpoints, s.acked, s.token, which)).collect()
    };
    let published = stage(|c| c.1);
    let applied = stage(|c| c.2);
    for (name, stage) in
        [("relay checkpoint passes it", &published), ("users projection checkpoint passes it", &applied)]
    {
        out.rows.push(
            Row::new(
                format!("{label}2xx → {name} (sampled every {} ms)", SAMPLE_EVERY.as_millis()),
                Measure::rate(achieved, "commands/s", Summary::of(stage)),
            )
            .memory(memory),
        );
    }
    if let Some(e) = &first_error {
        out.note(format!("{label}{errors} commands or reads failed; first: {e}"));
    }
    if inconsistent > 0 {
        out.note(format!("{label}{inconsistent} reads gave up waiting (meta.consistent = false)"));
    }
    if skipped > 0 {
        out.note(format!("{label}{skipped} ticks found every user busy and sent nothing"));
    }
    Ok(lag)
}
