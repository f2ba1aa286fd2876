//! Writes events straight into the events table, the way cairn itself would have written them:
//! externally tagged payloads, sequences from 1 per aggregate, string metadata, and one
//! transaction per chunk so the log holds many transaction ids as a live one does.
//!
//! Every seeded user follows one script: `UserRegistered` (role `user`, the bench password), then
//! alternately `RoleGranted { operator }` and `RoleRevoked { operator, session_version }`, the
//! session version rising by one with each revocation, exactly as the `User` aggregate decides.

use anyhow::Context;
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sqlx::PgPool;
use uuid::Uuid;

/// The password of every seeded user.
pub const PASSWORD: &str = "bench-password-0001";

/// cairn's password hashing parameters: argon2id, m = 19 MiB, t = 2, p = 1.
///
/// # Errors
/// Never for these constants; kept fallible to avoid a panic path.
pub fn argon2id() -> anyhow::Result<Argon2<'static>> {
    let params = Params::new(19 * 1024, 2, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A PHC string of [`PASSWORD`] with cairn's parameters, so seeded users can sign in.
///
/// # Errors
/// When hashing fails.
pub fn password_hash() -> anyhow::Result<String> {
    let salt = SaltString::encode_b64(Uuid::new_v4().as_bytes()).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    argon2id()?
        .hash_password(PASSWORD.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))
}

/// What to seed.
#[derive(Debug, Clone)]
pub struct Users<'a> {
    /// Email prefix: seeded user `n` is `<label><n>@bench.local`. Unique per database.
    pub label: &'a str,
    /// How many users.
    pub users: usize,
    /// Events per user, the registration included (at least 1).
    pub events_per_user: usize,
    /// About how many events per transaction.
    pub chunk_events: usize,
    /// The password hash stored in each registration.
    pub password_hash: &'a str,
}

impl Users<'_> {
    /// The email of seeded user `n`.
    #[must_use]
    pub fn email(&self, n: usize) -> String {
        format!("{}{n}@bench.local", self.label)
    }

    /// Total events this seeds.
    #[must_use]
    pub fn total_events(&self) -> usize {
        self.users * self.events_per_user.max(1)
    }
}

/// Whether a seeded user holds `operator` after `events` events of the script.
#[must_use]
pub fn holds_operator(events: usize) -> bool {
    events >= 2 && events % 2 == 0
}

/// Inserts the users' events, interleaved across users within each chunk (every user's first
/// event, then every user's second, …), and returns the users' ids in order.
///
/// # Errors
/// When Postgres refuses.
pub async fn users(pool: &PgPool, spec: &Users<'_>) -> anyhow::Result<Vec<Uuid>> {
    let per_user = spec.events_per_user.max(1);
    let users_per_chunk = (spec.chunk_events / per_user).max(1);
    let ids: Vec<Uuid> = (0..spec.users).map(|_| Uuid::new_v4()).collect();
    for (chunk_index, chunk) in ids.chunks(users_per_chunk).enumerate() {
        let first = chunk_index * users_per_chunk;
        let numbers: Vec<i64> = (first..first + chunk.len()).map(|n| n as i64).collect();
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT 'User', u.id::text, s.seq, \
                    CASE WHEN s.seq = 1 THEN 'UserRegistered' WHEN s.seq % 2 = 0 THEN 'RoleGranted' ELSE 'RoleRevoked' END, \
                    '1', \
                    CASE WHEN s.seq = 1 THEN jsonb_build_object('UserRegistered', jsonb_build_object( \
                             'email', $3 || u.n || '@bench.local', 'display_name', 'Bench user ' || u.n, \
                             'password_hash', $4::text, 'roles', jsonb_build_array('user'))) \
                         WHEN s.seq % 2 = 0 THEN jsonb_build_object('RoleGranted', jsonb_build_object('role', 'operator')) \
                         ELSE jsonb_build_object('RoleRevoked', jsonb_build_object('role', 'operator', 'session_version', (s.seq - 1) / 2)) \
                    END, \
                    jsonb_build_object('actor_id', u.id::text, 'request_id', gen_random_uuid()::text, \
                                       'correlation_id', gen_random_uuid()::text, 'causation_id', gen_random_uuid()::text, \
                                       'client_ip', '127.0.0.1', 'user_agent', 'cairn-bench') \
             FROM generate_series(1, $5::bigint) AS s(seq) \
             CROSS JOIN unnest($1::uuid[], $2::bigint[]) AS u(id, n) \
             ORDER BY s.seq, u.n",
        )
        .bind(chunk)
        .bind(&numbers)
        .bind(spec.label)
        .bind(spec.password_hash)
        .bind(per_user as i64)
        .execute(pool)
        .await
        .with_context(|| format!("seeding users {first}..{}", first + chunk.len()))?;
    }
    Ok(ids)
}

/// Waits until the users projection's checkpoint reaches the newest event in the log, at most
/// `limit`.
///
/// # Errors
/// When it does not, or Postgres fails.
pub async fn wait_projected(pool: &PgPool, limit: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let caught_up: bool = sqlx::query_scalar(
            "SELECT coalesce((SELECT last_pos FROM projection_checkpoints WHERE name = 'users'), 0) \
                    >= coalesce((SELECT max(global_position) FROM events), 0)",
        )
        .fetch_one(pool)
        .await?;
        if caught_up {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the users projection did not catch up within {limit:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
