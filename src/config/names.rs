//! Naming rules: Pub/Sub's for topic ids and full names, Kafka's for topic
//! names (or a regular expression, or a nightly template).

use std::fmt;

/// A full Pub/Sub topic resource name, `projects/P/topics/T`, checked
/// against Pub/Sub's naming rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Parses a short topic id (resolved in `project`) or a full resource name.
    ///
    /// # Errors
    /// A message saying which naming rule the name breaks.
    pub fn parse(project: &str, name: &str) -> Result<TopicName, String> {
        let (project, id) = match name.strip_prefix("projects/") {
            Some(rest) => match rest.split_once("/topics/") {
                Some((p, id)) if !p.is_empty() && !p.contains('/') => (p, id),
                _ => {
                    return Err(format!(
                        "`{name}` is not a topic name: expected `projects/PROJECT/topics/TOPIC` or a bare topic id"
                    ))
                }
            },
            None => (project, name),
        };
        check_topic_id(id)
            .map_err(|why| format!("`{name}` is not a valid Pub/Sub topic: {why}"))?;
        Ok(TopicName(format!("projects/{project}/topics/{id}")))
    }

    /// The full resource name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic id, the part after `/topics/`.
    pub fn id(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Pub/Sub's rules for a topic id: 3-255 characters, a letter first, then
/// letters, digits and `-_.~+%`, and no `goog` prefix.
/// <https://cloud.google.com/pubsub/docs/pubsub-basics#resource_names>
pub fn check_topic_id(id: &str) -> Result<(), &'static str> {
    if id.len() < 3 || id.len() > 255 {
        return Err("a topic id has 3 to 255 characters");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("a topic id starts with a letter");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c))
    {
        return Err("a topic id has only letters, digits and `-_.~+%`");
    }
    if id.to_ascii_lowercase().starts_with("goog") {
        return Err("a topic id cannot start with `goog`");
    }
    Ok(())
}

/// Kafka's topic naming rule (letters, digits, `.`, `_`, `-`; at most 249),
/// or a regular expression subscription starting with `^`.
pub(super) fn check_kafka_topic(name: &str) -> Result<(), String> {
    if crate::source::subscription::is_template(name) {
        let example = crate::source::subscription::Date {
            year: 2026,
            month: 11,
            day: 25,
        }
        .fill(name);
        if example.contains('{') || example.contains('}') {
            return Err(format!(
                "`{name}`: a date template knows only {}",
                crate::source::subscription::PLACEHOLDERS.join(", ")
            ));
        }
        return check_kafka_topic(&example)
            .map_err(|e| format!("`{name}` gives a bad topic name: {e}"));
    }
    if let Some(pattern) = name.strip_prefix('^') {
        if pattern.is_empty() {
            return Err("a regular expression subscription needs a pattern after `^`".into());
        }
        return Ok(());
    }
    if name.is_empty() || name.len() > 249 {
        return Err(format!(
            "`{name}`: a Kafka topic name has 1 to 249 characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "`{name}`: a Kafka topic name has only letters, digits, `.`, `_` and `-` (start a regular expression with `^`)"
        ));
    }
    Ok(())
}
