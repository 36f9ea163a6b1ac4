//! The limits a script call runs under, and what every script instance is
//! given besides its source: the same settings for both engines, applied by
//! each engine in one place (`rhai::engine`, `lua::state`).

use std::sync::Arc;

use crate::alert::Decoder;

/// Limits on one script call, the same settings for both engines.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Rhai operations, or Lua VM instructions, per call (and for the
    /// script's top level, when it is loaded).
    pub max_operations: u64,
    /// Memory one script may hold, in bytes: Lua's allocator refuses more to
    /// the worker's state; Rhai's size limits keep any one value under it and
    /// a Rhai call is stopped at its first operation after the worker thread
    /// holds more than this above what it held when the call began.
    pub max_memory_bytes: usize,
    /// Largest map a Rhai script may build (entries).
    pub max_map_len: usize,
}

impl Limits {
    /// The longest Rhai array (elements of 16 bytes) or BLOB (bytes) a script
    /// may build: one sixteenth of the memory bound, so that an array of
    /// numbers stays within it.
    pub fn max_array_len(&self) -> usize {
        self.max_memory_bytes / 16
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_operations: 1_000_000,
            max_memory_bytes: 64 * 1024 * 1024,
            max_map_len: 100_000,
        }
    }
}

/// What a script instance gets besides its source: the limits of a call and
/// the alert decoder (with its schema caches) that every worker shares.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub limits: Limits,
    pub decoder: Arc<Decoder>,
}

impl Environment {
    pub fn new(limits: Limits) -> Environment {
        Environment {
            limits,
            ..Environment::default()
        }
    }
}
