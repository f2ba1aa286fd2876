//! `relay`: a backlog of events is written with SQL before the service starts; then the relay's
//! checkpoint (events published to JetStream and acknowledged) and the users projection's
//! checkpoint (events applied to the read model) are sampled until both reach the end.
//!
//! Baselines, measured after the service stops: JetStream publish-and-ack of the same envelopes
//! (pipelined in windows as large as the relay's batch, with `Nats-Msg-Id`) to a scratch stream;
//! and single-row INSERTs of the finished read-model rows into a scratch copy of `users`, as many
//! rows as there were events, in transactions as large as the projector's batch.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;
use sqlx::Row as _;

use super::{Ctx, Output};
use crate::env::BenchEnv;
use crate::report::{Measure, Row};
use crate::seed;
use crate::service::Service;

/// Events per user in the backlog: a registration and four role changes.
const EVENTS_PER_USER: usize = 5;
/// The relay's default batch (`CAIRN_RELAY_BATCH`).
const RELAY_BATCH: usize = 1_000;
/// The projector's default batch (`CAIRN_PROJECTOR_BATCH`).
const PROJECTOR_BATCH: usize = 500;

/// Progress of one checkpoint: the last sample before it moved, and the first at the end.
#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    idle: Option<Instant>,
    done: Option<Instant>,
}

impl Progress {
    fn observe(&mut self, at: Instant, position: i64, start: i64, end: i64) {
        if position < start {
            self.idle = Some(at);
        }
        if position >= end && self.done.is_none() {
            self.done = Some(at);
        }
    }

    /// `events` per second from the last sample with nothing done to the first with all done.
    fn rate(&self, events: i64) -> Option<f64> {
        let seconds = self.done?.duration_since(self.idle?).as_secs_f64();
        (seconds > 0.0).then(|| events as f64 / seconds)
    }
}

/// Samples both checkpoints every 20 ms until both reach `end`.
async fn sample(pool: sqlx::PgPool, namespace: String, start: i64, end: i64) -> anyhow::Result<(Progress, Progress)> {
    let mut relay = Progress::default();
    let mut projector = Progress::default();
    let deadline = Instant::now() + Duration::from_secs(900);
    while relay.done.is_none() || projector.done.is_none() {
        let row = sqlx::query(
            "SELECT coalesce((SELECT last_pos FROM relay_checkpoints WHERE name = $1), 0) AS relay, \
                    coalesce((SELECT last_pos FROM projection_checkpoints WHERE name = 'users'), 0) AS projector",
        )
        .bind(&namespace)
        .fetch_one(&pool)
        .await?;
        let now = Instant::now();
        relay.observe(now, row.try_get("relay")?, start, end);
        projector.observe(now, row.try_get("projector")?, start, end);
        anyhow::ensure!(now < deadline, "the service did not catch up within 15 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((relay, projector))
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or the service does not catch up within ten minutes.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let backlog = ctx.pick(20_000, 200_000);
    let hash = seed::password_hash()?;
    let spec = seed::Users {
        label: "backlog",
        users: backlog / EVENTS_PER_USER,
        events_per_user: EVENTS_PER_USER,
        chunk_events: RELAY_BATCH,
        password_hash: &hash,
    };
    let seeding = Instant::now();
    seed::users(&env.pool, &spec).await?;
    let (start_pos, end): (i64, i64) =
        sqlx::query_as("SELECT min(global_position), max(global_position) FROM events").fetch_one(&env.pool).await?;
    let events = end - start_pos + 1;
    out.note(format!(
        "backlog: {events} events ({} users × {EVENTS_PER_USER}: a registration and four role changes) in transactions of \
         {RELAY_BATCH}, written in {:.1} s before the service started",
        spec.users,
        seeding.elapsed().as_secs_f64()
    ));

    let sampler = tokio::spawn(sample(env.pool.clone(), env.namespace.clone(), start_pos, end));
    let spawned = Instant::now();
    let service = match Service::start(env, &[]).await {
        Ok(service) => service,
        Err(e) => {
            sampler.abort();
            return Err(e);
        }
    };
    let ready = spawned.elapsed();
    let mut memory = service.memory().ok();
    while !sampler.is_finished() {
        match service.memory() {
            Ok(now) => memory = Some(now),
            Err(_) => {
                sampler.abort();
                anyhow::bail!("the service died while catching up: {}", service.log_tail());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sampled = sampler.await.context("the sampler panicked")?;
    let memory = service.stop().await.ok().or(memory);
    let (relay, projector) = sampled?;
    let relay_rate = relay.rate(events).context("the relay's progress could not be timed")?;
    let projector_rate = projector.rate(events).context("the projector's progress could not be timed")?;
    let total = |p: &Progress| p.done.map_or(0.0, |d| d.duration_since(spawned).as_secs_f64());
    out.note(format!(
        "service ready {:.1} s after start; relay done {:.1} s and projector done {:.1} s after start (each rate runs from \
         the last 20 ms sample with nothing done to the first with everything done)",
        ready.as_secs_f64(),
        total(&relay),
        total(&projector)
    ));

    let publish_rate = publish_baseline(env, start_pos, end).await?;
    let insert_rate = insert_baseline(env, usize::try_from(events)?).await?;
    out.rows.push(
        Row::new(format!("relay: publish a {events}-event backlog"), Measure::rate(relay_rate, "events/s", None))
            .memory(memory)
            .baseline(
                format!("JetStream publish+ack, pipelined {RELAY_BATCH}"),
                Measure::rate(publish_rate, "msgs/s", None),
            )
            .target(">= 20,000 events/s", relay_rate >= 20_000.0)
            .extra("seconds_from_start", total(&relay)),
    );
    out.rows.push(
        Row::new(format!("projector: apply a {events}-event backlog"), Measure::rate(projector_rate, "events/s", None))
            .memory(memory)
            .baseline(
                format!("single-row INSERT of the read-model rows, {PROJECTOR_BATCH} per tx"),
                Measure::rate(insert_rate, "rows/s", None),
            )
            .target(">= 20,000 events/s", projector_rate >= 20_000.0)
            .extra("seconds_from_start", total(&projector)),
    );
    Ok(())
}

/// Publishes the backlog's envelopes to a scratch stream like the EVENTS stream, in pipelined
/// windows, and returns messages per second (acknowledged).
async fn publish_baseline(env: &BenchEnv, from: i64, to: i64) -> anyhow::Result<f64> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT event_id::text, event_type, jsonb_build_object( \
                'event_id', event_id, 'aggregate_type', aggregate_type, 'aggregate_id', aggregate_id, \
                'sequence', sequence, 'event_type', event_type, 'event_version', event_version, \
                'transaction_id', transaction_id::text::bigint, 'global_position', global_position, \
                'recorded_at', recorded_at, 'payload', payload, 'metadata', metadata, \
                'previous_transaction_id', transaction_id::text::bigint, \
                'previous_global_position', global_position - 1)::text \
         FROM events WHERE global_position BETWEEN $1 AND $2 ORDER BY transaction_id, global_position",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&env.pool)
    .await?;
    let name = format!("{}_SCRATCH", env.namespace.to_uppercase());
    let prefix = format!("{}.scratch", env.namespace);
    env.track_stream(&name);
    let js = &env.jetstream;
    let _ = js.delete_stream(&name).await;
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the scratch stream: {e}"))?;
    let messages: Vec<(String, String, Bytes)> = rows
        .into_iter()
        .map(|(id, event_type, body)| (id, format!("{prefix}.User.{event_type}"), Bytes::from(body)))
        .collect();
    let started = Instant::now();
    for window in messages.chunks(RELAY_BATCH) {
        publish_window(js, window).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(messages.len() as f64 / seconds)
}

async fn publish_window(js: &jetstream::Context, window: &[(String, String, Bytes)]) -> anyhow::Result<()> {
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(window.len());
    for (id, subject, body) in window {
        let message = PublishMessage::build().payload(body.clone()).message_id(id);
        acks.push(js.send_publish(subject.clone(), message).await.context("publish failed")?);
    }
    for ack in acks {
        ack.await.context("no PubAck")?;
    }
    Ok(())
}

/// Inserts `count` rows shaped like the finished read model (cycling over it with fresh ids and
/// emails) one statement each, in transactions of the projector's batch size, on one connection;
/// returns rows per second.
async fn insert_baseline(env: &BenchEnv, count: usize) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE bench_users (LIKE users INCLUDING ALL)").execute(&env.pool).await?;
    type UserRow = (String, String, String, Vec<String>, bool, i64, chrono::DateTime<chrono::Utc>, i64);
    let rows: Vec<UserRow> = sqlx::query_as(
        "SELECT email, display_name, status, roles, email_verified, session_version, created_at, version FROM users",
    )
    .fetch_all(&env.pool)
    .await?;
    anyhow::ensure!(!rows.is_empty(), "the users read model is empty");
    let mut conn = env.pool.acquire().await?;
    let started = Instant::now();
    let mut written = 0usize;
    while written < count {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        for i in written..(written + PROJECTOR_BATCH).min(count) {
            let (email, name, status, roles, verified, session, created, version) = &rows[i % rows.len()];
            sqlx::query(
                "INSERT INTO bench_users (id, email, display_name, status, roles, email_verified, session_version, \
                                          created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
            )
            .bind(uuid::Uuid::new_v4())
            .bind(format!("{i}.{email}"))
            .bind(name)
            .bind(status)
            .bind(roles)
            .bind(verified)
            .bind(session)
            .bind(created)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        written = (written + PROJECTOR_BATCH).min(count);
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}
