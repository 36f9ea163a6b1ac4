//! Per-message cost of a hook: the built-in pass-through, the pass-through
//! scripts, and a routing hook (topic by rule, three attributes, 10%
//! sampling) in Rhai and Lua, with the same rule in plain Rust as the floor.
//!
//! Then the cost of reading an alert in a hook: decoding a ZTF alert (64 KB,
//! with prv_candidates and cutouts) and reading candidate fields, and the
//! same for a Rubin alert's diaSource (110 KB, schema from the test data),
//! with the bare Rust decode as the floor; and the shipped
//! `ztf_by_program.rhai` (survey, then the head).
//!
//! `cargo bench --bench hooks`

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ztfhook::alert::{Decoder, SchemaSources};
use ztfhook::envelope::Envelope;
use ztfhook::hook::sampling::sample;
use ztfhook::hook::script::{compile, compile_source, Language};
use ztfhook::hook::{Decision, Hook, HookError, MessageView, Passthrough};
use ztfhook::hook::{Environment, Limits};

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
            objects: Vec::new(),
            ordering_key: None,
        })
    }
}

fn alert() -> Envelope {
    sample_file("ztf/fink_v3.3_1095578115815010001.avro")
}

fn sample_file(file: &str) -> Envelope {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/alerts")
        .join(file);
    Envelope {
        topic: Arc::from("ztf_20261125_programid1"),
        partition: 3,
        offset: 123_456,
        timestamp_ms: Some(1_764_000_000_000),
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(std::fs::read(path).expect("sample alert")),
        ..Default::default()
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
    decoding(c);
}

const ZTF_RHAI: &str = "fn route(msg) { let c = msg.alert.candidate;
    #{ attributes: #{ rb: c.rb, magpsf: c.magpsf, fid: c.fid, ra: c.ra, dec: c.dec },
       topic: if c.programid == 1 { \"ztf-public\" } else { \"ztf-other\" } } }";
const ZTF_LUA: &str = "function route(msg) local c = msg.alert.candidate
    return { attributes = { rb = c.rb, magpsf = c.magpsf, fid = c.fid, ra = c.ra, dec = c.dec },
       topic = c.programid == 1 and \"ztf-public\" or \"ztf-other\" } end";
const RUBIN_RHAI: &str = "fn route(msg) { let s = msg.alert.diaSource;
    #{ attributes: #{ diaSourceId: s.diaSourceId, ra: s.ra, dec: s.dec, band: s.band, snr: s.snr },
       topic: if (s.ssObjectId ?? 0) != 0 { \"lsst-ss\" } else { \"lsst-static\" } } }";
const RUBIN_LUA: &str = "function route(msg) local s = msg.alert.diaSource
    return { attributes = { diaSourceId = s.diaSourceId, ra = s.ra, dec = s.dec, band = s.band, snr = s.snr },
       topic = (s.ssObjectId or 0) ~= 0 and \"lsst-ss\" or \"lsst-static\" } end";

fn decoding(c: &mut Criterion) {
    let env = Environment {
        limits: Limits::default(),
        decoder: Arc::new(Decoder::new(SchemaSources {
            directory: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/schemas/lsst")),
            registry: None,
        })),
    };
    let ztf = alert();
    let rubin = sample_file("rubin/lsst_v9_0_wire_169298432645136561.avro");
    // The sample with the most history: 27 previous candidates.
    let ztf_long = sample_file("ztf/fink_v3.2_697252845215010000.avro");
    // A shipped rule: reads msg.survey, then the alert's head.
    let ztf_by_program = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ztf_by_program.rhai"),
    )
    .unwrap();
    let mut group = c.benchmark_group("alert");
    for (name, envelope) in [
        ("decode/rust-ztf", &ztf),
        ("decode/rust-ztf-27prv", &ztf_long),
        ("decode/rust-rubin", &rubin),
    ] {
        let decoder = Arc::clone(&env.decoder);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| decoder.decode(&envelope.payload).unwrap())
        });
    }
    // The BigQuery JSON form: decode the whole alert, then write its JSON.
    for (name, envelope) in [
        ("bigquery-json/ztf", &ztf),
        ("bigquery-json/ztf-27prv", &ztf_long),
        ("bigquery-json/rubin", &rubin),
    ] {
        let decoder = Arc::clone(&env.decoder);
        let mut out = Vec::with_capacity(64 * 1024);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let alert = decoder.decode(&envelope.payload).unwrap();
                out.clear();
                ztfhook::alert::bigquery::write_json(&alert, None, usize::MAX, &mut out).unwrap();
                out.len()
            })
        });
    }
    for (name, language, source, envelope) in [
        ("ztf-candidate/rhai", Language::Rhai, ZTF_RHAI, &ztf),
        ("ztf-candidate/lua", Language::Lua, ZTF_LUA, &ztf),
        (
            "ztf-27prv-candidate/rhai",
            Language::Rhai,
            ZTF_RHAI,
            &ztf_long,
        ),
        ("rubin-diasource/rhai", Language::Rhai, RUBIN_RHAI, &rubin),
        ("rubin-diasource/lua", Language::Lua, RUBIN_LUA, &rubin),
        (
            "ztf_by_program.rhai (27 previous)",
            Language::Rhai,
            &*ztf_by_program,
            &ztf_long,
        ),
    ] {
        let file = if language == Language::Rhai {
            "b.rhai"
        } else {
            "b.lua"
        };
        let mut hook = compile_source(language, file.into(), source, &env)
            .unwrap()
            .instantiate()
            .unwrap();
        assert!(!hook
            .decide(&MessageView::new(envelope))
            .unwrap()
            .attributes
            .is_empty());
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| hook.decide(&MessageView::new(envelope)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
