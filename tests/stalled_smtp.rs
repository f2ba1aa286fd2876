//! A mail server that stalls at DATA holds back no event: the email worker sends with no
//! transaction open, so the relay's horizon moves on and reads stay consistent meanwhile.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn::Services;
use common::stalling_smtp::StallingSmtp;
use common::{wait_until, TestApp, TestEnv, MAIL_LOCK_CLASS};
use reqwest::StatusCode;
use serde_json::json;

/// A backend of this database that holds a transaction id: (pid, state, seconds since its
/// transaction began, query).
type XidHolder = (i32, String, f64, String);

async fn xid_holders(app: &TestApp) -> Vec<XidHolder> {
    sqlx::query_as(
        "SELECT pid, coalesce(state, ''), EXTRACT(EPOCH FROM now() - xact_start)::float8, coalesce(query, '') \
           FROM pg_stat_activity \
          WHERE datname = current_database() AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// The backend holding the email worker's claim on an event, with its state and whether it has
/// a transaction id.
async fn mail_claim(app: &TestApp) -> Option<(i32, String, bool)> {
    sqlx::query_as(
        "SELECT a.pid, coalesce(a.state, ''), a.backend_xid IS NOT NULL \
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
          WHERE l.locktype = 'advisory' AND l.classid::bigint = $1 AND l.granted AND a.datname = current_database()",
    )
    .bind(MAIL_LOCK_CLASS)
    .fetch_optional(&app.pool)
    .await
    .unwrap()
}

/// The relay's checkpoint as (transaction id, position).
async fn relay_checkpoint(app: &TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM relay_checkpoints").fetch_one(&app.pool).await.unwrap()
}

fn token_parts(token: &str) -> (i64, i64) {
    let (tx, pos) = token.split_once('.').unwrap();
    (tx.parse().unwrap(), pos.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mail_server_stalled_at_data_holds_back_no_event() {
    // Given a mail server that holds DATA for 10 s, and a worker willing to wait 30 s for it.
    let env = TestEnv::new();
    let smtp = StallingSmtp::start(env.smtp_port, Duration::from_secs(10)).await.unwrap();
    let app = TestApp::spawn_with(env, Services::all(), &[("SMTP_TIMEOUT_SECS", "30")]).await;
    let (_, admin) = app.admin_token().await;
    // The administrator's welcome mail is the first one the worker gets stuck in.
    wait_until("the worker sends the first mail", Duration::from_secs(20), || smtp.stalled_now() == 1).await;

    // Then the worker's claim is held by a connection with no transaction open.
    let (claim_pid, claim_state, claim_has_xid) =
        mail_claim(&app).await.expect("the worker holds a claim while it sends");
    assert_eq!((claim_state.as_str(), claim_has_xid), ("idle", false), "claim backend {claim_pid}");

    // When users register while the worker is stuck.
    let mut registered = Vec::new();
    for i in 0..5 {
        let reply = app.register(&format!("stalled{i}@example.com")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        registered.push((reply.data()["user_id"].as_str().unwrap().to_owned(), reply.token()));
    }

    // Then each is readable with its consistency token, and the relay passed each token.
    for (id, token) in &registered {
        let read = app
            .request("GET", &format!("/api/v1/users/{id}"), Some(&admin), None, &[("X-Consistency-Token", token)])
            .await;
        assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
        assert_eq!(read.body["meta"]["consistent"], json!(true), "{:?}", read.body);
        assert!(relay_checkpoint(&app).await >= token_parts(token), "the relay is behind {token}");
    }
    // And no backend of ours kept a transaction id open while the mail server held DATA.
    for _ in 0..10 {
        assert!(smtp.stalled_now() >= 1, "the mail server must still be holding DATA for this check to mean anything");
        let holders = xid_holders(&app).await;
        assert!(
            holders.iter().all(|(_, state, age, _)| state == "active" && *age < 2.0),
            "transactions held open while the mail server stalls: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // When the mail server answers again, every mail goes out once.
    smtp.set_stall(Duration::ZERO);
    let expected = registered.len() + 1;
    wait_until("every welcome mail is accepted", Duration::from_secs(60), || smtp.accepted().len() >= expected).await;
    app.wait_count("SELECT count(*) FROM email_deliveries", i64::try_from(expected).unwrap(), Duration::from_secs(10))
        .await;
    assert_eq!(smtp.accepted().len(), expected);
    let mut recipients: Vec<String> = smtp.accepted().into_iter().flat_map(|m| m.recipients).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), expected, "each user mailed once: {recipients:?}");
    assert!(mail_claim(&app).await.is_none(), "the claim is released once the mail is recorded");
    app.stop().await;
}
