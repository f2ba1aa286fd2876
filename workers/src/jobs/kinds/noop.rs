//! `noop`: does nothing, or sleeps `args.sleep_ms` first (tests and benchmarks); a cancelled run
//! stops sleeping at once.

use std::time::Duration;

use cairn_platform::jobs::kinds::NOOP;
use futures::future::BoxFuture;

use crate::jobs::{JobContext, JobError, JobHandler};

/// The `noop` handler.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

impl JobHandler for Noop {
    fn kind(&self) -> &'static str {
        NOOP
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            let sleep = Duration::from_millis(job.args.get("sleep_ms").and_then(serde_json::Value::as_u64).unwrap_or(0));
            if sleep.is_zero() {
                return Ok(());
            }
            tokio::select! {
                () = job.cancel.cancelled() => Err(JobError::Retry(anyhow::anyhow!("cancelled after part of its {} ms sleep", sleep.as_millis()))),
                () = tokio::time::sleep(sleep) => Ok(()),
            }
        })
    }
}
