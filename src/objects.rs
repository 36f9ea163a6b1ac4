//! Cloud Storage object destinations: bucket and object names checked
//! against Cloud Storage's rules, and the object name template of the
//! `[storage]` section (`@archive`), filled in from each message.
//!
//! Invariants: a name that reaches the sink is valid (Cloud Storage would
//! not refuse it for its form); a template is parsed once, at start-up, and
//! filling it in never panics: a field that is missing, null or not a
//! scalar is an error naming the field, for the error policy.

use std::fmt;
use std::sync::Arc;

use crate::alert::avro::Value;
use crate::alert::Alert;
use crate::envelope::Envelope;

/// Where an object goes: a bucket and a name in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectName {
    pub bucket: Arc<str>,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gs://{}/{}", self.bucket, self.name)
    }
}

impl ObjectName {
    /// Parses `gs://bucket/name`.
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn parse(text: &str) -> Result<ObjectName, String> {
        let rest = text
            .strip_prefix("gs://")
            .ok_or_else(|| format!("object `{text}` is not gs://bucket/name or @archive"))?;
        let (bucket, name) = rest
            .split_once('/')
            .ok_or_else(|| format!("object `{text}` has no name after the bucket"))?;
        check_bucket(bucket)?;
        check_name(name)?;
        Ok(ObjectName {
            bucket: Arc::from(bucket),
            name: name.to_string(),
        })
    }
}

/// Checks a bucket name against Cloud Storage's rules.
///
/// # Errors
/// Which rule it breaks.
pub fn check_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let max = if bucket.contains('.') { 222 } else { 63 };
    if bucket.len() < 3
        || bucket.len() > max
        || !ok_chars
        || !ends(bucket.bytes().next())
        || !ends(bucket.bytes().last())
    {
        return Err(format!(
            "bucket `{bucket}` is not a Cloud Storage bucket name (3 to 63 lowercase letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// Checks an object name against Cloud Storage's rules.
///
/// # Errors
/// Which rule it breaks.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an object name is empty".into());
    }
    if name.len() > 1024 {
        return Err(format!(
            "object name `{}...` is {} bytes, over Cloud Storage's 1024",
            name.chars().take(40).collect::<String>(),
            name.len()
        ));
    }
    if name == "." || name == ".." || name.starts_with(".well-known/acme-challenge/") {
        return Err(format!("object name `{name}` is reserved by Cloud Storage"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "object name {name:?} holds a control character (Cloud Storage refuses line breaks)"
        ));
    }
    Ok(())
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Partition,
    Offset,
    /// A dotted path into the alert (`objectId`, `diaSource.diaSourceId`).
    Field(String),
}

/// The object name template of `[storage] object`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

/// The records a bare field name is also looked for in, after the alert's
/// top level: ZTF's and Rubin's current detection.
const HEAD_RECORDS: [&str; 2] = ["candidate", "diaSource"];

impl Template {
    /// Parses `{kafka.topic}/{objectId}/{candid}.avro` and the like.
    ///
    /// # Errors
    /// What is wrong with it (an unclosed brace, an empty or unknown name).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("`}}` without `{{` in `{text}`"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("`{{` without `}}` in `{text}`"))?;
            let name = after[..close].trim();
            parts.push(match name {
                "kafka.topic" | "topic" => Part::Topic,
                "kafka.partition" => Part::Partition,
                "kafka.offset" => Part::Offset,
                n if n.starts_with("kafka.") => {
                    return Err(format!(
                        "`{{{n}}}` in `{text}`: the Kafka fields are kafka.topic, kafka.partition and kafka.offset"
                    ))
                }
                "" => return Err(format!("`{{}}` in `{text}` names no field")),
                n if n.contains(['{', ' ', '/']) || n.split('.').any(str::is_empty) => {
                    return Err(format!("`{{{n}}}` in `{text}` is not a field name"))
                }
                n => Part::Field(n.to_string()),
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("the object name template is empty".into());
        }
        Ok(Template {
            text: text.to_string(),
            parts,
        })
    }

    /// Whether filling it in reads the alert.
    pub fn reads_alert(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field(_)))
    }

    /// The object name for a message; `alert` is its decoded alert (needed
    /// when [`Template::reads_alert`]).
    ///
    /// # Errors
    /// Which field is missing, null or not a scalar, or why the name is not
    /// a valid object name.
    pub fn fill(&self, envelope: &Envelope, alert: Option<&Alert>) -> Result<String, String> {
        let mut name = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => name.push_str(t),
                Part::Topic => name.push_str(&envelope.topic),
                Part::Partition => name.push_str(&envelope.partition.to_string()),
                Part::Offset => name.push_str(&envelope.offset.to_string()),
                Part::Field(path) => {
                    let alert = alert.ok_or_else(|| {
                        format!("object name `{}`: `{path}` needs the alert", self.text)
                    })?;
                    name.push_str(&self.field(alert, path)?);
                }
            }
        }
        check_name(&name).map_err(|e| format!("object name template `{}`: {e}", self.text))?;
        Ok(name)
    }

    fn field(&self, alert: &Alert, path: &str) -> Result<String, String> {
        let found = alert.path(path).or_else(|| {
            if path.contains('.') {
                return None;
            }
            HEAD_RECORDS
                .iter()
                .find_map(|r| alert.path(&format!("{r}.{path}")))
        });
        let fail = |why: &str| format!("object name `{}`: field `{path}` {why}", self.text);
        match found {
            None => Err(fail("is not in this alert")),
            Some(Value::Null) => Err(fail("is null in this alert")),
            Some(Value::Int(i)) => Ok(i.to_string()),
            Some(Value::Bool(b)) => Ok(b.to_string()),
            Some(Value::Float(f)) => Ok(crate::hook::returned::format_float(f)),
            Some(Value::Str(s)) => alert.text(s).map(str::to_string).map_err(|e| fail(&e.0)),
            Some(Value::Enum(e, i)) => Ok(alert.symbol(e, i).to_string()),
            Some(_) => Err(fail("is not a number or a string")),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_names_the_kafka_fields_and_the_alert_fields() {
        let t = Template::parse("{kafka.topic}/{objectId}/{candid}.avro").unwrap();
        assert!(t.reads_alert());
        assert_eq!(t.parts.len(), 6);
        assert!(Template::parse("{kafka.key}/x")
            .unwrap_err()
            .contains("kafka.topic"));
        assert!(Template::parse("a/{b").unwrap_err().contains("without"));
        assert!(Template::parse("a/}b").unwrap_err().contains("without"));
        assert!(Template::parse("a/{}").unwrap_err().contains("no field"));
    }

    #[test]
    fn object_names_follow_cloud_storage_rules() {
        assert!(ObjectName::parse("gs://my-bucket/a/b.avro").is_ok());
        assert!(ObjectName::parse("gs://My_Bucket/a").is_err());
        assert!(ObjectName::parse("gs://ab/a").is_err());
        assert!(ObjectName::parse("gs://bucket").is_err());
        assert!(ObjectName::parse("bucket/a").is_err());
        assert!(ObjectName::parse("gs://bucket/a\nb").is_err());
        assert!(ObjectName::parse(&format!("gs://bucket/{}", "x".repeat(1025))).is_err());
    }
}
