//! Hostile scripts: every part of a script runs under the limits, at first
//! load and at every reload; Rhai has no modules and a memory bound; Lua's
//! `msg` is fresh for every call; `load` works as Lua documents it, text
//! only.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ztfhook::envelope::Envelope;
use ztfhook::hook::reload::ScriptHooks;
use ztfhook::hook::script::{compile_source, Language};
use ztfhook::hook::{Environment, Limits};
use ztfhook::hook::{Hook, HookFactory, MessageView};

fn envelope(offset: i64, payload: &[u8]) -> Envelope {
    Envelope {
        topic: Arc::from("t"),
        partition: 0,
        offset,
        payload: Bytes::copy_from_slice(payload),
        ..Default::default()
    }
}

fn small_limits() -> Environment {
    Environment::new(Limits {
        max_operations: 100_000,
        max_memory_bytes: 16 << 20,
        ..Limits::default()
    })
}

fn load(language: Language, source: &str) -> Result<Box<dyn Hook>, String> {
    let name = match language {
        Language::Rhai => "hostile.rhai",
        Language::Lua => "hostile.lua",
    };
    compile_source(language, PathBuf::from(name), source, &small_limits())
        .and_then(|c| c.instantiate())
        .map_err(|e| e.to_string())
}

/// The topic a hook returns for message `offset`, or its error.
fn decide(hook: &mut dyn Hook, offset: i64) -> Result<String, String> {
    hook.decide(&MessageView::new(&envelope(offset, b"\x01\x02\x03")))
        .map(|d| d.topics.join(","))
        .map_err(|e| e.to_string())
}

#[test]
fn a_top_level_that_never_ends_is_stopped_by_the_limit_at_load_in_both_engines() {
    for (language, source) in [
        (Language::Lua, "while true do end\nfunction route(msg) end"),
        (Language::Rhai, "loop { }\nfn route(msg) { }"),
    ] {
        let started = Instant::now();
        let e = load(language, source)
            .err()
            .expect("a script that never loads");
        assert!(e.contains("limit"), "{language:?}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{language:?}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn check_on_a_script_whose_top_level_never_ends_exits_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("forever.lua");
    std::fs::write(&script, "while true do end\nfunction route(msg) end\n").unwrap();
    let alerts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/alerts/ztf");
    let mut child = std::process::Command::new(common::bin())
        .args(["check", "--script"])
        .arg(&script)
        .arg(&alerts)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("`ztfhook check` still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("forever.lua") && err.contains("limit"),
        "{err}"
    );
}

/// Replaces a file the way vim and `sed -i` do.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reload_that_never_finishes_loading_keeps_the_previous_hook_and_the_watcher() {
    for (ext, good, forever, better) in [
        (
            "lua",
            "function route(msg) return 'first' end",
            "while true do end\nfunction route(msg) return 'never' end",
            "function route(msg) return 'second' end",
        ),
        (
            "rhai",
            "fn route(msg) { \"first\" }",
            "loop { }\nfn route(msg) { \"never\" }",
            "fn route(msg) { \"second\" }",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("route.{ext}"));
        std::fs::write(&path, good).unwrap();
        let hooks = ScriptHooks::load(&path, small_limits()).unwrap();
        let _watch = hooks.watch().unwrap();
        let mut hook = hooks.build().unwrap();
        assert_eq!(decide(hook.as_mut(), 0).unwrap(), "first");

        save_by_rename(&path, forever);
        wait_until("the rejection", || hooks.rejected() == 1);
        assert_eq!(decide(hook.as_mut(), 1).unwrap(), "first", "{ext}");

        // The watcher is alive: the next edit is picked up.
        save_by_rename(&path, better);
        wait_until("the next reload", || {
            decide(hook.as_mut(), 2).unwrap() == "second"
        });
        assert_eq!((hooks.reloads(), hooks.rejected()), (1, 1), "{ext}");
    }
}

#[test]
fn rhai_import_is_refused_and_no_file_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("evil.rhai");
    std::fs::write(&module, "fn topic() { \"from-a-file\" }").unwrap();
    let source = format!(
        "import \"{}\" as m;\nfn route(msg) {{ m::topic() }}",
        module.with_extension("").display()
    );
    let e = load(Language::Rhai, &source).err().expect("import refused");
    assert!(e.contains("hostile.rhai:1:") && e.contains("import"), "{e}");
    // Inside a function too.
    let source = format!(
        "fn route(msg) {{ import \"{}\" as m; m::topic() }}",
        module.with_extension("").display()
    );
    let e = load(Language::Rhai, &source).err().expect("import refused");
    assert!(e.contains("import"), "{e}");
}

#[test]
fn one_rhai_value_over_the_memory_bound_is_stopped_before_it_is_allocated() {
    let mut hook = load(
        Language::Rhai,
        "fn route(msg) { if msg.offset > 0 { let a = []; a.pad(16000000, 0); } }",
    )
    .unwrap();
    let before = ztfhook::memory::held();
    let e = decide(hook.as_mut(), 1).unwrap_err();
    let grew = ztfhook::memory::held() - before;
    assert!(e.contains("over the memory limit of 16 MiB"), "{e}");
    assert!(grew < 1 << 20, "the call left {grew} bytes allocated");
    // The hook goes on.
    assert_eq!(decide(hook.as_mut(), 0).unwrap(), "");
}

#[test]
fn many_rhai_values_each_under_the_bound_are_stopped_together() {
    // Each string is 4 MiB, under the 16 MiB bound for one value; ten of
    // them, each in its own variable, are not.
    let mut hook = load(
        Language::Rhai,
        "fn route(msg) {
            if msg.offset > 0 {
                let a = \"\"; a.pad(4000000, \"x\");
                let b = a + \"1\"; let c = a + \"2\"; let d = a + \"3\"; let e = a + \"4\";
                let f = a + \"5\"; let g = a + \"6\"; let h = a + \"7\"; let i = a + \"8\";
                let j = a + \"9\";
                \"held \" + (a.len() + j.len())
            }
        }",
    )
    .unwrap();
    let e = decide(hook.as_mut(), 1).unwrap_err();
    assert!(e.contains("over the memory limit of 16 MiB"), "{e}");
    // Under the bound, the same kind of script runs.
    let mut small = load(
        Language::Rhai,
        "fn route(msg) { let a = \"\"; a.pad(1000000, \"x\"); let b = a + \"1\"; \"held \" + (a.len() + b.len()) }",
    )
    .unwrap();
    assert_eq!(decide(small.as_mut(), 1).unwrap(), "held 2000001");
}

#[test]
fn lua_memory_is_bounded_at_the_top_level_and_in_calls() {
    let e = load(
        Language::Lua,
        "big = string.rep('x', 64 * 1024 * 1024)\nfunction route(msg) end",
    )
    .err()
    .expect("over the bound at load");
    assert!(e.contains("memory"), "{e}");
    let mut hook = load(
        Language::Lua,
        "function route(msg) if msg.offset > 0 then local t = {} for i = 1, 100 do t[i] = string.rep('y', 1024 * 1024) .. i end end end",
    )
    .unwrap();
    let e = decide(hook.as_mut(), 1).unwrap_err();
    assert!(e.contains("memory"), "{e}");
    assert_eq!(decide(hook.as_mut(), 0).unwrap(), "");
}

#[test]
fn lua_rawset_on_msg_does_not_reach_the_next_message() {
    let mut hook = load(
        Language::Lua,
        "function route(msg)
            local n = (rawget(msg, 'k') or 0) + 1
            rawset(msg, 'k', n)
            rawset(msg, 'alert', 'forged')
            return 'n' .. n
        end",
    )
    .unwrap();
    for offset in 1..=3 {
        assert_eq!(
            decide(hook.as_mut(), offset).unwrap(),
            "n1",
            "message {offset}"
        );
    }
}

#[test]
fn a_lua_msg_kept_from_an_earlier_call_cannot_read_a_later_message() {
    let mut hook = load(
        Language::Lua,
        "local kept
        function route(msg)
            if kept then return 'stale ' .. tostring(kept.tombstone) end
            kept = msg
            return 'kept'
        end",
    )
    .unwrap();
    assert_eq!(decide(hook.as_mut(), 1).unwrap(), "kept");
    let e = decide(hook.as_mut(), 2).unwrap_err();
    assert!(e.contains("only valid during the route() call"), "{e}");
}

#[test]
fn lua_load_of_text_gets_the_default_environment_and_refuses_bytecode() {
    let mut hook = load(
        Language::Lua,
        "function route(msg)
            local f, err = load('return math.floor(2.5) .. string.upper(\"x\")')
            if not f then return 'load failed: ' .. err end
            return f()
        end",
    )
    .unwrap();
    assert_eq!(decide(hook.as_mut(), 1).unwrap(), "2X");
    // An explicit environment is still honoured.
    let mut hook = load(
        Language::Lua,
        "function route(msg) return load('return x', 'chunk', 't', { x = 'own' })() end",
    )
    .unwrap();
    assert_eq!(decide(hook.as_mut(), 1).unwrap(), "own");
    // Bytecode is refused, whatever mode the script asks for.
    for call in [
        "load(string.dump(function() return 'ran' end))",
        "load(string.dump(function() return 'ran' end), 'b', 'b')",
    ] {
        let mut hook = load(
            Language::Lua,
            &format!(
                "function route(msg) local f, err = {call}; if f then return f() end; return err end"
            ),
        )
        .unwrap();
        let got = decide(hook.as_mut(), 1).unwrap();
        assert!(got.contains("binary chunk"), "{call}: {got}");
    }
}

#[test]
fn a_payload_byte_is_read_without_copying_the_payload_in_both_engines() {
    for (language, source) in [
        (
            Language::Rhai,
            "fn route(msg) { `b${msg.byte(0)}-${msg.byte(2)}-${msg.byte(3)}` }",
        ),
        (
            Language::Lua,
            "function route(msg) return 'b' .. msg:byte(1) .. '-' .. msg:byte(3) .. '-' .. tostring(msg:byte(4)) end",
        ),
    ] {
        let mut hook = load(language, source).unwrap();
        let got = decide(hook.as_mut(), 1).unwrap();
        let want = match language {
            Language::Rhai => "b1-3-",
            Language::Lua => "b1-3-nil",
        };
        assert_eq!(got, want, "{language:?}");
    }
}

#[test]
fn a_lua_pcall_loop_cannot_outlast_the_instruction_limit() {
    // pcall catches the limit's error; the limit must still end the call.
    let mut hook = load(
        Language::Lua,
        "function route(msg)
            if msg.offset == 0 then return end
            for i = 1, 20000 do pcall(function() while true do end end) end
            return 'survived'
        end",
    )
    .unwrap();
    let started = Instant::now();
    let e = decide(hook.as_mut(), 1).unwrap_err();
    assert!(e.contains("over the limit of 100000 instructions"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // xpcall too, and the hook goes on.
    let mut hook = load(
        Language::Lua,
        "function route(msg)
            if msg.offset == 0 then return 'ok' end
            for i = 1, 20000 do xpcall(function() while true do end end, function(e) return e end) end
            return 'survived'
        end",
    )
    .unwrap();
    assert!(decide(hook.as_mut(), 1)
        .unwrap_err()
        .contains("instructions"));
    assert_eq!(decide(hook.as_mut(), 0).unwrap(), "ok");
}

#[test]
fn rhai_functions_that_multiply_their_input_are_refused_before_they_allocate() {
    for body in [
        "let s = \"\"; s.pad(10000, 'y'); s.replace(\"\", s);",
        "let s = \"\"; s.pad(10000, 'y'); let t = s; t.replace('y', s);",
        "let s = \"\"; s.pad(4000000, 'y'); let parts = s.split(\"\");",
        "let s = \"\"; s.pad(4000000, 'y'); let parts = s.split('y');",
        "let s = \"\"; s.pad(4000000, 'y'); let chars = s.to_chars();",
    ] {
        let mut hook = load(
            Language::Rhai,
            &format!("fn route(msg) {{ if msg.offset > 0 {{ {body} }} }}"),
        )
        .unwrap();
        ztfhook::memory::reset_peak();
        let before = ztfhook::memory::held();
        let e = decide(hook.as_mut(), 1).unwrap_err();
        let peak = ztfhook::memory::peak() - before;
        assert!(e.contains("over the memory limit of 16 MiB"), "{body}: {e}");
        assert!(
            peak < 3 * (16 << 20),
            "{body}: the call held {} MB at its peak",
            peak >> 20
        );
    }
    // Within the bound they work as Rhai documents.
    let mut hook = load(
        Language::Rhai,
        "fn route(msg) { let s = \"a-b-c\"; s.replace(\"-\", \"+\"); `${s} ${\"x,y\".split(\",\").len()} ${\"abc\".to_chars().len()}` }",
    )
    .unwrap();
    assert_eq!(decide(hook.as_mut(), 1).unwrap(), "a+b+c 2 3");
}

#[test]
fn lua_alert_records_do_not_outlive_their_call() {
    let (_, alert) = common::sample_alerts("ztf").remove(0);
    let mut hook = compile_source(
        Language::Lua,
        PathBuf::from("keep.lua"),
        "local kept = {}
        function route(msg)
            if msg.offset == 0 then return end
            if #kept > 0 and msg.offset == 1000 then return tostring(kept[1].objectId) end
            kept[#kept + 1] = msg.alert
            kept[#kept + 1] = msg.alert.candidate
        end",
        &small_limits(),
    )
    .and_then(|c| c.instantiate())
    .unwrap();
    let before = ztfhook::memory::held();
    for offset in 1..=300 {
        hook.decide(&MessageView::new(&envelope(offset, &alert)))
            .unwrap();
    }
    let grew = ztfhook::memory::held() - before;
    assert!(
        grew < 8 << 20,
        "300 kept alerts hold {} MB outside Lua's bound",
        grew >> 20
    );
    let e = hook
        .decide(&MessageView::new(&envelope(1000, &alert)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only valid during the route() call"), "{e}");
}
