//! The honest ceiling: a minimal correct bridge on the same two libraries
//! as ztfhook, what a careful engineer writes in a hundred lines. An rdkafka
//! consumer; Google's publisher with ztfhook's default batching (1,000
//! messages, 4 MB, 10 ms); the four `kafka.*` attributes and nothing else; at
//! most 10,000 messages and 48 MB in flight (ztfhook's defaults); and each
//! partition's offset committed only past messages that Pub/Sub has
//! acknowledged, every earlier one of the partition included. No hook, no
//! limits checks, no metrics. Uses PUBSUB_EMULATOR_HOST. Reads N messages,
//! then commits and prints `messages bytes seconds` (from the first message
//! consumed to the last acknowledgement).
//!
//! ```text
//! minimal_bridge BOOTSTRAP TOPIC GROUP PROJECT PUBSUB_TOPIC N
//! ```

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::model::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const MAX_MESSAGES: usize = 10_000;
const MAX_BYTES: usize = 48_000_000;

/// A partition's messages in offset order, each true once acknowledged.
#[derive(Default)]
struct Partition {
    pending: VecDeque<(i64, bool)>,
    /// One past the last offset below which every message is acknowledged.
    safe: Option<i64>,
    /// What was last committed (offered, for an asynchronous commit).
    committed: Option<i64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, group, project, ps, n] = args.as_slice() else {
        eprintln!("usage: minimal_bridge BOOTSTRAP TOPIC GROUP PROJECT PUBSUB_TOPIC N");
        std::process::exit(2)
    };
    let n: u64 = n.parse().expect("N");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let host = std::env::var("PUBSUB_EMULATOR_HOST").expect("PUBSUB_EMULATOR_HOST");
    let publisher = runtime.block_on(async {
        BasePublisher::builder()
            .with_endpoint(format!("http://{host}"))
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
            .build()
            .await
            .expect("publisher")
            .publisher(format!("projects/{project}/topics/{ps}"))
            .set_message_count_threshold(1000u32)
            .set_byte_threshold(4_000_000u32)
            .set_delay_threshold(Duration::from_millis(10))
            .build()
    });
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("queued.max.messages.kbytes", "16384")
        .set("fetch.max.bytes", "16777216")
        .set("fetch.queue.backoff.ms", "20")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let (tx, rx) = crossbeam_channel::unbounded::<(i32, i64, usize)>();
    let mut partitions: HashMap<i32, Partition> = HashMap::new();
    let (mut consumed, mut acked, mut bytes) = (0u64, 0u64, 0u64);
    let (mut in_flight, mut in_flight_bytes) = (0usize, 0usize);
    let mut start = None;
    let mut last_commit = Instant::now();
    while acked < n {
        // Acknowledgements: mark, and move each partition's safe offset.
        for (partition, offset, len) in rx.try_iter() {
            acked += 1;
            in_flight -= 1;
            in_flight_bytes -= len;
            let p = partitions.entry(partition).or_default();
            if let Some(slot) = p.pending.iter_mut().find(|(o, _)| *o == offset) {
                slot.1 = true;
            }
            while let Some((o, true)) = p.pending.front().copied() {
                p.pending.pop_front();
                p.safe = Some(o + 1);
            }
        }
        if last_commit.elapsed() >= Duration::from_millis(100) {
            commit(&consumer, topic, &mut partitions, CommitMode::Async);
            last_commit = Instant::now();
        }
        if consumed >= n || in_flight >= MAX_MESSAGES || in_flight_bytes >= MAX_BYTES {
            // At the bound: wait for an acknowledgement (the consumer's
            // background threads keep the session alive).
            if let Ok(ack) = rx.recv_timeout(Duration::from_millis(5)) {
                let _ = tx.send(ack);
            }
            continue;
        }
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(5)) else {
            continue;
        };
        start.get_or_insert_with(Instant::now);
        let data = Bytes::copy_from_slice(m.payload().unwrap_or_default());
        let len = data.len();
        let (partition, offset) = (m.partition(), m.offset());
        let mut attributes = vec![
            ("kafka.topic", m.topic().to_string()),
            ("kafka.partition", partition.to_string()),
            ("kafka.offset", offset.to_string()),
        ];
        if let Some(ts) = m.timestamp().to_millis() {
            attributes.push(("kafka.timestamp", ts.to_string()));
        }
        partitions
            .entry(partition)
            .or_default()
            .pending
            .push_back((offset, false));
        consumed += 1;
        bytes += len as u64;
        in_flight += 1;
        in_flight_bytes += len;
        let pending = publisher.publish(Message::new().set_data(data).set_attributes(attributes));
        let tx = tx.clone();
        runtime.spawn(async move {
            // A failed publish is never acknowledged, so never committed;
            // in this benchmark it stops the run at the end (acked < n).
            if pending.await.is_ok() {
                let _ = tx.send((partition, offset, len));
            }
        });
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    commit(&consumer, topic, &mut partitions, CommitMode::Sync);
    println!("{acked} {bytes} {secs:.3}");
}

/// Commits every partition whose safe offset has moved.
fn commit(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &mut HashMap<i32, Partition>,
    mode: CommitMode,
) {
    let mut tpl = TopicPartitionList::new();
    let mut moved = Vec::new();
    for (partition, p) in partitions.iter() {
        if let Some(offset) = p.safe.filter(|s| Some(*s) != p.committed) {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
            moved.push((*partition, offset));
        }
    }
    if tpl.count() == 0 {
        return;
    }
    match consumer.commit(&tpl, mode) {
        // Offered again at the next commit if it failed.
        Err(e) => eprintln!("minimal_bridge: commit: {e}"),
        Ok(()) => {
            for (partition, offset) in moved {
                if let Some(p) = partitions.get_mut(&partition) {
                    p.committed = Some(offset);
                }
            }
        }
    }
}
