//! Endpoint choice. Each worker keeps its own balancer state; what is routable (health checks,
//! outlier ejections) comes from the shared health hub, synced into each worker.
//!
//! - round robin / smooth weighted round robin (nginx's algorithm);
//! - least request: fewest requests in flight on this worker, divided by weight;
//! - peak EWMA: two random candidates, the lower `latency × (in flight + 1) / weight` wins;
//!   latency is a peak-sensitive moving average (a slower sample replaces it at once, faster
//!   ones pull it down with a 10 s time constant);
//! - consistent hashing: a Maglev lookup table (65,537 slots); removing one of N endpoints moves
//!   about 1/N of the keys, and keys of an unroutable endpoint walk to the next slots.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Maglev table size: a prime well above 100 × the endpoints of any sane group.
pub const MAGLEV_SIZE: usize = 65_537;
/// Time constant of the peak-EWMA latency decay.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

/// 64-bit FNV-1a with a final avalanche, stable across runs and builds.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

#[inline]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Builds a Maglev lookup table over endpoint names (the paper's population algorithm).
pub fn maglev_table(names: &[&[u8]], size: usize) -> Vec<u16> {
    let n = names.len();
    assert!(n > 0 && n < u16::MAX as usize, "1..65535 endpoints");
    let perms: Vec<(usize, usize)> = names
        .iter()
        .map(|name| {
            let offset = (hash_bytes(name) % size as u64) as usize;
            let skip =
                (mix(hash_bytes(name) ^ 0x9e37_79b9_7f4a_7c15) % (size as u64 - 1)) as usize + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![u16::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % size;
            while table[c] != u16::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % size;
            }
            table[c] = i as u16;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// Per-worker view of one endpoint, as the balancer sees it.
#[derive(Debug)]
pub struct EndpointStats {
    /// Not ejected and not failing active health checks.
    pub routable: Cell<bool>,
    /// Requests in flight on this worker.
    pub outstanding: Cell<u32>,
    /// Peak-EWMA latency in nanoseconds (0: no sample yet).
    ewma_ns: Cell<f64>,
    ewma_at: Cell<Instant>,
    /// Consecutive failures seen by this worker (outlier detection).
    pub failures: Cell<u32>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            routable: Cell::new(true),
            outstanding: Cell::new(0),
            ewma_ns: Cell::new(0.0),
            ewma_at: Cell::new(Instant::now()),
            failures: Cell::new(0),
        }
    }
}

impl EndpointStats {
    pub fn observe_latency(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let prev = self.ewma_ns.get();
        let next = if prev == 0.0 || sample > prev {
            sample
        } else {
            let dt = now
                .saturating_duration_since(self.ewma_at.get())
                .as_secs_f64();
            let w = (-dt / EWMA_DECAY.as_secs_f64()).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.set(next);
        self.ewma_at.set(now);
    }

    pub fn latency_ns(&self) -> f64 {
        self.ewma_ns.get()
    }
}

pub enum Algorithm {
    RoundRobin {
        next: Cell<usize>,
    },
    /// Smooth weighted round robin: each pick adds every weight to its endpoint's current
    /// value, takes the largest and subtracts the total from it.
    Weighted {
        current: Vec<Cell<i64>>,
    },
    LeastRequest {
        next: Cell<usize>,
    },
    PeakEwma {
        rng: Cell<u64>,
    },
    Maglev {
        table: Vec<u16>,
    },
}

/// The endpoints a pick may use: routable, and not already tried by this request when another
/// choice exists.
struct Eligible<'a> {
    stats: &'a [EndpointStats],
    tried: &'a [usize],
    /// Whether any routable endpoint was not tried yet.
    fresh_exists: bool,
}

impl Eligible<'_> {
    fn new<'a>(stats: &'a [EndpointStats], tried: &'a [usize]) -> Eligible<'a> {
        let fresh_exists = stats
            .iter()
            .enumerate()
            .any(|(i, s)| s.routable.get() && !tried.contains(&i));
        Eligible {
            stats,
            tried,
            fresh_exists,
        }
    }

    #[inline]
    fn ok(&self, i: usize) -> bool {
        self.stats[i].routable.get() && !(self.fresh_exists && self.tried.contains(&i))
    }

    fn any(&self) -> bool {
        self.stats.iter().any(|s| s.routable.get())
    }
}

impl Algorithm {
    /// Picks an endpoint; `None` when no endpoint is routable.
    pub fn pick(
        &self,
        stats: &[EndpointStats],
        weights: &[u32],
        hash: Option<u64>,
        tried: &[usize],
    ) -> Option<usize> {
        let n = stats.len();
        let el = Eligible::new(stats, tried);
        if !el.any() {
            return None;
        }
        match self {
            Algorithm::RoundRobin { next } => {
                let start = next.get();
                for k in 0..n {
                    let i = (start + k) % n;
                    if el.ok(i) {
                        next.set((i + 1) % n);
                        return Some(i);
                    }
                }
                None
            }
            Algorithm::Weighted { current } => {
                let mut best: Option<usize> = None;
                let mut total = 0i64;
                for i in 0..n {
                    if !el.ok(i) {
                        continue;
                    }
                    let w = weights[i] as i64;
                    total += w;
                    current[i].set(current[i].get() + w);
                    if best.is_none_or(|b| current[i].get() > current[b].get()) {
                        best = Some(i);
                    }
                }
                let b = best?;
                current[b].set(current[b].get() - total);
                Some(b)
            }
            Algorithm::LeastRequest { next } => {
                let start = next.get();
                next.set((start + 1) % n);
                // Fewest (in flight + 1) / weight, compared by cross-multiplying.
                let mut best: Option<(u64, u64, usize)> = None;
                for k in 0..n {
                    let i = if start + k >= n {
                        start + k - n
                    } else {
                        start + k
                    };
                    if !el.ok(i) {
                        continue;
                    }
                    let load = stats[i].outstanding.get() as u64 + 1;
                    let w = weights[i] as u64;
                    if best.is_none_or(|(bl, bw, _)| load * bw < bl * w) {
                        best = Some((load, w, i));
                    }
                }
                best.map(|(_, _, i)| i)
            }
            Algorithm::PeakEwma { rng } => {
                let eligible: u32 = (0..n).filter(|&i| el.ok(i)).count() as u32;
                let nth = |k: u32| (0..n).filter(|&i| el.ok(i)).nth(k as usize);
                if eligible == 1 {
                    return nth(0);
                }
                let r = next_rand(rng);
                let a = (r % eligible as u64) as u32;
                let mut b = ((r >> 32) % (eligible as u64 - 1)) as u32;
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (nth(a)?, nth(b)?);
                let cost = |i: usize| {
                    let s = &stats[i];
                    // No sample yet: cheap, so that new endpoints get traffic and a sample.
                    s.latency_ns() * (s.outstanding.get() as f64 + 1.0) / weights[i] as f64
                };
                Some(if cost(ib) < cost(ia) { ib } else { ia })
            }
            Algorithm::Maglev { table } => {
                let h = hash.unwrap_or(0);
                let size = table.len();
                let start = (h % size as u64) as usize;
                // Walk on from the key's slot: keys of an unroutable endpoint spread over the
                // others, and keys of routable endpoints do not move.
                (0..size.min(4096))
                    .map(|k| table[(start + k) % size] as usize)
                    .find(|&i| el.ok(i))
                    .or_else(|| (0..n).find(|&i| el.ok(i)))
            }
        }
    }
}

#[inline]
pub fn next_rand(state: &Cell<u64>) -> u64 {
    // xorshift64*
    let mut x = state.get();
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    state.set(x);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(n: usize) -> Vec<EndpointStats> {
        (0..n).map(|_| EndpointStats::default()).collect()
    }

    #[test]
    fn maglev_moves_about_one_nth_of_keys() {
        let names: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:80")).collect();
        let refs: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
        let full = maglev_table(&refs, MAGLEV_SIZE);
        let fewer = maglev_table(&refs[..4], MAGLEV_SIZE);
        let keys = 100_000u64;
        let mut moved = 0;
        let mut moved_from_kept = 0;
        for k in 0..keys {
            let h = mix(k);
            let a = full[(h % MAGLEV_SIZE as u64) as usize];
            let b = fewer[(h % MAGLEV_SIZE as u64) as usize];
            if a != b {
                moved += 1;
                if a != 4 {
                    moved_from_kept += 1;
                }
            }
        }
        let frac = moved as f64 / keys as f64;
        assert!((0.17..0.25).contains(&frac), "moved {frac}");
        assert!(
            (moved_from_kept as f64 / keys as f64) < 0.03,
            "kept endpoints lost {moved_from_kept} keys"
        );
        // Balance: each endpoint owns about a fifth of the table.
        for i in 0..5u16 {
            let share = full.iter().filter(|&&x| x == i).count() as f64 / MAGLEV_SIZE as f64;
            assert!((0.19..0.21).contains(&share), "endpoint {i}: {share}");
        }
    }

    #[test]
    fn unroutable_endpoints_are_skipped_and_tried_avoided() {
        let s = stats(3);
        let w = [1, 1, 1];
        let rr = Algorithm::RoundRobin { next: Cell::new(0) };
        s[1].routable.set(false);
        let picks: Vec<usize> = (0..4)
            .map(|_| rr.pick(&s, &w, None, &[]).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(rr.pick(&s, &w, None, &[0]), Some(2));
        // Everything tried: a routable endpoint is still chosen.
        assert!(rr.pick(&s, &w, None, &[0, 2]).is_some());
        for x in &s {
            x.routable.set(false);
        }
        assert_eq!(rr.pick(&s, &w, None, &[]), None);
    }

    #[test]
    fn least_request_prefers_idle() {
        let s = stats(3);
        s[0].outstanding.set(5);
        s[1].outstanding.set(1);
        s[2].outstanding.set(3);
        let lr = Algorithm::LeastRequest { next: Cell::new(0) };
        assert_eq!(lr.pick(&s, &[1, 1, 1], None, &[]), Some(1));
        // Weight 4 on endpoint 2: 4 in flight over weight 4 beats 2 over weight 1.
        s[1].outstanding.set(2);
        assert_eq!(lr.pick(&s, &[1, 1, 4], None, &[]), Some(2));
    }

    #[test]
    fn peak_ewma_prefers_fast() {
        let s = stats(2);
        let now = Instant::now();
        s[0].observe_latency(Duration::from_millis(50), now);
        s[1].observe_latency(Duration::from_millis(1), now);
        let pe = Algorithm::PeakEwma {
            rng: Cell::new(0x1234_5678),
        };
        let fast = (0..100)
            .filter(|_| pe.pick(&s, &[1, 1], None, &[]) == Some(1))
            .count();
        assert_eq!(fast, 100);
        // Peak: one slow sample takes over at once; fast samples decay it slowly.
        s[1].observe_latency(Duration::from_millis(80), now);
        assert!(s[1].latency_ns() >= 80e6);
        s[1].observe_latency(Duration::from_millis(1), now + Duration::from_secs(10));
        assert!(s[1].latency_ns() < 40e6);
    }

    #[test]
    fn smooth_weighted_skips_unroutable() {
        let s = stats(3);
        let wrr = Algorithm::Weighted {
            current: (0..3).map(|_| Cell::new(0)).collect(),
        };
        let w = [5, 1, 1];
        let picks: Vec<usize> = (0..7)
            .map(|_| wrr.pick(&s, &w, None, &[]).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        s[0].routable.set(false);
        let picks: Vec<usize> = (0..4)
            .map(|_| wrr.pick(&s, &w, None, &[]).unwrap())
            .collect();
        assert!(!picks.contains(&0));
    }
}
