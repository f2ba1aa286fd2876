//! Every endpoint called anonymously, as a plain user and as an admin; and every kind of bad token.

#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine;
use common::TestApp;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_endpoint_answers_anonymous_user_and_admin_as_the_api_says() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let user_id = app.register_ok("plain@example.com").await;
    let user = app.login("plain@example.com").await;
    let registered = app.register("target@example.com").await;
    let target: uuid::Uuid = registered.data()["user_id"].as_str().unwrap().parse().unwrap();
    let id = target.to_string();
    // Reads below must see both users: wait for the projections once.
    let seen = app
        .request("GET", "/api/v1/users/me", Some(&user), None, &[("X-Consistency-Token", &registered.token())])
        .await;
    assert_eq!(seen.body["meta"]["consistent"], true);

    // (method, path, body, anonymous, user, admin)
    let unauth = StatusCode::UNAUTHORIZED;
    let forbidden = StatusCode::FORBIDDEN;
    let ok = StatusCode::OK;
    type Case = (&'static str, String, Option<serde_json::Value>, StatusCode, StatusCode, StatusCode);
    let cases: Vec<Case> = vec![
        ("GET", "/api/v1/users/me".into(), None, unauth, ok, ok),
        ("PATCH", "/api/v1/users/me".into(), Some(json!({ "display_name": "New" })), unauth, ok, ok),
        ("GET", "/api/v1/users".into(), None, unauth, forbidden, ok),
        ("GET", format!("/api/v1/users/{id}"), None, unauth, forbidden, ok),
        ("GET", format!("/api/v1/users/{user_id}"), None, unauth, ok, ok), // self is always allowed
        ("GET", "/api/v1/roles".into(), None, unauth, ok, ok),
        ("POST", format!("/api/v1/users/{id}/roles"), Some(json!({ "role": "operator" })), unauth, forbidden, ok),
        ("DELETE", format!("/api/v1/users/{id}/roles/operator"), None, unauth, forbidden, ok),
        ("POST", format!("/api/v1/users/{id}/deactivate"), Some(json!({})), unauth, forbidden, ok),
        ("POST", format!("/api/v1/users/{id}/reactivate"), Some(json!({})), unauth, forbidden, ok),
        ("DELETE", format!("/api/v1/users/{id}"), None, unauth, forbidden, ok),
        ("GET", "/.well-known/jwks.json".into(), None, ok, ok, ok),
        ("GET", "/health".into(), None, ok, ok, ok),
    ];
    for (method, path, body, anonymous, as_user, as_admin) in cases {
        for (who, token, expected) in [
            ("anonymous", None, anonymous),
            ("user", Some(user.as_str()), as_user),
            ("admin", Some(admin.as_str()), as_admin),
        ] {
            // Commands the admin runs change state, so the user's and anonymous calls go first and
            // each admin call is the one that succeeds.
            let reply = app.request(method, &path, token, body.clone(), &[]).await;
            assert_eq!(reply.status, expected, "{method} {path} as {who}: {:?}", reply.body);
            if !expected.is_success() {
                assert_eq!(reply.body["success"], false);
                assert!(reply.body["error"]["request_id"].is_string());
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
    let user_id = app.register_ok("tokens@example.com").await;
    let good = app.login("tokens@example.com").await;
    assert_eq!(app.get("/api/v1/users/me", Some(&good)).await.status, StatusCode::OK);

    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: serde_json::Value =
        serde_json::from_slice(&engine.decode(good.split('.').next().unwrap()).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&engine.decode(good.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let key_file = std::fs::read_dir(app.env.keys.path()).unwrap().next().unwrap().unwrap().path();
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
    assert_eq!(app.get(&format!("/api/v1/users/{user_id}"), Some(&good)).await.status, StatusCode::OK);
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
