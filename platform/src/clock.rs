//! The time every time-dependent rule reads (session expiry and idle timeout, refresh grace,
//! lockout periods, access-token expiry), injectable so tests move time instead of sleeping.
//!
//! Processes run on [`SystemClock`]. Tests build their application with a [`TestClock`]: the
//! system time shifted by an offset they advance. It is set in code only (no setting or route
//! reaches it), so a deployed process always runs on the system clock.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where "now" comes from.
pub trait Clock: Debug + Send + Sync {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// A clock shared by every service of a process.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock shifted by an offset that only grows: time still passes as usual, and a
/// test can jump ahead by minutes or days at once.
#[derive(Debug, Default)]
pub struct TestClock {
    offset_ms: AtomicI64,
}

impl TestClock {
    /// A clock that starts at the system time.
    #[must_use]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }
}

/// The system clock, shared.
#[must_use]
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_clock_follows_the_system_clock_and_jumps_when_advanced() {
        let clock = TestClock::new();
        let before = Utc::now();
        assert!((clock.now() - before).num_seconds().abs() < 5);
        clock.advance(Duration::from_secs(7 * 24 * 3600));
        let jumped = clock.now() - Utc::now();
        assert!(jumped >= chrono::Duration::days(7) - chrono::Duration::seconds(5), "{jumped}");
        assert!(jumped <= chrono::Duration::days(7) + chrono::Duration::seconds(5), "{jumped}");
    }
}
