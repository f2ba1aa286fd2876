//! The bytes of a deleted file leave the store after its FileDeleted: the file remover turns the
//! event into one `files.remove` job (one, however often the event is delivered), the job removes
//! the bytes, harmlessly again when run twice, and a store that refuses has the job retried by
//! the queue while the event is not parked.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn::Services;
use cairn_platform::clock::{SharedClock, TestClock};
use cairn_platform::nats::{EventBatchHandler, Namespace};
use cairn_storage::{ByteStream, FileStore, StoreError};
use cairn_workers::jobs::kinds::FilesRemove;
use cairn_workers::jobs::{JobContext, JobError, JobHandler};
use cairn_workers::FileRemover;
use common::{TestApp, TestEnv};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SETTINGS: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none")];

fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(13)));
    bytes
}

async fn upload(app: &TestApp, token: &str, bytes: Vec<u8>) -> Uuid {
    let boundary = format!("cairn-test-{}", Uuid::new_v4().simple());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"doomed.png\"\r\n\
         Content-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend(bytes);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let reply = app
        .client
        .post(format!("{}/api/v1/files", app.address))
        .bearer_auth(token)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    let reply: Value = reply.json().await.unwrap();
    reply["data"]["file"]["id"].as_str().unwrap().parse().unwrap()
}

async fn exists(store: &FileStore, key: &str) -> bool {
    match store.get(key, None).await {
        Ok(_) => true,
        Err(StoreError::NotFound(_)) => false,
        Err(e) => panic!("{key}: {e}"),
    }
}

async fn put(store: &FileStore, key: &str, bytes: Vec<u8>) {
    let body: ByteStream = futures::stream::once(async move { Ok(bytes.into()) }).boxed();
    store.put(key, body).await.unwrap();
}

/// Appends an event with SQL, as the command side would (the tests here need no API for it).
async fn append_raw(pool: &PgPool, aggregate_type: &str, id: &str, event_type: &str, body: Value) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ($1, $2, (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2), \
                 $3, '1', jsonb_build_object($3::text, $4::jsonb), '{}') RETURNING event_id",
    )
    .bind(aggregate_type)
    .bind(id)
    .bind(event_type)
    .bind(body)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The `files.remove` job of `file_id`, once the remover has enqueued it: its id, args, status
/// and who asked.
async fn removal_job(pool: &PgPool, file_id: Uuid) -> (Uuid, Value, String, String) {
    let key = FileRemover::job_key(&file_id.to_string());
    let started = Instant::now();
    loop {
        let row: Option<(Uuid, Value, String, String)> = sqlx::query_as(
            "SELECT id, args, status, enqueued_by FROM jobs WHERE kind = 'files.remove' AND idempotency_key = $1",
        )
        .bind(&key)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(row) = row {
            return row;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no files.remove job for {file_id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The job `id` as a worker hands it to its handler, on `clock`.
async fn context(pool: &PgPool, id: Uuid, clock: SharedClock) -> JobContext {
    let (kind, args, attempts, max_attempts, created_at): (String, Value, i32, i32, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT kind, args, attempts, max_attempts, created_at FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    JobContext {
        id,
        kind,
        args,
        attempt: attempts + 1,
        max_attempts,
        enqueued_at: created_at,
        cancel: CancellationToken::new(),
        clock,
        pool: pool.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_file_becomes_one_removal_job_that_removes_its_bytes() {
    deleted_bytes_leave(TestEnv::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_file_becomes_one_removal_job_that_removes_its_bytes_on_s3() {
    deleted_bytes_leave(TestEnv::new().with_s3()).await;
}

async fn deleted_bytes_leave(env: TestEnv) {
    let app = TestApp::spawn_with(env, Services::all(), SETTINGS).await;
    app.register_ok("owner@example.com").await;
    let token = app.login("owner@example.com").await;
    let store = FileStore::open(&app.env.settings(SETTINGS).files, false).await.unwrap();
    let kept = upload(&app, &token, png(5000)).await;
    let doomed = upload(&app, &token, png(70_000)).await;
    let key = FileStore::key_for(doomed);
    assert!(exists(&store, &key).await);
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs").fetch_one(&app.pool).await.unwrap();
    assert_eq!(jobs, 0, "uploads enqueue nothing");

    let reply = app.request("DELETE", &format!("/api/v1/files/{doomed}"), Some(&token), None, &[]).await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
    // Reads stop at once, whether or not the bytes are gone yet.
    let consistency = reply.token();
    let reply = app
        .request(
            "GET",
            &format!("/api/v1/files/{doomed}"),
            Some(&token),
            None,
            &[("X-Consistency-Token", &consistency)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{:?}", reply.body);
    let reply = app.get(&format!("/api/v1/files/{doomed}/download"), Some(&token)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{:?}", reply.body);

    let (job_id, args, _, enqueued_by) = removal_job(&app.pool, doomed).await;
    assert_eq!(args["file_id"], json!(doomed.to_string()));
    assert_eq!(args["key"], json!(key));
    assert_eq!(enqueued_by, "event:FileDeleted");
    // The application's job runner takes it and the bytes go.
    app.wait_count(
        &format!("SELECT count(*) FROM jobs WHERE id = '{job_id}' AND status = 'done'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(!exists(&store, &key).await);
    assert!(exists(&store, &FileStore::key_for(kept)).await);
    // Run again (a lost lease): removing what is gone succeeds.
    let handler = FilesRemove::new(store.clone());
    handler.run(&context(&app.pool, job_id, app.clock.clone()).await).await.unwrap();

    // The same FileDeleted delivered again (a lost ack, a second process): still one job.
    let event_id: Uuid = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1 AND event_type = 'FileDeleted'",
    )
    .bind(doomed.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let event = cairn_platform::envelope::load(&app.pool, event_id).await.unwrap().unwrap();
    let remover = FileRemover::new(app.pool.clone(), app.clock.clone());
    remover.handle(std::slice::from_ref(&event)).await.unwrap();
    remover.handle(&[event.clone(), event]).await.unwrap();
    let jobs: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(&app.pool).await.unwrap();
    assert_eq!(jobs, vec![job_id]);
    assert!(exists(&store, &FileStore::key_for(kept)).await);
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(parked, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_refuses_has_the_removal_job_retried_and_the_event_is_not_parked() {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let js = jetstream::new(async_nats::connect(&env.nats_url).await.unwrap());
    let ns = Namespace::new(&env.namespace);
    let shutdown = CancellationToken::new();
    let clock_handle = TestClock::new();
    let clock: SharedClock = clock_handle.clone();
    tokio::spawn(cairn_relay::Relay::new(pool.clone(), js.clone(), ns.clone(), 100).run(shutdown.clone()));
    tokio::spawn(FileRemover::new(pool.clone(), clock.clone()).run(js.clone(), ns.clone(), 10, 1, shutdown.clone()));

    // The job's store is reached through a link the test can break and mend.
    let real = FileStore::open(&env.settings(SETTINGS).files, false).await.unwrap();
    let link = tempfile::tempdir().unwrap();
    let link = link.path().join("store");
    std::os::unix::fs::symlink(env.files.path(), &link).unwrap();
    let mut settings = env.settings(SETTINGS);
    settings.files.dir = link.clone();
    let handler = FilesRemove::new(FileStore::open(&settings.files, false).await.unwrap());

    let file_id = Uuid::new_v4();
    let key = FileStore::key_for(file_id);
    put(&real, &key, png(1000)).await;
    // The store breaks: every path under it fails, and not with "not found".
    std::fs::remove_file(&link).unwrap();
    std::fs::write(&link, b"not a directory").unwrap();
    let deleted =
        json!({"by": Uuid::new_v4(), "owner_id": Uuid::new_v4(), "size": 1017, "backend": "local", "key": key});
    append_raw(&pool, "File", &file_id.to_string(), "FileDeleted", deleted).await;
    let (job_id, _, _, _) = removal_job(&pool, file_id).await;
    // Direct first: the attempt fails as one to retry, naming the file.
    match handler.run(&context(&pool, job_id, clock.clone()).await).await {
        Err(JobError::Retry(e)) => assert!(format!("{e:#}").contains(&file_id.to_string()), "{e:#}"),
        other => panic!("a refusing store must have the job retried: {other:?}"),
    }
    // Then through a job runner: the attempt is recorded and the job waits for its backoff.
    let mut jobs_settings = env.settings(&[("CAIRN_JOBS_POLL_MS", "50")]);
    jobs_settings.clock = clock.clone();
    let registry = cairn_workers::jobs::Registry::new().with(handler.clone());
    let runner = cairn_workers::jobs::JobRunner::new(
        pool.clone(),
        registry,
        &jobs_settings.jobs,
        clock.clone(),
        Duration::from_secs(1),
    );
    tokio::spawn(runner.run(shutdown.clone()));
    let started = Instant::now();
    let run_at = loop {
        let (status, attempts, error, run_at): (String, i32, Option<String>, chrono::DateTime<chrono::Utc>) =
            sqlx::query_as("SELECT status, attempts, last_error, run_at FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        if status == "scheduled" && attempts == 1 {
            assert!(error.is_some_and(|e| e.contains(&file_id.to_string())));
            break run_at;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the job never failed its attempt: {status} {attempts}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exists(&real, &key).await, "the bytes went although the store refused");
    // The consumer has moved on: the event is acknowledged, not parked.
    let stream = js.get_stream(ns.events_stream()).await.unwrap();
    let started = Instant::now();
    loop {
        let consumer = stream.consumer_info(cairn_workers::files::remover::CONSUMER).await.unwrap();
        if consumer.num_ack_pending == 0 && consumer.num_pending == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the event was never acknowledged: {consumer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&pool).await.unwrap();
    assert_eq!(parked, 0);

    // The store is back: once the backoff has passed on the clock, the next attempt removes the bytes.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(env.files.path(), &link).unwrap();
    clock_handle.advance((run_at - clock.now()).to_std().unwrap_or_default() + Duration::from_secs(1));
    common::wait_count(
        &pool,
        &format!("SELECT count(*) FROM jobs WHERE id = '{job_id}' AND status = 'done' AND attempts = 2"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(!exists(&real, &key).await);

    // A key that is not the file's own is refused for good, and nothing is removed.
    let other = Uuid::new_v4();
    put(&real, &FileStore::key_for(other), png(10)).await;
    let mut job = context(&pool, job_id, clock).await;
    job.args = json!({"file_id": file_id, "key": FileStore::key_for(other)});
    assert!(matches!(handler.run(&job).await, Err(JobError::Permanent(_))));
    assert!(exists(&real, &FileStore::key_for(other)).await);
    shutdown.cancel();
    pool.close().await;
    env.cleanup().await;
}
