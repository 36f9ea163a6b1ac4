//! Counters, in one place, and the periodic stats line.
//!
//! Most counters have a single writer (the consumer thread, which sees every
//! registration and every acknowledgement), so the atomics are uncontended.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub consumed: AtomicU64,
    pub consumed_bytes: AtomicU64,
    pub published: AtomicU64,
    pub published_bytes: AtomicU64,
    /// Dropped on purpose by the hook.
    pub dropped: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Permanently failed (the bridge stops on these).
    pub failed: AtomicU64,
    /// Publish attempts retried after a transient error.
    pub retries: AtomicU64,
    /// Kafka key/header attributes left out for breaking Pub/Sub limits.
    pub omitted_attributes: AtomicU64,
    pub commits: AtomicU64,
    /// Messages the hook failed on (script error, invalid decision).
    pub hook_errors: AtomicU64,
    pub in_flight_messages: AtomicU64,
    pub in_flight_bytes: AtomicU64,
    /// Sum of consumer lag over assigned partitions, from librdkafka statistics; -1 if unknown.
    pub lag: AtomicI64,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics::default();
        m.lag.store(-1, Relaxed);
        m
    }

    fn snapshot(&self) -> [u64; 4] {
        [
            self.consumed.load(Relaxed),
            self.consumed_bytes.load(Relaxed),
            self.published.load(Relaxed),
            self.published_bytes.load(Relaxed),
        ]
    }
}

/// Produces the one-line stats log at a steady interval.
pub struct StatsLine {
    last: [u64; 4],
    at: Instant,
}

impl StatsLine {
    pub fn new(metrics: &Metrics) -> Self {
        StatsLine {
            last: metrics.snapshot(),
            at: Instant::now(),
        }
    }

    /// Whether `interval` has passed since the last line.
    pub fn due(&self, interval: Duration) -> bool {
        !interval.is_zero() && self.at.elapsed() >= interval
    }

    /// Logs one line: rates since the last line, totals, lag and in-flight.
    pub fn log(&mut self, m: &Metrics) {
        let now = m.snapshot();
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let rate = |i: usize| (now[i] - self.last[i]) as f64 / secs;
        let lag = m.lag.load(Relaxed);
        tracing::info!(
            "stats: consumed {:.0} msg/s {:.2} MB/s, published {:.0} msg/s {:.2} MB/s; totals consumed {} published {} dropped {} dead-lettered {} failed {} retries {} hook errors {}; in flight {} msgs {:.1} MB; lag {}",
            rate(0),
            rate(1) / 1e6,
            rate(2),
            rate(3) / 1e6,
            now[0],
            now[2],
            m.dropped.load(Relaxed),
            m.dead_lettered.load(Relaxed),
            m.failed.load(Relaxed),
            m.retries.load(Relaxed),
            m.hook_errors.load(Relaxed),
            m.in_flight_messages.load(Relaxed),
            m.in_flight_bytes.load(Relaxed) as f64 / 1e6,
            if lag < 0 { "unknown".to_string() } else { lag.to_string() },
        );
        self.last = now;
        self.at = Instant::now();
    }
}
