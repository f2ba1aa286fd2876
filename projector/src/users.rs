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
        if let UserEvent::UserRegistered { email, display_name, roles, .. } = event_payload {
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
            return Ok(());
        }
        // Every other event is one guarded UPDATE: `$4` carries a text value, `$5` a session version.
        let sv = |v: u64| i64::try_from(v).map(Some);
        let (set, text, version): (&str, Option<String>, Option<i64>) = match event_payload {
            UserEvent::DisplayNameChanged { display_name } => ("display_name = $4", Some(display_name), None),
            UserEvent::RoleGranted { role } => {
                ("roles = (SELECT array_agg(DISTINCT r ORDER BY r) FROM unnest(roles || $4) AS r)", Some(role), None)
            }
            UserEvent::RoleRevoked { role, session_version } => (
                "roles = array_remove(roles, $4), session_version = greatest(session_version, $5)",
                Some(role),
                sv(session_version)?,
            ),
            UserEvent::UserDeactivated { session_version } => {
                ("status = 'deactivated', session_version = greatest(session_version, $5)", None, sv(session_version)?)
            }
            UserEvent::UserReactivated {} => ("status = 'active'", None, None),
            UserEvent::UserDeleted { session_version } => {
                ("status = 'deleted', session_version = greatest(session_version, $5)", None, sv(session_version)?)
            }
            UserEvent::EmailVerified {} => ("email_verified = true", None, None),
            UserEvent::PasswordChanged { session_version, .. }
            | UserEvent::PasswordReset { session_version, .. }
            | UserEvent::SessionsEnded { session_version, .. } => {
                ("session_version = greatest(session_version, $5)", None, sv(session_version)?)
            }
            // Registration is handled above; sign-in bookkeeping and mail requests change nothing
            // this table shows.
            UserEvent::UserRegistered { .. }
            | UserEvent::EmailVerificationRequested {}
            | UserEvent::PasswordResetRequested {}
            | UserEvent::LoginFailed { .. }
            | UserEvent::AccountLocked { .. }
            | UserEvent::AccountUnlocked {}
            | UserEvent::LoginSucceeded {} => return Ok(()),
        };
        // Guarded by `version < sequence`, so re-applying an event changes nothing even outside the
        // checkpoint's protection (a rebuild catching up, say).
        sqlx::query(&format!("UPDATE {table} SET {set}, updated_at = $2, version = $3 WHERE id = $1 AND version < $3"))
            .bind(id)
            .bind(at)
            .bind(seq)
            .bind(text)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}
