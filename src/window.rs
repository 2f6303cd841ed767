//! A rolling two-counter window (e.g. successes/failures, requests/retries) made of ten
//! buckets, for one worker (no atomics).

use std::cell::RefCell;
use std::time::{Duration, Instant};

const BUCKETS: usize = 10;

#[derive(Debug)]
struct Inner {
    start: Instant,
    /// Bucket index (since `start`) each slot currently holds.
    epoch: [u64; BUCKETS],
    a: [u32; BUCKETS],
    b: [u32; BUCKETS],
}

#[derive(Debug)]
pub struct Rolling {
    bucket: Duration,
    inner: RefCell<Inner>,
}

impl Rolling {
    /// A window of `span`, kept as ten buckets.
    pub fn new(span: Duration) -> Rolling {
        Rolling {
            bucket: (span / BUCKETS as u32).max(Duration::from_millis(1)),
            inner: RefCell::new(Inner {
                start: Instant::now(),
                epoch: [u64::MAX; BUCKETS],
                a: [0; BUCKETS],
                b: [0; BUCKETS],
            }),
        }
    }

    fn slot(&self, inner: &mut Inner, now: Instant) -> usize {
        let e =
            (now.saturating_duration_since(inner.start).as_nanos() / self.bucket.as_nanos()) as u64;
        let i = (e % BUCKETS as u64) as usize;
        if inner.epoch[i] != e {
            inner.epoch[i] = e;
            inner.a[i] = 0;
            inner.b[i] = 0;
        }
        i
    }

    pub fn add(&self, now: Instant, a: u32, b: u32) {
        let mut inner = self.inner.borrow_mut();
        let i = self.slot(&mut inner, now);
        inner.a[i] = inner.a[i].saturating_add(a);
        inner.b[i] = inner.b[i].saturating_add(b);
    }

    /// Totals over the window ending now.
    pub fn totals(&self, now: Instant) -> (u64, u64) {
        let mut inner = self.inner.borrow_mut();
        let _ = self.slot(&mut inner, now);
        let e =
            (now.saturating_duration_since(inner.start).as_nanos() / self.bucket.as_nanos()) as u64;
        let mut ta = 0u64;
        let mut tb = 0u64;
        for i in 0..BUCKETS {
            if inner.epoch[i] != u64::MAX && e.saturating_sub(inner.epoch[i]) < BUCKETS as u64 {
                ta += inner.a[i] as u64;
                tb += inner.b[i] as u64;
            }
        }
        (ta, tb)
    }

    pub fn reset(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.epoch = [u64::MAX; BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_expire_with_the_window() {
        let w = Rolling::new(Duration::from_secs(10));
        let t0 = Instant::now();
        w.add(t0, 5, 1);
        w.add(t0 + Duration::from_secs(3), 2, 2);
        assert_eq!(w.totals(t0 + Duration::from_secs(4)), (7, 3));
        assert_eq!(w.totals(t0 + Duration::from_millis(10_500)), (2, 2));
        assert_eq!(w.totals(t0 + Duration::from_secs(14)), (0, 0));
    }
}
