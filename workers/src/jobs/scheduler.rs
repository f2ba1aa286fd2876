//! The scheduler: fires cron schedules, each tick exactly once across every worker process.
//!
//! Every worker process runs one. Each pass is one short transaction that locks the due rows of
//! `schedules` with `FOR UPDATE SKIP LOCKED`, enqueues each due tick's job and moves the row's
//! `next_run_at` past it, and commits. A row is fired by whichever process locks it; the others
//! skip it, and once the commit lands its `next_run_at` is in the future, so nobody fires that
//! tick again. A process that dies mid-pass loses its connection, its transaction rolls back and
//! the rows are free again for the next pass of another process: no tick is lost. Each tick's
//! job also carries the idempotency key `schedule:<name>:<tick>`, so even a row written back by
//! hand cannot enqueue a tick twice while its job is kept.
//!
//! A process that was down catches up tick by tick (up to [`CATCH_UP_PER_PASS`] per schedule per
//! pass); ticks older than [`CATCH_UP_LIMIT`] are skipped, with a log line, rather than run in a
//! burst long after they mattered.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use cairn_platform::clock::SharedClock;
use cairn_platform::jobs::schedule::{self, CronSchedule, ScheduleDef, Source};
use cairn_platform::jobs::{self, JobsSettings, NewJob};
use cairn_platform::Settings;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Rows fired per pass (the pass goes on at once while there were this many).
pub const ROWS_PER_PASS: i64 = 50;
/// Ticks one schedule may fire in one pass while it catches up.
pub const CATCH_UP_PER_PASS: usize = 100;
/// How far back a missed tick is still fired.
pub const CATCH_UP_LIMIT: chrono::Duration = chrono::Duration::hours(1);

/// Fires due schedules, and at start writes the built-in and configured ones.
#[derive(Clone)]
pub struct Scheduler {
    pool: PgPool,
    clock: SharedClock,
    interval: Duration,
    /// The built-ins and `CAIRN_SCHEDULES_FILE`, checked at construction.
    defined: Vec<(ScheduleDef, Source)>,
}

/// The idempotency key of `name`'s tick at `tick`.
#[must_use]
pub fn tick_key(name: &str, tick: DateTime<Utc>) -> String {
    format!("schedule:{name}:{}", tick.to_rfc3339_opts(SecondsFormat::Secs, true))
}

impl Scheduler {
    /// A scheduler over `pool`; reads and checks `CAIRN_SCHEDULES_FILE`, so a bad file stops the
    /// process at start.
    ///
    /// # Errors
    /// An unreadable or invalid schedules file.
    pub fn new(pool: PgPool, settings: &Settings) -> anyhow::Result<Self> {
        let defined = definitions(&settings.jobs)?;
        Ok(Self {
            pool,
            clock: settings.clock.clone(),
            interval: settings.jobs.poll.min(Duration::from_secs(1)),
            defined,
        })
    }

    /// Writes the built-in and configured schedules: a configured one replaces a built-in of the
    /// same name, and configured or built-in rows no longer defined are removed. Schedules
    /// defined over the API are left alone. An unchanged expression keeps the tick it waits for.
    ///
    /// # Errors
    /// Database errors.
    pub async fn sync_definitions(&self) -> anyhow::Result<()> {
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        // One process at a time, so two starting together do not interleave their writes.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cairn.schedules.sync'))").execute(&mut *tx).await?;
        for (def, source) in &self.defined {
            let api: Option<String> =
                sqlx::query_scalar("SELECT source FROM schedules WHERE name = $1 AND source = 'api'")
                    .bind(&def.name)
                    .fetch_optional(&mut *tx)
                    .await?;
            if api.is_some() {
                tracing::warn!(schedule = %def.name, "a schedule defined over the API has this name; configuration leaves it alone");
                continue;
            }
            let parsed = CronSchedule::parse(&def.cron, &def.timezone)
                .map_err(|e| anyhow::anyhow!("schedule '{}': {e}", def.name))?;
            schedule::upsert(&mut tx, def, &parsed, *source, 0, now).await?;
        }
        let names: Vec<String> = self.defined.iter().map(|(d, _)| d.name.clone()).collect();
        let removed =
            sqlx::query("DELETE FROM schedules WHERE source IN ('config', 'builtin') AND NOT (name = ANY($1))")
                .bind(&names)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        tracing::info!(defined = names.len(), removed, "schedules from configuration written");
        Ok(())
    }

    /// Writes the definitions, then fires due ticks every `min(CAIRN_JOBS_POLL_MS, 1 s)` until
    /// `shutdown`. Failures (Postgres down) are logged and tried again on the next pass.
    pub async fn run(self, shutdown: CancellationToken) {
        while let Err(e) = self.sync_definitions().await {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the configured schedules; retrying");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        loop {
            match self.fire_due().await {
                // A full page: more may be due right now.
                Ok(rows) if i64::try_from(rows).unwrap_or(i64::MAX) >= ROWS_PER_PASS => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "schedule pass failed; trying again"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One pass: fires every due tick of up to [`ROWS_PER_PASS`] schedules no other process is
    /// firing, in one transaction. Returns the rows it locked.
    ///
    /// # Errors
    /// Database errors (nothing of the pass is kept then).
    pub async fn fire_due(&self) -> anyhow::Result<usize> {
        let now = self.clock.now();
        let mut tx = self.pool.begin().await?;
        let due: Vec<(String, String, String, String, serde_json::Value, DateTime<Utc>)> = sqlx::query_as(
            "SELECT name, cron, timezone, kind, args, next_run_at FROM schedules WHERE next_run_at <= $1 \
             ORDER BY next_run_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(ROWS_PER_PASS)
        .fetch_all(&mut *tx)
        .await?;
        let mut fired: Vec<(String, usize)> = Vec::new();
        for (name, cron, timezone, kind, args, next_run_at) in &due {
            let Ok(parsed) = CronSchedule::parse(cron, timezone) else {
                // Only a row written by hand can hold a bad expression: leave it an hour.
                tracing::error!(schedule = %name, cron = %cron, timezone = %timezone, "schedule has an invalid expression; not fired");
                sqlx::query("UPDATE schedules SET next_run_at = $2, updated_at = $3 WHERE name = $1")
                    .bind(name)
                    .bind(now + CATCH_UP_LIMIT)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                continue;
            };
            let mut tick = *next_run_at;
            if now - tick > CATCH_UP_LIMIT {
                let resume = parsed.next_after(now - CATCH_UP_LIMIT).unwrap_or(now);
                tracing::warn!(schedule = %name, from = %tick, to = %resume, "ticks older than an hour skipped");
                tick = resume;
            }
            let mut count = 0;
            let mut last: Option<(DateTime<Utc>, Uuid)> = None;
            while tick <= now && count < CATCH_UP_PER_PASS {
                let job = NewJob::new(kind, args.clone())
                    .idempotency_key(tick_key(name, tick))
                    .enqueued_by(format!("schedule:{name}"))
                    .run_at(tick);
                let enqueued = jobs::enqueue(&mut tx, &job, now).await?;
                if !enqueued.created {
                    // Only a row moved back by hand can get here; the key kept the tick single.
                    tracing::warn!(schedule = %name, tick = %tick, job_id = %enqueued.id, "tick was enqueued already; not enqueued again");
                }
                last = Some((tick, enqueued.id));
                count += 1;
                match parsed.next_after(tick) {
                    Some(next) => tick = next,
                    None => break,
                }
            }
            sqlx::query(
                "UPDATE schedules SET next_run_at = $2, last_fired_at = COALESCE($3, last_fired_at), \
                   last_job_id = COALESCE($4, last_job_id), updated_at = $5 WHERE name = $1",
            )
            .bind(name)
            .bind(if tick > *next_run_at { tick } else { now + CATCH_UP_LIMIT })
            .bind(last.map(|(t, _)| t))
            .bind(last.map(|(_, id)| id))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            fired.push((name.clone(), count));
        }
        tx.commit().await.context("cannot commit the fired ticks")?;
        for (name, count) in fired {
            if count > 0 {
                metrics::counter!("cairn_schedule_fired_total", "schedule" => name).increment(count as u64);
            }
        }
        Ok(due.len())
    }
}

/// The built-in schedules, less those a configured one replaces, and the configured ones.
///
/// # Errors
/// An unreadable or invalid schedules file.
pub fn definitions(settings: &JobsSettings) -> anyhow::Result<Vec<(ScheduleDef, Source)>> {
    let configured = match &settings.schedules_file {
        Some(path) => schedule::load_file(path, settings)?,
        None => Vec::new(),
    };
    let names: BTreeSet<&str> = configured.iter().map(|d| d.name.as_str()).collect();
    let mut out: Vec<(ScheduleDef, Source)> = schedule::builtin()
        .into_iter()
        .filter(|d| !names.contains(d.name.as_str()))
        .map(|d| (d, Source::Builtin))
        .collect();
    out.extend(configured.into_iter().map(|d| (d, Source::Config)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_key_names_the_schedule_and_the_second() {
        let tick = DateTime::parse_from_rfc3339("2026-12-01T03:00:05Z").map(|t| t.with_timezone(&Utc));
        assert_eq!(
            tick.map(|t| tick_key("every-second", t)).ok().as_deref(),
            Some("schedule:every-second:2026-12-01T03:00:05Z")
        );
    }

    #[test]
    fn a_configured_schedule_replaces_a_builtin_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("schedules.json");
        std::fs::write(&file, r#"[{"name":"files.sweep","cron":"0 0 * * * *","kind":"files.sweep"},{"name":"ping","cron":"* * * * *","kind":"noop"}]"#)
            .unwrap_or_else(|e| panic!("{e}"));
        let lookup = |k: &str| (k == "CAIRN_SCHEDULES_FILE").then(|| file.display().to_string());
        let settings = JobsSettings::from_lookup(&lookup, cairn_platform::settings::Environment::Development)
            .unwrap_or_else(|e| panic!("{e}"));
        let defs = definitions(&settings).unwrap_or_else(|e| panic!("{e}"));
        let sweep: Vec<_> = defs.iter().filter(|(d, _)| d.name == "files.sweep").collect();
        assert_eq!(sweep.len(), 1);
        assert_eq!((sweep[0].0.cron.as_str(), sweep[0].1), ("0 0 * * * *", Source::Config));
        assert!(defs.iter().any(|(d, s)| d.name == "sessions.purge" && *s == Source::Builtin));
        assert!(defs.iter().any(|(d, s)| d.name == "ping" && *s == Source::Config));
    }
}
