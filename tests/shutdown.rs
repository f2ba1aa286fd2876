//! `cairn serve` stops within its grace period whatever its dependencies do, and leaves nothing
//! held for the next process: here the email worker is stuck in a send the mail server stalls.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::stalling_smtp::StallingSmtp;
use common::{wait_count, wait_until, Serve, TestEnv, MAIL_LOCK_CLASS, PASSWORD};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_serve_within_the_grace_period_while_a_mail_send_hangs() {
    // Given `cairn serve` with a 2 s grace period, and a mail server that holds DATA for far longer.
    let env = TestEnv::new();
    let smtp = StallingSmtp::start(env.smtp_port, Duration::from_secs(600)).await.unwrap();
    let settings = [("CAIRN_SHUTDOWN_GRACE_SECS", "2"), ("SMTP_TIMEOUT_SECS", "600")];
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut serve = Serve::start(&env, &settings);
    serve.wait_ready(&client).await;
    let pool = PgPool::connect(&env.database_url).await.unwrap();

    // And a registration whose welcome mail the worker is stuck sending.
    let registered = client
        .post(format!("{}/api/v1/auth/register", serve.base))
        .json(&json!({ "email": "held@example.com", "password": PASSWORD, "display_name": "Held" }))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::CREATED);
    wait_until("the worker is stuck at DATA", Duration::from_secs(30), || smtp.stalled_now() == 1).await;
    let claims =
        format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = {MAIL_LOCK_CLASS}");
    wait_count(&pool, &claims, 1, Duration::from_secs(5)).await;

    // When it is sent SIGTERM.
    let pid = serve.child.id().to_string();
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());

    // Then it exits, successfully, within the grace period and a margin.
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(8), "still running 8 s after SIGTERM: {}", serve.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}: {}", serve.log());
    // And the worker's claim went with its connection.
    wait_count(&pool, &claims, 0, Duration::from_secs(5)).await;
    assert_eq!(smtp.accepted().len(), 0);

    // When the mail server answers again and another process starts.
    smtp.set_stall(Duration::ZERO);
    let mut next = Serve::start(&env, &settings);
    next.wait_ready(&client).await;

    // Then the event, handed back (NAK) by the stopping process, is redelivered to it at once,
    // well inside JetStream's 30 s ack wait, and mailed once.
    wait_until("the held mail is sent by the next process", Duration::from_secs(20), || !smtp.accepted().is_empty())
        .await;
    wait_count(&pool, "SELECT count(*) FROM email_deliveries", 1, Duration::from_secs(10)).await;
    let accepted = smtp.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].recipients, ["held@example.com"]);

    drop(next);
    pool.close().await;
    env.cleanup().await;
}
