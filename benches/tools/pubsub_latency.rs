//! Reads what a run published from a subscription: the count of distinct
//! Kafka coordinates, and the latency from Kafka's append time
//! (`kafka.timestamp`) to Pub/Sub's acceptance (`publish_time`), p50 and p99
//! in milliseconds. Uses PUBSUB_EMULATOR_HOST. Stops after N messages or 15 s
//! of silence. Prints `received distinct p50_ms p99_ms`.
//!
//! ```text
//! pubsub_latency SUBSCRIPTION N
//! ```

use std::collections::HashSet;
use std::time::Duration;

use google_cloud_pubsub::client::Subscriber;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [subscription, n] = args.as_slice() else {
        eprintln!("usage: pubsub_latency SUBSCRIPTION N");
        std::process::exit(2)
    };
    let n: usize = n.parse().expect("N");
    let host = std::env::var("PUBSUB_EMULATOR_HOST").expect("PUBSUB_EMULATOR_HOST");
    let client = Subscriber::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .expect("subscriber");
    let mut stream = client.subscribe(subscription.as_str()).build();
    let (mut received, mut seen, mut latencies) = (0usize, HashSet::new(), Vec::new());
    while received < n {
        let next = tokio::time::timeout(Duration::from_secs(15), stream.next()).await;
        let Ok(Some(Ok((m, handler)))) = next else {
            break;
        };
        handler.ack();
        received += 1;
        let key = (
            m.attributes.get("kafka.topic").cloned().unwrap_or_default(),
            m.attributes
                .get("kafka.partition")
                .cloned()
                .unwrap_or_default(),
            m.attributes
                .get("kafka.offset")
                .cloned()
                .unwrap_or_default(),
        );
        seen.insert(key);
        let kafka_ms: Option<i64> = m
            .attributes
            .get("kafka.timestamp")
            .and_then(|t| t.parse().ok());
        if let (Some(k), Some(p)) = (kafka_ms, m.publish_time) {
            let published_ms = p.seconds() * 1000 + i64::from(p.nanos()) / 1_000_000;
            latencies.push(published_ms - k);
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        if latencies.is_empty() {
            -1
        } else {
            latencies[((latencies.len() - 1) as f64 * q).round() as usize]
        }
    };
    println!("{received} {} {} {}", seen.len(), pct(0.5), pct(0.99));
}
