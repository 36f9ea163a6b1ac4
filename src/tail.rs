//! `ztfhook tail`: a console consumer, to test a connection with the
//! bridge's own configuration (brokers, SASL, TLS, topics and templates) and
//! see what the alerts say.
//!
//! Invariant: it never commits offsets, and it consumes as its own
//! throw-away group (`<group.id>.tail.<pid>`), so it neither moves the
//! bridge's offsets nor takes partitions from a running bridge.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use serde_json::json;

use crate::alert::avro::Value;
use crate::alert::{Alert, Decoder, Survey};
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::source::subscription::{Subscription, SystemClock};

/// How `tail` prints each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One line: topic, partition, offset, survey, id, ra, dec, brightness, size.
    Line,
    /// The decoded alert as one JSON object per line (cutouts as their size).
    Json,
    /// The message values' bytes, unchanged, one after another.
    Raw,
}

/// What to tail.
#[derive(Debug, Clone)]
pub struct TailOptions {
    pub from_beginning: bool,
    pub max: Option<u64>,
    pub format: Format,
    /// Overrides the config's topics when not empty.
    pub topics: Vec<String>,
}

/// Where to tail from: the brokers' settings, the group the throw-away
/// group is named after, the topics, and the schemas of Rubin alerts.
#[derive(Debug, Clone)]
pub struct TailSource {
    /// librdkafka properties (secrets resolved: never printed).
    pub properties: std::collections::BTreeMap<String, String>,
    pub group: String,
    pub topics: Vec<String>,
    pub previous_nights: u32,
    pub alerts: crate::alert::SchemaSources,
}

impl TailSource {
    /// The bridge's own configuration.
    pub fn from_config(config: &Config) -> TailSource {
        TailSource {
            properties: config.kafka.properties.clone().into_iter().collect(),
            group: config.kafka.group_id().to_string(),
            topics: config.kafka.topics.clone(),
            previous_nights: config.kafka.previous_nights,
            alerts: config.alerts.clone(),
        }
    }

    /// What Kafka's console consumer is given: `--bootstrap-server`,
    /// `--consumer.config FILE` (Java properties) and a JAAS file (from
    /// `--jaas` or `KAFKA_OPTS=-Djava.security.auth.login.config=FILE`).
    /// Returns the settings not used, each with why.
    ///
    /// # Errors
    /// A file that cannot be read, naming it.
    pub fn from_console(
        bootstrap: Option<&str>,
        consumer_config: Option<&std::path::Path>,
        jaas: Option<&std::path::Path>,
    ) -> Result<(TailSource, Vec<String>), TailError> {
        use crate::connect::client::{Client, Setting};
        let mut settings = Vec::new();
        if let Some(path) = consumer_config {
            let props = crate::connect::properties::Properties::load(path)
                .map_err(|e| TailError::Input(e.to_string()))?;
            for e in props.entries() {
                settings.push(Setting::from_entry(&props, e, &e.key));
            }
        }
        if let Some(b) = bootstrap {
            settings.push(Setting {
                key: "bootstrap.servers".into(),
                value: b.to_string(),
                at: "--bootstrap-server".into(),
            });
        }
        let mut client = Client::translate(&settings);
        if let Some(path) = jaas {
            let text = std::fs::read_to_string(path)
                .map_err(|e| TailError::Input(format!("{}: {e}", path.display())))?;
            let sections = crate::connect::jaas::parse_file(&text)
                .map_err(|e| TailError::Input(format!("{}: {e}", path.display())))?;
            let Some(modules) = sections.get("KafkaClient") else {
                return Err(TailError::Input(format!(
                    "{}: no KafkaClient section (the one Kafka's clients read)",
                    path.display()
                )));
            };
            for m in modules {
                client.login_module(m, &path.display().to_string());
            }
        }
        let mut properties = client.resolved();
        if !properties.contains_key("bootstrap.servers") {
            return Err(TailError::Input(
                "no brokers: give --bootstrap-server HOST:PORT (or bootstrap.servers in --consumer.config)".into(),
            ));
        }
        let group = properties
            .remove("group.id")
            .unwrap_or_else(|| "console-consumer".into());
        Ok((
            TailSource {
                properties,
                group,
                topics: Vec::new(),
                previous_nights: 0,
                alerts: crate::alert::SchemaSources::default(),
            },
            client.notes,
        ))
    }
}

/// The JAAS file `KAFKA_OPTS` names (`-Djava.security.auth.login.config=FILE`),
/// as Kafka's scripts pass it to Java.
pub fn jaas_from_kafka_opts(opts: &str) -> Option<std::path::PathBuf> {
    opts.split_whitespace()
        .find_map(|o| o.strip_prefix("-Djava.security.auth.login.config="))
        .map(|p| std::path::PathBuf::from(p.trim_matches(['"', '\''])))
}

/// Why `tail` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("{0}")]
    Input(String),
    #[error("writing to stdout: {0}")]
    Output(#[from] std::io::Error),
}

/// Consumes and prints until `max` messages, or `shutdown`.
///
/// # Errors
/// [`TailError`] if the consumer can't be created or subscribed, or stdout
/// closes.
pub fn run(
    source: &TailSource,
    options: &TailOptions,
    shutdown: &Shutdown,
    out: &mut dyn Write,
) -> Result<u64, TailError> {
    let mut cc = rdkafka::ClientConfig::new();
    for (k, v) in &source.properties {
        cc.set(k, v);
    }
    let group = format!("{}.tail.{}", source.group, std::process::id());
    cc.set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if options.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        );
    let consumer: BaseConsumer = cc.create().map_err(|e| TailError::Kafka(e.to_string()))?;
    let topics = if options.topics.is_empty() {
        source.topics.clone()
    } else {
        options.topics.clone()
    };
    let subscription = Subscription::new(topics, source.previous_nights, Arc::new(SystemClock));
    let patterns = subscription.patterns();
    if patterns.is_empty() {
        return Err(TailError::Input("no topic: give --topic".into()));
    }
    let list: Vec<&str> = patterns.iter().map(String::as_str).collect();
    consumer
        .subscribe(&list)
        .map_err(|e| TailError::Kafka(format!("subscribing to {patterns:?}: {e}")))?;
    tracing::info!("tailing {patterns:?} (group {group}, never committed)");
    let decoder = Decoder::new(source.alerts.clone());
    let mut printed = 0;
    let mut last_error = Instant::now() - Duration::from_secs(60);
    while !shutdown.is_stopping() && options.max.is_none_or(|m| printed < m) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
                match options.format {
                    Format::Raw => out.write_all(&payload)?,
                    Format::Line => {
                        let line = line(&decoder, &payload);
                        writeln!(
                            out,
                            "{} {} {} {line} size={}",
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            payload.len()
                        )?;
                    }
                    Format::Json => {
                        let alert = match decoder.decode(&payload) {
                            Ok(a) => a.to_json(a.root()),
                            Err(e) => json!({ "error": e.to_string() }),
                        };
                        let record = json!({
                            "topic": m.topic(),
                            "partition": m.partition(),
                            "offset": m.offset(),
                            "survey": decoder.survey(&payload).as_str(),
                            "size": payload.len(),
                            "alert": alert,
                        });
                        writeln!(out, "{record}")?;
                    }
                }
                out.flush()?;
                printed += 1;
            }
            Some(Err(e)) if last_error.elapsed() > Duration::from_secs(5) => {
                tracing::warn!("kafka: {e}");
                last_error = Instant::now();
            }
            Some(Err(_)) | None => {}
        }
    }
    Ok(printed)
}

fn number(alert: &Alert, record: Value, path: &str) -> String {
    let mut v = record;
    for step in path.split('.') {
        match alert.field(v, step) {
            Some(next) => v = next,
            None => return "-".into(),
        }
    }
    match v {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => format!("{f:.6}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string(),
        Value::Str(s) => alert.text(s).unwrap_or("-").to_string(),
        _ => "-".into(),
    }
}

/// `survey id ra dec brightness` for one payload.
fn line(decoder: &Decoder, payload: &Bytes) -> String {
    let alert = match decoder.decode(payload) {
        Ok(a) => a,
        Err(e) => return format!("{} undecoded: {e}", decoder.survey(payload).as_str()),
    };
    let root = alert.root();
    let n = |path: &str| number(&alert, root, path);
    match alert.survey {
        Survey::Ztf => format!(
            "ztf objectId={} candid={} ra={} dec={} magpsf={} fid={}",
            n("objectId"),
            n("candid"),
            n("candidate.ra"),
            n("candidate.dec"),
            n("candidate.magpsf"),
            n("candidate.fid")
        ),
        Survey::Lsst => format!(
            "lsst diaSourceId={} ra={} dec={} psfFlux={} band={}",
            n("diaSource.diaSourceId"),
            n("diaSource.ra"),
            n("diaSource.dec"),
            n("diaSource.psfFlux"),
            n("diaSource.band")
        ),
        Survey::Unknown => format!("unknown record={}", alert.record_name(root)),
    }
}
