//! Alert archives: nightly tarballs (`ztf_public_YYYYMMDD.tar.gz`, gzip or
//! plain), directories of `.avro` files and single alert files, read as a
//! stream of members for `ztfhook replay` and `ztfhook check`.
//!
//! Invariants:
//! - nothing is unpacked to disk, and at most [`READ_AHEAD`] members are
//!   held beyond what the pipeline's in-flight bounds count: memory does not
//!   grow with an archive's size;
//! - an input's members are numbered in the order they are read (every
//!   regular file counts, alert or not), and that order is stable for an
//!   unchanged input: a directory's files are sorted by path, a tarball's
//!   members stay in the tarball's order. The checkpoint relies on it, and
//!   refuses an input whose size changed;
//! - nothing is skipped silently: a file that is neither an alert file nor
//!   a tarball is named and counted; a member that is not an alert goes on
//!   as a message with its problem, to the error policy; an input that
//!   cannot be read to its end is named with how far it got.

pub mod checkpoint;
pub(crate) mod progress;
pub(crate) mod source;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;

use crate::attributes::MAX_MESSAGE_BYTES;

/// Members read ahead of the pipeline, at most.
pub const READ_AHEAD: usize = 8;

/// Why the inputs cannot be replayed at all.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no inputs: name tarballs, directories or alert files")]
    Nothing,
}

/// What an input is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A tar file, gzip-compressed or not (told by its first bytes).
    Tarball,
    /// Alert files: a directory's `.avro` files, or one file given by name.
    /// Each with its member name (its path below the directory).
    Files(Vec<(PathBuf, String)>),
}

/// One input: a tarball, or a set of alert files.
#[derive(Debug, Clone)]
pub struct Input {
    /// The tarball's or directory's path, as given or found.
    pub path: PathBuf,
    /// The canonical path: what the checkpoint knows the input by.
    pub key: String,
    /// The file (or directory) name, for attributes and log lines.
    pub file: Arc<str>,
    /// The topic its messages carry (`msg.topic`, `archive.topic`).
    pub topic: Arc<str>,
    pub kind: Kind,
    /// Its size on disk: the tarball's, or its files' together.
    pub bytes: u64,
}

/// The inputs, and the files found beside them that are neither.
#[derive(Debug, Default)]
pub struct Inputs {
    pub inputs: Vec<Input>,
    /// Files in the directories given that are not alerts or tarballs,
    /// with why they are left out.
    pub skipped: Vec<(PathBuf, String)>,
}

impl Inputs {
    /// Bytes on disk of every input.
    pub fn bytes(&self) -> u64 {
        self.inputs.iter().map(|i| i.bytes).sum()
    }
}

/// Whether a path names a tarball, by its name.
fn is_tarball_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// A tarball's name without its extensions.
fn tarball_stem(name: &str) -> &str {
    for ext in [".tar.gz", ".tgz", ".tar"] {
        if name.len() > ext.len() && name.to_ascii_lowercase().ends_with(ext) {
            return &name[..name.len() - ext.len()];
        }
    }
    name
}

/// The Kafka topic a tarball's alerts were published on, from its name:
/// ZTF's public nightly tarball `ztf_public_YYYYMMDD` holds the alerts of
/// `ztf_YYYYMMDD_programid1`; any other tarball's topic is its name without
/// extensions.
pub fn topic_of_tarball(name: &str) -> String {
    let stem = tarball_stem(name);
    if let Some(date) = stem.strip_prefix("ztf_public_") {
        if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) {
            return format!("ztf_{date}_programid1");
        }
    }
    stem.to_string()
}

fn name_of(path: &Path) -> String {
    match path.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string()),
    }
}

fn unreadable(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Unreadable {
        path: path.to_path_buf(),
        source,
    }
}

fn canonical(path: &Path) -> Result<String, ArchiveError> {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .map_err(unreadable(path))
}

/// Expands the paths given into inputs, in order: a tarball is one input; a
/// directory is one input of its `.avro` files (sorted, found recursively)
/// plus one input per tarball below it; a file given by name is an alert
/// file whatever its name. The topic is `topic` if given, else the
/// tarball's (see [`topic_of_tarball`]) or the directory's name.
///
/// # Errors
/// [`ArchiveError`] if a path does not exist or a directory cannot be listed.
pub fn expand(paths: &[PathBuf], topic: Option<&str>) -> Result<Inputs, ArchiveError> {
    if paths.is_empty() {
        return Err(ArchiveError::Nothing);
    }
    let mut out = Inputs::default();
    let topic_for =
        |default: String| -> Arc<str> { Arc::from(topic.map_or(default, str::to_string)) };
    for path in paths {
        let meta = std::fs::metadata(path).map_err(unreadable(path))?;
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(path, &mut found).map_err(unreadable(path))?;
            found.sort();
            let mut files = Vec::new();
            let mut bytes = 0;
            for p in found {
                if is_tarball_name(&p) {
                    out.inputs.push(tarball(&p, &topic_for)?);
                } else if p
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("avro"))
                {
                    bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    let member = p
                        .strip_prefix(path)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned();
                    files.push((p, member));
                } else {
                    out.skipped
                        .push((p, "neither an .avro alert file nor a tarball".into()));
                }
            }
            if !files.is_empty() {
                let name = name_of(path);
                out.inputs.push(Input {
                    path: path.clone(),
                    key: canonical(path)?,
                    file: Arc::from(name.as_str()),
                    topic: topic_for(name),
                    kind: Kind::Files(files),
                    bytes,
                });
            }
        } else if is_tarball_name(path) {
            out.inputs.push(tarball(path, &topic_for)?);
        } else {
            let name = name_of(path);
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            out.inputs.push(Input {
                path: path.clone(),
                key: canonical(path)?,
                file: Arc::from(name.as_str()),
                topic: topic_for(name_of(parent)),
                kind: Kind::Files(vec![(path.clone(), name)]),
                bytes: meta.len(),
            });
        }
    }
    // The checkpoint knows an input by its path: one named twice (or found in
    // a directory and named too) is read once.
    let mut seen = std::collections::HashSet::new();
    out.inputs.retain(|i| {
        let first = seen.insert(i.key.clone());
        if !first {
            tracing::warn!("{}: given more than once: read once", i.path.display());
        }
        first
    });
    Ok(out)
}

/// The alert files among `paths` (directories expanded, tarballs left out),
/// in the order a replay reads them: for tools that load samples.
///
/// # Errors
/// As [`expand`].
pub fn alert_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ArchiveError> {
    Ok(expand(paths, None)?
        .inputs
        .into_iter()
        .filter_map(|i| match i.kind {
            Kind::Files(files) => Some(files.into_iter().map(|(p, _)| p)),
            Kind::Tarball => None,
        })
        .flatten()
        .collect())
}

fn tarball(path: &Path, topic_for: &dyn Fn(String) -> Arc<str>) -> Result<Input, ArchiveError> {
    let name = name_of(path);
    let bytes = std::fs::metadata(path).map_err(unreadable(path))?.len();
    Ok(Input {
        path: path.to_path_buf(),
        key: canonical(path)?,
        topic: topic_for(topic_of_tarball(&name)),
        file: Arc::from(name.as_str()),
        kind: Kind::Tarball,
        bytes,
    })
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// What the reader found, in order.
#[derive(Debug)]
pub enum Found {
    /// A member to send on. `problem` says why it is not an alert.
    Member {
        input: usize,
        index: u64,
        name: String,
        payload: Bytes,
        problem: Option<String>,
    },
    /// A tarball member that is not an alert file by its name (a README,
    /// a checksum list): named and counted, not sent.
    Skipped {
        input: usize,
        index: u64,
        name: String,
    },
    /// The input is read: `members` regular files in all, and the error
    /// that ended it early, if one did.
    Done {
        input: usize,
        members: u64,
        error: Option<String>,
    },
}

impl Found {
    /// A member as the message the pipeline (or `check`) takes: the input's
    /// topic, its position as the partition, the member's as the offset.
    /// `None` for what is not a member.
    pub fn into_envelope(self, inputs: &[Input]) -> Option<crate::envelope::Envelope> {
        let Found::Member {
            input,
            index,
            name,
            payload,
            problem,
        } = self
        else {
            return None;
        };
        let from = &inputs[input];
        Some(crate::envelope::Envelope {
            topic: Arc::clone(&from.topic),
            partition: input as i32,
            offset: index as i64,
            payload,
            archive: Some(Arc::new(crate::envelope::ArchiveMember {
                file: Arc::clone(&from.file),
                name,
                problem,
            })),
            ..crate::envelope::Envelope::default()
        })
    }
}

/// The log line for a tarball member left out by its name (replay and check).
pub(crate) fn skipped_note(input: &Input, index: u64, name: &str) -> String {
    format!(
        "{}: member {index} `{name}` is not an .avro alert file by its name: skipped, not sent",
        input.path.display()
    )
}

/// The log line for an input without members (replay and check).
pub(crate) fn empty_note(input: &Input) -> String {
    format!(
        "{}: an empty archive: no members in it",
        input.path.display()
    )
}

/// Counts the bytes read from a file, for the progress line.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Reads every input from its `start[i]`th member (`None`: the input is
/// done already, not read) and sends what it finds, until the inputs end,
/// `tx`'s receiver is dropped, or `stop` is set (checked at every member,
/// also those read past on a resume). `read` counts the bytes read from disk.
pub fn read_all(
    inputs: &[Input],
    start: &[Option<u64>],
    read: &Arc<AtomicU64>,
    tx: &Sender<Found>,
    stop: &AtomicBool,
) {
    for (i, input) in inputs.iter().enumerate() {
        let Some(from) = start.get(i).copied().flatten() else {
            continue;
        };
        let done = match &input.kind {
            Kind::Tarball => read_tarball(i, input, from, read, tx, stop),
            Kind::Files(files) => read_files(i, files, from, read, tx, stop),
        };
        let Some((members, error)) = done else {
            return;
        };
        if tx
            .send(Found::Done {
                input: i,
                members,
                error,
            })
            .is_err()
        {
            return;
        }
    }
}

/// A member's bytes, or why it is not sent as they are.
fn checked(name: &str, payload: Vec<u8>) -> (Bytes, Option<String>) {
    let problem = (!crate::alert::is_framed(&payload)).then(|| {
        format!(
            "member `{name}` is not an alert: it is neither an Avro container file nor Confluent's wire format ({} bytes)",
            payload.len()
        )
    });
    (Bytes::from(payload), problem)
}

fn too_large(name: &str, size: u64) -> String {
    format!(
        "member `{name}` is {size} bytes, over Pub/Sub's {MAX_MESSAGE_BYTES}-byte message limit: not read"
    )
}

fn read_files(
    input: usize,
    files: &[(PathBuf, String)],
    from: u64,
    read: &Arc<AtomicU64>,
    tx: &Sender<Found>,
    stop: &AtomicBool,
) -> Option<(u64, Option<String>)> {
    for (index, (path, name)) in files.iter().enumerate().skip(from as usize) {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let (payload, problem) = match std::fs::metadata(path) {
            Ok(m) if m.len() > MAX_MESSAGE_BYTES as u64 => {
                (Bytes::new(), Some(too_large(name, m.len())))
            }
            _ => match std::fs::read(path) {
                Ok(bytes) => {
                    read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    checked(name, bytes)
                }
                // Not a bad message but an unreadable file (permissions, a
                // network file system): the input stops there, unfinished, so
                // the checkpoint never passes it.
                Err(e) => {
                    return Some((
                        index as u64,
                        Some(format!("cannot read member {index} `{name}`: {e}")),
                    ))
                }
            },
        };
        if tx
            .send(Found::Member {
                input,
                index: index as u64,
                name: name.clone(),
                payload,
                problem,
            })
            .is_err()
        {
            return None;
        }
    }
    Some((files.len() as u64, None))
}

fn read_tarball(
    input: usize,
    archive: &Input,
    from: u64,
    read: &Arc<AtomicU64>,
    tx: &Sender<Found>,
    stop: &AtomicBool,
) -> Option<(u64, Option<String>)> {
    let file = match std::fs::File::open(&archive.path) {
        Ok(f) => f,
        Err(e) => return Some((0, Some(format!("cannot open it: {e}")))),
    };
    let mut raw = BufReader::with_capacity(
        256 * 1024,
        Counting {
            inner: file,
            read: Arc::clone(read),
        },
    );
    let gzip = match std::io::BufRead::fill_buf(&mut raw) {
        Ok(head) => head.starts_with(&[0x1f, 0x8b]),
        Err(e) => return Some((0, Some(format!("cannot read it: {e}")))),
    };
    let stream: Box<dyn Read> = if gzip {
        Box::new(flate2::bufread::MultiGzDecoder::new(raw))
    } else {
        Box::new(raw)
    };
    let mut tar = tar::Archive::new(stream);
    let mut index: u64 = 0;
    let at = |index: u64, e: &dyn std::fmt::Display| {
        Some(format!(
            "cannot read past member {index} (after {} of {} bytes): {e}{}",
            read.load(Ordering::Relaxed).min(archive.bytes),
            archive.bytes,
            if gzip {
                " (a truncated or corrupt gzip stream?)"
            } else {
                " (a truncated or corrupt tar file?)"
            }
        ))
    };
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => return Some((0, at(0, &e))),
    };
    for entry in entries {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return Some((index, at(index, &e))),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let this = index;
        index += 1;
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
        };
        if this < from {
            continue;
        }
        if !Path::new(&name)
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("avro"))
        {
            if tx
                .send(Found::Skipped {
                    input,
                    index: this,
                    name,
                })
                .is_err()
            {
                return None;
            }
            continue;
        }
        let size = entry.size();
        let (payload, problem) = if size > MAX_MESSAGE_BYTES as u64 {
            (Bytes::new(), Some(too_large(&name, size)))
        } else {
            let mut bytes = Vec::with_capacity(size as usize);
            if let Err(e) = entry.read_to_end(&mut bytes) {
                return Some((this, at(this, &e)));
            }
            // A plain tar cut inside a member ends its data early without an
            // error: a member shorter than its header says is a cut, not an alert.
            if bytes.len() as u64 != size {
                let short = format!(
                    "member `{name}` ends after {} of its {size} bytes",
                    bytes.len()
                );
                return Some((this, at(this, &short)));
            }
            checked(&name, bytes)
        };
        if tx
            .send(Found::Member {
                input,
                index: this,
                name,
                payload,
                problem,
            })
            .is_err()
        {
            return None;
        }
    }
    // The tar stream ends before gzip's trailer (its checksum and length):
    // read to the end, so that a truncated file is not taken for a whole one.
    // A plain tar must end with its end-of-archive block (512 zero bytes):
    // tar reads EOF at a header boundary as the end, so a tar cut between two
    // members would otherwise pass for a whole one.
    let mut rest = tar.into_inner();
    if let Err(e) = std::io::copy(&mut rest, &mut std::io::sink()) {
        return Some((index, at(index, &e)));
    }
    if !gzip && !ends_with_zero_block(&archive.path) {
        let cut = "no end-of-archive block: the tar file is cut after a member";
        return Some((index, at(index, &cut)));
    }
    Some((index, None))
}

/// Whether a plain tar file ends with a 512-byte zero block (its
/// end-of-archive marker; tar pads to a record, so it is the last block).
fn ends_with_zero_block(path: &Path) -> bool {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(len) = f.seek(SeekFrom::End(0)) else {
        return false;
    };
    if len < 1024 || len % 512 != 0 {
        return false;
    }
    let mut block = [0u8; 512];
    f.seek(SeekFrom::End(-512)).is_ok()
        && f.read_exact(&mut block).is_ok()
        && block.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_ztf_tarball_names_the_nights_public_topic() {
        assert_eq!(
            topic_of_tarball("ztf_public_20250302.tar.gz"),
            "ztf_20250302_programid1"
        );
        assert_eq!(
            topic_of_tarball("ztf_public_20250302.tgz"),
            "ztf_20250302_programid1"
        );
        assert_eq!(topic_of_tarball("ztf_public_2025.tar"), "ztf_public_2025");
        assert_eq!(topic_of_tarball("lsst-alerts.tar.gz"), "lsst-alerts");
    }

    fn plain_tar(members: usize) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for i in 0..members {
            let data = vec![b'O'; 1000 + i];
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_cksum();
            tar.append_data(&mut header, format!("{i}.avro"), data.as_slice())
                .unwrap();
        }
        tar.into_inner().unwrap()
    }

    /// Reads one tarball's bytes: the members sent, and how the input ended.
    fn read_tar(bytes: &[u8]) -> (usize, Option<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("night.tar");
        std::fs::write(&path, bytes).unwrap();
        let inputs = expand(&[path], None).unwrap().inputs;
        let (tx, rx) = crossbeam_channel::unbounded();
        read_all(
            &inputs,
            &[Some(0)],
            &Arc::new(AtomicU64::new(0)),
            &tx,
            &AtomicBool::new(false),
        );
        drop(tx);
        let mut sent = 0;
        let mut end = None;
        for f in rx {
            match f {
                Found::Member { .. } => sent += 1,
                Found::Done { error, .. } => end = Some(error),
                Found::Skipped { .. } => {}
            }
        }
        (sent, end.expect("done"))
    }

    #[test]
    fn a_plain_tar_cut_between_or_inside_members_is_an_error_not_a_whole_archive() {
        let whole = plain_tar(3);
        assert_eq!(read_tar(&whole), (3, None));
        // Cut right after the second member's data (a header boundary).
        let second_end = 512 + 1024 + 512 + 1024;
        let (sent, error) = read_tar(&whole[..second_end]);
        assert_eq!(sent, 2);
        assert!(error.unwrap().contains("no end-of-archive block"));
        // Cut inside the third member's data: it is not sent, cut short.
        let (sent, error) = read_tar(&whole[..second_end + 512 + 300]);
        assert_eq!(sent, 2);
        assert!(error.unwrap().contains("cannot read past member 2"));
    }

    #[test]
    fn a_directory_is_its_alert_files_plus_each_tarball_and_other_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let night = dir.path().join("night");
        std::fs::create_dir_all(night.join("sub")).unwrap();
        std::fs::write(night.join("b.avro"), b"Obj\x01").unwrap();
        std::fs::write(night.join("sub/a.avro"), b"Obj\x01").unwrap();
        std::fs::write(night.join("notes.txt"), b"notes").unwrap();
        std::fs::write(night.join("ztf_public_20250302.tar.gz"), b"").unwrap();
        let tarball = night.join("ztf_public_20250302.tar.gz");
        let found = expand(&[night.clone(), tarball], None).unwrap();
        assert_eq!(
            found.inputs.len(),
            2,
            "the tarball named twice is one input"
        );
        assert_eq!(&*found.inputs[0].topic, "ztf_20250302_programid1");
        assert_eq!(found.inputs[0].kind, Kind::Tarball);
        assert_eq!(&*found.inputs[1].topic, "night");
        let Kind::Files(files) = &found.inputs[1].kind else {
            panic!("files")
        };
        let names: Vec<&str> = files.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["b.avro", "sub/a.avro"]);
        assert_eq!(found.skipped.len(), 1);
        assert!(found.skipped[0].0.ends_with("notes.txt"));
        assert!(expand(&[dir.path().join("missing")], None).is_err());
    }
}
