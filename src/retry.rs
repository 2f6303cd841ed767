//! Per-route retry policy: which failures are retried, how many tries, the backoff between
//! them, and a retry budget so that retries cannot multiply load on a failing upstream.
//!
//! The budget is per worker and per route: over the last 10 s, retries may add at most
//! `budget_percent` % on top of the route's requests, plus `min_retries_per_second` × 10 so that
//! a quiet route can still retry.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::config::RetryConfig;
use crate::upstream::balance::{mix, next_rand};
use crate::window::Rolling;

/// Why a try failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Connect refused, reset or timed out: the request never left.
    Connect,
    /// The connection failed after the request was sent, before a response head.
    Reset,
    /// No response head in time.
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
}

const CONNECT: u8 = 1;
const RESET: u8 = 2;
const TIMEOUT: u8 = 4;
const S502: u8 = 8;
const S503: u8 = 16;
const S504: u8 = 32;

const BUDGET_WINDOW: Duration = Duration::from_secs(10);

pub struct RetryPolicy {
    pub attempts: u32,
    on: u8,
    base: Duration,
    max: Duration,
    pub non_idempotent: bool,
    pub max_replay: u64,
    budget_percent: u32,
    min_per_second: u32,
    /// (requests, retries) over the budget window.
    window: Rolling,
    rng: Cell<u64>,
}

impl RetryPolicy {
    pub fn new(c: &RetryConfig, seed: u64) -> RetryPolicy {
        let on = c.on.iter().fold(0u8, |acc, s| {
            acc | match s.as_str() {
                "connect_failure" => CONNECT,
                "reset" => RESET,
                "timeout" => TIMEOUT,
                "502" => S502,
                "503" => S503,
                "504" => S504,
                _ => 0,
            }
        });
        RetryPolicy {
            attempts: c.attempts,
            on,
            base: c.backoff_base.0,
            max: c.backoff_max.0,
            non_idempotent: c.non_idempotent,
            max_replay: c.max_replay_bytes.0,
            budget_percent: c.budget_percent,
            min_per_second: c.min_retries_per_second,
            window: Rolling::new(BUDGET_WINDOW),
            rng: Cell::new(mix(seed) | 1),
        }
    }

    /// Is this failure one the route retries?
    pub fn retries_on(&self, f: Failure) -> bool {
        let bit = match f {
            Failure::Connect => CONNECT,
            Failure::Reset => RESET,
            Failure::Timeout => TIMEOUT,
            Failure::Status(502) => S502,
            Failure::Status(503) => S503,
            Failure::Status(504) => S504,
            Failure::Status(_) => 0,
        };
        self.on & bit != 0
    }

    pub fn record_request(&self, now: Instant) {
        self.window.add(now, 1, 0);
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn take_retry(&self, now: Instant) -> bool {
        let (requests, retries) = self.window.totals(now);
        let allowed = requests * self.budget_percent as u64 / 100
            + self.min_per_second as u64 * BUDGET_WINDOW.as_secs();
        if retries >= allowed {
            return false;
        }
        self.window.add(now, 0, 1);
        true
    }

    /// The longest backoff before retry number `n`: `base × 2^(n-1)`, at most `max`.
    pub fn backoff_cap(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.max)
    }

    /// Backoff before retry number `n` (1 for the first retry): full jitter over an
    /// exponentially growing cap.
    pub fn backoff(&self, n: u32) -> Duration {
        let cap = self.backoff_cap(n);
        let r = next_rand(&self.rng);
        let nanos = cap.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(r % (nanos + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, Dur};

    fn policy(budget: u32, min: u32) -> RetryPolicy {
        RetryPolicy::new(
            &RetryConfig {
                attempts: 3,
                on: vec!["connect_failure".into(), "503".into()],
                backoff_base: Dur(Duration::from_millis(10)),
                backoff_max: Dur(Duration::from_millis(40)),
                budget_percent: budget,
                min_retries_per_second: min,
                non_idempotent: false,
                max_replay_bytes: ByteSize(1024),
            },
            7,
        )
    }

    #[test]
    fn conditions() {
        let p = policy(20, 0);
        assert!(p.retries_on(Failure::Connect));
        assert!(p.retries_on(Failure::Status(503)));
        assert!(!p.retries_on(Failure::Status(502)));
        assert!(!p.retries_on(Failure::Timeout));
    }

    #[test]
    fn budget_caps_retries() {
        let p = policy(20, 0);
        let now = Instant::now();
        for _ in 0..100 {
            p.record_request(now);
        }
        let granted = (0..100).filter(|_| p.take_retry(now)).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = policy(20, 0);
        for n in 1..6 {
            let cap = Duration::from_millis(10 * (1 << (n - 1))).min(Duration::from_millis(40));
            for _ in 0..50 {
                assert!(p.backoff(n) <= cap);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..20).map(|_| p.backoff(3)).collect();
        assert!(distinct.len() > 10, "jitter");
    }
}
