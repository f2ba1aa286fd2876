//! Recomputing the tree from the events table and comparing it with the stored tree and every
//! signed head.
//!
//! The events are read in the log's one order (`transaction_id`, `global_position`) in keyset
//! pages, their leaf hashes computed by Postgres with `audit_leaf_hash(e)` (the same definition
//! the fold uses), beside the stored leaves read in `leaf_index` order: memory stays constant
//! whatever the log's length (one page of each, the tree's right edge, one page of heads).
//!
//! Two checks, of different strength:
//!
//! - **Leaves.** At each index below the stored tree's size, the event the log has now is
//!   compared with the leaf folded then (its event id and hash). The first index that differs is
//!   reported with how it differs ([`DifferenceKind`]). This finds a change to the events table
//!   at its exact position, as long as `audit_leaves` itself was left alone.
//! - **Signed heads.** A [`Frontier`] over the recomputed leaf hashes gives the root at every
//!   head's size; each head's root and signature are checked. The heads are the anchor: someone
//!   who rewrote `audit_leaves` and `audit_nodes` to match a changed log cannot sign new heads
//!   without the audit key, so the first head whose root no longer matches bounds the change to
//!   the leaves between the last head that matches and that head.
//!
//! Events past the folded tree (not folded yet) are not compared: they are no difference.

use std::fmt;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::merkle::Frontier;
use super::{to_hex, AuditKeys, Hash, SignedHead};

/// Events (and stored leaves) read per query.
const PAGE: u64 = 5000;

/// Signed heads read per query.
const HEAD_PAGE: i64 = 500;

/// At most this many heads with a failing signature are listed (all are counted).
const MAX_LISTED_SIGNATURES: usize = 20;

/// How the log differs from the tree at a leaf index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// The same event is at this index, but its stored bytes changed (another leaf hash).
    Altered,
    /// The event the tree holds at this index is no longer in the log.
    Missing,
    /// The log has, at this index, an event the tree never had.
    Inserted,
    /// The event the tree holds here and the event the log has here both exist, elsewhere in
    /// each other's order (e.g. two rows' positions swapped).
    Reordered,
}

impl fmt::Display for DifferenceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Altered => "altered",
            Self::Missing => "missing",
            Self::Inserted => "inserted",
            Self::Reordered => "reordered",
        })
    }
}

/// The first leaf index at which the log no longer matches the stored tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Difference {
    /// The leaf index (0-based; the event's place in the log's order).
    pub leaf_index: u64,
    /// How it differs.
    pub kind: DifferenceKind,
    /// The event concerned: the altered one; the one missing (the tree's); the one inserted (the
    /// log's); the one the tree holds here, for a reordering.
    pub event_id: Uuid,
    /// Where that event is in the log now (`<transaction>.<position>`); null when it is gone.
    pub position: Option<String>,
    /// Where the tree recorded that event when it was folded; null when the tree never had it.
    pub recorded_position: Option<String>,
    /// The event the log has at this index now, when it is not `event_id`.
    pub found_event_id: Option<Uuid>,
    /// What was found, in words.
    pub detail: String,
}

/// The first signed head whose root the events no longer give.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeadMismatch {
    /// The head's size.
    pub tree_size: u64,
    /// The root it signed, hex.
    pub signed_root: String,
    /// The root of the first `tree_size` events as they are now, hex; null when the log holds
    /// fewer events.
    pub recomputed_root: Option<String>,
    /// The largest signed size below this one whose root still matches (0 when none): the change
    /// is among leaves `last_matching_size` … `tree_size − 1`.
    pub last_matching_size: u64,
    /// What was found, in words.
    pub detail: String,
}

/// A signed head whose signature does not verify with the published audit keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BadSignature {
    /// The head's size.
    pub tree_size: u64,
    /// The key it names.
    pub key_id: String,
    /// `unknown key` or `bad signature`.
    pub detail: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VerifyReport {
    /// No difference, every head's root matches and every signature verifies.
    pub intact: bool,
    /// The stored tree's size (events folded) when the check started.
    pub tree_size: u64,
    /// Events read from the log and recomputed.
    pub events_checked: u64,
    /// Signed heads checked (root and signature).
    pub heads_checked: u64,
    /// The first leaf index where the log and the stored tree differ, and how.
    pub first_difference: Option<Difference>,
    /// The first signed head whose root the events no longer give.
    pub first_head_mismatch: Option<HeadMismatch>,
    /// How many heads' signatures fail.
    pub bad_signature_count: u64,
    /// The first of them (at most 20).
    pub bad_signatures: Vec<BadSignature>,
}

/// One event as the check reads it.
struct LogLeaf {
    event_id: Uuid,
    tx: String,
    pos: i64,
    hash: Hash,
}

/// One stored leaf.
struct StoredLeaf {
    index: u64,
    event_id: Uuid,
    tx: String,
    pos: i64,
    hash: Hash,
}

/// Recomputes the tree from the events table and compares it with the stored leaves and every
/// signed head (see the module).
///
/// # Errors
/// When a query fails or the database holds something malformed (a hash of the wrong length).
pub async fn verify(pool: &PgPool, keys: &AuditKeys) -> anyhow::Result<VerifyReport> {
    verify_with_progress(pool, keys, |_, _| {}).await
}

/// [`verify`], calling `progress(events_checked, events_to_check)` after each page.
///
/// # Errors
/// As [`verify`].
pub async fn verify_with_progress(
    pool: &PgPool,
    keys: &AuditKeys,
    mut progress: impl FnMut(u64, u64) + Send,
) -> anyhow::Result<VerifyReport> {
    let tree_size: i64 =
        sqlx::query_scalar("SELECT tree_size FROM audit_tree").fetch_optional(pool).await?.unwrap_or(0);
    let tree_size = u64::try_from(tree_size)?;
    // Heads are read after the size: a head signed meanwhile covers events folded (and so
    // committed) meanwhile, which the recomputation reads as well.
    let max_head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(tree_size), 0) FROM audit_heads").fetch_one(pool).await?;
    let end = tree_size.max(u64::try_from(max_head)?);

    let mut report = VerifyReport {
        intact: true,
        tree_size,
        events_checked: 0,
        heads_checked: 0,
        first_difference: None,
        first_head_mismatch: None,
        bad_signature_count: 0,
        bad_signatures: Vec::new(),
    };
    let mut heads = Heads::default();
    let mut last_matching = 0u64;
    let mut frontier = Frontier::new();
    let mut after = ("0".to_owned(), 0i64);
    let mut index = 0u64;

    while index < end {
        let want = PAGE.min(end - index);
        let compare_leaves = report.first_difference.is_none() && index < tree_size;
        let leaves_end = (index + want).min(tree_size);
        let (events, leaves) = tokio::try_join!(read_events(pool, &after, want), async {
            if compare_leaves {
                read_leaves(pool, index, leaves_end).await
            } else {
                Ok(Vec::new())
            }
        })?;
        let mut stored = leaves.iter().peekable();
        for event in &events {
            if report.first_difference.is_none() && index < tree_size {
                while stored.next_if(|leaf| leaf.index < index).is_some() {}
                let leaf = stored.next_if(|leaf| leaf.index == index);
                report.first_difference = compare(pool, index, event, leaf).await?;
            }
            frontier.push(event.hash);
            index += 1;
            report.events_checked = index;
            while let Some(head) = heads.next_at_most(pool, index).await? {
                check_head(keys, &head, Some(&frontier.root()), &mut report, &mut last_matching, index)?;
            }
        }
        if let Some(last) = events.last() {
            after = (last.tx.clone(), last.pos);
        }
        progress(index, end);
        if (events.len() as u64) < want {
            // The log holds fewer events than the tree (or a head) covers.
            if report.first_difference.is_none() && index < tree_size {
                let leaf = read_leaves(pool, index, index + 1).await?.into_iter().next();
                report.first_difference = match leaf {
                    Some(leaf) => Some(missing(pool, &leaf, None).await?),
                    None => None,
                };
            }
            while let Some(head) = heads.next_at_most(pool, u64::MAX).await? {
                check_head(keys, &head, None, &mut report, &mut last_matching, index)?;
            }
            break;
        }
    }
    // Heads past everything read (none, unless the log ended exactly at a page boundary).
    while let Some(head) = heads.next_at_most(pool, u64::MAX).await? {
        let root = (head.tree_size == index).then(|| frontier.root());
        check_head(keys, &head, root.as_ref(), &mut report, &mut last_matching, index)?;
    }
    report.intact =
        report.first_difference.is_none() && report.first_head_mismatch.is_none() && report.bad_signature_count == 0;
    Ok(report)
}

/// A stored head: size, root, time (ms), origin, key id, signature.
type HeadRow = (i64, Vec<u8>, i64, String, String, Vec<u8>);

/// The signed heads, oldest first, a page at a time.
#[derive(Default)]
struct Heads {
    page: std::collections::VecDeque<SignedHead>,
    after: i64,
    done: bool,
}

impl Heads {
    /// The next head if its size is at most `size`.
    async fn next_at_most(&mut self, pool: &PgPool, size: u64) -> anyhow::Result<Option<SignedHead>> {
        if self.page.is_empty() && !self.done {
            let rows: Vec<HeadRow> = sqlx::query_as(
                "SELECT tree_size, root_hash, timestamp_ms, origin, key_id, signature FROM audit_heads \
                 WHERE tree_size > $1 ORDER BY tree_size LIMIT $2",
            )
            .bind(self.after)
            .bind(HEAD_PAGE)
            .fetch_all(pool)
            .await?;
            self.done = rows.len() < usize::try_from(HEAD_PAGE)?;
            for (tree_size, root, timestamp_ms, origin, key_id, signature) in rows {
                self.after = tree_size;
                let root: Hash =
                    root.try_into().map_err(|_| anyhow::anyhow!("a stored head's root is not 32 bytes"))?;
                let head =
                    SignedHead::from_parts(origin, u64::try_from(tree_size)?, &root, timestamp_ms, key_id, &signature);
                self.page.push_back(head);
            }
        }
        match self.page.front() {
            Some(head) if head.tree_size <= size => Ok(self.page.pop_front()),
            _ => Ok(None),
        }
    }
}

/// Checks one head's signature, and its root against `recomputed` (the root of its first
/// `tree_size` events now; `None` when the log holds only `log_size` events).
fn check_head(
    keys: &AuditKeys,
    head: &SignedHead,
    recomputed: Option<&Hash>,
    report: &mut VerifyReport,
    last_matching: &mut u64,
    log_size: u64,
) -> anyhow::Result<()> {
    report.heads_checked += 1;
    if !head.verifies_with(keys) {
        report.bad_signature_count += 1;
        if report.bad_signatures.len() < MAX_LISTED_SIGNATURES {
            let known = keys.public_keys().iter().any(|k| k.key_id == head.key_id);
            report.bad_signatures.push(BadSignature {
                tree_size: head.tree_size,
                key_id: head.key_id.clone(),
                detail: if known { "bad signature" } else { "unknown key" }.to_owned(),
            });
        }
    }
    if report.first_head_mismatch.is_some() {
        return Ok(());
    }
    let signed = head.root()?;
    match recomputed {
        Some(root) if *root == signed => *last_matching = head.tree_size,
        Some(root) => {
            report.first_head_mismatch = Some(HeadMismatch {
                tree_size: head.tree_size,
                signed_root: head.root_hash.clone(),
                recomputed_root: Some(to_hex(root)),
                last_matching_size: *last_matching,
                detail: format!(
                    "the first {} events as stored now hash to another root than the one signed: \
                     something changed among leaves {}..{}",
                    head.tree_size,
                    *last_matching,
                    head.tree_size - 1
                ),
            });
        }
        None => {
            report.first_head_mismatch = Some(HeadMismatch {
                tree_size: head.tree_size,
                signed_root: head.root_hash.clone(),
                recomputed_root: None,
                last_matching_size: *last_matching,
                detail: format!("the head covers {} events but the log holds only {log_size}", head.tree_size),
            });
        }
    }
    Ok(())
}

/// Compares the event the log has at `index` with the stored leaf there.
async fn compare(
    pool: &PgPool,
    index: u64,
    event: &LogLeaf,
    leaf: Option<&StoredLeaf>,
) -> anyhow::Result<Option<Difference>> {
    let Some(leaf) = leaf else {
        // The stored tree lost this leaf: as far as it knows, the log's event is new here.
        return Ok(Some(Difference {
            leaf_index: index,
            kind: DifferenceKind::Inserted,
            event_id: event.event_id,
            position: Some(position(&event.tx, event.pos)),
            recorded_position: None,
            found_event_id: None,
            detail: "the stored tree has no leaf at this index".to_owned(),
        }));
    };
    if leaf.event_id == event.event_id {
        if leaf.hash == event.hash {
            return Ok(None);
        }
        return Ok(Some(Difference {
            leaf_index: index,
            kind: DifferenceKind::Altered,
            event_id: event.event_id,
            position: Some(position(&event.tx, event.pos)),
            recorded_position: Some(position(&leaf.tx, leaf.pos)),
            found_event_id: None,
            detail: format!(
                "the event's stored bytes changed: its leaf hash is now {}, the tree folded {}",
                to_hex(&event.hash),
                to_hex(&leaf.hash)
            ),
        }));
    }
    let now: Option<(String, i64)> =
        sqlx::query_as("SELECT transaction_id::text, global_position FROM events WHERE event_id = $1")
            .bind(leaf.event_id)
            .fetch_optional(pool)
            .await?;
    let Some((tx, pos)) = now else {
        return Ok(Some(missing(pool, leaf, Some(event)).await?));
    };
    let in_tree: Option<i64> = sqlx::query_scalar("SELECT leaf_index FROM audit_leaves WHERE event_id = $1")
        .bind(event.event_id)
        .fetch_optional(pool)
        .await?;
    Ok(Some(match in_tree {
        None => Difference {
            leaf_index: index,
            kind: DifferenceKind::Inserted,
            event_id: event.event_id,
            position: Some(position(&event.tx, event.pos)),
            recorded_position: None,
            found_event_id: None,
            detail: format!(
                "the log has an event here that the tree never had; the tree holds event {} at this index",
                leaf.event_id
            ),
        },
        Some(elsewhere) => Difference {
            leaf_index: index,
            kind: DifferenceKind::Reordered,
            event_id: leaf.event_id,
            position: Some(position(&tx, pos)),
            recorded_position: Some(position(&leaf.tx, leaf.pos)),
            found_event_id: Some(event.event_id),
            detail: format!(
                "the log now has event {} here, which the tree holds at leaf {elsewhere}; the event the tree \
                 holds here moved from {} to {}",
                event.event_id,
                position(&leaf.tx, leaf.pos),
                position(&tx, pos)
            ),
        },
    }))
}

/// A `missing` difference for the stored `leaf` whose event is gone (`found`: what the log has
/// at its index instead, if anything).
async fn missing(pool: &PgPool, leaf: &StoredLeaf, found: Option<&LogLeaf>) -> anyhow::Result<Difference> {
    // The event may have moved rather than gone: look it up by id.
    let now: Option<(String, i64)> =
        sqlx::query_as("SELECT transaction_id::text, global_position FROM events WHERE event_id = $1")
            .bind(leaf.event_id)
            .fetch_optional(pool)
            .await?;
    let (kind, detail) = match &now {
        None => {
            (DifferenceKind::Missing, format!("event {} (leaf {}) is no longer in the log", leaf.event_id, leaf.index))
        }
        Some((tx, pos)) => (
            DifferenceKind::Reordered,
            format!("event {} moved from {} to {}", leaf.event_id, position(&leaf.tx, leaf.pos), position(tx, *pos)),
        ),
    };
    Ok(Difference {
        leaf_index: leaf.index,
        kind,
        event_id: leaf.event_id,
        position: now.map(|(tx, pos)| position(&tx, pos)),
        recorded_position: Some(position(&leaf.tx, leaf.pos)),
        found_event_id: found.map(|e| e.event_id),
        detail,
    })
}

fn position(tx: &str, pos: i64) -> String {
    format!("{tx}.{pos}")
}

/// Up to `limit` events after `after` in the log's order, with their leaf hashes.
async fn read_events(pool: &PgPool, after: &(String, i64), limit: u64) -> anyhow::Result<Vec<LogLeaf>> {
    let rows: Vec<(Uuid, String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT e.event_id, e.transaction_id::text, e.global_position, audit_leaf_hash(e) FROM events e \
         WHERE (e.transaction_id, e.global_position) > ($1::text::xid8, $2) \
         ORDER BY e.transaction_id, e.global_position LIMIT $3",
    )
    .bind(&after.0)
    .bind(after.1)
    .bind(i64::try_from(limit)?)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(event_id, tx, pos, hash)| {
            let hash = hash.try_into().map_err(|_| anyhow::anyhow!("audit_leaf_hash did not return 32 bytes"))?;
            Ok(LogLeaf { event_id, tx, pos, hash })
        })
        .collect()
}

/// The stored leaves `from` … `to − 1` that exist, in index order.
async fn read_leaves(pool: &PgPool, from: u64, to: u64) -> anyhow::Result<Vec<StoredLeaf>> {
    let rows: Vec<(i64, Uuid, String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT leaf_index, event_id, transaction_id::text, global_position, leaf_hash FROM audit_leaves \
         WHERE leaf_index >= $1 AND leaf_index < $2 ORDER BY leaf_index",
    )
    .bind(i64::try_from(from)?)
    .bind(i64::try_from(to)?)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(index, event_id, tx, pos, hash)| {
            let hash = hash.try_into().map_err(|_| anyhow::anyhow!("a stored leaf hash is not 32 bytes"))?;
            Ok(StoredLeaf { index: u64::try_from(index)?, event_id, tx, pos, hash })
        })
        .collect()
}
