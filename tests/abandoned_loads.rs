//! Loads given up on at their deadline keep their threads (a library call
//! cannot be interrupted); at most two such threads run, so hung reloads
//! cannot take every core. Its own test binary: the count is per process.

use std::time::Duration;

use ztfhook::hook::reload::ScriptHooks;
use ztfhook::hook::{Environment, Limits};

fn small_limits() -> Environment {
    Environment::new(Limits {
        max_operations: 100_000,
        max_memory_bytes: 16 << 20,
        ..Limits::default()
    })
}

#[test]
fn abandoned_loads_are_capped_so_hung_reloads_cannot_take_every_core() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("route.lua");
    std::fs::write(&path, "function route(msg) return 'first' end").unwrap();
    let hooks = ScriptHooks::load(&path, small_limits()).unwrap();
    // A Lua pattern that backtracks for far longer than the load deadline,
    // inside one library call the instruction limit cannot interrupt.
    let hang = "string.rep('a', 40):find(string.rep('a*', 40) .. 'b')\nfunction route(msg) end";
    let loading = |name: &str| {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|c| c.trim() == name)
            .count()
    };
    for _ in 0..4 {
        std::fs::write(&path, hang).unwrap();
        let e = hooks.reload_within(Duration::from_millis(300)).unwrap_err();
        assert!(
            e.message.contains("did not finish") || e.message.contains("still running"),
            "{e}"
        );
        std::fs::write(&path, "function route(msg) return 'first' end").unwrap();
    }
    let running = loading("ztfhook-load");
    assert!(running <= 2, "{running} abandoned loads still running");
}
