//! `files.sweep`: one pass of the orphan sweeper ([`FileSweeper::sweep`]).
//!
//! A built-in schedule enqueues it every five minutes (`CAIRN_SCHEDULES_FILE` can change the
//! cron). The pass keeps its advisory lock, so a scheduled sweep and a manual
//! `cairn admin sweep-files` never overlap: the one that finds the lock taken does nothing and
//! succeeds, since the other is doing the same work.

use anyhow::anyhow;
use cairn_platform::jobs::kinds::FILES_SWEEP;
use futures::future::BoxFuture;

use crate::files::FileSweeper;
use crate::jobs::{JobContext, JobError, JobHandler};

/// The `files.sweep` handler.
#[derive(Clone)]
pub struct FilesSweep {
    sweeper: FileSweeper,
}

impl std::fmt::Debug for FilesSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesSweep").finish_non_exhaustive()
    }
}

impl FilesSweep {
    /// A handler running `sweeper`.
    #[must_use]
    pub fn new(sweeper: FileSweeper) -> Self {
        Self { sweeper }
    }
}

impl JobHandler for FilesSweep {
    fn kind(&self) -> &'static str {
        FILES_SWEEP
    }

    fn run<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, Result<(), JobError>> {
        Box::pin(async move {
            // Stopping mid-pass is safe: what was removed stays removed, and the rest is found
            // again by the next pass.
            let pass = tokio::select! {
                () = job.cancel.cancelled() => return Err(JobError::Retry(anyhow!("the sweep was stopped before it finished"))),
                pass = self.sweeper.sweep() => pass,
            };
            match pass {
                Ok(report) => {
                    tracing::debug!(job_id = %job.id, ?report, "file sweep done");
                    Ok(())
                }
                Err(e) => {
                    metrics::counter!("cairn_files_sweeps_total", "outcome" => "failed").increment(1);
                    Err(JobError::Retry(e.context("the file sweep failed")))
                }
            }
        })
    }
}
