//! `ztfhook check`: runs a hook on alert files or archives offline (read as
//! `replay` reads them, see [`crate::archive`]) and prints each decision,
//! the way to try a rule before deploying it, or over a whole night.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::archive::{Found, Kind};
use crate::hook::script::compile;
use crate::hook::Environment;
use crate::hook::{HookError, HookErrorKind, MessageView};

/// Prints one decision per file; returns false if the hook failed on any.
///
/// # Errors
/// [`HookError`] if the script does not compile (or a file cannot be read).
pub fn run(
    script: &Path,
    env: &Environment,
    topic: Option<&str>,
    inputs: &[PathBuf],
    json: bool,
) -> Result<bool, HookError> {
    let compiled = compile(script, env)?;
    let mut hook = compiled.instantiate()?;
    let mut found = crate::archive::expand(inputs, topic)
        .map_err(|e| HookError::new(script.display(), HookErrorKind::File, e.to_string()))?;
    if topic.is_none() {
        // Alert files without a topic of their own: the one `check` has always used.
        let files: Arc<str> = Arc::from(FILES_TOPIC);
        for input in &mut found.inputs {
            if matches!(input.kind, Kind::Files(_)) {
                input.topic = Arc::clone(&files);
            }
        }
    }
    let mut tally = Tally::default();
    for (path, why) in &found.skipped {
        eprintln!("ztfhook: {}: {why}: skipped", path.display());
        tally.skipped += 1;
    }
    let inputs = found.inputs;
    let (tx, rx) = crossbeam_channel::bounded(crate::archive::READ_AHEAD);
    let reader = {
        let inputs = inputs.clone();
        std::thread::spawn(move || {
            let starts = vec![Some(0); inputs.len()];
            let stop = std::sync::atomic::AtomicBool::new(false);
            crate::archive::read_all(&inputs, &starts, &Arc::new(AtomicU64::new(0)), &tx, &stop);
        })
    };
    let mut all_ok = true;
    if !json {
        println!("{:<60} {:<5} {:<30} attributes", "file", "keep", "topics");
    }
    for item in rx {
        let (input, index, name) = match &item {
            Found::Member {
                input, index, name, ..
            } => (*input, *index as usize, name.clone()),
            Found::Skipped { input, index, name } => {
                eprintln!(
                    "ztfhook: {}",
                    crate::archive::skipped_note(&inputs[*input], *index, name)
                );
                tally.skipped += 1;
                continue;
            }
            Found::Done {
                input,
                error,
                members,
            } => {
                if let Some(e) = error {
                    eprintln!("ztfhook: {}: {e}", inputs[*input].path.display());
                    all_ok = false;
                    tally.unreadable += 1;
                } else if *members == 0 {
                    eprintln!("ztfhook: {}", crate::archive::empty_note(&inputs[*input]));
                }
                continue;
            }
        };
        let name = match &inputs[input].kind {
            Kind::Files(files) => files
                .get(index)
                .map_or(name.clone(), |(p, _)| p.display().to_string()),
            Kind::Tarball => format!("{}:{name}", inputs[input].path.display()),
        };
        let envelope = item.into_envelope(&inputs).expect("a member");
        let decided = match envelope.archive.as_ref().and_then(|m| m.problem.clone()) {
            Some(problem) => Err(HookError::new(
                script.display(),
                HookErrorKind::Runtime,
                problem,
            )),
            None => hook.decide(&MessageView::new(&envelope)),
        };
        tally.members += 1;
        match decided {
            Ok(d) => {
                if d.keep {
                    tally.kept += 1;
                    for t in destinations(&d) {
                        *tally.topics.entry(t).or_default() += 1;
                    }
                } else {
                    tally.dropped += 1;
                }
                let topics = destinations(&d);
                if json {
                    let attrs: serde_json::Map<String, serde_json::Value> = d
                        .attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                        .collect();
                    let line = serde_json::json!({
                        "file": name, "keep": d.keep, "topics": d.topics, "objects": d.objects,
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
                tally.errors += 1;
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
    let _ = reader.join();
    eprintln!("ztfhook: check: {tally}");
    Ok(all_ok)
}

/// The topic of alert files when `--topic` is not given.
const FILES_TOPIC: &str = "ztf_20260101_programid1";

/// What a check found, for its last line.
#[derive(Debug, Default)]
struct Tally {
    members: u64,
    kept: u64,
    dropped: u64,
    errors: u64,
    skipped: u64,
    unreadable: u64,
    topics: std::collections::BTreeMap<String, u64>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} alerts: {} kept, {} dropped, {} errors; {} files skipped (not alerts by their names); {} inputs not read to their end",
            self.members, self.kept, self.dropped, self.errors, self.skipped, self.unreadable
        )?;
        if !self.topics.is_empty() {
            let by: Vec<String> = self
                .topics
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect();
            write!(f, "; kept by topic: {}", by.join(" "))?;
        }
        Ok(())
    }
}

/// What a decision names, for the table and the tally: its topics and
/// objects, or `(default)` when it names neither.
fn destinations(d: &crate::hook::Decision) -> Vec<String> {
    if d.topics.is_empty() && d.objects.is_empty() {
        return vec!["(default)".to_string()];
    }
    d.topics.iter().chain(&d.objects).cloned().collect()
}
