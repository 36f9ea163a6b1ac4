//! The message as both engines' scripts see it: [`ScriptMessage`], built
//! cheaply per call, with the costly fields (the decoded alert above all)
//! made only when a script reads them, at most once per message; and
//! [`AlertRecord`], a value of the decoded alert.
//!
//! Invariants: the payload is shared, never copied, to build a message; a
//! payload that does not decode is a typed [`FieldError::NotAnAlert`], so
//! the error policy and `check` tell it from a script's own failure.

use std::sync::Arc;

use bytes::Bytes;

use crate::alert::avro::Value;
use crate::alert::{Alert, Decoder, Form, Survey};
use crate::envelope::Header;
use crate::hook::MessageView;

/// The message as a script sees it: cheap to build (reference-counted
/// clones), fields converted only when the script reads them, the alert
/// decoded at most once, on first use.
#[derive(Debug, Clone)]
pub struct ScriptMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Arc<[Header]>,
    pub payload: Bytes,
    /// The Kafka value was null (a tombstone), not empty.
    pub tombstone: bool,
    /// A replayed alert's archive file and member name.
    pub archive: Option<(Arc<str>, String)>,
    decoder: Arc<Decoder>,
    form: std::sync::OnceLock<Result<Form, FieldError>>,
    alert: std::sync::OnceLock<Result<AlertRecord, FieldError>>,
}

/// Why a field of the message or its alert cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FieldError {
    /// The payload (or the part of it that holds the field) does not decode.
    #[error("the payload does not decode as an alert: {0}")]
    NotAnAlert(String),
    /// The record has no such field (schemas differ by version).
    #[error("record `{record}` has no field `{field}`")]
    NoField { record: String, field: String },
}

/// A value of a decoded alert, as scripts hold it: the alert (shared) and
/// which value; in practice a record, or a field just read from one.
#[derive(Debug, Clone)]
pub struct AlertRecord {
    pub alert: Arc<Alert>,
    pub value: Value,
    /// For the root of a head-only decode: the whole alert, decoded when a
    /// field past the head is first read.
    rest: Option<Arc<Rest>>,
}

/// The rest of a head-only decoded alert, decoded at most once, on demand.
#[derive(Debug)]
struct Rest {
    decoder: Arc<Decoder>,
    payload: Bytes,
    form: Form,
    whole: std::sync::OnceLock<Result<Arc<Alert>, FieldError>>,
}

impl Rest {
    fn whole(&self) -> Result<AlertRecord, FieldError> {
        match self.whole.get_or_init(|| {
            self.decoder
                .decode_as(&self.payload, &self.form)
                .map(Arc::new)
                .map_err(|e| FieldError::NotAnAlert(e.to_string()))
        }) {
            Ok(alert) => Ok(AlertRecord {
                alert: Arc::clone(alert),
                value: alert.root(),
                rest: None,
            }),
            Err(e) => Err(e.clone()),
        }
    }
}

impl AlertRecord {
    /// A field's value (in the alert it belongs to); an error names the
    /// record and the field when the record has no such field, or why the
    /// part of the alert that holds it does not decode.
    ///
    /// # Errors
    /// The message for the script.
    pub fn get(&self, name: &str) -> Result<AlertRecord, FieldError> {
        if let Some(value) = self.alert.field(self.value, name) {
            return Ok(self.child(value));
        }
        if let Some(rest) = &self.rest {
            if self.alert.declares(self.value, name) {
                return rest.whole()?.get(name);
            }
        }
        Err(FieldError::NoField {
            record: self.alert.record_name(self.value).to_string(),
            field: name.to_string(),
        })
    }

    /// Whether the record has a field of this name (schemas differ by version).
    pub fn has(&self, name: &str) -> bool {
        self.alert.declares(self.value, name)
    }

    /// A child value of the same alert.
    pub fn child(&self, value: Value) -> AlertRecord {
        AlertRecord {
            alert: Arc::clone(&self.alert),
            value,
            rest: None,
        }
    }

    /// The value as JSON (the whole alert for the root).
    ///
    /// # Errors
    /// Why the rest of the alert does not decode.
    pub fn to_json(&self) -> Result<serde_json::Value, FieldError> {
        match &self.rest {
            Some(rest) => Ok(rest.whole()?.to_json()?),
            None => Ok(self.alert.to_json(self.value)),
        }
    }
}

impl ScriptMessage {
    pub fn new(view: &MessageView<'_>, decoder: &Arc<Decoder>) -> ScriptMessage {
        ScriptMessage {
            decoder: Arc::clone(decoder),
            form: std::sync::OnceLock::new(),
            alert: std::sync::OnceLock::new(),
            topic: Arc::clone(view.topic_shared()),
            partition: view.partition(),
            offset: view.offset(),
            timestamp_ms: view.timestamp_ms(),
            key: view.key().map(Bytes::copy_from_slice),
            headers: if view.headers().is_empty() {
                no_headers()
            } else {
                Arc::from(view.headers())
            },
            payload: view.payload().clone(),
            tombstone: view.tombstone(),
            archive: view
                .archive()
                .map(|m| (Arc::clone(&m.file), m.name.clone())),
        }
    }

    /// The survey, from the payload's form.
    pub fn survey(&self) -> Survey {
        self.form().map_or(Survey::Unknown, Form::survey)
    }

    /// The payload's form (container schema or wire-format id), looked up
    /// once per message for `survey` and `alert` both.
    fn form(&self) -> Result<&Form, FieldError> {
        self.form
            .get_or_init(|| {
                self.decoder
                    .form(&self.payload)
                    .map_err(|e| FieldError::NotAnAlert(e.to_string()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The Confluent wire-format schema id (Rubin), from the header alone.
    pub fn schema_id(&self) -> Option<u32> {
        crate::alert::wire_schema_id(&self.payload)
    }

    /// The alert's schema version: from the header for Rubin (`9.0`), from
    /// the decoded `schemavsn` field for ZTF.
    ///
    /// # Errors
    /// Why the payload does not decode.
    pub fn schema_version(&self) -> Result<Option<String>, FieldError> {
        if let Some(id) = self.schema_id() {
            return Ok(Some(crate::alert::rubin_version(id)));
        }
        let alert = self.alert()?;
        Ok(match alert.get("schemavsn") {
            Ok(AlertRecord {
                alert,
                value: Value::Str(s),
                ..
            }) => alert.text(s).ok().map(str::to_string),
            _ => None,
        })
    }

    /// The decoded alert record, decoded on the first call only.
    ///
    /// # Errors
    /// Why the payload does not decode, for the error policy.
    pub fn alert(&self) -> Result<AlertRecord, FieldError> {
        self.alert
            .get_or_init(|| {
                let form = self.form()?;
                let head = self
                    .decoder
                    .decode_head_as(&self.payload, form)
                    .map(Arc::new)
                    .map_err(|e| FieldError::NotAnAlert(e.to_string()))?;
                let rest = (!head.is_complete()).then(|| {
                    Arc::new(Rest {
                        decoder: Arc::clone(&self.decoder),
                        payload: self.payload.clone(),
                        form: form.clone(),
                        whole: std::sync::OnceLock::new(),
                    })
                });
                Ok(AlertRecord {
                    value: head.root(),
                    alert: head,
                    rest,
                })
            })
            .clone()
    }

    /// The key as text, if it is valid UTF-8.
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_ref()
            .and_then(|k| std::str::from_utf8(k).ok().map(str::to_string))
    }
}

/// One shared empty header list, so a message without headers allocates none.
fn no_headers() -> Arc<[Header]> {
    static EMPTY: std::sync::OnceLock<Arc<[Header]>> = std::sync::OnceLock::new();
    Arc::clone(EMPTY.get_or_init(|| Arc::from(Vec::new())))
}
