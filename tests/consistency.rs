//! Consistency tokens: a read waits only after its caller is authorised, only for the read model
//! it reads, and never for a token past the log's head.
//!
//! Each test holds the users projection back by taking its advisory lock (the lock its writers
//! take in every batch), so a token past a registration cannot be reached by it until released.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::Services;
use common::{Reply, TestApp, TestEnv};
use reqwest::StatusCode;
use sqlx::{Connection, PgConnection};

/// The longest wait the application is given: every "at once" below is far shorter.
const WAIT_MS: &str = "6000";
/// What "at once" means here.
const AT_ONCE: Duration = Duration::from_secs(1);

async fn spawn() -> TestApp {
    TestApp::spawn_with(TestEnv::new(), Services::all(), &[("CAIRN_CONSISTENCY_WAIT_MS", WAIT_MS)]).await
}

/// Holds projection `name` back until the connection is closed: its next batch blocks on the
/// advisory lock every writer of the projection takes.
async fn hold_projection(app: &TestApp, name: &str) -> PgConnection {
    let mut conn = PgConnection::connect(&app.env.database_url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(cairn_platform::db::advisory_key(&format!("cairn-projection:{name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// A GET with a consistency token, and how long it took.
async fn read(app: &TestApp, path: &str, bearer: Option<&str>, token: &str) -> (Reply, Duration) {
    let started = Instant::now();
    let reply = app.request("GET", path, bearer, None, &[("X-Consistency-Token", token)]).await;
    (reply, started.elapsed())
}

/// A registration the held users projection cannot apply; its consistency token.
async fn unreachable_token(app: &TestApp, email: &str) -> String {
    let reply = app.register(email).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.token()
}

#[tokio::test]
async fn refused_callers_are_refused_before_any_wait() {
    let app = spawn().await;
    app.register_ok("plain@example.com").await;
    let user = app.login("plain@example.com").await;
    // The caller's own row is in the read model before the projection is held.
    app.wait_count("SELECT count(*) FROM users WHERE email = 'plain@example.com'", 1, Duration::from_secs(10)).await;
    let held = hold_projection(&app, "users").await;
    let token = unreachable_token(&app, "later@example.com").await;
    let other: String = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE event_type = 'UserRegistered' \
         AND payload -> 'UserRegistered' ->> 'email' = 'later@example.com'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();

    let cases = [
        ("/api/v1/users", None, StatusCode::UNAUTHORIZED),
        ("/api/v1/users/me", None, StatusCode::UNAUTHORIZED),
        ("/api/v1/roles", None, StatusCode::UNAUTHORIZED),
        ("/api/v1/users", Some(user.as_str()), StatusCode::FORBIDDEN),
        (&format!("/api/v1/users/{other}"), Some(user.as_str()), StatusCode::FORBIDDEN),
        ("/api/v1/admin/projections", Some(user.as_str()), StatusCode::FORBIDDEN),
        ("/api/v1/admin/projections/users/parked", Some(user.as_str()), StatusCode::FORBIDDEN),
    ];
    for (path, bearer, expected) in cases {
        let (reply, took) = read(&app, path, bearer, &token).await;
        assert_eq!(reply.status, expected, "{path}: {:?}", reply.body);
        assert!(took < AT_ONCE, "{path} answered {expected} only after {took:?}: it waited before authorising");
    }
    // The same token from an allowed caller still waits, and says it was not reached.
    let (reply, took) = read(&app, "/api/v1/users/me", Some(&user), &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["meta"]["consistent"], false);
    assert!(took >= Duration::from_secs(5), "an allowed read did not wait: {took:?}");

    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn a_token_past_the_log_head_is_refused_at_once() {
    let app = spawn().await;
    let reply = app.register("ada@example.com").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let token = reply.token();
    let bearer = app.login("ada@example.com").await;

    for beyond in ["999999999.1", "18446744073709551615.0"] {
        let (reply, took) = read(&app, "/api/v1/users/me", Some(&bearer), beyond).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{beyond}: {:?}", reply.body);
        assert_eq!(reply.code(), "VALIDATION_FAILED");
        assert!(reply.body["error"]["details"]["X-Consistency-Token"].is_string(), "{:?}", reply.body);
        assert!(took < AT_ONCE, "{beyond} was refused only after {took:?}");
    }
    // One position past the head of the last transaction is past the head too.
    let (tx, pos) = token.split_once('.').unwrap();
    let head: (i64, i64) = sqlx::query_as(
        "SELECT transaction_id::text::bigint, global_position FROM events \
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let next = format!("{}.{}", head.0, head.1 + 1);
    let (reply, _) = read(&app, "/api/v1/users/me", Some(&bearer), &next).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{next}: {:?}", reply.body);

    // Tokens the log holds are served, the newest included (also when it is newer than what the
    // query side remembered as the head).
    let (reply, _) = read(&app, "/api/v1/users/me", Some(&bearer), &format!("{tx}.{pos}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["meta"]["consistent"], true);
    let later = app.register("grace@example.com").await.token();
    let (reply, _) = read(&app, "/api/v1/users/me", Some(&bearer), &later).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["meta"]["consistent"], true);
    // A malformed token is still refused, naming the header.
    let (reply, _) = read(&app, "/api/v1/users/me", Some(&bearer), "soon").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
    assert!(reply.body["error"]["details"]["X-Consistency-Token"].is_string(), "{:?}", reply.body);
    app.stop().await;
}

#[tokio::test]
async fn a_read_waits_only_for_the_projection_it_reads() {
    let app = spawn().await;
    app.register_ok("reader@example.com").await;
    let bearer = app.login("reader@example.com").await;
    let held = hold_projection(&app, "users").await;
    let token = unreachable_token(&app, "stuck@example.com").await;

    // The roles projection passes the registration; the users projection cannot.
    let (reply, took) = read(&app, "/api/v1/roles", Some(&bearer), &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["meta"]["consistent"], true, "{:?}", reply.body);
    // (The roles projection has to pass the event first, so this allows more than AT_ONCE on a
    // busy machine; held by the users projection, it would take the whole wait and say false.)
    assert!(took < Duration::from_secs(3), "a roles read waited {took:?} on the stuck users projection");

    // The operators' view answers at once too, saying the token is not applied everywhere.
    let (_, admin) = app.admin_token().await;
    let (reply, took) = read(&app, "/api/v1/admin/projections", Some(&admin), &token).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["meta"]["consistent"], false, "{:?}", reply.body);
    assert!(took < AT_ONCE, "the projections view waited {took:?}");

    // A users read waits for the users projection, and is answered as soon as it is released.
    let reader = {
        let client = app.client.clone();
        let url = format!("{}/api/v1/users/me", app.address);
        let (bearer, token) = (bearer.clone(), token.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client.get(url).bearer_auth(bearer).header("X-Consistency-Token", token).send().await.unwrap();
            let body: serde_json::Value = resp.json().await.unwrap();
            (body, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!reader.is_finished(), "a users read did not wait for the users projection");
    held.close().await.unwrap();
    let (body, took) = reader.await.unwrap();
    assert_eq!(body["meta"]["consistent"], true, "{body:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    app.stop().await;
}
