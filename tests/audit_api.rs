//! The auditors' API through the real HTTP API: the log with its filters and cursors, time
//! filters at the edge where `recorded_at` goes backwards along the log, exports in both formats
//! ending with a head whose signature checks, inclusion and consistency proofs checked by a small
//! implementation of RFC 9162 written here (not the code under test), bad parameters, and an
//! export that stops when its client goes away.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cairn::app::Services;
use chrono::{DateTime, Utc};
use common::{Serve, TestApp, TestEnv, PASSWORD};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;
use sqlx::PgPool;
use uuid::Uuid;

/// Heads every 5 events or every second, so tests see them soon.
const HEADS_OFTEN: [(&str, &str); 3] =
    [("CAIRN_AUDIT_HEAD_EVERY", "5"), ("CAIRN_AUDIT_HEAD_EVERY_SECS", "1"), ("CAIRN_VERIFIED_EMAIL_FOR", "none")];

// ---- an independent Merkle tree (RFC 9162 §2.1), SHA-256 from the `sha2` crate ----

type H = [u8; 32];

fn sha(parts: &[&[u8]]) -> H {
    let mut d = sha2::Sha256::new();
    for p in parts {
        d.update(p);
    }
    d.finalize().into()
}

fn leaf(bytes: &[u8]) -> H {
    sha(&[&[0], bytes])
}

fn node(l: &H, r: &H) -> H {
    sha(&[&[1], l, r])
}

/// MTH(D[n]) (§2.1.1).
fn mth(leaves: &[H]) -> H {
    match leaves.len() {
        0 => sha(&[]),
        1 => leaves[0],
        n => {
            let k = largest_power_of_two_below(n);
            node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn largest_power_of_two_below(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// Inclusion proof verification (§2.1.3.2).
fn verify_inclusion(index: u64, size: u64, leaf_hash: &H, path: &[H], root: &H) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s, mut r) = (index, size - 1, *leaf_hash);
    for p in path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Consistency proof verification (§2.1.4.2); equal sizes need an empty proof and equal roots.
fn verify_consistency(first: u64, second: u64, first_root: &H, second_root: &H, proof: &[H]) -> bool {
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 || first > second || proof.is_empty() && !first.is_power_of_two() {
        return false;
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node(c, &fr);
            sr = node(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0 && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{text}");
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

fn hash_of(value: &Value) -> H {
    unhex(value.as_str().unwrap()).try_into().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `head` is signed by a key of the published document, over the message the README
/// documents.
fn head_verifies(head: &Value, keys: &Value) -> bool {
    let key = keys["keys"].as_array().unwrap().iter().find(|k| k["key_id"] == head["key_id"]);
    let Some(key) = key else { return false };
    let message = format!(
        "cairn-audit-head/v1\n{}\n{}\n{}\n{}\n",
        head["origin"].as_str().unwrap(),
        head["tree_size"],
        head["root_hash"].as_str().unwrap(),
        head["timestamp_ms"]
    );
    let public = unhex(key["public_key"].as_str().unwrap());
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public)
        .verify(message.as_bytes(), &unhex(head["signature"].as_str().unwrap()))
        .is_ok()
}

// ---- helpers ----

/// A user holding the `auditor` role only, signed in.
async fn auditor(app: &TestApp, admin: &str) -> String {
    let email = format!("auditor-{}@example.com", &Uuid::new_v4().simple().to_string()[..8]);
    let id = app.register_ok(&email).await;
    let granted = app.post(&format!("/api/v1/users/{id}/roles"), Some(admin), json!({ "role": "auditor" })).await;
    assert_eq!(granted.status, StatusCode::OK, "{:?}", granted.body);
    app.login(&email).await
}

/// Appends an event with SQL, as the command side would, recorded at `recorded_at` (or now).
async fn append(
    pool: &PgPool,
    aggregate: (&str, &str),
    event_type: &str,
    metadata: Value,
    recorded_at: Option<DateTime<Utc>>,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at) \
         VALUES ($1, $2, (SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = $1 AND aggregate_id = $2), \
                 $3, '1', jsonb_build_object($3::text, jsonb_build_object('note', 'a, \"quoted\"\nnote')), $4, coalesce($5, now())) \
         RETURNING event_id",
    )
    .bind(aggregate.0)
    .bind(aggregate.1)
    .bind(event_type)
    .bind(metadata)
    .bind(recorded_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until every event is folded into the tree and a head of that size is signed.
async fn wait_for_head_of_everything(pool: &PgPool) -> i64 {
    let started = Instant::now();
    loop {
        let (events, tree, head): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM events), (SELECT tree_size FROM audit_tree), (SELECT max(tree_size) FROM audit_heads)",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if events == tree && head == Some(events) {
            return events;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "events {events}, tree {tree}, head {head:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every page of `query` (a query string without limit or cursor) with pages of `limit`.
async fn walk(app: &TestApp, token: &str, query: &str, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10_000 {
        let mut path = format!("/api/v1/audit/events?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let reply = app.get(&path, Some(token)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
        let page = reply.data().as_array().unwrap().clone();
        assert!(page.len() <= limit as usize);
        items.extend(page);
        match reply.body["meta"]["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
    panic!("more than 10,000 pages");
}

fn positions(items: &[Value]) -> Vec<String> {
    items.iter().map(|e| e["position"].as_str().unwrap().to_owned()).collect()
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A small RFC 4180 reader (quoted fields, doubled quotes, CRLF or LF records).
fn read_csv(text: &str) -> Vec<Vec<String>> {
    let (mut records, mut record, mut field) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted && field.is_empty() && record.is_empty(), "the CSV ends inside a record");
    records
}

// ---- tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_alone_and_combined_with_cursors_walking_every_page() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &HEADS_OFTEN).await;
    let (admin_id, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    let (alice, bob) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    for i in 0..40 {
        let actor = if i % 3 == 0 { &alice } else { &bob };
        let aggregate = (if i % 2 == 0 { "Ledger" } else { "Vault" }, ["a-1", "a-2", "a-3", "a-4"][i % 4]);
        let event_type = if i % 5 == 0 { "Opened" } else { "Touched" };
        let metadata = json!({ "actor_id": actor, "client_ip": "10.0.0.7", "user_agent": "probe/1, \"x\"",
                               "request_id": format!("r{i}"), "correlation_id": "c", "causation_id": format!("r{i}") });
        append(&app.pool, aggregate, event_type, metadata, None).await;
    }
    wait_for_head_of_everything(&app.pool).await;

    let everything = walk(&app, &token, "", 1000).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&app.pool).await.unwrap();
    assert_eq!(everything.len() as i64, total, "the list shows every event");
    // Oldest first by position, each folded, with its leaf in order and its metadata lifted.
    let leaf_indexes: Vec<i64> = everything.iter().map(|e| e["leaf_index"].as_i64().unwrap()).collect();
    assert_eq!(leaf_indexes, (0..total).collect::<Vec<_>>());
    for e in &everything {
        assert_eq!(e["actor_id"], e["metadata"]["actor_id"]);
        assert_eq!(e["user_agent"], e["metadata"].get("user_agent").cloned().unwrap_or(Value::Null));
        let canonical: Value = serde_json::from_str(e["canonical"].as_str().unwrap()).unwrap();
        assert_eq!(canonical["event_id"], e["event_id"]);
        assert_eq!(canonical["payload"], e["payload"]);
    }
    // The admin's own commands carry the admin as actor.
    assert!(everything.iter().any(|e| e["actor_id"] == admin_id.to_string()));

    // Every page size walks the whole log without gaps or repeats.
    for limit in [1, 7, 40] {
        assert_eq!(positions(&walk(&app, &token, "", limit).await), positions(&everything), "limit {limit}");
    }

    type Pred = Box<dyn Fn(&Value) -> bool>;
    let field = |name: &'static str, value: String| -> (String, Pred) {
        (format!("{name}={}", percent(&value)), Box::new(move |e: &Value| e[name] == value.as_str()))
    };
    let filters: Vec<(String, Pred)> = vec![
        field("aggregate_type", "Ledger".into()),
        field("aggregate_id", "a-2".into()),
        field("event_type", "Opened".into()),
        field("actor_id", alice.clone()),
        field("actor_id", admin_id.to_string()),
        field("aggregate_type", "User".into()),
    ];
    // Each alone, then every pair (AND).
    let mut cases: Vec<(String, Vec<&Pred>)> = filters.iter().map(|(q, p)| (q.clone(), vec![p])).collect();
    for (i, (qa, pa)) in filters.iter().enumerate() {
        for (qb, pb) in &filters[i + 1..] {
            // A parameter given twice is refused (its own check below).
            if qa.split('=').next() != qb.split('=').next() {
                cases.push((format!("{qa}&{qb}"), vec![pa, pb]));
            }
        }
    }
    cases.push((format!("aggregate_type=Vault&aggregate_id=a-2&event_type=Touched&actor_id={bob}"), vec![]));
    let mut non_empty = 0;
    for (query, preds) in &cases {
        let got = walk(&app, &token, query, 3).await;
        if preds.is_empty() {
            // Vault aggregates are a-2 and a-4 (odd i); bob acts when i % 3 != 0; Touched when i % 5 != 0.
            let expected = (0..40).filter(|i| i % 4 == 1 && i % 3 != 0 && i % 5 != 0).count();
            assert_eq!(got.len(), expected, "{query}");
            continue;
        }
        let expected: Vec<String> =
            positions(&everything.iter().filter(|e| preds.iter().all(|p| p(e))).cloned().collect::<Vec<_>>());
        assert_eq!(positions(&got), expected, "{query}");
        non_empty += usize::from(!expected.is_empty());
    }
    assert!(non_empty > 10, "the filters must select something to prove anything");
    app.stop().await;
}

/// Events whose `recorded_at` goes backwards along the log: `late` was recorded before `early`
/// but committed after it. `from`/`to` select by log time (the running maximum of `recorded_at`
/// along the log), so windows are contiguous stretches of the log and partition it.
async fn time_edges(app: &TestApp, token: &str, folded: bool) {
    let t0: DateTime<Utc> = "2031-05-01T10:00:00Z".parse().unwrap();
    let at = |ms: i64| t0 + chrono::Duration::milliseconds(ms);
    let a = append(&app.pool, ("Clock", "c"), "Ticked", json!({}), Some(at(0))).await;
    let early = append(&app.pool, ("Clock", "c"), "Ticked", json!({}), Some(at(200))).await;
    let late = append(&app.pool, ("Clock", "c"), "Ticked", json!({}), Some(at(100))).await;
    let b = append(&app.pool, ("Clock", "c"), "Ticked", json!({}), Some(at(300))).await;
    if folded {
        wait_for_head_of_everything(&app.pool).await;
    } else {
        // Listed once settled: older than every transaction still running (other tests' too).
        let started = Instant::now();
        while walk(app, token, "aggregate_type=Clock", 10).await.len() < 4 {
            assert!(started.elapsed() < Duration::from_secs(30), "the events never settled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ids = |items: Vec<Value>| -> Vec<Uuid> {
        items.iter().map(|e| e["event_id"].as_str().unwrap().parse().unwrap()).collect()
    };
    let window = |from: Option<i64>, to: Option<i64>| {
        let mut q = vec!["aggregate_type=Clock".to_owned()];
        if let Some(ms) = from {
            q.push(format!("from={}", percent(&at(ms).to_rfc3339())));
        }
        if let Some(ms) = to {
            q.push(format!("to={}", percent(&at(ms).to_rfc3339())));
        }
        q.join("&")
    };
    // The negative check first: without time filters all four are there, in log order.
    assert_eq!(ids(walk(app, token, &window(None, None), 2).await), vec![a, early, late, b]);
    // `late` (recorded at 100 ms) entered the log after `early` (200 ms): its log time is 200 ms.
    assert_eq!(ids(walk(app, token, &window(Some(150), None), 2).await), vec![early, late, b]);
    assert_eq!(ids(walk(app, token, &window(None, Some(150)), 2).await), vec![a]);
    assert_eq!(ids(walk(app, token, &window(Some(200), Some(201)), 2).await), vec![early, late]);
    assert_eq!(ids(walk(app, token, &window(Some(201), Some(300)), 2).await), Vec::<Uuid>::new());
    assert_eq!(ids(walk(app, token, &window(Some(300), None), 1).await), vec![b]);
    assert_eq!(ids(walk(app, token, &window(Some(301), None), 1).await), Vec::<Uuid>::new());
    // Consecutive windows hold every event exactly once, wherever they are cut.
    for cut in [-1, 0, 50, 100, 150, 199, 200, 250, 300, 301] {
        let mut both = ids(walk(app, token, &window(None, Some(cut)), 1).await);
        both.extend(ids(walk(app, token, &window(Some(cut), None), 1).await));
        assert_eq!(both, vec![a, early, late, b], "cut at {cut} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_filters_select_by_log_time_in_the_tree() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &HEADS_OFTEN).await;
    let (_, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    time_edges(&app, &token, true).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn time_filters_select_by_log_time_in_the_tail_not_folded_yet() {
    // Nothing folds: every event is in the tail, whose log time is computed by the query.
    let mut extra = HEADS_OFTEN.to_vec();
    extra.push(("CAIRN_AUDIT_TREE", "off"));
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &extra).await;
    let (_, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    time_edges(&app, &token, false).await;
    let items = walk(&app, &token, "", 100).await;
    assert!(items.iter().all(|e| e["leaf_index"].is_null()), "nothing is folded with the tree off");
    // No head: nothing to export with a head, and no checkpoint.
    let export = app.get("/api/v1/audit/events/export", Some(&token)).await;
    assert_eq!((export.status, export.code()), (StatusCode::CONFLICT, "CONFLICT"), "{:?}", export.body);
    let latest = app.get("/api/v1/audit/checkpoints/latest", Some(&token)).await;
    assert_eq!((latest.status, latest.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exports_match_the_listing_and_end_with_a_head_that_verifies() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &HEADS_OFTEN).await;
    let (_, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    for i in 0..2500 {
        let metadata = json!({ "actor_id": "exporter", "user_agent": format!("agent {i}, \"quoted\"\r\nnext line") });
        append(&app.pool, ("Batch", &format!("b{}", i % 10)), "Exported", metadata, None).await;
    }
    let total = wait_for_head_of_everything(&app.pool).await;
    let keys = app.get("/.well-known/audit-keys.json", None).await;
    assert_eq!(keys.status, StatusCode::OK);
    let listing = walk(&app, &token, "", 1000).await;
    assert_eq!(listing.len() as i64, total);

    let fetch = |query: &str| {
        let url = format!("{}/api/v1/audit/events/export?{query}", app.address);
        let client = app.client.clone();
        let token = token.clone();
        async move {
            let resp = client.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let headers = resp.headers().clone();
            (headers, resp.text().await.unwrap())
        }
    };

    // NDJSON: the listing's objects, then the head.
    let (headers, text) = fetch("format=ndjson").await;
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert!(headers["content-disposition"].to_str().unwrap().starts_with("attachment; filename="));
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let head = lines.pop().unwrap()["head"].clone();
    assert!(head_verifies(&head, &keys.body), "the export's head verifies with the published key: {head}");
    let size = head["tree_size"].as_u64().unwrap();
    assert!(size as i64 >= total - 2, "the head covers the log ({size} of {total})");
    let covered: Vec<Value> =
        listing.iter().filter(|e| e["leaf_index"].as_u64().is_some_and(|i| i < size)).cloned().collect();
    assert_eq!(lines, covered, "the NDJSON lines are the listing's events the head covers");
    // The head's root is the root of those events' canonical texts, recomputed here.
    let leaves: Vec<H> = lines.iter().map(|e| leaf(e["canonical"].as_str().unwrap().as_bytes())).collect();
    assert_eq!(hex(&mth(&leaves)), head["root_hash"].as_str().unwrap());

    // CSV: a header, one record per event, then `#head` and the head.
    let (headers, text) = fetch("format=csv").await;
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/csv"));
    let mut records = read_csv(&text);
    let trailer = records.pop().unwrap();
    assert_eq!(trailer.len(), 2);
    assert_eq!(trailer[0], "#head");
    let csv_head: Value = serde_json::from_str(&trailer[1]).unwrap();
    assert!(head_verifies(&csv_head, &keys.body));
    let header = records.remove(0);
    assert_eq!(header[0], "position");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let csv_size = csv_head["tree_size"].as_u64().unwrap();
    let covered: Vec<&Value> =
        listing.iter().filter(|e| e["leaf_index"].as_u64().is_some_and(|i| i < csv_size)).collect();
    assert_eq!(records.len(), covered.len());
    for (record, event) in records.iter().zip(&covered) {
        assert_eq!(record.len(), header.len());
        assert_eq!(record[col("position")], event["position"].as_str().unwrap());
        assert_eq!(record[col("event_id")], event["event_id"].as_str().unwrap());
        assert_eq!(record[col("canonical")], event["canonical"].as_str().unwrap());
        assert_eq!(record[col("user_agent")], event["user_agent"].as_str().unwrap_or(""));
        assert_eq!(serde_json::from_str::<Value>(&record[col("payload")]).unwrap(), event["payload"]);
        assert_eq!(serde_json::from_str::<Value>(&record[col("metadata")]).unwrap(), event["metadata"]);
    }

    // Filters select what the listing selects.
    let (_, text) = fetch("aggregate_id=b3&event_type=Exported").await;
    let mut lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let head = lines.pop().unwrap()["head"].clone();
    let size = head["tree_size"].as_u64().unwrap();
    let expected: Vec<Value> = walk(&app, &token, "aggregate_id=b3&event_type=Exported", 1000)
        .await
        .into_iter()
        .filter(|e| e["leaf_index"].as_u64().is_some_and(|i| i < size))
        .collect();
    assert_eq!(lines.len(), 250);
    assert_eq!(lines, expected);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proofs_and_consistency_check_with_an_independent_implementation() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &HEADS_OFTEN).await;
    let (_, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    // Three groups, each signed before the next: heads at several sizes.
    let mut total = 0;
    for group in 0..3 {
        for i in 0..10 {
            let id = format!("p{group}-{i}");
            append(&app.pool, ("Proof", &id), "Proven", json!({ "actor_id": "prover" }), None).await;
        }
        total = wait_for_head_of_everything(&app.pool).await as u64;
    }
    let keys = app.get("/.well-known/audit-keys.json", None).await;
    let events = walk(&app, &token, "", 1000).await;
    let leaves: Vec<H> = events.iter().map(|e| leaf(e["canonical"].as_str().unwrap().as_bytes())).collect();

    let latest = app.get("/api/v1/audit/checkpoints/latest", Some(&token)).await;
    assert_eq!(latest.status, StatusCode::OK);
    let latest = latest.data().clone();
    assert_eq!(latest["tree_size"].as_u64(), Some(total));
    assert!(head_verifies(&latest, &keys.body));
    assert_eq!(hex(&mth(&leaves)), latest["root_hash"].as_str().unwrap());

    // Every event in the latest head, and in every smaller tree that holds it (a sample of sizes).
    let mut checked = 0;
    for (i, event) in events.iter().enumerate() {
        let id = event["event_id"].as_str().unwrap();
        let reply = app.get(&format!("/api/v1/audit/proof/{id}"), Some(&token)).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let proof = reply.data();
        assert_eq!(proof["leaf_index"].as_u64(), Some(i as u64));
        assert_eq!(proof["tree_size"].as_u64(), Some(total));
        assert_eq!(proof["head"], latest, "the default tree is the latest head's");
        assert_eq!(hash_of(&proof["leaf_hash"]), leaf(proof["canonical"].as_str().unwrap().as_bytes()));
        let path: Vec<H> = proof["audit_path"].as_array().unwrap().iter().map(hash_of).collect();
        assert!(verify_inclusion(i as u64, total, &leaves[i], &path, &hash_of(&proof["root_hash"])), "leaf {i}");
        for size in [i as u64 + 1, i as u64 + 2, total / 2, total - 1] {
            if size <= i as u64 || size > total {
                continue;
            }
            let reply = app.get(&format!("/api/v1/audit/proof/{id}?tree_size={size}"), Some(&token)).await;
            assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
            let proof = reply.data();
            let root = mth(&leaves[..size as usize]);
            assert_eq!(proof["root_hash"].as_str().unwrap(), hex(&root));
            let path: Vec<H> = proof["audit_path"].as_array().unwrap().iter().map(hash_of).collect();
            assert!(verify_inclusion(i as u64, size, &leaves[i], &path, &root), "leaf {i} in {size}");
            // A proof does not check for another leaf (the negative check of the checker).
            let other = leaves[(i + 1) % leaves.len()];
            assert!(path.is_empty() || !verify_inclusion(i as u64, size, &other, &path, &root));
            checked += 1;
        }
    }
    assert!(checked > 50);

    // Consistency between every pair of sizes, with the heads signed at those sizes.
    let signed: HashSet<u64> = sqlx::query_scalar::<_, i64>("SELECT tree_size FROM audit_heads")
        .fetch_all(&app.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s as u64)
        .collect();
    assert!(signed.len() >= 2, "heads every 5 events: {signed:?}");
    for from in 1..=total {
        for to in from..=total {
            let reply = app.get(&format!("/api/v1/audit/consistency?from={from}&to={to}"), Some(&token)).await;
            assert_eq!(reply.status, StatusCode::OK, "{from}..{to}: {:?}", reply.body);
            let c = reply.data();
            let (from_root, to_root) = (mth(&leaves[..from as usize]), mth(&leaves[..to as usize]));
            assert_eq!(c["from_root"].as_str().unwrap(), hex(&from_root));
            assert_eq!(c["to_root"].as_str().unwrap(), hex(&to_root));
            let proof: Vec<H> = c["proof"].as_array().unwrap().iter().map(hash_of).collect();
            assert!(verify_consistency(from, to, &from_root, &to_root, &proof), "{from}..{to}");
            if from < to {
                let mut wrong = to_root;
                wrong[0] ^= 1;
                assert!(!verify_consistency(from, to, &from_root, &wrong, &proof), "{from}..{to} checks anything");
            }
            for (size, head) in [(from, &c["from_head"]), (to, &c["to_head"])] {
                assert_eq!(!head.is_null(), signed.contains(&size), "head of {size}");
                if !head.is_null() {
                    assert!(head_verifies(head, &keys.body));
                    assert_eq!(head["root_hash"].as_str().unwrap(), hex(&mth(&leaves[..size as usize])));
                }
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_parameters_are_400_envelopes_naming_the_field() {
    let app = TestApp::spawn_with(TestEnv::new(), Services::all(), &HEADS_OFTEN).await;
    let (_, admin) = app.admin_token().await;
    let token = auditor(&app, &admin).await;
    let event = append(&app.pool, ("Probe", "p"), "Probed", json!({}), None).await;
    let total = wait_for_head_of_everything(&app.pool).await;
    let leaf_index: i64 = sqlx::query_scalar("SELECT leaf_index FROM audit_leaves WHERE event_id = $1")
        .bind(event)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // The negative check first: good parameters are answered.
    for path in [
        "/api/v1/audit/events?limit=1000&aggregate_type=Probe&from=2020-01-01T00:00:00Z".to_owned(),
        format!("/api/v1/audit/proof/{event}?tree_size={total}"),
        format!("/api/v1/audit/consistency?from=1&to={total}"),
    ] {
        assert_eq!(app.get(&path, Some(&token)).await.status, StatusCode::OK, "{path}");
    }
    let cases = [
        ("/api/v1/audit/events?color=blue".to_owned(), "color"),
        ("/api/v1/audit/events?limit=0".to_owned(), "limit"),
        ("/api/v1/audit/events?limit=1001".to_owned(), "limit"),
        ("/api/v1/audit/events?limit=ten".to_owned(), "limit"),
        ("/api/v1/audit/events?cursor=nonsense".to_owned(), "cursor"),
        ("/api/v1/audit/events?from=yesterday".to_owned(), "from"),
        ("/api/v1/audit/events?to=2020-13-01T00:00:00Z".to_owned(), "to"),
        ("/api/v1/audit/events?from=2021-01-01T00:00:00Z&to=2020-01-01T00:00:00Z".to_owned(), "to"),
        ("/api/v1/audit/events?aggregate_type=".to_owned(), "aggregate_type"),
        ("/api/v1/audit/events?aggregate_type=A&aggregate_type=B".to_owned(), "aggregate_type"),
        (format!("/api/v1/audit/events?actor_id={}", "x".repeat(201)), "actor_id"),
        ("/api/v1/audit/events/export?format=xml".to_owned(), "format"),
        ("/api/v1/audit/events/export?cursor=1.1".to_owned(), "cursor"),
        ("/api/v1/audit/events/export?event_type=".to_owned(), "event_type"),
        (format!("/api/v1/audit/proof/{event}?tree_size=0"), "tree_size"),
        (format!("/api/v1/audit/proof/{event}?tree_size={leaf_index}"), "tree_size"),
        (format!("/api/v1/audit/proof/{event}?tree_size={}", total + 1), "tree_size"),
        (format!("/api/v1/audit/proof/{event}?tree_size=-1"), "tree_size"),
        ("/api/v1/audit/proof/not-a-uuid".to_owned(), "event_id"),
        ("/api/v1/audit/consistency?from=0&to=1".to_owned(), "from"),
        ("/api/v1/audit/consistency?from=2&to=1".to_owned(), "to"),
        (format!("/api/v1/audit/consistency?from=1&to={}", total + 1), "to"),
        ("/api/v1/audit/consistency?from=1".to_owned(), "to"),
    ];
    for (path, field) in cases {
        let reply = app.get(&path, Some(&token)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}: {:?}", reply.body);
        assert_eq!(reply.body["success"], false, "{path}");
        assert!(reply.body["error"]["details"].get(field).is_some(), "{path} names {field}: {:?}", reply.body);
    }
    let unknown = app.get(&format!("/api/v1/audit/proof/{}", Uuid::new_v4()), Some(&token)).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    app.stop().await;
}

/// The value of a counter in a Prometheus text page (0 when not yet written).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_stops_the_export() {
    // A process of its own, so its metrics are this export's alone.
    let env = TestEnv::new();
    let mut serve = Serve::start(&env, &HEADS_OFTEN);
    let client = reqwest::Client::new();
    serve.wait_ready(&client).await;
    let output = env
        .command(&["admin", "create-user", "--email", "exporter@example.com", "--role", "admin"])
        .env("CAIRN_ADMIN_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let login: Value = client
        .post(format!("{}/api/v1/auth/login", serve.base))
        .json(&json!({ "email": "exporter@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["data"]["access_token"].as_str().unwrap().to_owned();
    let pool = PgPool::connect(&env.database_url).await.unwrap();
    // 12,000 events of about 4 KiB each: far more than socket buffers hold.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'Bulk', 'bulk-' || g, 1, 'Written', '1', jsonb_build_object('Written', jsonb_build_object('pad', repeat('x', 4000))), '{}' \
         FROM generate_series(1, 12000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let total = wait_for_head_of_everything(&pool).await;
    let metric = || {
        let client = client.clone();
        let url = format!("{}/metrics", serve.base);
        async move { counter(&client.get(url).send().await.unwrap().text().await.unwrap(), "cairn_audit_export_rows_total") }
    };
    assert_eq!(metric().await, 0.0);

    let export_client = reqwest::Client::new();
    let mut resp = export_client
        .get(format!("{}/api/v1/audit/events/export", serve.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut received = 0;
    while received < 1 << 20 {
        received += resp.chunk().await.unwrap().unwrap().len();
    }
    // The export was running: pages were read for it.
    let running = metric().await;
    assert!(running >= 1000.0, "{running}");
    drop(resp);
    drop(export_client);

    // Once the server has seen the client go, the count stops moving, far short of the selection.
    let started = Instant::now();
    let mut last = metric().await;
    let mut still = 0;
    while still < 10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = metric().await;
        still = if now == last { still + 1 } else { 0 };
        last = now;
        assert!(started.elapsed() < Duration::from_secs(20), "the export kept reading: {now} rows");
    }
    assert!(last < (total as f64) / 2.0, "{last} of {total} rows read after the client left");
    // The server is still well and answers.
    let again = client.get(format!("{}/api/v1/audit/checkpoints/latest", serve.base)).bearer_auth(&token).send().await;
    assert_eq!(again.unwrap().status(), StatusCode::OK);
    pool.close().await;
    drop(serve);
    env.cleanup().await;
}
