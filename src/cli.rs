//! Command-line flags: runtime choices only; the pipeline lives in the config file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Move astronomy alert streams from Kafka to Google Cloud Pub/Sub.
#[derive(Debug, Parser)]
#[command(name = "ztfhook", version, about)]
pub struct Cli {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        global = true,
        default_value = "config/local.toml",
        env = "ZTFHOOK_CONFIG"
    )]
    pub config: PathBuf,

    /// The hook script (.rhai or .lua); overrides `hook.script` in the config.
    /// Edits to it are picked up while the bridge runs.
    #[arg(long, short, global = true, env = "ZTFHOOK_SCRIPT")]
    pub script: Option<PathBuf>,

    /// Log filter, e.g. `info`, `debug`, `ztfhook=debug,librdkafka=warn`.
    #[arg(long, global = true, default_value = "info", env = "ZTFHOOK_LOG")]
    pub log: String,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge (the default).
    Run,
    /// Validate the configuration file and print it (secrets redacted).
    CheckConfig,
    /// Print what arrives on the configured topics (or --topic), one line per
    /// alert, without committing anything for the bridge's group.
    ///
    /// Kafka's console consumer's arguments work too, with the files it is
    /// given: `--bootstrap-server HOST:PORT --consumer.config FILE` (Java
    /// properties), and Kerberos or SCRAM from the JAAS file that
    /// `KAFKA_OPTS=-Djava.security.auth.login.config=FILE` names (or
    /// `--jaas FILE`); then the TOML config is not read.
    Tail {
        /// Start at the oldest message, not at new ones.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many messages.
        #[arg(long, alias = "max-messages")]
        max: Option<u64>,
        /// The brokers (Kafka's console consumer's flag).
        #[arg(long = "bootstrap-server")]
        bootstrap_server: Option<String>,
        /// A Java consumer properties file (Kafka's console consumer's flag).
        #[arg(long = "consumer.config")]
        consumer_config: Option<PathBuf>,
        /// A JAAS file with a `KafkaClient` section; by default the one
        /// `KAFKA_OPTS` names with `-Djava.security.auth.login.config=`.
        #[arg(long)]
        jaas: Option<PathBuf>,
        /// How to print each message.
        #[arg(long, value_enum, default_value = "line")]
        format: ztfhook::tail::Format,
        /// Topics to read instead of the config's (names, ^regex or date templates).
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
    /// Print the ztfhook configuration that does what a Kafka Connect worker
    /// file and a CloudPubSubSinkConnector file do, with a comment on each
    /// setting not carried over.
    ImportConnect {
        /// The Kafka Connect worker properties file.
        worker: PathBuf,
        /// The connector properties file.
        connector: PathBuf,
        /// Write it here instead of to stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Send archived alerts (nightly tarballs, directories of .avro files,
    /// alert files) through the hook to the configured destinations, as the
    /// live stream's would be; resumable from a checkpoint. The config's
    /// `[kafka]` settings are not used.
    Replay {
        /// The topic the hook sees (`msg.topic`); by default the archive's:
        /// `ztf_public_YYYYMMDD.tar.gz` holds `ztf_YYYYMMDD_programid1`,
        /// another tarball its name, a directory's files the directory's name.
        #[arg(long)]
        topic: Option<String>,
        /// Where the replay records what every destination acknowledged.
        #[arg(long, default_value = "ztfhook-replay.checkpoint.json")]
        checkpoint: PathBuf,
        /// Ignore the checkpoint's progress: every input from its first member.
        #[arg(long)]
        from_start: bool,
        /// Tarballs (.tar, .tar.gz, .tgz), directories, and alert files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Print the BigQuery table schema (the JSON `bq mk --table` takes) of
    /// the JSON form of alerts of a schema: `[bigquery] topics` publish it.
    BigquerySchema {
        /// With the `kafka_topic`, `kafka_partition`, `kafka_offset` and
        /// `kafka_timestamp_ms` columns (`[bigquery] kafka_columns = true`).
        #[arg(long)]
        kafka_columns: bool,
        /// Schemas of Rubin wire-format alerts: a directory laid out like
        /// lsst/alert_packet's `schema/`.
        #[arg(long)]
        schema_dir: Option<PathBuf>,
        /// Schemas of Rubin wire-format alerts: a Confluent schema registry URL.
        #[arg(long)]
        schema_registry: Option<String>,
        /// A schema file (`alert.avsc` of ZTF's schema folder,
        /// `lsst.vM_m.alert.avsc` of Rubin's, with the record files beside
        /// it), or an alert file (a ZTF alert carries its schema).
        source: PathBuf,
    },
    /// Run the hook (--script) on alert files or archives offline and print
    /// each decision (a summary on stderr).
    Check {
        /// The Kafka topic the files are taken to come from; by default
        /// `ztf_20260101_programid1` for alert files and directories, and the
        /// archive's topic for a tarball (as `replay` names it).
        #[arg(long)]
        topic: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Schemas of Rubin wire-format alerts: a directory laid out like
        /// lsst/alert_packet's `schema/` (`M/m/lsst.vM_m.alert.avsc`).
        #[arg(long)]
        schema_dir: Option<PathBuf>,
        /// Schemas of Rubin wire-format alerts: a Confluent schema registry URL.
        #[arg(long)]
        schema_registry: Option<String>,
        /// Alert files (one Kafka message value each), directories of `.avro`
        /// files, or tarballs of them.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}
