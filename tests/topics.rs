//! What the bridge reads, against the real broker and emulator: a nightly
//! date template reads tonight's and last night's topics, not older ones, and
//! picks tonight's up when it appears; `ztfhook tail` prints the sample
//! alerts and commits nothing.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use ztfhook::source::subscription::Date;

const PULL: Duration = Duration::from_secs(90);

fn night(days_back: i64) -> Date {
    Date::from_days(Date::of(SystemTime::now()).days() - days_back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nightly_template_reads_recent_nights_only_and_picks_up_tonights_topic_when_it_appears() {
    let s = services();
    let prefix = unique("ztf").replace('-', "");
    let template = format!("{prefix}_{{YYYYMMDD}}_programid1");
    let (group, ps) = (unique("group"), unique("nightly"));
    let cc = kafka_config(&s.bootstrap, &[]);
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    let last_night = night(1).fill(&template);
    let old_night = night(3).fill(&template);
    let tonight = night(0).fill(&template);
    create_kafka_topic(&cc, &last_night, 1).await;
    create_kafka_topic(&cc, &old_night, 1).await;
    produce(&cc, &last_night, &records(&alerts[..3], 1)).await;
    produce(&cc, &old_night, &records(&alerts[3..6], 1)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;

    let mut config = BridgeConfig::new(&s.bootstrap, &group, &template, &ps);
    config
        .kafka_extra
        .push(("topic.metadata.refresh.interval.ms".into(), "1000".into()));
    let text = config
        .render()
        .replacen("\n[pubsub]", "previous_nights = 1\n\n[pubsub]", 1);
    let mut bridge = Bridge::start_text(&text, &[]);
    bridge.wait_for_log(
        &format!("nightly topics present: [\"{last_night}\"]"),
        Duration::from_secs(30),
    );
    let first = inbox.pull(3, PULL).await;
    assert_eq!(first.len(), 3, "log:\n{}", bridge.log_text());
    assert!(first
        .iter()
        .all(|m| m.attributes["kafka.topic"] == last_night));

    // Tonight's topic appears while the bridge runs.
    create_kafka_topic(&cc, &tonight, 1).await;
    produce(&cc, &tonight, &records(&alerts[6..8], 1)).await;
    let second = inbox.pull(2, PULL).await;
    assert_eq!(second.len(), 2, "log:\n{}", bridge.log_text());
    assert!(second
        .iter()
        .all(|m| m.attributes["kafka.topic"] == tonight));
    let extra = inbox.pull(1, Duration::from_secs(3)).await;
    assert!(
        extra.is_empty(),
        "read a night outside the window: {:?}",
        extra[0].attributes["kafka.topic"]
    );
    assert_eq!(committed_offsets(&cc, &group, &old_night, 1), vec![-1]);
    let status = bridge.stop();
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

fn tail(config: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztfhook.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ztfhook"))
        .arg("--config")
        .arg(&path)
        .arg("tail")
        .args(args)
        .env("ZTFHOOK_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("tail {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tail {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_the_sample_alerts_from_the_broker_and_commits_nothing() {
    let s = services();
    let (topic, group) = (unique("tail"), unique("group"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let ztf = sample_alerts("ztf");
    let rubin = sample_alerts("rubin");
    let mut payloads: Vec<Vec<u8>> = ztf[..3].iter().map(|(_, b)| b.clone()).collect();
    payloads.extend(rubin[..3].iter().map(|(_, b)| b.clone()));
    payloads.push(b"not an alert".to_vec());
    produce(&cc, &topic, &records(&payloads, 1)).await;
    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/schemas/lsst");
    let config = format!(
        "{}\n[alerts]\nschema_dir = {:?}\n",
        BridgeConfig::new(&s.bootstrap, &group, &topic, "unused").render(),
        schemas.display().to_string()
    );

    let lines = tail(&config, &["--from-beginning", "--max", "7"]);
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 7, "{lines:#?}");
    for (i, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("{topic} 0 {i} ")), "{line}");
        assert!(
            line.ends_with(&format!("size={}", payloads[i].len())),
            "{line}"
        );
    }
    // From MANIFEST.tsv: the first ZTF samples' objectIds, the first Rubin
    // samples' diaSourceIds.
    assert!(lines[0].contains("ztf objectId=ZTF18acsbuxi candid=697252845015010002"));
    assert!(lines[1].contains("objectId=ZTF17aabuxmr") && lines[1].contains("magpsf=18.32"));
    assert!(lines[2].contains("objectId=ZTF18abomhfb"));
    assert!(
        lines[3].contains("lsst diaSourceId=169298432645136561") && lines[3].contains("band=i")
    );
    assert!(lines[4].contains("diaSourceId=169298432742653968"));
    assert!(lines[5].contains("diaSourceId=169298432757858307"));
    assert!(
        lines[6].contains("unknown undecoded: not an alert"),
        "{}",
        lines[6]
    );

    let json = tail(
        &config,
        &["--from-beginning", "--max", "1", "--format", "json"],
    );
    let record: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(record["survey"], "ztf");
    assert_eq!(record["alert"]["objectId"], "ZTF18acsbuxi");
    assert_eq!(record["alert"]["candidate"]["programid"], 1);
    assert!(
        record["alert"]["cutoutScience"]["stampData"]["bytes"]
            .as_u64()
            .unwrap()
            > 1000
    );

    assert_eq!(
        committed_offsets(&cc, &group, &topic, 1),
        vec![-1],
        "tail committed for the bridge's group"
    );
}
