//! Any payload through the alert decoder: containers with whatever schema
//! they embed, and wire-format packets against the real Rubin schemas.
//! Every field of a decoded alert is walked, as a script or `tail` would.
//! A head-only decode of the same payload must agree with the whole one on
//! every field it decoded, and must not fail where the whole one succeeds.
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
    let whole = d.decode(&payload);
    if let Ok(alert) = &whole {
        walk(alert, alert.root(), 0);
        let _ = alert.to_json(alert.root());
    }
    let head = d.decode_head(&payload);
    if let Ok(head) = &head {
        walk(head, head.root(), 0);
        if let Ok(whole) = &whole {
            for (name, value) in head.fields(head.root()) {
                let other = whole.field(whole.root(), name).expect("a head field");
                assert_eq!(head.to_json(value), whole.to_json(other), "field {name}");
            }
        }
    }
    assert!(
        whole.is_err() || head.is_ok(),
        "the head failed where the whole decoded: {:?}",
        head.err()
    );
});
