//! A decision as a script returned it, before the engine-independent checks,
//! and the text form of values both engines share.

use crate::hook::Decision;

/// A decision as a script returned it, before the engine-independent checks.
#[derive(Debug, Default)]
pub struct Returned {
    pub keep: Option<bool>,
    pub topics: Vec<String>,
    pub objects: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub ordering_key: Option<String>,
}

impl Returned {
    pub fn into_decision(self) -> Decision {
        Decision {
            keep: self.keep.unwrap_or(true),
            topics: self.topics,
            objects: self.objects,
            attributes: self.attributes,
            ordering_key: self.ordering_key.filter(|k| !k.is_empty()),
        }
    }
}

/// The keys a returned map may have.
pub const DECISION_KEYS: &[&str] = &[
    "keep",
    "topic",
    "topics",
    "object",
    "objects",
    "attributes",
    "ordering_key",
];

/// A number as attribute text, the same in both engines: integers in floats
/// keep one decimal (`1.0`), others their shortest exact form (`0.55`).
pub fn format_float(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}
