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
            None => match slots.iter().position(Option::is_none) {
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
        }
    }
}
