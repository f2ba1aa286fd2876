//! The `sessions` read model: one row per sign-in, for a user's session list.

use cairn_domain::SessionEvent;
use cairn_platform::envelope::EventEnvelope;
use sqlx::PgConnection;

use crate::runner::Projection;

/// Projects `Session` events into the `sessions` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionsProjection;

impl Projection for SessionsProjection {
    const NAME: &'static str = "sessions";
    const TABLES: &'static [&'static str] = &["sessions"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        event.aggregate_type == "Session"
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        if event.aggregate_type != "Session" {
            return Ok(());
        }
        let id: uuid::Uuid = event.aggregate_id.parse()?;
        let table = format!("{schema}.sessions");
        let seq = event.sequence;
        match serde_json::from_value::<SessionEvent>(event.payload.clone())? {
            SessionEvent::SessionStarted { user_id, session_version, started_at, expires_at, device, ip, .. } => {
                sqlx::query(&format!(
                    "INSERT INTO {table} (id, user_id, device, ip, created_at, last_used_at, expires_at, session_version, version) \
                     VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
                ))
                .bind(id)
                .bind(user_id)
                .bind(device)
                .bind(ip)
                .bind(started_at)
                .bind(expires_at)
                .bind(i64::try_from(session_version)?)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            }
            SessionEvent::SessionRefreshed { at, ip, .. } => {
                sqlx::query(&format!(
                    "UPDATE {table} SET last_used_at = $2, ip = coalesce($3, ip), version = $4 WHERE id = $1 AND version < $4"
                ))
                .bind(id)
                .bind(at)
                .bind(ip)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            }
            SessionEvent::SessionRebound { session_version } => {
                sqlx::query(&format!(
                    "UPDATE {table} SET session_version = $2, version = $3 WHERE id = $1 AND version < $3"
                ))
                .bind(id)
                .bind(i64::try_from(session_version)?)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            }
            SessionEvent::SessionRevoked { reason, .. } => {
                let reason = serde_json::to_value(reason)?.as_str().unwrap_or("revoked").to_owned();
                sqlx::query(&format!(
                    "UPDATE {table} SET revoked_at = $2, revoke_reason = $3, version = $4 WHERE id = $1 AND version < $4"
                ))
                .bind(id)
                .bind(event.recorded_at)
                .bind(reason)
                .bind(seq)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(())
    }
}
