//! Per-partition acknowledgement tracking: which offsets are safe to commit.
//!
//! Workers finish out of order, so "the last acknowledged offset" is not safe
//! to commit. The tracker keeps, per partition, the offsets handed out and not
//! yet *contiguously* acknowledged, in consumption order.
//!
//! Invariants:
//! - within one *epoch* of a partition, offsets are registered in increasing
//!   order (the consumer is one thread and Kafka delivers a partition in
//!   order). A partition gets a new epoch when it is assigned and when its
//!   offsets go backwards (a seek, an offset reset, a topic deleted and
//!   recreated): the old epoch's safe offset is forgotten, so it is never
//!   committed against the new log;
//! - every acknowledgement names the epoch its message was registered in; a
//!   late acknowledgement of an old copy never acknowledges the new one;
//! - the safe offset of a partition is one past the highest offset `o` such
//!   that every offset `<= o` registered in the current epoch has been
//!   acknowledged; within an epoch it never goes backwards and never passes an
//!   unacknowledged or failed offset;
//! - in-flight counts (messages and bytes) are exact and include *orphans*:
//!   messages of partitions given up (revoked, rewound) that the sink still
//!   holds. They no longer block any commit, but they still hold memory, so
//!   they count against the in-flight bounds until their acknowledgement.
//!
//! The tracker is owned by the consumer loop; acknowledgements reach it
//! through a channel, so it needs no lock on the hot path.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::envelope::Envelope;

/// How a message left the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Pub/Sub accepted it (on every destination topic).
    Published { bytes: usize },
    /// The hook dropped it on purpose (or it was a tombstone, skipped).
    Dropped,
    /// It went to the dead-letter topic.
    DeadLettered,
    /// It could not be published; the bridge is stopping. Its offset stays
    /// unacknowledged, so it is never committed.
    Failed,
}

/// The news that one message left the pipeline, sent to the consumer thread.
#[derive(Debug, Clone)]
pub struct Ack {
    pub key: PartitionKey,
    pub offset: i64,
    /// The epoch the message was registered in (see the module doc).
    pub epoch: u64,
    pub outcome: Outcome,
}

impl Ack {
    pub fn new(envelope: &Envelope, outcome: Outcome) -> Ack {
        Ack {
            key: PartitionKey {
                topic: Arc::clone(&envelope.topic),
                partition: envelope.partition,
            },
            offset: envelope.offset,
            epoch: envelope.epoch,
            outcome,
        }
    }
}

/// A Kafka topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Acked,
    /// Failed for good: blocks the safe offset, but nothing will resolve it.
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    bytes: usize,
    state: State,
    since: Instant,
}

#[derive(Debug)]
struct Partition {
    epoch: u64,
    /// Registered and not yet released, in offset order.
    pending: VecDeque<Entry>,
    /// The highest offset registered in this epoch.
    last: Option<i64>,
    /// The next offset to commit: everything below it is acknowledged.
    safe: Option<i64>,
    /// The offset last handed to a commit.
    committed: Option<i64>,
}

impl Partition {
    fn new(epoch: u64) -> Partition {
        Partition {
            epoch,
            pending: VecDeque::new(),
            last: None,
            safe: None,
            committed: None,
        }
    }
}

/// Tracks in-flight offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<PartitionKey, Partition>,
    /// Unacknowledged messages of epochs given up: (partition, epoch) ->
    /// offset -> bytes.
    orphans: HashMap<(PartitionKey, u64), HashMap<i64, usize>>,
    next_epoch: u64,
    in_flight_messages: usize,
    in_flight_bytes: usize,
    /// Pending (not acknowledged, not failed) messages of current epochs.
    unresolved: usize,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    fn fresh_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// Records that `offset` of `key` was handed to the pipeline; returns the
    /// epoch to put on the message (its acknowledgement must carry it).
    pub fn register(&mut self, key: &PartitionKey, offset: i64, bytes: usize) -> u64 {
        self.register_at(key, offset, bytes, Instant::now())
    }

    /// [`register`](Self::register) at a given time (for the stall age).
    pub fn register_at(
        &mut self,
        key: &PartitionKey,
        offset: i64,
        bytes: usize,
        now: Instant,
    ) -> u64 {
        let rewound = self
            .partitions
            .get(key)
            .and_then(|p| p.last)
            .is_some_and(|last| offset <= last);
        if rewound {
            // A seek, an offset reset or a recreated topic: what was in flight
            // and the safe offset belong to the old log.
            tracing::warn!(
                "kafka: {key} went back to offset {offset}: in-flight messages and the safe offset before it are forgotten (a new epoch)"
            );
            self.give_up(key);
        }
        if !self.partitions.contains_key(key) {
            let epoch = self.fresh_epoch();
            self.partitions.insert(key.clone(), Partition::new(epoch));
        }
        let p = self.partitions.get_mut(key).expect("inserted above");
        p.pending.push_back(Entry {
            offset,
            bytes,
            state: State::Pending,
            since: now,
        });
        p.last = Some(offset);
        self.in_flight_messages += 1;
        self.in_flight_bytes += bytes;
        self.unresolved += 1;
        p.epoch
    }

    /// Records that `offset` of `key`, registered in `epoch`, was
    /// acknowledged (published, dropped on purpose, dead-lettered). Returns
    /// false if it was unknown, already acknowledged, or of an epoch given up
    /// (an orphan: it then only stops counting in flight).
    pub fn ack(&mut self, key: &PartitionKey, epoch: u64, offset: i64) -> bool {
        self.resolve(key, epoch, offset, State::Acked)
    }

    /// Records that `offset` failed for good: it stays in place, so no commit
    /// ever passes it, and no longer counts as unresolved or in flight.
    pub fn fail(&mut self, key: &PartitionKey, epoch: u64, offset: i64) -> bool {
        self.resolve(key, epoch, offset, State::Failed)
    }

    fn resolve(&mut self, key: &PartitionKey, epoch: u64, offset: i64, to: State) -> bool {
        let current = self.partitions.get_mut(key).filter(|p| p.epoch == epoch);
        let Some(p) = current else {
            if let Some(o) = self.orphans.get_mut(&(key.clone(), epoch)) {
                if let Some(bytes) = o.remove(&offset) {
                    self.in_flight_messages -= 1;
                    self.in_flight_bytes -= bytes;
                    if o.is_empty() {
                        self.orphans.remove(&(key.clone(), epoch));
                    }
                }
            }
            return false;
        };
        let Ok(i) = p.pending.binary_search_by_key(&offset, |e| e.offset) else {
            return false;
        };
        let e = &mut p.pending[i];
        if e.state != State::Pending {
            return false;
        }
        e.state = to;
        self.in_flight_messages -= 1;
        self.in_flight_bytes -= e.bytes;
        self.unresolved -= 1;
        while p.pending.front().is_some_and(|e| e.state == State::Acked) {
            let e = p.pending.pop_front().expect("checked non-empty");
            p.safe = Some(e.offset + 1);
        }
        true
    }

    /// Messages registered and not yet acknowledged, orphans included (what
    /// the in-flight bounds count).
    pub fn in_flight_messages(&self) -> usize {
        self.in_flight_messages
    }

    /// Bytes registered and not yet acknowledged, orphans included.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Messages of owned partitions that may still be acknowledged: what a
    /// drain waits for.
    pub fn unresolved(&self) -> usize {
        self.unresolved
    }

    /// In-flight (pending) messages of one partition's current epoch.
    pub fn pending_in(&self, key: &PartitionKey) -> usize {
        self.partitions.get(key).map_or(0, |p| {
            p.pending
                .iter()
                .filter(|e| e.state == State::Pending)
                .count()
        })
    }

    /// The safe offset of a partition: every offset below it is acknowledged.
    #[cfg(test)]
    pub fn safe_offset(&self, key: &PartitionKey) -> Option<i64> {
        self.partitions.get(key).and_then(|p| p.safe)
    }

    /// The oldest message not yet acknowledged in any owned partition, and
    /// how long it has waited: a stalled partition shows here.
    pub fn oldest_unacknowledged(&self, now: Instant) -> Option<(PartitionKey, i64, Duration)> {
        self.partitions
            .iter()
            .filter_map(|(k, p)| p.pending.front().map(|e| (k, e)))
            .max_by_key(|(_, e)| now.saturating_duration_since(e.since))
            .map(|(k, e)| (k.clone(), e.offset, now.saturating_duration_since(e.since)))
    }

    /// Partitions whose safe offset moved since the last call, with that
    /// offset (the next one to consume, as Kafka commits expect). Marks them
    /// as handed to a commit.
    pub fn take_commits(&mut self) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (key, p) in &mut self.partitions {
            if let Some(safe) = p.safe {
                if p.committed != Some(safe) {
                    p.committed = Some(safe);
                    out.push((key.clone(), safe));
                }
            }
        }
        out.sort();
        out
    }

    /// Whether some partition's safe offset moved since it was last taken.
    pub fn has_commits(&self) -> bool {
        self.partitions
            .values()
            .any(|p| p.safe.is_some() && p.committed != p.safe)
    }

    /// The safe offset of every partition that has one.
    pub fn safe_offsets(&self) -> Vec<(PartitionKey, i64)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .filter_map(|(k, p)| p.safe.map(|s| (k.clone(), s)))
            .collect();
        out.sort();
        out
    }

    /// Undoes [`take_commits`](Self::take_commits) for a commit that failed,
    /// so the next call offers the partition again.
    pub fn commit_failed(&mut self, key: &PartitionKey, offset: i64) {
        if let Some(p) = self.partitions.get_mut(key) {
            if p.committed == Some(offset) {
                p.committed = None;
            }
        }
    }

    /// The partitions tracked (owned, in their current epoch).
    pub fn partitions(&self) -> impl Iterator<Item = &PartitionKey> {
        self.partitions.keys()
    }

    /// Gives a partition up (revoked, rewound, lost): its safe offset is
    /// forgotten, and its unacknowledged messages become orphans, which still
    /// count in flight until the sink is done with them.
    pub fn give_up(&mut self, key: &PartitionKey) {
        let Some(p) = self.partitions.remove(key) else {
            return;
        };
        let mut orphans = HashMap::new();
        for e in p.pending.iter() {
            if e.state == State::Pending {
                self.unresolved -= 1;
                orphans.insert(e.offset, e.bytes);
            }
        }
        if !orphans.is_empty() {
            self.orphans.insert((key.clone(), p.epoch), orphans);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(p: i32) -> PartitionKey {
        PartitionKey {
            topic: Arc::from("t"),
            partition: p,
        }
    }

    /// Acknowledges in the partition's current epoch.
    fn ack(t: &mut OffsetTracker, k: &PartitionKey, offset: i64) -> bool {
        let epoch = t.partitions.get(k).map_or(0, |p| p.epoch);
        t.ack(k, epoch, offset)
    }

    #[test]
    fn commits_only_past_contiguously_acknowledged_offsets() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        for o in 10..15 {
            t.register(&k, o, 100);
        }
        assert!(ack(&mut t, &k, 12));
        assert!(ack(&mut t, &k, 11));
        assert_eq!(t.safe_offset(&k), None, "10 is not acknowledged yet");
        assert!(t.take_commits().is_empty());
        assert!(ack(&mut t, &k, 10));
        assert_eq!(t.safe_offset(&k), Some(13));
        assert_eq!(t.take_commits(), vec![(k.clone(), 13)]);
        assert!(t.take_commits().is_empty(), "nothing moved since");
        assert_eq!(t.in_flight_messages(), 2);
        assert_eq!(t.in_flight_bytes(), 200);
    }

    #[test]
    fn a_second_acknowledgement_of_the_same_offset_changes_nothing() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        t.register(&k, 0, 5);
        t.register(&k, 1, 5);
        assert!(ack(&mut t, &k, 1));
        assert!(!ack(&mut t, &k, 1));
        assert!(!ack(&mut t, &k, 7));
        assert_eq!(t.in_flight_messages(), 1);
    }

    #[test]
    fn gaps_in_offsets_do_not_block_commits() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        for o in [3, 7, 8, 20] {
            t.register(&k, o, 1);
        }
        for o in [20, 8, 7, 3] {
            ack(&mut t, &k, o);
        }
        assert_eq!(t.safe_offset(&k), Some(21));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.register(&key(0), 0, 1);
        t.register(&key(1), 0, 1);
        ack(&mut t, &key(1), 0);
        assert_eq!(t.take_commits(), vec![(key(1), 1)]);
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut t = OffsetTracker::new();
        t.register(&key(0), 0, 1);
        ack(&mut t, &key(0), 0);
        assert_eq!(t.take_commits().len(), 1);
        t.commit_failed(&key(0), 1);
        assert_eq!(t.take_commits(), vec![(key(0), 1)]);
    }

    #[test]
    fn a_revoked_partition_stops_blocking_but_its_orphans_hold_the_bound_until_acknowledged() {
        let mut t = OffsetTracker::new();
        let e0 = t.register(&key(0), 0, 10);
        t.register(&key(1), 0, 10);
        t.give_up(&key(0));
        assert_eq!(t.unresolved(), 1, "only partition 1 is waited for");
        assert_eq!(t.in_flight_messages(), 2, "the orphan still holds memory");
        assert!(!t.ack(&key(0), e0, 0), "an orphan's ack commits nothing");
        assert_eq!(t.in_flight_messages(), 1);
        assert_eq!(t.in_flight_bytes(), 10);
        assert!(t.safe_offsets().is_empty());
    }

    #[test]
    fn a_late_acknowledgement_of_an_old_copy_does_not_acknowledge_the_new_one() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        let old = t.register(&k, 5, 1);
        t.give_up(&k);
        let new = t.register(&k, 5, 1);
        assert_ne!(old, new, "a re-assigned partition gets a new epoch");
        assert!(!t.ack(&k, old, 5));
        assert_eq!(t.safe_offset(&k), None, "the new copy is still in flight");
        assert!(t.ack(&k, new, 5));
        assert_eq!(t.safe_offset(&k), Some(6));
    }

    #[test]
    fn a_rewind_never_commits_the_old_safe_offset_against_the_new_log() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        for o in 0..12 {
            let e = t.register(&k, o, 1);
            t.ack(&k, e, o);
        }
        assert_eq!(t.safe_offset(&k), Some(12));
        // The topic was recreated (or the offset reset): offsets start again.
        let e = t.register(&k, 0, 1);
        assert_eq!(t.safe_offset(&k), None, "12 belongs to the old log");
        assert!(t.take_commits().is_empty());
        assert!(t.ack(&k, e, 0));
        assert_eq!(t.take_commits(), vec![(k.clone(), 1)]);
    }

    #[test]
    fn a_failed_offset_blocks_every_later_commit_and_is_not_waited_for() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        let e = t.register(&k, 0, 1);
        t.register(&k, 1, 1);
        assert!(t.fail(&k, e, 0));
        assert!(ack(&mut t, &k, 1));
        assert_eq!(t.safe_offset(&k), None);
        assert_eq!(t.unresolved(), 0, "a drain does not wait for it");
    }

    #[test]
    fn the_oldest_unacknowledged_message_is_found_with_its_age() {
        let mut t = OffsetTracker::new();
        let now = Instant::now();
        t.register_at(&key(0), 3, 1, now);
        t.register_at(&key(1), 9, 1, now + Duration::from_secs(5));
        let (k, o, age) = t
            .oldest_unacknowledged(now + Duration::from_secs(10))
            .unwrap();
        assert_eq!((k, o, age), (key(0), 3, Duration::from_secs(10)));
        ack(&mut t, &key(0), 3);
        let (k, _, age) = t
            .oldest_unacknowledged(now + Duration::from_secs(10))
            .unwrap();
        assert_eq!((k, age), (key(1), Duration::from_secs(5)));
    }

    proptest! {
        /// Whatever order acknowledgements come in, the safe offset never
        /// passes an unacknowledged offset, never goes backwards, and reaches
        /// the end once all are acknowledged.
        #[test]
        fn safe_offset_never_passes_an_unacknowledged_message(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            seed in any::<u64>(),
        ) {
            let k = key(0);
            let mut t = OffsetTracker::new();
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps {
                o += g;
                offsets.push(o);
                t.register(&k, o, 3);
            }
            let mut order = offsets.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                order.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut acked = std::collections::BTreeSet::new();
            let mut last_safe = None;
            for a in order {
                prop_assert!(ack(&mut t, &k, a));
                acked.insert(a);
                let safe = t.safe_offset(&k);
                if let Some(s) = safe {
                    for &x in offsets.iter().filter(|&&x| x < s) {
                        prop_assert!(acked.contains(&x), "safe {s} passes unacked {x}");
                    }
                    prop_assert!(last_safe <= Some(s));
                }
                last_safe = safe;
                prop_assert_eq!(t.in_flight_messages(), offsets.len() - acked.len());
                prop_assert_eq!(t.in_flight_bytes(), 3 * (offsets.len() - acked.len()));
            }
            prop_assert_eq!(t.safe_offset(&k), Some(offsets.last().unwrap() + 1));
        }

        /// Registrations, acknowledgements (in any order, late ones from old
        /// epochs included), rewinds, revokes and re-assigns in any mix: a
        /// safe offset only ever covers offsets acknowledged in its own epoch,
        /// and the counts stay exact.
        #[test]
        fn safe_offset_holds_through_rewinds_revokes_and_reassigns(
            ops in proptest::collection::vec((0u8..10, any::<u16>()), 1..300),
        ) {
            let k = key(0);
            let mut t = OffsetTracker::new();
            // What this epoch registered and acknowledged; every copy ever sent.
            let mut epoch = 0u64;
            let mut registered: Vec<i64> = Vec::new();
            let mut acked = std::collections::BTreeSet::new();
            let mut sent: Vec<(u64, i64)> = Vec::new();
            let mut next = 0i64;
            for (op, n) in ops {
                match op {
                    0..=4 => {
                        let e = t.register(&k, next, 1);
                        if e != epoch { epoch = e; registered.clear(); acked.clear(); }
                        registered.push(next);
                        sent.push((e, next));
                        next += 1 + i64::from(n % 2);
                    }
                    5..=7 if !sent.is_empty() => {
                        let (e, o) = sent.swap_remove(usize::from(n) % sent.len());
                        if t.ack(&k, e, o) { acked.insert(o); prop_assert_eq!(e, epoch); }
                    }
                    8 => { next = i64::from(n % 8); } // a rewind at the next registration
                    _ => { t.give_up(&k); registered.clear(); acked.clear(); epoch = 0; }
                }
                if let Some(s) = t.safe_offset(&k) {
                    for &x in registered.iter().filter(|&&x| x < s) {
                        prop_assert!(acked.contains(&x), "safe {} passes unacked {}", s, x);
                    }
                    prop_assert!(registered.iter().any(|&x| x == s - 1), "safe {} is not of this epoch", s);
                }
                prop_assert_eq!(t.in_flight_messages(), sent.len());
                prop_assert_eq!(t.in_flight_bytes(), sent.len());
                prop_assert_eq!(t.unresolved(), registered.len() - acked.len());
            }
        }
    }
}
