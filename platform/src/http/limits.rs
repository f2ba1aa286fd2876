//! Rate limits (governor): per client IP in three tiers — strict for `/api/v1/auth/*`, normal for
//! the rest of `/api/`, relaxed elsewhere — per user for authenticated API calls, and per address
//! for the mails anyone may ask for.
//!
//! A keyed limiter keeps one entry per key it has seen, and keys are chosen by clients (addresses,
//! emails), so every limiter is swept: the only way to make one, [`Limiter::swept`], also starts a
//! task that forgets the keys whose state has run out (governor's `retain_recent`) every period
//! (`CAIRN_RATE_LIMIT_SWEEP_SECS`), and ends when the limiter is dropped. The number of keys each
//! limiter holds after a sweep is the gauge `cairn_rate_limit_keys{limiter}`.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::ApiError;
use crate::settings::{RateLimit, Settings};

/// One keyed limiter, named for its gauge.
pub struct Limiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    name: &'static str,
    inner: RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl<K: Hash + Eq + Clone, C: Clock> std::fmt::Debug for Limiter<K, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").field("name", &self.name).field("keys", &self.inner.len()).finish()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Limiter<K> {
    /// A limiter allowing `rate.count` per `rate.period`, in bursts of up to `rate.count`, whose
    /// idle keys are forgotten every `sweep` (when called inside a tokio runtime).
    #[must_use]
    pub fn swept(name: &'static str, rate: RateLimit, sweep: Duration) -> Option<Arc<Self>> {
        Limiter::swept_with_clock(name, rate, sweep, DefaultClock::default())
    }
}

impl<K, C> Limiter<K, C>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Clone + Send + Sync + 'static,
{
    /// As [`Limiter::swept`], on `clock`.
    #[must_use]
    pub fn swept_with_clock(name: &'static str, rate: RateLimit, sweep: Duration, clock: C) -> Option<Arc<Self>> {
        let count = NonZeroU32::new(rate.count)?;
        let quota = Quota::with_period(rate.period / rate.count)?.allow_burst(count);
        let limiter = Arc::new(Self {
            name,
            inner: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock.clone()),
            clock,
        });
        spawn_sweeps(Arc::downgrade(&limiter), sweep);
        Some(limiter)
    }

    /// Admits a request from `key`, or says how long to wait.
    ///
    /// # Errors
    /// RATE_LIMITED with the wait in whole seconds (at least 1).
    pub fn check(&self, key: &K) -> Result<(), ApiError> {
        self.inner.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited { retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0) }
        })
    }

    /// Forgets the keys whose state has run out (a request from them now would be admitted as if
    /// they were new), and returns how many keys are left.
    pub fn sweep(&self) -> usize {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
        let keys = self.inner.len();
        metrics::gauge!("cairn_rate_limit_keys", "limiter" => self.name).set(keys as f64);
        keys
    }

    /// Keys held now.
    #[must_use]
    pub fn keys(&self) -> usize {
        self.inner.len()
    }
}

/// Sweeps `limiter` every `period` until it is dropped. Outside a tokio runtime (a one-off
/// command), nothing is started: such a process ends before its keys matter.
fn spawn_sweeps<K, C>(limiter: Weak<Limiter<K, C>>, period: Duration)
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock + Clone + Send + Sync + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let period = period.max(Duration::from_millis(10));
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(limiter) = limiter.upgrade() else { return };
            limiter.sweep();
        }
    });
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
    /// From the configured rates; each tier's limiter is swept (see the module).
    #[must_use]
    pub fn from_settings(settings: &Settings) -> Self {
        let make =
            |name, rate: Option<RateLimit>| rate.and_then(|r| Limiter::swept(name, r, settings.rate_limit_sweep));
        Self {
            auth: make("ip_auth", settings.rate_limit_auth),
            api: make("ip_api", settings.rate_limit_api),
            public: make("ip_public", settings.rate_limit_public),
        }
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
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn per_minute(count: u32) -> RateLimit {
        RateLimit { count, period: Duration::from_secs(60) }
    }

    #[test]
    fn a_limiter_admits_its_burst_then_says_how_long_to_wait() {
        let limiter: Arc<Limiter<u8>> =
            Limiter::swept("test", per_minute(3), Duration::from_secs(60)).expect("a valid rate");
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
    fn a_sweep_forgets_keys_whose_state_ran_out_and_keeps_the_others() {
        let clock = FakeRelativeClock::default();
        // 3 an hour: one request counts for 20 minutes.
        let rate = RateLimit { count: 3, period: Duration::from_secs(3600) };
        let limiter: Arc<Limiter<String, _>> =
            Limiter::swept_with_clock("test", rate, Duration::from_secs(3600), clock.clone()).expect("a valid rate");
        for i in 0..1000 {
            assert!(limiter.check(&format!("user{i}@example.com")).is_ok());
        }
        assert_eq!(limiter.sweep(), 1000, "keys still counting must stay, or the limit would reset");
        clock.advance(Duration::from_secs(45 * 60));
        assert!(limiter.check(&"fresh@example.com".to_owned()).is_ok());
        assert_eq!(limiter.sweep(), 1, "only the key used since is left");
    }

    #[tokio::test]
    async fn every_limiter_is_swept_on_its_own_until_it_is_dropped() {
        let clock = FakeRelativeClock::default();
        let limiter: Arc<Limiter<u32, _>> =
            Limiter::swept_with_clock("test", per_minute(60), Duration::from_millis(20), clock.clone())
                .expect("a valid rate");
        for key in 0..20_000 {
            assert!(limiter.check(&key).is_ok());
        }
        assert_eq!(limiter.keys(), 20_000);
        clock.advance(Duration::from_secs(10));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while limiter.keys() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the sweep never ran: {} keys", limiter.keys());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The sweeping task holds only a weak reference: dropping the limiter frees it.
        let weak = Arc::downgrade(&limiter);
        drop(limiter);
        while weak.upgrade().is_some() {
            assert!(tokio::time::Instant::now() < deadline, "the sweeping task kept the limiter alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn tiers_follow_the_path() {
        assert_eq!(Tier::of("/api/v1/auth/login"), Tier::Auth);
        assert_eq!(Tier::of("/api/v1/users"), Tier::Api);
        assert_eq!(Tier::of("/health"), Tier::Public);
    }
}
