//! The per-message call into Lua, on the Lua stack itself: one protected
//! call of a C function that fills the worker's message table, calls
//! `route(msg)` and reads its return value with the C API. No mlua handle,
//! registry reference or intermediate string is made per field. Through
//! mlua's handles the same work cost about twice as much (each returned
//! string and table became a reference, each key a `String`, and each field
//! read went through a userdata method).
//!
//! Invariants that make this sound:
//! - outside the protected call, only functions that cannot raise are used
//!   (`lua_checkstack`, pushing a light C function and a light userdata,
//!   `lua_pcall`, `lua_rawseti` into a registry slot that exists,
//!   `lua_settop`);
//! - the C functions here have `LUA_MINSTACK` (20) free slots and use at
//!   most 5; their bodies are `extern "C"`, so a Rust panic in them aborts
//!   rather than unwinds through Lua's C frames;
//! - these assumptions hold for the mlua and mlua-sys versions pinned in
//!   Cargo.toml (exactly), and the tests of `lua` exercise each path;
//! - an API function that may raise a Lua error (a `longjmp`: allocation in
//!   `lua_pushstring`, a bad argument in `luaL_checknumber`, any error of
//!   the script in `lua_call`) is called only while no Rust value that needs
//!   dropping is alive in these frames; the protected call catches it;
//! - mlua's own callbacks (the metatable's `__index`, `has`, `print`, the
//!   instruction limit) run inside it as inside any Lua call;
//! - reading the returned value uses only functions that cannot raise:
//!   `lua_type`, `lua_next` on a table nobody modifies meanwhile,
//!   `lua_tolstring` on strings only (so no number is converted in place,
//!   which would also break `lua_next`), `lua_tointegerx`, `lua_tonumberx`,
//!   `lua_toboolean`, `lua_rawgeti`, `lua_settop`.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::io::Write;

use mlua::ffi::{self, lua_State};

use crate::hook::returned::{format_float, Returned, DECISION_KEYS};
use crate::hook::sampling::{sample, sample_bytes};

/// One call of the script: what [`call_route`] needs, and what it found.
pub(super) struct Call<'a> {
    /// Registry ids of `route` and of the message tables' metatable.
    pub route: c_int,
    pub meta: c_int,
    /// Where the identity of this call's fresh message table is put, for
    /// the metatable's fields.
    pub table: &'a Cell<*const c_void>,
    /// The fields every call sets in the message table.
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub size: usize,
    /// The decision `route` returned.
    pub returned: Returned,
    /// Why the returned value is not a decision, if it is not.
    pub invalid: Option<String>,
}

/// Calls `route(msg)` for `call`, in a protected call of its own. On an
/// error, the error value is stored in the registry at `error_slot` (an id
/// that already holds a value, so storing allocates nothing) and `false` is
/// returned; a call that could not be made sets `call.invalid`. The stack is
/// left as it was.
///
/// # Safety
/// `state` is the state's main thread, used by this thread only, outside any
/// other use of it; `call`'s ids are live registry ids of that state.
pub(super) unsafe fn call_route(
    state: *mut lua_State,
    call: &mut Call<'_>,
    error_slot: c_int,
) -> bool {
    let top = ffi::lua_gettop(state);
    // Neither push allocates: a C function without upvalues and a light
    // userdata are plain values. Nothing here can raise outside the pcall.
    if ffi::lua_checkstack(state, 2) == 0 {
        call.invalid = Some("the Lua state cannot grow its stack (out of memory)".into());
        return true;
    }
    ffi::lua_pushcfunction(state, route_trampoline);
    ffi::lua_pushlightuserdata(state, std::ptr::from_mut(call).cast());
    let ok = ffi::lua_pcall(state, 1, 0, 0) == ffi::LUA_OK;
    if !ok {
        ffi::lua_rawseti(
            state,
            ffi::LUA_REGISTRYINDEX,
            ffi::lua_Integer::from(error_slot),
        );
    }
    ffi::lua_settop(state, top);
    ok
}

/// Sets `msg[key]` (the table at index 2) to the value on top, popped,
/// without metamethods.
unsafe fn set(state: *mut lua_State, key: &CStr) {
    ffi::lua_pushstring(state, key.as_ptr());
    ffi::lua_rotate(state, -2, 1);
    ffi::lua_rawset(state, 2);
}

/// The protected part of [`call_route`], as Lua calls it. Lua's C-function
/// type is `extern "C-unwind"`; the work is done in [`route_protected`],
/// an `extern "C"` function, so a Rust panic there aborts the process
/// instead of unwinding into Lua's C frames.
unsafe extern "C-unwind" fn route_trampoline(state: *mut lua_State) -> c_int {
    route_protected(state)
}

/// Fills a fresh message table, calls `route(msg)` (its errors are Lua
/// errors, a `longjmp` to `call_route`'s pcall, not an unwind) and reads the
/// returned value into the [`Call`] its one argument points to.
unsafe extern "C" fn route_protected(state: *mut lua_State) -> c_int {
    // A reference: nothing to drop if a call below raises.
    let Some(call) = ffi::lua_touserdata(state, 1).cast::<Call>().as_mut() else {
        return 0;
    };
    ffi::lua_settop(state, 0);
    ffi::lua_rawgeti(
        state,
        ffi::LUA_REGISTRYINDEX,
        ffi::lua_Integer::from(call.route),
    );
    // A new table for every call: nothing a script sets in one (with
    // `rawset` too) is there for the next.
    ffi::lua_createtable(state, 0, 8);
    ffi::lua_rawgeti(
        state,
        ffi::LUA_REGISTRYINDEX,
        ffi::lua_Integer::from(call.meta),
    );
    ffi::lua_setmetatable(state, 2);
    call.table.set(ffi::lua_topointer(state, 2));
    ffi::lua_pushlstring(state, call.topic.as_ptr().cast(), call.topic.len());
    set(state, c"topic");
    ffi::lua_pushinteger(state, ffi::lua_Integer::from(call.partition));
    set(state, c"partition");
    ffi::lua_pushinteger(state, call.offset);
    set(state, c"offset");
    match call.timestamp_ms {
        Some(ts) => ffi::lua_pushinteger(state, ts),
        None => ffi::lua_pushnil(state),
    }
    set(state, c"timestamp");
    ffi::lua_pushinteger(
        state,
        ffi::lua_Integer::try_from(call.size).unwrap_or(ffi::lua_Integer::MAX),
    );
    set(state, c"size");
    ffi::lua_call(state, 1, 1);
    // Only calls that cannot raise from here on.
    if let Err(why) = read_returned(state, 1, &mut call.returned) {
        call.invalid = Some(why);
    }
    0
}

/// A Lua type's name, as `type()` gives it.
unsafe fn type_name(state: *mut lua_State, idx: c_int) -> String {
    let name = ffi::lua_typename(state, ffi::lua_type(state, idx));
    CStr::from_ptr(name).to_string_lossy().into_owned()
}

/// The bytes of the string at `idx`, which must be a string.
unsafe fn bytes<'a>(state: *mut lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0;
    let p = ffi::lua_tolstring(state, idx, &mut len);
    std::slice::from_raw_parts(p.cast(), len)
}

/// A string, number or boolean as text, the same as the Rhai engine gives.
unsafe fn text(
    state: *mut lua_State,
    idx: c_int,
    what: &dyn Fn() -> String,
) -> Result<String, String> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TSTRING => std::str::from_utf8(bytes(state, idx))
            .map(str::to_string)
            .map_err(|_| format!("{} is not UTF-8", what())),
        ffi::LUA_TNUMBER => Ok(if ffi::lua_isinteger(state, idx) != 0 {
            ffi::lua_tointegerx(state, idx, std::ptr::null_mut()).to_string()
        } else {
            format_float(ffi::lua_tonumberx(state, idx, std::ptr::null_mut()))
        }),
        ffi::LUA_TBOOLEAN => Ok((ffi::lua_toboolean(state, idx) != 0).to_string()),
        _ => Err(format!(
            "{} must be a string, not {}",
            what(),
            type_name(state, idx)
        )),
    }
}

/// The strings of the sequence at `idx` (up to its first nil).
unsafe fn texts(
    state: *mut lua_State,
    idx: c_int,
    what: &str,
    out: &mut Vec<String>,
) -> Result<(), String> {
    for i in 1.. {
        if ffi::lua_rawgeti(state, idx, i) == ffi::LUA_TNIL {
            ffi::lua_pop(state, 1);
            return Ok(());
        }
        let item = text(state, -1, &|| what.to_string());
        ffi::lua_pop(state, 1);
        out.push(item?);
    }
    Ok(())
}

/// Calls `read` with each key and value of the table at `idx` on top of the
/// stack (key at -2, value at -1); stops at its first error. The stack is
/// left as it was.
unsafe fn each_pair(
    state: *mut lua_State,
    idx: c_int,
    mut read: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    ffi::lua_pushnil(state);
    while ffi::lua_next(state, idx) != 0 {
        let result = read();
        ffi::lua_pop(state, 1);
        if result.is_err() {
            ffi::lua_pop(state, 1);
            return result;
        }
    }
    Ok(())
}

/// Reads route()'s return value at `idx`: nothing, a boolean, a topic, a
/// list of topics, or a table of decision keys.
unsafe fn read_returned(
    state: *mut lua_State,
    idx: c_int,
    out: &mut Returned,
) -> Result<(), String> {
    match ffi::lua_type(state, idx) {
        ffi::LUA_TNIL => Ok(()),
        ffi::LUA_TBOOLEAN => {
            out.keep = Some(ffi::lua_toboolean(state, idx) != 0);
            Ok(())
        }
        ffi::LUA_TSTRING => {
            out.topics.push(text(state, idx, &|| "the topic".into())?);
            Ok(())
        }
        ffi::LUA_TTABLE if ffi::lua_rawlen(state, idx) > 0 => {
            texts(state, idx, "route()'s list of topics", &mut out.topics)
        }
        ffi::LUA_TTABLE => each_pair(state, idx, || read_field(state, out)),
        _ => Err(format!(
            "route() returned a {}; expected nothing, a boolean, a topic, a list of topics or a table",
            type_name(state, idx)
        )),
    }
}

/// Whether the value on top has type `ty`; if not, `what` (`x must be a
/// table`) with the type it has.
unsafe fn require(state: *mut lua_State, ty: c_int, what: &str) -> Result<(), String> {
    if ffi::lua_type(state, -1) == ty {
        Ok(())
    } else {
        Err(format!("{what}, not {}", type_name(state, -1)))
    }
}

/// One key (at -2) and value (at -1) of a returned table.
unsafe fn read_field(state: *mut lua_State, out: &mut Returned) -> Result<(), String> {
    let key: &[u8] = if ffi::lua_type(state, -2) == ffi::LUA_TSTRING {
        bytes(state, -2)
    } else {
        b""
    };
    match key {
        b"keep" => {
            require(state, ffi::LUA_TBOOLEAN, "`keep` must be a boolean")?;
            out.keep = Some(ffi::lua_toboolean(state, -1) != 0);
        }
        b"topic" => out.topics.push(text(state, -1, &|| "`topic`".into())?),
        b"topics" => {
            require(state, ffi::LUA_TTABLE, "`topics` must be a table")?;
            texts(state, ffi::lua_gettop(state), "`topics`", &mut out.topics)?;
        }
        b"object" => out.objects.push(text(state, -1, &|| "`object`".into())?),
        b"objects" => {
            require(state, ffi::LUA_TTABLE, "`objects` must be a table")?;
            texts(state, ffi::lua_gettop(state), "`objects`", &mut out.objects)?;
        }
        b"attributes" => {
            require(state, ffi::LUA_TTABLE, "`attributes` must be a table")?;
            read_attributes(state, ffi::lua_gettop(state), out)?;
        }
        b"ordering_key" => out.ordering_key = Some(text(state, -1, &|| "`ordering_key`".into())?),
        _ => {
            let shown = match ffi::lua_type(state, -2) {
                ffi::LUA_TSTRING => String::from_utf8_lossy(key).into_owned(),
                _ => text(state, -2, &String::new).unwrap_or_else(|_| type_name(state, -2)),
            };
            return Err(format!(
                "route() returned a table with unknown key `{shown}` (known: {})",
                DECISION_KEYS.join(", ")
            ));
        }
    }
    Ok(())
}

/// The attributes table at `idx`: names and values as text, sorted by name.
unsafe fn read_attributes(
    state: *mut lua_State,
    idx: c_int,
    out: &mut Returned,
) -> Result<(), String> {
    each_pair(state, idx, || {
        let name = text(state, -2, &|| "an attribute name".into())?;
        let value = text(state, -1, &|| format!("attribute `{name}`"))?;
        out.attributes.push((name, value));
        Ok(())
    })?;
    out.attributes.sort();
    Ok(())
}

/// `sample(value, fraction)` as a C function: the same choice as
/// [`sample`], without mlua's argument conversion. As for
/// [`route_trampoline`], the work is in an `extern "C"` function.
///
/// # Safety
/// Called by Lua only, as a C function.
pub(super) unsafe extern "C-unwind" fn sample_function(state: *mut lua_State) -> c_int {
    sample_protected(state)
}

/// The body of [`sample_function`]: aborts rather than unwinds.
unsafe extern "C" fn sample_protected(state: *mut lua_State) -> c_int {
    // May raise: nothing to drop yet.
    let fraction = ffi::luaL_checknumber(state, 2);
    let keep = match ffi::lua_type(state, 1) {
        ffi::LUA_TSTRING => sample_bytes(bytes(state, 1), fraction),
        ffi::LUA_TNUMBER if ffi::lua_isinteger(state, 1) != 0 => {
            let mut digits = [0u8; 24];
            let mut cursor = &mut digits[..];
            let _ = write!(
                cursor,
                "{}",
                ffi::lua_tointegerx(state, 1, std::ptr::null_mut())
            );
            let len = 24 - cursor.len();
            sample_bytes(&digits[..len], fraction)
        }
        ffi::LUA_TNUMBER => sample(
            &format_float(ffi::lua_tonumberx(state, 1, std::ptr::null_mut())),
            fraction,
        ),
        ffi::LUA_TBOOLEAN => sample(
            if ffi::lua_toboolean(state, 1) != 0 {
                "true"
            } else {
                "false"
            },
            fraction,
        ),
        _ => sample("", fraction),
    };
    ffi::lua_pushboolean(state, c_int::from(keep));
    1
}
