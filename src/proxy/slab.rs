//! Reusable heap blocks for request futures.
//!
//! A connection's task is sized by the largest state of its future. Serving a request needs
//! several kilobytes of state (the phases, an attempt, a relay), and an idle keep-alive
//! connection would hold all of it while it waits for its next request. Instead, the
//! per-request future lives in a block taken from its worker's free list and put back when the
//! request ends: an idle connection keeps only its socket and a few words, and a request
//! allocates nothing once the list is warm.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr::NonNull;
use std::task::{Context, Poll};

/// Most free blocks kept per layout; more are freed.
const FREE_MAX: usize = 1024;

/// A worker's free lists of blocks, one per layout (in practice one or two: the plain and the
/// TLS connection's request futures).
#[derive(Default)]
pub struct FutureSlab {
    free: RefCell<Vec<(Layout, Vec<NonNull<u8>>)>>,
}

impl FutureSlab {
    fn take(&self, layout: Layout) -> NonNull<u8> {
        if layout.size() == 0 {
            // A zero-sized future needs no memory; a well-aligned dangling pointer stands in.
            return NonNull::new(layout.align() as *mut u8).unwrap_or(NonNull::dangling());
        }
        if let Some((_, list)) = self
            .free
            .borrow_mut()
            .iter_mut()
            .find(|(l, _)| *l == layout)
        {
            if let Some(p) = list.pop() {
                return p;
            }
        }
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc(layout) };
        NonNull::new(p).unwrap_or_else(|| handle_alloc_error(layout))
    }

    fn give(&self, layout: Layout, p: NonNull<u8>) {
        if layout.size() == 0 {
            return;
        }
        let mut free = self.free.borrow_mut();
        let list = match free.iter().position(|(l, _)| *l == layout) {
            Some(i) => &mut free[i].1,
            None => {
                free.push((layout, Vec::new()));
                &mut free.last_mut().expect("just pushed").1
            }
        };
        if list.len() < FREE_MAX {
            list.push(p);
        } else {
            // SAFETY: `p` came from `alloc(layout)` in `take` and is no longer used.
            unsafe { dealloc(p.as_ptr(), layout) };
        }
    }

    /// Places `f` in a block of this slab. The future never moves again until it is dropped
    /// in place, which is what pinning asks.
    pub fn boxed<F: Future>(&self, f: F) -> Slabbed<'_, F> {
        let layout = Layout::new::<F>();
        let p = self.take(layout).cast::<F>();
        // SAFETY: `p` is valid for writes of `F` (its layout) and not in use.
        unsafe { p.as_ptr().write(f) };
        Slabbed {
            p,
            slab: self,
            _owns: PhantomData,
        }
    }
}

impl Drop for FutureSlab {
    fn drop(&mut self) {
        for (layout, list) in self.free.get_mut().drain(..) {
            for p in list {
                // SAFETY: every pooled block came from `alloc(layout)`.
                unsafe { dealloc(p.as_ptr(), layout) };
            }
        }
    }
}

/// A future living in a slab block; dropping it drops the future in place and returns the
/// block.
pub struct Slabbed<'s, F: Future> {
    p: NonNull<F>,
    slab: &'s FutureSlab,
    /// Owns an `F` (for the drop checker).
    _owns: PhantomData<F>,
}

impl<F: Future> Future for Slabbed<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: the future lives at a fixed address in its block until it is dropped in
        // place (`Drop` below); it is never moved out, so pinning it there is sound.
        let f = unsafe { Pin::new_unchecked(&mut *self.p.as_ptr()) };
        f.poll(cx)
    }
}

impl<F: Future> Drop for Slabbed<'_, F> {
    fn drop(&mut self) {
        // SAFETY: the block holds a live `F`, dropped exactly once here; the block then goes
        // back to the slab and is not touched through `self.p` again.
        unsafe { std::ptr::drop_in_place(self.p.as_ptr()) };
        self.slab.give(Layout::new::<F>(), self.p.cast());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn blocks_are_reused_and_futures_dropped_once() {
        let slab = FutureSlab::default();
        let marker = Rc::new(());
        let mut addrs = Vec::new();
        for i in 0..3u64 {
            let m = marker.clone();
            let f = slab.boxed(async move {
                let _keep = m;
                i * 2
            });
            addrs.push(f.p.as_ptr() as usize);
            let out = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap()
                .block_on(f);
            assert_eq!(out, i * 2);
        }
        // Every future (and the Rc it held) was dropped, and one block served all three.
        assert_eq!(Rc::strong_count(&marker), 1);
        assert!(addrs.windows(2).all(|w| w[0] == w[1]), "{addrs:?}");
        // A future dropped before completion is dropped in place too.
        let m = marker.clone();
        drop(slab.boxed(async move {
            let _keep = m;
            std::future::pending::<()>().await
        }));
        assert_eq!(Rc::strong_count(&marker), 1);
    }
}
