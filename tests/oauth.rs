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

/// The browser's part: follow the authorize URL and read `code` and `state` off the redirect.
async fn authorize_as(app: &TestApp, provider: &Provider, user: NextUser) -> (String, String) {
    *provider.next.lock().unwrap() = user;
    let started = app.post("/api/v1/auth/oauth/local/start", None, json!({})).await;
    assert_eq!(started.status, StatusCode::OK, "{:?}", started.body);
    let url = started.data()["authorize_url"].as_str().unwrap();
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let redirect = browser.get(url).send().await.unwrap();
    let location = reqwest::Url::parse(redirect.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with("http://localhost:5173/oauth/callback"));
    let pairs: HashMap<String, String> = location.query_pairs().into_owned().collect();
    (pairs["code"].clone(), pairs["state"].clone())
}

fn user(email: &str) -> NextUser {
    NextUser { email: email.to_owned(), verified: true, wrong_nonce: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_address_opens_a_verified_account_and_a_known_one_is_linked() {
    let (app, provider) = spawn_with_provider().await;

    let (code, state) = authorize_as(&app, &provider, user("newcomer@example.com")).await;
    let signed_in = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": state })).await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(signed_in.data()["user"]["email"], "newcomer@example.com");
    assert_eq!(signed_in.data()["user"]["email_verified"], true);
    let access = signed_in.data()["access_token"].as_str().unwrap();
    assert_eq!(app.get("/api/v1/roles", Some(access)).await.status, StatusCode::OK);

    // The state was spent: replaying the callback fails.
    let replay = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": state })).await;
    assert_eq!((replay.status, replay.code()), (StatusCode::BAD_REQUEST, "VALIDATION_FAILED"));

    // An account registered with a password is linked by its verified email.
    let existing = app.register_ok("linked@example.com").await;
    let (code, state) = authorize_as(&app, &provider, user("Linked@Example.com")).await;
    let linked = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": state })).await;
    assert_eq!(linked.status, StatusCode::OK, "{:?}", linked.body);
    assert_eq!(linked.data()["user"]["id"], existing.to_string());
    assert_eq!(linked.data()["user"]["email_verified"], true, "the provider vouched for the address");
    app.login("linked@example.com").await; // the password still works
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_nonce_unverified_email_and_unknown_state_are_refused() {
    let (app, provider) = spawn_with_provider().await;

    let (code, state) =
        authorize_as(&app, &provider, NextUser { wrong_nonce: true, ..user("nonce@example.com") }).await;
    let injected = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": state })).await;
    assert_eq!(injected.status, StatusCode::UNAUTHORIZED, "{:?}", injected.body);

    let (code, state) =
        authorize_as(&app, &provider, NextUser { verified: false, ..user("unverified@example.com") }).await;
    let unverified = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": state })).await;
    assert_eq!(unverified.status, StatusCode::FORBIDDEN, "{:?}", unverified.body);

    let (code, _) = authorize_as(&app, &provider, user("forged@example.com")).await;
    let forged = app.post("/api/v1/auth/oauth/local/callback", None, json!({ "code": code, "state": "made-up" })).await;
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
    let started = app.post("/api/v1/auth/oauth/gh/start", None, json!({})).await;
    let url = started.data()["authorize_url"].as_str().unwrap();
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let redirect = browser.get(url).send().await.unwrap();
    let location = reqwest::Url::parse(redirect.headers()["location"].to_str().unwrap()).unwrap();
    let pairs: HashMap<String, String> = location.query_pairs().into_owned().collect();
    let signed_in = app
        .post("/api/v1/auth/oauth/gh/callback", None, json!({ "code": pairs["code"], "state": pairs["state"] }))
        .await;
    assert_eq!(signed_in.status, StatusCode::OK, "{:?}", signed_in.body);
    assert_eq!(signed_in.data()["user"]["email"], "octo@example.com");
    assert_eq!(signed_in.data()["user"]["display_name"], "Octo Cat");
    app.stop().await;
}
