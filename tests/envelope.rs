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

/// What no error message may show: serde's and axum's wording, positions in the body, type names.
const INTERNALS: &[&str] = &[
    "line ",
    "column",
    "struct ",
    "Failed to",
    "deserialize",
    "invalid digit",
    "invalid type",
    "RegisterBody",
    "serde",
    "UUID parsing failed",
];

fn assert_speaks_the_apis_words(what: &str, body: &serde_json::Value) {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: no message: {body}");
    for word in INTERNALS {
        assert!(!message.contains(word), "{what}: the message shows internals ({word}): {body}");
    }
    assert!(!message.chars().any(char::is_control), "{what}: the message echoes control characters: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_nul_or_control_character_reaches_the_database() {
    let app = TestApp::spawn().await;
    let (admin_id, admin) = app.admin_token().await;
    let cases: Vec<(&str, String, Option<serde_json::Value>, &str)> = vec![
        ("GET", "/api/v1/users?q=%00".to_owned(), None, "q"),
        ("GET", "/api/v1/users?role=%00".to_owned(), None, "role"),
        ("GET", "/api/v1/users?q=a%00b&limit=5".to_owned(), None, "q"),
        ("GET", "/api/v1/users?status=%00".to_owned(), None, "status"),
        ("GET", "/api/v1/users?cursor=%00".to_owned(), None, "cursor"),
        ("GET", "/api/v1/admin/projections/users/parked?status=%00".to_owned(), None, "status"),
        ("GET", "/api/v1/admin/projections/us%00ers/parked".to_owned(), None, "name"),
        ("DELETE", format!("/api/v1/users/{admin_id}/roles/op%00"), None, "role"),
        ("PUT", "/api/v1/roles/a%00".to_owned(), Some(serde_json::json!({"permissions": []})), "name"),
        ("POST", "/api/v1/auth/oauth/%00/start".to_owned(), None, "provider"),
        (
            "POST",
            "/api/v1/auth/login".to_owned(),
            Some(serde_json::json!({"email": "a\u{0}@example.com", "password": "x"})),
            "email",
        ),
        (
            "POST",
            "/api/v1/roles".to_owned(),
            Some(serde_json::json!({"name": "nul", "permissions": ["files:read\u{0}"]})),
            "permissions[0]",
        ),
        (
            "POST",
            "/api/v1/auth/oauth/google/callback".to_owned(),
            Some(serde_json::json!({"code": "c", "state": "\u{0}"})),
            "state",
        ),
    ];
    for (method, path, body, field) in cases {
        let reply = app.request(method, &path, Some(&admin), body, &[]).await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"),
            "{method} {path}: {:?}",
            reply.body
        );
        assert!(
            reply.body["error"]["details"][field].is_string(),
            "{method} {path} must name {field}: {:?}",
            reply.body
        );
        assert_speaks_the_apis_words(&path, &reply.body);
    }
    app.stop().await;
}

/// What is sent, the request, the code expected, and the field and problem `details` must name.
type Case = (&'static str, reqwest::RequestBuilder, &'static str, Option<(&'static str, &'static str)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_name_the_field_in_the_apis_words() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let register = "/api/v1/auth/register";
    let raw = |body: &'static str| {
        app.client.post(format!("{}{register}", app.address)).header("content-type", "application/json").body(body)
    };
    let cases: Vec<Case> = vec![
        ("not JSON", raw("{\"email\": "), "MALFORMED_REQUEST", None),
        ("a list for an object", raw("[]"), "VALIDATION_FAILED", Some(("body", "must be an object"))),
        (
            "a number for a string",
            raw(r#"{"email": 5, "password": "x", "display_name": "x"}"#),
            "VALIDATION_FAILED",
            Some(("email", "must be a string")),
        ),
        ("a missing field", raw(r#"{"email": "a@b.co"}"#), "VALIDATION_FAILED", Some(("password", "is required"))),
        (
            "an unknown field",
            raw(r#"{"email": "a@b.co", "password": "x", "display_name": "x", "admin": true}"#),
            "MALFORMED_REQUEST",
            Some(("admin", "is not a known field")),
        ),
        (
            "a limit that is no number",
            app.client.get(format!("{}/api/v1/users?limit=abc", app.address)).bearer_auth(&admin),
            "VALIDATION_FAILED",
            Some(("limit", "must be a whole number in range")),
        ),
        (
            "an unknown parameter",
            app.client.get(format!("{}/api/v1/users?sort=name", app.address)).bearer_auth(&admin),
            "VALIDATION_FAILED",
            Some(("sort", "is not a known parameter")),
        ),
        (
            "an id that is no UUID",
            app.client.get(format!("{}/api/v1/users/not-a-uuid", app.address)).bearer_auth(&admin),
            "VALIDATION_FAILED",
            Some(("id", "must be a UUID")),
        ),
        (
            "an id with an escape sequence",
            app.client.get(format!("{}/api/v1/users/%1b%5b31mX", app.address)).bearer_auth(&admin),
            "VALIDATION_FAILED",
            Some(("id", "must not contain control characters")),
        ),
        (
            "the second id of a path",
            app.client
                .post(format!("{}/api/v1/admin/projections/users/parked/nope/retry", app.address))
                .bearer_auth(&admin),
            "VALIDATION_FAILED",
            Some(("event_id", "must be a UUID")),
        ),
    ];
    for (what, req, code, field) in cases {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str().unwrap_or("")),
            (StatusCode::BAD_REQUEST, code),
            "{what}: {body}"
        );
        if let Some((field, reason)) = field {
            assert_eq!(body["error"]["details"][field], reason, "{what}: {body}");
            assert!(
                !body["error"]["message"].as_str().unwrap().contains("not-a-uuid"),
                "{what}: echoes the input: {body}"
            );
        }
        assert_speaks_the_apis_words(what, &body);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_header_bytes_and_wrong_methods_still_get_the_envelope_and_their_headers() {
    let app = TestApp::spawn().await;
    let url = |p: &str| format!("{}{p}", app.address);
    let opaque = reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap();
    let bearer = reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
    let cases = vec![
        ("an opaque request id", app.client.get(url("/api/v1/users/me")).header("x-request-id", opaque.clone()), 401),
        ("an opaque bearer token", app.client.get(url("/api/v1/users/me")).header("authorization", bearer), 401),
        (
            "an opaque consistency token",
            app.client.get(url("/api/v1/nothing")).header("x-consistency-token", opaque.clone()),
            404,
        ),
        (
            "an opaque content type",
            app.client.post(url("/api/v1/auth/login")).header("content-type", opaque).body("{}"),
            415,
        ),
    ];
    for (what, req, status) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let id = resp.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
        assert!(id.as_deref().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()), "{what}: X-Request-Id {id:?}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["success"], false, "{what}");
        assert_eq!(body["error"]["request_id"].as_str(), id.as_deref(), "{what}");
    }
    // A 405 keeps the Allow header the router sets.
    let resp = app.client.put(url("/api/v1/auth/register")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
    assert!(allow.as_deref().is_some_and(|a| a.contains("POST")), "Allow: {allow:?}");
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["error"]["code"], "METHOD_NOT_ALLOWED");
    app.stop().await;
}
