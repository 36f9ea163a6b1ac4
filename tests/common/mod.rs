//! Test support: the real services started by `scripts/services.sh` (a tansu
//! broker and Google's Pub/Sub emulator), fresh topics and groups per test,
//! and the `ztfhook` binary run as a child process.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use google_cloud_pubsub::client::{Subscriber, SubscriptionAdmin, TopicAdmin};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

pub const PROJECT: &str = "ztfhook-test";

/// Addresses of the running services, from `scripts/services.sh`'s env file.
pub struct Services {
    pub bootstrap: String,
    pub scram_bootstrap: String,
    pub scram_user: String,
    pub scram_password: String,
    pub emulator: String,
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: integration tests need the real broker and Pub/Sub emulator; run them with scripts/test.sh"
        )
    })
}

pub fn services() -> Services {
    Services {
        bootstrap: var("ZTFHOOK_TEST_BOOTSTRAP"),
        scram_bootstrap: var("ZTFHOOK_TEST_SCRAM_BOOTSTRAP"),
        scram_user: var("ZTFHOOK_TEST_SCRAM_USER"),
        scram_password: var("ZTFHOOK_TEST_SCRAM_PASSWORD"),
        emulator: var("PUBSUB_EMULATOR_HOST"),
    }
}

/// A name no other test (or earlier run on the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// The sample alerts in the repository's test data: (file name, bytes).
pub fn sample_alerts(survey: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/alerts")
        .join(survey);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "avro"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

pub fn all_sample_alerts() -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = sample_alerts("ztf").into_iter().map(|(_, b)| b).collect();
    all.extend(sample_alerts("rubin").into_iter().map(|(_, b)| b));
    all
}

pub fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---- Kafka ----------------------------------------------------------------

pub fn kafka_config(bootstrap: &str, extra: &[(&str, &str)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap);
    for (k, v) in extra {
        cc.set(*k, *v);
    }
    cc
}

pub async fn create_kafka_topic(cc: &ClientConfig, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = cc.create().expect("kafka admin client");
    let results = admin
        .create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// One message to produce.
#[derive(Clone, Default)]
pub struct Record {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Vec<u8>,
    /// A null value (a tombstone): `payload` is not sent.
    pub null: bool,
}

pub async fn produce(cc: &ClientConfig, topic: &str, records: &[Record]) {
    let producer: FutureProducer = cc
        .clone()
        .set("message.max.bytes", "12000000")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    for chunk in records.chunks(100) {
        let mut pending = Vec::new();
        for r in chunk {
            let mut headers = OwnedHeaders::new();
            for (name, value) in &r.headers {
                headers = headers.insert(rdkafka::message::Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .partition(r.partition)
                .headers(headers);
            if !r.null {
                rec = rec.payload(r.payload.as_slice());
            }
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            // Enqueue now; the delivery reports are awaited below.
            pending.push(
                producer
                    .send_result(rec)
                    .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}")),
            );
        }
        for p in pending {
            p.await
                .expect("delivery report")
                .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
        }
    }
}

/// The librdkafka settings of a SCRAM-SHA-512 login to the SCRAM broker.
pub fn scram(s: &Services, password: &str) -> Vec<(String, String)> {
    vec![
        ("security.protocol".into(), "SASL_PLAINTEXT".into()),
        ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
        ("sasl.username".into(), s.scram_user.clone()),
        ("sasl.password".into(), password.into()),
    ]
}

/// A client of the SCRAM broker, logged in with the right password.
pub fn scram_client(s: &Services) -> ClientConfig {
    let extra = scram(s, &s.scram_password);
    let pairs: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    kafka_config(&s.scram_bootstrap, &pairs)
}

/// Spreads payloads round-robin over partitions.
pub fn records(payloads: &[Vec<u8>], partitions: i32) -> Vec<Record> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Record {
            partition: i as i32 % partitions,
            payload: p.clone(),
            ..Record::default()
        })
        .collect()
}

/// The group's committed offset per partition (-1 where none).
pub fn committed_offsets(cc: &ClientConfig, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = cc
        .clone()
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
        )
        .collect()
}

/// Waits until the group's committed offsets equal `expected`.
pub fn wait_for_commits(cc: &rdkafka::ClientConfig, group: &str, topic: &str, expected: &[i64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = committed_offsets(cc, group, topic, expected.len() as i32);
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed {got:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The end offset of each partition.
pub fn high_watermarks(cc: &ClientConfig, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = cc.create().expect("consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

// ---- Pub/Sub --------------------------------------------------------------

fn anonymous() -> google_cloud_auth::credentials::Credentials {
    google_cloud_auth::credentials::anonymous::Builder::new().build()
}

pub fn topic_path(id: &str) -> String {
    format!("projects/{PROJECT}/topics/{id}")
}

/// Creates a Pub/Sub topic and a subscription to it (named `{id}-sub`).
pub async fn create_pubsub_topic(emulator: &str, id: &str) -> String {
    create_pubsub_topic_with(emulator, id, false).await
}

/// Like [`create_pubsub_topic`], with message ordering on the subscription.
pub async fn create_pubsub_topic_ordered(emulator: &str, id: &str) -> String {
    create_pubsub_topic_with(emulator, id, true).await
}

async fn create_pubsub_topic_with(emulator: &str, id: &str, ordered: bool) -> String {
    let endpoint = format!("http://{emulator}");
    let topics = TopicAdmin::builder()
        .with_endpoint(&endpoint)
        .with_credentials(anonymous())
        .build()
        .await
        .expect("topic admin");
    topics
        .create_topic()
        .set_name(topic_path(id))
        .send()
        .await
        .expect("create pubsub topic");
    let subs = SubscriptionAdmin::builder()
        .with_endpoint(&endpoint)
        .with_credentials(anonymous())
        .build()
        .await
        .expect("subscription admin");
    let sub = format!("projects/{PROJECT}/subscriptions/{id}-sub");
    subs.create_subscription()
        .set_name(&sub)
        .set_topic(topic_path(id))
        .set_enable_message_ordering(ordered)
        .send()
        .await
        .expect("create subscription");
    sub
}

/// A message as received from Pub/Sub.
#[derive(Debug, Clone)]
pub struct Received {
    pub digest: String,
    /// The message's data.
    pub data: bytes::Bytes,
    pub len: usize,
    pub attributes: HashMap<String, String>,
    /// Empty when the message has none.
    pub ordering_key: String,
}

impl Received {
    /// (kafka.partition, kafka.offset)
    pub fn coordinates(&self) -> (i32, i64) {
        (
            self.attributes["kafka.partition"].parse().unwrap(),
            self.attributes["kafka.offset"].parse().unwrap(),
        )
    }
}

/// One streaming pull on a subscription, kept for a whole test (a stream
/// dropped mid-test keeps leasing what it had buffered, hiding it from the
/// next one). It runs on a thread and runtime of its own: two streams polled
/// from one runtime starve the second.
pub struct Inbox {
    messages: tokio::sync::mpsc::UnboundedReceiver<Result<Received, String>>,
    subscription: String,
}

impl Inbox {
    pub async fn open(emulator: &str, subscription: &str) -> Inbox {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (endpoint, name) = (format!("http://{emulator}"), subscription.to_string());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = Subscriber::builder()
                    .with_endpoint(endpoint)
                    .with_credentials(anonymous())
                    .build()
                    .await
                    .expect("subscriber");
                let mut stream = client.subscribe(&name).build();
                while let Some(item) = stream.next().await {
                    let sent = match item {
                        Ok((m, h)) => {
                            h.ack();
                            tx.send(Ok(Received {
                                digest: digest(&m.data),
                                data: m.data.clone(),
                                len: m.data.len(),
                                attributes: m.attributes.clone(),
                                ordering_key: m.ordering_key.clone(),
                            }))
                        }
                        Err(e) => tx.send(Err(e.to_string())),
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            });
        });
        Inbox {
            messages: rx,
            subscription: subscription.to_string(),
        }
    }

    /// Receives (acknowledging everything) until `done` says so or `timeout`
    /// passes; returns what arrived.
    pub async fn pull_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, self.messages.recv()).await {
                Ok(Some(Ok(m))) => got.push(m),
                Ok(Some(Err(e))) => panic!("pull from {}: {e}", self.subscription),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }

    /// Receives until `n` messages arrived or `timeout` passes.
    pub async fn pull(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        self.pull_until(timeout, |g| g.len() >= n).await
    }
}

/// Counts of each payload digest.
pub fn digest_counts<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(digest(i)).or_insert(0) += 1;
    }
    m
}

// ---- the binary -----------------------------------------------------------

/// The settings a test varies; the rest is `config/local.toml`'s shape.
pub struct BridgeConfig {
    pub bootstrap: String,
    pub group: String,
    pub topics: Vec<String>,
    pub pubsub_topic: String,
    pub dead_letter_topic: Option<String>,
    pub kafka_extra: Vec<(String, String)>,
    pub pipeline_extra: Vec<(String, String)>,
    /// `[hook]` lines, values as TOML (strings quoted).
    pub hook: Vec<(String, String)>,
    pub headers: bool,
    /// `[attributes] kafka_metadata` (true unless a test turns it off).
    pub kafka_metadata: bool,
    /// Environment variables for the process (e.g. another emulator).
    pub env: Vec<(String, String)>,
}

impl BridgeConfig {
    pub fn new(bootstrap: &str, group: &str, topic: &str, pubsub_topic: &str) -> Self {
        BridgeConfig {
            bootstrap: bootstrap.into(),
            group: group.into(),
            topics: vec![topic.into()],
            pubsub_topic: pubsub_topic.into(),
            dead_letter_topic: None,
            kafka_extra: Vec::new(),
            pipeline_extra: Vec::new(),
            hook: Vec::new(),
            headers: false,
            kafka_metadata: true,
            env: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = format!(
            "[kafka]\n\"bootstrap.servers\" = \"{}\"\n\"group.id\" = \"{}\"\ntopics = {:?}\n\"fetch.wait.max.ms\" = 10\n",
            self.bootstrap, self.group, self.topics
        );
        for (k, v) in &self.kafka_extra {
            s.push_str(&format!("\"{k}\" = \"{v}\"\n"));
        }
        s.push_str(&format!(
            "\n[pubsub]\nproject = \"{PROJECT}\"\ntopic = \"{}\"\n",
            self.pubsub_topic
        ));
        if let Some(d) = &self.dead_letter_topic {
            s.push_str(&format!("dead_letter_topic = \"{d}\"\n"));
        }
        s.push_str("\n[pipeline]\n");
        let defaults = [
            ("workers", "2"),
            ("stats_interval_ms", "1000"),
            ("commit_interval_ms", "200"),
            ("shutdown_timeout_ms", "20000"),
        ];
        for (k, v) in defaults {
            if !self.pipeline_extra.iter().any(|(key, _)| key == k) {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        // An empty value leaves the key out (the shipped default applies).
        for (k, v) in self.pipeline_extra.iter().filter(|(_, v)| !v.is_empty()) {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s.push_str(&format!(
            "\n[attributes]\nkafka_metadata = {}\nheaders = {}\n",
            self.kafka_metadata, self.headers
        ));
        if !self.hook.is_empty() {
            s.push_str("\n[hook]\n");
            for (k, v) in &self.hook {
                s.push_str(&format!("{k} = {v}\n"));
            }
        }
        s
    }
}

/// A running `ztfhook` process; killed if still running when dropped.
pub struct Bridge {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bridge {
    pub fn start(config: &BridgeConfig) -> Bridge {
        Self::start_with(&config.render(), &[], &config.env)
    }

    pub fn start_text(config: &str, args: &[&str]) -> Bridge {
        Self::start_with(config, args, &[])
    }

    pub fn start_text_env(config: &str, env: &[(String, String)]) -> Bridge {
        Self::start_with(config, &[], env)
    }

    fn start_with(config: &str, args: &[&str], env: &[(String, String)]) -> Bridge {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ztfhook.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("ztfhook.log");
        let child = Command::new(bin())
            .arg("--config")
            .arg(&path)
            .args(args)
            .env(
                "ZTFHOOK_LOG",
                // ZTFHOOK_TEST_LOG: a filter for the bridges' logs, to debug a test.
                std::env::var("ZTFHOOK_TEST_LOG").unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start ztfhook");
        Bridge {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `pattern`.
    pub fn wait_for_log(&mut self, pattern: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(pattern) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ztfhook exited ({status}) before logging {pattern:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {pattern:?} in ztfhook's log after {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "ztfhook did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(40))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Pub/Sub emulator of a test's own, to stop while a bridge uses it.
pub struct PrivateEmulator {
    pub host: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// A free loopback port (free when asked; services bind it right after).
/// The ztfhook binary under test. ZTFHOOK_TEST_BIN runs the tests against
/// another build (to show a test fails without a fix).
pub fn bin() -> String {
    std::env::var("ZTFHOOK_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ztfhook").to_string())
}

/// Runs `ztfhook --config FILE check-config` on `toml` with `env`: whether
/// it passed, and what it printed (stdout and stderr).
pub fn check_config(toml: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztfhook.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs `ztfhook import-connect WORKER CONNECTOR`: (stdout, stderr, exit code).
pub fn import_connect(worker: &Path, connector: &Path) -> (String, String, Option<i32>) {
    let out = Command::new(bin())
        .arg("import-connect")
        .arg(worker)
        .arg(connector)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateEmulator {
    pub fn start() -> PrivateEmulator {
        Self::start_on(free_port())
    }

    /// Kills the emulator and starts a new, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let port: u16 = self.host.rsplit(':').next().unwrap().parse().unwrap();
        *self = Self::start_on(port);
    }

    pub fn start_on(port: u16) -> PrivateEmulator {
        use std::os::unix::process::CommandExt;
        let bin = var("PUBSUB_EMULATOR_BIN");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("emulator.log");
        let child = Command::new(bin)
            .arg("--host=127.0.0.1")
            .arg(format!("--port={port}"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("emulator.err")).unwrap())
            .process_group(0)
            .spawn()
            .expect("start the Pub/Sub emulator");
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = format!("Server started, listening on {port}");
        loop {
            let mut text = std::fs::read_to_string(&log).unwrap_or_default();
            text.push_str(
                &std::fs::read_to_string(dir.path().join("emulator.err")).unwrap_or_default(),
            );
            if text.contains(&ready) {
                break;
            }
            assert!(
                !text.contains("BindException"),
                "emulator port {port} taken"
            );
            assert!(
                Instant::now() < deadline,
                "the emulator did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateEmulator {
            host: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    /// Stops the emulator (SIGSTOP to its process group): Pub/Sub is
    /// unreachable, with its topics and subscriptions kept.
    pub fn pause(&self) {
        self.group_signal("STOP");
    }

    /// Lets a paused emulator go on (SIGCONT).
    pub fn resume(&self) {
        self.group_signal("CONT");
    }

    fn group_signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, "--"])
            .arg(format!("-{}", self.child.id()))
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {name} failed");
    }

    /// Kills the emulator and its JVM (the whole process group).
    pub fn kill(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--"])
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateEmulator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// A tansu broker of a test's own (sqlite storage), to stop and restart
/// while a bridge uses it.
pub struct PrivateTansu {
    pub bootstrap: String,
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    starts: usize,
}

impl PrivateTansu {
    pub fn start() -> PrivateTansu {
        let mut t = PrivateTansu {
            bootstrap: String::new(),
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            starts: 0,
        };
        t.bootstrap = format!("127.0.0.1:{}", t.port);
        t.launch();
        t
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = self.dir.path().join(format!("tansu-{}.log", self.starts));
        let child = Command::new(var("ZTFHOOK_TANSU"))
            .current_dir(self.dir.path())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .arg("--storage-engine")
            .arg("sqlite://tansu.db")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready in")
        {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// Kills the broker (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn start_again(&mut self) {
        self.launch();
    }
}

impl Drop for PrivateTansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// RSS of a process in MB, from /proc.
pub fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `GET path` from `address` (host:port): the status code and body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return (0, String::new());
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

// ---- Cloud Storage (fake-gcs-server) --------------------------------------

/// The Cloud Storage emulator's URL (`STORAGE_EMULATOR_HOST`, from
/// `scripts/services.sh`).
pub fn storage_emulator() -> String {
    var("STORAGE_EMULATOR_HOST")
}

/// Creates a bucket in the emulator at `url`.
pub fn create_bucket(url: &str, bucket: &str) {
    off_runtime(|| create_bucket_now(url, bucket))
}

/// Runs blocking HTTP on a thread of its own (reqwest's blocking client
/// cannot run inside the tests' tokio runtime).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("blocking helper"))
}

fn create_bucket_now(url: &str, bucket: &str) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/storage/v1/b?project={PROJECT}"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "name": bucket }).to_string())
        .send()
        .expect("create bucket");
    assert!(
        response.status().is_success(),
        "create bucket {bucket}: {}",
        response.status()
    );
}

/// An object as the emulator holds it.
#[derive(Debug, Clone)]
pub struct StoredObject {
    pub name: String,
    pub data: Vec<u8>,
    pub metadata: HashMap<String, String>,
    pub generation: String,
}

/// Every object of a bucket (names under `prefix`), with its bytes.
pub fn list_objects(url: &str, bucket: &str) -> Vec<StoredObject> {
    off_runtime(|| list_objects_now(url, bucket))
}

fn list_objects_now(url: &str, bucket: &str) -> Vec<StoredObject> {
    let client = reqwest::blocking::Client::new();
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let mut request = client.get(format!("{url}/storage/v1/b/{bucket}/o"));
        if let Some(token) = &page {
            request = request.query(&[("pageToken", token)]);
        }
        let body = request.send().expect("list objects").bytes().unwrap();
        let listing: serde_json::Value = serde_json::from_slice(&body).expect("listing");
        for item in listing["items"].as_array().cloned().unwrap_or_default() {
            let name = item["name"].as_str().unwrap().to_string();
            let data = client
                .get(format!("{url}/storage/v1/b/{bucket}/o/{}", encode(&name)))
                .query(&[("alt", "media")])
                .send()
                .expect("read object")
                .bytes()
                .unwrap()
                .to_vec();
            let metadata = item["metadata"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(StoredObject {
                name,
                data,
                metadata,
                generation: item["generation"].as_str().unwrap_or_default().to_string(),
            });
        }
        match listing["nextPageToken"].as_str() {
            Some(t) if !t.is_empty() => page = Some(t.to_string()),
            _ => break,
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes an object directly (as another writer would have).
pub fn put_object(url: &str, bucket: &str, name: &str, data: &[u8]) {
    off_runtime(|| put_object_now(url, bucket, name, data))
}

fn put_object_now(url: &str, bucket: &str, name: &str, data: &[u8]) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/upload/storage/v1/b/{bucket}/o"))
        .query(&[("uploadType", "media"), ("name", name)])
        .body(data.to_vec())
        .send()
        .expect("put object");
    assert!(
        response.status().is_success(),
        "put {name}: {}",
        response.status()
    );
}

fn encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A fake-gcs-server of a test's own (to stop and start it), on `port`.
pub struct PrivateStorage {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PrivateStorage {
    pub fn start_on(port: u16) -> PrivateStorage {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("gcs.log")).unwrap();
        let child = Command::new(var("ZTFHOOK_FAKE_GCS"))
            .args([
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-backend",
                "memory",
                "-log-level",
                "warn",
            ])
            .args(["-port", &port.to_string()])
            .args(["-public-host", &format!("127.0.0.1:{port}")])
            .args(["-external-url", &format!("http://127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fake-gcs-server");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while off_runtime(|| reqwest::blocking::get(format!("{url}/storage/v1/b")).is_err()) {
            assert!(
                Instant::now() < deadline,
                "fake-gcs-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateStorage {
            child: Some(child),
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateStorage {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
