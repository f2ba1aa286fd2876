//! `write`: commands per second through HTTP for a cheap command, a role grant or revoke on many
//! users, at 1, 16 and 64 concurrent clients; registration latency (argon2 included).
//!
//! Baseline: single-row INSERT transactions of the same row shape (the seven columns postgres-es
//! writes, into a copy of the events table with the same columns, defaults and indexes) through
//! sqlx on as many connections as there are clients, measured after the service has stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use super::{with_cpu, Ctx, Output, Running};
use crate::api::Api;
use crate::env::BenchEnv;
use crate::load::{closed_loop, Outcome, Window};
use crate::report::{Measure, Row};
use crate::seed;

/// Concurrency levels of the cheap command.
pub const LEVELS: [usize; 3] = [1, 16, 64];
/// Users the role commands spread over: 64 per client at the highest level, so streams stay short
/// (a dozen events or so by the end of a full run) and the command stays cheap.
pub const TARGET_USERS: usize = 4_096;

/// Users to grant and revoke `operator` on, with whether each holds it now.
#[derive(Clone)]
pub struct Targets {
    ids: Arc<Vec<Uuid>>,
    holds: Arc<Vec<AtomicBool>>,
}

impl Targets {
    /// Seeds `users` users with `events_per_user` events each (see [`seed::users`]).
    ///
    /// # Errors
    /// When seeding fails.
    pub async fn seed(env: &BenchEnv, label: &str, users: usize, events_per_user: usize) -> anyhow::Result<Self> {
        let hash = seed::password_hash()?;
        let spec = seed::Users { label, users, events_per_user, chunk_events: 10_000, password_hash: &hash };
        let ids = seed::users(&env.pool, &spec).await?;
        let holds = ids.iter().map(|_| AtomicBool::new(seed::holds_operator(events_per_user))).collect();
        Ok(Self { ids: Arc::new(ids), holds: Arc::new(holds) })
    }

    /// The users' ids.
    #[must_use]
    pub fn ids(&self) -> &[Uuid] {
        &self.ids
    }

    /// Grants `operator` to user `i` if it lacks it, else revokes it; returns the label and the
    /// consistency token. A conflict (the state was not what this side believed, after a
    /// timed-out request) flips the belief so the next call succeeds.
    ///
    /// # Errors
    /// Whatever the service answered, if not 200.
    pub async fn toggle(&self, api: &Api, admin: &str, i: usize) -> anyhow::Result<(&'static str, String)> {
        let id = self.ids[i];
        let holds = self.holds[i].load(Ordering::Relaxed);
        let result = if holds {
            api.revoke_role(admin, id, "operator").await.map(|a| ("revoke", a.token))
        } else {
            api.grant_role(admin, id, "operator").await.map(|a| ("grant", a.token))
        };
        match &result {
            Ok(_) => self.holds[i].store(!holds, Ordering::Relaxed),
            Err(e) if e.to_string().contains("409") => self.holds[i].store(!holds, Ordering::Relaxed),
            Err(_) => {}
        }
        result
    }
}

/// Closed-loop role grants and revokes from `clients` clients, each cycling over its own share
/// of the targets (so no two clients ever command the same user at once).
///
/// # Errors
/// When a client task fails.
pub async fn toggle_load(
    running: &Running,
    targets: &Targets,
    clients: usize,
    window: Window,
) -> anyhow::Result<Outcome> {
    let n = targets.ids().len();
    let states: Vec<(Vec<usize>, usize)> = (0..clients).map(|c| ((c..n).step_by(clients).collect(), 0)).collect();
    let (api, admin, targets) = (running.api.clone(), Arc::new(running.admin_token.clone()), targets.clone());
    closed_loop(states, window, move |(mine, next): (Vec<usize>, usize)| {
        let (api, admin, targets) = (api.clone(), admin.clone(), targets.clone());
        async move {
            let i = mine[next % mine.len()];
            let result = targets.toggle(&api, &admin, i).await.map(|(label, _)| label);
            ((mine, next + 1), result)
        }
    })
    .await
}

/// Closed-loop registrations from `clients` clients, each with a new email.
async fn register_load(api: &Api, clients: usize, window: Window) -> anyhow::Result<Outcome> {
    let counter = Arc::new(AtomicU64::new(0));
    let api = api.clone();
    closed_loop(vec![(); clients], window, move |()| {
        let (api, counter) = (api.clone(), counter.clone());
        async move {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let email = format!("reg{n}-{}@bench.local", &Uuid::new_v4().simple().to_string()[..8]);
            let result = api.register(&email, seed::PASSWORD, &format!("Registered {n}")).await.map(|_| "register");
            ((), result)
        }
    })
    .await
}

/// Closed-loop single-row INSERT transactions into `table` from `clients` connections, each
/// appending to its own aggregate with rising sequence numbers.
///
/// # Errors
/// When the pool cannot be opened or a client task fails.
pub async fn insert_baseline(env: &BenchEnv, table: &str, clients: usize, window: Window) -> anyhow::Result<Outcome> {
    let pool = env.pool_of(u32::try_from(clients)?).await?;
    let sql = Arc::new(format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('User', $1, $2, 'RoleGranted', '1', $3, $4)"
    ));
    let payload = json!({ "RoleGranted": { "role": "operator" } });
    let states: Vec<(String, i64)> = (0..clients).map(|_| (Uuid::new_v4().to_string(), 1)).collect();
    let outcome = {
        let pool: PgPool = pool.clone();
        closed_loop(states, window, move |(aggregate, sequence): (String, i64)| {
            let (pool, sql, payload) = (pool.clone(), sql.clone(), payload.clone());
            async move {
                let request = Uuid::new_v4().to_string();
                let metadata = json!({
                    "actor_id": aggregate, "request_id": request, "correlation_id": request,
                    "causation_id": request, "client_ip": "127.0.0.1", "user_agent": "cairn-bench",
                });
                let result = sqlx::query(&sql)
                    .bind(&aggregate)
                    .bind(sequence)
                    .bind(payload)
                    .bind(metadata)
                    .execute(&pool)
                    .await
                    .map(|_| "insert")
                    .map_err(anyhow::Error::from);
                ((aggregate, sequence + 1), result)
            }
        })
        .await?
    };
    pool.close().await;
    Ok(outcome)
}

/// Creates `table` with the events table's columns, defaults and indexes (not its triggers).
///
/// # Errors
/// When Postgres refuses.
pub async fn create_events_copy(env: &BenchEnv, table: &str) -> anyhow::Result<()> {
    sqlx::query(&format!("CREATE TABLE {table} (LIKE events INCLUDING ALL)")).execute(&env.pool).await?;
    Ok(())
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or a load measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let window = ctx.window();
    let targets = Targets::seed(env, "target", TARGET_USERS, 1).await?;
    create_events_copy(env, "bench_events").await?;
    out.note(format!(
        "cheap command: alternating role grant / revoke of `operator` over {TARGET_USERS} users, each client owning its share; \
         {:.1} s warm-up, {:.0} s measured per level; each level's baseline runs right after it, with the service stopped",
        window.warmup.as_secs_f64(),
        window.measure.as_secs_f64()
    ));
    let mut grant_latency = Vec::new();
    for clients in LEVELS {
        let running = Running::start(env, &[]).await?;
        let (outcome, cpu) =
            with_cpu(ctx, running.service.pid(), toggle_load(&running, &targets, clients, window)).await?;
        let memory = running.service.memory().ok();
        running.service.stop().await?;
        outcome.require_success(&format!("role commands at {clients} clients"))?;
        let baseline = insert_baseline(env, "bench_events", clients, window).await?;
        baseline.require_success("baseline INSERT")?;
        if let Some(s) = outcome.summary_of("grant") {
            grant_latency.push(format!("{clients} client(s) p50 {:.2} ms, p99 {:.2} ms", s.p50_ms, s.p99_ms));
        }
        let plural = if clients == 1 { "" } else { "s" };
        let mut row = Row::new(
            format!("role grant/revoke, {clients} client{plural}"),
            Measure::rate(outcome.throughput(), "commands/s", outcome.summary()),
        )
        .errors(outcome.errors)
        .memory(memory)
        .cpu(cpu)
        .baseline(
            format!("single-row INSERT, {clients} connection{plural}"),
            Measure::rate(baseline.throughput(), "tx/s", baseline.summary()),
        );
        for label in ["grant", "revoke"] {
            if let Some(s) = outcome.summary_of(label) {
                row = row.extra(&format!("{label}_p50_ms"), s.p50_ms).extra(&format!("{label}_p99_ms"), s.p99_ms);
            }
        }
        if let Some(e) = &outcome.first_error {
            row = row.extra("first_error", e.clone());
        }
        if clients == 64 {
            let met = row.ratio.is_some_and(|r| r >= 0.5);
            row = row.target(">= 0.5 x INSERT", met);
        }
        out.rows.push(row);
    }
    out.note(format!("role grant alone: {}", grant_latency.join("; ")));

    let running = Running::start(env, &[]).await?;
    for clients in [1usize, 16] {
        let outcome = register_load(&running.api, clients, window).await?;
        outcome.require_success(&format!("registrations at {clients} clients"))?;
        let mut row = Row::new(
            format!("register (argon2id hash included), {clients} client{}", if clients == 1 { "" } else { "s" }),
            Measure::rate(outcome.throughput(), "registrations/s", outcome.summary()),
        )
        .errors(outcome.errors)
        .memory(running.service.memory().ok());
        if let Some(e) = &outcome.first_error {
            row = row.extra("first_error", e.clone());
        }
        out.rows.push(row);
    }
    running.service.stop().await?;
    Ok(())
}
