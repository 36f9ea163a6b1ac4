//! Lua hooks (vendored Lua 5.4).
//!
//! Invariants: each worker owns a Lua state built from the shared source;
//! the state has only the `table`, `string`, `math` and `utf8` libraries (no
//! `io`, `os`, `package`/`require`, `debug`), `load` accepts text only (no
//! bytecode), `dofile`/`loadfile` are gone; an instruction-count hook stops a
//! call after `max_operations` VM instructions, and the state's memory is
//! capped; both are in place before the script's top level runs, at first
//! load and at every reload; `print` goes to the program's log. Each call's
//! `msg` is a fresh table (`stack` makes the call), so nothing a script sets
//! in it, `rawset` included, reaches another call; new keys are refused, and
//! the fields that cost something come from its metatable, served to the
//! table of the call in progress only.

mod stack;

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{
    Function, HookTriggers, IntoLua, Lua, LuaOptions, MetaMethod, RegistryKey, StdLib, Table,
    UserData, UserDataMethods, Value, VmState,
};

use crate::alert::avro::Value as AvroValue;
use crate::alert::Decoder;
use crate::envelope::Envelope;
use crate::hook::message::{AlertRecord, FieldError, ScriptMessage};
use crate::hook::returned::Returned;
use crate::hook::{
    Compiled, Decision, Environment, Hook, HookError, HookErrorKind, Limits, MessageView,
};

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
        AvroValue::Record(..) => record_value(lua, record.child(value))?,
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
            let v = r.get(&name).map_err(mlua::Error::external)?;
            alert_value(lua, &v, v.value)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, r, ()| {
            Ok(r.to_json().map_err(mlua::Error::external)?.to_string())
        });
    }
}

/// The alert records handed to the script during the call in progress: at
/// its end each is emptied (the `Arc<Alert>` it holds is dropped), so a
/// record kept in a table holds no memory outside Lua's bound and is
/// refused when read in a later call.
#[derive(Default)]
struct CallRecords(Vec<mlua::AnyUserData>);

/// An alert record as a Lua value, registered to be emptied after the call.
fn record_value(lua: &Lua, record: AlertRecord) -> mlua::Result<Value> {
    let ud = lua.create_userdata(record)?;
    if let Some(mut kept) = lua.app_data_mut::<CallRecords>() {
        kept.0.push(ud.clone());
    }
    Ok(Value::UserData(ud))
}

/// The message a worker is deciding, as the message table's metatable sees
/// it.
struct Current {
    /// The envelope of the call in progress; null between calls.
    envelope: Cell<*const Envelope>,
    /// The message table of the call in progress (made fresh for each call):
    /// a table kept from an earlier call is refused.
    table: Cell<*const c_void>,
    /// Built from it on the first read of a field that needs it.
    message: RefCell<Option<ScriptMessage>>,
    decoder: Arc<Decoder>,
}

impl Current {
    /// Runs `f` on the message of the call in progress, if `table` is that
    /// call's message table.
    fn with<R>(
        &self,
        table: *const c_void,
        f: impl FnOnce(&ScriptMessage) -> mlua::Result<R>,
    ) -> mlua::Result<R> {
        let envelope = self.envelope.get();
        if envelope.is_null() || table != self.table.get() {
            return Err(mlua::Error::RuntimeError(
                "msg is only valid during the route() call that received it".into(),
            ));
        }
        if self.message.borrow().is_none() {
            // SAFETY: not null, so a `decide` call is in progress, and its
            // envelope outlives it (`decide` clears the pointer before it
            // returns).
            let view = MessageView::new(unsafe { &*envelope });
            *self.message.borrow_mut() = Some(ScriptMessage::new(&view, &self.decoder));
        }
        match &*self.message.borrow() {
            Some(m) => f(m),
            None => Err(mlua::Error::RuntimeError("no message".into())),
        }
    }
}

/// The pointer that identifies a value passed as `msg` (null for a
/// non-table).
fn identity(value: &Value) -> *const c_void {
    match value {
        Value::Table(t) => t.to_pointer(),
        _ => std::ptr::null(),
    }
}

/// The metatable of every message table. `stack` makes a fresh table for
/// each call and sets the cheap fields (topic, partition, offset, timestamp,
/// size) in it; this metatable's `__index` serves the fields that cost
/// something to build (alert, survey, schema, key, headers, payload) from
/// the message being decided, only when a script reads them and only to that
/// call's table; `__newindex` refuses new keys (a script's `rawset` reaches
/// only its own call's table, which no later call sees).
fn message_metatable(lua: &Lua, current: &Rc<Current>) -> mlua::Result<Table> {
    let payload_message = Rc::clone(current);
    let payload = lua.create_function(move |lua, this: Value| {
        payload_message.with(identity(&this), |m| lua.create_string(&m.payload))
    })?;
    let byte_message = Rc::clone(current);
    let byte = lua.create_function(move |_, (this, i): (Value, i64)| {
        byte_message.with(identity(&this), |m| {
            Ok(usize::try_from(i)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| m.payload.get(i))
                .map(|b| i64::from(*b)))
        })
    })?;
    let current = Rc::clone(current);
    let index = lua.create_function(move |lua, (this, key): (Value, Value)| {
        let Value::String(key) = key else {
            return Ok(Value::Nil);
        };
        let key = key.as_bytes();
        if !matches!(
            &*key,
            b"key"
                | b"survey"
                | b"schema_id"
                | b"schema_version"
                | b"alert"
                | b"headers"
                | b"payload"
                | b"byte"
                | b"tombstone"
                | b"file"
                | b"member"
        ) {
            return Ok(Value::Nil);
        }
        current.with(identity(&this), |m| {
            Ok(match &*key {
                b"key" => m.key_text().into_lua(lua)?,
                b"survey" => m.survey().as_str().into_lua(lua)?,
                b"schema_id" => m.schema_id().into_lua(lua)?,
                b"schema_version" => m
                    .schema_version()
                    .map_err(mlua::Error::external)?
                    .into_lua(lua)?,
                b"alert" => record_value(lua, m.alert().map_err(mlua::Error::external)?)?,
                b"headers" => {
                    let t = lua.create_table()?;
                    for h in m.headers.iter() {
                        match &h.value {
                            Some(v) => t.raw_set(h.name.as_str(), lua.create_string(v)?)?,
                            None => t.raw_set(h.name.as_str(), false)?,
                        }
                    }
                    Value::Table(t)
                }
                b"payload" => Value::Function(payload.clone()),
                b"byte" => Value::Function(byte.clone()),
                b"tombstone" => Value::Boolean(m.tombstone),
                b"file" => m.archive.as_ref().map(|(f, _)| &**f).into_lua(lua)?,
                b"member" => m.archive.as_ref().map(|(_, n)| n.as_str()).into_lua(lua)?,
                _ => Value::Nil,
            })
        })
    })?;
    let meta = lua.create_table()?;
    meta.raw_set("__index", index)?;
    meta.raw_set(
        "__newindex",
        lua.create_function(|_, (_, key): (Value, Value)| -> mlua::Result<()> {
            Err(mlua::Error::RuntimeError(format!(
                "msg is read-only (cannot set `{}`): use a local variable",
                key.to_string().unwrap_or_default()
            )))
        })?,
    )?;
    meta.raw_set("__metatable", false)?;
    Ok(meta)
}

/// Builds a sandboxed state and loads the script into it; returns `route`.
fn state(
    name: &str,
    source: &str,
    limits: Limits,
) -> Result<(Lua, Function, Rc<Cell<u64>>), HookError> {
    let err = |message: String| HookError::new(name, HookErrorKind::Load, message);
    let lua = Lua::new_with(
        StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8,
        LuaOptions::default(),
    )
    .map_err(|e| err(format!("cannot create a Lua state: {e}")))?;
    lua.set_memory_limit(limits.max_memory_bytes)
        .map_err(|e| err(format!("cannot limit memory: {e}")))?;
    // The limit's budget: one call's worth, for the top level first.
    let budget = Rc::new(Cell::new(limits.max_operations));
    let setup = || -> mlua::Result<()> {
        let g = lua.globals();
        // `pcall` and `xpcall` catch the limit's error like any other; once
        // the budget is spent, they raise it again, so no script outlasts it.
        for name in ["pcall", "xpcall"] {
            let inner: Function = g.get(name)?;
            let left = Rc::clone(&budget);
            let max = limits.max_operations;
            g.set(
                name,
                lua.create_function(move |_, args: mlua::MultiValue| {
                    let caught = inner.call::<mlua::MultiValue>(args)?;
                    if spent(&left) {
                        return Err(mlua::Error::external(OverOperations(max)));
                    }
                    Ok(caught)
                })?,
            )?;
        }
        for banned in ["dofile", "loadfile", "require", "collectgarbage"] {
            g.set(banned, Value::Nil)?;
        }
        // `load` of text only: never bytecode. The arguments are passed on
        // as given, so that a call without `env` gets the default one (an
        // explicit nil would give the chunk `_ENV = nil`).
        let load: Function = g.get("load")?;
        let text_only = lua.create_function(move |lua, args: mlua::MultiValue| {
            let mut args = args.into_vec();
            args.resize(args.len().max(3), Value::Nil);
            args[2] = Value::String(lua.create_string("t")?);
            load.call::<mlua::MultiValue>(mlua::MultiValue::from_vec(args))
        })?;
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
        // SAFETY: `sample_function` follows the C-function protocol (see `stack`).
        g.set("sample", unsafe {
            lua.create_c_function(stack::sample_function)?
        })?;
        Ok(())
    };
    setup().map_err(|e| err(format!("cannot set up the sandbox: {e}")))?;
    // The limit is in place before any of the script runs: its top level
    // gets one call's budget.
    let left = Rc::clone(&budget);
    lua.set_hook(
        HookTriggers::new().every_nth_instruction(INSTRUCTIONS_PER_CHECK),
        move |_, _| {
            if spent(&left) {
                return Err(mlua::Error::external(OverOperations(limits.max_operations)));
            }
            left.set(left.get() - u64::from(INSTRUCTIONS_PER_CHECK));
            Ok(VmState::Continue)
        },
    )
    .map_err(|e| err(format!("cannot set the instruction limit: {e}")))?;
    lua.load(source)
        // The file's name only: Lua's messages (which may reach a published
        // `ztfhook.error`) then show no directory.
        .set_name(format!(
            "@{}",
            std::path::Path::new(name)
                .file_name()
                .map_or_else(|| name.into(), |n| n.to_string_lossy())
        ))
        .set_mode(mlua::ChunkMode::Text)
        .exec()
        .map_err(|e| {
            let (kind, message) = classify(&e);
            let kind = match kind {
                HookErrorKind::Runtime | HookErrorKind::NotAnAlert => HookErrorKind::Load,
                other => other,
            };
            HookError::new(name, kind, format!("at load: {message}"))
        })?;
    let route: Function = lua
        .globals()
        .get::<Option<Function>>("route")
        .ok()
        .flatten()
        .ok_or_else(|| {
            HookError::new(
                name,
                HookErrorKind::Compile,
                "the script must define `function route(msg)`",
            )
        })?;
    Ok((lua, route, budget))
}

/// Whether a call's budget has no check's worth of instructions left.
fn spent(budget: &Cell<u64>) -> bool {
    budget.get() < u64::from(INSTRUCTIONS_PER_CHECK)
}

/// The instruction limit, as the error it raises.
#[derive(Debug, thiserror::Error)]
#[error("over the limit of {0} instructions per call")]
struct OverOperations(u64);

/// A Lua error's kind, from the typed errors it carries, and its text.
fn classify(e: &mlua::Error) -> (HookErrorKind, String) {
    let kind = if matches!(e, mlua::Error::SyntaxError { .. }) {
        HookErrorKind::Compile
    } else if e.chain().any(|c| c.is::<OverOperations>()) {
        HookErrorKind::Operations
    } else if e.chain().any(|c| {
        matches!(
            c.downcast_ref::<mlua::Error>(),
            Some(mlua::Error::MemoryError(_))
        )
    }) || matches!(e, mlua::Error::MemoryError(_))
    {
        HookErrorKind::Memory
    } else if e
        .chain()
        .filter_map(|c| c.downcast_ref::<FieldError>())
        .any(|f| matches!(f, FieldError::NotAnAlert(_)))
    {
        HookErrorKind::NotAnAlert
    } else {
        HookErrorKind::Runtime
    };
    (kind, lua_error(e))
}

/// A Lua error as one line: `file:line: message`.
fn lua_error(e: &mlua::Error) -> String {
    match e {
        mlua::Error::SyntaxError { message, .. } => format!("syntax error: {message}"),
        mlua::Error::CallbackError { cause, .. } => lua_error(cause),
        mlua::Error::UserDataDestructed => {
            "an alert record is only valid during the route() call that read it: keep its values, not the record".into()
        }
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
        let current = Rc::new(Current {
            envelope: Cell::new(std::ptr::null()),
            table: Cell::new(std::ptr::null()),
            message: RefCell::new(None),
            decoder: Arc::clone(&self.env.decoder),
        });
        lua.set_app_data(CallRecords::default());
        let setup = || -> mlua::Result<_> {
            let meta = message_metatable(&lua, &current)?;
            let route = lua.create_registry_value(route)?;
            let meta = lua.create_registry_value(meta)?;
            let error = lua.create_registry_value(false)?;
            let mut main = std::ptr::null_mut();
            // SAFETY: only reads the state pointer, the main thread's (no
            // coroutine is running during set-up).
            unsafe { lua.exec_raw::<()>((), |state| main = state)? };
            Ok((route, meta, error, main))
        };
        let (route, meta, error, main) =
            setup().map_err(|e| HookError::new(&name, HookErrorKind::Load, lua_error(&e)))?;
        Ok(Box::new(LuaHook {
            lua,
            main,
            current,
            route,
            meta,
            error,
            budget,
            max_operations: self.env.limits.max_operations,
            name,
        }))
    }
}

/// One worker's Lua hook.
struct LuaHook {
    /// Built on the worker thread that uses it, and never sent elsewhere
    /// (a [`Hook`] need not be `Send`).
    lua: Lua,
    /// The state's main thread, for [`stack::call_route`].
    main: *mut mlua::ffi::lua_State,
    /// The message being decided, for the fields its metatable serves.
    current: Rc<Current>,
    /// Registry slots: the script's `route`, the message tables' metatable,
    /// and where a call's error value is put.
    route: RegistryKey,
    meta: RegistryKey,
    error: RegistryKey,
    budget: Rc<Cell<u64>>,
    max_operations: u64,
    name: String,
}

impl Hook for LuaHook {
    fn decide(&mut self, message: &MessageView<'_>) -> Result<Decision, HookError> {
        self.budget.set(self.max_operations);
        let mut call = stack::Call {
            route: self.route.id(),
            meta: self.meta.id(),
            table: &self.current.table,
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp_ms(),
            size: message.payload().len(),
            returned: Returned::default(),
            invalid: None,
        };
        self.current.envelope.set(message.envelope());
        // SAFETY: `main` is this hook's state's main thread, used by this
        // thread only; the ids are this hook's registry keys.
        let ok = unsafe { stack::call_route(self.main, &mut call, self.error.id()) };
        self.current.envelope.set(std::ptr::null());
        self.current.table.set(std::ptr::null());
        self.current.message.borrow_mut().take();
        let records: Vec<mlua::AnyUserData> = self
            .lua
            .app_data_mut::<CallRecords>()
            .map(|mut kept| std::mem::take(&mut kept.0))
            .unwrap_or_default();
        for record in records {
            let _ = record.take::<AlertRecord>();
        }
        if !ok {
            let raised = self.lua.registry_value::<Value>(&self.error);
            let (kind, message) = match raised {
                Ok(Value::Error(e)) => classify(&e),
                Ok(Value::String(s)) => (
                    HookErrorKind::Runtime,
                    s.to_string_lossy()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
                Ok(other) => (
                    HookErrorKind::Runtime,
                    format!("route() raised a {}", other.type_name()),
                ),
                Err(e) => classify(&e),
            };
            return Err(HookError::new(&self.name, kind, message));
        }
        match call.invalid {
            None => Ok(call.returned.into_decision()),
            Some(why) => Err(HookError::new(&self.name, HookErrorKind::Returned, why)),
        }
    }
}
