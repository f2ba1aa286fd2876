//! Projection rebuilds started from the API and the CLI: under load, reads answer throughout and
//! the swapped-in table equals a rebuild from scratch; one rebuild per projection at a time; a
//! failed rebuild leaves the live tables serving; `cairn replay` shows its progress.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// Small batches with a pause after each, so a rebuild of a few hundred events lasts seconds.
const SLOW_REBUILD: [(&str, &str); 2] = [("CAIRN_REBUILD_BATCH", "10"), ("CAIRN_FAULT_REBUILD_PAUSE_MS", "100")];

async fn status_of(app: &TestApp, token: &str, name: &str) -> Value {
    let reply = app.get("/api/v1/admin/projections", Some(token)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.data()["projections"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone()
}

async fn users_status(app: &TestApp, token: &str) -> Value {
    status_of(app, token, "users").await
}

/// Polls the users projection's status until `done` says so, returning that status.
async fn wait_status(app: &TestApp, token: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_status_of(app, token, "users", what, done).await
}

/// Polls projection `name`'s status until `done` says so, returning that status.
async fn wait_status_of(app: &TestApp, token: &str, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let status = status_of(app, token, name).await;
        if done(&status) {
            return status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{what}: not within 60 s; last {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Registers `n` users and gives each a few role changes, so the log holds a few hundred events.
async fn seed(app: &TestApp, admin: &str, n: usize) -> Vec<Uuid> {
    let mut users = Vec::new();
    for i in 0..n {
        users
            .push(app.register_ok(&format!("seed{i}-{}@example.com", &Uuid::new_v4().simple().to_string()[..6])).await);
    }
    for id in &users {
        for _ in 0..3 {
            let r = app.post(&format!("/api/v1/users/{id}/roles"), Some(admin), json!({ "role": "operator" })).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            let r = app.request("DELETE", &format!("/api/v1/users/{id}/roles/operator"), Some(admin), None, &[]).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        }
    }
    users
}

async fn last_position(pool: &PgPool) -> (String, i64) {
    sqlx::query_as(
        "SELECT coalesce((SELECT transaction_id::text FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1), '0'), \
                coalesce((SELECT global_position FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1), 0)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_projected(pool: &PgPool) {
    let target = last_position(pool).await;
    let started = Instant::now();
    loop {
        let at: Option<(String, i64)> =
            sqlx::query_as("SELECT last_tx::text, last_pos FROM projection_checkpoints WHERE name = 'users'")
                .fetch_optional(pool)
                .await
                .unwrap();
        if at.as_ref() == Some(&target) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "users projection at {at:?}, log at {target:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows that differ between the live `users` table and a rebuild of the log left beside it.
async fn differing_from_a_fresh_rebuild(pool: &PgPool) -> (i64, i64, i64) {
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
    (live, rebuilt, differing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_under_load_keeps_reads_answering_and_equals_a_rebuild_from_scratch() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &SLOW_REBUILD).await;
    let (_, admin) = app.admin_token().await;
    let users = seed(&app, &admin, 30).await;
    wait_projected(&app.pool).await;
    let before = users_status(&app, &admin).await;
    assert_eq!(before["state"], "live", "{before}");
    assert!(before["rebuild"].is_null(), "{before}");

    // Commands flow: role changes on the seeded users, and new registrations.
    let stop = Arc::new(AtomicBool::new(false));
    let commands = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, base, admin, users, stop, commands) =
            (app.client.clone(), app.address.clone(), admin.clone(), users.clone(), stop.clone(), commands.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = users[i % users.len()];
                let grant = client
                    .post(format!("{base}/api/v1/users/{id}/roles"))
                    .bearer_auth(&admin)
                    .json(&json!({ "role": "auditor" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(grant.status(), StatusCode::OK);
                let revoke = client
                    .delete(format!("{base}/api/v1/users/{id}/roles/auditor"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(revoke.status(), StatusCode::OK);
                if i % 10 == 0 {
                    let email = format!("load{i}-{}@example.com", &Uuid::new_v4().simple().to_string()[..6]);
                    let registered = client
                        .post(format!("{base}/api/v1/auth/register"))
                        .json(&json!({ "email": email, "password": common::PASSWORD, "display_name": "Load" }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(registered.status(), StatusCode::CREATED);
                }
                commands.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    // A reader polls the projection's endpoints throughout, noting when each read answered.
    let reads: Arc<Mutex<Vec<(Instant, StatusCode)>>> = Arc::default();
    let reader = {
        let (client, base, admin, users, stop, reads) =
            (app.client.clone(), app.address.clone(), admin.clone(), users.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let url = if i % 2 == 0 {
                    format!("{base}/api/v1/users?limit=50")
                } else {
                    format!("{base}/api/v1/users/{}", users[i % users.len()])
                };
                let status =
                    client.get(url).bearer_auth(&admin).send().await.map_or(StatusCode::IM_A_TEAPOT, |r| r.status());
                reads.lock().unwrap().push((Instant::now(), status));
                i += 1;
            }
        })
    };
    let commands_before = commands.load(Ordering::Relaxed);

    let started = app.post("/api/v1/admin/projections/users/rebuild", Some(&admin), json!({})).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{:?}", started.body);
    assert_eq!(started.data()["state"], "running");
    assert!(started.data()["events_total"].as_i64().unwrap() > 100, "{:?}", started.body);

    // One at a time: the API and the CLI are refused while it runs.
    let second = app.post("/api/v1/admin/projections/users/rebuild", Some(&admin), json!({})).await;
    assert_eq!((second.status, second.code()), (StatusCode::CONFLICT, "CONFLICT"), "{:?}", second.body);
    let message = second.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("a rebuild of users is running since"), "{message}");
    assert!(second.body["error"]["details"]["started_at"].is_string(), "{:?}", second.body);
    let cli = app.env.command(&["replay", "--projection", "users"]).output().unwrap();
    let cli_err = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success() && cli_err.contains("a rebuild of users is running"), "{cli_err}");
    // Another projection may rebuild meanwhile, in its own schema.
    let roles = app.post("/api/v1/admin/projections/roles/rebuild", Some(&admin), json!({})).await;
    assert_eq!(roles.status, StatusCode::ACCEPTED, "{:?}", roles.body);

    let running = wait_status(&app, &admin, "rebuilding with progress", |s| {
        s["state"] == "rebuilding" && s["rebuild"]["events_done"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let running_seen = Instant::now();
    let rebuild = &running["rebuild"];
    assert_eq!(rebuild["state"], "running", "{running}");
    assert!(rebuild["events_total"].as_i64().unwrap() >= rebuild["events_done"].as_i64().unwrap(), "{running}");
    assert!(rebuild["rate_per_sec"].as_f64().unwrap() > 0.0, "{running}");
    assert!(rebuild["eta_secs"].is_i64(), "{running}");
    assert!(Uuid::parse_str(rebuild["requested_by"].as_str().unwrap()).is_ok(), "{running}");

    let done = wait_status(&app, &admin, "the rebuild done", |s| s["rebuild"]["state"] == "done").await;
    let done_seen = Instant::now();
    assert_ne!(done["state"], "rebuilding", "{done}");
    assert!(done["rebuild"]["finished_at"].is_string() && done["rebuild"]["eta_secs"].is_null(), "{done}");
    assert_eq!(done["rebuild"]["events_done"], done["rebuild"]["events_total"], "{done}");
    // Commands kept flowing while it ran.
    assert!(commands.load(Ordering::Relaxed) > commands_before, "no command went through during the rebuild");

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    reader.await.unwrap();
    let reads = reads.lock().unwrap().clone();
    let failed: Vec<_> = reads.iter().filter(|(_, s)| *s != StatusCode::OK).collect();
    assert!(failed.is_empty(), "{} of {} reads failed: {failed:?}", failed.len(), reads.len());
    let during = reads.iter().filter(|(at, _)| *at >= running_seen && *at <= done_seen).count();
    assert!(during >= 5, "only {during} reads while the rebuild ran");
    // The rebuild schema went with the swap.
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_namespace WHERE nspname IN ('cairn_rebuild_users', 'cairn_rebuild_roles')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(schemas, 0);
    let roles_row = status_of(&app, &admin, "roles").await;
    assert_eq!(roles_row["rebuild"]["state"], "done", "{roles_row}");
    // The indexes are all there after the swap.
    let indexes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'users'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(indexes, 4, "users_pkey, users_email_key, users_created_order, users_roles");

    // With commands stopped and the projector caught up, the table equals a rebuild from scratch.
    wait_projected(&app.pool).await;
    let (live, rebuilt, differing) = differing_from_a_fresh_rebuild(&app.pool).await;
    assert!(live > 30);
    assert_eq!((live, differing), (rebuilt, 0), "the live table differs from a rebuild of the log");

    // An unknown projection.
    let unknown = app.post("/api/v1/admin/projections/nothing/rebuild", Some(&admin), json!({})).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{:?}", unknown.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_rebuild_leaves_the_live_tables_serving_and_says_why() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &SLOW_REBUILD).await;
    let (_, admin) = app.admin_token().await;
    let users = seed(&app, &admin, 15).await;
    wait_projected(&app.pool).await;
    let listed = app.get("/api/v1/users?limit=100", Some(&admin)).await;
    assert_eq!(listed.status, StatusCode::OK);
    let live_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.pool).await.unwrap();

    let started = app.post("/api/v1/admin/projections/users/rebuild", Some(&admin), json!({})).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{:?}", started.body);
    wait_status(&app, &admin, "rebuilding with progress", |s| {
        s["state"] == "rebuilding" && s["rebuild"]["events_done"].as_i64().unwrap_or(0) > 0
    })
    .await;
    // The half-built tables vanish under it.
    sqlx::query("DROP SCHEMA cairn_rebuild_users CASCADE").execute(&app.pool).await.unwrap();
    let failed = wait_status(&app, &admin, "the rebuild failed", |s| s["rebuild"]["state"] == "failed").await;
    let error = failed["rebuild"]["error"].as_str().unwrap();
    assert!(error.contains("cairn_rebuild_users.users"), "{error}");
    assert_ne!(failed["state"], "rebuilding", "{failed}");
    assert!(failed["rebuild"]["finished_at"].is_string(), "{failed}");

    // The live table still serves, untouched, and the projector goes on.
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.pool).await.unwrap();
    assert_eq!(after, live_rows);
    let reply = app.get(&format!("/api/v1/users/{}", users[0]), Some(&admin)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let newcomer = app.register_ok("after-failure@example.com").await;
    app.wait_count(&format!("SELECT count(*) FROM users WHERE id = '{newcomer}'"), 1, Duration::from_secs(30)).await;
    let leftover: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'cairn_rebuild_users'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(leftover, 0);

    // A failed rebuild does not block the next one.
    let again = app.post("/api/v1/admin/projections/users/rebuild", Some(&admin), json!({})).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{:?}", again.body);
    let done = wait_status(&app, &admin, "the second rebuild done", |s| s["rebuild"]["state"] == "done").await;
    assert!(done["rebuild"]["error"].is_null(), "{done}");

    // A rebuild running when the process stops is stopped with it, and says so.
    let third = app.post("/api/v1/admin/projections/users/rebuild", Some(&admin), json!({})).await;
    assert_eq!(third.status, StatusCode::ACCEPTED, "{:?}", third.body);
    wait_status(&app, &admin, "rebuilding again", |s| s["rebuild"]["events_done"].as_i64().unwrap_or(0) > 0).await;
    let rows_before: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.pool).await.unwrap();
    app.shutdown.cancel();
    let started = Instant::now();
    let (state, error): (String, Option<String>) = loop {
        let row: (String, Option<String>) =
            sqlx::query_as("SELECT state, error FROM projection_rebuilds WHERE projection = 'users'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if row.0 != "running" {
            break row;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the rebuild still runs after the shutdown");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(state, "failed");
    assert!(error.as_deref().unwrap_or("").contains("shutting down"), "{error:?}");
    let rows_after: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&app.pool).await.unwrap();
    assert_eq!(rows_after, rows_before);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cairn_replay_prints_progress_lines_and_the_outcome_when_not_on_a_terminal() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    seed(&app, &admin, 15).await;
    wait_projected(&app.pool).await;

    let output = app
        .env
        .command(&["replay", "--projection", "users"])
        .env("CAIRN_REBUILD_BATCH", "10")
        .env("CAIRN_FAULT_REBUILD_PAUSE_MS", "150")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("rebuilding users: ")).collect();
    assert!(progress.len() >= 2, "progress lines: {stderr}");
    assert!(progress.iter().any(|l| l.contains(" events/s, ETA ")), "{stderr}");
    assert!(!stderr.contains('\r'), "no progress bar off a terminal: {stderr}");
    let events: u64 = stdout
        .lines()
        .last()
        .unwrap_or_default()
        .strip_prefix("rebuilt users from ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("outcome: {stdout}"));
    assert!(events > 100, "{stdout}");

    let row: (String, String, i64, i64) = sqlx::query_as(
        "SELECT state, requested_by, events_done, events_total FROM projection_rebuilds WHERE projection = 'users'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row, ("done".to_owned(), "cli".to_owned(), events as i64, events as i64));
    let unknown = app.env.command(&["replay", "--projection", "nothing"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown projection 'nothing'"));
    app.stop().await;
}
