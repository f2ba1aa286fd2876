//! Events a consumer cannot apply are parked, never retried for ever: the projection moves on,
//! operators see them and retry or skip them (both recorded as events), and events stored under
//! an older version are read in the current shape.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use cairn::Services;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::{self, EventBatchHandler, Namespace};
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Appends an event with SQL, as a newer release or a hand-written fix would.
async fn append_raw(
    pool: &PgPool,
    aggregate_type: &str,
    id: &str,
    event_type: &str,
    version: &str,
    body: Value,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ($1, $2, (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2), \
                 $3, $4, jsonb_build_object($3::text, $5::jsonb), '{}') RETURNING event_id",
    )
    .bind(aggregate_type)
    .bind(id)
    .bind(event_type)
    .bind(version)
    .bind(body)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_parked(pool: &PgPool, consumer: &str, event_id: Uuid) {
    common::wait_count(
        pool,
        &format!("SELECT count(*) FROM parked_events WHERE consumer = '{consumer}' AND event_id = '{event_id}'"),
        1,
        Duration::from_secs(20),
    )
    .await;
}

fn token_of(reply: &common::Reply) -> String {
    reply.body["meta"]["consistency_token"].as_str().unwrap().to_owned()
}

async fn get_consistent(app: &TestApp, path: &str, token: &str, consistency: &str) -> common::Reply {
    let reply = app.request("GET", path, Some(token), None, &[("X-Consistency-Token", consistency)]).await;
    assert_eq!(reply.body["meta"]["consistent"], json!(true), "{path}: {:?}", reply.body);
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_event_is_parked_the_projection_moves_on_and_operators_retry_or_skip_it() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    let victim = app.register_ok("victim@example.com").await;
    // Written by hand: a display name that is not a string cannot be read by this release.
    let bad =
        append_raw(&app.pool, "User", &victim.to_string(), "DisplayNameChanged", "1", json!({"display_name": 42}))
            .await;
    wait_parked(&app.pool, "users", bad).await;

    // The projection went on: a later command is readable with its consistency token.
    let reply = app.register("after@example.com").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let later = reply.data()["user_id"].as_str().unwrap().to_owned();
    get_consistent(&app, &format!("/api/v1/users/{later}"), &admin, &token_of(&reply)).await;

    let status = app.get("/api/v1/admin/projections", Some(&admin)).await;
    assert_eq!(status.status, StatusCode::OK, "{:?}", status.body);
    let users = status.data()["projections"].as_array().unwrap().iter().find(|p| p["name"] == "users").unwrap().clone();
    assert_eq!(users["parked"], 1);
    assert_eq!(users["state"], "live", "{users}");
    assert_eq!(users["lag_events"], 0);

    let parked = app.get("/api/v1/admin/projections/users/parked", Some(&admin)).await;
    let rows = parked.data().as_array().unwrap();
    assert_eq!(rows.len(), 1, "{:?}", parked.body);
    assert_eq!(rows[0]["event_id"], json!(bad));
    assert_eq!(rows[0]["event_type"], "DisplayNameChanged");
    assert!(rows[0]["error"].as_str().unwrap().contains("invalid type"), "{}", rows[0]["error"]);

    // The operator's command line shows the same.
    let overview = app.env.command(&["projections"]).output().unwrap();
    let text = String::from_utf8_lossy(&overview.stdout);
    assert!(overview.status.success(), "{}", String::from_utf8_lossy(&overview.stderr));
    let users_line = text.lines().find(|l| l.starts_with("users ")).unwrap_or_default();
    assert!(users_line.contains("live") && users_line.trim_end().ends_with('1'), "{text}");
    let listed = app.env.command(&["projections", "--parked", "users"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&bad.to_string()), "{listed:?}");

    // A retry that fails again leaves it parked, with one more attempt.
    let path = format!("/api/v1/admin/projections/users/parked/{bad}");
    let retry = app.post(&format!("{path}/retry"), Some(&admin), json!({})).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{:?}", retry.body);
    let after_retry = get_consistent(&app, "/api/v1/admin/projections/users/parked", &admin, &token_of(&retry)).await;
    assert_eq!(after_retry.data()[0]["attempts"], 2, "{:?}", after_retry.body);
    assert_eq!(after_retry.data()[0]["status"], "parked");

    // A skip is final, recorded with its reason.
    let skip = app.post(&format!("{path}/skip"), Some(&admin), json!({"reason": "hand-written by mistake"})).await;
    assert_eq!(skip.status, StatusCode::ACCEPTED, "{:?}", skip.body);
    let open = get_consistent(&app, "/api/v1/admin/projections/users/parked", &admin, &token_of(&skip)).await;
    assert_eq!(open.data().as_array().unwrap().len(), 0);
    let skipped = app.get("/api/v1/admin/projections/users/parked?status=skipped", Some(&admin)).await;
    assert_eq!(skipped.data()[0]["event_id"], json!(bad));
    let again = app.post(&format!("{path}/retry"), Some(&admin), json!({})).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "CONFLICT"));

    let decisions: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, metadata ->> 'actor_id' FROM events WHERE aggregate_type = 'ParkedEvent' ORDER BY global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let types: Vec<&str> = decisions.iter().map(|d| d.0.as_str()).collect();
    assert_eq!(types, ["ParkedEventRetryRequested", "ParkedEventSkipped"]);
    assert!(decisions.iter().all(|d| d.1.is_some()), "every decision names its operator");

    // Operators only; unknown consumers and events are told apart.
    let user = app.login("after@example.com").await;
    let refused = app.get("/api/v1/admin/projections", Some(&user)).await;
    assert_eq!((refused.status, refused.code()), (StatusCode::FORBIDDEN, "FORBIDDEN"));
    let unknown = app.get("/api/v1/admin/projections/nothing/parked", Some(&admin)).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    let missing = app
        .post(&format!("/api/v1/admin/projections/users/parked/{}/skip", Uuid::new_v4()), Some(&admin), json!({}))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_applies_the_parked_event_once_its_cause_is_fixed() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    // A stray row written into the read model by hand takes the address the next user registers.
    sqlx::query(
        "INSERT INTO users (id, email, display_name, status, created_at, updated_at, version) \
         VALUES (gen_random_uuid(), 'clash@example.com', 'stray', 'active', now(), now(), 1)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let reply = app.register("clash@example.com").await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let id = reply.data()["user_id"].as_str().unwrap().to_owned();
    let registered: Uuid =
        sqlx::query_scalar("SELECT event_id FROM events WHERE aggregate_id = $1 AND event_type = 'UserRegistered'")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    wait_parked(&app.pool, "users", registered).await;
    // Parked, so the user is not in the read model (an error answer carries no meta to check).
    let absent = app.get(&format!("/api/v1/users/{id}"), Some(&admin)).await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND);

    sqlx::query("DELETE FROM users WHERE display_name = 'stray'").execute(&app.pool).await.unwrap();
    let retry =
        app.post(&format!("/api/v1/admin/projections/users/parked/{registered}/retry"), Some(&admin), json!({})).await;
    assert_eq!(retry.status, StatusCode::ACCEPTED, "{:?}", retry.body);
    let present = get_consistent(&app, &format!("/api/v1/users/{id}"), &admin, &token_of(&retry)).await;
    assert_eq!(present.status, StatusCode::OK, "{:?}", present.body);
    assert_eq!(present.data()["email"], "clash@example.com");
    let resolved = app.get("/api/v1/admin/projections/users/parked?status=resolved", Some(&admin)).await;
    assert_eq!(resolved.data()[0]["event_id"], json!(registered));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_stored_under_an_older_version_is_read_in_the_current_shape() {
    let app = TestApp::spawn().await;
    let (_, admin) = app.admin_token().await;
    // Version 1 of UserRegistered did not carry roles: such a user held the seeded `user` role.
    let id = Uuid::new_v4();
    append_raw(
        &app.pool,
        "User",
        &id.to_string(),
        "UserRegistered",
        "1",
        json!({"email": "old@example.com", "display_name": "Old", "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"}),
    )
    .await;
    common::wait_count(&app.pool, &format!("SELECT count(*) FROM users WHERE id = '{id}'"), 1, Duration::from_secs(20))
        .await;
    let roles: Vec<String> =
        sqlx::query_scalar("SELECT roles FROM users WHERE id = $1").bind(id).fetch_one(&app.pool).await.unwrap();
    assert_eq!(roles, ["user"], "the projection read v1 as v2");

    // The aggregate reads it too: a command on that user loads its stream.
    let grant = app.post(&format!("/api/v1/users/{id}/roles"), Some(&admin), json!({"role": "auditor"})).await;
    assert_eq!(grant.status, StatusCode::OK, "{:?}", grant.body);
    let user = get_consistent(&app, &format!("/api/v1/users/{id}"), &admin, &token_of(&grant)).await;
    assert_eq!(user.data()["roles"], json!(["auditor", "user"]));
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(parked, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_session_map_parks_an_unreadable_session_ending_event_and_a_new_process_still_starts() {
    let app = TestApp::spawn().await;
    let user = app.register_ok("ending@example.com").await;
    let bad =
        append_raw(&app.pool, "User", &user.to_string(), "UserDeactivated", "1", json!({"session_version": "soon"}))
            .await;
    wait_parked(&app.pool, cairn_platform::auth::SESSION_MAP, bad).await;
    wait_parked(&app.pool, "users", bad).await;

    // Loading the session map from the log at start skips what it cannot read.
    let vars = app.env.vars();
    let email = cairn_workers::EmailSettings::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let second = cairn::Application::build_with_email(
        app.env.settings(&[]),
        Some(email),
        Services { query_api: true, ..Services::none() },
    )
    .await;
    assert!(second.is_ok(), "a second API process could not start: {:?}", second.err());
    app.stop().await;
}

/// A worker-style consumer that refuses `poison` for good and `flaky` twice for passing reasons.
#[derive(Clone, Default)]
struct Probe {
    applied: Arc<Mutex<Vec<String>>>,
    flaky_failures: Arc<Mutex<u32>>,
}

impl EventBatchHandler for Probe {
    async fn handle(&self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        for event in events {
            match event.aggregate_id.as_str() {
                "poison" => anyhow::bail!("this release cannot read {}", event.event_type),
                "flaky" => {
                    let mut failures = self.flaky_failures.lock().unwrap();
                    if *failures < 2 {
                        *failures += 1;
                        return Err(cairn_platform::failure::transient(anyhow::anyhow!("downstream away")));
                    }
                }
                _ => {}
            }
        }
        self.applied.lock().unwrap().extend(events.iter().map(|e| e.aggregate_id.clone()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_parks_what_it_can_never_apply_and_retries_what_will_pass() {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let js = jetstream::new(async_nats::connect(&env.nats_url).await.unwrap());
    let ns = Namespace::new(&env.namespace);
    let stream = nats::ensure_events_stream(&js, &ns, 1).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(cairn_relay::Relay::new(pool.clone(), js.clone(), ns.clone(), 100).run(shutdown.clone()));
    let consumer = nats::ensure_durable_consumer(&stream, "probe").await.unwrap();
    let probe = Probe::default();
    tokio::spawn(nats::consume(consumer, 10, probe.clone(), "probe", pool.clone(), shutdown.clone()));

    let mut ids = Vec::new();
    for name in ["a", "poison", "flaky", "b"] {
        ids.push(append_raw(&pool, "Probe", name, "Probed", "1", json!({})).await);
    }
    common::wait_until("a, flaky and b applied", Duration::from_secs(20), || {
        let applied = probe.applied.lock().unwrap();
        ["a", "flaky", "b"].iter().all(|n| applied.iter().any(|a| a == n))
    })
    .await;
    assert!(!probe.applied.lock().unwrap().iter().any(|a| a == "poison"));
    wait_parked(&pool, "probe", ids[1]).await;
    // Everything else was applied (observed above), and only the poison was parked.
    let parked: Vec<Uuid> = sqlx::query_scalar("SELECT event_id FROM parked_events WHERE consumer = 'probe'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(parked, [ids[1]]);
    assert_eq!(*probe.flaky_failures.lock().unwrap(), 2);
    shutdown.cancel();
    pool.close().await;
    env.cleanup().await;
}
