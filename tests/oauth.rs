//! OAuth / OpenID Connect sign-in end to end against a small provider the test runs: authorization
//! code with PKCE, `state` and `nonce` each checked and usable once, accounts linked by verified email.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use cairn::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use ring::signature::KeyPair;
use serde_json::{json, Value};

const CLIENT_ID: &str = "cairn-test-client";
const CLIENT_SECRET: &str = "test-client-secret";

/// What the provider says about the next user who signs in.
#[derive(Clone)]
struct NextUser {
    email: String,
    verified: bool,
    /// Sign a wrong nonce (a replayed or injected ID token).
    wrong_nonce: bool,
}

struct Grant {
    challenge: String,
    nonce: String,
    redirect_uri: String,
    user: NextUser,
}

#[derive(Clone)]
struct Provider {
    issuer: String,
    key_der: Arc<Vec<u8>>,
    public: Arc<Vec<u8>>,
    next: Arc<Mutex<NextUser>>,
    grants: Arc<Mutex<HashMap<String, Grant>>>,
}

async fn authorize(State(p): State<Provider>, Query(q): Query<HashMap<String, String>>) -> impl IntoResponse {
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["response_type"], "code");
    let code = uuid::Uuid::new_v4().simple().to_string();
    let grant = Grant {
        challenge: q["code_challenge"].clone(),
        nonce: q["nonce"].clone(),
        redirect_uri: q["redirect_uri"].clone(),
        user: p.next.lock().unwrap().clone(),
    };
    p.grants.lock().unwrap().insert(code.clone(), grant);
    Redirect::to(&format!("{}?code={code}&state={}", q["redirect_uri"], q["state"]))
}

async fn token(State(p): State<Provider>, Form(form): Form<HashMap<String, String>>) -> impl IntoResponse {
    let Some(grant) = p.grants.lock().unwrap().remove(&form["code"]) else {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "invalid_grant" })));
    };
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let challenge = engine.encode(ring::digest::digest(&ring::digest::SHA256, form["code_verifier"].as_bytes()));
    if challenge != grant.challenge
        || form["client_secret"] != CLIENT_SECRET
        || form["redirect_uri"] != grant.redirect_uri
    {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "invalid_grant" })));
    }
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "iss": p.issuer, "aud": CLIENT_ID, "sub": grant.user.email, "iat": now, "exp": now + 300,
        "email": grant.user.email, "email_verified": grant.user.verified, "name": "Oauth Person",
        "nonce": if grant.user.wrong_nonce { "not-the-nonce".to_owned() } else { grant.nonce },
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("provider-key".to_owned());
    let id_token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ed_der(&p.key_der)).unwrap();
    (StatusCode::OK, Json(json!({ "access_token": "opaque", "token_type": "Bearer", "id_token": id_token })))
}

async fn jwks(State(p): State<Provider>) -> Json<Value> {
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(p.public.as_slice());
    Json(json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "provider-key", "x": x }] }))
}

async fn start_provider() -> (Provider, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let provider = Provider {
        issuer: base.clone(),
        key_der: Arc::new(pkcs8.as_ref().to_vec()),
        public: Arc::new(pair.public_key().as_ref().to_vec()),
        next: Arc::new(Mutex::new(NextUser { email: String::new(), verified: true, wrong_nonce: false })),
        grants: Arc::default(),
    };
    let app = Router::new()
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .route("/jwks", get(jwks))
        .with_state(provider.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (provider, base)
}

async fn spawn_with_provider() -> (TestApp, Provider) {
    let (provider, base) = start_provider().await;
    let vars = [
        ("CAIRN_OAUTH_PROVIDERS", "local".to_owned()),
        ("CAIRN_OAUTH_LOCAL_CLIENT_ID", CLIENT_ID.to_owned()),
        ("CAIRN_OAUTH_LOCAL_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
        ("CAIRN_OAUTH_LOCAL_AUTHORIZE_URL", format!("{base}/authorize")),
        ("CAIRN_OAUTH_LOCAL_TOKEN_URL", format!("{base}/token")),
        ("CAIRN_OAUTH_LOCAL_JWKS_URL", format!("{base}/jwks")),
        ("CAIRN_OAUTH_LOCAL_ISSUER", base.clone()),
        ("CAIRN_OAUTH_REDIRECT_URI", "http://localhost:5173/oauth/callback".to_owned()),
    ];
    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    (TestApp::spawn_with(TestEnv::new(), Services::all(), &extra).await, provider)
}

/// A sign-in as the client sees it once the provider sent the user back.
struct Flow {
    code: String,
    state: String,
    /// `name=value` of the cookie `start` set (browser sign-ins).
    cookie: Option<String>,
}

/// The `cairn_oauth` cookie a reply sets, whole (`name=value; attributes`).
fn set_oauth_cookie(reply: &common::Reply) -> Option<String> {
    reply
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("cairn_oauth="))
        .map(str::to_owned)
}

/// The browser's part: follow the authorize URL and read `code` and `state` off the redirect.
async fn follow(url: &str) -> (String, String) {
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let redirect = browser.get(url).send().await.unwrap();
    let location = reqwest::Url::parse(redirect.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with("http://localhost:5173/oauth/callback"));
    let pairs: HashMap<String, String> = location.query_pairs().into_owned().collect();
    (pairs["code"].clone(), pairs["state"].clone())
}

/// Starts a sign-in with `body` on `path` and follows it as `user`.
async fn authorize_at(app: &TestApp, path: &str, provider: Option<(&Provider, NextUser)>, body: Value) -> Flow {
    if let Some((provider, user)) = provider {
        *provider.next.lock().unwrap() = user;
    }
    let started = app.post(path, None, body).await;
    assert_eq!(started.status, StatusCode::OK, "{:?}", started.body);
    let cookie = set_oauth_cookie(&started).map(|c| c.split(';').next().unwrap().to_owned());
    let (code, state) = follow(started.data()["authorize_url"].as_str().unwrap()).await;
    assert_eq!(state, started.data()["state"]);
    Flow { code, state, cookie }
}

/// A browser's sign-in as `user`: the start sets the cookie.
async fn authorize_as(app: &TestApp, provider: &Provider, user: NextUser) -> Flow {
    let flow = authorize_at(app, "/api/v1/auth/oauth/local/start", Some((provider, user)), json!({})).await;
    assert!(flow.cookie.is_some(), "a browser's start sets the sign-in cookie");
    flow
}

/// Posts `flow`'s code and state (plus `extra` fields) to the callback, with `cookie` if any.
async fn callback_with(
    app: &TestApp,
    provider: &str,
    flow: &Flow,
    cookie: Option<&str>,
    extra: Value,
) -> common::Reply {
    let mut body = json!({ "code": flow.code, "state": flow.state });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let headers: Vec<(&str, &str)> = cookie.map(|c| vec![("cookie", c)]).unwrap_or_default();
    app.request("POST", &format!("/api/v1/auth/oauth/{provider}/callback"), None, Some(body), &headers).await
}

/// The callback from the browser that started `flow`.
async fn callback(app: &TestApp, flow: &Flow) -> common::Reply {
    callback_with(app, "local", flow, flow.cookie.as_deref(), json!({})).await
}

fn user(email: &str) -> NextUser {
    NextUser { email: email.to_owned(), verified: true, wrong_nonce: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_address_opens_a_verified_account_and_a_known_one_is_linked() {
    let (app, provider) = spawn_with_provider().await;

    let flow = authorize_as(&app, &provider, user("newcomer@example.com")).await;
    let signed_in = callback(&app, &flow).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(signed_in.data()["user"]["email"], "newcomer@example.com");
    assert_eq!(signed_in.data()["user"]["email_verified"], true);
    let access = signed_in.data()["access_token"].as_str().unwrap();
    assert_eq!(app.get("/api/v1/roles", Some(access)).await.status, StatusCode::OK);
    let removed: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'PasswordRemoved'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(removed, 0, "an account the sign-in opened has no password to remove");

    // The state was spent: replaying the callback fails.
    let replay = callback(&app, &flow).await;
    assert_eq!((replay.status, replay.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));

    // A known address is linked to its account, by its verified email.
    let existing = app.register_ok("linked@example.com").await;
    let flow = authorize_as(&app, &provider, user("Linked@Example.com")).await;
    let linked = callback(&app, &flow).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.data()["user"]["id"], existing.to_string());
    assert_eq!(linked.data()["user"]["email_verified"], true, "the provider vouched for the address");
    app.stop().await;
}

/// Marks `id`'s address verified through the API, with an emailed token planted as the mail
/// worker would have stored it.
async fn verify_email(app: &TestApp, id: uuid::Uuid) {
    let token = format!("planted-{}", uuid::Uuid::new_v4().simple());
    sqlx::query(
        "INSERT INTO email_tokens (token_hash, user_id, purpose, event_id, expires_at) \
         VALUES ($1, $2, 'verify_email', $3, now() + interval '1 hour')",
    )
    .bind(cairn_platform::secrets::hash_token(&token))
    .bind(id)
    .bind(uuid::Uuid::new_v4())
    .execute(&app.pool)
    .await
    .unwrap();
    let verified = app.post("/api/v1/auth/verify-email", None, json!({ "token": token })).await;
    assert_eq!(verified.status, StatusCode::OK, "{:?}", verified.body);
}

/// Signs in with the password, the refresh token in the body: (access, refresh).
async fn password_session(app: &TestApp, email: &str) -> (String, String) {
    let body = json!({ "email": email, "password": common::PASSWORD, "refresh_token_in_body": true });
    let reply = app.post("/api/v1/auth/login", None, body).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    (
        reply.data()["access_token"].as_str().unwrap().to_owned(),
        reply.data()["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn refresh(app: &TestApp, refresh_token: &str) -> common::Reply {
    app.post("/api/v1/auth/refresh", None, json!({ "refresh_token": refresh_token })).await
}

async fn events_of(app: &TestApp, id: uuid::Uuid) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'User' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linking_an_address_nobody_verified_removes_the_password_and_ends_every_session() {
    // Given a squatter who registered the victim's address with their own password, never
    // verified it, and holds a session.
    let (app, provider) = spawn_with_provider().await;
    let id = app.register_ok("victim@example.com").await;
    let (squatter_access, squatter_refresh) = password_session(&app, "victim@example.com").await;
    assert_eq!(app.get("/api/v1/roles", Some(&squatter_access)).await.status, StatusCode::OK);

    // When the victim signs in through a provider vouching for the address.
    let flow = authorize_as(&app, &provider, user("victim@example.com")).await;
    let victim = callback(&app, &flow).await;
    assert_eq!(victim.status, StatusCode::OK, "{:?}", victim.body);
    assert_eq!(victim.data()["user"]["id"], id.to_string());
    assert_eq!(victim.data()["user"]["email_verified"], true);

    // Then the squatter's access token is refused at once, their refresh token too, and their
    // password is refused exactly as a wrong one is.
    let me = app.get("/api/v1/roles", Some(&squatter_access)).await;
    assert_eq!((me.status, me.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"), "{:?}", me.body);
    let refreshed = refresh(&app, &squatter_refresh).await;
    assert_eq!(refreshed.status, StatusCode::UNAUTHORIZED, "{:?}", refreshed.body);
    let with_password = app
        .post("/api/v1/auth/login", None, json!({ "email": "victim@example.com", "password": common::PASSWORD }))
        .await;
    let wrong = app
        .post(
            "/api/v1/auth/login",
            None,
            json!({ "email": "victim@example.com", "password": "not the password at all" }),
        )
        .await;
    assert_eq!(with_password.status, StatusCode::UNAUTHORIZED, "{:?}", with_password.body);
    assert_eq!(
        (with_password.status, &with_password.body["error"]["message"]),
        (wrong.status, &wrong.body["error"]["message"])
    );
    assert_eq!(with_password.code(), wrong.code());

    // The victim's own session works, and the log says what happened, in order.
    let access = victim.data()["access_token"].as_str().unwrap();
    assert_eq!(app.get("/api/v1/roles", Some(access)).await.status, StatusCode::OK);
    let events = events_of(&app, id).await;
    let removed = events.iter().position(|e| e == "PasswordRemoved").expect("PasswordRemoved in the log");
    assert_eq!(events[removed + 1], "EmailVerified", "{events:?}");
    let provider_name: String = sqlx::query_scalar(
        "SELECT payload -> 'PasswordRemoved' ->> 'provider' FROM events WHERE event_type = 'PasswordRemoved'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(provider_name, "local");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linking_a_verified_address_keeps_the_password_and_the_sessions() {
    // Given an account whose owner verified the address, signed in with the password.
    let (app, provider) = spawn_with_provider().await;
    let id = app.register_ok("owner@example.com").await;
    verify_email(&app, id).await;
    let (access, refresh_token) = password_session(&app, "owner@example.com").await;

    // When the owner also signs in through a provider.
    let flow = authorize_as(&app, &provider, user("owner@example.com")).await;
    let linked = callback(&app, &flow).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.data()["user"]["id"], id.to_string());

    // Then the password session goes on and the password still signs in.
    assert_eq!(app.get("/api/v1/roles", Some(&access)).await.status, StatusCode::OK);
    let refreshed = refresh(&app, &refresh_token).await;
    assert_eq!(refreshed.status, StatusCode::OK, "{:?}", refreshed.body);
    app.login("owner@example.com").await;
    assert!(!events_of(&app, id).await.iter().any(|e| e == "PasswordRemoved"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_sign_in_works_only_in_the_browser_that_started_it() {
    let (app, provider) = spawn_with_provider().await;

    // The start sets a short-lived, HttpOnly, Lax cookie on the auth path.
    *provider.next.lock().unwrap() = user("attacker@example.com");
    let started = app.post("/api/v1/auth/oauth/local/start", None, json!({})).await;
    assert_eq!(started.data()["mode"], "browser");
    let set = set_oauth_cookie(&started).expect("the start sets the sign-in cookie");
    for part in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/api/v1/auth", "Max-Age=600"] {
        assert!(set.contains(part), "{part} missing from {set}");
    }
    let value = set.split(';').next().unwrap().trim_start_matches("cairn_oauth=");
    assert!(!value.contains(started.data()["state"].as_str().unwrap()), "the cookie holds a hash, not the state");
    let (code, state) = follow(started.data()["authorize_url"].as_str().unwrap()).await;
    let attacker = Flow { code, state, cookie: Some(format!("cairn_oauth={value}")) };

    // The attacker's {code, state} in a victim's browser without the cookie is refused…
    let no_cookie = callback_with(&app, "local", &attacker, None, json!({})).await;
    assert_eq!(
        (no_cookie.status, no_cookie.code()),
        (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        "{:?}",
        no_cookie.body
    );
    assert!(no_cookie.body["error"]["message"].as_str().unwrap().contains("another browser"));
    // … and in a victim's browser holding its own sign-in's cookie.
    let victims = authorize_as(&app, &provider, user("victim@example.com")).await;
    let other_cookie = callback_with(&app, "local", &attacker, victims.cookie.as_deref(), json!({})).await;
    assert_eq!(other_cookie.status, StatusCode::UNAUTHORIZED, "{:?}", other_cookie.body);
    assert!(set_oauth_cookie(&other_cookie).is_some_and(|c| c.contains("Max-Age=0")), "the callback clears the cookie");
    // … and with a made-up verifier instead of the cookie.
    let verifier = callback_with(&app, "local", &attacker, None, json!({ "code_verifier": "v".repeat(43) })).await;
    assert_eq!(verifier.status, StatusCode::UNAUTHORIZED, "{:?}", verifier.body);
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0, "no refused callback signed anyone in");

    // The browsers that started them sign in, each as its own user, and the cookie is cleared.
    let own = callback(&app, &attacker).await;
    assert_eq!(own.status, StatusCode::OK, "refused attempts do not spend the state: {:?}", own.body);
    assert_eq!(own.data()["user"]["email"], "attacker@example.com");
    assert!(set_oauth_cookie(&own).is_some_and(|c| c.contains("Max-Age=0")), "the callback clears the cookie");
    let victim = callback(&app, &victims).await;
    assert_eq!(victim.status, StatusCode::OK, "{:?}", victim.body);
    assert_eq!(victim.data()["user"]["email"], "victim@example.com");
    app.stop().await;
}

fn pkce() -> (String, String) {
    let verifier = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
    (verifier, challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_native_sign_in_needs_the_verifier_of_its_own_challenge() {
    let (app, provider) = spawn_with_provider().await;
    let start = "/api/v1/auth/oauth/local/start";

    // A native start forwards the client's challenge and sets no cookie.
    let (verifier, challenge) = pkce();
    *provider.next.lock().unwrap() = user("native@example.com");
    let body = json!({ "code_challenge": challenge, "code_challenge_method": "S256" });
    let started = app.post(start, None, body.clone()).await;
    assert_eq!(started.status, StatusCode::OK, "{:?}", started.body);
    assert_eq!(started.data()["mode"], "native");
    assert!(set_oauth_cookie(&started).is_none());
    let url = reqwest::Url::parse(started.data()["authorize_url"].as_str().unwrap()).unwrap();
    let sent: HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(sent["code_challenge"], challenge);
    let (code, state) = follow(url.as_str()).await;
    let flow = Flow { code, state, cookie: None };

    // Without the verifier, or with another one (an attacker's {code, state} in a victim's
    // app), it is refused and the state is not spent.
    let missing = callback_with(&app, "local", &flow, None, json!({})).await;
    assert_eq!((missing.status, missing.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{:?}", missing.body);
    assert!(missing.body["error"]["details"]["code_verifier"].is_string(), "{:?}", missing.body);
    let (other, _) = pkce();
    let wrong = callback_with(&app, "local", &flow, None, json!({ "code_verifier": other })).await;
    assert_eq!((wrong.status, wrong.code()), (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"), "{:?}", wrong.body);
    let browser = authorize_as(&app, &provider, user("someone@example.com")).await;
    let in_a_browser = callback_with(&app, "local", &flow, browser.cookie.as_deref(), json!({})).await;
    assert_eq!(in_a_browser.status, StatusCode::BAD_REQUEST, "{:?}", in_a_browser.body);

    // With its own verifier the app signs in.
    let extra = json!({ "code_verifier": verifier, "refresh_token_in_body": true });
    let signed_in = callback_with(&app, "local", &flow, None, extra).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(signed_in.data()["user"]["email"], "native@example.com");
    assert!(signed_in.data()["refresh_token"].is_string());

    // Malformed starts and verifiers are refused with the field named.
    for (body, field) in [
        (json!({ "code_challenge": challenge, "code_challenge_method": "plain" }), "code_challenge_method"),
        (json!({ "code_challenge": challenge }), "code_challenge_method"),
        (json!({ "code_challenge_method": "S256" }), "code_challenge"),
        (json!({ "code_challenge": "short", "code_challenge_method": "S256" }), "code_challenge"),
    ] {
        let refused = app.post(start, None, body.clone()).await;
        assert_eq!((refused.status, refused.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{body}");
        assert!(refused.body["error"]["details"][field].is_string(), "{body}: {:?}", refused.body);
    }
    let short = callback_with(&app, "local", &flow, None, json!({ "code_verifier": "short" })).await;
    assert!(short.body["error"]["details"]["code_verifier"].is_string(), "{:?}", short.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_nonce_unverified_email_and_unknown_state_are_refused() {
    let (app, provider) = spawn_with_provider().await;

    let flow = authorize_as(&app, &provider, NextUser { wrong_nonce: true, ..user("nonce@example.com") }).await;
    let injected = callback(&app, &flow).await;
    assert_eq!(injected.status, StatusCode::UNAUTHORIZED, "{:?}", injected.body);

    let flow = authorize_as(&app, &provider, NextUser { verified: false, ..user("unverified@example.com") }).await;
    let unverified = callback(&app, &flow).await;
    assert_eq!(unverified.status, StatusCode::FORBIDDEN, "{:?}", unverified.body);

    let flow = authorize_as(&app, &provider, user("forged@example.com")).await;
    let forged = Flow { state: "made-up".to_owned(), ..flow };
    let forged = callback(&app, &forged).await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);

    let unknown = app.post("/api/v1/auth/oauth/nowhere/start", None, json!({})).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let accounts: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(accounts, 0, "no refused sign-in opened an account");
    app.stop().await;
}

/// A GitHub-like provider: no ID token; the API lists the user's addresses and which are verified.
async fn start_github(emails: Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let codes: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let authorize_codes = Arc::clone(&codes);
    let token_codes = Arc::clone(&codes);
    let app = Router::new()
        .route(
            "/authorize",
            get(move |Query(q): Query<HashMap<String, String>>| {
                let codes = Arc::clone(&authorize_codes);
                async move {
                    assert!(!q.contains_key("nonce"), "GitHub is not OpenID Connect");
                    codes.lock().unwrap().insert("gh-code".to_owned(), q["code_challenge"].clone());
                    Redirect::to(&format!("{}?code=gh-code&state={}", q["redirect_uri"], q["state"]))
                }
            }),
        )
        .route(
            "/token",
            post(move |Form(form): Form<HashMap<String, String>>| {
                let codes = Arc::clone(&token_codes);
                async move {
                    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(ring::digest::digest(&ring::digest::SHA256, form["code_verifier"].as_bytes()));
                    let expected = codes.lock().unwrap().remove(&form["code"]);
                    if expected.as_deref() != Some(challenge.as_str()) {
                        return (StatusCode::BAD_REQUEST, Json(json!({ "error": "bad_verification_code" })));
                    }
                    (StatusCode::OK, Json(json!({ "access_token": "gh-token", "token_type": "bearer" })))
                }
            }),
        )
        .route("/user", get(|| async { Json(json!({ "login": "octo", "name": "Octo Cat" })) }))
        .route("/user/emails", get(move || async move { Json(emails.clone()) }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_github_style_provider_signs_in_with_the_primary_verified_address() {
    let base = start_github(json!([
        { "email": "unverified@example.com", "primary": false, "verified": false },
        { "email": "octo@example.com", "primary": true, "verified": true },
    ]))
    .await;
    let vars = [
        ("CAIRN_OAUTH_PROVIDERS", "gh".to_owned()),
        ("CAIRN_OAUTH_GH_KIND", "github".to_owned()),
        ("CAIRN_OAUTH_GH_CLIENT_ID", CLIENT_ID.to_owned()),
        ("CAIRN_OAUTH_GH_CLIENT_SECRET", CLIENT_SECRET.to_owned()),
        ("CAIRN_OAUTH_GH_AUTHORIZE_URL", format!("{base}/authorize")),
        ("CAIRN_OAUTH_GH_TOKEN_URL", format!("{base}/token")),
        ("CAIRN_OAUTH_GH_USERINFO_URL", format!("{base}/user")),
        ("CAIRN_OAUTH_GH_EMAILS_URL", format!("{base}/user/emails")),
        ("CAIRN_OAUTH_REDIRECT_URI", "http://localhost:5173/oauth/callback".to_owned()),
    ];
    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &extra).await;
    let flow = authorize_at(&app, "/api/v1/auth/oauth/gh/start", None, json!({})).await;
    let signed_in = callback_with(&app, "gh", &flow, flow.cookie.as_deref(), json!({})).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(signed_in.data()["user"]["email"], "octo@example.com");
    assert_eq!(signed_in.data()["user"]["display_name"], "Octo Cat");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_link_the_squatter_holds_dies_when_the_owner_links_a_provider() {
    // Given a squatter on the victim's address who asked for a reset link and kept it.
    let (app, provider) = spawn_with_provider().await;
    let mail = common::MailCatcher::start(app.env.smtp_port);
    app.register_ok("kept@example.com").await;
    let asked = app.post("/api/v1/auth/password-reset", None, json!({ "email": "kept@example.com" })).await;
    assert_eq!(asked.status, StatusCode::ACCEPTED);
    let link = mail.token_for("kept@example.com", "reset-password", 1).await;

    // When the owner signs in through a provider vouching for the address (the password goes).
    let flow = authorize_as(&app, &provider, user("kept@example.com")).await;
    let owner = callback(&app, &flow).await;
    assert_eq!(owner.status, StatusCode::OK, "{:?}", owner.body);

    // Then the squatter's link cannot set a password again.
    let body = json!({ "token": link, "new_password": "the squatter's way back in 9" });
    let reset = app.post("/api/v1/auth/password-reset/confirm", None, body).await;
    assert_eq!((reset.status, reset.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"), "{:?}", reset.body);
    app.stop().await;
}
