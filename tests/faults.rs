//! Faults survived with nothing lost, against the real broker and emulator:
//! ztfhook killed (SIGKILL) three times mid-stream; Pub/Sub gone for 30 s and
//! back empty; the broker restarted; two instances in one group, one killed.
//! Each test checks that every produced message was published at least once
//! and prints how many were published twice.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

const PULL: Duration = Duration::from_secs(120);

/// The Kafka coordinates of what arrived, and how many arrived twice.
fn tally(got: &[Received]) -> (BTreeSet<(i32, i64)>, usize) {
    let unique: BTreeSet<(i32, i64)> = got.iter().map(Received::coordinates).collect();
    let duplicates = got.len() - unique.len();
    (unique, duplicates)
}

fn expected(partitions: i32, per_partition: i64, from: i64) -> BTreeSet<(i32, i64)> {
    (0..partitions)
        .flat_map(|p| (from..from + per_partition).map(move |o| (p, o)))
        .collect()
}

fn payloads(n: usize) -> Vec<Vec<u8>> {
    let alerts = all_sample_alerts();
    (0..n).map(|i| alerts[i % alerts.len()].clone()).collect()
}

/// Group settings that let a killed member's partitions move in seconds.
fn quick_group(config: &mut BridgeConfig) {
    config
        .kafka_extra
        .push(("session.timeout.ms".into(), "6000".into()));
    config
        .kafka_extra
        .push(("heartbeat.interval.ms".into(), "1000".into()));
}

fn kill(bridge: &mut Bridge) {
    bridge.child.kill().unwrap();
    bridge.child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigkills_mid_stream_lose_nothing_and_duplicate_within_the_bound() {
    let s = services();
    let (topic, group, ps) = (unique("kill"), unique("group"), unique("kill"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 4).await;
    produce(&cc, &topic, &records(&payloads(160), 4)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    quick_group(&mut config);
    let bound = 20;
    config
        .pipeline_extra
        .push(("max_in_flight_messages".into(), bound.to_string()));
    config
        .pipeline_extra
        .push(("commit_interval_ms".into(), "50".into()));

    let mut got = Vec::new();
    for round in 1..=3 {
        let mut bridge = Bridge::start(&config);
        let more = inbox.pull(20, PULL).await;
        assert_eq!(more.len(), 20, "round {round}: log:\n{}", bridge.log_text());
        got.extend(more);
        kill(&mut bridge);
    }
    let mut bridge = Bridge::start(&config);
    let want = expected(4, 40, 0);
    let deadline = Instant::now() + PULL;
    while !want.is_subset(&tally(&got).0) && Instant::now() < deadline {
        got.extend(inbox.pull(1, Duration::from_secs(5)).await);
    }
    got.extend(inbox.pull(1000, Duration::from_secs(3)).await);
    let (unique, duplicates) = tally(&got);
    let lost: Vec<_> = want.difference(&unique).collect();
    println!(
        "sigkill x3: produced 160, published {} ({} unique), duplicates {duplicates}, lost {}",
        got.len(),
        unique.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "lost {lost:?}\nlog:\n{}",
        bridge.log_text()
    );
    // Each kill may re-deliver what was in flight plus what was acknowledged
    // since the last commit (50 ms).
    assert!(duplicates <= 3 * 2 * bound, "{duplicates} duplicates");
    wait_for_commits(&cc, &group, &topic, &[40, 40, 40, 40]);
    assert_eq!(bridge.stop().code(), Some(0), "log:\n{}", bridge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_gone_for_30_seconds_and_back_empty_loses_nothing_and_memory_stays_bounded() {
    let s = services();
    let mut emulator = PrivateEmulator::start();
    let (topic, group, ps) = (unique("outage"), unique("group"), unique("outage"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    produce(&cc, &topic, &records(&payloads(20), 2)).await;
    let subscription = create_pubsub_topic(&emulator.host, &ps).await;
    let mut inbox = Inbox::open(&emulator.host, &subscription).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config
        .env
        .push(("PUBSUB_EMULATOR_HOST".into(), emulator.host.clone()));
    let bound = 10;
    config
        .pipeline_extra
        .push(("max_in_flight_messages".into(), bound.to_string()));
    let mut bridge = Bridge::start(&config);
    let first = inbox.pull(20, PULL).await;
    assert_eq!(
        tally(&first).0,
        expected(2, 10, 0),
        "log:\n{}",
        bridge.log_text()
    );
    drop(inbox);

    // Pub/Sub goes away; alerts keep coming.
    emulator.kill();
    produce(&cc, &topic, &records(&payloads(40), 2)).await;
    let mut peak_rss: f64 = 0.0;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        peak_rss = peak_rss.max(rss_mb(bridge.child.id()));
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = bridge.log_text();
    assert!(log.contains("retrying"), "no retries logged:\n{log}");
    for line in log.lines().filter(|l| l.contains("in flight")) {
        let n: usize = line
            .split("in flight ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(n <= bound, "{n} in flight over the bound: {line}");
    }
    assert!(
        bridge.child.try_wait().unwrap().is_none(),
        "it exited:\n{log}"
    );

    // Back, empty: the topic is recreated (ztfhook retries a missing topic
    // for a while before it gives up).
    emulator.restart();
    let subscription = create_pubsub_topic(&emulator.host, &ps).await;
    let mut inbox = Inbox::open(&emulator.host, &subscription).await;
    let want = expected(2, 20, 10);
    let mut got = Vec::new();
    let deadline = Instant::now() + PULL;
    while !want.is_subset(&tally(&got).0) && Instant::now() < deadline {
        got.extend(inbox.pull(1, Duration::from_secs(5)).await);
    }
    let (unique, duplicates) = tally(&got);
    let lost: Vec<_> = want.difference(&unique).collect();
    println!(
        "pubsub outage 30 s: produced 40 during it, published {} ({} unique), duplicates {duplicates}, lost {}, peak RSS {peak_rss:.0} MB",
        got.len(),
        unique.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "lost {lost:?}\nlog:\n{}",
        bridge.log_text()
    );
    assert!(peak_rss < 400.0, "RSS {peak_rss} MB while Pub/Sub was down");
    wait_for_commits(&cc, &group, &topic, &[30, 30]);
    assert_eq!(bridge.stop().code(), Some(0), "log:\n{}", bridge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_is_survived_without_a_restart_of_ztfhook() {
    let s = services();
    let mut broker = PrivateTansu::start();
    let (topic, group, ps) = (unique("restart"), unique("group"), unique("restart"));
    let cc = kafka_config(&broker.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    produce(&cc, &topic, &records(&payloads(20), 2)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut config = BridgeConfig::new(&broker.bootstrap, &group, &topic, &ps);
    quick_group(&mut config);
    let mut bridge = Bridge::start(&config);
    let mut got = inbox.pull(20, PULL).await;
    assert_eq!(
        tally(&got).0,
        expected(2, 10, 0),
        "log:\n{}",
        bridge.log_text()
    );

    broker.kill();
    std::thread::sleep(Duration::from_secs(3));
    broker.start_again();
    produce(&cc, &topic, &records(&payloads(20), 2)).await;
    let want = expected(2, 20, 0);
    let deadline = Instant::now() + PULL;
    while !want.is_subset(&tally(&got).0) && Instant::now() < deadline {
        got.extend(inbox.pull(1, Duration::from_secs(5)).await);
    }
    got.extend(inbox.pull(100, Duration::from_secs(2)).await);
    let (unique, duplicates) = tally(&got);
    let lost: Vec<_> = want.difference(&unique).collect();
    println!(
        "broker restart: produced 40, published {} ({} unique), duplicates {duplicates}, lost {}",
        got.len(),
        unique.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "lost {lost:?}\nlog:\n{}",
        bridge.log_text()
    );
    assert!(bridge.child.try_wait().unwrap().is_none());
    assert_eq!(bridge.stop().code(), Some(0), "log:\n{}", bridge.log_text());
}

/// The `published` total of a bridge's last stats line.
fn published(bridge: &Bridge) -> u64 {
    bridge
        .log_text()
        .lines()
        .rev()
        .find_map(|l| {
            l.split("totals consumed ")
                .nth(1)?
                .split("published ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_partitions_and_one_takes_over_when_the_other_is_killed() {
    let s = services();
    let (topic, group, ps) = (unique("pair"), unique("group"), unique("pair"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 8).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    quick_group(&mut config);
    let mut a = Bridge::start(&config);
    a.wait_for_log("kafka: assigned", Duration::from_secs(60));
    let mut b = Bridge::start(&config);
    b.wait_for_log("kafka: assigned", Duration::from_secs(60));
    a.wait_for_log("kafka: revoked", Duration::from_secs(60));

    produce(&cc, &topic, &records(&payloads(80), 8)).await;
    let mut got = inbox.pull(80, PULL).await;
    assert_eq!(tally(&got).0, expected(8, 10, 0));
    std::thread::sleep(Duration::from_millis(1500));
    let (by_a, by_b) = (published(&a), published(&b));
    assert!(
        by_a > 0 && by_b > 0 && by_a + by_b >= 80,
        "a published {by_a}, b {by_b}: the partitions were not split"
    );

    kill(&mut b);
    produce(&cc, &topic, &records(&payloads(80), 8)).await;
    let want = expected(8, 20, 0);
    let deadline = Instant::now() + PULL;
    while !want.is_subset(&tally(&got).0) && Instant::now() < deadline {
        got.extend(inbox.pull(1, Duration::from_secs(5)).await);
    }
    got.extend(inbox.pull(100, Duration::from_secs(2)).await);
    let (unique, duplicates) = tally(&got);
    let lost: Vec<_> = want.difference(&unique).collect();
    println!(
        "two instances, one killed: produced 160, a published {by_a} and b {by_b} of the first 80, total published {} ({} unique), duplicates {duplicates}, lost {}",
        got.len(),
        unique.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}\nlog a:\n{}", a.log_text());
    wait_for_commits(&cc, &group, &topic, &[20; 8]);
    assert_eq!(a.stop().code(), Some(0), "log:\n{}", a.log_text());
}
