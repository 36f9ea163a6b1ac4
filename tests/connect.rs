//! From Kafka Connect in one command: the operator's files (the shared ones,
//! and others in other forms) converted by `ztfhook import-connect`, checked
//! by `check-config`, then run against the real broker and emulator; and
//! `ztfhook tail` with the console consumer's own arguments and files. No
//! secret in any output. (Kerberos conversions run against a KDC in
//! tests/kerberos.rs.)

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const PULL: Duration = Duration::from_secs(120);

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/connect")
        .join(name)
}

#[test]
fn the_shared_kafka_connect_files_become_a_config_that_check_config_accepts() {
    let (toml, err, code) = import_connect(
        &data("psconnect-worker.properties"),
        &data("ps-connector.properties"),
    );
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "topics = [\"ztf_{YYYYMMDD}_programid1\"]",
        "\"bootstrap.servers\" = \"public2.alerts.ztf.uw.edu:9094\"",
        "\"group.id\" = \"connect-ps-sink-connector-ztf\"",
        "\"security.protocol\" = \"SASL_PLAINTEXT\"",
        "\"sasl.mechanism\" = \"GSSAPI\"",
        "\"sasl.kerberos.keytab\" = \"/home/ztf_consumer/pitt-reader.user.keytab\"",
        "\"sasl.kerberos.principal\" = \"pitt-reader@KAFKA.SECURE\"",
        "\"sasl.kerberos.service.name\" = \"kafka\"",
        "\"auto.offset.reset\" = \"earliest\"",
        "project = \"ardent-cycling-243415\"",
        "topic = \"ztf_alert_data-kafka_consumer\"",
        "kafka_metadata = true",
        "headers = false",
    ] {
        assert!(
            toml.lines().any(|l| l.starts_with(line)),
            "no `{line}` in:\n{toml}"
        );
    }
    // Each Java-only line has its note, naming file and line.
    for note in [
        "plugin.path (",
        "key.converter (",
        "value.converter (",
        "offset.storage.file.filename (",
        "tasks.max = 10 (",
        "`ztf_20210107_programid1` names one night",
    ] {
        assert!(toml.contains(note), "no note `{note}` in:\n{toml}");
    }
    assert!(toml.contains("psconnect-worker.properties:1): Kafka Connect's plugins"));
    let (ok, out) = check_config(&toml, &[]);
    assert!(ok, "{out}\n{toml}");
}

#[test]
fn a_file_the_parser_cannot_read_is_named_with_its_line_and_a_source_connector_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let worker = dir.path().join("w.properties");
    std::fs::write(&worker, "bootstrap.servers=x:1\nbad=\\u12\n").unwrap();
    let (_, err, code) = import_connect(&worker, &data("ps-connector.properties"));
    assert_eq!(code, Some(2));
    assert!(err.contains("w.properties:2: malformed"), "{err}");

    let connector = dir.path().join("c.properties");
    std::fs::write(
        &connector,
        "name=x\nconnector.class=com.google.pubsub.kafka.source.CloudPubSubSourceConnector\ncps.project=p\ncps.topic=t\n",
    )
    .unwrap();
    std::fs::write(&worker, "bootstrap.servers=x:1\n").unwrap();
    let (_, err, code) = import_connect(&worker, &connector);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("c.properties:2") && err.contains("CloudPubSubSourceConnector"),
        "{err}"
    );
}

/// A worker with SCRAM in JAAS, colon and blank separators and a
/// continuation; a connector with topics.regex, headers and ordering keys.
fn scram_files(dir: &Path, s: &Services, topic_prefix: &str, ps: &str) -> (PathBuf, PathBuf) {
    let worker = dir.join("worker.properties");
    std::fs::write(
        &worker,
        format!(
            "# a worker in another style\n\
             bootstrap.servers: {bootstrap}\n\
             key.converter org.apache.kafka.connect.converters.ByteArrayConverter\n\
             value.converter=org.apache.kafka.connect.converters.ByteArrayConverter\n\
             offset.storage.file.filename=/tmp/connect.offsets\n\
             consumer.security.protocol = SASL_PLAINTEXT\n\
             consumer.sasl.mechanism : SCRAM-SHA-512\n\
             consumer.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required \\\n\
             \x20   username=\"{user}\" \\\n\
             \x20   password=\"{password}\";\n\
             consumer.max.poll.records=100\n\
             consumer.fetch.wait.max.ms=10\n\
             consumer.enable.auto.commit=False\n",
            bootstrap = s.scram_bootstrap,
            user = s.scram_user,
            password = s.scram_password,
        ),
    )
    .unwrap();
    let connector = dir.join("connector.properties");
    std::fs::write(
        &connector,
        format!(
            "name=rubin-sink\n\
             connector.class=com.google.pubsub.kafka.sink.CloudPubSubSinkConnector\n\
             tasks.max=3\n\
             topics.regex={topic_prefix}.*\n\
             cps.project={PROJECT}\n\
             cps.topic={ps}\n\
             metadata.publish=true\n\
             headers.publish=true\n\
             orderingKeySource=key\n\
             maxBufferSize=50\n\
             maxBufferBytes=20000000\n\
             delayThresholdMs=20\n\
             maxOutstandingMessages=200\n\
             consumer.override.session.timeout.ms=6000\n\
             errors.tolerance=all\n",
        ),
    )
    .unwrap();
    (worker, connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_scram_connector_moves_the_same_messages_with_the_connectors_attributes() {
    let s = services();
    let prefix = unique("connect");
    let topic = format!("{prefix}-a");
    let ps = unique("connect");
    let cc = scram_client(&s);
    create_kafka_topic(&cc, &topic, 2).await;
    let subscription = create_pubsub_topic_ordered(&s.emulator, &ps).await;
    let mut inbox = Inbox::open(&s.emulator, &subscription).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("rubin").into_iter().map(|(_, b)| b).collect();
    let records: Vec<Record> = alerts
        .iter()
        .enumerate()
        .map(|(i, p)| Record {
            partition: (i % 2) as i32,
            key: Some(format!("object-{}", i % 3).into_bytes()),
            headers: vec![("survey".into(), Some(b"lsst".to_vec()))],
            payload: p.clone(),
            null: false,
        })
        .collect();
    produce(&cc, &topic, &records).await;

    let dir = tempfile::tempdir().unwrap();
    let (worker, connector) = scram_files(dir.path(), &s, &prefix, &ps);
    let (toml, err, code) = import_connect(&worker, &connector);
    assert_eq!(code, Some(0), "{err}");
    assert!(!toml.contains(&s.scram_password) && !err.contains(&s.scram_password));
    assert!(
        err.contains("set ZTFHOOK_SASL_PASSWORD"),
        "it says which variable to set: {err}"
    );
    for line in [
        format!("topics = [\"^{prefix}.*$\"]"),
        "\"sasl.password\" = \"${ZTFHOOK_SASL_PASSWORD}\"".to_string(),
        format!("\"sasl.username\" = \"{}\"", s.scram_user),
        "\"group.id\" = \"connect-rubin-sink\"".to_string(),
        "\"session.timeout.ms\" = \"6000\"".to_string(),
        "ordering_key = \"key\"".to_string(),
        "max_messages = 50".to_string(),
        "max_bytes = 9500000".to_string(),
        "max_delay_ms = 20".to_string(),
        "max_in_flight_messages = 200".to_string(),
        "headers = true".to_string(),
    ] {
        assert!(
            toml.lines().any(|l| l.starts_with(&line)),
            "no `{line}` in:\n{toml}"
        );
    }
    for note in [
        "max.poll.records (",
        "enable.auto.commit (",
        "errors.tolerance (",
        "tasks.max = 3",
    ] {
        assert!(toml.contains(note), "no note `{note}` in:\n{toml}");
    }
    let env = [
        (
            "ZTFHOOK_SASL_PASSWORD".to_string(),
            s.scram_password.clone(),
        ),
        ("PUBSUB_EMULATOR_HOST".to_string(), s.emulator.clone()),
    ];
    let mut bridge = Bridge::start_text_env(&toml, &env);
    let got = inbox.pull(alerts.len(), PULL).await;
    assert_eq!(got.len(), alerts.len(), "log:\n{}", bridge.log_text());
    assert_eq!(bridge.stop().code(), Some(0), "{}", bridge.log_text());
    assert!(!bridge.log_text().contains(&s.scram_password));

    // What Google's connector would publish: the value's bytes, the four
    // metadata attributes, `key`, each header; the key as ordering key.
    let mut by_offset: BTreeMap<(i32, i64), &Received> = BTreeMap::new();
    for m in &got {
        by_offset.insert(m.coordinates(), m);
    }
    for (i, r) in records.iter().enumerate() {
        let offset = (i / 2) as i64;
        let m = by_offset
            .get(&(r.partition, offset))
            .unwrap_or_else(|| panic!("{}[{}]@{offset} missing", topic, r.partition));
        assert_eq!(m.digest, digest(&r.payload));
        let mut keys: Vec<&str> = m.attributes.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "kafka.offset",
                "kafka.partition",
                "kafka.timestamp",
                "kafka.topic",
                "key",
                "survey"
            ]
        );
        assert_eq!(m.attributes["kafka.topic"], topic);
        assert_eq!(m.attributes["key"], format!("object-{}", i % 3));
        assert_eq!(m.attributes["survey"], "lsst");
        assert_eq!(m.ordering_key, format!("object-{}", i % 3));
    }
}

/// `ztfhook tail` as Kafka's console consumer is invoked.
fn tail(bootstrap: &str, topic: &str, consumer_config: &Path) -> Command {
    let mut c = Command::new(bin());
    c.args([
        "tail",
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--consumer.config",
    ])
    .arg(consumer_config);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_takes_the_console_consumers_arguments_and_a_scram_jaas_file_from_kafka_opts() {
    let s = services();
    let topic = unique("tail-console");
    let cc = scram_client(&s);
    create_kafka_topic(&cc, &topic, 1).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf")
        .into_iter()
        .take(3)
        .map(|(_, b)| b)
        .collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;

    let dir = tempfile::tempdir().unwrap();
    let props = dir.path().join("consumer.properties");
    std::fs::write(
        &props,
        "group.id=group\nsession.timeout.ms=6000\nenable.auto.commit=False\nsecurity.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nauto.offset.reset=earliest\nfetch.wait.max.ms=10\n",
    )
    .unwrap();
    let jaas = dir.path().join("kafka_client_jaas.conf");
    std::fs::write(
        &jaas,
        format!(
            "KafkaClient {{\n    org.apache.kafka.common.security.scram.ScramLoginModule required\n    username=\"{}\"\n    password=\"{}\";\n}};\n",
            s.scram_user, s.scram_password
        ),
    )
    .unwrap();
    let out = tail(&s.scram_bootstrap, &topic, &props)
        .args([
            "--from-beginning",
            "--max-messages",
            "3",
            "--format",
            "json",
        ])
        .env(
            "KAFKA_OPTS",
            format!(
                "-Xmx512m -Djava.security.auth.login.config={}",
                jaas.display()
            ),
        )
        .env("ZTFHOOK_CONFIG", "/nonexistent.toml")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["topic"], topic.as_str());
        assert_eq!(l["offset"], i as i64);
        assert_eq!(l["survey"], "ztf");
        assert!(l["alert"]["objectId"].is_string(), "{l}");
    }
    assert!(
        stderr.contains("enable.auto.commit"),
        "the unused setting is named: {stderr}"
    );
    assert!(!stderr.contains(&s.scram_password) && !stdout.contains(&s.scram_password));

    // A JAAS file that is not there is named.
    let out = tail(&s.scram_bootstrap, &topic, &props)
        .args(["--from-beginning", "--max-messages", "1", "--jaas"])
        .arg(dir.path().join("missing.conf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.conf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_rubin_config_reads_the_scram_broker_over_sasl_plaintext() {
    let s = services();
    let (topic, ps) = (unique("rubin"), unique("rubin"));
    let cc = scram_client(&s);
    create_kafka_topic(&cc, &topic, 1).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("rubin").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let dead = unique("rubin-dlq");
    create_pubsub_topic(&s.emulator, &dead).await;
    // The file as shipped; only what a deployment sets in the environment
    // differs (and the schema registry, unused by the pass-through).
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rubin.toml"))
            .unwrap();
    assert!(shipped.contains("security.protocol = \"SASL_PLAINTEXT\""));
    assert!(shipped.contains("rubin-alert-stream-bootstrap.slac.stanford.edu:9094"));
    assert!(shipped.contains("https://rubin-alert-schemas.slac.stanford.edu/schema-registry"));
    let env: Vec<(String, String)> = [
        ("RUBIN_BOOTSTRAP", s.scram_bootstrap.as_str()),
        ("RUBIN_USERNAME", s.scram_user.as_str()),
        ("RUBIN_PASSWORD", s.scram_password.as_str()),
        ("RUBIN_GROUP", &unique("group")),
        ("RUBIN_TOPIC", &topic),
        ("GOOGLE_CLOUD_PROJECT", PROJECT),
        ("RUBIN_PUBSUB_TOPIC", &ps),
        ("RUBIN_PUBSUB_DEAD_LETTER_TOPIC", &dead),
        ("PUBSUB_EMULATOR_HOST", &s.emulator),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut bridge = Bridge::start_text_env(&shipped, &env);
    let got = inbox.pull(alerts.len(), PULL).await;
    assert_eq!(got.len(), alerts.len(), "log:\n{}", bridge.log_text());
    assert_eq!(bridge.stop().code(), Some(0));
    assert!(!bridge.log_text().contains(&s.scram_password));
}
