//! `ztfhook import-connect WORKER CONNECTOR`: a Kafka Connect worker file
//! and a CloudPubSubSinkConnector file as the ztfhook configuration that
//! does the same job, with a comment for each setting not carried over.
//!
//! Invariants: the consumer's settings are taken as Kafka Connect would
//! layer them, the worker's client settings first, then its `consumer.`
//! settings, then the connector's `consumer.override.` settings (the later
//! win); the group is `connect-<name>` unless one of those sets `group.id`;
//! no secret is printed (a `${VAR}` stands for it, and the header says which
//! variable to set); the output passes `check-config`.

use std::fmt::Write as _;

use super::client::{Client, Setting};
use super::properties::Properties;

/// What the import made: the TOML text, and the variables it needs.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    /// Variable -> what to set it to (never the value).
    pub variables: Vec<(String, String)>,
}

/// Why the files cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Properties(#[from] super::properties::PropertiesError),
    #[error("{at}: `{key}` is missing: {why}")]
    Missing {
        at: String,
        key: &'static str,
        why: &'static str,
    },
    #[error("{at}: connector.class `{class}` is not Google's CloudPubSubSinkConnector")]
    NotTheSinkConnector { at: String, class: String },
}

/// The connector keys this import knows, with what becomes of each.
const CONNECTOR_KEYS: &[&str] = &[
    "name",
    "connector.class",
    "tasks.max",
    "topics",
    "topics.regex",
    "cps.project",
    "cps.topic",
    "cps.endpoint",
    "metadata.publish",
    "headers.publish",
    "orderingKeySource",
    "maxBufferSize",
    "maxBufferBytes",
    "delayThresholdMs",
    "maxDelayThresholdMs",
    "maxOutstandingRequestBytes",
    "maxOutstandingMessages",
    "maxRequestTimeoutMs",
    "maxTotalTimeoutMs",
    "maxShutdownTimeoutMs",
    "gcp.credentials.file.path",
    "gcp.credentials.json",
    "messageBodyName",
    "enableCompression",
    "compressionBytesThreshold",
    "key.converter",
    "value.converter",
    "header.converter",
];

/// A TOML string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `ztf_20210107_programid1` -> `ztf_{YYYYMMDD}_programid1`, if the name
/// holds an 8-digit date between 2000 and 2099.
fn dated_template(name: &str) -> Option<String> {
    let b = name.as_bytes();
    (0..b.len().saturating_sub(7)).find_map(|i| {
        let digits = &name[i..i + 8];
        let before = i == 0 || !b[i - 1].is_ascii_digit();
        let after = i + 8 == b.len() || !b[i + 8].is_ascii_digit();
        let ok = before
            && after
            && digits.bytes().all(|c| c.is_ascii_digit())
            && digits.starts_with("20")
            && (1..=12).contains(&digits[4..6].parse::<u32>().unwrap_or(0))
            && (1..=31).contains(&digits[6..8].parse::<u32>().unwrap_or(0));
        ok.then(|| format!("{}{{YYYYMMDD}}{}", &name[..i], &name[i + 8..]))
    })
}

/// Imports the two files.
///
/// # Errors
/// [`ImportError`] naming the file (and line) at fault.
pub fn import(worker: &Properties, connector: &Properties) -> Result<Imported, ImportError> {
    if let Some(class) = connector.get("connector.class") {
        if !class.ends_with("CloudPubSubSinkConnector") {
            return Err(ImportError::NotTheSinkConnector {
                at: connector.at("connector.class"),
                class: class.to_string(),
            });
        }
    }
    let required = |key: &'static str, why: &'static str| {
        connector.get(key).ok_or_else(|| ImportError::Missing {
            at: connector.path.display().to_string(),
            key,
            why,
        })
    };
    let project = required(
        "cps.project",
        "the Google Cloud project of the Pub/Sub topic",
    )?;
    let topic = required("cps.topic", "the Pub/Sub topic")?;

    // The consumer's settings, layered as Kafka Connect layers them.
    let mut settings = Vec::new();
    let mut notes = Vec::new();
    for e in worker.entries() {
        let at = worker.line_of(e);
        if e.key.starts_with("producer.") || e.key.starts_with("admin.") {
            notes.push(format!(
                "{} ({at}): for Kafka Connect's producers and admin clients; ztfhook only consumes",
                e.key
            ));
        } else if e.key == "group.id" {
            notes.push(format!("group.id ({at}): the Connect cluster's group (distributed mode), not the sink's consumer group"));
        } else if !e.key.starts_with("consumer.") {
            settings.push(Setting::from_entry(worker, e, &e.key));
        }
    }
    for (props, prefix) in [(worker, "consumer."), (connector, "consumer.override.")] {
        for e in props.entries() {
            if let Some(key) = e.key.strip_prefix(prefix) {
                if prefix == "consumer." && key.starts_with("override.") {
                    continue;
                }
                settings.push(Setting::from_entry(props, e, key));
            }
        }
    }
    let client = Client::translate(&settings);
    notes.extend(client.notes.iter().cloned());

    let mut kafka = String::new();
    let mut group_set = false;
    for (key, (value, at)) in &client.properties {
        group_set |= key == "group.id";
        let _ = writeln!(kafka, "{} = {}  # {at}", quoted(key), quoted(value));
    }
    if !group_set {
        let name = connector.get("name").unwrap_or("connector");
        let _ = writeln!(
            kafka,
            "\"group.id\" = {}  # Kafka Connect's group for the connector `{name}` ({})",
            quoted(&format!("connect-{name}")),
            connector.at("name")
        );
    }
    if !client.properties.contains_key("bootstrap.servers") {
        let _ = writeln!(
            kafka,
            "\"bootstrap.servers\" = \"${{KAFKA_BOOTSTRAP_SERVERS}}\"  # neither file sets bootstrap.servers"
        );
    }

    // Topics.
    let topics_line = match (connector.get("topics"), connector.get("topics.regex")) {
        (Some(list), _) => {
            let mut names = Vec::new();
            let mut comment = format!("topics ({})", connector.at("topics"));
            for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                match dated_template(t) {
                    Some(template) => {
                        let _ = write!(
                            comment,
                            "; `{t}` names one night: ztfhook follows the UTC date, reading tonight's topic and moving on at midnight (previous_nights = N reads earlier ones too)"
                        );
                        if !names.contains(&template) {
                            names.push(template);
                        }
                    }
                    None => names.push(t.to_string()),
                }
            }
            let list: Vec<String> = names.iter().map(|n| quoted(n)).collect();
            format!("topics = [{}]  # {comment}", list.join(", "))
        }
        (None, Some(regex)) => {
            // Kafka Connect matches the whole name.
            let mut r = regex.trim().to_string();
            if !r.starts_with('^') {
                r.insert(0, '^');
            }
            if !r.ends_with('$') {
                r.push('$');
            }
            format!(
                "topics = [{}]  # topics.regex ({}), anchored: Kafka Connect matches whole names",
                quoted(&r),
                connector.at("topics.regex")
            )
        }
        (None, None) => {
            return Err(ImportError::Missing {
                at: connector.path.display().to_string(),
                key: "topics",
                why: "the Kafka topics to read (or topics.regex)",
            })
        }
    };

    let mut pubsub = format!(
        "project = {}  # cps.project ({})\ntopic = {}  # cps.topic ({})\n",
        quoted(project),
        connector.at("cps.project"),
        quoted(topic),
        connector.at("cps.topic")
    );
    let mut batching = String::new();
    let mut pipeline = String::new();
    let mut attributes = String::new();
    let at = |k: &str| {
        if connector.get(k).is_some() {
            connector.at(k)
        } else {
            "not set: the connector's default".to_string()
        }
    };
    let number = |k: &str| -> Option<(i64, String)> {
        connector
            .get(k)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map(|n| (n, connector.at(k)))
    };
    if let Some(endpoint) = connector.get("cps.endpoint") {
        let e = endpoint.trim();
        if e != "pubsub.googleapis.com:443" {
            let url = if e.starts_with("http") {
                e.to_string()
            } else {
                format!("https://{e}")
            };
            let _ = writeln!(
                pubsub,
                "endpoint = {}  # cps.endpoint ({})",
                quoted(&url),
                at("cps.endpoint")
            );
        }
    }
    match connector.get("orderingKeySource").map(str::trim) {
        None | Some("none") => {}
        Some(source @ ("key" | "partition")) => {
            let _ = writeln!(
                pubsub,
                "ordering_key = {}  # orderingKeySource ({}); the subscriptions need message ordering on",
                quoted(source),
                at("orderingKeySource")
            );
        }
        Some(other) => notes.push(format!(
            "orderingKeySource ({}): `{other}` is not none, key or partition",
            at("orderingKeySource")
        )),
    }
    let bool_of = |k: &str| {
        connector
            .get(k)
            .map(|v| v.trim().eq_ignore_ascii_case("true"))
    };
    let metadata = bool_of("metadata.publish").unwrap_or(false);
    let _ = writeln!(
        attributes,
        "kafka_metadata = {metadata}  # metadata.publish ({}): kafka.topic, kafka.partition, kafka.offset, kafka.timestamp{}",
        at("metadata.publish"),
        if metadata {
            ""
        } else {
            "; note: the connector sets `key` for a keyed message even without it, ztfhook only with it"
        }
    );
    let headers = bool_of("headers.publish").unwrap_or(false);
    let _ = writeln!(
        attributes,
        "headers = {headers}  # headers.publish ({})",
        at("headers.publish")
    );
    if let Some((n, a)) = number("maxBufferSize") {
        let v = n.clamp(1, 1000);
        let _ = writeln!(
            batching,
            "max_messages = {v}  # maxBufferSize ({a}){}",
            if v == n {
                String::new()
            } else {
                format!(": {n} is over Pub/Sub's 1000 per request")
            }
        );
    }
    if let Some((n, a)) = number("maxBufferBytes") {
        let v = n.clamp(1, 9_500_000);
        let _ = writeln!(
            batching,
            "max_bytes = {v}  # maxBufferBytes ({a}){}",
            if v == n {
                String::new()
            } else {
                format!(": {n} is over what fits in Pub/Sub's 10 MB request")
            }
        );
    }
    if let Some((n, a)) = number("delayThresholdMs").or_else(|| number("maxDelayThresholdMs")) {
        let _ = writeln!(
            batching,
            "max_delay_ms = {}  # delayThresholdMs ({a})",
            n.clamp(0, 60_000)
        );
    }
    if let Some((n, a)) = number("maxOutstandingMessages").filter(|(n, _)| *n < i64::MAX) {
        let _ = writeln!(
            pipeline,
            "max_in_flight_messages = {n}  # maxOutstandingMessages ({a})"
        );
    }
    if let Some((n, a)) = number("maxOutstandingRequestBytes").filter(|(n, _)| *n < i64::MAX) {
        let _ = writeln!(
            pipeline,
            "max_in_flight_bytes = {n}  # maxOutstandingRequestBytes ({a})"
        );
    }
    if let Some((n, a)) = number("maxShutdownTimeoutMs") {
        let _ = writeln!(
            pipeline,
            "shutdown_timeout_ms = {n}  # maxShutdownTimeoutMs ({a})"
        );
    }
    if let Some((n, a)) = number("tasks.max") {
        notes.push(format!(
            "tasks.max = {n} ({a}): Kafka Connect's consumers in the group; ztfhook is one consumer feeding [pipeline] workers threads (default: one per CPU less one); to spread partitions over machines, run more ztfhook instances with the same group.id"
        ));
    }
    for (key, why) in [
        ("maxRequestTimeoutMs", "ztfhook retries a publish until Pub/Sub takes it (at least once), with backoff; the in-flight bound pauses consumption meanwhile"),
        ("maxTotalTimeoutMs", "ztfhook retries a publish until Pub/Sub takes it (at least once), with backoff; the in-flight bound pauses consumption meanwhile"),
        ("gcp.credentials.file.path", "set GOOGLE_APPLICATION_CREDENTIALS to this file (Application Default Credentials)"),
        ("gcp.credentials.json", "not printed: write it to a file only you can read and set GOOGLE_APPLICATION_CREDENTIALS to it"),
        ("messageBodyName", "for struct and map values; ztfhook publishes Kafka's bytes untouched"),
        ("enableCompression", "not carried over: ztfhook publishes uncompressed"),
        ("compressionBytesThreshold", "not carried over: ztfhook publishes uncompressed"),
        ("key.converter", "ztfhook passes Kafka's bytes untouched (as ByteArrayConverter does)"),
        ("value.converter", "ztfhook passes Kafka's bytes untouched (as ByteArrayConverter does)"),
        ("header.converter", "ztfhook passes headers as text attributes"),
    ] {
        if connector.get(key).is_some() {
            notes.push(format!("{key} ({}): {why}", at(key)));
        }
    }
    for e in connector.entries() {
        let k = e.key.as_str();
        if !CONNECTOR_KEYS.contains(&k) && !k.starts_with("consumer.override.") {
            if k.starts_with("errors.")
                || k.starts_with("transforms")
                || k.starts_with("predicates")
            {
                notes.push(format!(
                    "{k} ({}): Kafka Connect's error handling and transforms: ztfhook's are hook.on_error, pubsub.dead_letter_topic and hook scripts",
                    at(k)
                ));
            } else {
                notes.push(format!(
                    "{k} ({}): not a key of CloudPubSubSinkConnector that ztfhook knows",
                    at(k)
                ));
            }
        }
    }

    let variables: Vec<(String, String)> = client
        .secrets
        .iter()
        .map(|(var, (_, what))| (var.clone(), what.clone()))
        .collect();
    let mut out = format!(
        "# ztfhook's configuration, from Kafka Connect's {} and {}\n# (ztfhook import-connect). Check it with: ztfhook --config FILE check-config\n",
        worker.path.display(),
        connector.path.display()
    );
    if !variables.is_empty() {
        out.push_str("#\n# Set before running (the values are not printed):\n");
        for (var, what) in &variables {
            let _ = writeln!(out, "#   {var}: {what}");
        }
    }
    let _ = write!(out, "\n[kafka]\n{topics_line}\n{kafka}");
    let _ = write!(out, "\n[pubsub]\n{pubsub}");
    if !batching.is_empty() {
        let _ = write!(out, "\n[batching]\n{batching}");
    }
    if !pipeline.is_empty() {
        let _ = write!(out, "\n[pipeline]\n{pipeline}");
    }
    let _ = write!(out, "\n[attributes]\n{attributes}");
    if !notes.is_empty() {
        out.push_str("\n# Not carried over:\n");
        for n in &notes {
            let _ = writeln!(out, "#   {n}");
        }
    }
    Ok(Imported {
        toml: out,
        variables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dated_topic_becomes_tonights_template() {
        assert_eq!(
            dated_template("ztf_20210107_programid1").as_deref(),
            Some("ztf_{YYYYMMDD}_programid1")
        );
        assert_eq!(dated_template("lsst-alerts-v11"), None);
        assert_eq!(dated_template("t_123456789"), None);
        assert_eq!(dated_template("x_20211399"), None);
    }
}
