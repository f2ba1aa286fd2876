//! `audit`: what the verifiable log costs and how fast it answers, in one run.
//!
//! 1. **Relay with the tree on against off.** A backlog written with SQL is published by a
//!    `cairn relay` process alone (nothing else running), first with `CAIRN_AUDIT_TREE=off`, then
//!    with it on (the fold beside the publishing loop), each to a namespace of its own so both
//!    publish the whole backlog. Off: the relay checkpoint from idle to the end. On: from idle to
//!    the moment both the relay checkpoint and the tree cover the backlog.
//! 2. **Export.** The log grown to 1,000,000 events (SQL again) and folded by `cairn serve`; then
//!    `GET /api/v1/audit/events/export?format=ndjson` read to the end, events/s, and the
//!    service's RSS sampled every 20 ms: its growth over the RSS before the export. Baseline:
//!    `COPY (SELECT audit_leaf_text(e) …) TO STDOUT` of the same events.
//! 3. **Verify.** `cairn audit verify --json` over the whole log, as a process: events/s and its
//!    peak RSS. Baseline: one `SELECT count(audit_leaf_hash(e)) FROM events e` (Postgres hashing
//!    every event, nothing compared).
//! 4. **Proofs.** `GET /api/v1/audit/proof/{event_id}` for random events of the 1,000,000-leaf
//!    tree, one at a time: latency p50/p99.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};

use super::{Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::seed;
use crate::service::{memory_of, Memory};
use crate::stats::Summary;

/// Events per seeded user: a registration and four role changes.
const EVENTS_PER_USER: usize = 5;

/// The last sample with nothing done and the first with everything done.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    idle: Option<Instant>,
    done: Option<Instant>,
}

impl Progress {
    /// `value` below `start`: nothing done yet; at `end` or past it: all done.
    fn observe(&mut self, at: Instant, value: i64, start: i64, end: i64) {
        if value < start {
            self.idle = Some(at);
        }
        if value >= end && self.done.is_none() {
            self.done = Some(at);
        }
    }

    fn seconds(&self) -> Option<f64> {
        Some(self.done?.duration_since(self.idle?).as_secs_f64())
    }
}

/// Runs `cairn relay` alone on `namespace` until its checkpoint reaches `last_pos` (and, with the
/// tree on, the tree grows from `tree_start` to `tree_end`). Returns (publishing, all done) from
/// idle, in seconds.
async fn relay_run(
    env: &BenchEnv,
    namespace: &str,
    tree: bool,
    (first_pos, last_pos): (i64, i64),
    (tree_start, tree_end): (i64, i64),
) -> anyhow::Result<(f64, f64)> {
    let listen = format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    let log = std::fs::File::create(env.scratch_file(&format!("relay-{namespace}.log")))?;
    let mut child = env
        .cairn_command(
            &["relay"],
            &[
                ("CAIRN_LISTEN", &listen),
                ("CAIRN_NAMESPACE", namespace),
                ("CAIRN_AUDIT_TREE", if tree { "on" } else { "off" }),
            ],
        )
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start cairn relay")?;
    let pid = child.id().context("cairn relay exited at once")?;
    let (mut publish, mut fold) = (Progress::default(), Progress::default());
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (published, folded): (i64, i64) = sqlx::query_as(
            "SELECT coalesce((SELECT last_pos FROM relay_checkpoints WHERE name = $1), 0), \
                    (SELECT tree_size FROM audit_tree)",
        )
        .bind(namespace)
        .fetch_one(&env.pool)
        .await?;
        let now = Instant::now();
        publish.observe(now, published, first_pos, last_pos);
        if tree {
            fold.observe(now, folded, tree_start + 1, tree_end);
        }
        if publish.done.is_some() && (!tree || fold.done.is_some()) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("cairn relay exited ({status}) before it caught up");
        }
        anyhow::ensure!(now < deadline, "cairn relay did not catch up within 15 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let publishing = publish.seconds().context("the relay's progress could not be timed")?;
    if !tree {
        return Ok((publishing, publishing));
    }
    let idle = publish.idle.zip(fold.idle).map(|(a, b)| a.min(b));
    let (Some(idle), Some(a), Some(b)) = (idle, publish.done, fold.done) else {
        anyhow::bail!("the fold's progress could not be timed");
    };
    Ok((publishing, a.max(b).duration_since(idle).as_secs_f64()))
}

/// Samples `pid`'s memory every 20 ms until `stop`; returns the largest RSS seen.
fn watch_rss(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(m) = memory_of(pid) {
                peak = peak.max(m.rss_mib);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    })
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails, a process fails or does not catch up.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let backlog = ctx.pick(20_000, 200_000);
    let total = ctx.pick(50_000, 1_000_000);
    let hash = seed::password_hash()?;

    // 1. The relay with the tree off, then on, over the same backlog.
    let spec = seed::Users {
        label: "backlog",
        users: backlog / EVENTS_PER_USER,
        events_per_user: EVENTS_PER_USER,
        chunk_events: 1_000,
        password_hash: &hash,
    };
    let seeding = Instant::now();
    seed::users(&env.pool, &spec).await?;
    sqlx::query("VACUUM ANALYZE events").execute(&env.pool).await?;
    let (first, last, count): (i64, i64, i64) =
        sqlx::query_as("SELECT min(global_position), max(global_position), count(*) FROM events")
            .fetch_one(&env.pool)
            .await?;
    out.note(format!(
        "backlog: {count} events ({} users × {EVENTS_PER_USER}) in transactions of 1,000, written in {:.1} s; \
         `cairn relay` alone publishes it with the tree off, then again (another namespace) with it on",
        spec.users,
        seeding.elapsed().as_secs_f64()
    ));
    let (off_ns, on_ns) = (format!("{}off", env.namespace), format!("{}on", env.namespace));
    for ns in [&off_ns, &on_ns] {
        env.track_stream(&cairn_platform::nats::Namespace::new(ns).events_stream());
    }
    let (off_seconds, _) = relay_run(env, &off_ns, false, (first, last), (0, 0)).await?;
    let (on_publish, on_all) = relay_run(env, &on_ns, true, (first, last), (0, count)).await?;
    let off_rate = count as f64 / off_seconds;
    let on_rate = count as f64 / on_all;
    let ratio = on_rate / off_rate;
    out.note(format!(
        "relay: tree off {off_seconds:.2} s; tree on {on_publish:.2} s to publish, {on_all:.2} s until published and folded"
    ));
    out.rows.push(
        Row::new(
            format!("relay, tree on: publish and fold a {count}-event backlog"),
            Measure::rate(on_rate, "events/s", None),
        )
        .baseline("the same relay, tree off (publish only)", Measure::rate(off_rate, "events/s", None))
        .target(">= 0.8 x tree off", ratio >= 0.8)
        .extra("publish_only_ratio", off_seconds / on_publish)
        .extra("tree_on_publish_seconds", on_publish)
        .extra("tree_on_all_seconds", on_all)
        .extra("tree_off_seconds", off_seconds),
    );

    // 2. The log grown to `total` events, folded by the service.
    let more = seed::Users {
        label: "log",
        users: (total - backlog) / EVENTS_PER_USER,
        events_per_user: EVENTS_PER_USER,
        chunk_events: 10_000,
        password_hash: &hash,
    };
    let seeding = Instant::now();
    seed::users(&env.pool, &more).await?;
    sqlx::query("VACUUM ANALYZE events").execute(&env.pool).await?;
    // The service's relay starts at the end: it has no backlog to publish, only the fold to do.
    sqlx::query(
        "INSERT INTO relay_checkpoints (name, last_tx, last_pos) \
         SELECT $1, transaction_id, global_position FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .bind(&env.namespace)
    .execute(&env.pool)
    .await?;
    out.note(format!("log grown to {total} events in {:.1} s", seeding.elapsed().as_secs_f64()));
    let folding = Instant::now();
    let running = Running::start(env, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(1200);
    let events = loop {
        let (events, head): (i64, Option<i64>) =
            sqlx::query_as("SELECT (SELECT count(*) FROM events), (SELECT max(tree_size) FROM audit_heads)")
                .fetch_one(&env.pool)
                .await?;
        if head == Some(events) {
            break events;
        }
        anyhow::ensure!(Instant::now() < deadline, "the tree did not cover the log within 20 minutes");
        running.service.memory().with_context(|| format!("the service died: {}", running.service.log_tail()))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    out.note(format!(
        "the service folded the log to {events} leaves with a head at that size {:.1} s after it started",
        folding.elapsed().as_secs_f64()
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Export.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1800)).build()?;
    let pid = running.service.pid();
    let before = running.service.memory()?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_rss(pid, Arc::clone(&stop));
    let started = Instant::now();
    let response = http
        .get(format!("{}/api/v1/audit/events/export?format=ndjson", running.service.base_url))
        .bearer_auth(&running.admin_token)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "export answered {}", response.status());
    let mut body = response.bytes_stream();
    let (mut lines, mut bytes) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    let export_seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak = watcher.await?.max(before.rss_mib);
    let exported = lines.saturating_sub(1); // the last line is the head
    let growth = peak - before.rss_mib;
    let copy_seconds = copy_baseline(env).await?;
    out.note(format!(
        "export: {exported} events and the head, {:.0} MiB, in {export_seconds:.1} s; service RSS {:.1} MiB before, \
         {peak:.1} MiB at most during (+{growth:.1} MiB)",
        bytes as f64 / 1_048_576.0,
        before.rss_mib
    ));
    out.rows.push(
        Row::new(
            format!("export {exported} events as NDJSON"),
            Measure::rate(exported as f64 / export_seconds, "events/s", None),
        )
        .memory(Some(Memory { peak_mib: peak, rss_mib: before.rss_mib }))
        .baseline(
            "COPY (SELECT audit_leaf_text(e) …) TO STDOUT",
            Measure::rate(events as f64 / copy_seconds, "events/s", None),
        )
        .target("RSS growth < 32 MiB", growth < 32.0)
        .extra("rss_growth_mib", growth)
        .extra("bytes", bytes),
    );

    // 3. Verify, as a process.
    let started = Instant::now();
    let mut child = env
        .cairn_command(&["audit", "verify", "--json"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start cairn audit verify")?;
    let verify_pid = child.id().context("cairn audit verify exited at once")?;
    let mut verify_memory: Option<Memory> = None;
    while child.try_wait()?.is_none() {
        verify_memory = memory_of(verify_pid).ok().or(verify_memory);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verify_seconds = started.elapsed().as_secs_f64();
    let output = child.wait_with_output().await?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("cairn audit verify: {}", String::from_utf8_lossy(&output.stderr)))?;
    anyhow::ensure!(report["intact"] == true, "the log is not intact: {report}");
    let checked = report["events_checked"].as_f64().unwrap_or(0.0);
    let hash_seconds = hash_baseline(env).await?;
    out.note(format!(
        "verify: {checked} events and {} heads in {verify_seconds:.1} s (process start included); Postgres alone hashes \
         the {events} events in {hash_seconds:.1} s",
        report["heads_checked"]
    ));
    out.rows.push(
        Row::new(
            format!("`cairn audit verify` over {checked} events"),
            Measure::rate(checked / verify_seconds, "events/s", None),
        )
        .memory(verify_memory)
        .baseline(
            "SELECT count(audit_leaf_hash(e)) FROM events e",
            Measure::rate(events as f64 / hash_seconds, "events/s", None),
        )
        .extra("heads_checked", report["heads_checked"].clone()),
    );

    // 4. Proofs of random events.
    let samples: i64 = ctx.pick(200, 2_000);
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT event_id FROM audit_leaves WHERE leaf_index IN \
         (SELECT (random() * ($1 - 1))::bigint FROM generate_series(1, $2))",
    )
    .bind(events)
    .bind(samples)
    .fetch_all(&env.pool)
    .await?;
    let mut latencies = Vec::with_capacity(ids.len());
    let started = Instant::now();
    for id in &ids {
        let at = Instant::now();
        let response = http
            .get(format!("{}/api/v1/audit/proof/{id}", running.service.base_url))
            .bearer_auth(&running.admin_token)
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "proof answered {}", response.status());
        let _ = response.bytes().await?;
        latencies.push(at.elapsed());
    }
    let proof_rate = ids.len() as f64 / started.elapsed().as_secs_f64();
    let summary = Summary::of(&latencies);
    let p99 = summary.map_or(f64::MAX, |s| s.p99_ms);
    out.rows.push(
        Row::new(
            format!("inclusion proof of a random event, tree of {events}, one client"),
            Measure::rate(proof_rate, "proofs/s", summary),
        )
        .memory(running.service.memory().ok())
        .target("p99 < 10 ms", p99 < 10.0),
    );
    running.service.stop().await?;
    Ok(())
}

/// Seconds for `COPY (SELECT audit_leaf_text(e) …) TO STDOUT` of the whole log, read and dropped.
async fn copy_baseline(env: &BenchEnv) -> anyhow::Result<f64> {
    let mut conn = env.pool.acquire().await?;
    let started = Instant::now();
    let mut stream = conn
        .copy_out_raw(
            "COPY (SELECT audit_leaf_text(e) FROM events e ORDER BY transaction_id, global_position) TO STDOUT",
        )
        .await?;
    while stream.try_next().await?.is_some() {}
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds for Postgres to hash every event once.
async fn hash_baseline(env: &BenchEnv) -> anyhow::Result<f64> {
    let started = Instant::now();
    let _: i64 = sqlx::query_scalar("SELECT count(audit_leaf_hash(e)) FROM events e").fetch_one(&env.pool).await?;
    Ok(started.elapsed().as_secs_f64())
}
