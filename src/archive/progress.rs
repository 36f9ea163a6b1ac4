//! The replay's progress: a bar on a terminal, a log line every
//! `pipeline.stats_interval_ms` otherwise (every [`LOG_EVERY`] if that is
//! off). Members and bytes done, the rate, and the time left, estimated from
//! the bytes still to read.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a log line is written when stderr is not a terminal and the
/// stats line is off.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the bar is updated.
const DRAW_EVERY: Duration = Duration::from_millis(250);

/// What the progress line shows.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Done {
    /// Members read (sent on, or skipped).
    pub members: u64,
    /// Messages acknowledged by every destination (or dropped).
    pub acknowledged: u64,
    /// Bytes read from disk (compressed), of `total`.
    pub bytes: u64,
}

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    last: Instant,
    /// How often a log line is written (no terminal).
    every: Duration,
}

impl Progress {
    pub(crate) fn new(total: u64, every: Duration) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {msg} ({elapsed}, about {eta} left)",
                )
                .expect("a valid template"),
            );
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            started: now,
            last: now,
            every: if every.is_zero() { LOG_EVERY } else { every },
        }
    }

    /// Shows the progress, if it is time to.
    pub(crate) fn tick(&mut self, done: Done) {
        let every = if self.bar.is_some() {
            DRAW_EVERY
        } else {
            self.every
        };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        self.show(done);
    }

    fn show(&self, done: Done) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done.acknowledged as f64 / secs;
        match &self.bar {
            Some(bar) => {
                bar.set_position(done.bytes.min(self.total));
                bar.set_message(format!(
                    "{} members, {} acknowledged, {rate:.0}/s",
                    done.members, done.acknowledged
                ));
            }
            None => {
                let fraction = if self.total == 0 {
                    1.0
                } else {
                    done.bytes as f64 / self.total as f64
                };
                let left = if fraction > 0.0 {
                    format!("about {:.0} s left", secs * (1.0 - fraction) / fraction)
                } else {
                    "time left unknown".into()
                };
                tracing::info!(
                    "replay: {} members read, {} acknowledged ({rate:.0}/s); {:.1} of {:.1} MB read ({:.0}%), {left}",
                    done.members,
                    done.acknowledged,
                    done.bytes as f64 / 1e6,
                    self.total as f64 / 1e6,
                    100.0 * fraction.min(1.0)
                );
            }
        }
    }

    /// Clears the bar (the summary follows as a log line).
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
