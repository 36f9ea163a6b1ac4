//! The publish baseline: Google's publisher alone, publishing N messages
//! (the alert files, cycled) with ztfhook's default batching, and waiting
//! for every acknowledgement. At most 48 MB of payload is outstanding, as
//! ztfhook's default `max_in_flight_bytes`. Uses PUBSUB_EMULATOR_HOST.
//! Prints `messages bytes seconds`.
//!
//! ```text
//! raw_publish PROJECT TOPIC N FILE_OR_DIR...
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::model::Message;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: raw_publish PROJECT TOPIC N FILE_OR_DIR...");
        std::process::exit(2)
    }
    let n: usize = args[2].parse().expect("N");
    let paths: Vec<std::path::PathBuf> = args[3..].iter().map(Into::into).collect();
    let payloads: Vec<Bytes> = ztfhook::archive::alert_files(&paths)
        .expect("alert files")
        .iter()
        .map(|f| Bytes::from(std::fs::read(f).expect("read")))
        .collect();
    let host = std::env::var("PUBSUB_EMULATOR_HOST").expect("PUBSUB_EMULATOR_HOST");
    let base = BasePublisher::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .expect("publisher");
    let publisher = base
        .publisher(format!("projects/{}/topics/{}", args[0], args[1]))
        .set_message_count_threshold(1000u32)
        .set_byte_threshold(4_000_000u32)
        .set_delay_threshold(Duration::from_millis(10))
        .build();
    let max_in_flight_bytes = 48_000_000usize;
    let mut in_flight_bytes = 0usize;
    let mut pending = VecDeque::new();
    let start = Instant::now();
    let mut bytes = 0u64;
    for i in 0..n {
        let data = payloads[i % payloads.len()].clone();
        bytes += data.len() as u64;
        in_flight_bytes += data.len();
        let m = Message::new().set_data(data).set_attributes([
            ("kafka.partition", "0".to_string()),
            ("kafka.offset", i.to_string()),
        ]);
        pending.push_back((len_of(&payloads, i), publisher.publish(m)));
        while in_flight_bytes >= max_in_flight_bytes {
            let (len, p) = pending.pop_front().unwrap();
            p.await.expect("publish");
            in_flight_bytes -= len;
        }
    }
    for (_, p) in pending {
        p.await.expect("publish");
    }
    println!("{n} {bytes} {:.3}", start.elapsed().as_secs_f64());
}

fn len_of(payloads: &[Bytes], i: usize) -> usize {
    payloads[i % payloads.len()].len()
}
