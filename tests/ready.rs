//! `/ready` means "can take requests": Postgres answers. Without NATS a process is still ready,
//! but says it is degraded; without Postgres it is not ready, and says so quickly.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::Services;
use cairn_platform::http::{finish_router, ops_router, OpsState};
use common::{PrivateNats, TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Polls `/ready` until its body's `nats` is `nats`, and returns that answer.
async fn ready_with_nats(app: &TestApp, nats: bool) -> common::Reply {
    let started = Instant::now();
    loop {
        let reply = app.get("/ready", None).await;
        if reply.data()["nats"] == json!(nats) {
            return reply;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "/ready never said nats: {nats}: {:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(app: &TestApp, name: &str) -> Option<f64> {
    let text = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_means_postgres_answers_and_nats_away_is_only_degraded() {
    // Given a process on a NATS server of its own.
    let mut nats = PrivateNats::start();
    let mut env = TestEnv::new();
    env.nats_url = nats.url();
    let app = TestApp::spawn_with(env, Services::all(), &[]).await;
    let up = ready_with_nats(&app, true).await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.data()["degraded"], json!(false));
    assert_eq!(metric(&app, "cairn_nats_connected").await, Some(1.0));

    // When NATS stops: still ready (commands append to Postgres), but degraded.
    nats.stop();
    let down = ready_with_nats(&app, false).await;
    assert_eq!(down.status, StatusCode::OK, "{:?}", down.body);
    assert_eq!(down.data()["postgres"], json!(true));
    assert_eq!(down.data()["degraded"], json!(true));
    assert_eq!(down.data()["status"], json!("degraded"));
    assert_eq!(metric(&app, "cairn_nats_connected").await, Some(0.0));
    assert_eq!(metric(&app, "cairn_ready").await, Some(1.0));
    let registered = app.register("while-nats-is-down@example.com").await;
    assert_eq!(registered.status, StatusCode::CREATED, "{:?}", registered.body);

    // When it returns: ready and not degraded.
    nats.restart();
    let back = ready_with_nats(&app, true).await;
    assert_eq!((back.status, back.data()["degraded"].clone()), (StatusCode::OK, json!(false)));
    app.stop().await;

    // Given a process whose Postgres accepts connections and never answers (hung, or unreachable
    // behind a dropping firewall): a listener nobody reads from.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/hung", hung.local_addr().unwrap().port());
    let pool =
        sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_secs(60)).connect_lazy(&url).unwrap();
    let client = async_nats::connect(common::nats_base()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    // Wrapped as a process wraps it, so errors come in the envelope.
    let router = finish_router(ops_router(OpsState { pool, nats: client }), &TestEnv::new().settings(&[]));
    let server = tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).await.unwrap();
    });

    // Then /ready says 503 SERVICE_UNAVAILABLE, in time for a probe (the pool alone would wait 60 s).
    let probe = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let response =
        probe.get(format!("{address}/ready")).send().await.expect("/ready must answer within a probe's timeout");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], json!(false));
    assert_eq!(body["error"]["code"], json!("SERVICE_UNAVAILABLE"));
    server.abort();
    drop(hung);
}
