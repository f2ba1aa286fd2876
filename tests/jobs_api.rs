//! The jobs API as an operator uses it: enqueue (with an idempotency key under concurrency),
//! list with filters and cursors, show, retry and cancel, every refusal with its field, and the
//! same operations through `cairn jobs`. No runner takes part: the application runs without
//! workers, so a job stays where the test puts it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn::app::Services;
use cairn_platform::clock::Clock as _;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// An API without workers, and an operator's token.
async fn operator_app(extra: &[(&str, &str)]) -> (TestApp, String) {
    let mut vars = vec![("CAIRN_VERIFIED_EMAIL_FOR", "none")];
    vars.extend_from_slice(extra);
    let services = Services { command_api: true, query_api: true, relay: true, projector: true, ..Services::none() };
    let app = TestApp::spawn_with(TestEnv::new(), services, &vars).await;
    let (_, admin) = app.admin_token().await;
    let email = format!("op-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let id = app.register_ok(&email).await;
    let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({ "role": "operator" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    let token = app.login(&email).await;
    (app, token)
}

async fn enqueue(app: &TestApp, token: &str, body: Value) -> Uuid {
    let reply = app.post("/api/v1/jobs", Some(token), body.clone()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{body}: {:?}", reply.body);
    reply.data()["job_id"].as_str().unwrap().parse().unwrap()
}

/// Puts a job in `status` by hand: no runner runs in these tests, and retry and cancel depend
/// only on the row's status.
async fn set_status(app: &TestApp, id: Uuid, status: &str, error: Option<&str>) {
    let errors = match error {
        Some(e) => json!([{ "attempt": 1, "at": "2026-01-01T00:00:00Z", "error": e }]),
        None => json!([]),
    };
    sqlx::query(
        "UPDATE jobs SET status = $2, attempts = CASE WHEN $3::text IS NULL THEN attempts ELSE 1 END, \
           errors = $4, last_error = $3, finished_at = CASE WHEN $2 IN ('done', 'failed', 'dead') THEN now() END WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(error)
    .bind(errors)
    .execute(&app.pool)
    .await
    .unwrap();
}

async fn events_of(app: &TestApp, id: Uuid) -> Vec<(i64, String, Value)> {
    sqlx::query_as(
        "SELECT sequence, event_type, metadata FROM events WHERE aggregate_type = 'Job' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_enqueues_lists_shows_retries_and_cancels() {
    let (app, token) = operator_app(&[]).await;

    // Nothing is listed before anything is enqueued.
    let empty = app.get("/api/v1/jobs", Some(&token)).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.data().as_array().unwrap().len(), 0);

    let later = (app.clock.now() + chrono::Duration::minutes(2)).to_rfc3339();
    let first = enqueue(&app, &token, json!({ "kind": "noop", "args": {} })).await;
    let delayed = enqueue(
        &app,
        &token,
        json!({ "kind": "noop", "args": { "sleep_ms": 5 }, "run_at": later, "priority": 7, "max_attempts": 3 }),
    )
    .await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(enqueue(&app, &token, json!({ "kind": "sessions.purge", "args": {} })).await);
    }

    // The enqueue is in the log, naming who asked, and the row carries its version.
    let events = events_of(&app, first).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0, events[0].1.as_str()), (1, "JobEnqueued"));
    assert!(events[0].2["actor_id"].is_string(), "{:?}", events[0].2);
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM jobs WHERE id = $1").bind(first).fetch_one(&app.pool).await.unwrap();
    assert_eq!(version, 1);

    // Show: a delayed job is scheduled until its time comes, then shown as queued.
    let shown = app.get(&format!("/api/v1/jobs/{delayed}"), Some(&token)).await;
    assert_eq!(shown.status, StatusCode::OK, "{:?}", shown.body);
    let job = shown.data();
    assert_eq!(job["status"], "scheduled");
    assert_eq!(
        (job["priority"].as_i64(), job["max_attempts"].as_i64(), job["attempts"].as_i64()),
        (Some(7), Some(3), Some(0))
    );
    assert_eq!(job["args"], json!({ "sleep_ms": 5 }));
    assert!(job["enqueued_by"].as_str().is_some_and(|by| by.parse::<Uuid>().is_ok()), "{job}");
    assert_eq!(job["lease_owner"], Value::Null);
    let scheduled = app.get("/api/v1/jobs?status=scheduled", Some(&token)).await;
    assert_eq!(scheduled.data().as_array().unwrap().len(), 1);
    app.clock.advance(Duration::from_secs(121));
    let shown = app.get(&format!("/api/v1/jobs/{delayed}"), Some(&token)).await;
    assert_eq!(shown.data()["status"], "queued");
    let scheduled = app.get("/api/v1/jobs?status=scheduled", Some(&token)).await;
    assert_eq!(scheduled.data().as_array().unwrap().len(), 0);
    let queued = app.get("/api/v1/jobs?status=queued&kind=noop", Some(&token)).await;
    assert_eq!(queued.data().as_array().unwrap().len(), 2, "{:?}", queued.body);

    // List: newest first, filtered by kind, paged by cursor with no repeats and no gaps.
    let page1 = app.get("/api/v1/jobs?kind=sessions.purge&limit=2", Some(&token)).await;
    assert_eq!(page1.status, StatusCode::OK, "{:?}", page1.body);
    let ids1: Vec<String> =
        page1.data().as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids1, vec![others[2].to_string(), others[1].to_string()]);
    let cursor = page1.body["meta"]["next_cursor"].as_str().unwrap().to_owned();
    let page2 = app.get(&format!("/api/v1/jobs?kind=sessions.purge&limit=2&cursor={cursor}"), Some(&token)).await;
    let ids2: Vec<String> =
        page2.data().as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids2, vec![others[0].to_string()]);
    assert_eq!(page2.body["meta"]["next_cursor"], Value::Null);
    let all = app.get("/api/v1/jobs?limit=100", Some(&token)).await;
    assert_eq!(all.data().as_array().unwrap().len(), 5);

    // Retry: a queued job cannot be retried; a dead one is queued again with attempts 0 and its
    // errors kept. (No runner here: the dead state is set by hand.)
    let refused = app.post(&format!("/api/v1/jobs/{first}/retry"), Some(&token), json!({})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{:?}", refused.body);
    assert_eq!(refused.code(), "CONFLICT");
    assert_eq!(refused.body["error"]["details"]["status"], "queued");
    set_status(&app, first, "dead", Some("connection refused")).await;
    let dead = app.get("/api/v1/jobs?status=dead", Some(&token)).await;
    assert_eq!(dead.data().as_array().unwrap().len(), 1);
    assert_eq!(dead.data()[0]["errors"][0]["error"], "connection refused");
    let retried = app.post(&format!("/api/v1/jobs/{first}/retry"), Some(&token), json!({})).await;
    assert_eq!(retried.status, StatusCode::OK, "{:?}", retried.body);
    assert!(retried.body["meta"]["consistency_token"].is_string());
    let job = app.get(&format!("/api/v1/jobs/{first}"), Some(&token)).await;
    assert_eq!((job.data()["status"].as_str(), job.data()["attempts"].as_i64()), (Some("queued"), Some(0)));
    assert_eq!(job.data()["errors"].as_array().unwrap().len(), 1);
    let types: Vec<String> = events_of(&app, first).await.into_iter().map(|e| e.1).collect();
    assert_eq!(types, ["JobEnqueued", "JobRetried"]);

    // Cancel: a done job cannot be cancelled; a queued one can, once.
    set_status(&app, others[0], "done", None).await;
    let refused = app.post(&format!("/api/v1/jobs/{}/cancel", others[0]), Some(&token), json!({})).await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.body["error"]["details"]["status"], "done");
    let cancelled = app.post(&format!("/api/v1/jobs/{}/cancel", others[1]), Some(&token), json!({})).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{:?}", cancelled.body);
    let again = app.post(&format!("/api/v1/jobs/{}/cancel", others[1]), Some(&token), json!({})).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert_eq!(again.body["error"]["details"]["status"], "cancelled");
    let types: Vec<String> = events_of(&app, others[1]).await.into_iter().map(|e| e.1).collect();
    assert_eq!(types, ["JobEnqueued", "JobCancelled"]);

    // Unknown ids.
    let unknown = Uuid::new_v4();
    for path in [format!("/api/v1/jobs/{unknown}/retry"), format!("/api/v1/jobs/{unknown}/cancel")] {
        let reply = app.post(&path, Some(&token), json!({})).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(app.get(&format!("/api/v1/jobs/{unknown}"), Some(&token)).await.status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_are_refused_naming_the_field_and_write_nothing() {
    let (app, token) = operator_app(&[("CAIRN_WEBHOOK_ALLOWED_HOSTS", "hooks.example.com")]).await;
    // An allowed webhook is accepted: the refusals below are about what they change.
    enqueue(
        &app,
        &token,
        json!({ "kind": "webhook.deliver", "args": { "url": "https://hooks.example.com/in", "body": {} } }),
    )
    .await;
    let cases = [
        (json!({ "kind": "no.such.kind", "args": {} }), "kind"),
        (json!({ "kind": "noop", "args": [1, 2] }), "args"),
        (json!({ "kind": "noop", "args": "x" }), "args"),
        (json!({ "kind": "webhook.deliver", "args": { "url": "https://evil.example.net/x", "body": {} } }), "args"),
        (json!({ "kind": "noop", "args": {}, "max_attempts": 0 }), "max_attempts"),
        (json!({ "kind": "noop", "args": {}, "priority": 101 }), "priority"),
        (json!({ "kind": "noop", "args": {}, "priority": 70000 }), "priority"),
        (json!({ "kind": "noop", "args": {}, "run_at": "tomorrow" }), "run_at"),
        (json!({ "kind": "noop", "args": {}, "idempotency_key": "" }), "idempotency_key"),
        (json!({ "kind": "noop" }), "args"),
    ];
    for (body, field) in cases {
        let reply = app.post("/api/v1/jobs", Some(&token), body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {:?}", reply.body);
        assert_eq!(reply.code(), "VALIDATION_FAILED", "{body}: {:?}", reply.body);
        assert!(reply.body["error"]["details"][field].is_string(), "{body} should name {field}: {:?}", reply.body);
    }
    let host = app
        .post(
            "/api/v1/jobs",
            Some(&token),
            json!({ "kind": "webhook.deliver", "args": { "url": "https://evil.example.net/x", "body": {} } }),
        )
        .await;
    assert!(host.body["error"]["message"].as_str().unwrap().contains("CAIRN_WEBHOOK_ALLOWED_HOSTS"), "{:?}", host.body);
    let unknown_field =
        app.post("/api/v1/jobs", Some(&token), json!({ "kind": "noop", "args": {}, "queue": "x" })).await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&app.pool).await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Job'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((jobs, events), (1, 1));
    for query in ["status=sleeping", "limit=0", "limit=101", "cursor=nope", "kind=Bad%20Kind"] {
        let reply = app.get(&format!("/api/v1/jobs?{query}"), Some(&token)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}: {:?}", reply.body);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_enqueues_with_one_key_make_one_job_and_one_event() {
    let (app, token) = operator_app(&[]).await;
    // A different key first: the system does create jobs, one per key.
    let other = enqueue(&app, &token, json!({ "kind": "noop", "args": {}, "idempotency_key": "other" })).await;
    let body = json!({ "kind": "noop", "args": {}, "idempotency_key": "nightly-2026-12-01" });
    let replies =
        futures::future::join_all((0..20).map(|_| app.post("/api/v1/jobs", Some(&token), body.clone()))).await;
    let mut ids: Vec<String> = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
            r.data()["job_id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 1, "one key gave several jobs: {ids:?}");
    assert_ne!(ids[0], other.to_string());
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE idempotency_key = 'nightly-2026-12-01'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Job' AND event_type = 'JobEnqueued' AND aggregate_id = $1",
    )
    .bind(&ids[0])
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((jobs, events), (1, 1));
    let all_events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'Job'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(all_events, 2);
    app.stop().await;
}

fn run_cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let output = env.command(args).env("RUST_LOG", "error").output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cairn_jobs_lists_shows_retries_and_cancels() {
    let (app, token) = operator_app(&[]).await;
    let dead = enqueue(&app, &token, json!({ "kind": "noop", "args": {} })).await;
    let queued = enqueue(&app, &token, json!({ "kind": "sessions.purge", "args": {} })).await;
    set_status(&app, dead, "dead", Some("handler exploded")).await;

    let (ok, out, err) = run_cli(&app.env, &["jobs", "list"]);
    assert!(ok, "{err}");
    assert!(out.lines().next().unwrap().starts_with("id"), "{out}");
    assert!(out.contains(&dead.to_string()) && out.contains(&queued.to_string()), "{out}");
    assert!(out.contains("handler exploded"), "{out}");

    let (ok, out, err) = run_cli(&app.env, &["jobs", "list", "--status", "dead", "--json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], dead.to_string());
    let (ok, out, _) = run_cli(&app.env, &["jobs", "list", "--kind", "sessions.purge", "--limit", "1", "--json"]);
    assert!(ok);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["id"], queued.to_string());
    let (ok, _, err) = run_cli(&app.env, &["jobs", "list", "--status", "sleeping"]);
    assert!(!ok && err.contains("unknown status"), "{err}");

    let (ok, out, err) = run_cli(&app.env, &["jobs", "show", &dead.to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains("status        dead") && out.contains("handler exploded"), "{out}");

    // Retry of a queued job is refused with its status, and nothing is written.
    let (ok, _, err) = run_cli(&app.env, &["jobs", "retry", &queued.to_string()]);
    assert!(!ok && err.contains("queued"), "{err}");
    let (ok, out, err) = run_cli(&app.env, &["jobs", "retry", &dead.to_string(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "queued");
    let (ok, out, err) = run_cli(&app.env, &["jobs", "cancel", &queued.to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let (ok, _, err) = run_cli(&app.env, &["jobs", "cancel", &Uuid::new_v4().to_string()]);
    assert!(!ok && err.contains("no job"), "{err}");

    // The API sees what the CLI did, and the log says the CLI did it.
    let job = app.get(&format!("/api/v1/jobs/{dead}"), Some(&token)).await;
    assert_eq!(job.data()["status"], "queued");
    let job = app.get(&format!("/api/v1/jobs/{queued}"), Some(&token)).await;
    assert_eq!(job.data()["status"], "cancelled");
    let meta: Vec<Value> = sqlx::query_scalar(
        "SELECT metadata FROM events WHERE aggregate_type = 'Job' AND event_type IN ('JobRetried', 'JobCancelled') ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(meta.len(), 2);
    assert!(meta.iter().all(|m| m["user_agent"] == "cairn jobs"), "{meta:?}");
    app.stop().await;
}
