//! `jobs`: `noop` jobs through the job runner at 1, 16 and 64 concurrent workers
//! (`CAIRN_JOBS_CONCURRENCY=noop=N`): jobs/s executed for a backlog enqueued before the service
//! starts, and enqueue → start latency at a steady rate well below saturation, with the
//! service's RSS.
//!
//! Baselines, at the same concurrency and with the same payloads, in the same run (the service
//! stopped): raw JetStream (publish to a work-queue stream, then N pullers that pull and ack), and
//! a raw Postgres queue loop (insert, claim one row with `FOR UPDATE SKIP LOCKED`, mark it done)
//! on N connections.
//!
//! Throughput is read from the rows (cairn: first `started_at` to last `finished_at`) or timed
//! around the consumers (baselines); latency is `started_at - created_at` from the rows (cairn,
//! Postgres) or receive time minus publish time carried in the message (JetStream).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer::pull, stream};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::PgPool;

use super::{with_cpu, Ctx, Output};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::service::Service;
use crate::stats::Summary;

/// Concurrent workers of the `noop` kind.
pub const LEVELS: [usize; 3] = [1, 16, 64];

/// How long any one phase may take before the run is declared stuck.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// The job's arguments, and the broker message's body: the same bytes both ways.
fn payload(phase: &str, seq: u64) -> Value {
    json!({ "phase": phase, "seq": seq, "sent_us": Utc::now().timestamp_micros(), "note": "cairn bench noop payload" })
}

/// Sizes of one run.
struct Plan {
    backlog: u64,
    steady_rate: u64,
    steady_for: Duration,
}

impl Plan {
    fn of(ctx: &Ctx) -> Self {
        Self {
            backlog: ctx.pick(2_000, 20_000),
            steady_rate: 100,
            steady_for: ctx.pick(Duration::from_secs(3), Duration::from_secs(15)),
        }
    }

    fn steady_jobs(&self) -> u64 {
        self.steady_rate * self.steady_for.as_secs()
    }
}

/// Enqueues `count` `noop` jobs of `phase` with the typed enqueue, 500 to a transaction.
async fn enqueue_backlog(pool: &PgPool, phase: &str, count: u64) -> anyhow::Result<()> {
    let mut seq = 0;
    while seq < count {
        let mut tx = pool.begin().await?;
        for _ in 0..500.min(count - seq) {
            let job = cairn_platform::jobs::NewJob::new("noop", payload(phase, seq)).enqueued_by("system");
            cairn_platform::jobs::enqueue(&mut tx, &job, Utc::now()).await?;
            seq += 1;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Polls `query` (a count) until it reaches `expected`.
async fn wait_for(pool: &PgPool, what: &str, query: &str, expected: i64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar(query).fetch_one(pool).await?;
        if n >= expected {
            return Ok(());
        }
        if started.elapsed() > PHASE_LIMIT {
            bail!("{what}: {n} of {expected} after {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `enqueue(seq)` at `rate` per second for `duration`, each in a task of its own so a slow
/// one does not hold back the next (an open loop). Returns how many were sent.
async fn paced<F, Fut>(rate: u64, duration: Duration, enqueue: F) -> anyhow::Result<u64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let total = rate * duration.as_secs();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0..total {
        ticker.tick().await;
        tasks.spawn(enqueue(seq));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(total)
}

/// Latencies in milliseconds from the rows of `query` (one float column of seconds).
async fn latencies(pool: &PgPool, query: &str) -> anyhow::Result<Option<Summary>> {
    let seconds: Vec<f64> = sqlx::query_scalar(query).fetch_all(pool).await?;
    let samples: Vec<Duration> = seconds.iter().map(|s| Duration::from_secs_f64(s.max(0.0))).collect();
    Ok(Summary::of(&samples))
}

/// What cairn did at one level.
struct CairnLevel {
    jobs_per_s: f64,
    latency: Option<Summary>,
    memory: Option<crate::service::Memory>,
    cpu: super::CpuUse,
}

async fn cairn_level(ctx: &Ctx, env: &BenchEnv, plan: &Plan, workers: usize) -> anyhow::Result<CairnLevel> {
    sqlx::query("DELETE FROM jobs").execute(&env.pool).await?;
    let backlog = format!("backlog-{workers}");
    enqueue_backlog(&env.pool, &backlog, plan.backlog).await?;
    let concurrency = format!("noop={workers}");
    let service = Service::start(env, &[("CAIRN_JOBS_CONCURRENCY", concurrency.as_str())]).await?;
    let done = format!("SELECT count(*) FROM jobs WHERE status = 'done' AND args ->> 'phase' = '{backlog}'");
    let expected = i64::try_from(plan.backlog)?;
    let ((), cpu) = with_cpu(ctx, service.pid(), wait_for(&env.pool, "backlog", &done, expected)).await?;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM jobs WHERE args ->> 'phase' = $1",
    )
    .bind(&backlog)
    .fetch_one(&env.pool)
    .await?;
    let jobs_per_s = plan.backlog as f64 / seconds.max(1e-6);

    // Enqueue → start at a steady rate, each job in its own transaction, as code in a service would.
    let steady = format!("steady-{workers}");
    let pool = env.pool.clone();
    let sent = paced(plan.steady_rate, plan.steady_for, |seq| {
        let (pool, phase) = (pool.clone(), steady.clone());
        async move {
            let mut tx = pool.begin().await?;
            let job = cairn_platform::jobs::NewJob::new("noop", payload(&phase, seq)).enqueued_by("system");
            cairn_platform::jobs::enqueue(&mut tx, &job, Utc::now()).await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    let done = format!("SELECT count(*) FROM jobs WHERE status = 'done' AND args ->> 'phase' = '{steady}'");
    wait_for(&env.pool, "steady jobs", &done, i64::try_from(sent)?).await?;
    let latency = latencies(
        &env.pool,
        &format!(
            "SELECT extract(epoch FROM started_at - created_at)::float8 FROM jobs WHERE args ->> 'phase' = '{steady}'"
        ),
    )
    .await?;
    let memory = service.stop().await.ok();
    Ok(CairnLevel { jobs_per_s, latency, memory, cpu })
}

/// Raw JetStream at `workers` pullers: (jobs/s for the backlog, publish/s of the backlog,
/// publish → receive latency at the steady rate).
async fn jetstream_level(env: &BenchEnv, plan: &Plan, workers: usize) -> anyhow::Result<(f64, f64, Option<Summary>)> {
    let js = &env.jetstream;
    let name = format!("{}_BENCH_JOBS_{workers}", env.namespace.to_uppercase());
    let subject = format!("{}.benchjobs.{workers}", env.namespace);
    env.track_stream(&name);
    let _ = js.delete_stream(&name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .context("creating the baseline stream")?;
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(pull::Config {
            durable_name: Some("workers".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await?;

    // The backlog: published (every PubAck awaited), then pulled and acked by N workers.
    let started = Instant::now();
    let mut acks = Vec::with_capacity(1000);
    for seq in 0..plan.backlog {
        let body = serde_json::to_vec(&payload("backlog", seq))?;
        acks.push(js.publish(subject.clone(), body.into()).await?);
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await?;
    }
    let publish_per_s = plan.backlog as f64 / started.elapsed().as_secs_f64();

    let received = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (consumer, received, total) = (consumer.clone(), received.clone(), plan.backlog);
        tasks.spawn(async move {
            let mut messages = consumer.messages().await?;
            while received.load(Ordering::Relaxed) < total {
                let Ok(next) = tokio::time::timeout(Duration::from_millis(200), messages.next()).await else {
                    continue;
                };
                let Some(message) = next else { break };
                let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                message.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                received.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let deadline = started + PHASE_LIMIT;
    while received.load(Ordering::Relaxed) < plan.backlog {
        if Instant::now() > deadline {
            bail!("JetStream baseline stuck at {} of {}", received.load(Ordering::Relaxed), plan.backlog);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let jobs_per_s = plan.backlog as f64 / started.elapsed().as_secs_f64();
    while let Some(done) = tasks.join_next().await {
        done??;
    }

    // Publish → receive at the steady rate.
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(usize::try_from(plan.steady_jobs())?)));
    let expected = plan.steady_jobs();
    let seen = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (consumer, samples, seen) = (consumer.clone(), samples.clone(), seen.clone());
        tasks.spawn(async move {
            let mut messages = consumer.messages().await?;
            while seen.load(Ordering::Relaxed) < expected {
                let Ok(next) = tokio::time::timeout(Duration::from_millis(200), messages.next()).await else {
                    continue;
                };
                let Some(message) = next else { break };
                let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                let body: Value = serde_json::from_slice(&message.payload)?;
                let sent_us = body["sent_us"].as_i64().unwrap_or_default();
                let waited = Utc::now().timestamp_micros() - sent_us;
                message.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                if let Ok(mut samples) = samples.lock() {
                    samples.push(Duration::from_micros(u64::try_from(waited.max(0))?));
                }
                seen.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let publisher = js.clone();
    paced(plan.steady_rate, plan.steady_for, |seq| {
        let (js, subject) = (publisher.clone(), subject.clone());
        async move {
            let body = serde_json::to_vec(&payload("steady", seq))?;
            js.publish(subject, body.into()).await?.await?;
            Ok(())
        }
    })
    .await?;
    let deadline = Instant::now() + PHASE_LIMIT;
    while seen.load(Ordering::Relaxed) < expected {
        if Instant::now() > deadline {
            bail!("JetStream steady phase stuck at {} of {expected}", seen.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let latency = samples.lock().ok().and_then(|s| Summary::of(&s));
    js.delete_stream(&name).await?;
    Ok((jobs_per_s, publish_per_s, latency))
}

/// The raw Postgres queue table: the same payload, a status, and the times the latency needs.
async fn create_raw_queue(env: &BenchEnv) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_queue (id bigserial PRIMARY KEY, args jsonb NOT NULL, status text NOT NULL, \
                                                 created_at timestamptz NOT NULL, started_at timestamptz, finished_at timestamptz)",
    )
    .execute(&env.pool)
    .await?;
    sqlx::query("CREATE INDEX IF NOT EXISTS bench_queue_ready ON bench_queue (id) WHERE status = 'queued'")
        .execute(&env.pool)
        .await?;
    Ok(())
}

/// One worker of the raw loop: claims one row at a time and marks it done, until `stop` says so
/// (checked when nothing is due; it then polls every millisecond).
async fn raw_worker(pool: PgPool, drain_only: bool, stop: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<u64> {
    let mut ran = 0;
    loop {
        let claimed: Option<i64> = sqlx::query_scalar(
            "UPDATE bench_queue SET status = 'running', started_at = clock_timestamp() \
             WHERE id = (SELECT id FROM bench_queue WHERE status = 'queued' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) \
             RETURNING id",
        )
        .fetch_optional(&pool)
        .await?;
        match claimed {
            Some(id) => {
                sqlx::query("UPDATE bench_queue SET status = 'done', finished_at = clock_timestamp() WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await?;
                ran += 1;
            }
            None if drain_only || stop.load(Ordering::Relaxed) => return Ok(ran),
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Raw Postgres at `workers` connections: (jobs/s for the backlog, insert → claim latency at the
/// steady rate).
async fn postgres_level(env: &BenchEnv, plan: &Plan, workers: usize) -> anyhow::Result<(f64, Option<Summary>)> {
    create_raw_queue(env).await?;
    sqlx::query("TRUNCATE bench_queue").execute(&env.pool).await?;
    sqlx::query(
        "INSERT INTO bench_queue (args, status, created_at) \
         SELECT jsonb_build_object('phase', 'backlog', 'seq', g, 'sent_us', 0, 'note', 'cairn bench noop payload'), 'queued', clock_timestamp() \
         FROM generate_series(1, $1) AS g",
    )
    .bind(i64::try_from(plan.backlog)?)
    .execute(&env.pool)
    .await?;
    let pool = env.pool_of(u32::try_from(workers + 2)?).await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        tasks.spawn(raw_worker(pool.clone(), true, stop.clone()));
    }
    let mut ran = 0;
    while let Some(done) = tasks.join_next().await {
        ran += done??;
    }
    let jobs_per_s = ran as f64 / started.elapsed().as_secs_f64();
    if ran != plan.backlog {
        bail!("the raw Postgres loop ran {ran} of {}", plan.backlog);
    }

    // Insert → claim at the steady rate, the workers polling every millisecond when idle.
    sqlx::query("TRUNCATE bench_queue").execute(&env.pool).await?;
    for _ in 0..workers {
        tasks.spawn(raw_worker(pool.clone(), false, stop.clone()));
    }
    let inserter = pool.clone();
    let sent = paced(plan.steady_rate, plan.steady_for, |seq| {
        let pool = inserter.clone();
        async move {
            sqlx::query("INSERT INTO bench_queue (args, status, created_at) VALUES ($1, 'queued', clock_timestamp())")
                .bind(payload("steady", seq))
                .execute(&pool)
                .await?;
            Ok(())
        }
    })
    .await?;
    wait_for(&env.pool, "raw steady", "SELECT count(*) FROM bench_queue WHERE status = 'done'", i64::try_from(sent)?)
        .await?;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    pool.close().await;
    let latency =
        latencies(&env.pool, "SELECT extract(epoch FROM started_at - created_at)::float8 FROM bench_queue").await?;
    Ok((jobs_per_s, latency))
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails, a phase gets stuck or measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let plan = Plan::of(ctx);
    out.note(format!(
        "noop jobs: a backlog of {} enqueued (500 per transaction) before each level's service starts; then {} jobs/s \
         for {} s, each enqueued in its own transaction, for enqueue → start; each level's baselines run after its \
         service has stopped, with the same payloads",
        plan.backlog,
        plan.steady_rate,
        plan.steady_for.as_secs()
    ));
    for workers in LEVELS {
        let cairn = cairn_level(ctx, env, &plan, workers).await?;
        let (js_rate, js_publish, js_latency) = jetstream_level(env, &plan, workers).await?;
        let (pg_rate, pg_latency) = postgres_level(env, &plan, workers).await?;
        let plural = if workers == 1 { "" } else { "s" };
        let met = js_rate > 0.0 && cairn.jobs_per_s / js_rate >= 0.5;
        let row = Row::new(
            format!("noop backlog, {workers} worker{plural}"),
            Measure::rate(cairn.jobs_per_s, "jobs/s", None),
        )
        .memory(cairn.memory)
        .cpu(cairn.cpu)
        .baseline(format!("JetStream pull + ack, {workers} puller{plural}"), Measure::rate(js_rate, "msgs/s", None))
        .target(">= 0.5 x JetStream", met)
        .extra("jetstream_publish_per_s", js_publish)
        .extra("postgres_skip_locked_jobs_per_s", pg_rate)
        .extra("ratio_to_postgres_skip_locked", cairn.jobs_per_s / pg_rate.max(1e-9));
        out.rows.push(row);

        let p99 = cairn.latency.map_or(f64::INFINITY, |s| s.p99_ms);
        let mut row = Row::new(
            format!("enqueue → start at {} jobs/s, {workers} worker{plural}", plan.steady_rate),
            Measure::rate(plan.steady_rate as f64, "jobs/s", cairn.latency),
        )
        .memory(cairn.memory)
        .baseline(
            format!("JetStream publish → receive, {workers} puller{plural}"),
            Measure::rate(plan.steady_rate as f64, "msgs/s", js_latency),
        )
        .target("p99 <= 20 ms", p99 <= 20.0);
        if let (Some(c), Some(j)) = (cairn.latency, js_latency) {
            row = row.ratio(j.p99_ms / c.p99_ms.max(1e-9));
        }
        if let Some(pg) = pg_latency {
            row = row.extra("postgres_skip_locked_p50_ms", pg.p50_ms).extra("postgres_skip_locked_p99_ms", pg.p99_ms);
        }
        out.rows.push(row);
        out.note(format!(
            "{workers} worker{plural}: cairn {:.0} jobs/s, JetStream {js_rate:.0} msgs/s (published at {js_publish:.0}/s), \
             SKIP LOCKED loop {pg_rate:.0} jobs/s; enqueue → start p50/p99 cairn {}, JetStream {}, SKIP LOCKED {}",
            cairn.jobs_per_s,
            fmt_latency(cairn.latency),
            fmt_latency(js_latency),
            fmt_latency(pg_latency)
        ));
    }
    Ok(())
}

fn fmt_latency(summary: Option<Summary>) -> String {
    summary.map_or_else(|| "n/a".to_owned(), |s| format!("{:.1}/{:.1} ms", s.p50_ms, s.p99_ms))
}
