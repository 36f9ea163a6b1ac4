//! The delivery edges of the consumer loop, each against real services
//! (tansu, Google's Pub/Sub emulator, librdkafka's mock cluster): a
//! rebalance while paused, consumer errors, messages Pub/Sub refuses,
//! tombstones, ordering keys, dry runs, rewinds, stalls, failed commits, the
//! shutdown deadline and the duplicate bound after a crash. Each prints its
//! tally (produced, published, lost, duplicated).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const PULL: Duration = Duration::from_secs(120);

fn payloads(n: usize) -> Vec<Vec<u8>> {
    let alerts = all_sample_alerts();
    (0..n).map(|i| alerts[i % alerts.len()].clone()).collect()
}

fn expected(partitions: i32, per_partition: i64) -> BTreeSet<(i32, i64)> {
    (0..partitions)
        .flat_map(|p| (0..per_partition).map(move |o| (p, o)))
        .collect()
}

/// Pulls until every coordinate in `want` arrived (or PULL passes), then
/// `linger` more; returns everything, in arrival order.
async fn pull_all(
    inbox: &mut Inbox,
    want: &BTreeSet<(i32, i64)>,
    linger: Duration,
) -> Vec<Received> {
    let mut got: Vec<Received> = Vec::new();
    let deadline = Instant::now() + PULL;
    while Instant::now() < deadline {
        let have: BTreeSet<(i32, i64)> = got.iter().map(Received::coordinates).collect();
        if want.is_subset(&have) {
            break;
        }
        got.extend(inbox.pull(1, Duration::from_secs(5)).await);
    }
    got.extend(inbox.pull(10_000, linger).await);
    got
}

/// Prints and returns (lost, duplicated).
fn report(name: &str, want: &BTreeSet<(i32, i64)>, got: &[Received]) -> (usize, usize) {
    let unique: BTreeSet<(i32, i64)> = got.iter().map(Received::coordinates).collect();
    let lost = want.difference(&unique).count();
    let duplicated = got.len() - unique.len();
    println!(
        "{name}: produced {}, published {}, lost {lost}, duplicated {duplicated}",
        want.len(),
        got.len()
    );
    (lost, duplicated)
}

/// Group settings that let partitions move in seconds.
fn quick_group(config: &mut BridgeConfig) {
    for (k, v) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "1000"),
    ] {
        config.kafka_extra.push((k.into(), v.into()));
    }
}

fn pipeline(config: &mut BridgeConfig, settings: &[(&str, &str)]) {
    for (k, v) in settings {
        config.pipeline_extra.push((k.to_string(), v.to_string()));
    }
}

fn script(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    format!("{:?}", path.to_str().unwrap())
}

fn with_metrics(config: &BridgeConfig) -> (String, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let text = format!("{}\n[metrics]\nlisten = \"{address}\"\n", config.render());
    (text, address)
}

fn metric(address: &str, name: &str) -> f64 {
    let (_, body) = http_get(address, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

// ---- 1. a rebalance while paused ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_joins_and_leaves_during_an_outage_leaves_no_partition_paused() {
    let s = services();
    let em = PrivateEmulator::start();
    let (topic, group, ps) = (unique("pausedrb"), unique("group"), unique("pausedrb"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 6).await;
    let mut inbox = Inbox::open(&em.host, &create_pubsub_topic(&em.host, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    quick_group(&mut config);
    pipeline(
        &mut config,
        &[
            ("max_in_flight_messages", "2"),
            ("shutdown_timeout_ms", "3000"),
        ],
    );
    config
        .env
        .push(("PUBSUB_EMULATOR_HOST".into(), em.host.clone()));
    let mut a = Bridge::start(&config);
    a.wait_for_log("kafka: assigned", Duration::from_secs(60));
    em.pause();
    produce(&cc, &topic, &records(&payloads(72), 6)).await;
    // A fills its bound and pauses (after a second at the bound).
    std::thread::sleep(Duration::from_secs(5));
    // B starts during the outage (it cannot verify its topics, warns and
    // goes on), joins, takes partitions, and leaves.
    let mut b = Bridge::start(&config);
    b.wait_for_log("starting anyway", Duration::from_secs(60));
    b.wait_for_log("consuming [", Duration::from_secs(60));
    let joined = Instant::now();
    b.wait_for_log("kafka: assigned", Duration::from_secs(60));
    let b_waited = joined.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    b.stop();
    std::thread::sleep(Duration::from_secs(3));
    em.resume();
    let want = expected(6, 12);
    let got = pull_all(&mut inbox, &want, Duration::from_secs(2)).await;
    let (lost, _) = report("rebalance while paused", &want, &got);
    println!("B had its partitions {b_waited:?} after joining");
    assert_eq!(
        lost,
        0,
        "A's log:\n{}\nB's log:\n{}",
        a.log_text(),
        b.log_text()
    );
    assert!(
        b_waited < Duration::from_secs(30),
        "a revoke during an outage held the group for {b_waited:?}"
    );
    assert_eq!(a.stop().code(), Some(0));
}

// ---- 2. consumer errors -----------------------------------------------------

/// A topic on librdkafka's mock cluster whose fetches fail with a
/// partition-level error, `n` times.
async fn mock_with_fetch_errors(
    n: usize,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
) {
    let mock = MockCluster::new(1).expect("mock cluster");
    let topic = unique("fetcherr");
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let cc = kafka_config(&mock.bootstrap_servers(), &[]);
    produce(&cc, &topic, &records(&payloads(4), 1)).await;
    let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; n];
    mock.request_errors(RDKafkaApiKey::Fetch, &errors);
    (mock, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_error_stops_the_bridge_by_default_naming_it_and_committing_nothing_past_it() {
    let s = services();
    let (mock, topic) = mock_with_fetch_errors(1).await;
    let (group, ps) = (unique("group"), unique("fetcherr"));
    create_pubsub_topic(&s.emulator, &ps).await;
    let config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    let mut bridge = Bridge::start(&config);
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("Broker: Topic authorization failed"), "{log}");
    assert!(log.contains("kafka_errors"), "{log}");
    let cc = kafka_config(&mock.bootstrap_servers(), &[]);
    let committed = committed_offsets(&cc, &group, &topic, 1);
    assert!(committed[0] <= 0, "committed {committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_consumer_error_is_counted_and_dead_lettered_and_the_stream_goes_on() {
    let s = services();
    let (mock, topic) = mock_with_fetch_errors(1).await;
    let (group, ps, dlq) = (unique("group"), unique("fetcherr"), unique("dlq"));
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut dead = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &dlq).await).await;
    let mut config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    config.dead_letter_topic = Some(dlq);
    pipeline(&mut config, &[("kafka_errors", "\"skip\"")]);
    let (text, address) = with_metrics(&config);
    let mut bridge = Bridge::start_text(&text, &[]);
    let want = expected(1, 4);
    let got = pull_all(&mut inbox, &want, Duration::from_millis(500)).await;
    let (lost, _) = report("skipped consumer error", &want, &got);
    assert_eq!(lost, 0, "{}", bridge.log_text());
    let letters = dead.pull(1, Duration::from_secs(30)).await;
    assert_eq!(letters.len(), 1, "{}", bridge.log_text());
    let why = &letters[0].attributes["ztfhook.error"];
    assert!(why.contains("Topic authorization failed"), "{why}");
    assert_eq!(metric(&address, "ztfhook_kafka_errors_skipped_total"), 1.0);
    assert_eq!(bridge.stop().code(), Some(0));
}

// ---- 3 and 4. messages Pub/Sub refuses; tombstones -------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_without_attributes_is_dead_lettered_alone_and_the_stream_goes_on() {
    let s = services();
    let (topic, group, ps, dlq) = (
        unique("empty"),
        unique("group"),
        unique("empty"),
        unique("dlq"),
    );
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let alert = payloads(1).remove(0);
    let mut recs = records(
        &[alert.clone(), Vec::new(), alert.clone(), alert.clone()],
        1,
    );
    recs.push(Record {
        null: true,
        ..Record::default()
    });
    produce(&cc, &topic, &recs).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut dead = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &dlq).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.kafka_metadata = false;
    config.dead_letter_topic = Some(dlq);
    let (text, address) = with_metrics(&config);
    let mut bridge = Bridge::start_text(&text, &[]);
    let got = inbox.pull(3, PULL).await;
    assert_eq!(got.len(), 3, "the three alerts: {}", bridge.log_text());
    assert!(got.iter().all(|m| m.len == alert.len()));
    let letters = dead.pull(1, PULL).await;
    assert_eq!(letters.len(), 1);
    let d = &letters[0].attributes;
    assert_eq!(d["kafka.offset"], "1", "{d:?}");
    assert!(
        d["ztfhook.error"].contains("neither data nor attributes"),
        "{d:?}"
    );
    // The tombstone at offset 4 is skipped (the default) and counted.
    wait_for_commits(&cc, &group, &topic, &[5]);
    assert_eq!(metric(&address, "ztfhook_tombstones_total"), 1.0);
    assert_eq!(metric(&address, "ztfhook_refused_messages_total"), 1.0);
    assert!(inbox.pull(1, Duration::from_secs(2)).await.is_empty());
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_tombstone_is_marked_as_one_and_the_hook_sees_it() {
    let s = services();
    let (topic, group, ps) = (unique("tomb"), unique("group"), unique("tomb"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let recs = vec![
        Record {
            payload: Vec::new(),
            ..Record::default()
        },
        Record {
            null: true,
            key: Some(b"ZTF21abc".to_vec()),
            ..Record::default()
        },
    ];
    produce(&cc, &topic, &recs).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let dir = tempfile::tempdir().unwrap();
    let hook = script(
        &dir,
        "tomb.rhai",
        "fn route(msg) { #{ attributes: #{ seen_tombstone: `${msg.tombstone}` } } }\n",
    );
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.hook.push(("script".into(), hook));
    pipeline(&mut config, &[("tombstones", "\"publish\"")]);
    let mut bridge = Bridge::start(&config);
    let mut got = inbox.pull(2, PULL).await;
    assert_eq!(got.len(), 2, "{}", bridge.log_text());
    got.sort_by_key(|m| m.coordinates());
    assert_eq!(got[0].attributes["seen_tombstone"], "false");
    assert!(!got[0].attributes.contains_key("ztfhook.tombstone"));
    assert_eq!(got[1].attributes["seen_tombstone"], "true");
    assert_eq!(got[1].attributes["ztfhook.tombstone"], "true");
    assert_eq!(got[1].attributes["key"], "ZTF21abc");
    assert_eq!((got[0].len, got[1].len), (0, 0));
    assert_eq!(bridge.stop().code(), Some(0));
}

// ---- 5. ordering keys -------------------------------------------------------

const KEY_BY_PARTITION: &str = "fn route(msg) { #{ ordering_key: `p${msg.partition}` } }\n";

/// Per partition, the offsets in the order they first arrived.
fn first_arrivals(got: &[Received]) -> BTreeMap<i32, Vec<i64>> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for m in got {
        let (p, o) = m.coordinates();
        if seen.insert((p, o)) {
            out.entry(p).or_default().push(o);
        }
    }
    out
}

async fn ordered_run(outage: Option<Duration>) {
    let s = services();
    let em = PrivateEmulator::start();
    let (topic, group, ps) = (unique("ordered"), unique("group"), unique("ordered"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    let mut inbox = Inbox::open(&em.host, &create_pubsub_topic_ordered(&em.host, &ps).await).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config
        .hook
        .push(("script".into(), script(&dir, "key.rhai", KEY_BY_PARTITION)));
    config
        .env
        .push(("PUBSUB_EMULATOR_HOST".into(), em.host.clone()));
    pipeline(&mut config, &[("workers", "2")]);
    let mut bridge = Bridge::start(&config);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));
    produce(&cc, &topic, &records(&payloads(20), 2)).await;
    if let Some(outage) = outage {
        std::thread::sleep(Duration::from_millis(300));
        em.pause();
        produce(&cc, &topic, &records(&payloads(20), 2)).await;
        std::thread::sleep(outage);
        em.resume();
    }
    let per = if outage.is_some() { 20 } else { 10 };
    let want = expected(2, per);
    let got = pull_all(&mut inbox, &want, Duration::from_secs(2)).await;
    let name = if outage.is_some() {
        "ordered, across an outage"
    } else {
        "ordered"
    };
    let (lost, _) = report(name, &want, &got);
    assert_eq!(lost, 0, "{}", bridge.log_text());
    for (p, offsets) in first_arrivals(&got) {
        let mut sorted = offsets.clone();
        sorted.sort();
        assert_eq!(
            offsets, sorted,
            "partition {p} reached Pub/Sub out of order"
        );
    }
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_with_an_ordering_key_reach_pubsub_in_partition_order() {
    ordered_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_partitions_drain_in_order_after_pubsub_was_unreachable() {
    ordered_run(Some(Duration::from_secs(25))).await;
}

// ---- 6. dry runs --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_with_the_production_config_leaves_the_real_group_untouched() {
    let s = services();
    let (topic, group, ps) = (unique("dry"), unique("group"), unique("dry"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    produce(&cc, &topic, &records(&payloads(10), 1)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    pipeline(&mut config, &[("sink", "\"discard\"")]);
    let (text, address) = with_metrics(&config);
    let mut dry = Bridge::start_text(&text, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&address, "ztfhook_consumed_messages_total") < 10.0 {
        assert!(Instant::now() < deadline, "{}", dry.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dry.stop().code(), Some(0));
    assert_eq!(committed_offsets(&cc, &group, &topic, 1), vec![-1]);
    std::thread::sleep(Duration::from_secs(3));
    let mut real = Bridge::start(&BridgeConfig::new(&s.bootstrap, &group, &topic, &ps));
    let got = inbox.pull(10, PULL).await;
    report("dry run, then the real run", &expected(1, 10), &got);
    assert_eq!(got.len(), 10, "{}", real.log_text());
    assert_eq!(real.stop().code(), Some(0));
}

// ---- 7. rewinds ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_reset_mid_stream_starts_a_new_epoch_and_commits_only_the_new_logs_offsets() {
    let s = services();
    let mock = MockCluster::new(1).expect("mock cluster");
    let (topic, group, ps) = (unique("rewind"), unique("group"), unique("rewind"));
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let cc = kafka_config(&mock.bootstrap_servers(), &[]);
    produce(&cc, &topic, &records(&payloads(6), 1)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    let mut bridge = Bridge::start(&config);
    let first = inbox.pull(6, PULL).await;
    assert_eq!(first.len(), 6);
    wait_for_commits(&cc, &group, &topic, &[6]);
    // The broker says the fetch position is out of range: librdkafka resets
    // to the earliest offset and delivers 0.. again.
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE],
    );
    produce(&cc, &topic, &records(&payloads(2), 1)).await;
    let want = expected(1, 8);
    let mut got = first;
    got.extend(pull_all(&mut inbox, &want, Duration::from_secs(2)).await);
    let (lost, _) = report("offset reset", &want, &got);
    assert_eq!(lost, 0, "{}", bridge.log_text());
    wait_for_commits(&cc, &group, &topic, &[8]);
    assert_eq!(bridge.stop().code(), Some(0));
    assert_eq!(committed_offsets(&cc, &group, &topic, 1), vec![8]);
}

// ---- 8. a stall is seen ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_stalled_while_a_message_waits_longer_than_stall_after() {
    let s = services();
    let em = PrivateEmulator::start();
    let (topic, group, ps) = (unique("stall"), unique("group"), unique("stall"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut inbox = Inbox::open(&em.host, &create_pubsub_topic(&em.host, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config
        .env
        .push(("PUBSUB_EMULATOR_HOST".into(), em.host.clone()));
    pipeline(&mut config, &[("stall_after_ms", "3000")]);
    let (text, address) = with_metrics(&config);
    let mut bridge = Bridge::start_text_env(&text, &config.env);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));
    em.pause();
    produce(&cc, &topic, &records(&payloads(3), 1)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = http_get(&address, "/healthz");
        if status == 503 && body.contains("stalled") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "{status} {body}\n{}",
            bridge.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains(&format!("{topic}[0]@0")), "{body}");
    assert!(metric(&address, "ztfhook_oldest_unacknowledged_seconds") >= 3.0);
    em.resume();
    let got = pull_all(&mut inbox, &expected(1, 3), Duration::ZERO).await;
    assert_eq!(got.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(&address, "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "{}", bridge.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(bridge.stop().code(), Some(0));
}

// ---- 9. failed commits ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_is_counted_and_retried_until_it_lands() {
    let s = services();
    let mock = MockCluster::new(1).expect("mock cluster");
    let (topic, group, ps) = (unique("commitfail"), unique("group"), unique("commitfail"));
    mock.create_topic(&topic, 1, 1).expect("mock topic");
    let cc = kafka_config(&mock.bootstrap_servers(), &[]);
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let config = BridgeConfig::new(&mock.bootstrap_servers(), &group, &topic, &ps);
    let (text, address) = with_metrics(&config);
    let mut bridge = Bridge::start_text(&text, &[]);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 3],
    );
    produce(&cc, &topic, &records(&payloads(5), 1)).await;
    assert_eq!(inbox.pull(5, PULL).await.len(), 5);
    wait_for_commits(&cc, &group, &topic, &[5]);
    assert!(
        metric(&address, "ztfhook_commit_failures_total") >= 1.0,
        "{}",
        bridge.log_text()
    );
    assert_eq!(bridge.stop().code(), Some(0));
}

// ---- 10. the shutdown deadline -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_an_outage_keeps_within_the_shutdown_timeout_and_commits_only_what_pubsub_took(
) {
    let s = services();
    let em = PrivateEmulator::start();
    let (topic, group, ps) = (unique("deadline"), unique("group"), unique("deadline"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    let mut inbox = Inbox::open(&em.host, &create_pubsub_topic(&em.host, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config
        .env
        .push(("PUBSUB_EMULATOR_HOST".into(), em.host.clone()));
    pipeline(&mut config, &[("shutdown_timeout_ms", "4000")]);
    let mut bridge = Bridge::start(&config);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));
    produce(&cc, &topic, &records(&payloads(4), 2)).await;
    assert_eq!(inbox.pull(4, PULL).await.len(), 4);
    wait_for_commits(&cc, &group, &topic, &[2, 2]);
    em.pause();
    produce(&cc, &topic, &records(&payloads(4), 2)).await;
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    bridge.signal("TERM");
    let status = bridge.wait(Duration::from_secs(30));
    let took = asked.elapsed();
    println!("stop during an outage: exited after {took:?} (shutdown_timeout_ms = 4000)");
    assert!(
        took < Duration::from_millis(4000 + 1500),
        "took {took:?}\n{}",
        bridge.log_text()
    );
    assert_eq!(status.code(), Some(0), "{}", bridge.log_text());
    em.resume();
    assert_eq!(committed_offsets(&cc, &group, &topic, 2), vec![2, 2]);
}

// ---- 11. duplicates after a crash --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_follows_pubsubs_acks_and_a_sigkill_republishes_only_what_came_after_it() {
    let s = services();
    let (topic, group, ps) = (unique("dupes"), unique("group"), unique("dupes"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    quick_group(&mut config);
    // The shipped commit interval (100 ms); a small in-flight bound.
    pipeline(
        &mut config,
        &[("commit_interval_ms", ""), ("max_in_flight_messages", "3")],
    );
    produce(&cc, &topic, &records(&payloads(30), 1)).await;
    let mut bridge = Bridge::start(&config);
    let mut got = inbox.pull(30, PULL).await;
    assert_eq!(got.len(), 30, "{}", bridge.log_text());
    // The commit follows the acknowledgements, not a slow timer: a second
    // later (ten commit intervals) everything Pub/Sub took is committed.
    std::thread::sleep(Duration::from_secs(1));
    let idle = committed_offsets(&cc, &group, &topic, 1)[0];
    // Then a kill mid-stream.
    produce(&cc, &topic, &records(&payloads(30), 1)).await;
    got.extend(inbox.pull(10, PULL).await);
    bridge.child.kill().unwrap();
    bridge.child.wait().unwrap();
    let at_kill = committed_offsets(&cc, &group, &topic, 1)[0];
    let first: BTreeSet<i64> = got.iter().map(|r| r.coordinates().1).collect();
    // Past the session timeout (6 s), so that the broker has forgotten the
    // killed member before the new one joins: tansu, unlike Kafka, does not
    // rebalance again when a dead member expires during a join.
    std::thread::sleep(Duration::from_secs(8));
    // What the killed process published but had not committed (its last
    // publishes may still be on their way to the subscription).
    got.extend(inbox.pull(100, Duration::from_secs(2)).await);
    let first_run: BTreeSet<i64> = got.iter().map(|r| r.coordinates().1).collect();
    let uncommitted = first_run.iter().filter(|&&o| o >= at_kill).count();
    let mut again = Bridge::start(&config);
    let want = expected(1, 60);
    let have: BTreeSet<(i32, i64)> = got.iter().map(Received::coordinates).collect();
    let rest = want.difference(&have).copied().collect();
    got.extend(pull_all(&mut inbox, &rest, Duration::from_secs(3)).await);
    let (lost, duplicated) = report(
        "SIGKILL mid-stream, max_in_flight_messages = 3",
        &want,
        &got,
    );
    println!(
        "committed 1 s after 30 acks: {idle}; at the kill: {at_kill}, with {} published by then \
         ({} seen before the kill), {uncommitted} of them at or past the commit",
        first_run.len(),
        first.len()
    );
    assert_eq!(lost, 0, "{}\n---\n{}", bridge.log_text(), again.log_text());
    assert_eq!(idle, 30, "{}", bridge.log_text());
    assert!(at_kill >= 30, "the commit went back: {at_kill}");
    // The restart resumes at the commit: what is published twice is what
    // the killed process had published past its last commit, nothing more.
    assert_eq!(
        duplicated, uncommitted,
        "duplicates beyond what the killed process published past its commit"
    );
    assert_eq!(again.stop().code(), Some(0));
}

// ---- the bound on fanned-out copies ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_keeps_its_copies_within_the_bound_while_pubsub_hangs_then_delivers_everything() {
    let s = services();
    let em = PrivateEmulator::start();
    let (topic, group) = (unique("fanout"), unique("group"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    let names: Vec<String> = (0..4).map(|i| unique(&format!("fan{i}"))).collect();
    let mut inboxes = Vec::new();
    for name in &names {
        inboxes.push(Inbox::open(&em.host, &create_pubsub_topic(&em.host, name).await).await);
    }
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &names[0]);
    config.env = vec![("PUBSUB_EMULATOR_HOST".into(), em.host.clone())];
    // A ZTF sample is 60-75 KB: the payload bound (1 MB, the least allowed)
    // lets about 15 through, whose three extra copies each would hold about
    // 3 MB; the copies' own bound keeps them to 1 MB.
    const BOUND: f64 = 1_000_000.0;
    pipeline(&mut config, &[("max_in_flight_bytes", "1000000")]);
    let (mut text, address) = with_metrics(&config);
    text.push_str(&format!(
        "\n[destinations]\ndefault = [\"@default\", \"{}\", \"{}\", \"{}\"]\n",
        names[1], names[2], names[3]
    ));
    let mut bridge = Bridge::start_text_env(&text, &config.env);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));

    em.pause();
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts, 2)).await;
    let mut peak: f64 = -1.0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        peak = peak.max(metric(&address, "ztfhook_in_flight_copy_bytes"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak > 0.0,
        "no copies counted while Pub/Sub hung (peak {peak}): {}",
        bridge.log_text()
    );
    assert!(
        peak <= BOUND,
        "copies in flight {peak} over the bound {BOUND}"
    );

    em.resume();
    for (name, inbox) in names.iter().zip(inboxes.iter_mut()) {
        let got = inbox.pull(alerts.len(), PULL).await;
        let digests = digest_counts(got.iter().map(|m| m.data.as_ref()));
        assert_eq!(
            digests,
            digest_counts(alerts.iter().map(Vec::as_slice)),
            "topic {name}: {}",
            bridge.log_text()
        );
    }
    let ends = high_watermarks(&cc, &topic, 2);
    wait_for_commits(&cc, &group, &topic, &ends);
    assert_eq!(metric(&address, "ztfhook_in_flight_copy_bytes"), 0.0);
    assert_eq!(bridge.stop().code(), Some(0), "{}", bridge.log_text());
}
