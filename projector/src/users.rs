//! The `users` read model: one row per user with real columns and indexes.

use cairn_domain::UserEvent;
use cairn_platform::envelope::EventEnvelope;
use sqlx::PgConnection;

use crate::runner::Projection;

/// Projects `User` events into the `users` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsersProjection;

impl Projection for UsersProjection {
    const NAME: &'static str = "users";
    const TABLES: &'static [&'static str] = &["users"];

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        if event.aggregate_type != "User" {
            return Ok(());
        }
        let id: uuid::Uuid = event.aggregate_id.parse()?;
        let event_payload: UserEvent = serde_json::from_value(event.payload.clone())?;
        let at = event.recorded_at;
        let seq = event.sequence;
        let table = format!("{schema}.users");
        // Every update is guarded by `version < sequence`, so re-applying an event changes nothing
        // even outside the checkpoint's protection (a rebuild catching up, say).
        let update = |set: &str| {
            format!("UPDATE {table} SET {set}, updated_at = $2, version = $3 WHERE id = $1 AND version < $3")
        };
        match event_payload {
            UserEvent::UserRegistered { email, display_name, roles, .. } => {
                sqlx::query(&format!(
                    "INSERT INTO {table} (id, email, display_name, status, roles, created_at, updated_at, version) \
                     VALUES ($1, $2, $3, 'active', $4, $5, $5, $6) ON CONFLICT (id) DO NOTHING"
                ))
                .bind(id)
                .bind(email)
                .bind(display_name)
                .bind(roles)
                .bind(at)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            }
            UserEvent::DisplayNameChanged { display_name } => {
                sqlx::query(&update("display_name = $4"))
                    .bind(id)
                    .bind(at)
                    .bind(seq)
                    .bind(display_name)
                    .execute(&mut *conn)
                    .await?;
            }
            UserEvent::RoleGranted { role } => {
                sqlx::query(&update(
                    "roles = (SELECT array_agg(DISTINCT r ORDER BY r) FROM unnest(roles || $4::text) AS r)",
                ))
                .bind(id)
                .bind(at)
                .bind(seq)
                .bind(role)
                .execute(&mut *conn)
                .await?;
            }
            UserEvent::RoleRevoked { role, session_version } => {
                sqlx::query(&update(
                    "roles = array_remove(roles, $4::text), session_version = greatest(session_version, $5)",
                ))
                .bind(id)
                .bind(at)
                .bind(seq)
                .bind(role)
                .bind(i64::try_from(session_version)?)
                .execute(&mut *conn)
                .await?;
            }
            UserEvent::UserDeactivated { session_version } => {
                sqlx::query(&update("status = 'deactivated', session_version = greatest(session_version, $4)"))
                    .bind(id)
                    .bind(at)
                    .bind(seq)
                    .bind(i64::try_from(session_version)?)
                    .execute(&mut *conn)
                    .await?;
            }
            UserEvent::UserReactivated {} => {
                sqlx::query(&update("status = 'active'")).bind(id).bind(at).bind(seq).execute(&mut *conn).await?;
            }
            UserEvent::UserDeleted { session_version } => {
                sqlx::query(&update("status = 'deleted', session_version = greatest(session_version, $4)"))
                    .bind(id)
                    .bind(at)
                    .bind(seq)
                    .bind(i64::try_from(session_version)?)
                    .execute(&mut *conn)
                    .await?;
            }
            UserEvent::EmailVerified {} => {
                sqlx::query(&update("email_verified = true")).bind(id).bind(at).bind(seq).execute(&mut *conn).await?;
            }
            UserEvent::PasswordChanged { session_version, .. }
            | UserEvent::PasswordReset { session_version, .. }
            | UserEvent::SessionsEnded { session_version, .. } => {
                sqlx::query(&update("session_version = greatest(session_version, $4)"))
                    .bind(id)
                    .bind(at)
                    .bind(seq)
                    .bind(i64::try_from(session_version)?)
                    .execute(&mut *conn)
                    .await?;
            }
            // Sign-in bookkeeping and mail requests change nothing this table shows.
            UserEvent::EmailVerificationRequested {}
            | UserEvent::PasswordResetRequested {}
            | UserEvent::LoginFailed { .. }
            | UserEvent::AccountLocked { .. }
            | UserEvent::AccountUnlocked {}
            | UserEvent::LoginSucceeded {} => {}
        }
        Ok(())
    }
}
