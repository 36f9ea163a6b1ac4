//! Alert payloads: which survey a payload is from, and its decoded content.
//!
//! Two wire forms:
//! - ZTF: an Avro Object Container File (`Obj\x01`), one record, the
//!   writer's schema embedded. The embedded schema is followed, so every
//!   version decodes; parsed schemas are cached by their text, so a stream
//!   of alerts with one schema parses it once.
//! - Rubin (LSST): Confluent wire format: byte 0, a 4-byte big-endian schema
//!   id, schemaless Avro. The id is read without decoding; its schema comes
//!   from [`SchemaSources`].
//!
//! Invariants: the survey is known from the payload's form alone (the
//! container's schema name for ZTF, the header for Rubin); decoding copies no
//! strings or bytes out of the payload; bad payloads are errors naming what
//! was wrong, never panics. A head-only decode ([`Decoder::decode_head`])
//! reads the root fields before the first that can hold an array or a map;
//! its other root fields read as absent, never as a wrong value; a
//! wire-format schema is used for it only after it decoded a whole alert.

pub mod avro;
pub mod bigquery;
pub mod schemas;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value as Json;

use crate::alert::avro::{AvroError, Decoded, Schema, Span, Value};
pub use crate::alert::schemas::SchemaSources;
use crate::alert::schemas::SchemaStore;

/// The survey a payload comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survey {
    Ztf,
    Lsst,
    Unknown,
}

impl Survey {
    /// The survey a container's schema belongs to, by the root record's name.
    fn of_schema(schema: &Schema) -> Survey {
        match schema.name() {
            Some(n) if n.starts_with("ztf") => Survey::Ztf,
            Some(n) if n.starts_with("lsst") => Survey::Lsst,
            _ => Survey::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Survey::Ztf => "ztf",
            Survey::Lsst => "lsst",
            Survey::Unknown => "unknown",
        }
    }
}

/// The first bytes of an Avro Object Container File.
const CONTAINER_MAGIC: &[u8] = b"Obj\x01";

/// Whether a payload has an alert's framing (an Avro container, or
/// Confluent's wire format), without decoding it.
pub fn is_framed(payload: &[u8]) -> bool {
    payload.starts_with(CONTAINER_MAGIC) || (payload.len() > 5 && payload[0] == 0)
}

/// The schema id of a Confluent wire-format payload, from its header.
pub fn wire_schema_id(payload: &[u8]) -> Option<u32> {
    match payload {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The schema version a Rubin schema id stands for (`900` is `9.0`).
pub fn rubin_version(schema_id: u32) -> String {
    format!("{}.{}", schema_id / 100, schema_id % 100)
}

/// Most distinct container schemas kept at once.
const MAX_CONTAINER_SCHEMAS: usize = 32;

/// Decodes payloads; shared by every worker.
pub struct Decoder {
    /// Container schemas by their exact text.
    containers: Mutex<Vec<(Bytes, Arc<Schema>)>>,
    wire: SchemaStore,
    /// Wire-format schema ids whose schema has decoded a whole alert to its
    /// last byte: only those are trusted for head-only decoding.
    verified: Mutex<std::collections::HashSet<u32>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(SchemaSources::default())
    }
}

/// A container's header: its schema text and where the first block's data
/// starts.
struct Container<'a> {
    schema: &'a [u8],
    data: usize,
}

fn container(payload: &[u8]) -> Result<Container<'_>, AvroError> {
    let mut pos = CONTAINER_MAGIC.len();
    let mut schema = None;
    let mut codec: &[u8] = b"null";
    let bytes = |pos: &mut usize| -> Result<&[u8], AvroError> {
        let n = avro::read_long(payload, pos)?;
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= payload.len() - *pos)
            .ok_or_else(|| AvroError(format!("container header: bad length {n}")))?;
        let s = &payload[*pos..*pos + n];
        *pos += n;
        Ok(s)
    };
    loop {
        let mut n = avro::read_long(payload, &mut pos)?;
        if n == 0 {
            break;
        }
        if n < 0 {
            avro::read_long(payload, &mut pos)?;
            n = -n;
        }
        for _ in 0..n {
            let key = bytes(&mut pos)?;
            let value = bytes(&mut pos)?;
            match key {
                b"avro.schema" => schema = Some(value),
                b"avro.codec" => codec = value,
                _ => {}
            }
        }
    }
    if !codec.is_empty() && codec != b"null" {
        return Err(AvroError(format!(
            "container codec `{}` is not supported (ZTF alerts use null)",
            String::from_utf8_lossy(codec)
        )));
    }
    let Some(schema) = schema else {
        return Err(AvroError("container has no avro.schema".into()));
    };
    pos += 16; // sync marker
    if pos > payload.len() {
        return Err(AvroError("container ends inside its header".into()));
    }
    let records = avro::read_long(payload, &mut pos)?;
    avro::read_long(payload, &mut pos)?; // block size
    if records < 1 {
        return Err(AvroError("container holds no record".into()));
    }
    Ok(Container { schema, data: pos })
}

impl Decoder {
    pub fn new(sources: SchemaSources) -> Decoder {
        Decoder {
            containers: Mutex::new(Vec::new()),
            wire: SchemaStore::new(sources),
            verified: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The schema of a container, parsed once per distinct text.
    fn container_schema(&self, text: &[u8]) -> Result<Arc<Schema>, AvroError> {
        {
            let cache = self.containers.lock().expect("schema cache");
            if let Some((_, s)) = cache.iter().find(|(t, _)| t.as_ref() == text) {
                return Ok(Arc::clone(s));
            }
        }
        let text_str = std::str::from_utf8(text)
            .map_err(|_| AvroError("container schema is not UTF-8".into()))?;
        let schema = Arc::new(avro::parse_schema(text_str, &mut |_| None)?);
        let mut cache = self.containers.lock().expect("schema cache");
        if cache.len() >= MAX_CONTAINER_SCHEMAS {
            cache.remove(0);
        }
        cache.push((Bytes::copy_from_slice(text), Arc::clone(&schema)));
        Ok(schema)
    }

    /// The survey, from the payload's form: a container whose schema is
    /// named `ztf.*` or `lsst.*`, or Rubin's wire format.
    pub fn survey(&self, payload: &[u8]) -> Survey {
        self.form(payload).map_or(Survey::Unknown, |f| f.survey())
    }

    /// A payload's form, from its first bytes: a container (its header read
    /// and its schema looked up, parsed on first sight) or the wire format.
    ///
    /// # Errors
    /// [`AvroError`] if it is neither, or the container's header or schema
    /// is bad.
    pub fn form(&self, payload: &[u8]) -> Result<Form, AvroError> {
        if payload.starts_with(CONTAINER_MAGIC) {
            let c = container(payload)?;
            return Ok(Form::Container {
                schema: self.container_schema(c.schema)?,
                data: c.data,
            });
        }
        if let Some(id) = wire_schema_id(payload) {
            return Ok(Form::Wire(id));
        }
        let head: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        Err(AvroError(format!(
            "not an alert: {} bytes starting {} (expected an Avro container `Obj\\x01` or the Confluent wire format's 0x00)",
            payload.len(),
            head.join(" ")
        )))
    }

    /// The schema a payload is written with (a container's own, or the
    /// wire format's id looked up), without decoding it.
    ///
    /// # Errors
    /// As [`Decoder::decode`].
    pub fn schema_of(&self, payload: &[u8]) -> Result<Arc<Schema>, AvroError> {
        match self.form(payload)? {
            Form::Container { schema, .. } => Ok(schema),
            Form::Wire(id) => self.wire.get(id),
        }
    }

    /// Decodes a payload's alert record.
    ///
    /// # Errors
    /// [`AvroError`] saying why: not an alert form, a schema that can't be
    /// found or parsed, bad data.
    pub fn decode(&self, payload: &Bytes) -> Result<Alert, AvroError> {
        self.decode_as(payload, &self.form(payload)?)
    }

    /// [`Decoder::decode`] of a payload whose form is known.
    ///
    /// # Errors
    /// As [`Decoder::decode`].
    pub fn decode_as(&self, payload: &Bytes, form: &Form) -> Result<Alert, AvroError> {
        self.read(payload, form, false)
    }

    /// Decodes only the alert's head: the root fields before the first one
    /// that holds an array or a map ([`Schema::head_fields`]): ZTF's
    /// `candidate` without the `prv_candidates` after it, Rubin's
    /// `diaSource` without the histories. [`Decoder::decode`] then gives
    /// the rest, when it is needed. A wire-format schema is trusted for this
    /// only once it has decoded a whole alert to its last byte; until then
    /// the whole alert is decoded (and returned).
    ///
    /// # Errors
    /// As [`Decoder::decode`], for the part decoded.
    pub fn decode_head(&self, payload: &Bytes) -> Result<Alert, AvroError> {
        self.decode_head_as(payload, &self.form(payload)?)
    }

    /// [`Decoder::decode_head`] of a payload whose form is known.
    ///
    /// # Errors
    /// As [`Decoder::decode`], for the part decoded.
    pub fn decode_head_as(&self, payload: &Bytes, form: &Form) -> Result<Alert, AvroError> {
        self.read(payload, form, true)
    }

    fn read(&self, payload: &Bytes, form: &Form, head_only: bool) -> Result<Alert, AvroError> {
        let (schema, start, id) = match *form {
            Form::Container { ref schema, data } => (Arc::clone(schema), data, None),
            Form::Wire(id) => (self.wire.get(id)?, 5, Some(id)),
        };
        // A container's schema is its writer's own; a wire-format one is
        // trusted for a head once it has decoded a whole alert.
        let trusted = head_only
            && id.is_none_or(|id| {
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
            });
        let head = trusted.then(|| head_of(&schema)).flatten();
        let named = |e: AvroError| match id {
            Some(id) => AvroError(format!("schema id {id}: {e}")),
            None => e,
        };
        let mut decoded = Decoded::default();
        if head.is_some() {
            decoded.arena.reserve(256);
            avro::decode_head(&schema, payload, start, &mut decoded).map_err(named)?;
        } else {
            decoded.arena.reserve(4096);
            let end = avro::decode(&schema, payload, start, &mut decoded).map_err(named)?;
            if let Some(id) = id {
                if end != payload.len() {
                    return Err(named(AvroError(format!(
                        "{} bytes left over after the alert (wrong schema?)",
                        payload.len() - end
                    ))));
                }
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
            }
        }
        Alert::new(payload.clone(), schema, decoded, form.survey(), id, head)
    }
}

/// A payload's form, known from its first bytes without decoding the alert.
#[derive(Debug, Clone)]
pub enum Form {
    /// An Avro container file: its parsed schema, and where the datum starts.
    Container { schema: Arc<Schema>, data: usize },
    /// Confluent's wire format, with this schema id.
    Wire(u32),
}

impl Form {
    /// The survey: by the container schema's name, or Rubin for the wire
    /// format.
    pub fn survey(&self) -> Survey {
        match self {
            Form::Container { schema, .. } => Survey::of_schema(schema),
            Form::Wire(_) => Survey::Lsst,
        }
    }
}

/// How many root fields a head decode of `schema` reads, when that leaves
/// some out (`None`: the head is the whole root, a head decode is a whole
/// one).
fn head_of(schema: &Schema) -> Option<usize> {
    match schema.root {
        avro::Node::Record(id) if schema.head_fields < schema.records[id as usize].fields.len() => {
            Some(schema.head_fields)
        }
        _ => None,
    }
}

/// A decoded alert: the payload, its schema and the decoded values.
#[derive(Debug)]
pub struct Alert {
    payload: Bytes,
    schema: Arc<Schema>,
    decoded: Decoded,
    root: Value,
    pub survey: Survey,
    /// The wire-format schema id (Rubin).
    pub schema_id: Option<u32>,
    /// For a head-only decode ([`Decoder::decode_head`]): how many of the
    /// root's fields were decoded. The others read as absent.
    head: Option<usize>,
}

impl Alert {
    fn new(
        payload: Bytes,
        schema: Arc<Schema>,
        decoded: Decoded,
        survey: Survey,
        schema_id: Option<u32>,
        head: Option<usize>,
    ) -> Result<Alert, AvroError> {
        let root = decoded
            .root
            .ok_or_else(|| AvroError("nothing decoded".into()))?;
        Ok(Alert {
            payload,
            schema,
            decoded,
            root,
            survey,
            schema_id,
            head,
        })
    }

    /// The schema the alert was decoded with.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Whether every field was decoded (not a head-only decode).
    pub fn is_complete(&self) -> bool {
        self.head.is_none()
    }

    /// Whether a record's type has a field of this name, decoded or not.
    pub fn declares(&self, record: Value, name: &str) -> bool {
        match record {
            Value::Record(id, _) => self.schema.records[id as usize].field(name).is_some(),
            _ => false,
        }
    }

    /// How many of a record's fields were decoded.
    fn decoded_fields(&self, record: Value) -> usize {
        match self.head {
            Some(n) if record == self.root => n,
            _ => usize::MAX,
        }
    }

    /// The alert record.
    pub fn root(&self) -> Value {
        self.root
    }

    /// The record type's full name of a record value.
    pub fn record_name(&self, record: Value) -> &str {
        match record {
            Value::Record(id, _) => &self.schema.records[id as usize].name,
            _ => "",
        }
    }

    /// A field of a record value; `None` if the record has no such field.
    pub fn field(&self, record: Value, name: &str) -> Option<Value> {
        let Value::Record(id, first) = record else {
            return None;
        };
        let i = self.schema.records[id as usize].field(name)?;
        if i >= self.decoded_fields(record) {
            return None;
        }
        Some(self.decoded.arena[first as usize + i])
    }

    /// A record's field names and values, in schema order.
    pub fn fields(&self, record: Value) -> impl Iterator<Item = (&str, Value)> + '_ {
        let (def, first) = match record {
            Value::Record(id, first) => (Some(&self.schema.records[id as usize]), first),
            _ => (None, 0),
        };
        let decoded = self.decoded_fields(record);
        def.into_iter().flat_map(move |d| {
            d.fields
                .iter()
                .take(decoded)
                .enumerate()
                .map(move |(i, f)| (&*f.name, self.decoded.arena[first as usize + i]))
        })
    }

    /// The items of an array value.
    pub fn items(&self, array: Value) -> &[Value] {
        match array {
            Value::Array(start, len) => &self.decoded.arena[start as usize..(start + len) as usize],
            _ => &[],
        }
    }

    /// The entries of a map value, as (key, value).
    pub fn entries(&self, map: Value) -> impl Iterator<Item = (Value, Value)> + '_ {
        let slice = match map {
            Value::Map(start, len) => {
                &self.decoded.arena[start as usize..(start + 2 * len) as usize]
            }
            _ => &[],
        };
        slice.chunks_exact(2).map(|kv| (kv[0], kv[1]))
    }

    /// A string value's text.
    ///
    /// # Errors
    /// [`AvroError`] if it is not UTF-8.
    pub fn text(&self, span: Span) -> Result<&str, AvroError> {
        std::str::from_utf8(span.of(&self.payload))
            .map_err(|_| AvroError(format!("a string at byte {} is not UTF-8", span.start)))
    }

    /// A bytes value's bytes, shared with the payload (no copy).
    pub fn bytes(&self, span: Span) -> Bytes {
        self.payload
            .slice(span.start as usize..(span.start + span.len) as usize)
    }

    /// An enum value's symbol.
    pub fn symbol(&self, enum_id: u32, index: u32) -> &str {
        &self.schema.enums[enum_id as usize][index as usize]
    }

    /// A value as JSON. Bytes become `{"bytes": N}`, their length: they are
    /// cutout images, not text.
    pub fn to_json(&self, value: Value) -> Json {
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Int(i) => Json::from(i),
            Value::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
            Value::Str(s) => match self.text(s) {
                Ok(t) => Json::from(t),
                Err(_) => Json::from(String::from_utf8_lossy(s.of(&self.payload)).into_owned()),
            },
            Value::Bytes(s) => serde_json::json!({ "bytes": s.len }),
            Value::Enum(e, i) => Json::from(self.symbol(e, i)),
            Value::Record(..) => Json::Object(
                self.fields(value)
                    .map(|(k, v)| (k.to_string(), self.to_json(v)))
                    .collect(),
            ),
            Value::Array(..) => {
                Json::Array(self.items(value).iter().map(|v| self.to_json(*v)).collect())
            }
            Value::Map(..) => Json::Object(
                self.entries(value)
                    .map(|(k, v)| {
                        let key = match k {
                            Value::Str(s) => {
                                String::from_utf8_lossy(s.of(&self.payload)).into_owned()
                            }
                            _ => String::new(),
                        };
                        (key, self.to_json(v))
                    })
                    .collect(),
            ),
        }
    }

    /// A field found by a dotted path (`candidate.rb`), if every step exists
    /// and is a record.
    pub fn path(&self, path: &str) -> Option<Value> {
        let mut v = self.root;
        for step in path.split('.') {
            v = self.field(v, step)?;
        }
        Some(v)
    }
}
