//! `ztfhook check`: runs a hook on alert files offline and prints each
//! decision, the way to try a rule before deploying it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::envelope::Envelope;
use crate::hook::script::compile;
use crate::hook::Environment;
use crate::hook::{HookError, HookErrorKind, MessageView};

/// Expands directories (and their subdirectories) into their `.avro` files,
/// sorted; files stay as given.
///
/// # Errors
/// The error of a directory that cannot be read.
pub fn alert_files(inputs: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(input)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir() || p.extension().is_some_and(|x| x == "avro"))
                .collect();
            inner.sort();
            for p in inner {
                if p.is_dir() {
                    out.extend(alert_files(&[p])?);
                } else {
                    out.push(p);
                }
            }
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// Prints one decision per file; returns false if the hook failed on any.
///
/// # Errors
/// [`HookError`] if the script does not compile (or a file cannot be read).
pub fn run(
    script: &Path,
    env: &Environment,
    topic: &str,
    inputs: &[PathBuf],
    json: bool,
) -> Result<bool, HookError> {
    let compiled = compile(script, env)?;
    let mut hook = compiled.instantiate()?;
    let read_error = |e: std::io::Error, p: &Path| {
        HookError::new(
            script.display(),
            HookErrorKind::File,
            format!("{}: {e}", p.display()),
        )
    };
    let list = alert_files(inputs).map_err(|e| read_error(e, Path::new(".")))?;
    let topic: Arc<str> = Arc::from(topic);
    let mut all_ok = true;
    if !json {
        println!("{:<60} {:<5} {:<30} attributes", "file", "keep", "topics");
    }
    for (i, path) in list.iter().enumerate() {
        let payload = std::fs::read(path).map_err(|e| read_error(e, path))?;
        let envelope = Envelope {
            topic: Arc::clone(&topic),
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            payload: Bytes::from(payload),
            ..Default::default()
        };
        let name = path.display().to_string();
        match hook.decide(&MessageView::new(&envelope)) {
            Ok(d) => {
                let topics = if d.topics.is_empty() {
                    vec!["(default)".to_string()]
                } else {
                    d.topics.clone()
                };
                if json {
                    let attrs: serde_json::Map<String, serde_json::Value> = d
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                        .collect();
                    let line = serde_json::json!({
                        "file": name, "keep": d.keep, "topics": d.topics,
                        "attributes": attrs, "ordering_key": d.ordering_key,
                    });
                    println!("{line}");
                } else {
                    let attrs: Vec<String> = d
                        .attributes
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!(
                        "{:<60} {:<5} {:<30} {}",
                        name,
                        d.keep,
                        topics.join(","),
                        attrs.join(" ")
                    );
                }
            }
            Err(e) => {
                all_ok = false;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"file": name, "error": e.to_string()})
                    );
                } else {
                    println!("{name:<60} error: {e}");
                }
            }
        }
    }
    Ok(all_ok)
}
