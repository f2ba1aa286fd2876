//! How long a failed job waits before its next attempt: exponential backoff with full jitter
//! (uniform between zero and the capped exponential), so that jobs that failed together, say
//! against the same unavailable service, do not all come back at the same moment.

use std::time::Duration;

use rand::Rng;

/// The longest wait after attempt `attempt` (from 1): `base * 2^(attempt-1)`, at most `max`.
#[must_use]
pub fn ceiling(attempt: i32, base: Duration, max: Duration) -> Duration {
    let doublings = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0);
    if doublings >= 32 {
        return max;
    }
    base.checked_mul(1u32 << doublings).map_or(max, |d| d.min(max))
}

/// A wait after attempt `attempt`, uniform in `[0, ceiling(attempt, base, max)]`.
#[must_use]
pub fn delay(attempt: i32, base: Duration, max: Duration) -> Duration {
    let ceiling = ceiling(attempt, base, max);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(3600);

    #[test]
    fn the_ceiling_doubles_from_the_base_and_stops_at_the_cap() {
        assert_eq!(ceiling(1, BASE, MAX), Duration::from_secs(2));
        assert_eq!(ceiling(2, BASE, MAX), Duration::from_secs(4));
        assert_eq!(ceiling(5, BASE, MAX), Duration::from_secs(32));
        assert_eq!(ceiling(11, BASE, MAX), Duration::from_secs(2048));
        assert_eq!(ceiling(12, BASE, MAX), MAX);
        // Far past any doubling a u32 can hold, still the cap, never an overflow.
        assert_eq!(ceiling(40, BASE, MAX), MAX);
        assert_eq!(ceiling(1000, BASE, MAX), MAX);
        // A nonsensical attempt number is treated as the first.
        assert_eq!(ceiling(0, BASE, MAX), BASE);
    }

    #[test]
    fn delays_are_spread_over_the_whole_range_below_the_ceiling() {
        for attempt in [1, 3, 8, 30] {
            let top = ceiling(attempt, BASE, MAX);
            let delays: Vec<Duration> = (0..2000).map(|_| delay(attempt, BASE, MAX)).collect();
            assert!(delays.iter().all(|d| *d <= top), "attempt {attempt}: a delay above {top:?}");
            // Full jitter: some waits fall in the lowest tenth and some in the highest.
            assert!(delays.iter().any(|d| *d < top / 10), "attempt {attempt}: nothing near zero");
            assert!(delays.iter().any(|d| *d > top * 9 / 10), "attempt {attempt}: nothing near {top:?}");
        }
    }
}
