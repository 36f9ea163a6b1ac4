//! The owned message that travels from the consumer thread through a worker
//! to the publisher: a Kafka message, or an alert read from an archive by
//! `ztfhook replay` (see [`crate::archive`]), which then says where it came
//! from in [`Envelope::archive`].
//!
//! The payload is copied out of librdkafka's buffer exactly once, into a
//! [`Bytes`]; from there it is shared, never copied, into the Pub/Sub message.

use std::sync::Arc;

use bytes::Bytes;

/// One Kafka header. Kafka allows a null value, distinct from an empty one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Bytes>,
}

/// A Kafka message, owned.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The epoch its partition was in when the consumer loop registered it
    /// (see [`crate::offsets`]); 0 before registration.
    pub epoch: u64,
    /// A null value (a Kafka tombstone), told apart from an empty one:
    /// `payload` is then empty.
    pub tombstone: bool,
    /// Shared by every message of a partition: no allocation per message.
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch (create or append time), if the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    pub payload: Bytes,
    /// Where a replayed alert came from; `None` for a Kafka message. Then
    /// `topic` is the replay's topic, `partition` the input's position and
    /// `offset` the member's position in it, and there is no timestamp, key
    /// or header.
    pub archive: Option<Arc<ArchiveMember>>,
}

/// A member of an archive (a tarball's member, or a directory's file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveMember {
    /// The archive's file name (`ztf_public_20250302.tar.gz`), without its
    /// directory: it goes into attributes.
    pub file: Arc<str>,
    /// The member's path inside the tarball, or the file's path below the
    /// directory given.
    pub name: String,
    /// Why the member is not an alert (not Avro, over Pub/Sub's size limit):
    /// the message takes `hook.on_error` instead of the hook.
    pub problem: Option<String>,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            epoch: 0,
            tombstone: false,
            topic: Arc::from(""),
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            payload: Bytes::new(),
            archive: None,
        }
    }
}

impl Envelope {
    /// Where the message is, for log lines and errors:
    /// `topic[partition]@offset`, or `file:member` for a replayed alert.
    pub fn place(&self) -> String {
        match &self.archive {
            Some(m) => format!("{}:{}", m.file, m.name),
            None => format!("{}[{}]@{}", self.topic, self.partition, self.offset),
        }
    }

    /// Bytes this message holds in memory, as counted against
    /// `pipeline.max_in_flight_bytes`.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}
