//! Any text as a configuration file: it is accepted or refused with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ztfhook::config::Config::parse(std::path::Path::new("fuzz.toml"), text);
    }
});
