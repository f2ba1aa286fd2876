//! The relay against real Postgres and NATS: gap safety, re-sends after a crash, one active relay.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use cairn_platform::envelope::EventEnvelope;
use cairn_platform::nats::{self, Namespace};
use cairn_relay::Relay;
use common::TestEnv;
use futures::StreamExt;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

struct Setup {
    env: TestEnv,
    pool: PgPool,
    js: jetstream::Context,
    ns: Namespace,
}

async fn setup() -> Setup {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 5).await.unwrap();
    let js = jetstream::new(async_nats::connect(&env.nats_url).await.unwrap());
    let ns = Namespace::new(&env.namespace);
    nats::ensure_events_stream(&js, &ns, 1).await.unwrap();
    Setup { env, pool, js, ns }
}

impl Setup {
    fn start_relay(&self) -> CancellationToken {
        let token = CancellationToken::new();
        tokio::spawn(Relay::new(self.pool.clone(), self.js.clone(), self.ns.clone(), 100).run(token.clone()));
        token
    }

    async fn stream_len(&self) -> u64 {
        let mut stream = self.js.get_stream(self.ns.events_stream()).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    async fn wait_stream_len(&self, expected: u64) {
        let started = Instant::now();
        while self.stream_len().await != expected {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "stream stayed at {} messages, expected {expected}",
                self.stream_len().await
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
}

async fn append(conn: &mut PgConnection, aggregate_id: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('Probe', $1, 1, 'Probed', '1', '{\"Probed\": {}}', '{}') RETURNING global_position",
    )
    .bind(aggregate_id)
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_that_commits_late_with_a_lower_position_is_not_skipped() {
    let s = setup().await;
    let relay = s.start_relay();
    let mut a = PgConnection::connect(&s.env.database_url).await.unwrap();
    let mut b = PgConnection::connect(&s.env.database_url).await.unwrap();

    // A takes the lower position and stays open; B takes a higher one and commits first.
    sqlx::query("BEGIN").execute(&mut a).await.unwrap();
    let pos_a = append(&mut a, "a").await;
    sqlx::query("BEGIN").execute(&mut b).await.unwrap();
    let pos_b = append(&mut b, "b").await;
    sqlx::query("COMMIT").execute(&mut b).await.unwrap();
    assert!(pos_a < pos_b);

    // B is committed, but publishing it now would let a position-tailing relay move past A for ever.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.stream_len().await, 0, "the relay published past a transaction still in flight");

    sqlx::query("COMMIT").execute(&mut a).await.unwrap();
    s.wait_stream_len(2).await;
    let published = s.published().await;
    let ids: Vec<&str> = published.iter().map(|e| e.aggregate_id.as_str()).collect();
    // The documented order is (transaction_id, global_position): A's transaction began first.
    assert_eq!(ids, ["a", "b"]);
    assert!(published[0].position() < published[1].position());
    assert_eq!(published[1].previous(), published[0].position());

    relay.cancel();
    s.env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_restarted_behind_its_checkpoint_publishes_nothing_twice() {
    let s = setup().await;
    let relay = s.start_relay();
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    for i in 0..20 {
        append(&mut conn, &format!("e{i}")).await;
    }
    s.wait_stream_len(20).await;
    relay.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // As if it crashed after publishing but before storing its checkpoint.
    sqlx::query("UPDATE relay_checkpoints SET last_tx = '0', last_pos = 0").execute(&s.pool).await.unwrap();
    let relay = s.start_relay();
    append(&mut conn, "after").await;
    s.wait_stream_len(21).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.stream_len().await, 21, "re-sent events were stored twice");
    let ids: Vec<String> = s.published().await.into_iter().map(|e| e.aggregate_id).collect();
    assert_eq!(ids.last().map(String::as_str), Some("after"));
    relay.cancel();
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
    // Kill the active one; the standby takes over and carries on.
    first.cancel();
    let mut conn = PgConnection::connect(&s.env.database_url).await.unwrap();
    for i in 0..10 {
        append(&mut conn, &format!("late{i}")).await;
    }
    s.wait_stream_len(210).await;
    let published = s.published().await;
    let mut previous = None;
    for event in &published {
        if let Some(p) = previous {
            assert!(event.position() > p, "out of order");
            assert_eq!(event.previous(), p, "chain broken");
        }
        previous = Some(event.position());
    }
    second.cancel();
    s.env.cleanup().await;
}
