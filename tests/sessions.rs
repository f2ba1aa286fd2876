//! Sessions through the real HTTP API: refresh rotation, reuse detection, the grace interval,
//! expiry, idle timeout, logout, logout-all, password change, deactivation, session lists,
//! lockout and rate limits.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn::Services;
use common::{Reply, TestApp, TestEnv, PASSWORD};
use reqwest::StatusCode;
use serde_json::json;

async fn app_with(extra: &[(&str, &str)]) -> TestApp {
    TestApp::spawn_with(TestEnv::new(), Services::all(), extra).await
}

/// Signs in as a native client: (access token, refresh token).
async fn native_login(app: &TestApp, email: &str, password: &str) -> (String, String) {
    let reply = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({ "email": email, "password": password, "refresh_token_in_body": true }),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    (
        reply.data()["access_token"].as_str().unwrap().to_owned(),
        reply.data()["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn refresh(app: &TestApp, token: &str) -> Reply {
    app.post("/api/v1/auth/refresh", None, json!({ "refresh_token": token })).await
}

/// Whether `token` is accepted (a read that needs only a valid token, not the read model).
async fn authed(app: &TestApp, token: &str) -> StatusCode {
    app.get("/api/v1/roles", Some(token)).await.status
}

fn refresh_token(reply: &Reply) -> String {
    reply.data()["refresh_token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_rotates_and_reuse_ends_the_family_except_within_the_grace_interval() {
    let app = TestApp::spawn().await;
    app.register_ok("rotate@example.com").await;
    let (_, r1) = native_login(&app, "rotate@example.com", PASSWORD).await;

    let first = refresh(&app, &r1).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let r2 = refresh_token(&first);
    assert_ne!(r1, r2, "rotated on use");
    assert!(first.data()["access_token"].is_string());

    // A second tab presenting r1 at the same moment gets the current session, not a logout.
    let tab = refresh(&app, &r1).await;
    assert_eq!(tab.status, StatusCode::OK, "{:?}", tab.body);
    assert!(tab.data()["refresh_token"].is_null(), "no new refresh token within the grace interval");
    let access_from_tab = tab.data()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(authed(&app, &access_from_tab).await, StatusCode::OK);

    let second = refresh(&app, &r2).await;
    assert_eq!(second.status, StatusCode::OK);
    let r3 = refresh_token(&second);
    let access = second.data()["access_token"].as_str().unwrap().to_owned();

    // r1 is now two rotations old: reuse. The whole family ends, access tokens included.
    let reused = refresh(&app, &r1).await;
    assert_eq!((reused.status, reused.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"));
    assert_eq!(refresh(&app, &r3).await.status, StatusCode::UNAUTHORIZED, "the newest token dies with its family");
    assert_eq!(authed(&app, &access).await, StatusCode::UNAUTHORIZED);
    let revoked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'SessionRevoked' AND payload -> 'SessionRevoked' ->> 'reason' = 'refresh_token_reuse'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(revoked, 1);

    for garbage in ["", "nope", "00000000-0000-0000-0000-000000000000.abc"] {
        assert_eq!(refresh(&app, garbage).await.status, StatusCode::UNAUTHORIZED, "{garbage}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn browsers_get_an_http_only_strict_cookie_used_only_from_allowed_origins() {
    let app = TestApp::spawn().await;
    app.register_ok("cookie@example.com").await;
    let resp = app
        .client
        .post(format!("{}/api/v1/auth/login", app.address))
        .json(&json!({ "email": "cookie@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    for part in ["cairn_refresh=", "HttpOnly", "Secure", "SameSite=Strict", "Path=/api/v1/auth"] {
        assert!(set_cookie.contains(part), "{part} missing from {set_cookie}");
    }
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["data"]["refresh_token"].is_null(), "a browser's refresh token is never readable by scripts");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let refresh_from = |origin: Option<&'static str>| {
        let mut req = app.client.post(format!("{}/api/v1/auth/refresh", app.address)).header("cookie", cookie.clone());
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        req.send()
    };
    assert_eq!(refresh_from(None).await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(refresh_from(Some("https://evil.example.com")).await.unwrap().status(), StatusCode::FORBIDDEN);
    let ok = refresh_from(Some("http://localhost:5173")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let rotated = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(rotated.starts_with("cairn_refresh=") && !rotated.starts_with(&cookie), "the cookie rotates");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_end_at_their_absolute_lifetime_and_after_idling() {
    // Two hours at most, one hour between refreshes; time moves on the application's clock.
    let app = app_with(&[("CAIRN_SESSION_LIFETIME_SECS", "7200"), ("CAIRN_SESSION_IDLE_SECS", "3600")]).await;
    app.register_ok("short@example.com").await;
    let (_, mut lasting) = native_login(&app, "short@example.com", PASSWORD).await;
    for _ in 0..2 {
        app.clock.advance(Duration::from_secs(50 * 60));
        let refreshed = refresh(&app, &lasting).await;
        assert_eq!(refreshed.status, StatusCode::OK, "refreshed within the idle limit: {:?}", refreshed.body);
        lasting = refresh_token(&refreshed);
    }
    let (access, idling) = native_login(&app, "short@example.com", PASSWORD).await;
    assert_eq!(authed(&app, &access).await, StatusCode::OK);

    app.clock.advance(Duration::from_secs(61 * 60));
    let expired = refresh(&app, &lasting).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED, "{:?}", expired.body);
    assert!(expired.body["error"]["message"].as_str().unwrap().contains("expired"), "{:?}", expired.body);
    let idled = refresh(&app, &idling).await;
    assert_eq!(idled.status, StatusCode::UNAUTHORIZED, "{:?}", idled.body);
    assert!(idled.body["error"]["message"].as_str().unwrap().contains("idle"), "{:?}", idled.body);
    let old_access = app.get("/api/v1/roles", Some(&access)).await;
    assert_eq!(old_access.status, StatusCode::UNAUTHORIZED, "a 15-minute access token is over an hour later");
    assert!(old_access.body["error"]["message"].as_str().unwrap().contains("expired"), "{:?}", old_access.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logout_ends_one_session_and_logout_all_ends_every_one() {
    let app = TestApp::spawn().await;
    app.register_ok("multi@example.com").await;
    let (access_a, refresh_a) = native_login(&app, "multi@example.com", PASSWORD).await;
    let (access_b, refresh_b) = native_login(&app, "multi@example.com", PASSWORD).await;
    let (access_c, refresh_c) = native_login(&app, "multi@example.com", PASSWORD).await;

    let out = app.post("/api/v1/auth/logout", Some(&access_a), json!({})).await;
    assert_eq!(out.status, StatusCode::OK, "{:?}", out.body);
    assert_eq!(authed(&app, &access_a).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&app, &refresh_a).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(authed(&app, &access_b).await, StatusCode::OK, "other sessions go on");

    // The session list shows the live ones; one can be ended from another.
    let list = app
        .request("GET", "/api/v1/users/me/sessions", Some(&access_b), None, &[("X-Consistency-Token", &out.token())])
        .await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    let sessions = list.data().as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    let other = sessions.iter().find(|s| s["current"] == false).unwrap()["id"].as_str().unwrap().to_owned();
    let ended = app.request("DELETE", &format!("/api/v1/users/me/sessions/{other}"), Some(&access_b), None, &[]).await;
    assert_eq!(ended.status, StatusCode::OK);
    assert_eq!(authed(&app, &access_c).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&app, &refresh_c).await.status, StatusCode::UNAUTHORIZED);
    // Someone else's session is not found.
    app.register_ok("stranger@example.com").await;
    let (stranger, _) = native_login(&app, "stranger@example.com", PASSWORD).await;
    let theirs = app.request("DELETE", &format!("/api/v1/users/me/sessions/{other}"), Some(&stranger), None, &[]).await;
    assert_eq!(theirs.status, StatusCode::NOT_FOUND);

    let all = app.post("/api/v1/auth/logout-all", Some(&access_b), json!({})).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(authed(&app, &access_b).await, StatusCode::UNAUTHORIZED);
    let rb = refresh(&app, &refresh_b).await;
    assert_eq!(rb.status, StatusCode::UNAUTHORIZED, "{:?}", rb.body);
    assert_eq!(authed(&app, &stranger).await, StatusCode::OK, "other users are untouched");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_change_ends_the_other_sessions_and_keeps_this_one() {
    let app = TestApp::spawn().await;
    app.register_ok("change@example.com").await;
    let (access_here, refresh_here) = native_login(&app, "change@example.com", PASSWORD).await;
    let (access_there, refresh_there) = native_login(&app, "change@example.com", PASSWORD).await;
    let new_password = "a different long passphrase 42";

    let wrong = app
        .post(
            "/api/v1/auth/password",
            Some(&access_here),
            json!({ "current_password": "not it at all", "new_password": new_password }),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let weak = app
        .post(
            "/api/v1/auth/password",
            Some(&access_here),
            json!({ "current_password": PASSWORD, "new_password": "password1" }),
        )
        .await;
    assert_eq!((weak.status, weak.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    assert!(weak.body["error"]["details"]["new_password"].as_str().unwrap().contains("weak"));

    let changed = app
        .post(
            "/api/v1/auth/password",
            Some(&access_here),
            json!({ "current_password": PASSWORD, "new_password": new_password }),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    let new_access = changed.data()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(authed(&app, &new_access).await, StatusCode::OK);
    assert_eq!(refresh(&app, &refresh_here).await.status, StatusCode::OK, "this session goes on");
    assert_eq!(authed(&app, &access_there).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&app, &refresh_there).await.status, StatusCode::UNAUTHORIZED);
    let old =
        app.post("/api/v1/auth/login", None, json!({ "email": "change@example.com", "password": PASSWORD })).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    native_login(&app, "change@example.com", new_password).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deactivation_and_an_administrator_end_every_session() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let id = app.register_ok("ended@example.com").await;
    let (access, refresh_token_1) = native_login(&app, "ended@example.com", PASSWORD).await;
    let ended = app.request("DELETE", &format!("/api/v1/users/{id}/sessions"), Some(&admin), None, &[]).await;
    assert_eq!(ended.status, StatusCode::OK, "{:?}", ended.body);
    assert_eq!(authed(&app, &access).await, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&app, &refresh_token_1).await.status, StatusCode::UNAUTHORIZED);

    let (_, refresh_token_2) = native_login(&app, "ended@example.com", PASSWORD).await;
    let off = app.post(&format!("/api/v1/users/{id}/deactivate"), Some(&admin), json!({})).await;
    assert_eq!(off.status, StatusCode::OK);
    assert_eq!(refresh(&app, &refresh_token_2).await.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_sign_ins_lock_the_account_for_a_while_and_the_lock_ends() {
    let app = app_with(&[("CAIRN_LOCKOUT_THRESHOLD", "3"), ("CAIRN_LOCKOUT_BASE_SECS", "60")]).await;
    app.register_ok("locked@example.com").await;
    let attempt = |password: &'static str| {
        app.post("/api/v1/auth/login", None, json!({ "email": "locked@example.com", "password": password }))
    };
    assert_eq!(attempt("wrong password one").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(attempt("wrong password two").await.status, StatusCode::UNAUTHORIZED);
    let locked = attempt("wrong password three").await;
    assert_eq!((locked.status, locked.code()), (StatusCode::LOCKED, "ACCOUNT_LOCKED"));
    assert!(locked.body["error"]["details"]["retry_after_s"].as_u64().is_some_and(|s| (58..=60).contains(&s)));
    assert!(locked.headers.contains_key("retry-after"));
    // Even the right password waits for the lock, to its last second.
    assert_eq!(attempt(PASSWORD).await.status, StatusCode::LOCKED);
    app.clock.advance(Duration::from_secs(58));
    assert_eq!(attempt(PASSWORD).await.status, StatusCode::LOCKED);
    app.clock.advance(Duration::from_secs(3));
    assert_eq!(attempt(PASSWORD).await.status, StatusCode::OK, "a lock is never permanent");
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'User' AND event_type IN ('AccountLocked', 'AccountUnlocked', 'LoginSucceeded') ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(kinds, ["AccountLocked", "AccountUnlocked", "LoginSucceeded"]);
    app.stop().await;
}

/// Sends `n` sign-ins for `email` with `password` at once; their statuses.
async fn sign_in_burst(app: &TestApp, email: &str, password: &str, n: usize) -> Vec<StatusCode> {
    let mut attempts = Vec::new();
    for _ in 0..n {
        let (client, url) = (app.client.clone(), format!("{}/api/v1/auth/login", app.address));
        let body = json!({ "email": email, "password": password });
        attempts.push(tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().status() }));
    }
    let mut statuses = Vec::new();
    for attempt in attempts {
        statuses.push(attempt.await.unwrap());
    }
    statuses
}

async fn count_events(app: &TestApp, user: uuid::Uuid, event_type: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = $2 AND (aggregate_id = $1 \
            OR (aggregate_type = 'Session' AND payload -> event_type ->> 'user_id' = $1))",
    )
    .bind(user.to_string())
    .bind(event_type)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_guesses_at_once_get_five_checked_and_the_lock_holds_for_the_right_password() {
    let app = TestApp::spawn().await;
    let id = app.register_ok("target@example.com").await;

    let statuses = sign_in_burst(&app, "target@example.com", "not the password at all", 100).await;
    assert!(
        statuses.iter().all(|s| [StatusCode::UNAUTHORIZED, StatusCode::LOCKED].contains(s)),
        "only 401 and 423 (no 409, no 5xx): {statuses:?}"
    );
    // Each guess whose password was checked is a LoginFailed on the account: the threshold's worth.
    assert_eq!(count_events(&app, id, "LoginFailed").await, 5, "guesses evaluated");
    assert_eq!(count_events(&app, id, "AccountLocked").await, 1);
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count(), 4, "{statuses:?}");

    // The right password during the lock: refused, and no session starts.
    let right =
        app.post("/api/v1/auth/login", None, json!({ "email": "target@example.com", "password": PASSWORD })).await;
    assert_eq!((right.status, right.code()), (StatusCode::LOCKED, "ACCOUNT_LOCKED"), "{:?}", right.body);
    assert_eq!(count_events(&app, id, "SessionStarted").await, 0);
    assert_eq!(count_events(&app, id, "LoginFailed").await, 5, "nothing is checked during the lock");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_address_is_locked_and_answered_exactly_like_an_account() {
    let app = TestApp::spawn().await;
    app.register_ok("known@example.com").await;
    let mut answers = Vec::new();
    for email in ["known@example.com", "nobody@example.com"] {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let reply =
                app.post("/api/v1/auth/login", None, json!({ "email": email, "password": "a wrong guess" })).await;
            statuses.push(reply.status);
        }
        let locked = app.post("/api/v1/auth/login", None, json!({ "email": email, "password": PASSWORD })).await;
        let mut error = locked.body["error"].clone();
        error["request_id"] = json!(null);
        answers.push((statuses, locked.status, error, locked.headers.get("retry-after").cloned()));
    }
    let (known, unknown) = (&answers[0], &answers[1]);
    assert_eq!(known.0, [401, 401, 401, 401, 423].map(|s| StatusCode::from_u16(s).unwrap()));
    assert_eq!(unknown.0, known.0, "the same statuses");
    assert_eq!(known.1, StatusCode::LOCKED);
    assert_eq!((unknown.1, &unknown.2), (known.1, &known.2), "the same status and body");
    assert_eq!(unknown.3, known.3, "the same Retry-After");
    assert_eq!(known.2["code"], "ACCOUNT_LOCKED");
    // Another spelling of the same address shares its lock.
    let shouted = app.post("/api/v1/auth/login", None, json!({ "email": "NOBODY@Example.com", "password": "x" })).await;
    assert_eq!(shouted.status, StatusCode::LOCKED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_guard_forgets_quiet_addresses_and_a_forgotten_lock_is_over() {
    let app = TestApp::spawn().await;
    for i in 0..5 {
        let email = format!("stranger-{i}@example.com");
        for _ in 0..5 {
            app.post("/api/v1/auth/login", None, json!({ "email": email, "password": "a wrong guess" })).await;
        }
    }
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM login_guards").fetch_one(&app.pool).await.unwrap()
    };
    assert_eq!(rows().await, 5);
    let guard = cairn_command_api::LoginGuard::new(
        app.pool.clone(),
        app.clock.clone(),
        cairn_domain::LockoutPolicy::default(),
        Duration::from_secs(60),
    );
    assert_eq!(guard.sweep().await.unwrap(), 0, "nothing is forgotten while it matters");
    app.clock.advance(cairn_command_api::auth::guard::MEMORY + Duration::from_secs(60));
    assert_eq!(guard.sweep().await.unwrap(), 5);
    assert_eq!(rows().await, 0);
    let again =
        app.post("/api/v1/auth/login", None, json!({ "email": "stranger-0@example.com", "password": "x" })).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_answer_429_with_retry_after() {
    let app = app_with(&[("CAIRN_RATE_LIMIT_AUTH", "3/min"), ("CAIRN_RATE_LIMIT_API", "5/min")]).await;
    for _ in 0..3 {
        let reply = app
            .post("/api/v1/auth/login", None, json!({ "email": "x@example.com", "password": "whatever it is" }))
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let limited =
        app.post("/api/v1/auth/login", None, json!({ "email": "x@example.com", "password": "whatever it is" })).await;
    assert_eq!((limited.status, limited.code()), (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"));
    let retry: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    // Tiers are separate: the API tier still answers.
    assert_eq!(app.get("/api/v1/users/me", None).await.status, StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_user_has_a_limit_of_their_own() {
    let app = app_with(&[("CAIRN_RATE_LIMIT_USER", "3/min")]).await;
    app.register_ok("busy@example.com").await;
    app.register_ok("calm@example.com").await;
    let busy = app.login("busy@example.com").await;
    let calm = app.login("calm@example.com").await;
    for _ in 0..3 {
        assert_eq!(authed(&app, &busy).await, StatusCode::OK);
    }
    let limited = app.get("/api/v1/roles", Some(&busy)).await;
    assert_eq!((limited.status, limited.code()), (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"));
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(authed(&app, &calm).await, StatusCode::OK, "another user from the same address is not limited");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reset_and_resend_answer_the_same_whether_or_not_the_address_exists() {
    let app = TestApp::spawn().await;
    app.register_ok("known@example.com").await;
    for path in ["/api/v1/auth/password-reset", "/api/v1/auth/verify-email/resend"] {
        let known = app.post(path, None, json!({ "email": "known@example.com" })).await;
        let unknown = app.post(path, None, json!({ "email": "nobody-here@example.com" })).await;
        assert_eq!(known.status, StatusCode::ACCEPTED, "{path}");
        assert_eq!((known.status, &known.body), (unknown.status, &unknown.body), "{path}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_to_a_role_reaches_its_holders_next_tokens() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    app.register_ok("holder@example.com").await;
    let (before, refresh_1) = native_login(&app, "holder@example.com", PASSWORD).await;
    assert_eq!(app.get("/api/v1/users", Some(&before)).await.status, StatusCode::FORBIDDEN);

    let mut perms: Vec<String> =
        cairn_domain::roles::permissions_of("user").unwrap().into_iter().map(str::to_owned).collect();
    perms.push("users:read".to_owned());
    let changed =
        app.request("PUT", "/api/v1/roles/user", Some(&admin), Some(json!({ "permissions": perms })), &[]).await;
    assert_eq!(changed.status, StatusCode::OK, "{:?}", changed.body);
    let next = refresh(&app, &refresh_1).await;
    let after = next.data()["access_token"].as_str().unwrap();
    assert_eq!(app.get("/api/v1/users", Some(after)).await.status, StatusCode::OK);

    let defined = app
        .post("/api/v1/roles", Some(&admin), json!({ "name": "moderator", "permissions": ["messages:write"] }))
        .await;
    assert_eq!(defined.status, StatusCode::CREATED, "{:?}", defined.body);
    let again = app.post("/api/v1/roles", Some(&admin), json!({ "name": "moderator", "permissions": [] })).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let bad = app.post("/api/v1/roles", Some(&admin), json!({ "name": "root", "permissions": ["everything:*"] })).await;
    assert_eq!((bad.status, bad.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));
    let admin_fixed =
        app.request("PUT", "/api/v1/roles/admin", Some(&admin), Some(json!({ "permissions": [] })), &[]).await;
    assert_eq!(admin_fixed.status, StatusCode::CONFLICT);
    let roles =
        app.request("GET", "/api/v1/roles", Some(&admin), None, &[("X-Consistency-Token", &defined.token())]).await;
    assert!(roles.data().as_array().unwrap().iter().any(|r| r["name"] == "moderator"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_that_loses_a_permission_takes_it_from_tokens_already_issued() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let id = app.register_ok("moderator@example.com").await;
    let permissions = json!({ "name": "moderator", "permissions": ["users:read", "projections:manage"] });
    let defined = app.post("/api/v1/roles", Some(&admin), permissions).await;
    assert_eq!(defined.status, StatusCode::CREATED, "{:?}", defined.body);
    let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({ "role": "moderator" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    let token = app.login("moderator@example.com").await;
    assert_eq!(app.get("/api/v1/users", Some(&token)).await.status, StatusCode::OK);
    assert_eq!(app.get("/api/v1/admin/projections", Some(&token)).await.status, StatusCode::OK);

    let shrunk = app
        .request(
            "PUT",
            "/api/v1/roles/moderator",
            Some(&admin),
            Some(json!({ "permissions": ["projections:manage"] })),
            &[],
        )
        .await;
    assert_eq!(shrunk.status, StatusCode::OK, "{:?}", shrunk.body);

    // At once, with the same token: the removed permission is gone, the rest still works.
    let refused = app.get("/api/v1/users", Some(&token)).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "FORBIDDEN"), "{:?}", refused.body);
    assert_eq!(app.get("/api/v1/admin/projections", Some(&token)).await.status, StatusCode::OK);
    let own = app.request("PATCH", "/api/v1/users/me", Some(&token), Some(json!({ "display_name": "Mod" })), &[]).await;
    assert_eq!(own.status, StatusCode::OK, "the user role's permissions are untouched: {:?}", own.body);
    assert_eq!(app.get("/api/v1/users", Some(&admin)).await.status, StatusCode::OK, "admin is fixed");
    app.stop().await;
}

/// A `sessions.purge` job run now on the application's clock.
async fn purge(app: &TestApp) {
    use cairn_platform::clock::Clock;
    use cairn_workers::jobs::JobHandler;
    let settings = app.env.settings(&[]);
    let handler = cairn_workers::jobs::kinds::SessionsPurge::new(settings.sessions_purge_after, settings.session_idle);
    let job = cairn_workers::jobs::JobContext {
        id: uuid::Uuid::now_v7(),
        kind: "sessions.purge".to_owned(),
        args: json!({}),
        attempt: 1,
        max_attempts: 25,
        enqueued_at: app.clock.now(),
        cancel: tokio_util::sync::CancellationToken::new(),
        clock: app.clock.clone(),
        pool: app.pool.clone(),
    };
    handler.run(&job).await.unwrap();
}

async fn session_rows(app: &TestApp) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("SELECT id FROM sessions ORDER BY created_at").fetch_all(&app.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ended_sessions_are_purged_from_the_read_model_a_day_later_and_live_ones_stay() {
    let app = app_with(&[]).await;
    app.register_ok("purged@example.com").await;
    let (kept_access, _) = native_login(&app, "purged@example.com", PASSWORD).await;
    let (revoked_access, _) = native_login(&app, "purged@example.com", PASSWORD).await;
    app.wait_count("SELECT count(*) FROM sessions", 2, Duration::from_secs(20)).await;
    let out = app.post("/api/v1/auth/logout", Some(&revoked_access), json!({})).await;
    assert!(out.status.is_success(), "{:?}", out.body);
    app.wait_count("SELECT count(*) FROM sessions WHERE revoked_at IS NOT NULL", 1, Duration::from_secs(20)).await;
    let revoked: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM sessions WHERE revoked_at IS NOT NULL").fetch_one(&app.pool).await.unwrap();
    assert_eq!(authed(&app, &kept_access).await, StatusCode::OK);

    // Just revoked: it stays (listed as ended for a day).
    purge(&app).await;
    assert_eq!(session_rows(&app).await.len(), 2);

    // A day and an hour later the revoked one goes; the live one, and one started since, stay.
    app.clock.advance(Duration::from_secs(24 * 3600 + 600));
    let refreshed =
        app.post("/api/v1/auth/login", None, json!({"email": "purged@example.com", "password": PASSWORD})).await;
    assert_eq!(refreshed.status, StatusCode::OK);
    app.wait_count("SELECT count(*) FROM sessions", 3, Duration::from_secs(20)).await;
    app.clock.advance(Duration::from_secs(3000));
    purge(&app).await;
    let rows = session_rows(&app).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(!rows.contains(&revoked));

    // A later event for the purged session (logout-all revokes every session of the user, and a
    // replayed revocation names the purged one): applied without failing, and the row stays gone.
    let sequence: i64 = sqlx::query_scalar(
        "SELECT max(sequence) + 1 FROM events WHERE aggregate_type = 'Session' AND aggregate_id = $1",
    )
    .bind(revoked.to_string())
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let user: uuid::Uuid =
        sqlx::query_scalar("SELECT user_id FROM sessions LIMIT 1").fetch_one(&app.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Session', $1, $2, 'SessionRevoked', '1', $3, '{}')",
    )
    .bind(revoked.to_string())
    .bind(sequence)
    .bind(json!({"SessionRevoked": {"user_id": user, "reason": "logout"}}))
    .execute(&app.pool)
    .await
    .unwrap();
    // A login after it is projected too: the projector went past the event.
    let after =
        app.post("/api/v1/auth/login", None, json!({"email": "purged@example.com", "password": PASSWORD})).await;
    assert_eq!(after.status, StatusCode::OK);
    app.wait_count("SELECT count(*) FROM sessions", 3, Duration::from_secs(20)).await;
    assert!(!session_rows(&app).await.contains(&revoked));
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(parked, 0);

    // Eight days on, every one of them has expired (seven-day lifetime) more than a day ago.
    app.clock.advance(Duration::from_secs(9 * 24 * 3600));
    purge(&app).await;
    assert!(session_rows(&app).await.is_empty());
    app.stop().await;
}
