//! Uploads in flight and each owner's quota, on the command side's own tables (`file_uploads`,
//! `file_quota`, see the files migration).
//!
//! Why concurrent uploads cannot overshoot the quota: a byte is forwarded to the store only once
//! it is covered by a reservation, and a reservation is one conditional statement on the owner's
//! single `file_quota` row (`stored + reserved + n <= quota`). Postgres locks that row for the
//! update and, when another upload changed it meanwhile, evaluates the condition again on the
//! committed values before writing, so however many uploads reserve at once, the sum they
//! reserve never passes the quota. Appending FileUploaded turns the upload's reservation into
//! stored bytes in the append's own transaction (a trigger), and the recorded size is never more
//! than what was reserved, so stored + reserved never grows there either.

use sqlx::PgPool;
use uuid::Uuid;

use cairn_platform::http::ApiError;

/// Reservations grow by this much at a time when the request's length is not known (or was
/// passed), so a large upload costs one statement per step, not one per chunk.
pub const RESERVATION_STEP: u64 = 8 * 1024 * 1024;

/// Registers an upload about to store its bytes under `key`, before the first byte is stored:
/// the sweeper finds what a crash leaves from this row.
///
/// # Errors
/// When Postgres fails.
pub async fn register(
    pool: &PgPool,
    file_id: Uuid,
    owner_id: Uuid,
    backend: &str,
    key: &str,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO file_uploads (file_id, owner_id, backend, storage_key, started_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(file_id)
    .bind(owner_id)
    .bind(backend)
    .bind(key)
    .bind(started_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes the upload's row and gives its reservation back, in one statement. `true` when the
/// row was there: the upload was never recorded, so its bytes are garbage. `false` when it was
/// gone: FileUploaded was appended (or the sweeper took the upload), and the bytes are not ours
/// to remove.
///
/// # Errors
/// When Postgres fails.
pub async fn release(pool: &PgPool, file_id: Uuid) -> Result<bool, ApiError> {
    let released: Option<Uuid> = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM file_uploads WHERE file_id = $1 RETURNING owner_id, reserved_bytes), \
              given_back AS ( \
                UPDATE file_quota q SET reserved_bytes = greatest(q.reserved_bytes - gone.reserved_bytes, 0) \
                FROM gone WHERE q.owner_id = gone.owner_id) \
         SELECT owner_id FROM gone",
    )
    .bind(file_id)
    .fetch_optional(pool)
    .await?;
    Ok(released.is_some())
}

/// The bytes one upload holds reserved against its owner's quota.
#[derive(Debug)]
pub struct Reservation {
    file_id: Uuid,
    owner_id: Uuid,
    quota: u64,
    /// The most the upload may store.
    max: u64,
    /// What the request's length says it will need (capped at `max`), reserved up front.
    expected: Option<u64>,
    reserved: u64,
}

impl Reservation {
    /// Nothing reserved yet for upload `file_id` of `owner_id`; `expected` is the request's
    /// length when it was given.
    #[must_use]
    pub fn new(file_id: Uuid, owner_id: Uuid, quota: u64, max: u64, expected: Option<u64>) -> Self {
        Self { file_id, owner_id, quota, max, expected: expected.map(|e| e.min(max)), reserved: 0 }
    }

    /// Makes sure `needed` bytes in all are reserved: reserves generously (the request's length,
    /// or the next step) and, when that does not fit, exactly what is needed, so a file that fits
    /// the quota is never refused because of the multipart framing around it.
    ///
    /// # Errors
    /// PAYLOAD_TOO_LARGE with the quota's figures when `needed` does not fit; 5xx when Postgres fails.
    pub async fn cover(&mut self, pool: &PgPool, needed: u64) -> Result<(), ApiError> {
        if needed <= self.reserved {
            return Ok(());
        }
        let generous = match self.expected.take() {
            Some(expected) => expected.max(needed),
            None => needed.max(self.reserved.saturating_add(RESERVATION_STEP).min(self.max)),
        };
        if self.add(pool, generous - self.reserved).await? {
            return Ok(());
        }
        if generous > needed && self.add(pool, needed - self.reserved).await? {
            return Ok(());
        }
        Err(self.refusal(pool).await?)
    }

    /// Reserves `bytes` more, when they fit; `false` when they do not (or the upload's row is
    /// gone, which only a sweep of a stalled upload does: it then may not store more).
    async fn add(&mut self, pool: &PgPool, bytes: u64) -> Result<bool, ApiError> {
        let amount = i64::try_from(bytes).unwrap_or(i64::MAX);
        let quota = i64::try_from(self.quota).unwrap_or(i64::MAX);
        // One statement: the upload's row is locked first, then the owner's quota row (the order
        // the append's trigger and `release` take them in), and the quota row is created on the
        // owner's first upload. The condition is checked by the statement that writes the row.
        let reserved: Option<i64> = sqlx::query_scalar(
            "WITH upload AS (SELECT file_id FROM file_uploads WHERE file_id = $1 FOR UPDATE), \
                  quota AS ( \
                    INSERT INTO file_quota AS q (owner_id, reserved_bytes) \
                    SELECT $2, $3 FROM upload WHERE $3 <= $4 \
                    ON CONFLICT (owner_id) DO UPDATE SET reserved_bytes = q.reserved_bytes + EXCLUDED.reserved_bytes \
                      WHERE q.stored_bytes + q.reserved_bytes + EXCLUDED.reserved_bytes <= $4 \
                    RETURNING q.owner_id) \
             UPDATE file_uploads u SET reserved_bytes = u.reserved_bytes + $3 \
             FROM quota WHERE u.file_id = $1 \
             RETURNING u.reserved_bytes",
        )
        .bind(self.file_id)
        .bind(self.owner_id)
        .bind(amount)
        .bind(quota)
        .fetch_optional(pool)
        .await?;
        match reserved {
            Some(total) => {
                self.reserved = u64::try_from(total).unwrap_or_default();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The refusal of an upload that does not fit, with the owner's figures.
    async fn refusal(&self, pool: &PgPool) -> Result<ApiError, ApiError> {
        let stored: Option<i64> = sqlx::query_scalar("SELECT stored_bytes FROM file_quota WHERE owner_id = $1")
            .bind(self.owner_id)
            .fetch_optional(pool)
            .await?;
        let stored = stored.and_then(|s| u64::try_from(s).ok()).unwrap_or_default();
        Ok(ApiError::LimitExceeded {
            message: format!("the file does not fit in your storage quota ({} of {} bytes used)", stored, self.quota),
            details: [("quota_bytes".to_owned(), self.quota), ("stored_bytes".to_owned(), stored)].into(),
        })
    }
}
