//! Alert-aware hooks offline, on the real sample alerts: every alert decodes
//! in both engines to the values MANIFEST.tsv lists; each example rule in
//! scripts/ decides as its comment says (run through `ztfhook check`); Rubin
//! schemas come from a directory or a registry; a schema version the decoder
//! has never seen decodes by its embedded schema; a payload that is not an
//! alert is an error that says why.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value as Json};
use ztfhook::alert::{Decoder, SchemaSources};
use ztfhook::envelope::Envelope;
use ztfhook::hook::sampling::sample;
use ztfhook::hook::script::{compile_source, Language};
use ztfhook::hook::{Decision, MessageView};
use ztfhook::hook::{Environment, Limits};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn schema_dir() -> PathBuf {
    repo().join("tests/data/schemas/lsst")
}

/// One ZTF sample: values from MANIFEST.tsv; `pure` from the alert's
/// candidate (rb, nbad, fwhm, elong, magdiff) read with fastavro.
struct Ztf {
    file: &'static str,
    object_id: &'static str,
    candid: i64,
    rb: f64,
    magpsf: f64,
    pure: bool,
}

#[rustfmt::skip]
const ZTF: &[Ztf] = &[
    Ztf { file: "fink_v3.2_697252845015010002.avro", object_id: "ZTF18acsbuxi", candid: 697252845015010002, rb: 0.293, magpsf: 20.28, pure: false },
    Ztf { file: "fink_v3.2_697252845115010001.avro", object_id: "ZTF17aabuxmr", candid: 697252845115010001, rb: 0.653, magpsf: 18.32, pure: true },
    Ztf { file: "fink_v3.2_697252845215010000.avro", object_id: "ZTF18abomhfb", candid: 697252845215010000, rb: 0.770, magpsf: 17.75, pure: false },
    Ztf { file: "fink_v3.2_697252845315010001.avro", object_id: "ZTF18acsbtas", candid: 697252845315010001, rb: 0.437, magpsf: 20.42, pure: false },
    Ztf { file: "fink_v3.2_697252845715010000.avro", object_id: "ZTF18acdmfuy", candid: 697252845715010000, rb: 0.317, magpsf: 17.62, pure: false },
    Ztf { file: "fink_v3.3_1095578115815010001.avro", object_id: "ZTF20aabaesm", candid: 1095578115815010001, rb: 0.291, magpsf: 14.58, pure: false },
    Ztf { file: "fink_v3.3_1095578115815010005.avro", object_id: "ZTF19acvegtc", candid: 1095578115815010005, rb: 0.591, magpsf: 15.66, pure: false },
    Ztf { file: "fink_v3.3_1095578115815010008.avro", object_id: "ZTF20aabaesr", candid: 1095578115815010008, rb: 0.459, magpsf: 15.34, pure: false },
    Ztf { file: "fink_v3.3_1095578115815010036.avro", object_id: "ZTF20aabaesy", candid: 1095578115815010036, rb: 0.597, magpsf: 16.56, pure: false },
    Ztf { file: "fink_v3.3_1095578115915010002.avro", object_id: "ZTF20aabaekp", candid: 1095578115915010002, rb: 0.500, magpsf: 15.61, pure: false },
    Ztf { file: "fink_v3.3_1095578115915010041.avro", object_id: "ZTF20aabaeku", candid: 1095578115915010041, rb: 0.684, magpsf: 16.32, pure: false },
    Ztf { file: "fink_v3.3_1095578115915015025.avro", object_id: "ZTF20aabaeky", candid: 1095578115915015025, rb: 0.474, magpsf: 16.97, pure: false },
    Ztf { file: "fink_v3.3_1095578116015010001.avro", object_id: "ZTF18acqsson", candid: 1095578116015010001, rb: 0.507, magpsf: 15.73, pure: false },
    Ztf { file: "fink_v3.3_1095578116115010003.avro", object_id: "ZTF18acpxdyo", candid: 1095578116115010003, rb: 0.524, magpsf: 14.71, pure: false },
    Ztf { file: "fink_v3.3_1095578116115010004.avro", object_id: "ZTF18acqucmw", candid: 1095578116115010004, rb: 0.621, magpsf: 14.98, pure: false },
    Ztf { file: "fink_v3.3_1095578116115010009.avro", object_id: "ZTF18acqtfeu", candid: 1095578116115010009, rb: 0.577, magpsf: 14.51, pure: false },
    Ztf { file: "fink_v3.3_1095578116115010011.avro", object_id: "ZTF18acqucmk", candid: 1095578116115010011, rb: 0.379, magpsf: 15.27, pure: false },
    Ztf { file: "fink_v3.3_1095578116215010002.avro", object_id: "ZTF20aabaekb", candid: 1095578116215010002, rb: 0.503, magpsf: 15.70, pure: false },
    Ztf { file: "fink_v3.3_1095578116215010035.avro", object_id: "ZTF20aabaejz", candid: 1095578116215010035, rb: 0.336, magpsf: 13.41, pure: false },
    Ztf { file: "fink_v3.3_1095578116215015006.avro", object_id: "ZTF18acqtwgi", candid: 1095578116215015006, rb: 0.577, magpsf: 16.51, pure: false },
    Ztf { file: "fink_v3.3_1095578116315015000.avro", object_id: "ZTF20aabadts", candid: 1095578116315015000, rb: 0.419, magpsf: 16.48, pure: false },
    Ztf { file: "fink_v3.3_1095578116315015004.avro", object_id: "ZTF20aabadtn", candid: 1095578116315015004, rb: 0.307, magpsf: 16.17, pure: false },
    Ztf { file: "pgc_ztf_public_20221229_ZTF18abfkwnk_2188216843315010016.v3_3.avro", object_id: "ZTF18abfkwnk", candid: 2188216843315010016, rb: 0.453, magpsf: 16.98, pure: false },
];

/// One Rubin sample, from MANIFEST.tsv (`ss_object_id` 0 where it lists None).
struct Rubin {
    file: &'static str,
    schema_id: u32,
    ss_object_id: i64,
    snr: f64,
    band: &'static str,
}

#[rustfmt::skip]
const RUBIN: &[Rubin] = &[
    Rubin { file: "lsst_v9_0_wire_169298432645136561.avro", schema_id: 900, ss_object_id: 21164719644750924, snr: 45.97977066040039, band: "i" },
    Rubin { file: "lsst_v9_0_wire_169298432742653968.avro", schema_id: 900, ss_object_id: 0, snr: 11.982287406921387, band: "i" },
    Rubin { file: "lsst_v9_0_wire_169298432757858307.avro", schema_id: 900, ss_object_id: 21164715316492612, snr: 21.429519653320312, band: "i" },
    Rubin { file: "lsst_v9_0_wire_169298432774111247.avro", schema_id: 900, ss_object_id: 0, snr: 5.855563163757324, band: "i" },
    Rubin { file: "pgc_lsst.v10_0.avro", schema_id: 1000, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v11_0.avro", schema_id: 1100, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v7_0.avro", schema_id: 700, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v7_1.avro", schema_id: 701, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v7_2.avro", schema_id: 702, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v7_3.avro", schema_id: 703, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v7_4.avro", schema_id: 704, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v8_0.avro", schema_id: 800, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
    Rubin { file: "pgc_lsst.v9_0.avro", schema_id: 900, ss_object_id: 0, snr: 41.099998474121094, band: "r" },
];

fn alert_path(survey: &str, file: &str) -> PathBuf {
    repo().join("tests/data/alerts").join(survey).join(file)
}

fn envelope(payload: Vec<u8>) -> Envelope {
    Envelope {
        topic: Arc::from("ztf_20261125_programid1"),
        partition: 0,
        offset: 7,
        timestamp_ms: None,
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(payload),
        ..Default::default()
    }
}

fn decide(
    language: Language,
    source: &str,
    env: &Environment,
    payload: Vec<u8>,
) -> Result<Decision, String> {
    let name = match language {
        Language::Rhai => "t.rhai",
        Language::Lua => "t.lua",
    };
    let mut hook = compile_source(language, PathBuf::from(name), source, env)
        .and_then(|c| c.instantiate())
        .map_err(|e| e.to_string())?;
    hook.decide(&MessageView::new(&envelope(payload)))
        .map_err(|e| e.to_string())
}

fn attrs(d: &Decision) -> HashMap<String, String> {
    d.attributes.iter().cloned().collect()
}

fn env_with_dir() -> Environment {
    Environment {
        limits: Limits::default(),
        decoder: Arc::new(Decoder::new(SchemaSources {
            directory: Some(schema_dir()),
            registry: None,
        })),
    }
}

const READ_ZTF_RHAI: &str = r#"
fn route(msg) {
    let a = msg.alert;
    #{ attributes: #{ survey: msg.survey, objectId: a.objectId, candid: a.candid,
        rb: a.candidate.rb, magpsf: a.candidate.magpsf, programid: a.candidate.programid,
        n_prv: a.prv_candidates.len(), cutout: a.cutoutScience.stampData.len(),
        has_fp: a.has("fp_hists") } }
}"#;

const READ_ZTF_LUA: &str = r#"
function route(msg)
  local a = msg.alert
  return { attributes = { survey = msg.survey, objectId = a.objectId, candid = a.candid,
    rb = a.candidate.rb, magpsf = a.candidate.magpsf, programid = a.candidate.programid,
    n_prv = #a.prv_candidates, cutout = #a.cutoutScience.stampData,
    has_fp = has(a, "fp_hists") } }
end"#;

#[test]
fn every_ztf_sample_decodes_in_both_engines_to_its_manifest_values() {
    let env = Environment::default();
    for z in ZTF {
        let payload = std::fs::read(alert_path("ztf", z.file)).unwrap();
        let rhai = decide(Language::Rhai, READ_ZTF_RHAI, &env, payload.clone()).unwrap();
        let lua = decide(Language::Lua, READ_ZTF_LUA, &env, payload).unwrap();
        assert_eq!(rhai, lua, "{}", z.file);
        let a = attrs(&rhai);
        assert_eq!(a["survey"], "ztf");
        assert_eq!(a["objectId"], z.object_id, "{}", z.file);
        assert_eq!(a["candid"], z.candid.to_string());
        assert_eq!(a["programid"], "1");
        let rb: f64 = a["rb"].parse().unwrap();
        assert!((rb - z.rb).abs() < 0.001, "{}: rb {rb}", z.file);
        let magpsf: f64 = a["magpsf"].parse().unwrap();
        assert!(
            (magpsf - z.magpsf).abs() < 0.01,
            "{}: magpsf {magpsf}",
            z.file
        );
        assert!(a["cutout"].parse::<usize>().unwrap() > 1000, "{}", z.file);
        assert_eq!(a["has_fp"], "false");
    }
}

const READ_RUBIN_RHAI: &str = r#"
fn route(msg) {
    let s = msg.alert.diaSource;
    #{ attributes: #{ survey: msg.survey, schema_id: msg.schema_id, version: msg.schema_version,
        ss: s.ssObjectId ?? 0, snr: s.snr, band: s.band, ra: s.ra } }
}"#;

const READ_RUBIN_LUA: &str = r#"
function route(msg)
  local s = msg.alert.diaSource
  return { attributes = { survey = msg.survey, schema_id = msg.schema_id, version = msg.schema_version,
    ss = s.ssObjectId or 0, snr = s.snr, band = s.band, ra = s.ra } }
end"#;

#[test]
fn every_rubin_sample_decodes_in_both_engines_with_schemas_from_a_directory() {
    let env = env_with_dir();
    for r in RUBIN {
        let payload = std::fs::read(alert_path("rubin", r.file)).unwrap();
        let rhai = decide(Language::Rhai, READ_RUBIN_RHAI, &env, payload.clone()).unwrap();
        let lua = decide(Language::Lua, READ_RUBIN_LUA, &env, payload).unwrap();
        assert_eq!(rhai, lua, "{}", r.file);
        let a = attrs(&rhai);
        assert_eq!(a["survey"], "lsst");
        assert_eq!(a["schema_id"], r.schema_id.to_string(), "{}", r.file);
        assert_eq!(
            a["version"],
            format!("{}.{}", r.schema_id / 100, r.schema_id % 100)
        );
        assert_eq!(a["ss"], r.ss_object_id.to_string(), "{}", r.file);
        let snr: f64 = a["snr"].parse().unwrap();
        assert!((snr - r.snr).abs() < 1e-9, "{}: snr {snr}", r.file);
        assert_eq!(a["band"], r.band);
    }
}

/// `ztfhook check --json` of a script over every sample: file name to decision.
fn check(script: &str) -> HashMap<String, Json> {
    let out = Command::new(env!("CARGO_BIN_EXE_ztfhook"))
        .args(["check", "--json", "--script"])
        .arg(repo().join("scripts").join(script))
        .arg("--schema-dir")
        .arg(schema_dir())
        .arg(repo().join("tests/data/alerts"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut decisions = HashMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let d: Json = serde_json::from_str(line).unwrap();
        let file = Path::new(d["file"].as_str().unwrap())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        decisions.insert(file, d);
    }
    assert_eq!(decisions.len(), ZTF.len() + RUBIN.len(), "{script}");
    decisions
}

fn both(script: &str) -> HashMap<String, Json> {
    let rhai = check(&format!("{script}.rhai"));
    let lua = check(&format!("{script}.lua"));
    assert_eq!(rhai, lua, "{script}: the engines disagree");
    rhai
}

#[test]
fn ztf_by_program_routes_public_alerts_with_the_standard_attributes() {
    let d = both("ztf_by_program");
    for z in ZTF {
        let got = &d[z.file];
        assert_eq!(got["topics"], json!(["ztf-public"]), "{}", z.file);
        let a = &got["attributes"];
        assert_eq!(a["objectId"], z.object_id);
        assert_eq!(a["candid"], z.candid.to_string());
        assert_eq!(
            a["schemavsn"],
            if z.file.contains("v3.2") {
                "3.2"
            } else {
                "3.3"
            }
        );
        for key in ["ra", "dec", "fid"] {
            assert!(a[key].is_string(), "{}: {key}", z.file);
        }
    }
    for r in RUBIN {
        assert_eq!(d[r.file]["topics"], json!([]), "{}: default topic", r.file);
    }
}

#[test]
fn ztf_quality_keeps_good_alerts_samples_a_tenth_of_the_rest_and_marks_pure_ones() {
    let d = both("ztf_quality");
    let mut sampled_low = 0;
    for z in ZTF {
        let got = &d[z.file];
        // Every sample has nbad == 0, so rb alone decides.
        let low = z.rb < 0.55;
        let keep = !low || sample(&z.candid.to_string(), 0.1);
        assert_eq!(got["keep"], json!(keep), "{}", z.file);
        if keep {
            sampled_low += usize::from(low);
            assert_eq!(
                got["attributes"]["is_pure"],
                z.pure.to_string(),
                "{}",
                z.file
            );
            assert_eq!(got["attributes"]["low_quality"], low.to_string());
        }
    }
    let good = ZTF.iter().filter(|z| z.rb >= 0.55).count();
    assert_eq!(good, 8);
    assert!(
        sampled_low <= 3,
        "{sampled_low} of 15 low-quality alerts kept"
    );
    for r in RUBIN {
        assert_eq!(d[r.file]["keep"], json!(true));
    }
}

#[test]
fn lsst_by_schema_routes_by_the_header_version() {
    let d = both("lsst_by_schema");
    for r in RUBIN {
        let got = &d[r.file];
        assert_eq!(
            got["topics"],
            json!([format!("lsst-alerts-v{}", r.schema_id / 100)]),
            "{}",
            r.file
        );
        assert_eq!(
            got["attributes"]["schema_version"],
            format!("{}.{}", r.schema_id / 100, r.schema_id % 100)
        );
    }
    for z in ZTF {
        assert_eq!(d[z.file]["topics"], json!([]));
    }
}

#[test]
fn lsst_solar_system_splits_moving_from_static_sources() {
    let d = both("lsst_solar_system");
    for r in RUBIN {
        let got = &d[r.file];
        let a = &got["attributes"];
        if r.ss_object_id != 0 {
            assert_eq!(got["topics"], json!(["lsst-solar-system"]), "{}", r.file);
            assert_eq!(a["ssObjectId"], r.ss_object_id.to_string());
        } else {
            assert_eq!(got["topics"], json!(["lsst-static"]), "{}", r.file);
            assert!(a.get("ssObjectId").is_none());
        }
        assert_eq!(a["band"], r.band);
        assert!(a["diaSourceId"].is_string() && a["ra"].is_string() && a["dec"].is_string());
    }
    let moving = RUBIN.iter().filter(|r| r.ss_object_id != 0).count();
    assert_eq!(moving, 2);
}

#[test]
fn bright_alerts_are_fanned_out_to_the_fast_lane_as_well() {
    let d = both("bright_fast_lane");
    for z in ZTF {
        let expected = if z.magpsf < 18.0 {
            json!(["@default", "alerts-bright"])
        } else {
            json!([])
        };
        assert_eq!(d[z.file]["topics"], expected, "{}", z.file);
    }
    for r in RUBIN {
        let expected = if r.snr > 50.0 {
            json!(["@default", "alerts-bright"])
        } else {
            json!([])
        };
        assert_eq!(d[r.file]["topics"], expected, "{}", r.file);
    }
}

#[test]
fn a_payload_that_is_not_an_alert_is_an_error_saying_why() {
    let env = env_with_dir();
    for (payload, why) in [
        (
            b"hello".to_vec(),
            "not an alert: 5 bytes starting 68 65 6c 6c",
        ),
        (b"Obj\x01\x02".to_vec(), "truncated"),
        (vec![0, 0, 0, 0x03, 0x84, 1, 2], "schema id 900"),
        (vec![0, 0, 0, 0x7f, 0x7f, 1, 2], "schema id 32639"),
    ] {
        for (language, source) in [
            (Language::Rhai, READ_RUBIN_RHAI),
            (Language::Lua, READ_RUBIN_LUA),
        ] {
            let e = decide(language, source, &env, payload.clone()).unwrap_err();
            assert!(
                e.contains("does not decode as an alert") && e.contains(why),
                "{language:?}: {e}"
            );
        }
    }
}

#[test]
fn a_missing_field_is_an_error_naming_the_record_and_the_field() {
    let payload = std::fs::read(alert_path("ztf", ZTF[0].file)).unwrap();
    let e = decide(
        Language::Rhai,
        "fn route(msg) { msg.alert.candidate.rbb }",
        &Environment::default(),
        payload.clone(),
    )
    .unwrap_err();
    assert!(
        e.contains("record `ztf.alert.candidate` has no field `rbb`"),
        "{e}"
    );
    let e = decide(
        Language::Lua,
        "function route(msg) return msg.alert.candidate.rbb end",
        &Environment::default(),
        payload,
    )
    .unwrap_err();
    assert!(e.contains("has no field `rbb`"), "{e}");
}

#[test]
fn a_hook_decodes_the_head_of_an_alert_first_and_the_history_only_when_read() {
    let decoder = Decoder::default();
    for z in ZTF {
        let payload = Bytes::from(std::fs::read(alert_path("ztf", z.file)).unwrap());
        let head = decoder.decode_head(&payload).unwrap();
        let whole = decoder.decode(&payload).unwrap();
        assert!(!head.is_complete() && whole.is_complete(), "{}", z.file);
        assert!(head.path("candidate.rb").is_some(), "{}", z.file);
        assert_eq!(
            head.field(head.root(), "prv_candidates"),
            None,
            "{}",
            z.file
        );
        assert_eq!(
            head.to_json(head.path("candidate").unwrap()),
            whole.to_json(whole.path("candidate").unwrap()),
            "{}",
            z.file
        );
        // Read through a hook, the history is the whole decode's.
        let n_prv = whole.items(whole.path("prv_candidates").unwrap()).len();
        for (language, source) in [
            (
                Language::Rhai,
                "fn route(msg) { let rb = msg.alert.candidate.rb; msg.alert.prv_candidates.len().to_string() }",
            ),
            (
                Language::Lua,
                "function route(msg) local rb = msg.alert.candidate.rb return tostring(#msg.alert.prv_candidates) end",
            ),
        ] {
            let d = decide(language, source, &Environment::default(), payload.to_vec()).unwrap();
            assert_eq!(d.topics, [n_prv.to_string()], "{language:?} {}", z.file);
        }
    }
}

#[test]
fn an_alert_cut_short_gives_its_head_and_an_error_naming_the_cut_for_the_rest() {
    let z = &ZTF[5];
    let mut payload = std::fs::read(alert_path("ztf", z.file)).unwrap();
    payload.truncate(payload.len() - 100);
    for (language, head, rest) in [
        (
            Language::Rhai,
            "fn route(msg) { msg.alert.candidate.candid.to_string() }",
            "fn route(msg) { msg.alert.cutoutDifference.stampData.len().to_string() }",
        ),
        (
            Language::Lua,
            "function route(msg) return tostring(msg.alert.candidate.candid) end",
            "function route(msg) return tostring(#msg.alert.cutoutDifference.stampData) end",
        ),
    ] {
        let env = Environment::default();
        let d = decide(language, head, &env, payload.clone()).unwrap();
        assert_eq!(d.topics, [z.candid.to_string()], "{language:?}");
        let e = decide(language, rest, &env, payload.clone()).unwrap_err();
        assert!(
            e.contains("does not decode as an alert") && e.contains("runs past the end"),
            "{language:?}: {e}"
        );
    }
}

#[test]
fn a_rubin_schema_is_trusted_for_head_decoding_only_after_it_decoded_a_whole_alert() {
    let decoder = Decoder::new(SchemaSources {
        directory: Some(schema_dir()),
        registry: None,
    });
    let payload = Bytes::from(std::fs::read(alert_path("rubin", RUBIN[0].file)).unwrap());
    let first = decoder.decode_head(&payload).unwrap();
    assert!(
        first.is_complete(),
        "the first alert of a schema id is decoded whole"
    );
    let second = decoder.decode_head(&payload).unwrap();
    assert!(!second.is_complete());
    assert_eq!(
        second.to_json(second.path("diaSource").unwrap()),
        first.to_json(first.path("diaSource").unwrap())
    );
    // A payload that the schema leaves bytes over from is refused first.
    let mut longer = payload.to_vec();
    longer.extend_from_slice(&[0; 8]);
    let fresh = Decoder::new(SchemaSources {
        directory: Some(schema_dir()),
        registry: None,
    });
    let e = fresh.decode_head(&Bytes::from(longer)).unwrap_err();
    assert!(e.0.contains("8 bytes left over"), "{e}");
}

// ---- a ZTF schema version the decoder has never seen -----------------------

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

fn read_varint(buf: &[u8], pos: &mut usize) -> i64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let b = buf[*pos];
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return (v >> 1) as i64 ^ -((v & 1) as i64);
        }
        shift += 7;
    }
}

/// Splits a one-record container into its schema text and the datum.
fn split_container(file: &[u8]) -> (String, Vec<u8>) {
    let mut pos = 4;
    let mut schema = None;
    loop {
        let n = read_varint(file, &mut pos);
        if n == 0 {
            break;
        }
        for _ in 0..n {
            let k = read_varint(file, &mut pos) as usize;
            let key = file[pos..pos + k].to_vec();
            pos += k;
            let v = read_varint(file, &mut pos) as usize;
            if key == b"avro.schema" {
                schema = Some(String::from_utf8(file[pos..pos + v].to_vec()).unwrap());
            }
            pos += v;
        }
    }
    pos += 16;
    assert_eq!(read_varint(file, &mut pos), 1);
    let size = read_varint(file, &mut pos) as usize;
    (schema.unwrap(), file[pos..pos + size].to_vec())
}

fn container(schema: &str, datum: &[u8]) -> Vec<u8> {
    let mut out = b"Obj\x01".to_vec();
    zigzag(1, &mut out);
    zigzag(11, &mut out);
    out.extend(b"avro.schema");
    zigzag(schema.len() as i64, &mut out);
    out.extend(schema.as_bytes());
    zigzag(0, &mut out);
    let sync = [7u8; 16];
    out.extend(sync);
    zigzag(1, &mut out);
    zigzag(datum.len() as i64, &mut out);
    out.extend(datum);
    out.extend(sync);
    out
}

#[test]
fn a_new_ztf_schema_version_decodes_by_its_embedded_schema() {
    // A 3.3 alert grown the way 4.02 grew: a new array of forced-photometry
    // records, here appended to the alert record, and a new version string.
    let original = std::fs::read(alert_path("ztf", ZTF[5].file)).unwrap();
    let (schema, mut datum) = split_container(&original);
    let mut schema: Json = serde_json::from_str(&schema).unwrap();
    schema["fields"].as_array_mut().unwrap().push(json!({
        "name": "fp_hists", "default": null,
        "type": ["null", {"type": "array", "items": {"type": "record", "name": "fp_hist",
            "fields": [{"name": "field", "type": ["null", "int"]},
                       {"name": "forcediffimflux", "type": ["null", "float"]}]}}]
    }));
    zigzag(1, &mut datum); // union branch: the array
    zigzag(2, &mut datum); // a block of two items
    zigzag(1, &mut datum);
    zigzag(680, &mut datum);
    zigzag(1, &mut datum);
    datum.extend(123.5f32.to_le_bytes());
    zigzag(0, &mut datum);
    zigzag(0, &mut datum);
    zigzag(0, &mut datum); // end of the array
    let payload = container(&schema.to_string(), &datum);
    let rhai = r#"fn route(msg) { let a = msg.alert;
        #{ attributes: #{ n: a.fp_hists.len(), field: a.fp_hists[0].field,
           flux: a.fp_hists[0].forcediffimflux, missing: a.fp_hists[1].field ?? "null",
           rb: a.candidate.rb } } }"#;
    let lua = r#"function route(msg) local a = msg.alert
        return { attributes = { n = #a.fp_hists, field = a.fp_hists[1].field,
           flux = a.fp_hists[1].forcediffimflux, missing = a.fp_hists[2].field or "null",
           rb = a.candidate.rb } } end"#;
    let env = Environment::default();
    let r = decide(Language::Rhai, rhai, &env, payload.clone()).unwrap();
    let l = decide(Language::Lua, lua, &env, payload).unwrap();
    assert_eq!(r, l);
    let a = attrs(&r);
    assert_eq!(a["n"], "2");
    assert_eq!(a["field"], "680");
    assert_eq!(a["flux"], "123.5");
    assert_eq!(a["missing"], "null");
    assert!((a["rb"].parse::<f64>().unwrap() - ZTF[5].rb).abs() < 0.001);
}

// ---- a Confluent-compatible schema registry ---------------------------------

/// Rubin's schema for `id` with every named record written out in place, as
/// a registry serves it.
fn self_contained_schema(id: u32) -> String {
    let folder = schema_dir()
        .join((id / 100).to_string())
        .join((id % 100).to_string());
    let mut files = HashMap::new();
    let mut root = None;
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        let json: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let full = format!(
            "{}.{}",
            json["namespace"].as_str().unwrap(),
            json["name"].as_str().unwrap()
        );
        if path.to_string_lossy().ends_with(".alert.avsc") {
            root = Some(json.clone());
        }
        files.insert(full, json);
    }
    fn inline(v: Json, files: &HashMap<String, Json>, seen: &mut HashSet<String>) -> Json {
        match v {
            Json::String(s) if files.contains_key(&s) && seen.insert(s.clone()) => {
                inline(files[&s].clone(), files, seen)
            }
            Json::Array(items) => {
                Json::Array(items.into_iter().map(|i| inline(i, files, seen)).collect())
            }
            Json::Object(o) => Json::Object(
                o.into_iter()
                    .map(|(k, v)| (k, inline(v, files, seen)))
                    .collect(),
            ),
            other => other,
        }
    }
    inline(root.unwrap(), &files, &mut HashSet::new()).to_string()
}

/// Serves `GET /schemas/ids/{id}` for the given schemas on a free loopback
/// port until `requests` requests were answered; returns its base URL.
fn registry(
    schemas: HashMap<u32, String>,
    requests: usize,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            seen.push(path.clone());
            let id: Option<u32> = path
                .strip_prefix("/schemas/ids/")
                .and_then(|i| i.parse().ok());
            let (status, body) = match id.and_then(|i| schemas.get(&i)) {
                Some(s) => ("200 OK", json!({ "schema": s }).to_string()),
                None => (
                    "404 Not Found",
                    r#"{"error_code":40403,"message":"Schema not found"}"#.to_string(),
                ),
            };
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let _ = stream.read(&mut [0u8; 0]);
        }
        seen
    });
    (url, handle)
}

#[test]
fn rubin_schemas_come_from_a_registry_once_per_id() {
    let (url, server) = registry(HashMap::from([(900, self_contained_schema(900))]), 2);
    let env = Environment {
        limits: Limits::default(),
        decoder: Arc::new(Decoder::new(SchemaSources {
            directory: None,
            registry: Some(url.clone()),
        })),
    };
    let v9: Vec<&Rubin> = RUBIN.iter().filter(|r| r.schema_id == 900).collect();
    let mut hook = compile_source(
        Language::Rhai,
        PathBuf::from("t.rhai"),
        READ_RUBIN_RHAI,
        &env,
    )
    .unwrap()
    .instantiate()
    .unwrap();
    for r in &v9 {
        let payload = std::fs::read(alert_path("rubin", r.file)).unwrap();
        let d = hook.decide(&MessageView::new(&envelope(payload))).unwrap();
        assert_eq!(attrs(&d)["ss"], r.ss_object_id.to_string(), "{}", r.file);
    }
    // An id the registry does not have: the error names the registry's answer.
    let payload = std::fs::read(alert_path("rubin", "pgc_lsst.v10_0.avro")).unwrap();
    let e = hook
        .decide(&MessageView::new(&envelope(payload)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("schema id 1000") && e.contains("HTTP 404"),
        "{e}"
    );
    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        vec!["/schemas/ids/900", "/schemas/ids/1000"],
        "one request per id"
    );
    assert_eq!(v9.len(), 5);
}

#[test]
fn the_pipeline_script_sends_each_survey_to_its_raw_and_json_topics_and_the_archive() {
    let d = both("alert_pipeline");
    for z in ZTF {
        let got = &d[z.file];
        assert_eq!(
            got["topics"],
            json!(["ztf-alerts", "ztf-alerts-bigquery"]),
            "{}",
            z.file
        );
        assert_eq!(got["objects"], json!(["@archive"]), "{}", z.file);
    }
    for r in RUBIN {
        let got = &d[r.file];
        assert_eq!(
            got["topics"],
            json!(["lsst-alerts", "lsst-alerts-bigquery"]),
            "{}",
            r.file
        );
        let objects = got["objects"].as_array().unwrap();
        assert_eq!(objects.len(), 1, "{}", r.file);
        let name = objects[0].as_str().unwrap();
        assert!(name.starts_with("gs://my-alert-archive/"), "{name}");
        assert!(
            name.ends_with(".avro") && !name.contains("//ztf") && !name.contains("/nil/"),
            "{name}"
        );
        if let Some(id) = r.file.strip_prefix("lsst_v9_0_wire_") {
            // The real LSSTCam samples are named by their diaSourceId.
            assert!(name.ends_with(&format!("/{id}")), "{name}");
        }
    }
}
