//! Upstream groups as one worker sees them: endpoints with their balancer statistics, the
//! balancer, the circuit breaker and a keep-alive pool per endpoint. Everything here is owned
//! by one worker thread (`Cell`/`RefCell`, no locks); health shared between workers arrives
//! through [`health::HealthHub::sync`].

pub mod balance;
pub mod breaker;
pub mod health;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::config::{Balance, HashOn, IdleCap, OutlierConfig, UpstreamConfig};
use crate::local::Notify;
use crate::tls::{ClientStream, UpstreamTls};
use balance::{Algorithm, EndpointStats};
use breaker::Breaker;

/// Pooled connections idle for longer than this are always peek-checked before reuse.
pub const UNVERIFIED_IDLE_MAX: Duration = Duration::from_secs(1);

/// The least an automatic idle cap keeps per endpoint (what a fixed default used to be).
pub const AUTO_IDLE_MIN: usize = 64;
/// The most an automatic idle cap keeps per endpoint and worker, whatever the concurrency.
pub const AUTO_IDLE_MAX: usize = 4096;
/// Each second the remembered peak concurrency falls by this fraction (1/8) towards the
/// current one, so the pool shrinks over some twenty seconds after a burst.
const PEAK_DECAY_SHIFT: u32 = 3;

/// Read buffer of an upstream connection; kept with the connection in the pool.
pub const UPSTREAM_READ_BUF: usize = 32 * 1024;

/// Open connections of a group on this worker, and a wake-up for requests waiting for one.
#[derive(Default)]
pub struct ConnCount {
    pub open: Cell<u32>,
    pub freed: Notify,
}

/// The byte stream to an upstream endpoint: plain TCP, or TLS over TCP. A plain stream costs
/// one match per read or write, nothing more.
pub enum UpStream {
    Plain(TcpStream),
    /// The session, and the socket's fd for the pool's liveness peek (monoio-rustls does not
    /// lend out the socket).
    Tls(Box<ClientStream>, RawFd),
}

impl UpStream {
    /// Over TLS: bytes past the last response that the TLS layer already holds (decrypted in
    /// rustls, or read off the socket and not yet decrypted), which a peek at the raw socket
    /// cannot see. Such a connection must never serve another request: those bytes would
    /// become its response (RFC 9112 §9.3). No socket I/O. `spare` is the connection's read
    /// buffer, which lends the look its memory; when it holds bytes the answer is `true`.
    /// A plain stream answers `false` at once.
    pub fn tls_input_pending(&mut self, spare: &mut BytesMut) -> bool {
        let UpStream::Tls(s, _) = self else {
            return false;
        };
        if !spare.is_empty() {
            return true;
        }
        if spare.capacity() == 0 {
            spare.reserve(UPSTREAM_READ_BUF);
        }
        let (pending, buf) = s.buffered_input(std::mem::take(spare));
        if let Some(mut buf) = buf {
            buf.clear();
            *spare = buf;
        }
        pending
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            UpStream::Plain(s) => s.as_raw_fd(),
            UpStream::Tls(_, fd) => *fd,
        }
    }
}

/// A TLS upstream connection says goodbye when the gateway closes it, however it ends (the
/// pool evicts or expires it, it is not pooled after its response, an error ends it): the
/// `close_notify` goes out with a non-blocking send, and what the socket buffer has no room
/// for is sent by a task of its own within a short bound (RFC 8446 §6.1; see
/// [`crate::tls::LateCloses`]). A plain stream just closes.
impl Drop for UpStream {
    fn drop(&mut self) {
        if let UpStream::Tls(s, _) = self {
            s.close_notify_now();
        }
    }
}

impl AsyncReadRent for UpStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Plain(s) => s.read(buf).await,
            UpStream::Tls(s, _) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Plain(s) => s.readv(buf).await,
            UpStream::Tls(s, _) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for UpStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Plain(s) => s.write(buf).await,
            UpStream::Tls(s, _) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            UpStream::Plain(s) => s.writev(buf).await,
            UpStream::Tls(s, _) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            UpStream::Plain(s) => s.flush().await,
            UpStream::Tls(s, _) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            UpStream::Plain(s) => s.shutdown().await,
            UpStream::Tls(s, _) => s.shutdown().await,
        }
    }
}

/// A connection to an upstream endpoint, with its read buffer.
pub struct UpConn {
    pub stream: UpStream,
    pub rbuf: BytesMut,
    /// Came from the pool (it served a request before).
    pub reused: bool,
    pub endpoint: usize,
    count: Rc<ConnCount>,
}

impl UpConn {
    /// See [`UpStream::tls_input_pending`]; a plain connection answers `false` at once.
    #[inline]
    pub fn tls_input_pending(&mut self) -> bool {
        self.stream.tls_input_pending(&mut self.rbuf)
    }
}

impl Drop for UpConn {
    fn drop(&mut self) {
        self.count.open.set(self.count.open.get() - 1);
        self.count.freed.notify_all();
    }
}

struct Idle {
    conn: UpConn,
    since: Instant,
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// The address as configured ("host:port"), used as Host when a route asks for it.
    pub authority: Box<[u8]>,
    pub weight: u32,
    /// Newest at the back.
    idle: RefCell<VecDeque<Idle>>,
    /// The most requests this worker recently had in flight to the endpoint (decays).
    peak: Cell<usize>,
}

impl Endpoint {
    /// Idle pooled connections to this endpoint on this worker.
    pub fn idle_len(&self) -> usize {
        self.idle.borrow().len()
    }
}

pub struct UpstreamGroup {
    /// Index in config order (the health hub's group index).
    pub index: usize,
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Balancer statistics, one per endpoint (same order).
    pub stats: Vec<EndpointStats>,
    weights: Vec<u32>,
    algorithm: Algorithm,
    pub hash_on: Option<HashOn>,
    pub outlier: OutlierConfig,
    pub breaker: Option<Breaker>,
    pub max_idle: IdleCap,
    /// The ceiling of an automatic idle cap on this worker (its share of descriptors).
    pub auto_idle_max: usize,
    pub idle_timeout: Duration,
    pub conns: Rc<ConnCount>,
    /// TLS to the endpoints (built once at start, shared by the workers).
    pub tls: Option<Arc<UpstreamTls>>,
    /// A clock read every 50 ms by the worker's sync task: pool ages need no more precision,
    /// and the request path reads no clock for them.
    pub coarse_now: Cell<Instant>,
}

impl UpstreamGroup {
    pub fn new(index: usize, name: &str, cfg: &UpstreamConfig, worker: usize) -> Self {
        let endpoints: Vec<Endpoint> = cfg
            .endpoints
            .iter()
            .map(|e| Endpoint {
                addr: e.address.addr,
                authority: e.address.text.as_bytes().into(),
                weight: e.weight,
                idle: RefCell::new(VecDeque::new()),
                peak: Cell::new(0),
            })
            .collect();
        let n = endpoints.len();
        let all_equal = endpoints.iter().all(|e| e.weight == endpoints[0].weight);
        let algorithm = match cfg.balance {
            Balance::WeightedRoundRobin if !all_equal => Algorithm::Weighted {
                current: (0..n).map(|_| Cell::new(0)).collect(),
            },
            // Workers start at different endpoints so that their first picks spread out.
            Balance::RoundRobin | Balance::WeightedRoundRobin => Algorithm::RoundRobin {
                next: Cell::new(worker % n),
            },
            Balance::LeastRequest => Algorithm::LeastRequest {
                next: Cell::new(worker % n),
            },
            Balance::PeakEwma => Algorithm::PeakEwma {
                rng: Cell::new(balance::mix(0x5eed ^ ((worker as u64 + 1) * 0x9e37_79b9)) | 1),
            },
            Balance::ConsistentHash => {
                let names: Vec<&[u8]> = endpoints.iter().map(|e| &*e.authority).collect();
                Algorithm::Maglev {
                    table: balance::maglev_table(&names, balance::MAGLEV_SIZE),
                }
            }
        };
        let hash_on = match cfg.balance {
            Balance::ConsistentHash => Some(cfg.hash_on.clone().unwrap_or(HashOn::ClientIp)),
            _ => None,
        };
        UpstreamGroup {
            index,
            name: name.to_string(),
            weights: endpoints.iter().map(|e| e.weight).collect(),
            stats: (0..n).map(|_| EndpointStats::default()).collect(),
            endpoints,
            algorithm,
            hash_on,
            outlier: cfg.outlier.clone(),
            breaker: cfg.circuit_breaker.as_ref().map(Breaker::new),
            max_idle: cfg.max_idle,
            auto_idle_max: AUTO_IDLE_MAX,
            idle_timeout: cfg.idle_timeout.0,
            conns: Rc::new(ConnCount::default()),
            tls: None,
            coarse_now: Cell::new(Instant::now()),
        }
    }

    /// The endpoint for the next try of a request: routable, and not one of `tried` when
    /// another is available. `None` when no endpoint is routable.
    /// Whether the balancer uses latency samples.
    #[inline]
    pub fn tracks_latency(&self) -> bool {
        matches!(self.algorithm, Algorithm::PeakEwma { .. })
    }

    #[inline]
    pub fn pick(&self, hash: Option<u64>, tried: &[usize]) -> Option<usize> {
        self.algorithm.pick(&self.stats, &self.weights, hash, tried)
    }

    /// Idle pooled connections to endpoint `ep` on this worker (for the metrics).
    pub fn idle_len(&self, ep: usize) -> usize {
        self.endpoints.get(ep).map_or(0, |e| e.idle.borrow().len())
    }

    /// An idle pooled connection to endpoint `ep`, most recent first. With `verify` (or after
    /// a second idle), a non-blocking peek first checks that the upstream has not closed it; a
    /// request that can simply be sent again on a new connection skips that syscall.
    pub fn checkout(&self, ep: usize, verify: bool) -> Option<UpConn> {
        let mut idle = self.endpoints[ep].idle.borrow_mut();
        let now = self.coarse_now.get();
        while let Some(Idle { mut conn, since }) = idle.pop_back() {
            let age = now.saturating_duration_since(since);
            if age >= self.idle_timeout {
                continue;
            }
            if (verify || age >= UNVERIFIED_IDLE_MAX) && !still_open(conn.stream.raw_fd()) {
                continue;
            }
            // Not pooled with such bytes, and nothing reads while idle; checked again because
            // it costs no syscall.
            if conn.tls_input_pending() {
                continue;
            }
            conn.reused = true;
            return Some(conn);
        }
        None
    }

    /// Wraps a new connection, counting it against the group's open connections.
    pub fn adopt(&self, stream: UpStream, ep: usize) -> UpConn {
        self.conns.open.set(self.conns.open.get() + 1);
        UpConn {
            stream,
            rbuf: BytesMut::with_capacity(UPSTREAM_READ_BUF),
            reused: false,
            endpoint: ep,
            count: self.conns.clone(),
        }
    }

    /// Notes that `in_flight` requests are now outstanding to `ep` (the automatic idle cap
    /// follows the peak).
    #[inline]
    pub fn note_in_flight(&self, ep: usize, in_flight: usize) {
        let e = &self.endpoints[ep];
        if in_flight > e.peak.get() {
            e.peak.set(in_flight);
        }
    }

    /// How many idle connections `ep` may keep now.
    pub fn idle_cap(&self, ep: usize) -> usize {
        match self.max_idle {
            IdleCap::Fixed(n) => n,
            IdleCap::Auto => self.endpoints[ep]
                .peak
                .get()
                .clamp(AUTO_IDLE_MIN, self.auto_idle_max.max(AUTO_IDLE_MIN)),
        }
    }

    /// Returns a connection to the pool after a complete response, unless the TLS layer holds
    /// bytes past that response (a plain connection's extra bytes are in `rbuf`, which the
    /// caller checks, or in the socket, which `checkout` peeks at).
    pub fn checkin(&self, mut conn: UpConn) {
        if conn.tls_input_pending() {
            return;
        }
        {
            let cap = self.idle_cap(conn.endpoint);
            let mut idle = self.endpoints[conn.endpoint].idle.borrow_mut();
            if cap == 0 {
                return;
            }
            while idle.len() >= cap {
                // Keep the newest: drop the oldest idle connection.
                idle.pop_front();
            }
            idle.push_back(Idle {
                conn,
                since: self.coarse_now.get(),
            });
        }
        self.conns.freed.notify_all();
    }

    /// Closes idle connections older than the idle timeout, lets the remembered peak
    /// concurrency decay towards the current one and trims the pool to its cap. Called once a
    /// second. Returns how many connections were closed.
    pub fn sweep(&self) -> usize {
        let mut closed = 0;
        for (i, e) in self.endpoints.iter().enumerate() {
            let now_in_flight = self.stats[i].outstanding.get() as usize;
            let p = e.peak.get();
            e.peak.set(now_in_flight.max(p - (p >> PEAK_DECAY_SHIFT)));
            let cap = self.idle_cap(i);
            let mut idle = e.idle.borrow_mut();
            let before = idle.len();
            idle.retain(|i| i.since.elapsed() < self.idle_timeout);
            while idle.len() > cap {
                idle.pop_front();
            }
            closed += before - idle.len();
        }
        closed
    }

    /// Takes one idle connection of any endpoint out of the pool (to make room under
    /// `max_connections`).
    pub fn evict_one_idle(&self) -> bool {
        for e in &self.endpoints {
            let mut idle = e.idle.borrow_mut();
            if idle.pop_front().is_some() {
                return true;
            }
        }
        false
    }

    pub fn clear_idle(&self) {
        for e in &self.endpoints {
            e.idle.borrow_mut().clear();
        }
    }
}

/// Did the upstream close (or send something on) an idle connection? A non-blocking peek:
/// 0 bytes means FIN, data means an unexpected response (or, over TLS, a record such as
/// close_notify); either way the connection is unusable.
pub fn still_open(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: the only memory `recv` touches is `byte`, a live one-byte local, and it is told
    // so (length 1). That holds for any `fd` the signature admits: a closed fd or one that is
    // not a socket makes the call fail (EBADF, ENOTSOCK: answered "not open"), a reused one
    // peeks at another socket; MSG_PEEK consumes nothing and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        return err.kind() == std::io::ErrorKind::WouldBlock;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn group(balance: &str, weights: &[u32]) -> UpstreamGroup {
        let eps: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{{ address = \"127.0.0.1:{}\", weight = {w} }}", 9000 + i))
            .collect();
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nbalance = \"{balance}\"\nendpoints = [{}]\n",
            eps.join(", ")
        );
        let cfg = Config::parse(&src, "t").unwrap();
        UpstreamGroup::new(0, "u", &cfg.upstreams["u"], 0)
    }

    fn group_with(extra: &str) -> UpstreamGroup {
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9000\" }}]\n{extra}\n"
        );
        let cfg = Config::parse(&src, "t").unwrap();
        UpstreamGroup::new(0, "u", &cfg.upstreams["u"], 0)
    }

    #[test]
    fn the_automatic_idle_cap_follows_the_peak_concurrency_and_decays() {
        let g = group_with("");
        assert_eq!(g.max_idle, IdleCap::Auto);
        assert_eq!(
            g.idle_cap(0),
            AUTO_IDLE_MIN,
            "never below the old fixed default"
        );
        g.note_in_flight(0, 300);
        g.note_in_flight(0, 200);
        assert_eq!(g.idle_cap(0), 300, "follows the peak");
        g.note_in_flight(0, 1_000_000);
        assert_eq!(g.idle_cap(0), AUTO_IDLE_MAX, "bounded");
        // Nothing in flight any more: the peak decays by an eighth each sweep.
        g.endpoints[0].peak.set(800);
        g.sweep();
        assert_eq!(g.idle_cap(0), 700);
        for _ in 0..40 {
            g.sweep();
        }
        assert_eq!(g.idle_cap(0), AUTO_IDLE_MIN);
        // ... but not below what is in flight now.
        g.stats[0].outstanding.set(100);
        g.endpoints[0].peak.set(400);
        for _ in 0..40 {
            g.sweep();
        }
        assert_eq!(g.idle_cap(0), 100);
    }

    #[test]
    fn a_fixed_idle_cap_is_kept_and_auto_is_the_default() {
        assert_eq!(group_with("max_idle = 10").idle_cap(0), 10);
        let g = group_with("max_idle = 0");
        g.note_in_flight(0, 500);
        assert_eq!(g.idle_cap(0), 0, "0: no pooling");
        assert_eq!(group_with("max_idle = \"auto\"").max_idle, IdleCap::Auto);
        for bad in ["\"many\"", "-1", "2000000"] {
            let src = format!(
                "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9000\" }}]\nmax_idle = {bad}\n"
            );
            let e = Config::parse(&src, "t").expect_err(bad).to_string();
            assert!(e.contains("max_idle"), "{bad}: {e}");
        }
    }

    #[test]
    fn round_robin_cycles() {
        let g = group("round_robin", &[1, 1, 1]);
        let picks: Vec<usize> = (0..6).map(|_| g.pick(None, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn smooth_weighted_spreads_by_weight() {
        let g = group("weighted_round_robin", &[5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| g.pick(None, &[]).unwrap()).collect();
        // Smooth: the heavy endpoint is not picked five times in a row.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }
}
