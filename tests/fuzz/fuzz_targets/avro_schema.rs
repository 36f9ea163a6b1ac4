//! A schema's JSON and a datum from the same input (split at the first NUL):
//! the schema parser and the decoder must refuse bad input, never panic,
//! never allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztfhook::alert::avro::{decode, parse_schema, Decoded};

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|b| *b == 0) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    if let Ok(schema) = parse_schema(text, &mut |_| None) {
        let _ = decode(&schema, &data[split + 1..], 0, &mut Decoded::default());
    }
});
