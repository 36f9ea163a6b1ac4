//! A small Avro reader: schemas parsed from their JSON form, and records
//! decoded from the binary encoding by following the writer's schema.
//!
//! Invariants:
//! - decoding follows the schema it is given, never a hard-coded layout, so
//!   any schema version decodes;
//! - a decoded record does not copy strings or bytes: they are [`Span`]s into
//!   the buffer, so cutouts cost nothing unless a script reads them;
//! - all values of one decode sit in one arena (`Vec<Value>`), children of a
//!   record or array contiguous, so a decode makes a handful of allocations;
//! - bad input (truncated, lengths past the end, unknown union branch,
//!   nesting too deep, counts that would allocate without bound) is an
//!   [`AvroError`] naming what was wrong and where, never a panic.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value as Json;

/// Deepest nesting of schemas or values followed.
const MAX_DEPTH: usize = 64;

/// A node of a parsed schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    /// Index into [`Schema::records`].
    Record(u32),
    /// Index into [`Schema::enums`].
    Enum(u32),
    /// A fixed of this many bytes.
    Fixed(u32),
    Array(Box<Node>),
    Map(Box<Node>),
    Union(Box<[Node]>),
}

/// A record type: its full name and fields in order.
#[derive(Debug)]
pub struct RecordDef {
    pub name: String,
    pub fields: Vec<Field>,
    index: HashMap<Arc<str>, usize>,
}

impl RecordDef {
    /// The position of a field, by name.
    pub fn field(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
}

/// One field of a record.
#[derive(Debug)]
pub struct Field {
    pub name: Arc<str>,
    pub node: Node,
}

/// A parsed schema: the root node and the named types it uses.
#[derive(Debug)]
pub struct Schema {
    pub root: Node,
    pub records: Vec<RecordDef>,
    /// Each enum's symbols.
    pub enums: Vec<Vec<Arc<str>>>,
    /// How many leading fields of the root record hold no array or map:
    /// the part [`decode_head`] decodes (ZTF: up to `candidate`, before
    /// `prv_candidates`; Rubin: up to `diaSource`).
    pub head_fields: usize,
}

impl Schema {
    /// The full name of the root type, if it is named.
    pub fn name(&self) -> Option<&str> {
        match self.root {
            Node::Record(id) => Some(&self.records[id as usize].name),
            _ => None,
        }
    }
}

/// Why a schema or a value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AvroError(pub String);

fn err<T>(message: impl Into<String>) -> Result<T, AvroError> {
    Err(AvroError(message.into()))
}

/// Parses a schema's JSON text. `resolve` is asked for the JSON of a named
/// type the text uses but does not define (Rubin's schemas name records kept
/// in sibling files); it returns `None` when it has none.
///
/// # Errors
/// [`AvroError`] naming the bad part.
pub fn parse_schema(
    text: &str,
    resolve: &mut dyn FnMut(&str) -> Option<Json>,
) -> Result<Schema, AvroError> {
    let json: Json =
        serde_json::from_str(text).map_err(|e| AvroError(format!("schema is not JSON: {e}")))?;
    let mut parser = Parser {
        records: Vec::new(),
        enums: Vec::new(),
        names: HashMap::new(),
        resolve,
        depth: 0,
    };
    let root = parser.node(&json, "")?;
    let records = parser
        .records
        .into_iter()
        .map(|r| r.ok_or_else(|| AvroError("a record was used before its definition ended".into())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut schema = Schema {
        root,
        records,
        enums: parser.enums,
        head_fields: 0,
    };
    schema.head_fields = match &schema.root {
        Node::Record(id) => schema.records[*id as usize]
            .fields
            .iter()
            .take_while(|f| !schema.holds_collection(&f.node, 0))
            .count(),
        _ => 0,
    };
    Ok(schema)
}

impl Schema {
    /// Whether values of `node` can hold an array or a map (a recursive
    /// type counts as holding one).
    fn holds_collection(&self, node: &Node, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return true;
        }
        match node {
            Node::Array(_) | Node::Map(_) => true,
            Node::Union(branches) => branches.iter().any(|b| self.holds_collection(b, depth + 1)),
            Node::Record(id) => self.records[*id as usize]
                .fields
                .iter()
                .any(|f| self.holds_collection(&f.node, depth + 1)),
            _ => false,
        }
    }
}

struct Parser<'r> {
    records: Vec<Option<RecordDef>>,
    enums: Vec<Vec<Arc<str>>>,
    names: HashMap<String, Node>,
    resolve: &'r mut dyn FnMut(&str) -> Option<Json>,
    depth: usize,
}

fn primitive(name: &str) -> Option<Node> {
    Some(match name {
        "null" => Node::Null,
        "boolean" => Node::Boolean,
        "int" => Node::Int,
        "long" => Node::Long,
        "float" => Node::Float,
        "double" => Node::Double,
        "bytes" => Node::Bytes,
        "string" => Node::String,
        _ => return None,
    })
}

fn full_name(name: &str, namespace: &str) -> String {
    if name.contains('.') || namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}.{name}")
    }
}

/// The namespace part of a full name.
fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(ns, _)| ns)
}

impl Parser<'_> {
    fn node(&mut self, json: &Json, namespace: &str) -> Result<Node, AvroError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(format!("schema nested deeper than {MAX_DEPTH}"));
        }
        let node = self.node_inner(json, namespace);
        self.depth -= 1;
        node
    }

    fn node_inner(&mut self, json: &Json, namespace: &str) -> Result<Node, AvroError> {
        match json {
            Json::String(name) => self.named(name, namespace),
            Json::Array(branches) => Ok(Node::Union(
                branches
                    .iter()
                    .map(|b| self.node(b, namespace))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_boxed_slice(),
            )),
            Json::Object(o) => {
                let Some(kind) = o.get("type") else {
                    return err("a schema object has no \"type\"");
                };
                let Json::String(kind) = kind else {
                    return self.node(kind, namespace);
                };
                match kind.as_str() {
                    "record" | "error" => self.record(o, namespace),
                    "enum" => {
                        let full = self.declared_name(o, namespace)?;
                        let Some(Json::Array(symbols)) = o.get("symbols") else {
                            return err(format!("enum {full} has no \"symbols\" list"));
                        };
                        let symbols = symbols
                            .iter()
                            .map(|s| {
                                s.as_str().map(Arc::from).ok_or_else(|| {
                                    AvroError(format!(
                                        "enum {full} has a symbol that is not a string"
                                    ))
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        let node = Node::Enum(self.enums.len() as u32);
                        self.enums.push(symbols);
                        self.names.insert(full, node.clone());
                        Ok(node)
                    }
                    "fixed" => {
                        let full = self.declared_name(o, namespace)?;
                        let size = o
                            .get("size")
                            .and_then(Json::as_u64)
                            .and_then(|s| u32::try_from(s).ok())
                            .ok_or_else(|| {
                                AvroError(format!("fixed {full} has no valid \"size\""))
                            })?;
                        let node = Node::Fixed(size);
                        self.names.insert(full, node.clone());
                        Ok(node)
                    }
                    "array" => {
                        let items = o
                            .get("items")
                            .ok_or_else(|| AvroError("an array schema has no \"items\"".into()))?;
                        Ok(Node::Array(Box::new(self.node(items, namespace)?)))
                    }
                    "map" => {
                        let values = o
                            .get("values")
                            .ok_or_else(|| AvroError("a map schema has no \"values\"".into()))?;
                        Ok(Node::Map(Box::new(self.node(values, namespace)?)))
                    }
                    // {"type": "long", "logicalType": ...} or {"type": "a.b.name"}
                    other => self.named(other, namespace),
                }
            }
            other => err(format!("{other} is not a schema")),
        }
    }

    /// A full name from an object's "name" and "namespace".
    fn declared_name(
        &self,
        o: &serde_json::Map<String, Json>,
        namespace: &str,
    ) -> Result<String, AvroError> {
        let Some(name) = o.get("name").and_then(Json::as_str) else {
            return err("a named schema has no \"name\"");
        };
        let ns = o
            .get("namespace")
            .and_then(Json::as_str)
            .unwrap_or(namespace);
        Ok(full_name(name, ns))
    }

    fn record(
        &mut self,
        o: &serde_json::Map<String, Json>,
        namespace: &str,
    ) -> Result<Node, AvroError> {
        let full = self.declared_name(o, namespace)?;
        let id = self.records.len() as u32;
        self.records.push(None);
        // Registered before the fields, so a record may refer to itself.
        self.names.insert(full.clone(), Node::Record(id));
        let Some(Json::Array(fields)) = o.get("fields") else {
            return err(format!("record {full} has no \"fields\" list"));
        };
        let inner_ns = namespace_of(&full).to_string();
        let mut out = Vec::with_capacity(fields.len());
        let mut index = HashMap::with_capacity(fields.len());
        for f in fields {
            let Some(name) = f.get("name").and_then(Json::as_str) else {
                return err(format!("record {full} has a field without a name"));
            };
            let Some(kind) = f.get("type") else {
                return err(format!("field {full}.{name} has no \"type\""));
            };
            let node = self
                .node(kind, &inner_ns)
                .map_err(|e| AvroError(format!("field {full}.{name}: {e}")))?;
            let name: Arc<str> = Arc::from(name);
            index.insert(Arc::clone(&name), out.len());
            out.push(Field { name, node });
        }
        self.records[id as usize] = Some(RecordDef {
            name: full,
            fields: out,
            index,
        });
        Ok(Node::Record(id))
    }

    fn named(&mut self, name: &str, namespace: &str) -> Result<Node, AvroError> {
        if let Some(p) = primitive(name) {
            return Ok(p);
        }
        let full = full_name(name, namespace);
        for candidate in [full.as_str(), name] {
            if let Some(node) = self.names.get(candidate) {
                return Ok(node.clone());
            }
        }
        for candidate in [full.clone(), name.to_string()] {
            if let Some(json) = (self.resolve)(&candidate) {
                let node = self.node(&json, namespace_of(&candidate))?;
                return Ok(node);
            }
        }
        err(format!("unknown type `{name}`"))
    }
}

/// Where a string, bytes or fixed value sits in the decoded buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    pub fn of(self, buf: &[u8]) -> &[u8] {
        &buf[self.start as usize..(self.start + self.len) as usize]
    }
}

/// One decoded value. Containers point into the decode's arena.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Span),
    Bytes(Span),
    /// Enum index and symbol index.
    Enum(u32, u32),
    /// Record type and the arena index of its first field.
    Record(u32, u32),
    /// Arena index of the first item, and the count.
    Array(u32, u32),
    /// Arena index of the first key, and the count of entries; keys and
    /// values alternate.
    Map(u32, u32),
}

/// A decoded datum: the arena and the root value.
#[derive(Debug, Default)]
pub struct Decoded {
    pub arena: Vec<Value>,
    pub root: Option<Value>,
}

/// Decodes one datum of `schema` from `buf[start..]`; spans are relative to
/// `buf`. Returns the position after the datum.
///
/// # Errors
/// [`AvroError`] naming the field path and byte offset of bad input.
pub fn decode(
    schema: &Schema,
    buf: &[u8],
    start: usize,
    out: &mut Decoded,
) -> Result<usize, AvroError> {
    read_datum(schema, buf, start, out, |r| r.value(&schema.root))
}

/// Decodes only the head of a datum whose root is a record: its first
/// [`Schema::head_fields`] fields, no array or map among them; the other
/// fields' slots stay `Null`. Spans are relative to `buf`.
///
/// # Errors
/// [`AvroError`] naming the field path and byte offset of bad input.
pub fn decode_head(
    schema: &Schema,
    buf: &[u8],
    start: usize,
    out: &mut Decoded,
) -> Result<(), AvroError> {
    match schema.root {
        Node::Record(id) => read_datum(schema, buf, start, out, |r| {
            r.record_fields(id, schema.head_fields)
        }),
        _ => decode(schema, buf, start, out),
    }
    .map(|_| ())
}

/// Runs `read` over `buf[start..]` into `out`'s arena (reused); returns the
/// position after what it read.
fn read_datum(
    schema: &Schema,
    buf: &[u8],
    start: usize,
    out: &mut Decoded,
    read: impl FnOnce(&mut Reader<'_>) -> Result<Value, AvroError>,
) -> Result<usize, AvroError> {
    if buf.len() > u32::MAX as usize {
        return err("a datum over 4 GiB");
    }
    let mut reader = Reader {
        buf,
        pos: start,
        arena: std::mem::take(&mut out.arena),
        schema,
        depth: 0,
        items: 0,
    };
    reader.arena.clear();
    let root = read(&mut reader);
    let pos = reader.pos;
    out.arena = reader.arena;
    out.root = Some(root.map_err(|e| match schema.name() {
        Some(n) => AvroError(format!("{n}: {e}")),
        None => e,
    })?);
    Ok(pos)
}

/// Most array items or map entries one decode may hold: a count in the
/// input can't allocate more than this.
const MAX_ITEMS: usize = 4_000_000;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    arena: Vec<Value>,
    schema: &'a Schema,
    depth: usize,
    items: usize,
}

impl Reader<'_> {
    fn truncated<T>(&self, what: &str) -> Result<T, AvroError> {
        err(format!("truncated at byte {} reading {what}", self.pos))
    }

    /// A zig-zag varint.
    #[inline]
    fn long(&mut self) -> Result<i64, AvroError> {
        // Most numbers (union branches, small counts) take one byte.
        if let Some(&b) = self.buf.get(self.pos) {
            if b & 0x80 == 0 {
                self.pos += 1;
                let v = u64::from(b);
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return self.truncated("a number");
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return err(format!("a number over 10 bytes at byte {}", self.pos));
            }
        }
        Ok((value >> 1) as i64 ^ -((value & 1) as i64))
    }

    fn take(&mut self, len: usize, what: &str) -> Result<Span, AvroError> {
        if len > self.buf.len() - self.pos {
            return err(format!(
                "{what} of {len} bytes at byte {} runs past the end ({} bytes)",
                self.pos,
                self.buf.len()
            ));
        }
        let span = Span {
            start: self.pos as u32,
            len: len as u32,
        };
        self.pos += len;
        Ok(span)
    }

    fn length(&mut self, what: &str) -> Result<usize, AvroError> {
        let n = self.long()?;
        usize::try_from(n).map_err(|_| AvroError(format!("{what} has negative length {n}")))
    }

    /// A block count, skipping the byte size that follows a negative count.
    fn count(&mut self) -> Result<usize, AvroError> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        let n = n.unsigned_abs() as usize;
        self.items = self.items.saturating_add(n);
        if self.items > MAX_ITEMS {
            return err(format!("more than {MAX_ITEMS} array items or map entries"));
        }
        Ok(n)
    }

    fn value(&mut self, node: &Node) -> Result<Value, AvroError> {
        Ok(match node {
            Node::Null => Value::Null,
            Node::Boolean => {
                let Some(&b) = self.buf.get(self.pos) else {
                    return self.truncated("a boolean");
                };
                self.pos += 1;
                Value::Bool(b != 0)
            }
            Node::Int | Node::Long => Value::Int(self.long()?),
            Node::Float => match self.buf.get(self.pos..self.pos + 4) {
                Some(s) => {
                    self.pos += 4;
                    Value::Float(f64::from(f32::from_le_bytes([s[0], s[1], s[2], s[3]])))
                }
                None => return self.truncated("a float"),
            },
            Node::Double => match self.buf.get(self.pos..self.pos + 8) {
                Some(s) => {
                    self.pos += 8;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(s);
                    Value::Float(f64::from_le_bytes(b))
                }
                None => return self.truncated("a double"),
            },
            Node::Bytes => {
                let n = self.length("bytes")?;
                Value::Bytes(self.take(n, "bytes")?)
            }
            Node::String => {
                let n = self.length("a string")?;
                Value::Str(self.take(n, "a string")?)
            }
            Node::Fixed(size) => Value::Bytes(self.take(*size as usize, "a fixed")?),
            Node::Enum(id) => {
                let i = self.long()?;
                let symbols = &self.schema.enums[*id as usize];
                match usize::try_from(i).ok().filter(|&i| i < symbols.len()) {
                    Some(i) => Value::Enum(*id, i as u32),
                    None => return err(format!("enum index {i} of {} symbols", symbols.len())),
                }
            }
            Node::Union(branches) => {
                let i = self.long()?;
                match usize::try_from(i).ok().and_then(|i| branches.get(i)) {
                    Some(Node::Null) => Value::Null,
                    Some(branch) => self.value(branch)?,
                    None => {
                        return err(format!(
                            "union branch {i} of {} at byte {}",
                            branches.len(),
                            self.pos
                        ))
                    }
                }
            }
            Node::Record(id) => self.record(*id)?,
            Node::Array(items) => self.nested(|r| {
                let mut list = Vec::new();
                loop {
                    let n = r.count()?;
                    if n == 0 {
                        break;
                    }
                    // Every item but a null takes at least one byte.
                    if **items != Node::Null {
                        r.bounded(n, "array")?;
                    }
                    list.reserve(n);
                    for _ in 0..n {
                        list.push(r.value(items)?);
                    }
                }
                let start = r.arena.len() as u32;
                let len = list.len() as u32;
                r.arena.extend_from_slice(&list);
                Ok(Value::Array(start, len))
            })?,
            Node::Map(values) => self.nested(|r| {
                let mut list = Vec::new();
                loop {
                    let n = r.count()?;
                    if n == 0 {
                        break;
                    }
                    r.bounded(n, "map")?;
                    list.reserve(2 * n);
                    for _ in 0..n {
                        let k = r.length("a map key")?;
                        list.push(Value::Str(r.take(k, "a map key")?));
                        list.push(r.value(values)?);
                    }
                }
                let start = r.arena.len() as u32;
                let len = (list.len() / 2) as u32;
                r.arena.extend_from_slice(&list);
                Ok(Value::Map(start, len))
            })?,
        })
    }

    /// Refuses a count that can't fit in the bytes left.
    fn bounded(&self, n: usize, what: &str) -> Result<(), AvroError> {
        if n > self.buf.len() - self.pos {
            return err(format!(
                "{what} block of {n} items at byte {} with {} bytes left",
                self.pos,
                self.buf.len() - self.pos
            ));
        }
        Ok(())
    }

    fn nested(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<Value, AvroError>,
    ) -> Result<Value, AvroError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(format!("values nested deeper than {MAX_DEPTH}"));
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn record(&mut self, id: u32) -> Result<Value, AvroError> {
        self.record_fields(id, usize::MAX)
    }

    /// A record of which only the first `limit` fields are read; the slots
    /// of the others stay `Null`.
    fn record_fields(&mut self, id: u32, limit: usize) -> Result<Value, AvroError> {
        let schema = self.schema;
        let def = &schema.records[id as usize];
        self.nested(|r| {
            let start = r.arena.len();
            r.arena.resize(start + def.fields.len(), Value::Null);
            for (i, field) in def.fields.iter().enumerate().take(limit) {
                let v = r
                    .value(&field.node)
                    .map_err(|e| AvroError(format!("{}: {e}", field.name)))?;
                r.arena[start + i] = v;
            }
            Ok(Value::Record(id, start as u32))
        })
    }
}

/// A zig-zag varint at `buf[*pos..]`, for container headers.
///
/// # Errors
/// [`AvroError`] if truncated.
pub fn read_long(buf: &[u8], pos: &mut usize) -> Result<i64, AvroError> {
    let mut r = Reader {
        buf,
        pos: *pos,
        arena: Vec::new(),
        schema: &EMPTY,
        depth: 0,
        items: 0,
    };
    let v = r.long()?;
    *pos = r.pos;
    Ok(v)
}

static EMPTY: Schema = Schema {
    root: Node::Null,
    head_fields: 0,
    records: Vec::new(),
    enums: Vec::new(),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn no_resolve(_: &str) -> Option<Json> {
        None
    }

    fn zigzag(v: i64, out: &mut Vec<u8>) {
        let mut n = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    const ALL_TYPES: &str = r#"{"type": "record", "name": "t", "namespace": "x",
        "fields": [
            {"name": "b", "type": "boolean"},
            {"name": "i", "type": "int"},
            {"name": "f", "type": "float"},
            {"name": "s", "type": ["null", "string"]},
            {"name": "e", "type": {"type": "enum", "name": "color", "symbols": ["r", "g"]}},
            {"name": "fx", "type": {"type": "fixed", "name": "four", "size": 4}},
            {"name": "a", "type": {"type": "array", "items": {"type": "record", "name": "p",
                "fields": [{"name": "v", "type": "double"}, {"name": "c", "type": "color"}]}}},
            {"name": "m", "type": {"type": "map", "values": "long"}},
            {"name": "again", "type": ["null", "x.p"]}
        ]}"#;

    fn all_types_datum() -> Vec<u8> {
        let mut d = vec![1];
        zigzag(-42, &mut d);
        d.extend(1.5f32.to_le_bytes());
        zigzag(1, &mut d);
        zigzag(2, &mut d);
        d.extend(b"hi");
        zigzag(1, &mut d);
        d.extend(b"abcd");
        // Two blocks, the second with a byte size (negative count).
        zigzag(1, &mut d);
        d.extend(2.0f64.to_le_bytes());
        zigzag(0, &mut d);
        zigzag(-1, &mut d);
        zigzag(9, &mut d);
        d.extend(3.0f64.to_le_bytes());
        zigzag(1, &mut d);
        zigzag(0, &mut d);
        zigzag(1, &mut d);
        zigzag(1, &mut d);
        d.extend(b"k");
        zigzag(-7, &mut d);
        zigzag(0, &mut d);
        zigzag(0, &mut d);
        d
    }

    #[test]
    fn every_avro_type_decodes_by_the_schema() {
        let schema = parse_schema(ALL_TYPES, &mut no_resolve).unwrap();
        let data = all_types_datum();
        let mut out = Decoded::default();
        let end = decode(&schema, &data, 0, &mut out).unwrap();
        assert_eq!(end, data.len());
        let Some(Value::Record(_, f)) = out.root else {
            panic!("{:?}", out.root)
        };
        let field = |i: u32| out.arena[(f + i) as usize];
        assert_eq!(field(0), Value::Bool(true));
        assert_eq!(field(1), Value::Int(-42));
        assert_eq!(field(2), Value::Float(1.5));
        let Value::Str(s) = field(3) else { panic!() };
        assert_eq!(s.of(&data), b"hi");
        assert_eq!(field(4), Value::Enum(0, 1));
        let Value::Bytes(fx) = field(5) else { panic!() };
        assert_eq!(fx.of(&data), b"abcd");
        let Value::Array(a, 2) = field(6) else {
            panic!("{:?}", field(6))
        };
        let Value::Record(_, p) = out.arena[a as usize + 1] else {
            panic!()
        };
        assert_eq!(out.arena[p as usize], Value::Float(3.0));
        assert_eq!(out.arena[p as usize + 1], Value::Enum(0, 1));
        let Value::Map(m, 1) = field(7) else { panic!() };
        assert_eq!(out.arena[m as usize + 1], Value::Int(-7));
        assert_eq!(field(8), Value::Null);
        assert_eq!(schema.name(), Some("x.t"));
    }

    #[test]
    fn the_head_is_the_root_fields_before_the_first_that_can_hold_a_collection() {
        let schema = parse_schema(
            r#"{"type": "record", "name": "a", "fields": [
                {"name": "id", "type": "long"},
                {"name": "c", "type": {"type": "record", "name": "c", "fields": [{"name": "x", "type": "double"}]}},
                {"name": "prv", "type": ["null", {"type": "array", "items": "c"}]},
                {"name": "late", "type": "long"}]}"#,
            &mut no_resolve,
        )
        .unwrap();
        assert_eq!(schema.head_fields, 2);
        // 7, {x: 1.5}, [c{2.5}], 9
        let mut datum = Vec::new();
        zigzag(7, &mut datum);
        datum.extend_from_slice(&1.5f64.to_le_bytes());
        zigzag(1, &mut datum);
        zigzag(1, &mut datum);
        datum.extend_from_slice(&2.5f64.to_le_bytes());
        zigzag(0, &mut datum);
        zigzag(9, &mut datum);
        let mut head = Decoded::default();
        decode_head(&schema, &datum, 0, &mut head).unwrap();
        let mut whole = Decoded::default();
        assert_eq!(decode(&schema, &datum, 0, &mut whole).unwrap(), datum.len());
        // Root slots 0..4, then the record `c`'s field.
        assert_eq!(head.arena[..2], whole.arena[..2]);
        assert_eq!(head.arena[4], Value::Float(1.5));
        assert_eq!(whole.arena[4], Value::Float(1.5));
        assert_eq!(head.arena[2..4], [Value::Null, Value::Null]);
        assert_eq!(whole.arena[3], Value::Int(9));
    }

    #[test]
    fn every_truncation_of_a_datum_is_an_error_not_a_panic() {
        let schema = parse_schema(ALL_TYPES, &mut no_resolve).unwrap();
        let data = all_types_datum();
        let mut out = Decoded::default();
        for cut in 0..data.len() {
            let e = decode(&schema, &data[..cut], 0, &mut out).unwrap_err();
            assert!(e.0.starts_with("x.t: "), "{e}");
        }
    }

    #[test]
    fn a_count_larger_than_the_input_is_refused_before_allocating() {
        let schema =
            parse_schema(r#"{"type": "array", "items": "long"}"#, &mut no_resolve).unwrap();
        let mut data = Vec::new();
        zigzag(1 << 40, &mut data);
        let e = decode(&schema, &data, 0, &mut Decoded::default()).unwrap_err();
        assert!(e.0.contains("items"), "{e}");
    }

    #[test]
    fn a_named_type_defined_elsewhere_is_asked_for() {
        let mut asked = Vec::new();
        let schema = parse_schema(
            r#"{"type": "record", "name": "alert", "namespace": "lsst.v9_0",
                "fields": [{"name": "src", "type": "lsst.v9_0.diaSource"}]}"#,
            &mut |name: &str| {
                asked.push(name.to_string());
                (name == "lsst.v9_0.diaSource").then(|| {
                    serde_json::json!({"type": "record", "name": "diaSource",
                        "namespace": "lsst.v9_0", "fields": [{"name": "id", "type": "long"}]})
                })
            },
        )
        .unwrap();
        assert_eq!(asked, vec!["lsst.v9_0.diaSource"]);
        assert_eq!(schema.records.len(), 2);
        assert_eq!(schema.records[1].field("id"), Some(0));
    }

    #[test]
    fn bad_schemas_name_what_is_wrong() {
        let e = |text: &str| parse_schema(text, &mut no_resolve).unwrap_err().0;
        assert!(e("{").contains("not JSON"));
        assert!(e(r#""nope""#).contains("unknown type `nope`"));
        assert!(
            e(r#"{"type": "record", "name": "r", "fields": [{"name": "a", "type": "zz"}]}"#)
                .contains("field r.a: unknown type `zz`")
        );
        assert!(e(r#"{"type": "fixed", "name": "f"}"#).contains("size"));
        let deep = format!("{}\"int\"{}", "[".repeat(100), "]".repeat(100));
        assert!(e(&deep).contains("deeper"));
    }
}
