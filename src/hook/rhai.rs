//! Rhai hooks.
//!
//! Invariants: the AST is compiled once and shared; each worker has its own
//! `Engine` (one engine shared by threads serialises them on its string
//! interner); limits on operations, strings, arrays, maps and call depth are
//! set in one place (`engine`), the memory bound among them; there is no
//! file access, no `import` (no module resolver) and no `eval`; `print` and
//! `debug` go to the program's log.

use std::path::PathBuf;
use std::sync::Arc;

use rhai::{Array, Blob, Dynamic, Engine, EvalAltResult, Map, Scope, AST};

use crate::alert::avro::Value;
use crate::alert::Decoder;
use crate::hook::message::{AlertRecord, FieldError, ScriptMessage};
use crate::hook::returned::{format_float, Returned, DECISION_KEYS};
use crate::hook::sampling::sample;
use crate::hook::{
    Compiled, Decision, Environment, Hook, HookError, HookErrorKind, Limits, MessageView,
};

/// A compiled Rhai script.
pub struct RhaiScript {
    path: PathBuf,
    ast: Arc<AST>,
    env: Environment,
}

/// A script-facing error.
fn script_error(message: String) -> Box<EvalAltResult> {
    message.into()
}

/// A field that cannot be read, as an error that keeps its type (the error
/// policy and `check` tell a payload that is no alert from a script's bug).
fn field_error(e: FieldError) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        Dynamic::from(e),
        rhai::Position::NONE,
    ))
}

/// One value of a decoded alert as a Rhai value: records stay handles into
/// the alert; strings, bytes, arrays and maps are converted when read.
fn alert_value(record: &AlertRecord, value: Value) -> Result<Dynamic, Box<EvalAltResult>> {
    let alert = &record.alert;
    Ok(match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from(b),
        Value::Int(i) => Dynamic::from(i),
        Value::Float(f) => Dynamic::from(f),
        Value::Str(s) => Dynamic::from(alert.text(s).map_err(|e| script_error(e.0))?.to_string()),
        Value::Bytes(s) => Dynamic::from_blob(alert.bytes(s).to_vec()),
        Value::Enum(e, i) => Dynamic::from(alert.symbol(e, i).to_string()),
        Value::Record(..) => Dynamic::from(record.child(value)),
        Value::Array(..) => {
            let mut list = Array::with_capacity(alert.items(value).len());
            for item in alert.items(value) {
                list.push(alert_value(record, *item)?);
            }
            Dynamic::from_array(list)
        }
        Value::Map(..) => {
            let mut map = Map::new();
            for (k, v) in alert.entries(value) {
                let Value::Str(k) = k else { continue };
                let key = alert.text(k).map_err(|e| script_error(e.0))?;
                map.insert(key.into(), alert_value(record, v)?);
            }
            Dynamic::from_map(map)
        }
    })
}

/// Refuses every `import`: a hook reads no file but its own.
struct NoModules;

impl rhai::ModuleResolver for NoModules {
    fn resolve(
        &self,
        _: &Engine,
        _: Option<&str>,
        path: &str,
        pos: rhai::Position,
    ) -> Result<rhai::Shared<rhai::Module>, Box<EvalAltResult>> {
        Err(Box::new(EvalAltResult::ErrorModuleNotFound(
            format!("{path} (hooks cannot import modules)"),
            pos,
        )))
    }
}

/// What a call's memory bound is measured from: the worker thread's
/// [`crate::memory::held`] when the call began.
type Mark = Arc<std::sync::atomic::AtomicIsize>;

/// The token a call stopped for memory is terminated with.
const OVER_MEMORY: &str = "over the memory limit";

/// What one piece of a split string, or one char of `to_chars`, costs at
/// least: a `Dynamic` and a string allocation.
const BYTES_PER_PIECE: usize = 64;

fn too_large(what: &str) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorDataTooLarge(
        what.into(),
        rhai::Position::NONE,
    ))
}

/// Rhai's string functions whose result can be many times their input
/// (`replace` with an empty pattern, `split`, `split_rev`, `to_chars`), in place of
/// Rhai's own: the size of the result is worked out first and a result over
/// the memory bound is refused before it is allocated. Rhai checks other
/// results right after they are made.
fn register_checked_strings(engine: &mut Engine, limits: Limits) {
    let max = limits.max_memory_bytes;
    let replaced = move |s: &str, find: &str, with: usize| -> Result<(), Box<EvalAltResult>> {
        let n = if find.is_empty() {
            s.chars().count() + 1
        } else {
            s.matches(find).count()
        };
        let len = (s.len() - n * find.len()).saturating_add(n.saturating_mul(with));
        if len > max {
            return Err(too_large("Length of string"));
        }
        Ok(())
    };
    engine.register_fn(
        "replace",
        move |s: &mut rhai::ImmutableString, find: &str, with: &str| {
            replaced(s, find, with.len())?;
            *s = s.replace(find, with).into();
            Ok::<_, Box<EvalAltResult>>(())
        },
    );
    engine.register_fn(
        "replace",
        move |s: &mut rhai::ImmutableString, find: &str, with: char| {
            replaced(s, find, with.len_utf8())?;
            *s = s.replace(find, &with.to_string()).into();
            Ok::<_, Box<EvalAltResult>>(())
        },
    );
    engine.register_fn(
        "replace",
        move |s: &mut rhai::ImmutableString, find: char, with: &str| {
            replaced(s, &find.to_string(), with.len())?;
            *s = s.replace(find, with).into();
            Ok::<_, Box<EvalAltResult>>(())
        },
    );
    engine.register_fn("split", move |s: &str, delimiter: &str| {
        pieces(s.split(delimiter), max)
    });
    engine.register_fn("split", move |s: &str, delimiter: char| {
        pieces(s.split(delimiter), max)
    });
    engine.register_fn("split", move |s: &str| pieces(s.split_whitespace(), max));
    engine.register_fn("split_rev", move |s: &str, delimiter: &str| {
        pieces(s.rsplit(delimiter), max)
    });
    engine.register_fn("split_rev", move |s: &str, delimiter: char| {
        pieces(s.rsplit(delimiter), max)
    });
    engine.register_fn("to_chars", move |s: &str| {
        fits(s.chars().count(), max)?;
        Ok::<_, Box<EvalAltResult>>(s.chars().map(Dynamic::from).collect::<Array>())
    });
}

/// Whether an array of `n` short values fits in `max` bytes.
fn fits(n: usize, max: usize) -> Result<(), Box<EvalAltResult>> {
    if n.saturating_mul(BYTES_PER_PIECE) > max {
        return Err(too_large("Size of array"));
    }
    Ok(())
}

/// The pieces of a split string as an array, counted (a pass over the
/// string) before any is allocated.
fn pieces<'a>(
    parts: impl Iterator<Item = &'a str> + Clone,
    max: usize,
) -> Result<Array, Box<EvalAltResult>> {
    fits(parts.clone().count(), max)?;
    Ok(parts.map(|p| Dynamic::from(p.to_string())).collect())
}

/// An engine with ztfhook's limits, helpers and message type.
fn engine(path: &str, limits: Limits, mark: &Mark) -> Engine {
    let mut engine = Engine::new();
    // In place of `Engine::new`'s file resolver, which reads any `.rhai` file.
    engine.set_module_resolver(NoModules);
    engine.set_max_operations(limits.max_operations);
    // Any one value stays within the memory bound (Rhai counts a BLOB's
    // bytes, and an array's elements, against the array size) ...
    engine.set_max_string_size(limits.max_memory_bytes);
    engine.set_max_array_size(limits.max_array_len());
    engine.set_max_map_size(limits.max_map_len);
    engine.set_max_call_levels(64);
    engine.set_max_expr_depths(128, 64);
    // ... and all the values of one call together, checked at every operation.
    let max = isize::try_from(limits.max_memory_bytes).unwrap_or(isize::MAX);
    let from = Arc::clone(mark);
    engine.on_progress(move |_| {
        let held =
            crate::memory::held().wrapping_sub(from.load(std::sync::atomic::Ordering::Relaxed));
        (held > max).then(|| Dynamic::from(OVER_MEMORY))
    });
    engine.disable_symbol("eval");
    engine.disable_symbol("import");
    register_checked_strings(&mut engine, limits);
    let name = path.to_string();
    engine.on_print(move |s| tracing::info!(target: "ztfhook::script", "{name}: {s}"));
    let name = path.to_string();
    engine
        .on_debug(move |s, _, pos| tracing::debug!(target: "ztfhook::script", "{name}:{pos}: {s}"));
    engine
        .register_type_with_name::<ScriptMessage>("Message")
        .register_get("topic", |m: &mut ScriptMessage| m.topic.to_string())
        .register_get("partition", |m: &mut ScriptMessage| i64::from(m.partition))
        .register_get("offset", |m: &mut ScriptMessage| m.offset)
        .register_get("timestamp", |m: &mut ScriptMessage| {
            m.timestamp_ms.map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_get("key", |m: &mut ScriptMessage| {
            m.key_text().map_or(Dynamic::UNIT, Dynamic::from)
        })
        .register_get("size", |m: &mut ScriptMessage| m.payload.len() as i64)
        .register_get("file", |m: &mut ScriptMessage| {
            m.archive
                .as_ref()
                .map_or(Dynamic::UNIT, |(f, _)| Dynamic::from(f.to_string()))
        })
        .register_get("member", |m: &mut ScriptMessage| {
            m.archive
                .as_ref()
                .map_or(Dynamic::UNIT, |(_, n)| Dynamic::from(n.clone()))
        })
        .register_get("tombstone", |m: &mut ScriptMessage| m.tombstone)
        .register_get("headers", |m: &mut ScriptMessage| {
            let mut map = Map::new();
            for h in m.headers.iter() {
                let v = h.value.as_ref().map_or(Dynamic::UNIT, |v| {
                    Dynamic::from(String::from_utf8_lossy(v).into_owned())
                });
                map.insert(h.name.as_str().into(), v);
            }
            map
        })
        .register_fn("payload", |m: &mut ScriptMessage| -> Blob {
            m.payload.to_vec()
        })
        // One byte of the payload, without copying it into a BLOB.
        .register_fn("byte", |m: &mut ScriptMessage, i: i64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| m.payload.get(i))
                .map_or(Dynamic::UNIT, |b| Dynamic::from(i64::from(*b)))
        })
        .register_get("survey", |m: &mut ScriptMessage| {
            m.survey().as_str().to_string()
        })
        .register_get("schema_id", |m: &mut ScriptMessage| {
            m.schema_id()
                .map_or(Dynamic::UNIT, |i| Dynamic::from(i64::from(i)))
        })
        .register_get(
            "schema_version",
            |m: &mut ScriptMessage| -> Result<Dynamic, Box<EvalAltResult>> {
                Ok(m.schema_version()
                    .map_err(field_error)?
                    .map_or(Dynamic::UNIT, Dynamic::from))
            },
        )
        .register_get(
            "alert",
            |m: &mut ScriptMessage| -> Result<AlertRecord, Box<EvalAltResult>> {
                m.alert().map_err(field_error)
            },
        )
        .register_type_with_name::<AlertRecord>("AlertRecord")
        .register_indexer_get(
            |r: &mut AlertRecord, name: &str| -> Result<Dynamic, Box<EvalAltResult>> {
                let v = r.get(name).map_err(field_error)?;
                alert_value(&v, v.value)
            },
        )
        .register_fn("has", |r: &mut AlertRecord, name: &str| r.has(name))
        .register_fn("contains", |r: &mut AlertRecord, name: &str| r.has(name))
        .register_fn(
            "to_string",
            |r: &mut AlertRecord| -> Result<String, Box<EvalAltResult>> {
                Ok(r.to_json().map_err(field_error)?.to_string())
            },
        )
        .register_fn("sample", |value: Dynamic, fraction: f64| {
            sample(&text(&value), fraction)
        })
        .register_fn("sample", |value: Dynamic, fraction: i64| {
            sample(&text(&value), fraction as f64)
        });
    engine
}

impl RhaiScript {
    /// Compiles `source`, which must define `route(msg)`.
    ///
    /// # Errors
    /// [`HookError`] with `path:line:column` of a syntax error.
    pub fn compile(path: PathBuf, source: &str, env: Environment) -> Result<RhaiScript, HookError> {
        let name = path.display().to_string();
        let mark = Mark::default();
        let ast = engine(&name, env.limits, &mark)
            .compile(source)
            .map_err(|e| {
                let pos = e.position();
                HookError::new(
                    format!(
                        "{name}:{}:{}",
                        pos.line().unwrap_or(0),
                        pos.position().unwrap_or(0)
                    ),
                    HookErrorKind::Compile,
                    match e.err_type() {
                        rhai::ParseErrorType::Reserved(word)
                            if word == "import" || word == "eval" =>
                        {
                            format!("`{word}` is not available to hooks (no modules, no eval)")
                        }
                        other => format!("syntax error: {other}"),
                    },
                )
            })?;
        if !ast
            .iter_functions()
            .any(|f| f.name == "route" && f.params.len() == 1)
        {
            return Err(HookError::new(
                name,
                HookErrorKind::Compile,
                "the script must define `fn route(msg)`",
            ));
        }
        Ok(RhaiScript {
            path,
            ast: Arc::new(ast),
            env,
        })
    }
}

impl Compiled for RhaiScript {
    fn instantiate(&self) -> Result<Box<dyn Hook>, HookError> {
        let name = self.path.display().to_string();
        let mark = Mark::default();
        let engine = engine(&name, self.env.limits, &mark);
        // The top level runs once per hook, here, under the call limits.
        // Calls then run only the functions, unless the top level defines
        // constants: functions read those as `global::NAME`, which Rhai
        // fills only by running the top level, and a constant may hold state
        // (a closure) that each call must see fresh. Such a script's top
        // level runs again in every call, as it always has.
        let mut scope = Scope::new();
        mark.store(crate::memory::held(), std::sync::atomic::Ordering::Relaxed);
        let loaded = RhaiHook {
            engine,
            ast: Arc::clone(&self.ast),
            every_call: false,
            decoder: Arc::clone(&self.env.decoder),
            limits: self.env.limits,
            mark,
            name,
        };
        loaded
            .engine
            .run_ast_with_scope(&mut scope, &loaded.ast)
            .map_err(|e| {
                let e = loaded.call_error(&e);
                HookError::new(e.hook, e.kind, format!("at load: {}", e.message))
            })?;
        let every_call = scope.iter_raw().any(|(_, constant, _)| constant);
        let hook = if every_call {
            RhaiHook {
                every_call,
                ..loaded
            }
        } else {
            RhaiHook {
                ast: Arc::new(loaded.ast.clone_functions_only()),
                ..loaded
            }
        };
        Ok(Box::new(hook))
    }
}

/// One worker's Rhai hook.
struct RhaiHook {
    engine: Engine,
    /// The functions only, or the whole script when `every_call`.
    ast: Arc<AST>,
    /// The top level defines constants: it runs before every call.
    every_call: bool,
    decoder: Arc<Decoder>,
    limits: Limits,
    mark: Mark,
    name: String,
}

impl RhaiHook {
    /// A failed call as an error naming the script's line and column, when
    /// Rhai knows them.
    fn call_error(&self, e: &EvalAltResult) -> HookError {
        let pos = e.position();
        let hook = match (pos.line(), pos.position()) {
            (Some(line), Some(column)) => format!("{}:{line}:{column}", self.name),
            (Some(line), None) => format!("{}:{line}", self.name),
            _ => self.name.clone(),
        };
        let (kind, message) = match e.unwrap_inner() {
            EvalAltResult::ErrorTooManyOperations(..) => (
                HookErrorKind::Operations,
                format!(
                    "over the limit of {} operations per call",
                    self.limits.max_operations
                ),
            ),
            EvalAltResult::ErrorTerminated(..) => (
                HookErrorKind::Memory,
                format!(
                    "{OVER_MEMORY} of {} MiB per call (what the call holds together)",
                    self.limits.max_memory_bytes >> 20
                ),
            ),
            inner @ EvalAltResult::ErrorDataTooLarge(..) => (
                HookErrorKind::Memory,
                format!(
                    "{OVER_MEMORY} of {} MiB per call (one value: {inner})",
                    self.limits.max_memory_bytes >> 20
                ),
            ),
            EvalAltResult::ErrorRuntime(value, _) if value.is::<FieldError>() => {
                let field = value.clone().cast::<FieldError>();
                let kind = match field {
                    FieldError::NotAnAlert(_) => HookErrorKind::NotAnAlert,
                    FieldError::NoField { .. } => HookErrorKind::Runtime,
                };
                (kind, field.to_string())
            }
            _ => (HookErrorKind::Runtime, e.to_string()),
        };
        HookError::new(hook, kind, message)
    }

    /// An invalid return value.
    fn error(&self, message: String) -> HookError {
        HookError::new(&self.name, HookErrorKind::Returned, message)
    }

    fn convert(&self, value: Dynamic) -> Result<Returned, HookError> {
        let mut r = Returned::default();
        if value.is_unit() {
            return Ok(r);
        }
        if let Ok(keep) = value.as_bool() {
            r.keep = Some(keep);
            return Ok(r);
        }
        if value.is_string() {
            r.topics.push(value.into_string().unwrap_or_default());
            return Ok(r);
        }
        if value.is_array() {
            r.topics = self.strings(value.cast::<Array>(), "route() returned an array")?;
            return Ok(r);
        }
        if !value.is_map() {
            return Err(self.error(format!(
                "route() returned a {}; expected nothing, a bool, a topic, an array of topics or a map",
                value.type_name()
            )));
        }
        // A cast, not a clone: a Rhai map clones deeply.
        let map = value.cast::<Map>();
        for (k, v) in map {
            match k.as_str() {
                "keep" => {
                    r.keep = Some(
                        v.as_bool()
                            .map_err(|t| self.error(format!("`keep` must be a bool, not {t}")))?,
                    )
                }
                "topic" => r.topics.extend(self.optional_string(v, "`topic`")?),
                "topics" => r.topics.extend(self.string_array(v, "`topics`")?),
                "object" => r.objects.extend(self.optional_string(v, "`object`")?),
                "objects" => r.objects.extend(self.string_array(v, "`objects`")?),
                "attributes" => {
                    let attrs = v
                        .try_cast::<Map>()
                        .ok_or_else(|| self.error("`attributes` must be a map".into()))?;
                    for (name, value) in attrs {
                        if value.is_unit() {
                            continue;
                        }
                        r.attributes.push((name.to_string(), text(&value)));
                    }
                }
                "ordering_key" => {
                    if !v.is_unit() {
                        r.ordering_key = Some(text(&v));
                    }
                }
                other => {
                    return Err(self.error(format!(
                        "route() returned a map with unknown key `{other}` (known: {})",
                        DECISION_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(r)
    }

    /// A decision key's string, or nothing for `()`.
    fn optional_string(&self, v: Dynamic, what: &str) -> Result<Option<String>, HookError> {
        if v.is_unit() {
            return Ok(None);
        }
        v.into_string()
            .map(Some)
            .map_err(|t| self.error(format!("{what} must be a string, not {t}")))
    }

    /// A decision key's array of strings.
    fn string_array(&self, v: Dynamic, what: &str) -> Result<Vec<String>, HookError> {
        let list = v
            .try_cast::<Array>()
            .ok_or_else(|| self.error(format!("{what} must be an array")))?;
        self.strings(list, what)
    }

    fn strings(&self, items: Array, what: &str) -> Result<Vec<String>, HookError> {
        items
            .into_iter()
            .map(|d| {
                d.into_string()
                    .map_err(|t| self.error(format!("{what} must hold strings, not {t}")))
            })
            .collect()
    }
}

/// A value as attribute text, formatted as the Lua engine does.
fn text(value: &Dynamic) -> String {
    match value.as_float() {
        Ok(f) => format_float(f),
        Err(_) => value.to_string(),
    }
}

impl Hook for RhaiHook {
    fn decide(&mut self, message: &MessageView<'_>) -> Result<Decision, HookError> {
        let msg = ScriptMessage::new(message, &self.decoder);
        self.mark
            .store(crate::memory::held(), std::sync::atomic::Ordering::Relaxed);
        let options = rhai::CallFnOptions::new().eval_ast(self.every_call);
        let value = self
            .engine
            .call_fn_with_options::<Dynamic>(options, &mut Scope::new(), &self.ast, "route", (msg,))
            .map_err(|e| self.call_error(&e))?;
        Ok(self.convert(value)?.into_decision())
    }
}
