//! The audit tree: proofs checked by an implementation written here from the RFC 9162 text
//! (not the code under test), through the database of a running application, and across a
//! relay killed while it extends the tree.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cairn::Services;
use cairn_platform::audit::merkle::{self, Frontier};
use cairn_platform::audit::{store, AuditKeys, Hash};
use common::{TestApp, TestEnv};
use sqlx::PgPool;

/// An independent reading of RFC 9162 §2.1: SHA-256 through `ring` directly, the recursive MTH,
/// and the verification algorithms of §2.1.3.2 and §2.1.4.2.
mod rfc {
    pub type H = [u8; 32];

    pub fn sha256(data: &[u8]) -> H {
        let digest = ring::digest::digest(&ring::digest::SHA256, data);
        digest.as_ref().try_into().unwrap()
    }

    pub fn leaf(bytes: &[u8]) -> H {
        let mut input = vec![0x00];
        input.extend_from_slice(bytes);
        sha256(&input)
    }

    pub fn node(left: &H, right: &H) -> H {
        let mut input = vec![0x01];
        input.extend_from_slice(left);
        input.extend_from_slice(right);
        sha256(&input)
    }

    /// MTH(D[n]) over leaf hashes, as §2.1.1 defines it.
    pub fn mth(leaves: &[H]) -> H {
        match leaves.len() {
            0 => sha256(&[]),
            1 => leaves[0],
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                node(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    /// §2.1.3.2.
    pub fn verify_inclusion(leaf_index: u64, tree_size: u64, hash: &H, path: &[H], root: &H) -> bool {
        if leaf_index >= tree_size {
            return false;
        }
        let mut f = leaf_index;
        let mut s = tree_size - 1;
        let mut r = *hash;
        for p in path {
            if s == 0 {
                return false;
            }
            if f % 2 == 1 || f == s {
                r = node(p, &r);
                if f % 2 == 0 {
                    while f % 2 == 0 && f != 0 {
                        f /= 2;
                        s /= 2;
                    }
                }
            } else {
                r = node(&r, p);
            }
            f /= 2;
            s /= 2;
        }
        s == 0 && r == *root
    }

    /// §2.1.4.2, for 0 < first < second.
    pub fn verify_consistency(first: u64, second: u64, first_hash: &H, second_hash: &H, proof: &[H]) -> bool {
        if first == 0 || first >= second || proof.is_empty() {
            return false;
        }
        let mut path = proof.to_vec();
        if first.is_power_of_two() {
            path.insert(0, *first_hash);
        }
        let mut f = first - 1;
        let mut s = second - 1;
        while f % 2 == 1 {
            f /= 2;
            s /= 2;
        }
        let mut fr = path[0];
        let mut sr = path[0];
        for c in &path[1..] {
            if s == 0 {
                return false;
            }
            if f % 2 == 1 || f == s {
                fr = node(c, &fr);
                sr = node(c, &sr);
                if f % 2 == 0 {
                    while f % 2 == 0 && f != 0 {
                        f /= 2;
                        s /= 2;
                    }
                }
            } else {
                sr = node(&sr, c);
            }
            f /= 2;
            s /= 2;
        }
        fr == *first_hash && sr == *second_hash && s == 0
    }

    /// Roots of every prefix 0..=n, each by the recursive MTH.
    pub fn prefix_roots(leaves: &[H]) -> Vec<H> {
        (0..=leaves.len()).map(|n| mth(&leaves[..n])).collect()
    }
}

fn flip(hash: &Hash) -> Hash {
    let mut out = *hash;
    out[7] ^= 0x20;
    out
}

/// Leaf hashes pushed through the frontier, and every node it reports (level 0 = the leaves).
fn in_memory_tree(n: u64) -> (Vec<Hash>, HashMap<(u8, u64), Hash>) {
    let mut frontier = Frontier::new();
    let mut nodes = HashMap::new();
    let mut leaves = Vec::new();
    for i in 0..n {
        let leaf = rfc::leaf(format!("event {i}").as_bytes());
        leaves.push(leaf);
        nodes.insert((0, i), leaf);
        for (level, idx, hash) in frontier.push(leaf) {
            assert!(nodes.insert((level, idx), hash).is_none(), "node ({level}, {idx}) reported twice");
        }
    }
    (leaves, nodes)
}

#[test]
fn every_inclusion_proof_up_to_1000_leaves_and_every_consistency_proof_up_to_64_verify_independently() {
    let (leaves, nodes) = in_memory_tree(1000);
    let node = |level: u8, idx: u64| nodes.get(&(level, idx)).copied();
    let roots = rfc::prefix_roots(&leaves);
    // Every stored node is the independent root of its span.
    for (&(level, idx), hash) in &nodes {
        let span = 1usize << level;
        let start = usize::try_from(idx).unwrap() * span;
        assert_eq!(*hash, rfc::mth(&leaves[start..start + span]), "node ({level}, {idx})");
    }
    let mut checked = 0u64;
    for size in 1..=1000u64 {
        let root = roots[size as usize];
        assert_eq!(merkle::root_from(size, node).unwrap(), root, "root at {size}");
        assert_eq!(merkle::root(&leaves[..size as usize]), root);
        for index in 0..size {
            let leaf = leaves[index as usize];
            let path = merkle::inclusion_proof(index, size, node).unwrap();
            assert!(rfc::verify_inclusion(index, size, &leaf, &path, &root), "leaf {index} of {size}");
            checked += 1;
            // Corruptions, for every leaf of the smaller trees and a sample of the larger ones.
            if size <= 130 || index % 17 == 0 || index + 1 == size {
                assert!(!rfc::verify_inclusion(index, size, &flip(&leaf), &path, &root), "a wrong leaf");
                if size > 1 {
                    assert!(!rfc::verify_inclusion((index + 1) % size, size, &leaf, &path, &root), "a wrong index");
                    let mut bad = path.clone();
                    let at = (index as usize) % bad.len();
                    bad[at] = flip(&bad[at]);
                    assert!(!rfc::verify_inclusion(index, size, &leaf, &bad, &root), "a corrupted path");
                    assert!(!rfc::verify_inclusion(index, size, &leaf, &path[..path.len() - 1], &root), "short");
                }
                assert!(!rfc::verify_inclusion(index, size, &leaf, &path, &flip(&root)), "a wrong root");
            }
        }
    }
    assert_eq!(checked, 1000 * 1001 / 2);
    for to in 1..=64u64 {
        for from in 1..=to {
            let proof = merkle::consistency_proof(from, to, node).unwrap();
            let (old, new) = (roots[from as usize], roots[to as usize]);
            if from == to {
                assert!(proof.is_empty(), "{from} → {to}");
                continue;
            }
            assert!(rfc::verify_consistency(from, to, &old, &new, &proof), "{from} → {to}");
            assert!(!rfc::verify_consistency(from, to, &flip(&old), &new, &proof), "{from} → {to}: wrong old root");
            assert!(!rfc::verify_consistency(from, to, &old, &flip(&new), &proof), "{from} → {to}: wrong new root");
            for at in 0..proof.len() {
                let mut bad = proof.clone();
                bad[at] = flip(&bad[at]);
                assert!(!rfc::verify_consistency(from, to, &old, &new, &bad), "{from} → {to}: corrupted at {at}");
            }
            if to > from + 1 {
                assert!(!rfc::verify_consistency(from + 1, to, &old, &new, &proof), "{from} → {to}: wrong size");
            }
        }
    }
    // The code under test's own verifiers agree with these on the same proofs.
    let path = merkle::inclusion_proof(5, 11, node).unwrap();
    assert!(merkle::verify_inclusion(&leaves[5], 5, 11, &path, &roots[11]));
    let proof = merkle::consistency_proof(6, 11, node).unwrap();
    assert!(merkle::verify_consistency(6, 11, &proof, &roots[6], &roots[11]));
}

/// Every leaf hash in the log's order, computed here from the canonical text Postgres prints.
async fn independent_leaves(pool: &PgPool) -> Vec<Hash> {
    let texts: Vec<String> =
        sqlx::query_scalar("SELECT audit_leaf_text(e) FROM events e ORDER BY transaction_id, global_position")
            .fetch_all(pool)
            .await
            .unwrap();
    texts.iter().map(|t| rfc::leaf(t.as_bytes())).collect()
}

async fn tree_size(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT tree_size FROM audit_tree").fetch_one(pool).await.unwrap()
}

async fn event_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await.unwrap()
}

/// Inserts `n` events of a probe aggregate in one transaction (payloads with characters JSON
/// escapes, to exercise the canonical text).
async fn insert_probe_events(pool: &PgPool, label: &str, n: i64) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'AuditProbe', $1 || '-' || g, 1, 'ProbeRecorded', '1', \
                jsonb_build_object('n', g, 'text', 'é \"quoted\" ✓ ' || g, 'nested', jsonb_build_object('b', 1, 'a', 2.50)), \
                jsonb_build_object('actor_id', 'probe', 'request_id', gen_random_uuid()::text) \
           FROM generate_series(1, $2::bigint) AS g",
    )
    .bind(label)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// Checks the stored tree against the events table, independently: the leaves in log order,
/// each event once, every stored node, every head's root and signature.
async fn check_stored_tree(pool: &PgPool, keys_dir: &std::path::Path) -> Vec<Hash> {
    let leaves = independent_leaves(pool).await;
    let n = leaves.len();
    let stored: Vec<(i64, uuid::Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT leaf_index, event_id, leaf_hash FROM audit_leaves ORDER BY leaf_index")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), n, "one leaf per event");
    let in_order: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM events ORDER BY transaction_id, global_position")
            .fetch_all(pool)
            .await
            .unwrap();
    for (i, (index, event_id, hash)) in stored.iter().enumerate() {
        assert_eq!(*index, i as i64, "leaf indexes are contiguous from 0");
        assert_eq!(*event_id, in_order[i], "leaf {i} is the {i}-th event of the log");
        assert_eq!(hash.as_slice(), leaves[i].as_slice(), "leaf {i}'s hash");
    }
    let nodes: Vec<(i16, i64, Vec<u8>)> =
        sqlx::query_as("SELECT level, idx, hash FROM audit_nodes").fetch_all(pool).await.unwrap();
    // Exactly the complete subtrees of the tree of n leaves.
    let expected: usize = (1..63).map(|level| n >> level).sum();
    assert_eq!(nodes.len(), expected, "every complete subtree stored once");
    for (level, idx, hash) in &nodes {
        let span = 1usize << level;
        let start = usize::try_from(*idx).unwrap() * span;
        assert!(start + span <= n, "node ({level}, {idx}) lies within the tree");
        assert_eq!(hash.as_slice(), rfc::mth(&leaves[start..start + span]).as_slice(), "node ({level}, {idx})");
    }
    let keys = AuditKeys::read_dir(keys_dir).unwrap();
    let public: HashMap<String, Vec<u8>> =
        keys.public_keys().into_iter().map(|k| (k.key_id, unhex(&k.public_key))).collect();
    let heads = store::heads(pool).await.unwrap();
    for head in &heads {
        assert!(head.tree_size as usize <= n);
        let root = rfc::mth(&leaves[..head.tree_size as usize]);
        assert_eq!(unhex(&head.root_hash), root.to_vec(), "head at {}", head.tree_size);
        let message = format!(
            "cairn-audit-head/v1\n{}\n{}\n{}\n{}\n",
            head.origin, head.tree_size, head.root_hash, head.timestamp_ms
        );
        let key = public.get(&head.key_id).unwrap_or_else(|| panic!("unknown key {}", head.key_id));
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(message.as_bytes(), &unhex(&head.signature))
            .unwrap_or_else(|_| panic!("the head at {} does not verify", head.tree_size));
        assert!(head.verifies_with(&keys));
    }
    leaves
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test]
async fn the_relay_folds_the_log_and_the_stored_proofs_verify_independently() {
    let extra = [("CAIRN_AUDIT_BATCH", "10"), ("CAIRN_AUDIT_HEAD_EVERY", "10"), ("CAIRN_AUDIT_HEAD_EVERY_SECS", "1")];
    let services = Services { command_api: true, relay: true, ..Services::none() };
    let app = TestApp::spawn_with(TestEnv::new(), services, &extra).await;
    for i in 0..3 {
        app.register_ok(&format!("folded{i}@example.com")).await;
    }
    insert_probe_events(&app.pool, "a", 100).await;
    let total = event_count(&app.pool).await;
    assert!(total >= 103);
    wait_until_folded(&app.pool, total).await;
    // A head for the whole log comes by time, the batch not being a multiple of 10.
    let pool = app.pool.clone();
    let mut latest = 0;
    for _ in 0..500 {
        latest = store::latest_head(&pool).await.unwrap().map_or(0, |h| h.tree_size);
        if latest == total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(latest, total as u64, "a head covers the whole log within the head interval");

    let leaves = check_stored_tree(&app.pool, &app.env.keys.path().join("audit")).await;
    let roots = rfc::prefix_roots(&leaves);
    let n = leaves.len() as u64;
    // A head at least every 10 events: one is signed after the batch (≤ 10 events) that
    // brings 10 or more since the last, and the interval signs others in between.
    let heads = store::heads(&app.pool).await.unwrap();
    assert_heads_every(&heads, 10, 10, n);
    assert_eq!(store::tree_size(&app.pool).await.unwrap(), n);
    for size in [1, 2, 7, 64, n - 1, n] {
        assert_eq!(store::root_at(&app.pool, size).await.unwrap(), roots[size as usize], "root at {size}");
        for index in 0..size {
            let path = store::inclusion_proof(&app.pool, index, size).await.unwrap();
            assert!(
                rfc::verify_inclusion(index, size, &leaves[index as usize], &path, &roots[size as usize]),
                "leaf {index} of {size}"
            );
        }
    }
    for to in 1..=64u64 {
        for from in 1..to {
            let proof = store::consistency_proof(&app.pool, from, to).await.unwrap();
            assert!(
                rfc::verify_consistency(from, to, &roots[from as usize], &roots[to as usize], &proof),
                "{from} → {to}"
            );
        }
    }
    // Event ids map to their leaves.
    let (event_id, position): (uuid::Uuid, i64) = sqlx::query_as(
        "SELECT event_id, 41::bigint FROM events ORDER BY transaction_id, global_position OFFSET 41 LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(store::leaf_of(&app.pool, event_id).await.unwrap(), Some((position as u64, leaves[41])));
    assert_eq!(store::leaf_of(&app.pool, uuid::Uuid::new_v4()).await.unwrap(), None);
    // What an API shows as a bad request.
    for result in [
        store::inclusion_proof(&app.pool, n, n).await,
        store::inclusion_proof(&app.pool, 0, n + 1).await,
        store::consistency_proof(&app.pool, 0, n).await,
        store::consistency_proof(&app.pool, 5, 4).await,
        store::consistency_proof(&app.pool, 1, n + 1).await,
    ] {
        assert!(matches!(result, Err(store::ProofError::OutOfRange(_))), "{result:?}");
    }
    assert!(matches!(store::root_at(&app.pool, n + 1).await, Err(store::ProofError::OutOfRange(_))));

    // More events extend the tree, and the old heads are consistent with the new one.
    insert_probe_events(&app.pool, "b", 25).await;
    let total = event_count(&app.pool).await;
    wait_until_folded(&app.pool, total).await;
    let roots = rfc::prefix_roots(&check_stored_tree(&app.pool, &app.env.keys.path().join("audit")).await);
    let to = total as u64;
    for head in store::heads(&app.pool).await.unwrap().iter().filter(|h| h.tree_size < to) {
        let proof = store::consistency_proof(&app.pool, head.tree_size, to).await.unwrap();
        assert!(rfc::verify_consistency(
            head.tree_size,
            to,
            &roots[head.tree_size as usize],
            &roots[to as usize],
            &proof
        ));
    }
    app.stop().await;
}

/// Heads come at least every `every` events (up to `slack` more: the batch that crossed the
/// mark), the last one covering `total`.
fn assert_heads_every(heads: &[cairn_platform::audit::SignedHead], every: u64, slack: u64, total: u64) {
    let mut previous = 0;
    for head in heads {
        assert!(head.tree_size > previous, "heads in increasing size");
        assert!(head.tree_size - previous < every + slack, "a head at {} after one at {previous}", head.tree_size);
        previous = head.tree_size;
    }
    assert_eq!(previous, total, "the newest head covers the whole log");
}

async fn wait_until_folded(pool: &PgPool, total: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let size = tree_size(pool).await;
        if size == total {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the tree holds {size} of {total} events after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_relay_killed_while_it_extends_the_tree_leaves_it_consistent_after_a_restart() {
    common::quiet_logs();
    let env = TestEnv::new();
    let pool = cairn_platform::db::connect_and_migrate(&env.database_url, 4).await.unwrap();
    const TOTAL: i64 = 30_000;
    insert_probe_events(&pool, "backlog", TOTAL).await;
    assert_eq!(tree_size(&pool).await, 0, "nothing folds before a relay runs");

    let start = |env: &TestEnv| {
        env.command(&["relay"])
            .env("CAIRN_AUDIT_BATCH", "200")
            .env("CAIRN_AUDIT_HEAD_EVERY", "1000")
            .env("CAIRN_AUDIT_HEAD_EVERY_SECS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = start(&env);
    let mut size = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while size == 0 {
        assert!(first.try_wait().unwrap().is_none(), "the relay exited");
        assert!(std::time::Instant::now() < deadline, "the relay folded nothing within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
        size = tree_size(&pool).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = tree_size(&pool).await;
    assert!(at_kill > 0 && at_kill < TOTAL, "killed mid-fold: {at_kill} of {TOTAL}");

    let mut second = start(&env);
    wait_until_folded(&pool, TOTAL).await;
    // The interval signs the head of the whole log.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store::latest_head(&pool).await.unwrap().map_or(0, |h| h.tree_size) != TOTAL as u64 {
        assert!(std::time::Instant::now() < deadline, "no head of the whole log within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    check_stored_tree(&pool, &env.keys.path().join("audit")).await;
    // A crash between a batch's commit and its head delays that head by one batch at most.
    let heads = store::heads(&pool).await.unwrap();
    assert_heads_every(&heads, 1000, 2 * 200, TOTAL as u64);
    pool.close().await;
    env.cleanup().await;
}
