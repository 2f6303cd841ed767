//! Worker-local wake-up primitives (single thread, no atomics).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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

impl Notify {
    /// The poll of a waiter that was made at `generation` and holds the slot `held` (if
    /// any): ready once a `notify_all` came after `generation`, else its waker noted.
    fn poll_waiter(&self, generation: u64, held: &mut Option<usize>, cx: &Context<'_>) -> Poll<()> {
        if self.generation.get() != generation {
            return Poll::Ready(());
        }
        let mut slots = self.slots.borrow_mut();
        let i = match *held {
            Some(i) => i,
            None => match self.free.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    slots.push(None);
                    slots.len() - 1
                }
            },
        };
        match &mut slots[i] {
            // The same task polls again (the usual case): its waker is kept, not replaced.
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        *held = Some(i);
        Poll::Pending
    }

    /// Gives back a waiter's slot.
    fn release(&self, i: usize) {
        if let Some(w) = self.slots.borrow_mut().get_mut(i) {
            *w = None;
        }
        // The slot was this waiter's alone (taken from `free` or pushed), so it goes back once.
        self.free.borrow_mut().push(i);
    }
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.n.poll_waiter(this.generation, &mut this.slot, cx)
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            self.n.release(i);
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

/// How often the [`IoWheel`] ticks: a deadline on it is met up to this much late (and the
/// time until the worker's sync task runs), never early. The sync task's period.
pub const IO_TICK: Duration = Duration::from_millis(50);
/// [`IO_TICK`] in nanoseconds, and ticks per second (it divides a second).
const IO_TICK_NANOS: u64 = IO_TICK.as_nanos() as u64;
const IO_TICKS_PER_SEC: u64 = 1_000_000_000 / IO_TICK_NANOS;
const _: () = assert!(1_000_000_000 % IO_TICK_NANOS == 0);

/// The shortest timeout kept on the [`IoWheel`]: a shorter one keeps a runtime timer, exact
/// to the millisecond, where the wheel's [`IO_TICK`] would be a large share of it.
pub const COARSE_MIN: Duration = Duration::from_secs(1);
const COARSE_MIN_TICKS: u64 = COARSE_MIN.as_nanos() as u64 / IO_TICK_NANOS;

/// Slots of the [`IoWheel`]: a deadline further ahead waits in the slot `IO_WHEEL_SLOTS - 1`
/// ticks ahead and then looks again (a 60 s timeout that runs out looks about 19 times).
const IO_WHEEL_SLOTS: usize = 64;

/// The worker's deadlines for reads and writes with timeouts of [`COARSE_MIN`] or more: a
/// timed operation notes its waker in the slot of the tick its deadline falls on (a slot of
/// a vector, no allocation once the slots have room) instead of filing a timer in the
/// runtime's wheel, which took some 500 instructions a write (filed, reset, removed, and
/// the runtime's clock reads around it). The tick is the worker's 50 ms sync task
/// ([`IoWheel::advance`]), which reads the clock; deadlines are compared in ticks. A wait
/// of a timeout reads the clock once, when it first has to wait ([`Due::After`]): never
/// earlier than its timeout, however far behind its tick the worker ran.
///
/// One per worker thread ([`IoWheel::with`]). Until the thread's first tick (a thread that
/// runs no sync task: a test's runtime, a helper thread) timed operations keep runtime
/// timers ([`IoWheel::ticking`]).
pub struct IoWheel {
    /// Tick `k` falls at `anchor + k * IO_TICK`.
    anchor: Instant,
    /// The ticks passed: the clock read at the last advance was at least `anchor + ticks *
    /// IO_TICK`.
    ticks: Cell<u64>,
    ticking: Cell<bool>,
    slots: [Notify; IO_WHEEL_SLOTS],
}

thread_local! {
    static IO_WHEEL: IoWheel = IoWheel::new(Instant::now());
}

impl IoWheel {
    fn new(anchor: Instant) -> IoWheel {
        IoWheel {
            anchor,
            ticks: Cell::new(0),
            ticking: Cell::new(false),
            slots: std::array::from_fn(|_| Notify::with_capacity(IDLE_WHEEL_SLOT_ROOM)),
        }
    }

    /// Runs `f` with this thread's wheel; `None` while the thread is being torn down.
    pub fn with<R>(f: impl FnOnce(&IoWheel) -> R) -> Option<R> {
        IO_WHEEL.try_with(f).ok()
    }

    /// The first tick at or after `at` (saturating far ahead).
    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.anchor);
        d.as_secs()
            .saturating_mul(IO_TICKS_PER_SEC)
            .saturating_add(u64::from(d.subsec_nanos()).div_ceil(IO_TICK_NANOS))
    }

    /// The deadline `dur` from now, when this wheel keeps it (`dur` at least [`COARSE_MIN`],
    /// and the wheel ticks); `None`: a runtime timer keeps it. Read without the clock: the
    /// tick is found once the operation has to wait ([`Due::After`]), from the clock then.
    ///
    /// Before, it was counted from the tick the wheel had last passed, taking now as before
    /// the next: a worker that ran behind its tick (a long stretch of work on its thread)
    /// had a wait that began then end as far before its timeout as the worker was behind.
    #[inline]
    pub fn due_in(&self, dur: Duration) -> Option<Due> {
        (self.ticking.get() && dur >= COARSE_MIN).then_some(Due::After(dur))
    }

    /// The tick of the deadline `at`, when this wheel keeps it (at least [`COARSE_MIN`]
    /// beyond the next tick, and the wheel ticks); `None`: a runtime timer keeps it. Read
    /// without the clock; the tick is at or after `at`.
    #[inline]
    pub fn due_at(&self, at: Instant) -> Option<Due> {
        let due = self.tick_of(at);
        (self.ticking.get() && due >= self.ticks.get().saturating_add(2 + COARSE_MIN_TICKS))
            .then_some(Due::Tick(due))
    }

    /// The tick of the deadline `dur` after `now` (saturating far ahead).
    fn tick_after(&self, now: Instant, dur: Duration) -> u64 {
        now.checked_add(dur).map_or(u64::MAX, |at| self.tick_of(at))
    }

    /// Ticks up to the clock reading `now`, waking the waiters due at each tick passed (every
    /// slot once when more than a lap passed). Called by the worker's sync task.
    pub fn advance(&self, now: Instant) {
        self.ticking.set(true);
        let d = now.saturating_duration_since(self.anchor);
        let to = d
            .as_secs()
            .saturating_mul(IO_TICKS_PER_SEC)
            .saturating_add(u64::from(d.subsec_nanos()) / IO_TICK_NANOS);
        let from = self.ticks.get();
        if to <= from {
            return;
        }
        self.ticks.set(to);
        let passed = (to - from).min(IO_WHEEL_SLOTS as u64);
        for k in 0..passed {
            self.slots[(to - k) as usize % IO_WHEEL_SLOTS].notify_all();
        }
    }

    /// A waiter for tick `due` (or, when that is beyond the wheel's reach, for its farthest
    /// slot, after which it looks again).
    fn waiter(&self, due: u64) -> WheelWait {
        let now = self.ticks.get();
        let at = due.min(now + IO_WHEEL_SLOTS as u64 - 1);
        let slot = at as usize % IO_WHEEL_SLOTS;
        WheelWait {
            slot,
            generation: self.slots[slot].generation.get(),
            held: None,
        }
    }
}

/// A waiter in a slot of this thread's [`IoWheel`] (it holds no borrow of the wheel).
struct WheelWait {
    slot: usize,
    generation: u64,
    held: Option<usize>,
}

impl Drop for WheelWait {
    fn drop(&mut self) {
        if let Some(i) = self.held {
            let _ = IO_WHEEL.try_with(|w| w.slots[self.slot].release(i));
        }
    }
}

/// When a [`Timed`] operation's deadline falls on this thread's [`IoWheel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// At this tick.
    Tick(u64),
    /// This long after the operation first has to wait (the tick is found then, from the
    /// clock: an operation ready at once never reads it).
    After(Duration),
}

impl From<u64> for Due {
    fn from(t: u64) -> Due {
        Due::Tick(t)
    }
}

/// A [`Timed`] operation's deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub struct TimedOut;

pin_project_lite::pin_project! {
    /// `op` raced against tick `due` of this thread's [`IoWheel`] (see [`IoWheel::due_in`]):
    /// `Err(TimedOut)` once the wheel has passed it (the clock then read at least the
    /// deadline it was made from), unless `op` is ready first. `op` is polled first: one
    /// ready at once never touches the wheel.
    pub struct Timed<F> {
        #[pin]
        op: F,
        due: Due,
        wait: Option<WheelWait>,
    }
}

/// `op` until `due` on this thread's [`IoWheel`] (see [`Timed`]).
#[inline]
pub fn timed<F: Future>(op: F, due: impl Into<Due>) -> Timed<F> {
    Timed {
        op,
        due: due.into(),
        wait: None,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = Result<F::Output, TimedOut>;
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.op.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let slot = this.due;
        let wait = this.wait;
        IO_WHEEL
            .try_with(|w| loop {
                let due = match *slot {
                    Due::Tick(t) => t,
                    Due::After(d) => {
                        let t = w.tick_after(Instant::now(), d);
                        *slot = Due::Tick(t);
                        t
                    }
                };
                if w.ticks.get() >= due {
                    return Poll::Ready(Err(TimedOut));
                }
                let ww = wait.get_or_insert_with(|| w.waiter(due));
                match w.slots[ww.slot].poll_waiter(ww.generation, &mut ww.held, cx) {
                    Poll::Pending => return Poll::Pending,
                    // Its tick came: look at the deadline again (a far one waits once more).
                    Poll::Ready(()) => *wait = None,
                }
            })
            // The thread is being torn down: nothing will tick.
            .unwrap_or(Poll::Ready(Err(TimedOut)))
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

    #[test]
    fn wheel_deadlines_are_never_early_and_short_ones_stay_off_the_wheel() {
        let t0 = Instant::now();
        let wheel = IoWheel::new(t0);
        // Not ticking: every deadline keeps a runtime timer.
        assert_eq!(wheel.due_in(Duration::from_secs(5)), None);
        assert_eq!(wheel.due_at(t0 + Duration::from_secs(5)), None);
        wheel.advance(t0 + Duration::from_millis(120));
        assert_eq!(wheel.ticks.get(), 2, "120 ms is two whole ticks");
        // Under COARSE_MIN: a runtime timer.
        assert_eq!(wheel.due_in(Duration::from_millis(999)), None);
        assert_eq!(wheel.due_at(t0 + Duration::from_millis(900)), None);
        // A relative deadline is found from the clock once the operation waits: the first
        // tick at or after it, however stale the wheel's count is.
        assert_eq!(
            wheel.due_in(Duration::from_secs(1)),
            Some(Due::After(Duration::from_secs(1)))
        );
        let late = t0 + Duration::from_millis(1_010);
        assert_eq!(wheel.tick_after(late, Duration::from_secs(1)), 41);
        assert_eq!(wheel.tick_after(late, Duration::from_millis(1_040)), 41);
        assert_eq!(wheel.tick_after(late, Duration::from_millis(1_041)), 42);
        // An absolute deadline: the first tick at or after it.
        for ms in [1_200u64, 1_201, 1_249, 1_250, 3_333, 60_000] {
            let at = t0 + Duration::from_millis(ms);
            let Some(Due::Tick(due)) = wheel.due_at(at) else {
                panic!("{ms} ms: not on the wheel");
            };
            let tick_time = t0 + IO_TICK * u32::try_from(due).expect("small");
            assert!(tick_time >= at, "{ms} ms: tick {due} is early");
            assert!(
                tick_time < at + IO_TICK,
                "{ms} ms: tick {due} is a tick late"
            );
        }
        // Far beyond the clock: saturates, never wraps.
        assert_eq!(wheel.tick_after(late, Duration::MAX), u64::MAX);
        assert!(wheel.tick_after(late, Duration::from_secs(u64::MAX / 4)) > 1 << 40);
    }

    #[test]
    fn timed_ends_on_the_deadlines_tick_not_before_and_frees_its_slot() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        IO_WHEEL.with(|w| w.advance(w.anchor));
        let base = IO_WHEEL.with(|w| w.ticks.get());
        let anchor = IO_WHEEL.with(|w| w.anchor);
        let at_tick = |k: u64| anchor + IO_TICK * u32::try_from(k).expect("small");
        // An operation ready at once never touches the wheel.
        let mut ready = Box::pin(timed(std::future::ready(7), base + 1));
        assert_eq!(ready.as_mut().poll(&mut cx), Poll::Ready(Ok(7)));
        assert!(ready.wait.is_none());
        // A pending one, due 5 s out (100 ticks: beyond the wheel's 63-tick reach).
        let due = base + 100;
        let mut op = Box::pin(timed(std::future::pending::<()>(), due));
        assert!(op.as_mut().poll(&mut cx).is_pending());
        let mut woken = count.0.load(Ordering::Relaxed);
        for k in base + 1..due {
            IO_WHEEL.with(|w| w.advance(at_tick(k)));
            let now = count.0.load(Ordering::Relaxed);
            if now != woken {
                // Woken to look again (the far slot): still pending, not yet due.
                woken = now;
                assert!(op.as_mut().poll(&mut cx).is_pending(), "tick {k} of {due}");
            }
        }
        assert_eq!(woken, 1, "one look again on the way to a far deadline");
        // A clock reading just short of the deadline's tick is not it.
        IO_WHEEL.with(|w| w.advance(at_tick(due) - Duration::from_nanos(1)));
        assert!(op.as_mut().poll(&mut cx).is_pending());
        IO_WHEEL.with(|w| w.advance(at_tick(due)));
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "woken on its tick");
        assert_eq!(op.as_mut().poll(&mut cx), Poll::Ready(Err(TimedOut)));
        drop(op);
        // Every slot taken was given back.
        IO_WHEEL.with(|w| {
            for s in &w.slots {
                assert!(s.slots.borrow().iter().all(Option::is_none));
                assert_eq!(s.free.borrow().len(), s.slots.borrow().len());
            }
        });
        // A clock that jumps more than a lap wakes every slot once.
        let mut a = Box::pin(timed(std::future::pending::<()>(), due + 10));
        let mut b = Box::pin(timed(std::future::pending::<()>(), due + 50));
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        IO_WHEEL.with(|w| w.advance(at_tick(due + 1_000)));
        assert_eq!(a.as_mut().poll(&mut cx), Poll::Ready(Err(TimedOut)));
        assert_eq!(b.as_mut().poll(&mut cx), Poll::Ready(Err(TimedOut)));
    }
}
