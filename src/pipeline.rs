//! The bridge: the consumer loop, the crossbeam worker pool, back-pressure and
//! the drain at shutdown.
//!
//! ```text
//!  consumer thread ──bounded channel──▶ workers (hook, attributes, limits)
//!        ▲                                   │ publish (never blocks)
//!        │                                   ▼
//!        └──────────── acks ◀──────── Pub/Sub publishers (tokio)
//! ```
//!
//! Invariants:
//! - a message is registered with the ledger before any worker sees it, and
//!   its offset is committed only once it and every earlier message of its
//!   partition are acknowledged;
//! - consumption pauses while `max_in_flight_messages` or
//!   `max_in_flight_bytes` are reached, so memory stays bounded when Pub/Sub is
//!   slow or down;
//! - all workers and their hooks are built before any starts, so a bad hook
//!   fails before a message is consumed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver};
use google_cloud_pubsub::client::Publisher;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};

use crate::attributes::{self, MAX_MESSAGE_BYTES};
use crate::config::{Config, ErrorPolicy, TopicName};
use crate::envelope::Envelope;
use crate::hook::{Decision, Hook, HookFactory, MessageView};
use crate::metrics::{Metrics, StatsLine};
use crate::offsets::{Ack, Outcome};
use crate::shutdown::Shutdown;
use crate::sink::pubsub::{check_topics, Delivery, Endpoint, PubsubSink, SinkError};
use crate::source::kafka::{self, Ledger, Printable, SourceContext, SourceError};
use crate::source::subscription::{Clock, Subscription, SystemClock};

/// Messages waiting for a worker, per worker.
const QUEUE_PER_WORKER: usize = 64;
/// How long the in-flight bound may stay reached before the partitions are
/// paused (until then the consumer only waits for acknowledgements).
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// How often the consumer looks at the UTC date, for nightly templates.
const DATE_CHECK: Duration = Duration::from_secs(5);
/// Room in a publish request for the topic name and the message's framing.
const REQUEST_OVERHEAD: usize = 1_024;

/// Why the bridge stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Hook(String),
    #[error("cannot start: {0}")]
    Runtime(String),
    #[error("cannot serve metrics: {0}")]
    Metrics(String),
    /// A fatal error while running (a permanent publish failure, ...).
    #[error("{0}")]
    Fatal(String),
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
    config: Config,
    hooks: Arc<dyn HookFactory>,
    shutdown: Arc<Shutdown>,
    clock: Arc<dyn Clock>,
) -> Result<Summary, BridgeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ztfhook-pubsub")
        .enable_all()
        .build()
        .map_err(|e| BridgeError::Runtime(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    if let Some(address) = config.metrics_listen {
        let bound = crate::http::serve(address, Arc::clone(&metrics), Arc::clone(&hooks))
            .map_err(BridgeError::Metrics)?;
        tracing::info!("metrics on http://{bound}/metrics, health on http://{bound}/healthz");
    }
    let (ack_tx, ack_rx) = unbounded::<Ack>();

    // Start-up checks, in the order a user fixes them: Pub/Sub topics, hook, broker.
    let endpoint = Endpoint::resolve(config.pubsub.endpoint.as_deref());
    tracing::info!("publishing to {endpoint}");
    if config.pipeline.discard {
        tracing::warn!("pipeline.sink = \"discard\": nothing is published (a dry run)");
    } else {
        runtime.block_on(check_topics(&endpoint, &config.pubsub_topics()))?;
    }
    let sink = Arc::new(runtime.block_on(PubsubSink::connect(
        &config,
        endpoint,
        ack_tx.clone(),
        Arc::clone(&shutdown),
        Arc::clone(&metrics),
    ))?);
    let mut workers: Vec<Worker> = Vec::with_capacity(config.pipeline.workers);
    for _ in 0..config.pipeline.workers {
        let hook = hooks
            .build()
            .map_err(|e| BridgeError::Hook(e.to_string()))?;
        workers.push(Worker::new(
            &config,
            hook,
            Arc::clone(&sink),
            ack_tx.clone(),
            Arc::clone(&metrics),
            Arc::clone(&shutdown),
        ));
    }
    drop(ack_tx);
    tracing::info!("hook {} on {} workers", hooks.name(), workers.len());

    let context = SourceContext::new(
        Ledger::new(ack_rx, Arc::clone(&metrics)),
        Arc::clone(&metrics),
    );
    let consumer = kafka::create(&config, context)?;
    let subscription = Subscription::new(
        config.kafka.topics.clone(),
        config.kafka.previous_nights,
        clock,
    );
    let mut subscribed = kafka::check_and_subscribe(&consumer, &config, &subscription)?;
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

    runtime.spawn(crate::shutdown::listen_for_signals(Arc::clone(&shutdown)));

    let (work_tx, work_rx) = bounded::<Envelope>(QUEUE_PER_WORKER * workers.len());
    let threads: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let rx = work_rx.clone();
            std::thread::Builder::new()
                .name(format!("ztfhook-worker-{i}"))
                .spawn(move || w.run(rx))
                .expect("spawning a worker thread")
        })
        .collect();
    drop(work_rx);

    // The consumer loop: register, hand out, apply acks, pause when full, commit.
    let limits = config.pipeline;
    let mut topics = HashMap::new();
    let mut paused = false;
    let mut full_since: Option<Instant> = None;
    let mut last_commit = Instant::now();
    let mut last_date_check = Instant::now();
    let mut stats = StatsLine::new(&metrics);
    while !shutdown.is_stopping() {
        let full = {
            let mut ledger = consumer.context().ledger();
            ledger.drain();
            ledger.tracker.in_flight_messages() >= limits.max_in_flight_messages
                || ledger.tracker.in_flight_bytes() >= limits.max_in_flight_bytes
        };
        if consumer
            .context()
            .assignment_changed
            .swap(false, Ordering::SeqCst)
        {
            paused = false;
            let assigned = consumer.assignment().map_or(0, |a| a.count());
            metrics
                .assigned_partitions
                .store(assigned as i64, Ordering::Relaxed);
        }
        // Full: first just wait for acknowledgements without polling (what
        // librdkafka has prefetched stays in its queue, bounded by
        // queued.max.messages.kbytes). Only a stall longer than PAUSE_AFTER
        // pauses the partitions, which purges librdkafka's prefetch, so that
        // polling (the group protocol, rebalances) goes on through a long
        // Pub/Sub outage.
        if full {
            let since = *full_since.get_or_insert_with(Instant::now);
            if !paused && since.elapsed() >= PAUSE_AFTER {
                set_paused(&consumer, true);
                paused = true;
            }
            if !paused {
                consumer
                    .context()
                    .ledger()
                    .drain_wait(Duration::from_millis(5));
                maintain(&consumer, &mut last_commit, &limits, &metrics, &mut stats);
                continue;
            }
        } else {
            full_since = None;
            if paused {
                set_paused(&consumer, false);
                paused = false;
            }
        }
        let wait = if paused {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(wait) {
            Some(Ok(message)) => {
                let envelope = kafka::envelope(&message, &mut topics);
                drop(message);
                let size = envelope.size();
                consumer.context().ledger().tracker.register(
                    &crate::offsets::PartitionKey {
                        topic: Arc::clone(&envelope.topic),
                        partition: envelope.partition,
                    },
                    envelope.offset,
                    size,
                );
                metrics.consumed.fetch_add(1, Ordering::Relaxed);
                metrics
                    .consumed_bytes
                    .fetch_add(envelope.payload.len() as u64, Ordering::Relaxed);
                if work_tx.send(envelope).is_err() {
                    shutdown.fail("all workers stopped");
                }
            }
            Some(Err(e)) => tracing::warn!("kafka: {e}"),
            None => {}
        }
        if subscription.has_templates() && last_date_check.elapsed() >= DATE_CHECK {
            last_date_check = Instant::now();
            let now = subscription.patterns();
            if now != subscribed {
                tracing::info!("the UTC date changed: subscribing to {now:?}");
                match kafka::subscribe(&consumer, &now) {
                    Ok(()) => subscribed = now,
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        maintain(&consumer, &mut last_commit, &limits, &metrics, &mut stats);
    }

    // Drain: stop fetching, let the workers finish the queue, wait for Pub/Sub.
    tracing::info!("stopping: no more fetches; draining in-flight messages");
    set_paused(&consumer, true);
    drop(work_tx);
    let deadline = Instant::now() + limits.shutdown_timeout;
    let abandoned = loop {
        let unresolved = {
            let mut ledger = consumer.context().ledger();
            ledger.drain_wait(Duration::from_millis(20));
            ledger.unresolved()
        };
        if unresolved == 0 {
            break 0;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                "{unresolved} messages still unacknowledged after {:?}: not committed; they will be consumed again",
                limits.shutdown_timeout
            );
            break unresolved;
        }
        // Keeps the group session alive; anything fetched is not registered
        // and so never committed.
        let _ = consumer.poll(Duration::ZERO);
    };
    let commits = {
        let ledger = consumer.context().ledger();
        ledger.tracker.safe_offsets()
    };
    match kafka::commit(&consumer, &commits, CommitMode::Sync) {
        Ok(()) => tracing::info!("committed {:?}", Printable(&commits)),
        Err(e) => tracing::warn!("final {e}"),
    }
    consumer.context().closing.store(true, Ordering::SeqCst);
    if abandoned == 0 {
        for t in threads {
            let _ = t.join();
        }
    }
    consumer.context().ledger().publish_gauges();
    stats.log(&metrics);
    drop(consumer);
    runtime.shutdown_timeout(Duration::from_secs(1));

    let summary = Summary {
        consumed: metrics.consumed.load(Ordering::Relaxed),
        published: metrics.published.load(Ordering::Relaxed),
        dropped: metrics.dropped.load(Ordering::Relaxed),
        dead_lettered: metrics.dead_lettered.load(Ordering::Relaxed),
        abandoned,
    };
    match shutdown.fatal() {
        Some(error) => Err(BridgeError::Fatal(error.to_string())),
        None => Ok(summary),
    }
}

/// The consumer loop's periodic chores: an asynchronous commit of the safe
/// offsets every `commit_interval`, and the stats line.
fn maintain(
    consumer: &BaseConsumer<SourceContext>,
    last_commit: &mut Instant,
    limits: &crate::config::Pipeline,
    metrics: &Metrics,
    stats: &mut StatsLine,
) {
    if last_commit.elapsed() >= limits.commit_interval {
        let commits = consumer.context().ledger().tracker.take_commits();
        if let Err(e) = kafka::commit(consumer, &commits, CommitMode::Async) {
            tracing::warn!("{e}");
            let mut ledger = consumer.context().ledger();
            for (k, _) in &commits {
                ledger.tracker.commit_failed(k);
            }
        } else if !commits.is_empty() {
            metrics.commits.fetch_add(1, Ordering::Relaxed);
        }
        *last_commit = Instant::now();
    }
    // The in-flight gauges stay current for /metrics, stats line or not.
    consumer.context().ledger().publish_gauges();
    if stats.due(limits.stats_interval) {
        stats.log(metrics);
    }
}

fn set_paused(consumer: &BaseConsumer<SourceContext>, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    if assignment.count() == 0 {
        return;
    }
    let result = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match result {
        Ok(()) => tracing::debug!(
            "kafka: {} {} partitions",
            if pause { "paused" } else { "resumed" },
            assignment.count()
        ),
        Err(e) => tracing::warn!(
            "kafka: cannot {} partitions: {e}",
            if pause { "pause" } else { "resume" }
        ),
    }
}

/// One worker thread: applies the hook and hands the message to the sink.
struct Worker {
    hook: Box<dyn Hook>,
    sink: Arc<PubsubSink>,
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
    /// Topics named by the hook, resolved and with their publisher.
    topics: HashMap<String, (TopicName, Publisher)>,
    /// Acknowledge instead of publishing (`pipeline.sink = "discard"`).
    discard: bool,
}

impl Worker {
    fn new(
        config: &Config,
        hook: Box<dyn Hook>,
        sink: Arc<PubsubSink>,
        acks: crossbeam_channel::Sender<Ack>,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
    ) -> Worker {
        let default_topic = config.pubsub.topic.clone();
        let default_publisher = vec![sink.publisher(&default_topic)];
        Worker {
            hook,
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
            topics: HashMap::new(),
            discard: config.pipeline.discard,
        }
    }

    fn run(mut self, queue: Receiver<Envelope>) {
        for envelope in queue.iter() {
            self.handle(envelope);
        }
    }

    fn handle(&mut self, envelope: Envelope) {
        let started = Instant::now();
        let decided = self.hook.decide(&MessageView::new(&envelope));
        self.metrics.hook_time.observe(started.elapsed());
        let decision = match decided {
            Ok(d) => d,
            Err(e) => return self.hook_failed(envelope, e.to_string()),
        };
        if !decision.keep {
            let _ = self.acks.send(Ack::new(&envelope, Outcome::Dropped));
            return;
        }
        let Decision {
            topics: named,
            attributes: hook_attributes,
            ordering_key,
            ..
        } = decision;
        let (topics, publishers) = match self.resolve(&named) {
            Ok(t) => t,
            Err(why) => return self.hook_failed(envelope, why),
        };
        let attrs = match attributes::build(&self.options, &envelope, &hook_attributes) {
            Ok(a) => a,
            Err(v) => return self.hook_failed(envelope, format!("hook attributes: {v}")),
        };
        self.send(
            envelope,
            topics,
            publishers,
            attrs,
            hook_attributes,
            ordering_key,
        );
    }

    /// Applies `hook.on_error` to a message the hook failed on.
    fn hook_failed(&mut self, envelope: Envelope, reason: String) {
        self.metrics.hook_errors.fetch_add(1, Ordering::Relaxed);
        self.errors += 1;
        let at = format!(
            "{}[{}]@{}",
            envelope.topic, envelope.partition, envelope.offset
        );
        if self.errors <= 10 || self.errors.is_power_of_two() {
            tracing::warn!(
                "{at}: {reason} (hook.on_error = {:?}; {} hook errors in this worker)",
                self.policy,
                self.errors
            );
        }
        match self.policy {
            ErrorPolicy::Passthrough => {
                let hook_attributes = vec![(
                    attributes::ERROR.to_string(),
                    crate::sink::pubsub::truncate(&reason, attributes::MAX_VALUE_BYTES),
                )];
                let attrs = match attributes::build(&self.options, &envelope, &hook_attributes) {
                    Ok(a) => a,
                    Err(v) => unreachable!("ztfhook.error is within limits: {v}"),
                };
                let topics = vec![self.default_topic.clone()];
                let publishers = self.default_publisher.clone();
                self.send(envelope, topics, publishers, attrs, hook_attributes, None);
            }
            ErrorPolicy::DeadLetter => self.sink.dead_letter(envelope, None, reason, true),
            ErrorPolicy::Drop => {
                let _ = self.acks.send(Ack::new(&envelope, Outcome::Dropped));
            }
            ErrorPolicy::Stop => {
                self.shutdown
                    .fail(format!("{at}: {reason}; hook.on_error = \"stop\", so the bridge stops without committing it"));
                let _ = self.acks.send(Ack::new(&envelope, Outcome::Failed));
            }
        }
    }

    /// Checks the size against Pub/Sub's limit, then publishes.
    fn send(
        &mut self,
        envelope: Envelope,
        topics: Vec<TopicName>,
        publishers: Vec<Publisher>,
        attrs: attributes::Attributes,
        hook_attributes: Vec<(String, String)>,
        ordering_key: Option<String>,
    ) {
        if attrs.omitted > 0 {
            self.metrics
                .omitted_attributes
                .fetch_add(attrs.omitted as u64, Ordering::Relaxed);
        }
        let longest = topics.iter().map(|t| t.as_str().len()).max().unwrap_or(0);
        let size =
            envelope.payload.len() + attrs.size() + ordering_key.as_ref().map_or(0, String::len);
        if size + longest + REQUEST_OVERHEAD > MAX_MESSAGE_BYTES {
            let reason = format!(
                "message of {size} bytes (payload {}) is over Pub/Sub's {MAX_MESSAGE_BYTES}-byte request limit",
                envelope.payload.len()
            );
            self.sink
                .dead_letter(envelope, topics.first(), reason, false);
            return;
        }
        if self.discard {
            let bytes = envelope.payload.len();
            let _ = self
                .acks
                .send(Ack::new(&envelope, Outcome::Published { bytes }));
            return;
        }
        self.sink.publish(
            &publishers,
            Delivery {
                envelope,
                topics,
                attributes: attrs,
                hook_attributes,
                ordering_key,
            },
        );
    }

    /// The hook's topic names as full names with their publishers; the
    /// default topic when it named none.
    fn resolve(&mut self, named: &[String]) -> Result<(Vec<TopicName>, Vec<Publisher>), String> {
        if named.is_empty() {
            return Ok((
                vec![self.default_topic.clone()],
                self.default_publisher.clone(),
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
            if !self.topics.contains_key(name) {
                let topic = TopicName::parse(&self.project, name)
                    .map_err(|e| format!("hook topic: {e}"))?;
                let publisher = self.sink.publisher(&topic);
                self.topics.insert(name.clone(), (topic, publisher));
            }
            let (t, p) = &self.topics[name];
            if !topics.contains(t) {
                topics.push(t.clone());
                publishers.push(p.clone());
            }
        }
        Ok((topics, publishers))
    }
}
