//! What attackers can make the service hold: the password-hashing queue is bounded (a full queue
//! answers 503 with `Retry-After`, and writes nothing), every rate limiter forgets the keys it no
//! longer needs, and `/metrics` can be kept off the public listener.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::json;

/// The value of `cairn_rate_limit_keys{limiter="<limiter>"}` on `metrics_url`, if it was set.
async fn limiter_keys(client: &reqwest::Client, metrics_url: &str, limiter: &str) -> Option<f64> {
    let text = client.get(metrics_url).send().await.ok()?.text().await.ok()?;
    let prefix = format!("cairn_rate_limit_keys{{limiter=\"{limiter}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
}

#[tokio::test]
async fn a_full_password_queue_answers_503_with_retry_after_and_writes_nothing() {
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_HASH_CONCURRENCY", "1"), ("CAIRN_PASSWORD_QUEUE", "1")],
    )
    .await;
    // A burst of sign-ins with unknown emails: one hashes, one waits, the rest are turned away.
    let logins = (0..24).map(|i| {
        app.post("/api/v1/auth/login", None, json!({ "email": format!("nobody{i}@example.com"), "password": "wrong" }))
    });
    let replies = futures::future::join_all(logins).await;
    let busy: Vec<_> = replies.iter().filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(!busy.is_empty(), "no 503 from a queue of one: {:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for reply in &replies {
        assert!(
            [StatusCode::UNAUTHORIZED, StatusCode::SERVICE_UNAVAILABLE].contains(&reply.status),
            "{} {:?}",
            reply.status,
            reply.body
        );
    }
    for reply in busy {
        assert_eq!(reply.code(), "SERVICE_UNAVAILABLE");
        assert_eq!(reply.body["success"], json!(false));
        assert!(reply.body["error"]["request_id"].is_string());
        let after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(after >= 1);
        assert_eq!(reply.body["error"]["details"]["retry_after_s"], json!(after));
    }

    // Registrations turned away by the full queue leave no account behind.
    let emails: Vec<String> = (0..16).map(|i| format!("burst{i}@example.com")).collect();
    let replies = futures::future::join_all(emails.iter().map(|email| app.register(email))).await;
    let mut turned_away = 0;
    for (email, reply) in emails.iter().zip(&replies) {
        let stored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE event_type = 'UserRegistered' \
             AND payload -> 'UserRegistered' ->> 'email' = $1",
        )
        .bind(email)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        match reply.status {
            StatusCode::CREATED => assert_eq!(stored, 1),
            StatusCode::SERVICE_UNAVAILABLE => {
                turned_away += 1;
                assert_eq!(stored, 0, "{email} was turned away but registered");
            }
            other => panic!("{email}: {other} {:?}", reply.body),
        }
    }
    assert!(turned_away > 0, "no registration was turned away by a queue of one");
    app.stop().await;
}

#[tokio::test]
async fn every_rate_limiter_forgets_the_keys_it_no_longer_needs() {
    let metrics_port = common::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[
            ("CAIRN_RATE_LIMIT_SWEEP_SECS", "1"),
            ("CAIRN_TRUSTED_PROXIES", "127.0.0.1"),
            // Keys of these rates are forgettable 2 s after their last request.
            ("CAIRN_RATE_LIMIT_AUTH", "60/min"),
            ("CAIRN_RATE_LIMIT_MAIL", "60/min"),
            ("CAIRN_RATE_LIMIT_USER", "60/min"),
            ("CAIRN_METRICS_LISTEN", &listen),
        ],
    )
    .await;
    let metrics_url = format!("http://{listen}/metrics");
    let email = "keeper@example.com";
    app.register_ok(email).await;
    let login = app
        .request(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": email, "password": common::PASSWORD })),
            &[("x-forwarded-for", "192.0.2.1")],
        )
        .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let token = login.data()["access_token"].as_str().unwrap().to_owned();

    // Distinct addresses and emails, as an attacker sends them, until a sweep has seen them held.
    let started = Instant::now();
    let mut sent = 0u32;
    loop {
        for _ in 0..20 {
            sent += 1;
            let forwarded = format!("10.{}.{}.{}", sent / 65536 % 256, sent / 256 % 256, sent % 256);
            let reply = app
                .request(
                    "POST",
                    "/api/v1/auth/password-reset",
                    None,
                    Some(json!({ "email": format!("stranger{sent}@example.com") })),
                    &[("x-forwarded-for", &forwarded)],
                )
                .await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
        }
        // The per-user limit is checked with the token, whatever the read answers (the read
        // model may not hold the new user yet).
        let me = app.get("/api/v1/users/me", Some(&token)).await;
        assert_ne!(me.status, StatusCode::UNAUTHORIZED, "{:?}", me.body);
        let mut held = true;
        for limiter in ["ip_auth", "mail", "user"] {
            held &= limiter_keys(&app.client, &metrics_url, limiter).await.unwrap_or(0.0) >= 1.0;
        }
        if held {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no sweep reported the keys held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Once nobody sends anything, the next sweeps forget every key.
    let quiet = Instant::now();
    for limiter in ["ip_auth", "mail", "user"] {
        loop {
            let keys = limiter_keys(&app.client, &metrics_url, limiter).await;
            if keys == Some(0.0) {
                break;
            }
            assert!(quiet.elapsed() < Duration::from_secs(20), "{limiter} still holds {keys:?} keys");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn metrics_can_be_served_on_their_own_listener_only() {
    let metrics_port = common::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &[("CAIRN_METRICS_LISTEN", &listen)]).await;
    assert_eq!(app.get("/health", None).await.status, StatusCode::OK);

    let public = app.get("/metrics", None).await;
    assert_eq!(public.status, StatusCode::NOT_FOUND, "{:?}", public.body);
    assert_eq!(public.code(), "NOT_FOUND");

    let internal = app.client.get(format!("http://{listen}/metrics")).send().await.unwrap();
    assert_eq!(internal.status(), StatusCode::OK);
    let text = internal.text().await.unwrap();
    assert!(text.contains("http_requests_total"), "{text}");
    // The internal listener serves nothing else.
    let other = app.client.get(format!("http://{listen}/api/v1/roles")).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn without_a_metrics_listener_metrics_stay_on_the_main_one() {
    let app = TestApp::spawn().await;
    let reply = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    app.stop().await;
}
