//! The owned Kafka message that travels from the consumer thread through a
//! worker to the publisher.
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
        }
    }
}

impl Envelope {
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
