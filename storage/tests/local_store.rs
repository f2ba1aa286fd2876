//! The encrypted local store: what lands on disk, reads whole and ranged, what tampering and
//! truncation give, key rotation, and that a failed upload leaves nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use cairn_platform::settings::FilesSettings;
use cairn_platform::Settings;
use cairn_storage::{ByteRange, ByteStream, FileStore, StoreError, LOCAL_CHUNK_BYTES as CHUNK};
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

const TAG: usize = 16;

fn settings(dir: &Path, key_file: Option<&Path>) -> FilesSettings {
    let mut vars = HashMap::from([("CAIRN_FILES_DIR".to_owned(), dir.display().to_string())]);
    if let Some(file) = key_file {
        vars.insert("CAIRN_FILES_MASTER_KEY_FILE".to_owned(), file.display().to_string());
    }
    Settings::from_lookup(|k| vars.get(k).cloned()).unwrap().files
}

async fn store(dir: &Path) -> FileStore {
    FileStore::open(&settings(dir, None), false).await.unwrap()
}

/// Bytes that differ at every position (a byte pattern with a period coprime to the chunk size).
fn plaintext(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i / 251 % 7) as u8).collect()
}

/// `data` in pieces of uneven sizes, as a network body arrives.
fn body_of(data: &[u8]) -> ByteStream {
    let pieces: Vec<Result<Bytes, std::io::Error>> =
        data.chunks(10_007).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    futures::stream::iter(pieces).boxed()
}

async fn put(store: &FileStore, data: &[u8]) -> String {
    let key = FileStore::key_for(Uuid::new_v4());
    assert_eq!(store.put(&key, body_of(data)).await.unwrap(), data.len() as u64);
    key
}

fn stored_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(key)
}

/// Everything a read yields: the bytes before any error, and the error.
async fn read(store: &FileStore, key: &str, range: Option<ByteRange>) -> (Vec<u8>, Option<String>) {
    let object = match store.get(key, range).await {
        Ok(object) => object,
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    let mut body = object.body;
    let mut bytes = Vec::new();
    while let Some(piece) = body.next().await {
        match piece {
            Ok(piece) => bytes.extend_from_slice(&piece),
            Err(e) => return (bytes, Some(e.to_string())),
        }
    }
    (bytes, None)
}

async fn read_ok(store: &FileStore, key: &str, range: Option<ByteRange>) -> Vec<u8> {
    let (bytes, error) = read(store, key, range).await;
    assert_eq!(error, None, "reading {key} {range:?}");
    bytes
}

fn header_len(raw: &[u8]) -> usize {
    10 + usize::from(raw[9]) + 24 + 48 + 19
}

#[tokio::test]
async fn the_stored_bytes_are_not_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let data = plaintext(3 * CHUNK + 100);
    let key = put(&store, &data).await;

    let raw = std::fs::read(stored_path(dir.path(), &key)).unwrap();
    assert_eq!(&raw[..8], b"CAIRNENC");
    // The header, then four chunks each with its tag.
    assert_eq!(raw.len(), header_len(&raw) + data.len() + 4 * TAG);
    // No 32-byte run of the plaintext, taken from across the file, appears in it.
    let stored = &raw[header_len(&raw)..];
    for start in (0..data.len() - 32).step_by(data.len() / 16) {
        let run = &data[start..start + 32];
        assert!(!stored.windows(32).any(|w| w == run), "plaintext from byte {start} found on disk");
    }
    // The same bytes stored twice are encrypted under different keys.
    let again = put(&store, &data).await;
    let raw_again = std::fs::read(stored_path(dir.path(), &again)).unwrap();
    assert_ne!(raw[header_len(&raw)..], raw_again[header_len(&raw_again)..]);
}

#[tokio::test]
async fn whole_and_ranged_reads_give_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    for len in [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
        let data = plaintext(len);
        let key = put(&store, &data).await;
        let object = store.get(&key, None).await.unwrap();
        assert_eq!(object.size, len as u64);
        assert_eq!(read_ok(&store, &key, None).await, data, "whole read of {len} bytes");

        let last = len as u64 - 1;
        let chunk = CHUNK as u64;
        let ranges = [
            (0, 0),
            (last, last),
            (0, last),
            (1, last.min(100)),
            (last / 2, last),
            // Inside one chunk, across one boundary, across several, ending past the end.
            (chunk.min(last) / 2, (chunk.min(last) / 2 + 10).min(last)),
            (chunk.saturating_sub(3).min(last), (chunk + 3).min(last)),
            (10.min(last), (2 * chunk + 7).min(last)),
            (last, last + 1000),
        ];
        for (start, end) in ranges {
            let got = read_ok(&store, &key, Some(ByteRange { start, end })).await;
            let want = &data[start as usize..=end.min(last) as usize];
            assert_eq!(got, want, "range {start}-{end} of {len} bytes");
            let object = store.get(&key, Some(ByteRange { start, end })).await.unwrap();
            assert_eq!(object.size, len as u64, "a ranged read still says the whole size");
        }
        let past = store.get(&key, Some(ByteRange { start: len as u64, end: len as u64 + 5 })).await;
        assert!(matches!(past, Err(StoreError::RangeNotSatisfiable { size }) if size == len as u64));
    }
}

#[tokio::test]
async fn an_empty_file_reads_back_empty() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let key = put(&store, &[]).await;
    let object = store.get(&key, None).await.unwrap();
    assert_eq!(object.size, 0);
    assert!(read_ok(&store, &key, None).await.is_empty());
    let range = store.get(&key, Some(ByteRange { start: 0, end: 0 })).await;
    assert!(matches!(range, Err(StoreError::RangeNotSatisfiable { size: 0 })));
    // Its one (empty) chunk is still authenticated.
    let path = stored_path(dir.path(), &key);
    let mut raw = std::fs::read(&path).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    std::fs::write(&path, raw).unwrap();
    assert!(matches!(store.get(&key, None).await, Err(StoreError::Corrupt { chunk: 0, .. })));
}

#[tokio::test]
async fn a_missing_object_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let key = FileStore::key_for(Uuid::new_v4());
    assert!(matches!(store.get(&key, None).await, Err(StoreError::NotFound(_))));
}

/// The log lines of this test binary, to find the line a corrupt read writes.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::ERROR)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_flipped_byte_anywhere_is_an_error_never_altered_bytes() {
    let logs = captured_logs();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let data = plaintext(2 * CHUNK + 1000);
    let key = put(&store, &data).await;
    let path = stored_path(dir.path(), &key);
    let pristine = std::fs::read(&path).unwrap();
    let header = header_len(&pristine);
    let sealed = CHUNK + TAG;

    // Every header byte; in each chunk its first, middle and last (tag) bytes.
    let mut positions: Vec<(usize, u64)> = (0..header).map(|p| (p, 0)).collect();
    for chunk in 0..3 {
        let start = header + chunk * sealed;
        let end = (start + sealed).min(pristine.len()) - 1;
        for p in [start, (start + end) / 2, end] {
            positions.push((p, chunk as u64));
        }
    }
    for (position, chunk) in positions {
        let mut raw = pristine.clone();
        raw[position] ^= 0x20;
        std::fs::write(&path, &raw).unwrap();

        // A whole read: an error, and before it only bytes of the chunks before the damage.
        let (bytes, error) = read(&store, &key, None).await;
        let error = error.unwrap_or_else(|| panic!("flipping byte {position} went unnoticed"));
        assert!(error.contains(&format!("chunk {chunk}")), "byte {position}: {error}");
        assert!(bytes.len() <= chunk as usize * CHUNK, "byte {position}: bytes of the damaged chunk were served");
        assert_eq!(bytes, data[..bytes.len()], "byte {position}: altered bytes were served");

        // A ranged read of the damaged chunk fails before answering.
        let start = chunk * CHUNK as u64 + 5;
        let got = store.get(&key, Some(ByteRange { start, end: start + 10 })).await;
        match got {
            Err(StoreError::Corrupt { key: k, chunk: c }) => {
                assert_eq!((k.as_str(), c), (key.as_str(), chunk), "byte {position}");
            }
            Err(e) => panic!("byte {position}: {e}"),
            Ok(_) => panic!("byte {position}: a ranged read of a damaged chunk answered"),
        }
    }
    // A range that does not touch the damaged chunk still reads (a later chunk damaged).
    let mut raw = pristine.clone();
    raw[header + 2 * sealed + 3] ^= 1;
    std::fs::write(&path, &raw).unwrap();
    assert_eq!(read_ok(&store, &key, Some(ByteRange { start: 0, end: 99 })).await, data[..100]);

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = logs.lines().find(|l| l.contains(&key)).expect("no log line names the damaged file");
    assert!(line.contains("ERROR") && line.contains("chunk="), "{line}");
}

#[tokio::test]
async fn truncation_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let data = plaintext(3 * CHUNK);
    let key = put(&store, &data).await;
    let path = stored_path(dir.path(), &key);
    let pristine = std::fs::read(&path).unwrap();
    let header = header_len(&pristine);
    let sealed = CHUNK + TAG;
    assert_eq!(read_ok(&store, &key, None).await, data);

    // At a chunk boundary (what is left looks whole but its last chunk is not flagged last),
    // inside a chunk, inside a tag, right after the header, inside the header.
    for (cut, chunk) in [
        (header + 2 * sealed, 1),
        (header + sealed, 0),
        (header + 2 * sealed + 100, 2),
        (header + 2 * sealed + 5, 2),
        (header, 0),
        (header - 3, 0),
    ] {
        std::fs::write(&path, &pristine[..cut]).unwrap();
        let (bytes, error) = read(&store, &key, None).await;
        let error = error.unwrap_or_else(|| panic!("a file cut at {cut} read as whole"));
        assert!(error.contains(&format!("chunk {chunk}")), "cut at {cut}: {error}");
        assert!(bytes.len() <= chunk * CHUNK && bytes == data[..bytes.len()], "cut at {cut}");
    }
}

#[tokio::test]
async fn headers_and_chunks_do_not_move_between_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let data = plaintext(2 * CHUNK + 10);
    let (a, b) = (put(&store, &data).await, put(&store, &data).await);
    let (path_a, path_b) = (stored_path(dir.path(), &a), stored_path(dir.path(), &b));
    let (raw_a, raw_b) = (std::fs::read(&path_a).unwrap(), std::fs::read(&path_b).unwrap());
    let header = header_len(&raw_a);
    let sealed = CHUNK + TAG;

    // B's second chunk in A's file.
    let mut mixed = raw_a.clone();
    mixed[header + sealed..header + 2 * sealed].copy_from_slice(&raw_b[header + sealed..header + 2 * sealed]);
    std::fs::write(&path_a, &mixed).unwrap();
    assert!(matches!(
        store.get(&a, Some(ByteRange { start: CHUNK as u64, end: CHUNK as u64 })).await,
        Err(StoreError::Corrupt { chunk: 1, .. })
    ));
    // A's chunks swapped with each other.
    let mut swapped = raw_a.clone();
    swapped[header..header + sealed].copy_from_slice(&raw_a[header + sealed..header + 2 * sealed]);
    swapped[header + sealed..header + 2 * sealed].copy_from_slice(&raw_a[header..header + sealed]);
    std::fs::write(&path_a, &swapped).unwrap();
    assert!(matches!(store.get(&a, None).await, Err(StoreError::Corrupt { chunk: 0, .. })));
    // A's file under B's key.
    std::fs::write(&path_b, &raw_a).unwrap();
    assert!(matches!(store.get(&b, None).await, Err(StoreError::Corrupt { chunk: 0, .. })));
    // Restored, both read again.
    std::fs::write(&path_a, &raw_a).unwrap();
    std::fs::write(&path_b, &raw_b).unwrap();
    assert_eq!(read_ok(&store, &a, None).await, data);
    assert_eq!(read_ok(&store, &b, None).await, data);
}

fn key_id_of(raw: &[u8]) -> String {
    String::from_utf8(raw[10..10 + usize::from(raw[9])].to_vec()).unwrap()
}

#[tokio::test]
async fn rotation_keeps_old_files_readable_and_new_ones_use_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("master.keys");
    let first = cairn_storage::keys::append_new_key(&key_file, chrono::Utc::now()).unwrap();
    let files = settings(dir.path(), Some(&key_file));
    let store = FileStore::open(&files, true).await.unwrap();
    let old_data = plaintext(CHUNK + 7);
    let old = put(&store, &old_data).await;
    assert_eq!(key_id_of(&std::fs::read(stored_path(dir.path(), &old)).unwrap()), first);

    let second =
        cairn_storage::keys::append_new_key(&key_file, chrono::Utc::now() + chrono::Duration::seconds(1)).unwrap();
    assert_ne!(first, second);
    // A running store keeps its keys; a reopened one (a restarted process) writes with the new.
    let reopened = FileStore::open(&files, true).await.unwrap();
    let new_data = plaintext(10);
    let new = put(&reopened, &new_data).await;
    assert_eq!(key_id_of(&std::fs::read(stored_path(dir.path(), &new)).unwrap()), second);
    assert_eq!(read_ok(&reopened, &old, None).await, old_data);
    assert_eq!(read_ok(&reopened, &new, None).await, new_data);

    // Without the old key, the old file does not open (and says so), the new one does.
    let text = std::fs::read_to_string(&key_file).unwrap();
    let only_new: String = text.lines().filter(|l| l.starts_with(&second)).map(|l| format!("{l}\n")).collect();
    std::fs::write(&key_file, only_new).unwrap();
    let without_old = FileStore::open(&files, true).await.unwrap();
    assert!(matches!(without_old.get(&old, None).await, Err(StoreError::Corrupt { chunk: 0, .. })));
    assert_eq!(read_ok(&without_old, &new, None).await, new_data);
}

#[tokio::test]
async fn production_refuses_the_development_key() {
    let dir = tempfile::tempdir().unwrap();
    // No key file: the built-in development key, fine in development only.
    let files = settings(dir.path(), None);
    assert!(FileStore::open(&files, false).await.is_ok());
    let refused = FileStore::open(&files, true).await;
    assert!(
        matches!(&refused, Err(StoreError::Config(m)) if m.contains("development master key")),
        "{:?}",
        refused.err()
    );

    // A key file that still holds a `-dev` key, even an old one.
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("master.keys");
    std::fs::write(&key_file, format!("old-dev:{}\n", base64_key(7))).unwrap();
    cairn_storage::keys::append_new_key(&key_file, chrono::Utc::now()).unwrap();
    let files = settings(dir.path(), Some(&key_file));
    assert!(FileStore::open(&files, false).await.is_ok());
    assert!(matches!(FileStore::open(&files, true).await, Err(StoreError::Config(_))));
}

fn base64_key(byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// A body that yields `good` bytes and then fails, as a connection cut mid-upload does.
fn failing_body(good: usize) -> ByteStream {
    let data = plaintext(good);
    body_of(&data).chain(futures::stream::once(async { Err(std::io::Error::other("connection reset")) })).boxed()
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[tokio::test]
async fn a_body_that_fails_midway_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let far_future = chrono::Utc::now() + chrono::Duration::days(1);
    // The listing sees what is stored…
    let kept = put(&store, &plaintext(100)).await;
    let listed: Vec<_> = store.list_before(far_future).try_collect().await.unwrap();
    assert_eq!(listed.iter().map(|o| o.key.clone()).collect::<Vec<_>>(), vec![kept.clone()]);

    // …and nothing of uploads that failed: before the first chunk was full, and after several.
    for good in [1000, 3 * CHUNK + 17] {
        let key = FileStore::key_for(Uuid::new_v4());
        let result = store.put(&key, failing_body(good)).await;
        assert!(matches!(result, Err(StoreError::Source(_))), "{:?}", result.err());
        assert!(matches!(store.get(&key, None).await, Err(StoreError::NotFound(_))));
    }
    let listed: Vec<_> = store.list_before(far_future).try_collect().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(entries(&dir.path().join("files")), 1);
    assert_eq!(entries(&dir.path().join("partial")), 0);
}

#[tokio::test]
async fn an_upload_given_up_midway_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let (sender, receiver) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
    let key = FileStore::key_for(Uuid::new_v4());
    let upload = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.put(&key, receiver.boxed()).await }
    });
    for _ in 0..3 {
        sender.unbounded_send(Ok(Bytes::from(plaintext(CHUNK)))).unwrap();
    }
    // The upload is under way: its partial file holds the chunks sealed so far.
    let partial = dir.path().join("partial");
    wait_for("a partial file with two sealed chunks", || {
        std::fs::read_dir(&partial).unwrap().any(|e| e.unwrap().metadata().unwrap().len() >= 2 * (CHUNK + TAG) as u64)
    })
    .await;
    upload.abort();
    assert!(upload.await.unwrap_err().is_cancelled());
    assert_eq!(entries(&partial), 0);
    assert_eq!(entries(&dir.path().join("files")), 0);
}

#[tokio::test]
async fn delete_is_idempotent_and_listing_respects_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let key = put(&store, &plaintext(10)).await;
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(store.list_before(past).try_collect::<Vec<_>>().await.unwrap().len(), 0);
    assert_eq!(store.list_before(future).try_collect::<Vec<_>>().await.unwrap().len(), 1);
    store.delete(&key).await.unwrap();
    store.delete(&key).await.unwrap();
    assert!(matches!(store.get(&key, None).await, Err(StoreError::NotFound(_))));
    assert_eq!(store.list_before(future).try_collect::<Vec<_>>().await.unwrap().len(), 0);
}

#[tokio::test]
async fn stale_partial_files_are_removed_by_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let stale = dir.path().join("partial").join(format!("{}.files_{}", Uuid::new_v4(), Uuid::new_v4()));
    std::fs::write(&stale, b"half an upload").unwrap();
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    store.list_before(past).try_collect::<Vec<_>>().await.unwrap();
    assert!(stale.exists(), "a partial file younger than the cut-off is kept (an upload in progress)");
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    store.list_before(future).try_collect::<Vec<_>>().await.unwrap();
    assert!(!stale.exists());
}

/// Polls `condition` until it holds, failing after a deadline.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
