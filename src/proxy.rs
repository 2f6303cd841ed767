//! One client connection's life on a worker: read a request head, route it, answer it directly
//! or proxy it to an upstream, streaming bodies both ways through bounded buffers.
//!
//! ```text
//!  read head ──► route ──► direct response
//!   (limits,      │
//!    timeouts)    └──► pick endpoint ──► pooled or new connection ──► send head (+ body)
//!                                                                      │
//!        client ◄── stream body ◄── response head ◄── 1xx handling ◄───┘
//! ```
//!
//! Every malformed request gets its 4xx and the connection is closed afterwards, so nothing
//! left in the buffer can be read as a second request.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::auth::{AuthShared, Denied, Identity, WorkerAuth};
use crate::config::Config;
use crate::config::{HashOn, RateKey, RedisFailure};
use crate::date::{http_date, HTTP_DATE_LEN};
use crate::error::{write_error_response, GatewayError};
use crate::http::chunked::{reframe_body, ChunkedReframer, ChunkedScanner, TrailerPolicy};
use crate::http::encode::{put_chunk_size, put_header, put_status_line, put_u64};
use crate::http::request::{parse_request, BodyKind, Limits, Method, ParseError, RequestHead};
use crate::http::response::{parse_response, RespBody, RespError, ResponseHead};
use crate::http::Version;
use crate::local::Notify;
use crate::ratelimit::{HostBuckets, Limiter, Verdict};
use crate::retry::{Failure, RetryPolicy};
use crate::rewrite::{connection_value, encode_client_head, encode_upstream_head, Forwarding};
use crate::router::{Action, DirectResponse, Route, Router};
use crate::upstream::balance::hash_bytes;
use crate::upstream::breaker::Admit;
use crate::upstream::health::{Ejection, HealthHub};
use crate::upstream::{UpConn, UpStream, UpstreamGroup, UPSTREAM_READ_BUF};
use crate::{tls, warn};
use std::sync::Arc;

/// Initial read buffer of a client connection; grows up to the head limit when needed. It is
/// the one buffer an idle keep-alive connection holds.
pub const CLIENT_READ_BUF: usize = 4 * 1024;
/// Write buffers lent to a connection while it serves a request (see [`BufPool`]).
pub const WRITE_BUF: usize = 4 * 1024;
/// Largest read while streaming a body.
pub const BODY_READ_CHUNK: usize = 32 * 1024;
/// Bodies up to this size are copied behind their head and sent in one write.
pub const COALESCE_BYTES: usize = 16 * 1024;
/// Longest client-supplied X-Request-Id that is kept (longer ones are replaced).
pub const MAX_REQUEST_ID: usize = 64;

/// Timeouts, resolved from the config.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub client_head: Duration,
    pub client_idle: Duration,
    pub client_body: Duration,
    pub client_write: Duration,
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub upstream_body: Duration,
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
        }
    }
}

/// What a connection's listener and TLS handshake tell its requests.
#[derive(Default)]
pub struct ConnInfo {
    /// Index of the listener in config order.
    pub listener: usize,
    /// Came over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
    /// The subject of the client's verified certificate (mTLS), as a header value.
    pub client_subject: Option<Box<[u8]>>,
}

/// A client stream: plain TCP or TLS. `close` ends it politely: TLS sends `close_notify`;
/// plain TCP needs nothing more than the close that dropping it does.
pub trait ClientIo: AsyncReadRent + AsyncWriteRent {
    fn close(&mut self, _limit: Duration) -> impl std::future::Future<Output = ()> {
        async {}
    }
}

impl ClientIo for TcpStream {}

impl ClientIo for tls::ServerStream {
    fn close(&mut self, limit: Duration) -> impl std::future::Future<Output = ()> {
        tls::close_notify(self, limit)
    }
}

/// Longest wait for a TLS `close_notify` to be written when a connection ends.
pub const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// Everything one worker owns: its route table, upstream pools, limits and counters.
pub struct Worker {
    pub id: usize,
    /// Per listener, in config order.
    pub listeners: Vec<ListenerRt>,
    /// TLS handshakes that failed or timed out on this worker.
    pub tls_handshake_failures: Cell<u64>,
    pub router: Router,
    pub upstreams: Vec<UpstreamGroup>,
    pub limits: Limits,
    /// Per listener, in config order: `limits` with the listener's parsing switches
    /// (`allow_trace`, `allow_underscores_in_headers`).
    pub listener_limits: Vec<Limits>,
    pub timeouts: Timeouts,
    /// Value appended as a Via line: "1.1 ringway".
    pub via: Box<[u8]>,
    pub shutdown: Shutdown,
    /// Endpoint health shared with the other workers.
    pub hub: Arc<HealthHub>,
    /// This worker's token leases (host buckets shared with the other workers).
    pub limiter: Limiter,
    /// Write buffers lent to connections for the length of a request, so that idle
    /// keep-alive connections hold only their read buffer.
    pub bufs: BufPool,
    /// `Date` for responses the gateway makes, refreshed each second by the sync task.
    pub date: Cell<[u8; HTTP_DATE_LEN]>,
    date_secs: Cell<u64>,
    /// Open client connections.
    pub active: Cell<usize>,
    /// Consumers, credential providers and the per-core credential caches.
    pub auth: WorkerAuth,
    id_seed: u64,
    id_seq: Cell<u64>,
}

impl Worker {
    pub fn new(
        cfg: &Config,
        id: usize,
        hub: Arc<HealthHub>,
        buckets: Arc<HostBuckets>,
        auth: &AuthShared,
    ) -> Worker {
        let t = &cfg.timeouts;
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
            listeners: cfg
                .listeners
                .iter()
                .map(|l| ListenerRt::from_config(l, None))
                .collect(),
            tls_handshake_failures: Cell::new(0),
            router: Router::new(cfg, seed),
            upstreams: cfg
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, (name, u))| UpstreamGroup::new(i, name, u, id))
                .collect(),
            limits: cfg.limits.to_limits(),
            listener_limits: cfg
                .listeners
                .iter()
                .map(|l| l.request_limits(cfg.limits.to_limits()))
                .collect(),
            timeouts: Timeouts {
                client_head: t.client_head.0,
                client_idle: t.client_idle.0,
                client_body: t.client_body.0,
                client_write: t.client_write.0,
                upstream_connect: t.upstream_connect.0,
                upstream_response: t.upstream_response.0,
                upstream_body: t.upstream_body.0,
            },
            via: format!("1.1 {}", cfg.server.via).into_bytes().into(),
            shutdown: Shutdown::default(),
            hub,
            limiter: Limiter::new(buckets, cfg.rate_limiting.max_keys),
            bufs: BufPool::default(),
            date: Cell::new(http_date(0)),
            date_secs: Cell::new(u64::MAX),
            active: Cell::new(0),
            auth: WorkerAuth::new(cfg, auth),
            id_seed: seed,
            id_seq: Cell::new(0),
        };
        w.tick_date();
        w
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

    /// A new request id: 24 hex digits, unique per process run and worker.
    fn next_id(&self, out: &mut ReqId) {
        let n = self.id_seq.get().wrapping_add(1);
        self.id_seq.set(n);
        let v = splitmix(self.id_seed ^ n);
        let hex = b"0123456789abcdef";
        for i in 0..16 {
            out.buf[i] = hex[((v >> (60 - 4 * i)) & 15) as usize];
        }
        for i in 0..8 {
            out.buf[16 + i] = hex[((n >> (28 - 4 * i)) & 15) as usize];
        }
        out.len = 24;
    }
}

/// Most buffers a worker keeps for reuse.
const POOL_MAX: usize = 4096;
/// Buffers that grew beyond this are freed instead of pooled.
const POOL_BUF_MAX: usize = 64 * 1024;

/// A worker's free list of write buffers.
#[derive(Default)]
pub struct BufPool {
    free: RefCell<Vec<BytesMut>>,
}

impl BufPool {
    pub fn take(&self) -> BytesMut {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(WRITE_BUF))
    }

    pub fn give(&self, mut b: BytesMut) {
        if b.capacity() == 0 || b.capacity() > POOL_BUF_MAX {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_MAX {
            b.clear();
            free.push(b);
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A request id: the client's (when it is short and made of token characters) or ours.
pub struct ReqId {
    buf: [u8; MAX_REQUEST_ID],
    len: usize,
}

impl ReqId {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The client's address as text, formatted once per connection without a heap allocation.
struct PeerIp {
    /// Long enough for any IPv6 text form (45 bytes).
    buf: [u8; 48],
    len: u8,
}

impl PeerIp {
    fn new(ip: std::net::IpAddr) -> PeerIp {
        use std::io::Write;
        let mut p = PeerIp {
            buf: [0; 48],
            len: 0,
        };
        let mut cursor = &mut p.buf[..];
        let _ = write!(cursor, "{ip}");
        let left = cursor.len();
        p.len = (48 - left) as u8;
        p
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

/// A key's hash in its own domain (`tag`), apart from the address hashes.
fn tagged_hash(data: &[u8], tag: u64) -> u64 {
    crate::upstream::balance::mix(hash_bytes(data) ^ tag)
}

/// "a.test:8080" → "a.test"; "[::1]:80" → "[::1]".
fn host_without_port(h: &[u8]) -> &[u8] {
    if h.starts_with(b"[") {
        match h.iter().position(|b| *b == b']') {
            Some(p) => &h[..=p],
            None => h,
        }
    } else {
        match h.iter().position(|b| *b == b':') {
            Some(p) => &h[..p],
            None => h,
        }
    }
}

/// A host fit for a Location URL: a name or an IPv4 address, or a bracketed IPv6 address.
fn valid_host(h: &[u8]) -> bool {
    if let Some(inner) = h.strip_prefix(b"[").and_then(|r| r.strip_suffix(b"]")) {
        return !inner.is_empty()
            && inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b".:".contains(b));
    }
    !h.is_empty()
        && h.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b))
}

fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

// ---------------------------------------------------------------------------------------------
// I/O helpers: ownership-passing reads and writes with a timeout.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoFail {
    Timeout,
    Eof,
    Io,
}

/// Reads at most `max` more bytes, appending to `buf`. On timeout or error the connection is
/// closed by the caller, so a buffer lost with a cancelled read does not matter.
async fn read_some<R: AsyncReadRent>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
    dur: Duration,
) -> Result<usize, IoFail> {
    buf.reserve(max);
    let b = std::mem::take(buf);
    let len = b.len();
    let end = len + max.min(b.capacity() - len);
    match monoio::time::timeout(dur, io.read(b.slice_mut(len..end))).await {
        Err(_) => Err(IoFail::Timeout),
        Ok((res, slice)) => {
            *buf = slice.into_inner();
            match res {
                Ok(0) => Err(IoFail::Eof),
                Ok(n) => Ok(n),
                Err(_) => Err(IoFail::Io),
            }
        }
    }
}

async fn write_buf<W: AsyncWriteRent, B: IoBuf + 'static>(
    io: &mut W,
    buf: B,
    dur: Duration,
) -> Result<B, IoFail> {
    match monoio::time::timeout(dur, io.write_all(buf)).await {
        Err(_) => Err(IoFail::Timeout),
        Ok((Ok(_), b)) => Ok(b),
        Ok((Err(_), _)) => Err(IoFail::Io),
    }
}

// ---------------------------------------------------------------------------------------------

/// A client connection.
pub struct Conn<S> {
    io: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Head sent upstream; kept to be sent again on a retry.
    ubuf: BytesMut,
    head: RequestHead,
    resp: ResponseHead,
    peer_ip: PeerIp,
    id: ReqId,
    /// This request's timeouts: the global ones with the route's overrides.
    t: Timeouts,
    /// `100 Continue` was sent for this request.
    continue_sent: bool,
    /// This request's body has been read off the connection (kept for replay or streamed).
    body_done: bool,
    /// RateLimit-Policy / RateLimit header lines for this request's response (empty when the
    /// route has no limits). Also carries the `WWW-Authenticate` line of an auth refusal.
    rl_headers: BytesMut,
    info: ConnInfo,
    /// Who made this request, once the route's auth policy accepted it.
    pub identity: Identity,
    /// Identity header lines sent upstream (forwarded claims, consumer).
    auth_headers: BytesMut,
}

enum HeadRead {
    Ready,
    /// The client went away, idled out, or the worker is shutting down.
    Closed,
    Fail(GatewayError),
}

#[derive(PartialEq, Eq, Debug)]
enum Next {
    KeepAlive,
    Close,
}

/// Serves one client connection until it closes.
pub async fn serve<S: ClientIo>(w: &Worker, io: S, peer: SocketAddr, info: ConnInfo) {
    let mut c = Conn {
        io,
        rbuf: BytesMut::with_capacity(CLIENT_READ_BUF),
        // Lent from the worker's pool while a request is served.
        wbuf: BytesMut::new(),
        ubuf: BytesMut::new(),
        head: RequestHead::default(),
        resp: ResponseHead::default(),
        peer_ip: PeerIp::new(peer.ip()),
        id: ReqId {
            buf: [0; MAX_REQUEST_ID],
            len: 0,
        },
        t: w.timeouts,
        continue_sent: false,
        body_done: false,
        rl_headers: BytesMut::new(),
        info,
        identity: Identity::default(),
        auth_headers: BytesMut::new(),
    };
    loop {
        // Release the last head's bytes so the read buffer can take its space back instead of
        // allocating a new one.
        c.head.raw = Bytes::new();
        match c.read_head(w).await {
            HeadRead::Ready => {}
            HeadRead::Closed => break,
            HeadRead::Fail(e) => {
                // The head was refused: nothing of it (a HEAD method included) applies.
                c.head.method = Method::Get;
                w.next_id(&mut c.id);
                let _ = c.send_error(w, e, true).await;
                break;
            }
        }
        c.wbuf = w.bufs.take();
        c.ubuf = w.bufs.take();
        let next = c.handle(w).await;
        w.bufs.give(std::mem::take(&mut c.wbuf));
        w.bufs.give(std::mem::take(&mut c.ubuf));
        if next == Next::Close || w.shutdown.is_set() {
            break;
        }
    }
    c.io.close(CLOSE_NOTIFY_TIMEOUT).await;
}

impl<S: AsyncReadRent + AsyncWriteRent> Conn<S> {
    async fn read_head(&mut self, w: &Worker) -> HeadRead {
        let mut started: Option<Instant> = None;
        let limits = w
            .listener_limits
            .get(self.info.listener)
            .unwrap_or(&w.limits);
        loop {
            if !self.rbuf.is_empty() {
                match parse_request(&self.rbuf, limits, &mut self.head) {
                    Ok(Some(n)) => {
                        self.head.raw = self.rbuf.split_to(n).freeze();
                        return HeadRead::Ready;
                    }
                    // The head has begun: from now on the client_head deadline runs.
                    Ok(None) => {
                        started.get_or_insert_with(Instant::now);
                    }
                    Err(e) => return HeadRead::Fail(GatewayError::Parse(e)),
                }
            }
            let want = CLIENT_READ_BUF
                .min(w.limits.max_head_bytes + 1 - self.rbuf.len().min(w.limits.max_head_bytes));
            let res = match started {
                Some(t0) => {
                    let Some(left) = self.t.client_head.checked_sub(t0.elapsed()) else {
                        return HeadRead::Fail(GatewayError::ClientTimeout);
                    };
                    read_some(&mut self.io, &mut self.rbuf, want.max(1), left).await
                }
                None => {
                    if w.shutdown.is_set() {
                        return HeadRead::Closed;
                    }
                    monoio::select! {
                        r = read_some(&mut self.io, &mut self.rbuf, want.max(1), self.t.client_idle) => r,
                        _ = w.shutdown.wait() => return HeadRead::Closed,
                    }
                }
            };
            match res {
                Ok(_) => {}
                Err(IoFail::Timeout) if started.is_some() => {
                    return HeadRead::Fail(GatewayError::ClientTimeout)
                }
                Err(_) => return HeadRead::Closed,
            }
        }
    }

    async fn handle(&mut self, w: &Worker) -> Next {
        match self
            .head
            .header(b"x-request-id")
            .filter(|v| valid_request_id(v))
        {
            Some(v) => {
                self.id.buf[..v.len()].copy_from_slice(v);
                self.id.len = v.len();
            }
            None => w.next_id(&mut self.id),
        }
        if let Some(port) = w.listeners[self.info.listener].redirect_https {
            return self.redirect_https(w, port).await;
        }
        let Some(ri) = w.router.find_index(&self.head) else {
            return self.reject(w, GatewayError::NoRoute).await;
        };
        let route = &w.router.routes[ri];
        if route.require_client_cert && self.info.client_subject.is_none() {
            return self.reject(w, GatewayError::ClientCertRequired).await;
        }
        let o = &route.timeouts;
        self.t = Timeouts {
            client_body: o.client_body.unwrap_or(w.timeouts.client_body),
            client_write: o.client_write.unwrap_or(w.timeouts.client_write),
            upstream_connect: o.upstream_connect.unwrap_or(w.timeouts.upstream_connect),
            upstream_response: o.upstream_response.unwrap_or(w.timeouts.upstream_response),
            upstream_body: o.upstream_body.unwrap_or(w.timeouts.upstream_body),
            ..w.timeouts
        };
        self.continue_sent = false;
        self.body_done = false;
        self.rl_headers.clear();
        self.auth_headers.clear();
        self.identity.clear();
        // Auth comes before rate limits, so that limits can count per consumer or claim.
        if let Some(policy) = &route.auth {
            let now = w.now_secs();
            match w
                .auth
                .check(policy, &self.head, now, &mut self.identity)
                .await
            {
                Ok(()) => w
                    .auth
                    .put_upstream_headers(&self.identity, &mut self.auth_headers),
                Err(d) => {
                    self.rl_headers.put_slice(policy.challenge(d));
                    let e = match d {
                        Denied::Unauthorized(f) => GatewayError::Unauthorized(f),
                        Denied::Forbidden => GatewayError::Forbidden,
                        Denied::Unavailable => GatewayError::AuthUnavailable,
                    };
                    return self.reject(w, e).await;
                }
            }
        }
        if !route.limits.is_empty() {
            if let Some(e) = self.rate_limit(w, route).await {
                return self.reject(w, e).await;
            }
        }
        // Held until the request is done.
        let _slot = match &route.concurrency {
            None => None,
            Some(c) => {
                let key = self.limit_key(&c.key);
                match w.limiter.host().acquire(c, key) {
                    Some(slot) => Some(slot),
                    None => return self.reject(w, GatewayError::ConcurrencyLimited).await,
                }
            }
        };
        let max_body = route.max_body_bytes.unwrap_or(w.limits.max_body_bytes);
        if let BodyKind::Length(n) = self.head.body {
            if n > max_body {
                return self.reject(w, GatewayError::BodyTooLarge).await;
            }
        }
        match &route.action {
            Action::Direct(d) => self.direct(w, d).await,
            Action::Proxy { upstream } => {
                self.proxy(w, route, &w.upstreams[*upstream], max_body)
                    .await
            }
        }
    }

    /// The key a limit counts this request under.
    fn limit_key(&self, key: &RateKey) -> u64 {
        match key {
            RateKey::ClientIp => hash_bytes(self.peer_ip.as_bytes()),
            RateKey::Route => 0,
            // Requests without the header share one bucket.
            RateKey::Header(h) => hash_bytes(self.head.header(h.as_bytes()).unwrap_or(b"")),
            // Callers the auth stage could not name are counted by address. The domain tags
            // keep a consumer or claim value from sharing a bucket with an address.
            RateKey::Consumer => match self.identity.consumer_name() {
                Some(name) => tagged_hash(name.as_bytes(), 0xc0),
                None => hash_bytes(self.peer_ip.as_bytes()),
            },
            RateKey::Claim(c) => match self.identity.claim(c) {
                Some(serde_json::Value::String(s)) => tagged_hash(s.as_bytes(), 0xc1),
                Some(v) => tagged_hash(v.to_string().as_bytes(), 0xc1),
                None => hash_bytes(self.peer_ip.as_bytes()),
            },
        }
    }

    /// Applies the route's rate limits. Only the first request of a key kept in Redis may
    /// wait here (1 ms steps), and no longer than the Redis timeout: then the failure policy
    /// applies, local buckets or 503.
    async fn rate_limit(&mut self, w: &Worker, route: &Route) -> Option<GatewayError> {
        let mut started: Option<Instant> = None;
        let mut local = false;
        loop {
            if let Some(answer) = self.check_rate_limits(w, route, local) {
                return answer;
            }
            let t0 = *started.get_or_insert_with(Instant::now);
            let Some(redis) = w.limiter.host().redis() else {
                local = true;
                continue;
            };
            let cfg = redis.config();
            if t0.elapsed() > cfg.timeout.0 + Duration::from_millis(5) {
                match cfg.on_failure {
                    RedisFailure::Local => local = true,
                    RedisFailure::Deny => return Some(GatewayError::RateLimitUnavailable),
                }
            } else {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// Applies the route's rate limits and writes the RateLimit headers for the response.
    /// Returns the error to answer with when a limit refuses the request (`Some(None)`: admitted),
    /// or `None` when Redis was asked for a key's first tokens and has not answered yet.
    fn check_rate_limits(
        &mut self,
        w: &Worker,
        route: &Route,
        local: bool,
    ) -> Option<Option<GatewayError>> {
        let mut keys = [0u64; crate::config::MAX_RATE_LIMITS_PER_ROUTE];
        let n = route.limits.len();
        for (k, l) in keys.iter_mut().zip(&route.limits) {
            *k = self.limit_key(&l.key);
        }
        let verdict = w
            .limiter
            .check(&route.limits[..n], &keys[..n], Instant::now(), local);
        let (i, remaining, reset, refused) = match verdict {
            Verdict::Allow {
                limit,
                remaining,
                reset_secs,
            } => (limit, remaining, reset_secs, None),
            Verdict::Deny { limit, retry_after } => (limit, 0, retry_after, Some(retry_after)),
            Verdict::Wait => return None,
            Verdict::Unavailable => return Some(Some(GatewayError::RateLimitUnavailable)),
        };
        let l = &route.limits[i];
        let h = &mut self.rl_headers;
        h.put_slice(b"ratelimit-policy: \"");
        h.put_slice(l.name.as_bytes());
        h.put_slice(b"\";q=");
        put_u64(h, l.quota as u64);
        h.put_slice(b";w=");
        put_u64(h, l.window_secs);
        h.put_slice(b"\r\nratelimit: \"");
        h.put_slice(l.name.as_bytes());
        h.put_slice(b"\";r=");
        put_u64(h, remaining);
        h.put_slice(b";t=");
        put_u64(h, reset);
        h.put_slice(b"\r\n");
        Some(refused.map(|s| GatewayError::RateLimited(s.min(u32::MAX as u64) as u32)))
    }

    /// Consumes the request body when all of it is already buffered. Returns false when some
    /// of it is still unread (the connection must then close after the response).
    fn skip_buffered_body(&mut self) -> bool {
        if self.body_done {
            return true;
        }
        match self.head.body {
            BodyKind::None => true,
            BodyKind::Length(n) => {
                if self.rbuf.len() as u64 >= n {
                    let _ = self.rbuf.split_to(n as usize);
                    true
                } else {
                    false
                }
            }
            BodyKind::Chunked => {
                let mut s = ChunkedScanner::new();
                match s.scan(&self.rbuf, |_, _| {}) {
                    Ok(r) if r.done => {
                        let _ = self.rbuf.split_to(r.consumed);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// Answers with a gateway error, keeping the connection when the request was fully read.
    async fn reject(&mut self, w: &Worker, e: GatewayError) -> Next {
        let keep = self.head.keep_alive && self.skip_buffered_body() && !w.shutdown.is_set();
        if self.send_error(w, e, !keep).await.is_err() || !keep {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    async fn send_error(&mut self, w: &Worker, e: GatewayError, close: bool) -> Result<(), IoFail> {
        self.wbuf.clear();
        write_error_response(
            &mut self.wbuf,
            e,
            self.id.as_bytes(),
            &w.date.get(),
            &self.rl_headers,
            close,
        );
        if self.head.method == Method::Head {
            // HEAD: the same head, no body.
            if let Some(p) = self.wbuf.windows(4).position(|x| x == b"\r\n\r\n") {
                self.wbuf.truncate(p + 4);
            }
        }
        let buf = std::mem::take(&mut self.wbuf);
        self.wbuf = write_buf(&mut self.io, buf, self.t.client_write).await?;
        Ok(())
    }

    async fn direct(&mut self, w: &Worker, d: &DirectResponse) -> Next {
        let keep = self.head.keep_alive && self.skip_buffered_body() && !w.shutdown.is_set();
        self.wbuf.clear();
        self.wbuf.put_slice(&d.head);
        if d.status != 204 && d.status != 304 {
            self.wbuf.put_slice(b"content-length: ");
            put_u64(&mut self.wbuf, d.body.len() as u64);
            self.wbuf.put_slice(b"\r\n");
        }
        put_header(&mut self.wbuf, b"date", &w.date.get());
        put_header(&mut self.wbuf, b"x-request-id", self.id.as_bytes());
        self.wbuf.put_slice(&self.rl_headers);
        self.put_connection(keep);
        self.wbuf.put_slice(b"\r\n");
        if self.head.method != Method::Head && d.status != 204 && d.status != 304 {
            self.wbuf.put_slice(&d.body);
        }
        self.flush_answer(keep).await
    }

    /// Answers a request on a `redirect_https` listener: 308 to the same host, path and query
    /// over https. A request without a usable Host gets a 400.
    async fn redirect_https(&mut self, w: &Worker, port: Option<u16>) -> Next {
        let Some(host) = self
            .head
            .host_bytes()
            .map(host_without_port)
            .filter(|h| valid_host(h))
        else {
            let e = GatewayError::Parse(ParseError::Bad("a redirect to https needs a valid Host"));
            return self.reject(w, e).await;
        };
        self.wbuf.clear();
        put_status_line(&mut self.wbuf, 308, b"Permanent Redirect");
        self.wbuf.put_slice(b"location: https://");
        self.wbuf.put_slice(host);
        if let Some(p) = port {
            self.wbuf.put_u8(b':');
            put_u64(&mut self.wbuf, p as u64);
        }
        let pq = self.head.bytes(self.head.path_query);
        if pq.starts_with(b"/") {
            self.wbuf.put_slice(pq);
        } else {
            self.wbuf.put_u8(b'/');
        }
        self.wbuf.put_slice(b"\r\ncontent-length: 0\r\n");
        put_header(&mut self.wbuf, b"date", &w.date.get());
        put_header(&mut self.wbuf, b"x-request-id", self.id.as_bytes());
        let keep = self.head.keep_alive && self.skip_buffered_body() && !w.shutdown.is_set();
        self.put_connection(keep);
        self.wbuf.put_slice(b"\r\n");
        self.flush_answer(keep).await
    }

    /// Writes the answer built in `wbuf`; keeps the connection when asked to and the write
    /// succeeded.
    async fn flush_answer(&mut self, keep: bool) -> Next {
        let buf = std::mem::take(&mut self.wbuf);
        match write_buf(&mut self.io, buf, self.t.client_write).await {
            Ok(b) => {
                self.wbuf = b;
                if keep {
                    Next::KeepAlive
                } else {
                    Next::Close
                }
            }
            Err(_) => Next::Close,
        }
    }

    fn put_connection(&mut self, keep: bool) {
        if let Some(v) = connection_value(keep, self.head.version) {
            put_header(&mut self.wbuf, b"connection", v);
        }
    }

    /// Writes the head sent upstream into `ubuf`.
    fn put_upstream_head(&mut self, w: &Worker, route: &Route, authority: &[u8]) {
        let f = Forwarding {
            peer_ip: self.peer_ip.as_bytes(),
            request_id: self.id.as_bytes(),
            via: &w.via,
            https: self.info.tls,
            client_cert: w.listeners[self.info.listener]
                .subject_header
                .as_deref()
                .zip(self.info.client_subject.as_deref()),
            identity: &self.auth_headers,
        };
        encode_upstream_head(&mut self.ubuf, &self.head, route, authority, &f);
    }

    /// Takes the request body into the read buffer when it can be kept for a replay: already
    /// buffered, or (with a retry policy) small enough to wait for. `Ok(None)`: the body will be
    /// streamed and never replayed. `Err`: the request was answered.
    async fn replayable_body(
        &mut self,
        w: &Worker,
        policy: Option<&RetryPolicy>,
        max_body: u64,
    ) -> Result<Option<Bytes>, Next> {
        let keep_limit = policy.map_or(0, |p| p.max_replay);
        loop {
            match self.head.body {
                BodyKind::None => {
                    self.body_done = true;
                    return Ok(Some(Bytes::new()));
                }
                BodyKind::Length(n) => {
                    if self.rbuf.len() as u64 >= n {
                        self.body_done = true;
                        return Ok(Some(self.rbuf.split_to(n as usize).freeze()));
                    }
                    if n > keep_limit {
                        return Ok(None);
                    }
                }
                BodyKind::Chunked => {
                    let mut s = ChunkedScanner::new();
                    match s.scan(&self.rbuf, |_, _| {}) {
                        Err(e) => return Err(self.reject(w, GatewayError::BadChunk(e)).await),
                        Ok(_) if s.data_total > max_body => {
                            return Err(self.reject(w, GatewayError::BodyTooLarge).await)
                        }
                        Ok(r) if r.done => {
                            self.body_done = true;
                            // Forwarded in canonical form: no extensions, no trailers.
                            let raw = self.rbuf.split_to(r.consumed).freeze();
                            return match reframe_body(raw, TrailerPolicy::Drop) {
                                Ok(body) => Ok(Some(body)),
                                Err(e) => Err(self.reject(w, GatewayError::BadChunk(e)).await),
                            };
                        }
                        Ok(_) if self.rbuf.len() as u64 >= keep_limit => return Ok(None),
                        Ok(_) => {}
                    }
                }
            }
            // Small enough to keep: read the rest before choosing an endpoint.
            if !self.send_continue().await {
                return Err(Next::Close);
            }
            if let Err(e) = self.read_client_body().await {
                return Err(match e {
                    Some(e) => self.reject(w, e).await,
                    None => Next::Close,
                });
            }
        }
    }

    /// Reads more of the request body into `rbuf`. The error to answer with, if any: a stall
    /// past `client_body` is a 408; a client that went away gets nothing.
    async fn read_client_body(&mut self) -> Result<(), Option<GatewayError>> {
        match read_some(
            &mut self.io,
            &mut self.rbuf,
            BODY_READ_CHUNK,
            self.t.client_body,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(IoFail::Timeout) => Err(Some(GatewayError::ClientTimeout)),
            Err(_) => Err(None),
        }
    }

    /// Sends `100 Continue` once, when the client asked for it.
    async fn send_continue(&mut self) -> bool {
        if !self.head.expect_continue || self.continue_sent {
            return true;
        }
        self.continue_sent = true;
        write_buf(
            &mut self.io,
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            self.t.client_write,
        )
        .await
        .is_ok()
    }

    /// The consistent-hashing key of this request.
    fn hash_key(&self, on: &HashOn) -> u64 {
        let value: Option<&[u8]> = match on {
            HashOn::ClientIp => None,
            HashOn::Header(name) => self.head.header(name.as_bytes()),
            HashOn::Cookie(name) => self.head.header_values(b"cookie").find_map(|v| {
                v.split(|b| *b == b';').find_map(|kv| {
                    let kv = crate::http::trim_ows(kv);
                    kv.strip_prefix(name.as_bytes())
                        .and_then(|rest| rest.strip_prefix(b"="))
                })
            }),
        };
        hash_bytes(value.unwrap_or(self.peer_ip.as_bytes()))
    }

    async fn proxy(
        &mut self,
        w: &Worker,
        route: &Route,
        group: &UpstreamGroup,
        max_body: u64,
    ) -> Next {
        let policy = route.retry.as_ref();
        let idempotent = self.head.method.is_idempotent();
        let replay = match self.replayable_body(w, policy, max_body).await {
            Ok(r) => r,
            Err(next) => return next,
        };
        let hash = group.hash_on.as_ref().map(|h| self.hash_key(h));
        if let Some(p) = policy {
            p.record_request(Instant::now());
        }
        let mut tried = [usize::MAX; 10];
        let mut ntried = 0;
        let mut tries = 0u32;
        let mut stale_retry_used = false;
        loop {
            tries += 1;
            let probe = match group.breaker.as_ref().map(|b| b.admit(Instant::now())) {
                None => false,
                Some(Admit::Yes { probe }) => probe,
                Some(Admit::Open(d)) => {
                    let secs = d.as_secs().clamp(1, u32::MAX as u64) as u32;
                    return self.reject(w, GatewayError::CircuitOpen(secs)).await;
                }
                Some(Admit::Busy) => return self.reject(w, GatewayError::Overloaded).await,
            };
            let Some(ep) = group.pick(hash, &tried[..ntried]) else {
                if let Some(b) = &group.breaker {
                    b.cancel(probe);
                }
                return self.reject(w, GatewayError::NoHealthyEndpoint).await;
            };
            if ntried < tried.len() {
                tried[ntried] = ep;
                ntried += 1;
            }
            let stats = &group.stats[ep];
            stats.outstanding.set(stats.outstanding.get() + 1);
            // Latency is sampled only for a balancer that uses it (clock reads add up).
            let started = group.tracks_latency().then(Instant::now);
            let result = self
                .attempt(
                    w,
                    route,
                    group,
                    ep,
                    replay.as_ref(),
                    max_body,
                    !stale_retry_used,
                )
                .await;
            let failure = match &result {
                Ok(_) => {
                    if let Some(t0) = started {
                        let now = Instant::now();
                        stats.observe_latency(now - t0, now);
                    }
                    (self.resp.status >= 500).then_some(Failure::Status(self.resp.status))
                }
                Err(AttemptFail::Stale) if !stale_retry_used && replay.is_some() && idempotent => {
                    // A pooled connection the upstream had closed: once more on a new
                    // connection. Not the endpoint's fault, and not a retry of the policy's.
                    stats.outstanding.set(stats.outstanding.get() - 1);
                    if let Some(b) = &group.breaker {
                        b.cancel(probe);
                    }
                    stale_retry_used = true;
                    tries -= 1;
                    ntried -= 1;
                    continue;
                }
                Err(AttemptFail::Stale) | Err(AttemptFail::Reset) | Err(AttemptFail::Bad) => {
                    Some(Failure::Reset)
                }
                Err(AttemptFail::Connect(_)) => Some(Failure::Connect),
                Err(AttemptFail::Timeout) => Some(Failure::Timeout),
                Err(AttemptFail::Client(_)) | Err(AttemptFail::Overloaded) => None,
            };
            let upstream_judged = !matches!(
                result,
                Err(AttemptFail::Client(_)) | Err(AttemptFail::Overloaded)
            );
            let retry = failure.is_some_and(|f| {
                policy.is_some_and(|p| {
                    tries < p.attempts
                        && p.retries_on(f)
                        && replay.is_some()
                        && (idempotent || f == Failure::Connect || p.non_idempotent)
                        && p.take_retry(Instant::now())
                })
            });
            if retry || result.is_err() {
                stats.outstanding.set(stats.outstanding.get() - 1);
                if upstream_judged {
                    record_outcome(w, group, ep, probe, failure.is_some());
                } else if let Some(b) = &group.breaker {
                    b.cancel(probe);
                }
            }
            if retry {
                let p = policy.expect("retry implies a policy");
                drop(result);
                self.resp.raw = Bytes::new();
                monoio::time::sleep(p.backoff(tries)).await;
                continue;
            }
            let mut up = match result {
                Ok(up) => up,
                Err(f) => {
                    let e = match f {
                        AttemptFail::Connect(e) => e,
                        AttemptFail::Stale | AttemptFail::Reset => GatewayError::UpstreamClosed,
                        AttemptFail::Timeout => GatewayError::UpstreamTimeout,
                        AttemptFail::Bad => GatewayError::UpstreamBadResponse,
                        AttemptFail::Overloaded => GatewayError::Overloaded,
                        AttemptFail::Client(None) => return Next::Close,
                        AttemptFail::Client(Some(e)) => {
                            let _ = self.send_error(w, e, true).await;
                            return Next::Close;
                        }
                    };
                    return self.reject(w, e).await;
                }
            };
            let (next, reusable) = self.forward_response(w, route, &mut up).await;
            // The response head shares the upstream read buffer: release it before the
            // connection is reused, so the buffer is reclaimed rather than reallocated.
            self.resp.raw = Bytes::new();
            stats.outstanding.set(stats.outstanding.get() - 1);
            record_outcome(w, group, ep, probe, failure.is_some());
            if reusable {
                group.checkin(up);
            }
            return next;
        }
    }

    /// One try: a connection to `ep`, the request sent, the response head read into
    /// `self.resp`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &mut self,
        w: &Worker,
        route: &Route,
        group: &UpstreamGroup,
        ep: usize,
        replay: Option<&Bytes>,
        max_body: u64,
        allow_pool: bool,
    ) -> Result<UpConn, AttemptFail> {
        // A stale pooled connection costs an idempotent request with a kept body nothing but
        // a resend (see `proxy`), so only other requests pay for the liveness check.
        let verify = !(replay.is_some() && self.head.method.is_idempotent());
        let mut up = self.acquire(group, ep, allow_pool, verify).await?;
        self.put_upstream_head(w, route, &group.endpoints[ep].authority);
        match self.send_request(&mut up, replay, max_body).await {
            Ok(()) => {}
            Err(SendFail::Client(e)) => return Err(AttemptFail::Client(e)),
            Err(SendFail::Upstream) => {
                let head_request = self.head.method == Method::Head;
                // An upstream may answer before it has read the whole body (its own 413, an
                // auth error) and stop reading: pass that answer on rather than a 502. The
                // client's connection closes after it, as its body was not all read.
                if self.head.body != BodyKind::None
                    && self.read_response_head(&mut up, head_request).await.is_ok()
                {
                    return Ok(up);
                }
                return Err(if up.reused {
                    AttemptFail::Stale
                } else {
                    AttemptFail::Reset
                });
            }
        }
        let head_request = self.head.method == Method::Head;
        match self.read_response_head(&mut up, head_request).await {
            Ok(()) => Ok(up),
            Err(RespFail::ClosedEarly) if up.reused => Err(AttemptFail::Stale),
            Err(RespFail::ClosedEarly) => Err(AttemptFail::Reset),
            Err(RespFail::Timeout) => Err(AttemptFail::Timeout),
            Err(RespFail::Bad) => Err(AttemptFail::Bad),
            Err(RespFail::Client) => Err(AttemptFail::Client(None)),
        }
    }

    /// A pooled connection to `ep`, or a new one within the breaker's `max_connections`
    /// (waiting as one of at most `max_pending` requests when the limit is reached).
    async fn acquire(
        &self,
        group: &UpstreamGroup,
        ep: usize,
        allow_pool: bool,
        verify: bool,
    ) -> Result<UpConn, AttemptFail> {
        if allow_pool {
            if let Some(c) = group.checkout(ep, verify) {
                return Ok(c);
            }
        }
        if let Some(b) = &group.breaker {
            if let Some(max) = b.max_connections {
                let deadline = Instant::now() + self.t.upstream_connect;
                while group.conns.open.get() >= max {
                    if group.evict_one_idle() {
                        continue;
                    }
                    if b.pending.get() >= b.max_pending {
                        return Err(AttemptFail::Overloaded);
                    }
                    b.pending.set(b.pending.get() + 1);
                    let left = deadline.saturating_duration_since(Instant::now());
                    let woke = monoio::time::timeout(left, group.conns.freed.notified())
                        .await
                        .is_ok();
                    b.pending.set(b.pending.get() - 1);
                    if !woke {
                        return Err(AttemptFail::Overloaded);
                    }
                    if allow_pool {
                        if let Some(c) = group.checkout(ep, verify) {
                            return Ok(c);
                        }
                    }
                }
            }
        }
        connect(group, ep, self.t.upstream_connect)
            .await
            .map_err(AttemptFail::Connect)
    }

    /// Sends the head in `ubuf` and the body: the buffered `replay` bytes, or streamed from the
    /// client.
    async fn send_request(
        &mut self,
        up: &mut UpConn,
        replay: Option<&Bytes>,
        max_body: u64,
    ) -> Result<(), SendFail> {
        let t_up = self.t.upstream_response;
        let mut head = std::mem::take(&mut self.ubuf);
        let small = replay.is_some_and(|b| b.len() <= COALESCE_BYTES);
        if small {
            head.put_slice(replay.expect("small implies replay"));
        }
        let head = write_buf(&mut up.stream, head, t_up)
            .await
            .map_err(|_| SendFail::Upstream)?;
        self.ubuf = head;
        if let Some(b) = replay {
            if !small {
                write_buf(&mut up.stream, b.clone(), t_up)
                    .await
                    .map_err(|_| SendFail::Upstream)?;
            }
            return Ok(());
        }
        if !self.send_continue().await {
            return Err(SendFail::Client(None));
        }
        match self.head.body {
            BodyKind::Length(n) => self.stream_length_body(up, n).await?,
            BodyKind::Chunked => self.stream_chunked_body(up, max_body).await?,
            BodyKind::None => {}
        }
        // All of the body has been read: an error answer now can keep the connection.
        self.body_done = true;
        Ok(())
    }

    async fn stream_length_body(&mut self, up: &mut UpConn, n: u64) -> Result<(), SendFail> {
        let mut left = n;
        let t_up = self.t.upstream_response;
        if !self.rbuf.is_empty() {
            let part = self.rbuf.split_to(self.rbuf.len().min(left as usize));
            left -= part.len() as u64;
            write_buf(&mut up.stream, part, t_up)
                .await
                .map_err(|_| SendFail::Upstream)?;
        }
        let mut buf = BytesMut::with_capacity(BODY_READ_CHUNK);
        while left > 0 {
            buf.clear();
            let want = (left as usize).min(BODY_READ_CHUNK);
            match read_some(&mut self.io, &mut buf, want, self.t.client_body).await {
                Ok(k) => left -= k as u64,
                Err(IoFail::Timeout) => {
                    return Err(SendFail::Client(Some(GatewayError::ClientTimeout)))
                }
                Err(_) => return Err(SendFail::Client(None)),
            }
            buf = write_buf(&mut up.stream, buf, t_up)
                .await
                .map_err(|_| SendFail::Upstream)?;
        }
        Ok(())
    }

    async fn stream_chunked_body(
        &mut self,
        up: &mut UpConn,
        max_body: u64,
    ) -> Result<(), SendFail> {
        let t_up = self.t.upstream_response;
        // The body goes upstream in canonical form (no extensions, no trailers); a body that
        // already is canonical is passed through without a copy, and `framed` stays empty
        // (and unallocated).
        let mut reframer = ChunkedReframer::new(TrailerPolicy::Drop);
        let mut framed = BytesMut::new();
        loop {
            if !self.rbuf.is_empty() {
                let r = reframer
                    .reframe(&self.rbuf, &mut framed)
                    .map_err(|e| SendFail::Client(Some(GatewayError::BadChunk(e))))?;
                if reframer.data_total() > max_body {
                    return Err(SendFail::Client(Some(GatewayError::BodyTooLarge)));
                }
                let part = self.rbuf.split_to(r.consumed);
                let out = if r.verbatim { part } else { framed.split() };
                if !out.is_empty() {
                    write_buf(&mut up.stream, out, t_up)
                        .await
                        .map_err(|_| SendFail::Upstream)?;
                }
                if r.done {
                    return Ok(());
                }
            }
            self.read_client_body().await.map_err(SendFail::Client)?;
        }
    }

    /// Reads the final response head into `self.resp`, passing 1xx interim responses (other
    /// than 100, which ringway answers itself) to HTTP/1.1 clients.
    async fn read_response_head(
        &mut self,
        up: &mut UpConn,
        head_request: bool,
    ) -> Result<(), RespFail> {
        let deadline = Instant::now() + self.t.upstream_response;
        let mut got_any = false;
        loop {
            if !up.rbuf.is_empty() {
                got_any = true;
                match parse_response(&up.rbuf, head_request, &mut self.resp) {
                    Ok(Some(n)) => {
                        self.resp.raw = up.rbuf.split_to(n).freeze();
                        let status = self.resp.status;
                        if status == 101 {
                            return Err(RespFail::Bad);
                        }
                        if (100..200).contains(&status) {
                            if status != 100 && self.head.version == Version::Http11 {
                                let interim = self.resp.raw.clone();
                                if write_buf(&mut self.io, interim, self.t.client_write)
                                    .await
                                    .is_err()
                                {
                                    return Err(RespFail::Client);
                                }
                            }
                            continue;
                        }
                        return Ok(());
                    }
                    Ok(None) => {}
                    Err(RespError::TooLarge) | Err(RespError::Malformed(_)) => {
                        return Err(RespFail::Bad)
                    }
                }
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(RespFail::Timeout);
            };
            match read_some(&mut up.stream, &mut up.rbuf, UPSTREAM_READ_BUF, left).await {
                Ok(_) => {}
                Err(IoFail::Timeout) => return Err(RespFail::Timeout),
                Err(_) if got_any => return Err(RespFail::Bad),
                Err(_) => return Err(RespFail::ClosedEarly),
            }
        }
    }

    async fn forward_response(
        &mut self,
        w: &Worker,
        route: &Route,
        up: &mut UpConn,
    ) -> (Next, bool) {
        let resp = &self.resp;
        let client_11 = self.head.version == Version::Http11;
        // How the body reaches the client.
        let out = match resp.body {
            RespBody::None => OutFraming::None,
            RespBody::Length(n) => OutFraming::Length(n),
            RespBody::Chunked if client_11 => OutFraming::ChunkedPass,
            RespBody::Chunked => OutFraming::Dechunk,
            RespBody::Close if client_11 => OutFraming::Rechunk,
            RespBody::Close => OutFraming::UntilClose,
        };
        let definite = !matches!(out, OutFraming::Dechunk | OutFraming::UntilClose);
        // `body_done`: the request body was read to its end (else the connection cannot go on).
        let keep = self.head.keep_alive && definite && self.body_done && !w.shutdown.is_set();

        // Response head.
        let f = Forwarding {
            peer_ip: self.peer_ip.as_bytes(),
            request_id: self.id.as_bytes(),
            via: &w.via,
            https: self.info.tls,
            client_cert: None,
            identity: b"",
        };
        let chunked = matches!(out, OutFraming::ChunkedPass | OutFraming::Rechunk);
        let connection = connection_value(keep, self.head.version);
        encode_client_head(
            &mut self.wbuf,
            resp,
            &route.response_headers,
            &f,
            &self.rl_headers,
            chunked,
            connection,
        );

        let t_write = self.t.client_write;
        let t_body = self.t.upstream_body;
        let result: Result<bool, IoFail> = match out {
            OutFraming::None => self.flush_wbuf(t_write).await.map(|_| true),
            OutFraming::Length(n) => self.copy_length(up, n, t_write, t_body).await,
            OutFraming::ChunkedPass | OutFraming::Dechunk => {
                self.copy_chunked(up, out == OutFraming::Dechunk, t_write, t_body)
                    .await
            }
            OutFraming::Rechunk | OutFraming::UntilClose => {
                self.copy_until_close(up, out == OutFraming::Rechunk, t_write, t_body)
                    .await
            }
        };
        match result {
            Ok(complete) => {
                let reusable = complete
                    && self.body_done
                    && self.resp.keep_alive
                    && self.resp.body != RespBody::Close
                    && up.rbuf.is_empty()
                    && !w.shutdown.is_set();
                let next = if keep { Next::KeepAlive } else { Next::Close };
                (next, reusable)
            }
            Err(_) => (Next::Close, false),
        }
    }

    async fn flush_wbuf(&mut self, t: Duration) -> Result<(), IoFail> {
        let buf = std::mem::take(&mut self.wbuf);
        let mut buf = write_buf(&mut self.io, buf, t).await?;
        buf.clear();
        self.wbuf = buf;
        Ok(())
    }

    /// Copies a Content-Length body. Small bodies already read go out with the head in one
    /// write; larger ones are relayed through the upstream connection's buffer, one bounded
    /// read and one write at a time, so a slow client slows the upstream read instead of
    /// growing memory.
    async fn copy_length(
        &mut self,
        up: &mut UpConn,
        n: u64,
        t_write: Duration,
        t_body: Duration,
    ) -> Result<bool, IoFail> {
        let mut left = n;
        let have = up.rbuf.len().min(left.min(usize::MAX as u64) as usize);
        if have as u64 == left && have <= COALESCE_BYTES {
            self.wbuf.extend_from_slice(&up.rbuf[..have]);
            let _ = up.rbuf.split_to(have);
            self.flush_wbuf(t_write).await?;
            return Ok(true);
        }
        self.flush_wbuf(t_write).await?;
        if have > 0 {
            let part = up.rbuf.split_to(have);
            left -= have as u64;
            write_buf(&mut self.io, part, t_write).await?;
        }
        if left == 0 {
            return Ok(true);
        }
        let mut buf = std::mem::take(&mut up.rbuf);
        while left > 0 {
            buf.clear();
            let want = (left.min(BODY_READ_CHUNK as u64)) as usize;
            let k = read_some(&mut up.stream, &mut buf, want, t_body).await?;
            left -= k as u64;
            buf = write_buf(&mut self.io, buf, t_write).await?;
        }
        buf.clear();
        up.rbuf = buf;
        Ok(true)
    }

    /// Copies a chunked body: as it is to HTTP/1.1 clients (the scanner checks every framing
    /// byte and finds the end), or as plain data to HTTP/1.0 clients.
    async fn copy_chunked(
        &mut self,
        up: &mut UpConn,
        dechunk: bool,
        t_write: Duration,
        t_body: Duration,
    ) -> Result<bool, IoFail> {
        let mut scanner = ChunkedScanner::new();
        let mut head_pending = true;
        loop {
            if !up.rbuf.is_empty() {
                if dechunk {
                    let rb = &up.rbuf;
                    let wb = &mut self.wbuf;
                    let r = scanner
                        .scan(rb, |a, b| wb.extend_from_slice(&rb[a..b]))
                        .map_err(|_| IoFail::Io)?;
                    let _ = up.rbuf.split_to(r.consumed);
                    self.flush_wbuf(t_write).await?;
                    head_pending = false;
                    if r.done {
                        return Ok(true);
                    }
                } else {
                    let r = scanner.scan(&up.rbuf, |_, _| {}).map_err(|_| IoFail::Io)?;
                    if head_pending && r.consumed <= COALESCE_BYTES {
                        self.wbuf.extend_from_slice(&up.rbuf[..r.consumed]);
                        let _ = up.rbuf.split_to(r.consumed);
                        self.flush_wbuf(t_write).await?;
                    } else {
                        if head_pending {
                            self.flush_wbuf(t_write).await?;
                        }
                        let part = up.rbuf.split_to(r.consumed);
                        write_buf(&mut self.io, part, t_write).await?;
                    }
                    head_pending = false;
                    if r.done {
                        return Ok(true);
                    }
                }
            } else if head_pending {
                self.flush_wbuf(t_write).await?;
                head_pending = false;
            }
            read_some(&mut up.stream, &mut up.rbuf, UPSTREAM_READ_BUF, t_body).await?;
        }
    }

    /// Copies a body delimited by the upstream closing: re-framed as chunked for HTTP/1.1
    /// clients, as it is (then closing) for HTTP/1.0 clients.
    async fn copy_until_close(
        &mut self,
        up: &mut UpConn,
        rechunk: bool,
        t_write: Duration,
        t_body: Duration,
    ) -> Result<bool, IoFail> {
        self.flush_wbuf(t_write).await?;
        loop {
            if !up.rbuf.is_empty() {
                if rechunk {
                    self.wbuf.clear();
                    put_chunk_size(&mut self.wbuf, up.rbuf.len());
                    self.wbuf.extend_from_slice(&up.rbuf);
                    self.wbuf.put_slice(b"\r\n");
                    up.rbuf.clear();
                    self.flush_wbuf(t_write).await?;
                } else {
                    let part = up.rbuf.split();
                    write_buf(&mut self.io, part, t_write).await?;
                }
            }
            match read_some(&mut up.stream, &mut up.rbuf, UPSTREAM_READ_BUF, t_body).await {
                Ok(_) => {}
                Err(IoFail::Eof) => break,
                Err(e) => return Err(e),
            }
        }
        if rechunk {
            write_buf(&mut self.io, &b"0\r\n\r\n"[..], t_write).await?;
        }
        Ok(false)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OutFraming {
    None,
    Length(u64),
    ChunkedPass,
    Dechunk,
    Rechunk,
    UntilClose,
}

enum SendFail {
    /// The client failed while its body was read; answer with the error, if any, and close.
    Client(Option<GatewayError>),
    /// Writing to the upstream failed.
    Upstream,
}

/// Why one try of a request failed.
enum AttemptFail {
    /// Connect refused or timed out (the error to answer with).
    Connect(GatewayError),
    /// A reused connection failed before any response byte: most likely closed while idle.
    Stale,
    /// The connection failed after the request was sent, before a response head.
    Reset,
    Timeout,
    /// The upstream's response head was invalid.
    Bad,
    /// The client failed (its body timed out or was invalid, or it went away).
    Client(Option<GatewayError>),
    /// `max_connections` reached and no room among `max_pending`.
    Overloaded,
}

enum RespFail {
    ClosedEarly,
    Timeout,
    Bad,
    Client,
}

/// A new connection to endpoint `ep`: TCP, then the TLS handshake when the group has TLS,
/// both within `dur`.
async fn connect(group: &UpstreamGroup, ep: usize, dur: Duration) -> Result<UpConn, GatewayError> {
    let addr = group.endpoints[ep].addr;
    let started = Instant::now();
    let stream = match monoio::time::timeout(dur, TcpStream::connect_addr(addr)).await {
        Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
        Ok(Err(_)) => return Err(GatewayError::UpstreamConnect),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let stream = match &group.tls {
        None => UpStream::Plain(stream),
        Some(t) => {
            use std::os::fd::AsRawFd;
            let fd = stream.as_raw_fd();
            let left = dur.saturating_sub(started.elapsed());
            match monoio::time::timeout(left, tls::connect(t, ep, stream)).await {
                Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
                Ok(Err(e)) => {
                    warn!(
                        "TLS handshake with {addr} (upstream {}) failed: {e:?}",
                        group.name
                    );
                    return Err(GatewayError::UpstreamTls);
                }
                Ok(Ok(s)) => UpStream::Tls(Box::new(s), fd),
            }
        }
    };
    Ok(group.adopt(stream, ep))
}

/// Feeds an upstream outcome to the circuit breaker and to outlier detection: consecutive
/// failures seen by this worker eject the endpoint for every worker (through the hub).
fn record_outcome(w: &Worker, group: &UpstreamGroup, ep: usize, probe: bool, failed: bool) {
    if let Some(b) = &group.breaker {
        b.done(probe, !failed, Instant::now());
    }
    let s = &group.stats[ep];
    if !failed {
        s.failures.set(0);
        return;
    }
    let f = s.failures.get() + 1;
    s.failures.set(f);
    let limit = group.outlier.consecutive_failures;
    if limit > 0 && f >= limit {
        s.failures.set(0);
        match w
            .hub
            .try_eject(group.index, ep, &group.outlier, Instant::now())
        {
            Ejection::Ejected(d) => {
                s.routable.set(false);
                warn!(
                    "outlier detection: {} of upstream {} ejected for {:?} after {f} consecutive failures",
                    group.endpoints[ep].addr, group.name, d
                );
            }
            // Another worker was first: stop using it here too, before the next sync.
            Ejection::Already => s.routable.set(false),
            Ejection::Refused => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_hosts_lose_their_port_and_must_be_plain_names_or_addresses() {
        assert_eq!(host_without_port(b"a.test:8080"), b"a.test");
        assert_eq!(host_without_port(b"a.test"), b"a.test");
        assert_eq!(host_without_port(b"[::1]:80"), b"[::1]");
        for ok in [
            &b"a.test"[..],
            b"10.0.0.1",
            b"[::1]",
            b"[fe80::1]",
            b"under_score",
        ] {
            assert!(valid_host(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b"a/b",
            b"a@b",
            b"a b",
            b"[]",
            b"[::1",
            b"a\"b",
            b"evil.test?x",
            b"[::1]x",
        ] {
            assert!(!valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
