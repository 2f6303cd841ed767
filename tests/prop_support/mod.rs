//! What the property-test files share: their case count, and a count of the bytes each test
//! thread allocates (for "allocates no more than the input justifies"). A file that counts
//! installs the allocator itself:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: prop_support::ThreadBytes = prop_support::ThreadBytes;
//! ```
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::Config as ProptestConfig;

/// Cases per property: `PROPTEST_CASES` when set, else a CI-sized default (64).
pub fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The system allocator, counting the bytes the current thread allocates (the test threads
/// run in parallel).
pub struct ThreadBytes;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(n: usize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(n)));
}

// SAFETY: every call is passed on to the system allocator unchanged; the counter is a
// const-initialised thread-local without destructor, so counting allocates nothing.
unsafe impl GlobalAlloc for ThreadBytes {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new.saturating_sub(l.size()));
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

/// `f`'s result and the bytes this thread allocated while it ran (with [`ThreadBytes`]
/// installed as the global allocator; 0 without).
pub fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}
