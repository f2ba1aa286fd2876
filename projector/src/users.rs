//! The `users` read model: one row per user with real columns and indexes.
//!
//! A batch is folded in memory: the rows it touches are read with one query, every event is
//! applied to them in order, and the changed rows are written back with one multi-row upsert. A
//! batch costs three statements however many events it holds, which is what lets the projector
//! and a rebuild keep up with the log.

use std::collections::HashMap;

use cairn_domain::UserEvent;
use cairn_platform::envelope::EventEnvelope;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::runner::Projection;

/// Projects `User` events into the `users` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsersProjection;

/// One row of `users`.
#[derive(Debug, Clone, sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    display_name: String,
    status: String,
    roles: Vec<String>,
    email_verified: bool,
    session_version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl UserRow {
    /// Applies one event of this user. Returns whether the row changed. Guarded by
    /// `version < sequence`, so re-applying an event changes nothing even outside the checkpoint's
    /// protection (a rebuild catching up, say).
    fn apply(&mut self, event: UserEvent, sequence: i64, at: DateTime<Utc>) -> anyhow::Result<bool> {
        if self.version >= sequence {
            return Ok(false);
        }
        let raise = |current: &mut i64, v: u64| -> anyhow::Result<()> {
            *current = (*current).max(i64::try_from(v)?);
            Ok(())
        };
        match event {
            UserEvent::DisplayNameChanged { display_name } => self.display_name = display_name,
            UserEvent::RoleGranted { role } => {
                if !self.roles.contains(&role) {
                    self.roles.push(role);
                    self.roles.sort();
                }
            }
            UserEvent::RoleRevoked { role, session_version } => {
                self.roles.retain(|r| *r != role);
                raise(&mut self.session_version, session_version)?;
            }
            UserEvent::UserDeactivated { session_version } => {
                self.status = "deactivated".to_owned();
                raise(&mut self.session_version, session_version)?;
            }
            UserEvent::UserReactivated {} => self.status = "active".to_owned(),
            UserEvent::UserDeleted { session_version } => {
                self.status = "deleted".to_owned();
                raise(&mut self.session_version, session_version)?;
            }
            UserEvent::EmailVerified {} => self.email_verified = true,
            UserEvent::PasswordChanged { session_version, .. }
            | UserEvent::PasswordReset { session_version, .. }
            | UserEvent::PasswordRemoved { session_version, .. }
            | UserEvent::SessionsEnded { session_version, .. } => raise(&mut self.session_version, session_version)?,
            // A second registration of the same id changes nothing (it cannot happen: the event
            // store's sequence forbids it); sign-in bookkeeping and mail requests change nothing
            // this table shows.
            UserEvent::UserRegistered { .. }
            | UserEvent::EmailVerificationRequested {}
            | UserEvent::PasswordResetRequested {}
            | UserEvent::LoginFailed { .. }
            | UserEvent::AccountLocked { .. }
            | UserEvent::AccountUnlocked {}
            | UserEvent::LoginSucceeded {} => return Ok(false),
        }
        self.updated_at = at;
        self.version = sequence;
        Ok(true)
    }
}

/// Whether `event` can change a row (sign-in bookkeeping and mail requests cannot).
fn shows(event: &UserEvent) -> bool {
    !matches!(
        event,
        UserEvent::EmailVerificationRequested {}
            | UserEvent::PasswordResetRequested {}
            | UserEvent::LoginFailed { .. }
            | UserEvent::AccountLocked { .. }
            | UserEvent::AccountUnlocked {}
            | UserEvent::LoginSucceeded {}
    )
}

impl Projection for UsersProjection {
    const NAME: &'static str = "users";
    const TABLES: &'static [&'static str] = &["users"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        event.aggregate_type == "User"
            && !matches!(
                event.event_type.as_str(),
                "EmailVerificationRequested"
                    | "PasswordResetRequested"
                    | "LoginFailed"
                    | "AccountLocked"
                    | "AccountUnlocked"
                    | "LoginSucceeded"
            )
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        self.apply_batch(conn, schema, &[event]).await
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        events: &[&EventEnvelope],
    ) -> anyhow::Result<()> {
        let mut changes = Vec::new();
        for event in events.iter().filter(|e| e.aggregate_type == "User") {
            let user_event = UserEvent::deserialize(&event.payload)?;
            if shows(&user_event) {
                changes.push((event.aggregate_id.parse::<Uuid>()?, event.sequence, event.recorded_at, user_event));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let table = format!("{schema}.users");
        let mut ids: Vec<Uuid> = changes.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids.dedup();
        let existing: Vec<UserRow> = sqlx::query_as(&format!(
            "SELECT id, email, display_name, status, roles, email_verified, session_version, created_at, updated_at, version \
             FROM {table} WHERE id = ANY($1)"
        ))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        // Each row with whether the batch changed it.
        let mut rows: HashMap<Uuid, (UserRow, bool)> = existing.into_iter().map(|r| (r.id, (r, false))).collect();
        for (id, sequence, at, event) in changes {
            match (rows.get_mut(&id), event) {
                (Some((row, changed)), event) => *changed |= row.apply(event, sequence, at)?,
                (None, UserEvent::UserRegistered { email, display_name, roles, .. }) => {
                    let row = UserRow {
                        id,
                        email,
                        display_name,
                        status: "active".to_owned(),
                        roles,
                        email_verified: false,
                        session_version: 0,
                        created_at: at,
                        updated_at: at,
                        version: sequence,
                    };
                    rows.insert(id, (row, true));
                }
                // A change to a user this table never saw registered: nothing to change.
                (None, _) => {}
            }
        }
        write_rows(conn, &table, rows.values().filter(|(_, changed)| *changed).map(|(row, _)| row)).await
    }
}

/// Upserts `rows` with one statement; a row only replaces an older version of itself.
async fn write_rows<'a>(
    conn: &mut PgConnection,
    table: &str,
    rows: impl Iterator<Item = &'a UserRow>,
) -> anyhow::Result<()> {
    let mut cols = Columns::default();
    for row in rows {
        cols.id.push(row.id);
        cols.email.push(&row.email);
        cols.display_name.push(&row.display_name);
        cols.status.push(&row.status);
        cols.roles.push(serde_json::to_string(&row.roles)?);
        cols.email_verified.push(row.email_verified);
        cols.session_version.push(row.session_version);
        cols.created_at.push(row.created_at);
        cols.updated_at.push(row.updated_at);
        cols.version.push(row.version);
    }
    if cols.id.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "INSERT INTO {table} AS u (id, email, display_name, status, roles, email_verified, session_version, \
                                   created_at, updated_at, version) \
         SELECT r.id, r.email, r.display_name, r.status, ARRAY(SELECT jsonb_array_elements_text(r.roles::jsonb)), \
                r.email_verified, r.session_version, r.created_at, r.updated_at, r.version \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::int8[], \
                     $8::timestamptz[], $9::timestamptz[], $10::int8[]) \
              AS r(id, email, display_name, status, roles, email_verified, session_version, created_at, updated_at, version) \
         ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name, status = EXCLUDED.status, \
             roles = EXCLUDED.roles, email_verified = EXCLUDED.email_verified, \
             session_version = EXCLUDED.session_version, updated_at = EXCLUDED.updated_at, version = EXCLUDED.version \
         WHERE u.version < EXCLUDED.version"
    ))
    .bind(&cols.id)
    .bind(&cols.email)
    .bind(&cols.display_name)
    .bind(&cols.status)
    .bind(&cols.roles)
    .bind(&cols.email_verified)
    .bind(&cols.session_version)
    .bind(&cols.created_at)
    .bind(&cols.updated_at)
    .bind(&cols.version)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The rows to write, column by column, for `unnest`.
#[derive(Default)]
struct Columns<'a> {
    id: Vec<Uuid>,
    email: Vec<&'a str>,
    display_name: Vec<&'a str>,
    status: Vec<&'a str>,
    roles: Vec<String>,
    email_verified: Vec<bool>,
    session_version: Vec<i64>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}
