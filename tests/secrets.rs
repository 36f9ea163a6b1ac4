//! A run configured with secrets everywhere (SCRAM against the SCRAM-enabled
//! broker, SSL key and keystore passwords, an SSL key, an OAuth settings
//! string, a schema
//! registry URL with a user and password, a script in a private directory)
//! shows none of them: not in any log line at debug level (librdkafka's
//! `conf` and `security` contexts included), not in `check-config`, not in
//! any attribute of any message it publishes.

mod common;

use std::time::Duration;

use common::*;

const PULL: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_local_path_reaches_a_log_line_check_config_or_an_attribute() {
    let s = services();
    let (topic, group, ps) = (unique("secrets"), unique("group"), unique("secrets"));
    let cc = scram_client(&s);
    create_kafka_topic(&cc, &topic, 1).await;
    let alerts: Vec<Vec<u8>> = sample_alerts("rubin")
        .into_iter()
        .take(3)
        .map(|(_, b)| b)
        .collect();
    produce(&cc, &topic, &records(&alerts, 1)).await;
    let mut inbox = Inbox::open(&s.emulator, &create_pubsub_topic(&s.emulator, &ps).await).await;

    let private = tempfile::tempdir().unwrap();
    // A directory with a space in its name, and long enough that Lua would
    // cut it short in its messages.
    let rules = private
        .path()
        .join("my rules")
        .join("a-long-directory-name-for-the-rules-of-one-private-project");
    std::fs::create_dir_all(&rules).unwrap();
    let script = rules.join("needs_the_registry.lua");
    std::fs::write(
        &script,
        // (The load check's test message is 4 bytes: not raised for it.)
        "function route(msg)\n  local ok, e = pcall(function() return msg.alert end)\n  if not ok and msg.size > 4 then error(tostring(e)) end\nend\n",
    )
    .unwrap();
    let registry_port = free_port();
    let secrets = [
        s.scram_password.clone(),
        "ssl-key-pass-5b1c".to_string(),
        "oauth-extension-token-77d0".to_string(),
        "keystore-password-c3a9".to_string(),
        "pem-body-e41f".to_string(),
        "registry-password-9ab2".to_string(),
        "registry-user-1f0e".to_string(),
    ];
    let mut config = BridgeConfig::new(&s.scram_bootstrap, &group, &topic, &ps);
    config.kafka_extra = vec![
        ("security.protocol".into(), "SASL_PLAINTEXT".into()),
        ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
        ("sasl.username".into(), s.scram_user.clone()),
        // From the environment, as a deployment would have it.
        ("sasl.password".into(), "${ZTFHOOK_TEST_PASSWORD}".into()),
        ("ssl.key.password".into(), secrets[1].clone()),
        (
            "sasl.oauthbearer.config".into(),
            format!("principal=ztfhook extension_token={}", secrets[2]),
        ),
        // (librdkafka's OIDC keys, `sasl.oauthbearer.client.secret` and
        // `sasl.oauthbearer.assertion.private.key.*`, need a build with
        // libcurl, which this one is not: the unit tests of `secret` show
        // they are caught.)
        ("ssl.keystore.password".into(), secrets[3].clone()),
        ("ssl.key.pem".into(), secrets[4].clone()),
        ("debug".into(), "conf,security,broker".into()),
    ];
    config.hook = vec![(
        "script".into(),
        format!("{:?}", script.display().to_string()),
    )];
    config.env = vec![
        ("ZTFHOOK_TEST_PASSWORD".into(), s.scram_password.clone()),
        ("ZTFHOOK_LOG".into(), "debug".into()),
    ];
    let registry = format!(
        "http://{}:{}@127.0.0.1:{registry_port}/registry",
        secrets[6], secrets[5]
    );
    let text = format!(
        "{}\n[alerts]\nschema_registry = \"{registry}\"\n",
        config.render()
    );

    // check-config first.
    let (ok, check) = check_config(&text, &[("ZTFHOOK_TEST_PASSWORD", &s.scram_password)]);
    assert!(ok, "{check}");
    assert!(
        check.contains(&format!("http://127.0.0.1:{registry_port}/registry")),
        "check-config does not show the registry: {check}"
    );

    let mut bridge = Bridge::start_text_env(&text, &config.env);
    let got = inbox.pull(alerts.len(), PULL).await;
    assert_eq!(got.len(), alerts.len(), "log:\n{}", bridge.log_text());
    assert_eq!(bridge.stop().code(), Some(0));
    let log = bridge.log_text();
    // The run did what the test needs: librdkafka's debug contexts logged,
    // and every message carries the error that names the registry.
    assert!(log.contains("librdkafka"), "no librdkafka lines:\n{log}");
    for m in &got {
        let e = &m.attributes["ztfhook.error"];
        assert!(
            e.contains("needs_the_registry.lua")
                && e.contains(&format!("127.0.0.1:{registry_port}")),
            "{e}"
        );
    }

    let attributes: Vec<String> = got
        .iter()
        .flat_map(|m| m.attributes.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    let private_dir = private.path().display().to_string();
    for (what, text) in [
        ("check-config", check.as_str()),
        ("the log", log.as_str()),
        ("the attributes", &attributes.join("\n")),
    ] {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows `{secret}`:\n{text}"
            );
        }
        if what == "the attributes" {
            assert!(
                !text.contains(&private_dir)
                    && !text.contains("my rules")
                    && !text.contains("private-project"),
                "{what} shows the local path {private_dir}:\n{text}"
            );
        }
    }
    println!(
        "secrets: {} log lines, {} check-config lines, {} attributes searched; none shows a secret",
        log.lines().count(),
        check.lines().count(),
        attributes.len()
    );
}
