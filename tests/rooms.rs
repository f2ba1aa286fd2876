//! Rooms and messages on the command side, through real HTTP: creating, renaming, archiving,
//! membership, sending, editing and deleting, read markers, the rate limit, and the idempotent
//! send decided by the database across two processes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn::app::{Application, Services};
use common::{Reply, TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

/// Settings every test here runs with: rooms and messages without a verified address (one test
/// checks the default; an empty value means the default, so `none`, a permission nobody
/// checks, turns the rule off), and a message rate no test trips unless it is about the limit.
const BASE: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_RATE_LIMIT_MESSAGES", "100000/s")];

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

async fn call(app: &TestApp, method: &str, path: &str, token: &str, body: Option<Value>) -> Reply {
    app.request(method, path, Some(token), body, &[]).await
}

async fn create_room(app: &TestApp, token: &str, visibility: &str) -> Uuid {
    let reply = app.post("/api/v1/rooms", Some(token), json!({ "name": "general", "visibility": visibility })).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.data()["id"].as_str().unwrap().parse().unwrap()
}

async fn send(app: &TestApp, token: &str, room: Uuid, body: Value) -> Reply {
    app.post(&format!("/api/v1/rooms/{room}/messages"), Some(token), body).await
}

async fn send_ok(app: &TestApp, token: &str, room: Uuid, text: &str) -> Value {
    let reply = send(app, token, room, json!({ "body": text })).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.data()["message"].clone()
}

fn message_id(message: &Value) -> Uuid {
    message["id"].as_str().unwrap().parse().unwrap()
}

/// The event types of one aggregate, in order.
async fn events_of(app: &TestApp, aggregate_type: &str, id: Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

fn assert_refused(reply: &Reply, status: StatusCode, code: &str, what: &str) {
    assert_eq!((reply.status, reply.code()), (status, code), "{what}: {:?}", reply.body);
    assert_eq!(reply.body["success"], false, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_are_created_renamed_given_a_topic_and_archived_by_their_owner() {
    let app = spawn(&[]).await;
    let (owner_id, owner) = user(&app, "owner").await;
    let (_, member) = user(&app, "member").await;

    let created = app
        .post("/api/v1/rooms", Some(&owner), json!({ "name": "  general ", "visibility": "public", "topic": "hi" }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let room: Uuid = created.data()["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        created.data(),
        &json!({ "id": room, "name": "general", "topic": "hi", "visibility": "public", "owner_id": owner_id, "archived": false })
    );
    assert!(created.body["meta"]["consistency_token"].as_str().unwrap().contains('.'));

    for (body, field) in [
        (json!({ "name": " ", "visibility": "public" }), "name"),
        (json!({ "name": "x".repeat(101), "visibility": "public" }), "name"),
        (json!({ "name": "ok", "visibility": "secret" }), "visibility"),
        (json!({ "name": "ok", "visibility": "public", "topic": "t".repeat(501) }), "topic"),
    ] {
        let reply = app.post("/api/v1/rooms", Some(&owner), body.clone()).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", &body.to_string());
        assert!(reply.body["error"]["details"].get(field).is_some(), "{body}: {:?}", reply.body);
    }

    let path = format!("/api/v1/rooms/{room}");
    let renamed = call(&app, "PATCH", &path, &owner, Some(json!({ "name": "random" }))).await;
    assert_eq!((renamed.status, renamed.data()), (StatusCode::OK, &json!({ "id": room })), "{:?}", renamed.body);
    let topic = call(&app, "PATCH", &path, &owner, Some(json!({ "topic": "anything" }))).await;
    assert_eq!(topic.status, StatusCode::OK, "{:?}", topic.body);
    let cleared = call(&app, "PATCH", &path, &owner, Some(json!({ "topic": "" }))).await;
    assert_eq!(cleared.status, StatusCode::OK, "{:?}", cleared.body);
    let same = call(&app, "PATCH", &path, &owner, Some(json!({ "name": "random" }))).await;
    assert_refused(&same, StatusCode::CONFLICT, "CONFLICT", "same name");
    assert_eq!(app.post(&format!("{path}/join"), Some(&member), json!({})).await.status, StatusCode::OK);
    let by_member = call(&app, "PATCH", &path, &member, Some(json!({ "name": "mine" }))).await;
    assert_refused(&by_member, StatusCode::FORBIDDEN, "FORBIDDEN", "rename by a member");
    let archive_by_member = call(&app, "DELETE", &path, &member, None).await;
    assert_refused(&archive_by_member, StatusCode::FORBIDDEN, "FORBIDDEN", "archive by a member");

    send_ok(&app, &member, room, "before the archive").await;
    let archived = call(&app, "DELETE", &path, &owner, None).await;
    assert_eq!((archived.status, archived.data()), (StatusCode::OK, &json!({ "id": room })), "{:?}", archived.body);
    assert_refused(&call(&app, "DELETE", &path, &owner, None).await, StatusCode::CONFLICT, "CONFLICT", "twice");
    let late = send(&app, &member, room, json!({ "body": "after" })).await;
    assert_refused(&late, StatusCode::CONFLICT, "CONFLICT", "send to an archived room");
    let rename = call(&app, "PATCH", &path, &owner, Some(json!({ "name": "again" }))).await;
    assert_refused(&rename, StatusCode::CONFLICT, "CONFLICT", "rename an archived room");

    assert_eq!(
        events_of(&app, "Room", room).await,
        ["RoomCreated", "RoomRenamed", "RoomTopicChanged", "RoomTopicChanged", "MemberJoined", "RoomArchived"]
    );
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'Room' AND aggregate_id = $1 AND sequence = 4",
    )
    .bind(room.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(payload, json!({ "RoomTopicChanged": { "topic": null } }));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_rooms_are_joined_and_left_and_private_ones_do_not_exist_for_outsiders() {
    let app = spawn(&[]).await;
    let (_, owner) = user(&app, "owner").await;
    let (joiner_id, joiner) = user(&app, "joiner").await;
    let public = create_room(&app, &owner, "public").await;
    let private = create_room(&app, &owner, "private").await;

    let joined = app.post(&format!("/api/v1/rooms/{public}/join"), Some(&joiner), json!({})).await;
    assert_eq!(joined.status, StatusCode::OK, "{:?}", joined.body);
    assert_eq!(joined.data(), &json!({ "room_id": public, "user_id": joiner_id }));
    let again = app.post(&format!("/api/v1/rooms/{public}/join"), Some(&joiner), json!({})).await;
    assert_refused(&again, StatusCode::CONFLICT, "CONFLICT", "join twice");
    let left = app.post(&format!("/api/v1/rooms/{public}/leave"), Some(&joiner), json!({})).await;
    assert_eq!((left.status, left.data()), (StatusCode::OK, &json!({ "room_id": public, "user_id": joiner_id })));
    let left_again = app.post(&format!("/api/v1/rooms/{public}/leave"), Some(&joiner), json!({})).await;
    assert_refused(&left_again, StatusCode::CONFLICT, "CONFLICT", "leave twice");
    let owner_leaves = app.post(&format!("/api/v1/rooms/{public}/leave"), Some(&owner), json!({})).await;
    assert_refused(&owner_leaves, StatusCode::CONFLICT, "CONFLICT", "the owner leaves");
    // Having left, the joiner cannot send any more.
    let gone = send(&app, &joiner, public, json!({ "body": "hello?" })).await;
    assert_refused(&gone, StatusCode::FORBIDDEN, "FORBIDDEN", "send after leaving");

    for (action, body) in [("join", None), ("leave", None), ("messages", Some(json!({ "body": "hi" })))] {
        let path = format!("/api/v1/rooms/{private}/{action}");
        let reply = call(&app, "POST", &path, &joiner, Some(body.clone().unwrap_or(json!({})))).await;
        assert_refused(&reply, StatusCode::NOT_FOUND, "NOT_FOUND", &format!("{action} a private room"));
        let unknown = format!("/api/v1/rooms/{}/{action}", Uuid::new_v4());
        let reply = call(&app, "POST", &unknown, &joiner, Some(body.unwrap_or(json!({})))).await;
        assert_refused(&reply, StatusCode::NOT_FOUND, "NOT_FOUND", &format!("{action} an unknown room"));
    }
    for (method, path) in [
        ("POST", "/api/v1/rooms/not-a-uuid/join".to_owned()),
        ("PATCH", "/api/v1/rooms/123".to_owned()),
        ("DELETE", format!("/api/v1/rooms/{public}/members/nope")),
        ("PATCH", "/api/v1/messages/nope".to_owned()),
    ] {
        let reply = call(&app, method, &path, &owner, Some(json!({ "name": "x", "body": "x" }))).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", &path);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_owner_or_an_admin_invites_and_removes_members() {
    let app = spawn(&[]).await;
    let (_, admin) = app.admin_token().await;
    let (_, owner) = user(&app, "owner").await;
    let (member_id, member) = user(&app, "member").await;
    let (outsider_id, outsider) = user(&app, "outsider").await;
    let (late_id, _) = user(&app, "late").await;
    let room = create_room(&app, &owner, "private").await;
    let members = format!("/api/v1/rooms/{room}/members");

    let invited = app.post(&members, Some(&owner), json!({ "user_id": member_id })).await;
    assert_eq!(invited.status, StatusCode::OK, "{:?}", invited.body);
    assert_eq!(invited.data(), &json!({ "room_id": room, "user_id": member_id }));
    assert_refused(
        &app.post(&members, Some(&owner), json!({ "user_id": member_id })).await,
        StatusCode::CONFLICT,
        "CONFLICT",
        "invite twice",
    );
    // The invited member now sees the room and may send.
    send_ok(&app, &member, room, "thanks").await;
    let by_member = app.post(&members, Some(&member), json!({ "user_id": outsider_id })).await;
    assert_refused(&by_member, StatusCode::FORBIDDEN, "FORBIDDEN", "a member invites");
    let by_outsider = app.post(&members, Some(&outsider), json!({ "user_id": outsider_id })).await;
    assert_refused(&by_outsider, StatusCode::NOT_FOUND, "NOT_FOUND", "an outsider invites");
    let unknown = Uuid::new_v4();
    let nobody = app.post(&members, Some(&owner), json!({ "user_id": unknown })).await;
    assert_refused(&nobody, StatusCode::NOT_FOUND, "NOT_FOUND", "an unknown user");
    assert!(nobody.body["error"]["message"].as_str().unwrap().contains(&unknown.to_string()), "{:?}", nobody.body);
    let deactivated = app.post(&format!("/api/v1/users/{late_id}/deactivate"), Some(&admin), json!({})).await;
    assert_eq!(deactivated.status, StatusCode::OK, "{:?}", deactivated.body);
    let inactive = app.post(&members, Some(&owner), json!({ "user_id": late_id })).await;
    assert_refused(&inactive, StatusCode::NOT_FOUND, "NOT_FOUND", "a deactivated user");
    // An admin who is not a member may.
    let by_admin = app.post(&members, Some(&admin), json!({ "user_id": outsider_id })).await;
    assert_eq!(by_admin.status, StatusCode::OK, "{:?}", by_admin.body);

    let remove = |who: Uuid| format!("{members}/{who}");
    let removed_by_member = call(&app, "DELETE", &remove(outsider_id), &member, None).await;
    assert_refused(&removed_by_member, StatusCode::FORBIDDEN, "FORBIDDEN", "a member removes");
    let removed = call(&app, "DELETE", &remove(outsider_id), &admin, None).await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    assert_eq!(removed.data(), &json!({ "room_id": room, "user_id": outsider_id }));
    // Removed, the outsider is an outsider again: the private room does not exist for them.
    let after = call(&app, "DELETE", &remove(member_id), &outsider, None).await;
    assert_refused(&after, StatusCode::NOT_FOUND, "NOT_FOUND", "a removed member removes");
    let removed = call(&app, "DELETE", &remove(member_id), &owner, None).await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    let silenced = send(&app, &member, room, json!({ "body": "still here?" })).await;
    assert_refused(&silenced, StatusCode::NOT_FOUND, "NOT_FOUND", "send after removal");
    let not_member = call(&app, "DELETE", &remove(member_id), &owner, None).await;
    assert_refused(&not_member, StatusCode::CONFLICT, "CONFLICT", "remove twice");

    assert_eq!(
        events_of(&app, "Room", room).await,
        ["RoomCreated", "MemberInvited", "MemberInvited", "MemberRemoved", "MemberRemoved"]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authors_edit_and_delete_their_messages_and_owners_delete_anyones() {
    let app = spawn(&[]).await;
    let (owner_id, owner) = user(&app, "owner").await;
    let (author_id, author) = user(&app, "author").await;
    let (_, other) = user(&app, "other").await;
    let room = create_room(&app, &owner, "public").await;

    let outside = send(&app, &author, room, json!({ "body": "hello" })).await;
    assert_refused(&outside, StatusCode::FORBIDDEN, "FORBIDDEN", "send before joining");
    assert!(outside.body["error"]["message"].as_str().unwrap().contains("join the room first"));
    for token in [&author, &other] {
        assert_eq!(
            app.post(&format!("/api/v1/rooms/{room}/join"), Some(token), json!({})).await.status,
            StatusCode::OK
        );
    }

    let sent = send(&app, &author, room, json!({ "body": "  hello\n\tworld ", "attachments": [] })).await;
    assert_eq!(sent.status, StatusCode::CREATED, "{:?}", sent.body);
    let message = sent.data()["message"].clone();
    let id = message_id(&message);
    assert_eq!(message["room_id"], json!(room));
    assert_eq!(message["author_id"], json!(author_id));
    assert_eq!(message["body"], "hello\n\tworld");
    assert_eq!(message["client_id"], Value::Null);
    assert_eq!(message["attachments"], json!([]));
    assert_eq!(message["edited_at"], Value::Null);
    assert_eq!(message["deleted_at"], Value::Null);
    // The position is the MessageSent event's place in the log, and the answer's token.
    let (tx, pos): (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events \
         WHERE aggregate_type = 'Message' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(id.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(message["position"], format!("{tx}.{pos}"));
    assert_eq!(sent.token(), format!("{tx}.{pos}"));

    let path = format!("/api/v1/messages/{id}");
    let by_other = call(&app, "PATCH", &path, &other, Some(json!({ "body": "mine" }))).await;
    assert_refused(&by_other, StatusCode::FORBIDDEN, "FORBIDDEN", "edit another's message");
    let by_owner = call(&app, "PATCH", &path, &owner, Some(json!({ "body": "owned" }))).await;
    assert_refused(&by_owner, StatusCode::FORBIDDEN, "FORBIDDEN", "the room owner edits another's message");
    let edited = call(&app, "PATCH", &path, &author, Some(json!({ "body": "hello, <i>world</i>" }))).await;
    assert_eq!(edited.status, StatusCode::OK, "{:?}", edited.body);
    let edited_message = &edited.data()["message"];
    assert_eq!(edited_message["body"], "hello, <i>world</i>");
    assert_eq!(edited_message["position"], message["position"], "an edit keeps the message's place");
    assert!(edited_message["edited_at"].is_string());
    let unchanged = call(&app, "PATCH", &path, &author, Some(json!({ "body": "hello, <i>world</i>" }))).await;
    assert_refused(&unchanged, StatusCode::CONFLICT, "CONFLICT", "the same text");
    let blank = call(&app, "PATCH", &path, &author, Some(json!({ "body": "  " }))).await;
    assert_refused(&blank, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", "a blank edit");

    let del_by_other = call(&app, "DELETE", &path, &other, None).await;
    assert_refused(&del_by_other, StatusCode::FORBIDDEN, "FORBIDDEN", "another member deletes");
    let deleted = call(&app, "DELETE", &path, &owner, None).await;
    assert_eq!((deleted.status, deleted.data()), (StatusCode::OK, &json!({ "id": id })), "{:?}", deleted.body);
    assert_refused(
        &call(&app, "PATCH", &path, &author, Some(json!({ "body": "back" }))).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "edit a deleted message",
    );
    assert_refused(
        &call(&app, "DELETE", &path, &author, None).await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "delete twice",
    );
    let by: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'Message' AND aggregate_id = $1 AND sequence = 3",
    )
    .bind(id.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(by, json!({ "MessageDeleted": { "room_id": room, "by": owner_id } }));

    // Authors delete their own; unknown messages are not found.
    let own = message_id(&send_ok(&app, &other, room, "oops").await);
    let own_deleted = call(&app, "DELETE", &format!("/api/v1/messages/{own}"), &other, None).await;
    assert_eq!(own_deleted.status, StatusCode::OK, "{:?}", own_deleted.body);
    let unknown = call(&app, "DELETE", &format!("/api/v1/messages/{}", Uuid::new_v4()), &owner, None).await;
    assert_refused(&unknown, StatusCode::NOT_FOUND, "NOT_FOUND", "an unknown message");

    // A private room's messages do not exist for outsiders, whatever they try.
    let private = create_room(&app, &owner, "private").await;
    let secret = message_id(&send_ok(&app, &owner, private, "secret").await);
    let peek = call(&app, "DELETE", &format!("/api/v1/messages/{secret}"), &other, None).await;
    assert_refused(&peek, StatusCode::NOT_FOUND, "NOT_FOUND", "an outsider deletes in a private room");
    let send_in = send(&app, &other, private, json!({ "body": "let me in" })).await;
    assert_refused(&send_in, StatusCode::NOT_FOUND, "NOT_FOUND", "an outsider sends to a private room");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_are_validated_by_characters_and_stored_verbatim() {
    let app = spawn(&[]).await;
    let (_, owner) = user(&app, "owner").await;
    let room = create_room(&app, &owner, "public").await;

    for (body, what) in [
        (json!(""), "empty"),
        (json!("   \n\t "), "spaces only"),
        (json!("x".repeat(4_001)), "4,001 characters"),
        (json!("ring \u{0007} bell"), "a control character"),
        (json!("nul \u{0000}"), "a NUL"),
    ] {
        let reply = send(&app, &owner, room, json!({ "body": body })).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", what);
        assert!(reply.body["error"]["details"]["body"].is_string(), "{what}: {:?}", reply.body);
    }
    // The limit is in characters: 4,000 two-byte characters are fine.
    let long = "é".repeat(4_000);
    assert_eq!(send_ok(&app, &owner, room, &long).await["body"], long.as_str());
    let html = "<b>x</b> &amp; <script>alert(1)</script>";
    let message = send_ok(&app, &owner, room, html).await;
    assert_eq!(message["body"], html);
    let stored: String = sqlx::query_scalar(
        "SELECT payload -> 'MessageSent' ->> 'body' FROM events WHERE aggregate_type = 'Message' AND aggregate_id = $1",
    )
    .bind(message_id(&message).to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, html);

    for (body, field) in [
        (json!({ "body": "x", "client_id": "has space" }), "client_id"),
        (json!({ "body": "x", "client_id": "c".repeat(65) }), "client_id"),
        (json!({ "body": "x", "client_id": "" }), "client_id"),
        (json!({ "body": "x", "attachments": vec![Uuid::nil(); 11] }), "attachments"),
    ] {
        let reply = send(&app, &owner, room, body.clone()).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, "VALIDATION_FAILED", &body.to_string());
        assert!(reply.body["error"]["details"].get(field).is_some(), "{body}: {:?}", reply.body);
    }
    let unknown_field = send(&app, &owner, room, json!({ "body": "x", "html": true })).await;
    assert_eq!(unknown_field.status, StatusCode::BAD_REQUEST, "{:?}", unknown_field.body);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE event_type = 'MessageSent'")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
        2,
        "only the two valid messages were sent"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readonly_members_cannot_send_but_mark_what_they_read() {
    let app = spawn(&[]).await;
    let (_, admin) = app.admin_token().await;
    let (_, owner) = user(&app, "owner").await;
    let email = format!("reader-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let reader_id = app.register_ok(&email).await;
    let granted =
        app.post(&format!("/api/v1/users/{reader_id}/roles"), Some(&admin), json!({ "role": "readonly" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    let revoked = call(&app, "DELETE", &format!("/api/v1/users/{reader_id}/roles/user"), &admin, None).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    let reader = app.login(&email).await;

    let room = create_room(&app, &owner, "private").await;
    let invited =
        app.post(&format!("/api/v1/rooms/{room}/members"), Some(&owner), json!({ "user_id": reader_id })).await;
    assert_eq!(invited.status, StatusCode::OK, "{:?}", invited.body);
    let first = send_ok(&app, &owner, room, "one").await;
    let second = send_ok(&app, &owner, room, "two").await;

    let refused = send(&app, &reader, room, json!({ "body": "may I?" })).await;
    assert_refused(&refused, StatusCode::FORBIDDEN, "FORBIDDEN", "a readonly member sends");

    let read = format!("/api/v1/rooms/{room}/read");
    let marked = app.post(&read, Some(&reader), json!({ "message_id": message_id(&second) })).await;
    assert_eq!(marked.status, StatusCode::OK, "{:?}", marked.body);
    assert_eq!(
        marked.data(),
        &json!({ "room_id": room, "message_id": message_id(&second), "position": second["position"] })
    );
    assert_eq!(marked.token(), second["position"].as_str().unwrap());
    // Marking an older message does not move the marker back.
    let older = app.post(&read, Some(&reader), json!({ "message_id": message_id(&first) })).await;
    assert_eq!(older.status, StatusCode::OK, "{:?}", older.body);
    let marker: (Uuid, String) = sqlx::query_as(
        "SELECT message_id, tx::text || '.' || pos::text FROM room_read_markers WHERE user_id = $1 AND room_id = $2",
    )
    .bind(reader_id)
    .bind(room)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(marker, (message_id(&second), second["position"].as_str().unwrap().to_owned()));

    // A message of another room, or none at all, is not found; outsiders cannot mark.
    let elsewhere = create_room(&app, &owner, "public").await;
    let other_message = send_ok(&app, &owner, elsewhere, "elsewhere").await;
    for id in [message_id(&other_message), Uuid::new_v4()] {
        let reply = app.post(&read, Some(&reader), json!({ "message_id": id })).await;
        assert_refused(&reply, StatusCode::NOT_FOUND, "NOT_FOUND", "a message not of the room");
    }
    let (_, outsider) = user(&app, "outsider").await;
    let private = app.post(&read, Some(&outsider), json!({ "message_id": message_id(&second) })).await;
    assert_refused(&private, StatusCode::NOT_FOUND, "NOT_FOUND", "an outsider marks in a private room");
    let public = app
        .post(
            &format!("/api/v1/rooms/{elsewhere}/read"),
            Some(&outsider),
            json!({ "message_id": message_id(&other_message) }),
        )
        .await;
    assert_refused(&public, StatusCode::FORBIDDEN, "FORBIDDEN", "a non-member marks in a public room");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_are_rate_limited_per_user() {
    let app = spawn(&[("CAIRN_RATE_LIMIT_MESSAGES", "3/min")]).await;
    let (_, owner) = user(&app, "owner").await;
    let (_, other) = user(&app, "other").await;
    let room = create_room(&app, &owner, "public").await;
    assert_eq!(app.post(&format!("/api/v1/rooms/{room}/join"), Some(&other), json!({})).await.status, StatusCode::OK);
    let first = send(&app, &owner, room, json!({ "body": "message 0", "client_id": "m-0" })).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    for n in 1..3 {
        send_ok(&app, &owner, room, &format!("message {n}")).await;
    }
    let limited = send(&app, &owner, room, json!({ "body": "one too many" })).await;
    assert_refused(&limited, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "the fourth message in a minute");
    let retry_after: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After: {retry_after}");
    // A new message with a key is refused too; a retry of one already sent is answered with it.
    let new_key = send(&app, &owner, room, json!({ "body": "new", "client_id": "m-9" })).await;
    assert_refused(&new_key, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "a new message over the limit");
    let retry = send(&app, &owner, room, json!({ "body": "message 0", "client_id": "m-0" })).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.body);
    assert_eq!(retry.data()["message"], first.data()["message"]);
    // Per user: someone else still sends.
    send_ok(&app, &other, room, "my turn").await;
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessageSent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(sent, 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_client_id_returns_the_first_message() {
    let app = spawn(&[]).await;
    let (_, owner) = user(&app, "owner").await;
    let room = create_room(&app, &owner, "public").await;
    let other_room = create_room(&app, &owner, "public").await;

    let first = send(&app, &owner, room, json!({ "body": "first", "client_id": "phone:42" })).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let message = first.data()["message"].clone();
    assert_eq!(message["client_id"], "phone:42");
    let retry = send(&app, &owner, room, json!({ "body": "a different text", "client_id": "phone:42" })).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.body);
    assert_eq!(retry.data()["message"], message, "the first message, as it was");
    assert_eq!(retry.token(), message["position"].as_str().unwrap());
    // The key is per room (and per author).
    let elsewhere = send(&app, &owner, other_room, json!({ "body": "first", "client_id": "phone:42" })).await;
    assert_eq!(elsewhere.status, StatusCode::CREATED, "{:?}", elsewhere.body);
    assert_ne!(elsewhere.data()["message"]["id"], message["id"]);
    let sent: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'MessageSent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(sent, 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_sends_of_one_client_id_through_two_processes_give_one_message() {
    let app = spawn(&[]).await;
    // A second command process on the same database and namespace.
    let mut settings = app.env.settings(BASE);
    settings.clock = app.clock.clone();
    let second = Application::build_with_email(settings, None, Services { command_api: true, ..Services::none() })
        .await
        .unwrap();
    let second_address = format!("http://127.0.0.1:{}", second.port());
    let second_shutdown = second.shutdown_token();
    let second_handle = tokio::spawn(second.run_until_stopped());

    let (_, owner) = user(&app, "owner").await;
    let room = create_room(&app, &owner, "public").await;
    let mut sends = Vec::new();
    for n in 0..20 {
        let base = if n % 2 == 0 { app.address.clone() } else { second_address.clone() };
        let (client, token) = (app.client.clone(), owner.clone());
        sends.push(tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/api/v1/rooms/{room}/messages"))
                .bearer_auth(token)
                .json(&json!({ "body": format!("attempt {n}"), "client_id": "one-key" }))
                .send()
                .await
                .unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for send in sends {
        let (status, body) = send.await.unwrap();
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status}: {body}");
        created += usize::from(status == StatusCode::CREATED);
        ids.push(body["data"]["message"]["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1, "exactly one send created the message");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Message' AND event_type = 'MessageSent'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows, 1);
    let stored: String = sqlx::query_scalar("SELECT aggregate_id FROM events WHERE event_type = 'MessageSent'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, ids[0]);

    second_shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), second_handle).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn by_default_rooms_and_messages_need_a_verified_address() {
    let app = TestApp::spawn().await;
    let (_, token) = user(&app, "unverified").await;
    let reply = app.post("/api/v1/rooms", Some(&token), json!({ "name": "x", "visibility": "public" })).await;
    assert_refused(&reply, StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED", "an unverified address creates a room");
    // The permission is checked before the room is looked up.
    let reply = send(&app, &token, Uuid::new_v4(), json!({ "body": "hi" })).await;
    assert_refused(&reply, StatusCode::FORBIDDEN, "EMAIL_NOT_VERIFIED", "an unverified address sends");
    app.stop().await;
}
