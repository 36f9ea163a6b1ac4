//! Loading a script: the engine by the file's extension, compiled, its top
//! level run and checked on a synthetic message, within a deadline. The
//! engines depend on the engine-neutral parts (`limits`, `message`,
//! `returned`, `sampling`, and the traits in `hook`), never on this file.
//!
//! A script defines `route(msg)`. Its return value means, in both engines:
//!
//! | returns | decision |
//! |---|---|
//! | nothing (`()` / `nil`), or `true` | publish to the configured topic |
//! | `false` | drop (counted, committed) |
//! | a string | publish to that topic |
//! | an array of strings | publish to each (fan-out) |
//! | a map | `keep` (bool), `topic` or `topics`, `attributes` (map), `ordering_key` |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::hook::{Compiled, Environment, HookError, HookErrorKind, MessageView};

/// Which engine runs a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Rhai,
    Lua,
}

impl Language {
    /// By file extension: `.rhai` or `.lua`.
    ///
    /// # Errors
    /// A message naming the file when the extension is neither.
    pub fn of(path: &Path) -> Result<Language, String> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("rhai") => Ok(Language::Rhai),
            Some("lua") => Ok(Language::Lua),
            _ => Err(format!(
                "{}: a hook script ends in .rhai or .lua",
                path.display()
            )),
        }
    }
}

/// Compiles a script file and checks it on a synthetic message.
///
/// # Errors
/// [`HookError`] naming the file, and the line and column where the engine
/// gives them.
pub fn compile(path: &Path, env: &Environment) -> Result<Arc<dyn Compiled>, HookError> {
    compile_text(path, &read(path)?, env)
}

/// Reads a script file.
///
/// # Errors
/// [`HookError`] naming the file.
pub fn read(path: &Path) -> Result<String, HookError> {
    std::fs::read_to_string(path).map_err(|e| {
        HookError::new(
            path.display(),
            HookErrorKind::File,
            format!("cannot read: {e}"),
        )
    })
}

/// How long loading a script (its top level and the check on a synthetic
/// message) may take. The instruction and operation limits stop a script's
/// own loops long before; this catches a library function that runs long
/// inside one operation (a Lua pattern that backtracks over a long string).
pub const LOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Loads given up on whose threads still run.
static ABANDONED: AtomicUsize = AtomicUsize::new(0);
/// The most such threads: past it, no new load starts.
pub const MAX_ABANDONED: usize = 2;

/// Like [`compile`], for text already read from `path` (the engine follows
/// its extension). Runs on a thread of its own, given up after
/// [`LOAD_DEADLINE`] (the thread is left to finish, its result unused), so
/// that a script that never finishes loading cannot hang the caller.
///
/// # Errors
/// [`HookError`] naming `path`, with line and column where known.
pub fn compile_text(
    path: &Path,
    source: &str,
    env: &Environment,
) -> Result<Arc<dyn Compiled>, HookError> {
    compile_within(path, source, env, LOAD_DEADLINE)
}

/// [`compile_text`] with a given deadline.
///
/// # Errors
/// As [`compile_text`]; a load over `deadline` is an error too.
pub fn compile_within(
    path: &Path,
    source: &str,
    env: &Environment,
    deadline: std::time::Duration,
) -> Result<Arc<dyn Compiled>, HookError> {
    let language = Language::of(path)
        .map_err(|message| HookError::new(path.display(), HookErrorKind::File, message))?;
    // A load given up on keeps its thread until it ends (a library call
    // cannot be interrupted): while MAX_ABANDONED such threads still run, no
    // new load starts, so hung reloads cannot take every core.
    if ABANDONED.load(Ordering::SeqCst) >= MAX_ABANDONED {
        return Err(HookError::new(
            path.display(),
            HookErrorKind::Deadline,
            format!(
                "not loaded: {MAX_ABANDONED} earlier loads that did not finish within the deadline are still running (restart ztfhook to stop them)"
            ),
        ));
    }
    /// 0: loading, 1: done, 2: given up on.
    struct Load(Arc<AtomicU8>);
    impl Drop for Load {
        fn drop(&mut self) {
            if self.0.swap(1, Ordering::SeqCst) == 2 {
                ABANDONED.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    let state = Arc::new(AtomicU8::new(0));
    let load = Load(Arc::clone(&state));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (owned_path, source, env) = (path.to_path_buf(), source.to_string(), env.clone());
    std::thread::Builder::new()
        .name("ztfhook-load".into())
        .spawn(move || {
            let _load = load;
            let _ = tx.send(compile_source(language, owned_path, &source, &env));
        })
        .map_err(|e| {
            HookError::new(
                path.display(),
                HookErrorKind::Load,
                format!("cannot start a thread to load it: {e}"),
            )
        })?;
    let answer = rx.recv_timeout(deadline);
    if answer.is_err() {
        // Counted before it is marked, so the thread's own decrement (which
        // follows the mark) never comes first.
        ABANDONED.fetch_add(1, Ordering::SeqCst);
        if state
            .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            ABANDONED.fetch_sub(1, Ordering::SeqCst);
        }
    }
    answer.unwrap_or_else(|_| {
        Err(HookError::new(
            path.display(),
            HookErrorKind::Deadline,
            format!(
                "loading it (its top level and a check on a test message) did not finish within {} s",
                deadline.as_secs()
            ),
        ))
    })
}

/// Like [`compile`], from text.
///
/// # Errors
/// [`HookError`] naming `path`, with line and column where known.
pub fn compile_source(
    language: Language,
    path: PathBuf,
    source: &str,
    env: &Environment,
) -> Result<Arc<dyn Compiled>, HookError> {
    let compiled: Arc<dyn Compiled> = match language {
        Language::Rhai => Arc::new(crate::hook::rhai::RhaiScript::compile(
            path,
            source,
            env.clone(),
        )?),
        Language::Lua => Arc::new(crate::hook::lua::LuaScript::compile(
            path,
            source,
            env.clone(),
        )?),
    };
    // Checked on a synthetic message before anything runs it for real. Its
    // payload is no alert: a script that reads the alert is checked up to
    // that read.
    let mut hook = compiled.instantiate()?;
    let envelope = crate::envelope::Envelope {
        topic: Arc::from("ztf_20260101_programid1"),
        partition: 0,
        offset: 0,
        timestamp_ms: Some(1_767_225_600_000),
        key: None,
        headers: Vec::new(),
        payload: Bytes::from_static(b"Obj\x01"),
        ..Default::default()
    };
    match hook.decide(&MessageView::new(&envelope)) {
        Err(e) if e.kind != HookErrorKind::NotAnAlert => Err(e),
        _ => Ok(compiled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_language_follows_the_extension() {
        assert_eq!(Language::of(Path::new("a/b.rhai")).unwrap(), Language::Rhai);
        assert_eq!(Language::of(Path::new("b.lua")).unwrap(), Language::Lua);
        assert!(Language::of(Path::new("b.py"))
            .unwrap_err()
            .contains("b.py"));
    }
}
