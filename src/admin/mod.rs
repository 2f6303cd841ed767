//! The admin API: a small HTTP/1.1 server on its own listener and threads, off the data
//! plane, through which operators (and `ringway status` / `ringway drain`) look at and steer
//! a running gateway.
//!
//! - [`config`]: the `[admin]` section (address, bearer token, drain delay, limits).
//! - `server`: the listener and connections: blocking sockets, one thread per connection,
//!   at most `max_connections` of them (at the cap the oldest one waiting for a request
//!   makes room), every read and write under a deadline.
//! - `endpoints`: the built-in endpoints (`/live`, `/ready`, `/config`, `/routes`,
//!   `/upstreams`, `/drain`, `/log/level`); `view`: the config as redacted JSON.
//! - [`client`]: the blocking client behind `ringway status` and `ringway drain`.
//!
//! Other modules add endpoints without touching the server: [`Admin::mount`] takes a
//! method, a path (or a prefix ending in `*`) and a handler
//! `Arc<dyn Fn(&AdminRequest) -> AdminResponse + Send + Sync>`. Handlers run on the
//! connection's own thread, so a slow one (a control-plane question to the workers, a reload
//! reading files) holds up no other admin client and never a worker.
//!
//! Why blocking threads rather than a monoio runtime: handlers are synchronous and may wait
//! (`Control::ask` blocks until every worker answered or its deadline passed); on a single
//! event loop one such wait would stall every other admin client, `/live` probes included.
//! A thread per connection, with a hard cap on connections and a deadline on every read and
//! write, keeps each client's cost bounded and needs no io_uring ring of its own.

pub mod client;
pub mod config;
mod endpoints;
mod server;
mod view;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

pub use crate::http::request::Method;

use crate::config::Config;
use crate::control::Control;
use crate::{info, warn};

/// A request to the admin API, read whole (its body is at most [`server::MAX_BODY_BYTES`]).
#[derive(Clone, Debug)]
pub struct AdminRequest {
    pub method: Method,
    /// The path as received, without the query.
    pub path: String,
    /// The query (after `?`), as received; empty when there is none.
    pub query: String,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl AdminRequest {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// A query parameter, percent-decoded (`+` reads as a space, as in forms); `Ok(None)`
    /// when absent or not UTF-8 once decoded; `Err` (the reason, for a 400) when it comes
    /// more than once, since which one was meant cannot be told.
    pub fn query_param(&self, name: &str) -> Result<Option<String>, String> {
        let mut found = None;
        for pair in self.query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if percent_decode(k).as_deref() == Some(name) {
                if found.is_some() {
                    return Err(format!("{name}: given more than once"));
                }
                found = Some(percent_decode(v));
            }
        }
        Ok(found.flatten())
    }
}

/// `%XX` escapes and `+` decoded (RFC 3986 §2.1); `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                // from_str_radix alone would take "+1".
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// An answer from a handler. Header names and values are checked when written: a line that
/// could break the head (CR, LF, a bad name) is dropped with a warning, never sent.
#[derive(Clone, Debug)]
pub struct AdminResponse {
    pub status: u16,
    pub content_type: String,
    /// Further header lines (not Content-Length, Connection or Date, which the server writes).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl AdminResponse {
    /// A JSON answer.
    pub fn json(status: u16, v: &serde_json::Value) -> AdminResponse {
        let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
        body.push(b'\n');
        AdminResponse {
            status,
            content_type: "application/json".into(),
            headers: Vec::new(),
            body,
        }
    }

    /// Any other body, with its media type (`text/plain; version=0.0.4` for Prometheus).
    pub fn text(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> AdminResponse {
        AdminResponse {
            status,
            content_type: content_type.into(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A JSON error: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> AdminResponse {
        AdminResponse::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn with_header(mut self, name: &str, value: &str) -> AdminResponse {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// An endpoint's code.
pub type Handler = Arc<dyn Fn(&AdminRequest) -> AdminResponse + Send + Sync>;

struct Mount {
    method: Method,
    /// The path, or for a prefix mount what precedes the `*`.
    path: String,
    prefix: bool,
    /// Served without the bearer token (the `/live` and `/ready` probes).
    open: bool,
    handler: Handler,
}

impl Mount {
    fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }

    /// GET mounts answer HEAD too (RFC 9110 §9.3.2).
    fn allows(&self, m: Method) -> bool {
        self.method == m || (m == Method::Head && self.method == Method::Get)
    }
}

/// Where a drain stands.
struct Drain {
    /// When the data-plane listeners close.
    close_at: Instant,
    /// Per worker: the stop-accepting job is posted.
    posted: Vec<bool>,
}

/// Open admin connections (a clone of each socket, to cut them off when the gateway stops,
/// and what each is doing), and the threads serving them (joined when the gateway stops,
/// finished ones as new connections come: at most `max_connections` running, as many more
/// closed to make room and about to end, plus those that ended since).
#[derive(Default)]
struct Conns {
    next: u64,
    open: HashMap<u64, OpenConn>,
    threads: Vec<JoinHandle<()>>,
}

/// One admin connection, by id (ids grow with each accepted connection: the smallest is the
/// oldest).
struct OpenConn {
    stream: TcpStream,
    state: ConnState,
}

/// What an admin connection is doing, for making room at the cap (see `server::admit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Waiting for a request, or for the rest of one (new, idle between keep-alive
    /// requests, sending a head or body), or having its answer written. May be closed to
    /// make room.
    Waiting,
    /// Its request is complete and its handler running: kept.
    Serving,
    /// Closed to make room; its thread is ending. Not counted against the cap.
    Evicted,
}

/// How long a stopping gateway waits for its admin connections' threads once their sockets
/// are cut. A handler may still be waiting on the workers (2 s at most, see `endpoints.rs`);
/// past this a thread is left to end on its own, and a warning says how many.
pub const CONN_JOIN_LIMIT: Duration = Duration::from_secs(3);

/// The admin API of one gateway: its routes, token, readiness and drain state. Shared by the
/// listener's thread, the connection threads and whoever mounts endpoints.
pub struct Admin {
    addr: SocketAddr,
    mounts: RwLock<Vec<Mount>>,
    /// SHA-256 of the bearer token: compared in constant time, and of equal length whatever
    /// the token a client sends, so neither the bytes nor the length of the token leak.
    token: RwLock<Option<[u8; 32]>>,
    /// The effective config, for `/config` and `/routes` (a reload replaces it).
    config: RwLock<Arc<Config>>,
    control: Arc<Control>,
    /// The gateway's stop flag: set, the gateway is shutting down (not ready).
    gateway_stop: Arc<AtomicBool>,
    /// Ends the admin listener (set once the workers are gone, or the gateway is dropped).
    stop: AtomicBool,
    /// Cleared by a drain, or by whoever calls [`Admin::set_ready`].
    ready: AtomicBool,
    drain: Mutex<Option<Drain>>,
    /// Workers that ran their stop-accepting job.
    stopped_accepting: Arc<AtomicUsize>,
    /// Run once when a drain closes the listeners (the gateway's own copies of the listening
    /// sockets, kept for a binary upgrade, are closed there, so that new connections are
    /// refused rather than left in a queue nobody accepts from).
    drain_hooks: Mutex<Vec<DrainHook>>,
    conns: Mutex<Conns>,
    /// Signalled when a connection's thread gives its place back.
    conn_gone: std::sync::Condvar,
    limits: server::ConnLimits,
    drain_delay: Duration,
}

/// Work another module does when a drain closes the listeners (see [`Admin::on_drain`]).
pub type DrainHook = Box<dyn FnOnce() + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn token_digest(t: &crate::auth::config::Secret) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, t.0.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The running admin listener, owned by the gateway.
pub struct AdminHandle {
    admin: Arc<Admin>,
    thread: Option<JoinHandle<()>>,
}

impl AdminHandle {
    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// Stops the listener, cuts the open admin connections and waits for the listener thread,
    /// then for the connections' threads, at most [`CONN_JOIN_LIMIT`].
    pub fn stop_and_join(&mut self) {
        self.admin.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.admin.join_conns(Instant::now() + CONN_JOIN_LIMIT);
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.admin.stop();
    }
}

impl Admin {
    /// Binds the admin listener when the config enables it and mounts the built-in
    /// endpoints; [`Admin::spawn`] then serves it. `Ok(None)`: no admin API configured.
    pub fn bind(
        cfg: &Arc<Config>,
        control: Arc<Control>,
        gateway_stop: Arc<AtomicBool>,
    ) -> io::Result<Option<(Arc<Admin>, TcpListener)>> {
        Admin::bind_from(cfg, control, gateway_stop, None)
    }

    /// [`Admin::bind`] that serves `inherited` (the listening socket a replaced process
    /// handed over, non-blocking) instead of binding the address anew.
    pub fn bind_from(
        cfg: &Arc<Config>,
        control: Arc<Control>,
        gateway_stop: Arc<AtomicBool>,
        inherited: Option<TcpListener>,
    ) -> io::Result<Option<(Arc<Admin>, TcpListener)>> {
        let Some(a) = cfg.admin.as_ref().filter(|a| a.enabled) else {
            return Ok(None);
        };
        let token = a.token().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("admin.token_env: {e}"))
        })?;
        let listener = match inherited {
            Some(l) => l,
            None => server::bind(a.address.addr)?,
        };
        let addr = listener.local_addr()?;
        let admin = Arc::new(Admin {
            addr,
            mounts: RwLock::new(Vec::new()),
            token: RwLock::new(token.as_ref().map(token_digest)),
            config: RwLock::new(cfg.clone()),
            stopped_accepting: Arc::new(AtomicUsize::new(0)),
            drain_hooks: Mutex::new(Vec::new()),
            control,
            gateway_stop,
            stop: AtomicBool::new(false),
            ready: AtomicBool::new(true),
            drain: Mutex::new(None),
            conns: Mutex::new(Conns::default()),
            conn_gone: std::sync::Condvar::new(),
            limits: server::ConnLimits {
                max_connections: a.max_connections,
                request_timeout: a.request_timeout.0,
                idle_timeout: a.idle_timeout.0,
            },
            drain_delay: a.drain_delay(),
        });
        endpoints::mount_builtin(&admin);
        Ok(Some((admin, listener)))
    }

    /// Serves the listener on a thread of its own.
    pub fn spawn(self: &Arc<Admin>, listener: TcpListener) -> io::Result<AdminHandle> {
        let admin = self.clone();
        let t = std::thread::Builder::new()
            .name("ringway-admin".into())
            .spawn(move || server::run(admin, listener))?;
        info!("admin API on http://{}", self.addr);
        Ok(AdminHandle {
            admin: self.clone(),
            thread: Some(t),
        })
    }

    /// The bound address (the real port when the config said 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds an endpoint that needs the bearer token (when one is configured). `path` is
    /// exact, or a prefix when it ends in `*` (`"/cache/purge/*"` matches every path that
    /// starts with `/cache/purge/`). An exact mount wins over a prefix, a longer prefix over
    /// a shorter one; mounting the same method and path again replaces the handler. A GET
    /// mount answers HEAD too.
    pub fn mount(&self, method: Method, path: &str, handler: Handler) {
        self.add_mount(method, path, false, handler);
    }

    /// [`Admin::mount`] for an endpoint served without the token (health probes).
    pub fn mount_open(&self, method: Method, path: &str, handler: Handler) {
        self.add_mount(method, path, true, handler);
    }

    fn add_mount(&self, method: Method, path: &str, open: bool, handler: Handler) {
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_string(), true),
            None => (path.to_string(), false),
        };
        let mut mounts = self.mounts.write().unwrap_or_else(|p| p.into_inner());
        mounts.retain(|m| !(m.method == method && m.path == path && m.prefix == prefix));
        mounts.push(Mount {
            method,
            path,
            prefix,
            open,
            handler,
        });
    }

    /// The workers' mailboxes.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The config `/config` and `/routes` show.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the config shown (a reload calls this), and the token with the new config's.
    /// The listener's address, limits and drain delay stay as they were at start.
    pub fn set_config(&self, cfg: Arc<Config>) {
        if let Some(a) = cfg.admin.as_ref().filter(|a| a.enabled) {
            match a.token() {
                Ok(t) => {
                    *self.token.write().unwrap_or_else(|p| p.into_inner()) =
                        t.as_ref().map(token_digest)
                }
                Err(e) => warn!("admin: the new token is not used ({e}); the old one stays"),
            }
        }
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    /// Whether `/ready` answers 200: not drained, not shutting down, not marked unready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.gateway_stop.load(Ordering::SeqCst)
    }

    /// Marks the gateway (un)ready, e.g. during a binary upgrade's hand-over.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Ends the listener and cuts every open admin connection.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in lock(&self.conns).open.values() {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until every connection gave its place back or `deadline` passed, then joins the
    /// threads that ended (a thread gives its place back as its last act); the others are
    /// left to end on their own.
    fn join_conns(&self, deadline: Instant) {
        let mut c = lock(&self.conns);
        while !c.open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            c = self
                .conn_gone
                .wait_timeout(c, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let open = c.open.len();
        let threads = std::mem::take(&mut c.threads);
        drop(c);
        if open > 0 {
            warn!("admin: {open} connections still busy after {CONN_JOIN_LIMIT:?}; not waiting for them");
            // Their threads end on their own; finished ones are joined all the same.
            for t in threads.into_iter().filter(|t| t.is_finished()) {
                let _ = t.join();
            }
        } else {
            for t in threads {
                let _ = t.join();
            }
        }
    }

    /// Starts a drain: readiness fails now, the data-plane listeners close after `delay`.
    /// A drain already under way keeps its schedule. Returns when the listeners close (or
    /// closed).
    pub fn drain(&self, delay: Duration) -> Instant {
        self.set_ready(false);
        let close_at = {
            let mut d = lock(&self.drain);
            match &*d {
                Some(d) => d.close_at,
                None => {
                    let at = Instant::now()
                        .checked_add(delay)
                        .unwrap_or_else(Instant::now);
                    *d = Some(Drain {
                        close_at: at,
                        posted: vec![false; self.control.workers()],
                    });
                    warn!(
                        "admin: drain requested; not ready, data-plane listeners close in {delay:?}"
                    );
                    at
                }
            }
        };
        self.drain_tick();
        close_at
    }

    /// Once a drain's delay has passed, asks each worker (through its mailbox) to stop
    /// accepting; a worker whose mailbox is full is asked again on the next tick.
    fn drain_tick(&self) {
        let mut d = lock(&self.drain);
        let Some(drain) = d.as_mut() else {
            return;
        };
        if Instant::now() < drain.close_at {
            return;
        }
        for (i, posted) in drain.posted.iter_mut().enumerate() {
            if *posted {
                continue;
            }
            let done = self.stopped_accepting.clone();
            let job: crate::control::Job = Box::new(move |w| {
                w.stop_accepting.trigger();
                done.fetch_add(1, Ordering::SeqCst);
            });
            *posted = self.control.post(i, job).is_ok();
        }
        let hooks = std::mem::take(&mut *lock(&self.drain_hooks));
        for hook in hooks {
            hook();
        }
    }

    /// Adds `hook`, run once when a drain closes the data-plane listeners.
    pub fn on_drain(&self, hook: DrainHook) {
        lock(&self.drain_hooks).push(hook);
    }

    /// (drain requested, time left until the listeners close, workers no longer accepting).
    fn drain_state(&self) -> (bool, Option<Duration>, usize) {
        let d = lock(&self.drain);
        (
            d.is_some(),
            d.as_ref()
                .map(|d| d.close_at.saturating_duration_since(Instant::now())),
            self.stopped_accepting.load(Ordering::SeqCst),
        )
    }

    /// Whether a request carries the right bearer token (or none is configured).
    fn check_token(&self, req: &AdminRequest) -> Result<(), AdminResponse> {
        let Some(want) = *self.token.read().unwrap_or_else(|p| p.into_inner()) else {
            return Ok(());
        };
        let challenge = |error: Option<&str>| {
            let v = match error {
                Some(e) => format!("Bearer realm=\"ringway admin\", error=\"{e}\""),
                None => "Bearer realm=\"ringway admin\"".to_string(),
            };
            AdminResponse::error(401, "a valid bearer token is required")
                .with_header("www-authenticate", &v)
        };
        let mut values = req
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .map(|(_, v)| v.as_slice());
        let Some(v) = values.next() else {
            return Err(challenge(None));
        };
        if values.next().is_some() {
            return Err(AdminResponse::error(
                400,
                "more than one Authorization header",
            ));
        }
        // credentials = auth-scheme [ 1*SP token68 ]; the scheme is case-insensitive
        // (RFC 9110 §11.4, RFC 6750 §2.1).
        let (scheme, rest) = match v.iter().position(|b| *b == b' ') {
            Some(p) => (&v[..p], &v[p..]),
            None => (v, &b""[..]),
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return Err(challenge(Some("invalid_request")));
        }
        let token = crate::http::trim_ows(rest);
        let got = ring::digest::digest(&ring::digest::SHA256, token);
        if bool::from(got.as_ref().ct_eq(&want[..])) {
            Ok(())
        } else {
            Err(challenge(Some("invalid_token")))
        }
    }

    /// Refuses what a web page in an operator's browser could send: a cross-origin write
    /// (browsers send `Origin` with it; curl and the CLI do not), and, when no token guards
    /// the API, any request whose `Host` is a name other than `localhost`: a page whose own
    /// name was rebound to 127.0.0.1 (DNS rebinding) would otherwise read the API as its own.
    fn check_browser(&self, req: &AdminRequest) -> Result<(), AdminResponse> {
        let write = !matches!(req.method, Method::Get | Method::Head);
        if write && req.header("origin").is_some() {
            return Err(AdminResponse::error(
                403,
                "cross-origin requests are refused by the admin API",
            ));
        }
        let guarded = self
            .token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if !guarded && !req.header("host").is_some_and(local_host) {
            return Err(AdminResponse::error(
                403,
                "without a token the admin API answers only Host: localhost or an IP address",
            ));
        }
        Ok(())
    }

    /// Finds the endpoint for a request and runs it: 401 without the token (before anything
    /// about the path is revealed), 404 for an unknown path, 405 with `Allow` for a known
    /// path and another method.
    fn dispatch(&self, req: &AdminRequest) -> AdminResponse {
        let (found, allow) = {
            let mounts = self.mounts.read().unwrap_or_else(|p| p.into_inner());
            let on_path: Vec<&Mount> = mounts.iter().filter(|m| m.matches(&req.path)).collect();
            // Exact before prefix, then the longest prefix.
            let best = on_path
                .iter()
                .filter(|m| m.allows(req.method))
                .max_by_key(|m| (!m.prefix, m.path.len()))
                .map(|m| (m.handler.clone(), m.open));
            let mut allow: Vec<&'static str> = Vec::new();
            for m in &on_path {
                allow.push(method_name(m.method));
                if m.method == Method::Get {
                    allow.push("HEAD");
                }
            }
            allow.sort_unstable();
            allow.dedup();
            (best, allow.join(", "))
        };
        if let Err(r) = self.check_browser(req) {
            return r;
        }
        let open = found.as_ref().is_some_and(|(_, open)| *open);
        if !open {
            if let Err(r) = self.check_token(req) {
                return r;
            }
        }
        match found {
            Some((h, _)) => h(req),
            None if allow.is_empty() => AdminResponse::error(404, "no such admin endpoint"),
            None => AdminResponse::error(405, "method not allowed on this endpoint")
                .with_header("allow", &allow),
        }
    }
}

/// A `Host` value that cannot be a rebound DNS name: `localhost` or an IP literal, with an
/// optional port (RFC 9110 §7.2).
fn local_host(v: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(v) else {
        return false;
    };
    let host = if let Some(rest) = v.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => {
                return ip.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        }
    } else {
        v.rsplit_once(':').map_or(v, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// A method's name on the wire.
pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Options => "OPTIONS",
        Method::Patch => "PATCH",
        Method::Trace => "TRACE",
        Method::Connect => "CONNECT",
        Method::Other => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_hosts_pass_the_rebinding_guard() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "localhost:9901",
            "LOCALHOST",
            "[::1]:9901",
            "[::1]",
            "10.0.0.1:80",
        ] {
            assert!(local_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9901",
            "127.0.0.1.nip.io",
            "[::1",
            "[::1]x",
            "",
            "localhost.evil",
        ] {
            assert!(!local_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_bad_escapes_refused() {
        let r = AdminRequest {
            method: Method::Get,
            path: "/x".into(),
            query: "a=1&delay=2%73&b&c=%zz&d=x+y&e=%+1".into(),
            headers: Vec::new(),
            body: Vec::new(),
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        let q = |n: &str| r.query_param(n).unwrap();
        assert_eq!(q("delay").as_deref(), Some("2s"));
        assert_eq!(q("b").as_deref(), Some(""));
        assert_eq!(q("c"), None);
        assert_eq!(q("d").as_deref(), Some("x y"));
        assert_eq!(q("nope"), None);
        assert_eq!(q("e"), None);
        // Twice, however spelled: refused.
        let r = AdminRequest {
            query: "url=a&%75rl=b".into(),
            ..r
        };
        assert!(r.query_param("url").is_err());
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
