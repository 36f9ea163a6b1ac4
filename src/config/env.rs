//! `${NAME}` and `${NAME:-default}` in values, from the environment, so
//! that secrets and per-host values need not be written in the file.

/// Replaces `${NAME}` and `${NAME:-default}` with environment variables, so
/// that secrets and per-host values need not be written in the file.
///
/// # Errors
/// A message naming the variable that is not set (and has no default).
pub fn expand_env(value: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${` (write `${NAME}` or `${NAME:-default}`)".into());
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{inner}}}` is not an environment variable reference"
            ));
        }
        match lookup(name)
            .filter(|v| !v.is_empty())
            .or(default.map(str::to_string))
        {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable `{name}` is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
