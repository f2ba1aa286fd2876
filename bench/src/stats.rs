//! Latency percentiles: every duration is kept, sorted once, and read by nearest rank. Runs are
//! short enough (at most a few hundred thousand samples) that this is exact and cheap.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of one set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (in any order); `None` when there are none.
    #[must_use]
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: Duration = sorted.iter().sum();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Some(Self {
            count: sorted.len(),
            p50_ms: ms(nearest_rank(&sorted, 50.0)),
            p95_ms: ms(nearest_rank(&sorted, 95.0)),
            p99_ms: ms(nearest_rank(&sorted, 99.0)),
            mean_ms: ms(total) / sorted.len() as f64,
            max_ms: ms(sorted[sorted.len() - 1]),
        })
    }
}

/// The `p`th percentile of `sorted` (ascending, not empty) by the nearest-rank method.
fn nearest_rank(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 1e-9);
        assert!((s.p95_ms - 95.0).abs() < 1e-9);
        assert!((s.p99_ms - 99.0).abs() < 1e-9);
        assert!((s.max_ms - 100.0).abs() < 1e-9);
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
        assert!(Summary::of(&[]).is_none());
        let one = Summary::of(&[Duration::from_millis(7)]).unwrap();
        assert!((one.p99_ms - 7.0).abs() < 1e-9);
    }
}
