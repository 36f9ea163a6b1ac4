//! Kerberos, as ZTF's brokers require it (SASL GSSAPI, a keytab): a real MIT
//! KDC on loopback, a realm made for the test, and ztfhook logging in from
//! the keytab through librdkafka's `kinit`. No broker here speaks GSSAPI, so
//! after the login the bridge cannot authenticate to the broker: it must say
//! so and stop, and a login the KDC refuses must stop it at start-up.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, services, unique, Bridge, BridgeConfig};

const REALM: &str = "ZTFHOOK.TEST";

/// A KDC of the test's own realm, with a client principal and its keytab.
struct Kdc {
    dir: tempfile::TempDir,
    child: Child,
    krb5_conf: PathBuf,
    keytab: PathBuf,
    principal: String,
}

impl Kdc {
    fn start() -> Kdc {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let kdc_conf = d.join("kdc.conf");
        std::fs::write(
            &kdc_conf,
            format!(
                "[kdcdefaults]\n kdc_ports = {port}\n kdc_tcp_ports = {port}\n\
                 [realms]\n {REALM} = {{\n  database_name = {db}\n  key_stash_file = {stash}\n  acl_file = {acl}\n  max_life = 1h\n }}\n\
                 [logging]\n kdc = FILE:{log}\n",
                db = d.join("principal").display(),
                stash = d.join("stash").display(),
                acl = d.join("kadm5.acl").display(),
                log = d.join("kdc.log").display(),
            ),
        )
        .unwrap();
        std::fs::write(d.join("kadm5.acl"), "").unwrap();
        let krb5_conf = d.join("krb5.conf");
        std::fs::write(
            &krb5_conf,
            format!(
                "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n rdns = false\n\
                 [realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n"
            ),
        )
        .unwrap();
        let env = [
            ("KRB5_CONFIG", krb5_conf.as_os_str()),
            ("KRB5_KDC_PROFILE", kdc_conf.as_os_str()),
        ];
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .args(args)
                .envs(env)
                .output()
                .unwrap_or_else(|e| {
                    panic!("{program}: {e} (install krb5-kdc and krb5-admin-server)")
                });
            assert!(
                out.status.success(),
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "kdb5_util",
            &[
                "-r",
                REALM,
                "-P",
                "master-password-for-tests",
                "create",
                "-s",
            ],
        );
        let principal = format!("ztfhook@{REALM}");
        let keytab = d.join("ztfhook.keytab");
        for query in [
            format!("addprinc -randkey {principal}"),
            format!("addprinc -randkey kafka/127.0.0.1@{REALM}"),
            format!("ktadd -k {} {principal}", keytab.display()),
        ] {
            run("kadmin.local", &["-r", REALM, "-q", &query]);
        }
        let child = Command::new("krb5kdc")
            .args(["-n", "-r", REALM])
            .envs(env)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start krb5kdc");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the KDC did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Kdc {
            dir,
            child,
            krb5_conf,
            keytab,
            principal,
        }
    }

    /// The environment that points Kerberos at this realm and a ticket
    /// cache of the test's own.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KRB5_CONFIG".into(), self.krb5_conf.display().to_string()),
            (
                "KRB5CCNAME".into(),
                format!("FILE:{}", self.ccache().display()),
            ),
        ]
    }

    fn ccache(&self) -> PathBuf {
        self.dir.path().join("ccache")
    }

    /// `klist` of the test's ticket cache: the principal and its tickets.
    fn tickets(&self) -> String {
        let out = Command::new("klist")
            .arg("-c")
            .arg(self.ccache())
            .env("KRB5_CONFIG", &self.krb5_conf)
            .output()
            .expect("klist");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kdc.log")).unwrap_or_default()
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs ztfhook against the shared (plain) broker with a GSSAPI login as
/// `principal` from `keytab`, with a discarding sink (Kafka is what is
/// tested), until it exits; returns its exit code and log.
fn run_with_kerberos(
    principal: &str,
    keytab: &Path,
    env: Vec<(String, String)>,
) -> (Option<i32>, String) {
    let s = services();
    let mut config = BridgeConfig::new(&s.bootstrap, &unique("group"), &unique("krb"), "unused");
    config.kafka_extra = vec![
        ("security.protocol".into(), "SASL_PLAINTEXT".into()),
        ("sasl.mechanism".into(), "GSSAPI".into()),
        ("sasl.kerberos.service.name".into(), "kafka".into()),
        ("sasl.kerberos.principal".into(), principal.into()),
        ("sasl.kerberos.keytab".into(), keytab.display().to_string()),
    ];
    config.env = env;
    config
        .pipeline_extra
        .push(("sink".into(), "\"discard\"".into()));
    let mut bridge = Bridge::start(&config);
    let status = bridge.wait(Duration::from_secs(90));
    let log = bridge.log_text();
    println!("ztfhook:\n{log}");
    (status.code(), log)
}

#[test]
fn a_keytab_login_gets_a_ticket_and_a_broker_without_kerberos_stops_the_bridge_saying_so() {
    let kdc = Kdc::start();
    let (status, log) = run_with_kerberos(&kdc.principal, &kdc.keytab, kdc.env());

    // The login worked: the keytab's principal holds a ticket-granting
    // ticket from this KDC.
    let tickets = kdc.tickets();
    assert!(
        tickets.contains(&format!("Default principal: {}", kdc.principal))
            && tickets.contains(&format!("krbtgt/{REALM}@{REALM}")),
        "no ticket in the cache:\n{tickets}\nKDC log:\n{}\nztfhook log:\n{log}",
        kdc.log()
    );
    assert!(
        kdc.log().contains("AS_REQ") && kdc.log().contains(&kdc.principal),
        "{}",
        kdc.log()
    );
    // The broker does not speak GSSAPI: a start-up failure that names the
    // brokers and the mechanism.
    assert_eq!(status, Some(1), "{log}");
    assert!(
        log.contains(&format!("kafka: the brokers at `{}`", services().bootstrap))
            && log.contains("GSSAPI"),
        "{log}"
    );
}

#[test]
fn a_principal_the_kdc_refuses_stops_the_bridge_at_start_up_naming_it() {
    let kdc = Kdc::start();
    let stranger = format!("nobody@{REALM}");
    let (status, log) = run_with_kerberos(&stranger, &kdc.keytab, kdc.env());
    assert_eq!(status, Some(1), "{log}");
    assert!(
        log.contains("ztfhook: kafka: the brokers at")
            && log.contains("the Kerberos login failed: Kerberos ticket refresh failed: kinit")
            && log.contains(&stranger),
        "{log}"
    );
    assert!(
        !kdc.tickets().contains("krbtgt/"),
        "a ticket for a refused principal:\n{}",
        kdc.tickets()
    );
}

#[test]
fn a_keytab_that_cannot_be_read_is_named_before_any_login() {
    let missing = Path::new("/nonexistent/ztfhook.keytab");
    let (status, log) = run_with_kerberos(&format!("ztfhook@{REALM}"), missing, Vec::new());
    assert_eq!(status, Some(1), "{log}");
    assert!(
        log.contains("ztfhook: kafka: cannot create the consumer: sasl.kerberos.keytab `/nonexistent/ztfhook.keytab` cannot be read"),
        "{log}"
    );
}

/// A file of the shared Kafka Connect set with the broker's keytab,
/// principal and brokers replaced by this test's.
fn shared_file(name: &str, kdc: &Kdc, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/connect")
            .join(name),
    )
    .unwrap()
    .replace(
        "/home/ztf_consumer/pitt-reader.user.keytab",
        &kdc.keytab.display().to_string(),
    )
    .replace("pitt-reader@KAFKA.SECURE", &kdc.principal)
    .replace("public2.alerts.ztf.uw.edu:9094", &services().bootstrap);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_shared_kafka_connect_files_converted_log_in_from_the_keytab_as_the_worker_did() {
    let kdc = Kdc::start();
    let dir = tempfile::tempdir().unwrap();
    let worker = shared_file("psconnect-worker.properties", &kdc, dir.path());
    let connector = shared_file("ps-connector.properties", &kdc, dir.path());
    let (toml, err, code) = common::import_connect(&worker, &connector);
    assert_eq!(code, Some(0), "{err}");
    // Kafka is what is tested: a discarding sink.
    let text = format!("{toml}\n[pipeline]\nsink = \"discard\"\n");
    let mut bridge = Bridge::start_text_env(&text, &kdc.env());
    let status = bridge.wait(Duration::from_secs(90));
    let log = bridge.log_text();
    let tickets = kdc.tickets();
    assert!(
        tickets.contains(&format!("Default principal: {}", kdc.principal))
            && tickets.contains(&format!("krbtgt/{REALM}@{REALM}")),
        "no ticket from the converted config:\n{tickets}\n{toml}\nztfhook log:\n{log}"
    );
    // As in the test above, the plain broker cannot take the GSSAPI login.
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("GSSAPI"), "{log}");
}

#[test]
fn tail_with_the_console_consumers_files_logs_in_with_kerberos_from_the_jaas_file() {
    let kdc = Kdc::start();
    let dir = tempfile::tempdir().unwrap();
    let props = shared_file("consumer.properties", &kdc, dir.path());
    let jaas = shared_file("kafka_client_jaas.conf", &kdc, dir.path());
    let mut child = Command::new(common::bin())
        .args([
            "tail",
            "--bootstrap-server",
            &services().bootstrap,
            "--topic",
            "ztf_20210105_programid1",
            "--consumer.config",
        ])
        .arg(&props)
        .env(
            "KAFKA_OPTS",
            format!("-Djava.security.auth.login.config={}", jaas.display()),
        )
        .envs(kdc.env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The login happens when the client starts; give it a few seconds.
    let started = Instant::now();
    while !kdc.tickets().contains("krbtgt/") && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tickets = kdc.tickets();
    assert!(
        tickets.contains(&format!("Default principal: {}", kdc.principal)),
        "tail did not log in from the JAAS file's keytab:\n{tickets}\n{stderr}\nKDC log:\n{}",
        kdc.log()
    );
    // consumer.properties' Java-only line is named, not used.
    assert!(stderr.contains("enable.auto.commit"), "{stderr}");
}
