//! The core bridge against the real services: a tansu broker (sqlite storage)
//! and Google's Pub/Sub emulator, both started by `scripts/services.sh`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use common::*;

const PULL: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_arrives_byte_for_byte_with_the_connector_attributes() {
    let s = services();
    let (topic, group, ps) = (unique("alerts"), unique("group"), unique("alerts"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 4).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let payloads = all_sample_alerts();
    let mut recs = records(&payloads, 4);
    for (i, r) in recs.iter_mut().enumerate() {
        if i % 3 == 0 {
            r.key = Some(format!("ZTF-key-{i}").into_bytes());
        }
    }
    let before_ms = chrono_ms() - 1_000;
    produce(&cc, &topic, &recs).await;
    let after_ms = chrono_ms() + 1_000;

    let mut bridge = Bridge::start(&BridgeConfig::new(&s.bootstrap, &group, &topic, &ps));
    let got = inbox.pull(recs.len(), PULL).await;
    // Anything extra (a duplicate) would arrive right behind.
    let extra = inbox.pull(1, Duration::from_secs(2)).await;
    assert!(
        extra.is_empty(),
        "published twice in a clean run: {extra:?}"
    );

    assert_eq!(got.len(), recs.len(), "log:\n{}", bridge.log_text());
    let sent = digest_counts(payloads.iter().map(Vec::as_slice));
    let mut arrived = BTreeMap::new();
    for m in &got {
        *arrived.entry(m.digest.clone()).or_insert(0) += 1;
    }
    assert_eq!(arrived, sent, "payload bytes differ");

    for m in &got {
        let (partition, offset) = m.coordinates();
        let index = (offset * 4 + i64::from(partition)) as usize;
        let record = &recs[index];
        assert_eq!(
            m.digest,
            digest(&record.payload),
            "payload of {partition}@{offset}"
        );
        let mut expected: BTreeSet<&str> = [
            "kafka.topic",
            "kafka.partition",
            "kafka.offset",
            "kafka.timestamp",
        ]
        .into();
        if let Some(key) = &record.key {
            expected.insert("key");
            assert_eq!(m.attributes["key"].as_bytes(), key.as_slice());
        }
        let names: BTreeSet<&str> = m.attributes.keys().map(String::as_str).collect();
        assert_eq!(names, expected);
        assert_eq!(m.attributes["kafka.topic"], topic);
        let ts: i64 = m.attributes["kafka.timestamp"].parse().unwrap();
        assert!(
            (before_ms..=after_ms).contains(&ts),
            "timestamp {ts} not in the produce window"
        );
    }

    let ends = high_watermarks(&cc, &topic, 4);
    assert_eq!(ends.iter().sum::<i64>(), recs.len() as i64);
    wait_for_commits(&cc, &group, &topic, &ends);
    let status = bridge.stop();
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_group_publishes_nothing_already_committed() {
    let s = services();
    let (topic, group, ps) = (unique("restart"), unique("group"), unique("restart"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 2).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts[..12], 2)).await;
    let config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);

    let mut first = Bridge::start(&config);
    let got = inbox.pull(12, PULL).await;
    assert_eq!(got.len(), 12);
    wait_for_commits(&cc, &group, &topic, &[6, 6]);
    assert_eq!(first.stop().code(), Some(0));

    let mut second = Bridge::start(&config);
    second.wait_for_log("kafka: assigned", Duration::from_secs(60));
    let again = inbox.pull(1, Duration::from_secs(5)).await;
    assert!(
        again.is_empty(),
        "already-committed messages were published again: {again:?}"
    );

    // The second instance is live: new messages go through, and only they.
    produce(&cc, &topic, &records(&alerts[12..16], 2)).await;
    let new = inbox.pull(4, PULL).await;
    let mut coords: Vec<_> = new.iter().map(Received::coordinates).collect();
    coords.sort();
    assert_eq!(
        coords,
        vec![(0, 6), (0, 7), (1, 6), (1, 7)],
        "log:\n{}",
        second.log_text()
    );
    assert!(inbox.pull(1, Duration::from_secs(2)).await.is_empty());
    assert_eq!(second.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_commits_only_what_arrived_and_a_restart_delivers_the_rest() {
    let s = services();
    let (topic, group, ps) = (unique("sigterm"), unique("group"), unique("sigterm"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 3).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    let payloads: Vec<Vec<u8>> = alerts.iter().cycle().take(120).cloned().collect();
    produce(&cc, &topic, &records(&payloads, 3)).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    // A small in-flight bound keeps the bridge mid-stream when the signal comes.
    config
        .pipeline_extra
        .push(("max_in_flight_messages".into(), "4".into()));

    let mut first = Bridge::start(&config);
    let mut seen = inbox.pull(20, PULL).await;
    assert!(seen.len() >= 20);
    assert_eq!(first.stop().code(), Some(0), "log:\n{}", first.log_text());
    assert!(
        first.log_text().contains("committed"),
        "{}",
        first.log_text()
    );
    seen.extend(inbox.pull(usize::MAX, Duration::from_secs(3)).await);

    // Every offset below a committed one was published before the commit.
    let committed = committed_offsets(&cc, &group, &topic, 3);
    let published: HashSet<(i32, i64)> = seen.iter().map(Received::coordinates).collect();
    for (p, &c) in committed.iter().enumerate() {
        for o in 0..c.max(0) {
            assert!(
                published.contains(&(p as i32, o)),
                "offset {p}@{o} committed ({committed:?}) but never published"
            );
        }
    }
    assert!(
        committed.iter().sum::<i64>() < 120,
        "the stop came mid-stream"
    );

    let mut second = Bridge::start(&config);
    let rest = inbox
        .pull_until(PULL, |got| {
            let mut all = published.clone();
            all.extend(got.iter().map(Received::coordinates));
            all.len() >= 120
        })
        .await;
    let mut all = published.clone();
    all.extend(rest.iter().map(Received::coordinates));
    assert_eq!(all.len(), 120, "every message arrives at least once");
    let duplicates = seen.len() + rest.len() - 120;
    eprintln!(
        "sigterm test: {} publishes for 120 messages, {duplicates} duplicates",
        seen.len() + rest.len()
    );
    wait_for_commits(&cc, &group, &topic, &[40, 40, 40]);
    assert_eq!(second.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_headers_become_attributes_and_those_over_the_limits_are_listed_as_omitted() {
    let s = services();
    let (topic, group, ps) = (unique("headers"), unique("group"), unique("headers"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let record = Record {
        partition: 0,
        key: Some(vec![b'k'; 1500]),
        headers: vec![
            ("schema".into(), Some(b"3.3".to_vec())),
            ("googtrace".into(), Some(b"1".to_vec())),
            ("big".into(), Some(vec![b'v'; 2000])),
            ("binary".into(), Some(vec![0xff, 0xfe])),
            ("empty".into(), None),
        ],
        payload: sample_alerts("ztf").remove(0).1,
        null: false,
    };
    produce(&cc, &topic, &[record]).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.headers = true;
    let mut bridge = Bridge::start(&config);
    let got = inbox.pull(1, PULL).await;
    assert_eq!(got.len(), 1, "log:\n{}", bridge.log_text());
    let a = &got[0].attributes;
    assert_eq!(a["schema"], "3.3");
    assert_eq!(a["empty"], "");
    assert_eq!(a["ztfhook.omitted"], "key,googtrace,big,binary");
    for absent in ["key", "googtrace", "big", "binary"] {
        assert!(!a.contains_key(absent), "{absent} was sent");
    }
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_topic_that_does_not_exist_is_named_at_start() {
    let s = services();
    let (topic, group) = (unique("nops"), unique("group"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut bridge = Bridge::start(&BridgeConfig::new(
        &s.bootstrap,
        &group,
        &topic,
        "no-such-topic",
    ));
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("pubsub topic `projects/ztfhook-test/topics/no-such-topic` does not exist"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_topic_that_does_not_exist_is_named_at_start() {
    let s = services();
    let ps = unique("nokafka");
    create_pubsub_topic(&s.emulator, &ps).await;
    let missing = unique("missing");
    let mut bridge = Bridge::start(&BridgeConfig::new(
        &s.bootstrap,
        &unique("group"),
        &missing,
        &ps,
    ));
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("kafka topic `{missing}` does not exist")),
        "{log}"
    );
}

#[test]
fn an_unknown_config_key_exits_with_code_2_naming_key_file_and_line() {
    let text = "[kafka]\nbootstrap.servers = \"127.0.0.1:1\"\ngroup.id = \"g\"\nbootstrap.serverz = \"x\"\ntopics = [\"t\"]\n\n[pubsub]\nproject = \"p\"\ntopic = \"alerts\"\n";
    let mut bridge = Bridge::start_text(text, &[]);
    let status = bridge.wait(Duration::from_secs(10));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("ztfhook.toml:4:1: `kafka.bootstrap.serverz`"),
        "{log}"
    );
    assert!(log.contains("No such configuration property"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_512_with_the_right_password_delivers() {
    let s = services();
    let (topic, group, ps) = (unique("scram"), unique("group"), unique("scram"));
    let cc = scram_client(&s);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("rubin").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;
    let mut config = BridgeConfig::new(&s.scram_bootstrap, &group, &topic, &ps);
    config.kafka_extra = scram(&s, &s.scram_password);
    let mut bridge = Bridge::start(&config);
    let got = inbox.pull(alerts.len(), PULL).await;
    assert_eq!(got.len(), alerts.len(), "log:\n{}", bridge.log_text());
    assert!(
        !bridge.log_text().contains(&s.scram_password),
        "the password was logged"
    );
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_scram_password_stops_with_an_authentication_error_that_hides_it() {
    let s = services();
    let (topic, ps) = (unique("scramno"), unique("scramno"));
    create_kafka_topic(&scram_client(&s), &topic, 1).await;
    create_pubsub_topic(&s.emulator, &ps).await;
    let wrong = "not-the-password-4711";
    let mut config = BridgeConfig::new(&s.scram_bootstrap, &unique("group"), &topic, &ps);
    config.kafka_extra = scram(&s, wrong);
    let mut bridge = Bridge::start(&config);
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "kafka: the brokers at `{}` did not answer",
            s.scram_bootstrap
        )),
        "{log}"
    );
    assert!(log.to_lowercase().contains("authentication"), "{log}");
    assert!(
        !log.contains(wrong),
        "the password appears in the output:\n{log}"
    );
}

/// The totals in the last stats line: (consumed, in-flight messages).
fn last_stats(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stats:"))
        .expect("a stats line");
    let number_after = |key: &str| -> u64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (number_after("totals consumed "), number_after("in flight "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumption_pauses_at_the_in_flight_bound_while_pubsub_is_down_and_nothing_is_committed() {
    let s = services();
    let (topic, group, ps) = (unique("down"), unique("group"), unique("down"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut emulator = PrivateEmulator::start();
    create_pubsub_topic(&emulator.host, &ps).await;
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.env = vec![("PUBSUB_EMULATOR_HOST".into(), emulator.host.clone())];
    config.pipeline_extra = vec![
        ("max_in_flight_messages".into(), "5".into()),
        ("shutdown_timeout_ms".into(), "3000".into()),
    ];
    let mut bridge = Bridge::start(&config);
    bridge.wait_for_log("kafka: assigned", Duration::from_secs(60));

    emulator.kill();
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;
    bridge.wait_for_log("publish failed", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(4));
    let (consumed, in_flight) = last_stats(&bridge.log_text());
    assert!(
        consumed <= 5,
        "consumed {consumed} of {} with Pub/Sub down and a bound of 5",
        alerts.len()
    );
    assert!(in_flight <= 5, "in flight {in_flight}");

    // SIGTERM: the drain gives up after its timeout; nothing was published,
    // so nothing is committed and a restart would consume it all again.
    assert_eq!(bridge.stop().code(), Some(0), "{}", bridge.log_text());
    assert!(
        bridge.log_text().contains("still unacknowledged"),
        "{}",
        bridge.log_text()
    );
    assert_eq!(committed_offsets(&cc, &group, &topic, 1), vec![-1]);
}
