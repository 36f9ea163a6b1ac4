//! A Java Kafka client's settings (from `.properties` files and JAAS) as
//! librdkafka's, with a note for each one that is not carried over and why.
//!
//! Invariants: a secret (a JAAS password, a setting whose name holds a
//! secret word) is never put in the output: it becomes a `${VAR}`
//! placeholder and its value is kept apart, in [`Client::secrets`], for a
//! caller that uses it at once (`tail`) and never prints it; every value
//! carried over was accepted by librdkafka itself.

use std::collections::BTreeMap;

use super::jaas::Module;

/// One setting as read, with where it came from (`file:line`).
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: String,
    pub value: String,
    pub at: String,
}

impl Setting {
    /// An entry of a properties file, under `key` (its name, or the name
    /// without a prefix such as `consumer.`).
    pub fn from_entry(
        props: &super::properties::Properties,
        entry: &super::properties::Entry,
        key: &str,
    ) -> Setting {
        Setting {
            key: key.to_string(),
            value: entry.value.clone(),
            at: props.line_of(entry),
        }
    }
}

/// librdkafka's settings, and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// librdkafka's name -> (value, where it came from). Secret values are
    /// `${VAR}` placeholders.
    pub properties: BTreeMap<String, (String, String)>,
    /// Settings not carried over, each with where it was and why.
    pub notes: Vec<String>,
    /// What each placeholder stands for: variable -> (value, description).
    /// Never printed.
    pub secrets: BTreeMap<String, (String, String)>,
}

/// What Java's clients and Kafka Connect have and librdkafka has not (or
/// ztfhook owns), by prefix or name, with why.
const LEFT_OUT: &[(&str, &str)] = &[
    (
        "plugin.path",
        "Kafka Connect's plugins: ztfhook is one binary",
    ),
    (
        "key.converter",
        "ztfhook passes Kafka's bytes untouched (as ByteArrayConverter does)",
    ),
    (
        "value.converter",
        "ztfhook passes Kafka's bytes untouched (as ByteArrayConverter does)",
    ),
    (
        "header.converter",
        "ztfhook passes headers as text attributes (headers.publish)",
    ),
    ("internal.key.converter", "Kafka Connect's own"),
    ("internal.value.converter", "Kafka Connect's own"),
    ("key.deserializer", "ztfhook reads bytes"),
    ("value.deserializer", "ztfhook reads bytes"),
    (
        "offset.storage.",
        "Kafka Connect's offset store: ztfhook commits to the consumer group",
    ),
    (
        "offset.flush.",
        "ztfhook commits as Pub/Sub acknowledges (pipeline.commit_interval_ms)",
    ),
    ("config.storage.", "Kafka Connect's own"),
    ("status.storage.", "Kafka Connect's own"),
    (
        "rest.",
        "Kafka Connect's REST API: ztfhook serves [metrics] listen",
    ),
    (
        "listeners",
        "Kafka Connect's REST API: ztfhook serves [metrics] listen",
    ),
    (
        "max.poll.records",
        "a Java consumer setting; librdkafka prefetches by size (queued.max.messages.kbytes)",
    ),
    ("interceptor.classes", "Java classes"),
    (
        "metric.reporters",
        "Java classes: ztfhook serves Prometheus metrics",
    ),
    ("exclude.internal.topics", "a Java consumer setting"),
    ("sasl.login.", "Java login classes"),
    ("sasl.client.callback.handler.class", "a Java class"),
    ("security.providers", "Java security providers"),
    (
        "ssl.truststore.",
        "a Java keystore: convert it to PEM and set ssl.ca.location",
    ),
    (
        "ssl.keystore.type",
        "Java keystore types: librdkafka reads PKCS#12 (ssl.keystore.location) or PEM",
    ),
    ("ssl.keymanager.", "Java TLS internals"),
    ("ssl.trustmanager.", "Java TLS internals"),
    (
        "ssl.protocol",
        "Java TLS internals: librdkafka negotiates the TLS version",
    ),
    (
        "ssl.enabled.protocols",
        "Java TLS internals: librdkafka negotiates the TLS version",
    ),
    (
        "errors.",
        "Kafka Connect's error handling: ztfhook's is hook.on_error and pubsub.dead_letter_topic",
    ),
    ("key.serializer", "a producer setting"),
    ("value.serializer", "a producer setting"),
];

fn left_out(key: &str) -> Option<&'static str> {
    // And the properties ztfhook owns, with the reason the config gives.
    LEFT_OUT
        .iter()
        .chain(crate::config::RESERVED_KAFKA_PROPERTIES)
        .find(|(k, _)| {
            if k.ends_with('.') {
                key.starts_with(k)
            } else {
                key == *k
            }
        })
        .map(|(_, why)| *why)
}

/// The placeholder variable for a secret setting: `ZTFHOOK_` and its name.
pub fn variable_for(key: &str) -> String {
    let mut v = String::from("ZTFHOOK_");
    for c in key.chars() {
        v.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
    }
    v
}

impl Client {
    fn set(&mut self, key: &str, value: String, at: &str) {
        self.properties
            .insert(key.to_string(), (value, at.to_string()));
    }

    fn note(&mut self, key: &str, at: &str, why: impl std::fmt::Display) {
        self.notes.push(format!("{key} ({at}): {why}"));
    }

    fn secret(&mut self, key: &str, value: &str, at: &str, what: &str) {
        let var = variable_for(key);
        self.secrets
            .insert(var.clone(), (value.to_string(), format!("{what} ({at})")));
        self.set(key, format!("${{{var}}}"), at);
    }

    /// Translates settings given in order: a later one replaces an earlier
    /// one of the same name.
    pub fn translate(settings: &[Setting]) -> Client {
        let mut latest: Vec<&Setting> = Vec::new();
        for s in settings {
            latest.retain(|l| l.key != s.key);
            latest.push(s);
        }
        let mut client = Client::default();
        // JAAS first: explicit librdkafka settings of the same name win.
        for s in latest.iter().filter(|s| s.key == "sasl.jaas.config") {
            match super::jaas::parse_entry(&s.value) {
                Ok(modules) => {
                    for m in &modules {
                        client.login_module(m, &s.at);
                    }
                }
                Err(e) => client.note("sasl.jaas.config", &s.at, format!("cannot be read: {e}")),
            }
        }
        for s in latest.iter().filter(|s| s.key != "sasl.jaas.config") {
            client.one(s);
        }
        client
    }

    /// The settings of a JAAS login module.
    pub fn login_module(&mut self, m: &Module, at: &str) {
        match m.name() {
            "Krb5LoginModule" => {
                for (option, value) in &m.options {
                    match option.as_str() {
                        "keyTab" => self.set("sasl.kerberos.keytab", value.clone(), at),
                        "principal" => self.set("sasl.kerberos.principal", value.clone(), at),
                        "serviceName" => {
                            if !self.properties.contains_key("sasl.kerberos.service.name") {
                                self.set("sasl.kerberos.service.name", value.clone(), at);
                            }
                        }
                        "useKeyTab" | "storeKeyTab" | "useTicketCache" | "doNotPrompt" => self.note(
                            &format!("sasl.jaas.config {option}"),
                            at,
                            "librdkafka always logs in with the keytab through kinit (sasl.kerberos.kinit.cmd) and renews the ticket itself",
                        ),
                        "debug" => self.note(
                            "sasl.jaas.config debug",
                            at,
                            "for librdkafka's Kerberos logs set debug = \"security\"",
                        ),
                        other => self.note(
                            &format!("sasl.jaas.config {other}"),
                            at,
                            "no librdkafka equivalent",
                        ),
                    }
                }
                self.set("sasl.mechanism", "GSSAPI".into(), at);
            }
            "ScramLoginModule" | "PlainLoginModule" => {
                for (option, value) in &m.options {
                    match option.as_str() {
                        "username" => self.set("sasl.username", value.clone(), at),
                        "password" => self.secret(
                            "sasl.password",
                            value,
                            at,
                            "the password of sasl.jaas.config",
                        ),
                        other => self.note(
                            &format!("sasl.jaas.config {other}"),
                            at,
                            "no librdkafka equivalent",
                        ),
                    }
                }
            }
            other => self.note(
                "sasl.jaas.config",
                at,
                format!("the login module `{other}` is not converted: set librdkafka's sasl.* settings by hand"),
            ),
        }
    }

    fn one(&mut self, s: &Setting) {
        let key = s.key.as_str();
        if let Some(why) = left_out(key) {
            return self.note(key, &s.at, why);
        }
        let mut value = s.value.trim().to_string();
        // A value wholly in single quotes carries the quotes in Java; the
        // files that use one (sasl.kerberos.kinit.cmd) mean the text inside.
        if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
            value = value[1..value.len() - 1].to_string();
        }
        if value.eq_ignore_ascii_case("true") || value.eq_ignore_ascii_case("false") {
            value = value.to_ascii_lowercase();
        }
        let value = match key {
            "auto.offset.reset" if value == "none" => "error".to_string(),
            // Java's empty value turns host name checks off; librdkafka's is `none`.
            "ssl.endpoint.identification.algorithm" if value.is_empty() => "none".to_string(),
            "partition.assignment.strategy" => match assignor(&value) {
                Ok(v) => v,
                Err(why) => return self.note(key, &s.at, why),
            },
            _ => value,
        };
        if crate::secret::is_secret_key(key) {
            // Probed with its value, but never printed.
            if let Err(why) = crate::config::check_librdkafka_property(key, &value) {
                return self.note(key, &s.at, why);
            }
            return self.secret(key, &value, &s.at, key);
        }
        match crate::config::check_librdkafka_property(key, &value) {
            Ok(()) => self.set(key, value, &s.at),
            Err(why) => self.note(key, &s.at, why),
        }
    }

    /// The properties with the secrets in place of their placeholders, for
    /// a client made at once (never printed).
    pub fn resolved(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, (v, _))| {
                let mut v = v.clone();
                for (var, (secret, _)) in &self.secrets {
                    v = v.replace(&format!("${{{var}}}"), secret);
                }
                (k.clone(), v)
            })
            .collect()
    }
}

/// Java's assignor classes as librdkafka's names.
fn assignor(value: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for class in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        let name = class.rsplit('.').next().unwrap_or(class);
        out.push(match name {
            "RangeAssignor" | "range" => "range",
            "RoundRobinAssignor" | "roundrobin" => "roundrobin",
            "CooperativeStickyAssignor" | "cooperative-sticky" => "cooperative-sticky",
            other => {
                return Err(format!(
                    "`{other}` has no librdkafka equivalent (range, roundrobin, cooperative-sticky); ztfhook's default is cooperative-sticky"
                ))
            }
        });
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(key: &str, value: &str) -> Setting {
        Setting {
            key: key.into(),
            value: value.into(),
            at: "f:1".into(),
        }
    }

    #[test]
    fn kerberos_in_jaas_becomes_librdkafkas_kerberos_settings() {
        let c = Client::translate(&[
            s("security.protocol", "SASL_PLAINTEXT"),
            s("sasl.jaas.config", "com.sun.security.auth.module.Krb5LoginModule required useKeyTab=true keyTab=\"/k/r.keytab\" principal=\"r@R\" serviceName=\"kafka\";"),
            s("enable.auto.commit", "False"),
            s("sasl.kerberos.kinit.cmd", "'kinit -t \"%{sasl.kerberos.keytab}\" -k %{sasl.kerberos.principal}'"),
        ]);
        let p = |k: &str| c.properties.get(k).map(|(v, _)| v.as_str());
        assert_eq!(p("sasl.mechanism"), Some("GSSAPI"));
        assert_eq!(p("sasl.kerberos.keytab"), Some("/k/r.keytab"));
        assert_eq!(p("sasl.kerberos.principal"), Some("r@R"));
        assert_eq!(p("sasl.kerberos.service.name"), Some("kafka"));
        assert_eq!(
            p("sasl.kerberos.kinit.cmd"),
            Some("kinit -t \"%{sasl.kerberos.keytab}\" -k %{sasl.kerberos.principal}")
        );
        assert_eq!(p("enable.auto.commit"), None);
        assert!(c
            .notes
            .iter()
            .any(|n| n.starts_with("enable.auto.commit (f:1)")));
        assert!(c.notes.iter().any(|n| n.contains("useKeyTab")));
    }

    #[test]
    fn a_scram_password_becomes_a_placeholder_and_is_kept_apart() {
        let c = Client::translate(&[s(
            "sasl.jaas.config",
            "org.apache.kafka.common.security.scram.ScramLoginModule required username=\"u\" password=\"hunter2\";",
        )]);
        assert_eq!(c.properties["sasl.username"].0, "u");
        assert_eq!(c.properties["sasl.password"].0, "${ZTFHOOK_SASL_PASSWORD}");
        assert!(!format!("{:?}{:?}", c.properties, c.notes).contains("hunter2"));
        assert_eq!(c.resolved()["sasl.password"], "hunter2");
    }

    #[test]
    fn java_only_and_unknown_settings_are_left_out_with_the_reason() {
        let c = Client::translate(&[
            s("plugin.path", "/x"),
            s("max.poll.records", "10"),
            s("no.such.thing", "1"),
            s("session.timeout.ms", "6000"),
            s(
                "partition.assignment.strategy",
                "org.apache.kafka.clients.consumer.RoundRobinAssignor",
            ),
        ]);
        assert_eq!(c.properties["session.timeout.ms"].0, "6000");
        assert_eq!(
            c.properties["partition.assignment.strategy"].0,
            "roundrobin"
        );
        assert_eq!(c.notes.len(), 3, "{:?}", c.notes);
        assert!(
            c.notes[2].contains("No such configuration property"),
            "{:?}",
            c.notes
        );
    }
}
