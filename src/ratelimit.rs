//! Token-bucket rate limits, accurate across workers without a lock per request.
//!
//! # Design
//! Every (limit, key) has one **host bucket**, shared by all workers (a `Mutex` per bucket in a
//! bounded, evicting map): it refills at `rate / per` and holds at most `burst` tokens. A worker
//! never takes a single token from it on the request path: it **leases a batch** of tokens
//! (`batch = clamp(rate/s × 5 ms, 1, 64)`) into its own worker-local table and spends them
//! with plain arithmetic. So the host lock is taken once per batch, and the tokens admitted
//! across all workers can never exceed what the host bucket issued.
//!
//! A lease lives `LEASE_TTL` (100 ms). When a worker finds its lease expired, the unused tokens
//! go back to the host bucket before it leases again, so a client spreading its connections over
//! cores is not starved by tokens parked on a core it no longer uses.
//!
//! **Error bound.** Admission never exceeds `burst + rate × t` over any interval `t` (every
//! token comes from the host bucket). It can fall short by at most `workers × batch` tokens:
//! leases parked on workers the client stopped using, until they expire and are returned on
//! those workers' next request for the key or are evicted. With the batch at ≤ 5 ms of rate,
//! that is ≤ `workers × 5 ms` of traffic.
//!
//! **Concurrency limits** count requests in flight per route (or per key) gateway-wide: one
//! shared atomic counter per key, incremented when a request is admitted and decremented when
//! it ends (only on routes that have such a limit).
//!
//! **Memory.** Host buckets and worker leases live in `quick_cache` maps bounded by
//! `[rate_limiting].max_keys` entries per map; the least recently used keys are evicted, so a
//! flood of distinct client addresses cannot exhaust memory (an evicted key starts again with
//! a full bucket).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, RateKey, RateLimitConfig};

/// How long a worker keeps a lease of tokens.
pub const LEASE_TTL: Duration = Duration::from_millis(100);
/// Longest batch of tokens leased at once.
pub const MAX_BATCH: f64 = 64.0;

/// One configured limit, compiled.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Index over all routes' limits: the first part of a bucket's key.
    pub id: u32,
    pub key: RateKey,
    /// Tokens per second.
    pub rate: f64,
    pub burst: f64,
    pub batch: f64,
    /// For the RateLimit-Policy header: quota `q` over window `w` seconds.
    pub quota: u32,
    pub window_secs: u64,
    pub name: String,
}

impl Limit {
    pub fn new(id: u32, c: &RateLimitConfig) -> Limit {
        let secs = c.per.0.as_secs_f64();
        let rate = c.rate as f64 / secs;
        Limit {
            id,
            key: c.key.clone(),
            rate,
            burst: c.burst.unwrap_or(c.rate) as f64,
            batch: (rate * 0.005).clamp(1.0, MAX_BATCH).floor(),
            quota: c.rate,
            window_secs: c.per.0.as_secs().max(1),
            name: c.name.clone().unwrap_or_else(|| match &c.key {
                RateKey::ClientIp => "client_ip".into(),
                RateKey::Route => "route".into(),
                RateKey::Header(h) => h.clone(),
            }),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, l: &Limit, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * l.rate).min(l.burst);
        self.last = now;
    }
}

type HostMap = quick_cache::sync::Cache<(u32, u64), Arc<Mutex<Bucket>>>;
type InFlightMap = quick_cache::sync::Cache<(u32, u64), Arc<AtomicU32>>;

/// The buckets and in-flight counters shared by every worker.
pub struct HostBuckets {
    map: HostMap,
    in_flight: InFlightMap,
}

/// A route's concurrency limit, compiled.
#[derive(Debug, Clone)]
pub struct Concurrency {
    /// The route's index.
    pub id: u32,
    pub key: RateKey,
    pub max: u32,
}

/// One request's place under a concurrency limit; given back when dropped.
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HostBuckets {
    pub fn new(cfg: &Config) -> Arc<HostBuckets> {
        Arc::new(HostBuckets {
            map: HostMap::new(cfg.rate_limiting.max_keys),
            in_flight: InFlightMap::new(cfg.rate_limiting.max_keys),
        })
    }

    /// Takes a place under a concurrency limit, or `None` when `max` requests are in flight.
    /// The counter is shared by all workers (one atomic add and one subtract per request, and
    /// only on routes with a concurrency limit: a gateway-wide limit needs shared state).
    pub fn acquire(&self, c: &Concurrency, key: u64) -> Option<Slot> {
        let counter = self
            .in_flight
            .get_or_insert_with(&(c.id, key), || Ok::<_, ()>(Arc::new(AtomicU32::new(0))))
            .expect("infallible");
        if counter.fetch_add(1, Ordering::AcqRel) >= c.max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(counter))
    }

    fn bucket(&self, l: &Limit, key: u64, now: Instant) -> Arc<Mutex<Bucket>> {
        self.map
            .get_or_insert_with(&(l.id, key), || {
                Ok::<_, ()>(Arc::new(Mutex::new(Bucket {
                    tokens: l.burst,
                    last: now,
                })))
            })
            .expect("infallible")
    }

    /// Returns unused tokens and takes up to `l.batch` new ones. Returns (granted, tokens left
    /// in the host bucket).
    fn lease(&self, l: &Limit, key: u64, give_back: f64, now: Instant) -> (f64, f64) {
        let b = self.bucket(l, key, now);
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        b.refill(l, now);
        b.tokens = (b.tokens + give_back).min(l.burst);
        let granted = b.tokens.min(l.batch).floor();
        b.tokens -= granted;
        (granted, b.tokens)
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    tokens: f64,
    expires: Instant,
    /// Host tokens seen at the last lease (for the RateLimit header).
    host_left: f64,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Admitted; `remaining` is an estimate for the RateLimit header, of the tightest limit.
    Allow {
        limit: usize,
        remaining: u64,
        reset_secs: u64,
    },
    /// Refused by limit `limit`; retry after this many seconds.
    Deny { limit: usize, retry_after: u64 },
}

/// A worker's leases.
pub struct Limiter {
    host: Arc<HostBuckets>,
    leases: RefCell<quick_cache::unsync::Cache<(u32, u64), Lease>>,
}

impl Limiter {
    pub fn host(&self) -> &HostBuckets {
        &self.host
    }

    pub fn new(host: Arc<HostBuckets>, max_keys: usize) -> Limiter {
        Limiter {
            host,
            leases: RefCell::new(quick_cache::unsync::Cache::new(max_keys)),
        }
    }

    /// Checks every limit of a route for one request; `keys[i]` is the key of `limits[i]`.
    pub fn check(&self, limits: &[Limit], keys: &[u64], now: Instant) -> Verdict {
        let mut best = Verdict::Allow {
            limit: 0,
            remaining: u64::MAX,
            reset_secs: 0,
        };
        for (i, (l, &key)) in limits.iter().zip(keys).enumerate() {
            let mut leases = self.leases.borrow_mut();
            let k = (l.id, key);
            let mut lease = leases.get(&k).copied();
            let need_lease = match &lease {
                Some(ls) => ls.tokens < 1.0 || ls.expires <= now,
                None => true,
            };
            if need_lease {
                let give_back =
                    lease.map_or(0.0, |ls| if ls.expires <= now { ls.tokens } else { 0.0 });
                let kept = lease.map_or(0.0, |ls| if ls.expires <= now { 0.0 } else { ls.tokens });
                let (granted, host_left) = self.host.lease(l, key, give_back, now);
                lease = Some(Lease {
                    tokens: kept + granted,
                    expires: now + LEASE_TTL,
                    host_left,
                });
            }
            let mut ls = lease.expect("set above");
            if ls.tokens < 1.0 {
                leases.insert(k, ls);
                let wait = (1.0 - (ls.tokens + ls.host_left).max(0.0)) / l.rate;
                return Verdict::Deny {
                    limit: i,
                    retry_after: wait.ceil().max(1.0) as u64,
                };
            }
            ls.tokens -= 1.0;
            leases.insert(k, ls);
            let remaining = (ls.tokens + ls.host_left).floor().max(0.0) as u64;
            if let Verdict::Allow { remaining: r, .. } = best {
                if remaining < r {
                    let reset = ((l.burst - (ls.tokens + ls.host_left)) / l.rate)
                        .ceil()
                        .max(0.0) as u64;
                    best = Verdict::Allow {
                        limit: i,
                        remaining,
                        reset_secs: reset,
                    };
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn limit(rate: u32, burst: u32) -> Limit {
        Limit::new(
            0,
            &RateLimitConfig {
                name: None,
                key: RateKey::ClientIp,
                rate,
                per: Dur(Duration::from_secs(1)),
                burst: Some(burst),
            },
        )
    }

    fn host() -> Arc<HostBuckets> {
        Arc::new(HostBuckets {
            map: HostMap::new(1000),
            in_flight: InFlightMap::new(1000),
        })
    }

    #[test]
    fn concurrency_slots() {
        let h = host();
        let c = Concurrency {
            id: 0,
            key: RateKey::Route,
            max: 2,
        };
        let a = h.acquire(&c, 0).unwrap();
        let _b = h.acquire(&c, 0).unwrap();
        assert!(h.acquire(&c, 0).is_none());
        assert!(h.acquire(&c, 1).is_some(), "another key");
        drop(a);
        assert!(h.acquire(&c, 0).is_some());
    }

    #[test]
    fn burst_then_rate() {
        let h = host();
        let w = Limiter::new(h, 100);
        let l = [limit(10, 5)];
        let t0 = Instant::now();
        let allowed = (0..20)
            .filter(|_| matches!(w.check(&l, &[1], t0), Verdict::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "the burst");
        let later = t0 + Duration::from_millis(500);
        let allowed = (0..20)
            .filter(|_| matches!(w.check(&l, &[1], later), Verdict::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "half a second at 10/s");
        // Another key has its own bucket.
        assert!(matches!(w.check(&l, &[2], later), Verdict::Allow { .. }));
    }

    #[test]
    fn workers_share_one_host_bucket() {
        let h = host();
        let workers: Vec<Limiter> = (0..4).map(|_| Limiter::new(h.clone(), 100)).collect();
        let l = [limit(1000, 1000)];
        let t0 = Instant::now();
        let mut allowed = 0;
        for i in 0..4000 {
            if matches!(workers[i % 4].check(&l, &[7], t0), Verdict::Allow { .. }) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 1000, "never more than the host bucket issued");
    }

    #[test]
    fn expired_leases_are_returned() {
        let h = host();
        let a = Limiter::new(h.clone(), 100);
        let b = Limiter::new(h, 100);
        let l = [limit(2000, 20)]; // batch = 10
        let t0 = Instant::now();
        assert!(matches!(a.check(&l, &[1], t0), Verdict::Allow { .. }));
        // `a` holds 9 leased tokens; `b` can take the other 10 at once.
        let got_b = (0..20)
            .filter(|_| matches!(b.check(&l, &[1], t0), Verdict::Allow { .. }))
            .count();
        assert_eq!(got_b, 10);
        // After the TTL, `a`'s nine come back to the host for `b`... once `a` returns them.
        let t1 = t0 + LEASE_TTL + Duration::from_millis(1);
        assert!(matches!(a.check(&l, &[1], t1), Verdict::Allow { .. }));
    }

    #[test]
    fn memory_is_bounded() {
        let h = host();
        let w = Limiter::new(h.clone(), 1000);
        let l = [limit(10, 10)];
        let t0 = Instant::now();
        for k in 0..100_000u64 {
            w.check(&l, &[k], t0);
        }
        assert!(h.map.len() <= 1100, "host map holds {}", h.map.len());
        assert!(w.leases.borrow().len() <= 1100);
    }
}
