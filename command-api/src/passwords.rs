//! Password hashing: argon2id (m = 19 MiB, t = 2, p = 1) on a small pool of dedicated threads,
//! so sign-ins cannot starve other requests. Dedicated threads rather than tokio's blocking pool:
//! each thread that ever hashed keeps its 19 MiB in its malloc arena, and the blocking pool grows
//! to hundreds of threads, which under load meant hundreds of MiB of resident memory.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password, in characters (bounds hashing cost).
pub const MAX_PASSWORD_CHARS: usize = 128;

type Job = Box<dyn FnOnce() + Send>;

/// The bounded hashing pool.
#[derive(Clone)]
pub struct Passwords {
    jobs: Arc<std::sync::Mutex<mpsc::Sender<Job>>>,
    threads: usize,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords").field("threads", &self.threads).finish()
    }
}

fn argon2() -> Argon2<'static> {
    // OWASP's recommended argon2id parameters; Params::new only fails for out-of-range values.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
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
    /// A pool running at most `concurrency` hashes at once.
    #[must_use]
    pub fn new(concurrency: usize) -> Self {
        let threads = concurrency.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
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
        Self { jobs: Arc::new(std::sync::Mutex::new(tx)), threads }
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(work());
        });
        self.jobs
            .lock()
            .map_err(|_| anyhow::anyhow!("password pool poisoned"))?
            .send(job)
            .map_err(|_| anyhow::anyhow!("password pool stopped"))?;
        Ok(result.await?)
    }

    /// Hashes `password` into a PHC string.
    ///
    /// # Errors
    /// When hashing fails (it does not for valid parameters).
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await?
        .map_err(|e| anyhow::anyhow!("password hashing failed: {e}"))
    }

    /// Verifies `password` against `hash`; with no hash (unknown account) it verifies against a
    /// dummy hash so the answer takes as long either way.
    ///
    /// # Errors
    /// When the blocking pool fails.
    pub async fn verify(&self, password: String, hash: Option<String>) -> anyhow::Result<bool> {
        let known = hash.is_some();
        let hash = match hash {
            Some(h) => h,
            None => dummy_hash().to_owned(),
        };
        let matches = self
            .run(move || {
                PasswordHash::new(&hash)
                    .is_ok_and(|parsed| argon2().verify_password(password.as_bytes(), &parsed).is_ok())
            })
            .await?;
        Ok(known && matches)
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2()
            .hash_password(uuid::Uuid::new_v4().to_string().as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
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

    #[test]
    fn length_and_strength_policy() {
        assert!(check_policy("short", &[]).is_err());
        assert!(check_policy(&"x".repeat(129), &[]).is_err());
        assert!(check_policy("password123", &[]).is_err_and(|e| e.contains("too weak")));
        assert!(check_policy("ada.lovelace@example.com", &["ada.lovelace@example.com"]).is_err());
        assert!(check_policy("correct horse battery staple", &[]).is_ok());
    }
}
