//! Real faults: a projector killed with SIGKILL mid-stream, and NATS stopped while commands run.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use cairn::Services;
use common::{PrivateNats, TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

async fn checkpoint(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT coalesce((SELECT last_pos FROM projection_checkpoints WHERE name = 'users'), 0)")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn last_position(pool: &PgPool) -> i64 {
    // The position the projector ends at: the last event in (transaction_id, global_position) order.
    sqlx::query_scalar("SELECT coalesce((SELECT global_position FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1), 0)")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_projected(pool: &PgPool, timeout: Duration) {
    let target = last_position(pool).await;
    let started = Instant::now();
    while checkpoint(pool).await != target {
        assert!(started.elapsed() < timeout, "projector stuck at {} of {target}", checkpoint(pool).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The read tables equal a rebuild from the log, row for row.
async fn assert_matches_rebuild(pool: &PgPool) {
    cairn_projector::rebuild(pool, &cairn_projector::UsersProjection, 500, false).await.unwrap();
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM public.users").fetch_one(pool).await.unwrap();
    let rebuilt: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cairn_rebuild_users.users").fetch_one(pool).await.unwrap();
    let differing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ((SELECT * FROM public.users EXCEPT SELECT * FROM cairn_rebuild_users.users) \
                         UNION ALL (SELECT * FROM cairn_rebuild_users.users EXCEPT SELECT * FROM public.users)) d",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(live > 0);
    assert_eq!((live, differing), (rebuilt, 0), "read model differs from a rebuild of the log");
}

/// Many cheap commands: role grants and revokes across `users`.
async fn churn(app: &TestApp, admin: &str, users: &[uuid::Uuid], rounds: usize) -> usize {
    let mut handles = Vec::new();
    for id in users {
        let (client, base, admin, id) = (app.client.clone(), app.address.clone(), admin.to_owned(), *id);
        handles.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..rounds {
                let grant = client
                    .post(format!("{base}/api/v1/users/{id}/roles"))
                    .bearer_auth(&admin)
                    .json(&json!({ "role": "operator" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(grant.status(), StatusCode::OK, "{}", grant.text().await.unwrap_or_default());
                let revoke = client
                    .delete(format!("{base}/api/v1/users/{id}/roles/operator"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(revoke.status(), StatusCode::OK, "{}", revoke.text().await.unwrap_or_default());
                ok += 2;
            }
            ok
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_stream_resumes_where_it_stopped() {
    let services = Services { projector: false, ..Services::all() };
    let app = TestApp::spawn_with(TestEnv::new(), services, &[]).await;
    let (_, admin) = app.admin_token().await;
    let mut users = Vec::new();
    for i in 0..10 {
        users.push(app.register_ok(&format!("crash{i}@example.com")).await);
    }
    churn(&app, &admin, &users, 60).await;
    let target = last_position(&app.pool).await;

    // Kill it with SIGKILL twice, each time after it has committed some batches but not all.
    for kill in 0..2 {
        let mut projector = app
            .env
            .command(&["projector"])
            .env("CAIRN_PROJECTOR_BATCH", "10")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let before = checkpoint(&app.pool).await;
        let started = Instant::now();
        while checkpoint(&app.pool).await <= before {
            assert!(started.elapsed() < Duration::from_secs(30), "projector made no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        projector.kill().unwrap(); // SIGKILL
        projector.wait().unwrap();
        let at = checkpoint(&app.pool).await;
        assert!(at < target, "kill {kill} came too late to test anything ({at} of {target})");
    }
    let mut projector = app.env.command(&["projector"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_projected(&app.pool, Duration::from_secs(60)).await;
    projector.kill().unwrap();
    projector.wait().unwrap();
    assert_matches_rebuild(&app.pool).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_succeed_while_nats_is_down_and_nothing_is_lost_or_duplicated() {
    let mut nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.nats_url = nats.url();
    let app = TestApp::spawn_with(env, Services::all(), &[]).await;
    let (_, admin) = app.admin_token().await;
    let mut users = Vec::new();
    for i in 0..5 {
        users.push(app.register_ok(&format!("outage{i}@example.com")).await);
    }

    let before = churn(&app, &admin, &users, 10).await;
    nats.stop();
    // With the broker gone, the command side keeps accepting writes: they are in Postgres.
    let during = churn(&app, &admin, &users, 10).await;
    let registered_during = app.register_ok("during-outage@example.com").await;
    nats.restart();
    let after = churn(&app, &admin, &users, 10).await;
    assert_eq!(before + during + after, 5 * 2 * 30);

    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
    wait_projected(&app.pool, Duration::from_secs(60)).await;
    app.wait_count("SELECT count(*) FROM audit_log", events, Duration::from_secs(60)).await;
    // Published once each: the stream holds exactly the log.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream =
        js.get_stream(cairn_platform::nats::Namespace::new(&app.env.namespace).events_stream()).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, u64::try_from(events).unwrap());
    let seen: Option<String> = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
        .bind(registered_during)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
    assert_eq!(seen.as_deref(), Some("during-outage@example.com"));
    assert_matches_rebuild(&app.pool).await;
    app.stop().await;
}
