//! What Rhai and Lua hooks share: the message a script sees, how its return
//! value becomes a [`Decision`], the deterministic sampling helper, limits,
//! and loading a script file by its extension.
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
use std::sync::Arc;

use bytes::Bytes;

use crate::alert::avro::Value;
use crate::alert::{Alert, Decoder, Form, Survey};
use crate::envelope::Header;
use crate::hook::{Decision, Hook, HookError, MessageView};

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

/// The message as a script sees it: cheap to build (reference-counted
/// clones), fields converted only when the script reads them, the alert
/// decoded at most once, on first use.
#[derive(Debug, Clone)]
pub struct ScriptMessage {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Arc<[Header]>,
    pub payload: Bytes,
    /// The Kafka value was null (a tombstone), not empty.
    pub tombstone: bool,
    decoder: Arc<Decoder>,
    form: std::sync::OnceLock<Result<Form, String>>,
    alert: std::sync::OnceLock<Result<AlertRecord, String>>,
}

/// How the error for a payload that does not decode starts.
pub const NOT_AN_ALERT: &str = "the payload does not decode as an alert";

/// A value of a decoded alert, as scripts hold it: the alert (shared) and
/// which value; in practice a record, or a field just read from one.
#[derive(Debug, Clone)]
pub struct AlertRecord {
    pub alert: Arc<Alert>,
    pub value: Value,
    /// For the root of a head-only decode: the whole alert, decoded when a
    /// field past the head is first read.
    rest: Option<Arc<Rest>>,
}

/// The rest of a head-only decoded alert, decoded at most once, on demand.
#[derive(Debug)]
struct Rest {
    decoder: Arc<Decoder>,
    payload: Bytes,
    form: Form,
    whole: std::sync::OnceLock<Result<Arc<Alert>, String>>,
}

impl Rest {
    fn whole(&self) -> Result<AlertRecord, String> {
        match self.whole.get_or_init(|| {
            self.decoder
                .decode_as(&self.payload, &self.form)
                .map(Arc::new)
                .map_err(|e| format!("{NOT_AN_ALERT}: {e}"))
        }) {
            Ok(alert) => Ok(AlertRecord {
                alert: Arc::clone(alert),
                value: alert.root(),
                rest: None,
            }),
            Err(e) => Err(e.clone()),
        }
    }
}

impl AlertRecord {
    /// A field's value (in the alert it belongs to); an error names the
    /// record and the field when the record has no such field, or why the
    /// part of the alert that holds it does not decode.
    ///
    /// # Errors
    /// The message for the script.
    pub fn get(&self, name: &str) -> Result<AlertRecord, String> {
        if let Some(value) = self.alert.field(self.value, name) {
            return Ok(self.child(value));
        }
        if let Some(rest) = &self.rest {
            if self.alert.declares(self.value, name) {
                return rest.whole()?.get(name);
            }
        }
        Err(format!(
            "record `{}` has no field `{name}`",
            self.alert.record_name(self.value)
        ))
    }

    /// Whether the record has a field of this name (schemas differ by version).
    pub fn has(&self, name: &str) -> bool {
        self.alert.declares(self.value, name)
    }

    /// A child value of the same alert.
    pub fn child(&self, value: Value) -> AlertRecord {
        AlertRecord {
            alert: Arc::clone(&self.alert),
            value,
            rest: None,
        }
    }

    /// The value as JSON (the whole alert for the root).
    ///
    /// # Errors
    /// Why the rest of the alert does not decode.
    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        match &self.rest {
            Some(rest) => Ok(rest.whole()?.to_json()?),
            None => Ok(self.alert.to_json(self.value)),
        }
    }
}

impl ScriptMessage {
    pub fn new(view: &MessageView<'_>, decoder: &Arc<Decoder>) -> ScriptMessage {
        ScriptMessage {
            decoder: Arc::clone(decoder),
            form: std::sync::OnceLock::new(),
            alert: std::sync::OnceLock::new(),
            topic: Arc::clone(view.topic_shared()),
            partition: view.partition(),
            offset: view.offset(),
            timestamp_ms: view.timestamp_ms(),
            key: view.key().map(Bytes::copy_from_slice),
            headers: if view.headers().is_empty() {
                no_headers()
            } else {
                Arc::from(view.headers())
            },
            payload: view.payload().clone(),
            tombstone: view.tombstone(),
        }
    }

    /// The survey, from the payload's form.
    pub fn survey(&self) -> Survey {
        self.form().map_or(Survey::Unknown, Form::survey)
    }

    /// The payload's form (container schema or wire-format id), looked up
    /// once per message for `survey` and `alert` both.
    fn form(&self) -> Result<&Form, String> {
        self.form
            .get_or_init(|| {
                self.decoder
                    .form(&self.payload)
                    .map_err(|e| format!("{NOT_AN_ALERT}: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The Confluent wire-format schema id (Rubin), from the header alone.
    pub fn schema_id(&self) -> Option<u32> {
        crate::alert::wire_schema_id(&self.payload)
    }

    /// The alert's schema version: from the header for Rubin (`9.0`), from
    /// the decoded `schemavsn` field for ZTF.
    ///
    /// # Errors
    /// Why the payload does not decode.
    pub fn schema_version(&self) -> Result<Option<String>, String> {
        if let Some(id) = self.schema_id() {
            return Ok(Some(crate::alert::rubin_version(id)));
        }
        let alert = self.alert()?;
        Ok(match alert.get("schemavsn") {
            Ok(AlertRecord {
                alert,
                value: Value::Str(s),
                ..
            }) => alert.text(s).ok().map(str::to_string),
            _ => None,
        })
    }

    /// The decoded alert record, decoded on the first call only.
    ///
    /// # Errors
    /// Why the payload does not decode, for the error policy.
    pub fn alert(&self) -> Result<AlertRecord, String> {
        self.alert
            .get_or_init(|| {
                let form = self.form()?;
                let head = self
                    .decoder
                    .decode_head_as(&self.payload, form)
                    .map(Arc::new)
                    .map_err(|e| format!("{NOT_AN_ALERT}: {e}"))?;
                let rest = (!head.is_complete()).then(|| {
                    Arc::new(Rest {
                        decoder: Arc::clone(&self.decoder),
                        payload: self.payload.clone(),
                        form: form.clone(),
                        whole: std::sync::OnceLock::new(),
                    })
                });
                Ok(AlertRecord {
                    value: head.root(),
                    alert: head,
                    rest,
                })
            })
            .clone()
    }

    /// The key as text, if it is valid UTF-8.
    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_ref()
            .and_then(|k| std::str::from_utf8(k).ok().map(str::to_string))
    }
}

/// One shared empty header list, so a message without headers allocates none.
fn no_headers() -> Arc<[Header]> {
    static EMPTY: std::sync::OnceLock<Arc<[Header]>> = std::sync::OnceLock::new();
    Arc::clone(EMPTY.get_or_init(|| Arc::from(Vec::new())))
}

/// A decision as a script returned it, before the engine-independent checks.
#[derive(Debug, Default)]
pub struct Returned {
    pub keep: Option<bool>,
    pub topics: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub ordering_key: Option<String>,
}

impl Returned {
    pub fn into_decision(self) -> Decision {
        Decision {
            keep: self.keep.unwrap_or(true),
            topics: self.topics,
            attributes: self.attributes,
            ordering_key: self.ordering_key.filter(|k| !k.is_empty()),
        }
    }
}

/// The keys a returned map may have.
pub const DECISION_KEYS: &[&str] = &["keep", "topic", "topics", "attributes", "ordering_key"];

/// `sample(value, fraction)`: true for a deterministic `fraction` of values.
/// The value's text is hashed with 64-bit FNV-1a, mixed with MurmurHash3's
/// 64-bit finaliser (FNV alone spreads short, similar keys such as offsets
/// badly), and kept when the top 53 bits, as a fraction of 2^53, are below
/// `fraction`; so a replay, another instance or another language makes the
/// same choice.
pub fn sample(value: &str, fraction: f64) -> bool {
    sample_bytes(value.as_bytes(), fraction)
}

/// [`sample`] of a value's text given as bytes.
pub fn sample_bytes(value: &[u8], fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    if fraction <= 0.0 || fraction.is_nan() {
        return false;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in value {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// A number as attribute text, the same in both engines: integers in floats
/// keep one decimal (`1.0`), others their shortest exact form (`0.55`).
pub fn format_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}

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

/// A compiled script, shared by every worker; each builds its own runtime
/// state from it.
pub trait Compiled: Send + Sync {
    /// Builds one worker's hook.
    ///
    /// # Errors
    /// [`HookError`] if the engine cannot be set up.
    fn instantiate(&self) -> Result<Box<dyn Hook>, HookError>;
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
    std::fs::read_to_string(path).map_err(|e| HookError {
        hook: path.display().to_string(),
        message: format!("cannot read: {e}"),
    })
}

/// How long loading a script (its top level and the check on a synthetic
/// message) may take. The instruction and operation limits stop a script's
/// own loops long before; this catches a library function that runs long
/// inside one operation (a Lua pattern that backtracks over a long string).
pub const LOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

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
    let language = Language::of(path).map_err(|message| HookError {
        hook: path.display().to_string(),
        message,
    })?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (owned_path, source, env) = (path.to_path_buf(), source.to_string(), env.clone());
    std::thread::Builder::new()
        .name("ztfhook-load".into())
        .spawn(move || {
            let _ = tx.send(compile_source(language, owned_path, &source, &env));
        })
        .map_err(|e| HookError {
            hook: path.display().to_string(),
            message: format!("cannot start a thread to load it: {e}"),
        })?;
    rx.recv_timeout(deadline).unwrap_or_else(|_| {
        Err(HookError {
            hook: path.display().to_string(),
            message: format!(
                "loading it (its top level and a check on a test message) did not finish within {} s",
                deadline.as_secs()
            ),
        })
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
        Err(e) if !e.message.contains(NOT_AN_ALERT) => Err(e),
        _ => Ok(compiled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_deterministic_and_close_to_the_fraction() {
        let kept = (0..100_000).filter(|i| sample(&i.to_string(), 0.1)).count();
        assert!((9_500..10_500).contains(&kept), "{kept}");
        for start in [0, 1_000_000, 1_095_578_115_815_010_000u64] {
            let kept = (start..start + 2_000)
                .filter(|i| sample(&i.to_string(), 0.1))
                .count();
            assert!((150..250).contains(&kept), "from {start}: {kept}");
        }
        assert!(sample("x", 1.0));
        assert!(!sample("x", 0.0));
    }

    #[test]
    fn sampling_makes_the_same_choice_as_an_independent_implementation() {
        // The point each value hashes to, computed by a separate Python
        // implementation of FNV-1a 64 + fmix64 (the README's definition):
        // a change of algorithm, constants or text form changes the choice
        // other processes, engines and versions make, and fails here.
        for (value, point) in [
            ("1095578115815010005", 0.493_968_385_794_983_7),
            ("0", 0.757_387_813_305_282_6),
            ("1", 0.485_232_524_079_154_4),
            ("ZTF21aaaaaaa", 0.644_672_210_471_941_7),
            ("true", 0.292_628_424_352_558_65),
            ("2.5", 0.056_238_630_079_538_33),
            ("", 0.936_769_448_390_44),
        ] {
            assert!(sample(value, point + 1e-9), "{value:?} kept above {point}");
            assert!(
                !sample(value, point - 1e-9),
                "{value:?} dropped below {point}"
            );
        }
    }

    #[test]
    fn the_language_follows_the_extension() {
        assert_eq!(Language::of(Path::new("a/b.rhai")).unwrap(), Language::Rhai);
        assert_eq!(Language::of(Path::new("b.lua")).unwrap(), Language::Lua);
        assert!(Language::of(Path::new("b.py"))
            .unwrap_err()
            .contains("b.py"));
    }
}
