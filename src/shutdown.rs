//! The shared stop signal.
//!
//! Two things stop the bridge: a request (SIGINT/SIGTERM) and a fatal error
//! (a permanent Pub/Sub failure, a lost broker session). Either way the
//! consumer stops fetching, the pipeline drains what is in flight within
//! `pipeline.shutdown_timeout`, and the safe offsets are committed. Nothing
//! that was not acknowledged by Pub/Sub is ever committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Why the bridge stops on its own: each names the message (`at`, Kafka's
/// `topic[partition]@offset`) or the part that can go no further.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fatal {
    #[error("worker {worker} stopped: {partition} can go no further")]
    WorkerStopped { worker: usize, partition: String },
    #[error("worker {worker} died (a panic outside the hook); the bridge stops")]
    WorkerDied { worker: usize },
    #[error("{error}; kafka_errors = \"stop\" (the default), so the bridge stops without committing past it (set pipeline.kafka_errors = \"skip\" to dead-letter such errors and go on)")]
    KafkaError { error: String },
    #[error("pubsub topic `{topic}`: publishing {at} failed permanently: {reason}")]
    PublishFailed {
        topic: String,
        at: String,
        reason: String,
    },
    #[error(
        "{at}: finishing its publish panicked (a bug); the bridge stops without committing it"
    )]
    CompletionPanicked { at: String },
    #[error("{at}: writing it failed permanently: {reason}")]
    ObjectFailed { at: String, reason: String },
    #[error("{at}: {reason}; no pubsub.dead_letter_topic is configured, so the bridge stops rather than skip it")]
    NoDeadLetterTopic { at: String, reason: String },
    #[error("{at}: the dead-letter topic `{topic}` refused it too: {reason}")]
    DeadLetterRefused {
        at: String,
        topic: String,
        reason: String,
    },
    #[error("{at}: {reason}; hook.on_error = \"stop\", so the bridge stops without committing it")]
    HookStop { at: String, reason: String },
}

/// Set once; read by every long-running loop.
#[derive(Debug, Default)]
pub struct Shutdown {
    stopping: AtomicBool,
    /// The first fatal error, if the stop was caused by one.
    fatal: OnceLock<Fatal>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every loop to stop after draining.
    pub fn request(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Stops with an error; the first error wins and is what the process reports.
    pub fn fail(&self, error: Fatal) {
        if self.fatal.set(error.clone()).is_ok() {
            tracing::error!("{error}");
        }
        self.request();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The fatal error that caused the stop, if any.
    pub fn fatal(&self) -> Option<&Fatal> {
        self.fatal.get()
    }
}

/// Turns the first SIGINT or SIGTERM into a drain; another one, a second or
/// more later, exits at once (what was not committed is consumed again on
/// restart). Signals within that second count as one: `timeout(1)` and some
/// supervisors send the same signal to the process and to its group.
pub async fn listen_for_signals(shutdown: std::sync::Arc<Shutdown>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGINT/SIGTERM");
        return;
    };
    let mut first: Option<std::time::Instant> = None;
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        match first {
            Some(at) if at.elapsed() < std::time::Duration::from_secs(1) => continue,
            _ => {}
        }
        if first.is_none() {
            first = Some(std::time::Instant::now());
            tracing::info!("{name}: stopping after the in-flight messages are published and committed (send it again to exit at once)");
            shutdown.request();
        } else {
            tracing::warn!(
                "{name} again: exiting now; what was not committed will be consumed again"
            );
            std::process::exit(130);
        }
    }
}
