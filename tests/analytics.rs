//! The analytics projection and summary: events filed under known UTC days give the expected
//! series and DAU/WAU/MAU (a user active on several days counted once); a rebuild gives the same
//! rows; a redelivered event is not counted twice; the rollup stores what the live count gives and
//! notices a day that changed; bad ranges are refused naming the field.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn::Services;
use cairn_platform::clock::Clock;
use cairn_platform::nats::Namespace;
use cairn_workers::jobs::JobHandler;
use chrono::{DateTime, NaiveDate, Utc};
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SETTINGS: &[(&str, &str)] = &[("CAIRN_VERIFIED_EMAIL_FOR", "none")];
const WAIT: Duration = Duration::from_secs(30);

fn at(day: &str, time: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(&format!("{day}T{time}Z")).unwrap().with_timezone(&Utc)
}

fn date(day: &str) -> NaiveDate {
    NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap()
}

/// Appends an event with SQL, recorded at `recorded_at`, as if the command side had written it then.
async fn append_at(
    pool: &PgPool,
    aggregate_type: &str,
    id: &str,
    event_type: &str,
    body: Value,
    recorded_at: DateTime<Utc>,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at) \
         VALUES ($1, $2, (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2), \
                 $3, '1', jsonb_build_object($3::text, $4::jsonb), '{}', $5) RETURNING event_id",
    )
    .bind(aggregate_type)
    .bind(id)
    .bind(event_type)
    .bind(body)
    .bind(recorded_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A sign-in of `user` at `when`; returns the session's id.
async fn sign_in(pool: &PgPool, user: Uuid, when: DateTime<Utc>) -> String {
    let session = Uuid::new_v4().to_string();
    let body = json!({
        "user_id": user, "session_version": 1, "refresh_hash": "h", "started_at": when,
        "expires_at": when + chrono::Duration::days(30), "device": null, "ip": null,
    });
    append_at(pool, "Session", &session, "SessionStarted", body, when).await;
    session
}

async fn refresh(pool: &PgPool, session: &str, when: DateTime<Utc>) {
    append_at(
        pool,
        "Session",
        session,
        "SessionRefreshed",
        json!({ "refresh_hash": "h2", "at": when, "ip": null }),
        when,
    )
    .await;
}

async fn registered(pool: &PgPool, when: DateTime<Utc>) {
    let id = Uuid::new_v4();
    let body = json!({ "email": format!("{}@example.com", id.simple()), "display_name": "R" });
    append_at(pool, "User", &id.to_string(), "UserRegistered", body, when).await;
}

async fn message(pool: &PgPool, when: DateTime<Utc>) {
    let body = json!({ "room_id": Uuid::new_v4(), "author_id": Uuid::new_v4(), "body": "hi", "client_id": null, "attachments": [] });
    append_at(pool, "Message", &Uuid::new_v4().to_string(), "MessageSent", body, when).await;
}

async fn upload(pool: &PgPool, size: u64, when: DateTime<Utc>) {
    // The upload in flight that FileUploaded completes (the quota trigger requires one).
    let (file, owner) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO file_uploads (file_id, owner_id, backend, storage_key, started_at) VALUES ($1, $2, 'local', 'k', $3)")
        .bind(file)
        .bind(owner)
        .bind(when)
        .execute(pool)
        .await
        .unwrap();
    let body = json!({ "owner_id": owner, "name": "a.bin", "size": size, "content_type": "application/octet-stream",
                       "sha256": "00", "visibility": "private", "backend": "local", "key": "k" });
    append_at(pool, "File", &file.to_string(), "FileUploaded", body, when).await;
}

async fn job_finished(pool: &PgPool, outcome: &str, when: DateTime<Utc>) {
    let job = Uuid::new_v4();
    let body = json!({ "job_id": job, "kind": "noop", "outcome": outcome, "attempts": 1, "finished_at": when });
    append_at(pool, "Job", &job.to_string(), "JobFinished", body, when).await;
}

async fn scalar(pool: &PgPool, query: &str) -> i64 {
    sqlx::query_scalar(query).fetch_one(pool).await.unwrap()
}

/// Every row of the projection's tables, in order, as text.
async fn rows(pool: &PgPool) -> (Vec<String>, Vec<String>) {
    let daily = sqlx::query_scalar("SELECT d::text FROM analytics_daily d ORDER BY day").fetch_all(pool).await.unwrap();
    let active = sqlx::query_scalar("SELECT a::text FROM analytics_active a ORDER BY day, user_id")
        .fetch_all(pool)
        .await
        .unwrap();
    (daily, active)
}

async fn summary(app: &TestApp, token: &str, query: &str) -> Value {
    let reply = app.get(&format!("/api/v1/analytics/summary{query}"), Some(token)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.data().clone()
}

fn day_of<'a>(summary: &'a Value, day: &str) -> &'a Value {
    summary["days"].as_array().unwrap().iter().find(|d| d["day"] == day).unwrap()
}

fn window(summary: &Value) -> (i64, i64, i64) {
    (summary["dau"].as_i64().unwrap(), summary["wau"].as_i64().unwrap(), summary["mau"].as_i64().unwrap())
}

/// Users A, B, C, D and E with sign-ins and refreshes on known days of May and June 2025, plus
/// sign-ups, messages, uploads and finished jobs.
async fn write_history(pool: &PgPool) -> [Uuid; 4] {
    let [a, b, c, d] = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    registered(pool, at("2025-06-01", "00:00:00")).await;
    registered(pool, at("2025-06-01", "23:59:59.999")).await;
    registered(pool, at("2025-06-03", "12:00:00")).await;
    // C signs in on May 20 and is back by a refresh of that session on June 26.
    let c_session = sign_in(pool, c, at("2025-05-20", "08:00:00")).await;
    // A twice on June 1 (counted once that day), on June 5 by a refresh, and on June 28.
    let a_session = sign_in(pool, a, at("2025-06-01", "09:00:00")).await;
    sign_in(pool, a, at("2025-06-01", "18:00:00")).await;
    refresh(pool, &a_session, at("2025-06-05", "07:00:00")).await;
    sign_in(pool, b, at("2025-06-01", "10:00:00")).await;
    refresh(pool, &c_session, at("2025-06-26", "22:00:00")).await;
    sign_in(pool, a, at("2025-06-28", "00:00:01")).await;
    sign_in(pool, d, at("2025-06-30", "23:00:00")).await;
    for _ in 0..3 {
        message(pool, at("2025-06-05", "13:00:00")).await;
    }
    upload(pool, 100, at("2025-06-05", "14:00:00")).await;
    upload(pool, 250, at("2025-06-05", "15:00:00")).await;
    job_finished(pool, "done", at("2025-06-30", "01:00:00")).await;
    job_finished(pool, "failed", at("2025-06-30", "02:00:00")).await;
    job_finished(pool, "dead", at("2025-07-01", "00:00:00")).await;
    [a, b, c, d]
}

/// Waits until the projection has counted the whole history (the last event written counts a job).
async fn wait_projected(app: &TestApp) {
    app.wait_count("SELECT coalesce(sum(jobs_run), 0)::bigint FROM analytics_daily", 3, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_series_and_active_users_follow_the_log_and_a_rebuild_gives_the_same_rows() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), SETTINGS).await;
    let (_, admin) = app.admin_token().await;
    let june = "?from=2025-06-01&to=2025-06-30";

    // Nothing is counted before the events exist, while today's sign-up and sign-in (the admin's,
    // through the API) are: the projection is running.
    let before = summary(&app, &admin, june).await;
    assert_eq!(before["days"].as_array().unwrap().len(), 30);
    assert!(before["days"].as_array().unwrap().iter().all(|d| d["signups"] == 0 && d["active_users"] == 0));
    assert_eq!(window(&before), (0, 0, 0));
    let user = app.register_ok("today@example.com").await;
    let _ = app.login("today@example.com").await;
    let today = app.clock.now().date_naive().to_string();
    app.wait_count(
        &format!("SELECT coalesce(sum(active_users), 0)::bigint FROM analytics_daily WHERE day = '{today}'"),
        2,
        WAIT,
    )
    .await;
    let now = summary(&app, &admin, "").await;
    assert_eq!(now["days"].as_array().unwrap().len(), 30);
    assert_eq!(now["to"], today.as_str());
    let counted_today = day_of(&now, &today);
    assert_eq!((counted_today["signups"].as_i64(), counted_today["active_users"].as_i64()), (Some(2), Some(2)));
    assert_eq!(window(&now), (2, 2, 2));
    assert_eq!(scalar(&app.pool, &format!("SELECT count(*) FROM analytics_active WHERE user_id = '{user}'")).await, 1);

    write_history(&app.pool).await;
    wait_projected(&app).await;

    let june_now = summary(&app, &admin, june).await;
    assert_eq!((june_now["from"].as_str(), june_now["to"].as_str()), (Some("2025-06-01"), Some("2025-06-30")));
    let days = june_now["days"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(days[0]["day"], "2025-06-01");
    assert_eq!(days[29]["day"], "2025-06-30");
    let first = day_of(&june_now, "2025-06-01");
    assert_eq!((first["signups"].as_i64(), first["active_users"].as_i64()), (Some(2), Some(2)));
    assert_eq!(day_of(&june_now, "2025-06-03")["signups"], 1);
    let fifth = day_of(&june_now, "2025-06-05");
    assert_eq!(
        (
            fifth["active_users"].as_i64(),
            fifth["messages_sent"].as_i64(),
            fifth["files_uploaded"].as_i64(),
            fifth["bytes_uploaded"].as_i64()
        ),
        (Some(1), Some(3), Some(2), Some(350))
    );
    assert_eq!(day_of(&june_now, "2025-06-26")["active_users"], 1);
    let last = day_of(&june_now, "2025-06-30");
    assert_eq!(
        (last["jobs_run"].as_i64(), last["jobs_failed"].as_i64(), last["active_users"].as_i64()),
        (Some(2), Some(1), Some(1))
    );
    // A quiet day is there, as zeros.
    let quiet = day_of(&june_now, "2025-06-15");
    for field in
        ["signups", "active_users", "messages_sent", "files_uploaded", "bytes_uploaded", "jobs_run", "jobs_failed"]
    {
        assert_eq!(quiet[field], 0, "{field}");
    }
    // As of June 30: D that day; A (28th), C (26th) and D that week; A, B, C and D that month,
    // A once although active on three days.
    assert_eq!(window(&june_now), (1, 3, 4));
    // As of June 5: A; A and B over May 30 to June 5; and C of May 20 within the month.
    assert_eq!(window(&summary(&app, &admin, "?from=2025-06-05&to=2025-06-05").await), (1, 2, 3));
    // The dead job of July 1 is on its own day.
    let july = summary(&app, &admin, "?from=2025-07-01&to=2025-07-01").await;
    assert_eq!((july["days"][0]["jobs_run"].as_i64(), july["days"][0]["jobs_failed"].as_i64()), (Some(1), Some(1)));

    // Rebuilt from the log by the operator command: the same rows, row for row.
    let live = rows(&app.pool).await;
    let output = app.env.command(&["replay", "--projection", "analytics"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("rebuilt analytics"));
    assert_eq!(rows(&app.pool).await, live);
    assert_eq!(summary(&app, &admin, june).await, june_now);

    // Live counting goes on after the rebuild, into the swapped-in tables.
    sign_in(&app.pool, Uuid::new_v4(), at("2025-06-30", "23:30:00")).await;
    app.wait_count("SELECT active_users FROM analytics_daily WHERE day = '2025-06-30'", 2, WAIT).await;
    assert_eq!(window(&summary(&app, &admin, june).await), (2, 4, 5));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivered_event_is_not_counted_twice() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), SETTINGS).await;
    message(&app.pool, at("2025-06-05", "13:00:00")).await;
    let user = Uuid::new_v4();
    let session = sign_in(&app.pool, user, at("2025-06-05", "14:00:00")).await;
    let uploaded = {
        upload(&app.pool, 4096, at("2025-06-05", "15:00:00")).await;
        sqlx::query_scalar::<_, Uuid>("SELECT event_id FROM events WHERE event_type = 'FileUploaded'")
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    app.wait_count("SELECT coalesce(sum(files_uploaded), 0)::bigint FROM analytics_daily", 1, WAIT).await;
    let counted = rows(&app.pool).await;
    assert_eq!(scalar(&app.pool, "SELECT bytes_uploaded FROM analytics_daily WHERE day = '2025-06-05'").await, 4096);

    // The same events again on the stream (as after a crash before the acknowledgement): under
    // new message ids so that the stream keeps them.
    let js = jetstream::new(async_nats::connect(&app.env.nats_url).await.unwrap());
    let ns = Namespace::new(&app.env.namespace);
    let mut last = 0;
    let started: Uuid = sqlx::query_scalar("SELECT event_id FROM events WHERE aggregate_id = $1")
        .bind(&session)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    for event_id in [started, uploaded] {
        let event = cairn_platform::envelope::load(&app.pool, event_id).await.unwrap().unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
        let subject = ns.event_subject(&event.aggregate_type, &event.event_type);
        let ack = js
            .publish_with_headers(subject, headers, serde_json::to_vec(&event).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
        last = ack.sequence;
    }
    // Wait until the projection has taken and acknowledged both copies.
    let stream = js.get_stream(ns.events_stream()).await.unwrap();
    let started = Instant::now();
    loop {
        let info = stream.consumer_info("projector_analytics").await.unwrap();
        if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the copies were never acknowledged: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows(&app.pool).await, counted);
    assert_eq!(scalar(&app.pool, "SELECT bytes_uploaded FROM analytics_daily WHERE day = '2025-06-05'").await, 4096);
    assert_eq!(scalar(&app.pool, "SELECT active_users FROM analytics_daily WHERE day = '2025-06-05'").await, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rollup_stores_what_the_live_count_gives_and_notices_a_day_that_changed() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), SETTINGS).await;
    let (_, admin) = app.admin_token().await;
    write_history(&app.pool).await;
    wait_projected(&app).await;
    let june = "?from=2025-06-01&to=2025-06-30";
    let live = summary(&app, &admin, june).await;
    assert_eq!(scalar(&app.pool, "SELECT count(*) FROM analytics_rollup").await, 0);

    // Run as the workers run it: through the handler, with the job's context.
    let handler = cairn_workers::jobs::kinds::AnalyticsRollup;
    let context = |clock: cairn_platform::clock::SharedClock| cairn_workers::jobs::JobContext {
        id: Uuid::new_v4(),
        kind: "analytics.rollup".to_owned(),
        args: json!({}),
        attempt: 1,
        max_attempts: 25,
        enqueued_at: Utc::now(),
        cancel: CancellationToken::new(),
        clock,
        pool: app.pool.clone(),
    };
    assert_eq!(handler.kind(), "analytics.rollup");
    handler.run(&context(app.clock.clone())).await.unwrap();

    // Every finished day from the first with figures, each equal to the live count; not today.
    let today = app.clock.now().date_naive();
    let first = date("2025-05-20");
    let stored = scalar(&app.pool, "SELECT count(*) FROM analytics_rollup").await;
    assert_eq!(stored, (today - first).num_days());
    assert_eq!(scalar(&app.pool, &format!("SELECT count(*) FROM analytics_rollup WHERE day >= '{today}'")).await, 0);
    let mut conn = app.pool.acquire().await.unwrap();
    let mut day = first;
    while day < date("2025-08-01") {
        let computed = cairn_platform::analytics::compute(&mut conn, day).await.unwrap();
        let rolled = cairn_platform::analytics::stored(&mut conn, day).await.unwrap();
        assert_eq!(rolled, Some(computed), "{day}");
        day = day.succ_opt().unwrap();
    }
    let june_30 = cairn_platform::analytics::stored(&mut conn, date("2025-06-30")).await.unwrap().unwrap();
    assert_eq!((june_30.dau, june_30.wau, june_30.mau), (1, 3, 4));
    drop(conn);
    assert_eq!(summary(&app, &admin, june).await, live);

    // Again: nothing to do.
    let cancel = CancellationToken::new();
    let now = app.clock.now();
    assert_eq!(cairn_workers::jobs::kinds::analytics::roll_up(&app.pool, now, &cancel).await.unwrap(), 0);

    // A sign-in filed late under June 29 makes the rows of June 29 to July 28 stale: the summary
    // counts live instead of reading them, and the next run stores them again.
    sign_in(&app.pool, Uuid::new_v4(), at("2025-06-29", "12:00:00")).await;
    app.wait_count("SELECT active_users FROM analytics_daily WHERE day = '2025-06-29'", 1, WAIT).await;
    let mut conn = app.pool.acquire().await.unwrap();
    assert_eq!(cairn_platform::analytics::stored(&mut conn, date("2025-06-30")).await.unwrap(), None);
    assert_eq!(window(&summary(&app, &admin, june).await), (1, 4, 5));
    assert_eq!(cairn_workers::jobs::kinds::analytics::roll_up(&app.pool, now, &cancel).await.unwrap(), 30);
    let june_30 = cairn_platform::analytics::stored(&mut conn, date("2025-06-30")).await.unwrap().unwrap();
    assert_eq!((june_30.dau, june_30.wau, june_30.mau), (1, 4, 5));
    assert_eq!(cairn_platform::analytics::stored(&mut conn, date("2025-06-28")).await.unwrap().map(|w| w.mau), Some(3));
    drop(conn);

    // The next day, yesterday is finished: the job, run by the application's workers, rolls it up.
    let before = scalar(&app.pool, "SELECT count(*) FROM analytics_rollup").await;
    app.clock.advance(Duration::from_secs(24 * 3600));
    let mut tx = app.pool.begin().await.unwrap();
    let job = cairn_platform::jobs::NewJob::new("analytics.rollup", json!({}));
    let enqueued = cairn_platform::jobs::enqueue(&mut tx, &job, app.clock.now()).await.unwrap();
    tx.commit().await.unwrap();
    app.wait_count(&format!("SELECT count(*) FROM jobs WHERE id = '{}' AND status = 'done'", enqueued.id), 1, WAIT)
        .await;
    assert_eq!(scalar(&app.pool, "SELECT count(*) FROM analytics_rollup").await, before + 1);
    assert_eq!(cairn_workers::jobs::kinds::analytics::roll_up(&app.pool, app.clock.now(), &cancel).await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_ranges_are_refused_naming_the_field() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), SETTINGS).await;
    let (_, admin) = app.admin_token().await;
    for (query, field) in [
        ("?from=2025-06-30&to=2025-06-01", "from"),
        ("?from=2025-02-30", "from"),
        ("?to=30/06/2025", "to"),
        ("?from=2024-01-01&to=2025-06-30", "from"),
        ("?to=", "to"),
    ] {
        let reply = app.get(&format!("/api/v1/analytics/summary{query}"), Some(&admin)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}: {:?}", reply.body);
        assert_eq!(reply.code(), "VALIDATION_FAILED", "{query}");
        assert!(reply.body["error"]["details"][field].is_string(), "{query}: {:?}", reply.body);
    }
    let unknown = app.get("/api/v1/analytics/summary?days=7", Some(&admin)).await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
    // The longest range allowed, 366 days, is answered in full.
    let year = summary(&app, &admin, "?from=2024-01-01&to=2024-12-31").await;
    assert_eq!(year["days"].as_array().unwrap().len(), 366);
    // A plain user may not read it.
    app.register_ok("plain@example.com").await;
    let plain = app.login("plain@example.com").await;
    let reply = app.get("/api/v1/analytics/summary", Some(&plain)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    app.stop().await;
}
