//! The files read side through the real HTTP API: lists with cursors, one file's metadata, the
//! download (whole, ranged, 416, ETag and 304, inline or attachment), deletion stopping reads at
//! once, and who may read a file, by bearer token and by download token. Files are uploaded,
//! shared and deleted through the command routes, as a client would.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Reply, TestApp, TestEnv};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Everything in one process, without the verified-email rule (these tests are about reads).
async fn spawn() -> TestApp {
    let settings = [("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_RATE_LIMIT_MESSAGES", "100000/s")];
    TestApp::spawn_with(TestEnv::new(), cairn::Services::all(), &settings).await
}

/// A signed-in user.
struct User {
    id: Uuid,
    token: String,
}

async fn user(app: &TestApp, name: &str) -> User {
    let email = format!("{name}@example.com");
    let id = app.register_ok(&email).await;
    User { id, token: app.login(&email).await }
}

async fn admin(app: &TestApp) -> User {
    let (id, token) = app.admin_token().await;
    User { id, token }
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes that no compression or sniffing would mistake for anything: a simple generator.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Bytes every sniffer takes for PNG: a PNG header, then noise.
fn png(len: usize, seed: u64) -> Vec<u8> {
    let mut data = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89".to_vec();
    data.extend(bytes(len.saturating_sub(data.len()), seed));
    data
}

/// Bytes that are no known type and no text (a NUL early on): `application/octet-stream`.
fn opaque(len: usize, seed: u64) -> Vec<u8> {
    let mut data = b"cairn\0".to_vec();
    data.extend(bytes(len.saturating_sub(data.len()), seed));
    data
}

/// Plain text of `len` bytes.
fn text(len: usize) -> Vec<u8> {
    b"all work and no play. ".iter().copied().cycle().take(len).collect()
}

const BOUNDARY: &str = "cairn-files-read-boundary";

/// Uploads `data` as `name` through `POST /api/v1/files` (its type sniffed from the bytes).
/// Returns the file's id and the upload's consistency token.
async fn upload(app: &TestApp, owner: &User, name: &str, data: &[u8], visibility: &str) -> (Uuid, String) {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"visibility\"\r\n\r\n{visibility}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let resp = app
        .client
        .post(format!("{}/api/v1/files", app.address))
        .bearer_auth(&owner.token)
        .header("Content-Type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    let id = reply["data"]["file"]["id"].as_str().unwrap().parse().unwrap();
    (id, reply["meta"]["consistency_token"].as_str().unwrap().to_owned())
}

async fn command(app: &TestApp, method: &str, path: &str, who: &User, body: Option<Value>) -> String {
    let reply = app.request(method, path, Some(&who.token), body, &[]).await;
    assert!(reply.status.is_success(), "{method} {path}: {} {:?}", reply.status, reply.body);
    reply.token()
}

async fn share(app: &TestApp, file: Uuid, with: &User, by: &User) -> String {
    command(app, "POST", &format!("/api/v1/files/{file}/shares"), by, Some(json!({ "user_id": with.id }))).await
}

async fn unshare(app: &TestApp, file: Uuid, with: &User, by: &User) -> String {
    command(app, "DELETE", &format!("/api/v1/files/{file}/shares/{}", with.id), by, None).await
}

async fn delete(app: &TestApp, file: Uuid, by: &User) -> String {
    command(app, "DELETE", &format!("/api/v1/files/{file}"), by, None).await
}

/// A read that waits for `consistency` first, and says it did.
async fn read(app: &TestApp, path: &str, token: Option<&str>, consistency: &str) -> Reply {
    let reply = app.request("GET", path, token, None, &[("X-Consistency-Token", consistency)]).await;
    if reply.status == StatusCode::OK {
        assert_eq!(reply.body["meta"]["consistent"], true, "{path}: {:?}", reply.body);
    }
    reply
}

/// A raw GET (bytes, no redirect followed).
async fn fetch(url: &str, bearer: Option<&str>, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let mut req = client.get(url);
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

async fn download(
    app: &TestApp,
    file: Uuid,
    bearer: &User,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    fetch(&format!("{}/api/v1/files/{file}/download", app.address), Some(&bearer.token), headers).await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn ids(reply: &Reply) -> Vec<Uuid> {
    reply.data().as_array().unwrap().iter().map(|f| f["id"].as_str().unwrap().parse().unwrap()).collect()
}

/// Every page of `path` (which has a query already), `limit` at a time.
async fn all_pages(app: &TestApp, path: &str, limit: u32, who: &User, consistency: &str) -> Vec<Uuid> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let url = match &cursor {
            Some(c) => format!("{path}&limit={limit}&cursor={c}"),
            None => format!("{path}&limit={limit}"),
        };
        let page = read(app, &url, Some(&who.token), consistency).await;
        assert_eq!(page.status, StatusCode::OK, "{url}: {:?}", page.body);
        let got = ids(&page);
        assert!(got.len() <= limit as usize);
        seen.extend(got);
        match page.body["meta"]["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
    panic!("{path}: more than 50 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_show_own_and_shared_files_newest_first_in_cursor_pages_without_deleted_ones() {
    let app = spawn().await;
    let (alice, bob) = (user(&app, "alice").await, user(&app, "bob").await);
    let mut own = Vec::new();
    let mut last = String::new();
    for n in 0..5 {
        let (id, token) = upload(&app, &alice, &format!("a{n}.bin"), &opaque(10, n), "private").await;
        own.push(id);
        last = token;
    }
    let (bobs, token) = upload(&app, &bob, "b.bin", &opaque(10, 99), "private").await;
    // Shared in an order other than the uploads': "shared with me" follows the shares.
    share(&app, own[3], &bob, &alice).await;
    share(&app, own[0], &bob, &alice).await;
    let shared_last = share(&app, own[4], &bob, &alice).await;
    let _ = (token, last);

    let newest_first: Vec<Uuid> = own.iter().rev().copied().collect();
    assert_eq!(all_pages(&app, "/api/v1/files?owner=me", 2, &alice, &shared_last).await, newest_first);
    let default = read(&app, "/api/v1/files", Some(&alice.token), &shared_last).await;
    assert_eq!(ids(&default), newest_first, "owner=me is the default");
    assert_eq!(default.data()[0]["name"], "a4.bin");
    assert!(default.data()[0].get("shared_with").is_none() && default.data()[0].get("download_url").is_none());
    assert_eq!(
        all_pages(&app, "/api/v1/files?owner=shared", 2, &bob, &shared_last).await,
        vec![own[4], own[0], own[3]]
    );
    assert_eq!(all_pages(&app, "/api/v1/files?owner=me", 100, &bob, &shared_last).await, vec![bobs]);
    assert!(all_pages(&app, "/api/v1/files?owner=shared", 10, &alice, &shared_last).await.is_empty());

    // Unshared and deleted files leave the lists.
    unshare(&app, own[0], &bob, &alice).await;
    let deleted = delete(&app, own[4], &alice).await;
    assert_eq!(all_pages(&app, "/api/v1/files?owner=shared", 1, &bob, &deleted).await, vec![own[3]]);
    assert_eq!(
        all_pages(&app, "/api/v1/files?owner=me", 3, &alice, &deleted).await,
        vec![own[3], own[2], own[1], own[0]]
    );

    for bad in [
        "/api/v1/files?owner=everyone",
        "/api/v1/files?cursor=nonsense",
        "/api/v1/files?limit=0",
        "/api/v1/files?limit=101",
    ] {
        let refused = app.get(bad, Some(&alice.token)).await;
        assert_eq!((refused.status, refused.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{bad}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_shows_shares_to_the_owner_and_admins_only_and_a_download_url_that_serves_the_file() {
    let app = spawn().await;
    let (alice, bob, carol) = (user(&app, "alice").await, user(&app, "bob").await, user(&app, "carol").await);
    let root = admin(&app).await;
    let data = text(3000);
    let (id, _) = upload(&app, &alice, "notes.txt", &data, "private").await;
    share(&app, id, &bob, &alice).await;
    let consistency = share(&app, id, &carol, &alice).await;

    let path = format!("/api/v1/files/{id}");
    for (who, manages) in [(&alice, true), (&root, true), (&bob, false)] {
        let reply = read(&app, &path, Some(&who.token), &consistency).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let file = reply.data();
        assert_eq!(
            (file["id"].as_str(), file["owner_id"].as_str(), file["name"].as_str(), file["size"].as_u64()),
            (Some(id.to_string().as_str()), Some(alice.id.to_string().as_str()), Some("notes.txt"), Some(3000))
        );
        assert_eq!((file["content_type"].as_str(), file["visibility"].as_str()), (Some("text/plain"), Some("private")));
        assert_eq!(file["sha256"].as_str(), Some(sha256_hex(&data).as_str()));
        if manages {
            assert_eq!(file["shared_with"], json!([bob.id, carol.id]));
        } else {
            assert!(file.get("shared_with").is_none(), "{file}");
        }
        let url = file["download_url"].as_str().unwrap();
        assert!(url.starts_with(&format!("/api/v1/files/{id}/download?token=")), "{url}");
        let (status, _, body) = fetch(&format!("{}{url}", app.address), None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, data);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downloads_stream_whole_and_ranged_bytes_with_etag_304_and_disposition() {
    let app = spawn().await;
    let alice = user(&app, "alice").await;
    // Three 64 KiB chunks and a bit: ranges inside one, across a boundary, and at the very end.
    let data = png(3 * 65_536 + 1000, 3);
    let (id, token) = upload(&app, &alice, "holiday photo ünïcode.png", &data, "private").await;
    let (pdf, consistency) =
        upload(&app, &alice, "report.pdf", &[b"%PDF-1.7\n".as_slice(), &opaque(100, 4)].concat(), "private").await;
    let _ = token;
    assert_eq!(
        read(&app, &format!("/api/v1/files/{pdf}"), Some(&alice.token), &consistency).await.status,
        StatusCode::OK
    );

    let (status, headers, body) = download(&app, id, &alice, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);
    let etag = format!("\"{}\"", sha256_hex(&data));
    assert_eq!(header(&headers, "content-type"), "image/png");
    assert_eq!(header(&headers, "content-length"), data.len().to_string());
    assert_eq!(header(&headers, "etag"), etag);
    assert_eq!(header(&headers, "accept-ranges"), "bytes");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    assert_eq!(header(&headers, "cache-control"), "private");
    assert_eq!(
        header(&headers, "content-disposition"),
        "inline; filename=\"holiday photo _n_code.png\"; filename*=UTF-8''holiday%20photo%20%C3%BCn%C3%AFcode.png"
    );
    let (_, headers, _) = download(&app, pdf, &alice, &[]).await;
    assert!(header(&headers, "content-disposition").starts_with("attachment; filename=\"report.pdf\""));

    let size = data.len();
    let cases: Vec<(String, usize, usize)> = vec![
        ("bytes=100-199".into(), 100, 199),
        ("bytes=65500-65600".into(), 65_500, 65_600),
        (format!("bytes={}-{}", size - 1, size - 1), size - 1, size - 1),
        ("bytes=-10".into(), size - 10, size - 1),
        ("bytes=131000-".into(), 131_000, size - 1),
        (format!("bytes=190000-{}", size * 2), 190_000, size - 1),
    ];
    for (range, start, end) in cases {
        let (status, headers, body) = download(&app, id, &alice, &[("Range", &range)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&headers, "content-range"), format!("bytes {start}-{end}/{size}"), "{range}");
        assert_eq!(header(&headers, "content-length"), (end - start + 1).to_string(), "{range}");
        assert_eq!(body, data[start..=end], "{range}");
    }
    // Several ranges: the whole file (RFC 9110 lets a server ignore Range).
    let (status, _, body) = download(&app, id, &alice, &[("Range", "bytes=0-1,5-6")]).await;
    assert_eq!((status, body.len()), (StatusCode::OK, size));
    // An If-Range naming another version: the whole file.
    let (status, _, body) = download(&app, id, &alice, &[("Range", "bytes=0-1"), ("If-Range", "\"other\"")]).await;
    assert_eq!((status, body.len()), (StatusCode::OK, size));

    for range in [format!("bytes={size}-"), format!("bytes={}-{}", size + 5, size + 10), "bytes=-0".to_owned()] {
        let (status, headers, body) = download(&app, id, &alice, &[("Range", &range)]).await;
        assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&headers, "content-range"), format!("bytes */{size}"));
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (envelope["success"].as_bool(), envelope["error"]["code"].as_str()),
            (Some(false), Some("RANGE_NOT_SATISFIABLE"))
        );
    }

    let (status, headers, body) = download(&app, id, &alice, &[("If-None-Match", &etag)]).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(header(&headers, "etag"), etag);
    let (status, _, body) = download(&app, id, &alice, &[("If-None-Match", "\"something-else\"")]).await;
    assert_eq!((status, body.len()), (StatusCode::OK, size));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_file_is_gone_at_once_even_before_the_projection_applies_the_deletion() {
    let app = spawn().await;
    let (alice, bob) = (user(&app, "alice").await, user(&app, "bob").await);
    let data = opaque(500, 11);
    let (id, _) = upload(&app, &alice, "gone.bin", &data, "private").await;
    let consistency = share(&app, id, &bob, &alice).await;
    let file = read(&app, &format!("/api/v1/files/{id}"), Some(&bob.token), &consistency).await;
    assert_eq!(file.status, StatusCode::OK, "readable before the deletion");
    let link = format!("{}{}", app.address, file.data()["download_url"].as_str().unwrap());
    assert_eq!(fetch(&link, None, &[]).await.0, StatusCode::OK);

    // Hold the projection's lock: the files projection cannot apply anything meanwhile.
    let mut held = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(cairn_platform::db::advisory_key("cairn-projection:files"))
        .execute(&mut *held)
        .await
        .unwrap();
    delete(&app, id, &alice).await;
    for who in [&alice, &bob] {
        assert_eq!(app.get(&format!("/api/v1/files/{id}"), Some(&who.token)).await.status, StatusCode::NOT_FOUND);
        assert_eq!(download(&app, id, who, &[]).await.0, StatusCode::NOT_FOUND);
    }
    assert_eq!(fetch(&link, None, &[]).await.0, StatusCode::NOT_FOUND, "the download token stops too");
    assert!(!ids(&app.get("/api/v1/files", Some(&alice.token)).await).contains(&id));
    let row: (Option<chrono::DateTime<chrono::Utc>>, i64) = sqlx::query_as(
        "SELECT deleted_at, (SELECT count(*) FROM file_shares WHERE file_id = $1) FROM files WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(row, (None, 1), "the projection had not applied the deletion: the log alone stopped the reads");
    held.rollback().await.unwrap();
    app.wait_count(
        &format!(
            "SELECT count(*) FROM files WHERE id = '{id}' AND deleted_at IS NOT NULL \
                  AND NOT EXISTS (SELECT 1 FROM file_shares WHERE file_id = '{id}')"
        ),
        1,
        Duration::from_secs(10),
    )
    .await;
    app.stop().await;
}

/// What each caller gets from the three read routes of one private file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_owner_admins_shared_users_and_members_of_a_room_it_is_attached_to_may_read_a_file() {
    let app = spawn().await;
    let (owner, shared, member, other) =
        (user(&app, "owner").await, user(&app, "shared").await, user(&app, "member").await, user(&app, "other").await);
    let root = admin(&app).await;
    let data = text(2048);
    let (id, _) = upload(&app, &owner, "secret.txt", &data, "private").await;
    let (other_file, _) = upload(&app, &other, "other.txt", &text(10), "private").await;
    share(&app, id, &shared, &owner).await;
    let room = app.post("/api/v1/rooms", Some(&owner.token), json!({ "name": "files", "visibility": "public" })).await;
    assert_eq!(room.status, StatusCode::CREATED, "{:?}", room.body);
    let room_id = room.data()["id"].as_str().unwrap().to_owned();
    let joined = app.post(&format!("/api/v1/rooms/{room_id}/join"), Some(&member.token), json!({})).await;
    assert!(joined.status.is_success(), "{:?}", joined.body);
    let sent = app
        .post(
            &format!("/api/v1/rooms/{room_id}/messages"),
            Some(&owner.token),
            json!({ "body": "see attached", "attachments": [id] }),
        )
        .await;
    assert!(sent.status.is_success(), "{:?}", sent.body);
    let consistency = sent.token();

    let meta = format!("/api/v1/files/{id}");
    let url = format!("{}/api/v1/files/{id}/download", app.address);
    for (who, allowed) in [(&owner, true), (&root, true), (&shared, true), (&member, true), (&other, false)] {
        let reply = read(&app, &meta, Some(&who.token), &consistency).await;
        let expected = if allowed { StatusCode::OK } else { StatusCode::NOT_FOUND };
        assert_eq!(reply.status, expected, "metadata as {}: {:?}", who.id, reply.body);
        let (status, _, body) = fetch(&url, Some(&who.token), &[]).await;
        assert_eq!(status, expected, "download as {}", who.id);
        if allowed {
            assert_eq!(body, data);
            let link = format!("{}{}", app.address, reply.data()["download_url"].as_str().unwrap());
            let (status, _, body) = fetch(&link, None, &[]).await;
            assert_eq!((status, body == data), (StatusCode::OK, true), "download token of {}", who.id);
        } else {
            assert_eq!(reply.code(), "NOT_FOUND");
        }
    }
    // Anonymous: 401 everywhere.
    assert_eq!(app.get(&meta, None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/api/v1/files", None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(fetch(&url, None, &[]).await.0, StatusCode::UNAUTHORIZED);
    // A download token for another file, and a garbage one: 401, as a forged token.
    let foreign = read(&app, &format!("/api/v1/files/{other_file}"), Some(&other.token), &consistency).await;
    let foreign_token = foreign.data()["download_url"].as_str().unwrap().split("token=").nth(1).unwrap().to_owned();
    for token in [foreign_token.as_str(), "garbage", owner.token.as_str()] {
        let (status, _, body) = fetch(&format!("{url}?token={token}"), None, &[]).await;
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, envelope["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("UNAUTHENTICATED")));
    }

    // The write routes: the owner and admins only (the owner shared above; an admin unshares
    // below). A user the file is shared with may read it, so is told 403; anyone else 404, as
    // for a file that does not exist; no token, or a download token as a bearer, 401.
    let shares = format!("/api/v1/files/{id}/shares");
    let writes = [
        ("POST", shares.clone(), Some(json!({ "user_id": other.id }))),
        ("DELETE", format!("{shares}/{}", shared.id), None),
        ("DELETE", meta.clone(), None),
    ];
    let link_token = read(&app, &meta, Some(&owner.token), &consistency).await.data()["download_url"]
        .as_str()
        .unwrap()
        .split("token=")
        .nth(1)
        .unwrap()
        .to_owned();
    for (method, path, body) in &writes {
        let callers: [(Option<&str>, StatusCode); 5] = [
            (Some(&shared.token), StatusCode::FORBIDDEN),
            (Some(&member.token), StatusCode::NOT_FOUND),
            (Some(&other.token), StatusCode::NOT_FOUND),
            (None, StatusCode::UNAUTHORIZED),
            (Some(&link_token), StatusCode::UNAUTHORIZED),
        ];
        for (token, expected) in callers {
            let reply = app.request(method, path, token, body.clone(), &[]).await;
            assert_eq!(reply.status, expected, "{method} {path}: {:?}", reply.body);
        }
    }
    assert_eq!(fetch(&url, Some(&link_token), &[]).await.0, StatusCode::UNAUTHORIZED, "a download token is no bearer");

    // A download token is re-checked on use: unsharing stops the shared user's at once.
    let link =
        read(&app, &meta, Some(&shared.token), &consistency).await.data()["download_url"].as_str().unwrap().to_owned();
    let link = format!("{}{link}", app.address);
    assert_eq!(fetch(&link, None, &[]).await.0, StatusCode::OK);
    let unshared = unshare(&app, id, &shared, &root).await;
    assert_eq!(read(&app, &meta, Some(&shared.token), &unshared).await.status, StatusCode::NOT_FOUND);
    assert_eq!(fetch(&link, None, &[]).await.0, StatusCode::NOT_FOUND, "an unshare revokes the download token");

    // Expired: the token lives CAIRN_FILES_URL_TTL_SECS (300 s by default) by the service's clock.
    let link =
        read(&app, &meta, Some(&member.token), &consistency).await.data()["download_url"].as_str().unwrap().to_owned();
    let link = format!("{}{link}", app.address);
    assert_eq!(fetch(&link, None, &[]).await.0, StatusCode::OK);
    app.clock.advance(Duration::from_secs(300 + 6));
    let (status, _, body) = fetch(&link, None, &[]).await;
    let envelope: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status, envelope["error"]["message"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("download token expired"))
    );
    // An expired access token (900 s by default): 401 on every file route, read or write.
    assert_eq!(fetch(&url, Some(&owner.token), &[]).await.0, StatusCode::OK, "the owner's access token still works");
    app.clock.advance(Duration::from_secs(900));
    for (method, path, body) in
        writes.into_iter().chain([("GET", meta.clone(), None), ("GET", "/api/v1/files".to_owned(), None)])
    {
        let reply = app.request(method, &path, Some(&owner.token), body, &[]).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"), "{method} {path}");
    }
    assert_eq!(fetch(&url, Some(&owner.token), &[]).await.0, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_public_file_is_readable_by_every_holder_of_files_read() {
    let app = spawn().await;
    let (owner, stranger) = (user(&app, "owner").await, user(&app, "stranger").await);
    let data = png(64, 31);
    let (id, consistency) = upload(&app, &owner, "avatar.png", &data, "public").await;
    let reply = read(&app, &format!("/api/v1/files/{id}"), Some(&stranger.token), &consistency).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(reply.data().get("shared_with").is_none());
    assert_eq!(download(&app, id, &stranger, &[]).await.2, data);
    assert!(
        ids(&read(&app, "/api/v1/files?owner=shared", Some(&stranger.token), &consistency).await).is_empty(),
        "public is not shared"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn from_s3_a_download_is_a_redirect_to_a_presigned_url_that_serves_the_bytes() {
    let settings = [("CAIRN_VERIFIED_EMAIL_FOR", "none")];
    let app = TestApp::spawn_with(TestEnv::new().with_s3(), cairn::Services::all(), &settings).await;
    let alice = user(&app, "alice").await;
    let data = png(200_000, 41);
    let (id, consistency) = upload(&app, &alice, "from s3.png", &data, "private").await;
    let file = read(&app, &format!("/api/v1/files/{id}"), Some(&alice.token), &consistency).await;
    assert_eq!(file.status, StatusCode::OK, "{:?}", file.body);
    let link = format!("{}{}", app.address, file.data()["download_url"].as_str().unwrap());
    let by_bearer = format!("{}/api/v1/files/{id}/download", app.address);
    for (url, bearer) in [(by_bearer.as_str(), Some(alice.token.as_str())), (link.as_str(), None)] {
        let (status, headers, _) = fetch(url, bearer, &[]).await;
        assert_eq!(status, StatusCode::FOUND, "{url}");
        assert_eq!(header(&headers, "cache-control"), "no-store");
        let location = header(&headers, "location").to_owned();
        assert!(location.starts_with(&common::s3_endpoint()), "{location}");
        let presigned = reqwest::Url::parse(&location).unwrap();
        let query: std::collections::HashMap<String, String> = presigned.query_pairs().into_owned().collect();
        assert_eq!(query.get("X-Amz-Expires").map(String::as_str), Some("300"), "CAIRN_FILES_URL_TTL_SECS: {location}");
        assert!(query.get("response-content-disposition").is_some_and(|d| d.starts_with("inline;")), "{location}");
        let (status, _, body) = fetch(&location, None, &[]).await;
        assert_eq!(status, StatusCode::OK, "the presigned URL serves the object");
        assert!(body == data, "the presigned URL serves the uploaded bytes");
    }
    // Not readable, no redirect: a stranger learns nothing, not even the URL.
    let stranger = user(&app, "stranger").await;
    let (status, headers, _) = fetch(&by_bearer, Some(&stranger.token), &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(headers.get("location").is_none());
    app.stop().await;
}
