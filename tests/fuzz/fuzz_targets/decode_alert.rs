//! Any payload through the alert decoder: containers with whatever schema
//! they embed, and wire-format packets against the real Rubin schemas.
//! Every field of a decoded alert is walked, as a script or `tail` would.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ztfhook::alert::avro::Value;
use ztfhook::alert::{Alert, Decoder, SchemaSources};

fn decoder() -> &'static Decoder {
    static D: OnceLock<Decoder> = OnceLock::new();
    D.get_or_init(|| {
        Decoder::new(SchemaSources {
            directory: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/schemas/lsst").into()),
            registry: None,
        })
    })
}

fn walk(alert: &Alert, v: Value, depth: usize) {
    if depth > 80 {
        return;
    }
    match v {
        Value::Record(..) => {
            for (_, f) in alert.fields(v) {
                walk(alert, f, depth + 1);
            }
        }
        Value::Array(..) => {
            for i in alert.items(v) {
                walk(alert, *i, depth + 1);
            }
        }
        Value::Map(..) => {
            for (_, e) in alert.entries(v) {
                walk(alert, e, depth + 1);
            }
        }
        Value::Str(s) => {
            let _ = alert.text(s);
        }
        Value::Bytes(s) => {
            let _ = alert.bytes(s);
        }
        Value::Enum(e, i) => {
            let _ = alert.symbol(e, i);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let payload = bytes::Bytes::copy_from_slice(data);
    let d = decoder();
    let _ = d.survey(&payload);
    if let Ok(alert) = d.decode(&payload) {
        walk(&alert, alert.root(), 0);
        let _ = alert.to_json(alert.root());
    }
});
