//! One Kafka connection, every destination: the raw topic, the BigQuery JSON
//! topic and the Cloud Storage archive, against the real services (tansu,
//! Google's Pub/Sub emulator, fake-gcs-server).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use serde_json::Value as Json;

const PULL: Duration = Duration::from_secs(120);

/// The three destinations of the recipe: raw topic, JSON topic, archive.
fn three_destinations(base: &BridgeConfig, json_topic: &str, bucket: &str) -> String {
    format!(
        "{}\n[storage]\nbucket = \"{bucket}\"\n\n[bigquery]\ntopics = [\"{json_topic}\"]\nkafka_columns = true\n\n[destinations]\ndefault = [\"@default\", \"{json_topic}\", \"@archive\"]\n",
        base.render()
    )
}

fn ztf_samples() -> Vec<(String, Vec<u8>)> {
    sample_alerts("ztf")
}

/// The first `n` ZTF samples' bytes.
fn first_samples(n: usize) -> Vec<Vec<u8>> {
    ztf_samples().into_iter().take(n).map(|(_, b)| b).collect()
}

/// What each test starts from: fresh names, a bucket in the shared Cloud
/// Storage emulator (if `make_bucket`), a Kafka topic of `partitions`
/// holding `payloads` (spread over them in turn), and a subscription to the
/// raw Pub/Sub topic.
struct Stage {
    s: Services,
    gcs: String,
    topic: String,
    group: String,
    raw: String,
    bucket: String,
    cc: rdkafka::ClientConfig,
    inbox: Inbox,
    payloads: Vec<Vec<u8>>,
}

impl Stage {
    async fn new(
        prefix: &str,
        payloads: Vec<Vec<u8>>,
        partitions: i32,
        make_bucket: bool,
    ) -> Stage {
        let s = services();
        let gcs = storage_emulator();
        let (topic, group, raw) = (unique(prefix), unique("group"), unique("raw"));
        let bucket = unique("archive").to_lowercase();
        if make_bucket {
            create_bucket(&gcs, &bucket);
        }
        let cc = kafka_config(&s.bootstrap, &[]);
        create_kafka_topic(&cc, &topic, partitions).await;
        let inbox = subscribe(&s, &raw).await;
        produce(&cc, &topic, &records(&payloads, partitions)).await;
        Stage {
            s,
            gcs,
            topic,
            group,
            raw,
            bucket,
            cc,
            inbox,
            payloads,
        }
    }
}

/// A new Pub/Sub topic, and a subscription to it.
async fn subscribe(s: &Services, id: &str) -> Inbox {
    Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, id).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_feeds_the_raw_topic_the_json_topic_and_the_archive() {
    let samples = ztf_samples();
    let Stage {
        s,
        gcs,
        topic,
        group,
        raw,
        bucket,
        cc,
        inbox: mut raw_inbox,
        payloads,
    } = Stage::new(
        "three",
        samples.iter().map(|(_, b)| b.clone()).collect(),
        2,
        true,
    )
    .await;
    let json = unique("json");
    let mut json_inbox = subscribe(&s, &json).await;
    let n = payloads.len();

    let config = three_destinations(
        &BridgeConfig::new(&s.bootstrap, &group, &topic, &raw),
        &json,
        &bucket,
    ) + "\n[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let mut bridge = Bridge::start_text(&config, &[]);
    let raw_got = raw_inbox.pull(n, PULL).await;
    let json_got = json_inbox.pull(n, PULL).await;
    assert_eq!(raw_got.len(), n, "raw; log:\n{}", bridge.log_text());
    assert_eq!(json_got.len(), n, "json; log:\n{}", bridge.log_text());
    let ends = high_watermarks(&cc, &topic, 2);
    wait_for_commits(&cc, &group, &topic, &ends);

    // The raw topic: the payloads, byte for byte.
    assert_eq!(
        digest_counts(raw_got.iter().map(|m| m.data.as_ref())),
        digest_counts(payloads.iter().map(Vec::as_slice))
    );
    // The JSON topic: one row per alert, cutouts gone, ids exact, the
    // Kafka columns filled in, the attributes as on the raw topic.
    let mut candids = Vec::new();
    for m in &json_got {
        let row: Json = serde_json::from_slice(&m.data).unwrap();
        assert!(row.get("cutoutScience").is_none());
        assert_eq!(row["kafka_topic"], topic.as_str());
        let (partition, offset) = m.coordinates();
        assert_eq!(row["kafka_partition"].as_i64(), Some(i64::from(partition)));
        assert_eq!(row["kafka_offset"].as_i64(), Some(offset));
        let index = (offset * 2 + i64::from(partition)) as usize;
        let candid = row["candid"].as_i64().unwrap();
        assert!(
            samples[index].0.contains(&candid.to_string()),
            "{} is not {candid}",
            samples[index].0
        );
        assert!(
            m.len < payloads[index].len(),
            "the JSON form is smaller than the alert with its cutouts"
        );
        candids.push(candid);
    }
    candids.sort();
    candids.dedup();
    assert_eq!(candids.len(), n);

    // The archive: {topic}/{objectId}/{candid}.avro, the payload untouched,
    // the attributes as metadata.
    let objects = list_objects(&gcs, &bucket);
    assert_eq!(
        objects.len(),
        n,
        "{:?}",
        objects.iter().map(|o| &o.name).collect::<Vec<_>>()
    );
    for o in &objects {
        let parts: Vec<&str> = o.name.split('/').collect();
        assert_eq!(parts.len(), 3, "{}", o.name);
        assert_eq!(parts[0], topic);
        let (partition, offset): (i32, i64) = (
            o.metadata["kafka.partition"].parse().unwrap(),
            o.metadata["kafka.offset"].parse().unwrap(),
        );
        let index = (offset * 2 + i64::from(partition)) as usize;
        assert_eq!(digest(&o.data), digest(&payloads[index]), "{}", o.name);
        assert!(
            samples[index]
                .0
                .contains(parts[2].trim_end_matches(".avro")),
            "{}",
            o.name
        );
        assert!(parts[1].starts_with("ZTF"), "{}", o.name);
        assert_eq!(o.metadata["kafka.topic"], topic);
    }
    let (_, metrics) = http_get_metrics(&mut bridge);
    assert!(
        metrics.contains(&format!("ztfhook_objects_created_total {}", n)),
        "{metrics}"
    );
    bridge.stop();
}

/// The bridge's /metrics (its config serves them on a free port, which
/// the log names).
fn http_get_metrics(bridge: &mut Bridge) -> (u16, String) {
    http_get(&metrics_address(bridge), "/metrics")
}

/// Where the bridge serves /metrics, from its log.
fn metrics_address(bridge: &Bridge) -> String {
    let log = bridge.log_text();
    let address = log
        .lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .map(str::to_string);
    address.unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_there_already_with_the_same_bytes_counts_as_written_and_one_with_other_bytes_is_kept_and_dead_lettered(
) {
    let Stage {
        s,
        gcs,
        topic,
        group,
        raw,
        bucket,
        cc,
        mut inbox,
        payloads,
    } = Stage::new("again", first_samples(4), 1, true).await;
    let dlq = unique("dlq");
    let mut dead = subscribe(&s, &dlq).await;
    // Offset 1 was archived before a crash, uncommitted: a redelivery. The
    // name of offset 2 holds other bytes (a template not unique to one
    // message): they must stay as they are, and the message not count as
    // archived.
    put_object(&gcs, &bucket, &format!("{topic}/1.avro"), &payloads[1]);
    let other = b"another message's bytes".to_vec();
    put_object(&gcs, &bucket, &format!("{topic}/2.avro"), &other);
    let before = list_objects(&gcs, &bucket);

    let mut base = BridgeConfig::new(&s.bootstrap, &group, &topic, &raw);
    base.dead_letter_topic = Some(dlq.clone());
    let config = format!(
        "{}\n[storage]\nbucket = \"{bucket}\"\nobject = \"{{kafka.topic}}/{{kafka.offset}}.avro\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        base.render()
    );
    let mut bridge = Bridge::start_text(&config, &[]);
    let got = inbox.pull(payloads.len(), PULL).await;
    assert_eq!(got.len(), payloads.len(), "log:\n{}", bridge.log_text());
    let dead_got = dead.pull(1, PULL).await;
    assert_eq!(dead_got.len(), 1, "log:\n{}", bridge.log_text());
    assert_eq!(dead_got[0].coordinates().1, 2);
    assert_eq!(
        digest(&dead_got[0].data),
        digest(&payloads[2]),
        "dead-lettered with its payload"
    );
    let error = &dead_got[0].attributes["ztfhook.error"];
    assert!(error.contains("exists with other content"), "{error}");
    wait_for_commits(&cc, &group, &topic, &[payloads.len() as i64]);

    let objects = list_objects(&gcs, &bucket);
    let by_name: BTreeMap<&str, &StoredObject> =
        objects.iter().map(|o| (o.name.as_str(), o)).collect();
    assert_eq!(by_name.len(), payloads.len());
    let first = &before
        .iter()
        .find(|o| o.name.ends_with("/1.avro"))
        .unwrap()
        .generation;
    let redelivered = by_name[format!("{topic}/1.avro").as_str()];
    assert_eq!(
        &redelivered.generation, first,
        "the first copy was not written over"
    );
    assert_eq!(by_name[format!("{topic}/2.avro").as_str()].data, other);
    for offset in [0, 1, 3] {
        let o = by_name[format!("{topic}/{offset}.avro").as_str()];
        assert_eq!(digest(&o.data), digest(&payloads[offset]));
    }
    let (_, metrics) = http_get(&metrics_address(&bridge), "/metrics");
    assert!(
        metrics.contains("ztfhook_objects_existing_total 1"),
        "{metrics}"
    );
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_committed_until_cloud_storage_has_the_object() {
    // The bucket is made only on the test's own Cloud Storage, below.
    let Stage {
        s,
        topic,
        group,
        raw,
        bucket,
        cc,
        mut inbox,
        payloads,
        ..
    } = Stage::new("gated", first_samples(5), 1, false).await;

    // Cloud Storage is down when the bridge starts: Pub/Sub takes every
    // message, and still nothing may be committed.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut base = BridgeConfig::new(&s.bootstrap, &group, &topic, &raw);
    base.env.push(("STORAGE_EMULATOR_HOST".into(), url.clone()));
    let config = format!(
        "{}\n[storage]\nbucket = \"{bucket}\"\nobject = \"{{kafka.topic}}/{{objectId}}/{{candid}}.avro\"\n",
        base.render()
    );
    let mut bridge = Bridge::start_text_env(&config, &base.env);
    let got = inbox.pull(payloads.len(), PULL).await;
    assert_eq!(got.len(), payloads.len(), "log:\n{}", bridge.log_text());
    bridge.wait_for_log("write failed", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let committed = committed_offsets(&cc, &group, &topic, 1);
    assert!(
        committed[0] <= 0,
        "committed {committed:?} before Cloud Storage had anything"
    );

    // It comes back: every object is written, then everything committed.
    let storage = PrivateStorage::start_on(port);
    create_bucket(&storage.url(), &bucket);
    wait_for_commits(&cc, &group, &topic, &[payloads.len() as i64]);
    let objects = list_objects(&storage.url(), &bucket);
    assert_eq!(objects.len(), payloads.len(), "log:\n{}", bridge.log_text());
    let sent: HashMap<String, usize> = payloads.iter().map(|p| (digest(p), 1)).collect();
    let stored: HashMap<String, usize> = objects.iter().map(|o| (digest(&o.data), 1)).collect();
    assert_eq!(sent, stored);
    bridge.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_names_objects_and_a_refused_one_takes_the_error_policy_alone() {
    let Stage {
        s,
        gcs,
        topic,
        group,
        raw,
        bucket,
        cc,
        mut inbox,
        payloads,
    } = Stage::new("hooked", first_samples(6), 1, true).await;
    let dlq = unique("dlq");
    let mut dead = subscribe(&s, &dlq).await;

    // Objects only (no topic) for even offsets, by the hook's own name; the
    // archive and the raw topic for odd ones, except offset 3, whose name
    // breaks Cloud Storage's rules.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("objects.rhai");
    std::fs::write(
        &script,
        format!(
            r#"fn route(msg) {{
    if msg.offset % 2 == 0 {{
        return #{{ objects: ["gs://{bucket}/by-offset/" + msg.offset + ".avro"] }};
    }}
    if msg.offset == 3 {{
        return #{{ topics: ["@default"], objects: ["gs://{bucket}/bad/\nname"] }};
    }}
    #{{ topics: ["@default"], objects: ["@archive"], attributes: #{{ "objectId": msg.alert.objectId }} }}
}}
"#
        ),
    )
    .unwrap();
    let mut base = BridgeConfig::new(&s.bootstrap, &group, &topic, &raw);
    base.dead_letter_topic = Some(dlq.clone());
    base.hook.push((
        "script".into(),
        format!("{:?}", script.display().to_string()),
    ));
    base.hook.push(("on_error".into(), "\"deadletter\"".into()));
    let config = format!("{}\n[storage]\nbucket = \"{bucket}\"\n", base.render());
    let mut bridge = Bridge::start_text(&config, &[]);
    let got = inbox.pull(2, PULL).await;
    let dead_got = dead.pull(1, PULL).await;
    assert_eq!(got.len(), 2, "log:\n{}", bridge.log_text());
    assert_eq!(dead_got.len(), 1, "log:\n{}", bridge.log_text());
    wait_for_commits(&cc, &group, &topic, &[payloads.len() as i64]);
    let extra = inbox.pull(1, Duration::from_secs(2)).await;
    assert!(extra.is_empty(), "{extra:?}");
    let mut offsets: Vec<i64> = got.iter().map(|m| m.coordinates().1).collect();
    offsets.sort();
    assert_eq!(offsets, [1, 5], "log:\n{}", bridge.log_text());
    assert_eq!(dead_got.len(), 1);
    assert_eq!(dead_got[0].coordinates().1, 3);
    let error = &dead_got[0].attributes["ztfhook.error"];
    assert!(error.contains("control character"), "{error}");

    let objects = list_objects(&gcs, &bucket);
    let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("by-offset/")).count(),
        3,
        "{names:?}"
    );
    let archived: Vec<&StoredObject> = objects
        .iter()
        .filter(|o| o.name.starts_with(&topic))
        .collect();
    assert_eq!(archived.len(), 2, "{names:?}");
    for o in archived {
        assert!(
            o.metadata["objectId"].starts_with("ZTF"),
            "{:?}",
            o.metadata
        );
        assert!(o.name.contains(&o.metadata["objectId"]), "{}", o.name);
    }
    bridge.stop();
}

#[test]
fn the_shipped_pipeline_config_names_the_three_destinations() {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ztf-pipeline.toml"),
    )
    .unwrap();
    let (ok, out) = check_config(&shipped, &[("ZTF_ARCHIVE_BUCKET", "broker-ztf-archive")]);
    assert!(ok, "{out}");
    assert!(out.contains("broker-ztf-archive"), "{out}");
    assert!(out.contains("archive: true"), "{out}");
    assert!(out.contains("ztf-alerts-bigquery"), "{out}");
    // Without [storage], @archive is refused by name.
    let cut = shipped.replace("[storage]", "[unused]");
    let without: String = cut
        .lines()
        .filter(|l| {
            !l.starts_with("bucket")
                && !l.starts_with("object")
                && !l.starts_with("max_concurrent")
                && !l.starts_with("[unused]")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let (ok, out) = check_config(&without, &[]);
    assert!(!ok);
    assert!(
        out.contains("destinations.default") && out.contains("[storage]"),
        "{out}"
    );
}
