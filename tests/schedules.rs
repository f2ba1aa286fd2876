//! Cron schedules: each tick fired exactly once across two `cairn workers` processes, also when
//! one of them is killed half-way; the schedules API (define, list, redefine, delete, refusals);
//! and firing on the application's clock.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::app::Services;
use chrono::{DateTime, Utc};
use common::{free_port, TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// A `cairn workers` child process, killed if the test ends before it exits.
struct Workers {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl Workers {
    fn start(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = env
            .command(&["workers"])
            .env("CAIRN_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "info")
            .envs(extra.iter().copied())
            // The logs go to standard output; errors at start to standard error.
            .stdout(append(log.path()))
            .stderr(append(log.path()))
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn append(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().append(true).open(path).unwrap()
}

/// The ticks `name` has enqueued, from their idempotency keys, with how many jobs each has.
async fn ticks(pool: &PgPool, name: &str) -> Vec<(DateTime<Utc>, i64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, count(*) FROM jobs WHERE enqueued_by = $1 GROUP BY idempotency_key ORDER BY idempotency_key",
    )
    .bind(format!("schedule:{name}"))
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .map(|(key, n)| {
            let at = key.strip_prefix(&format!("schedule:{name}:")).unwrap();
            (DateTime::parse_from_rfc3339(at).unwrap().with_timezone(&Utc), n)
        })
        .collect()
}

async fn wait_ticks(pool: &PgPool, name: &str, at_least: usize, timeout: Duration, workers: &mut [&mut Workers]) {
    let started = Instant::now();
    loop {
        if ticks(pool, name).await.len() >= at_least {
            return;
        }
        for w in workers.iter_mut() {
            assert!(w.child.try_wait().unwrap().is_none(), "cairn workers exited: {}", w.log());
        }
        assert!(started.elapsed() < timeout, "fewer than {at_least} ticks of {name} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every tick from the first to the last, each exactly once.
fn assert_each_second_once(ticks: &[(DateTime<Utc>, i64)]) {
    assert!(ticks.iter().all(|(_, n)| *n == 1), "a tick has several jobs: {ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, chrono::Duration::seconds(1), "a gap or a duplicate between {pair:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_every_second_schedule_fires_each_tick_once_across_two_workers_even_when_one_dies() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schedules.json");
    std::fs::write(&file, r#"[{"name": "every-second", "cron": "* * * * * *", "kind": "noop"}]"#).unwrap();
    let file = file.display().to_string();
    let extra = [("CAIRN_SCHEDULES_FILE", file.as_str()), ("CAIRN_JOBS_POLL_MS", "200")];
    // The first creates and migrates the database; the second starts once it is there.
    let mut a = Workers::start(&env, &extra);
    let started = Instant::now();
    let pool = loop {
        if let Ok(pool) = PgPool::connect(&env.database_url).await {
            let ready: Option<i64> = sqlx::query_scalar("SELECT count(*) FROM schedules WHERE name = 'every-second'")
                .fetch_one(&pool)
                .await
                .ok();
            if ready == Some(1) {
                break pool;
            }
        }
        assert!(a.child.try_wait().unwrap().is_none(), "cairn workers exited: {}", a.log());
        assert!(started.elapsed() < Duration::from_secs(60), "the schedule was never written: {}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut b = Workers::start(&env, &extra);
    while !b.log().contains("schedules from configuration written") {
        assert!(b.child.try_wait().unwrap().is_none(), "cairn workers exited: {}", b.log());
        assert!(started.elapsed() < Duration::from_secs(60), "the second worker never started: {}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The built-ins are written by the same start.
    let sources: Vec<(String, String)> =
        sqlx::query_as("SELECT name, source FROM schedules ORDER BY name").fetch_all(&pool).await.unwrap();
    assert!(sources.contains(&("every-second".to_owned(), "config".to_owned())), "{sources:?}");
    assert!(sources.contains(&("sessions.purge".to_owned(), "builtin".to_owned())), "{sources:?}");

    // Half the run with both processes firing.
    wait_ticks(&pool, "every-second", 5, Duration::from_secs(30), &mut [&mut a, &mut b]).await;
    let before = ticks(&pool, "every-second").await;
    assert_each_second_once(&before);
    a.sigkill();
    let killed_at = Utc::now();
    // The other half with one, which takes over whatever the dead one held.
    wait_ticks(&pool, "every-second", before.len() + 5, Duration::from_secs(30), &mut [&mut b]).await;
    let after = ticks(&pool, "every-second").await;
    assert!(after.len() >= 10, "{after:?}");
    assert!(after.last().unwrap().0 > killed_at, "nothing fired after the kill: {after:?}");
    assert_each_second_once(&after);
    // No tick was found enqueued already by a second firing.
    for (name, log) in [("a", a.log()), ("b", b.log())] {
        assert!(!log.contains("tick was enqueued already"), "worker {name} fired a tick twice: {log}");
    }
    let (last_fired, last_job): (Option<DateTime<Utc>>, Option<Uuid>) =
        sqlx::query_as("SELECT last_fired_at, last_job_id FROM schedules WHERE name = 'every-second'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(last_fired.is_some() && last_job.is_some());
    drop(a);
    drop(b);
    pool.close().await;
    env.cleanup().await;
}

async fn operator(app: &TestApp) -> String {
    let (_, admin) = app.admin_token().await;
    let email = format!("op-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let id = app.register_ok(&email).await;
    let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({ "role": "operator" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    app.login(&email).await
}

fn find<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|s| s["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schedules_are_defined_listed_redefined_and_removed_over_the_api() {
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_JOBS_POLL_MS", "100")],
    )
    .await;
    let token = operator(&app).await;
    // The built-ins are there, written by the worker at start.
    common::wait_count(
        &app.pool,
        "SELECT count(*) FROM schedules WHERE source = 'builtin'",
        3,
        Duration::from_secs(30),
    )
    .await;

    let defined = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "paris-morning", "cron": "0 0 9 * * *", "timezone": "Europe/Paris", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(defined.status, StatusCode::CREATED, "{:?}", defined.body);
    let list = app.get("/api/v1/schedules", Some(&token)).await;
    assert_eq!(list.status, StatusCode::OK, "{:?}", list.body);
    let paris = find(list.data(), "paris-morning").unwrap();
    assert_eq!((paris["source"].as_str(), paris["timezone"].as_str()), (Some("api"), Some("Europe/Paris")));
    // 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    let next: DateTime<Utc> = paris["next_run_at"].as_str().unwrap().parse().unwrap();
    assert!(
        next.format("%M:%S").to_string() == "00:00"
            && [7, 8].contains(&next.format("%H").to_string().parse::<u32>().unwrap()),
        "{next}"
    );
    assert_eq!(find(list.data(), "files.sweep").unwrap()["source"], "builtin");

    // The same definition again: unchanged, nothing recorded. A new one: redefined.
    let same = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "paris-morning", "cron": "0 0 9 * * *", "timezone": "Europe/Paris", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(same.status, StatusCode::OK);
    let redefined = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "paris-morning", "cron": "0 30 10 * * *", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(redefined.status, StatusCode::OK, "{:?}", redefined.body);
    let list = app.get("/api/v1/schedules", Some(&token)).await;
    let paris = find(list.data(), "paris-morning").unwrap();
    assert_eq!((paris["cron"].as_str(), paris["timezone"].as_str()), (Some("0 30 10 * * *"), Some("UTC")));
    let next: DateTime<Utc> = paris["next_run_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(next.format("%H:%M:%S").to_string(), "10:30:00");
    let events: Vec<String> = sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'Schedule' AND aggregate_id = 'paris-morning' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(events, ["ScheduleDefined", "ScheduleDefined"]);

    // Paging by name.
    let page = app.get("/api/v1/schedules?limit=2", Some(&token)).await;
    assert_eq!(page.data().as_array().unwrap().len(), 2);
    let cursor = page.body["meta"]["next_cursor"].as_str().unwrap().to_owned();
    let rest = app.get(&format!("/api/v1/schedules?limit=100&cursor={cursor}"), Some(&token)).await;
    assert_eq!(rest.data().as_array().unwrap().len(), 2, "{:?}", rest.body);

    // Refusals name the field.
    let bad = [
        (json!({ "name": "x", "cron": "* * *", "kind": "noop", "args": {} }), "cron"),
        (json!({ "name": "x", "cron": "61 * * * * *", "kind": "noop", "args": {} }), "cron"),
        (
            json!({ "name": "x", "cron": "* * * * *", "timezone": "Mars/Olympus", "kind": "noop", "args": {} }),
            "timezone",
        ),
        (json!({ "name": "Bad Name", "cron": "* * * * *", "kind": "noop", "args": {} }), "name"),
        (json!({ "name": "x", "cron": "* * * * *", "kind": "nope", "args": {} }), "kind"),
        (json!({ "name": "x", "cron": "* * * * *", "kind": "noop", "args": [] }), "args"),
    ];
    for (body, field) in bad {
        let reply = app.post("/api/v1/schedules", Some(&token), body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}: {:?}", reply.body);
        assert!(reply.body["error"]["details"][field].is_string(), "{body} should name {field}: {:?}", reply.body);
    }

    // A built-in cannot be removed or redefined over the API; an unknown one is not found.
    let builtin = app.request("DELETE", "/api/v1/schedules/files.sweep", Some(&token), None, &[]).await;
    assert_eq!(builtin.status, StatusCode::CONFLICT, "{:?}", builtin.body);
    assert!(builtin.body["error"]["message"].as_str().unwrap().contains("configuration"));
    let builtin = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "files.sweep", "cron": "* * * * *", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(builtin.status, StatusCode::CONFLICT);
    let unknown = app.request("DELETE", "/api/v1/schedules/never-defined", Some(&token), None, &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let removed = app.request("DELETE", "/api/v1/schedules/paris-morning", Some(&token), None, &[]).await;
    assert_eq!(removed.status, StatusCode::OK, "{:?}", removed.body);
    let list = app.get("/api/v1/schedules", Some(&token)).await;
    assert!(find(list.data(), "paris-morning").is_none());
    // Defined again after its removal: the log's sequence goes on.
    let again = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "paris-morning", "cron": "0 0 9 * * *", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{:?}", again.body);
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_type = 'Schedule' AND aggregate_id = 'paris-morning' ORDER BY sequence",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(sequences, [1, 2, 3, 4]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_fires_on_the_application_clock_and_catches_up_tick_by_tick() {
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_VERIFIED_EMAIL_FOR", "none"), ("CAIRN_JOBS_POLL_MS", "100")],
    )
    .await;
    let token = operator(&app).await;
    let defined = app
        .post(
            "/api/v1/schedules",
            Some(&token),
            json!({ "name": "minutely", "cron": "0 * * * * *", "kind": "noop", "args": {} }),
        )
        .await;
    assert_eq!(defined.status, StatusCode::CREATED, "{:?}", defined.body);
    let count = "SELECT count(*) FROM jobs WHERE enqueued_by = 'schedule:minutely'";
    let none: i64 = sqlx::query_scalar(count).fetch_one(&app.pool).await.unwrap();
    assert_eq!(none, 0);
    // Three minutes later: three ticks, one job each, on the minute.
    app.clock.advance(Duration::from_secs(180));
    common::wait_count(&app.pool, count, 3, Duration::from_secs(20)).await;
    let fired = ticks(&app.pool, "minutely").await;
    assert_eq!(fired.len(), 3);
    for pair in fired.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, chrono::Duration::minutes(1));
    }
    assert!(fired.iter().all(|(t, n)| *n == 1 && t.format("%S").to_string() == "00"), "{fired:?}");
    let list = app.get("/api/v1/schedules", Some(&token)).await;
    let minutely = find(list.data(), "minutely").unwrap();
    assert_eq!(minutely["last_fired_at"].as_str().map(|t| t.parse::<DateTime<Utc>>().unwrap()), Some(fired[2].0));
    // A job fired by a schedule names it.
    let job_id = minutely["last_job_id"].as_str().unwrap();
    let job = app.get(&format!("/api/v1/jobs/{job_id}"), Some(&token)).await;
    assert_eq!(job.data()["enqueued_by"], "schedule:minutely");
    // Two hours on: the ticks of the last hour are caught up, one job each; older ones are
    // skipped rather than run late in a burst. A pass is one transaction, so once the next tick
    // is in the future every tick of that pass is there.
    app.clock.advance(Duration::from_secs(2 * 3600));
    let caught_up =
        "SELECT count(*) FROM schedules WHERE name = 'minutely' AND next_run_at > now() + interval '1 hour'";
    common::wait_count(&app.pool, caught_up, 1, Duration::from_secs(20)).await;
    let fired = ticks(&app.pool, "minutely").await;
    assert_eq!(fired.len(), 3 + 60, "{fired:?}");
    let resumed = &fired[3..];
    assert!(resumed[0].0 - fired[2].0 >= chrono::Duration::minutes(61), "{fired:?}");
    for pair in resumed.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, chrono::Duration::minutes(1));
    }
    app.stop().await;
}
