//! Every route the router serves called anonymously and as each seeded role, each answer
//! checked against the exact status its policy gives; and every kind of bad token.

#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use cairn::app::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::json;

/// Who may call a route.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// Anyone.
    Public,
    /// Needs a refresh token (none is sent here, so everyone gets 401).
    RefreshToken,
    /// Any signed-in caller.
    SignedIn,
    /// Callers whose roles grant this permission.
    Permission(&'static str),
}

/// The declared policy of every route, and the status an allowed caller gets with the request
/// [`call_for`] makes. A route the router serves without an entry here fails the test: every new
/// endpoint must say who may call it.
fn policy(method: &str, path: &str) -> Option<(Policy, StatusCode)> {
    use Policy::*;
    use StatusCode as S;
    Some(match (method, path) {
        ("POST", "/api/v1/auth/register") => (Public, S::CREATED),
        ("POST", "/api/v1/auth/login") => (Public, S::OK),
        // A token that was never issued.
        ("POST", "/api/v1/auth/verify-email" | "/api/v1/auth/password-reset/confirm") => (Public, S::BAD_REQUEST),
        ("POST", "/api/v1/auth/verify-email/resend" | "/api/v1/auth/password-reset") => (Public, S::ACCEPTED),
        // No provider is configured.
        ("POST", "/api/v1/auth/oauth/{provider}/start" | "/api/v1/auth/oauth/{provider}/callback") => {
            (Public, S::NOT_FOUND)
        }
        ("GET", "/.well-known/jwks.json" | "/health" | "/ready" | "/metrics" | "/api/v1/openapi.json") => {
            (Public, S::OK)
        }
        ("GET", "/docs/" | "/docs/{*rest}") => (Public, S::OK),
        ("GET", "/docs") => (Public, S::SEE_OTHER),
        // The socket authenticates with its first frame; a plain GET is not an upgrade.
        ("GET", "/api/v1/ws") => (Public, S::BAD_REQUEST),
        ("POST", "/api/v1/auth/refresh") => (RefreshToken, S::UNAUTHORIZED),
        ("POST", "/api/v1/auth/logout" | "/api/v1/auth/logout-all") => (SignedIn, S::OK),
        // A weak new password: nobody's password changes.
        ("POST", "/api/v1/auth/password") => (SignedIn, S::BAD_REQUEST),
        ("GET", "/api/v1/users/me" | "/api/v1/users/me/sessions" | "/api/v1/roles") => (SignedIn, S::OK),
        // A session that does not exist.
        ("DELETE", "/api/v1/users/me/sessions/{id}") => (SignedIn, S::NOT_FOUND),
        ("PATCH", "/api/v1/users/me") => (Permission("profile:write"), S::OK),
        ("GET", "/api/v1/users" | "/api/v1/users/{id}") => (Permission("users:read"), S::OK),
        ("POST", "/api/v1/users/{id}/roles") | ("DELETE", "/api/v1/users/{id}/roles/{role}") => {
            (Permission("roles:manage"), S::OK)
        }
        ("POST", "/api/v1/roles") => (Permission("roles:manage"), S::CREATED),
        ("PUT", "/api/v1/roles/{name}") => (Permission("roles:manage"), S::OK),
        ("POST", "/api/v1/users/{id}/deactivate" | "/api/v1/users/{id}/reactivate")
        | ("DELETE", "/api/v1/users/{id}" | "/api/v1/users/{id}/sessions") => (Permission("users:write"), S::OK),
        ("GET", "/api/v1/admin/projections" | "/api/v1/admin/projections/{name}/parked") => {
            (Permission("projections:manage"), S::OK)
        }
        // A projection that does not exist (a real rebuild would make the second caller's 409).
        ("POST", "/api/v1/admin/projections/{name}/rebuild") => (Permission("projections:manage"), S::NOT_FOUND),
        // An event nobody parked.
        ("POST", "/api/v1/admin/projections/{name}/parked/{event_id}/retry")
        | ("POST", "/api/v1/admin/projections/{name}/parked/{event_id}/skip") => {
            (Permission("projections:manage"), S::NOT_FOUND)
        }
        ("POST", "/api/v1/rooms") => (Permission("rooms:write"), S::CREATED),
        // The path's id is a user's, so no such room or message: an allowed caller gets 404.
        ("PATCH" | "DELETE", "/api/v1/rooms/{id}")
        | ("POST", "/api/v1/rooms/{id}/join" | "/api/v1/rooms/{id}/leave" | "/api/v1/rooms/{id}/members")
        | ("DELETE", "/api/v1/rooms/{id}/members/{user_id}") => (Permission("rooms:write"), S::NOT_FOUND),
        ("POST", "/api/v1/rooms/{id}/messages") | ("PATCH" | "DELETE", "/api/v1/messages/{id}") => {
            (Permission("messages:write"), S::NOT_FOUND)
        }
        // A JSON body, not a multipart one: an allowed caller is told the body's type is wrong.
        ("POST", "/api/v1/files") => (Permission("files:write"), S::UNSUPPORTED_MEDIA_TYPE),
        // The path's id is a user's, so no such file: an allowed caller gets 404.
        ("POST", "/api/v1/files/{id}/shares")
        | ("DELETE", "/api/v1/files/{id}" | "/api/v1/files/{id}/shares/{user_id}") => {
            (Permission("files:write"), S::NOT_FOUND)
        }
        // Any member marks what they read (readonly members too).
        ("POST", "/api/v1/rooms/{id}/read") => (SignedIn, S::NOT_FOUND),
        // Rooms the caller may read (none here): an empty page.
        ("GET", "/api/v1/rooms") => (SignedIn, S::OK),
        // `{id}` is a user's id, no room's: 404, as for a room the caller may not see.
        ("GET", "/api/v1/rooms/{id}" | "/api/v1/rooms/{id}/members" | "/api/v1/rooms/{id}/messages") => {
            (SignedIn, S::NOT_FOUND)
        }
        // The caller's own files (none here): an empty page.
        ("GET", "/api/v1/files") => (Permission("files:read"), S::OK),
        // `{id}` is a user's id, no file's: 404, as for a file the caller may not read.
        ("GET", "/api/v1/files/{id}" | "/api/v1/files/{id}/download") => (Permission("files:read"), S::NOT_FOUND),
        ("POST", "/api/v1/jobs") => (Permission("jobs:manage"), S::ACCEPTED),
        ("GET", "/api/v1/jobs" | "/api/v1/schedules") => (Permission("jobs:manage"), S::OK),
        // A job or schedule that does not exist.
        ("GET", "/api/v1/jobs/{id}")
        | ("POST", "/api/v1/jobs/{id}/retry" | "/api/v1/jobs/{id}/cancel")
        | ("DELETE", "/api/v1/schedules/{name}") => (Permission("jobs:manage"), S::NOT_FOUND),
        // A new name each time.
        ("POST", "/api/v1/schedules") => (Permission("jobs:manage"), S::CREATED),
        // The last 30 days, zeros where nothing happened.
        ("GET", "/api/v1/analytics/summary") => (Permission("analytics:read"), S::OK),
        // Recomputes the tree of this test's log: a report (intact).
        ("GET", "/api/v1/audit/verify") => (Permission("audit:read"), S::OK),
        // The log, its export (a head is signed before the calls) and the latest head.
        ("GET", "/api/v1/audit/events" | "/api/v1/audit/events/export" | "/api/v1/audit/checkpoints/latest") => {
            (Permission("audit:read"), S::OK)
        }
        // An event that does not exist; a consistency proof without its sizes.
        ("GET", "/api/v1/audit/proof/{event_id}") => (Permission("audit:read"), S::NOT_FOUND),
        ("GET", "/api/v1/audit/consistency") => (Permission("audit:read"), S::BAD_REQUEST),
        ("GET", "/.well-known/audit-keys.json") => (Public, S::OK),
        _ => return None,
    })
}

/// A body that passes validation, so an allowed call is judged on its permission alone.
fn body_for(method: &str, path: &str) -> Option<serde_json::Value> {
    let body = match path {
        "/api/v1/auth/register" => json!({
            "email": format!("m{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": common::PASSWORD,
            "display_name": "M",
        }),
        "/api/v1/auth/login" => json!({ "email": "matrix-probe@example.com", "password": common::PASSWORD }),
        "/api/v1/auth/verify-email" => json!({ "token": "A".repeat(43) }),
        // Browsers send the cookie and no body; none is sent here.
        "/api/v1/auth/refresh" => return None,
        "/api/v1/auth/verify-email/resend" | "/api/v1/auth/password-reset" => json!({ "email": "nobody@example.com" }),
        "/api/v1/auth/password-reset/confirm" => {
            json!({ "token": "A".repeat(43), "new_password": "whatever long enough" })
        }
        "/api/v1/auth/password" => json!({ "current_password": common::PASSWORD, "new_password": "weakweak" }),
        "/api/v1/users/me" => json!({ "display_name": "Renamed" }),
        "/api/v1/users/{id}/roles" => json!({ "role": "operator" }),
        "/api/v1/roles" => {
            json!({ "name": format!("r{}", &uuid::Uuid::new_v4().simple().to_string()[..8]), "permissions": ["files:read"] })
        }
        "/api/v1/roles/{name}" => json!({ "permissions": ["files:read", "files:write"] }),
        "/api/v1/auth/oauth/{provider}/callback" => json!({ "code": "c", "state": "s" }),
        "/api/v1/rooms" => json!({ "name": "probe", "visibility": "public" }),
        "/api/v1/rooms/{id}" if method == "PATCH" => json!({ "name": "renamed" }),
        "/api/v1/rooms/{id}/members" => json!({ "user_id": uuid::Uuid::new_v4() }),
        "/api/v1/rooms/{id}/messages" => json!({ "body": "hello" }),
        "/api/v1/messages/{id}" if method == "PATCH" => json!({ "body": "edited" }),
        "/api/v1/rooms/{id}/read" => json!({ "message_id": uuid::Uuid::new_v4() }),
        "/api/v1/files/{id}/shares" => json!({ "user_id": uuid::Uuid::new_v4() }),
        "/api/v1/jobs" => json!({ "kind": "noop", "args": {} }),
        "/api/v1/schedules" => json!({
            "name": format!("probe-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            "cron": "0 0 3 * * *",
            "kind": "noop",
            "args": {},
        }),
        _ if method == "GET" || method == "DELETE" => return None,
        _ => json!({}),
    };
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_answers_each_role_exactly_as_its_policy_says() {
    // Permissions alone decide here; the verified-address rule has its own tests (rooms, email flows).
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_AUDIT_HEAD_EVERY", "1")],
    )
    .await;
    let (_, admin) = app.admin_token().await;
    // One account per seeded role; each holds that role only.
    let mut accounts: Vec<(&str, Option<String>, Vec<String>)> = vec![("anonymous", None, vec![])];
    for role in ["user", "readonly", "auditor", "operator", "admin"] {
        let email = format!("{role}-matrix@example.com");
        let id = app.register_ok(&email).await;
        if role != "user" {
            let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({ "role": role })).await;
            assert_eq!(granted.status, StatusCode::OK);
            let revoked =
                app.request("DELETE", &format!("/api/v1/users/{id}/roles/user"), Some(&admin), None, &[]).await;
            assert_eq!(revoked.status, StatusCode::OK);
        }
        let perms = cairn_domain::roles::permissions_of(role).unwrap().into_iter().map(str::to_owned).collect();
        accounts.push((role, Some(email), perms));
    }
    app.register_ok("matrix-probe@example.com").await;
    // The audit export and the latest head answer 200 once a tree head is signed.
    app.wait_count("SELECT least(count(*), 1) FROM audit_heads", 1, std::time::Duration::from_secs(30)).await;

    let routes = app.routes.clone();
    // The router's own list, not only the document's: the operational routes are in it too.
    for (method, path) in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/api/v1/openapi.json")] {
        assert!(routes.contains(&(method.to_owned(), path.to_owned())), "{method} {path} is not listed");
    }
    assert!(routes.len() >= 33, "the router lists only {} routes", routes.len());
    let undeclared: Vec<_> = routes.iter().filter(|(m, p)| policy(m, p).is_none()).collect();
    assert!(undeclared.is_empty(), "routes without a declared policy: {undeclared:?}");

    for (method, path) in &routes {
        let (policy, allowed) = policy(method, path).unwrap();
        for (role, email, perms) in &accounts {
            // Each call gets a user of its own in the state the allowed answer needs: a call that
            // succeeds changes that user (a role granted, an account deactivated).
            let target = app.register_ok(&format!("t{}@example.com", uuid::Uuid::new_v4().simple())).await.to_string();
            if path.ends_with("/reactivate") {
                let r = app.post(&format!("/api/v1/users/{target}/deactivate"), Some(&admin), json!({})).await;
                assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            }
            if path.ends_with("/roles/{role}") {
                let r = app
                    .post(&format!("/api/v1/users/{target}/roles"), Some(&admin), json!({ "role": "operator" }))
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
            }
            let name = if path.ends_with("/rebuild") {
                "no-such-projection"
            } else if path.starts_with("/api/v1/admin/projections") {
                "users"
            } else {
                "readonly"
            };
            let url = path
                .replace("/users/me/sessions/{id}", &format!("/users/me/sessions/{}", uuid::Uuid::new_v4()))
                .replace("{user_id}", &target)
                .replace("{id}", &target)
                .replace("{event_id}", &uuid::Uuid::new_v4().to_string())
                .replace("{role}", "operator")
                .replace("{name}", name)
                .replace("{provider}", "none-configured")
                .replace("{*rest}", "swagger-ui.css");
            // A fresh sign-in per call: some calls (logout, logout-all) end the caller's session.
            let token = match email {
                Some(email) => Some(app.login(email).await),
                None => None,
            };
            let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
            let mut req = client.request(method.parse().unwrap(), format!("{}{url}", app.address));
            if let Some(token) = &token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body_for(method, path) {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            let expected = match (policy, token.is_some()) {
                (Policy::Public | Policy::RefreshToken, _) | (Policy::SignedIn, true) => allowed,
                (_, false) => StatusCode::UNAUTHORIZED,
                (Policy::Permission(p), true) if perms.iter().any(|held| held == p) => allowed,
                (Policy::Permission(_), true) => StatusCode::FORBIDDEN,
            };
            assert_eq!(status, expected, "{method} {path} as {role}: {text}");
            if status.is_client_error() {
                let body: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(body["success"], false, "{method} {path} as {role}");
            }
        }
    }
    app.stop().await;
}

fn sign(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    key: &jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
) -> String {
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = header["kid"].as_str().map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_are_refused_with_401() {
    let app = TestApp::spawn().await;
    app.register_ok("tokens@example.com").await;
    let good = app.login("tokens@example.com").await;
    assert_eq!(app.get("/api/v1/roles", Some(&good)).await.status, StatusCode::OK);

    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value =
        serde_json::from_slice(&engine.decode(good.split('.').next().unwrap()).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&engine.decode(good.split('.').nth(1).unwrap()).unwrap()).unwrap();
    // The token key: the directory's one file (the audit keys are in a subdirectory).
    let key_file = std::fs::read_dir(app.env.keys.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.is_file())
        .unwrap();
    let pem_text = std::fs::read_to_string(&key_file).unwrap();
    let real_key = jsonwebtoken::EncodingKey::from_ed_pem(pem_text.as_bytes()).unwrap();
    let jwks = app.get("/.well-known/jwks.json", None).await;
    let public = engine.decode(jwks.body["keys"][0]["x"].as_str().unwrap()).unwrap();

    let mut expired = claims.clone();
    expired["exp"] = json!(chrono::Utc::now().timestamp() - 3600);
    let mut other_audience = claims.clone();
    other_audience["aud"] = json!("someone-else");
    let stranger = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let stranger_key = jsonwebtoken::EncodingKey::from_ed_der(stranger.as_ref());
    let none = format!("{}.{}.", engine.encode(br#"{"alg":"none","typ":"JWT"}"#), good.split('.').nth(1).unwrap());

    let cases = vec![
        ("expired", sign(&header, &expired, &real_key, jsonwebtoken::Algorithm::EdDSA)),
        ("another audience", sign(&header, &other_audience, &real_key, jsonwebtoken::Algorithm::EdDSA)),
        ("signed with another key", sign(&header, &claims, &stranger_key, jsonwebtoken::Algorithm::EdDSA)),
        ("alg none", none),
        (
            "HS256 keyed with the public key",
            sign(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(&public), jsonwebtoken::Algorithm::HS256),
        ),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (what, token) in cases {
        let reply = app.get("/api/v1/users/me", Some(&token)).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"), "{what}");
    }
    let missing = app.get("/api/v1/users/me", None).await;
    assert_eq!((missing.status, missing.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"));
    let wrong_scheme =
        app.request("GET", "/api/v1/users/me", None, None, &[("Authorization", &format!("Basic {good}"))]).await;
    assert_eq!(wrong_scheme.status, StatusCode::UNAUTHORIZED);
    // The genuine token still works: the refusals above were about the tokens, not the user.
    assert_eq!(app.get("/api/v1/roles", Some(&good)).await.status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_a_role_ends_the_sessions_that_carried_it() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let id = app.register_ok("demoted@example.com").await;
    let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({ "role": "admin" })).await;
    assert_eq!(granted.status, StatusCode::OK);
    let elevated = app.login("demoted@example.com").await;
    assert_eq!(app.get("/api/v1/users", Some(&elevated)).await.status, StatusCode::OK);
    let revoked = app.request("DELETE", &format!("/api/v1/users/{id}/roles/admin"), Some(&admin), None, &[]).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(app.get("/api/v1/users", Some(&elevated)).await.status, StatusCode::UNAUTHORIZED);
    let fresh = app.login("demoted@example.com").await;
    assert_eq!(app.get("/api/v1/users", Some(&fresh)).await.status, StatusCode::FORBIDDEN);
    app.stop().await;
}
