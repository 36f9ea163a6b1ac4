//! The bound on a message's extra copies: what fanning out costs in memory.
//!
//! The consumer loop bounds the payload bytes in flight
//! (`pipeline.max_in_flight_bytes`), counting each message once, when it is
//! consumed. Each destination beyond the first then holds a copy of its own
//! (the crate encodes every topic's request apart; an object's upload has its
//! body), and the JSON form is a second payload: a hook that sends every
//! alert to 100 topics would hold 100 times the bound. Those copies are
//! counted here, against a second bound of the same size, before the
//! message is published.
//!
//! Invariants:
//! - a worker takes a [`Held`] share before it publishes a message with
//!   extra copies, waiting while the copies in flight would pass the bound;
//!   a message whose copies alone are over it goes when nothing else is held,
//!   so it waits but is never refused;
//! - the share is given back when its [`Held`] is dropped: when the last
//!   destination of the message is done, however it ended;
//! - a message without extra copies (one destination, no JSON form) takes
//!   nothing and never waits;
//! - once the bridge is stopping nothing waits (the consumer has stopped
//!   fetching, so what is left is the workers' short queues);
//! - while a worker waits, or the copies are at their bound (until they are
//!   below half of it), the consumer loop pauses as at its own bound (it
//!   reads `copy_waiters` and `in_flight_copy_bytes` off [`Metrics`]); it
//!   never waits on a worker's full queue either (it parks what the queue
//!   cannot take), so it keeps polling;
//! - the bound holds except for one message whose copies alone are over it,
//!   and during a stop, when the workers' queues are published without
//!   waiting.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// How often a waiting worker looks at the stop signal.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// The copies in flight and their bound.
#[derive(Debug)]
pub(crate) struct Copies {
    max_bytes: usize,
    held: Mutex<usize>,
    released: Condvar,
    /// `ztfhook_in_flight_copy_bytes`, set under the lock.
    metrics: Arc<Metrics>,
}

impl Copies {
    pub(crate) fn new(max_bytes: usize, metrics: Arc<Metrics>) -> Arc<Copies> {
        Arc::new(Copies {
            max_bytes,
            held: Mutex::new(0),
            released: Condvar::new(),
            metrics,
        })
    }

    /// Takes `bytes` of the bound, waiting for room (see the module doc).
    pub(crate) fn hold(self: &Arc<Self>, bytes: usize, shutdown: &Shutdown) -> Held {
        if bytes == 0 {
            return Held::none();
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let waits = |held: usize| held > 0 && held + bytes > self.max_bytes;
        if waits(*held) {
            let waiters = &self.metrics.copy_waiters;
            waiters.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while waits(*held) && !shutdown.is_stopping() {
                held = self
                    .released
                    .wait_timeout(held, STOP_CHECK)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            waiters.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        *held += bytes;
        self.show(*held);
        Held {
            copies: Some((Arc::clone(self), bytes)),
        }
    }

    fn show(&self, held: usize) {
        self.metrics
            .in_flight_copy_bytes
            .store(held as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The bytes of copies in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        *self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A message's share of [`Copies`], given back on drop.
#[derive(Debug)]
pub(crate) struct Held {
    copies: Option<(Arc<Copies>, usize)>,
}

impl Held {
    /// No share: a message without extra copies.
    pub(crate) fn none() -> Held {
        Held { copies: None }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some((copies, bytes)) = self.copies.take() {
            let mut held = copies.held.lock().unwrap_or_else(|e| e.into_inner());
            *held -= bytes;
            copies.show(*held);
            drop(held);
            copies.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_share_waits_until_earlier_copies_are_given_back() {
        let copies = Copies::new(100, Arc::new(Metrics::new()));
        let shutdown = Arc::new(Shutdown::new());
        let first = copies.hold(80, &shutdown);
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let (copies, shutdown) = (Arc::clone(&copies), Arc::clone(&shutdown));
            std::thread::spawn(move || {
                let held = copies.hold(40, &shutdown);
                tx.send(()).unwrap();
                held
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "80 + 40 is over 100: the second share must wait"
        );
        drop(first);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the second share goes once the first is given back");
        let second = waiter.join().unwrap();
        assert_eq!(copies.in_flight(), 40);
        drop(second);
        assert_eq!(copies.in_flight(), 0);
    }

    #[test]
    fn a_share_over_the_whole_bound_goes_alone_and_one_of_nothing_never_waits() {
        let copies = Copies::new(100, Arc::new(Metrics::new()));
        let shutdown = Shutdown::new();
        let big = copies.hold(500, &shutdown);
        assert_eq!(copies.in_flight(), 500);
        let none = copies.hold(0, &shutdown);
        assert_eq!(copies.in_flight(), 500);
        drop(none);
        drop(big);
        assert_eq!(copies.in_flight(), 0);
    }

    #[test]
    fn nothing_waits_once_the_bridge_is_stopping() {
        let copies = Copies::new(100, Arc::new(Metrics::new()));
        let shutdown = Shutdown::new();
        let _first = copies.hold(90, &shutdown);
        shutdown.request();
        let _second = copies.hold(90, &shutdown);
        assert_eq!(copies.in_flight(), 180);
    }
}
