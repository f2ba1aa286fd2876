//! The sign-in guard: how many password guesses an email address may have checked, decided by
//! Postgres in one statement per step, so that neither concurrent requests nor several API
//! processes can get more guesses evaluated than the lockout allows.
//!
//! Keyed by the SHA-256 of the normalised address, whether or not an account has it: an unknown
//! address is guarded, locked and answered exactly like a known one, and a locked key is refused
//! before anything is looked up or hashed.
//!
//! 1. [`LoginGuard::admit`] reserves a guess in one `INSERT … ON CONFLICT DO UPDATE … WHERE`: only
//!    when the key is not locked and its wrong guesses plus the guesses still being checked are
//!    below the threshold. A refused request is answered 423 at once.
//! 2. The password is checked with no transaction open.
//! 3. [`Reservation::wrong`] counts the failure and, when it is the threshold's, locks the key in
//!    the same `UPDATE`; [`Reservation::right`] clears the count unless a lock began meanwhile, in
//!    which case the sign-in is refused. A request that ends otherwise (an error, a client gone)
//!    gives its reservation back; one whose process died stops counting after `hold`.
//!
//! Rows are forgotten `MEMORY` after their last guess or lock ends, by [`LoginGuard::sweep`].

use std::time::Duration;

use cairn_domain::{AccountLock, Email, LockoutPolicy};
use cairn_platform::clock::SharedClock;
use cairn_platform::http::ApiError;
use cairn_platform::secrets::hash_token;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How long a key is remembered after its last guess or the end of its last lock (so locks keep
/// doubling through a day of attempts, and an attacker's addresses do not stay for ever).
pub const MEMORY: Duration = Duration::from_secs(24 * 60 * 60);

/// How often expired keys are swept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Guessing state of a key that is not expired: `failures` (a lock that is over no longer
/// counts its guesses) and `in_flight` (reservations whose request died stop counting).
const CURRENT_FAILURES: &str =
    "CASE WHEN g.expires_at <= $2 OR (g.failures >= $3 AND coalesce(g.locked_until <= $2, true)) \
     THEN 0 ELSE g.failures END";
const CURRENT_IN_FLIGHT: &str = "CASE WHEN g.expires_at <= $2 OR g.in_flight_until <= $2 THEN 0 ELSE g.in_flight END";

/// Decides which sign-in attempts get their password checked.
#[derive(Debug, Clone)]
pub struct LoginGuard {
    pool: PgPool,
    clock: SharedClock,
    policy: LockoutPolicy,
    /// How long an admitted guess counts at most (longer than any request may take).
    hold: Duration,
}

/// The answer to an attempt.
#[derive(Debug)]
pub enum Admission {
    /// The password may be checked.
    Granted(Reservation),
    /// Locked, or every guess the lockout allows is being checked: ACCOUNT_LOCKED.
    Refused {
        /// Seconds until a guess may be admitted again.
        retry_after_s: u64,
    },
}

/// What a wrong guess led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Wrong guesses in a row, this one included.
    pub failures: u32,
    /// The lock this guess started, if it was the last one allowed.
    pub lock: Option<AccountLock>,
}

impl LoginGuard {
    /// A guard over `pool`, applying `policy` on `clock`. An admitted guess counts for `hold` at
    /// most, even if its request never finishes.
    #[must_use]
    pub fn new(pool: PgPool, clock: SharedClock, policy: LockoutPolicy, hold: Duration) -> Self {
        Self { pool, clock, policy, hold: hold.min(MEMORY) }
    }

    /// The key of an address as typed: its normalised form when it is an email address (so any
    /// spelling of one address shares a key), otherwise the trimmed, lower-cased text.
    #[must_use]
    pub fn key(email: &str) -> String {
        match Email::parse(email) {
            Ok(email) => hash_token(email.as_str()),
            Err(_) => hash_token(&email.trim().to_lowercase()),
        }
    }

    /// The lockout policy.
    #[must_use]
    pub fn policy(&self) -> LockoutPolicy {
        self.policy
    }

    fn threshold(&self) -> i32 {
        i32::try_from(self.policy.threshold).unwrap_or(i32::MAX)
    }

    /// Reserves a guess for `key`, or says how long to wait.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn admit(&self, key: &str) -> Result<Admission, ApiError> {
        let now = self.clock.now();
        let sql = format!(
            "INSERT INTO login_guards AS g (key, failures, in_flight, in_flight_until, expires_at) \
             VALUES ($1, 0, 1, $2 + $4 * interval '1 second', $2 + $5 * interval '1 second') \
             ON CONFLICT (key) DO UPDATE SET \
                 failures = {CURRENT_FAILURES}, \
                 lock_level = CASE WHEN g.expires_at <= $2 THEN 0 ELSE g.lock_level END, \
                 in_flight = {CURRENT_IN_FLIGHT} + 1, \
                 in_flight_until = $2 + $4 * interval '1 second', \
                 expires_at = greatest(g.expires_at, $2 + $5 * interval '1 second') \
             WHERE (g.locked_until IS NULL OR g.locked_until <= $2) \
               AND {CURRENT_FAILURES} + {CURRENT_IN_FLIGHT} < $3 \
             RETURNING 1"
        );
        let admitted: Option<i32> = sqlx::query_scalar(&sql)
            .bind(key)
            .bind(now)
            .bind(self.threshold())
            .bind(secs(self.hold))
            .bind(secs(MEMORY))
            .fetch_optional(&self.pool)
            .await?;
        if admitted.is_some() {
            return Ok(Admission::Granted(Reservation { guard: self.clone(), key: key.to_owned(), settled: false }));
        }
        // Refused by the statement above; this read only says for how long.
        let locked_until: Option<Option<DateTime<Utc>>> =
            sqlx::query_scalar("SELECT locked_until FROM login_guards WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        let retry_after_s = locked_until.flatten().map_or(1, |until| seconds_until(until, now));
        Ok(Admission::Refused { retry_after_s })
    }

    /// Forgets keys nobody has tried for [`MEMORY`]; returns how many.
    ///
    /// # Errors
    /// When Postgres fails.
    pub async fn sweep(&self) -> Result<u64, ApiError> {
        let swept = sqlx::query("DELETE FROM login_guards WHERE expires_at <= $1")
            .bind(self.clock.now())
            .execute(&self.pool)
            .await?;
        Ok(swept.rows_affected())
    }

    /// Sweeps every [`SWEEP_EVERY`] until `shutdown`.
    pub async fn sweep_until(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(swept) => tracing::debug!(swept, "forgot quiet sign-in guards"),
                Err(e) => tracing::warn!(error = %e, "cannot sweep sign-in guards; next time"),
            }
        }
    }
}

/// An admitted guess. Settle it with [`Self::wrong`] or [`Self::right`]; dropped unsettled (an
/// error, a client that went away), it is given back.
#[derive(Debug)]
pub struct Reservation {
    guard: LoginGuard,
    key: String,
    settled: bool,
}

impl Reservation {
    /// The password was wrong: one more failure, and the lock if it was the last guess allowed.
    ///
    /// # Errors
    /// When Postgres fails (the reservation is then given back).
    pub async fn wrong(mut self) -> Result<Failure, ApiError> {
        let guard = &self.guard;
        let now = guard.clock.now();
        let row: Option<(i32, i32, Option<DateTime<Utc>>)> = sqlx::query_as(
            "UPDATE login_guards AS g SET \
                 in_flight = greatest(g.in_flight - 1, 0), \
                 failures = g.failures + 1, \
                 lock_level = g.lock_level + CASE WHEN g.failures + 1 = $3 THEN 1 ELSE 0 END, \
                 locked_until = CASE WHEN g.failures + 1 = $3 \
                     THEN $2 + ($4::bigint[])[least(g.lock_level + 1, cardinality($4::bigint[]))] * interval '1 second' \
                     ELSE g.locked_until END, \
                 expires_at = greatest(g.expires_at, $2 + ($5 + CASE WHEN g.failures + 1 = $3 \
                     THEN ($4::bigint[])[least(g.lock_level + 1, cardinality($4::bigint[]))] ELSE 0 END) * interval '1 second') \
             WHERE g.key = $1 \
             RETURNING g.failures, g.lock_level, g.locked_until",
        )
        .bind(&self.key)
        .bind(now)
        .bind(guard.threshold())
        .bind(guard.policy.lock_lengths())
        .bind(secs(MEMORY))
        .fetch_optional(&guard.pool)
        .await?;
        self.settled = true;
        // Swept while the password was checked (only after a stall longer than `hold`): one failure.
        let (failures, level, until) = row.unwrap_or((1, 0, None));
        let failures = u32::try_from(failures).unwrap_or(0);
        let lock = match until {
            Some(until) if failures == guard.policy.threshold => {
                Some(AccountLock { until, level: u32::try_from(level).unwrap_or(1) })
            }
            _ => None,
        };
        Ok(Failure { failures, lock })
    }

    /// The password was right: the failures are forgotten and `Ok(None)` says the sign-in may
    /// go on, unless a lock began while it was checked: then `Ok(Some(seconds left))`.
    ///
    /// # Errors
    /// When Postgres fails (the reservation is then given back).
    pub async fn right(mut self) -> Result<Option<u64>, ApiError> {
        let guard = &self.guard;
        let now = guard.clock.now();
        let locked_until: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
            "UPDATE login_guards AS g SET \
                 in_flight = greatest(g.in_flight - 1, 0), \
                 failures = CASE WHEN g.locked_until > $2 THEN g.failures ELSE 0 END, \
                 lock_level = CASE WHEN g.locked_until > $2 THEN g.lock_level ELSE 0 END \
             WHERE g.key = $1 \
             RETURNING g.locked_until",
        )
        .bind(&self.key)
        .bind(now)
        .fetch_optional(&guard.pool)
        .await?;
        self.settled = true;
        Ok(locked_until.flatten().filter(|until| *until > now).map(|until| seconds_until(until, now)))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (pool, key) = (self.guard.pool.clone(), std::mem::take(&mut self.key));
        runtime.spawn(async move {
            let released = sqlx::query("UPDATE login_guards SET in_flight = greatest(in_flight - 1, 0) WHERE key = $1")
                .bind(key)
                .execute(&pool)
                .await;
            // Not fatal: the reservation stops counting after `hold` anyway.
            if let Err(e) = released {
                tracing::warn!(error = %e, "cannot give back a sign-in reservation");
            }
        });
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn seconds_until(until: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    u64::try_from((until - now).num_seconds()).unwrap_or(0).max(1)
}
