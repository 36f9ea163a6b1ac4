//! Loads alert files into a Kafka topic, for the demo and by hand.
//!
//! ```text
//! cargo run --example load_alerts -- --bootstrap 127.0.0.1:9092 --topic T \
//!     [--partitions N] [--copies K] [--rate R] FILE_OR_DIR...
//! ```
//! Creates the topic (if missing) with N partitions, then produces every file
//! as one message, K times over, round-robin across partitions, and waits for
//! every delivery report. `--rate R` paces production at R messages a second
//! (for latency runs; the message timestamp is the time it was produced).

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

fn usage() -> ! {
    eprintln!("usage: load_alerts --bootstrap HOST:PORT --topic T [--partitions N] [--copies K] [--rate R] FILE_OR_DIR...");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut bootstrap, mut topic, mut partitions, mut copies, mut paths) =
        (None, None, 4i32, 1usize, Vec::new());
    let mut rate: Option<f64> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bootstrap" => bootstrap = args.next(),
            "--topic" => topic = args.next(),
            "--partitions" => {
                partitions = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--copies" => {
                copies = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--rate" => {
                rate = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| usage()),
                )
            }
            _ if a.starts_with("--") => usage(),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let (Some(bootstrap), Some(topic)) = (bootstrap, topic) else {
        usage()
    };
    let files = ztfhook::archive::alert_files(&paths).unwrap_or_else(|e| panic!("{e}"));
    let payloads: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
        .collect();
    if payloads.is_empty() {
        usage()
    }
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &bootstrap);
    let admin: AdminClient<DefaultClientContext> = cc.create().expect("admin client");
    // Created only if missing: librdkafka's mock cluster never answers
    // CreateTopics for a topic it already has.
    let exists = admin
        .inner()
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map(|m| {
            m.topics()
                .iter()
                .any(|t| t.name() == topic && !t.partitions().is_empty())
        })
        .unwrap_or(false);
    if !exists {
        let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
        let _ = admin.create_topics([&new], &options).await;
    }
    let producer: FutureProducer = cc
        .clone()
        .set("message.max.bytes", "12000000")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    let mut n = 0usize;
    let start = std::time::Instant::now();
    for _ in 0..copies {
        for p in &payloads {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(n as f64 / rate);
                let now = std::time::Instant::now();
                if due > now {
                    producer.poll(Duration::ZERO);
                    tokio::time::sleep(due - now).await;
                }
            }
            let partition = (n % partitions as usize) as i32;
            let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&topic)
                .payload(p.as_slice())
                .partition(partition);
            let mut record = record;
            let future = loop {
                match producer.send_result(record) {
                    Ok(f) => break f,
                    Err((e, r))
                        if e.rdkafka_error_code()
                            == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                    {
                        producer.poll(Duration::from_millis(50));
                        record = r;
                    }
                    Err((e, _)) => panic!("produce: {e}"),
                }
            };
            pending.push(future);
            n += 1;
            if pending.len() >= 500 || (rate.is_some() && pending.len() >= 50) {
                for f in pending.drain(..) {
                    let _ = f
                        .await
                        .expect("delivery report")
                        .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
                }
            }
        }
    }
    for f in pending {
        let _ = f
            .await
            .expect("delivery report")
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
    println!("produced {n} messages to {topic} ({partitions} partitions)");
}
