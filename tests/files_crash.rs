//! A crash between storing an upload's bytes and appending its FileUploaded: the child process
//! is killed with SIGKILL while the upload waits in between (`CAIRN_FAULT_UPLOAD_PAUSE_MS`), and
//! the sweeper removes what it left once the grace period is past, and nothing else.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::Services;
use cairn_platform::clock::{Clock, TestClock};
use cairn_storage::{ByteStream, FileStore, StoreError};
use cairn_workers::FileSweeper;
use common::{Serve, TestApp, TestEnv};
use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Settings every process of these tests shares: no verified address needed to upload (the
/// tests sweep when they choose, with a sweeper of their own).
const SETTINGS: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none")];

/// A PNG's signature followed by `len` bytes: sniffed as `image/png`.
fn png(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    bytes
}

/// `POST /api/v1/files` with one `file` field.
async fn upload(client: &reqwest::Client, base: &str, token: &str, name: &str, bytes: Vec<u8>) -> reqwest::Response {
    send_upload(client, base, token, name, bytes).await.unwrap()
}

async fn send_upload(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    bytes: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    let boundary = format!("cairn-test-{}", Uuid::new_v4().simple());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend(bytes);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    client
        .post(format!("{base}/api/v1/files"))
        .bearer_auth(token)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
}

/// The whole object under `key`, or the store's error.
async fn read(store: &FileStore, key: &str) -> Result<Vec<u8>, StoreError> {
    let object = store.get(key, None).await?;
    object
        .body
        .try_fold(Vec::new(), |mut whole, chunk| async move {
            whole.extend_from_slice(&chunk);
            Ok(whole)
        })
        .await
        .map_err(StoreError::Source)
}

async fn put(store: &FileStore, key: &str, bytes: Vec<u8>) {
    let body: ByteStream = futures::stream::once(async move { Ok(bytes.into()) }).boxed();
    store.put(key, body).await.unwrap();
}

async fn file_events(pool: &PgPool, file_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1")
        .bind(file_id.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// (stored, reserved) bytes of `owner`.
async fn quota(pool: &PgPool, owner: Uuid) -> (i64, i64) {
    sqlx::query_as("SELECT stored_bytes, reserved_bytes FROM file_quota WHERE owner_id = $1")
        .bind(owner)
        .fetch_optional(pool)
        .await
        .unwrap()
        .unwrap_or((0, 0))
}

/// A sweeper of the test's store on a clock of its own (the application's clock also drives
/// token expiry, which moving past the grace would end).
fn sweeper(app: &TestApp, store: &FileStore) -> (FileSweeper, Arc<TestClock>) {
    let clock = TestClock::new();
    let mut settings = app.env.settings(SETTINGS);
    settings.clock = clock.clone();
    (FileSweeper::new(app.pool.clone(), store.clone(), &settings), clock)
}

async fn open_store(env: &TestEnv) -> FileStore {
    FileStore::open(&env.settings(SETTINGS).files, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_killed_before_its_event_leaves_an_orphan_the_sweeper_removes_and_nothing_else() {
    killed_upload(TestEnv::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_killed_before_its_event_leaves_an_orphan_the_sweeper_removes_and_nothing_else_on_s3() {
    killed_upload(TestEnv::new().with_s3()).await;
}

async fn killed_upload(env: TestEnv) {
    let app = TestApp::spawn_with(env, Services::all(), SETTINGS).await;
    let owner = app.register_ok("owner@example.com").await;
    let token = app.login("owner@example.com").await;
    let store = open_store(&app.env).await;
    let grace = app.env.settings(SETTINGS).files.orphan_grace;

    // A file uploaded normally: it must survive everything below.
    let kept_bytes = png(200_000, 7);
    let reply = upload(&app.client, &app.address, &token, "kept.png", kept_bytes.clone()).await;
    assert_eq!(reply.status(), StatusCode::CREATED);
    let kept: Value = reply.json().await.unwrap();
    let kept_id: Uuid = kept["data"]["file"]["id"].as_str().unwrap().parse().unwrap();
    let kept_key = FileStore::key_for(kept_id);
    assert_eq!(read(&store, &kept_key).await.unwrap(), kept_bytes);
    // Read back before the second process starts: what a SIGKILLed consumer had in hand waits
    // out JetStream's ack wait, and this test is not about that.
    app.wait_count(&format!("SELECT count(*) FROM files WHERE id = '{kept_id}'"), 1, Duration::from_secs(20)).await;
    let (stored, reserved) = quota(&app.pool, owner).await;
    assert_eq!((stored, reserved), (kept_bytes.len() as i64, 0));

    // A second process that holds each stored upload for a minute before appending its event.
    let mut child = Serve::start(&app.env, &[SETTINGS, &[("CAIRN_FAULT_UPLOAD_PAUSE_MS", "60000")]].concat());
    child.wait_ready(&app.client).await;
    let orphan_bytes = png(300_000, 11);
    let orphan_len = orphan_bytes.len() as i64;
    let (client, base, bearer) = (app.client.clone(), child.base.clone(), token.clone());
    let pending = tokio::spawn(async move { send_upload(&client, &base, &bearer, "orphan.png", orphan_bytes).await });

    // Wait until its bytes are stored whole and its upload row is there.
    let started = Instant::now();
    let (orphan_id, orphan_key) = loop {
        let row: Option<(Uuid, String)> =
            sqlx::query_as("SELECT file_id, storage_key FROM file_uploads").fetch_optional(&app.pool).await.unwrap();
        if let Some((id, key)) = row {
            if let Ok(bytes) = read(&store, &key).await {
                assert_eq!(bytes.len() as i64, orphan_len);
                break (id, key);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the upload never got stored: {}", child.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(orphan_key, FileStore::key_for(orphan_id));
    child.child.kill().unwrap(); // SIGKILL
    child.child.wait().unwrap();
    // Its client saw the connection cut; what matters is what the process left behind.
    pending.abort();

    // What the crash left: bytes, an upload row with its reservation, and no event.
    assert_eq!(file_events(&app.pool, orphan_id).await, 0);
    assert_eq!(file_events(&app.pool, kept_id).await, 1);
    assert_eq!(read(&store, &orphan_key).await.unwrap().len() as i64, orphan_len);
    let row_reserved: i64 = sqlx::query_scalar("SELECT reserved_bytes FROM file_uploads WHERE file_id = $1")
        .bind(orphan_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(row_reserved > 0, "the dead upload reserved nothing");
    assert_eq!(quota(&app.pool, owner).await, (stored, row_reserved));

    // And a crash before any row: bytes that nothing names.
    let stray_key = FileStore::key_for(Uuid::new_v4());
    put(&store, &stray_key, png(1000, 3)).await;

    // Within the grace nothing goes: all of it is younger.
    let (sweeper, clock) = sweeper(&app, &store);
    let report = sweeper.sweep().await.unwrap();
    assert!(report.swept);
    assert_eq!((report.uploads_reaped, report.objects_removed), (0, 0), "{report:?}");
    assert!(read(&store, &orphan_key).await.is_ok());
    assert!(read(&store, &stray_key).await.is_ok());
    assert_eq!(quota(&app.pool, owner).await, (stored, row_reserved));

    // Past it, the dead upload and the stray bytes go, and the file stays.
    clock.advance(grace + Duration::from_secs(60));
    let report = sweeper.sweep().await.unwrap();
    assert_eq!(report.uploads_reaped, 1, "{report:?}");
    assert_eq!(report.objects_removed, 2, "{report:?}");
    assert_eq!(report.objects_kept, 1, "{report:?}");
    assert_eq!((report.foreign_keys, report.failures), (0, 0), "{report:?}");
    assert!(matches!(read(&store, &orphan_key).await, Err(StoreError::NotFound(_))));
    assert!(matches!(read(&store, &stray_key).await, Err(StoreError::NotFound(_))));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM file_uploads").fetch_one(&app.pool).await.unwrap();
    assert_eq!(rows, 0);
    assert_eq!(quota(&app.pool, owner).await, (stored, 0));
    assert_eq!(read(&store, &kept_key).await.unwrap(), kept_bytes);
    assert_eq!(file_events(&app.pool, orphan_id).await, 0);
    let download = app
        .client
        .get(format!("{}/api/v1/files/{kept_id}/download", app.address))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.bytes().await.unwrap().as_ref(), kept_bytes.as_slice());

    // A second pass finds nothing more to do.
    let report = sweeper.sweep().await.unwrap();
    assert_eq!((report.uploads_reaped, report.objects_removed, report.objects_kept), (0, 0, 1), "{report:?}");

    drop(child);
    app.stop().await;
}

/// Registers an upload in flight, as the command side does before storing its first byte.
async fn upload_row(
    pool: &PgPool,
    store: &FileStore,
    file_id: Uuid,
    owner: Uuid,
    reserved: i64,
    started_at: chrono::DateTime<chrono::Utc>,
) {
    sqlx::query(
        "INSERT INTO file_uploads (file_id, owner_id, backend, storage_key, reserved_bytes, started_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(file_id)
    .bind(owner)
    .bind(store.backend().as_str())
    .bind(FileStore::key_for(file_id))
    .bind(reserved)
    .bind(started_at)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO file_quota AS q (owner_id, reserved_bytes) VALUES ($1, $2) \
         ON CONFLICT (owner_id) DO UPDATE SET reserved_bytes = q.reserved_bytes + EXCLUDED.reserved_bytes",
    )
    .bind(owner)
    .bind(reserved)
    .execute(pool)
    .await
    .unwrap();
}

/// Appends an event of the File aggregate with SQL, as the command side would.
async fn append_file_event(pool: &PgPool, file_id: Uuid, event_type: &str, body: Value) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('File', $1, (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1), \
                 $2, '1', jsonb_build_object($2::text, $3::jsonb), '{}')",
    )
    .bind(file_id.to_string())
    .bind(event_type)
    .bind(body)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_removes_only_bytes_nothing_names_and_one_process_sweeps_at_a_time() {
    only_the_unnamed(TestEnv::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_removes_only_bytes_nothing_names_and_one_process_sweeps_at_a_time_on_s3() {
    only_the_unnamed(TestEnv::new().with_s3()).await;
}

async fn only_the_unnamed(env: TestEnv) {
    common::quiet_logs();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let store = open_store(&env).await;
    let clock = TestClock::new();
    let mut settings = env.settings(SETTINGS);
    settings.clock = clock.clone();
    let grace = settings.files.orphan_grace;
    let sweeper = FileSweeper::new(pool.clone(), store.clone(), &settings);
    let owner = Uuid::new_v4();

    // A file (FileUploaded), a deleted file whose bytes the remover has not removed yet, an
    // upload still running (its row started "now" on the moved clock), and bytes nothing names.
    let (file, deleted, running, stray) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for id in [file, deleted, running, stray] {
        put(&store, &FileStore::key_for(id), png(2000, 1)).await;
    }
    for id in [file, deleted] {
        // Recorded as the command side does: the trigger takes the upload's row with the append.
        upload_row(&pool, &store, id, owner, 2017, clock.now()).await;
        let uploaded = serde_json::json!({
            "owner_id": owner, "name": "a.png", "size": 2017, "content_type": "image/png", "sha256": "00",
            "visibility": "private", "backend": store.backend().as_str(), "key": FileStore::key_for(id),
        });
        append_file_event(&pool, id, "FileUploaded", uploaded).await;
    }
    let gone = serde_json::json!({"by": owner, "owner_id": owner, "size": 2017, "backend": store.backend().as_str(), "key": FileStore::key_for(deleted)});
    append_file_event(&pool, deleted, "FileDeleted", gone).await;
    clock.advance(grace + Duration::from_secs(60));
    upload_row(&pool, &store, running, owner, 2017, clock.now()).await;

    // While another process holds the sweeper's lock, a pass does nothing.
    let mut other = pool.acquire().await.unwrap().detach();
    let key = cairn_platform::db::advisory_key("cairn-files-sweeper");
    let held: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut other).await.unwrap();
    assert!(held);
    let report = sweeper.sweep().await.unwrap();
    assert!(!report.swept, "{report:?}");
    assert!(read(&store, &FileStore::key_for(stray)).await.is_ok());
    sqlx::Connection::close(other).await.unwrap();

    let report = sweeper.sweep().await.unwrap();
    assert!(report.swept);
    assert_eq!((report.uploads_reaped, report.objects_removed, report.objects_kept), (0, 1, 3), "{report:?}");
    assert!(matches!(read(&store, &FileStore::key_for(stray)).await, Err(StoreError::NotFound(_))));
    for id in [file, deleted, running] {
        assert!(read(&store, &FileStore::key_for(id)).await.is_ok(), "{id} was removed");
    }
    assert_eq!(quota(&pool, owner).await, (2017, 2017));

    // Once the running upload is older than the grace too, it is an upload that died.
    clock.advance(grace + Duration::from_secs(60));
    let report = sweeper.sweep().await.unwrap();
    assert_eq!((report.uploads_reaped, report.objects_removed, report.objects_kept), (1, 1, 2), "{report:?}");
    assert!(matches!(read(&store, &FileStore::key_for(running)).await, Err(StoreError::NotFound(_))));
    assert_eq!(quota(&pool, owner).await, (2017, 0));

    // The operators' command: one pass now, on the system clock (a grace of 0 makes these old).
    let stray = FileStore::key_for(Uuid::new_v4());
    put(&store, &stray, png(10, 2)).await;
    let output = env.command(&["admin", "sweep-files"]).env("CAIRN_FILES_ORPHAN_GRACE_SECS", "0").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("objects removed: 1;"), "{printed}");
    assert!(matches!(read(&store, &stray).await, Err(StoreError::NotFound(_))));
    for id in [file, deleted] {
        assert!(read(&store, &FileStore::key_for(id)).await.is_ok(), "{id} was removed");
    }
    pool.close().await;
    env.cleanup().await;
}
