//! A counting global allocator, for programs that want to report their heap use (the CLI, the
//! examples, the benches and [`crate::sweep`] use it for per-run peak memory).
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: candle_peft::alloc::Counting = candle_peft::alloc::Counting;
//!
//! candle_peft::alloc::reset_peak();
//! // ... work ...
//! let peak_bytes = candle_peft::alloc::peak(); // Some(..) once the allocator is installed
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, counting the live heap bytes and their peak.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Live heap bytes, if [`Counting`] is the global allocator.
pub fn live() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| LIVE.load(Ordering::Relaxed))
}

/// The peak of live heap bytes since the last [`reset_peak`], if [`Counting`] is the global
/// allocator.
pub fn peak() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

/// Starts a new peak measurement at the current live size.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}
