//! Realtime sockets end to end: real WebSocket clients (tokio-tungstenite) against two processes
//! on one database and one NATS namespace.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::Services;
use common::{TestApp, TestEnv};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// How long a frame may take to arrive.
const WAIT: Duration = Duration::from_secs(15);

/// Message sends are not what these tests are about: no verified email needed (an empty value
/// means the default, so a permission nobody holds is named), no rate limit hit.
const OPEN: &[(&str, &str)] =
    &[("CAIRN_VERIFIED_EMAIL_FOR", "nothing:at-all"), ("CAIRN_RATE_LIMIT_MESSAGES", "100000/s")];

async fn spawn(extra: &[(&str, &str)]) -> TestApp {
    let mut settings = OPEN.to_vec();
    settings.extend_from_slice(extra);
    TestApp::spawn_with(TestEnv::new(), Services::all(), &settings).await
}

/// A second process on `app`'s database and namespace (the command and query APIs).
async fn beside(app: &TestApp, extra: &[(&str, &str)]) -> TestApp {
    let mut settings = OPEN.to_vec();
    settings.extend_from_slice(extra);
    let services = Services { command_api: true, query_api: true, ..Services::none() };
    TestApp::spawn_with(app.env.sibling(), services, &settings).await
}

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a socket's end looked like.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Closed(u16, String),
    Dropped,
}

impl Client {
    /// Connects to the process serving at `base` (`http://…`).
    async fn connect(base: &str) -> Self {
        let url = format!("{}/api/v1/ws", base.replace("http://", "ws://"));
        let (ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        assert_eq!(response.status(), 101);
        Self { ws }
    }

    /// Connects and authenticates as the holder of `token`.
    async fn signed_in(base: &str, token: &str) -> Self {
        let mut client = Self::connect(base).await;
        client.send(json!({"type": "auth", "token": token})).await;
        let ready = client.expect("ready").await;
        assert!(ready["user_id"].is_string());
        client
    }

    async fn send(&mut self, frame: Value) {
        self.ws.send(Message::text(frame.to_string())).await.unwrap();
    }

    /// The next JSON frame, skipping pings.
    async fn next(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let read = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("no frame in time");
            match read {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Reads until a frame of type `kind` (skipping presence, typing and membership frames).
    async fn expect(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
            let skippable = ["presence", "typing", "stop_typing", "member_joined", "member_left", "room_updated"];
            assert!(skippable.contains(&frame["type"].as_str().unwrap_or("")), "expected {kind}, got {frame}");
        }
    }

    /// Joins `room` (after `after`) and returns the `joined` frame.
    async fn join(&mut self, room: Uuid, after: Option<&str>) -> Value {
        let mut frame = json!({"type": "join", "room_id": room});
        if let Some(after) = after {
            frame["after"] = json!(after);
        }
        self.send(frame).await;
        self.expect("joined").await
    }

    /// The next `count` message frames' bodies, in order.
    async fn messages(&mut self, count: usize) -> Vec<String> {
        let mut bodies = Vec::new();
        while bodies.len() < count {
            let frame = self.expect("message").await;
            bodies.push(frame["body"].as_str().unwrap().to_owned());
        }
        bodies
    }

    /// Reads until the socket ends; frames before that are returned.
    async fn ended(&mut self) -> (Ended, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut frames = Vec::new();
        loop {
            let read = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("socket still open");
            match read {
                Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (Ended::Closed(u16::from(frame.code), frame.reason.to_string()), frames)
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return (Ended::Dropped, frames),
                Some(Ok(_)) => {}
            }
        }
    }

    async fn closed_with(&mut self, code: u16) -> Vec<Value> {
        let (end, frames) = self.ended().await;
        match end {
            Ended::Closed(got, reason) => assert_eq!(got, code, "closed {got} ({reason}), frames {frames:?}"),
            Ended::Dropped => panic!("dropped without a close frame; frames {frames:?}"),
        }
        frames
    }

    /// Proves nothing more arrives: a ping's pong comes back with no message frame before it.
    async fn nothing_pending(&mut self) {
        self.send(json!({"type": "ping"})).await;
        loop {
            let frame = self.next().await;
            match frame["type"].as_str() {
                Some("pong") => return,
                Some("presence" | "typing" | "stop_typing") => {}
                _ => panic!("unexpected frame {frame}"),
            }
        }
    }
}

struct User {
    id: Uuid,
    email: String,
    token: String,
}

async fn user(app: &TestApp, name: &str) -> User {
    let email = format!("{name}-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let id = app.register_ok(&email).await;
    let token = app.login(&email).await;
    User { id, email, token }
}

async fn room(app: &TestApp, owner: &User, visibility: &str) -> Uuid {
    let reply =
        app.post("/api/v1/rooms", Some(&owner.token), json!({"name": "general", "visibility": visibility})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.data()["id"].as_str().unwrap().parse().unwrap()
}

async fn join_room(app: &TestApp, user: &User, room: Uuid) {
    let reply = app.post(&format!("/api/v1/rooms/{room}/join"), Some(&user.token), json!({})).await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
}

/// Sends over HTTP.
async fn say(app: &TestApp, user: &User, room: Uuid, body: &str) {
    let reply = app
        .post(
            &format!("/api/v1/rooms/{room}/messages"),
            Some(&user.token),
            json!({"body": body, "client_id": Uuid::new_v4().simple().to_string()}),
        )
        .await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_reaches_every_member_socket_on_both_processes_once_and_in_order() {
    let a = spawn(&[]).await;
    let b = beside(&a, &[]).await;
    let (alice, bob) = (user(&a, "alice").await, user(&a, "bob").await);
    let room = room(&a, &alice, "public").await;
    join_room(&a, &bob, room).await;

    let mut alice_a = Client::signed_in(&a.address, &alice.token).await;
    let mut bob_b = Client::signed_in(&b.address, &bob.token).await;
    let mut alice_b = Client::signed_in(&b.address, &alice.token).await;
    for client in [&mut alice_a, &mut bob_b, &mut alice_b] {
        client.join(room, None).await;
    }
    say(&a, &alice, room, "one over HTTP on A").await;
    bob_b.send(json!({"type": "send", "room_id": room, "body": "two over the socket on B", "client_id": "c-2"})).await;
    // The ack comes among the message frames (the first message may arrive before it).
    let mut bob_seen = Vec::new();
    let ack = loop {
        let frame = bob_b.next().await;
        match frame["type"].as_str() {
            Some("ack") => break frame,
            Some("message") => bob_seen.push(frame["body"].as_str().unwrap().to_owned()),
            _ => {}
        }
    };
    assert_eq!(ack["client_id"], "c-2");
    assert!(ack["message_id"].is_string() && ack["position"].is_string(), "{ack}");
    say(&b, &alice, room, "three over HTTP on B").await;

    let expected = ["one over HTTP on A", "two over the socket on B", "three over HTTP on B"];
    let more = bob_b.messages(3 - bob_seen.len()).await;
    bob_seen.extend(more);
    assert_eq!(bob_seen, expected);
    for client in [&mut alice_a, &mut alice_b] {
        assert_eq!(client.messages(3).await, expected);
    }
    for client in [&mut alice_a, &mut bob_b, &mut alice_b] {
        client.nothing_pending().await;
    }
    b.shutdown.cancel();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_with_after_gets_exactly_what_it_missed_then_live_frames() {
    let a = spawn(&[]).await;
    let b = beside(&a, &[]).await;
    let (alice, bob) = (user(&a, "alice").await, user(&a, "bob").await);
    let room = room(&a, &alice, "public").await;
    join_room(&a, &bob, room).await;

    let mut bob_a = Client::signed_in(&a.address, &bob.token).await;
    bob_a.join(room, None).await;
    say(&a, &alice, room, "m1").await;
    let seen = bob_a.expect("message").await;
    assert_eq!(seen["body"], "m1");
    let last = seen["position"].as_str().unwrap().to_owned();
    drop(bob_a);

    // Sent through the other process while Bob is away.
    for n in 2..=6 {
        say(&b, &alice, room, &format!("m{n}")).await;
    }
    // More keep coming while he joins again.
    let writer = {
        let (address, token) = (a.address.clone(), alice.token.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 7..=16 {
                let reply = client
                    .post(format!("{address}/api/v1/rooms/{room}/messages"))
                    .bearer_auth(&token)
                    .json(&json!({"body": format!("m{n}"), "client_id": format!("m{n}")}))
                    .send()
                    .await
                    .unwrap();
                assert!(reply.status().is_success());
            }
        })
    };
    let mut bob_b = Client::signed_in(&b.address, &bob.token).await;
    bob_b.join(room, Some(&last)).await;
    writer.await.unwrap();
    let expected: Vec<String> = (2..=16).map(|n| format!("m{n}")).collect();
    assert_eq!(bob_b.messages(expected.len()).await, expected);
    say(&a, &alice, room, "m17").await;
    assert_eq!(bob_b.messages(1).await, ["m17"]);
    bob_b.nothing_pending().await;
    b.shutdown.cancel();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_member_stops_receiving_while_the_others_go_on() {
    let app = spawn(&[]).await;
    let (owner, kept, removed) = (user(&app, "owner").await, user(&app, "kept").await, user(&app, "removed").await);
    let room = room(&app, &owner, "private").await;
    for member in [&kept, &removed] {
        let reply =
            app.post(&format!("/api/v1/rooms/{room}/members"), Some(&owner.token), json!({"user_id": member.id})).await;
        assert!(reply.status.is_success(), "{:?}", reply.body);
    }
    let mut kept_socket = Client::signed_in(&app.address, &kept.token).await;
    let mut removed_socket = Client::signed_in(&app.address, &removed.token).await;
    kept_socket.join(room, None).await;
    removed_socket.join(room, None).await;
    say(&app, &owner, room, "before").await;
    assert_eq!(removed_socket.messages(1).await, ["before"]);

    let reply = app
        .request("DELETE", &format!("/api/v1/rooms/{room}/members/{}", removed.id), Some(&owner.token), None, &[])
        .await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
    let told = removed_socket.expect("error").await;
    assert_eq!((told["code"].as_str(), told["room_id"].as_str()), (Some("FORBIDDEN"), Some(room.to_string().as_str())));
    say(&app, &owner, room, "after").await;
    // The positive control: the member still in the room gets it.
    assert_eq!(kept_socket.messages(2).await, ["before", "after"]);
    removed_socket.nothing_pending().await;
    // And joining again is refused as for anyone outside a private room.
    removed_socket.send(json!({"type": "join", "room_id": room})).await;
    assert_eq!(removed_socket.expect("error").await["code"], "NOT_FOUND");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deactivation_logout_and_token_expiry_close_the_socket() {
    let app = spawn(&[]).await;
    let (_, admin) = app.admin_token().await;
    let (gone, out, expiring, control) =
        (user(&app, "gone").await, user(&app, "out").await, user(&app, "expiring").await, user(&app, "control").await);
    let mut gone_socket = Client::signed_in(&app.address, &gone.token).await;
    let mut out_socket = Client::signed_in(&app.address, &out.token).await;
    let mut control_socket = Client::signed_in(&app.address, &control.token).await;

    let reply = app.post(&format!("/api/v1/users/{}/deactivate", gone.id), Some(&admin), json!({})).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    gone_socket.closed_with(4403).await;

    let reply = app.post("/api/v1/auth/logout", Some(&out.token), json!({})).await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
    out_socket.closed_with(4401).await;
    control_socket.nothing_pending().await;

    let mut expiring_socket = Client::signed_in(&app.address, &expiring.token).await;
    expiring_socket.nothing_pending().await;
    app.clock.advance(Duration::from_secs(24 * 3600));
    let frames = expiring_socket.closed_with(4401).await;
    assert!(frames.iter().any(|f| f["message"] == "token expired"), "{frames:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_reaches_the_others_and_stops_by_itself() {
    let app = spawn(&[]).await;
    let (alice, bob) = (user(&app, "alice").await, user(&app, "bob").await);
    let room = room(&app, &alice, "public").await;
    join_room(&app, &bob, room).await;
    let mut alice_socket = Client::signed_in(&app.address, &alice.token).await;
    let mut bob_socket = Client::signed_in(&app.address, &bob.token).await;
    alice_socket.join(room, None).await;
    bob_socket.join(room, None).await;
    // `joined` comes before the subscription goes live, and typing (ephemeral) is not held
    // meanwhile: a message reaching Bob proves his subscription is live.
    say(&app, &alice, room, "hello").await;
    bob_socket.expect("message").await;

    alice_socket.send(json!({"type": "typing", "room_id": room})).await;
    let typing = bob_socket.expect("typing").await;
    assert_eq!(typing["user_id"], alice.id.to_string());
    app.clock.advance(Duration::from_secs(6));
    let stop = bob_socket.expect("stop_typing").await;
    assert_eq!(stop["user_id"], alice.id.to_string());
    // Not echoed to the typist.
    alice_socket.send(json!({"type": "ping"})).await;
    loop {
        let frame = alice_socket.next().await;
        assert_ne!(frame["type"], "typing");
        if frame["type"] == "pong" {
            break;
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_appears_and_disappears_when_a_connection_dies_without_a_close_frame() {
    let app = spawn(&[]).await;
    let other = beside(&app, &[]).await;
    let (alice, bob) = (user(&app, "alice").await, user(&app, "bob").await);
    let room = room(&app, &alice, "public").await;
    join_room(&app, &bob, room).await;
    let mut alice_socket = Client::signed_in(&app.address, &alice.token).await;
    alice_socket.join(room, None).await;

    let mut bob_socket = Client::signed_in(&other.address, &bob.token).await;
    let joined = bob_socket.join(room, None).await;
    assert!(joined["presence"].as_array().unwrap().contains(&json!(bob.id)), "{joined}");
    let deadline = Instant::now() + WAIT;
    loop {
        let frame = alice_socket.expect("presence").await;
        if frame["user_id"] == bob.id.to_string() {
            assert_eq!(frame["online"], true);
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // The TCP connection goes away with no close frame.
    drop(bob_socket);
    loop {
        let frame = alice_socket.expect("presence").await;
        if frame["user_id"] == bob.id.to_string() {
            assert_eq!(frame["online"], false);
            break;
        }
    }
    other.shutdown.cancel();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_with_its_close_code() {
    let app = spawn(&[("CAIRN_WS_FRAME_RATE", "10/s")]).await;
    let alice = user(&app, "alice").await;

    // A plain GET is not an upgrade: the error envelope.
    let reply = app.get("/api/v1/ws", None).await;
    assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "MALFORMED_REQUEST"));

    let mut c = Client::connect(&app.address).await;
    c.send(json!({"type": "join", "room_id": Uuid::new_v4()})).await;
    c.closed_with(4401).await;
    let mut c = Client::connect(&app.address).await;
    c.send(json!({"type": "auth", "token": "forged"})).await;
    c.closed_with(4401).await;
    let mut c = Client::connect(&app.address).await;
    c.ws.send(Message::text("not json")).await.unwrap();
    c.closed_with(4400).await;

    let mut c = Client::signed_in(&app.address, &alice.token).await;
    c.send(json!({"type": "dance"})).await;
    let frames = c.closed_with(4400).await;
    assert_eq!(frames.last().unwrap()["code"], "MALFORMED_REQUEST");
    let mut c = Client::signed_in(&app.address, &alice.token).await;
    c.send(json!({"type": "join"})).await;
    c.closed_with(4400).await;
    let mut c = Client::signed_in(&app.address, &alice.token).await;
    c.ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    c.closed_with(1003).await;
    let mut c = Client::signed_in(&app.address, &alice.token).await;
    c.ws.send(Message::text("x".repeat(17 * 1024))).await.unwrap();
    c.closed_with(1009).await;
    let mut c = Client::signed_in(&app.address, &alice.token).await;
    // A text frame whose bytes are not UTF-8 (the client library would refuse to build one).
    let raw = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        vec![0xff, 0xfe, 0xfd],
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    c.ws.send(Message::Frame(raw)).await.unwrap();
    c.closed_with(1007).await;
    let mut c = Client::signed_in(&app.address, &alice.token).await;
    for _ in 0..50 {
        if c.ws.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
            break;
        }
    }
    c.closed_with(4429).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_one_may_not_see_are_not_found_and_a_readonly_member_reads_but_cannot_send() {
    let app = spawn(&[]).await;
    let (_, admin) = app.admin_token().await;
    let (alice, mallory, reader) = (user(&app, "alice").await, user(&app, "mallory").await, user(&app, "reader").await);
    let private = room(&app, &alice, "private").await;
    let public = room(&app, &alice, "public").await;

    let mut m = Client::signed_in(&app.address, &mallory.token).await;
    m.send(json!({"type": "join", "room_id": Uuid::new_v4()})).await;
    assert_eq!(m.expect("error").await["code"], "NOT_FOUND");
    m.send(json!({"type": "join", "room_id": private})).await;
    assert_eq!(m.expect("error").await["code"], "NOT_FOUND");
    m.send(json!({"type": "join", "room_id": public})).await;
    let refused = m.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["message"].as_str()),
        (Some("FORBIDDEN"), Some("join the room first"))
    );
    m.send(json!({"type": "join", "room_id": public, "after": "yesterday"})).await;
    assert_eq!(m.expect("error").await["code"], "VALIDATION_FAILED");

    // A readonly member (invited by the owner) receives the room but cannot send.
    let reply =
        app.post(&format!("/api/v1/users/{}/roles", reader.id), Some(&admin), json!({"role": "readonly"})).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let reply =
        app.request("DELETE", &format!("/api/v1/users/{}/roles/user", reader.id), Some(&admin), None, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let reply =
        app.post(&format!("/api/v1/rooms/{private}/members"), Some(&alice.token), json!({"user_id": reader.id})).await;
    assert!(reply.status.is_success(), "{:?}", reply.body);
    // Signed in again: the token carries the readonly role alone.
    let reader_token = app.login(&reader.email).await;
    let mut r = Client::signed_in(&app.address, &reader_token).await;
    r.join(private, None).await;
    say(&app, &alice, private, "for everyone").await;
    assert_eq!(r.messages(1).await, ["for everyone"]);
    r.send(json!({"type": "send", "room_id": private, "body": "hi", "client_id": "r-1"})).await;
    let error = r.expect("error").await;
    assert_eq!((error["code"].as_str(), error["client_id"].as_str()), (Some("FORBIDDEN"), Some("r-1")));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_process_reconnect_to_the_other_and_miss_nothing() {
    let survivor = spawn(&[]).await;
    let mut extra: Vec<(&str, &str)> = OPEN.to_vec();
    extra.push(("CAIRN_LOG", "warn"));
    let mut doomed = common::Serve::start(&survivor.env, &extra);
    let http = reqwest::Client::new();
    doomed.wait_ready(&http).await;
    let (alice, bob) = (user(&survivor, "alice").await, user(&survivor, "bob").await);
    let room = room(&survivor, &alice, "public").await;
    join_room(&survivor, &bob, room).await;

    let mut bob_socket = Client::signed_in(&doomed.base, &bob.token).await;
    bob_socket.join(room, None).await;
    say(&survivor, &alice, room, "m1").await;
    let last = bob_socket.expect("message").await["position"].as_str().unwrap().to_owned();

    doomed.child.kill().unwrap(); // SIGKILL
    let (end, _) = bob_socket.ended().await;
    assert_eq!(end, Ended::Dropped);
    for n in 2..=5 {
        say(&survivor, &alice, room, &format!("m{n}")).await;
    }
    let mut again = Client::signed_in(&survivor.address, &bob.token).await;
    again.join(room, Some(&last)).await;
    assert_eq!(again.messages(4).await, ["m2", "m3", "m4", "m5"]);
    say(&survivor, &alice, room, "m6").await;
    assert_eq!(again.messages(1).await, ["m6"]);
    again.nothing_pending().await;
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_does_not_read_is_dropped_while_another_keeps_receiving() {
    let app = spawn(&[("CAIRN_WS_QUEUE", "4")]).await;
    let (alice, slow, fast) = (user(&app, "alice").await, user(&app, "slow").await, user(&app, "fast").await);
    let room = room(&app, &alice, "public").await;
    join_room(&app, &slow, room).await;
    join_room(&app, &fast, room).await;
    // A tiny receive window, so the server's writes block once the client stops reading.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = app.address.trim_start_matches("http://").to_owned();
    let stream = socket.connect(address.parse().unwrap()).await.unwrap();
    let url = format!("ws://{address}/api/v1/ws");
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.unwrap();
    let mut slow_socket = Client { ws };
    slow_socket.send(json!({"type": "auth", "token": slow.token})).await;
    slow_socket.expect("ready").await;
    slow_socket.join(room, None).await;
    let mut fast_socket = Client::signed_in(&app.address, &fast.token).await;
    fast_socket.join(room, None).await;

    // Enough large messages to fill the kernel's buffers between the server and the idle client
    // (megabytes on loopback), until the server drops it; the other client gets every one.
    let body = "x".repeat(3990);
    let slow_drops = || async {
        let metrics = app.get("/metrics", None).await;
        metrics.body.as_str().unwrap().contains("cairn_ws_dropped_total{reason=\"slow\"}")
    };
    let mut sent = 0;
    while !slow_drops().await {
        assert!(sent < 3000, "the slow client was never dropped");
        for _ in 0..25 {
            say(&app, &alice, room, &format!("{sent:04}{body}")).await;
            assert_eq!(fast_socket.messages(1).await[0][..4], format!("{sent:04}"));
            sent += 1;
        }
    }
    // The slow client reads now: it was dropped (4408, or the connection just ended) before the end.
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(WAIT, slow_socket.ws.next()).await.unwrap() {
            Some(Ok(Message::Text(_))) => got += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break None,
        }
    };
    assert!(got < sent, "the slow client got everything ({got} of {sent})");
    assert!(end.is_none() || end == Some(4408), "{end:?}");
    say(&app, &alice, room, "9999 still here").await;
    assert_eq!(fast_socket.messages(1).await, ["9999 still here"]);
    app.stop().await;
}
