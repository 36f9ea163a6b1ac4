//! The per-message decision: a [`Hook`] sees a [`MessageView`] and returns a
//! [`Decision`] (destination topics, attributes to add, keep or drop).
//!
//! Invariants:
//! - a hook never sees or changes the payload bytes that are published: the
//!   core publishes the Kafka value untouched (to `[bigquery] topics`, the
//!   JSON form the core makes of it);
//! - each worker thread owns its own hook instance (built by a
//!   [`HookFactory`]), so a hook needs no locking and may keep state;
//! - [`Decision::pass`] (the default) publishes to the configured topic with
//!   the core's attributes only.

pub mod limits;
pub(crate) mod lua;
pub(crate) mod message;
pub mod reload;
pub(crate) mod returned;
pub(crate) mod rhai;
pub mod sampling;
pub mod script;

pub use limits::{Environment, Limits};

use bytes::Bytes;

use crate::envelope::{Envelope, Header};

/// A read-only view of one Kafka message, as a hook sees it.
#[derive(Clone, Copy)]
pub struct MessageView<'a> {
    envelope: &'a Envelope,
}

impl<'a> MessageView<'a> {
    pub fn new(envelope: &'a Envelope) -> Self {
        MessageView { envelope }
    }
    /// The whole message.
    pub fn envelope(&self) -> &'a Envelope {
        self.envelope
    }
    pub fn topic(&self) -> &'a str {
        &self.envelope.topic
    }
    /// The topic, shared (a reference-count increment, no copy).
    pub fn topic_shared(&self) -> &'a std::sync::Arc<str> {
        &self.envelope.topic
    }
    pub fn partition(&self) -> i32 {
        self.envelope.partition
    }
    /// Where a replayed alert came from; `None` for a Kafka message.
    pub fn archive(&self) -> Option<&'a crate::envelope::ArchiveMember> {
        self.envelope.archive.as_deref()
    }
    pub fn offset(&self) -> i64 {
        self.envelope.offset
    }
    /// Milliseconds since the epoch, if the broker gave a timestamp.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.envelope.timestamp_ms
    }
    pub fn key(&self) -> Option<&'a [u8]> {
        self.envelope.key.as_deref()
    }
    pub fn headers(&self) -> &'a [Header] {
        &self.envelope.headers
    }
    /// Whether the Kafka value was null (a tombstone), not merely empty.
    pub fn tombstone(&self) -> bool {
        self.envelope.tombstone
    }
    /// The Kafka value, shared (not copied).
    pub fn payload(&self) -> &'a Bytes {
        &self.envelope.payload
    }
}

/// A destination a hook may name for the configured topic, to fan out to it
/// and others. Not a valid Pub/Sub topic id, so it can't clash with one.
pub const DEFAULT_TOPIC: &str = "@default";

/// The object destination a hook may name for the `[storage]` bucket and
/// its object name template.
pub const ARCHIVE_OBJECT: &str = "@archive";

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// False drops the message: it is not published, and counts as handled.
    pub keep: bool,
    /// Destination topics (ids or full names); empty means the configured
    /// default topic. More than one fans the message out.
    pub topics: Vec<String>,
    /// Cloud Storage objects to write the payload to: `@archive` (the
    /// `[storage]` bucket and object template) or `gs://bucket/name`. A
    /// decision that names neither topics nor objects goes to the configured
    /// default destinations (`[destinations] default`).
    pub objects: Vec<String>,
    /// Attributes to add to the core's (hook attributes win on a clash).
    pub attributes: Vec<(String, String)>,
    /// A Pub/Sub ordering key; `None` for unordered publishing.
    pub ordering_key: Option<String>,
}

impl Decision {
    /// Publish to the default topic, unchanged.
    pub fn pass() -> Decision {
        Decision {
            keep: true,
            ..Decision::default()
        }
    }

    /// Do not publish; the message still counts as handled for commits.
    pub fn drop_message() -> Decision {
        Decision::default()
    }
}

/// What kind of failure a [`HookError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookErrorKind {
    /// The script file cannot be read, or its name gives no engine.
    File,
    /// It does not compile, or does not define `route(msg)`.
    Compile,
    /// Its top level failed, or the engine could not be set up.
    Load,
    /// Loading it did not finish within the deadline.
    Deadline,
    /// A call raised an error (the script's own, or a field it read).
    Runtime,
    /// The script read the alert of a payload that does not decode as one.
    NotAnAlert,
    /// A call (or the top level) went over the operation limit.
    Operations,
    /// A call (or the top level) went over the memory limit.
    Memory,
    /// `route()` returned something that is not a decision.
    Returned,
    /// The hook panicked (a bug in ztfhook, caught by the worker).
    Panic,
}

/// Why a hook could not load, or could not decide for a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("hook {hook}: {message}")]
pub struct HookError {
    /// The hook's name (a script's path), with the line and column where
    /// the engine gives them.
    pub hook: String,
    pub kind: HookErrorKind,
    pub message: String,
}

impl HookError {
    /// An error of `kind` for the hook named `hook`.
    pub fn new(
        hook: impl std::fmt::Display,
        kind: HookErrorKind,
        message: impl Into<String>,
    ) -> HookError {
        HookError {
            hook: hook.to_string(),
            kind,
            message: message.into(),
        }
    }
}

/// A compiled script, shared by every worker; each builds its own runtime
/// state from it, on its own thread.
pub trait Compiled: Send + Sync {
    /// Builds one worker's hook.
    ///
    /// # Errors
    /// [`HookError`] if the engine cannot be set up.
    fn instantiate(&self) -> Result<Box<dyn Hook>, HookError>;
}

/// A per-message decision maker. One instance per worker thread, built on
/// that thread (so a hook need not be `Send`: a Lua state never moves).
pub trait Hook {
    /// Decides for one message.
    ///
    /// # Errors
    /// [`HookError`] when the hook fails for this message; the worker then
    /// applies the configured error policy.
    fn decide(&mut self, message: &MessageView<'_>) -> Result<Decision, HookError>;
}

/// Builds one [`Hook`] per worker, so that workers share nothing mutable.
pub trait HookFactory: Send + Sync {
    /// The hook's name, for logs and errors.
    fn name(&self) -> &str;

    /// Scripts swapped in and rejected since start (a reloading hook's).
    fn reloads(&self) -> (u64, u64) {
        (0, 0)
    }

    /// Builds a fresh hook instance.
    ///
    /// # Errors
    /// [`HookError`] if the hook cannot be instantiated.
    fn build(&self) -> Result<Box<dyn Hook>, HookError>;
}

/// The built-in hook: every message to the default topic, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Passthrough;

impl Hook for Passthrough {
    fn decide(&mut self, _message: &MessageView<'_>) -> Result<Decision, HookError> {
        Ok(Decision::pass())
    }
}

impl HookFactory for Passthrough {
    fn name(&self) -> &str {
        "builtin:passthrough"
    }
    fn build(&self) -> Result<Box<dyn Hook>, HookError> {
        Ok(Box::new(Passthrough))
    }
}
