//! What ztfhook knows of librdkafka's properties: the ones it owns, the
//! defaults it gives, `[kafka]`'s dotted keys flattened to librdkafka's
//! names, and librdkafka asked, one property at a time, whether it accepts
//! a value (without printing a secret).

use super::is_secret_property;

/// librdkafka properties that ztfhook owns: setting them would break the
/// at-least-once guarantee, so a config that names them is rejected.
pub(crate) const RESERVED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "ztfhook commits offsets itself, only after Pub/Sub has acknowledged them",
    ),
    (
        "enable.auto.offset.store",
        "ztfhook stores offsets itself, only after Pub/Sub has acknowledged them",
    ),
];

/// Defaults ztfhook gives librdkafka where the file does not set the property.
pub(super) const KAFKA_DEFAULTS: &[(&str, &str)] = &[
    // Kafka Connect's default too: a new group starts at the oldest alert.
    ("auto.offset.reset", "earliest"),
    // Rebalances move only the partitions that change owner (no stop-the-world).
    ("partition.assignment.strategy", "cooperative-sticky"),
    // default in librdkafka: 65536 (64 MiB) of prefetched messages, and
    // fetch responses of up to 50 MiB: cut to 16 MiB each, so that with the
    // in-flight bound (and the publisher's encoded copy of it) a backlog
    // drains in under 200 MB.
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.max.bytes", "16777216"),
    // default 1000: once the in-flight bound has let the prefetch queue
    // fill, librdkafka waited a full second before fetching again, stalling
    // the stream; 20 ms keeps it flowing.
    ("fetch.queue.backoff.ms", "20"),
    ("client.id", "ztfhook"),
    // default 300000: a new night's topic (or one matching a regular
    // expression) is found within 30 s of its creation, not 5 min.
    ("topic.metadata.refresh.interval.ms", "30000"),
];

/// Flattens `[kafka]` (dotted keys become nested tables in TOML) back into
/// librdkafka's `a.b.c` names.
pub(super) fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(&key, t, out),
            other => out.push((key, other)),
        }
    }
}

/// Asks librdkafka whether it accepts one property, without printing secrets.
pub(crate) fn check_librdkafka_property(key: &str, value: &str) -> Result<(), String> {
    let mut probe = rdkafka::ClientConfig::new();
    probe.set(key, value);
    let desc = match probe.create_native_config() {
        Ok(_) => return Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, desc, _, _)) => desc,
        Err(other) => other.to_string(),
    };
    let secret = is_secret_property(key).then_some(value);
    Err(format!(
        "librdkafka rejects it: {}",
        crate::secret::scrub(&desc, secret)
    ))
}
