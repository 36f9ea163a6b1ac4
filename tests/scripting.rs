//! Script hooks in a running bridge, against the real broker and emulator:
//! live edits reroute what follows the swap with nothing lost or doubled, a
//! broken edit keeps the old rule, a runaway script is stopped by the limit,
//! and each error policy does what it says.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;

const PULL: Duration = Duration::from_secs(120);

fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn offsets(got: &[Received]) -> BTreeSet<i64> {
    got.iter().map(|m| m.coordinates().1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_edited_mid_stream_reroutes_what_follows_with_nothing_lost_or_doubled() {
    let s = services();
    let (topic, group) = (unique("live"), unique("group"));
    let (ps_default, ps_b, ps_c, dlq) =
        (unique("dflt"), unique("bbb"), unique("ccc"), unique("dlq"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut default_inbox = Inbox::open(
        &s.emulator,
        &create_pubsub_topic(&s.emulator, &ps_default).await,
    )
    .await;
    let mut b = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps_b).await).await;
    let mut c = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps_c).await).await;
    let mut dead = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &dlq).await).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("route.rhai");
    std::fs::write(&script, format!("fn route(msg) {{ \"{ps_b}\" }}")).unwrap();

    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps_default);
    config.dead_letter_topic = Some(dlq.clone());
    config.hook = vec![
        (
            "script".into(),
            format!("{:?}", script.display().to_string()),
        ),
        ("on_error".into(), "\"deadletter\"".into()),
        ("max_operations".into(), "100000".into()),
    ];
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    produce(&cc, &topic, &records(&alerts[..10], 1)).await;
    let mut bridge = Bridge::start(&config);
    let first = b.pull(10, PULL).await;
    assert_eq!(
        offsets(&first),
        (0..10).collect(),
        "log:\n{}",
        bridge.log_text()
    );

    // A rename-style save (vim, sed -i) of a new rule.
    save_by_rename(&script, &format!("fn route(msg) {{ \"{ps_c}\" }}"));
    bridge.wait_for_log("reloaded", Duration::from_secs(10));
    produce(&cc, &topic, &records(&alerts[10..20], 1)).await;
    let second = c.pull(10, PULL).await;
    assert_eq!(offsets(&second), (10..20).collect());

    // A broken edit is rejected; the rule before it keeps running.
    save_by_rename(&script, "fn route(msg) { \"unclosed ");
    bridge.wait_for_log("the reload is rejected", Duration::from_secs(10));
    assert!(
        bridge.log_text().contains("route.rhai:1:"),
        "the rejection names file and line"
    );
    produce(&cc, &topic, &records(&alerts[20..23], 1)).await;
    let third = c.pull(3, PULL).await;
    assert_eq!(offsets(&third), (20..23).collect());

    // A runaway script is stopped by the operation limit; the error policy
    // (deadletter here) takes the message, with the error.
    save_by_rename(
        &script,
        &format!("fn route(msg) {{ if msg.offset >= 23 {{ loop {{ }} }} \"{ps_c}\" }}"),
    );
    bridge.wait_for_log("reload 2,", Duration::from_secs(10));
    produce(&cc, &topic, &records(&alerts[..2], 1)).await;
    let stopped = dead.pull(2, PULL).await;
    assert_eq!(offsets(&stopped), [23, 24].into());
    for m in &stopped {
        assert!(
            m.attributes["ztfhook.error"].contains("operations"),
            "{:?}",
            m.attributes
        );
    }

    // Nothing went anywhere twice, nothing went to the default topic.
    for (name, inbox) in [
        ("b", &mut b),
        ("c", &mut c),
        ("dead", &mut dead),
        ("default", &mut default_inbox),
    ] {
        let extra = inbox.pull(1, Duration::from_secs(2)).await;
        assert!(extra.is_empty(), "{name} got more: {extra:?}");
    }
    wait_for_commits(&cc, &group, &topic, &[25]);
    assert_eq!(bridge.stop().code(), Some(0));
}

/// Runs the bridge over 6 messages with a script that fails on odd offsets.
async fn run_policy(
    policy: &str,
) -> (Bridge, Vec<Received>, rdkafka::ClientConfig, String, String) {
    let s = services();
    let (topic, group, ps) = (unique("policy"), unique("group"), unique("policy"));
    let cc = kafka_config(&s.bootstrap, &[]);
    create_kafka_topic(&cc, &topic, 1).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("odd.lua");
    std::fs::write(
        &script,
        "function route(msg) if msg.offset % 2 == 1 then error('odd offset') end end",
    )
    .unwrap();
    let mut config = BridgeConfig::new(&s.bootstrap, &group, &topic, &ps);
    config.hook = vec![
        (
            "script".into(),
            format!("{:?}", script.display().to_string()),
        ),
        ("on_error".into(), format!("{policy:?}")),
    ];
    let alerts: Vec<Vec<u8>> = sample_alerts("ztf")
        .into_iter()
        .map(|(_, b)| b)
        .take(6)
        .collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;
    let bridge = Bridge::start(&config);
    let expect = if policy == "passthrough" { 6 } else { 3 };
    let got = inbox.pull(expect, Duration::from_secs(60)).await;
    // Keep the directory (and script) alive as long as the bridge.
    std::mem::forget(dir);
    (bridge, got, cc, group, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_passthrough_policy_publishes_failed_messages_to_the_default_topic_with_the_error() {
    let (mut bridge, got, cc, group, topic) = run_policy("passthrough").await;
    assert_eq!(
        offsets(&got),
        (0..6).collect(),
        "log:\n{}",
        bridge.log_text()
    );
    for m in &got {
        let odd = m.coordinates().1 % 2 == 1;
        assert_eq!(
            m.attributes.contains_key("ztfhook.error"),
            odd,
            "{:?}",
            m.attributes
        );
        if odd {
            assert!(m.attributes["ztfhook.error"].contains("odd offset"));
        }
    }
    wait_for_commits(&cc, &group, &topic, &[6]);
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_policy_counts_and_commits_failed_messages_without_publishing_them() {
    let (mut bridge, got, cc, group, topic) = run_policy("drop").await;
    assert_eq!(
        offsets(&got),
        [0, 2, 4].into(),
        "log:\n{}",
        bridge.log_text()
    );
    wait_for_commits(&cc, &group, &topic, &[6]);
    bridge.wait_for_log("dropped 3", Duration::from_secs(10));
    assert_eq!(bridge.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_policy_stops_the_bridge_without_committing_the_failed_message() {
    let (mut bridge, got, cc, group, topic) = run_policy("stop").await;
    let status = bridge.wait(Duration::from_secs(60));
    let log = bridge.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("{topic}[0]@1")) && log.contains("odd offset"),
        "{log}"
    );
    assert!(offsets(&got).contains(&0));
    let committed = committed_offsets(&cc, &group, &topic, 1)[0];
    assert!(
        committed <= 1,
        "committed {committed}, past the failed offset 1"
    );
}

#[test]
fn check_prints_one_decision_per_alert_and_fails_on_a_broken_script() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztfhook"))
        .args([
            "check",
            "--json",
            "--topic",
            "ztf_20261125_programid3",
            "--script",
        ])
        .arg(root.join("scripts/ztf_programid.lua"))
        .arg(root.join("tests/data/alerts/ztf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), sample_alerts("ztf").len());
    for l in &lines {
        assert_eq!(l["topics"], serde_json::json!(["ztf-caltech"]));
        assert_eq!(l["keep"], true);
    }

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.rhai");
    std::fs::write(&broken, "fn route(msg) {\n  let = 1;\n}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztfhook"))
        .args(["check", "--script"])
        .arg(&broken)
        .arg(root.join("tests/data/alerts/ztf"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.rhai:2:"), "{err}");
}
