//! Metrics, counted per worker in plain cells and summed when scraped.
//!
//! A worker owns a [`WorkerMetrics`]: `Cell`s only, no atomic and no lock on the request path
//! (as sozu keeps its metrics per thread). A request adds to them once, when its response is
//! done (`proxy::record::done`). A scrape ([`prom::render_prometheus`]) asks every worker for a
//! [`WorkerSample`] through the control plane (`Control::ask`), sums the samples by their
//! labels and writes the Prometheus text format.
//!
//! What is counted where:
//! - per route ([`Traffic`]): every request whose route matched (and, under the route label
//!   `(none)`, those that matched none); per upstream group: the requests that reached the
//!   upstream phase. Status classes, gateway error kinds, latency histograms (total, upstream,
//!   gateway-added), bytes in and out, retries and retry-budget refusals.
//! - per endpoint: connect failures and ejections (counters here); in-flight requests, health
//!   and idle pool size are read from the upstream group when sampled.
//! - per listener: connections accepted and open, TLS handshakes and failures.
//! - breakers count their own state changes (`upstream::breaker`); the Redis links (shared
//!   rate limits, the cache's shared layer) count their commands, round trips and failures
//!   (`redis::RedisLink`), the cache's layer its lookups and writes
//!   (`cache::redis::SharedLayer`); all are read when sampled.
//!
//! Labels are names from the worker's current configuration snapshot, read when sampled.
//! Counters are kept by route index and by group slot: a reload moves each route's counters to
//! its new index by name ([`WorkerMetrics::follow_routes`]), and keeps a kept group's slot.

pub mod prom;

use std::cell::{Cell, RefCell};

use serde::Deserialize;

use crate::error::GatewayError;

pub use prom::render_prometheus;

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Count per-request metrics (default on). Off, the request path skips them (and reads no
    /// clock for them); gauges read when scraped are still exposed.
    #[serde(default = "d_true")]
    pub enabled: bool,
}

fn d_true() -> bool {
    true
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// Every gateway error kind, as `GatewayError::code` names it: the `kind` label.
pub const ERROR_KINDS: [&str; 31] = [
    "uri_too_long",
    "header_too_large",
    "not_implemented",
    "expectation_failed",
    "version_not_supported",
    "method_not_allowed",
    "bad_request",
    "no_route",
    "body_too_large",
    "request_timeout",
    "upstream_connect_failed",
    "upstream_connect_timeout",
    "upstream_timeout",
    "upstream_bad_response",
    "upstream_closed",
    "no_healthy_endpoint",
    "circuit_open",
    "upstream_overloaded",
    "rate_limited",
    "concurrency_limited",
    "rate_limit_unavailable",
    "upstream_tls_failed",
    "client_certificate_required",
    "unauthorized",
    "invalid_token",
    "insufficient_scope",
    // A failed composition (`crate::compose`): its own JSON answer, not a `GatewayError`.
    "compose_call_failed",
    "compose_call_timeout",
    "compose_conflict",
    "compose_too_large",
    "auth_unavailable",
];
pub const N_ERROR_KINDS: usize = ERROR_KINDS.len();

/// The kinds that are rate-limit refusals (`ringway_route_rate_limit_refusals_total`).
pub const RATE_LIMIT_KINDS: [&str; 3] = [
    "rate_limited",
    "concurrency_limited",
    "rate_limit_unavailable",
];
/// The kinds that are auth refusals (`ringway_route_auth_refusals_total`, by `reason`).
pub const AUTH_KINDS: [&str; 5] = [
    "unauthorized",
    "invalid_token",
    "insufficient_scope",
    "auth_unavailable",
    "client_certificate_required",
];

/// The index of an error's kind in [`ERROR_KINDS`] (an error path: a short linear search).
pub fn error_index(e: &GatewayError) -> usize {
    let code = e.code();
    ERROR_KINDS
        .iter()
        .position(|k| *k == code)
        .unwrap_or(N_ERROR_KINDS - 1)
}

/// Status classes: index 0 is a request that got no response (the client went away, or the
/// connection failed before a head was written), then 1xx to 5xx.
pub const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

#[inline]
pub fn status_class(status: u16) -> usize {
    match status {
        100..=599 => (status / 100) as usize,
        _ => 0,
    }
}

/// Upper bounds of the latency buckets, in microseconds (0.5 ms to 10 s).
pub const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];
/// The same bounds as `le` label values, in seconds.
pub const BUCKETS_LE: [&str; 14] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10",
];
/// Buckets with the last, unbounded one (`+Inf`).
pub const N_BUCKETS: usize = BUCKETS_US.len() + 1;

/// A latency histogram: a count per bucket (not cumulative; made so when rendered) and the sum.
#[derive(Default)]
pub struct Histogram {
    counts: [Cell<u64>; N_BUCKETS],
    sum_us: Cell<u64>,
}

impl Histogram {
    #[inline]
    pub fn observe(&self, us: u64) {
        // The first bucket whose bound is not below the value (`le` is inclusive).
        let i = BUCKETS_US.partition_point(|b| *b < us);
        bump(&self.counts[i], 1);
        bump(&self.sum_us, us);
    }

    fn sample(&self) -> HistSample {
        HistSample {
            counts: std::array::from_fn(|i| self.counts[i].get()),
            sum_us: self.sum_us.get(),
        }
    }

    /// Adds `other`'s observations (a reload moving a group's counters).
    fn absorb(&self, other: &Histogram) {
        for (c, o) in self.counts.iter().zip(&other.counts) {
            bump(c, o.get());
        }
        bump(&self.sum_us, other.sum_us.get());
    }
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().wrapping_add(n));
}

/// What the end of a request adds to the metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct Done {
    /// 0: no response was written.
    pub status: u16,
    pub error: Option<GatewayError>,
    /// The kind of an error answer that is not a `GatewayError` (a failed composition).
    pub kind: Option<&'static str>,
    /// Total time, when timed.
    pub total_us: Option<u64>,
    /// Time spent on the upstream (first attempt to the final response head), when there was
    /// an upstream phase.
    pub upstream_us: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub retries: u32,
    pub retry_budget_refusals: u32,
}

/// Counters of one route or one upstream group on one worker.
#[derive(Default)]
pub struct Traffic {
    status: [Cell<u64>; 6],
    errors: [Cell<u64>; N_ERROR_KINDS],
    total: Histogram,
    upstream: Histogram,
    gateway: Histogram,
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    retries: Cell<u64>,
    retry_budget_refusals: Cell<u64>,
}

impl Traffic {
    #[inline]
    pub fn add(&self, d: &Done) {
        bump(&self.status[status_class(d.status)], 1);
        if let Some(e) = &d.error {
            bump(&self.errors[error_index(e)], 1);
        } else if let Some(i) = d
            .kind
            .and_then(|k| ERROR_KINDS.iter().position(|x| *x == k))
        {
            bump(&self.errors[i], 1);
        }
        if let Some(total) = d.total_us {
            self.total.observe(total);
            let up = d.upstream_us.unwrap_or(0);
            if d.upstream_us.is_some() {
                self.upstream.observe(up);
            }
            self.gateway.observe(total.saturating_sub(up));
        }
        bump(&self.bytes_in, d.bytes_in);
        bump(&self.bytes_out, d.bytes_out);
        if d.retries > 0 {
            bump(&self.retries, d.retries as u64);
        }
        if d.retry_budget_refusals > 0 {
            bump(&self.retry_budget_refusals, d.retry_budget_refusals as u64);
        }
    }

    /// Adds `other`'s counts (a reload moving a group's counters).
    fn absorb(&self, other: &Traffic) {
        for (c, o) in self.status.iter().zip(&other.status) {
            bump(c, o.get());
        }
        for (c, o) in self.errors.iter().zip(&other.errors) {
            bump(c, o.get());
        }
        self.total.absorb(&other.total);
        self.upstream.absorb(&other.upstream);
        self.gateway.absorb(&other.gateway);
        bump(&self.bytes_in, other.bytes_in.get());
        bump(&self.bytes_out, other.bytes_out.get());
        bump(&self.retries, other.retries.get());
        bump(
            &self.retry_budget_refusals,
            other.retry_budget_refusals.get(),
        );
    }

    fn sample(&self) -> TrafficSample {
        TrafficSample {
            status: std::array::from_fn(|i| self.status[i].get()),
            errors: std::array::from_fn(|i| self.errors[i].get()),
            latency: [
                self.total.sample(),
                self.upstream.sample(),
                self.gateway.sample(),
            ],
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            retries: self.retries.get(),
            retry_budget_refusals: self.retry_budget_refusals.get(),
        }
    }
}

#[derive(Default)]
struct EndpointCounters {
    connect_failures: Cell<u64>,
    ejections: Cell<u64>,
}

#[derive(Default)]
struct ListenerCounters {
    accepted: Cell<u64>,
    open: Cell<u64>,
    tls_handshakes: Cell<u64>,
    tls_failures: Cell<u64>,
}

/// One worker's counters.
pub struct WorkerMetrics {
    /// `[metrics] enabled`.
    pub enabled: bool,
    /// By route index.
    routes: RefCell<Vec<Traffic>>,
    /// Requests that matched no route.
    unmatched: Traffic,
    /// By upstream group index.
    groups: RefCell<Vec<Traffic>>,
    /// By group and endpoint index.
    endpoints: RefCell<Vec<Vec<EndpointCounters>>>,
    /// By listener slot (labelled from the snapshot: a reload keeps a listener's slot and
    /// appends the slots of listeners it adds).
    listeners: RefCell<Vec<ListenerCounters>>,
    /// Access log lines written into the worker's buffers, and lines dropped (buffer full,
    /// writer behind).
    pub access_log_lines: Cell<u64>,
    pub access_log_dropped: Cell<u64>,
}

/// Grows `v` to hold index `i` (only after a reload added routes or groups: a rare path).
fn slot<T: Default>(v: &mut Vec<T>, i: usize) -> &T {
    if v.len() <= i {
        v.resize_with(i + 1, T::default);
    }
    &v[i]
}

/// [`slot`], mutable.
fn slot_mut<T: Default>(v: &mut Vec<T>, i: usize) -> &mut T {
    if v.len() <= i {
        v.resize_with(i + 1, T::default);
    }
    &mut v[i]
}

impl WorkerMetrics {
    pub fn new(cfg: &crate::config::Config) -> WorkerMetrics {
        WorkerMetrics {
            enabled: cfg.metrics.enabled,
            routes: RefCell::new((0..cfg.routes.len()).map(|_| Traffic::default()).collect()),
            unmatched: Traffic::default(),
            groups: RefCell::new(
                (0..cfg.upstreams.len())
                    .map(|_| Traffic::default())
                    .collect(),
            ),
            endpoints: RefCell::new(
                cfg.upstreams
                    .values()
                    .map(|u| {
                        (0..u.endpoints.len())
                            .map(|_| EndpointCounters::default())
                            .collect()
                    })
                    .collect(),
            ),
            listeners: RefCell::new(
                cfg.listeners
                    .iter()
                    .map(|_| ListenerCounters::default())
                    .collect(),
            ),
            access_log_lines: Cell::new(0),
            access_log_dropped: Cell::new(0),
        }
    }

    /// A finished request: its route's counters (or the unmatched ones) and, when it reached
    /// the upstream phase, its group's.
    #[inline]
    pub fn record(&self, route: Option<usize>, group: Option<usize>, d: &Done) {
        if !self.enabled {
            return;
        }
        match route {
            Some(i) => slot(&mut self.routes.borrow_mut(), i).add(d),
            None => self.unmatched.add(d),
        }
        if let Some(g) = group {
            slot(&mut self.groups.borrow_mut(), g).add(d);
        }
    }

    /// A request the gateway itself made to group `group` (a composition's sub-request): its
    /// group's counters only. The client request it served is counted once, by its route.
    pub fn record_group(&self, group: usize, d: &Done) {
        if !self.enabled {
            return;
        }
        slot(&mut self.groups.borrow_mut(), group).add(d);
    }

    fn endpoint(&self, group: usize, ep: usize, f: impl FnOnce(&EndpointCounters)) {
        if !self.enabled {
            return;
        }
        let mut all = self.endpoints.borrow_mut();
        let g = if all.len() <= group {
            all.resize_with(group + 1, Vec::new);
            &mut all[group]
        } else {
            &mut all[group]
        };
        f(slot(g, ep));
    }

    /// A new connection to an endpoint failed (refused, timed out, TLS handshake failed).
    pub fn connect_failed(&self, group: usize, ep: usize) {
        self.endpoint(group, ep, |e| bump(&e.connect_failures, 1));
    }

    /// This worker's outlier detection ejected an endpoint.
    pub fn ejected(&self, group: usize, ep: usize) {
        self.endpoint(group, ep, |e| bump(&e.ejections, 1));
    }

    /// A connection was accepted on listener `l` (it stays counted as open until
    /// [`Self::conn_closed`]).
    pub fn conn_accepted(&self, l: usize) {
        // A listener a reload added has a slot past the start's: its counters are made here.
        let mut v = self.listeners.borrow_mut();
        let c = slot(&mut v, l);
        bump(&c.accepted, 1);
        bump(&c.open, 1);
    }

    /// Connections open on listener `l` (this worker's).
    pub fn open_connections(&self, l: usize) -> u64 {
        self.listeners.borrow().get(l).map_or(0, |c| c.open.get())
    }

    pub fn conn_closed(&self, l: usize) {
        if let Some(c) = self.listeners.borrow().get(l) {
            c.open.set(c.open.get().saturating_sub(1));
        }
    }

    /// A TLS handshake on listener `l` ended (`ok`: it succeeded).
    pub fn tls_handshake(&self, l: usize, ok: bool) {
        let mut v = self.listeners.borrow_mut();
        let c = slot(&mut v, l);
        bump(&c.tls_handshakes, 1);
        if !ok {
            bump(&c.tls_failures, 1);
        }
    }

    /// A reload installed a route table: each route's counters follow its name to its new
    /// index (a route that is gone takes its counts with it; a new one starts at zero).
    pub fn follow_routes(&self, old: &[crate::router::Route], new: &[crate::router::Route]) {
        let mut routes = self.routes.borrow_mut();
        let mut by_name: std::collections::HashMap<&str, Traffic> =
            std::collections::HashMap::new();
        for (r, t) in old.iter().zip(routes.drain(..)) {
            by_name.entry(r.name.as_str()).or_insert(t);
        }
        *routes = new
            .iter()
            .map(|r| by_name.remove(r.name.as_str()).unwrap_or_default())
            .collect();
    }

    /// A reload installed new upstream groups. Group counters are kept by the group's hub
    /// slot, and a changed group moves to its name's other slot ([`HealthHub::relayout`]),
    /// so its counters move with it: the new slot gets the old slot's counts added (what it
    /// held is what requests of the same group, still running on its older version, counted
    /// after the previous move), and each endpoint's counts follow its address (configured
    /// text and resolved address; an endpoint's counts made after a move by requests still
    /// running on the older version are dropped at the next move). A group that is new (or back after a removal) starts at
    /// zero, and a removed group's counts go with it, as a route's do. The breaker's
    /// transition counts of a rebuilt group carry over the same way. So a counter never goes
    /// down while the process runs.
    ///
    /// [`HealthHub::relayout`]: crate::upstream::health::HealthHub::relayout
    pub fn follow_groups(
        &self,
        old: &[std::rc::Rc<crate::upstream::UpstreamGroup>],
        new: &[std::rc::Rc<crate::upstream::UpstreamGroup>],
    ) {
        let mut groups = self.groups.borrow_mut();
        let mut endpoints = self.endpoints.borrow_mut();
        for o in old {
            if !new.iter().any(|g| g.name == o.name) {
                if let Some(t) = groups.get_mut(o.index) {
                    *t = Traffic::default();
                }
                if let Some(e) = endpoints.get_mut(o.index) {
                    e.clear();
                }
            }
        }
        for g in new {
            let prev = old.iter().find(|o| o.name == g.name);
            let Some(o) = prev else {
                if let Some(t) = groups.get_mut(g.index) {
                    *t = Traffic::default();
                }
                if let Some(e) = endpoints.get_mut(g.index) {
                    e.clear();
                }
                continue;
            };
            if std::rc::Rc::ptr_eq(o, g) {
                continue;
            }
            if let (Some(ob), Some(nb)) = (&o.breaker, &g.breaker) {
                for (n, c) in nb.transitions.iter().zip(&ob.transitions) {
                    bump(n, c.get());
                }
            }
            if o.index == g.index {
                continue;
            }
            let moved = std::mem::take(slot_mut(&mut groups, o.index));
            slot_mut(&mut groups, g.index).absorb(&moved);
            // An endpoint's counts follow its address; what the target slot held for
            // endpoints (counted by a layout two reloads old) is dropped.
            let before = std::mem::take(slot_mut(&mut endpoints, o.index));
            let mut taken = vec![false; o.endpoints.len()];
            let next: Vec<EndpointCounters> = g
                .endpoints
                .iter()
                .map(|e| {
                    let c = EndpointCounters::default();
                    let found = o.endpoints.iter().enumerate().find(|(i, oe)| {
                        !taken[*i] && oe.addr == e.addr && oe.authority == e.authority
                    });
                    if let Some((i, _)) = found {
                        taken[i] = true;
                        if let Some(p) = before.get(i) {
                            bump(&c.connect_failures, p.connect_failures.get());
                            bump(&c.ejections, p.ejections.get());
                        }
                    }
                    c
                })
                .collect();
            *slot_mut(&mut endpoints, g.index) = next;
        }
    }

    /// This worker's counters and gauges, labelled from its current snapshot.
    pub fn sample(&self, w: &crate::proxy::Worker) -> WorkerSample {
        let cfg = w.config();
        let routes = self.routes.borrow();
        let groups = self.groups.borrow();
        let endpoints = self.endpoints.borrow();
        let mut s = WorkerSample {
            enabled: self.enabled,
            ..WorkerSample::default()
        };
        for (i, r) in cfg.router.routes.iter().enumerate() {
            let t = routes.get(i).map(Traffic::sample).unwrap_or_default();
            s.routes.push((r.name.clone(), t));
        }
        s.routes
            .push((UNMATCHED_ROUTE.to_string(), self.unmatched.sample()));
        for g in cfg.upstreams.iter() {
            // Counted by the group's slot (`index`), which a reload keeps for a group it keeps.
            let t = groups.get(g.index).map(Traffic::sample).unwrap_or_default();
            s.groups.push((g.name.clone(), t));
            s.group_conns
                .push((g.name.clone(), g.conns.open.get() as u64));
            if let Some(b) = &g.breaker {
                let mut state = [0u64; 3];
                state[b.state_index()] = 1;
                s.breakers.push(BreakerSample {
                    group: g.name.clone(),
                    state,
                    transitions: std::array::from_fn(|i| b.transitions[i].get()),
                });
            }
            for (ei, e) in g.endpoints.iter().enumerate() {
                let c = endpoints.get(g.index).and_then(|v| v.get(ei));
                let st = &g.stats[ei];
                s.endpoints.push(EndpointSample {
                    group: g.name.clone(),
                    endpoint: e.addr.to_string(),
                    in_flight: st.outstanding.get() as u64,
                    healthy: st.routable.get(),
                    idle: g.idle_len(ei) as u64,
                    connect_failures: c.map_or(0, |c| c.connect_failures.get()),
                    ejections: c.map_or(0, |c| c.ejections.get()),
                });
            }
        }
        let listeners = self.listeners.borrow();
        for (i, rt) in cfg.listeners.iter().enumerate() {
            let c = listeners.get(i);
            let get = |f: fn(&ListenerCounters) -> &Cell<u64>| c.map_or(0, |c| f(c).get());
            s.listeners.push(ListenerSample {
                listener: rt.label.to_string(),
                accepted: get(|c| &c.accepted),
                open: get(|c| &c.open),
                tls_handshakes: get(|c| &c.tls_handshakes),
                tls_failures: get(|c| &c.tls_failures),
            });
        }
        s.access_log_lines = self.access_log_lines.get();
        s.access_log_dropped = self.access_log_dropped.get();
        s.redis = w.limiter.host().redis().map(|r| RedisSample {
            up: !r.is_down(),
            commands: r.commands.load(std::sync::atomic::Ordering::Relaxed),
            round_trips: r.round_trips.load(std::sync::atomic::Ordering::Relaxed),
            failures: r.failures.load(std::sync::atomic::Ordering::Relaxed),
            demands_refused: r.demands_refused.load(std::sync::atomic::Ordering::Relaxed),
        });
        s.cache_redis = w.cache.shared().map(|l| {
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let r = l.link();
            CacheRedisSample {
                up: !r.is_down(),
                commands: get(&r.commands),
                round_trips: get(&r.round_trips),
                failures: get(&r.failures),
                commands_refused: get(&r.commands_refused),
                commands_too_large: get(&r.commands_too_large),
                lookups: get(&l.gets),
                found: get(&l.found),
                writes: get(&l.sets),
                purges_failed: get(&l.purges_failed),
                purges_given_up: get(&l.purges_given_up),
                purges_heard: get(&l.purges_heard),
                purge_log_gaps: get(&l.purge_log_gaps),
                purge_log_errors: get(&l.purge_log_errors),
            }
        });
        s
    }
}

/// The route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "(none)";

// ---------------------------------------------------------------------------------------------
// Samples: plain data, sent from the workers to the scraping thread and summed there.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistSample {
    pub counts: [u64; N_BUCKETS],
    pub sum_us: u64,
}

impl HistSample {
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |a, c| a.wrapping_add(*c))
    }

    fn add(&mut self, o: &HistSample) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a = a.wrapping_add(*b);
        }
        self.sum_us = self.sum_us.wrapping_add(o.sum_us);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficSample {
    /// By [`STATUS_CLASSES`].
    pub status: [u64; 6],
    /// By [`ERROR_KINDS`].
    pub errors: [u64; N_ERROR_KINDS],
    /// Total, upstream, gateway-added.
    pub latency: [HistSample; 3],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub retries: u64,
    pub retry_budget_refusals: u64,
}

impl TrafficSample {
    fn add(&mut self, o: &TrafficSample) {
        for (a, b) in self.status.iter_mut().zip(&o.status) {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.errors.iter_mut().zip(&o.errors) {
            *a = a.wrapping_add(*b);
        }
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            a.add(b);
        }
        self.bytes_in = self.bytes_in.wrapping_add(o.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(o.bytes_out);
        self.retries = self.retries.wrapping_add(o.retries);
        self.retry_budget_refusals = self
            .retry_budget_refusals
            .wrapping_add(o.retry_budget_refusals);
    }

    /// Requests counted (all status classes).
    pub fn requests(&self) -> u64 {
        self.status.iter().fold(0u64, |a, c| a.wrapping_add(*c))
    }

    /// The count of one error kind.
    pub fn error(&self, kind: &str) -> u64 {
        ERROR_KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.errors[i])
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSample {
    pub group: String,
    pub endpoint: String,
    pub in_flight: u64,
    /// Routable (not ejected, passing health checks); summed as "every worker agrees".
    pub healthy: bool,
    pub idle: u64,
    pub connect_failures: u64,
    pub ejections: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BreakerSample {
    pub group: String,
    /// Workers whose breaker is in each state ([`crate::upstream::breaker::STATE_NAMES`]).
    pub state: [u64; 3],
    pub transitions: [u64; 3],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerSample {
    pub listener: String,
    pub accepted: u64,
    pub open: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisSample {
    pub up: bool,
    pub commands: u64,
    pub round_trips: u64,
    pub failures: u64,
    /// Demands refused because the link's queue was full (`redis::MAX_QUEUED_DEMANDS`).
    pub demands_refused: u64,
}

/// The cache's Redis link and layer (`[cache.redis]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheRedisSample {
    pub up: bool,
    pub commands: u64,
    pub round_trips: u64,
    pub failures: u64,
    /// Commands refused because the link's queue was full (`redis::MAX_QUEUED_COMMANDS`).
    pub commands_refused: u64,
    /// Commands given up alone, the link left up, because they (over 1 MiB) could not be
    /// written and answered, or their reply (over 1 MiB) read, within `timeout`
    /// (`redis::RedisLink::commands_too_large`).
    pub commands_too_large: u64,
    /// `GET`s of entries asked, entries found (and used), entries written.
    pub lookups: u64,
    pub found: u64,
    pub writes: u64,
    /// Purges whose Redis side failed (kept, sent again), and those given up past
    /// `redis::MAX_UNSENT_PURGES` newer failed ones.
    pub purges_failed: u64,
    pub purges_given_up: u64,
    pub purges_heard: u64,
    pub purge_log_gaps: u64,
    pub purge_log_errors: u64,
}

/// One worker's metrics, or (after [`WorkerSample::merge`]) every worker's summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSample {
    pub enabled: bool,
    pub workers: u64,
    pub routes: Vec<(String, TrafficSample)>,
    pub groups: Vec<(String, TrafficSample)>,
    pub group_conns: Vec<(String, u64)>,
    pub breakers: Vec<BreakerSample>,
    pub endpoints: Vec<EndpointSample>,
    pub listeners: Vec<ListenerSample>,
    pub access_log_lines: u64,
    pub access_log_dropped: u64,
    /// Lines the writer threads could not write (process-wide, set once after the merge).
    pub access_log_write_lost: u64,
    /// Host-wide (one link for all workers): taken once, not summed.
    pub redis: Option<RedisSample>,
    /// The cache's Redis link (`[cache.redis]`), host-wide as `redis`.
    pub cache_redis: Option<CacheRedisSample>,
}

fn merge_named<T: Clone>(into: &mut Vec<(String, T)>, from: &[(String, T)], add: fn(&mut T, &T)) {
    for (name, v) in from {
        match into.iter_mut().find(|(n, _)| n == name) {
            Some((_, t)) => add(t, v),
            None => into.push((name.clone(), v.clone())),
        }
    }
}

impl WorkerSample {
    /// Sums the samples of every worker, by label (workers may briefly serve different
    /// snapshots during a reload).
    pub fn merge(samples: Vec<WorkerSample>) -> WorkerSample {
        let mut m = WorkerSample::default();
        for s in samples {
            m.workers += 1;
            m.enabled |= s.enabled;
            merge_named(&mut m.routes, &s.routes, TrafficSample::add);
            merge_named(&mut m.groups, &s.groups, TrafficSample::add);
            merge_named(&mut m.group_conns, &s.group_conns, |a, b| {
                *a = a.wrapping_add(*b)
            });
            for b in &s.breakers {
                match m.breakers.iter_mut().find(|x| x.group == b.group) {
                    Some(x) => {
                        for i in 0..3 {
                            x.state[i] += b.state[i];
                            x.transitions[i] = x.transitions[i].wrapping_add(b.transitions[i]);
                        }
                    }
                    None => m.breakers.push(b.clone()),
                }
            }
            for e in &s.endpoints {
                match m
                    .endpoints
                    .iter_mut()
                    .find(|x| x.group == e.group && x.endpoint == e.endpoint)
                {
                    Some(x) => {
                        x.in_flight = x.in_flight.wrapping_add(e.in_flight);
                        x.healthy &= e.healthy;
                        x.idle = x.idle.wrapping_add(e.idle);
                        x.connect_failures = x.connect_failures.wrapping_add(e.connect_failures);
                        x.ejections = x.ejections.wrapping_add(e.ejections);
                    }
                    None => m.endpoints.push(e.clone()),
                }
            }
            for l in &s.listeners {
                match m.listeners.iter_mut().find(|x| x.listener == l.listener) {
                    Some(x) => {
                        x.accepted = x.accepted.wrapping_add(l.accepted);
                        x.open = x.open.wrapping_add(l.open);
                        x.tls_handshakes = x.tls_handshakes.wrapping_add(l.tls_handshakes);
                        x.tls_failures = x.tls_failures.wrapping_add(l.tls_failures);
                    }
                    None => m.listeners.push(l.clone()),
                }
            }
            m.access_log_lines = m.access_log_lines.wrapping_add(s.access_log_lines);
            m.access_log_dropped = m.access_log_dropped.wrapping_add(s.access_log_dropped);
            if m.redis.is_none() {
                m.redis = s.redis;
            }
            if m.cache_redis.is_none() {
                m.cache_redis = s.cache_redis;
            }
        }
        m
    }

    pub fn route(&self, name: &str) -> Option<&TrafficSample> {
        self.routes.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn group(&self, name: &str) -> Option<&TrafficSample> {
        self.groups.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthFail;
    use crate::http::request::ParseError;

    #[test]
    fn every_gateway_error_has_a_kind() {
        let all = [
            GatewayError::Parse(ParseError::UriTooLong),
            GatewayError::Parse(ParseError::HeadTooLarge),
            GatewayError::Parse(ParseError::Expectation),
            GatewayError::Parse(ParseError::Version),
            GatewayError::Parse(ParseError::MethodNotAllowed),
            GatewayError::Parse(ParseError::Bad("x")),
            GatewayError::NoRoute,
            GatewayError::BodyTooLarge,
            GatewayError::ClientTimeout,
            GatewayError::UpstreamConnect,
            GatewayError::UpstreamConnectTimeout,
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamBadResponse,
            GatewayError::UpstreamClosed,
            GatewayError::NoHealthyEndpoint,
            GatewayError::CircuitOpen(1),
            GatewayError::Overloaded,
            GatewayError::RateLimited(1),
            GatewayError::ConcurrencyLimited,
            GatewayError::RateLimitUnavailable,
            GatewayError::UpstreamTls,
            GatewayError::ClientCertRequired,
            GatewayError::Unauthorized(AuthFail::Missing),
            GatewayError::Forbidden,
            GatewayError::AuthUnavailable,
        ];
        for e in all {
            let i = error_index(&e);
            assert_eq!(ERROR_KINDS[i], e.code(), "{e:?}");
        }
        for k in RATE_LIMIT_KINDS.iter().chain(&AUTH_KINDS) {
            assert!(ERROR_KINDS.contains(k));
        }
    }

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = Histogram::default();
        for us in [0, 500, 501, 10_000_000, 10_000_001, u64::MAX / 2] {
            h.observe(us);
        }
        let s = h.sample();
        assert_eq!(s.counts[0], 2); // 0 and 500
        assert_eq!(s.counts[1], 1); // 501
        assert_eq!(s.counts[13], 1); // 10 s
        assert_eq!(s.counts[14], 2); // above
        assert_eq!(s.count(), 6);
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(0), 0);
        assert_eq!(status_class(101), 1);
        assert_eq!(status_class(204), 2);
        assert_eq!(status_class(308), 3);
        assert_eq!(status_class(404), 4);
        assert_eq!(status_class(599), 5);
        assert_eq!(status_class(600), 0);
    }
}
