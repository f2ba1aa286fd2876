//! The bytes of a deleted file leave the store after its FileDeleted, removed by the file
//! remover: once, harmlessly again on a redelivery, and never retried for ever against a store
//! that keeps refusing (the event is parked; an operator's retry finishes it).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn::Services;
use cairn_platform::nats::{EventBatchHandler, Namespace};
use cairn_storage::{ByteStream, FileStore, StoreError};
use cairn_workers::FileRemover;
use common::{TestApp, TestEnv};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SETTINGS: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_FILES_SWEEP_SECS", "86400")];

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

async fn wait_gone(store: &FileStore, key: &str) {
    let started = Instant::now();
    while exists(store, key).await {
        assert!(started.elapsed() < Duration::from_secs(30), "{key} never left the store");
        tokio::time::sleep(Duration::from_millis(50)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_files_bytes_leave_the_store_and_a_second_delivery_is_harmless() {
    deleted_bytes_leave(TestEnv::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_files_bytes_leave_the_store_and_a_second_delivery_is_harmless_on_s3() {
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
    wait_gone(&store, &key).await;
    assert!(exists(&store, &FileStore::key_for(kept)).await);

    // The same FileDeleted delivered again (a lost ack, a second process): nothing happens.
    let event_id: Uuid = sqlx::query_scalar(
        "SELECT event_id FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1 AND event_type = 'FileDeleted'",
    )
    .bind(doomed.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let event = cairn_platform::envelope::load(&app.pool, event_id).await.unwrap().unwrap();
    let remover = FileRemover::new(store.clone());
    remover.handle(std::slice::from_ref(&event)).await.unwrap();
    remover.handle(&[event.clone(), event]).await.unwrap();
    assert!(!exists(&store, &key).await);
    assert!(exists(&store, &FileStore::key_for(kept)).await);
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(parked, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_keeps_refusing_has_the_removal_parked_and_an_operators_retry_finishes_it() {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let js = jetstream::new(async_nats::connect(&env.nats_url).await.unwrap());
    let ns = Namespace::new(&env.namespace);
    let shutdown = CancellationToken::new();
    tokio::spawn(cairn_relay::Relay::new(pool.clone(), js.clone(), ns.clone(), 100).run(shutdown.clone()));

    // The remover's store is reached through a link the test can break and mend.
    let real = FileStore::open(&env.settings(SETTINGS).files, false).await.unwrap();
    let link = tempfile::tempdir().unwrap();
    let link = link.path().join("store");
    std::os::unix::fs::symlink(env.files.path(), &link).unwrap();
    let mut settings = env.settings(SETTINGS);
    settings.files.dir = link.clone();
    let linked = FileStore::open(&settings.files, false).await.unwrap();
    let remover = FileRemover::new(linked);
    tokio::spawn(remover.run(pool.clone(), js.clone(), ns.clone(), 10, 1, shutdown.clone()));

    let file_id = Uuid::new_v4();
    let key = FileStore::key_for(file_id);
    put(&real, &key, png(1000)).await;
    // The store breaks: every path under it fails, and not with "not found".
    std::fs::remove_file(&link).unwrap();
    std::fs::write(&link, b"not a directory").unwrap();
    let deleted =
        json!({"by": Uuid::new_v4(), "owner_id": Uuid::new_v4(), "size": 1017, "backend": "local", "key": key});
    let event_id = append_raw(&pool, "File", &file_id.to_string(), "FileDeleted", deleted).await;
    common::wait_count(
        &pool,
        &format!("SELECT count(*) FROM parked_events WHERE consumer = 'files' AND event_id = '{event_id}' AND status = 'parked'"),
        1,
        Duration::from_secs(90),
    )
    .await;
    assert!(exists(&real, &key).await, "the bytes went although the store refused");

    // The store is back; an operator asks for a retry, and the remover carries it out.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(env.files.path(), &link).unwrap();
    let retry = json!({"consumer": "files", "event_id": event_id, "reason": "store back"});
    append_raw(&pool, "ParkedEvent", &event_id.to_string(), "ParkedEventRetryRequested", retry).await;
    common::wait_count(
        &pool,
        &format!("SELECT count(*) FROM parked_events WHERE consumer = 'files' AND event_id = '{event_id}' AND status = 'resolved'"),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(!exists(&real, &key).await);
    shutdown.cancel();
    pool.close().await;
    env.cleanup().await;
}
