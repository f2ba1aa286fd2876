//! `stalled-smtp`: the `lag` measurement while the mail server holds the email worker at DATA,
//! beside the same measurement with a mail server that answers at once.
//!
//! Both runs use one SMTP server of the benchmark's own (answers the greeting, EHLO, MAIL and RCPT
//! at once; at DATA it answers at once, or holds its answer for 10 minutes) and
//! `SMTP_TIMEOUT_SECS=600`, so in the stalled run the worker stays in one send for the whole
//! measurement. A registration made just before the measured run gives it the mail to be stuck
//! in. The worker sends with no transaction open, so the relay's horizon should not notice: the
//! figure is stalled lag ÷ responsive lag (p99), which should be close to 1. Then SIGTERM →
//! exit of the stalled service is timed, with `CAIRN_SHUTDOWN_GRACE_SECS=5`: the send is aborted
//! after the grace period.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::lag;
use super::write::{Targets, TARGET_USERS};
use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::stalling_smtp::StallingSmtp;

/// How long the stalled server holds DATA: longer than any run.
const STALL: Duration = Duration::from_secs(600);

/// The grace period the service is started with.
const GRACE_SECS: u64 = 5;

/// Runs the scenario.
///
/// # Errors
/// When set-up fails, the worker never reaches DATA, or nothing was measured.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let targets = Targets::seed(env, "target", TARGET_USERS, 1).await?;
    let smtp = StallingSmtp::start(0, Duration::ZERO).await.context("cannot start the SMTP server")?;
    let port = smtp.port().to_string();
    let grace = GRACE_SECS.to_string();
    let vars = [
        ("SMTP_HOST", "127.0.0.1"),
        ("SMTP_PORT", port.as_str()),
        ("SMTP_TIMEOUT_SECS", "600"),
        ("CAIRN_SHUTDOWN_GRACE_SECS", grace.as_str()),
    ];

    let running = Running::start(env, &vars).await?;
    // The seeded users reach the read model first, or the first run would measure that catch-up.
    let responsive = match caught_up(env).await {
        Ok(()) => lag::measure(ctx, env, &targets, &running, "responsive SMTP: ", out).await,
        Err(e) => Err(e),
    };
    running.service.stop().await?;
    let responsive = responsive?;

    smtp.set_stall(STALL);
    let running = Running::start(env, &vars).await?;
    let stalled = stalled_run(ctx, env, &targets, &running, &smtp, out).await;
    let signalled = Instant::now();
    let memory = running.service.stop().await?;
    let stop = signalled.elapsed();
    let stalled = stalled?;

    let ratio = stalled.p99_ms / responsive.p99_ms.max(0.001);
    out.rows.push(
        Row::new("lag p99 with SMTP stalled at DATA (ms)", Measure::rate(stalled.p99_ms, "ms", Some(stalled)))
            .baseline(
                "lag p99 with a responsive SMTP server (ms)",
                Measure::rate(responsive.p99_ms, "ms", Some(responsive)),
            )
            .ratio(ratio)
            .target("stalled ÷ responsive <= 2", ratio <= 2.0)
            .extra("p50_ratio", stalled.p50_ms / responsive.p50_ms.max(0.001)),
    );
    let limit = Duration::from_secs(GRACE_SECS + 1);
    out.rows.push(
        Row::new("SIGTERM → exit, a mail send hanging", Measure::rate(stop.as_secs_f64(), "s", None))
            .memory(Some(memory))
            .target(&format!("<= grace ({GRACE_SECS} s) + 1 s"), stop <= limit),
    );
    out.note(format!(
        "stalled SMTP: the mail server held {} DATA command(s); lag ratio = stalled p99 ÷ responsive p99",
        smtp.stalled_total()
    ));
    Ok(())
}

/// Gives the worker a mail to be stuck in, measures the lag while it is, and checks it still was.
async fn stalled_run(
    ctx: &Ctx,
    env: &BenchEnv,
    targets: &Targets,
    running: &Running,
    smtp: &StallingSmtp,
    out: &mut Output,
) -> anyhow::Result<crate::stats::Summary> {
    running.api.register("stalled@bench.local", "stalled-mail-password-0001", "Stalled").await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while smtp.stalled_now() == 0 {
        if Instant::now() > deadline {
            bail!("the email worker never reached DATA");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    caught_up(env).await?;
    let measured = lag::measure(ctx, env, targets, running, "SMTP stalled at DATA: ", out).await?;
    if smtp.stalled_now() == 0 {
        bail!("the mail server stopped holding DATA before the measurement ended");
    }
    Ok(measured)
}

/// Waits until the users projection has applied the last event in the log.
async fn caught_up(env: &BenchEnv) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let behind: bool = sqlx::query_scalar(
            "SELECT coalesce((SELECT (transaction_id::text::bigint, global_position) FROM events \
                               ORDER BY transaction_id DESC, global_position DESC LIMIT 1) \
                             > (SELECT (last_tx::text::bigint, last_pos) FROM projection_checkpoints \
                                 WHERE name = 'users'), true)",
        )
        .fetch_one(&env.pool)
        .await?;
        if !behind {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the users projection did not catch up with the log");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
