//! Publishing to Pub/Sub with the official `google-cloud-pubsub` crate.
//!
//! Invariants:
//! - one [`Publisher`] per destination topic, shared by all workers, so each
//!   topic batches on its own (`batching.*`) over one gRPC channel pool;
//! - every message handed to [`PubsubSink::publish`] ends in exactly one
//!   [`Ack`]: `Published` once Pub/Sub returned a message id for every
//!   destination, or `Failed` after a permanent error (which also stops the
//!   bridge). Transient errors are retried with backoff, without limit: a
//!   message is never dropped because Pub/Sub was unavailable;
//! - the crate's publisher queues without bound; the pipeline's in-flight
//!   limits are what bound it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher, TopicAdmin};
use google_cloud_pubsub::model::Message;

use crate::attributes::{self, Attributes};
use crate::config::{AttributeOptions, Batching, Config, TopicName};
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::offsets::{Ack, Outcome};
use crate::shutdown::Shutdown;

/// How long the crate retries a transient error itself before handing it to
/// ztfhook's own retry loop (which logs and retries again, without limit).
const CRATE_RETRY_LIMIT: Duration = Duration::from_secs(10);
/// Backoff of ztfhook's own retry loop.
const RETRY_INITIAL: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a topic may be missing at run time before that is fatal: long
/// enough for an emulator restart or a deleted topic to be recreated, short
/// enough that a hook's typo stops the bridge in a minute. (A missing
/// configured topic at start-up is fatal at once.)
const NOT_FOUND_GRACE: Duration = Duration::from_secs(60);
/// How long the start-up check waits for Pub/Sub to answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// Where and how to reach Pub/Sub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `PUBSUB_EMULATOR_HOST`: plain HTTP/2, anonymous credentials.
    Emulator(String),
    /// Google's API (or `pubsub.endpoint`), Application Default Credentials.
    Google(Option<String>),
}

impl Endpoint {
    /// `PUBSUB_EMULATOR_HOST` wins, as in Google's client libraries.
    pub fn resolve(configured: Option<&str>) -> Endpoint {
        match std::env::var("PUBSUB_EMULATOR_HOST") {
            Ok(host) if !host.trim().is_empty() => Endpoint::Emulator(host.trim().to_string()),
            _ => Endpoint::Google(configured.map(str::to_string)),
        }
    }

    fn url(&self) -> Option<String> {
        match self {
            Endpoint::Emulator(host) => Some(format!("http://{host}")),
            Endpoint::Google(url) => url.clone(),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Emulator(host) => write!(f, "the Pub/Sub emulator at {host}"),
            Endpoint::Google(Some(url)) => write!(f, "Pub/Sub at {url}"),
            Endpoint::Google(None) => write!(f, "Pub/Sub"),
        }
    }
}

/// Errors that stop the sink; each names its subject.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{endpoint}: cannot create a client: {message}")]
    Client { endpoint: String, message: String },
    #[error("pubsub topic `{topic}` does not exist (create it, or fix pubsub.topic / pubsub.dead_letter_topic)")]
    TopicNotFound { topic: String },
    #[error("pubsub topic `{topic}`: permission denied: {message}")]
    PermissionDenied { topic: String, message: String },
    #[error("pubsub topic `{topic}`: {endpoint} did not answer: {message}")]
    Unreachable {
        topic: String,
        endpoint: String,
        message: String,
    },
}

/// What a worker hands to the sink: one message, its destinations and the
/// attributes already built for it.
#[derive(Debug)]
pub struct Delivery {
    pub envelope: Envelope,
    /// At least one.
    pub topics: Vec<TopicName>,
    pub attributes: Attributes,
    /// The hook's attributes, kept to rebuild the message for a retry.
    pub hook_attributes: Vec<(String, String)>,
    pub ordering_key: Option<String>,
}

/// Publishers per topic, and the task that sees each publish through.
pub struct PubsubSink {
    runtime: tokio::runtime::Handle,
    endpoint: Endpoint,
    base: BasePublisher,
    batching: Batching,
    options: AttributeOptions,
    dead_letter: Option<TopicName>,
    publishers: RwLock<HashMap<TopicName, Publisher>>,
    acks: Sender<Ack>,
    shutdown: Arc<Shutdown>,
    metrics: Arc<Metrics>,
}

fn credentials(endpoint: &Endpoint) -> Option<google_cloud_auth::credentials::Credentials> {
    match endpoint {
        Endpoint::Emulator(_) => {
            Some(google_cloud_auth::credentials::anonymous::Builder::new().build())
        }
        Endpoint::Google(_) => None,
    }
}

/// Whether a publish error says the topic does not exist.
fn is_not_found(error: &google_cloud_pubsub::Error) -> bool {
    match error.status() {
        Some(status) => status.code == Code::NotFound,
        None => error.http_status_code() == Some(404),
    }
}

/// Whether a publish error will not go away by retrying.
fn is_permanent(error: &google_cloud_pubsub::Error) -> bool {
    match error.status() {
        Some(status) => matches!(
            status.code,
            Code::NotFound
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unimplemented
                | Code::OutOfRange
        ),
        None => matches!(error.http_status_code(), Some(400 | 403 | 404)),
    }
}

/// Checks that each topic exists and is reachable, naming the one that is not.
///
/// # Errors
/// [`SinkError`] for the first topic that fails.
pub async fn check_topics(endpoint: &Endpoint, topics: &[&TopicName]) -> Result<(), SinkError> {
    let mut builder = TopicAdmin::builder();
    if let Some(url) = endpoint.url() {
        builder = builder.with_endpoint(url);
    }
    if let Some(c) = credentials(endpoint) {
        builder = builder.with_credentials(c);
    }
    let admin = builder.build().await.map_err(|e| SinkError::Client {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    })?;
    for topic in topics {
        let answer = tokio::time::timeout(
            CHECK_TIMEOUT,
            admin.get_topic().set_topic(topic.as_str()).send(),
        )
        .await;
        let unreachable = |message: String| SinkError::Unreachable {
            topic: topic.to_string(),
            endpoint: endpoint.to_string(),
            message,
        };
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(match e.status().map(|s| s.code) {
                    Some(Code::NotFound) => SinkError::TopicNotFound {
                        topic: topic.to_string(),
                    },
                    Some(Code::PermissionDenied) => SinkError::PermissionDenied {
                        topic: topic.to_string(),
                        message: e.to_string(),
                    },
                    _ => unreachable(e.to_string()),
                })
            }
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer in {}s",
                    CHECK_TIMEOUT.as_secs()
                )))
            }
        }
    }
    Ok(())
}

impl PubsubSink {
    /// Connects (lazily: no request is made until the first publish).
    ///
    /// # Errors
    /// [`SinkError::Client`] if the client cannot be built (e.g. no credentials).
    pub async fn connect(
        config: &Config,
        endpoint: Endpoint,
        acks: Sender<Ack>,
        shutdown: Arc<Shutdown>,
        metrics: Arc<Metrics>,
    ) -> Result<PubsubSink, SinkError> {
        let mut builder = BasePublisher::builder().with_retry_policy(
            google_cloud_pubsub::retry_policy::RetryableErrors.with_time_limit(CRATE_RETRY_LIMIT),
        );
        if let Some(url) = endpoint.url() {
            builder = builder.with_endpoint(url);
        }
        if let Some(c) = credentials(&endpoint) {
            builder = builder.with_credentials(c);
        }
        let base = builder.build().await.map_err(|e| SinkError::Client {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
        Ok(PubsubSink {
            runtime: tokio::runtime::Handle::current(),
            endpoint,
            base,
            batching: config.batching,
            options: config.attributes,
            dead_letter: config.pubsub.dead_letter_topic.clone(),
            publishers: RwLock::new(HashMap::new()),
            acks,
            shutdown,
            metrics,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The shared publisher of a topic, created on first use.
    pub fn publisher(&self, topic: &TopicName) -> Publisher {
        if let Some(p) = self
            .publishers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
        {
            return p.clone();
        }
        let mut map = self.publishers.write().unwrap_or_else(|e| e.into_inner());
        map.entry(topic.clone())
            .or_insert_with(|| {
                let _enter = self.runtime.enter();
                self.base
                    .publisher(topic.as_str())
                    .set_message_count_threshold(self.batching.max_messages)
                    .set_byte_threshold(self.batching.max_bytes)
                    .set_delay_threshold(self.batching.max_delay)
                    .build()
            })
            .clone()
    }

    /// Publishes one message to each of its topics, and acknowledges it when
    /// all have accepted it. Never blocks.
    pub fn publish(self: &Arc<Self>, publishers: &[Publisher], delivery: Delivery) {
        let Delivery {
            envelope,
            topics,
            attributes,
            hook_attributes,
            ordering_key,
        } = delivery;
        let size = envelope.payload.len();
        let first = Message::new()
            .set_data(envelope.payload.clone())
            .set_attributes(attributes.map)
            .set_ordering_key(ordering_key.clone().unwrap_or_default());
        let job = Arc::new(Job {
            envelope,
            hook_attributes,
            ordering_key,
            remaining: AtomicUsize::new(topics.len()),
            failed: AtomicBool::new(false),
        });
        let count = topics.len();
        let mut first = Some(first);
        for (i, (topic, publisher)) in topics
            .into_iter()
            .zip(publishers.iter().cloned())
            .enumerate()
        {
            // The last destination takes the message; the others get clones.
            let message = if i + 1 == count {
                first.take().expect("taken once, at the end")
            } else {
                first.clone().expect("present until the end")
            };
            let sink = Arc::clone(self);
            let job = Arc::clone(&job);
            self.runtime.spawn(async move {
                let ok = sink
                    .deliver(&publisher, &topic, &job, message, || {
                        job.rebuild(&sink.options)
                    })
                    .await;
                if !ok {
                    job.failed.store(true, Ordering::SeqCst);
                }
                if job.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let outcome = if job.failed.load(Ordering::SeqCst) {
                        Outcome::Failed
                    } else {
                        Outcome::Published { bytes: size }
                    };
                    sink.ack(&job.envelope, outcome);
                }
            });
        }
    }

    fn ack(&self, envelope: &Envelope, outcome: Outcome) {
        let _ = self.acks.send(Ack::new(envelope, outcome));
    }

    /// Publishes until Pub/Sub accepts, retrying transient errors; false after
    /// a permanent error (which also stops the bridge). The crate consumes what
    /// it publishes, so `again` makes the message anew for each retry.
    async fn deliver(
        &self,
        publisher: &Publisher,
        topic: &TopicName,
        job: &Job,
        first: Message,
        again: impl Fn() -> Message,
    ) -> bool {
        let mut message = Some(first);
        let mut delay = RETRY_INITIAL;
        let mut attempt: u64 = 0;
        let mut missing_since: Option<std::time::Instant> = None;
        let started = std::time::Instant::now();
        loop {
            let m = message.take().unwrap_or_else(&again);
            let result = publisher.publish(m).await;
            if result.is_err() {
                self.metrics.publish_failed();
            }
            match result {
                Ok(_) => {
                    self.metrics.published_to(
                        topic.id(),
                        job.envelope.payload.len(),
                        started.elapsed(),
                    );
                    return true;
                }
                Err(google_cloud_pubsub::error::PublishError::Rpc(e))
                    if is_not_found(&e)
                        && missing_since
                            .get_or_insert_with(std::time::Instant::now)
                            .elapsed()
                            < NOT_FOUND_GRACE =>
                {
                    attempt += 1;
                    self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "pubsub topic `{topic}`: not found (attempt {attempt}); retrying for up to {NOT_FOUND_GRACE:?} in case it is being recreated"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(google_cloud_pubsub::error::PublishError::Rpc(e)) if is_permanent(&e) => {
                    self.shutdown.fail(format!(
                        "pubsub topic `{topic}`: publishing {}[{}]@{} failed permanently: {e}",
                        job.envelope.topic, job.envelope.partition, job.envelope.offset
                    ));
                    return false;
                }
                Err(e) => {
                    attempt += 1;
                    self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                    if attempt == 1 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "pubsub topic `{topic}`: publish failed (attempt {attempt}), retrying in {delay:?}: {e}"
                        );
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Sends a message that cannot go where it was going to the dead-letter
    /// topic, with the reason; stops the bridge if there is none.
    /// `with_payload` is false when the payload itself is the problem (too large):
    /// the message then carries empty data and the reason in `ztfhook.error`.
    pub fn dead_letter(
        self: &Arc<Self>,
        envelope: Envelope,
        destination: Option<&TopicName>,
        reason: String,
        with_payload: bool,
    ) {
        let Some(dlq) = self.dead_letter.clone() else {
            self.shutdown.fail(format!(
                "{}[{}]@{}: {reason}; no pubsub.dead_letter_topic is configured, so the bridge stops rather than skip it",
                envelope.topic, envelope.partition, envelope.offset
            ));
            self.ack(&envelope, Outcome::Failed);
            return;
        };
        tracing::warn!(
            "{}[{}]@{}: {reason}; sending it to the dead-letter topic `{dlq}`",
            envelope.topic,
            envelope.partition,
            envelope.offset
        );
        let everything = AttributeOptions {
            kafka_metadata: true,
            headers: false,
        };
        let mut attrs = attributes::build(&everything, &envelope, &[])
            .unwrap_or_default()
            .map;
        attrs.insert(
            attributes::ERROR.to_string(),
            truncate(&reason, attributes::MAX_VALUE_BYTES),
        );
        if let Some(d) = destination {
            attrs.insert(attributes::DESTINATION.to_string(), d.to_string());
        }
        let data = if with_payload {
            envelope.payload.clone()
        } else {
            Bytes::new()
        };
        let message = Message::new().set_data(data).set_attributes(attrs);
        let publisher = self.publisher(&dlq);
        let sink = Arc::clone(self);
        let job = Job {
            envelope,
            hook_attributes: Vec::new(),
            ordering_key: None,
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
        };
        self.runtime.spawn(async move {
            let first = message.clone();
            let outcome = if sink
                .deliver(&publisher, &dlq, &job, first, || message.clone())
                .await
            {
                Outcome::DeadLettered
            } else {
                Outcome::Failed
            };
            sink.ack(&job.envelope, outcome);
        });
    }

    /// Sends everything the publishers hold, and waits for the answers.
    pub async fn flush(&self) {
        let publishers: Vec<Publisher> = self
            .publishers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for p in publishers {
            p.flush().await;
        }
    }
}

/// One message on its way, shared by its destinations' tasks.
struct Job {
    envelope: Envelope,
    hook_attributes: Vec<(String, String)>,
    ordering_key: Option<String>,
    remaining: AtomicUsize,
    failed: AtomicBool,
}

impl Job {
    /// The message again, for a retry (the crate consumes what it publishes).
    fn rebuild(&self, options: &AttributeOptions) -> Message {
        let attrs =
            attributes::build(options, &self.envelope, &self.hook_attributes).unwrap_or_default();
        Message::new()
            .set_data(self.envelope.payload.clone())
            .set_attributes(attrs.map)
            .set_ordering_key(self.ordering_key.clone().unwrap_or_default())
    }
}

/// Cuts a string to at most `max` bytes at a character boundary.
pub fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_host_overrides_the_configured_endpoint() {
        // The only test in this crate that touches this variable.
        std::env::set_var("PUBSUB_EMULATOR_HOST", "127.0.0.1:8681");
        assert_eq!(
            Endpoint::resolve(Some("https://example.test")),
            Endpoint::Emulator("127.0.0.1:8681".into())
        );
        assert_eq!(
            Endpoint::Emulator("127.0.0.1:8681".into()).url().unwrap(),
            "http://127.0.0.1:8681"
        );
        std::env::remove_var("PUBSUB_EMULATOR_HOST");
        assert_eq!(
            Endpoint::resolve(Some("https://example.test")),
            Endpoint::Google(Some("https://example.test".into()))
        );
    }

    #[test]
    fn truncate_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
