//! Live reload: a file watcher -> compile -> check -> swap. A bad script is
//! rejected and the previous one keeps running.
//!
//! Invariants:
//! - the directory is watched, not the file: editors that save by rename
//!   (vim, `sed -i`) replace the file, and a watch on it goes silent;
//! - a new script is compiled and run once on a synthetic message before it
//!   is swapped in;
//! - every worker checks the generation before each message, so after a swap
//!   every message any worker handles is decided by the new script.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::hook::script::{compile_text, compile_within, read};
use crate::hook::{Compiled, Environment};
use crate::hook::{Decision, Hook, HookError, HookFactory, MessageView};

/// Events closer together than this are one save.
const DEBOUNCE: Duration = Duration::from_millis(150);

struct Shared {
    path: PathBuf,
    name: String,
    env: Environment,
    current: RwLock<(Arc<dyn Compiled>, String)>,
    generation: AtomicU64,
    reloads: AtomicU64,
    rejected: AtomicU64,
}

/// A script hook that can be replaced while workers run it.
#[derive(Clone)]
pub struct ScriptHooks(Arc<Shared>);

impl ScriptHooks {
    /// Compiles and checks the script.
    ///
    /// # Errors
    /// [`HookError`] naming the file, line and column.
    pub fn load(path: &Path, env: Environment) -> Result<ScriptHooks, HookError> {
        let source = read(path)?;
        let compiled = compile_text(path, &source, &env)?;
        Ok(ScriptHooks(Arc::new(Shared {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            env,
            current: RwLock::new((compiled, source)),
            generation: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })))
    }

    /// Re-reads the file; swaps it in if it compiles and passes the check.
    /// Returns whether a new script was swapped in.
    ///
    /// # Errors
    /// [`HookError`] for a rejected script; the previous one stays.
    pub fn reload(&self) -> Result<bool, HookError> {
        self.reload_within(crate::hook::script::LOAD_DEADLINE)
    }

    /// [`reload`](Self::reload) with a given load deadline.
    ///
    /// # Errors
    /// As `reload`.
    pub fn reload_within(&self, deadline: Duration) -> Result<bool, HookError> {
        let s = &self.0;
        let source = match read(&s.path) {
            Ok(text) => text,
            Err(e) => {
                s.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        if s.current.read().unwrap_or_else(|e| e.into_inner()).1 == source {
            return Ok(false);
        }
        match compile_within(&s.path, &source, &s.env, deadline) {
            Ok(compiled) => {
                *s.current.write().unwrap_or_else(|e| e.into_inner()) = (compiled, source);
                s.generation.fetch_add(1, Ordering::AcqRel);
                s.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                s.rejected.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Scripts swapped in since start.
    pub fn reloads(&self) -> u64 {
        self.0.reloads.load(Ordering::Relaxed)
    }

    /// Scripts rejected since start.
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::Relaxed)
    }

    /// Watches the script's directory and reloads on every change to the
    /// file. The watch lasts as long as the returned watcher.
    ///
    /// # Errors
    /// The watcher's error if the directory cannot be watched.
    pub fn watch(&self) -> notify::Result<notify::RecommendedWatcher> {
        let path = std::fs::canonicalize(&self.0.path).unwrap_or_else(|_| self.0.path.clone());
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let file_name = path.file_name().map(|n| n.to_os_string());
        let (tx, rx) = crossbeam_channel::unbounded::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if event
                        .paths
                        .iter()
                        .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name)
                    {
                        let _ = tx.send(());
                    }
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let hooks = self.clone();
        std::thread::Builder::new()
            .name("ztfhook-reload".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.recv_timeout(DEBOUNCE).is_ok() {}
                    match hooks.reload() {
                        Ok(true) => tracing::info!(
                            "hook {}: reloaded (reload {}, {} rejected)",
                            hooks.0.name,
                            hooks.reloads(),
                            hooks.rejected()
                        ),
                        Ok(false) => {}
                        Err(e) => tracing::error!(
                            "{e}; the reload is rejected and the previous script keeps running ({} rejected)",
                            hooks.rejected()
                        ),
                    }
                }
            })
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(watcher)
    }
}

impl HookFactory for ScriptHooks {
    fn name(&self) -> &str {
        &self.0.name
    }

    fn reloads(&self) -> (u64, u64) {
        (self.reloads(), self.rejected())
    }

    fn build(&self) -> Result<Box<dyn Hook>, HookError> {
        let generation = self.0.generation.load(Ordering::Acquire);
        let inner = self
            .0
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .instantiate()?;
        Ok(Box::new(Reloading {
            shared: Arc::clone(&self.0),
            generation,
            inner,
        }))
    }
}

/// One worker's hook, rebuilt when the shared script changes.
struct Reloading {
    shared: Arc<Shared>,
    generation: u64,
    inner: Box<dyn Hook>,
}

impl Hook for Reloading {
    fn decide(&mut self, message: &MessageView<'_>) -> Result<Decision, HookError> {
        let now = self.shared.generation.load(Ordering::Acquire);
        if now != self.generation {
            let compiled = Arc::clone(
                &self
                    .shared
                    .current
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .0,
            );
            self.inner = compiled.instantiate()?;
            self.generation = now;
        }
        self.inner.decide(message)
    }
}
