//! Circuit breaker of an upstream group, per worker: concurrency limits and an error-rate
//! breaker (closed → open → half-open with probe requests → closed).
//!
//! Limits count per worker: with N workers, a gateway admits up to N × `max_requests`.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;
use crate::window::Rolling;

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, passed: u32 },
}

/// Whether an admitted request is a half-open probe, and of which half-open period: a probe's
/// verdict counts only in the period that admitted it. (A probe still in flight when another
/// probe's failure reopened the breaker must not close it in the next period, nor free a probe
/// slot there: `half_open_probes` successes of that period's own probes close it.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe(u32);

impl Probe {
    /// Not a probe (the breaker was closed).
    pub const NONE: Probe = Probe(0);

    pub fn is_probe(self) -> bool {
        self != Probe::NONE
    }
}

/// The breaker's answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead; `probe` says whether it is a half-open probe.
    Yes { probe: Probe },
    /// The breaker is open: retry after this long.
    Open(Duration),
    /// `max_requests` are already in flight.
    Busy,
}

pub struct Breaker {
    pub max_connections: Option<u32>,
    pub max_pending: u32,
    max_requests: Option<u32>,
    error_rate: Option<f64>,
    min_requests: u32,
    open_for: Duration,
    probes: u32,
    state: Cell<State>,
    /// Half-open periods begun (never 0 once one has: it names the period of a [`Probe`]).
    period: Cell<u32>,
    /// (successes, failures) over the window.
    window: Rolling,
    pub in_flight: Cell<u32>,
    /// Requests waiting for a connection under `max_connections`.
    pub pending: Cell<u32>,
    /// State changes on this worker, by the state entered ([`STATE_NAMES`] order), for the
    /// metrics.
    pub transitions: [Cell<u64>; 3],
}

/// The breaker's states as the metrics name them, in [`Breaker::state_index`] order.
pub const STATE_NAMES: [&str; 3] = ["closed", "open", "half_open"];

impl Breaker {
    pub fn new(c: &BreakerConfig) -> Breaker {
        Breaker {
            max_connections: c.max_connections,
            max_pending: c.max_pending.unwrap_or(0),
            max_requests: c.max_requests,
            error_rate: c.error_rate,
            min_requests: c.min_requests,
            open_for: c.open_for.0,
            probes: c.half_open_probes,
            state: Cell::new(State::Closed),
            period: Cell::new(0),
            window: Rolling::new(c.window.0),
            in_flight: Cell::new(0),
            pending: Cell::new(0),
            transitions: Default::default(),
        }
    }

    /// The current state as an index of [`STATE_NAMES`].
    pub fn state_index(&self) -> usize {
        match self.state.get() {
            State::Closed => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }

    /// Enters `next`, counting a change of state.
    fn enter(&self, next: State) {
        let before = self.state_index();
        self.state.set(next);
        let after = self.state_index();
        if before != after {
            let c = &self.transitions[after];
            c.set(c.get().saturating_add(1));
        }
    }

    /// The state's name (for the admin API): "closed", "open" or "half_open". An open
    /// breaker whose time is up reads "open" until the next request probes it.
    pub fn state_name(&self) -> &'static str {
        match self.state.get() {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }

    /// Admits a request or says why not. An admitted request must be ended with [`done`].
    ///
    /// [`done`]: Breaker::done
    pub fn admit(&self, now: Instant) -> Admit {
        let probe = match self.state.get() {
            State::Closed => false,
            State::Open { until } => {
                if now < until {
                    return Admit::Open(until - now);
                }
                self.enter(State::HalfOpen {
                    in_flight: 0,
                    passed: 0,
                });
                self.period.set(self.period.get().wrapping_add(1).max(1));
                true
            }
            State::HalfOpen { .. } => true,
        };
        let half_open = match self.state.get() {
            State::HalfOpen { in_flight, passed } if probe => {
                if in_flight + passed >= self.probes {
                    // Enough probes are out: the rest wait for their verdict.
                    return Admit::Open(Duration::from_secs(1));
                }
                Some((in_flight, passed))
            }
            _ => None,
        };
        if let Some(max) = self.max_requests {
            if self.in_flight.get() >= max {
                return Admit::Busy;
            }
        }
        if let Some((in_flight, passed)) = half_open {
            self.state.set(State::HalfOpen {
                in_flight: in_flight + 1,
                passed,
            });
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Admit::Yes {
            probe: if probe {
                Probe(self.period.get())
            } else {
                Probe::NONE
            },
        }
    }

    /// The half-open state, when `probe` is a probe of the current half-open period.
    fn probe_period(&self, probe: Probe) -> Option<(u32, u32)> {
        match self.state.get() {
            State::HalfOpen { in_flight, passed } if probe == Probe(self.period.get()) => {
                Some((in_flight, passed))
            }
            _ => None,
        }
    }

    /// Records the outcome of an admitted request.
    pub fn done(&self, probe: Probe, success: bool, now: Instant) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        if probe.is_probe() {
            // A probe of an earlier period has no say (see [`Probe`]).
            if let Some((in_flight, passed)) = self.probe_period(probe) {
                if !success {
                    self.trip(now);
                } else if passed + 1 >= self.probes {
                    self.enter(State::Closed);
                    self.window.reset();
                } else {
                    self.state.set(State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        passed: passed + 1,
                    });
                }
            }
            return;
        }
        let Some(rate) = self.error_rate else {
            return;
        };
        self.window.add(now, success as u32, (!success) as u32);
        if self.state.get() != State::Closed || success {
            return;
        }
        let (ok, failed) = self.window.totals(now);
        let total = ok + failed;
        if total >= self.min_requests as u64 && failed as f64 >= rate * total as f64 {
            self.trip(now);
        }
    }

    /// Ends an admitted request without a verdict (the client failed, not the upstream).
    pub fn cancel(&self, probe: Probe) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        if probe.is_probe() {
            if let Some((in_flight, passed)) = self.probe_period(probe) {
                self.state.set(State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    passed,
                });
            }
        }
    }

    fn trip(&self, now: Instant) {
        self.enter(State::Open {
            until: now + self.open_for,
        });
        self.window.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn breaker() -> Breaker {
        Breaker::new(&BreakerConfig {
            max_connections: None,
            max_pending: None,
            max_requests: Some(2),
            error_rate: Some(0.5),
            min_requests: 4,
            window: Dur(Duration::from_secs(10)),
            open_for: Dur(Duration::from_secs(5)),
            half_open_probes: 2,
        })
    }

    #[test]
    fn opens_on_error_rate_then_half_opens_and_closes() {
        let b = breaker();
        let t = Instant::now();
        for ok in [true, false, true] {
            assert_eq!(b.admit(t), Admit::Yes { probe: Probe::NONE });
            b.done(Probe::NONE, ok, t);
        }
        assert_eq!(b.admit(t), Admit::Yes { probe: Probe::NONE });
        b.done(Probe::NONE, false, t); // 2 of 4 failed: 50%
        assert!(matches!(b.admit(t), Admit::Open(_)));
        let later = t + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admit::Yes { probe: Probe(1) });
        assert_eq!(b.admit(later), Admit::Yes { probe: Probe(1) });
        assert!(matches!(b.admit(later), Admit::Open(_)), "only two probes");
        b.done(Probe(1), true, later);
        b.done(Probe(1), true, later);
        assert_eq!(b.admit(later), Admit::Yes { probe: Probe::NONE });
    }

    #[test]
    fn failed_probe_reopens() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..4 {
            b.admit(t);
            b.done(Probe::NONE, false, t);
        }
        let later = t + Duration::from_secs(6);
        assert_eq!(b.admit(later), Admit::Yes { probe: Probe(1) });
        b.done(Probe(1), false, later);
        assert!(matches!(b.admit(later), Admit::Open(_)));
    }

    /// A probe still out when another probe reopened the breaker has no say in the next
    /// half-open period: before, its success counted there and closed the breaker after one
    /// of that period's two probes.
    #[test]
    fn a_probe_of_an_earlier_half_open_period_has_no_say() {
        let b = breaker();
        let t = Instant::now();
        for _ in 0..4 {
            b.admit(t);
            b.done(Probe::NONE, false, t);
        }
        let p1 = t + Duration::from_secs(6);
        let slow = b.admit(p1);
        assert_eq!(slow, Admit::Yes { probe: Probe(1) });
        assert_eq!(b.admit(p1), Admit::Yes { probe: Probe(1) });
        b.done(Probe(1), false, p1);
        assert!(matches!(b.admit(p1), Admit::Open(_)), "reopened");
        let p2 = p1 + Duration::from_secs(6);
        assert_eq!(b.admit(p2), Admit::Yes { probe: Probe(2) });
        b.done(Probe(2), true, p2);
        // The first period's slow probe ends now, in the second period.
        b.done(Probe(1), true, p2);
        assert_eq!(b.state_name(), "half_open", "one of two probes passed");
        assert_eq!(b.admit(p2), Admit::Yes { probe: Probe(2) });
        assert!(matches!(b.admit(p2), Admit::Open(_)), "two probes at most");
        b.done(Probe(2), true, p2);
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn max_requests() {
        let b = breaker();
        let t = Instant::now();
        assert!(matches!(b.admit(t), Admit::Yes { .. }));
        assert!(matches!(b.admit(t), Admit::Yes { .. }));
        assert_eq!(b.admit(t), Admit::Busy);
        b.done(Probe::NONE, true, t);
        assert!(matches!(b.admit(t), Admit::Yes { .. }));
    }
}
