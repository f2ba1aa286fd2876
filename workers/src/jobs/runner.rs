//! The job runner: claims due jobs from the `jobs` table, runs each in its own task under a
//! lease, and records how each run ended.
//!
//! - Claims: one statement per kind leases a batch of due jobs (as many as the kind has free
//!   slots, at most 100, and as its rate limit allows). The runner is woken by NOTIFY when a
//!   job becomes claimable, by a slot coming free, and polls as a fallback.
//! - Leases: one heartbeat renews every lease this process holds, every third of the lease. A
//!   lease it finds gone (the job was reaped and taken by another worker while this one was
//!   paused) cancels that run; whatever it ends with is then refused.
//! - Outcomes: written by one task in batches, one transaction per batch, each fenced by the
//!   lease's number; terminal ones with their `JobFinished` in the same transaction.
//! - The reaper frees jobs whose lease ran out (their worker died); a retention purge deletes
//!   old finished jobs.
//! - Shutdown: claiming stops at once; running jobs get the grace period to finish; the rest are
//!   cancelled and handed back (queued, due at once, the attempt not counted).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_platform::clock::SharedClock;
use cairn_platform::jobs::JobsSettings;
use cairn_platform::settings::RateLimit;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::{self, Claimed, Write};
use super::{backoff, JobContext, JobError, JobHandler, Registry};

/// The most jobs one claim statement leases.
const CLAIM_BATCH: usize = 100;
/// The most outcomes written in one transaction.
const WRITE_BATCH: usize = 128;
/// How often the gauges are sampled from the table.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// How often finished jobs past their retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(300);
/// How long before the process's own grace period ends the runner stops waiting for running
/// jobs, so that it can still hand the rest back before the process aborts its tasks.
const RELEASE_MARGIN: Duration = Duration::from_millis(500);

/// Runs the registered kinds this process is configured for.
pub struct JobRunner {
    pool: PgPool,
    registry: Registry,
    settings: JobsSettings,
    clock: SharedClock,
    grace: Duration,
    owner: String,
}

impl std::fmt::Debug for JobRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner").field("owner", &self.owner).field("kinds", &self.kinds()).finish_non_exhaustive()
    }
}

/// One lease this process holds.
struct Held {
    fence: i64,
    cancel: CancellationToken,
}

/// A run that ended, on its way to the writer.
struct Ended {
    job: Claimed,
    write: Write,
    /// The kind's slot, held until the outcome is recorded and given back when this is dropped.
    _slot: OwnedSemaphorePermit,
    ran: Duration,
}

/// What the runner's tasks share.
struct Shared {
    pool: PgPool,
    clock: SharedClock,
    settings: JobsSettings,
    owner: String,
    held: Mutex<HashMap<Uuid, Held>>,
    /// Wakes the claim loop: a job became claimable, or a slot came free.
    wake: Notify,
    /// Cancelled when running jobs must stop (the grace period is over).
    stop_jobs: CancellationToken,
}

impl Shared {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        // A panic while holding this lock leaves the map consistent (single inserts and removes).
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn metadata(&self) -> serde_json::Value {
        serde_json::json!({ "worker": self.owner })
    }
}

/// A per-process token bucket for a kind's rate limit (`count` per `period`, bursts of `count`).
struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: RateLimit) -> Self {
        let capacity = f64::from(rate.count);
        Self { capacity, per_sec: capacity / rate.period.as_secs_f64(), tokens: capacity, at: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// Whole tokens available now.
    fn available(&mut self) -> usize {
        self.refill();
        // Bounded by the capacity, a u32.
        self.tokens.floor().max(0.0) as usize
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until the next whole token.
    fn next_in(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens.fract()) / self.per_sec).max(0.001))
    }
}

/// A kind this process runs.
struct Lane {
    kind: &'static str,
    handler: Arc<dyn JobHandler>,
    slots: Arc<Semaphore>,
    bucket: Option<Bucket>,
    timeout: Duration,
}

/// Aborts a spawned task when dropped, so the runner's helpers end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl JobRunner {
    /// A runner for the kinds of `registry` that `settings.kinds` names (all of them when unset);
    /// `grace` is the process's shutdown grace period.
    #[must_use]
    pub fn new(pool: PgPool, registry: Registry, settings: &JobsSettings, clock: SharedClock, grace: Duration) -> Self {
        let owner = format!("{}:{}", std::process::id(), &Uuid::new_v4().simple().to_string()[..8]);
        Self { pool, registry, settings: settings.clone(), clock, grace, owner }
    }

    /// The kinds this runner claims.
    #[must_use]
    pub fn kinds(&self) -> Vec<&'static str> {
        self.registry
            .kinds()
            .filter(|k| self.settings.kinds.as_ref().is_none_or(|wanted| wanted.iter().any(|w| w == k)))
            .collect()
    }

    /// Runs until `shutdown` is cancelled, then stops as the module describes.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lanes: Vec<Lane> = self
            .kinds()
            .into_iter()
            .filter_map(|kind| {
                let handler = self.registry.get(kind)?;
                Some(Lane {
                    kind,
                    handler,
                    slots: Arc::new(Semaphore::new(self.settings.concurrency.get(kind))),
                    bucket: self.settings.rate.get(kind).map(Bucket::new),
                    timeout: self.settings.timeout.get(kind),
                })
            })
            .collect();
        let total_slots: usize = lanes.iter().map(|l| l.slots.available_permits()).sum();
        let shared = Arc::new(Shared {
            pool: self.pool.clone(),
            clock: self.clock.clone(),
            settings: self.settings.clone(),
            owner: self.owner.clone(),
            held: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            stop_jobs: CancellationToken::new(),
        });
        tracing::info!(owner = %self.owner, kinds = ?lanes.iter().map(|l| l.kind).collect::<Vec<_>>(), "job runner started");

        // Every run sends exactly one outcome and holds a slot until it is written: the channel
        // never holds more than the slots.
        let (ended_tx, ended_rx) = mpsc::channel::<Ended>(total_slots.max(1));
        let helpers = CancellationToken::new();
        let writer = tokio::spawn(write_outcomes(shared.clone(), ended_rx));
        let _listener = AbortOnDrop(tokio::spawn(listen(shared.clone(), helpers.clone())));
        let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat(shared.clone(), helpers.clone())));
        let kinds: Vec<String> = lanes.iter().map(|l| l.kind.to_owned()).collect();
        let _housekeeping = AbortOnDrop(tokio::spawn(housekeeping(shared.clone(), kinds, helpers.clone())));

        let mut running = JoinSet::new();
        claim_loop(&shared, &mut lanes, &ended_tx, &mut running, &shutdown).await;

        // Stopping: running jobs get the grace period, less a margin to hand the rest back.
        let wait = self.grace.saturating_sub(RELEASE_MARGIN).max(self.grace / 2);
        let deadline = tokio::time::Instant::now() + wait;
        if !running.is_empty() {
            tracing::info!(jobs = running.len(), wait_ms = wait.as_millis(), "waiting for running jobs");
        }
        if tokio::time::timeout_at(deadline, async { while running.join_next().await.is_some() {} }).await.is_err() {
            tracing::warn!(jobs = running.len(), "jobs still running at the end of the grace period; handing them back");
            shared.stop_jobs.cancel();
            // Cancelled runs end at once (their handler's future is dropped) with a release.
            while running.join_next().await.is_some() {}
        }
        drop(ended_tx);
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "the job outcome writer failed");
        }
        helpers.cancel();
        tracing::info!("job runner stopped");
    }
}

/// Claims and starts jobs until `shutdown`.
async fn claim_loop(
    shared: &Arc<Shared>,
    lanes: &mut [Lane],
    ended: &mpsc::Sender<Ended>,
    running: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    let poll = shared.settings.poll;
    while !shutdown.is_cancelled() {
        while running.try_join_next().is_some() {}
        let mut next = poll;
        for lane in lanes.iter_mut() {
            let free = lane.slots.available_permits();
            let mut n = free.min(CLAIM_BATCH);
            if let Some(bucket) = lane.bucket.as_mut() {
                n = n.min(bucket.available());
                if n == 0 && free > 0 {
                    next = next.min(bucket.next_in());
                }
            }
            if n == 0 {
                continue;
            }
            let permits: Vec<OwnedSemaphorePermit> =
                (0..n).map_while(|_| lane.slots.clone().try_acquire_owned().ok()).collect();
            let now = shared.clock.now();
            let claimed =
                match store::claim(&shared.pool, lane.kind, permits.len(), &shared.owner, now, shared.settings.lease)
                    .await
                {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        tracing::warn!(kind = lane.kind, error = %e, "cannot claim jobs; retrying");
                        next = next.min(Duration::from_secs(1));
                        continue;
                    }
                };
            if let Some(bucket) = lane.bucket.as_mut() {
                bucket.take(claimed.len());
            }
            let full = claimed.len() == permits.len();
            for (job, permit) in claimed.into_iter().zip(permits) {
                start(shared, lane, job, permit, now, ended, running);
            }
            // A full batch: more may be due; go round again at once if slots are left.
            if full && lane.slots.available_permits() > 0 {
                next = Duration::ZERO;
            }
        }
        if next.is_zero() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(next) => {}
        }
    }
}

/// Starts one claimed job in its own task.
fn start(
    shared: &Arc<Shared>,
    lane: &Lane,
    job: Claimed,
    permit: OwnedSemaphorePermit,
    now: DateTime<Utc>,
    ended: &mpsc::Sender<Ended>,
    running: &mut JoinSet<()>,
) {
    let kind = lane.kind;
    metrics::counter!("cairn_jobs_started_total", "kind" => kind).increment(1);
    let due = job.run_at.max(job.created_at);
    metrics::histogram!("cairn_jobs_wait_seconds", "kind" => kind)
        .record((now - due).to_std().unwrap_or_default().as_secs_f64());
    let cancel = shared.stop_jobs.child_token();
    shared.held().insert(job.id, Held { fence: job.fence, cancel: cancel.clone() });
    let ctx = JobContext {
        id: job.id,
        kind: job.kind.clone(),
        args: job.args.clone(),
        attempt: job.attempts,
        max_attempts: job.max_attempts,
        enqueued_at: job.created_at,
        cancel,
        clock: shared.clock.clone(),
        pool: shared.pool.clone(),
    };
    let (handler, timeout, shared, ended) = (lane.handler.clone(), lane.timeout, shared.clone(), ended.clone());
    running.spawn(async move {
        let started = Instant::now();
        let write = attempt(&shared, handler.as_ref(), &ctx, timeout).await;
        let ran = started.elapsed();
        metrics::histogram!("cairn_jobs_run_seconds", "kind" => kind).record(ran.as_secs_f64());
        match write {
            Some(write) => {
                // The writer outlives every run (it stops when the last sender is dropped).
                let _ = ended.send(Ended { job, write, _slot: permit, ran }).await;
            }
            None => {
                // The lease was lost: another worker owns the job now; nothing is written.
                tracing::warn!(job_id = %job.id, fence = job.fence, "lease lost while the job ran; its outcome is refused");
                metrics::counter!("cairn_jobs_stale_outcomes_total").increment(1);
                shared.held().remove(&job.id);
                drop(permit);
                shared.wake.notify_one();
            }
        }
    });
}

/// Runs one attempt and says what to write; None when the lease was lost meanwhile.
async fn attempt(shared: &Shared, handler: &dyn JobHandler, ctx: &JobContext, timeout: Duration) -> Option<Write> {
    let result = tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => None,
        result = tokio::time::timeout(timeout, handler.run(ctx)) => Some(result),
    };
    let Some(result) = result else {
        return shared.stop_jobs.is_cancelled().then_some(Write::Release);
    };
    let error = match result {
        Ok(Ok(())) => return Some(Write::Done),
        Ok(Err(error)) => error,
        Err(_) => {
            // Anything the handler started on its own stops with its token.
            ctx.cancel.cancel();
            JobError::Retry(anyhow::anyhow!("timed out after {} s", timeout.as_secs()))
        }
    };
    let at = shared.clock.now();
    let message = error.message();
    let last = ctx.attempt >= ctx.max_attempts;
    Some(match error {
        JobError::Permanent(_) => Write::Failed { at, error: message },
        JobError::Retry(_) | JobError::RetryAfter(..) if last => Write::Dead { at, error: message },
        JobError::Retry(_) => {
            let wait = backoff::delay(ctx.attempt, shared.settings.backoff_base, shared.settings.backoff_max);
            Write::Retry { at, error: message, run_at: at + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX) }
        }
        JobError::RetryAfter(wait, _) => Write::Retry {
            at,
            error: message,
            run_at: at + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX),
        },
    })
}

/// Writes outcomes as runs end, batching those that end together into one transaction.
async fn write_outcomes(shared: Arc<Shared>, mut ended: mpsc::Receiver<Ended>) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    while ended.recv_many(&mut batch, WRITE_BATCH).await > 0 {
        let written = match write_batch(&shared, &batch).await {
            Ok(written) => written,
            Err(e) => {
                // One bad row must not hold the others back: write each on its own.
                tracing::warn!(error = %e, jobs = batch.len(), "cannot write a batch of job outcomes; writing them one by one");
                let mut written = Vec::with_capacity(batch.len());
                for one in &batch {
                    match write_batch(&shared, std::slice::from_ref(one)).await {
                        Ok(w) => written.extend(w),
                        Err(e) => {
                            // The lease runs out and the reaper queues the job again.
                            tracing::error!(job_id = %one.job.id, error = %e, "cannot write a job's outcome");
                            written.push(false);
                        }
                    }
                }
                written
            }
        };
        {
            let mut held = shared.held();
            for (one, ok) in batch.iter().zip(&written) {
                held.remove(&one.job.id);
                if *ok {
                    let kind = one.job.kind.clone();
                    if !matches!(one.write, Write::Release) {
                        metrics::counter!("cairn_jobs_finished_total", "kind" => kind, "outcome" => one.write.label()).increment(1);
                    }
                    tracing::debug!(job_id = %one.job.id, outcome = one.write.label(), ran_ms = one.ran.as_millis(), "job ran");
                }
            }
        }
        // Dropping the runs gives their slots back.
        batch.clear();
        shared.wake.notify_one();
    }
}

/// Writes `batch` in one transaction; for each, whether it was written (false: the lease had
/// been lost and the outcome was refused).
async fn write_batch(shared: &Shared, batch: &[Ended]) -> Result<Vec<bool>, sqlx::Error> {
    let now = shared.clock.now();
    let metadata = shared.metadata();
    let mut tx = shared.pool.begin().await?;
    let mut written = Vec::with_capacity(batch.len());
    for one in batch {
        let ok = store::record(&mut tx, one.job.id, one.job.fence, &one.write, now, &metadata).await?;
        written.push(ok);
    }
    tx.commit().await?;
    for (one, ok) in batch.iter().zip(&written) {
        if !ok {
            tracing::warn!(
                job_id = %one.job.id,
                fence = one.job.fence,
                outcome = one.write.label(),
                "stale job outcome refused: the lease was lost to another worker"
            );
            metrics::counter!("cairn_jobs_stale_outcomes_total").increment(1);
        }
    }
    Ok(written)
}

/// Wakes the claim loop on each NOTIFY; reconnects after a failure (polling covers the gap).
async fn listen(shared: Arc<Shared>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(&shared.pool).await?;
            listener.listen(cairn_platform::jobs::NOTIFY_CHANNEL).await?;
            // Jobs may have become due while this was not listening.
            shared.wake.notify_one();
            loop {
                listener.recv().await?;
                shared.wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            () = stop.cancelled() => return,
            result = connected => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "job notifications lost; polling until they are back");
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Renews every lease this process holds, every third of the lease; cancels the runs whose
/// lease is gone.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.settings.lease / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let held: Vec<(Uuid, i64)> = shared.held().iter().map(|(id, h)| (*id, h.fence)).collect();
        if held.is_empty() {
            continue;
        }
        let renewed = match store::renew(&shared.pool, &held, shared.clock.now(), shared.settings.lease).await {
            Ok(renewed) => renewed.into_iter().collect::<BTreeSet<Uuid>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew job leases; retrying");
                continue;
            }
        };
        let map = shared.held();
        for (id, fence) in held {
            if renewed.contains(&id) {
                continue;
            }
            // Still held by this run (not just finished and written): its lease is gone.
            if let Some(h) = map.get(&id).filter(|h| h.fence == fence) {
                tracing::warn!(job_id = %id, fence, "job lease lost to another worker; this run's outcome will be refused");
                metrics::counter!("cairn_jobs_lease_lost_total").increment(1);
                h.cancel.cancel();
            }
        }
    }
}

/// The reaper (every poll), the gauges (every few seconds) and the retention purge (every few
/// minutes).
async fn housekeeping(shared: Arc<Shared>, kinds: Vec<String>, stop: CancellationToken) {
    let metadata = shared.metadata();
    let mut last_gauge: Option<Instant> = None;
    let mut last_purge: Option<Instant> = None;
    // Pairs reported once are set to zero when they have no jobs left.
    let mut reported: BTreeSet<(String, &'static str)> = BTreeSet::new();
    loop {
        loop {
            match store::reap(&shared.pool, shared.clock.now(), &metadata).await {
                Ok(reaped) => {
                    for (kind, dead) in &reaped {
                        tracing::warn!(kind, dead, "a job's lease expired (its worker was lost); freed");
                        metrics::counter!("cairn_jobs_lease_expired_total", "kind" => kind.clone()).increment(1);
                        if *dead {
                            metrics::counter!("cairn_jobs_finished_total", "kind" => kind.clone(), "outcome" => "dead")
                                .increment(1);
                        }
                    }
                    if reaped.len() < 100 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reap expired job leases; retrying");
                    break;
                }
            }
        }
        if last_gauge.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            last_gauge = Some(Instant::now());
            sample(&shared, &kinds, &mut reported).await;
        }
        if last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            last_purge = Some(Instant::now());
            let s = &shared.settings;
            match store::purge(&shared.pool, shared.clock.now(), s.keep_done, s.keep_dead).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "finished jobs past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot purge old jobs"),
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.settings.poll) => {}
        }
    }
}

/// The most (kind, status) pairs the gauge reports.
const MAX_GAUGED: usize = 1000;

/// The statuses the `cairn_jobs` gauge reports.
const GAUGED: [&str; 5] = ["scheduled", "queued", "running", "failed", "dead"];

/// Sets `cairn_jobs{kind,status}` from one query.
async fn sample(shared: &Shared, kinds: &[String], reported: &mut BTreeSet<(String, &'static str)>) {
    let counts = match store::counts(&shared.pool).await {
        Ok(counts) => counts,
        Err(e) => {
            tracing::warn!(error = %e, "cannot count jobs for the gauges");
            return;
        }
    };
    // Every pair reported before starts at zero, so a status that emptied reads 0.
    let mut now: HashMap<(String, &'static str), i64> = reported.iter().map(|key| (key.clone(), 0)).collect();
    for kind in kinds {
        for status in GAUGED {
            now.insert((kind.clone(), status), 0);
        }
    }
    for (kind, status, n) in counts {
        let Some(status) = GAUGED.iter().copied().find(|s| *s == status) else { continue };
        // Kinds come from the table; the label sets stay bounded all the same.
        if now.len() < MAX_GAUGED || now.contains_key(&(kind.clone(), status)) {
            now.insert((kind, status), n);
        }
    }
    for ((kind, status), n) in now {
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("cairn_jobs", "kind" => kind.clone(), "status" => status).set(n as f64);
        reported.insert((kind, status));
    }
}
