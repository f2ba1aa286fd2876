//! Email uniqueness across aggregates, under concurrency and after a crash mid-registration.

#![allow(clippy::unwrap_used)]

mod common;

use common::TestApp;
use reqwest::StatusCode;
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_registrations_of_one_email_give_one_account() {
    let app = TestApp::spawn().await;
    let mut handles = Vec::new();
    for i in 0..50 {
        // Any letter case: the address is one mailbox.
        let email = if i % 2 == 0 { "Race@Example.com".to_owned() } else { "race@EXAMPLE.com".to_owned() };
        let client = app.client.clone();
        let url = format!("{}/api/v1/auth/register", app.address);
        handles.push(tokio::spawn(async move {
            let body = serde_json::json!({ "email": email, "password": common::PASSWORD, "display_name": "Racer" });
            let resp = client.post(url).json(&body).send().await.unwrap();
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap();
            (status, body)
        }));
    }
    let mut created = 0;
    let mut conflicts = 0;
    for handle in handles {
        let (status, body) = handle.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                assert_eq!(body["error"]["code"], "CONFLICT");
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((created, conflicts), (1, 49));
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_half_way_through_a_registration_leaves_the_email_usable() {
    let app = TestApp::spawn().await;
    // A registration that dies with its process: the event row is written in a transaction
    // whose connection is cut before commit (what a SIGKILL does to a command in flight).
    let mut conn = sqlx::PgConnection::connect(&app.env.database_url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('User', gen_random_uuid()::text, 1, 'UserRegistered', '1', \
                 '{\"UserRegistered\": {\"email\": \"crash@example.com\", \"display_name\": \"C\", \"password_hash\": \"x\", \"roles\": []}}', '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    std::mem::forget(tx);
    drop(conn);
    // The address is free: nothing was reserved outside the one atomic append.
    let reply = app.register("crash@example.com").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_eq!(app.register("CRASH@example.com").await.status, StatusCode::CONFLICT);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_refuses_bad_input_naming_each_field() {
    let app = TestApp::spawn().await;
    let reply = app
        .post(
            "/api/v1/auth/register",
            None,
            serde_json::json!({ "email": "not-an-email", "password": "short", "display_name": " " }),
        )
        .await;
    assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    let details = reply.body["error"]["details"].as_object().unwrap();
    for field in ["email", "password", "display_name"] {
        assert!(details.contains_key(field), "{field} not named: {details:?}");
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'User'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 0, "a refused command must write nothing");
    app.stop().await;
}

/// Registers `email` with `display_name`.
async fn register_as(app: &TestApp, email: &str, display_name: &str) -> common::Reply {
    app.post(
        "/api/v1/auth/register",
        None,
        serde_json::json!({ "email": email, "password": common::PASSWORD, "display_name": display_name }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn look_alike_identities_are_one_account_or_refused() {
    let app = TestApp::spawn().await;
    let victim = app.register_ok("victim@x.com").await;

    // Full-width letters are the same address: a duplicate like any other ...
    let full_width = "\u{FF56}\u{FF49}\u{FF43}\u{FF54}\u{FF49}\u{FF4D}@\u{FF58}.\u{FF43}\u{FF4F}\u{FF4D}";
    let reply = register_as(&app, full_width, "Victim").await;
    assert_eq!((reply.status, reply.code()), (StatusCode::CONFLICT, "CONFLICT"), "{:?}", reply.body);
    // ... and signing in with them finds the real account.
    let reply = app
        .post("/api/v1/auth/login", None, serde_json::json!({ "email": full_width, "password": common::PASSWORD }))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.data()["user"]["id"].as_str().map(str::to_owned), Some(victim.to_string()), "{:?}", reply.body);

    // Invisible and direction-changing characters are refused, naming the field.
    for email in ["vic\u{200B}tim@x.com", "\u{FEFF}victim@x.com", "victim@x.com\u{202E}", "vic\u{2066}tim@x.com"] {
        let reply = register_as(&app, email, "Victim").await;
        assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{email:?}");
        assert!(reply.body["error"]["details"]["email"].is_string(), "{email:?}: {:?}", reply.body);
    }
    for name in ["Ada\u{202E}nimda", "\u{200F}Ada", "A\u{200D}da"] {
        let reply = register_as(&app, "other@x.com", name).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{name:?}");
        assert!(reply.body["error"]["details"]["display_name"].is_string(), "{name:?}: {:?}", reply.body);
    }
    // Renaming oneself follows the same rule.
    let token = app.login("victim@x.com").await;
    let reply = app
        .request(
            "PATCH",
            "/api/v1/users/me",
            Some(&token),
            Some(serde_json::json!({ "display_name": "x\u{202E}y" })),
            &[],
        )
        .await;
    assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{:?}", reply.body);
    assert!(reply.body["error"]["details"]["display_name"].is_string(), "{:?}", reply.body);

    // Exactly one account holds the address, stored in its plain form.
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT payload -> 'UserRegistered' ->> 'email' FROM events WHERE event_type = 'UserRegistered'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(stored, vec!["victim@x.com".to_owned()]);
    app.stop().await;
}
