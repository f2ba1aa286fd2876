//! The verifiable log: an append-only Merkle tree over the event log, signed tree heads, the
//! audit keys that sign them, proofs, and the recomputation that finds tampering.
//!
//! **Leaves.** The relay process folds every event, in the log's one order (`transaction_id`,
//! `global_position`, never past a transaction still running), into a tree of the RFC 6962 /
//! RFC 9162 §2.1 shape. A leaf is `SHA-256(0x00 || bytes)` where `bytes` is the UTF-8 of the
//! stored event as Postgres prints `audit_leaf_text(e)` (migration `0012_audit.sql`): one JSON
//! object of `event_id`, `aggregate_type`, `aggregate_id`, `sequence`, `event_type`,
//! `event_version`, `recorded_at` (UTC, microseconds, `Z`), `payload` and `metadata`. Every API
//! that shows an event to an auditor also shows that text (`canonical`), so an auditor hashes the
//! very bytes they read. An interior node is `SHA-256(0x01 || left || right)`; the tree of `n`
//! leaves splits at the largest power of two below `n`, as the RFC says.
//!
//! **Tree heads.** Every `CAIRN_AUDIT_HEAD_EVERY` events or `CAIRN_AUDIT_HEAD_EVERY_SECS` seconds
//! (whichever comes first, and only when the tree grew) the folder signs a [`SignedHead`] with
//! the newest audit key ([`keys`]); the signed bytes are [`SignedHead::message`].
//!
//! - [`keys`]: the Ed25519 audit keys (`CAIRN_AUDIT_KEYS_DIR`), kept apart from the token keys.
//! - [`merkle`]: the tree's pure algorithms (hashes, roots, proofs, their verification).
//! - [`store`]: the tree as stored (leaves, nodes, heads) and the proofs served from it.
//! - [`verify`]: recomputing the tree from the events table and comparing it with every head.

pub mod keys;
pub mod merkle;
pub mod store;
pub mod verify;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub use keys::{AuditKeyError, AuditKeys};

/// A SHA-256 digest: a leaf, a node or a root.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
#[must_use]
pub fn empty_root() -> Hash {
    sha256(&[&[]])
}

/// SHA-256 over the concatenation of `parts`.
#[must_use]
pub fn sha256(parts: &[&[u8]]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A leaf hash: `SHA-256(0x00 || bytes)`, `bytes` being the event's canonical text.
#[must_use]
pub fn leaf_hash(bytes: &[u8]) -> Hash {
    sha256(&[&[0x00], bytes])
}

/// An interior node: `SHA-256(0x01 || left || right)`.
#[must_use]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

/// `hash` as lowercase hex, the way every API writes hashes, keys and signatures.
#[must_use]
pub fn to_hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A 32-byte hash from hex.
///
/// # Errors
/// When `text` is not 64 hex digits.
pub fn hash_from_hex(text: &str) -> anyhow::Result<Hash> {
    let bytes = hex::decode(text).context("not hex")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("a hash is 32 bytes (64 hex digits)"))
}

/// How the audit tree is kept (`CAIRN_AUDIT_*`).
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// `CAIRN_AUDIT_TREE`: whether the relay process folds the log into the tree (default `on`;
    /// `off` only to measure what the tree costs).
    pub tree: bool,
    /// `CAIRN_AUDIT_KEYS_DIR`: the audit signing keys, one PEM file per key (default
    /// `.cairn/audit-keys`; development generates a `-dev` key, production refuses one).
    pub keys_dir: PathBuf,
    /// `CAIRN_AUDIT_HEAD_EVERY`: sign a head once this many events were folded since the last
    /// one (default 1000).
    pub head_every_events: u64,
    /// `CAIRN_AUDIT_HEAD_EVERY_SECS`: …or once this long passed with the tree grown (default 10).
    pub head_every: Duration,
    /// `CAIRN_AUDIT_ORIGIN`: the log's name, the first line of every signed head (default `cairn`).
    pub origin: String,
    /// `CAIRN_AUDIT_BATCH`: events folded per transaction (default 1000).
    pub batch: i64,
}

/// Where audit keys live unless `CAIRN_AUDIT_KEYS_DIR` says otherwise (development only).
pub const DEFAULT_AUDIT_KEYS_DIR: &str = ".cairn/audit-keys";

impl AuditSettings {
    /// Reads `CAIRN_AUDIT_*` through `lookup`.
    ///
    /// # Errors
    /// A malformed value, named.
    pub fn from_lookup(lookup: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let num = |key: &str, default: u64| -> anyhow::Result<u64> {
            get(key).map_or(Ok(default), |v| {
                v.trim().parse::<u64>().with_context(|| format!("{key} must be a non-negative integer"))
            })
        };
        let tree = match get("CAIRN_AUDIT_TREE").as_deref().map(str::trim) {
            None | Some("on" | "true" | "1" | "yes") => true,
            Some("off" | "false" | "0" | "no") => false,
            Some(other) => anyhow::bail!("CAIRN_AUDIT_TREE must be on or off, not '{other}'"),
        };
        let origin = get("CAIRN_AUDIT_ORIGIN").unwrap_or_else(|| "cairn".to_owned());
        if origin.contains('\n') || origin.trim() != origin {
            anyhow::bail!("CAIRN_AUDIT_ORIGIN must be one line without surrounding spaces");
        }
        Ok(Self {
            tree,
            keys_dir: PathBuf::from(get("CAIRN_AUDIT_KEYS_DIR").unwrap_or_else(|| DEFAULT_AUDIT_KEYS_DIR.to_owned())),
            head_every_events: num("CAIRN_AUDIT_HEAD_EVERY", 1000)?.max(1),
            head_every: Duration::from_secs(num("CAIRN_AUDIT_HEAD_EVERY_SECS", 10)?.max(1)),
            origin,
            batch: i64::try_from(num("CAIRN_AUDIT_BATCH", 1000)?.clamp(1, 100_000))?,
        })
    }
}

/// A signed tree head: the tree of `tree_size` leaves has root `root_hash`, said at
/// `timestamp_ms` by the holder of audit key `key_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignedHead {
    /// The log's name (`CAIRN_AUDIT_ORIGIN`).
    pub origin: String,
    /// How many leaves (events) the tree holds.
    pub tree_size: u64,
    /// The tree's root, hex.
    pub root_hash: String,
    /// When it was signed, milliseconds since the Unix epoch (the signed value).
    pub timestamp_ms: i64,
    /// The same time, RFC 3339 (for reading; not signed).
    pub timestamp: DateTime<Utc>,
    /// The audit key that signed it (see `/.well-known/audit-keys.json`).
    pub key_id: String,
    /// Ed25519 signature of [`SignedHead::message`], hex.
    pub signature: String,
}

impl SignedHead {
    /// The bytes signed: `cairn-audit-head/v1`, origin, size, root (hex) and time (ms), one per
    /// line, each line ending in `\n`.
    #[must_use]
    pub fn message(origin: &str, tree_size: u64, root: &Hash, timestamp_ms: i64) -> Vec<u8> {
        format!("cairn-audit-head/v1\n{origin}\n{tree_size}\n{}\n{timestamp_ms}\n", to_hex(root)).into_bytes()
    }

    /// A head from its stored parts.
    #[must_use]
    pub fn from_parts(
        origin: String,
        tree_size: u64,
        root: &Hash,
        timestamp_ms: i64,
        key_id: String,
        signature: &[u8],
    ) -> Self {
        Self {
            origin,
            tree_size,
            root_hash: to_hex(root),
            timestamp_ms,
            timestamp: Utc.timestamp_millis_opt(timestamp_ms).single().unwrap_or_default(),
            key_id,
            signature: to_hex(signature),
        }
    }

    /// The root as bytes.
    ///
    /// # Errors
    /// When `root_hash` is not 64 hex digits.
    pub fn root(&self) -> anyhow::Result<Hash> {
        hash_from_hex(&self.root_hash)
    }

    /// Whether the signature is a valid Ed25519 signature of this head's message by the key
    /// `key_id` in `keys`.
    #[must_use]
    pub fn verifies_with(&self, keys: &AuditKeys) -> bool {
        let (Ok(root), Ok(signature)) = (self.root(), hex::decode(&self.signature)) else {
            return false;
        };
        keys.verify(&self.key_id, &Self::message(&self.origin, self.tree_size, &root, self.timestamp_ms), &signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_follow_rfc_6962() {
        // SHA-256 of the empty string.
        assert_eq!(to_hex(&empty_root()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        // A leaf is prefixed with 0x00, a node with 0x01: the same input hashes differently.
        let leaf = leaf_hash(b"x");
        assert_ne!(leaf, sha256(&[b"x"]));
        assert_ne!(node_hash(&leaf, &leaf), sha256(&[&leaf, &leaf]));
    }

    #[test]
    fn the_signed_message_is_fixed() {
        let message = SignedHead::message("cairn", 3, &[0xab; 32], 1_700_000_000_123);
        let text = String::from_utf8(message).unwrap_or_default();
        assert_eq!(text, format!("cairn-audit-head/v1\ncairn\n3\n{}\n1700000000123\n", "ab".repeat(32)));
    }

    #[test]
    fn settings_have_defaults_and_refuse_nonsense() -> anyhow::Result<()> {
        let none = |_: &str| None;
        let s = AuditSettings::from_lookup(&none)?;
        assert!(s.tree);
        assert_eq!(s.head_every_events, 1000);
        assert_eq!(s.head_every, Duration::from_secs(10));
        assert_eq!(s.origin, "cairn");
        let bad = |k: &str| (k == "CAIRN_AUDIT_TREE").then(|| "maybe".to_owned());
        assert!(AuditSettings::from_lookup(&bad).is_err());
        Ok(())
    }
}
