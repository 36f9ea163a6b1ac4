//! librdkafka's mock cluster as a broker process of its own, for throughput
//! runs (tansu's sqlite engine serves ~130-250 alerts/s; this serves 10k+).
//!
//! ```text
//! cargo run --release --example mock_broker -- TOPIC:PARTITIONS...
//! ```
//! Prints `bootstrap=HOST:PORT`, then serves until killed. It keeps about
//! 5 MB per partition and drops older data silently: use partitions >=
//! messages x size / 5 MB, and count what arrives.

use rdkafka::mocking::MockCluster;

fn main() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for spec in std::env::args().skip(1) {
        let (topic, partitions) = spec
            .split_once(':')
            .and_then(|(t, p)| Some((t.to_string(), p.parse::<i32>().ok()?)))
            .unwrap_or_else(|| {
                eprintln!("usage: mock_broker TOPIC:PARTITIONS...");
                std::process::exit(2)
            });
        cluster
            .create_topic(&topic, partitions, 1)
            .unwrap_or_else(|e| panic!("{topic}: {e}"));
    }
    println!("bootstrap={}", cluster.bootstrap_servers());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
