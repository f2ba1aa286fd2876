//! `memory`: resident memory of `cairn serve` idle (ready, no request served yet) and at the end
//! of the write scenario's heaviest load (64 clients of role grants and revokes); also the CPU
//! the idle service burns, since an idle process should sleep.

use std::time::Duration;

use super::write::{toggle_load, Targets, TARGET_USERS};
use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::service::cpu_seconds_of;

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or the load measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let targets = Targets::seed(env, "target", TARGET_USERS, 1).await?;
    // Creates the administrator, signs in and lets the pipeline take in the seeded users; then
    // restarts, so the idle figure is of a process that has served nothing and has nothing to do.
    let first = Running::start(env, &[]).await?;
    crate::seed::wait_projected(&env.pool, Duration::from_secs(120)).await?;
    first.service.stop().await?;
    let service = crate::service::Service::start(env, &[]).await?;
    let settle = ctx.pick(Duration::from_secs(1), Duration::from_secs(3));
    tokio::time::sleep(settle).await;
    let idle = service.memory()?;
    let idle_for = ctx.pick(Duration::from_secs(2), Duration::from_secs(5));
    let cpu_before = cpu_seconds_of(service.pid(), ctx.ticks)?;
    tokio::time::sleep(idle_for).await;
    let idle_cpu = (cpu_seconds_of(service.pid(), ctx.ticks)? - cpu_before) / idle_for.as_secs_f64() * 100.0;
    service.stop().await?;

    let running = Running::start(env, &[]).await?;
    let window = ctx.window();
    let outcome = toggle_load(&running, &targets, 64, window).await?;
    outcome.require_success("write load")?;
    let loaded = running.service.memory()?;
    running.service.stop().await?;

    out.note(format!(
        "idle: ready, then {:.0} s with no request; after load: {:.0} s of role commands at 64 clients ({:.0} commands/s) \
         following one sign-in",
        settle.as_secs_f64(),
        window.measure.as_secs_f64() + window.warmup.as_secs_f64(),
        outcome.throughput()
    ));
    out.rows.push(
        Row::new("RSS of `cairn serve`, idle", Measure::rate(idle.rss_mib, "MiB", None))
            .memory(Some(idle))
            .target("<= 60 MiB", idle.rss_mib <= 60.0),
    );
    out.rows.push(
        Row::new(
            format!("CPU of `cairn serve`, idle ({:.0} s)", idle_for.as_secs_f64()),
            Measure::rate(idle_cpu, "% of a core", None),
        )
        .memory(Some(idle)),
    );
    out.rows.push(
        Row::new("RSS of `cairn serve` after the write load (64 clients)", Measure::rate(loaded.rss_mib, "MiB", None))
            .memory(Some(loaded))
            .extra("commands_per_second", outcome.throughput()),
    );
    Ok(())
}
