//! Lua hooks (vendored Lua 5.4).
//!
//! Invariants: each worker owns a Lua state built from the shared source;
//! the state has only the `table`, `string`, `math` and `utf8` libraries (no
//! `io`, `os`, `package`/`require`, `debug`), `load` accepts text only (no
//! bytecode), `dofile`/`loadfile` are gone; an instruction-count hook stops a
//! call after `max_operations` VM instructions, and the state's memory is
//! capped; `print` goes to the program's log.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{
    Function, HookTriggers, Lua, LuaOptions, MetaMethod, StdLib, Table, UserData, UserDataFields,
    UserDataMethods, Value, VmState,
};

use crate::alert::avro::Value as AvroValue;
use crate::hook::script::{
    sample, AlertRecord, Compiled, Environment, Limits, Returned, ScriptMessage, DECISION_KEYS,
};
use crate::hook::{Decision, Hook, HookError, MessageView};

/// How many instructions run between two checks of the budget.
const INSTRUCTIONS_PER_CHECK: u32 = 1_000;

/// A Lua script, checked to compile.
pub struct LuaScript {
    path: PathBuf,
    source: String,
    env: Environment,
}

/// One value of a decoded alert as a Lua value: records stay handles into
/// the alert; strings, bytes, arrays and maps are converted when read.
fn alert_value(lua: &Lua, record: &AlertRecord, value: AvroValue) -> mlua::Result<Value> {
    let alert = &record.alert;
    Ok(match value {
        AvroValue::Null => Value::Nil,
        AvroValue::Bool(b) => Value::Boolean(b),
        AvroValue::Int(i) => Value::Integer(i),
        AvroValue::Float(f) => Value::Number(f),
        AvroValue::Str(s) => Value::String(
            lua.create_string(alert.text(s).map_err(|e| mlua::Error::RuntimeError(e.0))?)?,
        ),
        AvroValue::Bytes(s) => Value::String(lua.create_string(alert.bytes(s))?),
        AvroValue::Enum(e, i) => Value::String(lua.create_string(alert.symbol(e, i))?),
        AvroValue::Record(..) => Value::UserData(lua.create_userdata(record.child(value))?),
        AvroValue::Array(..) => {
            let items = alert.items(value);
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, alert_value(lua, record, *item)?)?;
            }
            Value::Table(t)
        }
        AvroValue::Map(..) => {
            let t = lua.create_table()?;
            for (k, v) in alert.entries(value) {
                let AvroValue::Str(k) = k else { continue };
                t.raw_set(
                    lua.create_string(alert.bytes(k))?,
                    alert_value(lua, record, v)?,
                )?;
            }
            Value::Table(t)
        }
    })
}

impl UserData for AlertRecord {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, r, name: mlua::String| {
            let name = name.to_str()?;
            let v = r.get(&name).map_err(mlua::Error::RuntimeError)?;
            alert_value(lua, r, v)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, r, ()| {
            Ok(r.alert.to_json(r.value).to_string())
        });
    }
}

impl UserData for ScriptMessage {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("topic", |_, m| Ok(m.topic.to_string()));
        fields.add_field_method_get("partition", |_, m| Ok(m.partition));
        fields.add_field_method_get("offset", |_, m| Ok(m.offset));
        fields.add_field_method_get("timestamp", |_, m| Ok(m.timestamp_ms));
        fields.add_field_method_get("key", |_, m| Ok(m.key_text()));
        fields.add_field_method_get("size", |_, m| Ok(m.payload.len()));
        fields.add_field_method_get("survey", |_, m| Ok(m.survey().as_str()));
        fields.add_field_method_get("schema_id", |_, m| Ok(m.schema_id()));
        fields.add_field_method_get("schema_version", |_, m| {
            m.schema_version().map_err(mlua::Error::RuntimeError)
        });
        fields.add_field_method_get("alert", |_, m| m.alert().map_err(mlua::Error::RuntimeError));
        fields.add_field_method_get("headers", |lua, m| {
            let t = lua.create_table()?;
            for h in m.headers.iter() {
                match &h.value {
                    Some(v) => t.set(h.name.as_str(), lua.create_string(v)?)?,
                    None => t.set(h.name.as_str(), false)?,
                }
            }
            Ok(t)
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("payload", |lua, m, ()| lua.create_string(&m.payload));
    }
}

/// Builds a sandboxed state and loads the script into it; returns `route`.
fn state(
    name: &str,
    source: &str,
    limits: Limits,
) -> Result<(Lua, Function, Rc<Cell<u64>>), HookError> {
    let err = |message: String| HookError {
        hook: name.to_string(),
        message,
    };
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )
    .map_err(|e| err(format!("cannot create a Lua state: {e}")))?;
    lua.set_memory_limit(limits.max_memory_bytes)
        .map_err(|e| err(format!("cannot limit memory: {e}")))?;
    let setup = || -> mlua::Result<()> {
        let g = lua.globals();
        for banned in ["dofile", "loadfile", "require", "collectgarbage"] {
            g.set(banned, Value::Nil)?;
        }
        // `load` of text only: never bytecode.
        let load: Function = g.get("load")?;
        let text_only = lua.create_function(
            move |_, (chunk, chunkname, _mode, env): (Value, Value, Value, Value)| {
                load.call::<mlua::MultiValue>((chunk, chunkname, "t", env))
            },
        )?;
        g.set("load", text_only)?;
        let log_name = name.to_string();
        g.set(
            "print",
            lua.create_function(move |_, args: mlua::Variadic<Value>| {
                let text: Vec<String> = args
                    .iter()
                    .map(|v| v.to_string().unwrap_or_else(|_| "?".into()))
                    .collect();
                tracing::info!(target: "ztfhook::script", "{log_name}: {}", text.join("\t"));
                Ok(())
            })?,
        )?;
        g.set(
            "has",
            lua.create_function(
                |_, (record, name): (mlua::UserDataRef<AlertRecord>, String)| Ok(record.has(&name)),
            )?,
        )?;
        g.set(
            "sample",
            lua.create_function(|_, (value, fraction): (Value, f64)| {
                let text = match &value {
                    Value::String(s) => s.to_str().map(|s| s.to_string()).unwrap_or_default(),
                    Value::Integer(i) => i.to_string(),
                    Value::Number(n) => crate::hook::script::format_float(*n),
                    Value::Boolean(b) => b.to_string(),
                    _ => String::new(),
                };
                Ok(sample(&text, fraction))
            })?,
        )?;
        Ok(())
    };
    setup().map_err(|e| err(format!("cannot set up the sandbox: {e}")))?;
    lua.load(source)
        .set_name(format!("@{name}"))
        .set_mode(mlua::ChunkMode::Text)
        .exec()
        .map_err(|e| err(lua_error(&e)))?;
    let route: Function = lua
        .globals()
        .get::<Option<Function>>("route")
        .ok()
        .flatten()
        .ok_or_else(|| err("the script must define `function route(msg)`".into()))?;
    let budget = Rc::new(Cell::new(0u64));
    let left = Rc::clone(&budget);
    // mlua needs the callback to be Send with the `send` feature off? It is
    // not enabled, so an Rc is fine: the state never leaves its worker.
    lua.set_hook(
        HookTriggers::new().every_nth_instruction(INSTRUCTIONS_PER_CHECK),
        move |_, _| {
            let n = left.get();
            if n < u64::from(INSTRUCTIONS_PER_CHECK) {
                return Err(mlua::Error::RuntimeError(format!(
                    "over the limit of {} instructions per call",
                    limits.max_operations
                )));
            }
            left.set(n - u64::from(INSTRUCTIONS_PER_CHECK));
            Ok(VmState::Continue)
        },
    )
    .map_err(|e| err(format!("cannot set the instruction limit: {e}")))?;
    Ok((lua, route, budget))
}

/// A Lua error as one line: `file:line: message`.
fn lua_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::SyntaxError { message, .. } => format!("syntax error: {message}"),
        mlua::Error::CallbackError { cause, .. } => lua_error(cause),
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

impl LuaScript {
    /// Compiles `source` (in a throw-away state) to report syntax errors.
    ///
    /// # Errors
    /// [`HookError`] with the file and line of a syntax error.
    pub fn compile(path: PathBuf, source: &str, env: Environment) -> Result<LuaScript, HookError> {
        state(&path.display().to_string(), source, env.limits)?;
        Ok(LuaScript {
            path,
            source: source.to_string(),
            env,
        })
    }
}

impl Compiled for LuaScript {
    fn instantiate(&self) -> Result<Box<dyn Hook>, HookError> {
        let name = self.path.display().to_string();
        let (lua, route, budget) = state(&name, &self.source, self.env.limits)?;
        // One message object per worker, refilled for each call: no garbage
        // per message.
        let msg = lua
            .create_userdata(ScriptMessage::placeholder(&self.env.decoder))
            .map_err(|e| HookError {
                hook: name.clone(),
                message: lua_error(&e),
            })?;
        Ok(Box::new(LuaHook {
            lua: SendLua(lua),
            msg,
            route,
            budget,
            max_operations: self.env.limits.max_operations,
            decoder: Arc::clone(&self.env.decoder),
            name,
        }))
    }
}

/// A Lua state confined to the worker thread that owns it.
struct SendLua(#[allow(dead_code)] Lua);

// SAFETY: a `LuaHook` is built and used by one worker thread, moved there
// once before first use; the state, its functions and the `Rc` budget are
// never touched by two threads.
unsafe impl Send for SendLua {}

/// One worker's Lua hook.
struct LuaHook {
    /// Owns the state the other fields live in; never used directly after set-up.
    #[allow(dead_code)]
    lua: SendLua,
    msg: mlua::AnyUserData,
    route: Function,
    budget: Rc<Cell<u64>>,
    max_operations: u64,
    decoder: Arc<crate::alert::Decoder>,
    name: String,
}

// SAFETY: see `SendLua`: all fields belong to the one state, used by one thread.
unsafe impl Send for LuaHook {}

impl LuaHook {
    fn error(&self, message: String) -> HookError {
        HookError {
            hook: self.name.clone(),
            message,
        }
    }

    fn string(&self, v: Value, what: &str) -> Result<String, HookError> {
        match v {
            Value::String(s) => Ok(s
                .to_str()
                .map_err(|_| self.error(format!("{what} is not UTF-8")))?
                .to_string()),
            Value::Integer(i) => Ok(i.to_string()),
            Value::Number(n) => Ok(crate::hook::script::format_float(n)),
            Value::Boolean(b) => Ok(b.to_string()),
            other => Err(self.error(format!(
                "{what} must be a string, not {}",
                other.type_name()
            ))),
        }
    }

    fn strings(&self, t: Table, what: &str) -> Result<Vec<String>, HookError> {
        let mut out = Vec::new();
        for v in t.sequence_values::<Value>() {
            let v = v.map_err(|e| self.error(lua_error(&e)))?;
            out.push(self.string(v, what)?);
        }
        Ok(out)
    }

    /// One key of a returned table.
    fn field(&self, r: &mut Returned, key: &str, v: Value) -> Result<(), HookError> {
        match key {
            "keep" => match v {
                Value::Boolean(b) => r.keep = Some(b),
                other => {
                    return Err(self.error(format!(
                        "`keep` must be a boolean, not {}",
                        other.type_name()
                    )))
                }
            },
            "topic" => r.topics.push(self.string(v, "`topic`")?),
            "topics" => match v {
                Value::Table(list) => r.topics.extend(self.strings(list, "`topics`")?),
                other => {
                    return Err(self.error(format!(
                        "`topics` must be a table, not {}",
                        other.type_name()
                    )))
                }
            },
            "attributes" => match v {
                Value::Table(attrs) => {
                    let mut failure = None;
                    attrs
                        .for_each::<String, Value>(|name, v| {
                            match self.string(v, &format!("attribute `{name}`")) {
                                Ok(value) => {
                                    r.attributes.push((name, value));
                                    Ok(())
                                }
                                Err(e) => {
                                    failure = Some(e);
                                    Err(mlua::Error::RuntimeError(String::new()))
                                }
                            }
                        })
                        .map_err(|e| failure.take().unwrap_or_else(|| self.error(lua_error(&e))))?;
                    r.attributes.sort();
                }
                other => {
                    return Err(self.error(format!(
                        "`attributes` must be a table, not {}",
                        other.type_name()
                    )))
                }
            },
            "ordering_key" => r.ordering_key = Some(self.string(v, "`ordering_key`")?),
            other => {
                return Err(self.error(format!(
                    "route() returned a table with unknown key `{other}` (known: {})",
                    DECISION_KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    fn convert(&self, value: Value) -> Result<Returned, HookError> {
        let mut r = Returned::default();
        match value {
            Value::Nil => {}
            Value::Boolean(b) => r.keep = Some(b),
            Value::String(_) => r.topics.push(self.string(value, "the topic")?),
            Value::Table(t) => {
                if t.raw_len() > 0 {
                    r.topics = self.strings(t, "route()'s list of topics")?;
                    return Ok(r);
                }
                // `for_each` reads keys straight off the Lua stack: much cheaper
                // than `pairs`, which makes a registry reference per key.
                let mut failure = None;
                t.for_each::<String, Value>(|key, v| {
                    if let Err(e) = self.field(&mut r, &key, v) {
                        failure = Some(e);
                        return Err(mlua::Error::RuntimeError(String::new()));
                    }
                    Ok(())
                })
                .map_err(|e| failure.take().unwrap_or_else(|| self.error(lua_error(&e))))?;
            }
            other => {
                return Err(self.error(format!(
                    "route() returned a {}; expected nothing, a boolean, a topic, a list of topics or a table",
                    other.type_name()
                )))
            }
        }
        Ok(r)
    }
}

impl Hook for LuaHook {
    fn decide(&mut self, message: &MessageView<'_>) -> Result<Decision, HookError> {
        self.budget.set(self.max_operations);
        *self
            .msg
            .borrow_mut::<ScriptMessage>()
            .map_err(|e| self.error(lua_error(&e)))? = ScriptMessage::new(message, &self.decoder);
        let value = self
            .route
            .call::<Value>(&self.msg)
            .map_err(|e| self.error(lua_error(&e)))?;
        Ok(self.convert(value)?.into_decision())
    }
}
