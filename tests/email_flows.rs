//! Email verification and password reset end to end, with mail delivered to a real SMTP server.

#![allow(clippy::unwrap_used)]

mod common;

use common::{MailCatcher, TestApp, PASSWORD};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_user_verifies_their_address_with_the_mailed_token() {
    // This deployment lets only verified addresses change their profile.
    let app = TestApp::spawn_with(
        common::TestEnv::new(),
        cairn::Services::all(),
        &[("CAIRN_VERIFIED_EMAIL_FOR", "profile:write")],
    )
    .await;
    let mail = MailCatcher::start(app.env.smtp_port);
    let registered = app.register("verify@example.com").await;
    assert_eq!(registered.status, StatusCode::CREATED);
    let token = mail.token_for("verify@example.com", "verify-email", 1).await;
    assert!(token.len() >= 43, "at least 256 bits: {token}");

    let login = app.login("verify@example.com").await;
    let claims = app
        .request("GET", "/api/v1/users/me", Some(&login), None, &[("X-Consistency-Token", &registered.token())])
        .await;
    assert_eq!(claims.data()["email_verified"], false);

    let verified = app.post("/api/v1/auth/verify-email", None, json!({ "token": token })).await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
    let me =
        app.request("GET", "/api/v1/users/me", Some(&login), None, &[("X-Consistency-Token", &verified.token())]).await;
    assert_eq!(me.data()["email_verified"], true);
    // Single use.
    let again = app.post("/api/v1/auth/verify-email", None, json!({ "token": token })).await;
    assert_eq!((again.status, again.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    let forged = app.post("/api/v1/auth/verify-email", None, json!({ "token": "A".repeat(43) })).await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    // The token is stored only as a hash.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM email_tokens WHERE token_hash = $1")
        .bind(&token)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_reset_sets_the_new_password_and_ends_every_session() {
    let app = TestApp::spawn().await;
    let mail = MailCatcher::start(app.env.smtp_port);
    app.register_ok("forgot@example.com").await;
    let session = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({ "email": "forgot@example.com", "password": PASSWORD, "refresh_token_in_body": true }),
        )
        .await;
    let access = session.data()["access_token"].as_str().unwrap().to_owned();
    let refresh = session.data()["refresh_token"].as_str().unwrap().to_owned();

    let asked = app.post("/api/v1/auth/password-reset", None, json!({ "email": "forgot@example.com" })).await;
    assert_eq!(asked.status, StatusCode::ACCEPTED);
    let token = mail.token_for("forgot@example.com", "reset-password", 1).await;

    // A weak password is refused and leaves the token usable.
    let weak = app
        .post("/api/v1/auth/password-reset/confirm", None, json!({ "token": token, "new_password": "password" }))
        .await;
    assert_eq!((weak.status, weak.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    let new_password = "brand new passphrase for forgot";
    let reset = app
        .post("/api/v1/auth/password-reset/confirm", None, json!({ "token": token, "new_password": new_password }))
        .await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);

    assert_eq!(app.get("/api/v1/roles", Some(&access)).await.status, StatusCode::UNAUTHORIZED, "every session ends");
    let refreshed = app.post("/api/v1/auth/refresh", None, json!({ "refresh_token": refresh })).await;
    assert_eq!(refreshed.status, StatusCode::UNAUTHORIZED);
    let old =
        app.post("/api/v1/auth/login", None, json!({ "email": "forgot@example.com", "password": PASSWORD })).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new =
        app.post("/api/v1/auth/login", None, json!({ "email": "forgot@example.com", "password": new_password })).await;
    assert_eq!(new.status, StatusCode::OK);
    let reused = app
        .post(
            "/api/v1/auth/password-reset/confirm",
            None,
            json!({ "token": token, "new_password": "yet another passphrase here" }),
        )
        .await;
    assert_eq!(reused.status, StatusCode::BAD_REQUEST, "single use");

    // Nobody gets a mail for an address without an account. A request for a real account sent
    // after it proves the mail path was working meanwhile: once its mail is in, the ghost's
    // request (answered and looked up first) had every chance to be mailed too.
    app.post("/api/v1/auth/password-reset", None, json!({ "email": "ghost@example.com" })).await;
    app.post("/api/v1/auth/password-reset", None, json!({ "email": "forgot@example.com" })).await;
    mail.token_for("forgot@example.com", "reset-password", 2).await;
    assert!(mail.messages().iter().all(|(to, _, _)| to != "ghost@example.com"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_link_dies_when_a_newer_one_is_asked_for_or_the_password_changes() {
    let app = TestApp::spawn().await;
    let mail = MailCatcher::start(app.env.smtp_port);
    app.register_ok("twice@example.com").await;
    let ask = || app.post("/api/v1/auth/password-reset", None, json!({ "email": "twice@example.com" }));
    let confirm = |token: String, password: &'static str| {
        app.post("/api/v1/auth/password-reset/confirm", None, json!({ "token": token, "new_password": password }))
    };
    assert_eq!(ask().await.status, StatusCode::ACCEPTED);
    let first = mail.token_for("twice@example.com", "reset-password", 1).await;
    assert_eq!(ask().await.status, StatusCode::ACCEPTED);
    let mailed = [
        mail.token_for("twice@example.com", "reset-password", 2).await,
        mail.token_for("twice@example.com", "reset-password", 1).await,
    ];
    let second = mailed.into_iter().find(|t| *t != first).unwrap();

    // The older link is refused once a newer one was asked for.
    let stale = confirm(first, "a brand new passphrase number one").await;
    assert_eq!((stale.status, stale.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{:?}", stale.body);
    assert!(stale.body["error"]["details"]["token"].is_string(), "{:?}", stale.body);

    // The owner changes the password: the outstanding link is refused too.
    let access = app.login("twice@example.com").await;
    let new_password = "the owner's own new passphrase 7";
    let changed = app
        .post(
            "/api/v1/auth/password",
            Some(&access),
            json!({ "current_password": PASSWORD, "new_password": new_password }),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    let outstanding = confirm(second, "a brand new passphrase number two").await;
    assert_eq!(outstanding.status, StatusCode::BAD_REQUEST, "{:?}", outstanding.body);
    let owner =
        app.post("/api/v1/auth/login", None, json!({ "email": "twice@example.com", "password": new_password })).await;
    assert_eq!(owner.status, StatusCode::OK, "the owner's password stands");
    app.stop().await;
}
