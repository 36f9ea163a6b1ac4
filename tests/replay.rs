//! `ztfhook replay` and `ztfhook check` over archives: tarballs made here from
//! the sample alerts, replayed to Google's Pub/Sub emulator through the same
//! hook, attributes and error policy as the live stream.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{create_pubsub_topic, digest, sample_alerts, services, unique, Bridge, Inbox};

/// Writes a gzip tarball of `members` (name, bytes) at `path`.
fn tarball(path: &Path, members: &[(String, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

/// The ZTF samples as a night's members, `{candid-like name}.avro`.
fn ztf_members() -> Vec<(String, Vec<u8>)> {
    sample_alerts("ztf")
        .into_iter()
        .map(|(name, bytes)| (format!("night/{name}"), bytes))
        .collect()
}

/// A replay's config: the Kafka settings are there (the config's shape) but
/// never used.
fn config(topic: &str, dead_letter: &str, pipeline: &str, batching: &str) -> String {
    format!(
        "[kafka]\n\"bootstrap.servers\" = \"127.0.0.1:9\"\n\"group.id\" = \"unused\"\ntopics = [\"unused\"]\n\n\
         [pubsub]\nproject = \"{}\"\ntopic = \"{topic}\"\ndead_letter_topic = \"{dead_letter}\"\n\n\
         [batching]\n{batching}\n\n[pipeline]\nworkers = 2\nstats_interval_ms = 1000\nshutdown_timeout_ms = 20000\n{pipeline}\n\n\
         [hook]\non_error = \"deadletter\"\n",
        common::PROJECT
    )
}

/// A Rhai hook that tells what it saw in attributes.
const SEEING: &str = r#"
fn route(msg) {
    #{ attributes: #{ seen_topic: msg.topic, seen_file: msg.file, seen_member: msg.member } }
}
"#;

fn replay_args<'a>(checkpoint: &'a str, script: &'a str, inputs: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--script", script, "replay", "--checkpoint", checkpoint];
    args.extend_from_slice(inputs);
    args
}

/// Runs a replay to its end (at most `timeout`): its exit status and log.
fn replay_to_end(config: &str, args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut bridge = Bridge::start_text(config, args);
    let status = bridge.wait(timeout);
    (status, bridge.log_text())
}

/// The checkpoint file, as JSON.
fn read_checkpoint(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn a_replayed_tarball_arrives_byte_for_byte_with_where_it_came_from_and_no_kafka_values() {
    let s = services();
    let (main, dlq) = (unique("replay-main"), unique("replay-dlq"));
    let main_sub = create_pubsub_topic(&s.emulator, &main).await;
    let dlq_sub = create_pubsub_topic(&s.emulator, &dlq).await;
    let dir = tempfile::tempdir().unwrap();
    let night = dir.path().join("ztf_public_20250302.tar.gz");
    let mut members = ztf_members();
    let alerts = members.len();
    members.push(("night/README.txt".into(), b"ZTF public alerts".to_vec()));
    members.push(("night/broken.avro".into(), b"not avro at all".to_vec()));
    tarball(&night, &members);
    let script = dir.path().join("seeing.rhai");
    std::fs::write(&script, SEEING).unwrap();
    let checkpoint = dir.path().join("cp.json");

    let text = config(&main, &dlq, "", "");
    let args = replay_args(
        checkpoint.to_str().unwrap(),
        script.to_str().unwrap(),
        &[night.to_str().unwrap()],
    );
    let (status, log) = replay_to_end(&text, &args, Duration::from_secs(60));
    assert!(status.success(), "{status:?}\n{log}");

    let mut inbox = Inbox::open(&s.emulator, &main_sub).await;
    let got = inbox.pull(alerts, Duration::from_secs(30)).await;
    let expected: BTreeMap<String, String> = members[..alerts]
        .iter()
        .map(|(name, bytes)| (name.clone(), digest(bytes)))
        .collect();
    let arrived: BTreeMap<String, String> = got
        .iter()
        .map(|m| (m.attributes["archive.member"].clone(), m.digest.clone()))
        .collect();
    assert_eq!(arrived, expected, "every alert, its bytes untouched");
    for m in &got {
        let a = &m.attributes;
        assert_eq!(a["archive.file"], "ztf_public_20250302.tar.gz");
        assert_eq!(a["archive.topic"], "ztf_20250302_programid1");
        assert_eq!(a["seen_topic"], "ztf_20250302_programid1");
        assert_eq!(a["seen_file"], "ztf_public_20250302.tar.gz");
        assert_eq!(a["seen_member"], a["archive.member"]);
        assert!(
            !a.keys().any(|k| k.starts_with("kafka.")),
            "no Kafka values a replay never had: {a:?}"
        );
    }
    // The member that is not an alert takes the error policy, named.
    let mut dead = Inbox::open(&s.emulator, &dlq_sub).await;
    let dl = dead.pull(1, Duration::from_secs(30)).await;
    assert_eq!(dl.len(), 1, "{log}");
    assert_eq!(dl[0].attributes["archive.member"], "night/broken.avro");
    assert!(
        dl[0].attributes["ztfhook.error"].contains("is not an alert"),
        "{:?}",
        dl[0].attributes
    );
    // The README is named and counted, not sent.
    assert!(
        log.contains("`night/README.txt` is not an .avro alert file"),
        "{log}"
    );
    assert!(log.contains("1 files and members skipped"), "{log}");
    let cp = read_checkpoint(&checkpoint);
    let progress = cp["inputs"].as_object().unwrap().values().next().unwrap();
    assert_eq!(progress["complete"], true, "{cp}");

    // Run again: the checkpoint says it is done, so nothing is sent twice.
    let (status, log) = replay_to_end(&text, &args, Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(log.contains("complete in checkpoint"), "{log}");
    let more = inbox.pull(1, Duration::from_secs(3)).await;
    assert!(more.is_empty(), "a complete input is not replayed again");
}

#[tokio::test]
async fn a_replay_killed_mid_way_resumes_where_it_was_with_duplicates_within_the_in_flight_bound() {
    let s = services();
    let (main, dlq) = (unique("replay-kill"), unique("replay-kill-dlq"));
    let sub = create_pubsub_topic(&s.emulator, &main).await;
    let _ = create_pubsub_topic(&s.emulator, &dlq).await;
    let dir = tempfile::tempdir().unwrap();
    let samples = sample_alerts("ztf");
    // 400 members, each name once (the same bytes repeat).
    let members: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| {
            let (_, bytes) = &samples[i % samples.len()];
            (format!("{i:05}.avro"), bytes.clone())
        })
        .collect();
    let night = dir.path().join("ztf_public_20250303.tar.gz");
    tarball(&night, &members);
    let checkpoint = dir.path().join("cp.json");
    let in_flight = 8;
    // Slow on purpose (small batches, each waiting 100 ms), so the kill
    // lands mid-way.
    let text = config(
        &main,
        &dlq,
        &format!("max_in_flight_messages = {in_flight}\ncommit_interval_ms = 10"),
        "max_messages = 1000\nmax_delay_ms = 100",
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/passthrough.rhai");
    let args = replay_args(
        checkpoint.to_str().unwrap(),
        script.to_str().unwrap(),
        &[night.to_str().unwrap()],
    );
    let mut inbox = Inbox::open(&s.emulator, &sub).await;
    let mut first = Bridge::start_text(&text, &args);
    let mut got = inbox.pull(100, Duration::from_secs(60)).await;
    first.child.kill().unwrap(); // SIGKILL: no drain, no final checkpoint
    first.child.wait().unwrap();
    assert!(got.len() >= 100, "{}", first.log_text());
    let cp = read_checkpoint(&checkpoint);
    let progress = cp["inputs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(progress["complete"], false, "killed mid-way: {cp}");
    let next = progress["next"].as_u64().unwrap();
    assert!(next > 0 && next < 400, "{cp}");

    let (status, log) = replay_to_end(&text, &args, Duration::from_secs(120));
    assert!(status.success(), "{log}");
    assert!(log.contains(&format!("resuming at member {next}")), "{log}");
    assert!(
        log.contains("replay: ") && log.contains("acknowledged (") && log.contains("s left"),
        "a progress line: {log}"
    );
    got.extend(inbox.pull_until(Duration::from_secs(10), |_| false).await);
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *count
            .entry(m.attributes["archive.member"].clone())
            .or_default() += 1;
    }
    let missing: Vec<&String> = members
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !count.contains_key(*n))
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let duplicates = got.len() - count.len();
    // What was in flight at the kill, and what was acknowledged in the one
    // checkpoint interval (10 ms) before it.
    assert!(
        duplicates <= in_flight + 2,
        "{duplicates} duplicates, over the in-flight bound of {in_flight}"
    );
    // Every member before the checkpoint's `next` was sent exactly once.
    for (n, _) in &members[..next as usize] {
        assert_eq!(
            count[n], 1,
            "{n} was acknowledged before the kill, so not re-sent"
        );
    }
    eprintln!(
        "killed at member {next} of 400; {} messages received, {duplicates} duplicates",
        got.len()
    );
}

#[tokio::test]
async fn bad_archives_are_each_named_and_counted_and_what_is_readable_is_still_sent() {
    let s = services();
    let (main, dlq) = (unique("replay-bad"), unique("replay-bad-dlq"));
    let sub = create_pubsub_topic(&s.emulator, &main).await;
    let _ = create_pubsub_topic(&s.emulator, &dlq).await;
    let dir = tempfile::tempdir().unwrap();
    let members = ztf_members();
    let whole = dir.path().join("whole.tar.gz");
    tarball(&whole, &members);
    let bytes = std::fs::read(&whole).unwrap();
    let truncated = dir.path().join("ztf_public_20250304.tar.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let empty = dir.path().join("ztf_public_20250305.tar.gz");
    tarball(&empty, &[]);
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    for (name, bytes) in sample_alerts("rubin").iter().take(3) {
        std::fs::write(loose.join(name), bytes).unwrap();
    }
    std::fs::write(loose.join("notes.txt"), "observing notes").unwrap();
    let checkpoint = dir.path().join("cp.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/passthrough.rhai");
    let args = replay_args(
        checkpoint.to_str().unwrap(),
        script.to_str().unwrap(),
        // The directory first: it is complete before the others are read,
        // and must stay so through the final commit.
        &[
            loose.to_str().unwrap(),
            truncated.to_str().unwrap(),
            empty.to_str().unwrap(),
        ],
    );
    let (status, log) = replay_to_end(&config(&main, &dlq, "", ""), &args, Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(1),
        "an input not read to its end fails the replay\n{log}"
    );
    assert!(
        log.contains("ztf_public_20250304.tar.gz: cannot read past member"),
        "{log}"
    );
    assert!(
        log.contains("ztf_public_20250305.tar.gz: an empty archive"),
        "{log}"
    );
    assert!(
        log.contains("notes.txt: neither an .avro alert file nor a tarball"),
        "{log}"
    );
    let mut inbox = Inbox::open(&s.emulator, &sub).await;
    let got = inbox.pull_until(Duration::from_secs(5), |_| false).await;
    let from_truncated: Vec<_> = got
        .iter()
        .filter(|m| m.attributes["archive.file"] == "ztf_public_20250304.tar.gz")
        .collect();
    let from_loose = got
        .iter()
        .filter(|m| m.attributes["archive.file"] == "loose")
        .count();
    assert_eq!(from_loose, 3, "the directory's alerts, not its notes");
    assert!(
        !from_truncated.is_empty() && from_truncated.len() < members.len(),
        "the members before the cut: {}",
        from_truncated.len()
    );
    let wanted: HashMap<&str, String> = members
        .iter()
        .map(|(n, b)| (n.as_str(), digest(b)))
        .collect();
    // The checkpoint: the directory is complete (and stays so through the
    // final commit), the cut tarball is not.
    let cp = read_checkpoint(&checkpoint);
    for (path, progress) in cp["inputs"].as_object().unwrap() {
        let complete = progress["complete"].as_bool().unwrap();
        if path.ends_with("/loose") || path.ends_with("20250305.tar.gz") {
            assert!(complete, "{path}: {cp}");
        } else {
            assert!(!complete, "{path}: {cp}");
        }
    }
    for m in from_truncated {
        assert_eq!(
            m.digest,
            wanted[m.attributes["archive.member"].as_str()],
            "a member before the cut arrives whole"
        );
    }
}

#[test]
fn check_dry_runs_a_rule_over_a_nights_tarball_with_the_nights_topic() {
    let dir = tempfile::tempdir().unwrap();
    let night = dir.path().join("ztf_public_20250302.tar.gz");
    let members = ztf_members();
    tarball(&night, &members);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ztfhook"))
        .args(["check", "--json", "--script"])
        .arg(root.join("scripts/ztf_programid.rhai"))
        .arg(&night)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), members.len());
    for l in &lines {
        // The rule routes on the topic, which follows the tarball's name.
        assert_eq!(l["topics"], serde_json::json!(["ztf-public"]), "{l}");
        assert!(
            l["file"]
                .as_str()
                .unwrap()
                .contains("ztf_public_20250302.tar.gz:night/"),
            "{l}"
        );
    }
    assert!(
        stderr.contains(&format!("{} alerts: {} kept", members.len(), members.len())),
        "{stderr}"
    );
    assert!(stderr.contains("kept by topic: ztf-public="), "{stderr}");
    eprintln!(
        "checked {} members in {:?}",
        members.len(),
        started.elapsed()
    );
}
