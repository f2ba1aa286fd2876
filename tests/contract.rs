//! The OpenAPI document tells the truth: schemathesis, with every one of its checks, finds no
//! answer of a real `cairn serve` that the document does not describe, as an administrator and
//! anonymously, over every operation.
//!
//! Needs the schemathesis CLI: `$SCHEMATHESIS`, else `$HOME/.cache/cairn/venv/bin/schemathesis`
//! (what `.ci/run` installs), else `schemathesis` on `PATH`. `CAIRN_SCHEMATHESIS_EXAMPLES` sets the
//! examples per operation (default 5, a bounded pass).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Serve, TestEnv, PASSWORD};
use reqwest::StatusCode;
use serde_json::json;

/// The operations that can end the session of the token they are called with (called on the
/// caller's own id, the last two end every session of that user): each runs on its own, with a
/// token of its own, so the other operations keep a working one.
const SESSION_ENDING: &[&str] = &[
    "/api/v1/auth/logout",
    "/api/v1/auth/logout-all",
    "/api/v1/users/{id}/sessions",
    "/api/v1/users/{id}/roles/{role}",
];

fn schemathesis() -> PathBuf {
    if let Ok(path) = std::env::var("SCHEMATHESIS") {
        return PathBuf::from(path);
    }
    let venv = std::env::var("HOME").ok().map(|home| PathBuf::from(home).join(".cache/cairn/venv/bin/schemathesis"));
    if let Some(venv) = venv.filter(|p| p.exists()) {
        return venv;
    }
    let on_path = Command::new("schemathesis").arg("--version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "schemathesis is missing: `bash .ci/run` installs it, or \
         `python3 -m venv ~/.cache/cairn/venv && ~/.cache/cairn/venv/bin/pip install schemathesis==4.32.5`"
    );
    PathBuf::from("schemathesis")
}

/// One schemathesis run; returns its output, failing the test with it when it finds anything.
fn run(what: &str, base: &str, token: Option<&str>, filter: &[&str], work: &std::path::Path) -> String {
    let examples = std::env::var("CAIRN_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "5".to_owned());
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let mut cmd = Command::new(schemathesis());
    cmd.arg("--config-file").arg(&config).arg("--no-color").args([
        "run",
        &format!("{base}/api/v1/openapi.json"),
        "--checks",
        "all",
        "--max-examples",
        &examples,
        "--seed",
        "9",
        "--workers",
        "2",
        "--request-timeout",
        "20",
    ]);
    cmd.args(filter);
    if let Some(token) = token {
        cmd.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    // Hypothesis keeps its example database in the working directory.
    let output = cmd.current_dir(work).env("NO_COLOR", "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "schemathesis ({what}) found differences:\n{text}");
    text
}

/// The summary schemathesis closes a run with: operations, test cases, failures.
fn summary(text: &str) -> String {
    let tail = text.rsplit_once("SUMMARY").map_or(text, |(_, tail)| tail);
    tail.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('=')).collect::<Vec<_>>().join(" | ")
}

/// Requests the server has answered so far, from its own counter.
async fn requests_served(client: &reqwest::Client, base: &str) -> u64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("http_requests_total"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()))
        .sum();
    // A count, exported as a float.
    total.round() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_the_document_does_not_say() {
    let binary = schemathesis();
    let env = TestEnv::new();
    // A short consistency wait: generated tokens may lie beyond the log's head. The passes guess
    // passwords of the accounts they see; the lockout is raised so the administrator can still
    // sign in between them (423 stays declared, and tests/sessions.rs proves the lockout).
    let settings = [("RUST_LOG", "warn"), ("CAIRN_CONSISTENCY_WAIT_MS", "100"), ("CAIRN_LOCKOUT_THRESHOLD", "1000000")];
    let mut serve = Serve::start(&env, &settings);
    let client = reqwest::Client::new();
    serve.wait_ready(&client).await;
    let admin = "contract-admin@example.com";
    let created = env
        .command(&["admin", "create-user", "--email", admin, "--role", "admin"])
        .env("CAIRN_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let sign_in = || async {
        let resp = client
            .post(format!("{}/api/v1/auth/login", serve.base))
            .json(&json!({ "email": admin, "password": PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body: serde_json::Value = resp.json().await.unwrap();
        body["data"]["access_token"].as_str().unwrap().to_owned()
    };
    let work = tempfile::tempdir().unwrap();
    let mut keep: Vec<&str> = Vec::new();
    for path in SESSION_ENDING {
        keep.extend(["--exclude-path", path]);
    }
    let mut report = Vec::new();
    let before = requests_served(&client, &serve.base).await;
    let token = sign_in().await;
    report.push(("admin", run("admin", &serve.base, Some(&token), &keep, work.path())));
    report.push(("anonymous", run("anonymous", &serve.base, None, &[], work.path())));
    for path in SESSION_ENDING {
        let token = sign_in().await;
        let only = ["--include-path", path];
        report.push((path, run(path, &serve.base, Some(&token), &only, work.path())));
    }
    let requests = requests_served(&client, &serve.base).await - before;
    for (who, text) in &report {
        eprintln!("schemathesis ({binary:?}) as {who}: {}", summary(text));
    }
    eprintln!("requests answered during the passes: {requests}");
    assert!(serve.child.try_wait().unwrap().is_none(), "cairn serve died: {}", serve.log());
    let log = serve.log();
    assert!(!log.contains("request failed"), "a request failed on the server:\n{log}");
    drop(serve);
    env.cleanup().await;
}
