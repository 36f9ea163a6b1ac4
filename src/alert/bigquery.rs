//! The BigQuery-ready JSON form of an alert, and the BigQuery table schema
//! that matches it, both made from the alert's own Avro schema.
//!
//! Invariants (the writer and the schema printer follow the same rules, in
//! [`kept`] and [`column_type`], so every alert of a schema converts to JSON
//! its printed schema accepts):
//! - field names are the schema's; records are `RECORD`, arrays `REPEATED`,
//!   unions with null `NULLABLE`; maps are `REPEATED RECORD {key, value}`;
//! - image cutouts are dropped: every `bytes` or `fixed` field, and the
//!   alert's top-level `cutout*` fields (ZTF's cutout records);
//! - a `float` is written in its shortest form as a 32-bit number (`1.416`,
//!   not `1.4160000085830688`), a `double` in its shortest form as a 64-bit
//!   one, so both read back to the same bits; NaN and the infinities are
//!   `null` (JSON has neither), so float columns are always `NULLABLE`;
//! - 64-bit integers are written with every digit (`candid` and Rubin's ids
//!   are above 2^53);
//! - a null array is left out (BigQuery reads it as empty); the optional
//!   `kafka_*` columns come last.

use crate::alert::avro::{AvroError, Node, Schema, Value};
use crate::alert::Alert;

/// Where a message came from, for the optional `kafka_*` columns.
#[derive(Debug, Clone, Copy)]
pub struct KafkaColumns<'a> {
    pub topic: &'a str,
    /// `None` for a replayed archive member.
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub timestamp_ms: Option<i64>,
}

/// The names and types of the `kafka_*` columns, in order.
const KAFKA_COLUMNS: [(&str, &str, &str); 4] = [
    ("kafka_topic", "STRING", "REQUIRED"),
    ("kafka_partition", "INTEGER", "NULLABLE"),
    ("kafka_offset", "INTEGER", "NULLABLE"),
    ("kafka_timestamp_ms", "INTEGER", "NULLABLE"),
];

/// One column of a BigQuery table schema, as `bq mk --table` reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<Column>>,
}

/// Why a schema has no BigQuery table.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// The field path (`candidate.rb`), or `(root)`.
    pub path: String,
    pub message: String,
}

/// Whether a field is written (and has a column): not a cutout.
fn kept(node: &Node, name: &str, at_root: bool) -> bool {
    !(is_binary(node) || at_root && name.starts_with("cutout"))
}

/// Whether a node holds only binary data (or null): bytes, fixed, or a union
/// of them with null.
fn is_binary(node: &Node) -> bool {
    match node {
        Node::Bytes | Node::Fixed(_) => true,
        Node::Union(branches) => {
            branches
                .iter()
                .any(|b| matches!(b, Node::Bytes | Node::Fixed(_)))
                && branches
                    .iter()
                    .all(|b| matches!(b, Node::Bytes | Node::Fixed(_) | Node::Null))
        }
        _ => false,
    }
}

/// The BigQuery type and mode of a node, with its sub-fields for a record.
fn column_type(
    schema: &Schema,
    node: &Node,
    path: &str,
    depth: usize,
) -> Result<(&'static str, &'static str, Option<Vec<Column>>), SchemaError> {
    let fail = |message: String| SchemaError {
        path: if path.is_empty() {
            "(root)".into()
        } else {
            path.into()
        },
        message,
    };
    if depth > 32 {
        return Err(fail("nested too deep for a BigQuery table".into()));
    }
    Ok(match node {
        Node::Boolean => ("BOOLEAN", "REQUIRED", None),
        Node::Int | Node::Long => ("INTEGER", "REQUIRED", None),
        Node::Float | Node::Double => ("FLOAT", "NULLABLE", None),
        Node::String | Node::Enum(_) => ("STRING", "REQUIRED", None),
        Node::Record(id) => (
            "RECORD",
            "REQUIRED",
            Some(record_columns(schema, *id, path, false, depth + 1)?),
        ),
        Node::Array(item) => {
            let (t, mode, sub) = column_type(schema, item, path, depth + 1)?;
            if mode == "REPEATED" {
                return Err(fail("an array of arrays has no BigQuery column".into()));
            }
            if mode == "NULLABLE" && !matches!(**item, Node::Float | Node::Double) {
                return Err(fail(
                    "an array of nullable items has no BigQuery column".into(),
                ));
            }
            (t, "REPEATED", sub)
        }
        Node::Map(value) => {
            let (t, mode, sub) = column_type(schema, value, path, depth + 1)?;
            let entry = vec![
                column("key", "STRING", "REQUIRED", None),
                column("value", t, mode, sub),
            ];
            ("RECORD", "REPEATED", Some(entry))
        }
        Node::Union(branches) => {
            let others: Vec<&Node> = branches.iter().filter(|b| **b != Node::Null).collect();
            let nullable = others.len() < branches.len();
            let node = match others.as_slice() {
                [one] => *one,
                [a, b] if is_number(a) && is_number(b) && is_float(a) == is_float(b) => *a,
                _ => {
                    return Err(fail(format!(
                        "a union of {} types has no BigQuery column",
                        others.len()
                    )))
                }
            };
            let (t, mode, sub) = column_type(schema, node, path, depth + 1)?;
            let mode = match mode {
                "REQUIRED" if nullable => "NULLABLE",
                m => m,
            };
            (t, mode, sub)
        }
        Node::Null => return Err(fail("a null-only field has no BigQuery column".into())),
        Node::Bytes | Node::Fixed(_) => unreachable!("binary fields are not kept"),
    })
}

fn is_number(node: &Node) -> bool {
    matches!(node, Node::Int | Node::Long | Node::Float | Node::Double)
}

fn is_float(node: &Node) -> bool {
    matches!(node, Node::Float | Node::Double)
}

fn column(
    name: &str,
    kind: &'static str,
    mode: &'static str,
    fields: Option<Vec<Column>>,
) -> Column {
    Column {
        name: name.to_string(),
        kind,
        mode,
        fields,
    }
}

fn record_columns(
    schema: &Schema,
    id: u32,
    path: &str,
    at_root: bool,
    depth: usize,
) -> Result<Vec<Column>, SchemaError> {
    let mut columns = Vec::new();
    for f in &schema.records[id as usize].fields {
        if !kept(&f.node, &f.name, at_root) {
            continue;
        }
        let here = if path.is_empty() {
            f.name.to_string()
        } else {
            format!("{path}.{}", f.name)
        };
        let (t, mode, sub) = column_type(schema, &f.node, &here, depth)?;
        columns.push(column(&f.name, t, mode, sub));
    }
    Ok(columns)
}

/// The BigQuery table schema (the JSON `bq mk --table` takes: an array of
/// fields) of the JSON form of alerts of `schema`, with the `kafka_*`
/// columns if asked.
///
/// # Errors
/// [`SchemaError`] naming the field of a type BigQuery has no column for
/// (arrays of arrays, unions of several types; no alert schema has one).
pub fn table_schema(schema: &Schema, kafka_columns: bool) -> Result<Vec<Column>, SchemaError> {
    let Node::Record(id) = schema.root else {
        return Err(SchemaError {
            path: "(root)".into(),
            message: "the schema's root is not a record".into(),
        });
    };
    let mut columns = record_columns(schema, id, "", true, 0)?;
    if kafka_columns {
        for (name, t, mode) in KAFKA_COLUMNS {
            columns.push(column(name, t, mode, None));
        }
    }
    Ok(columns)
}

/// The table schema for a file: a schema (`.avsc`, with the record files
/// beside it) or an alert (its container's schema, or the wire format's
/// from `decoder`'s sources).
///
/// # Errors
/// A message naming the file and why it gives no table.
pub fn table_schema_of_file(
    path: &std::path::Path,
    decoder: &crate::alert::Decoder,
    kafka_columns: bool,
) -> Result<Vec<Column>, String> {
    let named = |e: String| format!("{}: {e}", path.display());
    let bytes = std::fs::read(path).map_err(|e| named(e.to_string()))?;
    let schema = if bytes.trim_ascii_start().starts_with(b"{") {
        std::sync::Arc::new(crate::alert::schemas::from_file(path).map_err(|e| e.0)?)
    } else {
        decoder.schema_of(&bytes).map_err(|e| {
            named(format!(
                "neither an Avro schema (.avsc) nor an alert: {}",
                e.0
            ))
        })?
    };
    table_schema(&schema, kafka_columns).map_err(|e| named(e.to_string()))
}

/// Writes the JSON form of a whole decoded alert to `out` (one object, no
/// newline), with the `kafka_*` columns if given, stopping once it has
/// written more than `limit` bytes.
///
/// # Errors
/// [`AvroError`] if the alert was decoded head-only, a string is not UTF-8,
/// an array holds a NaN or an infinity (BigQuery's arrays hold no null), or
/// the form is over `limit` bytes.
pub fn write_json(
    alert: &Alert,
    kafka: Option<&KafkaColumns<'_>>,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<(), AvroError> {
    if !alert.is_complete() {
        return Err(AvroError(
            "the JSON form needs the whole alert, not its head".into(),
        ));
    }
    let schema = &*alert.schema;
    let Node::Record(id) = schema.root else {
        return Err(AvroError("the schema's root is not a record".into()));
    };
    let start = out.len();
    let mut writer = Writer {
        alert,
        out,
        limit: start.saturating_add(limit),
    };
    writer.record(id, alert.root(), true)?;
    if let Some(k) = kafka {
        writer.out.pop(); // the record's '}'
        let first = writer.out.last() == Some(&b'{');
        if !first {
            writer.out.push(b',');
        }
        writer.out.extend_from_slice(b"\"kafka_topic\":");
        writer.string(k.topic);
        writer.out.extend_from_slice(b",\"kafka_partition\":");
        writer.optional_int(k.partition.map(i64::from));
        writer.out.extend_from_slice(b",\"kafka_offset\":");
        writer.optional_int(k.offset);
        writer.out.extend_from_slice(b",\"kafka_timestamp_ms\":");
        writer.optional_int(k.timestamp_ms);
        writer.out.push(b'}');
    }
    Ok(())
}

struct Writer<'a> {
    alert: &'a Alert,
    out: &'a mut Vec<u8>,
    /// The length `out` may not pass.
    limit: usize,
}

impl Writer<'_> {
    fn record(&mut self, id: u32, value: Value, at_root: bool) -> Result<(), AvroError> {
        let schema = &*self.alert.schema;
        let Value::Record(_, first) = value else {
            return Err(AvroError("a record's value is not a record".into()));
        };
        self.out.push(b'{');
        let mut any = false;
        for (i, f) in schema.records[id as usize].fields.iter().enumerate() {
            if !kept(&f.node, &f.name, at_root) {
                continue;
            }
            let v = self.alert.decoded.arena[first as usize + i];
            if v == Value::Null && holds_array(&f.node) {
                continue; // a null array: left out, read as empty
            }
            if any {
                self.out.push(b',');
            }
            any = true;
            self.string(&f.name);
            self.out.push(b':');
            self.value(&f.node, v)
                .map_err(|e| AvroError(format!("{}: {}", f.name, e.0)))?;
            self.check_size()?;
        }
        self.out.push(b'}');
        Ok(())
    }

    fn value(&mut self, node: &Node, v: Value) -> Result<(), AvroError> {
        match (node, v) {
            (Node::Union(branches), _) => match v {
                Value::Null => {
                    self.out.extend_from_slice(b"null");
                    Ok(())
                }
                _ => {
                    let branch = branch(branches, v)
                        .ok_or_else(|| AvroError("a value of no branch of its union".into()))?;
                    self.value(branch, v)
                }
            },
            (Node::Boolean, Value::Bool(b)) => {
                self.out
                    .extend_from_slice(if b { b"true" } else { b"false" });
                Ok(())
            }
            (Node::Int | Node::Long, Value::Int(i)) => {
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
                Ok(())
            }
            (Node::Float, Value::Float(f)) => {
                let f = f as f32;
                self.float(f, f.is_finite());
                Ok(())
            }
            (Node::Double, Value::Float(f)) => {
                self.float(f, f.is_finite());
                Ok(())
            }
            (Node::String, Value::Str(s)) => {
                let text = self.alert.text(s)?;
                self.string(text);
                Ok(())
            }
            (Node::Enum(_), Value::Enum(e, i)) => {
                let symbol = self.alert.symbol(e, i);
                self.string(symbol);
                Ok(())
            }
            (Node::Record(id), Value::Record(..)) => self.record(*id, v, false),
            (Node::Array(item), Value::Array(..)) => {
                self.out.push(b'[');
                for (n, x) in self.alert.items(v).iter().enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    if let Value::Float(f) = x {
                        if !f.is_finite() {
                            let what = if f.is_nan() { "NaN" } else { "an infinity" };
                            return Err(AvroError(format!(
                                "item {n} of an array is {what}: BigQuery's arrays hold no null"
                            )));
                        }
                    }
                    self.value(item, *x)?;
                    self.check_size()?;
                }
                self.out.push(b']');
                Ok(())
            }
            (Node::Map(value), Value::Map(..)) => {
                self.out.push(b'[');
                let entries: Vec<(Value, Value)> = self.alert.entries(v).collect();
                for (n, (k, x)) in entries.into_iter().enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    self.out.extend_from_slice(b"{\"key\":");
                    match k {
                        Value::Str(s) => {
                            let key = self.alert.text(s)?;
                            self.string(key);
                        }
                        _ => return Err(AvroError("a map key is not a string".into())),
                    }
                    self.out.extend_from_slice(b",\"value\":");
                    self.value(value, x)?;
                    self.out.push(b'}');
                }
                self.out.push(b']');
                Ok(())
            }
            _ => Err(AvroError(format!(
                "a value that does not match its schema ({node:?})"
            ))),
        }
    }

    /// A float in its shortest form for its width; `null` when not finite.
    fn float<F: ryu::Float>(&mut self, f: F, finite: bool) {
        if finite {
            self.out
                .extend_from_slice(ryu::Buffer::new().format_finite(f).as_bytes());
        } else {
            self.out.extend_from_slice(b"null");
        }
    }

    fn check_size(&self) -> Result<(), AvroError> {
        if self.out.len() > self.limit {
            return Err(AvroError(format!(
                "the JSON form is over {} bytes, Pub/Sub's limit on a message",
                self.limit
            )));
        }
        Ok(())
    }

    fn optional_int(&mut self, v: Option<i64>) {
        match v {
            Some(i) => self
                .out
                .extend_from_slice(itoa::Buffer::new().format(i).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn string(&mut self, s: &str) {
        serde_json::to_writer(&mut *self.out, s).expect("writing to a Vec does not fail");
    }
}

/// Whether a field's values are arrays or maps (or null): a REPEATED column.
fn holds_array(node: &Node) -> bool {
    match node {
        Node::Array(_) | Node::Map(_) => true,
        Node::Union(b) => b.iter().any(|n| matches!(n, Node::Array(_) | Node::Map(_))),
        _ => false,
    }
}

/// The branch of a union a decoded value belongs to. A number that fits a
/// 32-bit float takes a `float` branch before a `double` one, so that a
/// union of both keeps every bit.
fn branch(branches: &[Node], v: Value) -> Option<&Node> {
    if let Value::Float(f) = v {
        let fits = f64::from(f as f32).to_bits() == f.to_bits() || f.is_nan();
        let want =
            |n: &Node| matches!(n, Node::Float) && fits || matches!(n, Node::Double) && !fits;
        if let Some(n) = branches.iter().find(|n| want(n)) {
            return Some(n);
        }
        return branches.iter().find(|n| is_float(n));
    }
    branches.iter().find(|n| match (n, v) {
        (Node::Boolean, Value::Bool(_)) => true,
        (Node::Int | Node::Long, Value::Int(_)) => true,
        (Node::String, Value::Str(_)) => true,
        (Node::Bytes | Node::Fixed(_), Value::Bytes(_)) => true,
        (Node::Enum(a), Value::Enum(b, _)) => *a == b,
        (Node::Record(a), Value::Record(b, _)) => *a == b,
        (Node::Array(_), Value::Array(..)) => true,
        (Node::Map(_), Value::Map(..)) => true,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::avro::parse_schema;

    #[test]
    fn floats_are_written_in_their_shortest_form_and_nan_as_null() {
        let schema = parse_schema(
            r#"{"type":"record","name":"a","fields":[
                {"name":"f","type":"float"},{"name":"d","type":"double"},
                {"name":"n","type":["null","float"]},{"name":"big","type":"long"},
                {"name":"cutoutScience","type":["null","bytes"]},
                {"name":"hist","type":["null",{"type":"array","items":"double"}]}]}"#,
            &mut |_| None,
        )
        .unwrap();
        let columns = table_schema(&schema, false).unwrap();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["f", "d", "n", "big", "hist"]);
        assert_eq!(columns[4].mode, "REPEATED");
        assert_eq!(columns[3].kind, "INTEGER");
        assert_eq!(columns[0].mode, "NULLABLE");
    }

    #[test]
    fn a_union_of_float_and_double_keeps_the_branch_that_holds_every_bit() {
        let both = [Node::Float, Node::Double];
        assert_eq!(branch(&both, Value::Float(1.5)), Some(&Node::Float));
        assert_eq!(branch(&both, Value::Float(0.1)), Some(&Node::Double));
        assert_eq!(
            branch(&both, Value::Float(f64::from(1.416_f32))),
            Some(&Node::Float)
        );
    }
}
