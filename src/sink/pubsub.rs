//! Publishing to Pub/Sub with the official `google-cloud-pubsub` crate.
//!
//! Invariants:
//! - one [`Publisher`] per destination topic, shared by all workers, so each
//!   topic batches on its own (`batching.*`) over one gRPC channel pool;
//! - every message handed to [`PubsubSink::publish`] ends in exactly one
//!   [`Ack`]: `Published` once Pub/Sub returned a message id for every
//!   destination topic and Cloud Storage has every object
//!   ([`crate::sink::storage`]), `DeadLettered` when Pub/Sub refused it (alone: a refused
//!   request is retried message by message, so only the culprit takes the
//!   error policy), or `Failed` after a permanent error (which also stops the
//!   bridge). Transient errors are retried with backoff, without limit: a
//!   message is never dropped because Pub/Sub was unavailable;
//! - messages with an ordering key go through one lane per (topic, key),
//!   which publishes them in the order they came (a partition's order, since
//!   one worker takes a partition) and, after a failure, resumes the key and
//!   publishes the failed ones again in the same order before anything newer;
//! - a message without an ordering key is handed to the crate on the worker
//!   (its publish is a synchronous enqueue) and awaited by that worker's one
//!   completion task ([`PubsubSink::completions`]), which ends only when the
//!   worker has dropped its handle and every publish has answered; only a
//!   failed publish gets a task of its own, to retry it;
//! - the crate's publisher queues without bound; the pipeline's in-flight
//!   limits are what bound it.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{BasePublisher, Publisher, TopicAdmin};
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::publisher::PublishFuture;

use crate::attributes::{self, Attributes};
use crate::config::{AttributeOptions, Batching, Config, TopicName};
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::offsets::{Ack, Outcome};
use crate::shutdown::{Fatal, Shutdown};
use crate::sink::copies::{Copies, Held};

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
/// An ordering key's lane ends after this long with nothing to publish.
const LANE_IDLE: Duration = Duration::from_secs(30);
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
    /// With `objects`, at least one destination.
    pub topics: Vec<TopicName>,
    pub attributes: Attributes,
    /// The hook's attributes, kept to rebuild the message for a retry.
    pub hook_attributes: Vec<(String, String)>,
    pub ordering_key: Option<String>,
    /// Cloud Storage objects to write the payload to, beside the topics.
    pub objects: Vec<crate::objects::ObjectName>,
    /// The alert's BigQuery JSON form, for the `[bigquery] topics` among
    /// `topics`.
    pub json: Option<Bytes>,
    /// Its share of the bound on extra copies ([`PubsubSink::copies`]),
    /// given back when its last destination is done.
    pub held: Held,
}

/// The most publishers kept per map (the sink's, each worker's): a hook
/// that names a new topic per message must not grow them without end. Past
/// it one is closed (its pending messages are flushed first: the crate
/// flushes a dropped publisher, and each publish holds its own future) and
/// made again when its topic is named again. A lane keeps its own clone, so
/// a key's messages stay on one publisher.
pub const MAX_PUBLISHERS: usize = 512;

/// Makes room for one more entry in a map bounded by [`MAX_PUBLISHERS`].
fn make_room<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, what: &str) {
    if map.len() < MAX_PUBLISHERS {
        return;
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "more than {MAX_PUBLISHERS} destination topics in use: {what} publishers are closed and made again as needed"
        )
    });
    if let Some(k) = map.keys().next().cloned() {
        map.remove(&k);
    }
}

/// Publishers per topic, and the task that sees each publish through.
pub struct PubsubSink {
    runtime: tokio::runtime::Handle,
    base: BasePublisher,
    batching: Batching,
    options: AttributeOptions,
    dead_letter: Option<TopicName>,
    publishers: RwLock<HashMap<TopicName, Publisher>>,
    /// Unbatched publishers, to retry a refused request message by message.
    solos: Mutex<HashMap<TopicName, Publisher>>,
    /// One task per (topic, ordering key) with messages on their way.
    lanes: Mutex<HashMap<(TopicName, String), tokio::sync::mpsc::UnboundedSender<LaneItem>>>,
    acks: Sender<Ack>,
    shutdown: Arc<Shutdown>,
    metrics: Arc<Metrics>,
    /// Cloud Storage, when `[storage]` is configured.
    objects: Option<Arc<crate::sink::storage::ObjectSink>>,
    /// Topics whose messages carry the JSON form, not the payload.
    json_topics: std::collections::HashSet<TopicName>,
    /// The bound on fanned-out copies.
    copies: Arc<Copies>,
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

/// Whether Pub/Sub refused the request's content (one message of it, maybe).
fn is_refusal(error: &google_cloud_pubsub::Error) -> bool {
    match error.status() {
        Some(status) => status.code == Code::InvalidArgument,
        None => error.http_status_code() == Some(400),
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
        let objects = match &config.storage {
            Some(storage) if !config.pipeline.discard => Some(Arc::new(
                crate::sink::storage::ObjectSink::connect(storage, Arc::clone(&metrics)).await?,
            )),
            _ => None,
        };
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
        let copies = Copies::new(config.pipeline.max_in_flight_bytes, Arc::clone(&metrics));
        Ok(PubsubSink {
            runtime: tokio::runtime::Handle::current(),
            base,
            batching: config.batching,
            options: config.attributes,
            dead_letter: config.pubsub.dead_letter_topic.clone(),
            publishers: RwLock::new(HashMap::new()),
            solos: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            acks,
            shutdown,
            metrics,
            objects,
            json_topics: config.bigquery.topics.iter().cloned().collect(),
            copies,
        })
    }

    /// The bound on the copies a message holds beyond its payload (one per
    /// destination after the first, its JSON form): a worker takes its
    /// share before [`PubsubSink::publish`].
    pub(crate) fn copies(&self) -> &Arc<Copies> {
        &self.copies
    }

    /// Whether a topic's messages are the JSON form.
    pub fn is_json(&self, topic: &TopicName) -> bool {
        self.json_topics.contains(topic)
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
        if !map.contains_key(topic) {
            make_room(&mut map, "the sink's");
        }
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

    /// How many batching publishers the sink keeps now.
    #[cfg(test)]
    pub(crate) fn publishers_kept(&self) -> usize {
        self.publishers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// The topic's publisher for messages retried alone (no batching): to
    /// find which message of a refused request Pub/Sub objects to.
    fn solo(&self, topic: &TopicName) -> Publisher {
        let mut map = self.solos.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(topic) {
            make_room(&mut map, "unbatched");
        }
        map.entry(topic.clone())
            .or_insert_with(|| {
                let _enter = self.runtime.enter();
                self.base
                    .publisher(topic.as_str())
                    .set_message_count_threshold(1)
                    .set_delay_threshold(Duration::ZERO)
                    .build()
            })
            .clone()
    }

    /// Publishes one message to each of its topics, and acknowledges it when
    /// all have accepted it. Never blocks: each topic's publish is handed to
    /// the crate here and awaited by `completions`. Messages with an
    /// ordering key go through their key's lane, which keeps them in order
    /// across retries.
    pub fn publish(
        self: &Arc<Self>,
        completions: &Completions,
        publishers: &[Publisher],
        delivery: Delivery,
    ) {
        let Delivery {
            envelope,
            topics,
            attributes,
            hook_attributes,
            ordering_key,
            objects,
            json,
            held,
        } = delivery;
        let metadata = if objects.is_empty() {
            None
        } else {
            Some(attributes.map.clone())
        };
        let first = Message::new()
            .set_data(envelope.payload.clone())
            .set_attributes(attributes.map)
            .set_ordering_key(ordering_key.clone().unwrap_or_default());
        let key = ordering_key.clone().filter(|k| !k.is_empty());
        let job = Arc::new(Job {
            envelope,
            hook_attributes,
            ordering_key,
            json,
            remaining: AtomicUsize::new(topics.len() + objects.len()),
            failed: AtomicBool::new(false),
            refused: Mutex::new(None),
            _held: held,
        });
        if let Some(metadata) = metadata {
            self.write_objects(&job, objects, metadata);
        }
        let count = topics.len();
        let mut first = Some(first);
        for (i, (topic, publisher)) in topics
            .into_iter()
            .zip(publishers.iter().cloned())
            .enumerate()
        {
            // The last destination takes the message; the others get clones.
            let mut message = if i + 1 == count {
                first.take().expect("taken once, at the end")
            } else {
                first.clone().expect("present until the end")
            };
            if self.is_json(&topic) {
                message = message.set_data(job.json.clone().unwrap_or_default());
            }
            if let Some(key) = &key {
                self.to_lane(
                    &topic,
                    key,
                    &publisher,
                    LaneItem {
                        job: Arc::clone(&job),
                        message,
                    },
                );
                continue;
            }
            // The crate's publish is a synchronous enqueue: made here, on
            // the worker, and awaited by the worker's completion task.
            let started = std::time::Instant::now();
            let future = publisher.publish(message);
            completions.send(
                Sent {
                    job: Arc::clone(&job),
                    topic,
                    publisher,
                    started,
                },
                future,
            );
        }
    }

    /// Starts a completion task, for one worker: it awaits every publish
    /// the worker makes, finishes the accepted ones and hands a failed one
    /// to a task of its own ([`PubsubSink::deliver`]) that retries it. It
    /// ends when the worker drops its [`Completions`] and nothing is left
    /// to await.
    pub fn completions(self: &Arc<Self>) -> Completions {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.runtime.spawn(Arc::clone(self).complete(rx));
        Completions { tx }
    }

    async fn complete(self: Arc<Self>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Awaited>) {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut waiting = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                next = rx.recv(), if open => match next {
                    Some(awaited) => waiting.push(awaited.wait()),
                    None => open = false,
                },
                Some((sent, result)) = waiting.next(), if !waiting.is_empty() => {
                    // A panic here must not end the task: every publish
                    // still waiting in it would never be acknowledged.
                    let job = Arc::clone(&sent.job);
                    let finished = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        self.completed(sent, result)
                    }));
                    if finished.is_err() {
                        let at = job.envelope.place();
                        self.shutdown.fail(Fatal::CompletionPanicked { at });
                    }
                }
                else => return,
            }
        }
    }

    /// One publish answered: accepted, or handed to a retrying task.
    fn completed(self: &Arc<Self>, sent: Sent, result: Result<String, PublishError>) {
        let Sent {
            job,
            topic,
            publisher,
            started,
        } = sent;
        if result.is_ok() {
            self.metrics
                .published_to(topic.id(), job.envelope.payload.len(), started.elapsed());
            return self.finish(&job, topic.as_str(), Delivered::Accepted);
        }
        let sink = Arc::clone(self);
        self.runtime.spawn(async move {
            let json = sink.is_json(&topic);
            let delivered = sink
                .deliver(&publisher, &topic, &job, result, started, || {
                    job.rebuild(&sink.options, json)
                })
                .await;
            sink.finish(&job, topic.as_str(), delivered);
        });
    }

    /// Writes the message's payload to each object, each in its own task;
    /// each write ends like a topic's delivery (in [`PubsubSink::finish`]).
    fn write_objects(
        self: &Arc<Self>,
        job: &Arc<Job>,
        objects: Vec<crate::objects::ObjectName>,
        metadata: HashMap<String, String>,
    ) {
        use crate::sink::storage::Written;
        let Some(storage) = self.objects.clone() else {
            // The worker names objects only when [storage] is set.
            for object in objects {
                self.finish(
                    job,
                    &object.to_string(),
                    Delivered::Refused("no [storage] section is configured".into()),
                );
            }
            return;
        };
        let metadata = Arc::new(metadata);
        for object in objects {
            let (sink, job, storage, metadata) = (
                Arc::clone(self),
                Arc::clone(job),
                Arc::clone(&storage),
                Arc::clone(&metadata),
            );
            self.runtime.spawn(async move {
                let written = storage
                    .write(&object, job.envelope.payload.clone(), &metadata)
                    .await;
                let delivered = match written {
                    Written::Created | Written::Existed => Delivered::Accepted,
                    Written::Refused(why) => Delivered::Refused(why),
                    Written::Failed(why) => {
                        sink.shutdown.fail(Fatal::ObjectFailed {
                            at: job.envelope.place(),
                            reason: why,
                        });
                        Delivered::Failed
                    }
                };
                sink.finish(&job, &object.to_string(), delivered);
            });
        }
    }

    /// One destination is done with a message; the last one acknowledges it
    /// (or sends it to the dead-letter topic, if a destination refused it).
    fn finish(self: &Arc<Self>, job: &Arc<Job>, destination: &str, delivered: Delivered) {
        match delivered {
            Delivered::Accepted => {}
            Delivered::Failed => job.failed.store(true, Ordering::SeqCst),
            Delivered::Refused(why) => {
                *job.refused.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((destination.to_string(), why));
            }
        }
        if job.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if job.failed.load(Ordering::SeqCst) {
            return self.ack(&job.envelope, Outcome::Failed);
        }
        let refused = job.refused.lock().unwrap_or_else(|e| e.into_inner()).take();
        match refused {
            Some((destination, why)) => {
                self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                self.dead_letter(job.envelope.clone(), Some(&destination), why, true);
            }
            None => self.ack(
                &job.envelope,
                Outcome::Published {
                    bytes: job.envelope.payload.len(),
                },
            ),
        }
    }

    fn ack(&self, envelope: &Envelope, outcome: Outcome) {
        let _ = self.acks.send(Ack::new(envelope, outcome));
    }

    /// Hands a keyed message to its (topic, key) lane, starting the lane if
    /// it is not running.
    fn to_lane(
        self: &Arc<Self>,
        topic: &TopicName,
        key: &str,
        publisher: &Publisher,
        item: LaneItem,
    ) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let id = (topic.clone(), key.to_string());
        let tx = lanes.entry(id.clone()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let sink = Arc::clone(self);
            let publisher = publisher.clone();
            self.runtime
                .spawn(async move { sink.lane(id, publisher, rx).await });
            tx
        });
        // Lanes retire only under this lock and only when empty: never fails.
        let _ = tx.send(item);
    }

    /// One ordering key of one topic: publishes its messages in the order
    /// they came, pipelined; after a failure it waits out the rest of what
    /// was sent (the crate pauses the key and fails them), resumes the key
    /// and publishes them again, in the same order, before anything newer.
    async fn lane(
        self: Arc<Self>,
        id: (TopicName, String),
        publisher: Publisher,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<LaneItem>,
    ) {
        let (topic, key) = (&id.0, id.1.as_str());
        let mut window: VecDeque<(Arc<Job>, PublishFuture, std::time::Instant)> = VecDeque::new();
        let mut delay = RETRY_INITIAL;
        let mut attempt: u64 = 0;
        loop {
            if window.is_empty() {
                let item = match tokio::time::timeout(LANE_IDLE, rx.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => return,
                    Err(_) => {
                        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                        match rx.try_recv() {
                            Ok(item) => item,
                            Err(_) => {
                                lanes.remove(&id);
                                return;
                            }
                        }
                    }
                };
                let future = publisher.publish(item.message);
                window.push_back((item.job, future, std::time::Instant::now()));
                continue;
            }
            let front = &mut window.front_mut().expect("not empty").1;
            tokio::select! {
                biased;
                item = rx.recv() => {
                    if let Some(item) = item {
                        let future = publisher.publish(item.message);
                        window.push_back((item.job, future, std::time::Instant::now()));
                    }
                }
                result = front => {
                    let (job, _, started) = window.pop_front().expect("not empty");
                    match result {
                        Ok(_) => {
                            self.metrics.published_to(topic.id(), job.envelope.payload.len(), started.elapsed());
                            delay = RETRY_INITIAL;
                            self.finish(&job, topic.as_str(), Delivered::Accepted);
                        }
                        Err(e) => {
                            self.metrics.publish_failed();
                            // The crate paused the key: what was sent after
                            // this fails too. Collect all of it, in order.
                            let mut redo = VecDeque::new();
                            let mut failures = vec![(job, e)];
                            while let Some((j, f, started)) = window.pop_front() {
                                match f.await {
                                    Ok(_) => {
                                        self.metrics.published_to(topic.id(), j.envelope.payload.len(), started.elapsed());
                                        self.finish(&j, topic.as_str(), Delivered::Accepted);
                                    }
                                    Err(e) => failures.push((j, e)),
                                }
                            }
                            let mut first_error = None;
                            for (j, e) in failures {
                                match &e {
                                    PublishError::Rpc(rpc) if is_refusal(rpc) => {
                                        // Alone, in order (the lane waits).
                                        match self.try_alone(topic, &j, Some(key)).await {
                                            Some(d) => self.finish(&j, topic.as_str(), d),
                                            None => redo.push_back(j),
                                        }
                                    }
                                    PublishError::Rpc(rpc) if is_permanent(rpc) && !is_not_found(rpc) => {
                                        // Permission denied and the like: as
                                        // for unkeyed messages, the bridge
                                        // stops, uncommitted.
                                        let d = self.failed_permanently(topic, &j, rpc);
                                        self.finish(&j, topic.as_str(), d);
                                    }
                                    _ => {
                                        first_error.get_or_insert_with(|| e.to_string());
                                        redo.push_back(j);
                                    }
                                }
                            }
                            if !redo.is_empty() {
                                attempt += 1;
                                self.metrics.retries.fetch_add(redo.len() as u64, Ordering::Relaxed);
                                if attempt == 1 || attempt.is_power_of_two() {
                                    tracing::warn!(
                                        "pubsub topic `{topic}`, ordering key `{key}`: publish failed (attempt {attempt}), {} messages retried in order in {delay:?}: {}",
                                        redo.len(),
                                        first_error.as_deref().unwrap_or("refused")
                                    );
                                }
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(RETRY_MAX);
                            }
                            publisher.resume_publish(key);
                            for j in redo {
                                let future = publisher.publish(j.rebuild(&self.options, self.is_json(topic)));
                                window.push_back((j, future, std::time::Instant::now()));
                            }
                        }
                    }
                }
            }
        }
    }

    /// A permanent error other than a refusal (permission denied and the
    /// like): the bridge stops, naming the message, and it is not committed.
    fn failed_permanently(
        &self,
        topic: &TopicName,
        job: &Job,
        e: &google_cloud_pubsub::Error,
    ) -> Delivered {
        let m = &job.envelope;
        self.shutdown.fail(Fatal::PublishFailed {
            topic: topic.to_string(),
            at: m.place(),
            reason: e.to_string(),
        });
        Delivered::Failed
    }

    /// Publishes a message alone (no batch), after Pub/Sub refused a request
    /// that held it: `Refused` if Pub/Sub refuses it alone too (it is the
    /// culprit), `Accepted` if it takes it, `None` for a transient failure.
    async fn try_alone(
        &self,
        topic: &TopicName,
        job: &Job,
        key: Option<&str>,
    ) -> Option<Delivered> {
        let solo = self.solo(topic);
        if let Some(k) = key {
            solo.resume_publish(k);
        }
        let started = std::time::Instant::now();
        match solo
            .publish(job.rebuild(&self.options, self.is_json(topic)))
            .await
        {
            Ok(_) => {
                self.metrics.published_to(
                    topic.id(),
                    job.envelope.payload.len(),
                    started.elapsed(),
                );
                Some(Delivered::Accepted)
            }
            Err(PublishError::Rpc(e)) if is_refusal(&e) => Some(Delivered::Refused(format!(
                "pubsub topic `{topic}` refused this message: {e}"
            ))),
            Err(PublishError::Rpc(e)) if is_permanent(&e) && !is_not_found(&e) => {
                Some(self.failed_permanently(topic, job, &e))
            }
            Err(_) => None,
        }
    }

    /// Sees a publish through from its first answer (`first`, for a
    /// publish made at `started`) until Pub/Sub accepts, retrying transient
    /// errors. A request Pub/Sub refuses is tried again message by message,
    /// so only the message it objects to is `Refused`; `Failed` after
    /// another permanent error (which also stops the bridge). The crate
    /// consumes what it publishes, so `again` makes the message anew for
    /// each retry.
    async fn deliver(
        &self,
        publisher: &Publisher,
        topic: &TopicName,
        job: &Job,
        first: Result<String, PublishError>,
        started: std::time::Instant,
        again: impl Fn() -> Message,
    ) -> Delivered {
        let mut answered = Some(first);
        let mut delay = RETRY_INITIAL;
        let mut attempt: u64 = 0;
        let mut missing_since: Option<std::time::Instant> = None;
        loop {
            let result = match answered.take() {
                Some(result) => result,
                None => publisher.publish(again()).await,
            };
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
                    return Delivered::Accepted;
                }
                Err(PublishError::Rpc(e))
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
                Err(PublishError::Rpc(e)) if is_refusal(&e) => {
                    match self.try_alone(topic, job, None).await {
                        Some(d) => return d,
                        None => {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(RETRY_MAX);
                        }
                    }
                }
                Err(PublishError::Rpc(e)) if is_permanent(&e) => {
                    return self.failed_permanently(topic, job, &e);
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
        destination: Option<&str>,
        reason: String,
        with_payload: bool,
    ) {
        let Some(dlq) = self.dead_letter.clone() else {
            self.shutdown.fail(Fatal::NoDeadLetterTopic {
                at: envelope.place(),
                reason,
            });
            self.ack(&envelope, Outcome::Failed);
            return;
        };
        tracing::warn!(
            "{}: {reason}; sending it to the dead-letter topic `{dlq}`",
            envelope.place()
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
            truncate(
                &crate::secret::public_error(&reason),
                attributes::MAX_VALUE_BYTES,
            ),
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
            json: None,
            remaining: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            refused: Mutex::new(None),
            _held: Held::none(),
        };
        self.runtime.spawn(async move {
            let started = std::time::Instant::now();
            let first = publisher.publish(message.clone()).await;
            let outcome = match sink
                .deliver(&publisher, &dlq, &job, first, started, || message.clone())
                .await
            {
                Delivered::Accepted => Outcome::DeadLettered,
                Delivered::Refused(why) => {
                    sink.shutdown.fail(Fatal::DeadLetterRefused {
                        at: job.envelope.place(),
                        topic: dlq.to_string(),
                        reason: why,
                    });
                    Outcome::Failed
                }
                Delivered::Failed => Outcome::Failed,
            };
            sink.ack(&job.envelope, outcome);
        });
    }
}

/// One message on its way, shared by its destinations' tasks.
struct Job {
    envelope: Envelope,
    hook_attributes: Vec<(String, String)>,
    ordering_key: Option<String>,
    /// The JSON form, for `[bigquery] topics`.
    json: Option<Bytes>,
    remaining: AtomicUsize,
    failed: AtomicBool,
    /// A destination that refused it alone, and why.
    refused: Mutex<Option<(String, String)>>,
    /// Given back when the last clone of the job is dropped.
    _held: Held,
}

/// A worker's handle on its completion task ([`PubsubSink::completions`]).
pub struct Completions {
    tx: tokio::sync::mpsc::UnboundedSender<Awaited>,
}

impl Completions {
    fn send(&self, sent: Sent, future: PublishFuture) {
        // The task ends only after this handle is dropped, and survives a
        // panic in what it runs (which stops the bridge): the send fails only
        // once the runtime has stopped, and with it every publish.
        let _ = self.tx.send(Awaited { sent, future });
    }
}

/// A publish made for a message, to one topic.
struct Sent {
    job: Arc<Job>,
    topic: TopicName,
    publisher: Publisher,
    started: std::time::Instant,
}

/// A publish on its way to the completion task.
struct Awaited {
    sent: Sent,
    future: PublishFuture,
}

impl Awaited {
    async fn wait(self) -> (Sent, Result<String, PublishError>) {
        let result = self.future.await;
        (self.sent, result)
    }
}

/// How one destination ended for a message.
enum Delivered {
    Accepted,
    /// Pub/Sub refused this message on its own: it takes the error policy.
    Refused(String),
    /// A permanent error that stops the bridge.
    Failed,
}

/// A keyed message waiting in its lane.
struct LaneItem {
    job: Arc<Job>,
    message: Message,
}

impl Job {
    /// The message again, for a retry (the crate consumes what it publishes).
    fn rebuild(&self, options: &AttributeOptions, json: bool) -> Message {
        let attrs =
            attributes::build(options, &self.envelope, &self.hook_attributes).unwrap_or_default();
        let data = match (&self.json, json) {
            (Some(j), true) => j.clone(),
            _ => self.envelope.payload.clone(),
        };
        Message::new()
            .set_data(data)
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
