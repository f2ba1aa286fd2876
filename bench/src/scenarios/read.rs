//! `read`: GET requests per second at 64 clients for the first page of the user list
//! (`?limit=20`) and for single users picked at random.
//!
//! Baseline: the same SQL as the query API's store, with the same parameters, decoded into the
//! same columns through sqlx on 64 connections, measured after the service has stopped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use super::{with_cpu, Ctx, Output, Running};
use crate::env::BenchEnv;
use crate::load::{closed_loop, Outcome, Window};
use crate::report::{Measure, Row};
use crate::seed;

/// Concurrent clients.
const CLIENTS: usize = 64;
/// Page size of the list.
const PAGE: u32 = 20;

/// The columns the query API selects.
const COLUMNS: &str = "id, email, display_name, status, roles, email_verified, created_at, updated_at";
type UserRow = (Uuid, String, String, String, Vec<String>, bool, DateTime<Utc>, DateTime<Utc>);

/// The list query of the query API, no filter, first page.
fn list_sql() -> String {
    format!(
        "SELECT {COLUMNS} FROM users \
         WHERE ($1::text IS NULL OR email ILIKE $1 OR display_name ILIKE $1) \
           AND ($2::text IS NULL OR roles @> ARRAY[$2::text]) \
           AND (CASE WHEN $3::text IS NULL THEN status <> 'deleted' ELSE status = $3 END) \
           AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5)) \
         ORDER BY created_at DESC, id DESC LIMIT $6"
    )
}

#[derive(Clone, Copy)]
enum Query {
    List,
    One,
}

async fn sql_load(pool: &PgPool, ids: &Arc<Vec<Uuid>>, query: Query, window: Window) -> anyhow::Result<Outcome> {
    let (pool, ids) = (pool.clone(), ids.clone());
    let list = Arc::new(list_sql());
    let one = Arc::new(format!("SELECT {COLUMNS} FROM users WHERE id = $1"));
    closed_loop(vec![(); CLIENTS], window, move |()| {
        let (pool, ids, list, one) = (pool.clone(), ids.clone(), list.clone(), one.clone());
        async move {
            let result = match query {
                Query::List => sqlx::query_as::<_, UserRow>(&list)
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .bind(None::<String>)
                    .bind(None::<DateTime<Utc>>)
                    .bind(None::<Uuid>)
                    .bind(i64::from(PAGE) + 1)
                    .fetch_all(&pool)
                    .await
                    .map(|_| "list"),
                Query::One => {
                    let id = ids[rand::thread_rng().gen_range(0..ids.len())];
                    sqlx::query_as::<_, UserRow>(&one).bind(id).fetch_optional(&pool).await.map(|_| "one")
                }
            };
            ((), result.map_err(anyhow::Error::from))
        }
    })
    .await
}

async fn http_load(running: &Running, ids: &Arc<Vec<Uuid>>, query: Query, window: Window) -> anyhow::Result<Outcome> {
    let (api, token, ids) = (running.api.clone(), Arc::new(running.admin_token.clone()), ids.clone());
    closed_loop(vec![(); CLIENTS], window, move |()| {
        let (api, token, ids) = (api.clone(), token.clone(), ids.clone());
        async move {
            let result = match query {
                Query::List => api.list_users(&token, PAGE).await.map(|()| "list"),
                Query::One => {
                    let id = ids[rand::thread_rng().gen_range(0..ids.len())];
                    api.get_user(&token, id, None).await.map(|_| "one")
                }
            };
            ((), result)
        }
    })
    .await
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails or a load measures nothing.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let window = ctx.window();
    let users = ctx.pick(1_000, 10_000);
    let hash = seed::password_hash()?;
    let spec = seed::Users { label: "reader", users, events_per_user: 1, chunk_events: 5_000, password_hash: &hash };
    let ids = Arc::new(seed::users(&env.pool, &spec).await?);
    out.note(format!(
        "{users} users in the read model; {CLIENTS} clients; the admin's token on every request; each query's baseline \
         runs right after it, with the service stopped"
    ));
    for (query, name) in
        [(Query::List, format!("GET /api/v1/users?limit={PAGE}")), (Query::One, "GET /api/v1/users/{id}".to_owned())]
    {
        let running = Running::start(env, &[]).await?;
        seed::wait_projected(&env.pool, Duration::from_secs(300)).await?;
        sqlx::query("VACUUM ANALYZE users").execute(&env.pool).await?;
        let (outcome, cpu) = with_cpu(ctx, running.service.pid(), http_load(&running, &ids, query, window)).await?;
        let memory = running.service.memory().ok();
        running.service.stop().await?;
        outcome.require_success(&name)?;
        let pool = env.pool_of(u32::try_from(CLIENTS)?).await?;
        let baseline = sql_load(&pool, &ids, query, window).await?;
        pool.close().await;
        baseline.require_success("baseline SQL")?;
        let what = match query {
            Query::List => "the list SQL",
            Query::One => "the by-id SQL",
        };
        let mut row = Row::new(
            format!("{name}, {CLIENTS} clients"),
            Measure::rate(outcome.throughput(), "req/s", outcome.summary()),
        )
        .errors(outcome.errors)
        .memory(memory)
        .cpu(cpu)
        .baseline(
            format!("{what} through sqlx, {CLIENTS} connections"),
            Measure::rate(baseline.throughput(), "queries/s", baseline.summary()),
        );
        let met = row.ratio.is_some_and(|r| r >= 0.6);
        row = row.target(">= 0.6 x sqlx", met);
        if let Some(e) = &outcome.first_error {
            row = row.extra("first_error", e.clone());
        }
        out.rows.push(row);
    }
    Ok(())
}
