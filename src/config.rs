//! Configuration: a TOML file, parsed into raw serde structs (`*Config`) and
//! validated once, at start-up, into typed values ([`Config`] and its parts).
//!
//! Invariants of a [`Config`]:
//! - every librdkafka property was accepted by librdkafka itself, one by one;
//! - `bootstrap.servers` and `group.id` are set, and the two properties that
//!   would break the delivery guarantee (`enable.auto.commit`,
//!   `enable.auto.offset.store`) are not user-settable;
//! - every Pub/Sub topic is a well-formed full resource name;
//! - batch limits are within Pub/Sub's request limits.
//!
//! Errors name the key, and the file, line and column where TOML gives them.
//! Secret values (passwords, keys) never appear in an error or in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Pub/Sub's limit on messages in one publish request.
/// <https://cloud.google.com/pubsub/quotas#resource_limits>
pub const MAX_BATCH_MESSAGES: u32 = 1000;
/// Pub/Sub's limit on the size of one publish request, in bytes.
/// <https://cloud.google.com/pubsub/quotas#resource_limits>
pub const MAX_REQUEST_BYTES: u32 = 10_000_000;
/// The largest `batching.max_bytes` accepted: the request limit less room for
/// the topic name and the protobuf framing of up to 1000 messages.
pub const MAX_BATCH_BYTES: u32 = 9_500_000;

/// librdkafka properties that ztfhook owns: setting them would break the
/// at-least-once guarantee, so a config that names them is rejected.
const RESERVED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
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
const KAFKA_DEFAULTS: &[(&str, &str)] = &[
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

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages.
    pub source: PathBuf,
    pub kafka: Kafka,
    pub pubsub: Pubsub,
    pub batching: Batching,
    pub pipeline: Pipeline,
    pub attributes: AttributeOptions,
    pub hook: HookOptions,
    /// Where the schemas of Rubin's wire-format alerts come from.
    pub alerts: crate::alert::SchemaSources,
    /// Where `/metrics` and `/healthz` are served; `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What a hook failure does to the message it failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Publish it to the configured topic, with the error in `ztfhook.error`.
    Passthrough,
    /// Publish it to the dead-letter topic, with the error in `ztfhook.error`.
    DeadLetter,
    /// Do not publish it (counted as dropped, logged).
    Drop,
    /// Stop the bridge without committing it.
    Stop,
}

/// The hook: a script (or the built-in pass-through) and its error policy.
#[derive(Debug, Clone)]
pub struct HookOptions {
    /// `None`: the built-in pass-through.
    pub script: Option<PathBuf>,
    pub on_error: ErrorPolicy,
    pub limits: crate::hook::Limits,
}

/// Kafka: librdkafka properties and what to subscribe to.
#[derive(Clone)]
pub struct Kafka {
    /// librdkafka properties, by librdkafka's own names, defaults included.
    pub properties: BTreeMap<String, String>,
    /// Topic names, regular expressions that start with `^`, or nightly
    /// date templates (`ztf_{YYYYMMDD}_programid1`).
    pub topics: Vec<String>,
    /// How many nights before tonight a date template also subscribes to.
    pub previous_nights: u32,
}

impl Kafka {
    /// The consumer group, always present after validation.
    pub fn group_id(&self) -> &str {
        self.properties
            .get("group.id")
            .map(String::as_str)
            .unwrap_or("")
    }
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: BTreeMap<&str, String> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    crate::secret::REDACTED.to_string()
                } else {
                    crate::secret::without_userinfo(v)
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("Kafka")
            .field("properties", &redacted)
            .field("topics", &self.topics)
            .field("previous_nights", &self.previous_nights)
            .finish()
    }
}

/// Whether a librdkafka property holds a secret that must never be printed
/// (by the words in its name: [`crate::secret::is_secret_key`]).
pub fn is_secret_property(key: &str) -> bool {
    crate::secret::is_secret_key(key)
}

/// Pub/Sub: where to publish.
#[derive(Debug, Clone)]
pub struct Pubsub {
    pub project: String,
    /// Where a message goes unless the hook says otherwise.
    pub topic: TopicName,
    /// Where messages that can never be published go, with the reason.
    pub dead_letter_topic: Option<TopicName>,
    /// An explicit API endpoint; `PUBSUB_EMULATOR_HOST` overrides it.
    pub endpoint: Option<String>,
}

/// A full Pub/Sub topic resource name, `projects/P/topics/T`, checked
/// against Pub/Sub's naming rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Parses a short topic id (resolved in `project`) or a full resource name.
    ///
    /// # Errors
    /// A message saying which naming rule the name breaks.
    pub fn parse(project: &str, name: &str) -> Result<TopicName, String> {
        let (project, id) = match name.strip_prefix("projects/") {
            Some(rest) => match rest.split_once("/topics/") {
                Some((p, id)) if !p.is_empty() && !p.contains('/') => (p, id),
                _ => {
                    return Err(format!(
                        "`{name}` is not a topic name: expected `projects/PROJECT/topics/TOPIC` or a bare topic id"
                    ))
                }
            },
            None => (project, name),
        };
        check_topic_id(id)
            .map_err(|why| format!("`{name}` is not a valid Pub/Sub topic: {why}"))?;
        Ok(TopicName(format!("projects/{project}/topics/{id}")))
    }

    /// The full resource name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic id, the part after `/topics/`.
    pub fn id(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Pub/Sub's rules for a topic id: 3-255 characters, a letter first, then
/// letters, digits and `-_.~+%`, and no `goog` prefix.
/// <https://cloud.google.com/pubsub/docs/pubsub-basics#resource_names>
pub fn check_topic_id(id: &str) -> Result<(), &'static str> {
    if id.len() < 3 || id.len() > 255 {
        return Err("a topic id has 3 to 255 characters");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("a topic id starts with a letter");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c))
    {
        return Err("a topic id has only letters, digits and `-_.~+%`");
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Err("a topic id cannot start with `goog`");
    }
    Ok(())
}

/// How messages are grouped into publish requests, per destination topic.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub max_messages: u32,
    pub max_bytes: u32,
    pub max_delay: Duration,
}

/// The worker pool and the bounds that keep memory flat.
#[derive(Debug, Clone, Copy)]
pub struct Pipeline {
    pub workers: usize,
    /// Consumption pauses while this many messages are unacknowledged.
    pub max_in_flight_messages: usize,
    /// Consumption pauses while this many payload bytes are unacknowledged.
    pub max_in_flight_bytes: usize,
    pub commit_interval: Duration,
    pub shutdown_timeout: Duration,
    /// Zero turns the periodic stats line off.
    pub stats_interval: Duration,
    /// `sink = "discard"`: everything up to publishing runs (hook,
    /// attributes, limits), then messages are acknowledged without being
    /// published. For dry runs, and to measure the core's own ceiling. A dry
    /// run consumes as a group of its own and never commits.
    pub discard: bool,
    /// What a consumer error that may hide a message does.
    pub kafka_errors: KafkaErrorPolicy,
    /// What a Kafka record with a null value does.
    pub tombstones: TombstonePolicy,
    /// `/healthz` says 503 once the oldest unacknowledged message has waited
    /// this long (or there is lag and nothing was consumed for this long).
    pub stall_after: Duration,
}

/// `pipeline.kafka_errors`: a consumer error that may stand for a message
/// (a corrupt record, an offset reset refused, an authorization failure on a
/// partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaErrorPolicy {
    /// Stop, naming the error, without committing past it (the default).
    Stop,
    /// Log, count, send the coordinates to the dead-letter topic, go on.
    Skip,
}

/// `pipeline.tombstones`: a Kafka record whose value is null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TombstonePolicy {
    /// Acknowledge it without publishing, and count it (the default, as
    /// Google's Kafka connector does).
    Skip,
    /// Hand it to the hook (`msg.tombstone` is true) and publish it with
    /// empty data and the attribute `ztfhook.tombstone = "true"`.
    Publish,
}

/// Which Kafka facts become Pub/Sub attributes.
#[derive(Debug, Clone, Copy)]
pub struct AttributeOptions {
    /// `kafka.topic`, `kafka.partition`, `kafka.offset`, `kafka.timestamp`, `key`.
    pub kafka_metadata: bool,
    /// Each Kafka header as an attribute of the same name.
    pub headers: bool,
}

/// A configuration that cannot be used; names the key and, where known, the
/// file, line and column.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the configuration: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{location}: `{key}`: {message}")]
    Invalid {
        location: String,
        key: String,
        message: String,
    },
}

// ---- raw, as written in the file ------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Parsed separately: every key but `topics` is a librdkafka property.
    kafka: toml::Table,
    pubsub: PubsubConfig,
    #[serde(default)]
    batching: BatchingConfig,
    #[serde(default)]
    pipeline: PipelineConfig,
    #[serde(default)]
    attributes: AttributesConfig,
    #[serde(default)]
    hook: HookConfig,
    #[serde(default)]
    alerts: AlertsConfig,
    #[serde(default)]
    metrics: MetricsConfig,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsConfig {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AlertsConfig {
    schema_dir: Option<Spanned<String>>,
    schema_registry: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HookConfig {
    script: Option<Spanned<String>>,
    on_error: Option<Spanned<String>>,
    max_operations: Option<Spanned<i64>>,
    max_memory_mb: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PubsubConfig {
    project: Spanned<String>,
    topic: Spanned<String>,
    #[serde(default)]
    dead_letter_topic: Option<Spanned<String>>,
    #[serde(default)]
    endpoint: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchingConfig {
    #[serde(default = "default_max_messages")]
    max_messages: Spanned<i64>,
    #[serde(default = "default_max_bytes")]
    max_bytes: Spanned<i64>,
    #[serde(default = "default_max_delay_ms")]
    max_delay_ms: Spanned<i64>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_messages: default_max_messages(),
            max_bytes: default_max_bytes(),
            max_delay_ms: default_max_delay_ms(),
        }
    }
}

fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
fn default_max_messages() -> Spanned<i64> {
    unspanned(1000)
}
fn default_max_bytes() -> Spanned<i64> {
    unspanned(4_000_000)
}
// default in Google's client libraries: 10 ms
fn default_max_delay_ms() -> Spanned<i64> {
    unspanned(10)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PipelineConfig {
    workers: Option<Spanned<i64>>,
    max_in_flight_messages: Option<Spanned<i64>>,
    max_in_flight_bytes: Option<Spanned<i64>>,
    commit_interval_ms: Option<Spanned<i64>>,
    shutdown_timeout_ms: Option<Spanned<i64>>,
    stats_interval_ms: Option<Spanned<i64>>,
    sink: Option<Spanned<String>>,
    kafka_errors: Option<Spanned<String>>,
    tombstones: Option<Spanned<String>>,
    stall_after_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttributesConfig {
    #[serde(default = "yes")]
    kafka_metadata: bool,
    #[serde(default)]
    headers: bool,
}

impl Default for AttributesConfig {
    fn default() -> Self {
        AttributesConfig {
            kafka_metadata: true,
            headers: false,
        }
    }
}

fn yes() -> bool {
    true
}

// ---- validation -----------------------------------------------------------

/// Knows the file's text, to turn byte offsets into `file:line:column`.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: std::ops::Range<usize>) -> String {
        if span.start == 0 && span.end == 0 {
            return self.path.display().to_string();
        }
        self.at_offset(span.start)
    }

    /// Where a line starts, past its indentation: where a dotted key begins.
    fn line_start(&self, offset: usize) -> usize {
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let indent =
            self.text[start..].len() - self.text[start..].trim_start_matches([' ', '\t']).len();
        start + indent
    }

    fn at_offset(&self, offset: usize) -> String {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{column}", self.path.display())
    }

    fn invalid<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            location: self.at(span),
            key: key.to_string(),
            message: message.into(),
        })
    }

    /// Finds where a dotted key under `[kafka]` was written, whether as
    /// `a.b = ..`, `"a.b" = ..` or in a `[kafka.a]` table.
    fn kafka_key_span(&self, key: &str) -> std::ops::Range<usize> {
        fn find(table: &toml::de::DeTable<'_>, rest: &str) -> Option<std::ops::Range<usize>> {
            for (k, v) in table.iter() {
                let name: &str = k.get_ref();
                if name == rest {
                    return Some(k.span());
                }
                if let Some(tail) = rest.strip_prefix(name).and_then(|t| t.strip_prefix('.')) {
                    if let toml::de::DeValue::Table(inner) = v.get_ref() {
                        if let Some(span) = find(inner, tail) {
                            return Some(span);
                        }
                    }
                }
            }
            None
        }
        let Ok(doc) = toml::de::DeTable::parse(self.text) else {
            return 0..0;
        };
        let kafka = doc.get_ref().iter().find(|(k, _)| k.get_ref() == "kafka");
        match kafka {
            Some((_, v)) => match v.get_ref() {
                toml::de::DeValue::Table(t) => find(t, key).map_or(0..0, |s| {
                    let start = self.line_start(s.start);
                    start..s.end
                }),
                _ => 0..0,
            },
            None => 0..0,
        }
    }
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the key and line of the first
    /// problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    /// Validates configuration text; `path` is used only in messages.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key and line of the first problem found.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let at = Locator { path, text };
        let kafka = validate_kafka(&at, file.kafka)?;
        let pubsub = validate_pubsub(&at, file.pubsub)?;
        let batching = validate_batching(&at, file.batching)?;
        let pipeline = validate_pipeline(&at, file.pipeline)?;
        let hook = validate_hook(&at, file.hook, pubsub.dead_letter_topic.is_some())?;
        let alerts = validate_alerts(&at, file.alerts)?;
        let metrics_listen = match file.metrics.listen {
            None => None,
            Some(l) => {
                let text = expand_env(l.get_ref(), &env_lookup)
                    .or_else(|m| at.invalid(l.span(), "metrics.listen", m))?;
                Some(text.parse::<std::net::SocketAddr>().or_else(|_| {
                    at.invalid(
                        l.span(),
                        "metrics.listen",
                        format!("`{text}` is not an address and port, e.g. \"0.0.0.0:9464\""),
                    )
                })?)
            }
        };
        Ok(Config {
            source: path.to_path_buf(),
            kafka,
            pubsub,
            batching,
            pipeline,
            attributes: AttributeOptions {
                kafka_metadata: file.attributes.kafka_metadata,
                headers: file.attributes.headers,
            },
            hook,
            alerts,
            metrics_listen,
        })
    }

    /// Every Pub/Sub topic this configuration names (default and dead letter).
    pub fn pubsub_topics(&self) -> Vec<&TopicName> {
        let mut topics = vec![&self.pubsub.topic];
        topics.extend(self.pubsub.dead_letter_topic.as_ref());
        topics
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment variables, so
/// that secrets and per-host values need not be written in the file.
///
/// # Errors
/// A message naming the variable that is not set (and has no default).
pub fn expand_env(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${` (write `${NAME}` or `${NAME:-default}`)".into());
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{inner}}}` is not an environment variable reference"
            ));
        }
        match lookup(name)
            .filter(|v| !v.is_empty())
            .or(default.map(str::to_string))
        {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Flattens `[kafka]` (dotted keys become nested tables in TOML) back into
/// librdkafka's `a.b.c` names.
fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
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

fn validate_kafka(at: &Locator<'_>, table: toml::Table) -> Result<Kafka, ConfigError> {
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

/// Asks librdkafka whether it accepts one property, without printing secrets.
fn check_librdkafka_property(key: &str, value: &str) -> Result<(), String> {
    let mut probe = rdkafka::ClientConfig::new();
    probe.set(key, value);
    match probe.create_native_config() {
        Ok(_) => Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, desc, _, _)) => {
            let secret = is_secret_property(key).then_some(value);
            Err(format!(
                "librdkafka rejects it: {}",
                crate::secret::scrub(&desc, secret)
            ))
        }
        Err(other) => {
            let secret = is_secret_property(key).then_some(value);
            Err(format!(
                "librdkafka rejects it: {}",
                crate::secret::scrub(&other.to_string(), secret)
            ))
        }
    }
}

/// Kafka's topic naming rule (letters, digits, `.`, `_`, `-`; at most 249),
/// or a regular expression subscription starting with `^`.
fn check_kafka_topic(name: &str) -> Result<(), String> {
    if crate::source::subscription::is_template(name) {
        let example = crate::source::subscription::Date {
            year: 2026,
            month: 11,
            day: 25,
        }
        .fill(name);
        if example.contains('{') || example.contains('}') {
            return Err(format!(
                "`{name}`: a date template knows only {}",
                crate::source::subscription::PLACEHOLDERS.join(", ")
            ));
        }
        return check_kafka_topic(&example)
            .map_err(|e| format!("`{name}` gives a bad topic name: {e}"));
    }
    if let Some(pattern) = name.strip_prefix('^') {
        if pattern.is_empty() {
            return Err("a regular expression subscription needs a pattern after `^`".into());
        }
        return Ok(());
    }
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "`{name}`: a Kafka topic name has 1 to 249 characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "`{name}`: a Kafka topic name has only letters, digits, `.`, `_` and `-` (start a regular expression with `^`)"
        ));
    }
    Ok(())
}

fn validate_pubsub(at: &Locator<'_>, mut raw: PubsubConfig) -> Result<Pubsub, ConfigError> {
    let fields = [
        ("pubsub.project", Some(&mut raw.project)),
        ("pubsub.topic", Some(&mut raw.topic)),
        ("pubsub.dead_letter_topic", raw.dead_letter_topic.as_mut()),
        ("pubsub.endpoint", raw.endpoint.as_mut()),
    ];
    for (key, field) in fields {
        if let Some(field) = field {
            let expanded = expand_env(field.get_ref(), &env_lookup)
                .or_else(|m| at.invalid(field.span(), key, m))?;
            *field.get_mut() = expanded;
        }
    }
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
    let endpoint = match raw.endpoint {
        Some(e) => {
            let url = e.get_ref().trim().to_string();
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return at.invalid(
                    e.span(),
                    "pubsub.endpoint",
                    "expected a URL such as https://pubsub.googleapis.com",
                );
            }
            Some(url)
        }
        None => None,
    };
    Ok(Pubsub {
        project,
        topic,
        dead_letter_topic,
        endpoint,
    })
}

fn validate_alerts(
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

fn validate_hook(
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

fn in_range(
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

fn validate_batching(at: &Locator<'_>, raw: BatchingConfig) -> Result<Batching, ConfigError> {
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

fn validate_pipeline(at: &Locator<'_>, raw: PipelineConfig) -> Result<Pipeline, ConfigError> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as i64;
    let get = |v: Option<Spanned<i64>>, key: &str, default: i64, range, why: &str| match v {
        Some(v) => in_range(at, &v, key, range, why),
        None => Ok(default),
    };
    let workers = get(
        raw.workers,
        "pipeline.workers",
        cores,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The least a config file needs; other modules' tests build on it.
    pub(crate) const MINIMAL: &str = r#"
[kafka]
bootstrap.servers = "127.0.0.1:9092"
group.id = "g"
topics = ["ztf_20261125_programid1"]

[pubsub]
project = "demo"
topic = "ztf-alerts"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.kafka.properties["bootstrap.servers"], "127.0.0.1:9092");
        assert_eq!(c.kafka.properties["auto.offset.reset"], "earliest");
        assert_eq!(
            c.kafka.properties["partition.assignment.strategy"],
            "cooperative-sticky"
        );
        assert_eq!(c.pubsub.topic.as_str(), "projects/demo/topics/ztf-alerts");
        assert_eq!(c.batching.max_messages, 1000);
        assert_eq!(c.batching.max_delay, Duration::from_millis(10));
        assert!(c.attributes.kafka_metadata);
        assert!(!c.attributes.headers);
    }

    #[test]
    fn quoted_and_dotted_kafka_keys_are_the_same_property() {
        let c = parse(&MINIMAL.replace("group.id = \"g\"", "\"group.id\" = \"g2\"")).unwrap();
        assert_eq!(c.kafka.group_id(), "g2");
    }

    #[test]
    fn unknown_section_key_is_named_with_its_line() {
        let e = error(&MINIMAL.replace(
            "topic = \"ztf-alerts\"",
            "topic = \"ztf-alerts\"\ntopik = 1",
        ));
        assert!(e.contains("test.toml"), "{e}");
        assert!(e.contains("topik"), "{e}");
        assert!(e.contains("line 10"), "{e}");
    }

    #[test]
    fn unknown_librdkafka_property_is_named_with_file_line_and_column() {
        let e = error(&MINIMAL.replace(
            "group.id = \"g\"",
            "group.id = \"g\"\nbootstrap.serverz = \"x\"",
        ));
        assert!(
            e.starts_with("test.toml:5:1: `kafka.bootstrap.serverz`"),
            "{e}"
        );
        assert!(e.contains("No such configuration property"), "{e}");
    }

    #[test]
    fn bad_librdkafka_value_is_named() {
        let e = error(&MINIMAL.replace(
            "group.id = \"g\"",
            "group.id = \"g\"\nsession.timeout.ms = \"soon\"",
        ));
        assert!(e.contains("`kafka.session.timeout.ms`"), "{e}");
        assert!(e.contains("test.toml:5:1"), "{e}");
    }

    #[test]
    fn secret_values_never_appear_in_errors_or_debug() {
        let text = MINIMAL.replace(
            "group.id = \"g\"",
            "group.id = \"g\"\nsasl.mechanism = \"SCRAM-SHA-512\"\nsasl.password = \"hunter2-secret\"",
        );
        let c = parse(&text).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(format!("{c:?}").contains("<redacted>"));
    }

    #[test]
    fn reserved_commit_properties_are_rejected_with_the_reason() {
        let e = error(&MINIMAL.replace(
            "group.id = \"g\"",
            "group.id = \"g\"\nenable.auto.commit = true",
        ));
        assert!(
            e.contains("`kafka.enable.auto.commit`: cannot be set"),
            "{e}"
        );
        assert!(e.contains("test.toml:5:1"), "{e}");
    }

    #[test]
    fn missing_group_id_is_named() {
        let e = error(&MINIMAL.replace("group.id = \"g\"\n", ""));
        assert!(e.contains("`kafka.group.id`: missing"), "{e}");
    }

    #[test]
    fn missing_topics_is_named() {
        let e = error(&MINIMAL.replace("topics = [\"ztf_20261125_programid1\"]\n", ""));
        assert!(e.contains("`kafka.topics`: missing"), "{e}");
    }

    #[test]
    fn bad_kafka_topic_name_is_named() {
        let e = error(&MINIMAL.replace("ztf_20261125_programid1", "ztf alerts"));
        assert!(
            e.contains("`kafka.topics`") && e.contains("`ztf alerts`"),
            "{e}"
        );
        let ok = parse(&MINIMAL.replace("ztf_20261125_programid1", "^ztf_.*_programid1$")).unwrap();
        assert_eq!(ok.kafka.topics, vec!["^ztf_.*_programid1$"]);
    }

    #[test]
    fn pubsub_topic_breaking_naming_rules_is_named() {
        for bad in ["goog-alerts", "1alerts", "al", "a/b", "alerts!"] {
            let e = error(&MINIMAL.replace("\"ztf-alerts\"", &format!("\"{bad}\"")));
            assert!(e.contains("test.toml:9:9: `pubsub.topic`"), "{bad}: {e}");
        }
        let full =
            parse(&MINIMAL.replace("\"ztf-alerts\"", "\"projects/other/topics/t-1\"")).unwrap();
        assert_eq!(full.pubsub.topic.as_str(), "projects/other/topics/t-1");
        assert_eq!(full.pubsub.topic.id(), "t-1");
    }

    #[test]
    fn batch_limits_above_pubsub_quotas_are_rejected() {
        let e = error(&format!("{MINIMAL}\n[batching]\nmax_messages = 1001\n"));
        assert!(
            e.contains("`batching.max_messages`: 1001 is out of range 1..=1000"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}\n[batching]\nmax_bytes = 10000000\n"));
        assert!(e.contains("`batching.max_bytes`"), "{e}");
    }

    #[test]
    fn wrong_type_is_reported_by_the_parser_with_its_line() {
        let e = error(&format!("{MINIMAL}\n[pipeline]\nworkers = \"four\"\n"));
        assert!(e.contains("workers") && e.contains("line 12"), "{e}");
    }

    #[test]
    fn environment_references_are_expanded_with_defaults() {
        let env = |name: &str| (name == "SET").then(|| "value".to_string());
        assert_eq!(expand_env("a-${SET}-b", &env).unwrap(), "a-value-b");
        assert_eq!(
            expand_env("${UNSET:-127.0.0.1:9092}", &env).unwrap(),
            "127.0.0.1:9092"
        );
        assert_eq!(expand_env("${SET:-x}", &env).unwrap(), "value");
        assert!(expand_env("${UNSET}", &env)
            .unwrap_err()
            .contains("`UNSET` is not set"));
        assert!(expand_env("${OPEN", &env).unwrap_err().contains("unclosed"));
    }

    #[test]
    fn missing_environment_variable_is_named_with_the_key() {
        let e = error(&MINIMAL.replace("\"127.0.0.1:9092\"", "\"${ZTFHOOK_SURELY_UNSET_VAR}\""));
        assert!(
            e.starts_with("test.toml:3:1: `kafka.bootstrap.servers`"),
            "{e}"
        );
        assert!(e.contains("`ZTFHOOK_SURELY_UNSET_VAR` is not set"), "{e}");
    }

    #[test]
    fn hook_policy_defaults_to_passthrough_and_deadletter_needs_a_topic() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.hook.on_error, ErrorPolicy::Passthrough);
        assert!(c.hook.script.is_none());
        let e = error(&format!("{MINIMAL}\n[hook]\non_error = \"deadletter\"\n"));
        assert!(
            e.contains("`hook.on_error`: `deadletter` needs pubsub.dead_letter_topic"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}\n[hook]\non_error = \"ignore\"\n"));
        assert!(e.contains("test.toml:12:12: `hook.on_error`"), "{e}");
        let e = error(&format!("{MINIMAL}\n[hook]\nscript = \"route.py\"\n"));
        assert!(
            e.contains("`hook.script`") && e.contains(".rhai or .lua"),
            "{e}"
        );
    }

    #[test]
    fn zero_workers_is_rejected() {
        let e = error(&format!("{MINIMAL}\n[pipeline]\nworkers = 0\n"));
        assert!(e.contains("test.toml:12:11: `pipeline.workers`"), "{e}");
    }
}
