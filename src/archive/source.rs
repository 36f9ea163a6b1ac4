//! Archives as the consumer loop's [`Source`]: each input is a partition
//! (its position among the inputs), each member an offset (its position in
//! the input), and a commit writes the [`Checkpoint`]. So a replay has the
//! live run's batching, in-flight bounds, error policies, drain and
//! shutdown, and the consumer loop still owns pausing and commits.
//!
//! Invariants:
//! - the reader runs on its own thread, at most [`READ_AHEAD`] members ahead,
//!   and stops when the source is dropped;
//! - a commit is answered at the next poll (as librdkafka answers an
//!   asynchronous commit), after the checkpoint is on disk;
//! - an input is marked complete only once it was read to its end without
//!   an error and every member it sent is committed;
//! - the replay asks to stop only when the reader is done and nothing is
//!   unresolved, so its drain commits everything.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rdkafka::consumer::CommitMode;

use crate::archive::checkpoint::{self, Checkpoint};
use crate::archive::progress::{Done, Progress};
use crate::archive::{empty_note, read_all, skipped_note, Found, Input, READ_AHEAD};
use crate::metrics::Metrics;
use crate::offsets::PartitionKey;
use crate::shutdown::Shutdown;
use crate::source::consumer::{lock, Partitions, Polled, SharedLedger, Source};

/// What a replay found, for its last lines and its exit code.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Inputs read to their end in this run (or complete before it).
    pub inputs_complete: usize,
    pub inputs: usize,
    /// Members read in this run.
    pub members: u64,
    /// Tarball members left out because they are not alerts by their names
    /// (each named in a log line; counted, not kept, so memory stays flat).
    pub skipped: u64,
    /// Inputs that ended early, with why.
    pub errors: Vec<String>,
    /// Inputs with no members at all.
    pub empty: Vec<String>,
    /// Where each unfinished input stands: `input: member N`.
    pub unfinished: Vec<String>,
    /// The checkpoint could not be written (the last error).
    pub checkpoint_error: Option<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    /// The last member handed to the loop.
    last_sent: Option<u64>,
    /// The reader is done with it.
    done: bool,
    failed: bool,
    /// The next member to commit, as committed.
    committed: Option<u64>,
    complete: bool,
}

pub(crate) struct ArchiveSource {
    inputs: Arc<Vec<Input>>,
    keys: Vec<PartitionKey>,
    reads: Receiver<Found>,
    reader: Option<std::thread::JoinHandle<()>>,
    read_bytes: Arc<AtomicU64>,
    /// Tells the reader to stop (at its next member).
    stop: Arc<AtomicBool>,
    ledger: SharedLedger,
    metrics: Arc<Metrics>,
    shutdown: Arc<Shutdown>,
    checkpoint: RefCell<Checkpoint>,
    state: RefCell<Vec<State>>,
    answered: RefCell<Option<Vec<(PartitionKey, i64)>>>,
    paused: Cell<bool>,
    reader_done: bool,
    report: RefCell<Report>,
    progress: Progress,
}

impl ArchiveSource {
    /// Starts reading `inputs` from `starts` (what `checkpoint` says of
    /// each, [`Checkpoint::starts`]).
    pub(crate) fn start(
        inputs: Vec<Input>,
        starts: Vec<Option<u64>>,
        checkpoint: Checkpoint,
        ledger: SharedLedger,
        metrics: Arc<Metrics>,
        shutdown: Arc<Shutdown>,
        progress_every: Duration,
    ) -> ArchiveSource {
        let inputs = Arc::new(inputs);
        let keys = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| PartitionKey {
                topic: Arc::clone(&input.topic),
                partition: i as i32,
            })
            .collect();
        let mut state = vec![State::default(); inputs.len()];
        let mut report = Report {
            inputs: inputs.len(),
            ..Report::default()
        };
        let mut total = 0;
        for ((input, start), s) in inputs.iter().zip(&starts).zip(state.iter_mut()) {
            match start {
                None => {
                    s.complete = true;
                    s.done = true;
                    report.inputs_complete += 1;
                    tracing::info!(
                        "{}: complete in checkpoint {}: not read again",
                        input.path.display(),
                        checkpoint.path().display()
                    );
                }
                Some(0) => total += input.bytes,
                Some(n) => {
                    total += input.bytes;
                    s.committed = Some(*n);
                    tracing::info!(
                        "{}: resuming at member {n} (checkpoint {}); the members before it are read past, not sent",
                        input.path.display(),
                        checkpoint.path().display()
                    );
                }
            }
        }
        let read_bytes = Arc::new(AtomicU64::new(0));
        let (tx, reads) = crossbeam_channel::bounded(READ_AHEAD);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let inputs = Arc::clone(&inputs);
            let read_bytes = Arc::clone(&read_bytes);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("ztfhook-archive".into())
                .spawn(move || read_all(&inputs, &starts, &read_bytes, &tx, &stop))
                .expect("spawning the archive reader")
        };
        ArchiveSource {
            inputs,
            keys,
            reads,
            reader: Some(reader),
            read_bytes,
            stop,
            ledger,
            metrics,
            shutdown,
            checkpoint: RefCell::new(checkpoint),
            state: RefCell::new(state),
            answered: RefCell::new(None),
            paused: Cell::new(false),
            reader_done: false,
            report: RefCell::new(report),
            progress: Progress::new(total, progress_every),
        }
    }

    /// What the replay found; stops the reader.
    pub(crate) fn finish(mut self) -> Report {
        self.progress.finish();
        let mut report = self.report.borrow().clone();
        for (input, s) in self.inputs.iter().zip(self.state.borrow().iter()) {
            if !s.complete && !s.failed {
                report.unfinished.push(format!(
                    "{}: member {}",
                    input.path.display(),
                    s.committed.unwrap_or(0)
                ));
            }
        }
        // The flag and the dropped receiver stop the reader at its next member.
        self.stop.store(true, Ordering::Relaxed);
        let (_, dead) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.reads, dead));
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        report
    }

    /// Whether an input is complete: marks it so (in the checkpoint too)
    /// once it is read and committed to its end. One complete stays so.
    fn settle(&self, input: usize) -> bool {
        let mut state = self.state.borrow_mut();
        let s = &mut state[input];
        if s.complete {
            return true;
        }
        if !s.done || s.failed {
            return false;
        }
        let all_committed = match s.last_sent {
            None => true,
            Some(last) => s.committed.is_some_and(|c| c > last),
        };
        if all_committed {
            s.complete = true;
            self.report.borrow_mut().inputs_complete += 1;
            let input = &self.inputs[input];
            let next = s.committed.unwrap_or(0);
            self.checkpoint.borrow_mut().set(
                input,
                checkpoint::Progress {
                    next,
                    complete: true,
                    bytes: input.bytes,
                },
            );
        }
        all_committed
    }

    fn save(&self) -> Result<(), String> {
        match self.checkpoint.borrow().save() {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = e.to_string();
                self.report.borrow_mut().checkpoint_error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn on_read(&mut self, read: Found) -> Polled {
        match read {
            member @ Found::Member { .. } => {
                if let Found::Member { input, index, .. } = &member {
                    self.state.borrow_mut()[*input].last_sent = Some(*index);
                }
                self.report.borrow_mut().members += 1;
                member
                    .into_envelope(&self.inputs)
                    .map_or(Polled::Idle, Polled::Message)
            }
            Found::Skipped { input, index, name } => {
                tracing::warn!("{}", skipped_note(&self.inputs[input], index, &name));
                let mut r = self.report.borrow_mut();
                r.members += 1;
                r.skipped += 1;
                Polled::Idle
            }
            Found::Done {
                input,
                members,
                error,
            } => {
                let from = &self.inputs[input];
                {
                    let mut state = self.state.borrow_mut();
                    state[input].done = true;
                    state[input].failed = error.is_some();
                }
                match error {
                    Some(e) => {
                        tracing::error!(
                            "{}: {e}; the members before it are replayed",
                            from.path.display()
                        );
                        self.report
                            .borrow_mut()
                            .errors
                            .push(format!("{}: {e}", from.path.display()));
                    }
                    None if members == 0 => {
                        tracing::warn!("{}", empty_note(from));
                        self.report
                            .borrow_mut()
                            .empty
                            .push(from.path.display().to_string());
                    }
                    None => tracing::info!(
                        "{}: read to its end ({members} members)",
                        from.path.display()
                    ),
                }
                if self.settle(input) {
                    let _ = self.save();
                }
                Polled::Idle
            }
        }
    }
}

impl Partitions for ArchiveSource {
    fn pause(&self, _: &[PartitionKey]) -> Result<(), String> {
        self.paused.set(true);
        Ok(())
    }

    fn resume(&self, _: &[PartitionKey]) -> Result<(), String> {
        self.paused.set(false);
        Ok(())
    }

    /// Writes the checkpoint; answered at the next poll.
    fn commit(&self, offsets: &[(PartitionKey, i64)], _: CommitMode) -> Result<(), String> {
        for (key, next) in offsets {
            let i = key.partition as usize;
            let Some(input) = self.inputs.get(i) else {
                continue;
            };
            let next = *next as u64;
            self.state.borrow_mut()[i].committed = Some(next);
            // The final commit offers every input's offset again: one
            // complete already is left as it is.
            if !self.settle(i) {
                self.checkpoint.borrow_mut().set(
                    input,
                    checkpoint::Progress {
                        next,
                        complete: false,
                        bytes: input.bytes,
                    },
                );
            }
        }
        self.save()?;
        *self.answered.borrow_mut() = Some(offsets.to_vec());
        Ok(())
    }
}

impl Source for ArchiveSource {
    fn poll(&mut self, timeout: Duration) -> Polled {
        if let Some(offsets) = self.answered.borrow_mut().take() {
            lock(&self.ledger).on_commit(Ok(()), &offsets);
        }
        self.progress.tick(Done {
            members: self.report.borrow().members,
            acknowledged: self.metrics.published.load(Ordering::Relaxed)
                + self.metrics.dropped.load(Ordering::Relaxed)
                + self.metrics.dead_lettered.load(Ordering::Relaxed),
            bytes: self.read_bytes.load(Ordering::Relaxed),
        });
        if self.reader_done {
            // Everything read: stop once everything sent is resolved (the
            // drain then commits it all).
            if lock(&self.ledger).tracker.unresolved() == 0 {
                self.shutdown.request();
            }
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
            return Polled::Idle;
        }
        if self.paused.get() {
            std::thread::sleep(timeout);
            return Polled::Idle;
        }
        match self.reads.recv_timeout(timeout) {
            Ok(read) => self.on_read(read),
            Err(RecvTimeoutError::Timeout) => Polled::Idle,
            Err(RecvTimeoutError::Disconnected) => {
                self.reader_done = true;
                Polled::Idle
            }
        }
    }

    fn assignment(&self) -> Result<Vec<PartitionKey>, String> {
        Ok(self.keys.clone())
    }

    fn subscribe(&self, _: &[String]) -> Result<(), String> {
        Ok(())
    }

    fn label(&self) -> &'static str {
        "replay (inputs as partitions)"
    }
}
