//! ztfhook moves astronomy alert streams from Kafka to Google Cloud Pub/Sub.
//!
//! A fixed core consumes with librdkafka, hands each message to a pool of
//! worker threads that apply a [`hook`] (which decides the Pub/Sub topic, the
//! attributes to add, and whether to keep the message), and publishes with the
//! official `google-cloud-pubsub` crate. Kafka offsets are committed only after
//! Pub/Sub has acknowledged every earlier message of the same partition.
//!
//! # Layout
//!
//! ```text
//! config/            TOML -> raw serde structs -> validated, typed Config (once, at start-up)
//! envelope.rs        the owned Kafka message that travels from the consumer to the publisher
//! hook/mod.rs        the Hook trait: MessageView in, Decision out; HookError; the pass-through
//! hook/limits.rs     the limits of a script call (both engines); message.rs, returned.rs,
//!                    sampling.rs: what the engines share; rhai.rs, lua/: the engines;
//!                    script.rs: loading (engine by extension, deadline); reload.rs: live edits
//! attributes.rs      Pub/Sub attribute limits; Kafka metadata and headers as attributes
//! offsets.rs         per-partition acknowledgement tracking -> the offsets safe to commit
//! source/consumer.rs the consumer loop: owns assignment, pause state, the ledger and commits,
//!                    behind the Source/Partitions traits (librdkafka, or a fake in its tests)
//! source/kafka.rs    librdkafka: consumer creation, subscription, rebalance callbacks
//! sink/pubsub.rs     publishers per topic, Pub/Sub limits, retries, health check; the
//!                    fan-out of one message to its topics and objects
//! sink/storage.rs    Cloud Storage object writes (create-only, retried, bounded)
//! objects.rs         object names and the `[storage] object` template
//! alert/bigquery.rs  the BigQuery JSON form of an alert and its table schema
//! archive/           alert archives (tarballs, directories) for `replay` and `check`: the
//!                    members in a stable order, the checkpoint, the progress line, and
//!                    archive/source.rs: the archives as the consumer loop's Source
//! pipeline.rs        the wiring: services, the crossbeam worker pool, the hook per worker
//! shutdown.rs        the shared stop signal, and the typed reasons the bridge stops
//! metrics.rs         counters, one place, and the periodic stats line
//! http.rs            /metrics and /healthz (hyper), hardened against hostile clients
//! secret.rs          which settings are secret; URLs and errors scrubbed before shown
//! memory.rs          the allocator, counting per thread (a Rhai call's memory bound)
//! ```
//!
//! # Delivery guarantee
//!
//! At least once. Every message the consumer receives is registered with the
//! [`offsets::OffsetTracker`] before it is handed to a worker. A message is
//! acknowledged when Pub/Sub has accepted it (for every destination topic) and
//! Cloud Storage has every object it is written to, or
//! when the hook dropped it on purpose. The offset committed for a partition is
//! always one past the highest offset below which *every* message has been
//! acknowledged, so a crash at any point re-delivers, and never skips, what
//! Pub/Sub has not accepted. Messages in flight when a process dies may be
//! published twice; their number is bounded by the in-flight limits.

pub mod alert;
pub mod archive;
pub(crate) mod attributes;
pub mod check;
pub mod config;
pub mod connect;
pub mod envelope;
pub mod hook;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod objects;
pub(crate) mod offsets;
pub mod pipeline;
pub(crate) mod secret;
pub mod shutdown;
pub(crate) mod sink;
pub mod source;
pub mod tail;
