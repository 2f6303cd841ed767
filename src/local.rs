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
    /// A `Notify` with room for `n` waiters at once before its lists grow.
    pub fn with_capacity(n: usize) -> Notify {
        Notify {
            generation: Cell::new(0),
            slots: RefCell::new(Vec::with_capacity(n)),
            free: RefCell::new(Vec::with_capacity(n)),
        }
    }

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

/// Slots of an [`IdleWheel`]: a waiter whose deadline is further ahead waits in the slot
/// `IDLE_WHEEL_SLOTS - 1` ticks ahead and then looks again.
pub const IDLE_WHEEL_SLOTS: usize = 64;

/// Idle connections grouped by the tick their deadline falls on. Each tick wakes only the
/// waiters due at it: with a 60 s idle timeout a connection wakes once, where a single
/// [`Notify`] for all woke every idle connection every tick (10,000 wake-ups a second at
/// 10,000 idle connections).
pub struct IdleWheel {
    ticks: Cell<u64>,
    slots: [Notify; IDLE_WHEEL_SLOTS],
}

/// Idle connections each slot has room for when the wheel is made. A slot is first used a
/// tick after the one before it, so without room each of the first laps of the wheel
/// allocated on keep-alive requests (twice per tick: a slot and its free list); past that
/// number a slot grows once and keeps its room.
const IDLE_WHEEL_SLOT_ROOM: usize = 16;

impl Default for IdleWheel {
    fn default() -> Self {
        IdleWheel {
            ticks: Cell::new(0),
            slots: std::array::from_fn(|_| Notify::with_capacity(IDLE_WHEEL_SLOT_ROOM)),
        }
    }
}

impl IdleWheel {
    /// Completes on the tick `ahead` ticks from now (taken as 1 to `IDLE_WHEEL_SLOTS - 1`), or
    /// on a [`IdleWheel::wake_all`], whichever is first. The waiter checks its own deadline
    /// then: a tick may come early or late, and a far deadline takes several turns.
    pub fn after(&self, ahead: u64) -> Notified<'_> {
        let ahead = ahead.clamp(1, IDLE_WHEEL_SLOTS as u64 - 1);
        let at = self.ticks.get().wrapping_add(ahead);
        self.slots[(at % IDLE_WHEEL_SLOTS as u64) as usize].notified()
    }

    /// One tick: wakes the waiters due at it.
    pub fn tick(&self) {
        let t = self.ticks.get().wrapping_add(1);
        self.ticks.set(t);
        self.slots[(t % IDLE_WHEEL_SLOTS as u64) as usize].notify_all();
    }

    /// Wakes every waiter, due or not: a reload (their listener may be gone) or the drain
    /// (a first request's grace is counted in these wake-ups).
    pub fn wake_all(&self) {
        for s in &self.slots {
            s.notify_all();
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

    #[test]
    fn the_wheel_wakes_a_waiter_on_its_tick_and_all_on_wake_all() {
        let wheel = IdleWheel::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        wheel.tick();
        // Due 3 ticks ahead, and one past the wheel's reach (taken as its last slot).
        let mut near = Box::pin(wheel.after(3));
        let mut far = Box::pin(wheel.after(1_000));
        let mut zero = Box::pin(wheel.after(0));
        assert!(near.as_mut().poll(&mut cx).is_pending());
        assert!(far.as_mut().poll(&mut cx).is_pending());
        assert!(zero.as_mut().poll(&mut cx).is_pending());
        wheel.tick();
        assert!(
            zero.as_mut().poll(&mut cx).is_ready(),
            "0 ahead is the next tick"
        );
        wheel.tick();
        assert!(near.as_mut().poll(&mut cx).is_pending());
        wheel.tick();
        assert!(near.as_mut().poll(&mut cx).is_ready());
        for _ in 3..IDLE_WHEEL_SLOTS - 1 {
            assert!(far.as_mut().poll(&mut cx).is_pending());
            wheel.tick();
        }
        assert!(far.as_mut().poll(&mut cx).is_ready());
        // wake_all reaches a waiter whatever its slot; one registered after it waits on.
        let mut a = Box::pin(wheel.after(5));
        let mut b = Box::pin(wheel.after(40));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        wheel.wake_all();
        assert!(a.as_mut().poll(&mut cx).is_ready());
        assert!(b.as_mut().poll(&mut cx).is_ready());
        let mut c = Box::pin(wheel.after(5));
        assert!(c.as_mut().poll(&mut cx).is_pending());
    }
}
