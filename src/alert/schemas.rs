//! Where the schemas of Rubin's schemaless (Confluent wire format) alerts
//! come from: a local directory laid out like `lsst/alert_packet`'s
//! (`M/m/lsst.vM_m.alert.avsc` and the record files it names), or a
//! Confluent-compatible schema registry (`GET /schemas/ids/{id}`).
//!
//! Invariants: each schema id is fetched and parsed once, then shared; a
//! failed lookup is remembered for [`RETRY_AFTER`] so a stream of alerts with
//! an unknown id does not hammer the registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::alert::avro::{parse_schema, AvroError, Schema};

/// How long a failed lookup is remembered before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Schema sources for wire-format alerts, tried in order: directory, then
/// registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SchemaSources {
    /// A directory laid out like `lsst/alert_packet`'s `schema/`.
    pub directory: Option<PathBuf>,
    /// A Confluent-compatible registry's base URL.
    pub registry: Option<String>,
}

impl std::fmt::Debug for SchemaSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaSources")
            .field("directory", &self.directory)
            .field(
                "registry",
                &self.registry.as_deref().map(crate::secret::scrub_urls),
            )
            .finish()
    }
}

type Lookup = Result<Arc<Schema>, (AvroError, Instant)>;

/// Finds and caches schemas by id.
pub struct SchemaStore {
    sources: SchemaSources,
    cache: Mutex<HashMap<u32, Lookup>>,
    client: Mutex<Option<reqwest::blocking::Client>>,
}

impl SchemaStore {
    pub fn new(sources: SchemaSources) -> SchemaStore {
        SchemaStore {
            sources,
            cache: Mutex::new(HashMap::new()),
            client: Mutex::new(None),
        }
    }

    /// The schema with this id.
    ///
    /// # Errors
    /// [`AvroError`] naming the id and why no source had it.
    pub fn get(&self, id: u32) -> Result<Arc<Schema>, AvroError> {
        if let Some(hit) = self.cache.lock().expect("schema cache").get(&id) {
            match hit {
                Ok(schema) => return Ok(Arc::clone(schema)),
                Err((e, when)) if when.elapsed() < RETRY_AFTER => return Err(e.clone()),
                Err(_) => {}
            }
        }
        // Fetched outside the lock: a slow registry holds up only the
        // workers that need this id.
        let found = self.find(id).map(Arc::new);
        let entry = match &found {
            Ok(s) => Ok(Arc::clone(s)),
            Err(e) => Err((e.clone(), Instant::now())),
        };
        self.cache.lock().expect("schema cache").insert(id, entry);
        found
    }

    fn find(&self, id: u32) -> Result<Schema, AvroError> {
        let mut tried = Vec::new();
        if let Some(dir) = &self.sources.directory {
            match from_directory(dir, id) {
                Ok(s) => return Ok(s),
                Err(e) => tried.push(e.0),
            }
        }
        if let Some(url) = &self.sources.registry {
            match self.fetch(url, id) {
                Ok(s) => return Ok(s),
                Err(e) => tried.push(e.0),
            }
        }
        if tried.is_empty() {
            tried.push(
                "no schema source is configured (set [alerts] schema_dir or schema_registry)"
                    .into(),
            );
        }
        Err(AvroError(format!("schema id {id}: {}", tried.join("; "))))
    }

    fn fetch(&self, base: &str, id: u32) -> Result<Schema, AvroError> {
        let url = format!("{}/schemas/ids/{id}", base.trim_end_matches('/'));
        let client = {
            let mut client = self.client.lock().expect("registry client");
            client
                .get_or_insert_with(|| {
                    reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .expect("a TLS-capable HTTP client")
                })
                .clone()
        };
        // Named without its user info; reqwest's errors without the URL.
        let shown = crate::secret::scrub_urls(&url);
        let fail = |m: String| AvroError(format!("registry {shown}: {m}"));
        let response = client
            .get(&url)
            .send()
            .map_err(|e| fail(e.without_url().to_string()))?;
        let status = response.status();
        let body = response
            .text()
            .map_err(|e| fail(e.without_url().to_string()))?;
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}: {}", body.trim())));
        }
        let json: Json = serde_json::from_str(&body).map_err(|e| fail(format!("not JSON: {e}")))?;
        if json
            .get("references")
            .and_then(Json::as_array)
            .is_some_and(|r| !r.is_empty())
        {
            return Err(fail(
                "the schema has references, which ztfhook does not follow".into(),
            ));
        }
        let Some(text) = json.get("schema").and_then(Json::as_str) else {
            return Err(fail("no \"schema\" in the answer".into()));
        };
        parse_schema(text, &mut |_| None).map_err(|e| fail(e.0))
    }
}

/// A schema file, with the named types it uses read from the `.avsc` files
/// beside it (the layout of both ZTF's and Rubin's schema folders).
///
/// # Errors
/// [`AvroError`] naming the file and what is wrong with it.
pub fn from_file(file: &Path) -> Result<Schema, AvroError> {
    let fail = |m: String| AvroError(format!("{}: {m}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|e| fail(e.to_string()))?;
    let siblings = named_files(file.parent().unwrap_or(Path::new(".")));
    let mut resolve = |name: &str| -> Option<Json> {
        let path = siblings.get(name)?;
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    };
    parse_schema(&text, &mut resolve).map_err(|e| fail(e.0))
}

/// `M/m/lsst.vM_m.alert.avsc` under `dir` for id `M*100 + m`, with the
/// record files beside it.
fn from_directory(dir: &Path, id: u32) -> Result<Schema, AvroError> {
    let (major, minor) = (id / 100, id % 100);
    let folder = dir.join(major.to_string()).join(minor.to_string());
    from_file(&folder.join(format!("lsst.v{major}_{minor}.alert.avsc")))
}

/// The `.avsc` files of a folder by the full name each defines.
fn named_files(folder: &Path) -> HashMap<String, PathBuf> {
    let mut names = HashMap::new();
    let Ok(entries) = std::fs::read_dir(folder) else {
        return names;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("avsc") {
            continue;
        }
        let Some(json) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Json>(&t).ok())
        else {
            continue;
        };
        let (Some(name), namespace) = (
            json.get("name").and_then(Json::as_str),
            json.get("namespace").and_then(Json::as_str),
        ) else {
            continue;
        };
        let full = match namespace {
            Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
            _ => name.to_string(),
        };
        names.insert(full, path);
    }
    names
}
