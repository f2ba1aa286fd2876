//! The `roles` read model: each role and its permissions.

use cairn_domain::RoleEvent;
use cairn_platform::envelope::EventEnvelope;
use sqlx::PgConnection;

use crate::runner::Projection;

/// Projects `Role` events into the `roles` table.
#[derive(Debug, Clone, Copy, Default)]
pub struct RolesProjection;

impl Projection for RolesProjection {
    const NAME: &'static str = "roles";
    const TABLES: &'static [&'static str] = &["roles"];

    fn wants(&self, event: &EventEnvelope) -> bool {
        event.aggregate_type == "Role"
    }

    async fn apply(&self, conn: &mut PgConnection, schema: &str, event: &EventEnvelope) -> anyhow::Result<()> {
        if event.aggregate_type != "Role" {
            return Ok(());
        }
        let (RoleEvent::RoleDefined { permissions } | RoleEvent::RolePermissionsChanged { permissions }) =
            serde_json::from_value::<RoleEvent>(event.payload.clone())?;
        sqlx::query(&format!(
            "INSERT INTO {schema}.roles (name, permissions, updated_at, version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET permissions = EXCLUDED.permissions, updated_at = EXCLUDED.updated_at, \
             version = EXCLUDED.version WHERE roles.version < EXCLUDED.version"
        ))
        .bind(&event.aggregate_id)
        .bind(permissions)
        .bind(event.recorded_at)
        .bind(event.sequence)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
