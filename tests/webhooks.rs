//! `webhook.deliver` against receivers inside the test: the signature verifies with an
//! implementation of its own (the `hmac` and `sha2` crates, not the code under test), 2xx is done,
//! 500 retries, 410 gives up at once, `Retry-After` is honoured, a redirect off the allow-list is
//! not followed, and a host off the list is refused before anything is sent.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use cairn_platform::clock::{Clock, SharedClock, TestClock};
use cairn_platform::jobs::JobsSettings;
use cairn_workers::jobs::kinds::WebhookDeliver;
use cairn_workers::jobs::{JobContext, JobError, JobHandler};
use common::TestEnv;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The secret the tests sign with, in its `whsec_` form, and its key bytes.
const SECRET: &str = "whsec_dGVzdCB3ZWJob29rIHNpZ25pbmcga2V5IQ==";

fn key() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap()
}

/// One request a receiver got, and whether its signature verified.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    body: Value,
    content_type: String,
    verified: bool,
}

/// What a receiver answers, request after request (the last one repeats).
#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

#[derive(Clone)]
enum Answer {
    Status(u16, &'static str),
    RetryAfter(u16, &'static str),
    Redirect(String),
}

impl Receiver {
    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Standard Webhooks verification, written from the specification: HMAC-SHA256 over
/// `id.timestamp.body` with the decoded secret, base64, compared with each `v1,` entry.
fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (id, timestamp, signatures) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let mut mac = Hmac::<Sha256>::new_from_slice(&key()).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    signatures.split(' ').any(|entry| entry.strip_prefix("v1,") == Some(expected.as_str()))
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    receiver.got.lock().unwrap().push(Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp").parse().unwrap_or(0),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        content_type: header("content-type"),
        verified: verify(&headers, &body),
    });
    let answer = {
        let mut answers = receiver.answers.lock().unwrap();
        if answers.len() > 1 {
            answers.remove(0)
        } else {
            answers[0].clone()
        }
    };
    match answer {
        Answer::Status(code, text) => (StatusCode::from_u16(code).unwrap(), text).into_response(),
        Answer::RetryAfter(code, after) => {
            (StatusCode::from_u16(code).unwrap(), [("retry-after", after)], "slow down").into_response()
        }
        Answer::Redirect(to) => (StatusCode::TEMPORARY_REDIRECT, [("location", to)]).into_response(),
    }
}

/// Starts a receiver on a port of its own; returns it and its `host:port`.
async fn receiver(answers: Vec<Answer>) -> (Receiver, String) {
    let receiver = Receiver { got: Arc::default(), answers: Arc::new(Mutex::new(answers)) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let app = axum::Router::new().fallback(receive).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, address)
}

fn settings(allowed: &[&str]) -> JobsSettings {
    let allowed = allowed.join(",");
    let vars = [
        ("CAIRN_WEBHOOK_ALLOWED_HOSTS", allowed.as_str()),
        ("CAIRN_WEBHOOK_SECRET", SECRET),
        ("CAIRN_JOBS_BACKOFF_MAX_SECS", "60"),
    ];
    JobsSettings::from_lookup(
        &|k| vars.iter().find(|(name, _)| *name == k).map(|(_, v)| (*v).to_owned()),
        cairn_platform::settings::Environment::Development,
    )
    .unwrap()
}

fn job(pool: &PgPool, clock: SharedClock, url: &str, body: Value) -> JobContext {
    JobContext {
        id: Uuid::now_v7(),
        kind: "webhook.deliver".to_owned(),
        args: json!({"url": url, "body": body}),
        attempt: 1,
        max_attempts: 25,
        enqueued_at: clock.now(),
        cancel: CancellationToken::new(),
        clock,
        pool: pool.clone(),
    }
}

async fn database() -> (TestEnv, PgPool) {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    (env, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_signed_so_an_independent_verifier_accepts_it_and_2xx_is_done() {
    let (env, pool) = database().await;
    let (receiver, host) = receiver(vec![Answer::Status(204, "")]).await;
    let clock = TestClock::new();
    clock.advance(Duration::from_secs(3 * 3600));
    let handler = WebhookDeliver::new(&settings(&[&host])).unwrap();
    let body = json!({"type": "invoice.paid", "amount": 1250, "note": "ünïcode ✓"});
    let job = job(&pool, clock.clone(), &format!("http://{host}/hooks"), body.clone());
    assert!(receiver.got().is_empty());

    handler.run(&job).await.unwrap();
    let got = receiver.got();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].verified, "{got:?}");
    assert_eq!(got[0].id, job.id.to_string());
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].content_type, "application/json");
    // The timestamp is the clock's, not the system's (the clock is three hours ahead).
    assert!(
        (got[0].timestamp - clock.now().timestamp()).abs() <= 5,
        "{} vs {}",
        got[0].timestamp,
        clock.now().timestamp()
    );

    // Signed with another secret, the same delivery does not verify: the check above can fail.
    let other = JobsSettings { webhook_secret: b"another secret, sixteen bytes+".to_vec(), ..settings(&[&host]) };
    WebhookDeliver::new(&other).unwrap().run(&job).await.unwrap();
    let got = receiver.got();
    assert_eq!(got.len(), 2);
    assert!(!got[1].verified, "{got:?}");
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_retries_a_410_gives_up_and_retry_after_is_honoured_and_capped() {
    let (env, pool) = database().await;
    let long = "x".repeat(5000);
    let long: &'static str = Box::leak(long.into_boxed_str());
    let (receiver, host) = receiver(vec![
        Answer::Status(500, long),
        Answer::Status(410, "this endpoint is gone"),
        Answer::RetryAfter(429, "7"),
        Answer::RetryAfter(503, "86400"),
        Answer::RetryAfter(500, "7"),
        Answer::Status(200, "ok"),
    ])
    .await;
    let clock: SharedClock = TestClock::new();
    let handler = WebhookDeliver::new(&settings(&[&host])).unwrap();
    let job = job(&pool, clock, &format!("http://{host}/"), json!({"n": 1}));

    match handler.run(&job).await {
        Err(JobError::Retry(e)) => {
            let text = format!("{e:#}");
            assert!(text.contains("500"), "{text}");
            // The status and at most 200 bytes of what the receiver said.
            assert!(
                text.contains(&"x".repeat(200)) && !text.contains(&"x".repeat(201)),
                "{} bytes: {text}",
                text.len()
            );
        }
        other => panic!("a 500 must be retried: {other:?}"),
    }
    match handler.run(&job).await {
        Err(JobError::Permanent(e)) => assert!(format!("{e:#}").contains("410"), "{e:#}"),
        other => panic!("a 410 must not be retried: {other:?}"),
    }
    match handler.run(&job).await {
        Err(JobError::RetryAfter(after, e)) => {
            assert_eq!(after, Duration::from_secs(7));
            assert!(format!("{e:#}").contains("429"), "{e:#}");
        }
        other => panic!("a 429 with Retry-After must say when: {other:?}"),
    }
    match handler.run(&job).await {
        Err(JobError::RetryAfter(after, _)) => {
            assert_eq!(after, Duration::from_secs(60), "capped at the longest backoff")
        }
        other => panic!("a 503 with Retry-After must say when: {other:?}"),
    }
    // Retry-After on another status is not a promise: the usual backoff.
    assert!(matches!(handler.run(&job).await, Err(JobError::Retry(_))));
    handler.run(&job).await.unwrap();
    assert_eq!(receiver.got().len(), 6);
    assert!(receiver.got().iter().all(|r| r.verified && r.id == job.id.to_string()));
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_only_to_allowed_hosts_and_a_disallowed_host_is_refused_before_sending() {
    let (env, pool) = database().await;
    let (elsewhere, elsewhere_host) = receiver(vec![Answer::Status(200, "ok")]).await;
    let (target, target_host) = receiver(vec![Answer::Status(200, "ok")]).await;
    let (first, first_host) = receiver(vec![
        Answer::Redirect(format!("http://{elsewhere_host}/stolen")),
        Answer::Redirect(format!("http://{target_host}/moved")),
    ])
    .await;
    let clock: SharedClock = TestClock::new();
    let handler = WebhookDeliver::new(&settings(&[&first_host, &target_host])).unwrap();
    let job = job(&pool, clock.clone(), &format!("http://{first_host}/hook"), json!({"secret": "data"}));

    // Off the list: the first receiver got the request, the other one nothing.
    match handler.run(&job).await {
        Err(JobError::Retry(e)) => {
            let text = format!("{e:#}");
            assert!(text.contains("not followed") && text.contains(&elsewhere_host), "{text}");
        }
        other => panic!("a redirect off the list must fail the attempt: {other:?}"),
    }
    assert_eq!(first.got().len(), 1);
    assert!(elsewhere.got().is_empty(), "{:?}", elsewhere.got());

    // On the list: followed, body and signature kept (307).
    handler.run(&job).await.unwrap();
    assert_eq!(first.got().len(), 2);
    let got = target.got();
    assert_eq!(got.len(), 1);
    assert!(got[0].verified);
    assert_eq!(got[0].body, json!({"secret": "data"}));

    // A redirect loop on an allowed host stops after five.
    let (looping, looping_host) = receiver(vec![Answer::Status(200, "")]).await;
    *looping.answers.lock().unwrap() = vec![Answer::Redirect(format!("http://{looping_host}/again"))];
    let handler_loop = WebhookDeliver::new(&settings(&[&looping_host])).unwrap();
    let job_loop = self::job(&pool, clock.clone(), &format!("http://{looping_host}/"), json!({}));
    match handler_loop.run(&job_loop).await {
        Err(JobError::Retry(e)) => assert!(format!("{e:#}").contains("redirects"), "{e:#}"),
        other => panic!("a redirect loop must fail the attempt: {other:?}"),
    }
    assert_eq!(looping.got().len(), 6, "the first request and five redirects");

    // The allow-list changed since the job was accepted: refused, nothing sent.
    let narrowed = WebhookDeliver::new(&settings(&[&target_host])).unwrap();
    match narrowed.run(&job).await {
        Err(JobError::Permanent(e)) => assert!(format!("{e:#}").contains("CAIRN_WEBHOOK_ALLOWED_HOSTS"), "{e:#}"),
        other => panic!("a host off the list must be refused: {other:?}"),
    }
    assert_eq!(first.got().len(), 2, "nothing was sent to the refused host");
    pool.close().await;
    env.cleanup().await;
}

/// A job's status, attempts, last error and next run.
async fn job_row(pool: &PgPool, id: Uuid) -> (String, i32, Option<String>, chrono::DateTime<chrono::Utc>) {
    sqlx::query_as("SELECT status, attempts, last_error, run_at FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_status(
    pool: &PgPool,
    id: Uuid,
    status: &str,
) -> (String, i32, Option<String>, chrono::DateTime<chrono::Utc>) {
    let started = std::time::Instant::now();
    loop {
        let row = job_row(pool, id).await;
        if row.0 == status {
            return row;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "job {id} never became {status}: {row:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proves the runner has gone round its kinds since this call: a `noop` job enqueued now has been
/// claimed and is done. A job that is still not running after it was passed over by a claim, not
/// missed for want of one.
async fn runner_went_round(app: &common::TestApp) {
    use cairn_platform::jobs::{enqueue, NewJob};
    let mut conn = app.pool.acquire().await.unwrap();
    let id = enqueue(&mut conn, &NewJob::new("noop", json!({})), app.clock.now()).await.unwrap().id;
    drop(conn);
    wait_status(&app.pool, id, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_the_runner_a_500_is_retried_only_after_its_backoff_a_410_fails_at_once_and_retry_after_holds() {
    use cairn_platform::jobs::{enqueue, NewJob};
    let (receiver, host) = receiver(vec![
        Answer::Status(500, "try later"),
        Answer::Status(200, "ok"),
        Answer::RetryAfter(503, "120"),
        Answer::Status(204, ""),
        Answer::Status(410, "gone"),
    ])
    .await;
    let settings = [
        ("CAIRN_WEBHOOK_ALLOWED_HOSTS", host.as_str()),
        ("CAIRN_WEBHOOK_SECRET", SECRET),
        ("CAIRN_JOBS_POLL_MS", "50"),
        ("CAIRN_JOBS_BACKOFF_BASE_SECS", "30"),
    ];
    let app = common::TestApp::spawn_with(TestEnv::new(), cairn::Services::all(), &settings).await;
    let submit = |body: Value| {
        let (pool, now, url) = (app.pool.clone(), app.clock.now(), format!("http://{host}/hook"));
        async move {
            let job = NewJob::new("webhook.deliver", json!({"url": url, "body": body}));
            let mut conn = pool.acquire().await.unwrap();
            enqueue(&mut conn, &job, now).await.unwrap().id
        }
    };

    // A 500: the attempt is recorded and the next one waits for its backoff on the clock.
    let first = submit(json!({"n": 1})).await;
    let (_, attempts, error, run_at) = wait_status(&app.pool, first, "scheduled").await;
    assert_eq!(attempts, 1);
    assert!(error.as_deref().is_some_and(|e| e.contains("500") && e.contains("try later")), "{error:?}");
    assert_eq!(receiver.got().len(), 1);
    runner_went_round(&app).await;
    if run_at > app.clock.now() {
        assert_eq!(job_row(&app.pool, first).await.0, "scheduled");
        assert_eq!(receiver.got().len(), 1, "retried before its backoff");
    }
    app.clock.advance((run_at - app.clock.now()).to_std().unwrap_or_default() + Duration::from_secs(1));
    let (_, attempts, _, _) = wait_status(&app.pool, first, "done").await;
    assert_eq!(attempts, 2);
    let got = receiver.got();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.verified && r.id == first.to_string()), "{got:?}");

    // A 503 with Retry-After: 120: not retried for two minutes on the clock, then delivered.
    let second = submit(json!({"n": 2})).await;
    let (_, _, _, run_at) = wait_status(&app.pool, second, "scheduled").await;
    let wait = (run_at - app.clock.now()).num_seconds();
    assert!((115..=120).contains(&wait), "{wait} s");
    app.clock.advance(Duration::from_secs(60));
    runner_went_round(&app).await;
    assert_eq!(job_row(&app.pool, second).await.0, "scheduled");
    assert_eq!(receiver.got().len(), 3, "retried before Retry-After");
    app.clock.advance(Duration::from_secs(61));
    wait_status(&app.pool, second, "done").await;
    assert_eq!(receiver.got().len(), 4);

    // A 410: failed at once, after one attempt.
    let third = submit(json!({"n": 3})).await;
    let (_, attempts, error, _) = wait_status(&app.pool, third, "failed").await;
    assert_eq!(attempts, 1);
    assert!(error.as_deref().is_some_and(|e| e.contains("410")), "{error:?}");
    assert_eq!(receiver.got().len(), 5);
    app.clock.advance(Duration::from_secs(3600));
    runner_went_round(&app).await;
    assert_eq!(job_row(&app.pool, third).await.0, "failed");
    assert_eq!(receiver.got().len(), 5, "a 410 was retried");
    app.stop().await;
}
