//! `realtime`: chat messages from a send to every socket of the room, across two processes.
//!
//! Two `cairn serve` processes run against one Postgres and one NATS. 1,000 users (100 with
//! `--quick`) each join one of 10 public rooms over HTTP and open one WebSocket
//! (`GET /api/v1/ws`: `auth`, then `join`): user `u` is in room `u % 10` and on process
//! `(u / 10) % 2`, so every room has half its sockets on each process.
//!
//! Messages are sent open-loop at a steady rate (a ticker, not closed-loop), each from a member of
//! its room, in turn over HTTP (`POST /api/v1/rooms/{id}/messages`) and over the sender's socket
//! (a `send` frame), with both processes taking both kinds; users rotate, so at 400 messages/s
//! each sends 0.4 a second and the per-user message limit (5/s by default, left on) is not what
//! is measured. Every body carries its sequence number and its send time, so each receiver works
//! out the latency send → its own `message` frame. Every socket of the room, the sender's
//! included, must receive every message whose send was accepted exactly once: what is missing
//! once the sends settle is lost, what comes twice is duplicated.
//!
//! Rates are swept (50, 100, 200, 400 messages/s; `--quick`: 50), each a warm-up and a measured
//! window; only messages sent inside the window count towards latency and frames/s. Memory: the
//! resident set of both processes before the sockets connect and with them all open and idle,
//! whose difference per socket is the cost of an idle socket; and at the end of each rate.
//!
//! Baseline, measured right after with both processes stopped: the same fan-out over plain NATS
//! publish/subscribe (async-nats): one subscriber connection per socket, each subscribed to its
//! room's subject, and one publisher publishing payloads of the same shape and size (a `message`
//! frame) at the same rates, received and timed the same way.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{Ctx, Output, Running};
use crate::api::Api;
use crate::env::BenchEnv;
use crate::load::Window;
use crate::report::{Measure, Row};
use crate::seed;
use crate::service::{Memory, Service};
use crate::stats::Summary;

/// Rooms the sockets are spread over.
const ROOMS: usize = 10;
/// The goal: p99 at this rate.
const GOAL_RATE: u32 = 200;
/// The goal for the delivery p99, in ms.
const GOAL_P99_MS: f64 = 100.0;
/// The goal for an idle socket, in KiB.
const GOAL_KIB_PER_SOCKET: f64 = 50.0;
/// Sign-ins, joins and connections in flight at once during set-up.
const SETUP_CONCURRENCY: usize = 16;
/// How long, after the last send of a rate, acknowledgements and frames may still arrive.
const SETTLE: Duration = Duration::from_secs(10);
/// A socket's outbound queue in the bench (frames it has yet to write).
const OUTBOX: usize = 64;
/// The settings both processes run with: no permission needs a verified email (an empty value
/// means the default list, so the value names no permission).
const SERVICE_ENV: [(&str, &str); 1] = [("CAIRN_VERIFIED_EMAIL_FOR", "none")];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Microseconds since the run began: the clock every send time and receive time is read on.
struct Clock(Instant);

impl Clock {
    fn micros(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// How a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Via {
    Http,
    Socket,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent, not yet accepted (no 2xx or `ack` yet).
    Pending,
    /// Accepted: every socket of the room must receive it.
    Accepted,
    /// Refused or failed.
    Failed,
}

/// One message sent.
#[derive(Debug, Clone, Copy)]
struct Record {
    room: usize,
    user: usize,
    sent_us: u64,
    /// Sent inside the measured window.
    counted: bool,
    via: Via,
    state: State,
    /// When the 2xx or the `ack` came, µs.
    accepted_us: Option<u64>,
}

/// The messages of the rate being measured, and why sends failed.
#[derive(Default)]
struct Tracker {
    records: Mutex<HashMap<u64, Record>>,
    first_error: Mutex<Option<String>>,
}

impl Tracker {
    fn begin(&self, seq: u64, record: Record) {
        lock(&self.records).insert(seq, record);
    }

    fn accept(&self, seq: u64, now_us: u64) {
        if let Some(record) = lock(&self.records).get_mut(&seq) {
            if record.state == State::Pending {
                record.state = State::Accepted;
                record.accepted_us = Some(now_us);
            }
        }
    }

    fn fail(&self, seq: u64, error: String) {
        if let Some(record) = lock(&self.records).get_mut(&seq) {
            record.state = State::Failed;
        }
        lock(&self.first_error).get_or_insert(error);
    }

    fn pending(&self) -> usize {
        lock(&self.records).values().filter(|r| r.state == State::Pending).count()
    }

    /// Receptions expected so far: each accepted message once per member socket of its room.
    fn expected(&self, members: &[usize; ROOMS]) -> usize {
        lock(&self.records).values().filter(|r| r.state == State::Accepted).map(|r| members[r.room]).sum()
    }

    fn take(&self) -> (HashMap<u64, Record>, Option<String>) {
        (std::mem::take(&mut *lock(&self.records)), lock(&self.first_error).take())
    }
}

/// What one receiver got.
#[derive(Default)]
struct Inbox {
    /// `(sequence, latency µs)` of every message frame, in arrival order.
    received: Vec<(u64, u32)>,
    /// Why the connection ended, if it did.
    closed: Option<String>,
    /// `error` frames not about a send, and frames that were not JSON.
    errors: u64,
    first_error: Option<String>,
}

impl Inbox {
    fn error(&mut self, error: String) {
        self.errors += 1;
        self.first_error.get_or_insert(error);
    }
}

/// A socket or a NATS subscriber, in its room.
struct Receiver {
    room: usize,
    /// The process its socket is on (0 for the baseline).
    process: usize,
    inbox: Arc<Mutex<Inbox>>,
}

/// The part of a server frame the bench reads; the rest is skipped unparsed.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

/// The body of message `seq` sent at `sent_us`.
fn body_of(seq: u64, sent_us: u64) -> String {
    format!("bench {seq} {sent_us}")
}

fn parse_body(body: &str) -> Option<(u64, u64)> {
    let mut words = body.strip_prefix("bench ")?.split(' ');
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// The `client_id` of message `seq`: a UUID whose low half is the sequence number.
fn client_id_of(run: u64, seq: u64) -> String {
    Uuid::from_u64_pair(run, seq).to_string()
}

fn seq_of(client_id: &str) -> Option<u64> {
    Uuid::parse_str(client_id).ok().map(|id| id.as_u64_pair().1)
}

/// Handles one text frame a receiver got.
fn on_frame(text: &str, clock: &Clock, inbox: &Mutex<Inbox>, tracker: &Tracker) {
    let now = clock.micros();
    let frame = match serde_json::from_str::<Frame<'_>>(text) {
        Ok(frame) => frame,
        Err(e) => {
            lock(inbox).error(format!("a frame that is not JSON ({e}): {}", &text[..text.len().min(200)]));
            return;
        }
    };
    match frame.kind.as_ref() {
        "message" => {
            if let Some((seq, sent)) = frame.body.as_deref().and_then(parse_body) {
                let latency = u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX);
                lock(inbox).received.push((seq, latency));
            }
        }
        "ack" => {
            if let Some(seq) = frame.client_id.as_deref().and_then(seq_of) {
                tracker.accept(seq, now);
            }
        }
        "error" => {
            let why = format!(
                "error frame {}: {}",
                frame.code.as_deref().unwrap_or("?"),
                frame.message.as_deref().unwrap_or("")
            );
            match frame.client_id.as_deref().and_then(seq_of) {
                Some(seq) => tracker.fail(seq, why),
                None => lock(inbox).error(why),
            }
        }
        // Presence, membership, typing, pong: not what is measured.
        _ => {}
    }
}

/// One open socket of one user.
struct Socket {
    outbox: mpsc::Sender<String>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Socket {
    /// Connects, authenticates with `token` and joins `room`, then reads frames into `inbox` until
    /// closed.
    async fn open(
        url: &str,
        token: &str,
        room: Uuid,
        clock: Arc<Clock>,
        inbox: Arc<Mutex<Inbox>>,
        tracker: Arc<Tracker>,
    ) -> anyhow::Result<Self> {
        // Small buffers: a thousand clients share this process.
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .with_context(|| format!("cannot open {url}"))?;
        let (mut sink, mut stream) = ws.split();
        sink.send(Message::text(json!({ "type": "auth", "token": token }).to_string())).await?;
        let (kind, code) = next_reply(&mut stream, &["ready", "error"]).await?;
        if kind != "ready" {
            bail!("auth refused: {}", code.unwrap_or_default());
        }
        // The rooms projection may not have applied the join yet: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            sink.send(Message::text(json!({ "type": "join", "room_id": room }).to_string())).await?;
            let (kind, code) = next_reply(&mut stream, &["joined", "error"]).await?;
            if kind == "joined" {
                break;
            }
            if Instant::now() > deadline {
                bail!("join refused: {}", code.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let reader = tokio::spawn(async move {
            let why = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => on_frame(text.as_str(), &clock, &inbox, &tracker),
                    Some(Ok(Message::Close(frame))) => {
                        break frame.map_or_else(
                            || "closed".to_owned(),
                            |f| format!("closed {} {}", u16::from(f.code), f.reason.as_str()),
                        )
                    }
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("read failed: {e}"),
                    None => break "ended".to_owned(),
                }
            };
            lock(&inbox).closed = Some(why);
        });
        let (outbox, mut queue) = mpsc::channel::<String>(OUTBOX);
        let writer = tokio::spawn(async move {
            while let Some(text) = queue.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        Ok(Self { outbox, reader, writer })
    }

    /// Sends a close frame and stops reading.
    async fn close(self) {
        drop(self.outbox);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.writer).await;
        self.reader.abort();
    }
}

/// Reads frames until one of type in `kinds`; returns its type and its `code`, if any.
async fn next_reply<S>(stream: &mut S, kinds: &[&str]) -> anyhow::Result<(String, Option<String>)>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .with_context(|| format!("no {kinds:?} frame within 15 s"))?;
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Frame<'_> = serde_json::from_str(text.as_str()).context("a frame that is not JSON")?;
                if kinds.contains(&frame.kind.as_ref()) {
                    let code = frame.code.map(|c| format!("{c}: {}", frame.message.as_deref().unwrap_or("")));
                    return Ok((frame.kind.into_owned(), code));
                }
            }
            Some(Ok(Message::Close(frame))) => bail!("the socket was closed: {frame:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("the socket failed: {e}"),
            None => bail!("the socket ended"),
        }
    }
}

/// A message to send now.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    seq: u64,
    user: usize,
    room: usize,
    via: Via,
    sent_us: u64,
}

/// What one rate measured.
#[derive(Debug, Clone, Default)]
struct RateStats {
    /// Messages sent in the measured window.
    sent: usize,
    /// Message frames of those received per second of the window.
    frames_per_s: f64,
    /// Latency send → each receiver's frame, of messages sent in the window.
    latency: Option<Summary>,
    by_via: Vec<(Via, Option<Summary>)>,
    /// Latency by (process sent through, process received on).
    by_route: Vec<((usize, usize), Option<Summary>)>,
    /// Send → 2xx or `ack`, by way.
    accepted: Vec<(Via, Option<Summary>)>,
    /// Sends refused or never accepted, over the whole rate (warm-up included).
    errors: u64,
    first_error: Option<String>,
    /// Receptions missing, duplicated, and of messages whose send was not accepted.
    lost: u64,
    duplicated: u64,
    unexpected: u64,
    /// Receptions missing on sockets the server had closed (counted apart from `lost`: a client
    /// closed for being slow reconnects with `after` and gets them then).
    missed_on_closed: u64,
    /// Receivers whose connection ended.
    closed: usize,
    first_closed: Option<String>,
    /// Error frames not about a send.
    receiver_errors: u64,
    memory: Option<Memory>,
    /// CPU of both processes, in percent of one core.
    cpu_percent: Option<f64>,
    /// CPU of this process (senders and receivers), in percent of one core.
    bench_cpu_percent: Option<f64>,
}

/// Which user sends message `k`, in which room and how: rooms in turn, the room's members in
/// turn; the way alternates in pairs so each way goes through both processes.
fn plan(k: u64, users: usize, via_socket: bool) -> (usize, usize, Via) {
    let k = k as usize;
    let room = k % ROOMS;
    let round = k / ROOMS;
    let members = users.div_ceil(ROOMS).max(1);
    let mut user = room + ROOMS * (round % members);
    if user >= users {
        user = room;
    }
    let via = if !via_socket {
        Via::Nats
    } else if (round / 2) % 2 == 0 {
        Via::Http
    } else {
        Via::Socket
    };
    (user, room, via)
}

/// Sends at `rate` through `window`, waits for the sends and frames to settle, and counts.
#[allow(clippy::too_many_arguments)]
async fn run_rate(
    rate: u32,
    phase: u64,
    window: Window,
    users: usize,
    clock: &Clock,
    tracker: &Tracker,
    receivers: &[Receiver],
    send: &(dyn Fn(Outgoing) + Sync),
    via_socket: bool,
) -> RateStats {
    let mut members = [0usize; ROOMS];
    for r in receivers {
        members[r.room] += 1;
        lock(&r.inbox).received.clear();
    }
    let start = Instant::now();
    let measure_from = start + window.warmup;
    let measure_to = measure_from + window.measure;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k = 0u64;
    loop {
        let tick = ticker.tick().await.into_std();
        if tick >= measure_to {
            break;
        }
        let (user, room, via) = plan(k, users, via_socket);
        let seq = (phase << 32) | k;
        k += 1;
        let sent_us = clock.micros();
        let counted = tick >= measure_from;
        tracker.begin(seq, Record { room, user, sent_us, counted, via, state: State::Pending, accepted_us: None });
        send(Outgoing { seq, user, room, via, sent_us });
    }
    // Settle: every send answered and every accepted message received everywhere, or time's up.
    let deadline = Instant::now() + SETTLE;
    loop {
        let received: usize = receivers.iter().map(|r| lock(&r.inbox).received.len()).sum();
        if tracker.pending() == 0 && received >= tracker.expected(&members) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Room for a late duplicate to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (records, first_error) = tracker.take();
    count(records, first_error, receivers, window)
}

fn count(
    records: HashMap<u64, Record>,
    first_error: Option<String>,
    receivers: &[Receiver],
    window: Window,
) -> RateStats {
    let mut stats = RateStats { first_error, ..RateStats::default() };
    let mut latencies = Vec::new();
    let mut by_via: HashMap<Via, Vec<Duration>> = HashMap::new();
    let mut by_route: std::collections::BTreeMap<(usize, usize), Vec<Duration>> = std::collections::BTreeMap::new();
    let mut accepted: HashMap<Via, Vec<Duration>> = HashMap::new();
    for record in records.values() {
        if record.counted {
            stats.sent += 1;
        }
        match (record.state, record.accepted_us) {
            (State::Accepted, Some(at)) if record.counted => {
                accepted.entry(record.via).or_default().push(Duration::from_micros(at.saturating_sub(record.sent_us)));
            }
            (State::Accepted, _) => {}
            (State::Pending | State::Failed, _) => stats.errors += 1,
        }
    }
    if stats.errors > 0 && stats.first_error.is_none() {
        stats.first_error = Some("a send was neither accepted nor refused in time".to_owned());
    }
    let mut counted_frames = 0usize;
    for receiver in receivers {
        let inbox = lock(&receiver.inbox);
        if let Some(why) = &inbox.closed {
            stats.closed += 1;
            stats.first_closed.get_or_insert_with(|| why.clone());
        }
        stats.receiver_errors += inbox.errors;
        let mut seen: HashMap<u64, u32> = HashMap::with_capacity(inbox.received.len());
        for &(seq, latency) in &inbox.received {
            let times = seen.entry(seq).or_default();
            *times += 1;
            if *times > 1 {
                stats.duplicated += 1;
                continue;
            }
            match records.get(&seq) {
                Some(record) if record.state == State::Accepted && record.room == receiver.room => {
                    if record.counted {
                        let latency = Duration::from_micros(u64::from(latency));
                        latencies.push(latency);
                        by_via.entry(record.via).or_default().push(latency);
                        by_route.entry((process_of(record.user), receiver.process)).or_default().push(latency);
                        counted_frames += 1;
                    }
                }
                _ => stats.unexpected += 1,
            }
        }
        for (seq, record) in &records {
            if record.state == State::Accepted && record.room == receiver.room && !seen.contains_key(seq) {
                if inbox.closed.is_some() {
                    stats.missed_on_closed += 1;
                } else {
                    stats.lost += 1;
                }
            }
        }
    }
    stats.frames_per_s = counted_frames as f64 / window.measure.as_secs_f64();
    stats.latency = Summary::of(&latencies);
    stats.by_route = by_route.iter().map(|(route, l)| (*route, Summary::of(l))).collect();
    for via in [Via::Http, Via::Socket, Via::Nats] {
        if let Some(l) = by_via.get(&via) {
            stats.by_via.push((via, Summary::of(l)));
        }
        if let Some(l) = accepted.get(&via) {
            stats.accepted.push((via, Summary::of(l)));
        }
    }
    stats
}

/// The two processes, their clients and the users' tokens.
struct Cairn {
    first: Running,
    second: Service,
    apis: [Api; 2],
    tokens: Vec<String>,
    rooms: Vec<Uuid>,
}

impl Cairn {
    fn memory(&self) -> Option<Memory> {
        let (a, b) = (self.first.service.memory().ok()?, self.second.memory().ok()?);
        Some(Memory { peak_mib: a.peak_mib + b.peak_mib, rss_mib: a.rss_mib + b.rss_mib })
    }

    fn cpu_seconds(&self, ticks: f64) -> Option<f64> {
        let a = crate::service::cpu_seconds_of(self.first.service.pid(), ticks).ok()?;
        let b = crate::service::cpu_seconds_of(self.second.pid(), ticks).ok()?;
        Some(a + b)
    }
}

/// The process user `u` talks to.
fn process_of(user: usize) -> usize {
    (user / ROOMS) % 2
}

/// A password hash with small argon2 parameters, so a thousand sign-ins take seconds: sign-in is
/// not what this scenario measures (the service verifies with the parameters the hash names).
fn cheap_hash() -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(1024, 1, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(Uuid::new_v4().as_bytes()).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    argon2.hash_password(seed::PASSWORD.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs `jobs` with at most `limit` in flight; the first error wins.
async fn bounded<T, F>(jobs: Vec<F>, limit: usize) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<(usize, T)>>,
{
    let mut results: Vec<Option<T>> = Vec::new();
    results.resize_with(jobs.len(), || None);
    let mut pending = jobs.into_iter();
    let mut running = FuturesUnordered::new();
    for job in pending.by_ref().take(limit) {
        running.push(job);
    }
    while let Some(done) = running.next().await {
        let (i, value) = done?;
        results[i] = Some(value);
        if let Some(job) = pending.next() {
            running.push(job);
        }
    }
    results.into_iter().map(|r| r.context("a set-up job did not finish")).collect()
}

/// Seeds the users, starts both processes, creates the rooms, signs everyone in and joins them.
async fn set_up(env: &BenchEnv, users: usize, out: &mut Output) -> anyhow::Result<Cairn> {
    let hash = cheap_hash()?;
    let spec = seed::Users { label: "chat", users, events_per_user: 1, chunk_events: 5_000, password_hash: &hash };
    seed::users(&env.pool, &spec).await?;
    let first = Running::start(env, &SERVICE_ENV).await?;
    let second = Service::start(env, &SERVICE_ENV).await?;
    let apis = [first.api.clone(), Api::new(&second.base_url)?];
    seed::wait_projected(&env.pool, Duration::from_secs(120)).await?;
    let mut rooms = Vec::with_capacity(ROOMS);
    for r in 0..ROOMS {
        rooms.push(first.api.create_room(&first.admin_token, &format!("bench room {r}")).await?);
    }
    let started = Instant::now();
    let logins = (0..users).map(|u| {
        let (api, email) = (apis[process_of(u)].clone(), spec.email(u));
        async move {
            let token = api.login(&email, seed::PASSWORD).await.with_context(|| format!("signing {email} in"))?;
            anyhow::Ok((u, token))
        }
    });
    let tokens = bounded(logins.collect(), SETUP_CONCURRENCY).await?;
    let signed_in = started.elapsed();
    // One room's joins one after another (they append to the room's stream), the rooms at once.
    let joins = (0..ROOMS).map(|r| {
        let (apis, tokens, room) = (apis.clone(), &tokens, rooms[r]);
        async move {
            for u in (r..users).step_by(ROOMS) {
                let mut tries = 0;
                loop {
                    match apis[process_of(u)].join_room(&tokens[u], room).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 && e.to_string().contains("409") => tries += 1,
                        Err(e) => return Err(e.context(format!("user {u} joining room {r}"))),
                    }
                }
            }
            anyhow::Ok((r, ()))
        }
    });
    bounded(joins.collect(), ROOMS).await?;
    // The rooms projection has applied every join (and each room's owner) before sockets join.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let members: i64 = sqlx::query_scalar("SELECT count(*) FROM room_members").fetch_one(&env.pool).await?;
        if members as usize >= users + ROOMS {
            break;
        }
        if Instant::now() > deadline {
            bail!("the rooms projection shows {members} members of {} within 120 s", users + ROOMS);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.note(format!(
        "{users} users signed in in {:.1} s (a cheap argon2 hash: sign-in is not measured) and joined {ROOMS} \
         public rooms over HTTP in {:.1} s",
        signed_in.as_secs_f64(),
        (started.elapsed() - signed_in).as_secs_f64()
    ));
    Ok(Cairn { first, second, apis, tokens, rooms })
}

/// Opens every user's socket on its process, `SETUP_CONCURRENCY` at a time.
async fn open_sockets(
    cairn: &Cairn,
    clock: &Arc<Clock>,
    tracker: &Arc<Tracker>,
) -> anyhow::Result<(Vec<Socket>, Vec<Receiver>)> {
    let urls: Vec<String> =
        cairn.apis_base().iter().map(|b| format!("{}/api/v1/ws", b.replacen("http", "ws", 1))).collect();
    let mut receivers = Vec::with_capacity(cairn.tokens.len());
    let mut jobs = Vec::with_capacity(cairn.tokens.len());
    for (u, token) in cairn.tokens.iter().enumerate() {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        receivers.push(Receiver { room: u % ROOMS, process: process_of(u), inbox: inbox.clone() });
        let (url, room, clock, tracker) =
            (&urls[process_of(u)], cairn.rooms[u % ROOMS], clock.clone(), tracker.clone());
        jobs.push(async move {
            let socket = Socket::open(url, token, room, clock, inbox, tracker)
                .await
                .with_context(|| format!("socket of user {u}"))?;
            anyhow::Ok((u, socket))
        });
    }
    let sockets = bounded(jobs, SETUP_CONCURRENCY).await?;
    Ok((sockets, receivers))
}

impl Cairn {
    fn apis_base(&self) -> [String; 2] {
        [self.first.service.base_url.clone(), self.second.base_url.clone()]
    }
}

/// What the cairn half measured.
struct CairnRun {
    idle_before: Option<Memory>,
    idle_with_sockets: Option<Memory>,
    connect_seconds: f64,
    bench_rss_mib: Option<f64>,
    rates: Vec<(u32, RateStats)>,
}

async fn measure_cairn(ctx: &Ctx, cairn: &Cairn, rates: &[u32], window: Window) -> anyhow::Result<CairnRun> {
    let users = cairn.tokens.len();
    let clock = Arc::new(Clock(Instant::now()));
    let tracker = Arc::new(Tracker::default());
    // Idle before: nothing in flight for a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_before = cairn.memory();
    let started = Instant::now();
    let (sockets, receivers) = open_sockets(cairn, &clock, &tracker).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    // Idle with the sockets open: presence and membership frames have settled.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_with_sockets = cairn.memory();
    let bench_rss_mib = crate::service::memory_of(std::process::id()).ok().map(|m| m.rss_mib);

    let outboxes: Vec<mpsc::Sender<String>> = sockets.iter().map(|s| s.outbox.clone()).collect();
    let run = uuid::Uuid::new_v4().as_u64_pair().0;
    let (apis, tokens, rooms) = (cairn.apis.clone(), Arc::new(cairn.tokens.clone()), Arc::new(cairn.rooms.clone()));
    let send = {
        let (clock, tracker) = (clock.clone(), tracker.clone());
        move |m: Outgoing| {
            let client_id = client_id_of(run, m.seq);
            let body = body_of(m.seq, m.sent_us);
            match m.via {
                Via::Socket => {
                    let frame =
                        json!({ "type": "send", "room_id": rooms[m.room], "body": body, "client_id": client_id });
                    if let Err(e) = outboxes[m.user].try_send(frame.to_string()) {
                        tracker.fail(m.seq, format!("the bench could not queue a send frame: {e}"));
                    }
                }
                Via::Http | Via::Nats => {
                    let (api, tokens, rooms) = (apis[process_of(m.user)].clone(), tokens.clone(), rooms.clone());
                    let (clock, tracker) = (clock.clone(), tracker.clone());
                    tokio::spawn(async move {
                        match api.send_message(&tokens[m.user], rooms[m.room], &body, &client_id).await {
                            Ok(()) => tracker.accept(m.seq, clock.micros()),
                            Err(e) => tracker.fail(m.seq, format!("POST messages: {e:#}")),
                        }
                    });
                }
            }
        }
    };
    let mut results = Vec::new();
    for (phase, &rate) in rates.iter().enumerate() {
        crate::report::note(&format!("realtime: cairn at {rate} messages/s"));
        let cpu_before = cairn.cpu_seconds(ctx.ticks);
        let bench_before = own_cpu_seconds(ctx);
        let began = Instant::now();
        let mut stats =
            run_rate(rate, phase as u64 + 1, window, users, &clock, &tracker, &receivers, &send, true).await;
        let seconds = began.elapsed().as_secs_f64();
        stats.bench_cpu_percent = Some((own_cpu_seconds(ctx) - bench_before) / seconds * 100.0);
        stats.memory = cairn.memory();
        stats.cpu_percent = match (cpu_before, cairn.cpu_seconds(ctx.ticks)) {
            (Some(a), Some(b)) => Some((b - a) / seconds * 100.0),
            _ => None,
        };
        results.push((rate, stats));
    }
    // The send closure holds the sockets' queues: drop it, so each writer sends its close frame.
    drop(send);
    futures::future::join_all(sockets.into_iter().map(Socket::close)).await;
    Ok(CairnRun { idle_before, idle_with_sockets, connect_seconds, bench_rss_mib, rates: results })
}

/// CPU time this process has used, in seconds.
fn own_cpu_seconds(ctx: &Ctx) -> f64 {
    crate::service::cpu_seconds_of(std::process::id(), ctx.ticks).unwrap_or(0.0)
}

/// The same fan-out over plain NATS: one connection per receiver, one publisher.
async fn measure_nats(
    ctx: &Ctx,
    env: &BenchEnv,
    users: usize,
    rates: &[u32],
    window: Window,
) -> anyhow::Result<Vec<(u32, RateStats)>> {
    let clock = Arc::new(Clock(Instant::now()));
    let tracker = Arc::new(Tracker::default());
    let subject = |room: usize| format!("benchrt.{}.room.{room}", env.namespace);
    let mut receivers = Vec::with_capacity(users);
    let mut jobs = Vec::with_capacity(users);
    for u in 0..users {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        receivers.push(Receiver { room: u % ROOMS, process: 0, inbox: inbox.clone() });
        let (subject, clock, tracker) = (subject(u % ROOMS), clock.clone(), tracker.clone());
        jobs.push(async move {
            let client = async_nats::ConnectOptions::new()
                .read_buffer_capacity(4096)
                .connect(crate::env::nats_url())
                .await
                .context("a baseline subscriber cannot connect")?;
            let mut subscription = client.subscribe(subject).await?;
            // Subscribed before any publish: the server has seen the SUB once a flush returns.
            client.flush().await?;
            let task = tokio::spawn(async move {
                while let Some(message) = subscription.next().await {
                    match std::str::from_utf8(&message.payload) {
                        Ok(text) => on_frame(text, &clock, &inbox, &tracker),
                        Err(_) => lock(&inbox).error("a payload that is not UTF-8".to_owned()),
                    }
                }
                lock(&inbox).closed = Some("subscription ended".to_owned());
            });
            anyhow::Ok((u, (client, task)))
        });
    }
    let subscribers = bounded(jobs, SETUP_CONCURRENCY).await?;
    let publisher = async_nats::ConnectOptions::new().connect(crate::env::nats_url()).await?;
    let run = uuid::Uuid::new_v4().as_u64_pair().0;
    let send = {
        let (clock, tracker) = (clock.clone(), tracker.clone());
        move |m: Outgoing| {
            // The frame a socket gets for this message, with the same fields and sizes.
            let frame = json!({
                "type": "message",
                "id": Uuid::now_v7(),
                "room_id": Uuid::from_u64_pair(run, m.room as u64),
                "author_id": Uuid::from_u64_pair(run, m.user as u64),
                "body": body_of(m.seq, m.sent_us),
                "client_id": client_id_of(run, m.seq),
                "attachments": [],
                "position": format!("{}.{}", 100_000 + m.seq, 200_000 + m.seq),
                "created_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "edited_at": null,
                "deleted_at": null,
            });
            let (publisher, subject, clock, tracker) =
                (publisher.clone(), subject(m.room), clock.clone(), tracker.clone());
            tokio::spawn(async move {
                match publisher.publish(subject, frame.to_string().into()).await {
                    Ok(()) => tracker.accept(m.seq, clock.micros()),
                    Err(e) => tracker.fail(m.seq, format!("publish: {e}")),
                }
            });
        }
    };
    let mut results = Vec::new();
    for (phase, &rate) in rates.iter().enumerate() {
        crate::report::note(&format!("realtime: NATS baseline at {rate} messages/s"));
        let bench_before = own_cpu_seconds(ctx);
        let began = Instant::now();
        let mut stats =
            run_rate(rate, phase as u64 + 1, window, users, &clock, &tracker, &receivers, &send, false).await;
        stats.bench_cpu_percent = Some((own_cpu_seconds(ctx) - bench_before) / began.elapsed().as_secs_f64() * 100.0);
        results.push((rate, stats));
    }
    for (client, task) in subscribers {
        task.abort();
        drop(client);
    }
    Ok(results)
}

fn via_name(via: Via) -> &'static str {
    match via {
        Via::Http => "http",
        Via::Socket => "socket",
        Via::Nats => "nats",
    }
}

fn summary_json(summary: Option<Summary>) -> serde_json::Value {
    serde_json::to_value(summary).unwrap_or(serde_json::Value::Null)
}

/// Runs the scenario.
///
/// # Errors
/// When set-up fails, a socket cannot be opened, or nothing was delivered.
pub async fn run(ctx: &Ctx, env: &BenchEnv, out: &mut Output) -> anyhow::Result<()> {
    let users = ctx.pick(100, 1_000);
    let rates: Vec<u32> = ctx.pick(vec![50], vec![50, 100, 200, 400]);
    let window = ctx.pick(
        Window { warmup: Duration::from_millis(500), measure: Duration::from_secs(2) },
        Window { warmup: Duration::from_secs(2), measure: Duration::from_secs(10) },
    );
    let cairn = set_up(env, users, out).await?;
    let measured = measure_cairn(ctx, &cairn, &rates, window).await;
    let Cairn { first, second, .. } = cairn;
    let stopped = (first.service.stop().await, second.stop().await);
    let measured = measured?;
    stopped.0?;
    stopped.1?;
    let baseline = measure_nats(ctx, env, users, &rates, window).await?;

    out.note(format!(
        "{users} sockets, one per user, over 2 `cairn serve` processes (half each) and {ROOMS} public rooms \
         ({} per room); per-user message limit at its default (each user sends at most {:.1} messages/s)",
        users / ROOMS,
        f64::from(rates.iter().copied().max().unwrap_or(0)) / users as f64
    ));
    out.note(format!(
        "each rate: {:.1} s warm-up, {:.0} s measured, sent open-loop, alternately over HTTP and socket `send`; \
         latency = send → each receiver's `message` frame (all receivers, the sender's socket included); \
         lost/duplicated counted over the whole rate; ratio = cairn p99 ÷ NATS p99 (lower is better)",
        window.warmup.as_secs_f64(),
        window.measure.as_secs_f64()
    ));
    out.note(format!(
        "baseline: {users} NATS connections, one subscription each on its room's subject, one publisher connection; \
         payload = the `message` frame of the same message; measured after both processes stopped"
    ));
    out.note(format!(
        "{users} sockets opened (auth + join) in {:.1} s; the bench's own RSS with them open: {:.1} MiB",
        measured.connect_seconds,
        measured.bench_rss_mib.unwrap_or(0.0)
    ));

    if let (Some(before), Some(with)) = (measured.idle_before, measured.idle_with_sockets) {
        out.rows.push(
            Row::new("RSS of both processes, idle, before the sockets", Measure::rate(before.rss_mib, "MiB", None))
                .memory(Some(before)),
        );
        out.rows.push(
            Row::new(
                format!("RSS of both processes, {users} idle sockets open"),
                Measure::rate(with.rss_mib, "MiB", None),
            )
            .memory(Some(with)),
        );
        let per_socket = (with.rss_mib - before.rss_mib) * 1024.0 / users as f64;
        out.rows.push(
            Row::new("memory per idle socket (RSS with ÷ before, per socket)", Measure::rate(per_socket, "KiB", None))
                .memory(Some(with))
                .target(&format!("< {GOAL_KIB_PER_SOCKET} KiB"), per_socket < GOAL_KIB_PER_SOCKET),
        );
    }

    let mut saturated_at = None;
    let mut best = None;
    let mut delivered_any = false;
    for ((rate, cairn), (_, nats)) in measured.rates.iter().zip(&baseline) {
        let frames = *rate as usize * users / ROOMS;
        let clean = cairn.errors == 0
            && cairn.lost == 0
            && cairn.duplicated == 0
            && cairn.closed == 0
            && cairn.missed_on_closed == 0;
        let met = clean && cairn.latency.is_some_and(|l| l.p99_ms <= GOAL_P99_MS);
        delivered_any |= cairn.latency.is_some();
        if met && saturated_at.is_none() {
            best = Some(*rate);
        } else if !met && saturated_at.is_none() {
            saturated_at = Some(*rate);
        }
        let mut row = Row::new(
            format!("send → every receiver, {rate} messages/s ({frames} frames/s offered)"),
            Measure::rate(cairn.frames_per_s, "frames/s", cairn.latency),
        )
        .errors(cairn.errors)
        .memory(cairn.memory)
        .baseline(
            format!("NATS pub/sub, {users} connections"),
            Measure::rate(nats.frames_per_s, "frames/s", nats.latency),
        )
        .target(
            &format!(
                "p99 <= {GOAL_P99_MS} ms, none lost or duplicated{}",
                if *rate == GOAL_RATE { " (the goal)" } else { "" }
            ),
            met,
        )
        .extra("messages_sent_in_window", cairn.sent as u64)
        .extra("lost", cairn.lost)
        .extra("duplicated", cairn.duplicated)
        .extra("received_not_accepted", cairn.unexpected)
        .extra("missed_on_closed_sockets", cairn.missed_on_closed)
        .extra("sockets_closed", cairn.closed as u64)
        .extra("socket_error_frames", cairn.receiver_errors)
        .extra("baseline_lost", nats.lost)
        .extra("baseline_duplicated", nats.duplicated)
        .extra("baseline_errors", nats.errors);
        if let (Some(c), Some(n)) = (cairn.latency, nats.latency) {
            if n.p99_ms > 0.0 {
                row = row.ratio(c.p99_ms / n.p99_ms);
            }
        }
        for (via, summary) in &cairn.by_via {
            row = row.extra(&format!("latency_sent_over_{}", via_name(*via)), summary_json(*summary));
        }
        for (via, summary) in &cairn.accepted {
            row = row.extra(&format!("send_to_accepted_over_{}", via_name(*via)), summary_json(*summary));
        }
        if let Some(cpu) = cairn.cpu_percent {
            row = row.extra("service_cpu_percent_both", cpu);
        }
        if let Some(cpu) = cairn.bench_cpu_percent {
            row = row.extra("bench_cpu_percent", cpu);
        }
        if let Some(cpu) = nats.bench_cpu_percent {
            row = row.extra("baseline_bench_cpu_percent", cpu);
        }
        if let Some(e) = &cairn.first_error {
            row = row.extra("first_error", e.clone());
            out.note(format!("{rate} messages/s: {} sends failed; first: {e}", cairn.errors));
        }
        if let Some(why) = &cairn.first_closed {
            out.note(format!(
                "{rate} messages/s: {} sockets closed by the server (first: {why}); {} receptions missing on them, \
                 not counted as lost",
                cairn.closed, cairn.missed_on_closed
            ));
        }
        if cairn.lost > 0 || cairn.duplicated > 0 || cairn.unexpected > 0 {
            out.note(format!(
                "{rate} messages/s: {} receptions lost, {} duplicated, {} of messages whose send was not accepted",
                cairn.lost, cairn.duplicated, cairn.unexpected
            ));
        }
        let split: Vec<String> = cairn
            .by_via
            .iter()
            .chain(&cairn.accepted)
            .map(|(via, s)| format!("{} p99 {:.1} ms", via_name(*via), s.map_or(0.0, |s| s.p99_ms)))
            .collect();
        out.note(format!(
            "{rate} messages/s: {} sent in the window, {} receptions lost, {} duplicated (NATS: {} lost, {} \
             duplicated); delivery p99 by way sent, then send → 2xx/ack p99 by way: {}; CPU of both processes \
             {:.0} %, of the bench {:.0} % (in the baseline {:.0} %) of one core",
            cairn.sent,
            cairn.lost,
            cairn.duplicated,
            nats.lost,
            nats.duplicated,
            split.join(", "),
            cairn.cpu_percent.unwrap_or(0.0),
            cairn.bench_cpu_percent.unwrap_or(0.0),
            nats.bench_cpu_percent.unwrap_or(0.0)
        ));
        if !cairn.by_route.is_empty() {
            let routes: Vec<String> = cairn
                .by_route
                .iter()
                .map(|((from, to), s)| {
                    format!(
                        "sent through {} → socket on {}: p50 {:.1} / p99 {:.1} ms",
                        ["A", "B"][*from % 2],
                        ["A", "B"][*to % 2],
                        s.map_or(0.0, |s| s.p50_ms),
                        s.map_or(0.0, |s| s.p99_ms)
                    )
                })
                .collect();
            out.note(format!("{rate} messages/s by process (A, B): {}", routes.join("; ")));
        }
        out.rows.push(row);
    }
    out.rows.push(
        Row::new(
            "highest rate with p99 <= 100 ms and nothing lost, duplicated or refused",
            Measure::rate(f64::from(best.unwrap_or(0)), "messages/s", None),
        )
        .extra("first_rate_missing_it", saturated_at.map_or(serde_json::Value::Null, serde_json::Value::from)),
    );
    match saturated_at {
        Some(rate) => {
            out.note(format!("saturation: the first rate missing p99 <= 100 ms or clean delivery is {rate} messages/s"))
        }
        None => out.note("saturation: not reached at the rates swept".to_owned()),
    }
    if !delivered_any {
        bail!("no message frame arrived at any rate");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_client_ids_round_trip() {
        assert_eq!(parse_body(&body_of(42, 1_234_567)), Some((42, 1_234_567)));
        assert_eq!(parse_body("hello"), None);
        assert_eq!(seq_of(&client_id_of(7, (3 << 32) | 9)), Some((3 << 32) | 9));
    }

    #[test]
    fn the_plan_covers_every_room_and_both_ways_on_both_processes() {
        let users = 100;
        let mut seen = std::collections::HashSet::new();
        for k in 0..400 {
            let (user, room, via) = plan(k, users, true);
            assert_eq!(user % ROOMS, room);
            assert!(user < users);
            seen.insert((room, process_of(user), via));
        }
        assert_eq!(seen.len(), ROOMS * 2 * 2);
    }
}
