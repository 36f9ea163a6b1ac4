//! Pub/Sub attributes: Kafka metadata and headers, the hook's additions, and
//! Pub/Sub's limits on them.
//!
//! Invariant: no attribute set built here breaks Pub/Sub's limits
//! (<https://cloud.google.com/pubsub/quotas#resource_limits>). What would is
//! never sent as it is:
//! - a Kafka key or header that breaks a limit is *omitted*, and its name is
//!   listed in the `ztfhook.omitted` attribute (the message itself is still
//!   published, its payload untouched);
//! - a hook attribute that breaks a limit is an *error* for that message, for
//!   the error policy to handle, because the hook's author must hear of it.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::config::AttributeOptions;
use crate::envelope::Envelope;

/// Pub/Sub's limit on attributes per message.
pub const MAX_ATTRIBUTES: usize = 100;
/// Pub/Sub's limit on an attribute key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Pub/Sub's limit on an attribute value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Pub/Sub's limit on one message (data, attributes, ordering key), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 10_000_000;

/// Lists the Kafka key or header names left out because they break a limit.
pub const OMITTED: &str = "ztfhook.omitted";
/// On a dead-lettered message: why it could not be published where it was going.
pub const ERROR: &str = "ztfhook.error";
/// On a dead-lettered message: the topic it was going to.
pub const DESTINATION: &str = "ztfhook.destination";
/// On a published Kafka tombstone (a null value): `"true"`.
pub const TOMBSTONE: &str = "ztfhook.tombstone";

/// The names Google's Kafka Connect sink uses, so downstream code keeps working.
pub const KAFKA_TOPIC: &str = "kafka.topic";
pub const KAFKA_PARTITION: &str = "kafka.partition";
pub const KAFKA_OFFSET: &str = "kafka.offset";
pub const KAFKA_TIMESTAMP: &str = "kafka.timestamp";
pub const KEY: &str = "key";
/// On a replayed alert, in place of the `kafka.*` four: the archive's file
/// name, the member's name in it, and the topic the replay gave it.
pub const ARCHIVE_FILE: &str = "archive.file";
pub const ARCHIVE_MEMBER: &str = "archive.member";
pub const ARCHIVE_TOPIC: &str = "archive.topic";

/// How an attribute breaks Pub/Sub's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("attribute key is empty")]
    EmptyKey,
    #[error("attribute key `{0}` is {1} bytes, over Pub/Sub's 256")]
    KeyTooLong(String, usize),
    #[error("attribute key `{0}` starts with `goog`, which Pub/Sub reserves")]
    ReservedKey(String),
    #[error("attribute `{0}` has a {1}-byte value, over Pub/Sub's 1024")]
    ValueTooLong(String, usize),
    #[error("{0} attributes, over Pub/Sub's 100")]
    TooMany(usize),
}

/// Checks one attribute against Pub/Sub's limits.
///
/// # Errors
/// The first [`Violation`] found.
pub fn check(key: &str, value: &str) -> Result<(), Violation> {
    if key.is_empty() {
        return Err(Violation::EmptyKey);
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Violation::KeyTooLong(shorten(key), key.len()));
    }
    if key.as_bytes()[..key.len().min(4)].eq_ignore_ascii_case(b"goog") {
        return Err(Violation::ReservedKey(shorten(key)));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(Violation::ValueTooLong(shorten(key), value.len()));
    }
    Ok(())
}

/// A key cut to 64 bytes at a character boundary, for messages.
fn shorten(key: &str) -> String {
    let mut end = key.len().min(64);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    if end < key.len() {
        format!("{}...", &key[..end])
    } else {
        key.to_string()
    }
}

/// The attributes of one outgoing message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub map: HashMap<String, String>,
    /// How many Kafka key/header attributes were left out (listed in `ztfhook.omitted`).
    pub omitted: usize,
}

impl Attributes {
    /// Bytes these attributes add to a message's size.
    pub fn size(&self) -> usize {
        self.map.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// Builds attributes: Kafka metadata, then the hook's, then Kafka headers.
///
/// # Errors
/// A [`Violation`] if a hook attribute breaks a limit, or if the hook's
/// attributes and the metadata together are over 100.
pub fn build(
    options: &AttributeOptions,
    envelope: &Envelope,
    hook: &[(String, String)],
) -> Result<Attributes, Violation> {
    let mut out = Attributes::default();
    let mut omitted: Vec<&str> = Vec::new();
    if options.kafka_metadata {
        let map = &mut out.map;
        map.reserve(5 + hook.len());
        if let Some(member) = &envelope.archive {
            // A replay: where the alert came from, and no Kafka values it never had.
            map.insert(ARCHIVE_FILE.to_string(), member.file.to_string());
            map.insert(ARCHIVE_MEMBER.to_string(), member.name.clone());
            map.insert(ARCHIVE_TOPIC.to_string(), envelope.topic.to_string());
            for (k, v) in [
                (ARCHIVE_FILE, member.file.len()),
                (ARCHIVE_MEMBER, member.name.len()),
            ] {
                if v > MAX_VALUE_BYTES {
                    map.remove(k);
                    omitted.push(k);
                }
            }
        } else {
            map.insert(KAFKA_TOPIC.to_string(), envelope.topic.to_string());
            map.insert(KAFKA_PARTITION.to_string(), envelope.partition.to_string());
            map.insert(KAFKA_OFFSET.to_string(), envelope.offset.to_string());
            if let Some(ts) = envelope.timestamp_ms {
                map.insert(KAFKA_TIMESTAMP.to_string(), ts.to_string());
            }
            if let Some(key) = &envelope.key {
                match std::str::from_utf8(key) {
                    Ok(k) if k.len() <= MAX_VALUE_BYTES => {
                        map.insert(KEY.to_string(), k.to_string());
                    }
                    _ => omitted.push(KEY),
                }
            }
        }
    }
    for (k, v) in hook {
        check(k, v)?;
        out.map.insert(k.clone(), v.clone());
    }
    if envelope.tombstone {
        out.map.insert(TOMBSTONE.to_string(), "true".to_string());
    }
    if out.map.len() > MAX_ATTRIBUTES {
        return Err(Violation::TooMany(out.map.len()));
    }
    if options.headers {
        for h in &envelope.headers {
            // One slot stays free for `ztfhook.omitted`.
            let room = out.map.len() < MAX_ATTRIBUTES - 1 || out.map.contains_key(&h.name);
            let value = match &h.value {
                None => Some(""),
                Some(v) => std::str::from_utf8(v).ok(),
            };
            match value {
                Some(v) if room && check(&h.name, v).is_ok() && h.name != OMITTED => {
                    out.map.insert(h.name.clone(), v.to_string());
                }
                _ => omitted.push(&h.name),
            }
        }
    }
    if !omitted.is_empty() {
        out.omitted = omitted.len();
        let mut list = String::new();
        for name in omitted {
            let sep = usize::from(!list.is_empty());
            if list.len() + sep + name.len() > MAX_VALUE_BYTES {
                break;
            }
            if sep == 1 {
                list.push(',');
            }
            let _ = write!(list, "{name}");
        }
        out.map.insert(OMITTED.to_string(), list);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Header;
    use bytes::Bytes;
    use std::sync::Arc;

    fn envelope() -> Envelope {
        Envelope {
            topic: Arc::from("ztf_20261125_programid1"),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_764_000_000_000),
            key: None,
            headers: Vec::new(),
            payload: Bytes::from_static(b"Obj\x01"),
            ..Default::default()
        }
    }

    const ALL: AttributeOptions = AttributeOptions {
        kafka_metadata: true,
        headers: true,
    };

    fn assert_within_limits(a: &Attributes) {
        assert!(a.map.len() <= MAX_ATTRIBUTES, "{} attributes", a.map.len());
        for (k, v) in &a.map {
            check(k, v).unwrap();
        }
    }

    #[test]
    fn metadata_uses_the_kafka_connect_names() {
        let mut e = envelope();
        e.key = Some(Bytes::from_static(b"ZTF18abfkwnk"));
        let a = build(&ALL, &e, &[]).unwrap();
        let expected: HashMap<String, String> = [
            ("kafka.topic", "ztf_20261125_programid1"),
            ("kafka.partition", "3"),
            ("kafka.offset", "42"),
            ("kafka.timestamp", "1764000000000"),
            ("key", "ZTF18abfkwnk"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(a.map, expected);
        assert_eq!(a.omitted, 0);
    }

    #[test]
    fn null_key_and_missing_timestamp_give_no_attribute() {
        let mut e = envelope();
        e.timestamp_ms = None;
        let a = build(&ALL, &e, &[]).unwrap();
        assert!(!a.map.contains_key("key"));
        assert!(!a.map.contains_key("kafka.timestamp"));
    }

    #[test]
    fn metadata_can_be_turned_off() {
        let off = AttributeOptions {
            kafka_metadata: false,
            headers: false,
        };
        assert!(build(&off, &envelope(), &[]).unwrap().map.is_empty());
    }

    #[test]
    fn headers_breaking_limits_are_omitted_and_listed() {
        let mut e = envelope();
        let long_key = "h".repeat(257);
        e.headers = vec![
            Header {
                name: "schema".into(),
                value: Some(Bytes::from_static(b"3.3")),
            },
            Header {
                name: long_key.clone(),
                value: Some(Bytes::from_static(b"x")),
            },
            Header {
                name: "googtrace".into(),
                value: Some(Bytes::from_static(b"x")),
            },
            Header {
                name: "big".into(),
                value: Some(Bytes::from(vec![b'v'; 1025])),
            },
            Header {
                name: "binary".into(),
                value: Some(Bytes::from_static(&[0xff, 0xfe])),
            },
            Header {
                name: "null".into(),
                value: None,
            },
        ];
        e.key = Some(Bytes::from(vec![b'k'; 2000]));
        let a = build(&ALL, &e, &[]).unwrap();
        assert_within_limits(&a);
        assert_eq!(a.map["schema"], "3.3");
        assert_eq!(a.map["null"], "");
        assert_eq!(a.omitted, 5);
        assert_eq!(
            a.map[OMITTED],
            format!("key,{long_key},googtrace,big,binary")
        );
        assert_eq!(a.map["kafka.offset"], "42");
    }

    #[test]
    fn headers_beyond_one_hundred_attributes_are_omitted() {
        let mut e = envelope();
        e.headers = (0..150)
            .map(|i| Header {
                name: format!("h{i}"),
                value: Some(Bytes::from_static(b"1")),
            })
            .collect();
        let a = build(&ALL, &e, &[]).unwrap();
        assert_within_limits(&a);
        assert_eq!(a.map.len(), MAX_ATTRIBUTES);
        assert_eq!(a.omitted, 150 - (MAX_ATTRIBUTES - 1 - 4));
        assert!(a.map.contains_key("h0") && !a.map.contains_key("h149"));
        assert!(a.map[OMITTED].len() <= MAX_VALUE_BYTES);
    }

    #[test]
    fn omitted_list_is_cut_to_the_value_limit() {
        let mut e = envelope();
        e.headers = (0..60)
            .map(|i| Header {
                name: format!("{i:0>200}"),
                value: Some(Bytes::from(vec![b'v'; 2000])),
            })
            .collect();
        let a = build(&ALL, &e, &[]).unwrap();
        assert_within_limits(&a);
        assert_eq!(a.omitted, 60);
    }

    #[test]
    fn hook_attribute_breaking_a_limit_is_an_error_naming_it() {
        let e = envelope();
        let v = build(&ALL, &e, &[("rb".into(), "x".repeat(2000))]).unwrap_err();
        assert_eq!(v, Violation::ValueTooLong("rb".into(), 2000));
        assert!(v.to_string().contains("`rb` has a 2000-byte value"));
        let v = build(&ALL, &e, &[("goog-x".into(), "1".into())]).unwrap_err();
        assert!(matches!(v, Violation::ReservedKey(_)));
        let v = build(&ALL, &e, &[(String::new(), "1".into())]).unwrap_err();
        assert_eq!(v, Violation::EmptyKey);
    }

    #[test]
    fn hook_returning_too_many_attributes_is_an_error() {
        let many: Vec<_> = (0..101)
            .map(|i| (format!("a{i}"), "1".to_string()))
            .collect();
        let off = AttributeOptions {
            kafka_metadata: false,
            headers: false,
        };
        assert_eq!(
            build(&off, &envelope(), &many).unwrap_err(),
            Violation::TooMany(101)
        );
        assert!(build(&off, &envelope(), &many[..100]).is_ok());
    }

    #[test]
    fn hook_attributes_override_metadata_of_the_same_name() {
        let a = build(
            &ALL,
            &envelope(),
            &[("kafka.topic".into(), "renamed".into())],
        )
        .unwrap();
        assert_eq!(a.map["kafka.topic"], "renamed");
    }
}
