//! Raw sections -> typed values, one function per section; every error
//! names the key and where it is in the file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::env::{env_lookup, expand_env};
use super::librdkafka::{
    check_librdkafka_property, flatten, KAFKA_DEFAULTS, RESERVED_KAFKA_PROPERTIES,
};
use super::names::{check_kafka_topic, TopicName};
use super::raw::*;
use super::spans::Locator;
use super::*;

/// `[kafka]`: librdkafka's properties (each probed), defaults, topics.
pub(super) fn validate_kafka(at: &Locator<'_>, table: toml::Table) -> Result<Kafka, ConfigError> {
    let mut entries = Vec::new();
    flatten("", table, &mut entries);
    let mut topics = None;
    let mut previous_nights = 0;
    let mut properties = BTreeMap::new();
    for (key, value) in entries {
        let span = || at.kafka_key_span(&key);
        let full = format!("kafka.{key}");
        if key == "previous_nights" {
            previous_nights = match value {
                toml::Value::Integer(n) if (0..=30).contains(&n) => n as u32,
                _ => {
                    return at.invalid(
                        span(),
                        &full,
                        "expected a whole number of nights from 0 to 30",
                    )
                }
            };
            continue;
        }
        if key == "topics" {
            let toml::Value::Array(items) = value else {
                return at.invalid(span(), &full, "expected a list of topic names, e.g. [\"ztf_20261125_programid1\"] or [\"^ztf_.*\"]");
            };
            let mut list = Vec::new();
            for item in items {
                let toml::Value::String(name) = item else {
                    return at.invalid(span(), &full, "every topic must be a string");
                };
                let name =
                    expand_env(&name, &env_lookup).or_else(|m| at.invalid(span(), &full, m))?;
                check_kafka_topic(&name).or_else(|m| at.invalid(span(), &full, m))?;
                list.push(name);
            }
            if list.is_empty() {
                return at.invalid(span(), &full, "at least one topic is needed");
            }
            topics = Some(list);
            continue;
        }
        if let Some((_, why)) = RESERVED_KAFKA_PROPERTIES.iter().find(|(k, _)| *k == key) {
            return at.invalid(span(), &full, format!("cannot be set: {why}"));
        }
        let text = match value {
            toml::Value::String(s) => {
                expand_env(&s, &env_lookup).or_else(|m| at.invalid(span(), &full, m))?
            }
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s),
                        _ => {
                            return at.invalid(span(), &full, "a list value must hold strings only")
                        }
                    }
                }
                parts.join(",")
            }
            toml::Value::Datetime(_) | toml::Value::Table(_) => {
                return at.invalid(span(), &full, "expected a string, number or boolean");
            }
        };
        check_librdkafka_property(&key, &text).or_else(|m| at.invalid(span(), &full, m))?;
        properties.insert(key, text);
    }
    let Some(topics) = topics else {
        return at.invalid(
            0..0,
            "kafka.topics",
            "missing: list the Kafka topics to consume",
        );
    };
    for required in ["bootstrap.servers", "group.id"] {
        if properties.get(required).is_none_or(|v| v.trim().is_empty()) {
            return at.invalid(
                0..0,
                &format!("kafka.{required}"),
                "missing: this librdkafka property is required",
            );
        }
    }
    for (k, v) in KAFKA_DEFAULTS {
        properties
            .entry(k.to_string())
            .or_insert_with(|| v.to_string());
    }
    Ok(Kafka {
        properties,
        topics,
        previous_nights,
    })
}

pub(super) fn validate_pubsub(
    at: &Locator<'_>,
    mut raw: PubsubConfig,
) -> Result<Pubsub, ConfigError> {
    expand_fields(
        at,
        [
            ("pubsub.project", Some(&mut raw.project)),
            ("pubsub.topic", Some(&mut raw.topic)),
            ("pubsub.dead_letter_topic", raw.dead_letter_topic.as_mut()),
            ("pubsub.endpoint", raw.endpoint.as_mut()),
        ],
    )?;
    let project = raw.project.get_ref().trim().to_string();
    if project.is_empty() || project.contains('/') {
        return at.invalid(
            raw.project.span(),
            "pubsub.project",
            "expected a Google Cloud project id",
        );
    }
    let topic = TopicName::parse(&project, raw.topic.get_ref())
        .or_else(|m| at.invalid(raw.topic.span(), "pubsub.topic", m))?;
    let dead_letter_topic = match raw.dead_letter_topic {
        Some(t) => Some(
            TopicName::parse(&project, t.get_ref())
                .or_else(|m| at.invalid(t.span(), "pubsub.dead_letter_topic", m))?,
        ),
        None => None,
    };
    let endpoint = endpoint_url(
        at,
        raw.endpoint.as_ref(),
        "pubsub.endpoint",
        "https://pubsub.googleapis.com",
    )?;
    let ordering_key = match raw.ordering_key {
        None => OrderingKeySource::None,
        Some(k) => match k.get_ref().as_str() {
            "none" => OrderingKeySource::None,
            "key" => OrderingKeySource::Key,
            "partition" => OrderingKeySource::Partition,
            other => {
                return at.invalid(
                    k.span(),
                    "pubsub.ordering_key",
                    format!("`{other}` is not a source: none, key or partition"),
                )
            }
        },
    };
    Ok(Pubsub {
        ordering_key,
        project,
        topic,
        dead_letter_topic,
        endpoint,
    })
}

pub(super) fn validate_alerts(
    at: &Locator<'_>,
    raw: AlertsConfig,
) -> Result<crate::alert::SchemaSources, ConfigError> {
    let directory = match raw.schema_dir {
        Some(d) => {
            let path = PathBuf::from(
                expand_env(d.get_ref(), &env_lookup)
                    .or_else(|m| at.invalid(d.span(), "alerts.schema_dir", m))?,
            );
            if !path.is_dir() {
                return at.invalid(
                    d.span(),
                    "alerts.schema_dir",
                    format!("`{}` is not a directory", path.display()),
                );
            }
            Some(path)
        }
        None => None,
    };
    let registry = match raw.schema_registry {
        Some(u) => {
            let url = expand_env(u.get_ref(), &env_lookup)
                .or_else(|m| at.invalid(u.span(), "alerts.schema_registry", m))?;
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return at.invalid(
                    u.span(),
                    "alerts.schema_registry",
                    format!("`{url}` is not an http:// or https:// URL"),
                );
            }
            Some(url)
        }
        None => None,
    };
    Ok(crate::alert::SchemaSources {
        directory,
        registry,
    })
}

pub(super) fn validate_hook(
    at: &Locator<'_>,
    raw: HookConfig,
    has_dead_letter_topic: bool,
) -> Result<HookOptions, ConfigError> {
    let script = match raw.script {
        Some(s) => {
            let path = PathBuf::from(
                expand_env(s.get_ref(), &env_lookup)
                    .or_else(|m| at.invalid(s.span(), "hook.script", m))?,
            );
            crate::hook::script::Language::of(&path)
                .or_else(|m| at.invalid(s.span(), "hook.script", m))?;
            Some(path)
        }
        None => None,
    };
    let on_error = match raw.on_error {
        None => ErrorPolicy::Passthrough,
        Some(p) => match p.get_ref().as_str() {
            "passthrough" => ErrorPolicy::Passthrough,
            "deadletter" if has_dead_letter_topic => ErrorPolicy::DeadLetter,
            "deadletter" => {
                return at.invalid(
                    p.span(),
                    "hook.on_error",
                    "`deadletter` needs pubsub.dead_letter_topic",
                )
            }
            "drop" => ErrorPolicy::Drop,
            "stop" => ErrorPolicy::Stop,
            other => {
                return at.invalid(
                    p.span(),
                    "hook.on_error",
                    format!("`{other}` is not a policy: passthrough, deadletter, drop or stop"),
                )
            }
        },
    };
    let mut limits = crate::hook::Limits::default();
    if let Some(ops) = raw.max_operations {
        limits.max_operations = in_range(
            at,
            &ops,
            "hook.max_operations",
            1_000..=1_000_000_000,
            "operations per script call",
        )? as u64;
    }
    if let Some(mb) = raw.max_memory_mb {
        limits.max_memory_bytes = (in_range(
            at,
            &mb,
            "hook.max_memory_mb",
            1..=4096,
            "MiB a script may hold",
        )? as usize)
            << 20;
    }
    Ok(HookOptions {
        script,
        on_error,
        limits,
    })
}

pub(super) fn in_range(
    at: &Locator<'_>,
    value: &Spanned<i64>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
    why: &str,
) -> Result<i64, ConfigError> {
    let v = *value.get_ref();
    if range.contains(&v) {
        Ok(v)
    } else {
        at.invalid(
            value.span(),
            key,
            format!(
                "{v} is out of range {}..={} ({why})",
                range.start(),
                range.end()
            ),
        )
    }
}

pub(super) fn validate_batching(
    at: &Locator<'_>,
    raw: BatchingConfig,
) -> Result<Batching, ConfigError> {
    let max_messages = in_range(
        at,
        &raw.max_messages,
        "batching.max_messages",
        1..=i64::from(MAX_BATCH_MESSAGES),
        "Pub/Sub takes at most 1000 messages per request",
    )?;
    let max_bytes = in_range(
        at,
        &raw.max_bytes,
        "batching.max_bytes",
        1..=i64::from(MAX_BATCH_BYTES),
        "Pub/Sub takes at most 10,000,000 bytes per request, framing included",
    )?;
    let max_delay_ms = in_range(
        at,
        &raw.max_delay_ms,
        "batching.max_delay_ms",
        0..=60_000,
        "milliseconds a message may wait for its batch to fill",
    )?;
    Ok(Batching {
        max_messages: max_messages as u32,
        max_bytes: max_bytes as u32,
        max_delay: Duration::from_millis(max_delay_ms as u64),
    })
}

pub(super) fn validate_pipeline(
    at: &Locator<'_>,
    raw: PipelineConfig,
) -> Result<Pipeline, ConfigError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as i64;
    let get = |v: Option<Spanned<i64>>, key: &str, default: i64, range, why: &str| match v {
        Some(v) => in_range(at, &v, key, range, why),
        None => Ok(default),
    };
    // One core is left to the consumer loop and the publishers' runtime: on
    // two cores one worker keeps the pass-through's rate at 7-9% less CPU
    // than two (benches/throughput.sh, hotpath).
    let workers = get(
        raw.workers,
        "pipeline.workers",
        (cores - 1).max(1),
        1..=256,
        "worker threads",
    )?;
    let max_in_flight_messages = get(
        raw.max_in_flight_messages,
        "pipeline.max_in_flight_messages",
        10_000,
        1..=10_000_000,
        "messages consumed but not yet acknowledged by Pub/Sub",
    )?;
    let max_in_flight_bytes = get(
        raw.max_in_flight_bytes,
        "pipeline.max_in_flight_bytes",
        48_000_000,
        1_000_000..=64_000_000_000,
        "payload bytes consumed but not yet acknowledged by Pub/Sub",
    )?;
    let commit_interval_ms = get(
        raw.commit_interval_ms,
        "pipeline.commit_interval_ms",
        100,
        10..=600_000,
        "the least milliseconds between two offset commits (a commit follows every advance of a safe offset)",
    )?;
    let shutdown_timeout_ms = get(
        raw.shutdown_timeout_ms,
        "pipeline.shutdown_timeout_ms",
        30_000,
        0..=3_600_000,
        "milliseconds to drain in-flight messages at shutdown",
    )?;
    let stats_interval_ms = get(
        raw.stats_interval_ms,
        "pipeline.stats_interval_ms",
        10_000,
        0..=3_600_000,
        "milliseconds between stats lines, 0 for none",
    )?;
    let discard = match raw.sink {
        None => false,
        Some(s) => match s.get_ref().as_str() {
            "pubsub" => false,
            "discard" => true,
            other => {
                return at.invalid(
                    s.span(),
                    "pipeline.sink",
                    format!("`{other}` is not a sink: pubsub or discard"),
                )
            }
        },
    };
    let stall_after_ms = get(
        raw.stall_after_ms,
        "pipeline.stall_after_ms",
        120_000,
        1_000..=86_400_000,
        "milliseconds a message may wait for Pub/Sub before /healthz says stalled",
    )?;
    let kafka_errors = match raw.kafka_errors {
        None => KafkaErrorPolicy::Stop,
        Some(s) => match s.get_ref().as_str() {
            "stop" => KafkaErrorPolicy::Stop,
            "skip" => KafkaErrorPolicy::Skip,
            other => {
                return at.invalid(
                    s.span(),
                    "pipeline.kafka_errors",
                    format!("`{other}` is not a policy: stop or skip"),
                )
            }
        },
    };
    let tombstones = match raw.tombstones {
        None => TombstonePolicy::Skip,
        Some(s) => match s.get_ref().as_str() {
            "skip" => TombstonePolicy::Skip,
            "publish" => TombstonePolicy::Publish,
            other => {
                return at.invalid(
                    s.span(),
                    "pipeline.tombstones",
                    format!("`{other}` is not a policy: skip or publish"),
                )
            }
        },
    };
    Ok(Pipeline {
        kafka_errors,
        tombstones,
        stall_after: Duration::from_millis(stall_after_ms as u64),
        discard,
        workers: workers as usize,
        max_in_flight_messages: max_in_flight_messages as usize,
        max_in_flight_bytes: max_in_flight_bytes as usize,
        commit_interval: Duration::from_millis(commit_interval_ms as u64),
        shutdown_timeout: Duration::from_millis(shutdown_timeout_ms as u64),
        stats_interval: Duration::from_millis(stats_interval_ms as u64),
    })
}

/// Expands `${NAME}` in each present field, in place.
fn expand_fields<const N: usize>(
    at: &Locator<'_>,
    fields: [(&str, Option<&mut Spanned<String>>); N],
) -> Result<(), ConfigError> {
    for (key, field) in fields {
        if let Some(field) = field {
            let expanded = expand_env(field.get_ref(), &env_lookup)
                .or_else(|m| at.invalid(field.span(), key, m))?;
            *field.get_mut() = expanded;
        }
    }
    Ok(())
}

/// An API endpoint setting: an http:// or https:// URL, trimmed.
fn endpoint_url(
    at: &Locator<'_>,
    endpoint: Option<&Spanned<String>>,
    key: &str,
    example: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(e) = endpoint else {
        return Ok(None);
    };
    let url = e.get_ref().trim().to_string();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return at.invalid(e.span(), key, format!("expected a URL such as {example}"));
    }
    Ok(Some(url))
}

/// `[storage]`: the `@archive` bucket and object name template.
pub(super) fn validate_storage(
    at: &Locator<'_>,
    mut raw: StorageConfig,
) -> Result<Storage, ConfigError> {
    expand_fields(
        at,
        [
            ("storage.bucket", Some(&mut raw.bucket)),
            ("storage.object", raw.object.as_mut()),
            ("storage.endpoint", raw.endpoint.as_mut()),
        ],
    )?;
    let bucket = raw.bucket.get_ref().trim().to_string();
    crate::objects::check_bucket(&bucket)
        .or_else(|m| at.invalid(raw.bucket.span(), "storage.bucket", m))?;
    let object = match &raw.object {
        Some(o) => crate::objects::Template::parse(o.get_ref())
            .or_else(|m| at.invalid(o.span(), "storage.object", m))?,
        None => crate::objects::Template::parse(DEFAULT_OBJECT_TEMPLATE)
            .expect("the default template parses"),
    };
    let endpoint = endpoint_url(
        at,
        raw.endpoint.as_ref(),
        "storage.endpoint",
        "https://storage.googleapis.com",
    )?
    .map(|url| url.trim_end_matches('/').to_string());
    let max_concurrent_writes = match &raw.max_concurrent_writes {
        Some(v) => in_range(
            at,
            v,
            "storage.max_concurrent_writes",
            1..=10_000,
            "object writes in flight at once",
        )? as usize,
        None => 64,
    };
    Ok(Storage {
        bucket: bucket.into(),
        object,
        endpoint,
        max_concurrent_writes,
    })
}

/// `[bigquery]`: the topics that get the JSON form.
pub(super) fn validate_bigquery(
    at: &Locator<'_>,
    pubsub: &Pubsub,
    raw: BigqueryConfig,
) -> Result<Bigquery, ConfigError> {
    let mut topics = Vec::new();
    for t in &raw.topics {
        let text = expand_env(t.get_ref(), &env_lookup)
            .or_else(|m| at.invalid(t.span(), "bigquery.topics", m))?;
        let topic = TopicName::parse(&pubsub.project, &text)
            .or_else(|m| at.invalid(t.span(), "bigquery.topics", m))?;
        // The error policies publish the raw alert to these two: a JSON
        // topic would get bytes its BigQuery subscription cannot read.
        for (key, other) in [
            ("pubsub.topic", Some(&pubsub.topic)),
            (
                "pubsub.dead_letter_topic",
                pubsub.dead_letter_topic.as_ref(),
            ),
        ] {
            if other == Some(&topic) {
                return at.invalid(
                    t.span(),
                    "bigquery.topics",
                    format!("`{text}` is also {key}, which takes the raw alert (hook.on_error = \"passthrough\", dead letters): give the JSON form a topic of its own"),
                );
            }
        }
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    Ok(Bigquery {
        topics,
        kafka_columns: raw.kafka_columns,
    })
}

/// `[destinations]`: where a message goes when the hook names none; by
/// default the configured topic, and `@archive` when `[storage]` is set.
pub(super) fn validate_destinations(
    at: &Locator<'_>,
    project: &str,
    default_topic: &TopicName,
    storage: bool,
    raw: DestinationsConfig,
) -> Result<Destinations, ConfigError> {
    let Some(list) = raw.default else {
        return Ok(Destinations {
            topics: vec![default_topic.clone()],
            archive: storage,
        });
    };
    let key = "destinations.default";
    let mut topics = Vec::new();
    let mut archive = false;
    for d in list.get_ref() {
        let text =
            expand_env(d.get_ref(), &env_lookup).or_else(|m| at.invalid(d.span(), key, m))?;
        match text.trim() {
            crate::hook::ARCHIVE_OBJECT if storage => archive = true,
            crate::hook::ARCHIVE_OBJECT => {
                return at.invalid(
                    d.span(),
                    key,
                    "`@archive` needs a [storage] section (its bucket and object name)",
                )
            }
            crate::hook::DEFAULT_TOPIC => {
                if !topics.contains(default_topic) {
                    topics.push(default_topic.clone());
                }
            }
            t if t.starts_with("gs://") => {
                return at.invalid(
                    d.span(),
                    key,
                    format!("`{t}`: a default destination writes many messages, so it names `@archive` (its object name is filled in per message), not one object"),
                )
            }
            t => {
                let topic = TopicName::parse(project, t).or_else(|m| at.invalid(d.span(), key, m))?;
                if !topics.contains(&topic) {
                    topics.push(topic);
                }
            }
        }
    }
    if topics.is_empty() && !archive {
        return at.invalid(
            list.span(),
            key,
            "names no destination (drop messages with a hook instead)",
        );
    }
    Ok(Destinations { topics, archive })
}
