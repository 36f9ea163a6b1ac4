//! The consume baseline: a plain rdkafka consumer that reads N messages and
//! discards them. Prints `messages bytes seconds`.
//!
//! ```text
//! raw_consume BOOTSTRAP TOPIC N
//! ```

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, n] = args.as_slice() else {
        eprintln!("usage: raw_consume BOOTSTRAP TOPIC N");
        std::process::exit(2)
    };
    let n: u64 = n.parse().expect("N");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("raw-consume-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "32768")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut start = None;
    while messages < n {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            messages += 1;
            bytes += m.payload().map_or(0, |p| p.len() as u64);
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!("{messages} {bytes} {secs:.3}");
}
