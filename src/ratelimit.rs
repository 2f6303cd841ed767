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

use crate::config::{
    Config, QuotaConfig, QuotaPeriod, RateBackend, RateKey, RateLimitConfig, RedisFailure,
};
use crate::redis::{Call, Demand, RedisLink};

/// How long a worker keeps a lease of tokens.
pub const LEASE_TTL: Duration = Duration::from_millis(100);
/// Longest batch of tokens leased at once.
pub const MAX_BATCH: f64 = 64.0;
/// Longest batch a host takes from Redis at once.
pub const MAX_REDIS_BATCH: f64 = 512.0;
/// Redis-issued tokens a host has not spent within this time go back to Redis.
pub const HOST_STOCK_TTL: Duration = Duration::from_secs(1);

/// One configured limit, compiled.
#[derive(Debug, Clone)]
pub struct Limit {
    /// Index over all routes' limits: the first part of a bucket's key.
    pub id: u32,
    pub key: RateKey,
    /// Tokens per second.
    pub rate: f64,
    pub burst: f64,
    /// Tokens a worker leases from its host at once (5 ms of rate).
    pub batch: f64,
    /// Tokens a host takes from Redis at once (50 ms of rate).
    pub redis_batch: f64,
    /// For the RateLimit-Policy header: quota `q` over window `w` seconds.
    pub quota: u32,
    pub window_secs: u64,
    pub name: String,
    /// `route:name`, the stable part of the limit's Redis keys (ids change with the config,
    /// names do not, and every host of a cluster must agree on the key).
    pub scope: String,
    /// A quota per calendar period (no refill; a new bucket each period) instead of a rate.
    pub period: Option<QuotaPeriod>,
}

impl Limit {
    pub fn new(id: u32, route: &str, c: &RateLimitConfig) -> Limit {
        let secs = c.per.0.as_secs_f64();
        let rate = c.rate as f64 / secs;
        let name = c.name.clone().unwrap_or_else(|| c.key.default_name());
        Limit {
            id,
            key: c.key.clone(),
            rate,
            burst: c.burst.unwrap_or(c.rate) as f64,
            batch: (rate * 0.005).clamp(1.0, MAX_BATCH).floor(),
            redis_batch: (rate * 0.05).clamp(1.0, MAX_REDIS_BATCH).floor(),
            quota: c.rate,
            window_secs: c.per.0.as_secs().max(1),
            scope: format!("{route}:{name}"),
            name,
            period: None,
        }
    }

    /// A quota: `limit` requests per key per UTC day or month. Workers lease 0.1% of it at a
    /// time, hosts take 1% from Redis at a time.
    pub fn quota(id: u32, route: &str, q: &QuotaConfig) -> Limit {
        let (word, secs) = match q.period {
            QuotaPeriod::Day => ("day", 86_400),
            QuotaPeriod::Month => ("month", 30 * 86_400),
        };
        let name = q.name.clone().unwrap_or_else(|| word.into());
        let limit = q.limit as f64;
        Limit {
            id,
            key: q.key.clone(),
            rate: 0.0,
            burst: limit,
            batch: (limit * 0.001).clamp(1.0, MAX_BATCH).floor(),
            redis_batch: (limit * 0.01).clamp(1.0, MAX_REDIS_BATCH).floor(),
            quota: q.limit,
            window_secs: secs,
            scope: format!("{route}:{name}"),
            name,
            period: Some(q.period),
        }
    }

    /// For a quota: the current period's number and the Unix second it ends, at `unix` seconds.
    pub fn period_at(&self, unix: u64) -> Option<(u64, u64)> {
        let day = unix / 86_400;
        match self.period? {
            QuotaPeriod::Day => Some((day, (day + 1) * 86_400)),
            QuotaPeriod::Month => {
                let (y, m, _) = civil_from_days(day as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1) as u64 * 86_400;
                Some(((y as u64) * 12 + m as u64, end))
            }
        }
    }
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day number (days since 1970-01-01) of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A host's bucket for one (limit, key).
#[derive(Debug)]
struct Bucket {
    /// The local token bucket: the limit itself with `backend = "local"`, the fallback while
    /// Redis is down with `on_failure = "local"`.
    tokens: f64,
    last: Instant,
    /// With Redis: tokens Redis granted to this host and not yet leased to a worker.
    stock: f64,
    stock_at: Instant,
    /// A demand is queued or in flight.
    pending: bool,
    /// Redis answered at least once.
    known: bool,
    /// Whole tokens left in Redis at the last answer.
    left: i64,
    /// Redis had nothing to give: no new demand before this instant.
    next_ask: Instant,
}

impl Bucket {
    fn new(l: &Limit, now: Instant) -> Bucket {
        Bucket {
            tokens: l.burst,
            last: now,
            stock: 0.0,
            stock_at: now,
            pending: false,
            known: false,
            left: 0,
            next_ask: now,
        }
    }

    fn refill(&mut self, l: &Limit, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * l.rate).min(l.burst);
        self.last = now;
    }

    /// Takes up to `l.batch` tokens from the local bucket, `give_back` returned first.
    fn local_lease(&mut self, l: &Limit, now: Instant, give_back: f64) -> HostLease {
        self.refill(l, now);
        self.tokens = (self.tokens + give_back).min(l.burst);
        let granted = self.tokens.min(l.batch).floor();
        self.tokens -= granted;
        HostLease::Granted {
            tokens: granted,
            left: self.tokens,
        }
    }
}

type HostMap = quick_cache::sync::Cache<(u32, u64), Arc<Mutex<Bucket>>>;
type InFlightMap = quick_cache::sync::Cache<(u32, u64), Arc<AtomicU32>>;

/// The buckets and in-flight counters shared by every worker.
pub struct HostBuckets {
    map: HostMap,
    in_flight: InFlightMap,
    redis: Option<Arc<RedisLink>>,
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

/// What a host answers a worker asking for tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HostLease {
    /// `tokens` granted (maybe 0); `left` is an estimate of what remains for the key.
    Granted { tokens: f64, left: f64 },
    /// Redis has been asked and has not answered yet.
    Wait,
    /// Redis is down and the policy is to fail closed.
    Unavailable,
}

impl HostBuckets {
    pub fn new(cfg: &Config) -> Arc<HostBuckets> {
        let redis = match (&cfg.rate_limiting.backend, &cfg.rate_limiting.redis) {
            (RateBackend::Redis, Some(r)) => Some(RedisLink::new(r.clone())),
            _ => None,
        };
        Arc::new(HostBuckets {
            map: HostMap::new(cfg.rate_limiting.max_keys),
            in_flight: InFlightMap::new(cfg.rate_limiting.max_keys),
            redis,
        })
    }

    /// The Redis link, with `backend = "redis"`.
    pub fn redis(&self) -> Option<&Arc<RedisLink>> {
        self.redis.as_ref()
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
                Ok::<_, ()>(Arc::new(Mutex::new(Bucket::new(l, now))))
            })
            .expect("infallible")
    }

    /// Returns unused tokens and takes up to `l.batch` new ones. `local` forces the local
    /// bucket (a request that waited for Redis too long, with `on_failure = "local"`).
    /// `period` is a quota's current (period number, end as a Unix second).
    fn lease(
        &self,
        l: &Limit,
        key: u64,
        period: Option<(u64, u64)>,
        give_back: f64,
        now: Instant,
        local: bool,
    ) -> HostLease {
        let cell = self.bucket(l, key, now);
        let mut b = cell.lock().unwrap_or_else(|e| e.into_inner());
        let link = match &self.redis {
            Some(r) if !local && !r.is_down() => r,
            Some(r) if r.config().on_failure == RedisFailure::Deny => {
                b.stock += give_back;
                return HostLease::Unavailable;
            }
            _ => return b.local_lease(l, now, give_back),
        };
        b.stock += give_back;
        let mut back = 0.0;
        let ask = !b.pending && now >= b.next_ask;
        if ask && b.stock >= 1.0 && now.saturating_duration_since(b.stock_at) > HOST_STOCK_TTL {
            // An old stock goes back to Redis (another host may need it) with the next demand.
            back = b.stock;
            b.stock = 0.0;
        }
        let granted = b.stock.min(l.batch).floor();
        b.stock -= granted;
        let demand = if ask && b.stock < (l.redis_batch / 2.0).max(1.0) {
            b.pending = true;
            let want = (l.redis_batch - b.stock).ceil().max(1.0) as u32;
            let cell = cell.clone();
            let rate = l.rate;
            // What a bucket (or a quota) holds at most: Redis's count of what is left, which
            // the RateLimit header's `r` shows, is never taken as more (a hostile or broken
            // server said 99 999 999 999 of a limit of 10).
            let most = l.burst.floor().min(i64::MAX as f64) as i64;
            let prefix = &link.config().key_prefix;
            let (key, call) = match period {
                None => (
                    format!("{prefix}rl:{}:{key:016x}", l.scope),
                    Call::TokenBucket {
                        rate: l.rate,
                        burst: l.burst,
                    },
                ),
                // The period is in the name too: a new period is a new counter.
                Some((n, end)) => (
                    format!("{prefix}q:{}:{n}:{key:016x}", l.scope),
                    Call::Quota {
                        limit: l.burst,
                        expire_at: end + 3_600,
                    },
                ),
            };
            Some(Demand {
                key,
                call,
                want,
                back,
                done: Box::new(move |answer| {
                    let mut b = cell.lock().unwrap_or_else(|e| e.into_inner());
                    b.pending = false;
                    if let Some((got, left)) = answer {
                        let now = Instant::now();
                        b.known = true;
                        b.left = left.min(most);
                        if got > 0 {
                            b.stock += got as f64;
                            b.stock_at = now;
                        }
                        if got < want {
                            // Redis ran dry (other hosts take tokens too): ask again once it
                            // could have refilled what was missing, not at every request (a
                            // spent quota: once a second).
                            let secs = if rate > 0.0 {
                                ((want - got) as f64 / rate).clamp(0.001, 1.0)
                            } else {
                                1.0
                            };
                            b.next_ask = now + Duration::from_secs_f64(secs);
                        }
                    }
                }),
            })
        } else {
            None
        };
        let answer = if granted >= 1.0 {
            HostLease::Granted {
                tokens: granted,
                left: b.stock + b.left.max(0) as f64,
            }
        } else if b.pending && (!b.known || b.left >= 1) {
            HostLease::Wait
        } else {
            HostLease::Granted {
                tokens: 0.0,
                left: b.left.max(0) as f64,
            }
        };
        if let Some(d) = demand {
            // Submitted with the bucket still locked, so that no other worker sees the key
            // pending unless its demand is queued: one that did would wait on an answer that
            // never comes, until the Redis timeout. (The Redis thread takes the bucket's lock
            // only to answer, never while it holds the queue's.)
            if let Err(d) = link.submit(d) {
                // The link's queue is full (Redis slower than the demands, see
                // `redis::MAX_QUEUED_DEMANDS`): as when Redis is slow, `on_failure` decides for a
                // request that would wait; the key's next request asks again.
                b.pending = false;
                b.stock += d.back;
                if answer == HostLease::Wait {
                    return match link.config().on_failure {
                        RedisFailure::Deny => HostLease::Unavailable,
                        RedisFailure::Local => b.local_lease(l, now, 0.0),
                    };
                }
            }
        }
        answer
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
    /// Admitted; `remaining` is an estimate for the RateLimit header, of the tightest limit,
    /// at most its `quota`.
    Allow {
        limit: usize,
        remaining: u64,
        reset_secs: u64,
    },
    /// Refused by limit `limit`; retry after this many seconds.
    Deny { limit: usize, retry_after: u64 },
    /// Redis was asked for this key's first tokens: check again shortly.
    Wait,
    /// Redis is down and limits fail closed.
    Unavailable,
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
    /// `local` forces the local buckets (see [`HostBuckets`]).
    pub fn check(&self, limits: &[Limit], keys: &[u64], now: Instant, local: bool) -> Verdict {
        let mut best = Verdict::Allow {
            limit: 0,
            remaining: u64::MAX,
            reset_secs: 0,
        };
        let mut leases = self.leases.borrow_mut();
        let mut unix = 0;
        // The (limit, key) cells this request took a token from.
        let mut taken = [(0u32, 0u64); crate::config::MAX_RATE_LIMITS_PER_ROUTE];
        for (i, (l, &key)) in limits.iter().zip(keys).enumerate() {
            // A quota counts in a new bucket each period.
            let period = match l.period {
                None => None,
                Some(_) => {
                    if unix == 0 {
                        unix = unix_now();
                    }
                    l.period_at(unix)
                }
            };
            let key = match period {
                Some((n, _)) => crate::upstream::balance::mix(key ^ n.wrapping_mul(0x9e37_79b9)),
                None => key,
            };
            let k = (l.id, key);
            let mut ls = leases.get(&k).copied().unwrap_or(Lease {
                tokens: 0.0,
                expires: now,
                host_left: 0.0,
            });
            if ls.tokens < 1.0 || ls.expires <= now {
                // An expired lease goes back to the host before a new one is taken.
                let expired = ls.expires <= now;
                let give_back = if expired { ls.tokens } else { 0.0 };
                if expired {
                    ls.tokens = 0.0;
                }
                match self.host.lease(l, key, period, give_back, now, local) {
                    HostLease::Granted { tokens, left } => {
                        ls = Lease {
                            tokens: ls.tokens + tokens,
                            expires: now + LEASE_TTL,
                            host_left: left,
                        };
                    }
                    other => {
                        leases.insert(k, ls);
                        // The limits before this one took a token for a request that is not
                        // decided yet: give them back.
                        for cell in &taken[..i] {
                            if let Some(mut p) = leases.get_mut(cell) {
                                p.tokens += 1.0;
                            }
                        }
                        return if other == HostLease::Wait {
                            Verdict::Wait
                        } else {
                            Verdict::Unavailable
                        };
                    }
                }
            }
            if ls.tokens < 1.0 {
                leases.insert(k, ls);
                let wait = match period {
                    Some((_, end)) => end.saturating_sub(unix) as f64,
                    None => (1.0 - (ls.tokens + ls.host_left).max(0.0)) / l.rate,
                };
                return Verdict::Deny {
                    limit: i,
                    retry_after: wait.ceil().max(1.0) as u64,
                };
            }
            ls.tokens -= 1.0;
            leases.insert(k, ls);
            taken[i] = k;
            // The RateLimit header's `r` is what is left of the quota `q` that
            // RateLimit-Policy names (draft-ietf-httpapi-ratelimit-headers), so never more:
            // a bucket with `burst` over `rate` holds more tokens than `q`.
            let remaining =
                ((ls.tokens + ls.host_left).floor().max(0.0) as u64).min(u64::from(l.quota));
            if let Verdict::Allow { remaining: r, .. } = best {
                if remaining < r {
                    let reset = match period {
                        Some((_, end)) => end.saturating_sub(unix),
                        None => ((l.burst - (ls.tokens + ls.host_left)) / l.rate)
                            .ceil()
                            .max(0.0) as u64,
                    };
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
            "r",
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
            redis: None,
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
            .filter(|_| matches!(w.check(&l, &[1], t0, false), Verdict::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "the burst");
        let later = t0 + Duration::from_millis(500);
        let allowed = (0..20)
            .filter(|_| matches!(w.check(&l, &[1], later, false), Verdict::Allow { .. }))
            .count();
        assert_eq!(allowed, 5, "half a second at 10/s");
        // Another key has its own bucket.
        assert!(matches!(
            w.check(&l, &[2], later, false),
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn workers_share_one_host_bucket() {
        let h = host();
        let workers: Vec<Limiter> = (0..4).map(|_| Limiter::new(h.clone(), 100)).collect();
        let l = [limit(1000, 1000)];
        let t0 = Instant::now();
        let mut allowed = 0;
        for i in 0..4000 {
            if matches!(
                workers[i % 4].check(&l, &[7], t0, false),
                Verdict::Allow { .. }
            ) {
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
        assert!(matches!(
            a.check(&l, &[1], t0, false),
            Verdict::Allow { .. }
        ));
        // `a` holds 9 leased tokens; `b` can take the other 10 at once.
        let got_b = (0..20)
            .filter(|_| matches!(b.check(&l, &[1], t0, false), Verdict::Allow { .. }))
            .count();
        assert_eq!(got_b, 10);
        // After the TTL, `a`'s nine come back to the host for `b`... once `a` returns them.
        let t1 = t0 + LEASE_TTL + Duration::from_millis(1);
        assert!(matches!(
            a.check(&l, &[1], t1, false),
            Verdict::Allow { .. }
        ));
    }

    #[test]
    fn quota_periods_follow_the_utc_calendar() {
        let q = |period| {
            Limit::quota(
                0,
                "r",
                &QuotaConfig {
                    name: None,
                    key: RateKey::ClientIp,
                    limit: 10,
                    period,
                },
            )
        };
        let (day, month) = (q(QuotaPeriod::Day), q(QuotaPeriod::Month));
        // 2026-11-26T06:00:00Z
        let t = 1_795_672_800;
        assert_eq!(day.period_at(t), Some((20_783, 1_795_737_600))); // 2026-11-27T00:00Z
        assert_eq!(month.period_at(t).unwrap().1, 1_796_083_200); // 2026-12-01T00:00Z
                                                                  // December rolls over into January of the next year.
        assert_eq!(month.period_at(1_796_083_200).unwrap().1, 1_798_761_600);
        // February of a leap year has 29 days: 2028-02-10 ends on 2028-03-01.
        assert_eq!(month.period_at(1_833_753_600).unwrap().1, 1_835_481_600);
        assert_ne!(
            month.period_at(t).unwrap().0,
            month.period_at(1_796_083_200).unwrap().0
        );
        for d in [-719_468i64, -1, 0, 59, 365, 11_016, 20_783, 100_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d, "day {d}");
        }
    }

    #[test]
    fn a_local_quota_does_not_refill() {
        let h = host();
        let w = Limiter::new(h, 100);
        let l = [Limit::quota(
            0,
            "r",
            &QuotaConfig {
                name: None,
                key: RateKey::ClientIp,
                limit: 3,
                period: QuotaPeriod::Day,
            },
        )];
        let t0 = Instant::now();
        let mut v = Vec::new();
        for s in [0, 1, 2, 3, 60] {
            v.push(w.check(&l, &[1], t0 + Duration::from_secs(s), false));
        }
        assert!(v[..3].iter().all(|v| matches!(v, Verdict::Allow { .. })));
        for d in &v[3..] {
            match d {
                Verdict::Deny { retry_after, .. } => assert!((1..=86_400).contains(retry_after)),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A Redis that stalls while new keys keep coming: the link queues at most
    /// `MAX_QUEUED_DEMANDS` demands (one per new key), and a request past that gets at once
    /// what `on_failure` gives while Redis is slow: refused (503) with `deny`, the host's
    /// local bucket with `local`. The refused demand is counted, and the key is not left
    /// waiting on it: its next request asks again. Before, every new key's demand was queued
    /// for as long as the stall lasted.
    #[test]
    fn a_stalled_redis_queues_a_bounded_number_of_demands() {
        for policy in ["deny", "local"] {
            let q = StalledQueue::full(policy);
            let (h, link, l, t0) = (&q.h, &q.link, &q.l, q.t0);
            let refused = |n: u64| {
                let lease = h.lease(l, u64::MAX, None, 0.0, t0, false);
                match policy {
                    "deny" => assert_eq!(lease, HostLease::Unavailable),
                    _ => assert!(
                        matches!(lease, HostLease::Granted { tokens, .. } if tokens >= 1.0),
                        "{lease:?}"
                    ),
                }
                assert_eq!(link.demands_refused.load(Ordering::Relaxed), n);
            };
            refused(1);
            refused(2);
        }
    }

    /// A limiter link to a Redis over a real socket that reads the link's first command
    /// (loading its script) and never answers, and host buckets whose demand queue it fills to
    /// the cap: keys 0 to `MAX_QUEUED_DEMANDS` of `l` each wait on a demand. Dropping it stops
    /// the link and the server.
    struct StalledQueue {
        h: HostBuckets,
        link: Arc<RedisLink>,
        l: Limit,
        t0: Instant,
        stop: Arc<std::sync::atomic::AtomicBool>,
        done: std::sync::mpsc::Sender<()>,
        server: Option<std::thread::JoinHandle<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl StalledQueue {
        fn full(on_failure: &str) -> StalledQueue {
            use crate::redis::MAX_QUEUED_DEMANDS;
            use std::io::Read as _;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
            let (done, wait) = std::sync::mpsc::channel::<()>();
            let server = std::thread::spawn(move || {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut b = [0u8; 256];
                let _ = s.read(&mut b);
                let _ = seen_tx.send(());
                let _ = wait.recv();
            });
            let cfg: crate::config::RedisConfig = toml::from_str(&format!(
                "address = \"{addr}\"\ntimeout = \"30s\"\non_failure = \"{on_failure}\"\n"
            ))
            .expect("config");
            let link = RedisLink::new(cfg);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let thread = crate::redis::spawn(link.clone(), stop.clone()).expect("thread");
            let h = HostBuckets {
                map: HostMap::new(2 * MAX_QUEUED_DEMANDS),
                in_flight: InFlightMap::new(10),
                redis: Some(link.clone()),
            };
            let l = limit(10, 10);
            let t0 = Instant::now();
            // The first key's demand wakes the link, which connects and waits on Redis.
            assert_eq!(h.lease(&l, 0, None, 0.0, t0, false), HostLease::Wait);
            seen.recv_timeout(Duration::from_secs(10))
                .expect("the link reaches the server");
            for k in 1..=MAX_QUEUED_DEMANDS as u64 {
                let lease = h.lease(&l, k, None, 0.0, t0, false);
                assert_eq!(lease, HostLease::Wait, "key {k} ({on_failure})");
            }
            StalledQueue {
                h,
                link,
                l,
                t0,
                stop,
                done,
                server: Some(server),
                thread: Some(thread),
            }
        }
    }

    impl Drop for StalledQueue {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.done.send(());
            let _ = self.server.take().map(|t| t.join());
            let _ = self.thread.take().map(|t| t.join());
        }
    }

    /// A demand the full queue refuses must not leave its key marked pending: a request on
    /// another worker that saw the mark would wait for an answer that never comes, until the
    /// Redis timeout. Here the queue is full (a Redis over a real socket that never answers),
    /// worker A's demand for a new key is held inside `submit` (the test holds the queue's
    /// lock), and worker B asks for the same key meanwhile: it must get what `on_failure`
    /// gives at once (503 with `deny`), as A does, not a wait. Before, A marked the key
    /// pending and unlocked its bucket before submitting, so B saw the mark and waited.
    #[test]
    fn a_refused_demand_never_leaves_its_key_pending_for_another_worker() {
        let q = StalledQueue::full("deny");
        let (h, link, l, t0) = (&q.h, &q.link, &q.l, q.t0);
        const KEY: u64 = u64::MAX;
        let (b_tx, b_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let queue = link.hold_queue();
            let a = s.spawn(|| h.lease(l, KEY, None, 0.0, t0, false));
            // A is inside `submit` once its bucket is locked, or marked pending and unlocked.
            let mut tries = 0u32;
            loop {
                let cell = h.map.get(&(l.id, KEY));
                let at_submit = cell.is_some_and(|c| match c.try_lock() {
                    Ok(b) => b.pending,
                    Err(std::sync::TryLockError::WouldBlock) => true,
                    Err(std::sync::TryLockError::Poisoned(_)) => false,
                });
                if at_submit {
                    break;
                }
                tries += 1;
                assert!(tries < 10_000_000, "worker A never reached submit");
                std::thread::yield_now();
            }
            let b = s.spawn(move || {
                let _ = b_tx.send(h.lease(l, KEY, None, 0.0, t0, false));
            });
            // B answers at once where it can; otherwise it waits on A's bucket, and the queue
            // is let go after a moment (either way B must not be told to wait).
            let early = b_rx.recv_timeout(Duration::from_millis(200)).ok();
            drop(queue);
            let a = a.join().expect("worker A");
            b.join().expect("worker B");
            let b = early.unwrap_or_else(|| b_rx.recv().expect("worker B answers"));
            assert_eq!(a, HostLease::Unavailable, "worker A: the queue is full");
            assert_eq!(
                b,
                HostLease::Unavailable,
                "worker B: no demand is in flight for the key, so it must not wait"
            );
        });
        let cell = h.map.get(&(l.id, KEY)).expect("bucket");
        assert!(!cell.lock().expect("bucket").pending, "left pending");
    }

    #[test]
    fn memory_is_bounded() {
        let h = host();
        let w = Limiter::new(h.clone(), 1000);
        let l = [limit(10, 10)];
        let t0 = Instant::now();
        for k in 0..100_000u64 {
            w.check(&l, &[k], t0, false);
        }
        assert!(h.map.len() <= 1100, "host map holds {}", h.map.len());
        assert!(w.leases.borrow().len() <= 1100);
    }
}
