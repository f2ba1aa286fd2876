//! The relay against real Postgres and NATS: gap safety, what holds it back, re-sends after a
//! crash however long ago, refused publishes, one active relay and its failover.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope, EVENT_COLUMNS};
use cairn_platform::nats::{self, Namespace};
use cairn_relay::{HeldBack, Relay};
use common::{PrivateNats, TestEnv};
use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct Setup {
    env: TestEnv,
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
}

/// A relay running in this process.
struct RunningRelay {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    held_back: watch::Receiver<Option<HeldBack>>,
}

impl RunningRelay {
    /// Stops it and waits until it has let go of its lock and connection.
    async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap();
    }
}

async fn setup() -> Setup {
    setup_with(TestEnv::new(), None).await
}

/// With the EVENTS stream created beforehand with `duplicate_window` (kept by
/// `ensure_events_stream`, which creates the stream only when missing).
async fn setup_with(env: TestEnv, duplicate_window: Option<Duration>) -> Setup {
    common::quiet_logs();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let js = jetstream::new(nats::connect(&env.nats_url).await.unwrap());
    let ns = Namespace::new(&env.namespace);
    if let Some(duplicate_window) = duplicate_window {
        js.create_stream(stream::Config {
            name: ns.events_stream(),
            subjects: vec![ns.all_events()],
            storage: stream::StorageType::File,
            duplicate_window,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    nats::ensure_events_stream(&js, &ns, 1).await.unwrap();
    Setup { env, pool, js, ns }
}

impl Setup {
    fn start_relay(&self) -> RunningRelay {
        let token = CancellationToken::new();
        let relay = Relay::new(self.pool.clone(), self.js.clone(), self.ns.clone(), 100);
        let held_back = relay.held_back();
        let handle = tokio::spawn(relay.run(token.clone()));
        RunningRelay { token, handle, held_back }
    }

    async fn stream_len(&self) -> u64 {
        let mut stream = self.js.get_stream(self.ns.events_stream()).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    async fn wait_stream_len(&self, expected: u64) {
        let started = Instant::now();
        while self.stream_len().await != expected {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "stream stayed at {} messages, expected {expected}",
                self.stream_len().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn relay_checkpoint(&self) -> ConsistencyToken {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT last_tx::text::bigint, last_pos FROM relay_checkpoints WHERE name = $1")
                .bind(self.ns.as_str())
                .fetch_optional(&self.pool)
                .await
                .unwrap();
        row.map_or_else(ConsistencyToken::default, |(tx, pos)| ConsistencyToken { tx: tx as u64, pos })
    }

    /// Waits until the relay has published `at` and stored its checkpoint there (or past it).
    async fn wait_checkpoint(&self, at: ConsistencyToken) {
        let started = Instant::now();
        while self.relay_checkpoint().await < at {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "relay checkpoint stayed at {}, expected {at}",
                self.relay_checkpoint().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every message in the stream, in stream order.
    async fn published(&self) -> Vec<EventEnvelope> {
        let n = self.stream_len().await;
        let stream = self.js.get_stream(self.ns.events_stream()).await.unwrap();
        let consumer = stream.create_consumer(jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while (out.len() as u64) < n {
            let message =
                tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap().unwrap();
            out.push(serde_json::from_slice(&message.payload).unwrap());
        }
        out
    }

    /// The stream holds the log exactly: every event once, in the log's order, each naming the
    /// one before it.
    async fn assert_stream_is_the_log(&self) {
        let logged: Vec<(uuid::Uuid,)> =
            sqlx::query_as("SELECT event_id FROM events ORDER BY transaction_id, global_position")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let logged: Vec<uuid::Uuid> = logged.into_iter().map(|(id,)| id).collect();
        let published = self.published().await;
        let ids: Vec<uuid::Uuid> = published.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "an event is in the stream twice");
        assert_eq!(ids, logged, "the stream does not hold the log, once and in order");
        assert_chained(&published);
    }
}

/// Each event names the one before it, and positions only grow.
fn assert_chained(published: &[EventEnvelope]) {
    let mut previous = None;
    for event in published {
        if let Some(p) = previous {
            assert!(event.position() > p, "out of order");
            assert_eq!(event.previous(), p, "chain broken");
        }
        previous = Some(event.position());
    }
}

async fn append(conn: &mut PgConnection, aggregate_id: &str) -> ConsistencyToken {
    let (tx, pos): (i64, i64) = sqlx::query_as(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Probe', $1, 1, 'Probed', '1', '{\"Probed\": {}}', '{}') \
         RETURNING transaction_id::text::bigint, global_position",
    )
    .bind(aggregate_id)
    .fetch_one(conn)
    .await
    .unwrap();
    ConsistencyToken { tx: tx as u64, pos }
}

/// Waits until the relay reports being held back by backend `pid`.
async fn wait_held_back_by(held_back: &mut watch::Receiver<Option<HeldBack>>, pid: i32) -> HeldBack {
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        held_back.wait_for(|h| h.as_ref().and_then(|h| h.holder.as_ref()).is_some_and(|holder| holder.pid == pid)),
    )
    .await
    .unwrap_or_else(|_| panic!("the relay never reported being held back by backend {pid}"))
    .unwrap();
    report.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_commits_late_with_a_lower_position_is_not_skipped() {
    let s = setup().await;
    let mut relay = s.start_relay();
    // A comes from cairn's own pool, so its backend carries cairn's application name.
    let mut a = s.pool.begin().await.unwrap();
    let mut b = PgConnection::connect(&s.env.database_url).await.unwrap();

    // A takes the lower position and stays open; B takes a higher one and commits first.
    let pid_a: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *a).await.unwrap();
    let pos_a = append(&mut a, "a").await;
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    let pos_b = append(&mut b, "b").await;
    sqlx::query("COMMIT").execute(&mut b).await.unwrap();
    assert!(pos_a.pos < pos_b.pos);

    // B is committed, but publishing it now would let a position-tailing relay move past A for
    // ever. The relay has seen B and names A's backend as what holds it back.
    let report = wait_held_back_by(&mut relay.held_back, pid_a).await;
    let holder = report.holder.unwrap();
    assert_eq!(holder.application_name, cairn_platform::db::application_name());
    assert!(holder.state.starts_with("idle in transaction"), "{holder:?}");
    assert!(holder.query.len() <= 100, "{holder:?}");
    assert_eq!(s.stream_len().await, 0, "the relay published past a transaction still in flight");

    a.commit().await.unwrap();
    s.wait_stream_len(2).await;
    let published = s.published().await;
    let ids: Vec<&str> = published.iter().map(|e| e.aggregate_id.as_str()).collect();
    // The documented order is (transaction_id, global_position): A's transaction began first.
    assert_eq!(ids, ["a", "b"]);
    assert!(published[0].position() < published[1].position());
    assert_eq!(published[1].previous(), published[0].position());
    // Published: no longer held back.
    tokio::time::timeout(Duration::from_secs(10), relay.held_back.wait_for(Option::is_none)).await.unwrap().unwrap();

    relay.stop().await;
    s.env.cleanup().await;
}

/// Appends `n` events, lets a relay publish them, stops it and resets its checkpoint: as if it
/// had crashed after publishing but before storing the checkpoint. Returns a connection to append more.
async fn publish_then_crash_before_the_checkpoint(s: &Setup, n: u64) -> PgConnection {
    let relay = s.start_relay();
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    for i in 0..n {
        append(&mut conn, &format!("e{i}")).await;
    }
    s.wait_stream_len(n).await;
    relay.stop().await;
    sqlx::query("UPDATE relay_checkpoints SET last_tx = '0', last_pos = 0").execute(&s.pool).await.unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_restarted_behind_its_checkpoint_publishes_nothing_twice() {
    let s = setup().await;
    let mut conn = publish_then_crash_before_the_checkpoint(&s, 20).await;
    let relay = s.start_relay();
    let after = append(&mut conn, "after").await;
    s.wait_checkpoint(after).await;
    assert_eq!(s.stream_len().await, 21, "re-sent events were stored twice");
    s.assert_stream_is_the_log().await;
    relay.stop().await;
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_restarted_behind_its_checkpoint_after_the_duplicate_window_appends_nothing_twice() {
    let window = Duration::from_secs(1);
    let s = setup_with(TestEnv::new(), Some(window)).await;
    let mut conn = publish_then_crash_before_the_checkpoint(&s, 20).await;
    // The stream forgets message ids once they are older than its duplicate window: waiting past
    // the window is the condition under test (a re-send would now be stored again), not a guess.
    tokio::time::sleep(window + Duration::from_millis(500)).await;

    let relay = s.start_relay();
    let after = append(&mut conn, "after").await;
    s.wait_checkpoint(after).await;
    assert_eq!(s.stream_len().await, 21, "events published before the crash were appended again");
    s.assert_stream_is_the_log().await;
    relay.stop().await;
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_goes_on_after_the_broker_restarts_past_the_duplicate_window() {
    let mut broker = PrivateNats::start();
    let mut env = TestEnv::new();
    env.nats_url = broker.url();
    let window = Duration::from_secs(1);
    let s = setup_with(env, Some(window)).await;
    let relay = s.start_relay();
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    let mut last = ConsistencyToken::default();
    for i in 0..5 {
        last = append(&mut conn, &format!("e{i}")).await;
    }
    s.wait_checkpoint(last).await;

    // A nats-server restarted after its last message left the duplicate window no longer knows
    // that message's id (it still knows its sequence): waiting past the window is the condition.
    broker.stop();
    tokio::time::sleep(window + Duration::from_millis(500)).await;
    broker.restart();

    let after = append(&mut conn, "after").await;
    s.wait_checkpoint(after).await;
    s.assert_stream_is_the_log().await;
    relay.stop().await;
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_refused_because_another_publisher_got_there_first_is_reconciled_not_repeated() {
    let s = setup().await;
    let relay = s.start_relay();
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    let mut last = ConsistencyToken::default();
    for i in 0..5 {
        last = append(&mut conn, &format!("e{i}")).await;
    }
    s.wait_checkpoint(last).await;

    // Another publisher (an old tool, a relay from before the lock) sends the next event, without
    // its message id, before the relay sees it commit: the relay's chained publish is refused.
    let mut tx = s.pool.begin().await.unwrap();
    let next = append(&mut tx, "next").await;
    let row = sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE global_position = $1"))
        .bind(next.pos)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let mut event = cairn_platform::envelope::from_row(&row).unwrap();
    (event.previous_transaction_id, event.previous_global_position) = (last.tx, last.pos);
    let subject = s.ns.event_subject(&event.aggregate_type, &event.event_type);
    s.js.publish(subject, serde_json::to_vec(&event).unwrap().into()).await.unwrap().await.unwrap();
    tx.commit().await.unwrap();

    // The relay reconciles with the stream, finds `next` there, and goes on after it.
    s.wait_checkpoint(next).await;
    let after = append(&mut conn, "after").await;
    s.wait_checkpoint(after).await;
    assert_eq!(s.stream_len().await, 7);
    s.assert_stream_is_the_log().await;
    relay.stop().await;
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_publish_each_event_once_in_order() {
    let s = setup().await;
    let first = s.start_relay();
    let second = s.start_relay();
    let mut handles = Vec::new();
    for writer in 0..4 {
        let url = s.env.database_url.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            for i in 0..50 {
                append(&mut conn, &format!("w{writer}-{i}")).await;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    s.wait_stream_len(200).await;
    s.assert_stream_is_the_log().await;
    first.stop().await;
    second.stop().await;
    s.env.cleanup().await;
}

/// A `cairn relay` process, killed when dropped.
struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The OS pid of the process whose connection holds the relay's advisory lock in this database,
/// read from its backend's application name (`cairn relay <pid>`).
async fn lock_holder(pool: &PgPool) -> Option<u32> {
    let name: Option<String> = sqlx::query_scalar(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(pool)
    .await
    .unwrap();
    let name = name?;
    assert!(name.starts_with("cairn relay "), "the lock is held by {name:?}");
    name.rsplit(' ').next()?.parse().ok()
}

async fn wait_lock_holder(pool: &PgPool, among: &[u32]) -> u32 {
    let started = Instant::now();
    loop {
        if let Some(pid) = lock_holder(pool).await.filter(|pid| among.contains(pid)) {
            return pid;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no relay process of {among:?} took the lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standby_relay_process_takes_over_when_the_active_one_is_killed() {
    let s = setup().await;
    let spawn = || RelayProcess(s.env.command(&["relay"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let mut relays = vec![spawn(), spawn()];
    let pids: Vec<u32> = relays.iter().map(|r| r.0.id()).collect();

    // Writers append throughout; the active relay is killed while they do.
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let url = s.env.database_url.clone();
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                for i in 0..100 {
                    append(&mut conn, &format!("w{writer}-{i}")).await;
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    while s.stream_len().await < 50 {
        assert!(started.elapsed() < Duration::from_secs(30), "the relay processes published nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let active = wait_lock_holder(&s.pool, &pids).await;
    let at = relays.iter().position(|r| r.0.id() == active).unwrap();
    let mut killed = relays.remove(at);
    killed.0.kill().unwrap(); // SIGKILL: no goodbye, its connection just closes
    killed.0.wait().unwrap();
    let standby = relays[0].0.id();

    for w in writers {
        w.await.unwrap();
    }
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    let last = append(&mut conn, "last").await;
    assert_eq!(wait_lock_holder(&s.pool, &[standby]).await, standby);
    s.wait_checkpoint(last).await;
    assert_eq!(s.stream_len().await, 401);
    s.assert_stream_is_the_log().await;
    drop(relays);
    s.env.cleanup().await;
}
