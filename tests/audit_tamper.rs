//! Tampering with the event log as a superuser (the events table's trigger disabled), each kind
//! on a database of its own: found at its exact leaf index by `GET /api/v1/audit/verify`, by
//! `cairn audit verify` (a child process, exit code 2) and by proofs that no longer check with an
//! implementation written here from RFC 9162 (not the code under test).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use cairn::app::Services;
use common::{TestApp, TestEnv};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn leaf(bytes: &[u8]) -> Hash {
    sha256(&[&[0], bytes])
}

fn node(l: &Hash, r: &Hash) -> Hash {
    sha256(&[&[1], l, r])
}

/// MTH (RFC 9162 §2.1.1), recursively.
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => sha256(&[]),
        1 => leaves[0],
        n => {
            let k = n.next_power_of_two() / 2;
            node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// RFC 9162 §2.1.3.2: verifying an inclusion proof.
fn verify_inclusion(leaf_hash: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in path {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

fn unhex(text: &str) -> Hash {
    hex_bytes(text).try_into().unwrap()
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// The log as it is now, in its one order: (event id, transaction id, position).
async fn log(app: &TestApp) -> Vec<(Uuid, String, i64)> {
    sqlx::query_as(
        "SELECT event_id, transaction_id::text, global_position FROM events ORDER BY transaction_id, global_position",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

/// The root of the first `size` events as stored now, computed here from their canonical text.
async fn recomputed_root(app: &TestApp, size: u64) -> Hash {
    let texts: Vec<String> =
        sqlx::query_scalar("SELECT audit_leaf_text(e) FROM events e ORDER BY transaction_id, global_position LIMIT $1")
            .bind(i64::try_from(size).unwrap())
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(texts.len() as u64, size, "the log holds fewer events than the head covers");
    mth(&texts.iter().map(|t| leaf(t.as_bytes())).collect::<Vec<_>>())
}

/// A log of a few users' events, folded whole, with a signed head covering all of it; returns
/// an admin's token and that head.
async fn folded_app() -> (TestApp, String, Value) {
    let app = TestApp::spawn_with(
        TestEnv::new(),
        Services::all(),
        &[("CAIRN_AUDIT_HEAD_EVERY", "4"), ("CAIRN_AUDIT_HEAD_EVERY_SECS", "1")],
    )
    .await;
    for i in 0..6 {
        app.register_ok(&format!("user{i}-{}@example.com", &Uuid::new_v4().simple().to_string()[..6])).await;
    }
    let (_, admin) = app.admin_token().await;
    // Folded whole and a head at that size; the log then stays still for a moment.
    let started = Instant::now();
    let head = loop {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
        let tree: i64 = sqlx::query_scalar("SELECT tree_size FROM audit_tree").fetch_one(&app.pool).await.unwrap();
        let latest = app.get("/api/v1/audit/checkpoints/latest", Some(&admin)).await;
        if latest.status == StatusCode::OK && tree == events && latest.data()["tree_size"].as_i64() == Some(events) {
            break latest.data().clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the tree never covered the log: {events} events, tree {tree}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (app, admin, head)
}

/// Checks the head's signature with the published key (ring, not the code under test's path).
async fn assert_signed(app: &TestApp, head: &Value) {
    let keys = app.get("/.well-known/audit-keys.json", None).await;
    assert_eq!(keys.status, StatusCode::OK, "{:?}", keys.body);
    let key = keys.body["keys"].as_array().unwrap().iter().find(|k| k["key_id"] == head["key_id"]).unwrap();
    let message = format!(
        "cairn-audit-head/v1\n{}\n{}\n{}\n{}\n",
        head["origin"].as_str().unwrap(),
        head["tree_size"],
        head["root_hash"].as_str().unwrap(),
        head["timestamp_ms"]
    );
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        hex_bytes(key["public_key"].as_str().unwrap()),
    );
    public.verify(message.as_bytes(), &hex_bytes(head["signature"].as_str().unwrap())).unwrap();
}

/// Before any tampering: the route and the command line say intact, and the signed head's root
/// is what the events give.
async fn assert_intact(app: &TestApp, admin: &str, head: &Value) {
    assert_signed(app, head).await;
    let size = head["tree_size"].as_u64().unwrap();
    assert_eq!(recomputed_root(app, size).await, unhex(head["root_hash"].as_str().unwrap()));
    let reply = app.get("/api/v1/audit/verify", Some(admin)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let report = reply.data();
    assert_eq!(report["intact"], true, "{report}");
    assert!(report["tree_size"].as_u64().unwrap() >= size, "{report}");
    assert!(report["events_checked"].as_u64().unwrap() >= size, "{report}");
    assert!(report["heads_checked"].as_u64().unwrap() >= 1, "{report}");
    let out = app.env.command(&["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("intact:"), "{text}");
}

/// After tampering: both interfaces name `kind` at `index` for `event_id`, and the signed head no
/// longer matches the events.
async fn assert_found(app: &TestApp, admin: &str, head: &Value, kind: &str, index: u64, event_id: Uuid) -> Value {
    let reply = app.get("/api/v1/audit/verify", Some(admin)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let report = reply.data().clone();
    assert_eq!(report["intact"], false, "{report}");
    let diff = &report["first_difference"];
    assert_eq!(diff["kind"], kind, "{report}");
    assert_eq!(diff["leaf_index"].as_u64(), Some(index), "{report}");
    assert_eq!(diff["event_id"], event_id.to_string(), "{report}");
    let mismatch = &report["first_head_mismatch"];
    assert!(mismatch["tree_size"].as_u64().unwrap() > index, "{report}");
    assert!(mismatch["last_matching_size"].as_u64().unwrap() <= index, "{report}");

    let out = app.env.command(&["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("first difference: {kind} at leaf index {index}")), "{text}");
    assert!(text.contains(&event_id.to_string()), "{text}");
    if let Some(position) = diff["position"].as_str() {
        assert!(text.contains(position), "{text}");
    }
    let json = app.env.command(&["audit", "verify", "--json"]).output().unwrap();
    assert_eq!(json.status.code(), Some(2));
    let parsed: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed["first_difference"], report["first_difference"]);

    // The signed head, checked here, no longer matches the events as stored.
    let size = head["tree_size"].as_u64().unwrap();
    let signed = unhex(head["root_hash"].as_str().unwrap());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
    if events as u64 >= size {
        assert_ne!(recomputed_root(app, size).await, signed, "the head still matches");
    }
    report
}

async fn superuser(app: &TestApp) {
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_no_update_or_delete").execute(&app.pool).await.unwrap();
}

/// The index of the first event after the first two whose successor is in another transaction.
fn boundary(log: &[(Uuid, String, i64)]) -> usize {
    (2..log.len() - 1).find(|&k| log[k].1 != log[k + 1].1).unwrap()
}

#[tokio::test]
async fn an_updated_payload_is_altered_at_its_leaf_and_its_proof_no_longer_checks() {
    let (app, admin, head) = folded_app().await;
    assert_intact(&app, &admin, &head).await;
    let log = log(&app).await;
    let k = 3;
    let (event_id, _, _) = log[k];
    let size = head["tree_size"].as_u64().unwrap();

    // Its inclusion proof checks before.
    let proof = app.get(&format!("/api/v1/audit/proof/{event_id}?tree_size={size}"), Some(&admin)).await;
    assert_eq!(proof.status, StatusCode::OK, "{:?}", proof.body);
    let path: Vec<Hash> =
        proof.data()["audit_path"].as_array().unwrap().iter().map(|h| unhex(h.as_str().unwrap())).collect();
    assert_eq!(proof.data()["leaf_index"].as_u64(), Some(k as u64));
    let signed = unhex(head["root_hash"].as_str().unwrap());
    let canonical = proof.data()["canonical"].as_str().unwrap().to_owned();
    assert!(verify_inclusion(&leaf(canonical.as_bytes()), k as u64, size, &path, &signed));

    superuser(&app).await;
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{forged}', 'true') WHERE event_id = $1")
        .bind(event_id)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_found(&app, &admin, &head, "altered", k as u64, event_id).await;

    // The bytes now stored no longer prove against the signed head, with the proof the API gives.
    let now: String = sqlx::query_scalar("SELECT audit_leaf_text(e) FROM events e WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_ne!(now, canonical);
    let proof = app.get(&format!("/api/v1/audit/proof/{event_id}?tree_size={size}"), Some(&admin)).await;
    assert_eq!(proof.status, StatusCode::OK, "{:?}", proof.body);
    let path: Vec<Hash> =
        proof.data()["audit_path"].as_array().unwrap().iter().map(|h| unhex(h.as_str().unwrap())).collect();
    assert!(!verify_inclusion(&leaf(now.as_bytes()), k as u64, size, &path, &signed));
    if let Some(shown) = proof.data()["canonical"].as_str() {
        if shown == now {
            assert!(!verify_inclusion(&leaf(shown.as_bytes()), k as u64, size, &path, &signed));
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_deleted_row_is_missing_at_its_leaf() {
    let (app, admin, head) = folded_app().await;
    assert_intact(&app, &admin, &head).await;
    let log = log(&app).await;
    let k = 2;
    let (event_id, _, _) = log[k];
    superuser(&app).await;
    sqlx::query("DELETE FROM events WHERE event_id = $1").bind(event_id).execute(&app.pool).await.unwrap();
    let report = assert_found(&app, &admin, &head, "missing", k as u64, event_id).await;
    assert_eq!(report["first_difference"]["position"], Value::Null);
    assert_eq!(report["first_difference"]["found_event_id"], log[k + 1].0.to_string());
    app.stop().await;
}

#[tokio::test]
async fn two_rows_swapped_are_reordered_at_the_first_of_them() {
    let (app, admin, head) = folded_app().await;
    assert_intact(&app, &admin, &head).await;
    let log = log(&app).await;
    // Two neighbours in different transactions: swapping their transaction ids swaps their places.
    let k = boundary(&log);
    let (a, tx_a, _) = log[k].clone();
    let (b, tx_b, _) = log[k + 1].clone();
    superuser(&app).await;
    sqlx::query(
        "UPDATE events SET transaction_id = (CASE WHEN event_id = $1 THEN $4 ELSE $3 END)::xid8 \
         WHERE event_id IN ($1, $2)",
    )
    .bind(a)
    .bind(b)
    .bind(&tx_a)
    .bind(&tx_b)
    .execute(&app.pool)
    .await
    .unwrap();
    let now = self::log(&app).await;
    assert_eq!((now[k].0, now[k + 1].0), (b, a), "the swap did not reorder them");
    let report = assert_found(&app, &admin, &head, "reordered", k as u64, a).await;
    assert_eq!(report["first_difference"]["found_event_id"], b.to_string());
    app.stop().await;
}

#[tokio::test]
async fn a_forged_event_between_two_others_is_inserted_at_its_index() {
    let (app, admin, head) = folded_app().await;
    assert_intact(&app, &admin, &head).await;
    let log = log(&app).await;
    let k = boundary(&log);
    let (_, tx_k, _) = log[k].clone();
    // In event k's transaction, after it (a position no row has), so before event k + 1.
    let forged = Uuid::new_v4();
    superuser(&app).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
                             global_position, event_id, transaction_id) OVERRIDING SYSTEM VALUE \
         VALUES ('User', $1, 0, 'UserRegistered', '1.0', '{\"UserRegistered\": {\"email\": \"forged@example.com\"}}', \
                 '{}', (SELECT max(global_position) + 1000 FROM events), $2, $3::text::xid8)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(forged)
    .bind(&tx_k)
    .execute(&app.pool)
    .await
    .unwrap();
    let now = self::log(&app).await;
    assert_eq!(now[k + 1].0, forged, "the forged event is not where it was put");
    let report = assert_found(&app, &admin, &head, "inserted", k as u64 + 1, forged).await;
    assert_eq!(report["first_difference"]["recorded_position"], Value::Null);
    // No proof of it exists: the tree never had it.
    let proof = app.get(&format!("/api/v1/audit/proof/{forged}"), Some(&admin)).await;
    assert_eq!(proof.status, StatusCode::NOT_FOUND, "{:?}", proof.body);
    app.stop().await;
}

#[tokio::test]
async fn a_change_hidden_in_the_stored_tree_too_is_bounded_by_the_signed_heads() {
    let (app, admin, head) = folded_app().await;
    assert_intact(&app, &admin, &head).await;
    let log = log(&app).await;
    let k = 3u64;
    let (event_id, _, _) = log[3];
    superuser(&app).await;
    // The leaf rewritten to match the altered event: the stored tree agrees with the log.
    sqlx::query("UPDATE events SET payload = jsonb_set(payload, '{forged}', 'true') WHERE event_id = $1")
        .bind(event_id)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_leaves l SET leaf_hash = audit_leaf_hash(e) FROM events e WHERE e.event_id = l.event_id AND l.event_id = $1")
        .bind(event_id)
        .execute(&app.pool)
        .await
        .unwrap();
    let reply = app.get("/api/v1/audit/verify", Some(&admin)).await;
    let report = reply.data();
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(report["first_difference"], Value::Null, "{report}");
    let mismatch = &report["first_head_mismatch"];
    let (last, first_bad) = (mismatch["last_matching_size"].as_u64().unwrap(), mismatch["tree_size"].as_u64().unwrap());
    assert!(last <= k && k < first_bad, "{report}");
    let out = app.env.command(&["audit", "verify"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains(&format!("first signed head that no longer matches: tree size {first_bad}")), "{text}");
    app.stop().await;
}
