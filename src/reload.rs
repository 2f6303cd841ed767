//! Hot reload: a new config swapped in on every worker at request boundaries, with no second
//! process and no thread left behind.
//!
//! # What a reload does
//! 1. The file is read and validated exactly as `ringway check` does ([`Config::load`]); an
//!    invalid config is refused with its file:line:key message and nothing changes.
//! 2. What is built once for all workers is rebuilt once, on the reloading thread: TLS configs
//!    (certificates and keys re-read), JWT key sets from files (re-read), the route index.
//!    New listeners are bound (one `SO_REUSEPORT` socket per worker). Any failure here still
//!    changes nothing.
//! 3. Each worker gets a job through the control plane ([`crate::control`]): it builds its new
//!    [`Snapshot`], reusing the `Rc<UpstreamGroup>` of every group whose config (and TLS
//!    files) did not change, so pools, balancer state, peak concurrency and the breaker carry
//!    over; swaps it in ([`Worker::swap_config`]); swaps its consumers and credential providers;
//!    starts accept loops for new listeners and stops those of removed ones. Requests in
//!    flight keep the snapshot they hold; keep-alive connections take the new one at their
//!    next request; a connection on a removed listener closes after its request in flight.
//! 4. What follows the config off the workers is adjusted: the endpoint health hub keeps the
//!    slot (and state: active checks, ejections) of every unchanged group, and a changed
//!    group's new slot starts each endpoint it kept from that endpoint's state; the health checker
//!    thread is replaced only when its targets changed (the new one starts from the recorded
//!    health); JWKS fetcher threads of removed or changed providers stop (and are joined),
//!    unchanged ones keep running with their fetched keys; rate-limit buckets keep their ids
//!    (so their tokens) for every unchanged limit.
//!
//! # What does not reload
//! `server.workers`, `server.driver`, `server.shutdown_timeout`, `server.upgrade_socket` and
//! `[rate_limiting]`'s `backend`, `redis` and `max_keys`, and `[admin]` but its token are read
//! at start only, as is the `backlog` of a listener kept by address; a reload that changes
//! them applies everything else and names them in [`ReloadReport::not_reloaded`] (compared
//! with the config the process started with, so every reload names them until undone). The
//! admin listener is not re-bound on a new address: it may be serving the `POST /reload` that
//! asked, and a binary upgrade hands its socket over. The access log follows a reload
//! ([`crate::access_log::AccessLogs`] opens and retires outputs).
//!
//! # Listener slots
//! A connection knows its listener by index into the snapshot's `listeners`. So that the index
//! stays right across reloads, the index is a slot: config order at start; a reload keeps a
//! listener's slot when its configured address is unchanged, gives a listener re-added on a
//! known address its old slot, and appends the others. Removed listeners keep their slot,
//! marked closed. Slots are bounded by the distinct addresses ever configured.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::auth::{AuthShared, WorkerAuth};
use crate::config::{Config, ConfigError, ListenerConfig, UpstreamConfig};
use crate::control::{Control, ControlError};
use crate::http::request::Limits;
use crate::proxy::{ListenerRt, Shutdown, Snapshot, Timeouts, Worker};
use crate::router::{RouteTable, Router};
use crate::server::Gateway;
use crate::tls::UpstreamTls;
use crate::upstream::health::{self, HealthHub};
use crate::upstream::UpstreamGroup;
use crate::{error, info, warn};

/// How long a reload waits for every worker to take its new snapshot (a worker runs control
/// jobs every 50 ms, between requests).
pub const RELOAD_ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// What [`Gateway::start`] built and a reload follows.
pub(crate) struct Started {
    pub cfg: Arc<Config>,
    pub workers: usize,
    pub hub: Arc<HealthHub>,
    pub auth: Arc<AuthShared>,
    pub upstream_tls: Vec<Option<Arc<UpstreamTls>>>,
    pub listeners: Vec<ListenerRt>,
    /// Per listener (config order): a duplicate of each of its sockets.
    pub sockets: Vec<Vec<TcpListener>>,
    /// Per listener (config order): the bound address.
    pub bound: Vec<SocketAddr>,
    /// The access log outputs: a reload opens those its listeners name and retires the rest.
    pub access_logs: Arc<crate::access_log::AccessLogs>,
}

/// A thread that follows the config, with its own stop flag.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listener slot (see the module documentation).
struct ListenerSlot {
    /// The configured address and its occurrence among listeners on that address (port 0 may
    /// appear more than once).
    key: (SocketAddr, usize),
    bound: SocketAddr,
    /// Duplicates of the workers' sockets (for a binary upgrade); empty once removed.
    sockets: Vec<TcpListener>,
    open: bool,
    config: ListenerConfig,
    rt: ListenerRt,
    /// [`listener_tls_print`] taken before its rustls config was built (the files as they
    /// were read then); `None`: not known (the config the gateway started with), so the next
    /// reload builds a new one.
    tls_print: Option<u64>,
}

/// Identity of the limits and concurrency counters, stable across reloads: an unchanged limit
/// keeps its id and so its buckets. Entries are bounded by the distinct limits ever configured.
#[derive(Default)]
struct Ids {
    map: HashMap<u64, u32>,
    next: u32,
}

impl Ids {
    fn get(&mut self, key: u64) -> u32 {
        if let Some(id) = self.map.get(&key) {
            return *id;
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        self.map.insert(key, id);
        id
    }
}

struct Inner {
    cfg: Arc<Config>,
    /// The config the process started with: what its start-only keys still run on (a reload
    /// never applies them), so [`start_only_changes`] compares a new config with this one,
    /// not with the last reloaded one (a change made two reloads ago is still not applied).
    started: Arc<Config>,
    path: Option<PathBuf>,
    workers: usize,
    hub: Arc<HealthHub>,
    auth: Arc<AuthShared>,
    slots: Vec<ListenerSlot>,
    /// Fingerprint of each upstream group of `cfg`, by name.
    groups: HashMap<String, u64>,
    checker: Option<Background>,
    checker_print: u64,
    /// JWKS URL providers: fingerprint and fetcher, by name.
    fetchers: HashMap<String, (u64, Background)>,
    limit_ids: Ids,
    concurrency_ids: Ids,
    generation: u64,
    stopped: bool,
    /// A drain closed the listeners: a reload must not bind new ones.
    drained: bool,
    /// Other threads that stop with the gateway (the upgrade listener).
    others: Vec<Background>,
    /// The admin API, told of each applied config.
    admin: Option<Arc<crate::admin::Admin>>,
    /// A duplicate of the admin API's listening socket, with its address: a binary upgrade
    /// hands it over too (the new process could not bind the port the old one holds).
    admin_socket: Option<(SocketAddr, TcpListener)>,
    access_logs: Arc<crate::access_log::AccessLogs>,
}

/// The reload side of a [`Gateway`].
pub(crate) struct ReloadState {
    inner: Arc<Mutex<Inner>>,
}

/// What changed in a reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Reloads applied since start (this one included).
    pub generation: u64,
    pub routes_before: usize,
    pub routes_after: usize,
    /// Routes (by name, or `#index` when unnamed) whose config is new or changed.
    pub routes_added: Vec<String>,
    /// Routes of the old config that are gone or changed.
    pub routes_removed: Vec<String>,
    /// Upstream groups new in this config.
    pub groups_added: Vec<String>,
    pub groups_removed: Vec<String>,
    /// Groups whose config changed: rebuilt, with fresh pools and health.
    pub groups_changed: Vec<String>,
    /// Groups carried over with their pools, health, ejections and breaker.
    pub groups_kept: Vec<String>,
    pub listeners: Vec<ListenerChange>,
    /// Keys that changed but are read at start only.
    pub not_reloaded: Vec<String>,
    /// The new config's warnings (`Config::warnings`, what `ringway check` prints), also
    /// logged: settings that load but are likely a mistake.
    pub warnings: Vec<String>,
    pub health_checker_restarted: bool,
    pub jwks_fetchers_started: usize,
    pub jwks_fetchers_stopped: usize,
    /// Time from the call to every worker serving the new config.
    pub took_ms: u64,
}

/// One listener in a [`ReloadReport`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ListenerChange {
    /// As configured.
    pub address: SocketAddr,
    /// As bound (differs for port 0).
    pub bound: SocketAddr,
    pub change: ListenerFate,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerFate {
    /// Same address: the same sockets, no connection notices.
    Kept,
    /// Bound by this reload.
    Added,
    /// No longer accepting; its connections finish their request in flight and close.
    Removed,
}

/// Why a reload was refused or did not finish.
#[derive(Debug, Clone)]
pub enum ReloadError {
    /// The config is invalid (the message `ringway check` prints); the running one stays.
    Invalid(ConfigError),
    /// A file named by the config (certificate, key, key set) could not be used; nothing
    /// changed.
    Build(String),
    /// A new listener could not be bound; nothing changed.
    Bind(String),
    /// The new config is committed, but these workers had not taken it within
    /// [`RELOAD_ANSWER_LIMIT`] (they will, when they next run their control jobs).
    Workers(ControlError),
    /// No config file to read (the gateway was started from a config in memory).
    NoFile,
    /// The gateway is shutting down.
    Stopped,
    /// A drain closed the listeners; a reload would open new ones (nothing changed).
    Drained,
    /// A worker's control mailbox is full (it stopped running its jobs); nothing changed.
    Busy(ControlError),
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Invalid(e) => write!(f, "invalid config: {e}"),
            ReloadError::Build(e) => write!(f, "cannot use the new config: {e}"),
            ReloadError::Bind(e) => write!(f, "cannot bind a new listener: {e}"),
            ReloadError::Workers(e) => write!(f, "config committed, but {e}"),
            ReloadError::NoFile => write!(f, "no config file to reload"),
            ReloadError::Stopped => write!(f, "the gateway is shutting down"),
            ReloadError::Drained => write!(f, "the gateway is drained; its listeners stay closed"),
            ReloadError::Busy(e) => write!(f, "nothing changed: {e}"),
        }
    }
}

impl std::error::Error for ReloadError {}

impl ReloadError {
    /// The admin API's status for this refusal: the caller's config is at fault (400), the
    /// server cannot use it (500) or is stopping (503).
    pub fn status(&self) -> u16 {
        match self {
            ReloadError::Invalid(_) | ReloadError::Build(_) => 400,
            ReloadError::Bind(_) | ReloadError::Workers(_) => 500,
            ReloadError::NoFile => 409,
            ReloadError::Stopped | ReloadError::Drained | ReloadError::Busy(_) => 503,
        }
    }
}

/// `POST /reload` on the admin API: reads the config file the gateway runs from, as SIGHUP
/// does; 200 with the [`ReloadReport`], or the refusal with the `ringway check` message.
/// It holds the reload state weakly: the state holds the admin API, which holds this handler.
pub(crate) fn admin_handler(state: &ReloadState, control: Arc<Control>) -> crate::admin::Handler {
    let weak = Arc::downgrade(&state.inner);
    Arc::new(move |_req| {
        let Some(inner) = weak.upgrade() else {
            return crate::admin::AdminResponse::error(503, "the gateway is shutting down");
        };
        let state = ReloadState { inner };
        match state.apply_config_file(&control) {
            Ok(rep) => crate::admin::AdminResponse::json(
                200,
                &serde_json::to_value(&rep).unwrap_or(serde_json::Value::Null),
            ),
            Err(e) => crate::admin::AdminResponse::error(e.status(), &e.to_string()),
        }
    })
}

/// A fingerprint of a config part and of the files it names (their bytes: a certificate
/// replaced on disk is a change).
fn print<T: fmt::Debug>(part: &T, files: &[Option<&str>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    without_spans(&format!("{part:?}")).hash(&mut h);
    for f in files.iter().flatten() {
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// A config part's debug text without the source positions that `toml::Spanned` values
/// print (`span: 120..131, `): where a part stands in the file is not part of what it says,
/// so a comment added above it, or the part moved, changes nothing.
fn without_spans(s: &str) -> String {
    const MARK: &str = "span: ";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(MARK) {
        out.push_str(&rest[..i]);
        let after = &rest[i + MARK.len()..];
        // `N..M, ` exactly; anything else is kept as it was.
        let digits = |t: &str| t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let a = digits(after);
        let range = a > 0
            && after[a..].starts_with("..")
            && digits(&after[a + 2..]) > 0
            && after[a + 2 + digits(&after[a + 2..])..].starts_with(", ");
        if range {
            let b = a + 2 + digits(&after[a + 2..]) + 2;
            rest = &after[b..];
        } else {
            out.push_str(MARK);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A fingerprint of a listener's TLS settings and of the files they name.
fn listener_tls_print(l: &crate::config::ListenerConfig) -> u64 {
    let Some(t) = &l.tls else {
        return 0;
    };
    let mut files: Vec<Option<&str>> = Vec::new();
    for c in &t.certificates {
        files.push(Some(c.cert.as_str()));
        files.push(Some(c.key.as_str()));
    }
    files.push(t.client_auth.as_ref().map(|c| c.ca.as_str()));
    print(t, &files)
}

fn group_print(u: &UpstreamConfig) -> u64 {
    let files = match &u.tls {
        Some(t) => vec![
            t.ca.as_deref(),
            t.client_cert.as_deref(),
            t.client_key.as_deref(),
        ],
        None => Vec::new(),
    };
    print(u, &files)
}

fn route_label(cfg: &Config, i: usize) -> String {
    cfg.routes[i]
        .name
        .clone()
        .unwrap_or_else(|| format!("#{i}"))
}

/// Ids for every route's limits (rate limits, then quotas, as the router compiles them) and
/// concurrency counter. At start (empty maps) this gives the router's own numbering.
fn assign_ids(cfg: &Config, limits: &mut Ids, conc: &mut Ids) -> (Vec<Vec<u32>>, Vec<Option<u32>>) {
    let mut per_route = Vec::with_capacity(cfg.routes.len());
    let mut conc_ids = Vec::with_capacity(cfg.routes.len());
    let fresh_conc = conc.map.is_empty();
    if fresh_conc {
        // The router numbers concurrency counters by route index.
        conc.next = u32::try_from(cfg.routes.len()).unwrap_or(u32::MAX);
    }
    for (i, rc) in cfg.routes.iter().enumerate() {
        // A route's identity: its name (unique in a config), or for an unnamed route its
        // index. Not `route_label`: a route may be named "#1" like the unnamed route 1.
        let label = match rc.name.as_deref() {
            Some(n) => (Some(n), 0),
            None => (None, i),
        };
        let mut ids = Vec::new();
        let mut seen: HashMap<u64, usize> = HashMap::new();
        for l in &rc.rate_limits {
            let p = print(&(&label, "rate", l), &[]);
            let n = seen.entry(p).or_insert(0);
            *n += 1;
            ids.push(limits.get(print(&(p, *n), &[])));
        }
        for q in &rc.quotas {
            let p = print(&(&label, "quota", q), &[]);
            let n = seen.entry(p).or_insert(0);
            *n += 1;
            ids.push(limits.get(print(&(p, *n), &[])));
        }
        per_route.push(ids);
        conc_ids.push(rc.concurrency.as_ref().map(|c| {
            let key = print(&(&label, c), &[]);
            if fresh_conc {
                let id = u32::try_from(i).unwrap_or(u32::MAX);
                conc.map.insert(key, id);
                id
            } else {
                conc.get(key)
            }
        }));
    }
    (per_route, conc_ids)
}

fn checker_print(cfg: &Config, slots: &[usize], prints: &HashMap<String, u64>) -> u64 {
    let targets: Vec<(usize, u64)> = cfg
        .upstreams
        .iter()
        .zip(slots)
        .filter(|((_, u), _)| u.health_check.is_some())
        .map(|((name, _), s)| (*s, prints.get(name).copied().unwrap_or(0)))
        .collect();
    print(&targets, &[])
}

/// One config key's value as text, for comparing two configs.
type ConfigText = fn(&Config) -> String;

/// Keys read at start only whose value in `new` differs from the one the process runs on:
/// `old` is the config it started with (see `Inner::started`).
fn start_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |key: &str, a: String, b: String| {
        if a != b {
            out.push(key.to_string());
        }
    };
    // Keys read only at start, each compared by its debug text in the two configs. The
    // per-worker cache store is sized, and its Redis layer connected, at start (the other
    // `[cache]` keys are compiled into each route's policy and follow a reload). The access
    // log follows a reload (see `AccessLogs::reconfigure`).
    let start_only: [(&str, ConfigText); 12] = [
        ("server.workers", |c| format!("{:?}", c.server.workers)),
        ("server.driver", |c| format!("{:?}", c.server.driver)),
        ("server.shutdown_timeout", |c| {
            format!("{:?}", c.server.shutdown_timeout)
        }),
        ("server.upgrade_socket", |c| {
            format!("{:?}", c.server.upgrade_socket)
        }),
        ("rate_limiting.backend", |c| {
            format!("{:?}", c.rate_limiting.backend)
        }),
        ("rate_limiting.redis", |c| {
            format!("{:?}", c.rate_limiting.redis)
        }),
        ("rate_limiting.max_keys", |c| {
            format!("{:?}", c.rate_limiting.max_keys)
        }),
        ("cache.max_bytes_per_worker", |c| {
            format!("{:?}", c.cache.max_bytes_per_worker)
        }),
        ("cache.max_in_flight_bytes_per_worker", |c| {
            format!("{:?}", c.cache.max_in_flight_bytes_per_worker)
        }),
        ("cache.redis", |c| format!("{:?}", c.cache.redis)),
        ("metrics.enabled", |c| format!("{:?}", c.metrics.enabled)),
        ("log", |c| format!("{:?}", c.log)),
    ];
    for (key, text) in start_only {
        check(key, text(old), text(new));
    }
    // The admin listener runs as started; only its token follows a reload.
    let admin = |c: &Config| c.admin.clone().filter(|a| a.enabled);
    match (admin(old), admin(new)) {
        (Some(o), Some(n)) => {
            check(
                "admin.address",
                o.address.addr.to_string(),
                n.address.addr.to_string(),
            );
            check(
                "admin.max_connections",
                o.max_connections.to_string(),
                n.max_connections.to_string(),
            );
            check(
                "admin.request_timeout",
                format!("{:?}", o.request_timeout.0),
                format!("{:?}", n.request_timeout.0),
            );
            check(
                "admin.idle_timeout",
                format!("{:?}", o.idle_timeout.0),
                format!("{:?}", n.idle_timeout.0),
            );
            check(
                "admin.drain_delay",
                format!("{:?}", o.drain_delay()),
                format!("{:?}", n.drain_delay()),
            );
        }
        (None, None) => {}
        _ => out.push("admin".to_string()),
    }
    out
}

fn spawn_fetcher(name: &str, src: &Arc<crate::auth::jwks::KeySource>) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = crate::auth::jwks::spawn_fetchers(
        vec![name.to_string()],
        std::slice::from_ref(src),
        stop.clone(),
    )
    .into_iter()
    .next();
    Background { stop, thread }
}

impl ReloadState {
    pub(crate) fn new(s: Started) -> ReloadState {
        let cfg = s.cfg;
        let slots: Vec<usize> = (0..cfg.upstreams.len()).collect();
        let groups: HashMap<String, u64> = cfg
            .upstreams
            .iter()
            .map(|(n, u)| (n.clone(), group_print(u)))
            .collect();
        let cp = checker_print(&cfg, &slots, &groups);
        let stop = Arc::new(AtomicBool::new(false));
        let checker =
            health::spawn_checker_slots(&cfg, &slots, s.hub.clone(), stop.clone(), &s.upstream_tls)
                .map(|t| Background {
                    stop,
                    thread: Some(t),
                });
        let mut fetchers = HashMap::new();
        for ((name, j), src) in cfg.auth.jwt.iter().zip(&s.auth.jwt) {
            if j.jwks_url.is_some() {
                let p = print(j, &[j.ca.as_deref()]);
                fetchers.insert(name.clone(), (p, spawn_fetcher(name, src)));
            }
        }
        let mut limit_ids = Ids::default();
        let mut concurrency_ids = Ids::default();
        assign_ids(&cfg, &mut limit_ids, &mut concurrency_ids);
        let mut occurrences: HashMap<SocketAddr, usize> = HashMap::new();
        let listener_slots = cfg
            .listeners
            .iter()
            .zip(s.listeners)
            .zip(s.sockets.into_iter().zip(s.bound))
            .map(|((l, rt), (sockets, bound))| {
                let n = occurrences.entry(l.address.addr).or_insert(0);
                *n += 1;
                ListenerSlot {
                    key: (l.address.addr, *n),
                    bound,
                    sockets,
                    open: true,
                    config: l.clone(),
                    rt,
                    tls_print: None,
                }
            })
            .collect();
        ReloadState {
            inner: Arc::new(Mutex::new(Inner {
                started: cfg.clone(),
                cfg,
                path: None,
                workers: s.workers,
                hub: s.hub,
                auth: s.auth,
                slots: listener_slots,
                groups,
                checker,
                checker_print: cp,
                fetchers,
                limit_ids,
                concurrency_ids,
                generation: 0,
                stopped: false,
                drained: false,
                others: Vec::new(),
                admin: None,
                admin_socket: None,
                access_logs: s.access_logs,
            })),
        }
    }

    /// Another handle on the same state (for the upgrade listener's thread).
    pub(crate) fn handle(&self) -> ReloadState {
        ReloadState {
            inner: self.inner.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every thread that follows the config to stop (the gateway is shutting down).
    pub(crate) fn stop_background(&self) {
        let mut inner = self.lock();
        inner.stopped = true;
        let flags = inner
            .checker
            .iter()
            .chain(inner.fetchers.values().map(|(_, b)| b))
            .chain(inner.others.iter())
            .map(|b| b.stop.clone())
            .collect::<Vec<_>>();
        for f in flags {
            f.store(true, Ordering::SeqCst);
        }
    }

    /// Waits for those threads to end.
    pub(crate) fn join_background(&self) {
        let mut threads = Vec::new();
        {
            let mut inner = self.lock();
            if let Some(b) = inner.checker.as_mut() {
                threads.extend(b.thread.take());
            }
            for (_, b) in inner.fetchers.values_mut() {
                threads.extend(b.thread.take());
            }
            for b in inner.others.iter_mut() {
                threads.extend(b.thread.take());
            }
        }
        for t in threads {
            let _ = t.join();
        }
    }

    /// Registers a thread that stops with the gateway; `false` when it is stopping already.
    pub(crate) fn adopt_thread(&self, stop: Arc<AtomicBool>, thread: JoinHandle<()>) -> bool {
        let mut inner = self.lock();
        if inner.stopped {
            stop.store(true, Ordering::SeqCst);
        }
        inner.others.push(Background {
            stop,
            thread: Some(thread),
        });
        !inner.stopped
    }

    /// Duplicates of every open listener's sockets, with its bound address (what a binary
    /// upgrade hands over).
    pub(crate) fn listening_sockets(&self) -> std::io::Result<Vec<(SocketAddr, TcpListener)>> {
        let inner = self.lock();
        let mut out = Vec::new();
        for s in inner.slots.iter().filter(|s| s.open) {
            for sock in &s.sockets {
                out.push((s.bound, sock.try_clone()?));
            }
        }
        if let Some((addr, sock)) = &inner.admin_socket {
            out.push((*addr, sock.try_clone()?));
        }
        Ok(out)
    }

    /// After a hand-over: the admin API stops accepting (the new process serves it on the
    /// same socket), so that `/ready` and `POST /reload` reach the new process only.
    pub(crate) fn handed_over(&self) {
        let admin = self.lock().admin.clone();
        if let Some(a) = admin {
            a.stop();
        }
    }

    fn reload(&self, control: &Control, mut next: Config) -> Result<ReloadReport, ReloadError> {
        let t0 = Instant::now();
        let mut inner = self.lock();
        if inner.stopped {
            return Err(ReloadError::Stopped);
        }
        if inner.drained {
            return Err(ReloadError::Drained);
        }
        // The workers' jobs are posted after the commit: a worker that could not take its
        // job would stay on the old config for good.
        if let Some(w) = control.full() {
            return Err(ReloadError::Busy(ControlError::Full(w)));
        }
        let workers = inner.workers;
        next.server.max_connections_per_worker =
            crate::server::connection_cap(next.server.max_connections_per_worker, workers);
        // Built once for all workers. Nothing is committed until every fallible step passed.
        // Taken before the files are read for the new configs: a file replaced in between
        // then makes the next reload build again, never keep a stale one.
        let tls_prints: Vec<u64> = next.listeners.iter().map(listener_tls_print).collect();
        let (listeners_rt, upstream_tls) =
            crate::server::build_tls(&next).map_err(|e| ReloadError::Build(e.to_string()))?;
        let fresh = AuthShared::new(&next).map_err(ReloadError::Build)?;
        let mut fetch_prints: HashMap<String, u64> = HashMap::new();
        let old_jwt: Vec<&String> = inner.cfg.auth.jwt.keys().collect();
        let auth = match Arc::try_unwrap(fresh) {
            Ok(mut a) => {
                for (i, (name, j)) in next.auth.jwt.iter().enumerate() {
                    if j.jwks_url.is_none() {
                        continue;
                    }
                    let p = print(j, &[j.ca.as_deref()]);
                    fetch_prints.insert(name.clone(), p);
                    // An unchanged URL provider keeps its source: the keys fetched so far and
                    // the fetcher that refreshes them.
                    let same = inner.fetchers.get(name).is_some_and(|(op, _)| *op == p);
                    if let (true, Some(oi), Some(slot)) = (
                        same,
                        old_jwt.iter().position(|n| *n == name),
                        a.jwt.get_mut(i),
                    ) {
                        if let Some(src) = inner.auth.jwt.get(oi) {
                            *slot = src.clone();
                        }
                    }
                }
                Arc::new(a)
            }
            Err(a) => a,
        };

        // Listeners: keep by configured address, bind the new ones.
        let mut occurrences: HashMap<SocketAddr, usize> = HashMap::new();
        let mut plan = Vec::with_capacity(next.listeners.len());
        let mut binds: Vec<(usize, Vec<Vec<TcpListener>>, SocketAddr)> = Vec::new();
        let mut appended = 0usize;
        let mut kept_options: Vec<String> = Vec::new();
        for (i, l) in next.listeners.iter().enumerate() {
            let n = occurrences.entry(l.address.addr).or_insert(0);
            *n += 1;
            let key = (l.address.addr, *n);
            let found = inner.slots.iter().position(|s| s.key == key);
            match found {
                Some(s) if inner.slots[s].open => {
                    // A kept listener keeps its sockets, so their options.
                    if inner.slots[s].config.backlog != l.backlog {
                        kept_options.push(format!("listeners[{i}].backlog"));
                    }
                    plan.push((s, key, ListenerFate::Kept))
                }
                other => {
                    let (socks, bound) = crate::server::bind_listener(
                        l,
                        workers,
                        &mut crate::upgrade::Inherited::default(),
                    )
                    .map_err(|e| ReloadError::Bind(format!("listeners[{i}].address: {e}")))?;
                    let slot = match other {
                        Some(s) => s,
                        None => {
                            appended += 1;
                            inner.slots.len() + appended - 1
                        }
                    };
                    binds.push((slot, socks, bound));
                    plan.push((slot, key, ListenerFate::Added));
                }
            }
        }
        // A kept listener whose TLS settings and files are unchanged keeps its rustls
        // config, and with it the session cache and the ticket keys: a reload does not make
        // every client do a full handshake again. Any change (a certificate renewed on disk,
        // the client CA) builds a new one, so no session resumes past a changed policy.
        let mut listeners_rt = listeners_rt;
        for ((s, _, fate), (l, (rt, print))) in plan.iter().zip(
            next.listeners
                .iter()
                .zip(listeners_rt.iter_mut().zip(&tls_prints)),
        ) {
            let Some(old) = inner.slots.get(*s).filter(|_| *fate == ListenerFate::Kept) else {
                continue;
            };
            if old.rt.tls.is_some() && l.tls.is_some() && old.tls_print == Some(*print) {
                rt.tls = old.rt.tls.clone();
            }
        }
        let total_slots = inner.slots.len() + appended;
        let in_plan: HashSet<usize> = plan.iter().map(|(s, _, _)| *s).collect();
        let removed: Vec<usize> = (0..inner.slots.len())
            .filter(|s| inner.slots[*s].open && !in_plan.contains(s))
            .collect();

        // Upstream groups: unchanged ones are carried over.
        let prints: HashMap<String, u64> = next
            .upstreams
            .iter()
            .map(|(n, u)| (n.clone(), group_print(u)))
            .collect();
        let kept: Vec<bool> = next
            .upstreams
            .keys()
            .map(|n| {
                inner
                    .groups
                    .get(n)
                    .is_some_and(|p| prints.get(n) == Some(p))
            })
            .collect();
        let kept_names: HashSet<String> = next
            .upstreams
            .keys()
            .zip(&kept)
            .filter(|(_, k)| **k)
            .map(|(n, _)| n.clone())
            .collect();
        // The access log's outputs: the last fallible step (a file that cannot be opened).
        let slot_of: Vec<usize> = plan.iter().map(|(s, _, _)| *s).collect();
        let (access_log, log_kept) = inner
            .access_logs
            .reconfigure(&next, &slot_of, total_slots, workers)
            .map_err(|e| ReloadError::Build(e.to_string()))?;
        kept_options.extend(log_kept);
        // Committed from here on.
        let group_slots = inner
            .hub
            .relayout(&next, &|name| !kept_names.contains(name));
        let (limit_ids, concurrency_ids) = {
            let Inner {
                limit_ids,
                concurrency_ids,
                ..
            } = &mut *inner;
            assign_ids(&next, limit_ids, concurrency_ids)
        };
        let global = next.limits.to_limits();
        let mut listeners = vec![ListenerRt::default(); total_slots];
        let mut listener_limits = vec![global; total_slots];
        for (s, slot) in inner.slots.iter().enumerate() {
            listeners[s] = ListenerRt {
                closed: true,
                ..slot.rt.clone()
            };
            listener_limits[s] = slot.config.request_limits(global);
        }
        for ((s, _, _), (l, rt)) in plan.iter().zip(next.listeners.iter().zip(&listeners_rt)) {
            listeners[*s] = rt.clone();
            listener_limits[*s] = l.request_limits(global);
        }
        let mut per_worker: Vec<Vec<(usize, TcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut dups: HashMap<usize, (SocketAddr, Vec<TcpListener>)> = HashMap::new();
        for (slot, socks, bound) in binds {
            let mut all = Vec::new();
            for (list, mine) in per_worker.iter_mut().zip(socks) {
                for s in mine {
                    if let Ok(d) = s.try_clone() {
                        all.push(d);
                    }
                    list.push((slot, s));
                }
            }
            dups.insert(slot, (bound, all));
        }

        let next = Arc::new(next);
        let job = Arc::new(WorkerJob {
            table: RouteTable::build(&next),
            cfg: next.clone(),
            listeners,
            listener_limits,
            upstream_tls: upstream_tls.clone(),
            group_slots: group_slots.clone(),
            kept: kept.clone(),
            limit_ids,
            concurrency_ids,
            auth: auth.clone(),
            sockets: Mutex::new(per_worker.into_iter().map(Some).collect()),
            removed: removed.clone(),
            total_slots,
            access_log,
        });
        let j = job.clone();
        let answered = control.ask_every(RELOAD_ANSWER_LIMIT, move |w| j.apply(w));

        // The report, from the old state and the new.
        let old = inner.cfg.clone();
        let route_prints = |c: &Config| -> Vec<(u64, String)> {
            (0..c.routes.len())
                .map(|i| (print(&c.routes[i], &[]), route_label(c, i)))
                .collect()
        };
        let (old_routes, new_routes) = (route_prints(&old), route_prints(&next));
        let old_set: HashSet<u64> = old_routes.iter().map(|(p, _)| *p).collect();
        let new_set: HashSet<u64> = new_routes.iter().map(|(p, _)| *p).collect();
        let mut report = ReloadReport {
            generation: inner.generation + 1,
            routes_before: old.routes.len(),
            routes_after: next.routes.len(),
            routes_added: new_routes
                .iter()
                .filter(|(p, _)| !old_set.contains(p))
                .map(|(_, n)| n.clone())
                .collect(),
            routes_removed: old_routes
                .iter()
                .filter(|(p, _)| !new_set.contains(p))
                .map(|(_, n)| n.clone())
                .collect(),
            groups_added: next
                .upstreams
                .keys()
                .filter(|n| !old.upstreams.contains_key(*n))
                .cloned()
                .collect(),
            groups_removed: old
                .upstreams
                .keys()
                .filter(|n| !next.upstreams.contains_key(*n))
                .cloned()
                .collect(),
            groups_changed: next
                .upstreams
                .keys()
                .zip(&kept)
                .filter(|(n, k)| !**k && old.upstreams.contains_key(*n))
                .map(|(n, _)| n.clone())
                .collect(),
            groups_kept: kept_names.into_iter().collect(),
            listeners: Vec::new(),
            not_reloaded: start_only_changes(&inner.started, &next)
                .into_iter()
                .chain(kept_options)
                .collect(),
            // Filled in by `apply`, which takes them before the config moves in here.
            warnings: Vec::new(),
            health_checker_restarted: false,
            jwks_fetchers_started: 0,
            jwks_fetchers_stopped: 0,
            took_ms: 0,
        };
        report.groups_kept.sort();

        // Commit the listener slots.
        for &s in &removed {
            let slot = &mut inner.slots[s];
            slot.open = false;
            slot.sockets.clear();
            slot.rt.closed = true;
            report.listeners.push(ListenerChange {
                address: slot.key.0,
                bound: slot.bound,
                change: ListenerFate::Removed,
            });
        }
        for (((s, key, fate), (l, rt)), print) in plan
            .iter()
            .zip(next.listeners.iter().zip(listeners_rt))
            .zip(tls_prints)
        {
            let mut config = l.clone();
            let (bound, sockets) = match dups.remove(s) {
                Some(d) => d,
                None => {
                    // Kept: the sockets' backlog is the one they were made with.
                    config.backlog = inner.slots[*s].config.backlog;
                    (
                        inner.slots[*s].bound,
                        std::mem::take(&mut inner.slots[*s].sockets),
                    )
                }
            };
            let entry = ListenerSlot {
                key: *key,
                bound,
                sockets,
                open: true,
                config,
                rt,
                tls_print: Some(print),
            };
            if *s < inner.slots.len() {
                inner.slots[*s] = entry;
            } else {
                inner.slots.push(entry);
            }
            report.listeners.push(ListenerChange {
                address: key.0,
                bound,
                change: *fate,
            });
        }

        // The threads that follow the config.
        let cp = checker_print(&next, &group_slots, &prints);
        if cp != inner.checker_print {
            if let Some(mut b) = inner.checker.take() {
                b.halt();
            }
            let stop = Arc::new(AtomicBool::new(false));
            inner.checker = health::spawn_checker_slots(
                &next,
                &group_slots,
                inner.hub.clone(),
                stop.clone(),
                &upstream_tls,
            )
            .map(|t| Background {
                stop,
                thread: Some(t),
            });
            inner.checker_print = cp;
            report.health_checker_restarted = true;
        }
        let stale: Vec<String> = inner
            .fetchers
            .iter()
            .filter(|(n, (p, _))| fetch_prints.get(*n) != Some(p))
            .map(|(n, _)| n.clone())
            .collect();
        for n in stale {
            if let Some((_, mut b)) = inner.fetchers.remove(&n) {
                b.halt();
                report.jwks_fetchers_stopped += 1;
            }
        }
        for ((name, j), src) in next.auth.jwt.iter().zip(&auth.jwt) {
            if j.jwks_url.is_some() && !inner.fetchers.contains_key(name) {
                let p = fetch_prints.get(name).copied().unwrap_or(0);
                inner
                    .fetchers
                    .insert(name.clone(), (p, spawn_fetcher(name, src)));
                report.jwks_fetchers_started += 1;
            }
        }
        inner.groups = prints;
        inner.auth = auth;
        inner.cfg = next;
        inner.generation += 1;
        report.took_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        match answered {
            Ok(_) => Ok(report),
            Err(e) => Err(ReloadError::Workers(e)),
        }
    }
}

/// New listeners' sockets for one worker: (slot, socket).
type SlotSockets = Vec<(usize, TcpListener)>;

/// What each worker needs to build and install its new snapshot.
struct WorkerJob {
    cfg: Arc<Config>,
    table: Arc<RouteTable>,
    /// Per slot.
    listeners: Vec<ListenerRt>,
    listener_limits: Vec<Limits>,
    /// Per group, config order.
    upstream_tls: Vec<Option<Arc<UpstreamTls>>>,
    group_slots: Vec<usize>,
    kept: Vec<bool>,
    limit_ids: Vec<Vec<u32>>,
    concurrency_ids: Vec<Option<u32>>,
    auth: Arc<AuthShared>,
    /// Per worker: the sockets of new listeners, taken by that worker.
    sockets: Mutex<Vec<Option<SlotSockets>>>,
    removed: Vec<usize>,
    total_slots: usize,
    access_log: crate::access_log::Reconfig,
}

impl WorkerJob {
    /// Runs on worker `w`'s thread, between requests.
    fn apply(&self, w: &Rc<Worker>) -> usize {
        let cfg = &*self.cfg;
        let old = w.config();
        let share = match cfg.server.max_connections_per_worker {
            0 => crate::upstream::AUTO_IDLE_MAX,
            n => n,
        };
        let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
        for (i, (name, u)) in cfg.upstreams.iter().enumerate() {
            let reused = if self.kept.get(i).copied().unwrap_or(false) {
                old.upstreams.iter().find(|g| g.name == *name).cloned()
            } else {
                None
            };
            let g = match reused {
                Some(g) => g,
                None => {
                    let slot = self.group_slots.get(i).copied().unwrap_or(i);
                    let mut g = UpstreamGroup::new(slot, name, u, w.id);
                    g.tls = self.upstream_tls.get(i).cloned().flatten();
                    g.auto_idle_max = crate::upstream::AUTO_IDLE_MAX.min(share);
                    Rc::new(g)
                }
            };
            upstreams.push(g);
        }
        // A rebuilt group's endpoints take the health the hub carried over for them now, not
        // at the next 50 ms sync: a request right after the swap must not meet an endpoint
        // that is known to be down.
        w.hub.sync(&upstreams, Instant::now());
        let mut router = Router::with_table(cfg, w.seed(), self.table.clone());
        for ((r, ids), conc) in router
            .routes
            .iter_mut()
            .zip(&self.limit_ids)
            .zip(&self.concurrency_ids)
        {
            for (l, id) in r.limits.iter_mut().zip(ids) {
                l.id = *id;
            }
            if let (Some(c), Some(id)) = (r.concurrency.as_mut(), conc) {
                c.id = *id;
            }
        }
        drop(old);
        w.swap_config(Snapshot {
            listeners: self.listeners.clone(),
            router,
            upstreams,
            limits: cfg.limits.to_limits(),
            listener_limits: self.listener_limits.clone(),
            timeouts: Timeouts::from_config(cfg),
            via: format!("1.1 {}", cfg.server.via).into_bytes().into(),
            max_connections: match cfg.server.max_connections_per_worker {
                0 => usize::MAX,
                n => n,
            },
            trusted_proxies: cfg.server.trusted_proxies.clone(),
        });
        w.swap_auth(WorkerAuth::new(cfg, &self.auth));
        if w.access_log.get().is_none() && self.access_log.logs_anything() {
            // Nothing logged here before: the worker's side starts empty.
            let _ = w
                .access_log
                .set(crate::access_log::WorkerAccessLog::empty(w.id));
        }
        if let Some(l) = w.access_log.get() {
            l.reconfigure(&self.access_log, w.id);
        }
        let mine = self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(w.id)
            .and_then(Option::take)
            .unwrap_or_default();
        {
            let mut stops = w.listener_stop.borrow_mut();
            for &s in &self.removed {
                if let Some(st) = stops.get(s) {
                    st.trigger();
                }
            }
            while stops.len() < self.total_slots {
                stops.push(Rc::new(Shutdown::default()));
            }
            for (slot, _) in &mine {
                if let Some(st) = stops.get_mut(*slot) {
                    *st = Rc::new(Shutdown::default());
                }
            }
        }
        for (slot, l) in mine {
            crate::server::spawn_accept(w, slot, l);
        }
        w.id
    }
}

impl ReloadState {
    /// [`ReloadState::reload`], logged, and shown by the admin API's `/config` and `/routes`.
    pub(crate) fn apply(
        &self,
        control: &Control,
        next: Config,
    ) -> Result<ReloadReport, ReloadError> {
        // As the start logs them: the config is the running one once it is committed.
        let warnings = next.warnings();
        let mut r = self.reload(control, next);
        match &mut r {
            Ok(rep) => {
                info!(
                    "reload #{}: {} routes ({} new or changed, {} gone); groups kept {:?}, added {:?}, changed {:?}, removed {:?}; listeners {}; {} ms",
                    rep.generation,
                    rep.routes_after,
                    rep.routes_added.len(),
                    rep.routes_removed.len(),
                    rep.groups_kept,
                    rep.groups_added,
                    rep.groups_changed,
                    rep.groups_removed,
                    rep.listeners
                        .iter()
                        .map(|l| format!("{} {:?}", l.bound, l.change).to_lowercase())
                        .collect::<Vec<_>>()
                        .join(", "),
                    rep.took_ms
                );
                if !rep.not_reloaded.is_empty() {
                    warn!(
                        "reload #{}: {} changed but apply only at start; the running values stay",
                        rep.generation,
                        rep.not_reloaded.join(", ")
                    );
                }
                for w in &warnings {
                    warn!("reload #{}: {w}", rep.generation);
                }
                rep.warnings = warnings;
            }
            Err(e) => {
                error!("reload refused: {e}");
                // Committed all the same (see below): its warnings hold.
                if matches!(e, ReloadError::Workers(_)) {
                    for w in &warnings {
                        warn!("reload: {w}");
                    }
                }
            }
        }
        // `Workers`: committed too (the lagging workers take it when they next run their jobs).
        if matches!(r, Ok(_) | Err(ReloadError::Workers(_))) {
            let (admin, cfg) = {
                let inner = self.lock();
                (inner.admin.clone(), inner.cfg.clone())
            };
            if let Some(a) = admin {
                a.set_config(cfg);
            }
        }
        r
    }

    /// Reads and validates `path` as `ringway check` does, then applies it.
    pub(crate) fn apply_file(
        &self,
        control: &Control,
        path: &Path,
    ) -> Result<ReloadReport, ReloadError> {
        match Config::load(path) {
            Ok(cfg) => self.apply(control, cfg),
            Err(e) => {
                let e = ReloadError::Invalid(e);
                error!("reload refused: {e}");
                Err(e)
            }
        }
    }

    /// Applies the file the gateway was started with (SIGHUP, `POST /reload`).
    pub(crate) fn apply_config_file(&self, control: &Control) -> Result<ReloadReport, ReloadError> {
        let path = self.lock().path.clone();
        match path {
            Some(p) => self.apply_file(control, &p),
            None => Err(ReloadError::NoFile),
        }
    }

    /// Closes the gateway's own duplicates of every listening socket (a drain: once the
    /// workers closed theirs, the port refuses new connections), and refuses later reloads
    /// (they would bind new listeners). Holds the state weakly.
    pub(crate) fn drain_hook(&self) -> crate::admin::DrainHook {
        let weak = Arc::downgrade(&self.inner);
        Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                inner.drained = true;
                for slot in &mut inner.slots {
                    slot.sockets.clear();
                }
            }
        })
    }

    /// The admin API whose `/config` and `/routes` follow each applied reload.
    pub(crate) fn set_admin(&self, admin: Arc<crate::admin::Admin>) {
        self.lock().admin = Some(admin);
    }

    /// A duplicate of the admin API's listening socket, for a binary upgrade's hand-over.
    pub(crate) fn set_admin_socket(&self, addr: SocketAddr, sock: TcpListener) {
        self.lock().admin_socket = Some((addr, sock));
    }
}

impl Gateway {
    /// Swaps in `next` on every worker at request boundaries (see [`crate::reload`]). On
    /// `Err`, except [`ReloadError::Workers`], the running config is unchanged. Serialised:
    /// a reload that arrives during another waits for it. Logs its outcome.
    pub fn reload(&self, next: Config) -> Result<ReloadReport, ReloadError> {
        self.reload.apply(self.control(), next)
    }

    /// Reads and validates `path` as `ringway check` does, then [`Gateway::reload`]s it. An
    /// invalid file is refused with its file:line:key message (and logged).
    pub fn reload_file(&self, path: &Path) -> Result<ReloadReport, ReloadError> {
        self.reload.apply_file(self.control(), path)
    }

    /// Remembers the file this gateway's config came from (for [`Gateway::reload_config_file`]).
    pub fn set_config_path(&self, path: PathBuf) {
        self.reload.lock().path = Some(path);
    }

    /// Reloads the file set by [`Gateway::set_config_path`] (what SIGHUP and `POST /reload`
    /// do).
    pub fn reload_config_file(&self) -> Result<ReloadReport, ReloadError> {
        self.reload.apply_config_file(self.control())
    }

    /// The bound address of each listener of the running config, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        let inner = self.reload.lock();
        let mut occurrences: HashMap<SocketAddr, usize> = HashMap::new();
        inner
            .cfg
            .listeners
            .iter()
            .filter_map(|l| {
                let n = occurrences.entry(l.address.addr).or_insert(0);
                *n += 1;
                let key = (l.address.addr, *n);
                inner
                    .slots
                    .iter()
                    .find(|s| s.key == key && s.open)
                    .map(|s| s.bound)
            })
            .collect()
    }

    /// The running config (the last one a reload applied).
    pub fn running_config(&self) -> Arc<Config> {
        self.reload.lock().cfg.clone()
    }

    /// Reloads applied since start.
    pub fn reload_generation(&self) -> u64 {
        self.reload.lock().generation
    }
}
