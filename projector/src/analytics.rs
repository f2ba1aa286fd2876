//! The `analytics_daily` and `analytics_active` read models: each UTC day's sign-ups, active
//! users, messages, uploads and job runs, counted from the log.
//!
//! The day of an event is the UTC date of its `recorded_at`, so a rebuild files every event under
//! the day it was first filed. Counters only add, so they rely on the runner's exactly-once
//! effect: a batch and its checkpoint commit together, and an event at or below the checkpoint (a
//! redelivery) is never applied again. Active users are the exception that needs no such help: a
//! user is added to a day once (`analytics_active`'s key), and counted when the row is new.
//!
//! A session's refresh does not name its user; the user is the one its `SessionStarted` names,
//! read from the log (the source of truth, there in a rebuild as it is live) rather than from the
//! sessions read model, which another projection keeps at its own pace.

use std::collections::{BTreeMap, HashMap};

use cairn_domain::{FileEvent, JobEvent, JobOutcome, SessionEvent};
use cairn_platform::envelope::EventEnvelope;
use chrono::NaiveDate;
use serde::Deserialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::Projection;

/// Projects sign-ups, sign-ins, refreshes, messages, uploads and finished jobs into daily rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnalyticsProjection;

/// What one day gains from a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DayCounts {
    signups: i64,
    messages_sent: i64,
    files_uploaded: i64,
    bytes_uploaded: i64,
    jobs_run: i64,
    jobs_failed: i64,
}

/// What a batch adds: counters per day, and who was active when.
#[derive(Debug, Default)]
struct Tally {
    days: BTreeMap<NaiveDate, DayCounts>,
    active: Vec<(NaiveDate, Uuid)>,
    /// Refreshes whose user is still to be read from the log: (day, session id).
    refreshes: Vec<(NaiveDate, String)>,
}

impl Tally {
    fn day(&mut self, day: NaiveDate) -> &mut DayCounts {
        self.days.entry(day).or_default()
    }

    fn add(&mut self, event: &EventEnvelope) -> anyhow::Result<()> {
        let day = event.recorded_at.date_naive();
        match (event.aggregate_type.as_str(), event.event_type.as_str()) {
            ("User", "UserRegistered") => self.day(day).signups += 1,
            ("Message", "MessageSent") => self.day(day).messages_sent += 1,
            ("File", "FileUploaded") => {
                if let FileEvent::FileUploaded { size, .. } = FileEvent::deserialize(&event.payload)? {
                    let counts = self.day(day);
                    counts.files_uploaded += 1;
                    counts.bytes_uploaded += i64::try_from(size)?;
                }
            }
            ("Job", "JobFinished") => {
                if let JobEvent::JobFinished { outcome, .. } = JobEvent::deserialize(&event.payload)? {
                    let counts = self.day(day);
                    counts.jobs_run += 1;
                    if outcome != JobOutcome::Done {
                        counts.jobs_failed += 1;
                    }
                }
            }
            ("Session", "SessionStarted") => {
                if let SessionEvent::SessionStarted { user_id, .. } = SessionEvent::deserialize(&event.payload)? {
                    self.active.push((day, user_id));
                }
            }
            ("Session", "SessionRefreshed") => self.refreshes.push((day, event.aggregate_id.clone())),
            _ => {}
        }
        Ok(())
    }
}

/// Whether the projection counts events of this aggregate and type.
fn counted(aggregate_type: &str, event_type: &str) -> bool {
    matches!(
        (aggregate_type, event_type),
        ("User", "UserRegistered")
            | ("Message", "MessageSent")
            | ("File", "FileUploaded")
            | ("Job", "JobFinished")
            | ("Session", "SessionStarted" | "SessionRefreshed")
    )
}

impl Projection for AnalyticsProjection {
    const NAME: &'static str = "analytics";
    const TABLES: &'static [&'static str] = &["analytics_daily", "analytics_active"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        counted(&event.aggregate_type, &event.event_type)
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        self.apply_batch(conn, schema, &[event]).await
    }

    /// Folds the batch and writes each day's row once, and the new active users in one statement.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&EventEnvelope],
    ) -> anyhow::Result<()> {
        let mut tally = Tally::default();
        for event in events {
            tally.add(event)?;
        }
        resolve_refreshes(conn, &mut tally).await?;
        add_active(conn, schema, &tally.active).await?;
        add_counts(conn, schema, &tally.days).await
    }
}

/// Turns the batch's refreshes into active users, reading each session's user from its
/// `SessionStarted` in the log.
async fn resolve_refreshes(conn: &mut PgConnection, tally: &mut Tally) -> anyhow::Result<()> {
    if tally.refreshes.is_empty() {
        return Ok(());
    }
    let mut sessions: Vec<&str> = tally.refreshes.iter().map(|(_, id)| id.as_str()).collect();
    sessions.sort_unstable();
    sessions.dedup();
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT aggregate_id, payload -> 'SessionStarted' ->> 'user_id' FROM events \
         WHERE aggregate_type = 'Session' AND aggregate_id = ANY($1) AND event_type = 'SessionStarted'",
    )
    .bind(&sessions)
    .fetch_all(&mut *conn)
    .await?;
    let mut users: HashMap<String, Uuid> = HashMap::with_capacity(rows.len());
    for (session, user) in rows {
        if let Some(user) = user {
            users.insert(session, user.parse()?);
        }
    }
    for (day, session) in std::mem::take(&mut tally.refreshes) {
        // A refresh always follows its session's start in the log; one without is nobody's.
        match users.get(&session) {
            Some(user) => tally.active.push((day, *user)),
            None => tracing::warn!(session = %session, "a refresh of a session that never started; not counted"),
        }
    }
    Ok(())
}

/// Records who was active on which day, and counts each (day, user) the first time only.
async fn add_active(conn: &mut PgConnection, schema: &str, active: &[(NaiveDate, Uuid)]) -> anyhow::Result<()> {
    if active.is_empty() {
        return Ok(());
    }
    let days: Vec<NaiveDate> = active.iter().map(|(d, _)| *d).collect();
    let users: Vec<Uuid> = active.iter().map(|(_, u)| *u).collect();
    sqlx::query(&format!(
        "WITH added AS (INSERT INTO {schema}.analytics_active (day, user_id) \
                        SELECT * FROM unnest($1::date[], $2::uuid[]) \
                        ON CONFLICT (day, user_id) DO NOTHING RETURNING day), \
              per_day AS (SELECT day, count(*) AS n FROM added GROUP BY day) \
         INSERT INTO {schema}.analytics_daily AS d (day, active_users) SELECT day, n FROM per_day \
         ON CONFLICT (day) DO UPDATE SET active_users = d.active_users + EXCLUDED.active_users"
    ))
    .bind(days)
    .bind(users)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Adds the batch's counters to each day's row.
async fn add_counts(
    conn: &mut PgConnection,
    schema: &str,
    days: &BTreeMap<NaiveDate, DayCounts>,
) -> anyhow::Result<()> {
    if days.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&DayCounts) -> i64| days.values().map(f).collect::<Vec<i64>>();
    sqlx::query(&format!(
        "INSERT INTO {schema}.analytics_daily AS d \
                (day, signups, messages_sent, files_uploaded, bytes_uploaded, jobs_run, jobs_failed) \
         SELECT * FROM unnest($1::date[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[]) \
         ON CONFLICT (day) DO UPDATE SET signups = d.signups + EXCLUDED.signups, \
                                         messages_sent = d.messages_sent + EXCLUDED.messages_sent, \
                                         files_uploaded = d.files_uploaded + EXCLUDED.files_uploaded, \
                                         bytes_uploaded = d.bytes_uploaded + EXCLUDED.bytes_uploaded, \
                                         jobs_run = d.jobs_run + EXCLUDED.jobs_run, \
                                         jobs_failed = d.jobs_failed + EXCLUDED.jobs_failed"
    ))
    .bind(days.keys().copied().collect::<Vec<NaiveDate>>())
    .bind(column(|c| c.signups))
    .bind(column(|c| c.messages_sent))
    .bind(column(|c| c.files_uploaded))
    .bind(column(|c| c.bytes_uploaded))
    .bind(column(|c| c.jobs_run))
    .bind(column(|c| c.jobs_failed))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn envelope(
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        body: serde_json::Value,
        at: &str,
    ) -> EventEnvelope {
        let recorded_at = chrono::DateTime::parse_from_rfc3339(at).unwrap().with_timezone(&Utc);
        serde_json::from_value(json!({
            "event_id": Uuid::new_v4(),
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "sequence": 1,
            "event_type": event_type,
            "event_version": "1",
            "transaction_id": 1,
            "global_position": 1,
            "recorded_at": recorded_at,
            "payload": { event_type: body },
            "metadata": {},
        }))
        .unwrap()
    }

    #[test]
    fn events_are_filed_under_the_utc_day_they_were_recorded() {
        let mut tally = Tally::default();
        let late = envelope("User", "u1", "UserRegistered", json!({}), "2026-03-01T23:59:59.999Z");
        let next = envelope("User", "u2", "UserRegistered", json!({}), "2026-03-02T00:00:00+00:00");
        // 01:30 in Paris is still the 1st in UTC.
        let paris = envelope("Message", "m1", "MessageSent", json!({}), "2026-03-02T00:30:00+01:00");
        for e in [&late, &next, &paris] {
            tally.add(e).unwrap();
        }
        let first = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let second = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
        assert_eq!(tally.days[&first], DayCounts { signups: 1, messages_sent: 1, ..DayCounts::default() });
        assert_eq!(tally.days[&second], DayCounts { signups: 1, ..DayCounts::default() });
    }

    #[test]
    fn uploads_add_their_bytes_and_failed_or_dead_jobs_count_as_failed() {
        let mut tally = Tally::default();
        let at = "2026-03-01T12:00:00Z";
        let upload = json!({"owner_id": Uuid::new_v4(), "name": "a.txt", "size": 1234, "content_type": "text/plain",
                            "sha256": "00", "visibility": "private", "backend": "local", "key": "k"});
        tally.add(&envelope("File", "f1", "FileUploaded", upload, at)).unwrap();
        for outcome in ["done", "failed", "dead", "done"] {
            let finished = json!({"job_id": Uuid::new_v4(), "kind": "noop", "outcome": outcome, "attempts": 1,
                                  "finished_at": at});
            tally.add(&envelope("Job", "j", "JobFinished", finished, at)).unwrap();
        }
        let day = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let counts = tally.days[&day];
        assert_eq!((counts.files_uploaded, counts.bytes_uploaded), (1, 1234));
        assert_eq!((counts.jobs_run, counts.jobs_failed), (4, 2));
    }

    #[test]
    fn only_counted_events_are_wanted() {
        let p = AnalyticsProjection;
        let at = "2026-03-01T12:00:00Z";
        assert!(p.wants(&envelope("Session", "s", "SessionRefreshed", json!({}), at)));
        assert!(p.wants(&envelope("Job", "j", "JobFinished", json!({}), at)));
        assert!(!p.wants(&envelope("Session", "s", "SessionRevoked", json!({}), at)));
        assert!(!p.wants(&envelope("Job", "j", "JobEnqueued", json!({}), at)));
        assert!(!p.wants(&envelope("Message", "m", "MessageEdited", json!({}), at)));
    }
}
