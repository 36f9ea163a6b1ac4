//! The consumer loop against a fake consumer that behaves as librdkafka does
//! where it matters here: a partition's pause flag survives a revoke and a
//! re-assign, and a paused partition returns nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crossbeam_channel::{bounded, unbounded, Receiver};

use super::*;
use crate::config::Pipeline;

enum Event {
    Revoke(Vec<PartitionKey>),
    Assign(Vec<PartitionKey>),
    Error(ConsumeError),
    CommitAnswer(Vec<(PartitionKey, i64)>),
}

#[derive(Default)]
struct State {
    logs: BTreeMap<PartitionKey, Vec<Envelope>>,
    position: HashMap<PartitionKey, usize>,
    assigned: BTreeSet<PartitionKey>,
    /// librdkafka's per-partition pause flag: kept across revoke and assign.
    paused: BTreeSet<PartitionKey>,
    events: VecDeque<Event>,
    committed: BTreeMap<PartitionKey, i64>,
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    ledger: SharedLedger,
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

impl Partitions for Fake {
    fn pause(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        self.state().paused.extend(partitions.iter().cloned());
        Ok(())
    }

    fn resume(&self, partitions: &[PartitionKey]) -> Result<(), String> {
        let mut s = self.state();
        for k in partitions {
            s.paused.remove(k);
        }
        Ok(())
    }

    fn commit(&self, offsets: &[(PartitionKey, i64)], mode: CommitMode) -> Result<(), String> {
        let mut s = self.state();
        for (k, o) in offsets {
            s.committed.insert(k.clone(), *o);
        }
        if matches!(mode, CommitMode::Async) {
            s.events.push_back(Event::CommitAnswer(offsets.to_vec()));
        }
        Ok(())
    }
}

impl Source for Fake {
    fn poll(&mut self, _timeout: Duration) -> Polled {
        let event = self.state().events.pop_front();
        match event {
            Some(Event::Revoke(keys)) => {
                lock(&self.ledger).on_revoke(&keys, self);
                let mut s = self.state();
                for k in &keys {
                    s.assigned.remove(k);
                }
                return Polled::Idle;
            }
            Some(Event::Assign(keys)) => {
                {
                    let mut s = self.state();
                    for k in &keys {
                        s.assigned.insert(k.clone());
                        let from = s.committed.get(k).copied().unwrap_or(0) as usize;
                        s.position.insert(k.clone(), from);
                    }
                }
                lock(&self.ledger).on_assign(&keys, self);
                return Polled::Idle;
            }
            Some(Event::Error(e)) => return Polled::Error(e),
            Some(Event::CommitAnswer(offsets)) => {
                lock(&self.ledger).on_commit(Ok(()), &offsets);
                return Polled::Idle;
            }
            None => {}
        }
        let mut s = self.state();
        let ready: Vec<PartitionKey> = s
            .assigned
            .iter()
            .filter(|k| !s.paused.contains(*k))
            .cloned()
            .collect();
        for k in ready {
            let at = s.position.get(&k).copied().unwrap_or(0);
            if let Some(m) = s.logs.get(&k).and_then(|log| log.get(at)).cloned() {
                s.position.insert(k, at + 1);
                return Polled::Message(m);
            }
        }
        Polled::Idle
    }

    fn assignment(&self) -> Result<Vec<PartitionKey>, String> {
        Ok(self.state().assigned.iter().cloned().collect())
    }

    fn subscribe(&self, _patterns: &[String]) -> Result<(), String> {
        Ok(())
    }
}

fn key(p: i32) -> PartitionKey {
    PartitionKey {
        topic: Arc::from("ztf"),
        partition: p,
    }
}

fn limits(max_in_flight: usize) -> Pipeline {
    Pipeline {
        workers: 1,
        max_in_flight_messages: max_in_flight,
        max_in_flight_bytes: 1 << 30,
        commit_interval: Duration::from_millis(10),
        shutdown_timeout: Duration::from_secs(2),
        stats_interval: Duration::ZERO,
        discard: false,
        kafka_errors: KafkaErrorPolicy::Stop,
        tombstones: TombstonePolicy::Skip,
        stall_after: Duration::from_secs(60),
    }
}

struct Rig {
    lp: ConsumerLoop<Fake>,
    fake: Fake,
    work: Receiver<Envelope>,
    acks: Sender<Ack>,
    shutdown: Arc<Shutdown>,
    dead: Arc<Mutex<Vec<(Envelope, String)>>>,
}

fn rig(partitions: i32, per_partition: i64, settings: Settings) -> Rig {
    rig_with_queue(partitions, per_partition, settings, 1000)
}

fn rig_with_queue(partitions: i32, per_partition: i64, settings: Settings, queue: usize) -> Rig {
    let metrics = Arc::new(Metrics::new());
    let (acks, ack_rx) = unbounded();
    let ledger = Arc::new(Mutex::new(Ledger::new(ack_rx, Arc::clone(&metrics))));
    let mut state = State::default();
    for p in 0..partitions {
        let log = (0..per_partition)
            .map(|o| Envelope {
                topic: Arc::from("ztf"),
                partition: p,
                offset: o,
                payload: bytes::Bytes::from_static(b"alert"),
                ..Envelope::default()
            })
            .collect();
        state.logs.insert(key(p), log);
    }
    state
        .events
        .push_back(Event::Assign((0..partitions).map(key).collect()));
    let fake = Fake {
        state: Arc::new(Mutex::new(state)),
        ledger: Arc::clone(&ledger),
    };
    let (tx, work) = bounded(queue);
    let shutdown = Arc::new(Shutdown::new());
    let dead = Arc::new(Mutex::new(Vec::new()));
    let d = Arc::clone(&dead);
    let lp = ConsumerLoop::new(
        fake.clone(),
        ledger,
        vec![tx],
        settings,
        Box::new(move |e, why| d.lock().unwrap().push((e, why))),
        metrics,
        Arc::clone(&shutdown),
        None,
    );
    Rig {
        lp,
        fake,
        work,
        acks,
        shutdown,
        dead,
    }
}

fn settings(max_in_flight: usize) -> Settings {
    Settings {
        limits: limits(max_in_flight),
        kafka_errors: KafkaErrorPolicy::Stop,
        tombstones: TombstonePolicy::Skip,
        commits: true,
        stall_after: Duration::from_secs(60),
    }
}

impl Rig {
    fn steps(&mut self, n: usize) {
        for _ in 0..n {
            self.lp.step();
        }
    }

    /// Acknowledges everything the workers got, as Pub/Sub would.
    fn publish_all(&mut self) -> usize {
        let mut n = 0;
        while let Ok(e) = self.work.try_recv() {
            self.acks
                .send(Ack::new(&e, Outcome::Published { bytes: 5 }))
                .unwrap();
            n += 1;
        }
        n
    }

    fn committed(&self) -> BTreeMap<PartitionKey, i64> {
        self.fake.state().committed.clone()
    }
}

#[test]
fn a_rebalance_while_paused_leaves_every_partition_following_the_loop() {
    let mut r = rig(2, 12, settings(2));
    r.steps(5);
    assert_eq!(r.lp.ledger().tracker.in_flight_messages(), 2);
    // Pub/Sub is down: the bound stays reached until the loop pauses.
    std::thread::sleep(PAUSE_AFTER + Duration::from_millis(50));
    r.steps(2);
    assert!(
        r.lp.ledger().paused,
        "paused after PAUSE_AFTER at the bound"
    );
    assert_eq!(r.fake.state().paused.len(), 2);
    // A second member joins and leaves: partition 1 goes and comes back,
    // with librdkafka's pause flag still set on both.
    let started = Instant::now();
    r.fake.state().events.push_back(Event::Revoke(vec![key(1)]));
    r.fake.state().events.push_back(Event::Assign(vec![key(1)]));
    r.steps(3);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "a revoke while paused does not wait for Pub/Sub"
    );
    // Pub/Sub is back: everything drains.
    let mut published = 0;
    for _ in 0..200 {
        published += r.publish_all();
        r.steps(1);
    }
    published += r.publish_all();
    std::thread::sleep(Duration::from_millis(15));
    r.steps(5);
    assert!(r.fake.state().paused.is_empty(), "no partition left paused");
    let committed = r.committed();
    assert_eq!(committed.get(&key(0)), Some(&12), "{committed:?}");
    assert_eq!(committed.get(&key(1)), Some(&12), "{committed:?}");
    assert!(
        published >= 24,
        "the revoked in-flight message is consumed again"
    );
}

#[test]
fn a_consumer_error_stops_the_loop_and_no_commit_passes_it() {
    let mut r = rig(1, 3, settings(100));
    r.steps(4);
    r.publish_all();
    r.fake.state().events.push_back(Event::Error(ConsumeError {
        code: RDKafkaErrorCode::InvalidMessage,
        fatal: false,
        at: Some((key(0), 3)),
    }));
    // More data behind the bad record, as librdkafka would go on with it.
    r.fake
        .state()
        .logs
        .get_mut(&key(0))
        .unwrap()
        .push(Envelope {
            topic: Arc::from("ztf"),
            offset: 4,
            ..Envelope::default()
        });
    while !r.shutdown.is_stopping() {
        r.lp.step();
    }
    let fatal = r.shutdown.fatal().unwrap().to_string();
    assert!(fatal.contains("ztf[0]@3"), "{fatal}");
    assert!(fatal.contains("kafka_errors"), "{fatal}");
    let drained = r.lp.drain();
    assert_eq!(drained.abandoned, 0);
    assert_eq!(r.committed().get(&key(0)), Some(&3), "never past offset 3");
}

#[test]
fn a_skipped_consumer_error_is_dead_lettered_before_the_commit_passes_it() {
    let mut s = settings(100);
    s.kafka_errors = KafkaErrorPolicy::Skip;
    let mut r = rig(1, 2, s);
    r.steps(3);
    r.publish_all();
    r.fake.state().events.push_back(Event::Error(ConsumeError {
        code: RDKafkaErrorCode::InvalidMessage,
        fatal: false,
        at: Some((key(0), 2)),
    }));
    r.steps(5);
    assert!(!r.shutdown.is_stopping());
    let dead = std::mem::take(&mut *r.dead.lock().unwrap());
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].0.partition, dead[0].0.offset), (0, 2));
    assert!(dead[0].1.contains("ztf[0]@2"), "{}", dead[0].1);
    std::thread::sleep(Duration::from_millis(15));
    r.steps(3);
    assert_eq!(
        r.committed().get(&key(0)),
        Some(&2),
        "waits for the dead letter"
    );
    r.acks
        .send(Ack::new(&dead[0].0, Outcome::DeadLettered))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    r.steps(3);
    assert_eq!(r.committed().get(&key(0)), Some(&3));
    assert_eq!(
        r.lp.metrics.consumer_errors_skipped.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn informational_consumer_errors_change_nothing() {
    let mut r = rig(1, 1, settings(100));
    r.fake.state().events.push_back(Event::Error(ConsumeError {
        code: RDKafkaErrorCode::BrokerTransportFailure,
        fatal: false,
        at: None,
    }));
    r.steps(5);
    assert!(!r.shutdown.is_stopping());
    assert!(r.dead.lock().unwrap().is_empty());
}

#[test]
fn a_commit_follows_the_safe_offset_without_waiting_for_a_timer() {
    let mut s = settings(100);
    s.limits.commit_interval = Duration::from_secs(3600);
    let mut r = rig(1, 3, s);
    r.steps(5);
    r.publish_all();
    r.steps(3);
    assert_eq!(
        r.committed().get(&key(0)),
        None,
        "the interval bounds how often"
    );
    let mut s = settings(100);
    s.limits.commit_interval = Duration::from_millis(10);
    let mut r = rig(1, 3, s);
    r.steps(5);
    r.publish_all();
    std::thread::sleep(Duration::from_millis(15));
    r.steps(3);
    assert_eq!(r.committed().get(&key(0)), Some(&3));
}

#[test]
fn a_dry_run_never_commits() {
    let mut s = settings(100);
    s.commits = false;
    let mut r = rig(1, 3, s);
    r.steps(5);
    r.publish_all();
    std::thread::sleep(Duration::from_millis(15));
    r.steps(3);
    r.shutdown.request();
    r.lp.drain();
    assert!(r.committed().is_empty());
}

#[test]
fn skipped_tombstones_are_counted_and_committed_without_a_worker() {
    let mut r = rig(1, 0, settings(100));
    r.fake
        .state()
        .logs
        .get_mut(&key(0))
        .unwrap()
        .push(Envelope {
            topic: Arc::from("ztf"),
            tombstone: true,
            ..Envelope::default()
        });
    std::thread::sleep(Duration::from_millis(15));
    r.steps(4);
    assert!(
        r.work.try_recv().is_err(),
        "no worker sees a skipped tombstone"
    );
    assert_eq!(r.lp.metrics.tombstones.load(Ordering::Relaxed), 1);
    assert_eq!(r.committed().get(&key(0)), Some(&1));
}

#[test]
fn the_drain_keeps_within_the_shutdown_timeout_with_pubsub_down() {
    let mut r = rig(2, 5, settings(100));
    r.steps(12);
    r.shutdown.request();
    let started = Instant::now();
    let drained = r.lp.drain();
    let took = started.elapsed();
    assert_eq!(drained.abandoned, 10);
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(200),
        "{took:?}"
    );
    assert!(
        r.committed().is_empty(),
        "nothing acknowledged, nothing committed"
    );
}

#[test]
fn a_stall_is_reported_once_a_message_waits_longer_than_stall_after() {
    let mut s = settings(100);
    s.stall_after = Duration::from_millis(50);
    let mut r = rig(1, 1, s);
    r.steps(3);
    std::thread::sleep(Duration::from_millis(60));
    r.lp.check_stall();
    let why = r.lp.metrics.stalled.lock().unwrap().clone().unwrap();
    assert!(why.contains("ztf[0]@0"), "{why}");
    r.publish_all();
    r.steps(2);
    r.lp.check_stall();
    assert!(r.lp.metrics.stalled.lock().unwrap().is_none());
}

#[test]
fn a_worker_queue_that_is_full_parks_messages_the_loop_goes_on_and_hands_them_over_in_order() {
    let (stepped, steps_done) = std::sync::mpsc::channel();
    let (offsets, got) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // A worker that takes nothing for now: its queue holds 2 of the 10.
        let mut r = rig_with_queue(1, 10, settings(100), 2);
        r.steps(40);
        let parked: usize = r.lp.parked.iter().map(VecDeque::len).sum();
        stepped.send(parked).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 10 {
            while let Ok(e) = r.work.try_recv() {
                seen.push(e.offset);
            }
            r.lp.step();
        }
        offsets.send(seen).unwrap();
    });
    let parked = steps_done
        .recv_timeout(Duration::from_secs(10))
        .expect("the loop waited on a full worker queue instead of going on");
    assert_eq!(parked, 1, "one parked, and nothing more fetched meanwhile");
    let seen = got.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(seen, (0..10).collect::<Vec<i64>>(), "handed over in order");
}
