//! Rebuilding a projection from the log beside its live tables, then swapping them in.
//!
//! **One at a time, decided by the database.** A rebuild starts by claiming its projection's row
//! in `projection_rebuilds` with one conditional statement (a new row, or one that is not
//! `running`, or whose heartbeat is stale because the process that ran it died); no row back
//! means one is running. The claiming connection also holds a session advisory lock until the
//! end, so two rebuilds of one projection never run at once even if a heartbeat lies. Each
//! projection builds in a schema of its own (`cairn_rebuild_<name>`), so different projections
//! may rebuild at the same time.
//!
//! **Fast.** The new tables start with only their primary key and unique indexes (what the
//! upserts and the table's rules need); the other indexes are built once the bulk of the rows is
//! in. The bulk is read batch after batch on a second connection while the previous batch is
//! applied, and each batch commits with `synchronous_commit = off` (the rows can be derived
//! again; the swap itself commits durably).
//!
//! **Reads never go down.** The bulk, the index builds and a first catch-up run while the live
//! projector carries on. Then, holding the projection's lock (which pauses the live projector for
//! a moment), the new tables are brought exactly to the live checkpoint and swapped in: the live
//! tables dropped and the new ones moved into `public`, in one transaction. A rebuild that fails
//! or is stopped leaves the live tables as they were, drops its schema and records the error.
//!
//! **Progress** (`events_total`, `events_done`, `heartbeat_at`) is written after every batch by a
//! short statement of its own, for `GET /api/v1/admin/projections` and `cairn replay`.

use std::time::Duration;

use cairn_platform::checkpoint;
use cairn_platform::envelope::{ConsistencyToken, EventEnvelope};
use cairn_platform::failure::is_transient;
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;

use crate::runner::{apply_run, lock_projection, save_checkpoint, Projection};

/// A `running` row whose heartbeat is older than this belongs to a process that died: a new
/// rebuild may take it over (the advisory lock still refuses while that process lives).
pub const STALE_AFTER_SECS: i64 = 60;

/// Events read and applied per batch unless told otherwise (`CAIRN_REBUILD_BATCH`).
pub const DEFAULT_BATCH: i64 = 10_000;

/// The schema projection `name` is rebuilt in.
#[must_use]
pub fn rebuild_schema(name: &str) -> String {
    format!("cairn_rebuild_{name}")
}

/// One projection's latest rebuild, as `projection_rebuilds` holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RebuildRow {
    /// The projection.
    pub projection: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last reported progress.
    pub heartbeat_at: DateTime<Utc>,
    /// When it ended (done or failed).
    pub finished_at: Option<DateTime<Utc>>,
    /// Events in the log when it started, plus those it caught up with.
    pub events_total: i64,
    /// Events read and applied so far.
    pub events_done: i64,
    /// Who asked for it (a user id, or `cli`).
    pub requested_by: String,
    /// Why it failed.
    pub error: Option<String>,
}

const ROW_COLUMNS: &str =
    "projection, state, started_at, heartbeat_at, finished_at, events_total, events_done, requested_by, error";

/// The latest rebuild of `name`, if it was ever rebuilt.
///
/// # Errors
/// When the query fails.
pub async fn latest<'e>(executor: impl sqlx::PgExecutor<'e>, name: &str) -> sqlx::Result<Option<RebuildRow>> {
    sqlx::query_as(&format!("SELECT {ROW_COLUMNS} FROM projection_rebuilds WHERE projection = $1"))
        .bind(name)
        .fetch_optional(executor)
        .await
}

/// Why a rebuild could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No projection has this name.
    #[error("no projection named '{0}'")]
    Unknown(String),
    /// A rebuild of this projection is running (its row, when it could be read).
    #[error("{}", running_message(.0, .1.as_ref()))]
    Running(String, Option<RebuildRow>),
    /// Postgres failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn running_message(name: &str, row: Option<&RebuildRow>) -> String {
    match row {
        Some(row) => format!(
            "a rebuild of {name} is running since {} ({} of {} events)",
            row.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            row.events_done,
            row.events_total
        ),
        None => format!("a rebuild of {name} is running"),
    }
}

/// How a claimed rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Events per batch.
    pub batch: i64,
    /// Swap the rebuilt tables in (false: leave them in their schema, for comparison).
    pub swap: bool,
    /// A pause after every batch: a test knob (`CAIRN_FAULT_REBUILD_PAUSE_MS`), zero otherwise.
    pub pause: Duration,
    /// Stops the rebuild between batches; it is then recorded as failed.
    pub shutdown: CancellationToken,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self { batch: DEFAULT_BATCH, swap: true, pause: Duration::ZERO, shutdown: CancellationToken::new() }
    }
}

/// A rebuild this process claimed: its row is `running` and its connection holds the
/// projection's rebuild lock. Run it with [`Claim::run`].
#[derive(Debug)]
pub struct Claim {
    conn: PoolConnection<Postgres>,
    name: &'static str,
    row: RebuildRow,
}

fn rebuild_lock_key(name: &str) -> i64 {
    cairn_platform::db::advisory_key(&format!("cairn-rebuild:{name}"))
}

/// Claims the rebuild of projection `name` for `requested_by`.
///
/// # Errors
/// [`StartError::Unknown`] for a name no projection has, [`StartError::Running`] while a rebuild
/// of it runs, [`StartError::Db`] when Postgres fails.
pub async fn claim(pool: &PgPool, name: &str, requested_by: &str) -> Result<Claim, StartError> {
    let name: &'static str =
        crate::PROJECTIONS.iter().find(|n| **n == name).copied().ok_or_else(|| StartError::Unknown(name.to_owned()))?;
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(rebuild_lock_key(name))
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        let row = latest(&mut *conn, name).await?;
        return Err(StartError::Running(name.to_owned(), row));
    }
    let total: i64 = match sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&mut *conn).await {
        Ok(total) => total,
        Err(e) => return Err(unlock_after(conn, name, e.into()).await),
    };
    let claimed: sqlx::Result<Option<RebuildRow>> = sqlx::query_as(&format!(
        "INSERT INTO projection_rebuilds AS r (projection, state, started_at, heartbeat_at, events_total, events_done, requested_by) \
         VALUES ($1, 'running', now(), now(), $2, 0, $3) \
         ON CONFLICT (projection) DO UPDATE SET state = 'running', started_at = now(), heartbeat_at = now(), \
             finished_at = NULL, events_total = EXCLUDED.events_total, events_done = 0, \
             requested_by = EXCLUDED.requested_by, error = NULL \
         WHERE r.state <> 'running' OR r.heartbeat_at < now() - make_interval(secs => $4) \
         RETURNING {ROW_COLUMNS}"
    ))
    .bind(name)
    .bind(total)
    .bind(requested_by)
    .bind(STALE_AFTER_SECS as f64)
    .fetch_optional(&mut *conn)
    .await;
    match claimed {
        Ok(Some(row)) => Ok(Claim { conn, name, row }),
        Ok(None) => {
            let row = latest(&mut *conn, name).await;
            let error = match row {
                Ok(row) => StartError::Running(name.to_owned(), row),
                Err(e) => e.into(),
            };
            Err(unlock_after(conn, name, error).await)
        }
        Err(e) => Err(unlock_after(conn, name, e.into()).await),
    }
}

/// Releases the rebuild lock on `conn` (or closes the connection when that fails, which releases
/// it too) and hands `error` back.
async fn unlock_after(conn: PoolConnection<Postgres>, name: &str, error: StartError) -> StartError {
    release(conn, name).await;
    error
}

async fn release(mut conn: PoolConnection<Postgres>, name: &str) {
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)").bind(rebuild_lock_key(name)).execute(&mut *conn).await;
    if unlocked.is_err() {
        // A connection in an unknown state must not go back to the pool holding the lock.
        let _ = conn.detach().close().await;
    }
}

impl Claim {
    /// The row as claimed (`running`, no progress yet).
    #[must_use]
    pub fn row(&self) -> &RebuildRow {
        &self.row
    }

    /// The projection's name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs the rebuild to its end and records the outcome (`done`, or `failed` with the error).
    /// Returns the number of events read.
    ///
    /// # Errors
    /// When the rebuild fails or is stopped; the live tables are then untouched.
    pub async fn run(self, pool: &PgPool, options: &RebuildOptions) -> anyhow::Result<u64> {
        use crate::{
            AnalyticsProjection, FilesProjection, RolesProjection, RoomsProjection, SessionsProjection, UsersProjection,
        };
        match self.name {
            UsersProjection::NAME => self.run_as(pool, &UsersProjection, options).await,
            SessionsProjection::NAME => self.run_as(pool, &SessionsProjection, options).await,
            RolesProjection::NAME => self.run_as(pool, &RolesProjection, options).await,
            RoomsProjection::NAME => self.run_as(pool, &RoomsProjection, options).await,
            FilesProjection::NAME => self.run_as(pool, &FilesProjection, options).await,
            AnalyticsProjection::NAME => self.run_as(pool, &AnalyticsProjection, options).await,
            other => anyhow::bail!("no projection named '{other}'"),
        }
    }

    async fn run_as<P: Projection>(
        self,
        pool: &PgPool,
        projection: &P,
        options: &RebuildOptions,
    ) -> anyhow::Result<u64> {
        let Self { mut conn, name, .. } = self;
        let schema = rebuild_schema(name);
        let outcome = Rebuilder { pool, conn: &mut conn, projection, options, schema: &schema, done: 0 }.run().await;
        let recorded = match &outcome {
            Ok(_) => sqlx::query(
                "UPDATE projection_rebuilds SET state = 'done', finished_at = now(), heartbeat_at = now(), \
                        events_total = GREATEST(events_total, events_done) WHERE projection = $1",
            )
            .bind(name)
            .execute(&mut *conn)
            .await
            .map(|_| ()),
            Err(e) => {
                let message = format!("{:#}", e);
                tracing::warn!(projection = name, error = %message, "rebuild failed; the live tables are untouched");
                // The half-built tables go; on a connection that failed, the next rebuild drops them.
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *conn).await;
                let failed =
                    "UPDATE projection_rebuilds SET state = 'failed', finished_at = now(), heartbeat_at = now(), \
                                     error = $2 WHERE projection = $1";
                // On this connection (the pool may be closing: the process is stopping), or on
                // another one when this one broke.
                match sqlx::query(failed).bind(name).bind(&message).execute(&mut *conn).await {
                    Ok(_) => Ok(()),
                    Err(_) => sqlx::query(failed).bind(name).bind(&message).execute(pool).await.map(|_| ()),
                }
            }
        };
        release(conn, name).await;
        let count = outcome?;
        recorded?;
        Ok(count)
    }
}

/// Claims and runs a rebuild of `projection` in this task.
///
/// # Errors
/// When a rebuild of it is running, or the rebuild fails.
pub async fn rebuild<P: Projection>(pool: &PgPool, projection: &P, batch: i64, swap: bool) -> anyhow::Result<u64> {
    let claim = claim(pool, P::NAME, "").await?;
    claim.run_as(pool, projection, &RebuildOptions { batch, swap, ..RebuildOptions::default() }).await
}

/// One rebuild's work, on the connection that holds its lock.
struct Rebuilder<'a, P: Projection> {
    pool: &'a PgPool,
    conn: &'a mut PgConnection,
    projection: &'a P,
    options: &'a RebuildOptions,
    schema: &'a str,
    done: u64,
}

impl<P: Projection> Rebuilder<'_, P> {
    async fn run(mut self) -> anyhow::Result<u64> {
        let deferred = self.create_tables().await?;
        let mut at = self.stream_bulk().await?;
        for statement in &deferred {
            self.check_stopped()?;
            sqlx::query(statement).execute(&mut *self.conn).await?;
        }
        // What was appended meanwhile, outside the projection's lock.
        at = self.page_bulk(at).await?;
        self.check_stopped()?;
        self.finish(at).await?;
        tracing::info!(projection = P::NAME, events = self.done, swapped = self.options.swap, "rebuild finished");
        Ok(self.done)
    }

    fn check_stopped(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.options.shutdown.is_cancelled(), "stopped: the process is shutting down");
        Ok(())
    }

    /// Creates the new tables with their primary key and unique indexes; returns the statements
    /// that create the other indexes, for later.
    async fn create_tables(&mut self) -> anyhow::Result<Vec<String>> {
        let schema = self.schema;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&mut *self.conn).await?;
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut *self.conn).await?;
        let mut deferred = Vec::new();
        for table in P::TABLES {
            sqlx::query(&format!(
                "CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL EXCLUDING INDEXES)"
            ))
            .execute(&mut *self.conn)
            .await?;
            // Constraints with an index (primary key, unique, exclusion) first, as constraints.
            let constraints: Vec<(String, String)> = sqlx::query_as(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE conrelid = ('public.' || quote_ident($1))::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
            )
            .bind(table)
            .fetch_all(&mut *self.conn)
            .await?;
            for (name, definition) in constraints {
                sqlx::query(&format!("ALTER TABLE {schema}.{table} ADD CONSTRAINT \"{name}\" {definition}"))
                    .execute(&mut *self.conn)
                    .await?;
            }
            // The other indexes: unique ones now (the table's rules hold during the load), the
            // rest once the rows are in.
            let indexes: Vec<(bool, String)> = sqlx::query_as(
                "SELECT i.indisunique, pg_get_indexdef(i.indexrelid) FROM pg_index i \
                 WHERE i.indrelid = ('public.' || quote_ident($1))::regclass \
                   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) \
                 ORDER BY i.indexrelid",
            )
            .bind(table)
            .fetch_all(&mut *self.conn)
            .await?;
            for (unique, definition) in indexes {
                let statement = retarget_index(&definition, table, schema)?;
                if unique {
                    sqlx::query(&statement).execute(&mut *self.conn).await?;
                } else {
                    deferred.push(statement);
                }
            }
        }
        Ok(deferred)
    }

    /// Applies the log up to the horizon (the last event of a transaction older than every one
    /// still running: nothing can appear before it any more), read with one streaming query on a
    /// second connection while the previous batch is applied. Returns the horizon.
    async fn stream_bulk(&mut self) -> anyhow::Result<ConsistencyToken> {
        let batch = usize::try_from(self.options.batch.max(1)).unwrap_or(1);
        // A connection of its own: its one query runs as long as the bulk, which is no slow
        // statement worth a warning.
        let options = (*self.pool.connect_options())
            .clone()
            .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(3600));
        let mut reader = PgConnection::connect_with(&options).await?;
        // Read in index order as the rows come, never sorted first (the whole log at once).
        sqlx::query("SET enable_sort = off").execute(&mut reader).await?;
        let horizon: Option<(i64, i64)> = sqlx::query_as(
            "SELECT transaction_id::text::bigint, global_position FROM events \
             WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
        )
        .fetch_optional(&mut reader)
        .await?;
        let Some((tx, pos)) = horizon else { return Ok(ConsistencyToken::default()) };
        let horizon = ConsistencyToken { tx: u64::try_from(tx)?, pos };
        let (sender, mut batches) = tokio::sync::mpsc::channel::<sqlx::Result<Vec<EventEnvelope>>>(2);
        let stop = self.options.shutdown.child_token();
        let reading = tokio::spawn(stream_events(reader, horizon, batch, sender, stop.clone()));
        let outcome = async {
            while let Some(events) = batches.recv().await {
                let events = events?;
                self.apply_bulk_batch(&events).await?;
            }
            anyhow::Ok(())
        }
        .await;
        // Ends the reader when applying failed (the channel is dropped with `batches` too).
        stop.cancel();
        drop(batches);
        let _ = reading.await;
        outcome?;
        self.check_stopped()?;
        Ok(horizon)
    }

    /// Applies the log after `at` in batches until a batch comes back short; returns the position
    /// reached.
    async fn page_bulk(&mut self, mut at: ConsistencyToken) -> anyhow::Result<ConsistencyToken> {
        let batch = self.options.batch.max(1);
        loop {
            self.check_stopped()?;
            let events = cairn_relay::reader::read_after(&mut *self.conn, at, batch).await?;
            let Some(last) = events.last().map(EventEnvelope::position) else { break };
            self.apply_bulk_batch(&events).await?;
            at = last;
            if (events.len() as i64) < batch {
                break;
            }
        }
        Ok(at)
    }

    /// Applies one batch of the bulk in its own transaction, records progress, and pauses when
    /// the test knob says so.
    async fn apply_bulk_batch(&mut self, events: &[EventEnvelope]) -> anyhow::Result<()> {
        self.check_stopped()?;
        let all: Vec<&EventEnvelope> = events.iter().collect();
        rebuild_batch(&mut *self.conn, self.projection, self.schema, &all).await?;
        self.done += events.len() as u64;
        self.progress().await?;
        if !self.options.pause.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(self.options.pause) => {}
                () = self.options.shutdown.cancelled() => {}
            }
        }
        Ok(())
    }

    /// Records progress and the heartbeat, in a statement of its own.
    async fn progress(&mut self) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE projection_rebuilds SET events_done = $2, events_total = GREATEST(events_total, $2), \
                    heartbeat_at = now() WHERE projection = $1",
        )
        .bind(P::NAME)
        .bind(i64::try_from(self.done).unwrap_or(i64::MAX))
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    /// Under the projection's lock: brings the new tables exactly to the live checkpoint and, with
    /// `swap`, puts them in place of the live ones.
    async fn finish(&mut self, mut at: ConsistencyToken) -> anyhow::Result<()> {
        let schema = self.schema;
        let batch = self.options.batch.max(1);
        let mut tx = self.conn.begin().await?;
        lock_projection(&mut tx, P::NAME).await?;
        let live = checkpoint::read(&mut *tx, P::NAME).await?;
        let before = self.done;
        while at < live {
            let events = cairn_relay::reader::read_after(&mut tx, at, batch).await?;
            if events.is_empty() {
                break;
            }
            let caught: Vec<&EventEnvelope> = events.iter().take_while(|e| e.position() <= live).collect();
            apply_run(&mut tx, self.projection, schema, &caught, true).await?;
            at = caught.last().map_or(at, |e| e.position());
            self.done += caught.len() as u64;
            if events.last().is_some_and(|e| e.position() > live) {
                break;
            }
        }
        if self.options.swap {
            for table in P::TABLES {
                sqlx::query(&format!("DROP TABLE public.{table}")).execute(&mut *tx).await?;
                sqlx::query(&format!("ALTER TABLE {schema}.{table} SET SCHEMA public")).execute(&mut *tx).await?;
            }
            sqlx::query(&format!("DROP SCHEMA {schema}")).execute(&mut *tx).await?;
            if at > live {
                // The live projector had applied nothing yet: the rebuilt tables are now ahead.
                save_checkpoint(&mut tx, P::NAME, at).await?;
            }
        }
        tx.commit().await?;
        if self.done != before {
            self.progress().await?;
        }
        Ok(())
    }
}

/// The columns the bulk reads: an event's, but its metadata (no projection reads it).
const BULK_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, event_version, \
     transaction_id::text::bigint AS tx, global_position, recorded_at, payload, 'null'::jsonb AS metadata";

/// Streams the events up to `horizon`, in order, to `sender` in batches of `batch`, on `conn`,
/// until done, the receiver is gone or `stop`.
async fn stream_events(
    mut conn: PgConnection,
    horizon: ConsistencyToken,
    batch: usize,
    sender: tokio::sync::mpsc::Sender<sqlx::Result<Vec<EventEnvelope>>>,
    stop: CancellationToken,
) {
    use futures::TryStreamExt;
    let finished = {
        let sql = format!(
            "SELECT {BULK_COLUMNS} FROM events \
             WHERE (transaction_id, global_position) <= ($1::text::xid8, $2) \
             ORDER BY transaction_id, global_position"
        );
        let mut rows = sqlx::query(&sql).bind(horizon.tx.to_string()).bind(horizon.pos).fetch(&mut conn);
        let mut chunk = Vec::with_capacity(batch);
        let mut previous = ConsistencyToken::default();
        loop {
            let next = tokio::select! {
                next = rows.try_next() => next,
                () = stop.cancelled() => break false,
            };
            match next.and_then(|row| row.map(|row| cairn_platform::envelope::from_row(&row)).transpose()) {
                Ok(Some(mut event)) => {
                    event.previous_transaction_id = previous.tx;
                    event.previous_global_position = previous.pos;
                    previous = event.position();
                    chunk.push(event);
                    if chunk.len() >= batch
                        && sender.send(Ok(std::mem::replace(&mut chunk, Vec::with_capacity(batch)))).await.is_err()
                    {
                        break false;
                    }
                }
                Ok(None) => break chunk.is_empty() || sender.send(Ok(chunk)).await.is_ok(),
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    break false;
                }
            }
        }
    };
    if finished {
        let _ = conn.close().await;
    }
    // Otherwise dropped mid-query: the server ends the session.
}

/// `CREATE INDEX … ON public.<table> …` made to create the same index on `<schema>.<table>`.
fn retarget_index(definition: &str, table: &str, schema: &str) -> anyhow::Result<String> {
    for live in [format!(" ON public.{table} "), format!(" ON {table} "), format!(" ON ONLY public.{table} ")] {
        if definition.contains(&live) {
            return Ok(definition.replacen(&live, &format!(" ON {schema}.{table} "), 1));
        }
    }
    anyhow::bail!("cannot read the index definition of {table}: {definition}")
}

/// Applies `events` to the tables in `schema` in a transaction of its own, committed without
/// waiting for the disk (the rows can be derived again): whole, or, when the batch is refused for
/// a reason of its own, one event at a time with the refused ones parked.
async fn rebuild_batch<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    schema: &str,
    events: &[&EventEnvelope],
) -> anyhow::Result<()> {
    for one_by_one in [false, true] {
        let mut tx = conn.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
        match apply_run(&mut tx, projection, schema, events, one_by_one).await {
            Ok(()) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if one_by_one || is_transient(&e) => return Err(e),
            Err(e) => {
                drop(tx);
                // Not the events' fault when the tables are gone (dropped under the rebuild).
                for table in P::TABLES {
                    let present: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                        .bind(format!("{schema}.{table}"))
                        .fetch_one(&mut *conn)
                        .await?;
                    anyhow::ensure!(present, "the table being rebuilt, {schema}.{table}, is gone: {e:#}");
                }
                tracing::warn!(projection = P::NAME, error = %cairn_platform::http::loggable(e.as_ref()), "rebuild batch refused; one event at a time");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_is_created_on_the_rebuilt_table() {
        let def = "CREATE INDEX users_created_order ON public.users USING btree (created_at DESC, id DESC)";
        assert_eq!(
            retarget_index(def, "users", "cairn_rebuild_users").unwrap(),
            "CREATE INDEX users_created_order ON cairn_rebuild_users.users USING btree (created_at DESC, id DESC)"
        );
        assert!(retarget_index("CREATE INDEX x ON public.rooms (id)", "users", "s").is_err());
    }
}
