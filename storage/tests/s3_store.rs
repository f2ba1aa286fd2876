//! The S3 store against a real S3-compatible server: the s3s-fs that `.ci/run` installs and
//! starts (`TEST_S3_ENDPOINT` points elsewhere). A missing server fails these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use cairn_platform::settings::FilesSettings;
use cairn_platform::Settings;
use cairn_storage::{Backend, ByteRange, ByteStream, FileStore, StoreError};
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

const MIB: usize = 1024 * 1024;
const PART: usize = 5 * MIB;

fn endpoint() -> String {
    std::env::var("TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:8014".to_owned())
}

fn settings(bucket: &str) -> FilesSettings {
    let endpoint = endpoint();
    let listening =
        reqwest::Url::parse(&endpoint).ok().and_then(|u| u.socket_addrs(|| Some(80)).ok()).is_some_and(|addrs| {
            addrs.iter().any(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
        });
    assert!(listening, "no S3-compatible server listens at {endpoint}: run .ci/run (it installs and starts s3s-fs)");
    let vars = HashMap::from([
        ("CAIRN_FILES_STORE", "s3".to_owned()),
        ("S3_ENDPOINT", endpoint),
        ("S3_BUCKET", bucket.to_owned()),
        ("S3_ACCESS_KEY_ID", std::env::var("TEST_S3_ACCESS_KEY_ID").unwrap_or_else(|_| "cairn-test".to_owned())),
        (
            "S3_SECRET_ACCESS_KEY",
            std::env::var("TEST_S3_SECRET_ACCESS_KEY").unwrap_or_else(|_| "cairn-test-secret".to_owned()),
        ),
        ("S3_PART_SIZE", PART.to_string()),
    ]);
    Settings::from_lookup(|k| vars.get(k).cloned()).unwrap().files
}

fn bucket() -> String {
    format!("cairn-t{}", &Uuid::new_v4().simple().to_string()[..12])
}

async fn store() -> FileStore {
    FileStore::open(&settings(&bucket()), false).await.unwrap()
}

fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i / 251 % 7) as u8).collect()
}

fn body_of(data: &[u8]) -> ByteStream {
    let pieces: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(300_007).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(pieces).boxed()
}

async fn read(store: &FileStore, key: &str, range: Option<ByteRange>) -> Vec<u8> {
    let object = store.get(key, range).await.unwrap();
    let pieces: Vec<Bytes> = object.body.try_collect().await.unwrap();
    pieces.concat()
}

async fn keys(store: &FileStore, before: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let objects: Vec<_> = store.list_before(before).try_collect().await.unwrap();
    objects.into_iter().map(|o| o.key).collect()
}

fn far_future() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() + chrono::Duration::days(1)
}

#[tokio::test]
async fn a_large_file_goes_up_in_parts_and_reads_back_whole_and_ranged() {
    let store = store().await;
    assert_eq!(store.backend(), Backend::S3);
    // Two full parts and a short one.
    let data = plaintext(2 * PART + 123_457);
    let key = FileStore::key_for(Uuid::new_v4());
    assert_eq!(store.put(&key, body_of(&data)).await.unwrap(), data.len() as u64);

    let object = store.get(&key, None).await.unwrap();
    assert_eq!(object.size, data.len() as u64);
    assert_eq!(read(&store, &key, None).await, data);
    // Across the boundary between the first two parts, and the last byte.
    let (start, end) = (PART as u64 - 10, PART as u64 + 10);
    let object = store.get(&key, Some(ByteRange { start, end })).await.unwrap();
    assert_eq!(object.size, data.len() as u64, "a ranged read still says the whole size");
    assert_eq!(read(&store, &key, Some(ByteRange { start, end })).await, data[start as usize..=end as usize]);
    let last = data.len() as u64 - 1;
    assert_eq!(read(&store, &key, Some(ByteRange { start: last, end: last + 100 })).await, [data[last as usize]]);
    let past = store.get(&key, Some(ByteRange { start: last + 1, end: last + 5 })).await;
    assert!(
        matches!(past, Err(StoreError::RangeNotSatisfiable { size }) if size == data.len() as u64),
        "{:?}",
        past.err()
    );
}

#[tokio::test]
async fn small_and_empty_files_go_up_in_one_request() {
    let store = store().await;
    for len in [0, 1, PART] {
        let data = plaintext(len);
        let key = FileStore::key_for(Uuid::new_v4());
        assert_eq!(store.put(&key, body_of(&data)).await.unwrap(), len as u64);
        assert_eq!(store.get(&key, None).await.unwrap().size, len as u64);
        assert_eq!(read(&store, &key, None).await, data, "{len} bytes");
    }
}

#[tokio::test]
async fn a_presigned_url_serves_the_object() {
    let store = store().await;
    let data = plaintext(1000);
    let key = FileStore::key_for(Uuid::new_v4());
    store.put(&key, body_of(&data)).await.unwrap();
    let url = store
        .presigned_get(&key, Duration::from_secs(60), "image/png", "inline; filename=\"a.png\"")
        .await
        .unwrap()
        .expect("the S3 store presigns");
    let parsed = reqwest::Url::parse(&url).unwrap();
    let query: HashMap<String, String> = parsed.query_pairs().into_owned().collect();
    // The answer's headers are part of the signature (s3s-fs ignores them; S3 and MinIO send them).
    assert_eq!(query.get("response-content-type").map(String::as_str), Some("image/png"));
    assert_eq!(query.get("response-content-disposition").map(String::as_str), Some("inline; filename=\"a.png\""));
    assert_eq!(query.get("X-Amz-Expires").map(String::as_str), Some("60"));

    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), data);
    // The signature covers the key: the same URL for another object is refused.
    let other = url.replace(&key, &FileStore::key_for(Uuid::new_v4()));
    assert_eq!(reqwest::get(&other).await.unwrap().status(), 403);
}

#[tokio::test]
async fn delete_is_idempotent_and_listing_pages_and_respects_the_time() {
    let store = store().await;
    let mut stored = Vec::new();
    for _ in 0..3 {
        let key = FileStore::key_for(Uuid::new_v4());
        store.put(&key, body_of(&plaintext(10))).await.unwrap();
        stored.push(key);
    }
    stored.sort();
    let mut listed = keys(&store, far_future()).await;
    listed.sort();
    assert_eq!(listed, stored);
    assert!(keys(&store, chrono::Utc::now() - chrono::Duration::hours(1)).await.is_empty());

    store.delete(&stored[0]).await.unwrap();
    store.delete(&stored[0]).await.unwrap();
    assert!(matches!(store.get(&stored[0], None).await, Err(StoreError::NotFound(_))));
    assert_eq!(keys(&store, far_future()).await.len(), 2);
}

/// A body that yields `good` bytes and then fails, as a connection cut mid-upload does.
fn failing_body(good: usize) -> ByteStream {
    body_of(&plaintext(good))
        .chain(futures::stream::once(async { Err(std::io::Error::other("connection reset")) }))
        .boxed()
}

#[tokio::test]
async fn a_body_that_fails_midway_leaves_nothing() {
    let store = store().await;
    let kept = FileStore::key_for(Uuid::new_v4());
    store.put(&kept, body_of(&plaintext(10))).await.unwrap();
    assert_eq!(keys(&store, far_future()).await, vec![kept.clone()], "the listing sees what is stored");

    // Within the first part (one PutObject never sent), and after two parts went up.
    for good in [MIB, 2 * PART + MIB] {
        let key = FileStore::key_for(Uuid::new_v4());
        let result = store.put(&key, failing_body(good)).await;
        assert!(matches!(result, Err(StoreError::Source(_))), "{:?}", result.err());
        assert!(matches!(store.get(&key, None).await, Err(StoreError::NotFound(_))));
    }
    assert_eq!(keys(&store, far_future()).await, vec![kept]);
}

#[tokio::test]
async fn production_refuses_a_missing_bucket_and_development_creates_it() {
    let bucket = bucket();
    let refused = FileStore::open(&settings(&bucket), true).await;
    assert!(matches!(&refused, Err(StoreError::Config(m)) if m.contains("does not exist")), "{:?}", refused.err());
    let store = FileStore::open(&settings(&bucket), false).await.unwrap();
    assert!(keys(&store, far_future()).await.is_empty());
    // Now that it exists, production opens it.
    assert!(FileStore::open(&settings(&bucket), true).await.is_ok());
}

#[tokio::test]
async fn wrong_credentials_are_refused_at_open() {
    let mut files = settings(&bucket());
    files.s3.secret_access_key = Some("not-the-secret".to_owned());
    assert!(matches!(FileStore::open(&files, false).await, Err(StoreError::Config(_))));
}
