//! Worker-local wake-up primitives (single thread, no atomics).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it. A waiter registered before a `notify_all` completes; one
/// registered after waits for the next.
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    /// Wakers of waiting tasks; a slot is freed when its waiter is dropped.
    slots: RefCell<Vec<Option<Waker>>>,
    /// Slots no waiter holds. Finding one was a scan of `slots`, which with thousands of idle
    /// connections on the idle tick cost thousands of steps per request.
    free: RefCell<Vec<usize>>,
}

impl Notify {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        for w in self.slots.borrow_mut().iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
    }

    pub fn notified(&self) -> Notified<'_> {
        Notified {
            n: self,
            generation: self.generation.get(),
            slot: None,
        }
    }
}

pub struct Notified<'a> {
    n: &'a Notify,
    generation: u64,
    slot: Option<usize>,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.n.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let mut slots = self.n.slots.borrow_mut();
        let i = match self.slot {
            Some(i) => i,
            None => match self.n.free.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            },
        };
        slots[i] = Some(cx.waker().clone());
        drop(slots);
        self.slot = Some(i);
        Poll::Pending
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if let Some(w) = self.n.slots.borrow_mut().get_mut(i) {
                *w = None;
            }
            // The slot was this waiter's alone (taken from `free` or pushed), so it goes back once.
            self.n.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn slots_are_reused_and_every_live_waiter_is_woken() {
        let n = Notify::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut live: Vec<Pin<Box<Notified<'_>>>> = Vec::new();
        // Waiters come and go in a scrambled order; at most 100 wait at once.
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if live.len() < 100 && !(x >> 33).is_multiple_of(3) {
                let mut f = Box::pin(n.notified());
                assert!(f.as_mut().poll(&mut cx).is_pending());
                live.push(f);
            } else if !live.is_empty() {
                let i = (x >> 40) as usize % live.len();
                drop(live.swap_remove(i));
            }
        }
        assert!(n.slots.borrow().len() <= 100, "{}", n.slots.borrow().len());
        let waiting = live.len();
        n.notify_all();
        assert_eq!(count.0.load(Ordering::Relaxed), waiting);
        for f in &mut live {
            assert!(f.as_mut().poll(&mut cx).is_ready());
        }
        drop(live);
        // Every slot is free again, each once.
        let mut free = n.free.borrow().clone();
        free.sort_unstable();
        free.dedup();
        assert_eq!(free.len(), n.slots.borrow().len());
        assert_eq!(n.free.borrow().len(), n.slots.borrow().len());
    }
}
