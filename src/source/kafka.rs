//! The Kafka consumer: creation, start-up checks, subscription, rebalances and
//! commits.
//!
//! Invariants:
//! - librdkafka never commits or stores offsets by itself
//!   (`enable.auto.commit=false`, `enable.auto.offset.store=false`); every
//!   commit comes from the [`Ledger`]'s safe offsets;
//! - the rebalance and commit callbacks only hand their news to the consumer
//!   loop's ledger ([`crate::source::consumer`]), which owns what they change;
//!   they run inside `poll`, on the loop's thread.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::Config;
use crate::envelope::{Envelope, Header};
use crate::metrics::Metrics;
use crate::offsets::PartitionKey;
use crate::source::consumer::{lock, ConsumeError, Partitions, Polled, SharedLedger, Source};
use crate::source::subscription::Subscription;

/// How long the start-up check waits for the brokers.
const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors from the Kafka side; each names its subject.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// librdkafka refused the configuration (its words, secrets removed).
    #[error("kafka: cannot create the consumer: {reason}")]
    Create { reason: String },
    #[error("kafka: cannot create the consumer: sasl.kerberos.keytab `{keytab}` cannot be read: {source}")]
    Keytab {
        keytab: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kafka: cannot create the consumer: sasl.mechanism GSSAPI logs in with `kinit`, which is not on the PATH (Debian: apt-get install krb5-user)")]
    NoKinit,
    /// The start-up metadata request failed: librdkafka's last error, with
    /// what to check for the configured authentication.
    #[error("kafka: the brokers at `{servers}` did not answer: {reason}")]
    Unreachable { servers: String, reason: String },
    #[error("kafka topic `{topic}` does not exist on `{servers}`")]
    TopicNotFound { topic: String, servers: String },
    #[error("kafka topic `{topic}`: {source}")]
    Topic {
        topic: String,
        #[source]
        source: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("kafka: cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka: commit failed: {0}")]
    Commit(#[source] rdkafka::error::KafkaError),
    #[error("kafka: commit failed: the consumer has no queue for the answer")]
    CommitNoQueue,
}

/// librdkafka callbacks: statistics, errors, and rebalances and commit
/// answers, which go to the consumer loop's [`Ledger`].
pub struct SourceContext {
    ledger: SharedLedger,
    metrics: Arc<Metrics>,
    /// The last error librdkafka reported, to explain a failed start-up check.
    last_error: Mutex<Option<String>>,
    /// The last failed Kerberos login (librdkafka's `kinit` run), likewise.
    kerberos_error: Mutex<Option<String>>,
}

impl SourceContext {
    pub(crate) fn new(ledger: SharedLedger, metrics: Arc<Metrics>) -> SourceContext {
        SourceContext {
            ledger,
            metrics,
            last_error: Mutex::new(None),
            kerberos_error: Mutex::new(None),
        }
    }

    fn last_error(&self) -> Option<String> {
        latest(&self.last_error)
    }

    fn kerberos_error(&self) -> Option<String> {
        latest(&self.kerberos_error)
    }
}

/// What one of the context's last-error slots holds.
fn latest(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|(p, _)| **p >= 0)
            .map(|(_, p)| p.consumer_lag.max(0))
            .sum();
        self.metrics.lag.store(lag, Ordering::Relaxed);
        let per_partition = statistics
            .topics
            .iter()
            .flat_map(|(name, t)| {
                t.partitions
                    .iter()
                    .filter(|(p, s)| **p >= 0 && s.consumer_lag >= 0)
                    .map(move |(p, s)| ((name.clone(), *p), s.consumer_lag))
            })
            .collect();
        *self
            .metrics
            .partition_lag
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = per_partition;
    }

    /// librdkafka's log lines, to the program's log; a failed Kerberos
    /// login is also kept, to name it if the start-up check then fails.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, line: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                if fac == "SASLREFRESH" {
                    // Without librdkafka's thread tag: `[thrd:main]: ...`.
                    let text = match line.split_once("]: ") {
                        Some((tag, rest)) if tag.starts_with("[thrd:") => rest,
                        _ => line,
                    };
                    *self
                        .kerberos_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(text.to_string());
                }
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {line}");
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {line}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {line}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {line}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!("kafka: {error}: {reason}");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                tracing::info!("kafka: revoking {}", describe(tpl));
                lock(&self.ledger).on_revoke(&keys(tpl), consumer);
            }
            Rebalance::Error(e) => {
                tracing::warn!("kafka: rebalance error: {e}");
                let lost = consumer.assignment().map(|a| keys(&a)).unwrap_or_default();
                lock(&self.ledger).on_lost(&lost, consumer);
            }
            Rebalance::Assign(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!("kafka: assigned {}", describe(tpl));
            lock(&self.ledger).on_assign(&keys(tpl), consumer);
        }
    }

    /// librdkafka reports a commit's overall result and, separately, each
    /// partition's: a partition that failed is a failed commit even when the
    /// overall result is a success.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        tracing::debug!(
            "kafka: commit answered: {result:?} for {}",
            describe(offsets)
        );
        let mut ok = Vec::new();
        let mut failed = Vec::new();
        let mut why = result.as_ref().err().map(ToString::to_string);
        for e in offsets.elements() {
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            let k = key(e.topic(), e.partition());
            match e.error() {
                Err(err) => {
                    why.get_or_insert_with(|| err.to_string());
                    failed.push((k, o));
                }
                Ok(()) if result.is_err() => failed.push((k, o)),
                Ok(()) => ok.push((k, o)),
            }
        }
        let mut ledger = lock(&self.ledger);
        if !failed.is_empty() || why.is_some() {
            ledger.on_commit(Err(why.unwrap_or_else(|| "failed".into())), &failed);
        }
        if !ok.is_empty() || failed.is_empty() && result.is_ok() {
            ledger.on_commit(Ok(()), &ok);
        }
    }
}

fn key(topic: &str, partition: i32) -> PartitionKey {
    PartitionKey {
        topic: Arc::from(topic),
        partition,
    }
}

fn keys(tpl: &TopicPartitionList) -> Vec<PartitionKey> {
    tpl.elements()
        .iter()
        .map(|e| key(e.topic(), e.partition()))
        .collect()
}

fn list(partitions: &[PartitionKey]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for k in partitions {
        tpl.add_partition(&k.topic, k.partition);
    }
    tpl
}

impl Partitions for BaseConsumer<SourceContext> {
    fn pause(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        Consumer::pause(self, &list(partitions)).map_err(|e| e.to_string())
    }

    fn resume(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        Consumer::resume(self, &list(partitions)).map_err(|e| e.to_string())
    }

    fn commit(&self, offsets: &[(PartitionKey, i64)], mode: CommitMode) -> Result<(), String> {
        commit(self, offsets, mode).map_err(|e| e.to_string())
    }
}

/// The consumer loop's [`Source`]: librdkafka's consumer.
pub(crate) struct KafkaSource {
    pub(crate) consumer: BaseConsumer<SourceContext>,
    /// Topic names shared by every message of a topic.
    topics: HashMap<String, Arc<str>>,
}

impl KafkaSource {
    pub(crate) fn new(consumer: BaseConsumer<SourceContext>) -> KafkaSource {
        KafkaSource {
            consumer,
            topics: HashMap::new(),
        }
    }
}

impl Partitions for KafkaSource {
    fn pause(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        Partitions::pause(&self.consumer, partitions)
    }

    fn resume(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        Partitions::resume(&self.consumer, partitions)
    }

    fn commit(&self, offsets: &[(PartitionKey, i64)], mode: CommitMode) -> Result<(), String> {
        Partitions::commit(&self.consumer, offsets, mode)
    }
}

impl Source for KafkaSource {
    fn poll(&mut self, timeout: Duration) -> Polled {
        match self.consumer.poll(timeout) {
            Some(Ok(message)) => Polled::Message(envelope(&message, &mut self.topics)),
            Some(Err(e)) => Polled::Error(consume_error(&e)),
            None => Polled::Idle,
        }
    }

    fn assignment(&self) -> Result<Vec<PartitionKey>, String> {
        self.consumer
            .assignment()
            .map(|a| keys(&a))
            .map_err(|e| e.to_string())
    }

    fn subscribe(&self, patterns: &[String]) -> Result<(), String> {
        subscribe(&self.consumer, patterns).map_err(|e| e.to_string())
    }
}

/// A poll's error as the loop classifies it.
fn consume_error(e: &KafkaError) -> ConsumeError {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e {
        KafkaError::PartitionEOF(_) => ConsumeError {
            code: C::PartitionEOF,
            fatal: false,
            at: None,
        },
        KafkaError::MessageConsumption(code) => ConsumeError {
            code: *code,
            fatal: false,
            at: None,
        },
        KafkaError::MessageConsumptionFatal(code) => ConsumeError {
            code: *code,
            fatal: true,
            at: None,
        },
        other => ConsumeError {
            code: other.rdkafka_error_code().unwrap_or(C::Fail),
            fatal: false,
            at: None,
        },
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
    for e in tpl.elements() {
        by_topic
            .entry(e.topic().to_string())
            .or_default()
            .push(e.partition());
    }
    let mut parts: Vec<String> = by_topic
        .into_iter()
        .map(|(t, mut ps)| {
            ps.sort_unstable();
            format!("{t}{ps:?}")
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        "no partitions".into()
    } else {
        parts.join(" ")
    }
}

/// Commits offsets (each the next offset to consume).
///
/// # Errors
/// [`SourceError::Commit`] with librdkafka's reason.
pub fn commit(
    consumer: &BaseConsumer<SourceContext>,
    offsets: &[(PartitionKey, i64)],
    mode: CommitMode,
) -> Result<(), SourceError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (k, o) in offsets {
        tpl.add_partition_offset(&k.topic, k.partition, Offset::Offset(*o))
            .map_err(SourceError::Commit)?;
    }
    match mode {
        CommitMode::Sync => Consumer::commit(consumer, &tpl, mode).map_err(SourceError::Commit),
        CommitMode::Async => commit_async(consumer, &tpl),
    }
}

/// An asynchronous commit whose answer reaches
/// [`ConsumerContext::commit_callback`] from the next poll.
///
/// rust-rdkafka 0.38's `commit(.., CommitMode::Async)` hands librdkafka
/// neither a reply queue nor a callback, so the answer is dropped and the
/// context never hears of it (fede1024/rust-rdkafka#856; the fix, #857, is
/// not released). As that fix does, the commit is sent with
/// `rd_kafka_commit_queue` naming the consumer queue, which the consumer's
/// `poll` serves: the answer arrives there as an offset-commit event.
fn commit_async(
    consumer: &BaseConsumer<SourceContext>,
    tpl: &TopicPartitionList,
) -> Result<(), SourceError> {
    use rdkafka::bindings as rd;
    let rk = consumer.client().native_ptr();
    // SAFETY: `rk` is the live handle `consumer` owns; the queue reference
    // taken here is released before returning (librdkafka keeps its own for
    // the reply); `tpl` outlives the call, which copies it.
    let err = unsafe {
        let queue = rd::rd_kafka_queue_get_consumer(rk);
        if queue.is_null() {
            return Err(SourceError::CommitNoQueue);
        }
        let err = rd::rd_kafka_commit_queue(rk, tpl.ptr(), queue, None, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(SourceError::Commit(
            rdkafka::error::KafkaError::ConsumerCommit(err.into()),
        ))
    }
}

/// Creates the consumer from the validated properties.
///
/// # Errors
/// [`SourceError::Create`] if librdkafka refuses the configuration.
pub fn create(
    config: &Config,
    context: SourceContext,
) -> Result<BaseConsumer<SourceContext>, SourceError> {
    check_kerberos(config)?;
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka.properties {
        cc.set(k, v);
    }
    cc.set("enable.auto.commit", "false");
    cc.set("enable.auto.offset.store", "false");
    let stats_ms = config.pipeline.stats_interval.as_millis();
    if stats_ms > 0
        && !config
            .kafka
            .properties
            .contains_key("statistics.interval.ms")
    {
        cc.set("statistics.interval.ms", stats_ms.to_string());
    }
    cc.create_with_context(context)
        .map_err(|e| SourceError::Create {
            reason: redact(config, &e.to_string()),
        })
}

/// With GSSAPI, what librdkafka's login needs before it runs: a readable
/// keytab, and `kinit` on the PATH (unless `sasl.kerberos.kinit.cmd` is
/// replaced). librdkafka would only log a failed `kinit` and go on.
fn check_kerberos(config: &Config) -> Result<(), SourceError> {
    let props = &config.kafka.properties;
    if !props
        .get("sasl.mechanism")
        .is_some_and(|m| m.eq_ignore_ascii_case("GSSAPI"))
    {
        return Ok(());
    }
    if let Some(keytab) = props.get("sasl.kerberos.keytab") {
        if let Err(source) = std::fs::File::open(keytab) {
            return Err(SourceError::Keytab {
                keytab: keytab.clone(),
                source,
            });
        }
    }
    if !props.contains_key("sasl.kerberos.kinit.cmd") && !on_path("kinit") {
        return Err(SourceError::NoKinit);
    }
    Ok(())
}

/// Whether `program` is an executable file in a directory of `PATH`.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Removes secret values from a librdkafka message.
fn redact(config: &Config, text: &str) -> String {
    crate::secret::scrub(
        text,
        config
            .kafka
            .properties
            .iter()
            .filter(|(k, _)| crate::config::is_secret_property(k))
            .map(|(_, v)| v.as_str()),
    )
}

/// Checks that the brokers answer and that every named topic exists, then
/// subscribes.
///
/// # Errors
/// [`SourceError`] naming the brokers or the topic at fault.
pub fn check_and_subscribe(
    consumer: &BaseConsumer<SourceContext>,
    config: &Config,
    subscription: &Subscription,
) -> Result<Vec<String>, SourceError> {
    let servers = config
        .kafka
        .properties
        .get("bootstrap.servers")
        .cloned()
        .unwrap_or_default();
    let metadata = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| {
            let mut message = e.to_string();
            // librdkafka reports the cause (an authentication failure, say)
            // as an event: give it a moment to arrive.
            let deadline = Instant::now() + Duration::from_secs(1);
            while consumer.context().last_error().is_none()
                && Instant::now() < deadline
            {
                let _ = consumer.poll(Duration::from_millis(100));
            }
            if let Some(last) = consumer.context().last_error() {
                message = format!("{message} (last error: {last})");
            }
            if let Some(kinit) = consumer.context().kerberos_error() {
                message = format!("{message}; the Kerberos login failed: {kinit}");
            }
            match config.kafka.properties.get("sasl.mechanism") {
                Some(m) if m.eq_ignore_ascii_case("GSSAPI") => {
                    message = format!(
                        "{message}; SASL authentication (GSSAPI) is configured: a failed login can show only as this failure, so check that `kinit -k -t KEYTAB PRINCIPAL` works with sasl.kerberos.keytab and sasl.kerberos.principal, that krb5.conf (or KRB5_CONFIG) names the realm and its KDC, and sasl.kerberos.service.name and security.protocol"
                    );
                }
                Some(m) => {
                    message = format!(
                        "{message}; SASL authentication ({m}) is configured: wrong credentials can show only as this failure, so check sasl.username and sasl.password and security.protocol"
                    );
                }
                None => {}
            }
            SourceError::Unreachable {
                servers: servers.clone(),
                reason: redact(config, &message),
            }
        })?;
    for name in subscription.names() {
        match metadata.topics().iter().find(|t| t.name() == name) {
            None => {
                return Err(SourceError::TopicNotFound {
                    topic: name.to_string(),
                    servers,
                })
            }
            Some(t) => match t.error() {
                None => {}
                Some(e) => {
                    let code = rdkafka::types::RDKafkaErrorCode::from(e);
                    if code == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition {
                        return Err(SourceError::TopicNotFound {
                            topic: name.to_string(),
                            servers,
                        });
                    }
                    return Err(SourceError::Topic {
                        topic: name.to_string(),
                        source: code,
                    });
                }
            },
        }
    }
    if subscription.has_templates() {
        let nightly = subscription.nightly_topics();
        let present: Vec<&String> = nightly
            .iter()
            .filter(|n| metadata.topics().iter().any(|t| &t.name() == n))
            .collect();
        if present.is_empty() {
            tracing::warn!(
                "none of tonight's topics exist yet ({}); they are picked up when they appear",
                nightly.join(", ")
            );
        } else {
            tracing::info!("nightly topics present: {present:?}");
        }
    }
    let patterns = subscription.patterns();
    subscribe(consumer, &patterns)?;
    Ok(patterns)
}

/// Subscribes to topic names and regular expressions, replacing the
/// previous subscription (partitions that no longer match are revoked, and
/// their offsets committed, by the rebalance).
///
/// # Errors
/// [`SourceError::Subscribe`] with librdkafka's reason.
pub fn subscribe(
    consumer: &BaseConsumer<SourceContext>,
    patterns: &[String],
) -> Result<(), SourceError> {
    let topics: Vec<&str> = patterns.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| SourceError::Subscribe {
            topics: patterns.to_vec(),
            source: e,
        })
}

/// Copies a message out of librdkafka's buffer: the payload's one copy.
pub fn envelope(message: &BorrowedMessage<'_>, topics: &mut HashMap<String, Arc<str>>) -> Envelope {
    let topic = match topics.get(message.topic()) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = Arc::from(message.topic());
            topics.insert(message.topic().to_string(), Arc::clone(&t));
            t
        }
    };
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    name: h.key.to_string(),
                    value: h.value.map(Bytes::copy_from_slice),
                })
                .collect()
        })
        .unwrap_or_default();
    Envelope {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message.key().map(Bytes::copy_from_slice),
        headers,
        tombstone: message.payload().is_none(),
        payload: message
            .payload()
            .map(Bytes::copy_from_slice)
            .unwrap_or_default(),
        epoch: 0,
        archive: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_is_built_for_kerberos_scram_tls_and_zstd() {
        let native = ClientConfig::new()
            .create_native_config()
            .expect("native config");
        let features = native.get("builtin.features").expect("builtin.features");
        let features: Vec<&str> = features.split(',').collect();
        for needed in ["sasl_gssapi", "sasl_scram", "ssl", "zstd"] {
            assert!(
                features.contains(&needed),
                "librdkafka lacks {needed}: {features:?}"
            );
        }
    }

    #[test]
    fn partitions_are_described_by_topic() {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("b", 1);
        tpl.add_partition("a", 2);
        tpl.add_partition("a", 0);
        assert_eq!(describe(&tpl), "a[0, 2] b[1]");
        assert_eq!(describe(&TopicPartitionList::new()), "no partitions");
    }
}
