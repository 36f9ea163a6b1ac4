//! The replay's checkpoint: per input, the first member not yet
//! acknowledged by every destination, so that a replay stopped or killed
//! goes on where it was.
//!
//! Invariants:
//! - an input's `next` is written only from the consumer loop's commits, so
//!   every member below it was acknowledged (published, dropped by the hook,
//!   or dead-lettered); a replay started again re-sends at most what was in
//!   flight plus what was acknowledged since the last write;
//! - the file is replaced atomically (written beside, synced, renamed): a
//!   kill leaves the old checkpoint or the new one, never half of one;
//! - an input whose size changed since it was checkpointed is refused, not
//!   resumed at a member number that means something else now.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::archive::Input;

/// The checkpoint file's format version.
const VERSION: u32 = 1;

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is not a ztfhook replay checkpoint ({why}): remove it, or pass --from-start")]
    Corrupt { path: PathBuf, why: String },
    #[error("{input} is {now} bytes, but {was} when checkpoint {path} was written: it changed, so its member numbers may mean other members now; pass --from-start to replay it from its first member")]
    Changed {
        input: String,
        path: PathBuf,
        now: u64,
        was: u64,
    },
}

/// One input's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every member below this one is acknowledged.
    pub next: u64,
    /// Every member is acknowledged and the input was read to its end.
    pub complete: bool,
    /// The input's size when this was written.
    pub bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    ztfhook_replay_checkpoint: u32,
    /// By canonical input path.
    inputs: BTreeMap<String, Progress>,
}

/// The checkpoint file and what it holds.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    data: OnDisk,
}

impl Checkpoint {
    /// Reads the checkpoint at `path`, or starts an empty one if there is
    /// none (or `from_start`).
    ///
    /// # Errors
    /// [`CheckpointError`] if it cannot be read or is not one.
    pub fn open(path: &Path, from_start: bool) -> Result<Checkpoint, CheckpointError> {
        let fresh = Checkpoint {
            path: path.to_path_buf(),
            data: OnDisk {
                ztfhook_replay_checkpoint: VERSION,
                inputs: BTreeMap::new(),
            },
        };
        if from_start {
            return Ok(fresh);
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let data: OnDisk = serde_json::from_str(&text).map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if data.ztfhook_replay_checkpoint != VERSION {
            return Err(CheckpointError::Corrupt {
                path: path.to_path_buf(),
                why: format!("format version {}", data.ztfhook_replay_checkpoint),
            });
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            data,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where each input starts: `Some(member)`, or `None` for an input
    /// complete already.
    ///
    /// # Errors
    /// [`CheckpointError::Changed`] for an input whose size changed.
    pub fn starts(&self, inputs: &[Input]) -> Result<Vec<Option<u64>>, CheckpointError> {
        inputs
            .iter()
            .map(|input| match self.data.inputs.get(&input.key) {
                None => Ok(Some(0)),
                Some(p) if p.bytes != input.bytes => Err(CheckpointError::Changed {
                    input: input.path.display().to_string(),
                    path: self.path.clone(),
                    now: input.bytes,
                    was: p.bytes,
                }),
                Some(p) if p.complete => Ok(None),
                Some(p) => Ok(Some(p.next)),
            })
            .collect()
    }

    /// An input's progress, if it has any.
    pub fn get(&self, input: &Input) -> Option<&Progress> {
        self.data.inputs.get(&input.key)
    }

    /// Records an input's progress (in memory; [`save`](Self::save) writes it).
    pub fn set(&mut self, input: &Input, progress: Progress) {
        self.data.inputs.insert(input.key.clone(), progress);
    }

    /// Writes the checkpoint: beside it first, synced, then renamed over it.
    ///
    /// # Errors
    /// [`CheckpointError::Io`].
    pub fn save(&self) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: self.path.clone(),
            source,
        };
        let mut beside = self.path.clone().into_os_string();
        beside.push(".tmp");
        let beside = PathBuf::from(beside);
        let text = serde_json::to_string_pretty(&self.data).expect("plain data serializes");
        let mut f = std::fs::File::create(&beside).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&beside, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Kind;
    use std::sync::Arc;

    fn input(key: &str, bytes: u64) -> Input {
        Input {
            path: PathBuf::from(key),
            key: key.to_string(),
            file: Arc::from(key),
            topic: Arc::from("t"),
            kind: Kind::Tarball,
            bytes,
        }
    }

    #[test]
    fn a_saved_checkpoint_resumes_each_input_where_it_was_and_refuses_a_changed_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.json");
        let (a, b, c) = (
            input("/a.tar", 10),
            input("/b.tar", 20),
            input("/c.tar", 30),
        );
        let mut cp = Checkpoint::open(&path, false).unwrap();
        cp.set(
            &a,
            Progress {
                next: 7,
                complete: false,
                bytes: 10,
            },
        );
        cp.set(
            &b,
            Progress {
                next: 3,
                complete: true,
                bytes: 20,
            },
        );
        cp.save().unwrap();
        let cp = Checkpoint::open(&path, false).unwrap();
        assert_eq!(
            cp.starts(&[a.clone(), b.clone(), c]).unwrap(),
            vec![Some(7), None, Some(0)]
        );
        let grown = input("/a.tar", 11);
        let e = cp.starts(&[grown]).unwrap_err();
        assert!(e.to_string().contains("/a.tar is 11 bytes, but 10"), "{e}");
        let again = Checkpoint::open(&path, true).unwrap();
        assert_eq!(again.starts(&[a]).unwrap(), vec![Some(0)]);
    }

    #[test]
    fn a_file_that_is_not_a_checkpoint_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.json");
        std::fs::write(&path, "{\"something\": 1}").unwrap();
        let e = Checkpoint::open(&path, false).unwrap_err();
        assert!(
            e.to_string().contains("is not a ztfhook replay checkpoint"),
            "{e}"
        );
    }
}
