//! The audit tree's fold: appends every event, in the log's one order, to the Merkle tree of
//! [`cairn_platform::audit`], and signs tree heads.
//!
//! - Its own loop beside the publishing one: a NATS outage does not stop the tree, and each
//!   write is a Postgres-only transaction.
//! - One active folder: a session advisory lock (`cairn-audit-tree`) held on the connection that
//!   writes. Others stand by; when the holder dies its connection closes and the lock passes on.
//! - Order and gap safety as [`crate::reader::read_after`]: `(transaction_id, global_position)`,
//!   never past the oldest transaction still running, from `audit_tree`'s last position.
//! - Per batch, the leaf hashes (computed by Postgres, `audit_leaf_hash`) are pushed through the
//!   [`Frontier`] outside any transaction; then ONE short transaction inserts the leaves, the
//!   complete subtrees they finished, and moves `audit_tree` (guarded by the size it started
//!   from). The frontier is resumed at start from the stored peaks, never by replaying the tree.
//!   A crash anywhere leaves either the whole batch or none of it.
//! - Heads: after a fold, when `CAIRN_AUDIT_HEAD_EVERY` leaves were added since the last head,
//!   or `CAIRN_AUDIT_HEAD_EVERY_SECS` passed since it and the tree grew (also while idle), the
//!   folder signs (size, root, time) with the newest audit key. The keys directory is re-read
//!   every minute, so a key added by `cairn admin rotate-audit-key` signs from then on.
//! - Metrics: `cairn_audit_tree_size` (gauge), `cairn_audit_leaves_total`,
//!   `cairn_audit_heads_total` (counters), `cairn_audit_fold_seconds` (histogram, per batch).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_platform::audit::merkle::Frontier;
use cairn_platform::audit::{store, AuditKeys, AuditSettings, Hash, SignedHead};
use cairn_platform::clock::SharedClock;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::wakeup::{RelayWakeup, EVENTS_CHANNEL};

/// How often the keys directory is re-read.
const KEY_RELOAD: Duration = Duration::from_secs(60);

/// Folds the event log into the audit tree and signs its heads.
#[derive(Clone)]
pub struct AuditFold {
    pool: PgPool,
    settings: AuditSettings,
    production: bool,
    keys: Arc<RwLock<Arc<AuditKeys>>>,
    clock: SharedClock,
    idle_poll: Duration,
    wake: RelayWakeup,
}

/// Where the fold stands: the tree's edge and the last folded event.
struct Tree {
    frontier: Frontier,
    last_tx: String,
    last_pos: i64,
    log_time: Option<DateTime<Utc>>,
}

/// The last signed head, for the cadence.
struct LastHead {
    size: u64,
    at: Instant,
}

impl AuditFold {
    /// A folder for the tree in `pool`'s database, signing with the keys in
    /// `settings.keys_dir`.
    ///
    /// # Errors
    /// When the keys cannot be loaded: none and production, a development key in production,
    /// an unreadable directory or key. The process should not start then.
    pub fn new(pool: PgPool, settings: AuditSettings, production: bool, clock: SharedClock) -> anyhow::Result<Self> {
        let keys = AuditKeys::load(&settings.keys_dir, production)
            .with_context(|| format!("cannot load the audit keys from {}", settings.keys_dir.display()))?;
        Ok(Self {
            pool,
            settings,
            production,
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            clock,
            idle_poll: Duration::from_millis(500),
            wake: RelayWakeup::local(),
        })
    }

    /// Also wakes on `wake`, which this process's commands signal after each commit.
    #[must_use]
    pub fn with_wake(mut self, wake: RelayWakeup) -> Self {
        self.wake = wake;
        self
    }

    /// Runs until `shutdown`: waits for the lock, then folds; on any failure starts over after
    /// a pause that grows to 5 s.
    pub async fn run(self, shutdown: CancellationToken) {
        spawn_key_reload(
            Arc::clone(&self.keys),
            self.settings.keys_dir.clone(),
            self.production,
            shutdown.child_token(),
        );
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.run_once(&shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        "audit tree fold interrupted"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn run_once(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await.context("audit tree fold cannot reach Postgres")?.detach();
        let key = cairn_platform::db::advisory_key("cairn-audit-tree");
        let mut waiting_logged = false;
        loop {
            let got: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut conn).await?;
            if got {
                break;
            }
            if !waiting_logged {
                tracing::info!("another process folds the audit tree; standing by");
                waiting_logged = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::info!("audit tree fold active");
        let result = self.fold_loop(&mut conn, shutdown).await;
        // Closing the connection releases the lock.
        let _ = conn.close().await;
        result
    }

    async fn fold_loop(&self, conn: &mut PgConnection, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        let mut woken = self.wake.subscribe();
        let mut tree = load_tree(conn).await?;
        let mut last_head = load_last_head(conn).await?;
        metrics::gauge!("cairn_audit_tree_size").set(tree.frontier.size() as f64);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            woken.borrow_and_update();
            let folded = self.fold_batch(conn, &mut tree).await?;
            let size = tree.frontier.size();
            let grown = size > last_head.size;
            if grown
                && (size - last_head.size >= self.settings.head_every_events
                    || last_head.at.elapsed() >= self.settings.head_every)
            {
                self.sign_head(conn, &tree.frontier).await?;
                last_head = LastHead { size, at: Instant::now() };
            }
            if folded >= self.settings.batch {
                continue; // more may be waiting
            }
            let head_due = if size > last_head.size {
                self.settings.head_every.saturating_sub(last_head.at.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                n = listener.recv() => { n?; }
                _ = woken.changed() => {}
                () = tokio::time::sleep(self.idle_poll) => {}
                () = tokio::time::sleep(head_due) => {}
            }
        }
    }

    /// Folds the next batch; returns how many events it folded.
    async fn fold_batch(&self, conn: &mut PgConnection, tree: &mut Tree) -> anyhow::Result<i64> {
        let started = Instant::now();
        let rows = sqlx::query(
            "SELECT e.event_id, e.transaction_id::text AS tx, e.global_position, e.recorded_at, \
                    audit_leaf_hash(e) AS leaf_hash \
               FROM events e \
              WHERE (e.transaction_id, e.global_position) > ($1::text::xid8, $2) \
                AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
              ORDER BY e.transaction_id, e.global_position \
              LIMIT $3",
        )
        .bind(&tree.last_tx)
        .bind(tree.last_pos)
        .bind(self.settings.batch)
        .fetch_all(&mut *conn)
        .await
        .context("cannot read the events to fold")?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Everything but the write happens before the transaction opens: it takes an xid, which
        // holds back every reader's horizon while it is open.
        let start = tree.frontier.size();
        let mut frontier = tree.frontier.clone();
        let mut log_time = tree.log_time;
        let n = rows.len();
        let (mut indexes, mut ids, mut txs, mut positions, mut hashes, mut times) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut levels, mut idxs, mut node_hashes) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let event_id: Uuid = row.try_get("event_id")?;
            let tx: String = row.try_get("tx")?;
            let pos: i64 = row.try_get("global_position")?;
            let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
            let leaf: Vec<u8> = row.try_get("leaf_hash")?;
            let leaf: Hash = leaf.as_slice().try_into().context("audit_leaf_hash is not 32 bytes")?;
            let time = log_time.map_or(recorded_at, |t| t.max(recorded_at));
            log_time = Some(time);
            indexes.push(i64::try_from(frontier.size())?);
            for (level, idx, hash) in frontier.push(leaf) {
                levels.push(i16::from(level));
                idxs.push(i64::try_from(idx)?);
                node_hashes.push(hash.to_vec());
            }
            ids.push(event_id);
            txs.push(tx);
            positions.push(pos);
            hashes.push(leaf.to_vec());
            times.push(time);
        }
        let (Some(last_tx), Some(&last_pos)) = (txs.last().cloned(), positions.last()) else {
            return Ok(0);
        };
        let mut txn = conn.begin().await?;
        sqlx::query(
            "INSERT INTO audit_leaves (leaf_index, event_id, transaction_id, global_position, leaf_hash, log_time) \
             SELECT i, e, t::xid8, p, h, l \
               FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::bigint[], $5::bytea[], $6::timestamptz[]) \
                 AS u(i, e, t, p, h, l)",
        )
        .bind(&indexes)
        .bind(&ids)
        .bind(&txs)
        .bind(&positions)
        .bind(&hashes)
        .bind(&times)
        .execute(&mut *txn)
        .await
        .context("cannot insert audit leaves")?;
        if !levels.is_empty() {
            sqlx::query(
                "INSERT INTO audit_nodes (level, idx, hash) \
                 SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])",
            )
            .bind(&levels)
            .bind(&idxs)
            .bind(&node_hashes)
            .execute(&mut *txn)
            .await
            .context("cannot insert audit nodes")?;
        }
        let moved = sqlx::query(
            "UPDATE audit_tree SET tree_size = $2, last_tx = $3::text::xid8, last_pos = $4, log_time = $5, \
                    updated_at = now() \
              WHERE tree_size = $1",
        )
        .bind(i64::try_from(start)?)
        .bind(i64::try_from(frontier.size())?)
        .bind(&last_tx)
        .bind(last_pos)
        .bind(log_time)
        .execute(&mut *txn)
        .await?
        .rows_affected();
        anyhow::ensure!(moved == 1, "the audit tree is no longer at size {start}: another writer changed it");
        txn.commit().await.context("cannot commit the audit tree batch")?;
        *tree = Tree { frontier, last_tx, last_pos, log_time };
        metrics::counter!("cairn_audit_leaves_total").increment(n as u64);
        metrics::gauge!("cairn_audit_tree_size").set(tree.frontier.size() as f64);
        metrics::histogram!("cairn_audit_fold_seconds").record(started.elapsed().as_secs_f64());
        Ok(i64::try_from(n)?)
    }

    /// Signs and stores the head of `frontier`'s tree.
    async fn sign_head(&self, conn: &mut PgConnection, frontier: &Frontier) -> anyhow::Result<()> {
        let size = frontier.size();
        let root = frontier.root();
        let timestamp_ms = self.clock.now().timestamp_millis();
        let message = SignedHead::message(&self.settings.origin, size, &root, timestamp_ms);
        let keys = self.keys.read().map(|k| Arc::clone(&k)).map_err(|_| anyhow::anyhow!("audit keys lock poisoned"))?;
        let (key_id, signature) = keys.sign(&message).context("no audit key to sign the tree head with")?;
        let inserted = sqlx::query(
            "INSERT INTO audit_heads (tree_size, root_hash, timestamp_ms, origin, key_id, signature) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tree_size) DO NOTHING",
        )
        .bind(i64::try_from(size)?)
        .bind(root.as_slice())
        .bind(timestamp_ms)
        .bind(&self.settings.origin)
        .bind(&key_id)
        .bind(&signature)
        .execute(&mut *conn)
        .await
        .context("cannot store the signed tree head")?
        .rows_affected();
        if inserted == 1 {
            metrics::counter!("cairn_audit_heads_total").increment(1);
            tracing::debug!(tree_size = size, key_id, "signed an audit tree head");
        }
        Ok(())
    }
}

/// Re-reads the keys directory every [`KEY_RELOAD`] until `shutdown`.
fn spawn_key_reload(keys: Arc<RwLock<Arc<AuditKeys>>>, dir: PathBuf, production: bool, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(KEY_RELOAD) => {}
            }
            match AuditKeys::load(&dir, production) {
                Ok(loaded) => {
                    if let Ok(mut current) = keys.write() {
                        *current = Arc::new(loaded);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "keeping the loaded audit keys"),
            }
        }
    });
}

/// The stored fold position and the frontier resumed from the stored peaks.
async fn load_tree(conn: &mut PgConnection) -> anyhow::Result<Tree> {
    let row = sqlx::query("SELECT tree_size, last_tx::text AS last_tx, last_pos, log_time FROM audit_tree")
        .fetch_one(&mut *conn)
        .await
        .context("cannot read audit_tree")?;
    let size = u64::try_from(row.try_get::<i64, _>("tree_size")?)?;
    let peaks = store::peaks(&mut *conn, size).await.context("cannot read the audit tree's peaks")?;
    Ok(Tree {
        frontier: Frontier::from_peaks(size, peaks)?,
        last_tx: row.try_get("last_tx")?,
        last_pos: row.try_get("last_pos")?,
        log_time: row.try_get("log_time")?,
    })
}

/// The size of the last signed head and how long ago it was signed.
async fn load_last_head(conn: &mut PgConnection) -> anyhow::Result<LastHead> {
    let row: Option<(i64, f64)> = sqlx::query_as(
        "SELECT tree_size, EXTRACT(EPOCH FROM now() - signed_at)::float8 FROM audit_heads \
          ORDER BY tree_size DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some((size, ago)) = row else {
        return Ok(LastHead { size: 0, at: Instant::now() });
    };
    let ago = Duration::from_secs_f64(ago.clamp(0.0, 86_400.0));
    Ok(LastHead { size: u64::try_from(size)?, at: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now) })
}
