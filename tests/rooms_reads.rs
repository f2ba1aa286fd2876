//! The rooms read API through real HTTP: the room list (visibility, the joined filter, cursors,
//! unread counts and last messages), members, message pages in both directions, and the rooms
//! projection rebuilt from the log giving the same rows.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use cairn_projector::Projection;
use common::{Reply, TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

/// Everything in one process, without the verified-email rule or a message rate limit worth
/// speaking of (these tests are about reads).
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

/// The id a command answered with (`data.id`, or a sent message's `data.message.id`).
fn id_of(reply: &Reply) -> Uuid {
    let data = reply.data();
    let raw = data["id"].as_str().or_else(|| data["message"]["id"].as_str());
    raw.unwrap_or_else(|| panic!("no id in {:?}", reply.body)).parse().unwrap()
}

fn ok(reply: &Reply, what: &str) {
    assert!(reply.status.is_success(), "{what}: {} {:?}", reply.status, reply.body);
}

async fn create_room(app: &TestApp, owner: &User, name: &str, visibility: &str) -> (Uuid, String) {
    let reply = app.post("/api/v1/rooms", Some(&owner.token), json!({ "name": name, "visibility": visibility })).await;
    ok(&reply, "create a room");
    (id_of(&reply), reply.token())
}

async fn command(app: &TestApp, method: &str, path: &str, who: &User, body: Value) -> String {
    let reply = app.request(method, path, Some(&who.token), Some(body), &[]).await;
    ok(&reply, &format!("{method} {path}"));
    reply.token()
}

/// Sends a message; returns its id and the command's consistency token.
async fn send(app: &TestApp, room: Uuid, who: &User, body: &str) -> (Uuid, String) {
    let reply = app.post(&format!("/api/v1/rooms/{room}/messages"), Some(&who.token), json!({ "body": body })).await;
    ok(&reply, "send a message");
    (id_of(&reply), reply.token())
}

/// A read that waits for `consistency` first, and says it did.
async fn read(app: &TestApp, path: &str, who: &User, consistency: &str) -> Reply {
    let reply = app.request("GET", path, Some(&who.token), None, &[("X-Consistency-Token", consistency)]).await;
    if reply.status == StatusCode::OK {
        assert_eq!(reply.body["meta"]["consistent"], true, "{path}: {:?}", reply.body);
    }
    reply
}

fn ids(reply: &Reply, key: &str) -> Vec<String> {
    reply.data().as_array().unwrap().iter().map(|item| item[key].as_str().unwrap().to_owned()).collect()
}

/// Every page of `path` (which has no query yet) with `limit`, following `meta.next_cursor` as
/// `param`, and the items in the order served.
async fn all_pages(app: &TestApp, path: &str, param: &str, limit: u32, who: &User, consistency: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit={limit}&{param}={c}"),
            None => format!("{path}{sep}limit={limit}"),
        };
        let page = read(app, &url, who, consistency).await;
        assert_eq!(page.status, StatusCode::OK, "{url}: {:?}", page.body);
        let got = page.data().as_array().unwrap().clone();
        assert!(got.len() <= limit as usize);
        items.extend(got);
        match page.body["meta"]["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
    panic!("more than 100 pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_room_list_shows_what_the_caller_may_read_with_the_joined_filter_and_cursors() {
    let app = spawn().await;
    let alice = user(&app, "alice").await;
    let bob = user(&app, "bob").await;
    let carol = user(&app, "carol").await;
    let (admin_id, admin_token) = app.admin_token().await;
    let admin = User { id: admin_id, token: admin_token };

    let mut public = Vec::new();
    for n in 0..5 {
        public.push(create_room(&app, &alice, &format!("public-{n}"), "public").await.0);
    }
    let (secret, _) = create_room(&app, &alice, "secret", "private").await;
    let last = command(&app, "POST", &format!("/api/v1/rooms/{}/join", public[1]), &bob, json!({})).await;

    // Alice sees her six rooms, newest first, in pages that cover each exactly once.
    let rooms = all_pages(&app, "/api/v1/rooms", "cursor", 2, &alice, &last).await;
    let listed: Vec<Uuid> = rooms.iter().map(|r| r["id"].as_str().unwrap().parse().unwrap()).collect();
    let mut expected = public.clone();
    expected.push(secret);
    expected.reverse();
    assert_eq!(listed, expected);
    assert!(rooms.iter().all(|r| r["joined"] == true && r["role"] == "owner" && r["owner_id"] == alice.id.to_string()));
    let secret_room = rooms.iter().find(|r| r["id"] == secret.to_string()).unwrap();
    assert_eq!(
        (&secret_room["name"], &secret_room["visibility"], &secret_room["archived"], &secret_room["member_count"]),
        (&json!("secret"), &json!("private"), &json!(false), &json!(1))
    );

    // Bob sees the public rooms, not the private one; with joined=true only the one he joined.
    let bob_rooms = all_pages(&app, "/api/v1/rooms", "cursor", 100, &bob, &last).await;
    let bob_ids: HashSet<String> = bob_rooms.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(bob_ids, public.iter().map(Uuid::to_string).collect());
    let joined = read(&app, "/api/v1/rooms?joined=true", &bob, &last).await;
    assert_eq!(ids(&joined, "id"), vec![public[1].to_string()]);
    let room = &joined.data()[0];
    assert_eq!((&room["joined"], &room["role"], &room["member_count"]), (&json!(true), &json!("member"), &json!(2)));
    let other = bob_rooms.iter().find(|r| r["id"] == public[0].to_string()).unwrap();
    assert_eq!((&other["joined"], &other["role"], &other["unread"]), (&json!(false), &Value::Null, &json!(0)));

    // The private room is invisible to outsiders, exactly like one that does not exist.
    for path in ["", "/members", "/messages"] {
        for room in [secret, Uuid::new_v4()] {
            let reply = read(&app, &format!("/api/v1/rooms/{room}{path}"), &bob, &last).await;
            assert_eq!((reply.status, reply.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"), "{path}: {:?}", reply.body);
        }
        // An admin sees it, and so does its owner.
        for who in [&admin, &alice] {
            let reply = read(&app, &format!("/api/v1/rooms/{secret}{path}"), who, &last).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
        }
    }
    let admin_rooms = all_pages(&app, "/api/v1/rooms", "cursor", 3, &admin, &last).await;
    assert_eq!(admin_rooms.len(), 6);
    assert!(admin_rooms.iter().any(|r| r["id"] == secret.to_string() && r["joined"] == false));

    // Invited, Bob sees it (member of a private room), and lists it.
    let invited =
        command(&app, "POST", &format!("/api/v1/rooms/{secret}/members"), &alice, json!({ "user_id": bob.id })).await;
    let reply = read(&app, &format!("/api/v1/rooms/{secret}"), &bob, &invited).await;
    assert_eq!((reply.status, &reply.data()["role"]), (StatusCode::OK, &json!("member")), "{:?}", reply.body);
    let joined = read(&app, "/api/v1/rooms?joined=true", &bob, &invited).await;
    assert_eq!(ids(&joined, "id"), vec![secret.to_string(), public[1].to_string()]);
    // Carol, who holds rooms:write, sees the public ones only.
    let carol_rooms = all_pages(&app, "/api/v1/rooms", "cursor", 4, &carol, &invited).await;
    assert_eq!(carol_rooms.len(), 5);

    // A `readonly` user (no rooms:write) sees no public room, only the rooms it belongs to.
    let reader_id = app.register_ok("reader@example.com").await;
    let granted =
        app.post(&format!("/api/v1/users/{reader_id}/roles"), Some(&admin.token), json!({ "role": "readonly" })).await;
    ok(&granted, "grant readonly");
    let revoked =
        app.request("DELETE", &format!("/api/v1/users/{reader_id}/roles/user"), Some(&admin.token), None, &[]).await;
    ok(&revoked, "revoke user");
    let reader = User { id: reader_id, token: app.login("reader@example.com").await };
    let before = read(&app, "/api/v1/rooms", &reader, &revoked.token()).await;
    assert_eq!(before.data(), &json!([]));
    let public_room = read(&app, &format!("/api/v1/rooms/{}", public[0]), &reader, &revoked.token()).await;
    assert_eq!(public_room.status, StatusCode::NOT_FOUND);
    let invited =
        command(&app, "POST", &format!("/api/v1/rooms/{secret}/members"), &alice, json!({ "user_id": reader.id }))
            .await;
    let after = read(&app, "/api/v1/rooms", &reader, &invited).await;
    assert_eq!(ids(&after, "id"), vec![secret.to_string()]);
    let messages = read(&app, &format!("/api/v1/rooms/{secret}/messages"), &reader, &invited).await;
    assert_eq!(messages.status, StatusCode::OK);

    // Bad query parameters are refused, naming the parameter.
    for (query, field) in [("cursor=garbage", "cursor"), ("limit=0", "limit"), ("joined=maybe", "joined")] {
        let reply = app.get(&format!("/api/v1/rooms?{query}"), Some(&bob.token)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}: {:?}", reply.body);
        assert!(reply.body["error"]["details"].get(field).is_some(), "{query}: {:?}", reply.body);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_are_listed_owner_first_then_by_joining_time_in_pages() {
    let app = spawn().await;
    let owner = user(&app, "owner").await;
    let (room, _) = create_room(&app, &owner, "crowd", "public").await;
    let mut joiners = Vec::new();
    for n in 0..5 {
        let u = user(&app, &format!("joiner{n}")).await;
        command(&app, "POST", &format!("/api/v1/rooms/{room}/join"), &u, json!({})).await;
        joiners.push(u);
    }
    // One leaves: gone from the list.
    let last = command(&app, "POST", &format!("/api/v1/rooms/{room}/leave"), &joiners[2], json!({})).await;

    let members = all_pages(&app, &format!("/api/v1/rooms/{room}/members"), "cursor", 2, &joiners[0], &last).await;
    let listed: Vec<&str> = members.iter().map(|m| m["user_id"].as_str().unwrap()).collect();
    let expected: Vec<String> = std::iter::once(owner.id)
        .chain(joiners.iter().enumerate().filter(|(n, _)| *n != 2).map(|(_, u)| u.id))
        .map(|id| id.to_string())
        .collect();
    assert_eq!(listed, expected);
    assert_eq!((&members[0]["role"], &members[0]["display_name"]), (&json!("owner"), &json!("owner")));
    assert_eq!((&members[1]["role"], &members[1]["display_name"]), (&json!("member"), &json!("joiner0")));
    let times: Vec<&str> = members.iter().skip(1).map(|m| m["joined_at"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let room_view = read(&app, &format!("/api/v1/rooms/{room}"), &owner, &last).await;
    assert_eq!(room_view.data()["member_count"], 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_page_back_newest_first_and_forward_after_a_position() {
    let app = spawn().await;
    let alice = user(&app, "alice").await;
    let bob = user(&app, "bob").await;
    let (room, _) = create_room(&app, &alice, "chat", "public").await;
    command(&app, "POST", &format!("/api/v1/rooms/{room}/join"), &bob, json!({})).await;
    let mut sent = Vec::new();
    let mut last = String::new();
    for n in 0..7 {
        let who = if n % 2 == 0 { &alice } else { &bob };
        let (id, token) = send(&app, room, who, &format!("message {n}")).await;
        sent.push(id.to_string());
        last = token;
    }
    // Another room's messages never show.
    let (elsewhere, _) = create_room(&app, &alice, "elsewhere", "public").await;
    let (_, _) = send(&app, elsewhere, &alice, "elsewhere").await;
    let edited =
        command(&app, "PATCH", &format!("/api/v1/messages/{}", sent[1]), &bob, json!({ "body": "edited" })).await;
    let deleted = command(&app, "DELETE", &format!("/api/v1/messages/{}", sent[4]), &alice, json!({})).await;
    let last = [last, edited, deleted].into_iter().max_by_key(|t| {
        let (tx, pos) = t.split_once('.').unwrap();
        (tx.parse::<u64>().unwrap(), pos.parse::<i64>().unwrap())
    });
    let last = last.unwrap();

    // Newest first, pages back with `before` covering everything exactly once.
    let path = format!("/api/v1/rooms/{room}/messages");
    let back = all_pages(&app, &path, "before", 3, &bob, &last).await;
    let back_ids: Vec<&str> = back.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let mut newest_first: Vec<&str> = sent.iter().map(String::as_str).collect();
    newest_first.reverse();
    assert_eq!(back_ids, newest_first);
    // Positions strictly descend, in the log's order.
    let positions: Vec<(u64, i64)> = back
        .iter()
        .map(|m| {
            let (tx, pos) = m["position"].as_str().unwrap().split_once('.').unwrap();
            (tx.parse().unwrap(), pos.parse().unwrap())
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] > w[1]), "{positions:?}");
    // Edited bodies are shown; a deleted message is listed without its body.
    let by_id = |id: &str| back.iter().find(|m| m["id"] == id).unwrap().clone();
    let m1 = by_id(&sent[1]);
    assert_eq!((&m1["body"], m1["edited_at"].is_string()), (&json!("edited"), true));
    let m4 = by_id(&sent[4]);
    assert_eq!((&m4["body"], m4["deleted_at"].is_string()), (&Value::Null, true));
    let m0 = by_id(&sent[0]);
    assert_eq!(
        (&m0["body"], &m0["author_id"], &m0["room_id"], &m0["edited_at"]),
        (&json!("message 0"), &json!(alice.id.to_string()), &json!(room.to_string()), &Value::Null)
    );

    // After a position: exactly the newer ones, oldest first.
    let third = m0_position(&back, &sent[2]);
    let after = read(&app, &format!("{path}?after={third}"), &bob, &last).await;
    assert_eq!(ids(&after, "id"), sent[3..].to_vec());
    assert_eq!(after.body["meta"]["next_cursor"], Value::Null, "a page that is not full ends it");
    // And in pages, following next_cursor as `after`.
    let mut forward = Vec::new();
    let mut cursor = third.clone();
    loop {
        let page = read(&app, &format!("{path}?after={cursor}&limit=2"), &bob, &last).await;
        forward.extend(ids(&page, "id"));
        match page.body["meta"]["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(forward, sent[3..].to_vec());
    let newest = m0_position(&back, &sent[6]);
    let nothing = read(&app, &format!("{path}?after={newest}"), &bob, &last).await;
    assert_eq!((nothing.data(), &nothing.body["meta"]["next_cursor"]), (&json!([]), &Value::Null));

    // Bad positions and both directions at once are refused, naming the parameter.
    for (query, field) in [
        (format!("before={third}&after={third}"), "after"),
        ("before=12".to_owned(), "before"),
        ("after=x.y".to_owned(), "after"),
        ("limit=101".to_owned(), "limit"),
    ] {
        let reply = app.get(&format!("{path}?{query}"), Some(&bob.token)).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{query}");
        assert!(reply.body["error"]["details"].get(field).is_some(), "{query}: {:?}", reply.body);
    }
    app.stop().await;
}

fn m0_position(messages: &[Value], id: &str) -> String {
    messages.iter().find(|m| m["id"] == id).unwrap()["position"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counts_follow_read_markers_and_others_messages_and_last_message_skips_deleted_ones() {
    let app = spawn().await;
    let alice = user(&app, "alice").await;
    let bob = user(&app, "bob").await;
    let (room, _) = create_room(&app, &alice, "chat", "public").await;
    let joined = command(&app, "POST", &format!("/api/v1/rooms/{room}/join"), &bob, json!({})).await;
    let room_path = format!("/api/v1/rooms/{room}");
    let view = read(&app, &room_path, &bob, &joined).await;
    assert_eq!((&view.data()["unread"], &view.data()["last_message"]), (&json!(0), &Value::Null));

    let mut last = String::new();
    let mut alice_messages = Vec::new();
    for n in 0..3 {
        let (id, token) = send(&app, room, &alice, &format!("hello {n}")).await;
        alice_messages.push(id);
        last = token;
    }
    let unread = |reply: &Reply| reply.data()["unread"].as_i64().unwrap();
    // Bob has three unread; Alice none (her own messages).
    assert_eq!(unread(&read(&app, &room_path, &bob, &last).await), 3);
    assert_eq!(unread(&read(&app, &room_path, &alice, &last).await), 0);
    let listed = read(&app, "/api/v1/rooms?joined=true", &bob, &last).await;
    assert_eq!(
        (&listed.data()[0]["unread"], &listed.data()[0]["last_message"]["body"]),
        (&json!(3), &json!("hello 2"))
    );

    // Bob reads up to the newest: nothing unread; his own message adds nothing.
    // The marker is written directly (it never enters the log): the next read sees it.
    let marker = json!({ "message_id": alice_messages[2] });
    let reply = app.post(&format!("{room_path}/read"), Some(&bob.token), marker).await;
    ok(&reply, "move the read marker");
    assert_eq!(unread(&read(&app, &room_path, &bob, &last).await), 0);
    let (bob_message, token) = send(&app, room, &bob, "mine").await;
    let view = read(&app, &room_path, &bob, &token).await;
    assert_eq!((unread(&view), &view.data()["last_message"]["id"]), (0, &json!(bob_message.to_string())));
    // Alice, with no marker, has Bob's one message unread.
    assert_eq!(unread(&read(&app, &room_path, &alice, &token).await), 1);

    // Alice's next two rise Bob's count to 2.
    let (_, _) = send(&app, room, &alice, "more 1").await;
    let (newest, token) = send(&app, room, &alice, "more 2").await;
    let view = read(&app, &room_path, &bob, &token).await;
    assert_eq!((unread(&view), &view.data()["last_message"]["body"]), (2, &json!("more 2")));
    // The newest deleted: the last message is the one before it, and it no longer counts.
    let token = command(&app, "DELETE", &format!("/api/v1/messages/{newest}"), &alice, json!({})).await;
    let view = read(&app, &room_path, &bob, &token).await;
    assert_eq!((unread(&view), &view.data()["last_message"]["body"]), (1, &json!("more 1")));
    assert_eq!(view.data()["last_message"]["deleted_at"], Value::Null);

    // A long backlog is counted up to the cap: 1,005 more unread rows (written straight into
    // the read model, past every position the log has) show as 1,000.
    sqlx::query(
        "INSERT INTO messages (id, room_id, author_id, body, tx, pos, changed_tx, changed_pos, created_at, version) \
         SELECT gen_random_uuid(), $1, $2, 'backlog', 9000000000 + g, g, 9000000000 + g, g, now(), 1 \
         FROM generate_series(1, 1005) g",
    )
    .bind(room)
    .bind(alice.id)
    .execute(&app.pool)
    .await
    .unwrap();
    let view = read(&app, &room_path, &bob, &token).await;
    assert_eq!((unread(&view), &view.data()["last_message"]["body"]), (1000, &json!("backlog")));
    let cleared = app.pool.execute(sqlx::query("DELETE FROM messages WHERE body = 'backlog'")).await.unwrap();
    assert_eq!(cleared.rows_affected(), 1005);

    // A non-member of the public room sees it with nothing unread.
    let carol = user(&app, "carol").await;
    let view = read(&app, &room_path, &carol, &token).await;
    assert_eq!(
        (unread(&view), &view.data()["joined"], &view.data()["last_message"]["body"]),
        (0, &json!(false), &json!("more 1"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_the_rooms_projection_from_the_log_gives_the_same_rows() {
    let app = spawn().await;
    let alice = user(&app, "alice").await;
    let bob = user(&app, "bob").await;
    let carol = user(&app, "carol").await;
    let (public, _) = create_room(&app, &alice, "public", "public").await;
    let (private, _) = create_room(&app, &alice, "private", "private").await;
    command(&app, "POST", &format!("/api/v1/rooms/{public}/join"), &bob, json!({})).await;
    command(&app, "POST", &format!("/api/v1/rooms/{public}/join"), &carol, json!({})).await;
    command(&app, "POST", &format!("/api/v1/rooms/{public}/leave"), &carol, json!({})).await;
    command(&app, "POST", &format!("/api/v1/rooms/{public}/join"), &carol, json!({})).await;
    command(&app, "POST", &format!("/api/v1/rooms/{private}/members"), &alice, json!({ "user_id": bob.id })).await;
    command(&app, "POST", &format!("/api/v1/rooms/{private}/members"), &alice, json!({ "user_id": carol.id })).await;
    command(&app, "DELETE", &format!("/api/v1/rooms/{private}/members/{}", carol.id), &alice, json!({})).await;
    command(&app, "PATCH", &format!("/api/v1/rooms/{public}"), &alice, json!({ "name": "renamed", "topic": "t" }))
        .await;
    let mut messages = Vec::new();
    for n in 0..12 {
        let (room, who) = if n % 3 == 0 { (private, &bob) } else { (public, [&alice, &bob, &carol][n % 3]) };
        messages.push(send(&app, room, who, &format!("m{n}")).await.0);
    }
    // messages[1] is Bob's, messages[2] Carol's.
    command(&app, "PATCH", &format!("/api/v1/messages/{}", messages[1]), &bob, json!({ "body": "e1" })).await;
    command(&app, "PATCH", &format!("/api/v1/messages/{}", messages[1]), &bob, json!({ "body": "e2" })).await;
    command(&app, "DELETE", &format!("/api/v1/messages/{}", messages[2]), &carol, json!({})).await;
    let last = command(&app, "DELETE", &format!("/api/v1/rooms/{private}"), &alice, json!({})).await;
    // The live tables have applied everything.
    let view = read(&app, &format!("/api/v1/rooms/{public}"), &alice, &last).await;
    assert_eq!(view.status, StatusCode::OK);
    let counts = |schema: &'static str| {
        let pool = app.pool.clone();
        async move {
            let mut counts = Vec::new();
            for table in ["rooms", "room_members", "messages"] {
                let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.{table}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                counts.push(n);
            }
            counts
        }
    };
    assert_eq!(counts("public").await, vec![2, 5, 12]);

    // A small batch, so the fold meets many batch boundaries (a leave and a rejoin across one).
    cairn_projector::rebuild(&app.pool, &cairn_projector::RoomsProjection, 5, false).await.unwrap();
    assert_eq!(counts("cairn_rebuild_rooms").await, vec![2, 5, 12]);
    assert_same_rows(&app.pool, "a rebuild of the log").await;

    // Every event delivered again to the live tables, in one batch: nothing changes (the
    // versions guard rooms and messages, and the room's version guards its memberships).
    let mut conn = app.pool.acquire().await.unwrap();
    let events = cairn_relay::reader::read_after(&mut conn, Default::default(), 10_000).await.unwrap();
    let projection = cairn_projector::RoomsProjection;
    let wanted: Vec<_> = events.iter().filter(|e| projection.wants(e)).collect();
    assert!(wanted.len() > 20, "{} events", wanted.len());
    projection.apply_batch(&mut conn, "public", &wanted).await.unwrap();
    drop(conn);
    assert_same_rows(&app.pool, "the tables after every event was applied again").await;
    // The rows compared hold what the commands did.
    let archived: bool =
        sqlx::query_scalar("SELECT archived_at IS NOT NULL FROM cairn_rebuild_rooms.rooms WHERE id = $1")
            .bind(private)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let edited: Option<String> = sqlx::query_scalar("SELECT body FROM cairn_rebuild_rooms.messages WHERE id = $1")
        .bind(messages[1])
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((archived, edited.as_deref()), (true, Some("e2")));
    app.stop().await;
}

/// The live rooms tables hold exactly the rows of those rebuilt beside them.
async fn assert_same_rows(pool: &PgPool, what: &str) {
    for table in ["rooms", "room_members", "messages"] {
        let differing: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM ((SELECT * FROM public.{table} EXCEPT SELECT * FROM cairn_rebuild_rooms.{table}) \
                                   UNION ALL (SELECT * FROM cairn_rebuild_rooms.{table} EXCEPT SELECT * FROM public.{table})) d"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(differing, 0, "{table} differs from {what}");
    }
}
