//! Every error is the envelope with the right code, whatever went wrong.

#![allow(clippy::unwrap_used)]

mod common;

use common::TestApp;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_get_the_envelope_with_the_right_code() {
    let app = TestApp::spawn().await;
    let token = {
        app.register_ok("envelope@example.com").await;
        app.login("envelope@example.com").await
    };
    let url = |p: &str| format!("{}{p}", app.address);
    let send = |req: reqwest::RequestBuilder| async move {
        let resp = req.header("X-Request-Id", "client-chosen-id-1").send().await.unwrap();
        let status = resp.status();
        let echoed = resp.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
        let body: serde_json::Value = resp.json().await.unwrap();
        (status, body, echoed)
    };
    let register = url("/api/v1/auth/register");
    let cases = vec![
        ("unknown route", app.client.get(url("/api/v1/nothing-here")), StatusCode::NOT_FOUND, "NOT_FOUND"),
        (
            "wrong method",
            app.client.put(url("/api/v1/auth/register")),
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "not JSON",
            app.client.post(&register).header("content-type", "application/json").body("{oops"),
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
        ),
        (
            "wrong content type",
            app.client.post(&register).header("content-type", "text/plain").body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "unknown field",
            app.client
                .post(&register)
                .json(&serde_json::json!({"email": "a@b.co", "password": "x", "display_name": "x", "admin": true})),
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
        ),
        (
            "missing field",
            app.client.post(&register).json(&serde_json::json!({"email": "a@b.co"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        ),
        (
            "wrong type",
            app.client.post(&register).json(&serde_json::json!({"email": 5, "password": "x", "display_name": "x"})),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        ),
        (
            "oversized",
            // The server answers before reading the whole body and then closes the connection;
            // `Connection: close` keeps the client from handing that connection to the next case.
            app.client
                .post(&register)
                .header("content-type", "application/json")
                .header("connection", "close")
                .body(format!("{{\"email\": \"{}\"}}", "a".repeat(200_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "bad path id",
            app.client.get(url("/api/v1/users/not-a-uuid")).bearer_auth(&token),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        ),
        (
            "list without users:read",
            app.client.get(url("/api/v1/users?limit=1000")).bearer_auth(&token),
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
        ),
        (
            "bad consistency token",
            app.client.get(url("/api/v1/users/me")).bearer_auth(&token).header("X-Consistency-Token", "nope"),
            StatusCode::BAD_REQUEST,
            "VALIDATION_FAILED",
        ),
        (
            "garbage bearer token",
            app.client.get(url("/api/v1/users/me")).bearer_auth("x"),
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        ),
    ];
    for (what, req, status, code) in cases {
        let (got, body, echoed) = send(req).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["success"], false, "{what}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert_eq!(body["error"]["request_id"], "client-chosen-id-1", "{what}");
        assert_eq!(echoed.as_deref(), Some("client-chosen-id-1"), "{what}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}");
    }
    let missing = send(app.client.post(&register).json(&serde_json::json!({"email": "a@b.co"}))).await.1;
    assert!(missing["error"]["details"]["password"].is_string(), "{missing}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'User'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "bad requests must write nothing");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_parameters_are_validated() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    for query in ["limit=0", "limit=101", "limit=abc", "status=sleeping", "cursor=garbage", "sort=name"] {
        let reply = app.get(&format!("/api/v1/users?{query}"), Some(&admin)).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"),
            "{query}: {:?}",
            reply.body
        );
    }
    // Pagination walks every user exactly once.
    for i in 0..5 {
        app.register_ok(&format!("page{i}@example.com")).await;
    }
    let last = app.register("page5@example.com").await;
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/users?limit=2&cursor={c}"),
            None => "/api/v1/users?limit=2".to_owned(),
        };
        let page = app.request("GET", &path, Some(&admin), None, &[("X-Consistency-Token", &last.token())]).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        for user in page.data().as_array().unwrap() {
            assert!(seen.insert(user["id"].as_str().unwrap().to_owned()), "user listed twice");
        }
        match page.body["meta"]["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "6 users and the admin");
    let found = app.get("/api/v1/users?q=PAGE3", Some(&admin)).await;
    assert_eq!(found.data().as_array().unwrap().len(), 1);
    app.stop().await;
}
