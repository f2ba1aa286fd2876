//! The auditor's own script (`contrib/audit_check.py`: Python's hashlib and the `cryptography`
//! package's Ed25519, nothing of cairn's) run with `python3` against a live application: it
//! passes on an intact log, from an older saved head to the latest, and fails with its reason on
//! a tampered event.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn::app::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/audit_check.py");

/// Fails (never skips) when python3 or its Ed25519 library is missing.
fn require_python() {
    let check = std::process::Command::new("python3")
        .args(["-c", "from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey"])
        .output();
    match check {
        Err(e) => panic!("python3 is needed to run the auditor's script: {e} (.ci/run installs it)"),
        Ok(out) => assert!(
            out.status.success(),
            "python3 lacks the cryptography package (Debian: python3-cryptography; .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

async fn register_some(app: &TestApp, n: usize) {
    for i in 0..n {
        app.register_ok(&format!("u{i}-{}@example.com", &Uuid::new_v4().simple().to_string()[..8])).await;
    }
}

/// Waits until the tree covers the whole log and a head is signed at its size; returns the head.
async fn folded(app: &TestApp, token: &str) -> Value {
    let started = Instant::now();
    loop {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
        let latest = app.get("/api/v1/audit/checkpoints/latest", Some(token)).await;
        if latest.status == StatusCode::OK && latest.data()["tree_size"].as_i64() == Some(events) {
            return latest.data().clone();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no head covers the {events} events: {:?}", latest.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run(app: &TestApp, token: &str, event_id: Uuid, old_head: &Path) -> (bool, String) {
    let out = std::process::Command::new("python3")
        .arg(SCRIPT)
        .args([&app.address, token, &event_id.to_string(), "--old-head"])
        .arg(old_head)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

// The script is a blocking child process calling this test's own server: another worker serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditors_script_checks_a_proof_and_consistency_and_fails_on_a_tampered_event() {
    require_python();
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_AUDIT_HEAD_EVERY", "4"), ("CAIRN_AUDIT_HEAD_EVERY_SECS", "1")],
    )
    .await;
    let (_, admin) = app.admin_token().await;
    register_some(&app, 3).await;
    // An auditor saves a head, the log grows, a later head is signed.
    let old = folded(&app, &admin).await;
    let saved = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(saved.path(), old.to_string()).unwrap();
    register_some(&app, 3).await;
    let latest = folded(&app, &admin).await;
    assert!(latest["tree_size"].as_u64() > old["tree_size"].as_u64());

    let event_id: Uuid =
        sqlx::query_scalar("SELECT event_id FROM events ORDER BY transaction_id, global_position OFFSET 2 LIMIT 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let (ok, text) = run(&app, &admin, event_id, saved.path());
    assert!(ok, "{text}");
    assert!(text.contains("included: leaf 2 ="), "{text}");
    assert!(text.contains(&format!("consistent: the {} events", old["tree_size"])), "{text}");
    assert!(text.trim_end().ends_with("OK"), "{text}");

    // A saved head that the log's key never signed fails.
    let mut forged = old.clone();
    forged["root_hash"] = Value::String("00".repeat(32));
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), forged.to_string()).unwrap();
    let (ok, text) = run(&app, &admin, event_id, bad.path());
    assert!(!ok && text.contains("FAILED: the signature of head"), "{text}");

    // The event's payload changed behind the trigger: its bytes no longer prove.
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_or_delete").execute(&app.pool).await.unwrap();
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{forged}', 'true') WHERE event_id = $1")
        .bind(event_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let (ok, text) = run(&app, &admin, event_id, saved.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("FAILED: event {event_id}: its bytes as served do not lead to the signed root")),
        "{text}"
    );
    app.stop().await;
}
