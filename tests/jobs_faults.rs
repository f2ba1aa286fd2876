//! Jobs survive their workers: `cairn serve` child processes killed, paused and stopped while
//! they run jobs. A killed worker's job is taken by another once its lease runs out; a paused
//! worker that comes back cannot record anything about the job it lost; a stopping worker
//! finishes what it can within its grace period and hands the rest back.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn_platform::jobs::{enqueue, NewJob};
use common::{wait_count, Serve, TestEnv};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

fn signal(serve: &Serve, name: &str) {
    let pid = serve.child.id().to_string();
    assert!(std::process::Command::new("kill").args([name, &pid]).status().unwrap().success());
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn enqueue_noop(pool: &PgPool, sleep_ms: u64) -> Uuid {
    let mut conn = pool.acquire().await.unwrap();
    let job = NewJob::new("noop", json!({ "sleep_ms": sleep_ms }));
    enqueue(&mut conn, &job, chrono::Utc::now()).await.unwrap().id
}

async fn job_row(pool: &PgPool, id: Uuid) -> (String, i32, i64, Option<String>) {
    sqlx::query_as("SELECT status, attempts, fence, lease_owner FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn finished_count(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Job' AND aggregate_id = $1 AND event_type = 'JobFinished'",
    )
    .bind(id.to_string())
    .fetch_one(pool)
    .await
    .unwrap()
}

fn status_is(id: Uuid, status: &str) -> String {
    format!("SELECT count(*) FROM jobs WHERE id = '{id}' AND status = '{status}'")
}

const LEASE: [(&str, &str); 2] = [("CAIRN_JOBS_LEASE_SECS", "2"), ("CAIRN_JOBS_POLL_MS", "100")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_workers_job_is_taken_by_another_once_its_lease_runs_out() {
    let env = TestEnv::new();
    let client = client();
    let mut a = Serve::start(&env, &LEASE);
    a.wait_ready(&client).await;
    let pool = PgPool::connect(&env.database_url).await.unwrap();

    // A job that takes 3 s is running on A.
    let id = enqueue_noop(&pool, 3000).await;
    wait_count(&pool, &status_is(id, "running"), 1, Duration::from_secs(20)).await;

    // A dies mid-job; B starts.
    signal(&a, "-KILL");
    let _ = a.child.wait();
    let mut b = Serve::start(&env, &LEASE);
    b.wait_ready(&client).await;

    // B frees the job when the lease runs out, runs it and finishes it: once, on its second attempt.
    wait_count(&pool, &status_is(id, "done"), 1, Duration::from_secs(30)).await;
    let (_, attempts, fence, _) = job_row(&pool, id).await;
    assert_eq!((attempts, fence), (2, 2));
    let errors: serde_json::Value =
        sqlx::query_scalar("SELECT errors FROM jobs WHERE id = $1").bind(id).fetch_one(&pool).await.unwrap();
    assert_eq!(errors.as_array().map(Vec::len), Some(1), "{errors}");
    assert_eq!(errors[0]["error"], "lease expired (worker lost)");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(finished_count(&pool, id).await, 1);

    drop(b);
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_that_lost_its_lease_cannot_record_the_jobs_outcome() {
    let env = TestEnv::new();
    let client = client();
    let mut a = Serve::start(&env, &LEASE);
    a.wait_ready(&client).await;
    let pool = PgPool::connect(&env.database_url).await.unwrap();

    // A runs a 4 s job; B is up beside it.
    let id = enqueue_noop(&pool, 4000).await;
    wait_count(&pool, &status_is(id, "running"), 1, Duration::from_secs(20)).await;
    let (_, _, first_fence, a_owner) = job_row(&pool, id).await;
    let mut b = Serve::start(&env, &LEASE);
    b.wait_ready(&client).await;

    // A is paused past its lease: B frees the job, takes it with a new fence and finishes it.
    signal(&a, "-STOP");
    wait_count(&pool, &status_is(id, "done"), 1, Duration::from_secs(30)).await;
    let (_, attempts, fence, _) = job_row(&pool, id).await;
    assert_eq!(attempts, 2);
    assert!(fence > first_fence, "B's lease has a new fence");
    let id_text = id.to_string();
    let refused = |log: String| log.lines().any(|l| l.contains(&id_text) && l.contains("refused"));
    assert!(!refused(a.log()), "A was paused; it cannot have refused anything yet");

    // A resumes: whatever it tries to record for its old lease is refused, and logged.
    signal(&a, "-CONT");
    let started = Instant::now();
    while !refused(a.log()) {
        assert!(started.elapsed() < Duration::from_secs(20), "A logged no refusal: {}", a.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, attempts_after, fence_after, _) = job_row(&pool, id).await;
    assert_eq!((status.as_str(), attempts_after, fence_after), ("done", 2, fence), "the row keeps B's outcome");
    assert_eq!(finished_count(&pool, id).await, 1);
    let refusal =
        a.log().lines().find(|l| l.contains(&id_text) && l.contains("refused")).unwrap_or_default().to_owned();
    assert!(refusal.contains(&first_fence.to_string()), "the refusal names A's fence: {refusal}");
    assert!(a_owner.is_some());

    drop(a);
    drop(b);
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_short_jobs_hands_long_ones_back_and_runs_every_job_once() {
    let env = TestEnv::new();
    let client = client();
    // A 3 s grace, and the default 30 s lease: a job the stopping process did not hand back would
    // not run again within this test.
    let settings = [("CAIRN_SHUTDOWN_GRACE_SECS", "3"), ("CAIRN_JOBS_POLL_MS", "100")];
    let mut a = Serve::start(&env, &settings);
    a.wait_ready(&client).await;
    let pool = PgPool::connect(&env.database_url).await.unwrap();

    // Five jobs that finish within the grace period and three that cannot, all running on A.
    let mut short = Vec::new();
    let mut long = Vec::new();
    for _ in 0..5 {
        short.push(enqueue_noop(&pool, 1500).await);
    }
    for _ in 0..3 {
        long.push(enqueue_noop(&pool, 8000).await);
    }
    wait_count(&pool, "SELECT count(*) FROM jobs WHERE status = 'running'", 8, Duration::from_secs(20)).await;

    // SIGTERM: A exits within its grace period and a margin, successfully.
    let signalled = Instant::now();
    signal(&a, "-TERM");
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(8), "still running 8 s after SIGTERM: {}", a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}: {}", a.log());

    // The short ones are done, once; the long ones are queued again, their attempt not counted.
    for id in &short {
        let (status, attempts, _, _) = job_row(&pool, *id).await;
        assert_eq!((status.as_str(), attempts), ("done", 1), "short job {id}");
        assert_eq!(finished_count(&pool, *id).await, 1);
    }
    for id in &long {
        let (status, attempts, _, owner) = job_row(&pool, *id).await;
        assert_eq!((status.as_str(), attempts, owner), ("queued", 0, None), "long job {id}");
        assert_eq!(finished_count(&pool, *id).await, 0);
    }

    // The next process runs them at once (not after a lease), each once.
    let mut b = Serve::start(&env, &settings);
    b.wait_ready(&client).await;
    wait_count(&pool, "SELECT count(*) FROM jobs WHERE status = 'done'", 8, Duration::from_secs(30)).await;
    for id in &long {
        let (_, attempts, fence, _) = job_row(&pool, *id).await;
        assert_eq!((attempts, fence), (1, 2), "long job {id}: one counted attempt, two leases");
        assert_eq!(finished_count(&pool, *id).await, 1);
    }
    let finished: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'JobFinished'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(finished, 8);

    drop(b);
    pool.close().await;
    env.cleanup().await;
}
