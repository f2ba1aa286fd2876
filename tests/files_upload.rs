//! Files on the command side, through real HTTP: uploads streamed to the store with their
//! sniffed type, size and SHA-256; hostile multipart bodies; bodies cut off mid-stream; type,
//! size and quota refusals (concurrent uploads included) that leave nothing behind; sharing,
//! unsharing and deleting; and message attachments.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use cairn::app::Services;
use common::{Reply, TestApp, TestEnv};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Settings every test here runs with: files without a verified address (the default list's
/// rule has its own tests), and no message rate limit in the way.
const BASE: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_RATE_LIMIT_MESSAGES", "100000/s")];

const WAIT: Duration = Duration::from_secs(10);

async fn spawn(extra: &[(&str, &str)]) -> TestApp {
    let settings: Vec<(&str, &str)> = BASE.iter().chain(extra).copied().collect();
    TestApp::spawn_with(TestEnv::new(), Services::all(), &settings).await
}

/// A new user, signed in: (id, access token).
async fn user(app: &TestApp, name: &str) -> (Uuid, String) {
    let email = format!("{name}-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let id = app.register_ok(&email).await;
    (id, app.login(&email).await)
}

/// One part of a multipart body.
struct Part<'a> {
    name: &'a str,
    file_name: Option<&'a str>,
    content_type: Option<&'a str>,
    data: &'a [u8],
}

fn file_part<'a>(file_name: &'a str, content_type: Option<&'a str>, data: &'a [u8]) -> Part<'a> {
    Part { name: "file", file_name: Some(file_name), content_type, data }
}

fn text_part<'a>(name: &'a str, value: &'a str) -> Part<'a> {
    Part { name, file_name: None, content_type: None, data: value.as_bytes() }
}

const BOUNDARY: &str = "cairn-test-7f3a9c0e";

/// A `multipart/form-data` body written by hand, so that hostile ones can be written too.
fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{}\"", part.name).as_bytes(),
        );
        if let Some(file_name) = part.file_name {
            body.extend_from_slice(format!("; filename=\"{file_name}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        if let Some(content_type) = part.content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(part.data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn post_body(app: &TestApp, token: &str, content_type: &str, body: Vec<u8>) -> Reply {
    let resp = app
        .client
        .post(format!("{}/api/v1/files", app.address))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply { status, body, headers }
}

async fn upload(app: &TestApp, token: &str, parts: &[Part<'_>]) -> Reply {
    post_body(app, token, &format!("multipart/form-data; boundary={BOUNDARY}"), multipart(parts)).await
}

/// Uploads `data` as `name` and returns the file's id.
async fn upload_ok(app: &TestApp, token: &str, name: &str, data: &[u8]) -> Uuid {
    let reply = upload(app, token, &[file_part(name, None, data)]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.data()["file"]["id"].as_str().unwrap().parse().unwrap()
}

/// A valid PNG image header followed by `len` bytes of noise: PNG to any sniffer.
fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89".to_vec();
    let mut state = 0x2545_f491_u32;
    bytes.extend((0..len).map(|_| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state.to_le_bytes()[0]
    }));
    bytes
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

async fn scalar(app: &TestApp, query: &str) -> i64 {
    sqlx::query_scalar(query).fetch_one(&app.pool).await.unwrap()
}

/// Regular files under `dir`, at any depth.
fn stored_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.map(|e| e.unwrap()).map(|e| if e.file_type().unwrap().is_dir() { stored_files(&e.path()) } else { 1 }).sum()
}

/// What an upload leaves behind anywhere: File events, uploads in flight, bytes reserved,
/// bytes stored (for every owner), objects in the store.
#[derive(Debug, PartialEq, Eq)]
struct Traces {
    file_events: i64,
    in_flight: i64,
    reserved: i64,
    stored: i64,
    objects: usize,
}

async fn traces(app: &TestApp) -> Traces {
    Traces {
        file_events: scalar(app, "SELECT count(*) FROM events WHERE aggregate_type = 'File'").await,
        in_flight: scalar(app, "SELECT count(*) FROM file_uploads").await,
        reserved: scalar(app, "SELECT coalesce(sum(reserved_bytes), 0)::bigint FROM file_quota").await,
        stored: scalar(app, "SELECT coalesce(sum(stored_bytes), 0)::bigint FROM file_quota").await,
        objects: stored_files(app.env.files.path()),
    }
}

/// Polls until the traces are `expected` (a clean-up may run on a task of its own).
async fn wait_traces(app: &TestApp, expected: &Traces) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = traces(app).await;
        if now == *expected {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "left behind: {now:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_refused(reply: &Reply, status: StatusCode, code: &str, what: &str) {
    assert_eq!((reply.status, reply.code()), (status, code), "{what}: {:?}", reply.body);
    assert_eq!(reply.body["success"], false, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_is_stored_and_recorded_with_its_sniffed_type_size_and_sha256() {
    // The general body limit (64 KiB by default) does not apply to uploads.
    let app = spawn(&[("CAIRN_MAX_BODY_BYTES", "65536")]).await;
    let (owner, token) = user(&app, "owner").await;
    let data = png(3 * 1024 * 1024);

    let reply = upload(&app, &token, &[file_part("holiday.png", Some("image/png"), &data)]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let file = &reply.data()["file"];
    let id: Uuid = file["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(file["owner_id"], json!(owner));
    assert_eq!(file["name"], "holiday.png");
    assert_eq!(file["size"], data.len());
    assert_eq!(file["content_type"], "image/png");
    assert_eq!(file["sha256"], sha256_hex(&data));
    assert_eq!(file["visibility"], "private");
    assert_eq!(file["shared_with"], json!([]));

    // The one event, with every fact, at the position the answer's token names.
    let (event_type, payload, tx, pos, recorded_at): (String, Value, i64, i64, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT event_type, payload, transaction_id::text::bigint, global_position, recorded_at FROM events \
             WHERE aggregate_type = 'File' AND aggregate_id = $1 AND sequence = 1",
        )
        .bind(id.to_string())
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(event_type, "FileUploaded");
    assert_eq!(
        payload,
        json!({ "FileUploaded": {
            "owner_id": owner, "name": "holiday.png", "size": data.len(), "content_type": "image/png",
            "sha256": sha256_hex(&data), "visibility": "private", "backend": "local", "key": format!("files/{id}"),
        }})
    );
    assert_eq!(reply.token(), format!("{tx}.{pos}"));
    assert_eq!(file["created_at"].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap(), recorded_at);
    // The upload is no longer in flight; its bytes count as stored, nothing stays reserved.
    let size = i64::try_from(data.len()).unwrap();
    assert_eq!(traces(&app).await, Traces { file_events: 1, in_flight: 0, reserved: 0, stored: size, objects: 1 });

    // Public, and text whose declared type (CSV) is kept over the sniffed text/plain.
    let csv = b"name,size\nholiday.png,3145728\n";
    let reply = upload(
        &app,
        &token,
        &[text_part("visibility", "public"), file_part("sizes.csv", Some("text/csv; charset=utf-8"), csv)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_eq!(reply.data()["file"]["visibility"], "public");
    assert_eq!(reply.data()["file"]["content_type"], "text/csv");
    // Declared as nothing in particular: the bytes decide.
    let reply = upload(&app, &token, &[file_part("notes", Some("application/octet-stream"), b"just words")]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_eq!(reply.data()["file"]["content_type"], "text/plain");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_multipart_bodies_are_refused_or_made_harmless_and_leave_nothing_behind() {
    let app = spawn(&[]).await;
    let (_, token) = user(&app, "hostile").await;
    let data = png(100);

    // File names: only the last path component, no control or format characters, at most 255
    // characters keeping the extension; the upload itself works.
    let long = format!("{}.png", "n".repeat(1_000));
    for (raw, kept) in [
        ("../../etc/passwd", "passwd".to_owned()),
        ("..\\..\\boot.ini", "boot.ini".to_owned()),
        ("in\u{202e}voice\tgnp.png", "invoicegnp.png".to_owned()),
        (long.as_str(), format!("{}.png", "n".repeat(251))),
    ] {
        let reply = upload(&app, &token, &[file_part(raw, None, &data)]).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{raw}: {:?}", reply.body);
        assert_eq!(reply.data()["file"]["name"], kept.as_str(), "{raw}");
    }
    let before = traces(&app).await;
    assert_eq!((before.file_events, before.objects), (4, 4), "the uploads above were stored and recorded");

    // A NUL cannot even reach the name: the part's header is refused as malformed.
    let reply = upload(&app, &token, &[file_part("evil\0name.png", None, &data)]).await;
    assert_refused(&reply, StatusCode::BAD_REQUEST, "MALFORMED_REQUEST", "NUL in the file name");

    let no_file = upload(&app, &token, &[text_part("visibility", "public")]).await;
    assert_refused(&no_file, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "no file field");
    assert!(no_file.body["error"]["details"]["file"].is_string(), "{:?}", no_file.body);
    let empty = upload(&app, &token, &[]).await;
    assert_refused(&empty, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "no field at all");

    let two = upload(&app, &token, &[file_part("a.png", None, &data), file_part("b.png", None, &data)]).await;
    assert_refused(&two, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "two file fields");
    assert!(two.body["error"]["details"]["file"].is_string(), "{:?}", two.body);

    let unknown = upload(&app, &token, &[file_part("a.png", None, &data), text_part("owner", "someone")]).await;
    assert_refused(&unknown, StatusCode::BAD_REQUEST, "MALFORMED_REQUEST", "unknown field");
    assert!(unknown.body["error"]["details"]["owner"].is_string(), "{:?}", unknown.body);

    let visibility =
        upload(&app, &token, &[text_part("visibility", "everyone"), file_part("a.png", None, &data)]).await;
    assert_refused(&visibility, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "bad visibility");
    assert!(visibility.body["error"]["details"]["visibility"].is_string(), "{:?}", visibility.body);

    let json_body = post_body(&app, &token, "application/json", b"{\"file\": \"x\"}".to_vec()).await;
    assert_refused(&json_body, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "not multipart");
    let garbage =
        post_body(&app, &token, &format!("multipart/form-data; boundary={BOUNDARY}"), b"no parts here".to_vec()).await;
    assert_refused(&garbage, StatusCode::BAD_REQUEST, "MALFORMED_REQUEST", "no multipart inside");

    wait_traces(&app, &before).await;
    app.stop().await;
}

/// Sends `head` of an HTTP request and then `body` (all of it, or the first `cut` bytes before
/// closing the connection), over a raw TCP connection; returns what came back.
fn raw_upload(address: &str, token: &str, body: &[u8], cut: Option<usize>, wait: impl FnOnce()) -> String {
    let mut stream = std::net::TcpStream::connect(address.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /api/v1/files HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    match cut {
        None => {
            stream.write_all(body).unwrap();
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            answer
        }
        Some(cut) => {
            stream.write_all(&body[..cut]).unwrap();
            stream.flush().unwrap();
            wait();
            drop(stream);
            String::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_cut_off_mid_stream_records_nothing_and_leaves_nothing() {
    let app = spawn(&[]).await;
    let (_, token) = user(&app, "cut").await;
    let data = png(1024 * 1024);
    let body = multipart(&[file_part("big.png", None, &data)]);

    // The very same request, sent whole over the same kind of connection, is stored.
    let (address, whole_token, whole_body) = (app.address.clone(), token.clone(), body.clone());
    let answer = tokio::task::spawn_blocking(move || raw_upload(&address, &whole_token, &whole_body, None, || {}))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let size = i64::try_from(data.len()).unwrap();
    let whole = Traces { file_events: 1, in_flight: 0, reserved: 0, stored: size, objects: 1 };
    assert_eq!(traces(&app).await, whole);

    // Cut off halfway, once the upload is registered and storing (its row is there, its bytes
    // reserved): afterwards nothing of it is left.
    let (address, cut_token, pool) = (app.address.clone(), token.clone(), app.pool.clone());
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        raw_upload(&address, &cut_token, &body, Some(body.len() / 2), || {
            runtime.block_on(common::wait_count(
                &pool,
                "SELECT count(*) FROM file_uploads WHERE reserved_bytes > 0",
                1,
                WAIT,
            ));
        })
    })
    .await
    .unwrap();
    wait_traces(&app, &whole).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn types_the_bytes_contradict_or_that_are_not_allowed_are_refused_before_anything_is_kept() {
    let app = spawn(&[]).await;
    let (_, token) = user(&app, "types").await;
    upload_ok(&app, &token, "real.png", &png(64)).await;
    let before = traces(&app).await;

    let disguised = upload(&app, &token, &[file_part("report.pdf", Some("application/pdf"), &png(64))]).await;
    assert_refused(&disguised, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "PNG declared as PDF");
    let message = disguised.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("image/png") && message.contains("application/pdf"), "{message}");

    // An executable (ELF) is not on the allowed list, whatever it is called or declared as.
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0>\0\x01\0\0\0".to_vec();
    elf.resize(200 * 1024, 0x90);
    for declared in [None, Some("application/octet-stream")] {
        let reply = upload(&app, &token, &[file_part("tool.png", declared, &elf)]).await;
        assert_refused(&reply, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "ELF");
        assert!(reply.body["error"]["message"].as_str().unwrap().contains("application/x-executable"));
    }
    // Text claiming to be an image.
    let text = upload(&app, &token, &[file_part("a.png", Some("image/png"), b"hello")]).await;
    assert_refused(&text, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE", "text as PNG");
    wait_traces(&app, &before).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_over_the_upload_limit_is_refused_while_streaming_and_nothing_is_left() {
    let app = spawn(&[("CAIRN_MAX_UPLOAD_BYTES", "300000")]).await;
    let (_, token) = user(&app, "large").await;
    // Exactly the limit is fine.
    let exact = png(300_000 - png(0).len());
    upload_ok(&app, &token, "exact.png", &exact).await;
    let before = traces(&app).await;
    assert_eq!((before.file_events, before.objects), (1, 1));

    for len in [300_001, 2 * 1024 * 1024] {
        let reply = upload(&app, &token, &[file_part("big.png", None, &png(len - png(0).len()))]).await;
        assert_refused(&reply, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", &format!("{len} bytes"));
        if len == 300_001 {
            assert_eq!(reply.body["error"]["details"]["max_bytes"], 300_000, "{:?}", reply.body);
        }
    }
    wait_traces(&app, &before).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_quota_is_never_overshot_one_upload_after_another_or_all_at_once() {
    let quota = 1_000_000_i64;
    let app = spawn(&[("CAIRN_USER_QUOTA_BYTES", "1000000")]).await;
    let (owner, token) = user(&app, "quota").await;

    let first = png(600_000 - png(0).len());
    upload_ok(&app, &token, "first.png", &first).await;
    let before = traces(&app).await;
    let refused = upload(&app, &token, &[file_part("second.png", None, &png(500_000))]).await;
    assert_refused(&refused, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "over the quota");
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("quota"), "{:?}", refused.body);
    assert_eq!(refused.body["error"]["details"], json!({ "quota_bytes": quota, "stored_bytes": 600_000 }));
    wait_traces(&app, &before).await;
    // What still fits is taken, up to the last byte, though the request itself is larger.
    upload_ok(&app, &token, "rest.png", &png(400_000 - png(0).len())).await;
    assert_eq!(scalar(&app, &format!("SELECT stored_bytes FROM file_quota WHERE owner_id = '{owner}'")).await, quota);

    // Eight uploads at once, each 30 % of a fresh user's quota: at most three fit.
    let (racer, racer_token) = user(&app, "racer").await;
    let each = png(300_000 - png(0).len());
    let replies = futures::future::join_all((0..8).map(|n| {
        let (app, token, each) = (&app, &racer_token, &each);
        async move { upload(app, token, &[file_part(&format!("r{n}.png"), None, each)]).await }
    }))
    .await;
    let created = replies.iter().filter(|r| r.status == StatusCode::CREATED).count();
    for reply in replies.iter().filter(|r| r.status != StatusCode::CREATED) {
        assert_refused(reply, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", "a racer over the quota");
    }
    assert!((1..=3).contains(&created), "{created} of 8 uploads of 30 % each were taken");
    let stored = scalar(&app, &format!("SELECT stored_bytes FROM file_quota WHERE owner_id = '{racer}'")).await;
    assert_eq!(stored, 300_000 * i64::try_from(created).unwrap());
    assert!(stored <= quota);
    let recorded = scalar(
        &app,
        &format!("SELECT count(*) FROM events WHERE event_type = 'FileUploaded' AND payload -> 'FileUploaded' ->> 'owner_id' = '{racer}'"),
    )
    .await;
    assert_eq!(recorded, i64::try_from(created).unwrap());
    // Every refused racer gave its reservation back and left no bytes.
    // The owner's two files and the racers' that were taken.
    let total = quota + stored;
    wait_traces(
        &app,
        &Traces { file_events: 2 + recorded, in_flight: 0, reserved: 0, stored: total, objects: 2 + created },
    )
    .await;
    app.stop().await;
}

async fn call(app: &TestApp, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
    app.request(method, path, Some(token), body, &[]).await
}

async fn events_of(app: &TestApp, id: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'File' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owners_and_admins_share_unshare_and_delete_and_everyone_else_is_refused() {
    let app = spawn(&[]).await;
    let (owner, token) = user(&app, "owner").await;
    let (reader, reader_token) = user(&app, "reader").await;
    let (_, stranger_token) = user(&app, "stranger").await;
    let (_, admin_token) = app.admin_token().await;
    let data = png(1000);
    let file = upload_ok(&app, &token, "shared.png", &data).await;
    let shares = format!("/api/v1/files/{file}/shares");

    let stranger = call(&app, "POST", &shares, &stranger_token, Some(json!({ "user_id": reader }))).await;
    assert_refused(&stranger, StatusCode::NOT_FOUND, "NOT_FOUND", "a stranger shares");
    let unknown = call(&app, "POST", &shares, &token, Some(json!({ "user_id": Uuid::new_v4() }))).await;
    assert_refused(&unknown, StatusCode::NOT_FOUND, "NOT_FOUND", "share with nobody");
    let to_owner = call(&app, "POST", &shares, &token, Some(json!({ "user_id": owner }))).await;
    assert_refused(&to_owner, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "share with the owner");

    let shared = call(&app, "POST", &shares, &token, Some(json!({ "user_id": reader }))).await;
    assert_eq!(shared.status, StatusCode::OK, "{:?}", shared.body);
    assert_eq!(shared.data(), &json!({ "file_id": file, "user_id": reader }));
    assert!(!shared.token().is_empty());
    let twice = call(&app, "POST", &shares, &token, Some(json!({ "user_id": reader }))).await;
    assert_refused(&twice, StatusCode::CONFLICT, "CONFLICT", "share twice");

    // The user it is shared with may read it, not manage it.
    let (other, _) = user(&app, "other").await;
    let reshare = call(&app, "POST", &shares, &reader_token, Some(json!({ "user_id": other }))).await;
    assert_refused(&reshare, StatusCode::FORBIDDEN, "FORBIDDEN", "the reader shares");
    let reader_delete = call(&app, "DELETE", &format!("/api/v1/files/{file}"), &reader_token, None).await;
    assert_refused(&reader_delete, StatusCode::FORBIDDEN, "FORBIDDEN", "the reader deletes");
    let stranger_delete = call(&app, "DELETE", &format!("/api/v1/files/{file}"), &stranger_token, None).await;
    assert_refused(&stranger_delete, StatusCode::NOT_FOUND, "NOT_FOUND", "a stranger deletes");

    // A deactivated user cannot be shared with.
    let deactivated =
        call(&app, "POST", &format!("/api/v1/users/{other}/deactivate"), &admin_token, Some(json!({}))).await;
    assert_eq!(deactivated.status, StatusCode::OK, "{:?}", deactivated.body);
    let inactive = call(&app, "POST", &shares, &token, Some(json!({ "user_id": other }))).await;
    assert_refused(&inactive, StatusCode::NOT_FOUND, "NOT_FOUND", "share with a deactivated user");

    let unshared = call(&app, "DELETE", &format!("{shares}/{reader}"), &admin_token, None).await;
    assert_eq!(unshared.status, StatusCode::OK, "an admin unshares: {:?}", unshared.body);
    assert_eq!(unshared.data(), &json!({ "file_id": file, "user_id": reader }));
    let again = call(&app, "DELETE", &format!("{shares}/{reader}"), &token, None).await;
    assert_refused(&again, StatusCode::NOT_FOUND, "NOT_FOUND", "unshare what is not shared");

    let deleted = call(&app, "DELETE", &format!("/api/v1/files/{file}"), &token, None).await;
    assert_eq!(deleted.status, StatusCode::OK, "{:?}", deleted.body);
    assert_eq!(deleted.data(), &json!({ "id": file }));
    let twice = call(&app, "DELETE", &format!("/api/v1/files/{file}"), &token, None).await;
    assert_refused(&twice, StatusCode::NOT_FOUND, "NOT_FOUND", "delete twice");
    let after = call(&app, "POST", &shares, &token, Some(json!({ "user_id": reader }))).await;
    assert_refused(&after, StatusCode::NOT_FOUND, "NOT_FOUND", "share a deleted file");
    assert_eq!(events_of(&app, file).await, ["FileUploaded", "FileShared", "FileUnshared", "FileDeleted"]);
    let (by, size): (String, i64) = sqlx::query_as(
        "SELECT payload -> 'FileDeleted' ->> 'by', (payload -> 'FileDeleted' ->> 'size')::bigint FROM events \
         WHERE aggregate_id = $1 AND event_type = 'FileDeleted'",
    )
    .bind(file.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((by, size), (owner.to_string(), i64::try_from(data.len()).unwrap()));
    // The deleted bytes no longer count against the owner's quota.
    assert_eq!(scalar(&app, &format!("SELECT stored_bytes FROM file_quota WHERE owner_id = '{owner}'")).await, 0);

    // An admin may delete anyone's file; nothing happens to a file that never was.
    let second = upload_ok(&app, &token, "second.png", &data).await;
    let by_admin = call(&app, "DELETE", &format!("/api/v1/files/{second}"), &admin_token, None).await;
    assert_eq!(by_admin.status, StatusCode::OK, "{:?}", by_admin.body);
    let never = call(&app, "DELETE", &format!("/api/v1/files/{}", Uuid::new_v4()), &admin_token, None).await;
    assert_refused(&never, StatusCode::NOT_FOUND, "NOT_FOUND", "delete a file that never was");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_carries_only_live_files_of_its_sender_over_http_and_over_the_socket() {
    let app = spawn(&[]).await;
    let (_, author) = user(&app, "author").await;
    let (_, other) = user(&app, "other").await;
    let reply = app.post("/api/v1/rooms", Some(&author), json!({ "name": "files", "visibility": "public" })).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let room: Uuid = reply.data()["id"].as_str().unwrap().parse().unwrap();
    let joined = app.post(&format!("/api/v1/rooms/{room}/join"), Some(&other), json!({})).await;
    assert_eq!(joined.status, StatusCode::OK, "{:?}", joined.body);
    let messages = format!("/api/v1/rooms/{room}/messages");

    // Uploaded a moment ago, attached at once.
    let mine = upload_ok(&app, &author, "mine.png", &png(100)).await;
    let sent = app.post(&messages, Some(&author), json!({ "body": "look", "attachments": [mine] })).await;
    assert_eq!(sent.status, StatusCode::CREATED, "{:?}", sent.body);
    assert_eq!(sent.data()["message"]["attachments"], json!([mine]));

    let theirs = upload_ok(&app, &other, "theirs.png", &png(100)).await;
    let gone = upload_ok(&app, &author, "gone.png", &png(100)).await;
    let deleted = call(&app, "DELETE", &format!("/api/v1/files/{gone}"), &author, None).await;
    assert_eq!(deleted.status, StatusCode::OK, "{:?}", deleted.body);
    let never = Uuid::new_v4();
    for (attachments, named, what) in [
        (json!([mine, theirs]), theirs, "someone else's file"),
        (json!([gone]), gone, "a deleted file"),
        (json!([never]), never, "no file at all"),
        (json!([mine, mine]), mine, "the same file twice"),
    ] {
        let reply = app.post(&messages, Some(&author), json!({ "body": "x", "attachments": attachments })).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", what);
        let detail = reply.body["error"]["details"]["attachments"].as_str().unwrap();
        assert!(detail.contains(&named.to_string()), "{what}: {detail}");
    }
    let sent_count = scalar(&app, "SELECT count(*) FROM events WHERE event_type = 'MessageSent'").await;
    assert_eq!(sent_count, 1, "only the valid message was sent");

    // A socket's send takes the same path.
    let url = format!("{}/api/v1/ws", app.address.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(frame(json!({ "type": "auth", "token": author }))).await.unwrap();
    next_of(&mut ws, "ready").await;
    let send = json!({ "type": "send", "room_id": room, "body": "over the socket", "client_id": "s-1", "attachments": [theirs] });
    ws.send(frame(send)).await.unwrap();
    let error = next_of(&mut ws, "error").await;
    assert_eq!((error["code"].as_str(), error["client_id"].as_str()), (Some("VALIDATION_FAILED"), Some("s-1")));
    let send = json!({ "type": "send", "room_id": room, "body": "over the socket", "client_id": "s-2", "attachments": [mine] });
    ws.send(frame(send)).await.unwrap();
    let ack = next_of(&mut ws, "ack").await;
    assert_eq!(ack["client_id"], "s-2");
    app.stop().await;
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn frame(value: Value) -> tokio_tungstenite::tungstenite::Message {
    tokio_tungstenite::tungstenite::Message::text(value.to_string())
}

/// The next frame of type `kind`, skipping the others.
async fn next_of(ws: &mut Socket, kind: &str) -> Value {
    loop {
        let read = tokio::time::timeout(WAIT, ws.next()).await.expect("no frame in time");
        match read {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] == kind {
                    return value;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the socket ended waiting for {kind}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_body_is_not_cut_but_one_that_stalls_is_and_leaves_nothing() {
    // An upload has no overall timeout, but a body that sends nothing for
    // CAIRN_REQUEST_TIMEOUT_SECS is given up by the server itself.
    let app = spawn(&[("CAIRN_REQUEST_TIMEOUT_SECS", "1")]).await;
    let (_, token) = user(&app, "stall").await;
    let data = png(256 * 1024);
    let body = multipart(&[file_part("slow.png", None, &data)]);

    // A slow client that keeps sending is not cut, however long the whole upload takes: six
    // pieces 400 ms apart take 2 s, twice the limit.
    let (address, slow_token, slow_body) = (app.address.clone(), token.clone(), body.clone());
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address.trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let head = format!(
            "POST /api/v1/files HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {slow_token}\r\n\
             Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            slow_body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        for piece in slow_body.chunks(slow_body.len().div_ceil(6)) {
            std::thread::sleep(Duration::from_millis(400));
            stream.write_all(piece).unwrap();
            stream.flush().unwrap();
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let before = traces(&app).await;
    assert_eq!(before.file_events, 1, "{before:?}");

    let address = app.address.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address.trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let head = format!(
            "POST /api/v1/files HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body[..body.len() / 2]).unwrap();
        stream.flush().unwrap();
        // Send nothing more, and keep the connection open: the answer comes from the server.
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("MALFORMED_REQUEST") && answer.contains("sent nothing"), "{answer}");
    wait_traces(&app, &before).await;
    app.stop().await;
}
