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

/// Why `tail` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("writing to stdout: {0}")]
    Output(#[from] std::io::Error),
}

/// Consumes and prints until `max` messages, or `shutdown`.
///
/// # Errors
/// [`TailError`] if the consumer can't be created or subscribed, or stdout
/// closes.
pub fn run(
    config: &Config,
    options: &TailOptions,
    shutdown: &Shutdown,
    out: &mut dyn Write,
) -> Result<u64, TailError> {
    let mut cc = rdkafka::ClientConfig::new();
    for (k, v) in &config.kafka.properties {
        cc.set(k, v);
    }
    let group = format!("{}.tail.{}", config.kafka.group_id(), std::process::id());
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
        config.kafka.topics.clone()
    } else {
        options.topics.clone()
    };
    let subscription =
        Subscription::new(topics, config.kafka.previous_nights, Arc::new(SystemClock));
    let patterns = subscription.patterns();
    let list: Vec<&str> = patterns.iter().map(String::as_str).collect();
    consumer
        .subscribe(&list)
        .map_err(|e| TailError::Kafka(format!("subscribing to {patterns:?}: {e}")))?;
    tracing::info!("tailing {patterns:?} (group {group}, never committed)");
    let decoder = Decoder::new(config.alerts.clone());
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
