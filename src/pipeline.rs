//! The bridge's wiring: checks and builds everything, starts the consumer
//! loop ([`crate::source::consumer`]), the crossbeam worker pool and the
//! sink, and waits for them.
//!
//! ```text
//!  consumer loop ──one bounded queue per worker──▶ workers (hook, attributes, limits)
//!        ▲             (a partition, one worker)        │ publish: the crate's enqueue,
//!        │                                              │ made on the worker (never blocks)
//!        │                                              ▼
//!        └──── acks ◀── one completion task per worker (tokio): awaits, retries
//! ```
//!
//! Invariants:
//! - all workers and their hooks are built before any starts, so a bad hook
//!   fails before a message is consumed;
//! - a partition's messages always go to the same worker, so they reach the
//!   publisher in offset order;
//! - a panic in a hook (or the alert decoder under it) is caught: the message
//!   takes `hook.on_error` and the worker builds a fresh hook; a worker thread
//!   that dies anyway fails the bridge.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver};
use google_cloud_pubsub::client::Publisher;

use crate::attributes::{self, MAX_MESSAGE_BYTES};
use crate::config::{Config, ErrorPolicy, OrderingKeySource, TopicName};
use crate::envelope::Envelope;
use crate::hook::{Decision, Hook, HookError, HookFactory, MessageView};
use crate::metrics::Metrics;
use crate::offsets::{Ack, Outcome};
use crate::shutdown::{Fatal, Shutdown};
use crate::sink::pubsub::{
    check_topics, Completions, Delivery, Endpoint, PubsubSink, SinkError, MAX_PUBLISHERS,
};
use crate::source::consumer::{ConsumerLoop, Ledger, Settings};
use crate::source::kafka::{self, KafkaSource, SourceContext, SourceError};
use crate::source::subscription::{Clock, Subscription, SystemClock};

/// Messages waiting for a worker, per worker.
const QUEUE_PER_WORKER: usize = 64;
/// Room in a publish request for the topic name and the message's framing.
const REQUEST_OVERHEAD: usize = 1_024;
/// The most topics, and the most objects, one decision may name.
const MAX_DESTINATIONS: usize = 100;
/// Cloud Storage's limit on an object's custom metadata (keys and values).
const MAX_OBJECT_METADATA: usize = 8 * 1024;

/// Why the bridge stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error("cannot start the Pub/Sub runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("a worker thread stopped before it started")]
    WorkerLost,
    #[error("a worker's hook did not finish building within {0} s (each worker runs the script's top level again: does it depend on chance, or run a library call that takes long? try it with `ztfhook check`)")]
    HookBuildTimeout(f64),
    #[error("cannot serve metrics: {0}")]
    Metrics(#[from] crate::http::ServeError),
    /// A fatal error while running (a permanent publish failure, ...).
    #[error(transparent)]
    Fatal(#[from] Fatal),
}

/// What a run did, for the caller's last log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub consumed: u64,
    pub published: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    /// Messages still unacknowledged when the drain timed out (not committed).
    pub abandoned: usize,
}

/// Runs the bridge until `shutdown` is requested or a fatal error occurs.
///
/// # Errors
/// [`BridgeError`] for start-up failures (naming the broker, topic or hook at
/// fault) and for fatal errors while running. Offsets of everything Pub/Sub
/// acknowledged are committed before it returns, either way.
pub fn run(
    config: Config,
    hooks: Arc<dyn HookFactory>,
    shutdown: Arc<Shutdown>,
) -> Result<Summary, BridgeError> {
    run_with_clock(config, hooks, shutdown, Arc::new(SystemClock))
}

/// [`run`], with the clock that dates nightly topic templates.
///
/// # Errors
/// As [`run`].
pub fn run_with_clock(
    mut config: Config,
    hooks: Arc<dyn HookFactory>,
    shutdown: Arc<Shutdown>,
    clock: Arc<dyn Clock>,
) -> Result<Summary, BridgeError> {
    if config.pipeline.discard {
        // A dry run must not move (or take partitions from) the real group.
        let group = format!("{}.discard.{}", config.kafka.group_id(), std::process::id());
        tracing::warn!(
            "pipeline.sink = \"discard\": nothing is published, and nothing committed; consuming as group `{group}`, so the real group `{}` is neither joined nor moved (a dry run)",
            config.kafka.group_id()
        );
        config.kafka.properties.insert("group.id".into(), group);
    }
    let core = Core::start(&config, &hooks, &shutdown, true)?;
    let context = SourceContext::new(Arc::clone(&core.ledger), Arc::clone(&core.metrics));
    let consumer = kafka::create(&config, context)?;
    let subscription = Subscription::new(
        config.kafka.topics.clone(),
        config.kafka.previous_nights,
        clock,
    );
    let subscribed = kafka::check_and_subscribe(&consumer, &config, &subscription)?;
    tracing::info!(
        "consuming {:?} as group `{}` from {}",
        subscribed,
        config.kafka.group_id(),
        config
            .kafka
            .properties
            .get("bootstrap.servers")
            .map_or("", String::as_str)
    );
    // Closing the consumer leaves the group (its revoke neither waits nor
    // commits again: the loop is closing).
    let (summary, _) = core.run(
        &config,
        KafkaSource::new(consumer),
        Some((subscription, subscribed)),
        config.pipeline,
        drop,
    );
    match shutdown.fatal() {
        Some(error) => Err(BridgeError::Fatal(error.clone())),
        None => Ok(summary),
    }
}

/// Why a replay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Checkpoint(#[from] crate::archive::checkpoint::CheckpointError),
}

/// How often a replay writes its checkpoint, at most (the config's
/// `commit_interval_ms` when it is shorter): a kill re-sends what was in
/// flight and what was acknowledged in one interval.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Replays archived alerts through the hook to the configured destinations,
/// with the live run's batching, bounds and error policies, from where
/// `checkpoint` says each input stands, until every input is read and every
/// member resolved (or `shutdown`).
///
/// # Errors
/// [`ReplayError`] for start-up failures and for fatal errors while
/// running (then what was acknowledged is in the checkpoint, as always).
pub fn replay(
    config: Config,
    hooks: Arc<dyn HookFactory>,
    shutdown: Arc<Shutdown>,
    inputs: Vec<crate::archive::Input>,
    checkpoint: crate::archive::checkpoint::Checkpoint,
) -> Result<(Summary, crate::archive::source::Report), ReplayError> {
    // Checked before anything connects.
    let starts = checkpoint.starts(&inputs)?;
    let core = Core::start(&config, &hooks, &shutdown, false)?;
    let source = crate::archive::source::ArchiveSource::start(
        inputs,
        starts,
        checkpoint,
        Arc::clone(&core.ledger),
        Arc::clone(&core.metrics),
        Arc::clone(&shutdown),
        config.pipeline.stats_interval,
    );
    let mut limits = config.pipeline;
    limits.commit_interval = limits.commit_interval.min(CHECKPOINT_INTERVAL);
    let (summary, report) = core.run(
        &config,
        source,
        None,
        limits,
        crate::archive::source::ArchiveSource::finish,
    );
    match shutdown.fatal() {
        Some(error) => Err(BridgeError::Fatal(error.clone()).into()),
        None => Ok((summary, report)),
    }
}

/// What every run shares, whatever its source: the Pub/Sub runtime and
/// sink, the workers with their hooks, the metrics and the ledger.
struct Core {
    runtime: tokio::runtime::Runtime,
    metrics: Arc<Metrics>,
    sink: Arc<PubsubSink>,
    queues: Vec<crossbeam_channel::Sender<Envelope>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    ledger: crate::source::consumer::SharedLedger,
    shutdown: Arc<Shutdown>,
}

impl Core {
    /// Checks the Pub/Sub topics and builds the sink and the workers (every
    /// hook built before any message is read). `serve` starts the metrics
    /// endpoint if the config asks for one.
    fn start(
        config: &Config,
        hooks: &Arc<dyn HookFactory>,
        shutdown: &Arc<Shutdown>,
        serve: bool,
    ) -> Result<Core, BridgeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ztfhook-pubsub")
            .enable_all()
            .build()
            .map_err(BridgeError::Runtime)?;
        let metrics = Arc::new(Metrics::new());
        if let (true, Some(address)) = (serve, config.metrics_listen) {
            let bound = crate::http::serve(address, Arc::clone(&metrics), Arc::clone(hooks))
                .map_err(BridgeError::Metrics)?;
            tracing::info!("metrics on http://{bound}/metrics, health on http://{bound}/healthz");
        }
        let (ack_tx, ack_rx) = unbounded::<Ack>();

        // Start-up checks, in the order a user fixes them: Pub/Sub topics, hook, broker.
        let endpoint = Endpoint::resolve(config.pubsub.endpoint.as_deref());
        tracing::info!("publishing to {endpoint}");
        if !config.pipeline.discard {
            match runtime.block_on(check_topics(&endpoint, &config.pubsub_topics())) {
                // A topic that is missing or forbidden is a configuration error;
                // an endpoint that does not answer is an outage, and an instance
                // started during one (a rolling update) joins the group and
                // holds its messages, paused, until Pub/Sub answers again.
                Err(e @ SinkError::Unreachable { .. }) => {
                    tracing::warn!("{e}; starting anyway: messages wait until Pub/Sub answers")
                }
                other => other?,
            }
        }
        let sink = Arc::new(runtime.block_on(PubsubSink::connect(
            config,
            endpoint,
            ack_tx.clone(),
            Arc::clone(shutdown),
            Arc::clone(&metrics),
        ))?);
        let (queues, threads) = start_workers(
            config,
            hooks,
            &sink,
            &ack_tx,
            &metrics,
            shutdown,
            BUILD_DEADLINE,
        )?;
        drop(ack_tx);
        tracing::info!("hook {} on {} workers", hooks.name(), threads.len());
        let ledger = Arc::new(Mutex::new(Ledger::new(ack_rx, Arc::clone(&metrics))));
        Ok(Core {
            runtime,
            metrics,
            sink,
            queues,
            threads,
            ledger,
            shutdown: Arc::clone(shutdown),
        })
    }

    /// Runs the consumer loop on `source` until a stop, drains, commits,
    /// then hands the source to `close` and stops the runtime.
    fn run<S: crate::source::consumer::Source, R>(
        self,
        config: &Config,
        source: S,
        subscription: Option<(Subscription, Vec<String>)>,
        limits: crate::config::Pipeline,
        close: impl FnOnce(S) -> R,
    ) -> (Summary, R) {
        self.runtime
            .spawn(crate::shutdown::listen_for_signals(Arc::clone(
                &self.shutdown,
            )));
        let dead_letter_sink = Arc::clone(&self.sink);
        let settings = Settings {
            limits,
            kafka_errors: config.pipeline.kafka_errors,
            tombstones: config.pipeline.tombstones,
            commits: !config.pipeline.discard,
            stall_after: config.pipeline.stall_after,
        };
        let mut consumer_loop = ConsumerLoop::new(
            source,
            Arc::clone(&self.ledger),
            self.queues,
            settings,
            Box::new(move |envelope, reason| {
                dead_letter_sink.dead_letter(envelope, None, reason, false);
            }),
            Arc::clone(&self.metrics),
            Arc::clone(&self.shutdown),
            subscription,
        );
        let drained = consumer_loop.run();
        if drained.abandoned == 0 {
            for t in self.threads {
                let _ = t.join();
            }
        }
        let closed = close(consumer_loop.into_source());
        self.runtime.shutdown_timeout(Duration::from_secs(1));
        let metrics = &self.metrics;
        let summary = Summary {
            consumed: metrics.consumed.load(Ordering::Relaxed),
            published: metrics.published.load(Ordering::Relaxed),
            dropped: metrics.dropped.load(Ordering::Relaxed),
            dead_lettered: metrics.dead_lettered.load(Ordering::Relaxed),
            abandoned: drained.abandoned,
        };
        (summary, closed)
    }
}

/// How long each worker may take to build its hook (a script's top level
/// runs again in each): the load deadline, and some.
const BUILD_DEADLINE: Duration =
    Duration::from_secs(crate::hook::script::LOAD_DEADLINE.as_secs() + 5);

/// The workers' queues and threads.
type Workers = (
    Vec<crossbeam_channel::Sender<Envelope>>,
    Vec<std::thread::JoinHandle<()>>,
);

/// Starts the workers, each building its hook on its own thread (a Lua
/// state never crosses threads), and waits, up to `deadline`, until every
/// one has, before Kafka is joined.
fn start_workers(
    config: &Config,
    hooks: &Arc<dyn HookFactory>,
    sink: &Arc<PubsubSink>,
    ack_tx: &crossbeam_channel::Sender<Ack>,
    metrics: &Arc<Metrics>,
    shutdown: &Arc<Shutdown>,
    deadline: Duration,
) -> Result<Workers, BridgeError> {
    let shared = Arc::new(config.clone());
    let (ready_tx, ready_rx) = bounded::<Result<(), HookError>>(config.pipeline.workers);
    let mut queues = Vec::with_capacity(config.pipeline.workers);
    let decoder = Arc::new(crate::alert::Decoder::new(config.alerts.clone()));
    let threads: Vec<_> = (0..config.pipeline.workers)
        .map(|i| {
            let (tx, rx) = bounded::<Envelope>(QUEUE_PER_WORKER);
            queues.push(tx);
            let parts = (
                Arc::clone(&shared),
                Arc::clone(hooks),
                Arc::clone(sink),
                ack_tx.clone(),
                Arc::clone(metrics),
                Arc::clone(shutdown),
                ready_tx.clone(),
                Arc::clone(&decoder),
            );
            std::thread::Builder::new()
                .name(format!("ztfhook-worker-{i}"))
                .spawn(move || {
                    let (config, hooks, sink, acks, metrics, shutdown, ready, decoder) = parts;
                    let _guard = FailOnPanic(Arc::clone(&shutdown), i);
                    let hook = match hooks.build() {
                        Ok(hook) => hook,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    Worker::new(&config, hook, hooks, sink, acks, metrics, shutdown)
                        .with_decoder(decoder)
                        .run(rx);
                })
                .expect("spawning a worker thread")
        })
        .collect();
    drop(ready_tx);
    let until = Instant::now() + deadline;
    for _ in 0..threads.len() {
        match ready_rx.recv_deadline(until) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(BridgeError::Hook(e)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                return Err(BridgeError::HookBuildTimeout(deadline.as_secs_f64()))
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(BridgeError::WorkerLost)
            }
        }
    }
    Ok((queues, threads))
}

/// Fails the bridge if a worker thread unwinds (a panic the worker did not
/// catch): its partitions could go no further.
struct FailOnPanic(Arc<Shutdown>, usize);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail(Fatal::WorkerDied { worker: self.1 });
        }
    }
}

/// One worker thread: applies the hook and hands the message to the sink.
struct Worker {
    hook: Box<dyn Hook>,
    /// To build a fresh hook after a panic.
    hooks: Arc<dyn HookFactory>,
    sink: Arc<PubsubSink>,
    /// This worker's completion task: it awaits what the worker publishes.
    completions: Completions,
    acks: crossbeam_channel::Sender<Ack>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    policy: ErrorPolicy,
    /// Hook errors this worker has seen, to thin out their log lines.
    errors: u64,
    options: crate::config::AttributeOptions,
    project: String,
    default_topic: TopicName,
    default_publisher: Vec<Publisher>,
    /// Where a message goes when the hook names no destination.
    default_topics: Vec<TopicName>,
    default_publishers: Vec<Publisher>,
    default_archive: bool,
    /// The `@archive` bucket and object name template.
    storage: Option<crate::config::Storage>,
    /// For the JSON form and for object names that read the alert.
    decoder: Arc<crate::alert::Decoder>,
    kafka_columns: bool,
    /// Topics named by the hook, resolved, with their publisher and when
    /// they were last named (at most [`MAX_PUBLISHERS`]; the least recently
    /// named goes first).
    topics: HashMap<String, (TopicName, Publisher, u64)>,
    /// Counts resolutions, for `topics`' recency.
    named: u64,
    /// Acknowledge instead of publishing (`pipeline.sink = "discard"`).
    discard: bool,
    /// The ordering key of messages the hook gives none.
    ordering: OrderingKeySource,
}

impl Worker {
    fn new(
        config: &Config,
        hook: Box<dyn Hook>,
        hooks: Arc<dyn HookFactory>,
        sink: Arc<PubsubSink>,
        acks: crossbeam_channel::Sender<Ack>,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
    ) -> Worker {
        let default_topic = config.pubsub.topic.clone();
        let default_publisher = vec![sink.publisher(&default_topic)];
        let default_topics = config.destinations.topics.clone();
        let default_publishers = default_topics.iter().map(|t| sink.publisher(t)).collect();
        Worker {
            hook,
            hooks,
            completions: sink.completions(),
            sink,
            acks,
            metrics,
            shutdown,
            policy: config.hook.on_error,
            errors: 0,
            options: config.attributes,
            project: config.pubsub.project.clone(),
            default_topic,
            default_publisher,
            default_topics,
            default_publishers,
            default_archive: config.destinations.archive,
            storage: config.storage.clone(),
            decoder: Arc::new(crate::alert::Decoder::new(config.alerts.clone())),
            kafka_columns: config.bigquery.kafka_columns,
            topics: HashMap::new(),
            named: 0,
            discard: config.pipeline.discard,
            ordering: config.pubsub.ordering_key,
        }
    }

    /// Shares the pool's alert decoder (and its schema cache).
    fn with_decoder(mut self, decoder: Arc<crate::alert::Decoder>) -> Worker {
        self.decoder = decoder;
        self
    }

    fn run(mut self, queue: Receiver<Envelope>) {
        for envelope in queue.iter() {
            self.handle(envelope);
        }
    }

    fn handle(&mut self, envelope: Envelope) {
        if let Some(problem) = envelope.archive.as_ref().and_then(|m| m.problem.clone()) {
            // A replayed member that is not an alert: the error policy, not the hook.
            return self.hook_failed(envelope, problem);
        }
        let started = Instant::now();
        let view = MessageView::new(&envelope);
        let hook = &mut self.hook;
        let decided = std::panic::catch_unwind(AssertUnwindSafe(|| hook.decide(&view)));
        self.metrics.hook_time.observe(started.elapsed());
        let decision = match decided {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return self.hook_failed(envelope, e.to_string()),
            Err(panic) => {
                let what = panic_text(&panic);
                self.metrics.hook_panics.fetch_add(1, Ordering::Relaxed);
                match self.hooks.build() {
                    Ok(fresh) => self.hook = fresh,
                    Err(e) => {
                        tracing::warn!("cannot rebuild the hook after a panic: {e}; keeping it")
                    }
                }
                return self.hook_failed(envelope, format!("the hook panicked: {what}"));
            }
        };
        if !decision.keep {
            let _ = self.acks.send(Ack::new(&envelope, Outcome::Dropped));
            return;
        }
        let Decision {
            topics: named,
            objects: named_objects,
            attributes: hook_attributes,
            ordering_key,
            ..
        } = decision;
        let ordering_key = ordering_key.or_else(|| match self.ordering {
            OrderingKeySource::None => None,
            OrderingKeySource::Key => envelope
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .filter(|k| !k.is_empty())
                .map(str::to_string),
            OrderingKeySource::Partition => Some(envelope.partition.to_string()),
        });
        let defaults = named.is_empty() && named_objects.is_empty();
        let (topics, publishers) = if defaults {
            (self.default_topics.clone(), self.default_publishers.clone())
        } else {
            match self.resolve(&named) {
                Ok(t) => t,
                Err(why) => return self.hook_failed(envelope, why),
            }
        };
        let archive = if defaults {
            self.default_archive
        } else {
            named_objects
                .iter()
                .any(|o| o == crate::hook::ARCHIVE_OBJECT)
        };
        // Made in a dry run too, so that it shows its failures.
        let json = topics.iter().any(|t| self.sink.is_json(t));
        let (objects, json) = match self.extras(&envelope, &named_objects, archive, json) {
            Ok(x) => x,
            Err(why) => return self.hook_failed(envelope, why),
        };
        let attrs = match attributes::build(&self.options, &envelope, &hook_attributes) {
            Ok(a) => a,
            Err(v) => return self.hook_failed(envelope, format!("hook attributes: {v}")),
        };
        if !objects.is_empty() && attrs.size() > MAX_OBJECT_METADATA {
            let reason = format!(
                "its attributes are {} bytes, over Cloud Storage's {MAX_OBJECT_METADATA}-byte limit on an object's custom metadata",
                attrs.size()
            );
            return self.hook_failed(envelope, reason);
        }
        self.send(
            envelope,
            Destinations {
                topics,
                publishers,
                objects,
                json,
            },
            attrs,
            hook_attributes,
            ordering_key,
        );
    }

    /// The message's objects (`@archive` filled in, `gs://` names checked)
    /// and, if a destination topic wants it, its BigQuery JSON form; the
    /// alert is decoded (once) only if one of them needs it.
    fn extras(
        &self,
        envelope: &Envelope,
        named: &[String],
        archive: bool,
        json: bool,
    ) -> Result<(Vec<crate::objects::ObjectName>, Option<bytes::Bytes>), String> {
        if named.len() > MAX_DESTINATIONS {
            return Err(format!(
                "the hook named {} objects; at most {MAX_DESTINATIONS} per message",
                named.len()
            ));
        }
        let mut objects: Vec<crate::objects::ObjectName> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for o in named {
            if o == crate::hook::ARCHIVE_OBJECT || !seen.insert(o.as_str()) {
                continue;
            }
            if self.storage.is_none() {
                return Err(format!(
                    "hook object `{o}`: objects need a [storage] section in the config"
                ));
            }
            objects.push(crate::objects::ObjectName::parse(o).map_err(|e| format!("hook {e}"))?);
        }
        let template = match (&self.storage, archive) {
            (Some(s), true) => Some(s),
            (None, true) => {
                return Err(
                    "hook object `@archive`: it needs a [storage] section in the config".into(),
                )
            }
            _ => None,
        };
        let needs_alert = json || template.is_some_and(|s| s.object.reads_alert());
        let alert = if needs_alert {
            let decoded = if json {
                self.decoder.decode(&envelope.payload)
            } else {
                self.decoder.decode_head(&envelope.payload)
            };
            Some(decoded.map_err(|e| {
                let why = if json {
                    "the BigQuery JSON form"
                } else {
                    "the object name"
                };
                format!("{why} needs the alert, and the payload does not decode as one: {e}")
            })?)
        } else {
            None
        };
        if let Some(storage) = template {
            let name = match storage.object.fill(envelope, alert.as_ref()) {
                // A head-only decode reads only the fields before the first
                // array: a template field after it needs the whole alert.
                Err(_) if alert.as_ref().is_some_and(|a| !a.is_complete()) => {
                    let whole = self.decoder.decode(&envelope.payload).map_err(|e| {
                        format!("the object name needs the alert, and the payload does not decode as one: {e}")
                    })?;
                    storage.object.fill(envelope, Some(&whole))?
                }
                filled => filled?,
            };
            let object = crate::objects::ObjectName {
                bucket: Arc::clone(&storage.bucket),
                name,
            };
            if !objects.contains(&object) {
                objects.push(object);
            }
        }
        let json = match (json, &alert) {
            (true, Some(alert)) => {
                let mut out = Vec::with_capacity(envelope.payload.len() / 2);
                let kafka = crate::alert::bigquery::KafkaColumns {
                    topic: &envelope.topic,
                    partition: envelope.archive.is_none().then_some(envelope.partition),
                    offset: envelope.archive.is_none().then_some(envelope.offset),
                    timestamp_ms: envelope.timestamp_ms,
                };
                // Bounded: a small payload can make a large JSON form (long
                // field names of null values), and Pub/Sub takes 10 MB.
                let limit = MAX_MESSAGE_BYTES - REQUEST_OVERHEAD;
                crate::alert::bigquery::write_json(
                    alert,
                    self.kafka_columns.then_some(&kafka),
                    limit,
                    &mut out,
                )
                .map_err(|e| format!("the BigQuery JSON form: {e}"))?;
                self.metrics.json_converted.fetch_add(1, Ordering::Relaxed);
                Some(bytes::Bytes::from(out))
            }
            _ => None,
        };
        Ok((objects, json))
    }

    /// Applies `hook.on_error` to a message the hook failed on.
    fn hook_failed(&mut self, envelope: Envelope, reason: String) {
        self.metrics.hook_errors.fetch_add(1, Ordering::Relaxed);
        self.errors += 1;
        let at = envelope.place();
        if self.errors <= 10 || self.errors.is_power_of_two() {
            tracing::warn!(
                "{at}: {reason} (hook.on_error = {:?}; {} hook errors in this worker)",
                self.policy,
                self.errors
            );
        }
        // What a published message may say: the script named by its file
        // name only (its path may hold spaces, or be relative), then no
        // other directory and no credentials.
        let script = self.hooks.name();
        let file = std::path::Path::new(script)
            .file_name()
            .map_or_else(|| script.to_string(), |n| n.to_string_lossy().into_owned());
        let named = if script.is_empty() {
            reason.clone()
        } else {
            reason.replace(script, &file)
        };
        let public = crate::secret::public_error(&named);
        match self.policy {
            ErrorPolicy::Passthrough => {
                let hook_attributes = vec![(
                    attributes::ERROR.to_string(),
                    crate::sink::pubsub::truncate(&public, attributes::MAX_VALUE_BYTES),
                )];
                let attrs = match attributes::build(&self.options, &envelope, &hook_attributes) {
                    Ok(a) => a,
                    Err(v) => unreachable!("ztfhook.error is within limits: {v}"),
                };
                let destinations = Destinations {
                    topics: vec![self.default_topic.clone()],
                    publishers: self.default_publisher.clone(),
                    objects: Vec::new(),
                    json: None,
                };
                self.send(envelope, destinations, attrs, hook_attributes, None);
            }
            ErrorPolicy::DeadLetter => self.sink.dead_letter(envelope, None, public, true),
            ErrorPolicy::Drop => {
                let _ = self.acks.send(Ack::new(&envelope, Outcome::Dropped));
            }
            ErrorPolicy::Stop => {
                self.shutdown.fail(Fatal::HookStop { at, reason });
                let _ = self.acks.send(Ack::new(&envelope, Outcome::Failed));
            }
        }
    }

    /// Checks the size against Pub/Sub's limit, then publishes.
    fn send(
        &mut self,
        envelope: Envelope,
        destinations: Destinations,
        attrs: attributes::Attributes,
        hook_attributes: Vec<(String, String)>,
        ordering_key: Option<String>,
    ) {
        let Destinations {
            topics,
            publishers,
            objects,
            json,
        } = destinations;
        if attrs.omitted > 0 {
            self.metrics
                .omitted_attributes
                .fetch_add(attrs.omitted as u64, Ordering::Relaxed);
        }
        let longest = topics.iter().map(|t| t.as_str().len()).max().unwrap_or(0);
        let data = envelope
            .payload
            .len()
            .max(json.as_ref().map_or(0, bytes::Bytes::len));
        let size = data + attrs.size() + ordering_key.as_ref().map_or(0, String::len);
        if !topics.is_empty() && size + longest + REQUEST_OVERHEAD > MAX_MESSAGE_BYTES {
            let reason = format!(
                "message of {size} bytes (payload {}) is over Pub/Sub's {MAX_MESSAGE_BYTES}-byte request limit",
                envelope.payload.len()
            );
            let first = topics.first().map(TopicName::as_str);
            self.sink.dead_letter(envelope, first, reason, false);
            return;
        }
        if !topics.is_empty() && envelope.payload.is_empty() && attrs.map.is_empty() {
            // Pub/Sub refuses a message with neither (and with it the whole
            // request it is batched in): it takes the error policy alone.
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
            let reason = format!(
                "{} with no attributes (attributes.kafka_metadata is off): Pub/Sub refuses a message with neither data nor attributes",
                if envelope.tombstone {
                    "a tombstone (null value)"
                } else {
                    "an empty value"
                }
            );
            let first = topics.first().map(TopicName::as_str);
            self.sink.dead_letter(envelope, first, reason, false);
            return;
        }
        if self.discard {
            let bytes = envelope.payload.len();
            let _ = self
                .acks
                .send(Ack::new(&envelope, Outcome::Published { bytes }));
            return;
        }
        // Every destination after the first holds a copy of its own (of the
        // JSON form for a JSON topic), and the JSON form is held besides:
        // their share of the copies' bound first.
        let json_topics = match json {
            Some(_) => topics.iter().filter(|t| self.sink.is_json(t)).count(),
            None => 0,
        };
        let payload_copies = topics.len() - json_topics + objects.len();
        let extra = envelope.payload.len() * payload_copies.saturating_sub(1)
            + json.as_ref().map_or(0, |j| j.len() * (1 + json_topics));
        let held = self.sink.copies().hold(extra, &self.shutdown);
        self.sink.publish(
            &self.completions,
            &publishers,
            Delivery {
                envelope,
                topics,
                attributes: attrs,
                hook_attributes,
                ordering_key,
                objects,
                json,
                held,
            },
        );
    }

    /// The hook's topic names as full names with their publishers; the
    /// default topic when it named none.
    fn resolve(&mut self, named: &[String]) -> Result<(Vec<TopicName>, Vec<Publisher>), String> {
        if named.is_empty() {
            // Objects only.
            return Ok((Vec::new(), Vec::new()));
        }
        if named.len() > MAX_DESTINATIONS {
            return Err(format!(
                "the hook named {} topics; at most {MAX_DESTINATIONS} per message",
                named.len()
            ));
        }
        let mut topics = Vec::with_capacity(named.len());
        let mut publishers = Vec::with_capacity(named.len());
        for name in named {
            if name == crate::hook::DEFAULT_TOPIC {
                if !topics.contains(&self.default_topic) {
                    topics.push(self.default_topic.clone());
                    publishers.extend(self.default_publisher.iter().cloned());
                }
                continue;
            }
            self.named += 1;
            if !self.topics.contains_key(name) {
                let topic = TopicName::parse(&self.project, name)
                    .map_err(|e| format!("hook topic: {e}"))?;
                let publisher = self.sink.publisher(&topic);
                if self.topics.len() >= MAX_PUBLISHERS {
                    let oldest = self
                        .topics
                        .iter()
                        .min_by_key(|(_, (_, _, used))| *used)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        self.topics.remove(&k);
                    }
                }
                self.topics.insert(name.clone(), (topic, publisher, 0));
            }
            let (t, p, used) = self.topics.get_mut(name).expect("inserted above");
            *used = self.named;
            if !topics.contains(t) {
                topics.push(t.clone());
                publishers.push(p.clone());
            }
        }
        Ok((topics, publishers))
    }
}

/// Where one message goes.
struct Destinations {
    topics: Vec<TopicName>,
    publishers: Vec<Publisher>,
    objects: Vec<crate::objects::ObjectName>,
    /// The JSON form, when a topic among `topics` is a `[bigquery]` one.
    json: Option<bytes::Bytes>,
}

/// A panic's message, where it has one.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::HookError;
    use std::sync::atomic::AtomicUsize;

    /// A hook whose first instance panics on every message; the instances
    /// built after it pass everything.
    struct PanicsOnce {
        built: AtomicUsize,
    }

    struct Panicking;
    impl Hook for Panicking {
        fn decide(&mut self, _: &MessageView<'_>) -> Result<Decision, HookError> {
            panic!("an engine bug");
        }
    }

    impl HookFactory for PanicsOnce {
        fn name(&self) -> &str {
            "test:panics-once"
        }
        fn build(&self) -> Result<Box<dyn Hook>, HookError> {
            Ok(match self.built.fetch_add(1, Ordering::SeqCst) {
                0 => Box::new(Panicking),
                _ => Box::new(crate::hook::Passthrough),
            })
        }
    }

    /// What a worker (or the pool) is built from: `text`'s config and a
    /// sink that never connects (connecting is lazy, and these tests
    /// publish nothing).
    struct Parts {
        config: Config,
        acks: crossbeam_channel::Sender<Ack>,
        acked: Receiver<Ack>,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        sink: Arc<PubsubSink>,
    }

    async fn parts(text: &str) -> Parts {
        let config = Config::parse(std::path::Path::new("test.toml"), text).unwrap();
        let (acks, acked) = unbounded();
        let metrics = Arc::new(Metrics::new());
        let shutdown = Arc::new(Shutdown::new());
        let sink = Arc::new(
            PubsubSink::connect(
                &config,
                Endpoint::Emulator("127.0.0.1:9".into()),
                acks.clone(),
                Arc::clone(&shutdown),
                Arc::clone(&metrics),
            )
            .await
            .unwrap(),
        );
        Parts {
            config,
            acks,
            acked,
            metrics,
            shutdown,
            sink,
        }
    }

    /// A hook that takes seconds to build.
    struct SlowToBuild;
    impl HookFactory for SlowToBuild {
        fn name(&self) -> &str {
            "test:slow"
        }
        fn build(&self) -> Result<Box<dyn Hook>, HookError> {
            std::thread::sleep(Duration::from_secs(3));
            Ok(Box::new(crate::hook::Passthrough))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_hook_that_does_not_finish_building_stops_the_start_at_the_deadline() {
        let Parts {
            config,
            acks,
            metrics,
            shutdown,
            sink,
            ..
        } = parts(crate::config::tests::MINIMAL).await;
        let hooks: Arc<dyn HookFactory> = Arc::new(SlowToBuild);
        let started = Instant::now();
        let result = start_workers(
            &config,
            &hooks,
            &sink,
            &acks,
            &metrics,
            &shutdown,
            Duration::from_millis(300),
        );
        assert!(
            matches!(result, Err(BridgeError::HookBuildTimeout(_))),
            "{:?}",
            result.err()
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_hook_naming_a_new_topic_per_message_keeps_a_bounded_number_of_publishers() {
        let mut worker = passthrough_worker(crate::config::tests::MINIMAL).await;
        let hot = "ztf-hot".to_string();
        for i in 0..3 * MAX_PUBLISHERS {
            let (topics, publishers) = worker
                .resolve(&[format!("ztf-topic-{i}"), hot.clone()])
                .unwrap();
            assert_eq!((topics.len(), publishers.len()), (2, 2));
            assert!(worker.topics.len() <= MAX_PUBLISHERS);
            assert!(worker.sink.publishers_kept() <= MAX_PUBLISHERS);
        }
        assert!(
            worker.topics.contains_key(&hot),
            "the topic named every time is never the least recently named"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_hook_that_panics_is_counted_rebuilt_and_its_message_takes_the_error_policy() {
        let text = format!(
            "{}\n[hook]\non_error = \"drop\"\n",
            crate::config::tests::MINIMAL
        );
        let Parts {
            config,
            acks,
            acked,
            metrics,
            shutdown,
            sink,
        } = parts(&text).await;
        let hooks = Arc::new(PanicsOnce {
            built: AtomicUsize::new(0),
        });
        let first = hooks.build().unwrap();
        let mut worker = Worker::new(
            &config,
            first,
            hooks.clone(),
            sink,
            acks,
            Arc::clone(&metrics),
            Arc::clone(&shutdown),
        );
        let envelope = Envelope {
            topic: Arc::from("t"),
            offset: 7,
            payload: bytes::Bytes::from_static(b"alert"),
            ..Default::default()
        };
        worker.handle(envelope);
        let ack = acked.try_recv().expect("the message is acknowledged");
        assert_eq!(ack.offset, 7);
        assert!(matches!(ack.outcome, Outcome::Dropped), "{:?}", ack.outcome);
        assert_eq!(metrics.hook_panics.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.hook_errors.load(Ordering::Relaxed), 1);
        assert_eq!(
            hooks.built.load(Ordering::SeqCst),
            2,
            "the hook was rebuilt"
        );
        assert!(
            shutdown.fatal().is_none(),
            "a hook panic does not stop the bridge"
        );
        // The rebuilt hook decides the next message.
        let view = Envelope {
            topic: Arc::from("t"),
            offset: 8,
            ..Default::default()
        };
        let decided = worker.hook.decide(&MessageView::new(&view)).unwrap();
        assert!(decided.keep);
    }

    /// A worker whose config has `[storage]` (a dry run, so no client is
    /// made) and the Rubin schemas, with `extra` appended.
    async fn storage_worker(object: &str, extra: &str) -> Worker {
        let text = format!(
            "{}\n[pipeline]\nsink = \"discard\"\n[alerts]\nschema_dir = \"{}/tests/data/schemas/lsst\"\n[storage]\nbucket = \"my-bucket\"\nobject = \"{object}\"\n{extra}",
            crate::config::tests::MINIMAL,
            env!("CARGO_MANIFEST_DIR")
        );
        passthrough_worker(&text).await
    }

    /// A worker with the pass-through hook, on `text`'s config.
    async fn passthrough_worker(text: &str) -> Worker {
        let Parts {
            config,
            acks,
            metrics,
            shutdown,
            sink,
            ..
        } = parts(text).await;
        Worker::new(
            &config,
            Box::new(crate::hook::Passthrough),
            Arc::new(crate::hook::Passthrough),
            sink,
            acks,
            metrics,
            shutdown,
        )
    }

    fn sample(file: &str) -> Envelope {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/alerts")
            .join(file);
        Envelope {
            topic: Arc::from("lsst-alerts"),
            payload: std::fs::read(path).unwrap().into(),
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn an_object_name_field_after_the_alerts_head_is_found_in_every_alert_not_only_the_first()
    {
        let worker = storage_worker("{diaObject.diaObjectId}.avro", "").await;
        let envelope = sample("rubin/pgc_lsst.v7_0.avro");
        let archive = ["@archive".to_string()];
        // The first alert of a wire-format schema is decoded whole; later
        // ones head first (before the fix, those failed: "is not in this alert").
        for round in 0..3 {
            let (objects, _) = worker
                .extras(&envelope, &archive, true, false)
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(objects[0].name, "281323062375219201.avro", "round {round}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_hook_naming_too_many_objects_is_refused_by_count_and_duplicates_are_written_once() {
        let worker = storage_worker("{kafka.offset}", "").await;
        let envelope = sample("rubin/pgc_lsst.v7_0.avro");
        let many: Vec<String> = (0..=MAX_DESTINATIONS)
            .map(|i| format!("gs://my-bucket/o/{i}"))
            .collect();
        let e = worker.extras(&envelope, &many, false, false).unwrap_err();
        assert!(e.contains("at most 100"), "{e}");
        let twice = vec![
            "gs://my-bucket/a".to_string(),
            "gs://my-bucket/a".to_string(),
        ];
        let (objects, _) = worker.extras(&envelope, &twice, true, false).unwrap();
        let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["a", "0"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_json_form_over_pubsubs_limit_is_an_error_before_it_is_all_made() {
        // All-null records with 200-character field names: 1 byte of Avro
        // per field, ~210 bytes of JSON (before the fix: 1 MB became 212 MB).
        let fields: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    r#"{{"name":"f{i}_{}","type":["null","double"],"default":null}}"#,
                    "x".repeat(200)
                )
            })
            .collect();
        let schema = format!(
            r#"{{"type":"record","name":"alert","namespace":"h","fields":[{{"name":"objectId","type":"string"}},{{"name":"prv","type":{{"type":"array","items":{{"type":"record","name":"p","fields":[{}]}}}}}}]}}"#,
            fields.join(",")
        );
        fn zigzag(out: &mut Vec<u8>, v: i64) {
            let mut z = ((v << 1) ^ (v >> 63)) as u64;
            while z >= 0x80 {
                out.push((z as u8 & 0x7f) | 0x80);
                z >>= 7;
            }
            out.push(z as u8);
        }
        let items = 20_000;
        let mut datum = Vec::new();
        zigzag(&mut datum, 1);
        datum.push(b'a');
        zigzag(&mut datum, items);
        datum.resize(datum.len() + 50 * items as usize, 0);
        zigzag(&mut datum, 0);
        let mut payload = b"Obj\x01".to_vec();
        zigzag(&mut payload, 1);
        zigzag(&mut payload, 11);
        payload.extend_from_slice(b"avro.schema");
        zigzag(&mut payload, schema.len() as i64);
        payload.extend_from_slice(schema.as_bytes());
        zigzag(&mut payload, 0);
        payload.extend_from_slice(&[7u8; 16]);
        zigzag(&mut payload, 1);
        zigzag(&mut payload, datum.len() as i64);
        payload.extend_from_slice(&datum);
        payload.extend_from_slice(&[7u8; 16]);
        let worker =
            storage_worker("{kafka.offset}", "[bigquery]\ntopics = [\"alerts-json\"]\n").await;
        let envelope = Envelope {
            topic: Arc::from("t"),
            payload: payload.into(),
            ..Default::default()
        };
        let e = worker.extras(&envelope, &[], false, true).unwrap_err();
        assert!(e.contains("over") && e.contains("Pub/Sub's limit"), "{e}");
    }
}
