//! Split mode: each service in its own process, several of some, against one Postgres and NATS.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, TestEnv, PASSWORD};
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(env: &TestEnv, service: &str) -> (Process, String) {
    let port = free_port();
    let child = env
        .command(&[service])
        .env("CAIRN_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (Process(child), format!("http://127.0.0.1:{port}"))
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let started = Instant::now();
    loop {
        if let Ok(resp) = client.get(format!("{base}/ready")).send().await {
            if resp.status() == StatusCode::OK {
                return;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_in_separate_processes_work_together() {
    let env = TestEnv::new();
    // Migrations first, once, as an operator would; the services would race to do it otherwise
    // (which is also safe: migrations take a lock).
    assert!(env.command(&["migrate"]).status().unwrap().success());
    let client = reqwest::Client::new();
    let mut processes = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..2 {
        let (p, base) = start(&env, "command-api");
        processes.push(p);
        writers.push(base);
    }
    let (p, reader) = start(&env, "query-api");
    processes.push(p);
    for service in ["projector", "projector", "workers", "workers"] {
        processes.push(start(&env, service).0);
    }
    for base in writers.iter().chain([&reader]) {
        wait_healthy(&client, base).await;
    }

    let post = |base: &str, path: &str, token: Option<&str>, body: Value| {
        let mut req = client.post(format!("{base}{path}")).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let admin_email = "split-admin@example.com";
    let output = env
        .command(&["admin", "create-user", "--email", admin_email])
        .env("CAIRN_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let (_, login) =
        post(&writers[1], "/api/v1/auth/login", None, json!({ "email": admin_email, "password": PASSWORD })).await;
    let admin = login["data"]["access_token"].as_str().unwrap().to_owned();

    // Writes spread over both command APIs; reads from the query API with the consistency token.
    let mut last_token = String::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let base = &writers[i % 2];
        let (status, body) = post(
            base,
            "/api/v1/auth/register",
            None,
            json!({ "email": format!("split{i}@example.com"), "password": PASSWORD, "display_name": "S" }),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["data"]["user_id"].as_str().unwrap().to_owned();
        let (status, body) = post(
            &writers[(i + 1) % 2],
            &format!("/api/v1/users/{id}/roles"),
            Some(&admin),
            json!({ "role": "auditor" }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        last_token = body["meta"]["consistency_token"].as_str().unwrap().to_owned();
        ids.push(id);
    }
    let read: Value = client
        .get(format!("{reader}/api/v1/users?role=auditor&limit=100"))
        .bearer_auth(&admin)
        .header("X-Consistency-Token", &last_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read["meta"]["consistent"], true, "{read}");
    assert_eq!(read["data"].as_array().unwrap().len(), 20);

    // Each command API keeps the aggregates it loaded in memory; a change made through the other
    // one must still be seen (ids[2] was registered through writers[0] and granted through writers[1]).
    let delete = |base: &str, path: &str| {
        let req = client.delete(format!("{base}{path}")).bearer_auth(&admin);
        async move { req.send().await.unwrap().status() }
    };
    let role_path = format!("/api/v1/users/{}/roles/auditor", ids[2]);
    assert_eq!(delete(&writers[0], &role_path).await, StatusCode::OK);
    assert_eq!(
        delete(&writers[1], &role_path).await,
        StatusCode::CONFLICT,
        "the revocation through writers[0] is seen"
    );
    let grant = json!({ "role": "auditor" });
    let (status, _) = post(&writers[1], &format!("/api/v1/users/{}/roles", ids[2]), Some(&admin), grant.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&writers[0], &format!("/api/v1/users/{}/roles", ids[2]), Some(&admin), grant).await;
    assert_eq!(status, StatusCode::CONFLICT, "the grant through writers[1] is seen");

    // A deactivation through one command API is honoured by the query API process too.
    let (status, body) =
        post(&writers[0], "/api/v1/auth/login", None, json!({ "email": "split0@example.com", "password": PASSWORD }))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let user = body["data"]["access_token"].as_str().unwrap().to_owned();
    let (status, _) = post(&writers[1], &format!("/api/v1/users/{}/deactivate", ids[0]), Some(&admin), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    loop {
        let status = client.get(format!("{reader}/api/v1/users/me")).bearer_auth(&user).send().await.unwrap().status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "query API kept accepting a deactivated user's token");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Two audit workers compete on one durable consumer: each event is logged exactly once.
    let pool = sqlx::PgPool::connect(&env.database_url).await.unwrap();
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await.unwrap();
    common::wait_count(&pool, "SELECT count(*) FROM audit_log", events, Duration::from_secs(20)).await;
    drop(processes);
    pool.close().await;
    env.cleanup().await;
}
