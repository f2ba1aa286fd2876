//! Rate limits (governor): per client IP in three tiers — strict for `/api/v1/auth/*`, normal for
//! the rest of `/api/`, relaxed elsewhere — and per user for authenticated API calls.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::ApiError;
use crate::settings::{RateLimit, Settings};

/// One keyed limiter.
pub struct Limiter<K: Hash + Eq + Clone> {
    inner: RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("keys", &self.inner.len()).finish()
    }
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter allowing `rate.count` per `rate.period`, in bursts of up to `rate.count`.
    #[must_use]
    pub fn new(rate: RateLimit) -> Option<Self> {
        let count = NonZeroU32::new(rate.count)?;
        let quota = Quota::with_period(rate.period / rate.count)?.allow_burst(count);
        Some(Self { inner: RateLimiter::keyed(quota) })
    }

    /// Admits a request from `key`, or says how long to wait.
    ///
    /// # Errors
    /// RATE_LIMITED with the wait in whole seconds (at least 1).
    pub fn check(&self, key: &K) -> Result<(), ApiError> {
        self.inner.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::RateLimited { retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0) }
        })
    }

    fn forget_idle(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

/// Which tier a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// `/api/v1/auth/*`: strict.
    Auth,
    /// The rest of `/api/`: normal.
    Api,
    /// Everything else: relaxed.
    Public,
}

impl Tier {
    /// The tier of `path`.
    #[must_use]
    pub fn of(path: &str) -> Self {
        if path.starts_with("/api/v1/auth/") {
            Self::Auth
        } else if path.starts_with("/api/") {
            Self::Api
        } else {
            Self::Public
        }
    }
}

/// The per-IP limiters of the three tiers.
#[derive(Debug, Clone)]
pub struct IpLimits {
    auth: Option<Arc<Limiter<IpAddr>>>,
    api: Option<Arc<Limiter<IpAddr>>>,
    public: Option<Arc<Limiter<IpAddr>>>,
}

impl IpLimits {
    /// From the configured rates; spawns a task that forgets idle clients.
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        let make = |rate: Option<RateLimit>| rate.and_then(Limiter::new).map(Arc::new);
        let limits = Self {
            auth: make(settings.rate_limit_auth),
            api: make(settings.rate_limit_api),
            public: make(settings.rate_limit_public),
        };
        let sweep = limits.clone();
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    for limiter in [&sweep.auth, &sweep.api, &sweep.public].into_iter().flatten() {
                        limiter.forget_idle();
                    }
                }
            });
        }
        limits
    }

    /// Admits a request to `path` from `ip`.
    ///
    /// # Errors
    /// RATE_LIMITED.
    pub fn check(&self, path: &str, ip: IpAddr) -> Result<(), ApiError> {
        let limiter = match Tier::of(path) {
            Tier::Auth => &self.auth,
            Tier::Api => &self.api,
            Tier::Public => &self.public,
        };
        limiter.as_ref().map_or(Ok(()), |l| l.check(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limiter_admits_its_burst_then_says_how_long_to_wait() {
        let limiter: Limiter<u8> = Limiter::new(RateLimit { count: 3, period: Duration::from_secs(60) })
            .unwrap_or_else(|| Limiter { inner: RateLimiter::keyed(Quota::per_minute(NonZeroU32::MIN)) });
        for _ in 0..3 {
            assert!(limiter.check(&1).is_ok());
        }
        match limiter.check(&1) {
            Err(ApiError::RateLimited { retry_after_s }) => assert!((1..=20).contains(&retry_after_s)),
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        }
        assert!(limiter.check(&2).is_ok(), "limits are per key");
    }

    #[test]
    fn tiers_follow_the_path() {
        assert_eq!(Tier::of("/api/v1/auth/login"), Tier::Auth);
        assert_eq!(Tier::of("/api/v1/users"), Tier::Api);
        assert_eq!(Tier::of("/health"), Tier::Public);
    }
}
