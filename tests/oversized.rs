//! Messages Pub/Sub can never take (over its 10 MB request limit): dead-lettered
//! with the reason, or the bridge stops without committing them. Kafka is
//! librdkafka's mock broker here (in this process), because tansu serves at
//! most 5 MiB per fetch; Pub/Sub is the real emulator.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::mocking::MockCluster;

const PULL: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_ten_megabytes_goes_to_the_dead_letter_topic_with_the_reason() {
    let s = services();
    // tansu serves at most 5 MiB per fetch, so a message over Pub/Sub's 10 MB
    // cannot come from it; librdkafka's mock broker serves it.
    let mock = MockCluster::new(1).expect("mock cluster");
    let (topic, group, ps, dlq) = (unique("big"), unique("group"), unique("big"), unique("dlq"));
    // Compressed, the message fits the mock's 5 MB partition log; the consumer
    // inflates it back to its full size.
    let cc = kafka_config(&mock.bootstrap_servers(), &[("compression.type", "zstd")]);
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut dead_inbox =
        Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &dlq).await).await;
    let alert = sample_alerts("ztf").remove(0).1;
    let huge: Vec<u8> = (0..11_000_000u32).map(|i| (i % 251) as u8).collect();
    produce(&cc, &topic, &records(&[alert.clone(), huge, alert], 1)).await;
    let mut config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    config.dead_letter_topic = Some(dlq.clone());
    let mut bridge = Bridge::start(&config);

    let dead = dead_inbox.pull(1, PULL).await;
    assert_eq!(
        dead.len(),
        1,
        "dead-letter messages: {dead:?}\nlog:\n{}",
        bridge.log_text()
    );
    let d = &dead[0];
    assert!(
        d.len < 1_000,
        "the payload cannot fit, so it is not sent ({} bytes)",
        d.len
    );
    assert_eq!(d.attributes["kafka.offset"], "1");
    assert_eq!(d.attributes["kafka.topic"], topic);
    assert!(
        d.attributes["ztfhook.error"].contains("(payload 11000000)"),
        "{:?}",
        d.attributes
    );
    assert!(d.attributes["ztfhook.error"].contains("10000000-byte request limit"));
    assert_eq!(d.attributes["ztfhook.destination"], topic_path(&ps));

    let good = inbox.pull(2, PULL).await;
    let mut offsets: Vec<i64> = good.iter().map(|m| m.coordinates().1).collect();
    offsets.sort();
    assert_eq!(offsets, vec![0, 2]);
    wait_for_commits(&cc, &group, &topic, &[3]);
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_ten_megabytes_without_a_dead_letter_topic_stops_the_bridge_uncommitted() {
    let s = services();
    // tansu serves at most 5 MiB per fetch, so a message over Pub/Sub's 10 MB
    // cannot come from it; librdkafka's mock broker serves it.
    let mock = MockCluster::new(1).expect("mock cluster");
    let (topic, group, ps) = (unique("bigstop"), unique("group"), unique("bigstop"));
    // Compressed, the message fits the mock's 5 MB partition log; the consumer
    // inflates it back to its full size.
    let cc = kafka_config(&mock.bootstrap_servers(), &[("compression.type", "zstd")]);
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    create_pubsub_topic(&s.emulator, &ps).await;
    let alert = sample_alerts("ztf").remove(0).1;
    let huge = vec![7u8; 10_500_000];
    produce(&cc, &topic, &records(&[alert.clone(), huge, alert], 1)).await;
    let config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    let mut bridge = Bridge::start(&config);
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(
        log.contains(&format!("{topic}[0]@1")),
        "the error names the message:\n{log}"
    );
    assert!(
        log.contains("no pubsub.dead_letter_topic is configured"),
        "{log}"
    );
    let committed = committed_offsets(&cc, &group, &topic, 1)[0];
    assert!(
        committed <= 1,
        "committed {committed}: past the message that was not published"
    );
}
