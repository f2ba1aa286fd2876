//! Emailed tokens are consumed by one conditional statement, outside any transaction that
//! hashing or the command would hold open: single use is decided by the database, and a command
//! that fails gives its token back.

#![allow(clippy::unwrap_used)]

mod common;

use common::{MailCatcher, TestApp};
use reqwest::StatusCode;
use serde_json::json;

async fn token_used(app: &TestApp) -> bool {
    sqlx::query_scalar("SELECT used_at IS NOT NULL FROM email_tokens WHERE purpose = 'reset_password'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_the_command_refuses_gives_its_token_back() {
    // Given a user with a reset link, deactivated before using it.
    let app = TestApp::spawn().await;
    let mail = MailCatcher::start(app.env.smtp_port);
    let (_, admin) = app.admin_token().await;
    let id = app.register_ok("refused@example.com").await;
    let asked = app.post("/api/v1/auth/password-reset", None, json!({ "email": "refused@example.com" })).await;
    assert_eq!(asked.status, StatusCode::ACCEPTED);
    let token = mail.token_for("refused@example.com", "reset-password", 1).await;
    let deactivated = app.post(&format!("/api/v1/users/{id}/deactivate"), Some(&admin), json!({})).await;
    assert_eq!(deactivated.status, StatusCode::OK, "{:?}", deactivated.body);

    // When the reset is confirmed: the command refuses it, and the token is not spent.
    let body = json!({ "token": token, "new_password": "a perfectly good new passphrase" });
    let refused = app.post("/api/v1/auth/password-reset/confirm", None, body.clone()).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{:?}", refused.body);
    assert!(!token_used(&app).await);

    // Then, once reactivated, the same link works, once.
    let reactivated = app.post(&format!("/api/v1/users/{id}/reactivate"), Some(&admin), json!({})).await;
    assert_eq!(reactivated.status, StatusCode::OK, "{:?}", reactivated.body);
    let reset = app.post("/api/v1/auth/password-reset/confirm", None, body.clone()).await;
    assert_eq!(reset.status, StatusCode::OK, "{:?}", reset.body);
    assert!(token_used(&app).await);
    let again = app.post("/api/v1/auth/password-reset/confirm", None, body).await;
    assert_eq!((again.status, again.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_reset_link_sent_at_once_from_several_places_works_once() {
    // Given a reset link.
    let app = TestApp::spawn().await;
    let mail = MailCatcher::start(app.env.smtp_port);
    app.register_ok("racing@example.com").await;
    app.post("/api/v1/auth/password-reset", None, json!({ "email": "racing@example.com" })).await;
    let token = mail.token_for("racing@example.com", "reset-password", 1).await;

    // When four confirmations with it arrive together (each hashes its password first).
    let mut confirmations = Vec::new();
    for i in 0..4 {
        let (client, url) = (app.client.clone(), format!("{}/api/v1/auth/password-reset/confirm", app.address));
        let body = json!({ "token": token, "new_password": format!("racing passphrase number {i} here") });
        confirmations.push(tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() }));
    }
    let mut statuses = Vec::new();
    for confirmation in confirmations {
        statuses.push(confirmation.await.unwrap());
    }

    // Then exactly one is taken and the others are refused as a used token.
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::BAD_REQUEST, StatusCode::BAD_REQUEST]);
    assert!(token_used(&app).await);
    app.stop().await;
}
