//! Closed-loop load: N clients, each sending its next request as soon as the previous one has
//! answered, through a warm-up and then a measured window. Only operations that both start and
//! finish inside the measured window count, so the warm-up and the tail do not blur the rate.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::stats::Summary;

/// How long to warm up and how long to measure.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Load that is sent but not counted.
    pub warmup: Duration,
    /// Load that is counted.
    pub measure: Duration,
}

/// What the clients did in the measured window.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Latency of every successful operation.
    pub latencies: Vec<Duration>,
    /// The same latencies by the label each operation returned.
    pub by_label: BTreeMap<&'static str, Vec<Duration>>,
    /// The first failure seen, for the report.
    pub first_error: Option<String>,
}

impl Outcome {
    /// Successful operations per second.
    #[must_use]
    pub fn throughput(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Percentiles of every successful operation.
    #[must_use]
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.latencies)
    }

    /// Percentiles of the operations labelled `label`.
    #[must_use]
    pub fn summary_of(&self, label: &str) -> Option<Summary> {
        self.by_label.get(label).and_then(|l| Summary::of(l))
    }

    /// Fails when nothing succeeded: a benchmark of errors measures nothing.
    ///
    /// # Errors
    /// When no operation succeeded.
    pub fn require_success(&self, what: &str) -> anyhow::Result<()> {
        if self.ok == 0 {
            anyhow::bail!(
                "{what}: no operation succeeded in the measured window ({} failed; first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }

    fn merge(&mut self, other: ClientLog) {
        self.ok += other.latencies.len() as u64;
        self.errors += other.errors;
        for (label, latency) in other.latencies {
            self.latencies.push(latency);
            self.by_label.entry(label).or_default().push(latency);
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

#[derive(Default)]
struct ClientLog {
    latencies: Vec<(&'static str, Duration)>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs one client per element of `clients`. Each calls `op` with its state in a loop until the
/// window ends; `op` hands the state back with the label of what it did, or an error.
///
/// # Errors
/// When a client task panics.
pub async fn closed_loop<S, F, Fut>(clients: Vec<S>, window: Window, op: F) -> anyhow::Result<Outcome>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (S, anyhow::Result<&'static str>)> + Send,
{
    run_clients(clients, window, None, op).await
}

/// As [`closed_loop`], but each client starts an operation at most every `pace`: a light, steady
/// probe whose latency shows how other load affects it, without adding much load itself.
///
/// # Errors
/// When a client task panics.
pub async fn paced_loop<S, F, Fut>(clients: Vec<S>, window: Window, pace: Duration, op: F) -> anyhow::Result<Outcome>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (S, anyhow::Result<&'static str>)> + Send,
{
    run_clients(clients, window, Some(pace), op).await
}

async fn run_clients<S, F, Fut>(
    clients: Vec<S>,
    window: Window,
    pace: Option<Duration>,
    op: F,
) -> anyhow::Result<Outcome>
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (S, anyhow::Result<&'static str>)> + Send,
{
    let start = Instant::now();
    let measure_from = start + window.warmup;
    let measure_to = measure_from + window.measure;
    let mut tasks = JoinSet::new();
    for state in clients {
        let op = op.clone();
        tasks.spawn(async move {
            let mut state = state;
            let mut log = ClientLog::default();
            loop {
                let began = Instant::now();
                if began >= measure_to {
                    break;
                }
                let (next, result) = op(state).await;
                state = next;
                let ended = Instant::now();
                let counted = began >= measure_from && ended <= measure_to;
                match result {
                    Ok(label) if counted => log.latencies.push((label, ended - began)),
                    Ok(_) => {}
                    Err(e) => {
                        if counted {
                            log.errors += 1;
                            if log.first_error.is_none() {
                                log.first_error = Some(format!("{e:#}"));
                            }
                        }
                        // Do not spin on a failing service.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if let Some(pace) = pace {
                    tokio::time::sleep_until((began + pace).into()).await;
                }
            }
            log
        });
    }
    let mut outcome = Outcome { seconds: window.measure.as_secs_f64(), ..Outcome::default() };
    while let Some(joined) = tasks.join_next().await {
        outcome.merge(joined?);
    }
    Ok(outcome)
}
