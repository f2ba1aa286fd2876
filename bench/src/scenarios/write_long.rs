//! `write-long`: the cheap command on users whose streams already hold 10,000 events (seeded with
//! SQL, consistent sequences and session versions), beside the same command on fresh users in
//! the same run. Loading an aggregate reads its whole stream, so the ratio shows how command cost
//! grows with stream length.

use std::time::Duration;

use super::write::{toggle_load, Targets, TARGET_USERS};
use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::seed;

/// Events in each long stream before the measurement.
pub const STREAM_EVENTS: usize = 10_000;

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or a load measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let window = ctx.window();
    let long_users = ctx.pick(1, 8);
    let levels: &[usize] = ctx.pick(&[1], &[1, 8]);
    let long = Targets::seed(env, "long", long_users, STREAM_EVENTS).await?;
    let fresh = Targets::seed(env, "fresh", TARGET_USERS, 1).await?;
    out.note(format!(
        "{long_users} user(s) with {STREAM_EVENTS} events each (seeded), against {TARGET_USERS} freshly registered users; \
         the service catches up on the seeded events before the measurement"
    ));
    let running = Running::start(env, &[]).await?;
    seed::wait_projected(&env.pool, Duration::from_secs(600)).await?;
    for &clients in levels {
        let on_long = toggle_load(&running, &long, clients, window).await?;
        on_long.require_success("commands on long streams")?;
        let memory = running.service.memory().ok();
        let on_fresh = toggle_load(&running, &fresh, clients, window).await?;
        on_fresh.require_success("commands on fresh users")?;
        let plural = if clients == 1 { "" } else { "s" };
        let mut row = Row::new(
            format!("role grant/revoke on {STREAM_EVENTS}-event streams, {clients} client{plural}"),
            Measure::rate(on_long.throughput(), "commands/s", on_long.summary()),
        )
        .errors(on_long.errors)
        .memory(memory)
        .baseline(
            format!("same command on fresh users, {clients} client{plural}"),
            Measure::rate(on_fresh.throughput(), "commands/s", on_fresh.summary()),
        );
        let met = row.ratio.is_some_and(|r| r >= 0.8);
        row = row.target(">= 0.8 x fresh", met);
        if let Some(e) = on_long.first_error.as_ref().or(on_fresh.first_error.as_ref()) {
            row = row.extra("first_error", e.clone());
        }
        out.rows.push(row);
    }
    running.service.stop().await?;
    Ok(())
}
