//! The whole pipeline through the real HTTP API, as a frontend drives it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_grant_read_back_deactivate_and_old_token_is_refused() {
    let app = TestApp::spawn().await;

    // A user registers and signs in.
    let registered = app.register("Grace@Example.com").await;
    assert_eq!(registered.status, StatusCode::CREATED, "{:?}", registered.body);
    let user_id = registered.data()["user_id"].as_str().unwrap().to_owned();
    let user_token = app.login("grace@example.com").await;

    // Their own profile is readable at once with the consistency token.
    let me = app
        .request("GET", "/api/v1/users/me", Some(&user_token), None, &[("X-Consistency-Token", &registered.token())])
        .await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.body);
    assert_eq!(me.data()["email"], "grace@example.com");
    assert_eq!(me.body["meta"]["consistent"], true);

    // The first admin is created with the operator binary, through the same command path.
    let (admin_id, admin_token) = app.admin_token().await;

    // The admin grants a role and reads it back with the consistency token.
    let granted =
        app.post(&format!("/api/v1/users/{user_id}/roles"), Some(&admin_token), json!({ "role": "auditor" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    let read = app
        .request(
            "GET",
            &format!("/api/v1/users/{user_id}"),
            Some(&admin_token),
            None,
            &[("X-Consistency-Token", &granted.token())],
        )
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.data()["roles"], json!(["auditor", "user"]));
    assert_eq!(read.body["meta"]["consistent"], true);

    // Granting it again is a conflict.
    let again =
        app.post(&format!("/api/v1/users/{user_id}/roles"), Some(&admin_token), json!({ "role": "auditor" })).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "CONFLICT"));

    // The list filters by role.
    let auditors = app.get("/api/v1/users?role=auditor", Some(&admin_token)).await;
    assert_eq!(auditors.status, StatusCode::OK);
    assert_eq!(auditors.data().as_array().unwrap().len(), 1);
    assert_eq!(auditors.body["meta"]["next_cursor"], serde_json::Value::Null);

    // Deactivation: the user's old token stops working at once.
    let deactivated = app.post(&format!("/api/v1/users/{user_id}/deactivate"), Some(&admin_token), json!({})).await;
    assert_eq!(deactivated.status, StatusCode::OK, "{:?}", deactivated.body);
    let refused = app.get("/api/v1/users/me", Some(&user_token)).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"));
    let login = app
        .post("/api/v1/auth/login", None, json!({ "email": "grace@example.com", "password": common::PASSWORD }))
        .await;
    assert_eq!(login.status, StatusCode::UNAUTHORIZED);

    // The status shows in the read model, and the admin's token still works.
    let read = app
        .request(
            "GET",
            &format!("/api/v1/users/{user_id}"),
            Some(&admin_token),
            None,
            &[("X-Consistency-Token", &deactivated.token())],
        )
        .await;
    assert_eq!(read.data()["status"], "deactivated");

    // Every event reached the audit log, with actor and client address.
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
    app.wait_count("SELECT count(*) FROM audit_log", events, Duration::from_secs(10)).await;
    let (actor, ip, action): (Option<String>, Option<String>, String) = sqlx::query_as(
        "SELECT actor_id, client_ip, action FROM audit_log WHERE aggregate_id = $1 ORDER BY global_position DESC LIMIT 1",
    )
    .bind(&user_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(action, "UserDeactivated");
    assert_eq!(actor.as_deref(), Some(admin_id.to_string().as_str()));
    assert_eq!(ip.as_deref(), Some("127.0.0.1"));

    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_is_append_only() {
    let app = TestApp::spawn().await;
    app.register_ok("immutable@example.com").await;
    for statement in ["UPDATE events SET event_type = 'X'", "DELETE FROM events", "TRUNCATE events"] {
        let err = sqlx::query(statement).execute(&app.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{statement}: {err}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operational_endpoints_answer() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status, StatusCode::OK, "{:?}", ready.body);
    app.register_ok("metrics@example.com").await;
    let metrics = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    for name in ["http_requests_total", "http_request_duration_seconds", "cairn_events_appended_total"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let spec = app.get("/api/v1/openapi.json", None).await;
    let paths = spec.body["paths"].as_object().unwrap();
    for path in
        ["/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/users/me", "/api/v1/users/{id}/roles", "/api/v1/users"]
    {
        assert!(paths.contains_key(path), "{path} missing from the OpenAPI document");
    }
    let docs = app.client.get(format!("{}/docs/", app.address)).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    let jwks = app.get("/.well-known/jwks.json", None).await;
    assert_eq!(jwks.body["keys"][0]["alg"], "EdDSA");
    app.stop().await;
}
