//! Counters, in one place; the periodic stats line; and their Prometheus
//! text form for the `/metrics` endpoint.
//!
//! Most counters have a single writer (the consumer thread, which sees every
//! registration and every acknowledgement), so the atomics are uncontended;
//! per-destination counters and partition lags sit behind short mutexes,
//! touched once per publish and once per librdkafka statistics report.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A histogram with fixed bucket bounds (seconds), lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// Bucket bounds for publish latency, in seconds.
pub const PUBLISH_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Bucket bounds for hook time, in seconds.
pub const HOOK_BOUNDS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.01, 0.1,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// What was published to one Pub/Sub topic.
#[derive(Debug, Default, Clone, Copy)]
pub struct TopicCounts {
    pub messages: u64,
    pub bytes: u64,
}

/// Process-wide counters.
#[derive(Debug)]
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
    /// Bytes of the extra copies of fanned-out messages ([`crate::sink::copies`]).
    pub in_flight_copy_bytes: AtomicU64,
    /// Workers waiting for room in that bound: the consumer loop pauses meanwhile.
    pub copy_waiters: AtomicU64,
    /// Sum of consumer lag over assigned partitions, from librdkafka statistics; -1 if unknown.
    pub lag: AtomicI64,
    /// Consumer lag per (topic, partition), from the latest statistics.
    pub partition_lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Messages and bytes accepted by Pub/Sub, per destination topic.
    pub per_topic: Mutex<HashMap<String, TopicCounts>>,
    /// From the first publish attempt to Pub/Sub's acknowledgement.
    pub publish_latency: Histogram,
    /// From the first write attempt to Cloud Storage's answer (created, or
    /// there already).
    pub object_latency: Histogram,
    /// Time in the hook, per message.
    pub hook_time: Histogram,
    pub assigned_partitions: AtomicI64,
    /// Commits librdkafka reported as failed (each is retried).
    pub commit_failures: AtomicU64,
    /// Consumer errors skipped under `pipeline.kafka_errors = "skip"`.
    pub consumer_errors_skipped: AtomicU64,
    /// Kafka records with a null value (skipped or published).
    pub tombstones: AtomicU64,
    /// Messages Pub/Sub refused alone (they took the error policy).
    pub refused: AtomicU64,
    /// Panics caught in a hook (the hook was rebuilt).
    pub hook_panics: AtomicU64,
    /// How long the oldest unacknowledged message has waited, in ms.
    pub oldest_unacknowledged_ms: AtomicU64,
    /// Why the consumer loop thinks a partition is stalled, if it does.
    pub stalled: Mutex<Option<String>>,
    /// Milliseconds since start when publishing began to fail without a
    /// success since; 0 when the last attempt succeeded.
    pub failing_since_ms: AtomicU64,
    pub started: Instant,
    /// Objects created in Cloud Storage.
    pub objects_created: AtomicU64,
    /// Object writes that found the object there already (redeliveries).
    pub objects_existing: AtomicU64,
    pub object_bytes: AtomicU64,
    /// Messages converted to the BigQuery JSON form.
    pub json_converted: AtomicU64,
    /// As `failing_since_ms`, for Cloud Storage writes (kept apart, so that
    /// objects written do not hide a Pub/Sub outage, nor the reverse).
    pub storage_failing_since_ms: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            consumed: AtomicU64::new(0),
            consumed_bytes: AtomicU64::new(0),
            published: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            omitted_attributes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            hook_errors: AtomicU64::new(0),
            in_flight_messages: AtomicU64::new(0),
            in_flight_bytes: AtomicU64::new(0),
            in_flight_copy_bytes: AtomicU64::new(0),
            copy_waiters: AtomicU64::new(0),
            lag: AtomicI64::new(-1),
            partition_lag: Mutex::new(BTreeMap::new()),
            per_topic: Mutex::new(HashMap::new()),
            publish_latency: Histogram::new(PUBLISH_BOUNDS),
            object_latency: Histogram::new(PUBLISH_BOUNDS),
            hook_time: Histogram::new(HOOK_BOUNDS),
            assigned_partitions: AtomicI64::new(0),
            commit_failures: AtomicU64::new(0),
            consumer_errors_skipped: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            hook_panics: AtomicU64::new(0),
            oldest_unacknowledged_ms: AtomicU64::new(0),
            stalled: Mutex::new(None),
            failing_since_ms: AtomicU64::new(0),
            started: Instant::now(),
            objects_created: AtomicU64::new(0),
            objects_existing: AtomicU64::new(0),
            object_bytes: AtomicU64::new(0),
            json_converted: AtomicU64::new(0),
            storage_failing_since_ms: AtomicU64::new(0),
        }
    }
}

/// Destination topics counted one by one in `/metrics`; the rest are
/// counted together as [`OTHER_TOPICS`].
pub const MAX_TOPIC_SERIES: usize = 512;
/// The series of the topics past [`MAX_TOPIC_SERIES`].
pub const OTHER_TOPICS: &str = "(other topics)";

/// How long publishing may fail without a success before `/healthz` says so.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(30);

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    /// Records a publish that Pub/Sub accepted.
    pub fn published_to(&self, topic: &str, bytes: usize, latency: Duration) {
        self.publish_latency.observe(latency);
        self.failing_since_ms.store(0, Relaxed);
        let mut map = self.per_topic.lock().unwrap_or_else(|e| e.into_inner());
        // No allocation once a topic has its series; past MAX_TOPIC_SERIES
        // topics, the rest share one (a hook naming a topic per message must
        // not grow /metrics without end).
        let c = match map.get_mut(topic) {
            Some(c) => c,
            None => {
                let name = if map.len() < MAX_TOPIC_SERIES {
                    topic
                } else {
                    OTHER_TOPICS
                };
                map.entry(name.to_string()).or_default()
            }
        };
        c.messages += 1;
        c.bytes += bytes as u64;
    }

    /// Records an object written (or found there already) in Cloud Storage.
    pub fn object_written(&self, bytes: usize, latency: Duration, existed: bool) {
        self.object_latency.observe(latency);
        self.storage_failing_since_ms.store(0, Relaxed);
        if existed {
            self.objects_existing.fetch_add(1, Relaxed);
        } else {
            self.objects_created.fetch_add(1, Relaxed);
            self.object_bytes.fetch_add(bytes as u64, Relaxed);
        }
    }

    /// Records a failed object write.
    pub fn object_failed(&self) {
        self.failing_from_now(&self.storage_failing_since_ms);
    }

    /// Records a failed publish attempt.
    pub fn publish_failed(&self) {
        self.failing_from_now(&self.failing_since_ms);
    }

    /// Marks `since` as failing from now, unless it is failing already.
    fn failing_from_now(&self, since: &AtomicU64) {
        let now = self.started.elapsed().as_millis().max(1) as u64;
        let _ = since.compare_exchange(0, now, Relaxed, Relaxed);
    }

    /// `Ok` when partitions are assigned and publishing is not failing for
    /// longer than [`UNHEALTHY_AFTER`]; otherwise why not.
    ///
    /// # Errors
    /// The reason, for the `/healthz` body.
    pub fn health(&self) -> Result<(), String> {
        if self.assigned_partitions.load(Relaxed) <= 0 {
            return Err("no Kafka partitions assigned".into());
        }
        if let Some(why) = self
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(format!("stalled: {why}"));
        }
        for (since, what) in [
            (&self.failing_since_ms, "publishing to Pub/Sub"),
            (&self.storage_failing_since_ms, "writing to Cloud Storage"),
        ] {
            let since = since.load(Relaxed);
            if since > 0 {
                let failing = self
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since));
                if failing >= UNHEALTHY_AFTER {
                    return Err(format!(
                        "{what} has failed for {}s without a success",
                        failing.as_secs()
                    ));
                }
            }
        }
        Ok(())
    }

    /// All metrics in Prometheus' text format. `reloads` are the script's
    /// (swapped in, rejected).
    pub fn render(&self, reloads: (u64, u64)) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "ztfhook_consumed_messages_total",
            "Messages consumed from Kafka.",
            self.consumed.load(Relaxed),
        );
        counter(
            "ztfhook_consumed_bytes_total",
            "Payload bytes consumed from Kafka.",
            self.consumed_bytes.load(Relaxed),
        );
        counter(
            "ztfhook_dropped_messages_total",
            "Messages the hook dropped on purpose.",
            self.dropped.load(Relaxed),
        );
        counter(
            "ztfhook_dead_lettered_messages_total",
            "Messages sent to the dead-letter topic.",
            self.dead_lettered.load(Relaxed),
        );
        counter(
            "ztfhook_failed_messages_total",
            "Messages that failed permanently (the bridge stops).",
            self.failed.load(Relaxed),
        );
        counter(
            "ztfhook_objects_created_total",
            "Objects created in Cloud Storage.",
            self.objects_created.load(Relaxed),
        );
        counter(
            "ztfhook_objects_existing_total",
            "Object writes that found the object there already (redeliveries; counted as written).",
            self.objects_existing.load(Relaxed),
        );
        counter(
            "ztfhook_object_bytes_total",
            "Payload bytes written to Cloud Storage.",
            self.object_bytes.load(Relaxed),
        );
        counter(
            "ztfhook_json_converted_total",
            "Messages converted to the BigQuery JSON form.",
            self.json_converted.load(Relaxed),
        );
        counter(
            "ztfhook_publish_retries_total",
            "Publish attempts retried after a transient error.",
            self.retries.load(Relaxed),
        );
        counter(
            "ztfhook_hook_errors_total",
            "Messages the hook failed on (handled by hook.on_error).",
            self.hook_errors.load(Relaxed),
        );
        counter(
            "ztfhook_omitted_attributes_total",
            "Kafka key or header attributes left out for breaking Pub/Sub limits.",
            self.omitted_attributes.load(Relaxed),
        );
        counter(
            "ztfhook_commits_total",
            "Offset commits made.",
            self.commits.load(Relaxed),
        );
        counter(
            "ztfhook_commit_failures_total",
            "Offset commits librdkafka reported as failed (each is retried).",
            self.commit_failures.load(Relaxed),
        );
        counter(
            "ztfhook_kafka_errors_skipped_total",
            "Consumer errors skipped and dead-lettered (pipeline.kafka_errors = \"skip\").",
            self.consumer_errors_skipped.load(Relaxed),
        );
        counter(
            "ztfhook_tombstones_total",
            "Kafka records with a null value (skipped or published, pipeline.tombstones).",
            self.tombstones.load(Relaxed),
        );
        counter(
            "ztfhook_refused_messages_total",
            "Messages Pub/Sub (or ztfhook's check before it) refused alone; each took the error policy.",
            self.refused.load(Relaxed),
        );
        counter(
            "ztfhook_hook_panics_total",
            "Panics caught in a hook or the decoder (the message took hook.on_error; the hook was rebuilt).",
            self.hook_panics.load(Relaxed),
        );
        counter(
            "ztfhook_script_reloads_total",
            "Hook scripts swapped in while running.",
            reloads.0,
        );
        counter(
            "ztfhook_script_reloads_rejected_total",
            "Hook script edits rejected (the previous script kept running).",
            reloads.1,
        );
        {
            let map = self.per_topic.lock().unwrap_or_else(|e| e.into_inner());
            let mut topics: Vec<_> = map.iter().collect();
            topics.sort_by(|a, b| a.0.cmp(b.0));
            let _ = writeln!(out, "# HELP ztfhook_published_messages_total Messages Pub/Sub accepted, per destination topic.\n# TYPE ztfhook_published_messages_total counter");
            for (t, c) in &topics {
                let _ = writeln!(
                    out,
                    "ztfhook_published_messages_total{{topic=\"{t}\"}} {}",
                    c.messages
                );
            }
            let _ = writeln!(out, "# HELP ztfhook_published_bytes_total Payload bytes Pub/Sub accepted, per destination topic.\n# TYPE ztfhook_published_bytes_total counter");
            for (t, c) in &topics {
                let _ = writeln!(
                    out,
                    "ztfhook_published_bytes_total{{topic=\"{t}\"}} {}",
                    c.bytes
                );
            }
        }
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "ztfhook_in_flight_messages",
            "Messages consumed and not yet acknowledged by Pub/Sub.",
            self.in_flight_messages.load(Relaxed) as i64,
        );
        gauge(
            "ztfhook_in_flight_bytes",
            "Payload bytes consumed and not yet acknowledged by Pub/Sub.",
            self.in_flight_bytes.load(Relaxed) as i64,
        );
        gauge(
            "ztfhook_in_flight_copy_bytes",
            "Bytes held beyond each payload by messages on their way: a copy per destination after the first, and the JSON form.",
            self.in_flight_copy_bytes.load(Relaxed) as i64,
        );
        gauge(
            "ztfhook_assigned_partitions",
            "Kafka partitions assigned to this instance.",
            self.assigned_partitions.load(Relaxed),
        );
        gauge(
            "ztfhook_oldest_unacknowledged_seconds",
            "How long the oldest message not yet acknowledged by Pub/Sub has waited (a stall shows here).",
            (self.oldest_unacknowledged_ms.load(Relaxed) / 1000) as i64,
        );
        gauge(
            "ztfhook_healthy",
            "1 when /healthz answers 200.",
            i64::from(self.health().is_ok()),
        );
        {
            let lags = self.partition_lag.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "# HELP ztfhook_consumer_lag_messages Messages behind the end of each assigned partition (librdkafka statistics).\n# TYPE ztfhook_consumer_lag_messages gauge");
            for ((t, p), lag) in lags.iter() {
                let _ = writeln!(
                    out,
                    "ztfhook_consumer_lag_messages{{topic=\"{t}\",partition=\"{p}\"}} {lag}"
                );
            }
        }
        self.publish_latency.render(
            &mut out,
            "ztfhook_publish_latency_seconds",
            "From the first publish attempt to Pub/Sub's acknowledgement.",
        );
        self.object_latency.render(
            &mut out,
            "ztfhook_object_write_latency_seconds",
            "From the first write attempt to Cloud Storage's answer (created, or there already).",
        );
        self.hook_time.render(
            &mut out,
            "ztfhook_hook_seconds",
            "Time in the hook per message.",
        );
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_topic_series_are_bounded_and_the_rest_are_counted_together() {
        let m = Metrics::new();
        for i in 0..MAX_TOPIC_SERIES + 100 {
            m.published_to(&format!("topic-{i}"), 10, Duration::ZERO);
        }
        m.published_to("topic-0", 10, Duration::ZERO);
        let map = m.per_topic.lock().unwrap();
        assert_eq!(map.len(), MAX_TOPIC_SERIES + 1);
        assert_eq!(map[OTHER_TOPICS].messages, 100);
        assert_eq!(map["topic-0"].messages, 2);
    }

    #[test]
    fn cloud_storage_failing_is_unhealthy_even_while_pubsub_accepts() {
        let m = Metrics {
            started: Instant::now() - Duration::from_secs(120),
            ..Metrics::default()
        };
        m.assigned_partitions.store(1, Relaxed);
        m.storage_failing_since_ms.store(1, Relaxed);
        m.published_to("t", 10, Duration::ZERO);
        let why = m.health().unwrap_err();
        assert!(why.contains("Cloud Storage"), "{why}");
        m.object_written(10, Duration::ZERO, false);
        assert!(m.health().is_ok());
    }
}
