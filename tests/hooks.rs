//! Script hooks offline: Rhai and Lua give the same decisions on the real
//! sample alerts, limits stop runaway scripts, the Lua sandbox holds, and a
//! script edited on disk is swapped in (or rejected) while hooks run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::sample_alerts;
use ztfhook::envelope::Envelope;
use ztfhook::hook::reload::ScriptHooks;
use ztfhook::hook::script::{compile, compile_source, Language};
use ztfhook::hook::{Decision, Hook, HookFactory, MessageView, Passthrough};
use ztfhook::hook::{Environment, Limits};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

fn envelope(topic: &str, offset: i64, payload: Vec<u8>) -> Envelope {
    Envelope {
        topic: Arc::from(topic),
        partition: 0,
        offset,
        timestamp_ms: Some(1_764_000_000_000),
        key: None,
        headers: Vec::new(),
        payload: Bytes::from(payload),
        ..Default::default()
    }
}

fn hook_for(path: &Path) -> Box<dyn Hook> {
    compile(path, &Environment::default())
        .unwrap_or_else(|e| panic!("{e}"))
        .instantiate()
        .unwrap()
}

fn source_hook(language: Language, source: &str) -> Result<Box<dyn Hook>, String> {
    let name = match language {
        Language::Rhai => "test.rhai",
        Language::Lua => "test.lua",
    };
    compile_source(
        language,
        PathBuf::from(name),
        source,
        &Environment::new(Limits {
            max_operations: 100_000,
            ..Limits::default()
        }),
    )
    .and_then(|c| c.instantiate())
    .map_err(|e| e.to_string())
}

const TOPICS: [&str; 4] = [
    "ztf_20261125_programid1",
    "ztf_20261125_programid2",
    "ztf_20261125_programid3",
    "lsst-alerts-v11",
];

fn all_decisions(hook: &mut dyn Hook) -> Vec<Decision> {
    let mut out = Vec::new();
    for survey in ["ztf", "rubin"] {
        for (i, (_, payload)) in sample_alerts(survey).into_iter().enumerate() {
            for topic in TOPICS {
                out.push(
                    hook.decide(&MessageView::new(&envelope(
                        topic,
                        i as i64,
                        payload.clone(),
                    )))
                    .unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn passthrough_scripts_decide_exactly_as_the_builtin_hook_on_every_sample() {
    let builtin = all_decisions(&mut Passthrough);
    for file in ["passthrough.rhai", "passthrough.lua"] {
        assert_eq!(
            all_decisions(hook_for(&scripts().join(file)).as_mut()),
            builtin,
            "{file}"
        );
    }
    assert!(builtin.iter().all(|d| *d == Decision::pass()));
}

#[test]
fn programid_scripts_route_by_topic_name_identically_in_both_engines() {
    let rhai = all_decisions(hook_for(&scripts().join("ztf_programid.rhai")).as_mut());
    let lua = all_decisions(hook_for(&scripts().join("ztf_programid.lua")).as_mut());
    assert_eq!(rhai, lua);
    let expected: Vec<Vec<String>> = vec![
        vec!["ztf-public".into()],
        vec![],
        vec!["ztf-caltech".into()],
        vec![],
    ];
    for (i, d) in rhai.iter().enumerate() {
        assert!(d.keep);
        assert_eq!(d.topics, expected[i % 4], "topic {}", TOPICS[i % 4]);
    }
}

#[test]
fn both_engines_read_the_message_and_return_the_same_rich_decision() {
    let rhai = r#"
        fn route(msg) {
            if msg.size < 1000 { return false; }
            let magic = msg.payload()[0];
            #{ topics: ["alerts-" + msg.partition, "all-alerts"],
               attributes: #{ offset: msg.offset, magic: magic, big: msg.size > 100000, sampled: sample(msg.offset, 0.5), kb: msg.size / 1024.0, one: 1.0 },
               ordering_key: msg.topic }
        }"#;
    let lua = r#"
        function route(msg)
            if msg.size < 1000 then return false end
            local magic = string.byte(msg:payload(), 1)
            return { topics = { "alerts-" .. msg.partition, "all-alerts" },
                     attributes = { offset = msg.offset, magic = magic, big = msg.size > 100000, sampled = sample(msg.offset, 0.5), kb = msg.size / 1024.0, one = 1.0 },
                     ordering_key = msg.topic }
        end"#;
    let mut r = source_hook(Language::Rhai, rhai).unwrap();
    let mut l = source_hook(Language::Lua, lua).unwrap();
    let (mut kept, mut large) = (0, 0);
    for survey in ["ztf", "rubin"] {
        for (i, (name, payload)) in sample_alerts(survey).into_iter().enumerate() {
            large += usize::from(payload.len() >= 1000);
            let e = envelope("lsst-alerts-v11", i as i64, payload);
            let (dr, dl) = (
                r.decide(&MessageView::new(&e)).unwrap(),
                l.decide(&MessageView::new(&e)).unwrap(),
            );
            assert_eq!(dr, dl, "{name}");
            if dr.keep {
                kept += 1;
                assert_eq!(
                    dr.topics,
                    vec!["alerts-0".to_string(), "all-alerts".to_string()]
                );
                assert_eq!(dr.ordering_key.as_deref(), Some("lsst-alerts-v11"));
                assert!(dr.attributes.contains(&("offset".into(), i.to_string())));
            }
        }
    }
    // The tiny synthetic Rubin packets (< 1000 bytes) are dropped, the rest kept.
    assert_eq!(kept, large);
    assert!(kept > 20 && kept < 40, "{kept}");
}

#[test]
fn an_endless_loop_is_stopped_by_the_operation_limit_in_both_engines() {
    for (language, source) in [
        (
            Language::Rhai,
            "fn route(msg) { if msg.offset > 0 { loop { } } }",
        ),
        (
            Language::Lua,
            "function route(msg) if msg.offset > 0 then while true do end end end",
        ),
    ] {
        let mut hook = source_hook(language, source).unwrap();
        let started = Instant::now();
        let err = hook
            .decide(&MessageView::new(&envelope("t", 1, vec![1])))
            .unwrap_err()
            .to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{language:?} took {:?}",
            started.elapsed()
        );
        assert!(
            err.contains("limit") || err.contains("operations"),
            "{language:?}: {err}"
        );
    }
}

#[test]
fn a_syntax_error_names_the_file_and_line() {
    let e = source_hook(Language::Rhai, "fn route(msg) {\n  let x = ;\n}")
        .err()
        .expect("should be rejected");
    assert!(e.starts_with("hook test.rhai:2:"), "{e}");
    let e = source_hook(Language::Lua, "function route(msg)\n  local x = \nend")
        .err()
        .expect("should be rejected");
    assert!(
        e.contains("test.lua:3:") || e.contains("test.lua:2:"),
        "{e}"
    );
}

#[test]
fn a_script_without_route_is_rejected() {
    assert!(source_hook(Language::Rhai, "fn other(x) { }")
        .err()
        .unwrap()
        .contains("fn route(msg)"));
    assert!(source_hook(Language::Lua, "function other(x) end")
        .err()
        .unwrap()
        .contains("function route(msg)"));
}

#[test]
fn lua_has_no_io_os_require_or_dofile() {
    for body in [
        "io.open('/etc/passwd')",
        "os.execute('true')",
        "require('os')",
        "dofile('/etc/passwd')",
    ] {
        let mut hook = source_hook(
            Language::Lua,
            &format!("function route(msg) if msg.offset > 0 then {body} end end"),
        )
        .unwrap();
        let e = hook.decide(&MessageView::new(&envelope("t", 1, vec![1])));
        assert!(e.is_err(), "{body} ran");
    }
    // Bytecode: tests/sandbox.rs, which tells a refused load from a failed call.
}

#[test]
fn a_bad_return_value_is_an_error_naming_it() {
    let mut r = source_hook(Language::Rhai, "fn route(msg) { if msg.offset > 0 { 42 } }").unwrap();
    let e = r
        .decide(&MessageView::new(&envelope("t", 1, vec![1])))
        .unwrap_err()
        .to_string();
    assert!(e.contains("returned a i64"), "{e}");
    let mut l = source_hook(
        Language::Lua,
        "function route(msg) if msg.offset > 0 then return {colour = 1} end end",
    )
    .unwrap();
    let e = l
        .decide(&MessageView::new(&envelope("t", 1, vec![1])))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key `colour`"), "{e}");
}

#[test]
fn a_failing_call_names_its_cause_and_the_next_call_runs_normally() {
    // Three ways a call fails: the script raises, a field read fails (the
    // payload is not an alert), the instruction limit. Each must come back
    // as that error, and leave the hook as it was: a thousand rounds would
    // overflow a stack that each failure left a value on.
    for (language, source) in [
        (
            Language::Rhai,
            "fn route(msg) {
                if msg.offset % 4 == 1 { throw \"bad offset\" }
                if msg.offset % 4 == 2 { let a = msg.alert; }
                if msg.offset % 4 == 3 { loop { } }
                \"t-\" + msg.offset
            }",
        ),
        (
            Language::Lua,
            "function route(msg)
                if msg.offset % 4 == 1 then error(\"bad offset\") end
                if msg.offset % 4 == 2 then local a = msg.alert end
                if msg.offset % 4 == 3 then while true do end end
                return \"t-\" .. msg.offset
            end",
        ),
    ] {
        let mut hook = source_hook(language, source).unwrap();
        for offset in 0..1000 {
            let e = envelope("t", offset, vec![1, 2, 3]);
            let decided = hook.decide(&MessageView::new(&e));
            match (offset % 4, decided) {
                (0, Ok(d)) => assert_eq!(d.topics, [format!("t-{offset}")], "{language:?}"),
                (1, Err(e)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("bad offset") && e.contains(":2:"),
                        "{language:?}: {e}"
                    );
                }
                (2, Err(e)) => assert!(e.message.contains("not an alert"), "{language:?}: {e}"),
                (3, Err(e)) => assert!(e.message.contains("limit"), "{language:?}: {e}"),
                (_, other) => panic!("{language:?}, offset {offset}: {other:?}"),
            }
        }
    }
}

#[test]
fn msg_is_read_only_and_nothing_a_script_does_to_it_reaches_the_next_message() {
    for (language, source) in [
        (
            Language::Rhai,
            "fn route(msg) { if msg.offset > 0 { msg.note = 1; } }",
        ),
        (
            Language::Lua,
            "function route(msg) if msg.offset > 0 then msg.note = 1 end end",
        ),
    ] {
        let mut hook = source_hook(language, source).unwrap();
        let e = hook
            .decide(&MessageView::new(&envelope("t", 1, vec![1])))
            .unwrap_err();
        assert!(e.message.contains("note"), "{language:?}: {e}");
    }
    // Lua lets a call overwrite a field it was given; the next call still
    // sees its own message.
    let mut hook = source_hook(
        Language::Lua,
        "function route(msg) local seen = msg.topic .. \"/\" .. msg.offset
            msg.topic = \"changed\"; msg.offset = -1; return seen end",
    )
    .unwrap();
    for (topic, offset) in [("a", 1), ("b", 2)] {
        let d = hook
            .decide(&MessageView::new(&envelope(topic, offset, vec![1])))
            .unwrap();
        assert_eq!(d.topics, [format!("{topic}/{offset}")]);
    }
}

/// Replaces a file the way vim and `sed -i` do: write a new file, rename it over.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what} did not happen within 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

#[test]
fn an_edited_script_is_swapped_in_and_a_broken_edit_keeps_the_previous_one() {
    for ext in ["rhai", "lua"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("route.{ext}"));
        let (first, second, broken) = if ext == "rhai" {
            (
                "fn route(msg) { \"first\" }",
                "fn route(msg) { \"second\" }",
                "fn route(msg) { \"third\" ",
            )
        } else {
            (
                "function route(msg) return 'first' end",
                "function route(msg) return 'second' end",
                "function route(msg) return 'third' ",
            )
        };
        std::fs::write(&path, first).unwrap();
        let hooks = ScriptHooks::load(&path, Environment::default()).unwrap();
        let _watch = hooks.watch().unwrap();
        let mut hook = hooks.build().unwrap();
        let e = envelope("t", 0, vec![1]);
        let mut topic = || hook.decide(&MessageView::new(&e)).unwrap().topics;
        assert_eq!(topic(), vec!["first"]);

        save_by_rename(&path, second);
        let took = wait_until("the reload", || topic() == vec!["second"]);
        assert!(took < Duration::from_secs(1), "{ext}: reload took {took:?}");
        assert_eq!(hooks.reloads(), 1);

        save_by_rename(&path, broken);
        wait_until("the rejection", || hooks.rejected() == 1);
        assert_eq!(
            topic(),
            vec!["second"],
            "{ext}: the previous script keeps running"
        );

        // The watch survives rename-style saves: a good edit still lands.
        save_by_rename(&path, first);
        wait_until("the second reload", || topic() == vec!["first"]);
        assert_eq!(hooks.reloads(), 2);
    }
}

#[test]
fn the_routing_example_samples_the_same_messages_in_both_engines() {
    let mut r = hook_for(&scripts().join("ztf_route_sample.rhai"));
    let mut l = hook_for(&scripts().join("ztf_route_sample.lua"));
    let mut kept = 0;
    for offset in 0..2_000 {
        let e = envelope("ztf_20261125_programid2", offset, vec![0; 10]);
        let (dr, dl) = (
            r.decide(&MessageView::new(&e)).unwrap(),
            l.decide(&MessageView::new(&e)).unwrap(),
        );
        assert_eq!(dr, dl, "offset {offset}");
        kept += usize::from(dr.keep);
    }
    assert!((140..260).contains(&kept), "about 10% of 2000 kept: {kept}");
    let public = r
        .decide(&MessageView::new(&envelope(
            "ztf_20261125_programid1",
            7,
            vec![0; 10],
        )))
        .unwrap();
    assert_eq!(public.topics, vec!["ztf-public".to_string()]);
    assert!(public
        .attributes
        .contains(&("survey".to_string(), "ztf".to_string())));
}

#[test]
fn a_rhai_top_level_runs_once_per_hook_not_once_per_message_unless_it_defines_constants() {
    // The top level and one call each cost about 60% of the 100,000
    // operations a call may use: together, they would be over it.
    let source = r#"
        let warm = 0;
        for i in 0..20000 { warm += 1; }
        fn route(msg) {
            let n = 0;
            for i in 0..20000 { n += 1; }
            #{ attributes: #{ n: n } }
        }
    "#;
    let mut hook = source_hook(Language::Rhai, source).unwrap_or_else(|e| panic!("{e}"));
    for offset in 0..3 {
        hook.decide(&MessageView::new(&envelope("t", offset, b"x".to_vec())))
            .unwrap_or_else(|e| panic!("call {offset}: {e}"));
    }
    // The limit still stops a top level over it, at load.
    let over = source.replace("0..20000 { warm", "0..60000 { warm");
    let e = source_hook(Language::Rhai, &over)
        .err()
        .expect("over the limit at load");
    assert!(e.contains("at load") && e.contains("operations"), "{e}");
    // Constants (read as global::, shadowed by a `let`, or holding a
    // closure's state) behave as before: fresh in every call.
    let constants = r#"
        const LIMIT = 5;
        let LIMIT = 7;
        let n = 0;
        const COUNT = || { n += 1; n };
        fn route(msg) {
            #{ attributes: #{ limit: global::LIMIT, count: global::COUNT.call() } }
        }
    "#;
    let mut hook = source_hook(Language::Rhai, constants).unwrap_or_else(|e| panic!("{e}"));
    for offset in 0..3 {
        let d = hook
            .decide(&MessageView::new(&envelope("t", offset, b"x".to_vec())))
            .unwrap_or_else(|e| panic!("call {offset}: {e}"));
        let mut attrs = d.attributes.clone();
        attrs.sort();
        assert_eq!(
            attrs,
            vec![
                ("count".to_string(), "1".to_string()),
                ("limit".to_string(), "5".to_string())
            ]
        );
    }
}
