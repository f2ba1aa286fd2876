//! Lag gauges tell the truth: the relay's counts the events past its checkpoint while NATS is
//! down, and each consumer's counts from its own checkpoint to the log's head, not to the last
//! message it saw. (Alone in its test binary: the gauges are process-wide.)

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::Services;
use common::{PrivateNats, TestApp, TestEnv};
use reqwest::StatusCode;

async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    let text = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Committed events past a checkpoint stored in `table` under `name`.
async fn past(app: &TestApp, table: &str, name: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM events e, {table} c WHERE c.name = $1 \
           AND (e.transaction_id, e.global_position) > (c.last_tx, c.last_pos)"
    ))
    .bind(name)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// Waits until gauge `name` shows what `expected` computes (at least `min`), within 20 s.
async fn wait_gauge<F, Fut>(app: &TestApp, name: &str, min: i64, expected: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let started = Instant::now();
    loop {
        let want = expected().await;
        let seen = metric(app, name).await;
        if want >= min && seen == Some(want as f64) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} is {seen:?}, the log says {want} (at least {min})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const USERS_LAG: &str = "cairn_consumer_lag_events{consumer=\"users\"}";
const AUDIT_LAG: &str = "cairn_consumer_lag_events{consumer=\"audit\"}";
const RELAY_LAG: &str = "cairn_relay_lag_events";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_is_counted_from_each_checkpoint_to_the_log_head_while_nats_is_down() {
    let mut nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.nats_url = nats.url();
    let ns = env.namespace.clone();
    let app = TestApp::spawn_with(env, Services::all(), &[]).await;
    app.register_ok("first@example.com").await;
    // Caught up: every gauge at zero.
    for gauge in [RELAY_LAG, USERS_LAG, AUDIT_LAG] {
        wait_gauge(&app, gauge, 0, || async { 0 }).await;
    }

    // NATS stops; commands go on appending.
    nats.stop();
    for i in 0..3 {
        let reply = app.register(&format!("offline-{i}@example.com")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    }
    // The relay's gauge counts what it has not published ...
    wait_gauge(&app, RELAY_LAG, 3, || past(&app, "relay_checkpoints", &ns)).await;
    // ... and each consumer's counts from its checkpoint to the log's head, though nothing new
    // reached it: a projection from its stored checkpoint, a worker from the last event it applied.
    wait_gauge(&app, USERS_LAG, 3, || past(&app, "projection_checkpoints", "users")).await;
    wait_gauge(&app, AUDIT_LAG, 3, || past(&app, "relay_checkpoints", &ns)).await;

    // NATS returns: everything is published and applied, and the gauges say so.
    nats.restart();
    for gauge in [RELAY_LAG, USERS_LAG, AUDIT_LAG] {
        wait_gauge(&app, gauge, 0, || async { 0 }).await;
    }
    assert_eq!(past(&app, "relay_checkpoints", &ns).await, 0);
    app.stop().await;
}
