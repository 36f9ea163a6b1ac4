//! Per-partition acknowledgement tracking: which offsets are safe to commit.
//!
//! Workers finish out of order, so "the last acknowledged offset" is not safe
//! to commit. The tracker keeps, per partition, the offsets handed out and not
//! yet *contiguously* acknowledged, in consumption order.
//!
//! Invariants:
//! - offsets are registered in increasing order per partition (the consumer
//!   is one thread and Kafka delivers a partition in order);
//! - the safe offset of a partition is one past the highest offset `o` such
//!   that every registered offset `<= o` has been acknowledged; it never goes
//!   backwards and never passes an unacknowledged offset;
//! - in-flight counts (messages and bytes) are exact: an entry is counted from
//!   [`OffsetTracker::register`] until its first acknowledgement.
//!
//! The tracker is owned by the consumer thread; acknowledgements reach it
//! through a channel, so it needs no lock on the hot path.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::envelope::Envelope;

/// How a message left the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Pub/Sub accepted it (on every destination topic).
    Published { bytes: usize },
    /// The hook dropped it on purpose.
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

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: i64,
    bytes: usize,
    acked: bool,
}

#[derive(Debug, Default)]
struct Partition {
    /// Registered and not yet released, in offset order.
    pending: VecDeque<Entry>,
    /// The next offset to commit: everything below it is acknowledged.
    safe: Option<i64>,
    /// The offset last handed to a commit.
    committed: Option<i64>,
}

/// Tracks in-flight offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<PartitionKey, Partition>,
    in_flight_messages: usize,
    in_flight_bytes: usize,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` of `key` was handed to the pipeline.
    pub fn register(&mut self, key: &PartitionKey, offset: i64, bytes: usize) {
        let p = match self.partitions.get_mut(key) {
            Some(p) => p,
            None => self.partitions.entry(key.clone()).or_default(),
        };
        if let Some(last) = p.pending.back() {
            if offset <= last.offset {
                // The consumer rewound (a seek or an offset reset). Entries at
                // or past the rewind point will be consumed again; forget them
                // so order holds. Their late acknowledgements are ignored.
                tracing::warn!(topic = %key.topic, partition = key.partition, offset, "partition rewound; forgetting later in-flight offsets");
                while p.pending.back().is_some_and(|e| e.offset >= offset) {
                    let e = p.pending.pop_back().expect("checked non-empty");
                    if !e.acked {
                        self.in_flight_messages -= 1;
                        self.in_flight_bytes -= e.bytes;
                    }
                }
            }
        }
        p.pending.push_back(Entry {
            offset,
            bytes,
            acked: false,
        });
        self.in_flight_messages += 1;
        self.in_flight_bytes += bytes;
    }

    /// Records that `offset` of `key` was acknowledged (published or dropped
    /// on purpose). Returns false if it was unknown or already acknowledged.
    pub fn ack(&mut self, key: &PartitionKey, offset: i64) -> bool {
        let Some(p) = self.partitions.get_mut(key) else {
            return false;
        };
        let Ok(i) = p.pending.binary_search_by_key(&offset, |e| e.offset) else {
            return false;
        };
        let e = &mut p.pending[i];
        if e.acked {
            return false;
        }
        e.acked = true;
        self.in_flight_messages -= 1;
        self.in_flight_bytes -= e.bytes;
        while p.pending.front().is_some_and(|e| e.acked) {
            let e = p.pending.pop_front().expect("checked non-empty");
            p.safe = Some(e.offset + 1);
        }
        true
    }

    /// Messages registered and not yet acknowledged.
    pub fn in_flight_messages(&self) -> usize {
        self.in_flight_messages
    }

    /// Bytes registered and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// In-flight messages of one partition.
    pub fn pending_in(&self, key: &PartitionKey) -> usize {
        self.partitions
            .get(key)
            .map_or(0, |p| p.pending.iter().filter(|e| !e.acked).count())
    }

    /// The safe offset of a partition: every offset below it is acknowledged.
    pub fn safe_offset(&self, key: &PartitionKey) -> Option<i64> {
        self.partitions.get(key).and_then(|p| p.safe)
    }

    /// Partitions whose safe offset moved since the last call, with that
    /// offset (the next one to consume, as Kafka commits expect). Marks them
    /// as handed to a commit.
    pub fn take_commits(&mut self) -> Vec<(PartitionKey, i64)> {
        self.take_commits_where(|_| true)
    }

    /// Like [`take_commits`](Self::take_commits), for the partitions `keep` selects.
    pub fn take_commits_where(
        &mut self,
        keep: impl Fn(&PartitionKey) -> bool,
    ) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        for (key, p) in &mut self.partitions {
            if let Some(safe) = p.safe {
                if p.committed != Some(safe) && keep(key) {
                    p.committed = Some(safe);
                    out.push((key.clone(), safe));
                }
            }
        }
        out.sort();
        out
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

    /// Undoes [`take_commits`](Self::take_commits) for offsets whose commit failed,
    /// so the next call offers them again.
    pub fn commit_failed(&mut self, key: &PartitionKey) {
        if let Some(p) = self.partitions.get_mut(key) {
            p.committed = None;
        }
    }

    /// Forgets a partition that was revoked. Its unacknowledged messages no
    /// longer count as in flight for this consumer.
    pub fn remove(&mut self, key: &PartitionKey) {
        if let Some(p) = self.partitions.remove(key) {
            for e in p.pending.iter().filter(|e| !e.acked) {
                self.in_flight_messages -= 1;
                self.in_flight_bytes -= e.bytes;
            }
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

    #[test]
    fn commits_only_past_contiguously_acknowledged_offsets() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        for o in 10..15 {
            t.register(&k, o, 100);
        }
        assert!(t.ack(&k, 12));
        assert!(t.ack(&k, 11));
        assert_eq!(t.safe_offset(&k), None, "10 is not acknowledged yet");
        assert!(t.take_commits().is_empty());
        assert!(t.ack(&k, 10));
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
        assert!(t.ack(&k, 1));
        assert!(!t.ack(&k, 1));
        assert!(!t.ack(&k, 7));
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
            t.ack(&k, o);
        }
        assert_eq!(t.safe_offset(&k), Some(21));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.register(&key(0), 0, 1);
        t.register(&key(1), 0, 1);
        t.ack(&key(1), 0);
        assert_eq!(t.take_commits(), vec![(key(1), 1)]);
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut t = OffsetTracker::new();
        t.register(&key(0), 0, 1);
        t.ack(&key(0), 0);
        assert_eq!(t.take_commits().len(), 1);
        t.commit_failed(&key(0));
        assert_eq!(t.take_commits(), vec![(key(0), 1)]);
    }

    #[test]
    fn a_revoked_partition_no_longer_counts_in_flight() {
        let mut t = OffsetTracker::new();
        t.register(&key(0), 0, 10);
        t.register(&key(1), 0, 10);
        t.remove(&key(0));
        assert_eq!(t.in_flight_messages(), 1);
        assert_eq!(t.in_flight_bytes(), 10);
        assert!(!t.ack(&key(0), 0));
    }

    #[test]
    fn a_rewind_forgets_later_offsets_and_keeps_order() {
        let mut t = OffsetTracker::new();
        let k = key(0);
        for o in 0..5 {
            t.register(&k, o, 1);
        }
        t.ack(&k, 0);
        t.register(&k, 2, 1);
        assert_eq!(t.in_flight_messages(), 2, "1 and the new 2");
        t.ack(&k, 1);
        t.ack(&k, 2);
        assert_eq!(t.safe_offset(&k), Some(3));
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
                prop_assert!(t.ack(&k, a));
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
    }
}
