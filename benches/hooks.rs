//! Per-message cost of a hook: the built-in pass-through, the pass-through
//! scripts, and a routing hook (topic by rule, three attributes, 10%
//! sampling) in Rhai and Lua, with the same rule in plain Rust as the floor.
//!
//! `cargo bench --bench hooks`

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ztfhook::envelope::Envelope;
use ztfhook::hook::script::{compile, sample, Environment};
use ztfhook::hook::{Decision, Hook, HookError, MessageView, Passthrough};

/// The routing rule of `scripts/ztf_route_sample.*`, in Rust.
struct RustRouting;

impl Hook for RustRouting {
    fn decide(&mut self, m: &MessageView<'_>) -> Result<Decision, HookError> {
        let public = m.topic().ends_with("_programid1");
        let sampled = sample(&m.offset().to_string(), 0.1);
        if !public && !sampled {
            return Ok(Decision::drop_message());
        }
        Ok(Decision {
            keep: true,
            topics: vec![if public { "ztf-public" } else { "ztf-sampled" }.to_string()],
            attributes: vec![
                ("partition".into(), m.partition().to_string()),
                ("sampled".into(), sampled.to_string()),
                ("survey".into(), "ztf".into()),
            ],
            ordering_key: None,
        })
    }
}

fn alert() -> Envelope {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/alerts/ztf/fink_v3.3_1095578115815010001.avro");
    Envelope {
        topic: Arc::from("ztf_20261125_programid1"),
        partition: 3,
        offset: 123_456,
        timestamp_ms: Some(1_764_000_000_000),
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(std::fs::read(path).expect("sample alert")),
    }
}

fn bench(c: &mut Criterion) {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut hooks: Vec<(&str, Box<dyn Hook>)> = vec![
        ("passthrough/builtin", Box::new(Passthrough)),
        ("routing/rust", Box::new(RustRouting)),
    ];
    for (name, file) in [
        ("passthrough/rhai", "passthrough.rhai"),
        ("passthrough/lua", "passthrough.lua"),
        ("routing/rhai", "ztf_route_sample.rhai"),
        ("routing/lua", "ztf_route_sample.lua"),
    ] {
        let hook = compile(&scripts.join(file), &Environment::default())
            .unwrap()
            .instantiate()
            .unwrap();
        hooks.push((name, hook));
    }
    let envelope = alert();
    let mut group = c.benchmark_group("hook");
    for (name, hook) in &mut hooks {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut offset = 0;
            let mut e = envelope.clone();
            b.iter(|| {
                offset += 1;
                e.offset = offset;
                hook.decide(&MessageView::new(&e)).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
