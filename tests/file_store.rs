//! The file store as a process opens it: on S3 through the test harness (a bucket of the test's
//! own, created at start in development), and `cairn admin rotate-files-key` adding master keys
//! that a restarted store writes with while older files stay readable.

#![allow(clippy::unwrap_used)]

mod common;

use common::{TestApp, TestEnv};
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

fn body(data: &'static [u8]) -> cairn_storage::ByteStream {
    futures::stream::once(async move { Ok(axum::body::Bytes::from_static(data)) }).boxed()
}

#[tokio::test]
async fn an_application_on_s3_stores_in_its_own_bucket() {
    let app = TestApp::spawn_s3().await;
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status, 200);
    // The application created the bucket; a store opened on the same settings sees it.
    let settings = app.env.settings(&[]);
    assert_eq!(settings.files.s3.bucket, app.env.s3_bucket.clone().unwrap());
    let store = cairn_storage::FileStore::open(&settings.files, true).await.unwrap();
    assert_eq!(store.backend(), cairn_storage::Backend::S3);
    let key = cairn_storage::FileStore::key_for(Uuid::new_v4());
    store.put(&key, body(b"hello")).await.unwrap();
    let far_future = chrono::Utc::now() + chrono::Duration::days(1);
    let listed: Vec<_> = store.list_before(far_future).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    app.stop().await;
    // Clean-up emptied the bucket.
    let listed: Vec<_> = store.list_before(far_future).try_collect().await.unwrap();
    assert!(listed.is_empty());
}

#[tokio::test]
async fn rotate_files_key_adds_keys_and_old_files_stay_readable() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("files-master.keys");
    let key_file_var = key_file.display().to_string();
    let rotate = || {
        let output = env
            .command(&["admin", "rotate-files-key"])
            .env("CAIRN_FILES_MASTER_KEY_FILE", &key_file_var)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let stdout = String::from_utf8(output.stdout).unwrap();
        stdout.split_whitespace().nth(3).unwrap().to_owned()
    };
    let first = rotate();
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let settings = env.settings(&[("CAIRN_FILES_MASTER_KEY_FILE", &key_file_var)]);
    let store = cairn_storage::FileStore::open(&settings.files, true).await.unwrap();
    let old = cairn_storage::FileStore::key_for(Uuid::new_v4());
    store.put(&old, body(b"written under the first key")).await.unwrap();

    let second = rotate();
    assert_ne!(first, second);
    let text = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().last().unwrap().starts_with(&format!("{second}:")));

    let restarted = cairn_storage::FileStore::open(&settings.files, true).await.unwrap();
    let new = cairn_storage::FileStore::key_for(Uuid::new_v4());
    restarted.put(&new, body(b"written under the second key")).await.unwrap();
    let read = |store: cairn_storage::FileStore, key: String| async move {
        let object = store.get(&key, None).await.unwrap();
        let pieces: Vec<axum::body::Bytes> = object.body.try_collect().await.unwrap();
        pieces.concat()
    };
    assert_eq!(read(restarted.clone(), old.clone()).await, b"written under the first key");
    assert_eq!(read(restarted.clone(), new.clone()).await, b"written under the second key");
    // Each file's header names the key it was written under.
    let header_names = |key: &str, id: &str| {
        let raw = std::fs::read(env.files.path().join(key)).unwrap();
        raw[10..10 + usize::from(raw[9])] == *id.as_bytes()
    };
    assert!(header_names(&old, &first));
    assert!(header_names(&new, &second));
}
