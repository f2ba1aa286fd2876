//! `rebuild`: `cairn replay --projection users` over a log written with SQL, timed as a process
//! (its peak memory read from `/proc` while it runs). No service runs meanwhile, so nothing else
//! competes for the machine.
//!
//! Baseline: `COPY` of the finished rows (dumped with `COPY users TO STDOUT`) into an empty copy
//! of the table with the same indexes. Both produce the same table, so the ratio is COPY's time
//! over the rebuild's time.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;

use super::{Ctx, Output};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::seed;
use crate::service::{memory_of, Memory};

/// Events per user in the log: a registration and four role changes.
const EVENTS_PER_USER: usize = 5;

/// Runs the scenario.
///
/// # Errors
/// When set-up or the rebuild fails.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let events = ctx.pick(50_000, 1_000_000);
    let hash = seed::password_hash()?;
    let spec = seed::Users {
        label: "log",
        users: events / EVENTS_PER_USER,
        events_per_user: EVENTS_PER_USER,
        chunk_events: 10_000,
        password_hash: &hash,
    };
    let seeding = Instant::now();
    seed::users(&env.pool, &spec).await?;
    sqlx::query("VACUUM ANALYZE events").execute(&env.pool).await?;
    out.note(format!(
        "log: {} events ({} users × {EVENTS_PER_USER}: a registration and four role changes), written in {:.1} s; \
         the rebuild runs with no service running",
        spec.total_events(),
        spec.users,
        seeding.elapsed().as_secs_f64()
    ));

    let started = Instant::now();
    let mut child = env
        .cairn_command(&["replay", "--projection", "users"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start cairn replay")?;
    let pid = child.id().context("cairn replay exited at once")?;
    let mut memory: Option<Memory> = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        memory = memory_of(pid).ok().or(memory);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let output = child.wait_with_output().await?;
    anyhow::ensure!(
        status.success(),
        "cairn replay failed ({status}): {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let replayed: u64 = printed
        .strip_prefix("rebuilt users from ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("unexpected output of cairn replay: {printed}"))?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&env.pool).await?;

    let copy_seconds = copy_baseline(env).await?;
    let rebuild_rate = replayed as f64 / seconds;
    let ratio = copy_seconds / seconds;
    out.note(format!(
        "rebuild: {replayed} events → {rows} rows in {seconds:.2} s (process start included); COPY of the same {rows} rows: \
         {copy_seconds:.2} s; ratio = COPY time ÷ rebuild time"
    ));
    out.rows.push(
        Row::new(
            format!("rebuild users from {replayed} events (`cairn replay`)"),
            Measure::rate(rebuild_rate, "events/s", None),
        )
        .memory(memory)
        .baseline(
            format!("COPY of the {rows} finished rows"),
            Measure::rate(rows as f64 / copy_seconds, "rows/s", None),
        )
        .ratio(ratio)
        .target(">= 0.5 x COPY", ratio >= 0.5)
        .extra("rebuild_seconds", seconds)
        .extra("copy_seconds", copy_seconds)
        .extra("rows", rows),
    );
    Ok(())
}

/// Dumps `users` with COPY TO STDOUT, then times COPY FROM STDIN into an empty copy of it.
async fn copy_baseline(env: &BenchEnv) -> anyhow::Result<f64> {
    let mut conn = env.pool.acquire().await?;
    let chunks: Vec<bytes::Bytes> = conn.copy_out_raw("COPY users TO STDOUT").await?.try_collect().await?;
    sqlx::query("CREATE TABLE bench_users_copy (LIKE users INCLUDING ALL)").execute(&mut *conn).await?;
    let started = Instant::now();
    let mut copy = conn.copy_in_raw("COPY bench_users_copy FROM STDIN").await?;
    for chunk in chunks {
        copy.send(chunk).await?;
    }
    copy.finish().await?;
    Ok(started.elapsed().as_secs_f64())
}
