//! The consumer loop, as one type: it alone owns the assignment, the pause
//! state, the ledger of in-flight messages and the commits.
//!
//! ```text
//!   Source::poll ──▶ register (ledger) ──▶ worker of the partition
//!        ▲                                        │
//!   rebalance callbacks ──▶ Ledger::on_revoke / on_assign / on_commit
//!        │                                        ▼
//!   pause / resume / commit ◀── acks ◀──── Pub/Sub (every destination)
//! ```
//!
//! librdkafka's callbacks run inside [`Source::poll`], on the loop's thread;
//! they only call the [`Ledger`]'s transition methods, so every change of
//! state goes through this module.
//!
//! Invariants:
//! - a message is registered before any worker sees it, and a partition's
//!   offset is committed only once it and every earlier message of its epoch
//!   are acknowledged (see [`crate::offsets`]);
//! - after every rebalance, every assigned partition follows the loop's pause
//!   state: librdkafka keeps an application's pause flag on partitions that
//!   stay assigned and on partitions revoked and assigned back, so the loop
//!   pauses or resumes the whole assignment again;
//! - a revoke waits for the revoked partitions' in-flight messages only while
//!   Pub/Sub is acknowledging (never while paused, never at shutdown, never
//!   longer than [`REVOKE_WAIT`] or [`ACK_SILENCE`] without an ack), so a
//!   rebalance during an outage does not hold the group;
//! - the loop never waits long on a worker: what a worker's full queue cannot
//!   take is parked (registered, so within the in-flight bounds) and handed
//!   over, in order, as the queue empties (each step waits up to
//!   [`UNPARK_WAIT`] for a slot); meanwhile nothing more is fetched, and as
//!   at the in-flight bound the loop pauses within [`PAUSE_AFTER`] and goes
//!   on polling (rebalances, commits, `/healthz`);
//! - a consumer error never lets a commit pass a message: by default the loop
//!   stops; with `kafka_errors = "skip"` the error is dead-lettered and
//!   counted first;
//! - a commit is made as soon as a safe offset advances (at most one commit in
//!   flight, at most one per `commit_interval`), so a crash re-publishes at
//!   most what is in flight plus what was acknowledged in one interval;
//! - the drain at shutdown and the final commit keep within
//!   `shutdown_timeout`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use rdkafka::consumer::CommitMode;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{KafkaErrorPolicy, Pipeline, TombstonePolicy};
use crate::envelope::Envelope;
use crate::metrics::{Metrics, StatsLine};
use crate::offsets::{Ack, OffsetTracker, Outcome, PartitionKey};
use crate::shutdown::{Fatal, Shutdown};
use crate::source::subscription::Subscription;

/// How long the in-flight bound may stay reached before the partitions are
/// paused (until then the loop only waits for acknowledgements: a pause
/// purges librdkafka's prefetch).
const PAUSE_AFTER: Duration = Duration::from_secs(1);
/// How long a step waits for a busy worker to take a parked message.
const UNPARK_WAIT: Duration = Duration::from_millis(5);
/// The longest a revoke waits for the revoked partitions' in-flight messages.
pub(crate) const REVOKE_WAIT: Duration = Duration::from_secs(10);
/// A revoke stops waiting when no acknowledgement has come for this long:
/// Pub/Sub is not keeping up, and the group should not wait for it.
pub(crate) const ACK_SILENCE: Duration = Duration::from_millis(500);
/// How often the loop looks at the UTC date, for nightly templates.
const DATE_CHECK: Duration = Duration::from_secs(5);
/// How often the loop checks for a stalled partition.
const STALL_CHECK: Duration = Duration::from_secs(1);
/// An asynchronous commit with no answer after this long no longer holds the
/// next one back.
const COMMIT_ANSWER: Duration = Duration::from_secs(5);

/// The operations a rebalance needs from the consumer.
pub(crate) trait Partitions {
    /// Stops fetching these partitions.
    fn pause(&self, partitions: &[PartitionKey]) -> Result<(), String>;
    /// Fetches these partitions again (clears librdkafka's pause flag).
    fn resume(&self, partitions: &[PartitionKey]) -> Result<(), String>;
    /// Commits offsets (each the next offset to consume).
    fn commit(&self, offsets: &[(PartitionKey, i64)], mode: CommitMode) -> Result<(), String>;
}

/// The consumer, as the loop sees it: librdkafka's in production, a fake in
/// tests. `poll` runs the rebalance and commit callbacks, which call the
/// [`Ledger`]'s transitions.
pub(crate) trait Source: Partitions {
    fn poll(&mut self, timeout: Duration) -> Polled;
    /// The partitions assigned now.
    fn assignment(&self) -> Result<Vec<PartitionKey>, String>;
    /// Replaces the subscription (nightly topics).
    fn subscribe(&self, patterns: &[String]) -> Result<(), String>;
    /// What the loop's log lines call the source.
    fn label(&self) -> &'static str {
        "kafka"
    }
}

/// What one poll gave.
#[derive(Debug)]
pub(crate) enum Polled {
    Message(Envelope),
    Error(ConsumeError),
    /// Nothing (a timeout, or only callbacks ran).
    Idle,
}

/// An error the consumer reported instead of a message.
#[derive(Debug, Clone)]
pub(crate) struct ConsumeError {
    pub code: RDKafkaErrorCode,
    /// librdkafka says the consumer cannot go on.
    pub fatal: bool,
    /// The message's coordinates, where known.
    pub at: Option<(PartitionKey, i64)>,
}

impl ConsumeError {
    /// Errors that never mean a message was skipped: the end of a
    /// partition, and the transport and group-protocol conditions librdkafka
    /// recovers from by itself (it fetches the same offset again).
    pub(crate) fn is_informational(&self) -> bool {
        use RDKafkaErrorCode as C;
        !self.fatal
            && matches!(
                self.code,
                C::PartitionEOF
                    | C::BrokerTransportFailure
                    | C::AllBrokersDown
                    | C::Resolve
                    | C::MessageTimedOut
                    | C::OperationTimedOut
                    | C::RequestTimedOut
                    | C::NetworkException
                    | C::BrokerNotAvailable
                    | C::LeaderNotAvailable
                    | C::NotLeaderForPartition
                    | C::NotCoordinator
                    | C::CoordinatorNotAvailable
                    | C::CoordinatorLoadInProgress
                    | C::RebalanceInProgress
                    | C::IllegalGeneration
                    | C::UnknownMemberId
                    | C::UnknownTopicOrPartition
                    | C::UnknownTopic
                    | C::BrokerDestroy
                    | C::Interrupted
                    | C::WaitCache
                    | C::Authentication
                    | C::NoOffset
            )
    }

    fn describe(&self) -> String {
        let at = match &self.at {
            Some((k, o)) => format!("{k}@{o}"),
            None => "an unnamed partition (librdkafka gave no coordinates)".into(),
        };
        let fatal = if self.fatal { " (fatal)" } else { "" };
        format!("kafka: consuming {at} failed: {}{fatal}", self.code)
    }
}

/// The loop's book: the offset tracker, the acknowledgements, the
/// assignment and the pause state. Shared with librdkafka's callbacks (which
/// run on the loop's thread, inside `poll`), so its mutex is never contended.
pub(crate) struct Ledger {
    pub(crate) tracker: OffsetTracker,
    acks: Receiver<Ack>,
    /// The loop's pause state; every assigned partition follows it.
    paused: bool,
    /// The partitions the ledger believes are assigned.
    assigned: BTreeSet<PartitionKey>,
    /// Set by a rebalance callback: the loop reconciles with the consumer.
    rebalanced: bool,
    /// Set at shutdown, after the final commit: a revoke neither waits nor
    /// commits what was committed already.
    closing: bool,
    /// When the unanswered asynchronous commit was sent, and what it held.
    commit_sent: Option<Instant>,
    sent: Vec<(PartitionKey, i64)>,
    /// Whether the last commit answered was a failure.
    last_commit_failed: bool,
    /// When the last acknowledgement arrived.
    last_ack: Instant,
    /// False in a dry run: nothing is committed, not even on a revoke.
    commits: bool,
    metrics: Arc<Metrics>,
}

impl Ledger {
    pub(crate) fn new(acks: Receiver<Ack>, metrics: Arc<Metrics>) -> Ledger {
        Ledger {
            tracker: OffsetTracker::new(),
            acks,
            paused: false,
            assigned: BTreeSet::new(),
            rebalanced: false,
            closing: false,
            commit_sent: None,
            sent: Vec::new(),
            last_commit_failed: false,
            last_ack: Instant::now(),
            commits: true,
            metrics,
        }
    }

    fn apply(&mut self, ack: Ack) {
        self.last_ack = Instant::now();
        let m = &self.metrics;
        match ack.outcome {
            Outcome::Failed => {
                m.failed.fetch_add(1, Ordering::Relaxed);
                self.tracker.fail(&ack.key, ack.epoch, ack.offset);
                return;
            }
            Outcome::Published { bytes } => {
                m.published.fetch_add(1, Ordering::Relaxed);
                m.published_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Outcome::Dropped => {
                m.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::DeadLettered => {
                m.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.tracker.ack(&ack.key, ack.epoch, ack.offset);
    }

    /// Applies every acknowledgement waiting, without blocking.
    pub(crate) fn drain(&mut self) {
        while let Ok(ack) = self.acks.try_recv() {
            self.apply(ack);
        }
    }

    /// Waits up to `timeout` for one acknowledgement, then drains the rest.
    pub(crate) fn drain_wait(&mut self, timeout: Duration) {
        if let Ok(ack) = self.acks.recv_timeout(timeout) {
            self.apply(ack);
        }
        self.drain();
    }

    /// Updates the in-flight gauges.
    pub(crate) fn publish_gauges(&self) {
        self.metrics
            .in_flight_messages
            .store(self.tracker.in_flight_messages() as u64, Ordering::Relaxed);
        self.metrics
            .in_flight_bytes
            .store(self.tracker.in_flight_bytes() as u64, Ordering::Relaxed);
    }

    /// Partitions are being revoked: wait (bounded, see the module doc) for
    /// their in-flight messages, commit their safe offsets synchronously, and
    /// give them up. Their unacknowledged messages become orphans: their next
    /// owner consumes them again.
    pub(crate) fn on_revoke(&mut self, revoked: &[PartitionKey], ops: &dyn Partitions) {
        self.rebalanced = true;
        let started = Instant::now();
        let pending = |l: &Ledger| {
            revoked
                .iter()
                .map(|k| l.tracker.pending_in(k))
                .sum::<usize>()
        };
        if !self.closing && !self.paused {
            self.drain();
            self.last_ack = self.last_ack.max(started);
            while pending(self) > 0
                && started.elapsed() < REVOKE_WAIT
                && self.last_ack.elapsed() < ACK_SILENCE
            {
                self.drain_wait(Duration::from_millis(10));
            }
        }
        // Every revoked partition's safe offset, even one an unanswered
        // asynchronous commit already carries: committing it again is
        // harmless, and that answer may yet fail after the partition is gone.
        // A dry run commits nothing.
        let commits: Vec<_> = if self.commits {
            self.tracker
                .safe_offsets()
                .into_iter()
                .filter(|(k, _)| revoked.contains(k))
                .collect()
        } else {
            Vec::new()
        };
        if !commits.is_empty() {
            match ops.commit(&commits, CommitMode::Sync) {
                Ok(()) => {
                    self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "kafka: revoking {} partitions, committed {}",
                        revoked.len(),
                        printable(&commits)
                    );
                }
                Err(e) => {
                    self.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "kafka: revoking {} partitions: commit of {} failed: {e}",
                        revoked.len(),
                        printable(&commits)
                    );
                }
            }
        }
        for k in revoked {
            let left = self.tracker.pending_in(k);
            if left > 0 {
                tracing::warn!(
                    "kafka: {k} revoked after {:?} with {left} messages unacknowledged: not committed; its next owner consumes them again",
                    started.elapsed()
                );
            }
            self.tracker.give_up(k);
            self.assigned.remove(k);
        }
    }

    /// The assignment was lost (a rebalance error): handled as a revoke of
    /// what the error names, then reconciled with the consumer's assignment.
    pub(crate) fn on_lost(&mut self, lost: &[PartitionKey], ops: &dyn Partitions) {
        tracing::warn!(
            "kafka: rebalance error: giving up {} partitions as revoked",
            lost.len()
        );
        self.on_revoke(lost, ops);
    }

    /// Partitions were assigned: they follow the loop's pause state at once,
    /// before anything is fetched.
    pub(crate) fn on_assign(&mut self, assigned: &[PartitionKey], ops: &dyn Partitions) {
        self.rebalanced = true;
        self.assigned.extend(assigned.iter().cloned());
        if assigned.is_empty() {
            return;
        }
        let result = if self.paused {
            ops.pause(assigned)
        } else {
            ops.resume(assigned)
        };
        if let Err(e) = result {
            tracing::warn!("kafka: cannot set the pause state of newly assigned partitions: {e}");
        }
    }

    /// A commit's answer (asynchronous or not). A failed one is offered again.
    pub(crate) fn on_commit(
        &mut self,
        result: Result<(), String>,
        offsets: &[(PartitionKey, i64)],
    ) {
        self.commit_sent = None;
        self.sent.clear();
        self.last_commit_failed = result.is_err();
        if let Err(e) = result {
            self.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "kafka: commit of {} failed: {e}; it is retried",
                printable(offsets)
            );
            for (k, o) in offsets {
                self.tracker.commit_failed(k, *o);
            }
        }
    }
}

/// Formats commits as `topic[partition]=offset`.
pub(crate) fn printable(offsets: &[(PartitionKey, i64)]) -> String {
    if offsets.is_empty() {
        return "nothing".into();
    }
    offsets
        .iter()
        .map(|(k, o)| format!("{k}={o}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The shared ledger; never contended (see [`Ledger`]).
pub(crate) type SharedLedger = Arc<Mutex<Ledger>>;

pub(crate) fn lock(ledger: &SharedLedger) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which worker takes a partition's messages: always the same one, so a
/// partition's messages reach the publisher in offset order.
pub(crate) fn worker_for(key: &PartitionKey, workers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % workers as u64) as usize
}

/// What the loop does besides the consumer and the workers.
pub(crate) struct Settings {
    pub limits: Pipeline,
    pub kafka_errors: KafkaErrorPolicy,
    pub tombstones: TombstonePolicy,
    /// False for a dry run (`pipeline.sink = "discard"`): nothing is committed.
    pub commits: bool,
    /// Oldest unacknowledged message older than this: `/healthz` says stalled.
    pub stall_after: Duration,
}

/// A message the loop cannot hand to a worker (a skipped consumer error),
/// with the reason, for the dead-letter topic.
pub(crate) type DeadLetter = Box<dyn FnMut(Envelope, String) + Send>;

/// The consumer loop.
pub(crate) struct ConsumerLoop<S: Source> {
    source: S,
    ledger: SharedLedger,
    /// One queue per worker; a partition always goes to the same one.
    work: Vec<Sender<Envelope>>,
    /// Per worker, what its full queue could not take yet, in order: the
    /// loop never waits on a worker (it must keep polling), and these are
    /// registered, so the in-flight bounds count them.
    parked: Vec<VecDeque<Envelope>>,
    settings: Settings,
    dead_letter: DeadLetter,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    subscription: Option<(Subscription, Vec<String>)>,
    full_since: Option<Instant>,
    last_commit: Instant,
    last_date_check: Instant,
    last_stall_check: Instant,
    /// Consumption progress, for the "lag but nothing consumed" stall.
    progress: (u64, Instant),
    stats: StatsLine,
}

/// What the drain left behind.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Drained {
    /// Messages still unacknowledged at the deadline (not committed).
    pub abandoned: usize,
}

impl<S: Source> ConsumerLoop<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        source: S,
        ledger: SharedLedger,
        work: Vec<Sender<Envelope>>,
        settings: Settings,
        dead_letter: DeadLetter,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        subscription: Option<(Subscription, Vec<String>)>,
    ) -> Self {
        let now = Instant::now();
        let stats = StatsLine::new(&metrics);
        lock(&ledger).commits = settings.commits;
        ConsumerLoop {
            source,
            ledger,
            parked: work.iter().map(|_| VecDeque::new()).collect(),
            work,
            settings,
            dead_letter,
            metrics,
            shutdown,
            subscription,
            full_since: None,
            last_commit: now,
            last_date_check: now,
            last_stall_check: now,
            progress: (0, now),
            stats,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// The consumer, for what the loop does not own (closing it).
    pub(crate) fn into_source(self) -> S {
        self.source
    }

    /// Consumes until a stop is requested (or a fatal error), then drains and
    /// commits within `shutdown_timeout`.
    pub(crate) fn run(&mut self) -> Drained {
        while !self.shutdown.is_stopping() {
            self.step();
        }
        self.drain()
    }

    /// One turn of the loop: acknowledgements, rebalance reconciliation,
    /// back-pressure, one poll, chores.
    pub(crate) fn step(&mut self) {
        let limits = self.settings.limits;
        // A worker that is behind (a slow hook, or waiting for room for its
        // copies) leaves messages parked: fetch no more until it takes them.
        let parked = self.unpark();
        let (full, rebalanced) = {
            let mut l = self.ledger();
            l.drain();
            // Fanned-out copies have a bound of the same size, held by the
            // workers (crate::sink::copies): at it, or with a worker waiting
            // for room, pause too rather than wait on a worker's full queue.
            // Paused for them, it resumes only below half the bound, so it
            // does not flap at every share given back.
            let m = &self.metrics;
            let copies = m.in_flight_copy_bytes.load(Ordering::Relaxed) as usize;
            let copies_full = m.copy_waiters.load(Ordering::SeqCst) > 0
                || copies >= limits.max_in_flight_bytes
                || (l.paused && copies >= limits.max_in_flight_bytes / 2);
            let full = l.tracker.in_flight_messages() >= limits.max_in_flight_messages
                || l.tracker.in_flight_bytes() >= limits.max_in_flight_bytes
                || copies_full
                || parked
                // Paused, it resumes only once the workers' queues are
                // half empty, so a slow worker does not make it flap.
                || (l.paused && self.work.iter().any(|w| w.capacity().is_some_and(|c| w.len() * 2 > c)));
            (full, std::mem::take(&mut l.rebalanced))
        };
        if rebalanced {
            self.reconcile();
        }
        if full {
            let since = *self.full_since.get_or_insert_with(Instant::now);
            if !self.ledger().paused && since.elapsed() >= PAUSE_AFTER {
                self.set_paused(true, "the in-flight bound is reached");
            }
            if !self.ledger().paused {
                self.ledger().drain_wait(Duration::from_millis(5));
                self.chores();
                return;
            }
        } else {
            self.full_since = None;
            if self.ledger().paused {
                self.set_paused(false, "acknowledgements made room");
            }
        }
        let wait = if self.ledger().paused {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(100)
        };
        match self.source.poll(wait) {
            Polled::Message(envelope) => self.take(envelope),
            Polled::Error(e) => self.consumer_error(e),
            Polled::Idle => {}
        }
        self.chores();
    }

    /// Registers a message and hands it to its partition's worker.
    fn take(&mut self, mut envelope: Envelope) {
        let key = PartitionKey {
            topic: Arc::clone(&envelope.topic),
            partition: envelope.partition,
        };
        let size = envelope.size();
        self.metrics.consumed.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .consumed_bytes
            .fetch_add(envelope.payload.len() as u64, Ordering::Relaxed);
        if envelope.tombstone && self.settings.tombstones == TombstonePolicy::Skip {
            let mut l = self.ledger();
            let epoch = l.tracker.register(&key, envelope.offset, size);
            l.tracker.ack(&key, epoch, envelope.offset);
            self.metrics.tombstones.fetch_add(1, Ordering::Relaxed);
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if envelope.tombstone {
            self.metrics.tombstones.fetch_add(1, Ordering::Relaxed);
        }
        envelope.epoch = self.ledger().tracker.register(&key, envelope.offset, size);
        // Behind what is parked for its worker already, so in order.
        let worker = worker_for(&key, self.work.len());
        self.parked[worker].push_back(envelope);
        self.hand_over(worker, Duration::ZERO);
    }

    /// Hands parked messages to their workers as far as their queues take
    /// them, waiting up to [`UNPARK_WAIT`] per worker for a free slot (so a
    /// busy worker is fed as soon as it takes one); true if some are still
    /// parked.
    fn unpark(&mut self) -> bool {
        let mut left = false;
        for worker in 0..self.parked.len() {
            left |= self.hand_over(worker, UNPARK_WAIT);
        }
        left
    }

    /// Hands a worker's parked messages over in order, waiting up to `wait`
    /// for a slot each; true if some are still parked.
    fn hand_over(&mut self, worker: usize, wait: Duration) -> bool {
        let parked = &mut self.parked[worker];
        let queue = &self.work[worker];
        while let Some(envelope) = parked.pop_front() {
            // A free slot is taken at once; only a full queue is waited on
            // (crossbeam's send_timeout spins first even for no wait).
            let sent = match queue.try_send(envelope) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(envelope)) if wait.is_zero() => {
                    Err(SendTimeoutError::Timeout(envelope))
                }
                Err(TrySendError::Full(envelope)) => queue.send_timeout(envelope, wait),
                Err(TrySendError::Disconnected(envelope)) => {
                    Err(SendTimeoutError::Disconnected(envelope))
                }
            };
            match sent {
                Ok(()) => {}
                Err(SendTimeoutError::Timeout(envelope)) => {
                    parked.push_front(envelope);
                    return true;
                }
                Err(SendTimeoutError::Disconnected(envelope)) => {
                    parked.clear();
                    let partition = format!("{}[{}]", envelope.topic, envelope.partition);
                    self.shutdown
                        .fail(Fatal::WorkerStopped { worker, partition });
                    return false;
                }
            }
        }
        false
    }

    fn consumer_error(&mut self, e: ConsumeError) {
        if e.is_informational() {
            if e.code != RDKafkaErrorCode::PartitionEOF {
                tracing::debug!("{} (librdkafka recovers from this)", e.describe());
            }
            return;
        }
        let what = e.describe();
        match self.settings.kafka_errors {
            KafkaErrorPolicy::Stop => {
                if let Some((k, o)) = &e.at {
                    // Blocks the partition's safe offset at the message.
                    let mut l = self.ledger();
                    let epoch = l.tracker.register(k, *o, 0);
                    l.tracker.fail(k, epoch, *o);
                }
                self.shutdown.fail(Fatal::KafkaError { error: what });
            }
            KafkaErrorPolicy::Skip => {
                self.metrics
                    .consumer_errors_skipped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{what}; kafka_errors = \"skip\": sending its coordinates to the dead-letter topic and going on");
                let mut envelope = Envelope {
                    offset: -1,
                    partition: -1,
                    ..Envelope::default()
                };
                if let Some((k, o)) = &e.at {
                    envelope.topic = Arc::clone(&k.topic);
                    envelope.partition = k.partition;
                    envelope.offset = *o;
                    // The commit passes it only once the dead letter is taken.
                    envelope.epoch = self.ledger().tracker.register(k, *o, 0);
                }
                (self.dead_letter)(envelope, what);
            }
        }
    }

    /// After a rebalance: the consumer's assignment is the truth. Partitions
    /// the ledger still tracks but no longer owns are given up, and every
    /// assigned partition is paused or resumed to match the loop.
    fn reconcile(&mut self) {
        let actual: BTreeSet<PartitionKey> = match self.source.assignment() {
            Ok(a) => a.into_iter().collect(),
            Err(e) => {
                tracing::warn!("kafka: cannot read the assignment: {e}");
                return;
            }
        };
        let mut l = self.ledger();
        let stale: Vec<PartitionKey> = l
            .tracker
            .partitions()
            .filter(|k| !actual.contains(*k))
            .cloned()
            .collect();
        for k in &stale {
            tracing::warn!("kafka: {k} is no longer assigned: given up");
            l.tracker.give_up(k);
        }
        l.assigned = actual.clone();
        let paused = l.paused;
        drop(l);
        self.metrics
            .assigned_partitions
            .store(actual.len() as i64, Ordering::Relaxed);
        let all: Vec<PartitionKey> = actual.into_iter().collect();
        if !all.is_empty() {
            let result = if paused {
                self.source.pause(&all)
            } else {
                self.source.resume(&all)
            };
            if let Err(e) = result {
                tracing::warn!("kafka: cannot apply the pause state after a rebalance: {e}");
            }
        }
    }

    /// Pauses or resumes the whole assignment, and records it.
    fn set_paused(&mut self, pause: bool, why: &str) {
        // Recorded only once librdkafka has done it (an empty assignment
        // included: what is assigned next follows the state), so a failure
        // is tried again at the next step and a loop that could not pause
        // does not poll as if it had.
        let all = match self.source.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("kafka: cannot read the assignment: {e}");
                return;
            }
        };
        if !all.is_empty() {
            let result = if pause {
                self.source.pause(&all)
            } else {
                self.source.resume(&all)
            };
            if let Err(e) = result {
                tracing::warn!(
                    "kafka: cannot {} partitions: {e}",
                    if pause { "pause" } else { "resume" }
                );
                return;
            }
            tracing::info!(
                "{}: {} {} partitions ({why})",
                self.source.label(),
                if pause { "paused" } else { "resumed" },
                all.len(),
            );
        }
        self.ledger().paused = pause;
    }

    /// Commits, the date check, the stall check, gauges and the stats line.
    fn chores(&mut self) {
        self.commit_if_due();
        if let Some((subscription, subscribed)) = &mut self.subscription {
            if subscription.has_templates() && self.last_date_check.elapsed() >= DATE_CHECK {
                self.last_date_check = Instant::now();
                let now = subscription.patterns();
                if now != *subscribed {
                    tracing::info!("the UTC date changed: subscribing to {now:?}");
                    match self.source.subscribe(&now) {
                        Ok(()) => *subscribed = now,
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
        }
        if self.last_stall_check.elapsed() >= STALL_CHECK {
            self.last_stall_check = Instant::now();
            self.check_stall();
        }
        self.ledger().publish_gauges();
        if self.stats.due(self.settings.limits.stats_interval) {
            self.stats.log(&self.metrics);
        }
    }

    /// An asynchronous commit as soon as a safe offset moved: at most one
    /// unanswered, at most one per `commit_interval`.
    fn commit_if_due(&mut self) {
        if !self.settings.commits
            || self.last_commit.elapsed() < self.settings.limits.commit_interval
        {
            return;
        }
        let mut l = self.ledger();
        if l.commit_sent.is_some_and(|t| t.elapsed() >= COMMIT_ANSWER) {
            // No answer: as good as failed; offer those offsets again.
            let sent = std::mem::take(&mut l.sent);
            l.on_commit(Err(format!("no answer in {COMMIT_ANSWER:?}")), &sent);
        }
        if !l.tracker.has_commits() || l.commit_sent.is_some() {
            return;
        }
        let commits = l.tracker.take_commits();
        drop(l);
        self.last_commit = Instant::now();
        match self.source.commit(&commits, CommitMode::Async) {
            Ok(()) => {
                self.metrics.commits.fetch_add(1, Ordering::Relaxed);
                let mut l = self.ledger();
                l.commit_sent = Some(Instant::now());
                l.sent = commits;
            }
            Err(e) => self.ledger().on_commit(Err(e), &commits),
        }
    }

    /// `/healthz` turns 503 when the oldest unacknowledged message is older
    /// than `stall_after`, or when there is lag and nothing was consumed for
    /// that long.
    fn check_stall(&mut self) {
        let now = Instant::now();
        let oldest = self.ledger().tracker.oldest_unacknowledged(now);
        let age = oldest.as_ref().map_or(Duration::ZERO, |(_, _, a)| *a);
        self.metrics
            .oldest_unacknowledged_ms
            .store(age.as_millis() as u64, Ordering::Relaxed);
        let consumed = self.metrics.consumed.load(Ordering::Relaxed);
        if consumed != self.progress.0 {
            self.progress = (consumed, now);
        }
        let idle = now.duration_since(self.progress.1);
        let lag = self.metrics.lag.load(Ordering::Relaxed);
        let after = self.settings.stall_after;
        let reason = match oldest {
            Some((k, o, a)) if a >= after => Some(format!(
                "{k}@{o} has waited {}s for its destinations' acknowledgement (Pub/Sub, Cloud Storage) (pipeline.stall_after_ms = {})",
                a.as_secs(),
                after.as_millis()
            )),
            _ if lag > 0 && idle >= after && !self.ledger().paused => Some(format!(
                "{lag} messages of lag and nothing consumed for {}s",
                idle.as_secs()
            )),
            _ => None,
        };
        *self
            .metrics
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// Stops fetching, lets the workers finish their queues, waits for
    /// Pub/Sub, and commits what is safe: all within `shutdown_timeout`.
    fn drain(&mut self) -> Drained {
        let timeout = self.settings.limits.shutdown_timeout;
        let started = Instant::now();
        let deadline = started + timeout;
        // The final commit's share of the deadline.
        let reserve = (timeout / 4).min(Duration::from_secs(2));
        tracing::info!("stopping: no more fetches; draining in-flight messages");
        self.set_paused(true, "stopping");
        // What is parked goes to the workers first (they wait for nothing
        // once stopping); what misses the deadline stays unacknowledged.
        // After a worker's first miss the rest of its list stays behind too,
        // so nothing is published ahead of a message left unpublished.
        for (worker, parked) in self.parked.iter_mut().enumerate() {
            for envelope in parked.drain(..) {
                let left = deadline.saturating_duration_since(Instant::now() + reserve);
                if self.work[worker].send_timeout(envelope, left).is_err() {
                    break;
                }
            }
        }
        self.work.clear();
        let abandoned = loop {
            let unresolved = {
                let mut l = self.ledger();
                l.drain_wait(Duration::from_millis(20));
                l.tracker.unresolved()
            };
            if unresolved == 0 {
                break 0;
            }
            if Instant::now() + reserve >= deadline {
                tracing::warn!(
                    "{unresolved} messages still unacknowledged after {:?}: not committed; they will be consumed again",
                    started.elapsed()
                );
                break unresolved;
            }
            // Keeps the group session alive; anything fetched is not
            // registered, so never committed. Rebalances run (paused: no wait).
            let _ = self.source.poll(Duration::ZERO);
        };
        if self.settings.commits {
            self.final_commit(deadline);
        } else {
            tracing::info!("a dry run (pipeline.sink = \"discard\"): nothing committed");
        }
        let mut l = self.ledger();
        l.closing = true;
        l.publish_gauges();
        drop(l);
        self.stats.log(&self.metrics);
        Drained { abandoned }
    }

    /// Commits every safe offset and waits for the answer until `deadline`.
    fn final_commit(&mut self, deadline: Instant) {
        let commits = {
            let mut l = self.ledger();
            let _ = l.tracker.take_commits();
            l.tracker.safe_offsets()
        };
        if commits.is_empty() {
            return;
        }
        if let Err(e) = self.source.commit(&commits, CommitMode::Async) {
            tracing::warn!("final commit of {} failed: {e}", printable(&commits));
            return;
        }
        self.ledger().commit_sent = Some(Instant::now());
        while self.ledger().commit_sent.is_some() && Instant::now() < deadline {
            let _ = self.source.poll(Duration::from_millis(20));
        }
        let l = self.ledger();
        if l.commit_sent.is_some() {
            tracing::warn!(
                "final commit of {} not answered within pipeline.shutdown_timeout_ms",
                printable(&commits)
            );
        } else if l.last_commit_failed {
            tracing::warn!("final commit of {} failed", printable(&commits));
        } else {
            tracing::info!("committed {}", printable(&commits));
        }
    }
}

#[cfg(test)]
mod tests;
