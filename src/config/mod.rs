//! Configuration: a TOML file, parsed into raw serde structs and validated
//! once, at start-up, into typed values ([`Config`] and its parts).
//!
//! | file | its one job |
//! |---|---|
//! | `mod.rs` | the typed, validated configuration and its error |
//! | `raw.rs` | the file as serde reads it (`*Config`, spans kept) |
//! | `validate.rs` | raw -> typed, section by section |
//! | `spans.rs` | byte spans -> `file:line:column` in messages |
//! | `env.rs` | `${NAME}` and `${NAME:-default}` expansion |
//! | `names.rs` | Pub/Sub and Kafka naming rules |
//! | `librdkafka.rs` | librdkafka's defaults, reserved keys and probing |
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

mod env;
mod librdkafka;
pub(crate) use librdkafka::{check_librdkafka_property, RESERVED_KAFKA_PROPERTIES};
mod names;
mod raw;
mod spans;
mod validate;

use env::env_lookup;
pub use env::expand_env;
pub use names::{check_topic_id, TopicName};
use raw::ConfigFile;
use spans::Locator;
use validate::{
    validate_alerts, validate_batching, validate_bigquery, validate_destinations, validate_hook,
    validate_kafka, validate_pipeline, validate_pubsub, validate_storage,
};

/// Pub/Sub's limit on messages in one publish request.
/// <https://cloud.google.com/pubsub/quotas#resource_limits>
pub const MAX_BATCH_MESSAGES: u32 = 1000;
/// Pub/Sub's limit on the size of one publish request, in bytes.
/// <https://cloud.google.com/pubsub/quotas#resource_limits>
pub const MAX_REQUEST_BYTES: u32 = 10_000_000;
/// The largest `batching.max_bytes` accepted: the request limit less room for
/// the topic name and the protobuf framing of up to 1000 messages.
pub const MAX_BATCH_BYTES: u32 = 9_500_000;

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
    /// Cloud Storage, for object destinations (`@archive`, `gs://...`).
    pub storage: Option<Storage>,
    /// Topics that get the BigQuery-ready JSON form of alerts.
    pub bigquery: Bigquery,
    /// Where a message goes when the hook names no destination.
    pub destinations: Destinations,
}

/// Cloud Storage: the `@archive` destination, and how to reach the service.
#[derive(Debug, Clone)]
pub struct Storage {
    pub bucket: std::sync::Arc<str>,
    /// The `@archive` object's name, filled in per message.
    pub object: crate::objects::Template,
    /// An explicit API endpoint; `STORAGE_EMULATOR_HOST` overrides it.
    pub endpoint: Option<String>,
    /// Object writes in flight at once, at most.
    pub max_concurrent_writes: usize,
}

/// The object name template `@archive` uses unless `[storage] object` says.
pub const DEFAULT_OBJECT_TEMPLATE: &str = "{kafka.topic}/{objectId}/{candid}.avro";

/// Topics whose messages are the alert's BigQuery-ready JSON form.
#[derive(Debug, Clone, Default)]
pub struct Bigquery {
    pub topics: Vec<TopicName>,
    /// Add `kafka_topic`, `kafka_partition`, `kafka_offset`, `kafka_timestamp_ms`.
    pub kafka_columns: bool,
}

/// The destinations of a message the hook names none for (with no
/// script: every message).
#[derive(Debug, Clone)]
pub struct Destinations {
    pub topics: Vec<TopicName>,
    /// Whether `@archive` is among them.
    pub archive: bool,
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
                    crate::secret::scrub_urls(v)
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
    /// The ordering key of messages the hook gives none.
    pub ordering_key: OrderingKeySource,
}

/// Where a message's Pub/Sub ordering key comes from when the hook sets
/// none (Google's connector's `orderingKeySource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingKeySource {
    /// Unordered (the default).
    #[default]
    None,
    /// The Kafka key, as text (a key that is not UTF-8: unordered).
    Key,
    /// The partition number, as text.
    Partition,
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
            message: crate::secret::scrub_toml_excerpt(e.to_string().trim_end()),
        })?;
        let at = Locator { path, text };
        let kafka = validate_kafka(&at, file.kafka)?;
        let pubsub = validate_pubsub(&at, file.pubsub)?;
        let batching = validate_batching(&at, file.batching)?;
        let pipeline = validate_pipeline(&at, file.pipeline)?;
        let hook = validate_hook(&at, file.hook, pubsub.dead_letter_topic.is_some())?;
        let alerts = validate_alerts(&at, file.alerts)?;
        let storage = match file.storage {
            Some(raw) => Some(validate_storage(&at, raw)?),
            None => None,
        };
        let bigquery = validate_bigquery(&at, &pubsub, file.bigquery)?;
        let destinations = validate_destinations(
            &at,
            &pubsub.project,
            &pubsub.topic,
            storage.is_some(),
            file.destinations,
        )?;
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
            storage,
            bigquery,
            destinations,
        })
    }

    /// Every Pub/Sub topic this configuration names (default, dead letter,
    /// default destinations and BigQuery topics), each once.
    pub fn pubsub_topics(&self) -> Vec<&TopicName> {
        let mut topics = vec![&self.pubsub.topic];
        topics.extend(self.pubsub.dead_letter_topic.as_ref());
        topics.extend(self.destinations.topics.iter());
        topics.extend(self.bigquery.topics.iter());
        let mut seen = std::collections::HashSet::new();
        topics.retain(|t| seen.insert(*t));
        topics
    }
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
    fn a_toml_syntax_error_on_a_secrets_line_does_not_quote_the_secret() {
        for bad in [
            "\"sasl.password\" = \"Hunter2SECRET",
            "\"sasl.password\" = \"Hunter2SECRET\" oops",
            "sasl.password = Hunter2SECRET",
        ] {
            let e =
                error(&MINIMAL.replace("group.id = \"g\"", &format!("group.id = \"g\"\n{bad}")));
            assert!(e.contains("test.toml"), "{e}");
            assert!(!e.contains("Hunter2SECRET"), "{bad}: {e}");
        }
    }

    #[test]
    fn hook_limits_are_read_and_out_of_range_ones_named() {
        let c = parse(&format!(
            "{MINIMAL}\n[hook]\nmax_memory_mb = 16\nmax_operations = 5000\n"
        ))
        .unwrap();
        assert_eq!(c.hook.limits.max_memory_bytes, 16 << 20);
        assert_eq!(c.hook.limits.max_operations, 5000);
        for bad in [
            "max_memory_mb = 0",
            "max_memory_mb = 5000",
            "max_operations = 10",
        ] {
            let e = error(&format!("{MINIMAL}\n[hook]\n{bad}\n"));
            let key = bad.split(' ').next().unwrap();
            assert!(
                e.contains(&format!("`hook.{key}`")) && e.contains("out of range"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn zero_workers_is_rejected() {
        let e = error(&format!("{MINIMAL}\n[pipeline]\nworkers = 0\n"));
        assert!(e.contains("test.toml:12:11: `pipeline.workers`"), "{e}");
    }

    #[test]
    fn a_bigquery_topic_that_is_also_the_raw_default_topic_is_refused() {
        let text = format!("{MINIMAL}\n[bigquery]\ntopics = [\"ztf-alerts\"]\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("bigquery.topics") && e.contains("pubsub.topic"),
            "{e}"
        );
    }
}
