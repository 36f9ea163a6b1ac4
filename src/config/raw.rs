//! The configuration file as serde reads it: every section and key, with
//! the spans of values that validation may need to point at. Unknown keys
//! are refused here (`deny_unknown_fields`).

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigFile {
    /// Parsed separately: every key but `topics` is a librdkafka property.
    pub(super) kafka: toml::Table,
    pub(super) pubsub: PubsubConfig,
    #[serde(default)]
    pub(super) batching: BatchingConfig,
    #[serde(default)]
    pub(super) pipeline: PipelineConfig,
    #[serde(default)]
    pub(super) attributes: AttributesConfig,
    #[serde(default)]
    pub(super) hook: HookConfig,
    #[serde(default)]
    pub(super) alerts: AlertsConfig,
    #[serde(default)]
    pub(super) metrics: MetricsConfig,
    #[serde(default)]
    pub(super) storage: Option<StorageConfig>,
    #[serde(default)]
    pub(super) bigquery: BigqueryConfig,
    #[serde(default)]
    pub(super) destinations: DestinationsConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StorageConfig {
    pub(super) bucket: Spanned<String>,
    pub(super) object: Option<Spanned<String>>,
    pub(super) endpoint: Option<Spanned<String>>,
    pub(super) max_concurrent_writes: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct BigqueryConfig {
    #[serde(default)]
    pub(super) topics: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) kafka_columns: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DestinationsConfig {
    pub(super) default: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct MetricsConfig {
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct AlertsConfig {
    pub(super) schema_dir: Option<Spanned<String>>,
    pub(super) schema_registry: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct HookConfig {
    pub(super) script: Option<Spanned<String>>,
    pub(super) on_error: Option<Spanned<String>>,
    pub(super) max_operations: Option<Spanned<i64>>,
    pub(super) max_memory_mb: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PubsubConfig {
    pub(super) project: Spanned<String>,
    pub(super) topic: Spanned<String>,
    #[serde(default)]
    pub(super) dead_letter_topic: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) endpoint: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) ordering_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchingConfig {
    #[serde(default = "default_max_messages")]
    pub(super) max_messages: Spanned<i64>,
    #[serde(default = "default_max_bytes")]
    pub(super) max_bytes: Spanned<i64>,
    #[serde(default = "default_max_delay_ms")]
    pub(super) max_delay_ms: Spanned<i64>,
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

pub(super) fn unspanned<T>(v: T) -> Spanned<T> {
    Spanned::new(0..0, v)
}
pub(super) fn default_max_messages() -> Spanned<i64> {
    unspanned(1000)
}
pub(super) fn default_max_bytes() -> Spanned<i64> {
    unspanned(4_000_000)
}
// default in Google's client libraries: 10 ms
pub(super) fn default_max_delay_ms() -> Spanned<i64> {
    unspanned(10)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PipelineConfig {
    pub(super) workers: Option<Spanned<i64>>,
    pub(super) max_in_flight_messages: Option<Spanned<i64>>,
    pub(super) max_in_flight_bytes: Option<Spanned<i64>>,
    pub(super) commit_interval_ms: Option<Spanned<i64>>,
    pub(super) shutdown_timeout_ms: Option<Spanned<i64>>,
    pub(super) stats_interval_ms: Option<Spanned<i64>>,
    pub(super) sink: Option<Spanned<String>>,
    pub(super) kafka_errors: Option<Spanned<String>>,
    pub(super) tombstones: Option<Spanned<String>>,
    pub(super) stall_after_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AttributesConfig {
    #[serde(default = "yes")]
    pub(super) kafka_metadata: bool,
    #[serde(default)]
    pub(super) headers: bool,
}

impl Default for AttributesConfig {
    fn default() -> Self {
        AttributesConfig {
            kafka_metadata: true,
            headers: false,
        }
    }
}

pub(super) fn yes() -> bool {
    true
}
