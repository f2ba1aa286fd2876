//! Password hashing: argon2id (m = 19 MiB, t = 2, p = 1) on a small pool of dedicated threads,
//! so sign-ins cannot starve other requests. Dedicated threads rather than tokio's blocking pool:
//! each thread that ever hashed keeps its 19 MiB in its malloc arena, and the blocking pool grows
//! to hundreds of threads, which under load meant hundreds of MiB of resident memory. Each thread
//! also reuses one block buffer for every hash instead of allocating 19 MiB per hash, so the
//! memory hashing holds is bounded by threads × 19 MiB however many sign-ins come.
//!
//! The queue in front of the threads is bounded too (`CAIRN_PASSWORD_QUEUE`): when it is full a
//! request that needs a hash is answered at once with 503 `SERVICE_UNAVAILABLE` and `Retry-After`
//! rather than waiting behind thousands of others. A queued hash whose request has gone (the
//! client disconnected, or the request timed out) is skipped when its turn comes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use cairn_platform::http::ApiError;
use cairn_platform::Settings;
use tokio::sync::oneshot;

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password, in characters (bounds hashing cost).
pub const MAX_PASSWORD_CHARS: usize = 128;

/// A queued hash: runs the work, or only drops it when nobody waits for the answer any more.
type Job = Box<dyn FnOnce() + Send>;

/// How long a client turned away by a full queue is asked to wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The bounded hashing pool.
#[derive(Clone)]
pub struct Passwords {
    jobs: mpsc::SyncSender<Job>,
    threads: usize,
    queue: usize,
    counts: Arc<Counts>,
}

/// What the pool did, for tests and metrics.
#[derive(Debug, Default)]
struct Counts {
    /// Hashes computed.
    ran: AtomicU64,
    /// Queued hashes skipped because their request had gone.
    skipped: AtomicU64,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords").field("threads", &self.threads).field("queue", &self.queue).finish()
    }
}

/// OWASP's recommended argon2id parameters.
fn params() -> Params {
    // Params::new only fails for out-of-range values.
    Params::new(19 * 1024, 2, 1, None).unwrap_or_default()
}

thread_local! {
    /// This thread's argon2 working memory, kept between hashes.
    static BLOCKS: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
}

/// Runs argon2 (`algorithm`, `version`, `params`) over `password` and `salt` into `out`, in this
/// thread's reused working memory.
fn hash_into(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: Salt<'_>,
    out: &mut [u8],
) -> argon2::password_hash::Result<()> {
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version, params);
    BLOCKS.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() != blocks {
            memory.clear();
            memory.shrink_to_fit();
            memory.resize(blocks, Block::default());
        }
        argon2.hash_password_into_with_memory(password, salt_bytes, out, &mut memory[..])
    })?;
    Ok(())
}

/// A new argon2id PHC string for `password`.
fn hash_password(password: &[u8]) -> argon2::password_hash::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let params = params();
    let output = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |out| {
        hash_into(Algorithm::Argon2id, Version::V0x13, params.clone(), password, salt.as_salt(), out)
    })?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash` (with the parameters the hash names).
fn verify_password(password: &[u8], hash: &str) -> argon2::password_hash::Result<bool> {
    use argon2::password_hash::Error;
    let parsed = PasswordHash::new(hash)?;
    let algorithm = Algorithm::try_from(parsed.algorithm)?;
    let version = parsed.version.map(Version::try_from).transpose()?.unwrap_or_default();
    let params = Params::try_from(&parsed)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return Err(Error::PhcStringField) };
    let computed =
        Output::init_with(expected.len(), |out| hash_into(algorithm, version, params.clone(), password, salt, out))?;
    // Output's equality is constant-time.
    Ok(computed == expected)
}

/// Checks length bounds and strength (zxcvbn score 3 of 4 or better, judged also against the
/// user's own email and name).
///
/// # Errors
/// The reason, for the `password` field.
pub fn check_policy(password: &str, user_inputs: &[&str]) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(format!("must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Err(format!("must be at most {MAX_PASSWORD_CHARS} characters"));
    }
    let estimate = zxcvbn::zxcvbn(password, user_inputs);
    if estimate.score() < zxcvbn::Score::Three {
        let reason = estimate
            .feedback()
            .and_then(|f| {
                f.warning().map(|w| w.to_string()).or_else(|| f.suggestions().first().map(ToString::to_string))
            })
            .unwrap_or_else(|| "is too easy to guess".to_owned());
        return Err(format!("is too weak: {reason}"));
    }
    Ok(())
}

impl Passwords {
    /// A pool running at most `concurrency` hashes at once, with 32 per thread waiting at most.
    #[must_use]
    pub fn new(concurrency: usize) -> Self {
        let threads = concurrency.max(1);
        Self::with_queue(threads, threads * 32)
    }

    /// The pool `CAIRN_HASH_CONCURRENCY` and `CAIRN_PASSWORD_QUEUE` describe.
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        Self::with_queue(settings.hash_concurrency, settings.password_queue)
    }

    /// A pool of `threads` threads with at most `queue` hashes waiting for one.
    #[must_use]
    pub fn with_queue(threads: usize, queue: usize) -> Self {
        let (threads, queue) = (threads.max(1), queue.max(1));
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new().name(format!("password-hash-{i}")).spawn(move || loop {
                // The lock is held only to take the next job, not while hashing.
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match job {
                    Ok(job) => job(),
                    Err(_) => return, // every sender is gone: the pool is shut down
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hashing thread");
            }
        }
        Self { jobs: tx, threads, queue, counts: Arc::default() }
    }

    /// Queues `work`, or refuses at once when the queue is full. The work is skipped if the
    /// returned receiver is dropped before a thread takes it.
    fn submit<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, ApiError> {
        let (done, result) = oneshot::channel();
        let counts = Arc::clone(&self.counts);
        let job: Job = Box::new(move || {
            if done.is_closed() {
                counts.skipped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("cairn_password_hashes_skipped_total").increment(1);
                return;
            }
            counts.ran.fetch_add(1, Ordering::Relaxed);
            let _ = done.send(work());
        });
        self.jobs.try_send(job).map(|()| result).map_err(|e| match e {
            TrySendError::Full(_) => {
                metrics::counter!("cairn_password_hashes_refused_total").increment(1);
                ApiError::Overloaded { retry_after_s: BUSY_RETRY_AFTER_SECS }
            }
            TrySendError::Disconnected(_) => ApiError::Internal(anyhow::anyhow!("password pool stopped")),
        })
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let result = self.submit(work)?;
        result.await.map_err(|_| ApiError::Internal(anyhow::anyhow!("a password-hashing thread failed")))
    }

    /// Hashes `password` into a PHC string.
    ///
    /// # Errors
    /// SERVICE_UNAVAILABLE when the queue is full; INTERNAL when hashing fails (it does not for
    /// valid parameters).
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.run(move || hash_password(password.as_bytes()))
            .await?
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("password hashing failed: {e}")))
    }

    /// Verifies `password` against `hash`; with no hash (unknown account) or an empty one (an
    /// account whose password was removed) it verifies against a dummy hash and answers `false`,
    /// so the answer takes as long either way.
    ///
    /// # Errors
    /// SERVICE_UNAVAILABLE when the queue is full.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, ApiError> {
        let hash = hash.filter(|h| !h.is_empty());
        let known = hash.is_some();
        let hash = match hash {
            Some(h) => h,
            None => dummy_hash().to_owned(),
        };
        let matches = self.run(move || verify_password(password.as_bytes(), &hash).unwrap_or(false)).await?;
        Ok(known && matches)
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(uuid::Uuid::new_v4().to_string().as_bytes()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_wrong_passwords_do_not() -> anyhow::Result<()> {
        let pool = Passwords::new(2);
        let hash = pool.hash("correct horse".into()).await?;
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(pool.verify("correct horse".into(), Some(hash.clone())).await?);
        assert!(!pool.verify("wrong horse".into(), Some(hash)).await?);
        assert!(!pool.verify("anything".into(), None).await?);
        Ok(())
    }

    /// Occupies the single thread of `pool` until the returned sender is dropped or sent to.
    fn occupy(pool: &Passwords) -> (std::sync::mpsc::Sender<()>, oneshot::Receiver<()>) {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let blocker = pool
            .submit(move || {
                let _ = started_tx.send(());
                let _ = released.recv();
            })
            .expect("an empty queue takes a job");
        started.recv().expect("the blocker started");
        (release, blocker)
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_with_retry_after() {
        let pool = Passwords::with_queue(1, 2);
        let (release, _blocker) = occupy(&pool);
        let queued: Vec<_> = (0..2).map(|_| pool.submit(|| ()).expect("room in the queue")).collect();
        match pool.verify("anything".into(), None).await {
            Err(ApiError::Overloaded { retry_after_s }) => assert!(retry_after_s >= 1),
            other => panic!("expected SERVICE_UNAVAILABLE from a full queue, got {other:?}"),
        }
        drop(release);
        for job in queued {
            job.await.expect("queued jobs still run");
        }
        assert!(pool.verify("anything".into(), None).await.is_ok(), "room again once the queue drained");
    }

    #[tokio::test]
    async fn a_hash_whose_request_is_gone_is_skipped() {
        let pool = Passwords::with_queue(1, 8);
        let (release, blocker) = occupy(&pool);
        // Three requests queue behind the blocker; two of them go away before their turn, as a
        // client that disconnects or a request that times out does.
        let abandoned: Vec<_> = (0..2).map(|_| pool.submit(|| hash_password(b"abandoned"))).collect();
        let kept = pool.submit(|| hash_password(b"kept")).expect("room in the queue");
        drop(abandoned);
        let _ = release.send(());
        blocker.await.expect("the blocker ran");
        assert!(kept.await.expect("the kept job ran").is_ok());
        assert_eq!(pool.counts.ran.load(Ordering::Relaxed), 2, "only the blocker and the kept hash ran");
        assert_eq!(pool.counts.skipped.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_dropped_request_future_skips_its_hash() {
        let pool = Passwords::with_queue(1, 8);
        let (release, blocker) = occupy(&pool);
        // The request's future is polled once (the job is queued), then dropped, as axum drops a
        // handler whose connection closed or whose time ran out.
        let verify = pool.verify("abandoned".into(), None);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), verify).await.is_err());
        let _ = release.send(());
        blocker.await.expect("the blocker ran");
        assert!(pool.verify("kept".into(), None).await.is_ok());
        assert_eq!(pool.counts.ran.load(Ordering::Relaxed), 2, "the abandoned verification never ran");
        assert_eq!(pool.counts.skipped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn hashes_agree_with_the_argon2_crate_both_ways() -> anyhow::Result<()> {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let ours = hash_password(b"correct horse").map_err(|e| anyhow::anyhow!("{e}"))?;
        let parsed = PasswordHash::new(&ours).map_err(|e| anyhow::anyhow!("{e}"))?;
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        // A hash made by the crate with other parameters verifies with its own parameters.
        let other = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(8 * 1024, 1, 1, None).unwrap());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = other.hash_password(b"battery staple", &salt).map_err(|e| anyhow::anyhow!("{e}"))?.to_string();
        assert!(verify_password(b"battery staple", &theirs).map_err(|e| anyhow::anyhow!("{e}"))?);
        assert!(!verify_password(b"battery stapler", &theirs).map_err(|e| anyhow::anyhow!("{e}"))?);
        assert!(verify_password(b"x", "not a phc string").is_err());
        Ok(())
    }

    #[test]
    fn length_and_strength_policy() {
        assert!(check_policy("short", &[]).is_err());
        assert!(check_policy(&"x".repeat(129), &[]).is_err());
        assert!(check_policy("password123", &[]).is_err_and(|e| e.contains("too weak")));
        assert!(check_policy("ada.lovelace@example.com", &["ada.lovelace@example.com"]).is_err());
        assert!(check_policy("correct horse battery staple", &[]).is_ok());
    }
}
