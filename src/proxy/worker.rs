//! What one worker owns: its configuration snapshot (route table, upstream groups, limits,
//! timeouts), its shutdown signal, its pools of request-sized buffers and its counters.
//!
//! Nothing here is shared with another worker except through the `Arc`s it names (endpoint
//! health, host-wide rate-limit buckets, TLS configs, published JWT key sets).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::auth::{AuthShared, WorkerAuth};
use crate::config::Config;
use crate::date::{http_date, HTTP_DATE_LEN};
use crate::http::request::{Limits, RequestHead};
use crate::http::response::ResponseHead;
use crate::local::{IdleWheel, Notify};
use crate::ratelimit::{HostBuckets, Limiter};
use crate::router::{RouteTable, RouteTimeouts, Router};
use crate::tls::UpstreamTls;
use crate::upstream::health::HealthHub;
use crate::upstream::UpstreamGroup;

/// Write buffers lent to a request while it is served (see [`BufPool`]).
pub const WRITE_BUF: usize = 4 * 1024;
/// Most buffers (and parsed-head shells) a worker keeps for reuse.
const POOL_MAX: usize = 4096;
/// Buffers that grew beyond this are freed instead of pooled.
const POOL_BUF_MAX: usize = 64 * 1024;
/// Most bytes of buffer capacity a worker keeps pooled; past it, returned buffers are freed,
/// so a burst of concurrency leaves at most this much behind.
const POOL_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Parsed-head shells whose header vector grew beyond this many entries are freed.
const POOL_HEADERS_MAX: usize = 256;

/// Timeouts, resolved from the config (and, per request, the route's overrides).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub client_head: Duration,
    pub client_idle: Duration,
    pub client_body: Duration,
    pub client_body_total: Option<Duration>,
    pub client_write: Duration,
    pub upstream_connect: Duration,
    pub upstream_write: Duration,
    pub upstream_response: Duration,
    pub upstream_body: Duration,
    pub upstream_body_total: Option<Duration>,
}

impl Timeouts {
    pub fn from_config(cfg: &Config) -> Timeouts {
        let t = &cfg.timeouts;
        Timeouts {
            client_head: t.client_head.0,
            client_idle: t.client_idle.0,
            client_body: t.client_body.0,
            client_body_total: t.client_body_total.0,
            client_write: t.client_write.0,
            upstream_connect: t.upstream_connect.0,
            upstream_write: t.upstream_write.0,
            upstream_response: t.upstream_response.0,
            upstream_body: t.upstream_body.0,
            upstream_body_total: t.upstream_body_total.0,
        }
    }

    /// These timeouts with a route's overrides.
    pub fn for_route(&self, o: &RouteTimeouts) -> Timeouts {
        Timeouts {
            client_body: o.client_body.unwrap_or(self.client_body),
            client_write: o.client_write.unwrap_or(self.client_write),
            upstream_connect: o.upstream_connect.unwrap_or(self.upstream_connect),
            upstream_response: o.upstream_response.unwrap_or(self.upstream_response),
            upstream_body: o.upstream_body.unwrap_or(self.upstream_body),
            ..*self
        }
    }
}

/// `now + d`, or no deadline when that instant cannot be represented. Config values are
/// bounded at load; this keeps the request path panic-free whatever reaches it.
pub fn deadline_after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// Time left until `deadline` (zero once it passed; `fallback` when there is none).
pub fn time_left(deadline: Option<Instant>, fallback: Duration) -> Duration {
    match deadline {
        Some(t) => t.saturating_duration_since(Instant::now()).min(fallback),
        None => fallback,
    }
}

/// A worker-local shutdown signal that tasks can wait on.
#[derive(Default)]
pub struct Shutdown {
    flag: Cell<bool>,
    notify: Notify,
}

impl Shutdown {
    pub fn is_set(&self) -> bool {
        self.flag.get()
    }

    pub fn trigger(&self) {
        self.flag.set(true);
        self.notify.notify_all();
    }

    /// Completes once the shutdown is triggered.
    pub async fn wait(&self) {
        while !self.flag.get() {
            self.notify.notified().await;
        }
    }
}

/// What a listener asks of the connections it accepts.
#[derive(Clone, Default)]
pub struct ListenerRt {
    /// TLS termination (one config per listener, shared by the workers).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// mTLS: the header that carries the client certificate's subject upstream; a copy sent by
    /// the client is always removed.
    pub subject_header: Option<Box<[u8]>>,
    /// Plain listener that answers every request with a redirect to https (the port, if any,
    /// to write in the Location).
    pub redirect_https: Option<Option<u16>>,
    /// The port this listener is bound to (for X-Forwarded-Port).
    pub port: u16,
    /// Removed by a reload: its connections finish the request in flight and close.
    pub closed: bool,
    /// The listener's label in metrics: its `name`, else its address as configured.
    pub label: Box<str>,
}

impl ListenerRt {
    pub fn from_config(
        l: &crate::config::ListenerConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> ListenerRt {
        ListenerRt {
            tls,
            subject_header: l
                .tls
                .as_ref()
                .and_then(|t| t.client_auth.as_ref())
                .map(|c| c.subject_header.0.as_bytes().into()),
            redirect_https: l
                .redirect_https
                .as_ref()
                .map(|r| r.port.filter(|p| *p != 443)),
            port: l.address.addr.port(),
            closed: false,
            label: l.name.as_deref().unwrap_or(&l.address.text).into(),
        }
    }
}

/// What is built once for all workers and shared by them: TLS configs (with their session
/// caches) and the route index. Empty parts are built per worker from the config.
#[derive(Clone, Default)]
pub struct Shared {
    /// Per listener, in config order.
    pub listeners: Vec<ListenerRt>,
    /// Per upstream group, in config order: its TLS, if any.
    pub upstream_tls: Vec<Option<Arc<UpstreamTls>>>,
    /// The route index, immutable and shared (per-core copies measured no faster).
    pub routes: Option<Arc<RouteTable>>,
}

/// The configuration one worker serves with. A request holds the snapshot it started with
/// (an `Rc`, no atomics) until its response is done, so that swapping the worker's snapshot
/// (a hot reload) never changes the rules under a request in flight.
pub struct Snapshot {
    /// Per listener slot: config order at start; a reload keeps a listener's slot (by
    /// address) and appends new ones, so a connection's index stays valid (see
    /// `crate::reload`).
    pub listeners: Vec<ListenerRt>,
    pub router: Router,
    /// In config order. Shared with the next snapshot when a reload leaves the group's config
    /// unchanged, so that its pools, balancer and breaker state carry over.
    pub upstreams: Vec<Rc<UpstreamGroup>>,
    pub limits: Limits,
    /// Per listener slot (as `listeners`): `limits` with the listener's parsing switches
    /// (`allow_trace`, `allow_underscores_in_headers`).
    pub listener_limits: Vec<Limits>,
    pub timeouts: Timeouts,
    /// Value appended as a Via line: "1.1 ringway".
    pub via: Box<[u8]>,
    /// Most client connections this worker keeps open (accepting pauses at the cap).
    pub max_connections: usize,
    /// Peers whose forwarding headers are believed (see `crate::rewrite`).
    pub trusted_proxies: crate::config::TrustedProxies,
}

/// Everything one worker owns.
pub struct Worker {
    pub id: usize,
    /// The current configuration; read once per request through [`Worker::config`].
    config: RefCell<Rc<Snapshot>>,
    /// TLS handshakes that failed or timed out on this worker.
    pub tls_handshake_failures: Cell<u64>,
    pub shutdown: Shutdown,
    /// Set by a drain (the admin API's `POST /drain`): the accept loops end and close their
    /// listeners; open connections are served on.
    pub stop_accepting: Shutdown,
    /// Endpoint health shared with the other workers.
    pub hub: Arc<HealthHub>,
    /// This worker's token leases (host buckets shared with the other workers).
    pub limiter: Limiter,
    /// Buffers and parsed-head shells lent to requests, so that an idle keep-alive connection
    /// holds none of them and a request allocates nothing once the pools are warm.
    pub bufs: BufPool,
    /// Blocks for request futures (see [`super::slab`]).
    pub slab: super::slab::FutureSlab,
    /// `Date` for responses the gateway makes, refreshed each second by the sync task.
    pub date: Cell<[u8; HTTP_DATE_LEN]>,
    date_secs: Cell<u64>,
    /// Open client connections.
    pub active: Cell<usize>,
    /// Accept loops paused (connection cap or no descriptors): a closing connection wakes them.
    pub accept_paused: Cell<u32>,
    pub conn_closed: Notify,
    /// Ticked once a second by the sync task: an idle connection waits in the slot of the
    /// tick its deadline falls on and checks it then.
    pub idle_wheel: IdleWheel,
    /// Consumers, credential providers and the per-core credential caches; replaced by a
    /// reload (a request holds the `Rc` it started with).
    auth: RefCell<Rc<WorkerAuth>>,
    /// Per listener slot: stops that listener's accept loop on this worker (a reload that
    /// removes the listener triggers it).
    pub listener_stop: RefCell<Vec<Rc<Shutdown>>>,
    /// This worker's response cache (see `crate::cache`).
    pub cache: Rc<crate::cache::WorkerCache>,
    /// Wakes tasks waiting on another thread (the Redis link), see `crate::doorbell`.
    pub doorbell: crate::doorbell::Doorbell,
    id_seed: u64,
    id_seq: Cell<u64>,
    /// Per-request metrics and per-listener counters (see [`crate::metrics`]).
    pub metrics: crate::metrics::WorkerMetrics,
    /// This worker's side of the access log, installed once at start when a listener logs.
    pub access_log: std::cell::OnceCell<crate::access_log::WorkerAccessLog>,
    /// State of [`Worker::random`].
    rng: Cell<u64>,
}

impl Worker {
    /// A worker for `cfg`, with what is built once for all workers.
    pub fn new(
        cfg: &Config,
        id: usize,
        hub: Arc<HealthHub>,
        buckets: Arc<HostBuckets>,
        auth: &AuthShared,
        shared: Shared,
    ) -> Worker {
        let seed = {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            splitmix(
                now ^ ((std::process::id() as u64) << 32) ^ (id as u64).wrapping_mul(0x9e37_79b9),
            )
        };
        let w = Worker {
            id,
            config: RefCell::new(Rc::new(Snapshot::new(cfg, id, seed, shared))),
            tls_handshake_failures: Cell::new(0),
            shutdown: Shutdown::default(),
            stop_accepting: Shutdown::default(),
            hub,
            limiter: Limiter::new(buckets, cfg.rate_limiting.max_keys),
            bufs: BufPool::default(),
            slab: Default::default(),
            date: Cell::new(http_date(0)),
            date_secs: Cell::new(u64::MAX),
            active: Cell::new(0),
            accept_paused: Cell::new(0),
            conn_closed: Notify::default(),
            idle_wheel: IdleWheel::default(),
            auth: RefCell::new(Rc::new(WorkerAuth::new(cfg, auth))),
            listener_stop: RefCell::new(Vec::new()),
            cache: crate::cache::WorkerCache::new(cfg, id),
            doorbell: Default::default(),
            id_seed: seed,
            id_seq: Cell::new(0),
            metrics: crate::metrics::WorkerMetrics::new(cfg),
            access_log: std::cell::OnceCell::new(),
            rng: Cell::new(splitmix(seed ^ 0x7261_6e64)),
        };
        w.tick_date();
        w
    }

    /// The snapshot a new request is served with.
    #[inline]
    pub fn config(&self) -> Rc<Snapshot> {
        self.config.borrow().clone()
    }

    /// A reload removed listener `i` (its connections finish the request in flight and close).
    #[inline]
    pub fn listener_closed(&self, i: usize) -> bool {
        self.config
            .borrow()
            .listeners
            .get(i)
            .is_none_or(|l| l.closed)
    }

    /// Installs a new snapshot for the requests that start from now on; requests in flight
    /// finish on the one they hold.
    pub fn swap_config(&self, next: Snapshot) -> Rc<Snapshot> {
        let old = self.config.replace(Rc::new(next));
        self.metrics
            .follow_routes(&old.router.routes, &self.config.borrow().router.routes);
        self.metrics
            .follow_groups(&old.upstreams, &self.config.borrow().upstreams);
        // Idle connections of a listener the reload removed close now, not at their deadline.
        self.idle_wheel.wake_all();
        old
    }

    /// Consumers and credential providers for a new request.
    #[inline]
    pub fn auth(&self) -> Rc<WorkerAuth> {
        self.auth.borrow().clone()
    }

    /// Installs reloaded consumers and credential providers (with empty caches).
    pub fn swap_auth(&self, next: WorkerAuth) {
        self.auth.replace(Rc::new(next));
    }

    /// The per-worker seed (route tables take it for retry jitter).
    pub fn seed(&self) -> u64 {
        self.id_seed
    }

    /// Refreshes the cached `Date` when the second changed (called every 50 ms).
    pub fn tick_date(&self) {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if secs != self.date_secs.get() {
            self.date_secs.set(secs);
            self.date.set(http_date(secs));
        }
    }

    /// The Unix second of the last sync tick (at most 50 ms old): the clock of token expiry
    /// checks, read without a system call.
    pub fn now_secs(&self) -> u64 {
        self.date_secs.get()
    }

    /// 64 random bits (splitmix64 over a per-worker seed; not for secrets): trace and span ids,
    /// sampling.
    pub fn random(&self) -> u64 {
        let n = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.rng.set(n);
        splitmix(n)
    }

    /// Whether requests are timed: metrics are on, or the access log (which writes latencies).
    #[inline]
    pub fn timed(&self) -> bool {
        self.metrics.enabled || self.access_log.get().is_some()
    }

    /// A new request id: 24 hex digits, unique per process run and worker.
    pub(super) fn next_id(&self, out: &mut [u8; 24]) {
        let n = self.id_seq.get().wrapping_add(1);
        self.id_seq.set(n);
        let v = splitmix(self.id_seed ^ n);
        let hex = b"0123456789abcdef";
        for (i, o) in out.iter_mut().take(16).enumerate() {
            *o = hex[((v >> (60 - 4 * i)) & 15) as usize];
        }
        for (i, o) in out.iter_mut().skip(16).enumerate() {
            *o = hex[((n >> (28 - 4 * i)) & 15) as usize];
        }
    }
}

impl Snapshot {
    pub fn new(cfg: &Config, worker: usize, seed: u64, shared: Shared) -> Snapshot {
        let Shared {
            mut listeners,
            upstream_tls,
            routes,
        } = shared;
        if listeners.len() != cfg.listeners.len() {
            listeners = cfg
                .listeners
                .iter()
                .map(|l| ListenerRt::from_config(l, None))
                .collect();
        }
        let mut upstreams: Vec<UpstreamGroup> = cfg
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, (name, u))| UpstreamGroup::new(i, name, u, worker))
            .collect();
        for (g, t) in upstreams.iter_mut().zip(upstream_tls) {
            g.tls = t;
        }
        // An automatic idle cap never holds more upstream connections than the worker's share
        // of descriptors for them (as many as its client connections).
        let share = match cfg.server.max_connections_per_worker {
            0 => crate::upstream::AUTO_IDLE_MAX,
            n => n,
        };
        for g in &mut upstreams {
            g.auto_idle_max = crate::upstream::AUTO_IDLE_MAX.min(share);
        }
        Snapshot {
            listeners,
            router: match routes {
                Some(table) => Router::with_table(cfg, seed, table),
                None => Router::new(cfg, seed),
            },
            upstreams: upstreams.into_iter().map(Rc::new).collect(),
            limits: cfg.limits.to_limits(),
            listener_limits: cfg
                .listeners
                .iter()
                .map(|l| l.request_limits(cfg.limits.to_limits()))
                .collect(),
            timeouts: Timeouts::from_config(cfg),
            via: format!("1.1 {}", cfg.server.via).into_bytes().into(),
            max_connections: match cfg.server.max_connections_per_worker {
                0 => usize::MAX,
                n => n,
            },
            trusted_proxies: cfg.server.trusted_proxies.clone(),
        }
    }
}

/// A worker's free lists of request-sized buffers and parsed-head shells (their header
/// vectors keep their capacity). Everything handed back is cleared first, so nothing of one
/// request can reach the next.
#[derive(Default)]
pub struct BufPool {
    free: RefCell<Vec<BytesMut>>,
    /// Capacity held in `free`.
    free_bytes: Cell<usize>,
    heads: RefCell<Vec<RequestHead>>,
    resps: RefCell<Vec<ResponseHead>>,
}

impl BufPool {
    pub fn take(&self) -> BytesMut {
        match self.free.borrow_mut().pop() {
            Some(b) => {
                self.free_bytes
                    .set(self.free_bytes.get().saturating_sub(b.capacity()));
                b
            }
            None => BytesMut::with_capacity(WRITE_BUF),
        }
    }

    pub fn give(&self, mut b: BytesMut) {
        let cap = b.capacity();
        if cap == 0 || cap > POOL_BUF_MAX || self.free_bytes.get() + cap > POOL_BYTES_MAX {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_MAX {
            b.clear();
            free.push(b);
            self.free_bytes.set(self.free_bytes.get() + cap);
        }
    }

    pub fn take_head(&self) -> RequestHead {
        self.heads.borrow_mut().pop().unwrap_or_default()
    }

    /// Takes back a request head shell: its bytes are released (so the connection's read
    /// buffer can reclaim their space) and its headers forgotten.
    pub fn give_head(&self, mut h: RequestHead) {
        h.raw = bytes::Bytes::new();
        h.headers.clear();
        let mut heads = self.heads.borrow_mut();
        if heads.len() < POOL_MAX && h.headers.capacity() <= POOL_HEADERS_MAX {
            heads.push(h);
        }
    }

    pub fn take_resp(&self) -> ResponseHead {
        self.resps.borrow_mut().pop().unwrap_or_default()
    }

    pub fn give_resp(&self, mut h: ResponseHead) {
        h.raw = bytes::Bytes::new();
        h.headers.clear();
        let mut resps = self.resps.borrow_mut();
        if resps.len() < POOL_MAX && h.headers.capacity() <= POOL_HEADERS_MAX {
            resps.push(h);
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_pool_keeps_a_bounded_number_of_bytes() {
        let pool = BufPool::default();
        for _ in 0..1000 {
            pool.give(BytesMut::with_capacity(POOL_BUF_MAX));
        }
        assert!(pool.free_bytes.get() <= POOL_BYTES_MAX);
        assert_eq!(pool.free.borrow().len(), POOL_BYTES_MAX / POOL_BUF_MAX);
        // Too big to keep, and nothing to keep.
        pool.give(BytesMut::with_capacity(POOL_BUF_MAX + 1));
        pool.give(BytesMut::new());
        assert_eq!(pool.free.borrow().len(), POOL_BYTES_MAX / POOL_BUF_MAX);
        // Taking gives the bytes back to the budget; a kept buffer comes back cleared.
        let mut b = pool.take();
        assert!(b.capacity() >= POOL_BUF_MAX);
        b.extend_from_slice(b"left over");
        pool.give(b);
        assert!(pool.take().is_empty());
        assert_eq!(
            pool.free_bytes.get(),
            pool.free
                .borrow()
                .iter()
                .map(|b| b.capacity())
                .sum::<usize>()
        );
    }
}
