//! The program's allocator: the system allocator, counting the bytes each
//! thread has allocated less those it has freed, so that a script call can
//! be stopped once it holds more than its memory bound.
//!
//! Invariants: counting never allocates (a `const` thread-local `Cell`
//! without a destructor) and never fails an allocation; a thread's count is a
//! difference, meaningful only between two readings on that thread (memory
//! freed on another thread than the one that allocated it moves both counts).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting per thread.
pub struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

#[allow(clippy::cast_possible_wrap)]
fn add(bytes: usize) {
    let _ = HELD.try_with(|h| {
        let now = h.get().wrapping_add(bytes as isize);
        h.set(now);
        let _ = PEAK.try_with(|p| {
            if now > p.get() {
                p.set(now);
            }
        });
    });
}

/// The most this thread has held since the last [`reset_peak`] (or its
/// start), on the same scale as [`held`].
pub fn peak() -> isize {
    PEAK.try_with(Cell::get).unwrap_or(0)
}

/// Starts a new [`peak`] from what the thread holds now.
pub fn reset_peak() {
    let now = held();
    let _ = PEAK.try_with(|p| p.set(now));
}

#[allow(clippy::cast_possible_wrap)]
fn sub(bytes: usize) {
    let _ = HELD.try_with(|h| h.set(h.get().wrapping_sub(bytes as isize)));
}

/// The bytes this thread has allocated less those it has freed, since it
/// started: compare two readings.
pub fn held() -> isize {
    HELD.try_with(Cell::get).unwrap_or(0)
}

// SAFETY: every call is passed to `System` unchanged; the counting beside it
// touches only a thread-local integer.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_counts_what_it_holds_and_not_what_it_freed() {
        let before = held();
        let kept = vec![0u8; 1 << 20];
        let during = held() - before;
        assert!(during >= 1 << 20, "{during}");
        drop(kept);
        let after = held() - before;
        assert!(after < 1 << 10, "{after}");
    }
}
