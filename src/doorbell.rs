//! A worker's doorbell: how a thread outside the runtime (the Redis link) wakes tasks on a
//! monoio worker without the worker polling.
//!
//! A monoio 0.2 runtime built without its `sync` feature panics on a waker used from another
//! thread, and turning `sync` on changes the whole runtime (every wake checks the owning
//! thread, every park drains a cross-thread channel and keeps an eventfd read in the ring, the
//! main future becomes a spawned task, and flume and a thread pool join the build). So the
//! runtime is left as it is, and a worker that needs a wake-up from another thread gets a
//! doorbell of its own:
//!
//! - a Unix socket pair: the far side ([`Ring`]) is a plain non-blocking std socket that any
//!   thread may write a byte to; the near side is read by one task on the worker, through
//!   io_uring (a `recv` that stays submitted) or epoll readiness on the legacy driver, so the
//!   worker sleeps until a byte comes;
//! - that task wakes every local waiter ([`crate::local::Notify`]), and each waiter checks
//!   its own condition again ([`Doorbell::wait_until`]).
//!
//! A ring writes a byte only when some waiter is registered and no byte is already on its
//! way (`rung`), so a busy Redis link costs one syscall per round per waiting worker, and
//! nothing while nobody waits. Lost wake-ups are ruled out by the Dekker pattern: a waiter
//! counts itself in `waiting`, then checks its condition; the other thread makes the
//! condition true, then looks at `waiting` (both sides with a `SeqCst` fence in between).
//!
//! The socket pair and the reader task are made on the first wait, so a worker that never
//! waits on another thread has neither.

use std::cell::{OnceCell, RefCell};
use std::io::Write;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::local::{Notified, Notify};

/// Bytes the reader takes per read (a ring writes one; a few may queue between reads).
const READ_BYTES: usize = 64;
/// Most doorbells a [`Rings`] list holds: one per worker that waited, and at most 1024
/// workers (`server.workers`).
pub const MAX_RINGS: usize = 1024;

/// The side of a doorbell other threads hold.
pub struct Ring {
    /// Local waiters registered on the worker.
    waiting: AtomicUsize,
    /// A byte is on its way and the reader has not yet taken it.
    rung: AtomicBool,
    tx: StdUnixStream,
    /// Bytes written, for the tests (each is one wake-up of the worker).
    pub rings: AtomicU64,
}

impl Ring {
    /// Wakes the worker's waiters, if it has any. Call it after making their condition true.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 || self.rung.swap(true, Ordering::SeqCst) {
            return;
        }
        self.rings.fetch_add(1, Ordering::Relaxed);
        // WouldBlock means bytes are already queued (the reader will clear `rung`). Another
        // error (the worker gone, an interrupted call) leaves no byte on its way: clear `rung`
        // so that the next ring tries again.
        if let Err(e) = (&self.tx).write(&[1]) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                self.rung.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Doorbells that a thread rings after each round of work (the Redis link keeps one list).
pub struct Rings {
    list: Mutex<Vec<Arc<Ring>>>,
    /// Tells lists apart for [`Doorbell::join`] (an address could be reused by a later list).
    id: u64,
}

impl Default for Rings {
    fn default() -> Rings {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Rings {
            list: Mutex::new(Vec::new()),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Rings {
    /// Adds `r` unless it is already there (or the list is full: its waiters then fall back
    /// on their timeouts).
    pub fn add(&self, r: &Arc<Ring>) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() < MAX_RINGS && !l.iter().any(|x| Arc::ptr_eq(x, r)) {
            l.push(r.clone());
        }
    }

    /// Bytes written to the doorbells on the list so far (each woke a worker).
    pub fn rung(&self) -> u64 {
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| r.rings.load(Ordering::Relaxed))
            .sum()
    }

    /// Rings every doorbell in the list (those without waiters cost one atomic load).
    pub fn ring_all(&self) {
        for r in self.list.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            r.ring();
        }
    }
}

/// A worker's doorbell (worker-local; see the module doc).
#[derive(Default)]
pub struct Doorbell {
    inner: OnceCell<Option<Rc<Inner>>>,
}

struct Inner {
    ring: Arc<Ring>,
    notify: Notify,
    /// Lists this doorbell is on (by id), so that it joins each one once.
    joined: RefCell<Vec<u64>>,
}

impl Doorbell {
    /// The far side, made (with the reader task) on first use; `None` when the socket pair
    /// could not be made (waiters then wait for their deadline, which fails open).
    fn inner(&self) -> Option<&Rc<Inner>> {
        self.inner
            .get_or_init(|| match Inner::start() {
                Ok(i) => Some(i),
                Err(e) => {
                    crate::warn!("doorbell: cannot make a socket pair ({e}); waits on Redis run to their timeout");
                    None
                }
            })
            .as_ref()
    }

    /// The far side, to hand to another thread; `None` when the doorbell could not be made.
    pub fn ring(&self) -> Option<Arc<Ring>> {
        self.inner().map(|i| i.ring.clone())
    }

    /// Puts this doorbell on `rings` (once per list).
    pub fn join(&self, rings: &Rings) {
        let Some(i) = self.inner() else { return };
        let mut j = i.joined.borrow_mut();
        if !j.contains(&rings.id) {
            rings.add(&i.ring);
            j.push(rings.id);
        }
    }

    /// Starts watching for rings: a ring after this call ends [`Watch::wait`]. Look at the
    /// condition after this call, then wait, so that an answer between the two is not missed.
    pub fn watch(&self) -> Watch<'_> {
        let inner = self.inner().map(|i| &**i);
        if let Some(i) = inner {
            i.ring.waiting.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
        }
        Watch {
            inner,
            notified: inner.map(|i| i.notify.notified()),
        }
    }

    /// Waits until `ready()` holds (true) or `deadline` passes (false, after a last look).
    /// The task sleeps in between: it is woken only by a ring or by the deadline.
    pub async fn wait_until(&self, deadline: Instant, mut ready: impl FnMut() -> bool) -> bool {
        loop {
            let watch = self.watch();
            if ready() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            watch.wait(deadline).await;
        }
    }
}

/// A waiter counted on its doorbell (see [`Doorbell::watch`]).
pub struct Watch<'a> {
    inner: Option<&'a Inner>,
    notified: Option<Notified<'a>>,
}

impl Watch<'_> {
    /// Sleeps until a ring that came after the watch began, or until `deadline`.
    pub async fn wait(mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.notified.take() {
            Some(n) => {
                let _ = monoio::time::timeout(left, n).await;
            }
            None => monoio::time::sleep(left).await,
        }
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.inner {
            i.ring.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Inner {
    fn start() -> std::io::Result<Rc<Inner>> {
        let (tx, rx) = StdUnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        let rx = monoio::net::UnixStream::from_std(rx)?;
        let inner = Rc::new(Inner {
            ring: Arc::new(Ring {
                waiting: AtomicUsize::new(0),
                rung: AtomicBool::new(false),
                tx,
                rings: AtomicU64::new(0),
            }),
            notify: Notify::default(),
            joined: RefCell::new(Vec::new()),
        });
        let weak = Rc::downgrade(&inner);
        monoio::spawn(read_loop(rx, weak));
        Ok(inner)
    }
}

/// The reader: each byte wakes every waiter; it ends when the doorbell is dropped (with its
/// worker) or the socket fails (waiters then run to their deadlines).
async fn read_loop(rx: monoio::net::UnixStream, inner: std::rc::Weak<Inner>) {
    use monoio::io::AsyncReadRent;
    let mut rx = rx;
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let (r, b) = rx.read(buf).await;
        buf = b;
        let Some(i) = inner.upgrade() else { return };
        match r {
            Ok(n) if n > 0 => {
                // Cleared before the waiters look, so that a ring after their look writes again.
                i.ring.rung.store(false, Ordering::SeqCst);
                i.notify.notify_all();
            }
            _ => {
                crate::warn!("doorbell: its socket failed; waits on Redis run to their timeout");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::future::Future;
    use std::time::Duration;

    /// Runs `make()` on the epoll driver, then on io_uring where the kernel allows it
    /// (FusionDriver falls back to epoll otherwise).
    fn on_both_drivers<F: Future<Output = ()>>(make: impl Fn() -> F) {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("epoll runtime")
            .block_on(make());
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(make());
    }

    /// A ring from another thread ends the wait; the waiter looks at its condition once
    /// before sleeping and once after the ring (at most twice), not once per millisecond.
    #[test]
    fn a_ring_from_another_thread_wakes_the_waiter() {
        on_both_drivers(|| async {
            let bell = Doorbell::default();
            let ring = bell.ring().expect("socket pair");
            let flag = Arc::new(AtomicBool::new(false));
            let (r, f) = (ring.clone(), flag.clone());
            // The other thread answers once the waiter is counted (an event, not a delay).
            let t = std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(10);
                while r.waiting.load(Ordering::SeqCst) == 0 && Instant::now() < until {
                    std::thread::yield_now();
                }
                f.store(true, Ordering::SeqCst);
                r.ring();
            });
            let looks = Cell::new(0u32);
            let ok = bell
                .wait_until(Instant::now() + Duration::from_secs(10), || {
                    looks.set(looks.get() + 1);
                    flag.load(Ordering::SeqCst)
                })
                .await;
            t.join().expect("ringing thread");
            assert!(ok);
            assert!((1..=2).contains(&looks.get()), "{} looks", looks.get());
            assert_eq!(ring.waiting.load(Ordering::SeqCst), 0);
        });
    }

    /// Nobody rings: the wait ends at its deadline, having looked twice (at the start and
    /// at the deadline), where a 1 ms poll would have looked about 50 times.
    #[test]
    fn a_wait_nobody_rings_looks_at_the_start_and_at_the_deadline() {
        on_both_drivers(|| async {
            let bell = Doorbell::default();
            let looks = Cell::new(0u32);
            let ok = bell
                .wait_until(Instant::now() + Duration::from_millis(50), || {
                    looks.set(looks.get() + 1);
                    false
                })
                .await;
            assert!(!ok);
            assert_eq!(looks.get(), 2);
            // Rung with nobody waiting: no byte is written.
            let ring = bell.ring().expect("socket pair");
            ring.ring();
            assert_eq!(ring.rings.load(Ordering::Relaxed), 0);
        });
    }
}
