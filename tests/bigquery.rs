//! The BigQuery-ready JSON form: every sample alert (ZTF 3.2 and 3.3, Rubin
//! 7.0 to 11.0) and alerts encoded with random values for every schema in
//! the test data (ZTF 4.02, Rubin 7.0 to 11.1, which have no public sample
//! of every version) convert to JSON that the table schema `ztfhook
//! bigquery-schema` prints for them accepts, and that reads back to the
//! decoded values bit for bit.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use serde_json::Value as Json;
use ztfhook::alert::avro::{Node, Schema, Value};
use ztfhook::alert::bigquery::{table_schema, write_json, KafkaColumns};
use ztfhook::alert::{Alert, Decoder, SchemaSources};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn decoder() -> Decoder {
    Decoder::new(SchemaSources {
        directory: Some(repo().join("tests/data/schemas/lsst")),
        registry: None,
    })
}

/// Every schema file in the test data: ZTF 4.02 and each Rubin version.
fn schema_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("tests/data/schemas/ztf/4.02/alert.avsc")];
    let lsst = repo().join("tests/data/schemas/lsst");
    for major in std::fs::read_dir(&lsst).unwrap().flatten() {
        let Ok(entries) = std::fs::read_dir(major.path()) else {
            continue;
        };
        for minor in entries.flatten() {
            let m = major.file_name().to_string_lossy().into_owned();
            let n = minor.file_name().to_string_lossy().into_owned();
            let f = minor.path().join(format!("lsst.v{m}_{n}.alert.avsc"));
            if f.exists() {
                files.push(f);
            }
        }
    }
    files.sort();
    files
}

// ---- Checking JSON against a table schema ----------------------------------

/// Checks `row` against BigQuery `columns` as a BigQuery subscription with
/// `use_table_schema` would: no unknown field, REQUIRED present and not null,
/// REPEATED an array, each value of its column's type.
fn validate(row: &Json, columns: &Json, at: &str) -> Result<(), String> {
    let object = row
        .as_object()
        .ok_or_else(|| format!("{at}: not an object"))?;
    let columns = columns.as_array().unwrap();
    for key in object.keys() {
        if !columns.iter().any(|c| c["name"] == *key) {
            return Err(format!("{at}.{key}: no such column"));
        }
    }
    for c in columns {
        let name = c["name"].as_str().unwrap();
        let here = format!("{at}.{name}");
        let value = object.get(name);
        match (c["mode"].as_str().unwrap(), value) {
            ("REQUIRED", None | Some(Json::Null)) => return Err(format!("{here}: required")),
            ("NULLABLE", None | Some(Json::Null)) => {}
            ("REPEATED", None) => {}
            ("REPEATED", Some(Json::Array(items))) => {
                for (i, item) in items.iter().enumerate() {
                    validate_value(item, c, &format!("{here}[{i}]"))?;
                }
            }
            ("REPEATED", Some(_)) => return Err(format!("{here}: repeated, not an array")),
            (_, Some(v)) => validate_value(v, c, &here)?,
            (mode, None) => return Err(format!("{here}: unknown mode {mode}")),
        }
    }
    Ok(())
}

fn validate_value(v: &Json, column: &Json, at: &str) -> Result<(), String> {
    let ok = match column["type"].as_str().unwrap() {
        "INTEGER" => v.is_i64() || v.is_u64(),
        "FLOAT" => v.is_number(),
        "STRING" => v.is_string(),
        "BOOLEAN" => v.is_boolean(),
        "RECORD" => return validate(v, &column["fields"], at),
        t => return Err(format!("{at}: unexpected column type {t}")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{at}: {v} is not a {}", column["type"]))
    }
}

// ---- Reading the values back -----------------------------------------------

/// Compares the JSON with the decoded alert, value by value: every kept
/// field present (null arrays left out), floats to the same bits (NaN and
/// infinities as null), integers exact, strings and enums equal.
fn same(alert: &Alert, node: &Node, v: Value, json: Option<&Json>, at: &str) -> Result<(), String> {
    let schema = alert.schema();
    let differ = |what: String| Err(format!("{at}: {what}"));
    match (node, v) {
        (Node::Union(branches), Value::Null) => match json {
            None if branches
                .iter()
                .any(|b| matches!(b, Node::Array(_) | Node::Map(_))) =>
            {
                Ok(())
            }
            Some(Json::Null) => Ok(()),
            other => differ(format!("null became {other:?}")),
        },
        (Node::Union(branches), _) => {
            let fits = |f: f64| f64::from(f as f32).to_bits() == f.to_bits() || f.is_nan();
            let b = branches
                .iter()
                .find(|b| match (b, v) {
                    (Node::Float, Value::Float(f)) => fits(f) || !branches.contains(&Node::Double),
                    (Node::Double, Value::Float(f)) => !fits(f) || !branches.contains(&Node::Float),
                    (Node::Int | Node::Long, Value::Int(_)) => true,
                    (Node::String, Value::Str(_)) | (Node::Boolean, Value::Bool(_)) => true,
                    (Node::Record(a), Value::Record(b, _)) => *a == b,
                    (Node::Enum(a), Value::Enum(b, _)) => *a == b,
                    (Node::Array(_), Value::Array(..)) => true,
                    _ => false,
                })
                .ok_or_else(|| format!("{at}: no branch for {v:?}"))?;
            same(alert, b, v, json, at)
        }
        (Node::Float, Value::Float(f)) => {
            let f = f as f32;
            match json {
                Some(Json::Null) if !f.is_finite() => Ok(()),
                Some(Json::Number(n)) if (n.as_f64().unwrap() as f32).to_bits() == f.to_bits() => {
                    // Shortest form: the number the 32-bit float's shortest
                    // decimal reads as, not the 64-bit widening of it.
                    // (Of two shortest decimals, either may be written.)
                    if significant(&n.to_string()) > significant(&f.to_string()) {
                        return differ(format!("{n} is longer than the shortest form {f}"));
                    }
                    Ok(())
                }
                other => differ(format!("float {f} became {other:?}")),
            }
        }
        (Node::Double, Value::Float(f)) => match json {
            Some(Json::Null) if !f.is_finite() => Ok(()),
            Some(Json::Number(n)) if n.as_f64().unwrap().to_bits() == f.to_bits() => Ok(()),
            other => differ(format!("double {f} became {other:?}")),
        },
        (Node::Int | Node::Long, Value::Int(i)) => match json.and_then(Json::as_i64) {
            Some(j) if j == i => Ok(()),
            _ => differ(format!("{i} became {json:?}")),
        },
        (Node::Boolean, Value::Bool(b)) => match json {
            Some(Json::Bool(j)) if *j == b => Ok(()),
            _ => differ(format!("{b} became {json:?}")),
        },
        (Node::String, Value::Str(s)) => match json.and_then(Json::as_str) {
            Some(j) if j == alert.text(s).unwrap() => Ok(()),
            _ => differ(format!("a string became {json:?}")),
        },
        (Node::Enum(_), Value::Enum(e, i)) => match json.and_then(Json::as_str) {
            Some(j) if j == alert.symbol(e, i) => Ok(()),
            _ => differ(format!("an enum became {json:?}")),
        },
        (Node::Array(item), Value::Array(..)) => {
            let items = alert.items(v);
            let Some(Json::Array(got)) = json else {
                if items.is_empty() && json.is_none() {
                    return Ok(());
                }
                return differ(format!("an array became {json:?}"));
            };
            if got.len() != items.len() {
                return differ(format!("{} items became {}", items.len(), got.len()));
            }
            for (i, (x, j)) in items.iter().zip(got).enumerate() {
                same(alert, item, *x, Some(j), &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        (Node::Record(id), Value::Record(..)) => {
            let Some(Json::Object(got)) = json else {
                return differ(format!("a record became {json:?}"));
            };
            let def = &schema.records[*id as usize];
            let root = at.is_empty();
            let mut kept = 0;
            for (f, (name, x)) in def.fields.iter().zip(alert.fields(v)) {
                let binary = matches!(f.node, Node::Bytes | Node::Fixed(_))
                    || matches!(&f.node, Node::Union(b) if b.iter().all(|n| matches!(n, Node::Null | Node::Bytes | Node::Fixed(_))));
                if (root && name.starts_with("cutout")) || binary {
                    if got.contains_key(name) {
                        return differ(format!("cutout {name} was kept"));
                    }
                    continue;
                }
                kept += 1;
                same(alert, &f.node, x, got.get(name), &format!("{at}.{name}"))?;
            }
            let extra = got.keys().filter(|k| !k.starts_with("kafka_")).count();
            if extra > kept {
                return differ(format!("{} fields, {kept} expected", got.len()));
            }
            Ok(())
        }
        _ => differ(format!("{node:?} does not match {v:?}")),
    }
}

/// How many significant digits a decimal number's text has.
fn significant(text: &str) -> usize {
    let mantissa = text.split(['e', 'E']).next().unwrap();
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    digits.trim_start_matches('0').trim_end_matches('0').len()
}

fn root_node(schema: &Schema) -> Node {
    schema.root.clone()
}

/// Converts one payload and checks it both ways; returns the JSON.
fn convert_and_check(decoder: &Decoder, payload: &[u8], what: &str) -> Json {
    let alert = decoder
        .decode(&Bytes::copy_from_slice(payload))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut out = Vec::new();
    write_json(&alert, None, usize::MAX, &mut out).unwrap_or_else(|e| panic!("{what}: {e}"));
    let row: Json = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{what}: {e}"));
    let columns = serde_json::to_value(table_schema(alert.schema(), false).unwrap()).unwrap();
    validate(&row, &columns, "").unwrap_or_else(|e| panic!("{what}: {e}"));
    same(
        &alert,
        &root_node(alert.schema()),
        alert.root(),
        Some(&row),
        "",
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    row
}

#[test]
fn every_sample_alert_converts_to_json_its_table_schema_accepts_and_reads_back_exactly() {
    let decoder = decoder();
    let mut n = 0;
    for survey in ["ztf", "rubin"] {
        for (name, payload) in common::sample_alerts(survey) {
            let row = convert_and_check(&decoder, &payload, &name);
            // Cutouts are gone; ids keep every digit.
            let text = row.to_string();
            assert!(!text.contains("stampData"), "{name}");
            assert!(row.get("cutoutDifference").is_none(), "{name}");
            if survey == "ztf" {
                // The sample's file name holds its candid, digit for digit.
                let candid = row["candid"].as_i64().unwrap();
                assert!(name.contains(&candid.to_string()), "{name}: {candid}");
                assert!(candid > 1 << 53 || name.contains("v3.2"), "{name}");
            }
            n += 1;
        }
    }
    assert!(n >= 30, "{n} samples");
}

#[test]
fn a_ztf_float_is_written_in_its_shortest_form() {
    let decoder = decoder();
    let (_, payload) = common::sample_alerts("ztf")
        .into_iter()
        .find(|(n, _)| n.contains("1095578116315015004"))
        .unwrap();
    let row = convert_and_check(&decoder, &payload, "sample");
    // MANIFEST.tsv: rb=0.307 (a float); ZTF's jd is a double.
    let rb = row["candidate"]["rb"].as_f64().unwrap();
    let text = row["candidate"]["rb"].to_string();
    assert!(text.len() <= 12, "rb written as {text}");
    assert!((rb - 0.307).abs() < 0.001, "{rb}");
}

#[test]
fn the_kafka_columns_come_last_and_match_the_printed_schema() {
    let decoder = decoder();
    let (_, payload) = common::sample_alerts("ztf").remove(0);
    let alert = decoder.decode(&Bytes::from(payload)).unwrap();
    let mut out = Vec::new();
    let kafka = KafkaColumns {
        topic: "ztf_20181203_programid1",
        partition: Some(3),
        offset: Some(9_007_199_254_740_993),
        timestamp_ms: None,
    };
    write_json(&alert, Some(&kafka), usize::MAX, &mut out).unwrap();
    let row: Json = serde_json::from_slice(&out).unwrap();
    let columns = serde_json::to_value(table_schema(alert.schema(), true).unwrap()).unwrap();
    validate(&row, &columns, "").unwrap();
    assert_eq!(row["kafka_topic"], "ztf_20181203_programid1");
    assert_eq!(row["kafka_offset"].as_i64(), Some(9_007_199_254_740_993));
    assert_eq!(row["kafka_timestamp_ms"], Json::Null);
    let last = columns.as_array().unwrap().last().unwrap();
    assert_eq!(last["name"], "kafka_timestamp_ms");
}

// ---- Alerts of every schema, with random values ----------------------------

/// A small deterministic generator (xorshift), so a failure repeats.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn zigzag(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Encodes a random value of `node` (Avro binary), with the edges the JSON
/// form must keep: NaN and infinities, integers past 2^53, floats that
/// print long as doubles, empty and non-ASCII strings.
fn random_value(schema: &Schema, node: &Node, r: &mut Random, depth: usize, out: &mut Vec<u8>) {
    match node {
        Node::Null => {}
        Node::Boolean => out.push(r.below(2) as u8),
        Node::Int => zigzag(out, i64::from(r.next() as i32)),
        Node::Long => zigzag(
            out,
            match r.below(4) {
                0 => (1 << 53) + 1 + r.below(1 << 40) as i64,
                1 => -(r.next() as i64).abs(),
                _ => r.next() as i64,
            },
        ),
        Node::Float => {
            let f: f32 = match r.below(8) {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => 1.416,
                3 => f32::MIN_POSITIVE,
                _ => f32::from_bits(r.next() as u32),
            };
            out.extend_from_slice(&f.to_le_bytes());
        }
        Node::Double => {
            let f: f64 = match r.below(8) {
                0 => f64::NAN,
                1 => f64::NEG_INFINITY,
                2 => 2_459_942.716_840_3,
                _ => f64::from_bits(r.next()),
            };
            out.extend_from_slice(&f.to_le_bytes());
        }
        Node::String => {
            let s = ["", "ZTF18abfkwnk", "é\"\\\n\u{1F52D}", "t"][r.below(4) as usize];
            zigzag(out, s.len() as i64);
            out.extend_from_slice(s.as_bytes());
        }
        Node::Bytes => {
            let n = r.below(64) as usize;
            zigzag(out, n as i64);
            out.extend((0..n).map(|_| r.next() as u8));
        }
        Node::Fixed(n) => out.extend((0..*n).map(|_| r.next() as u8)),
        Node::Enum(id) => zigzag(out, r.below(schema.enums[*id as usize].len() as u64) as i64),
        Node::Record(id) => {
            for f in &schema.records[*id as usize].fields {
                random_value(schema, &f.node, r, depth + 1, out);
            }
        }
        Node::Array(item) | Node::Map(item) => {
            let n = if depth > 6 { 0 } else { r.below(4) };
            if n > 0 {
                zigzag(out, n as i64);
                for _ in 0..n {
                    if matches!(node, Node::Map(_)) {
                        zigzag(out, 1);
                        out.push(b'k');
                    }
                    random_value(schema, item, r, depth + 1, out);
                }
            }
            zigzag(out, 0);
        }
        Node::Union(branches) => {
            let i = r.below(branches.len() as u64) as usize;
            zigzag(out, i as i64);
            random_value(schema, &branches[i], r, depth + 1, out);
        }
    }
}

/// An Avro container holding one datum, as ZTF sends an alert.
fn container(schema_text: &str, datum: &[u8]) -> Vec<u8> {
    let mut out = b"Obj\x01".to_vec();
    zigzag(&mut out, 1);
    zigzag(&mut out, "avro.schema".len() as i64);
    out.extend_from_slice(b"avro.schema");
    zigzag(&mut out, schema_text.len() as i64);
    out.extend_from_slice(schema_text.as_bytes());
    zigzag(&mut out, 0);
    let sync = [7u8; 16];
    out.extend_from_slice(&sync);
    zigzag(&mut out, 1);
    zigzag(&mut out, datum.len() as i64);
    out.extend_from_slice(datum);
    out.extend_from_slice(&sync);
    out
}

/// A schema's text with every named type it uses inlined, so that a
/// container can carry it (ZTF's and Rubin's files name sibling records).
fn inlined(file: &Path) -> String {
    fn inline(json: &mut Json, dir: &Path, namespace: &str, seen: &mut Vec<String>) {
        match json {
            Json::String(name) if !is_primitive(name) => {
                let full = if name.contains('.') {
                    name.clone()
                } else {
                    format!("{namespace}.{name}")
                };
                if seen.contains(&full) {
                    *json = Json::String(full);
                    return;
                }
                let file = std::fs::read_dir(dir)
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| {
                        let Ok(t) = std::fs::read_to_string(p) else {
                            return false;
                        };
                        let Ok(j) = serde_json::from_str::<Json>(&t) else {
                            return false;
                        };
                        let n = j["name"].as_str().unwrap_or("");
                        let ns = j["namespace"].as_str().unwrap_or("");
                        n == full || format!("{ns}.{n}") == full
                    })
                    .unwrap_or_else(|| panic!("{full}: no file defines it"));
                let mut def: Json =
                    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
                seen.push(full);
                let ns = def["namespace"].as_str().unwrap_or(namespace).to_string();
                inline(&mut def, dir, &ns, seen);
                *json = def;
            }
            Json::Array(items) => items
                .iter_mut()
                .for_each(|i| inline(i, dir, namespace, seen)),
            Json::Object(map) => {
                let ns = map
                    .get("namespace")
                    .and_then(Json::as_str)
                    .unwrap_or(namespace)
                    .to_string();
                if let Some(name) = map.get("name").and_then(Json::as_str) {
                    if map.contains_key("fields") || map.get("type").is_some_and(|t| t == "enum") {
                        let full = if name.contains('.') {
                            name.to_string()
                        } else {
                            format!("{ns}.{name}")
                        };
                        seen.push(full);
                    }
                }
                for key in ["type", "items", "values", "fields"] {
                    if let Some(v) = map.get_mut(key) {
                        inline(v, dir, &ns, seen);
                    }
                }
            }
            _ => {}
        }
    }
    fn is_primitive(name: &str) -> bool {
        matches!(
            name,
            "null"
                | "boolean"
                | "int"
                | "long"
                | "float"
                | "double"
                | "bytes"
                | "string"
                | "record"
                | "enum"
                | "array"
                | "map"
                | "fixed"
        )
    }
    let mut json: Json = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let ns = json["namespace"].as_str().unwrap_or("").to_string();
    inline(&mut json, file.parent().unwrap(), &ns, &mut Vec::new());
    json.to_string()
}

#[test]
fn alerts_of_every_schema_with_random_values_convert_to_json_their_table_schema_accepts() {
    let decoder = Decoder::default();
    let files = schema_files();
    assert!(files.len() >= 10, "{files:?}");
    let mut r = Random(0x2545_f491_4f6c_dd1d);
    for file in &files {
        let schema = ztfhook::alert::schemas::from_file(file).unwrap();
        let text = inlined(file);
        for i in 0..40 {
            let mut datum = Vec::new();
            random_value(&schema, &schema.root, &mut r, 0, &mut datum);
            let payload = container(&text, &datum);
            convert_and_check(&decoder, &payload, &format!("{} #{i}", file.display()));
        }
    }
}

#[test]
fn bigquery_schema_prints_the_table_of_a_schema_file_and_of_an_alert() {
    let ztf = repo().join("tests/data/schemas/ztf/4.02/alert.avsc");
    let columns = bigquery_schema(&["--kafka-columns".as_ref(), ztf.as_os_str()]);
    let names: Vec<&str> = columns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "schemavsn",
            "publisher",
            "objectId",
            "candid",
            "candidate",
            "prv_candidates",
            "fp_hists",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            "kafka_timestamp_ms"
        ]
    );
    assert_eq!(columns[5]["mode"], "REPEATED");
    assert_eq!(columns[5]["type"], "RECORD");
    assert_eq!(columns[3]["type"], "INTEGER");
    assert_eq!(columns[3]["mode"], "REQUIRED");

    // A Rubin wire-format alert: its schema from the schema directory.
    let (_, wire) = common::sample_alerts("rubin")
        .into_iter()
        .find(|(n, _)| n.contains("v11_0"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let alert = dir.path().join("alert.avro");
    std::fs::write(&alert, wire).unwrap();
    let schemas = repo().join("tests/data/schemas/lsst");
    let columns = bigquery_schema(&[
        "--schema-dir".as_ref(),
        schemas.as_os_str(),
        alert.as_os_str(),
    ]);
    assert!(columns
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "diaSource" && c["type"] == "RECORD"));

    // Not a schema and not an alert: named, exit 2.
    let junk = dir.path().join("notes.txt");
    std::fs::write(&junk, "hello").unwrap();
    let out = Command::new(common::bin())
        .arg("bigquery-schema")
        .arg(&junk)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("notes.txt"), "{err}");
}

/// Runs `ztfhook bigquery-schema ARGS`, which must succeed; its table schema.
fn bigquery_schema(args: &[&std::ffi::OsStr]) -> Json {
    let out = Command::new(common::bin())
        .arg("bigquery-schema")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
