//! Workers, listeners and shutdown.
//!
//! Each worker is a thread with its own monoio runtime (io_uring where the kernel allows it,
//! epoll otherwise), its own listening socket per configured listener (`SO_REUSEPORT`, so the
//! kernel spreads connections across workers), and its own [`Worker`] state: route table,
//! upstream pools. Nothing is shared between workers but the stop flag, read every 50 ms by a
//! timer task, off the request path.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Config, DriverChoice};
use crate::control::Control;
use crate::local::IoWheel;
use crate::proxy::{serve, ConnInfo, ListenerRt, Worker};
use crate::ratelimit::HostBuckets;
use crate::tls::{self, UpstreamTls};
use crate::upstream::health::HealthHub;
use crate::{debug, info, warn};

/// How often each worker reads the stop flag and the shared endpoint health.
pub const SYNC_INTERVAL: Duration = crate::local::IO_TICK;

/// How often the idle wheel ticks (see `crate::local::IdleWheel`).
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// Sync intervals between two idle-wheel ticks.
const IDLE_TICK_EVERY: u32 = (IDLE_TICK.as_millis() / SYNC_INTERVAL.as_millis()) as u32;

/// The event-loop driver a worker runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    IoUring,
    Epoll,
}

impl DriverKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DriverKind::IoUring => "io_uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

/// A running gateway: its worker threads and the addresses it listens on.
pub struct Gateway {
    addrs: Vec<SocketAddr>,
    driver: DriverKind,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    buckets: Arc<HostBuckets>,
    /// The workers' mailboxes (see [`crate::control`]).
    control: Arc<Control>,
    /// The admin API listener, when `[admin]` enables it.
    admin: Option<crate::admin::AdminHandle>,
    /// What a reload or a binary upgrade needs: the running config, the listening sockets,
    /// the background threads that follow the config (see [`crate::reload`]).
    pub(crate) reload: crate::reload::ReloadState,
    /// The access log outputs (reopened on SIGUSR1; a reload adds and retires outputs).
    access_logs: Arc<crate::access_log::AccessLogs>,
}

/// The driver asked for: `RINGWAY_DRIVER` (auto, io_uring, epoll) overrides the config, and
/// monoio's own `MONOIO_FORCE_LEGACY_DRIVER` forces epoll.
fn driver_choice(cfg: &Config) -> DriverChoice {
    if std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_some() {
        return DriverChoice::Epoll;
    }
    match std::env::var("RINGWAY_DRIVER").as_deref() {
        Ok("epoll") => DriverChoice::Epoll,
        Ok("io_uring") => DriverChoice::IoUring,
        Ok("auto") => DriverChoice::Auto,
        _ => cfg.server.driver,
    }
}

impl Gateway {
    /// Binds every listener once per worker and starts the workers. Returns once all of them
    /// run, or the reason one could not start.
    pub fn start(cfg: Config, workers: Option<usize>) -> io::Result<Gateway> {
        Gateway::start_with(cfg, workers, crate::upgrade::Inherited::default())
    }

    /// [`Gateway::start`] that first adopts listening sockets handed over by the process it
    /// replaces (matched by address; the others are bound as usual).
    pub fn start_with(
        mut cfg: Config,
        workers: Option<usize>,
        mut inherited: crate::upgrade::Inherited,
    ) -> io::Result<Gateway> {
        let n = workers
            .filter(|n| *n > 0)
            .unwrap_or_else(|| cfg.worker_count());
        cfg.server.max_connections_per_worker =
            connection_cap(cfg.server.max_connections_per_worker, n);
        let cfg = Arc::new(cfg);
        let (listeners_rt, upstream_tls) = build_tls(&cfg)?;
        let (per_worker, addrs, sockets) = bind_listeners(&cfg, n, &mut inherited)?;
        // The admin API's socket, when the replaced process handed it over.
        let admin_socket = cfg
            .admin
            .as_ref()
            .filter(|a| a.enabled)
            .and_then(|a| inherited.take(a.address.addr).into_iter().next());
        if !inherited.is_empty() {
            // Sockets of listeners the new config dropped: closed here (connections waiting
            // in their queues are reset, as a removed listener's would be).
            warn!(
                "takeover: {} handed-over sockets on {:?} match no listener of this config; closed",
                inherited.len(),
                inherited.addrs()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let control = Control::new(n);
        // Bound before the workers start, so that a taken admin port fails the start.
        let admin =
            crate::admin::Admin::bind_from(&cfg, control.clone(), stop.clone(), admin_socket)?;
        let hub = HealthHub::new(&cfg);
        let buckets = HostBuckets::new(&cfg);
        let auth = crate::auth::AuthShared::new(&cfg).map_err(io::Error::other)?;
        let choice = driver_choice(&cfg);
        // One route index for all workers (immutable; per-core copies measured no faster).
        let routes = crate::router::RouteTable::build(&cfg);
        let cache_redis = crate::cache::redis::SharedLayer::new(&cfg);
        let (access_logs, mut worker_logs, log_threads) = match crate::access_log::build(&cfg, n)? {
            Some(b) => (
                b.shared,
                b.workers.into_iter().map(Some).collect(),
                b.threads,
            ),
            None => (
                crate::access_log::AccessLogs::empty(),
                Vec::new(),
                Vec::new(),
            ),
        };
        worker_logs.resize_with(n, || None);
        let mut worker_logs = worker_logs.into_iter();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(DriverKind, Option<String>), String>>();
        let mut threads = Vec::with_capacity(n);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let cfg = cfg.clone();
            let stop = stop.clone();
            let ready = ready_tx.clone();
            let shared = Shared {
                control: control.clone(),
                hub: hub.clone(),
                buckets: buckets.clone(),
                built: crate::proxy::Shared {
                    listeners: listeners_rt.clone(),
                    upstream_tls: upstream_tls.clone(),
                    routes: Some(routes.clone()),
                },
                auth: auth.clone(),
                cache_redis: cache_redis.clone(),
                access_log: worker_logs.next().flatten(),
            };
            let t = std::thread::Builder::new()
                .name(format!("ringway-w{id}"))
                .spawn(move || run_worker(id, cfg, shared, listeners, stop, choice, ready))?;
            threads.push(t);
        }
        drop(ready_tx);
        let mut driver = DriverKind::IoUring;
        let mut fallback: Option<String> = None;
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok((kind, why))) => {
                    if kind == DriverKind::Epoll {
                        driver = DriverKind::Epoll;
                    }
                    if why.is_some() {
                        fallback = why;
                    }
                }
                Ok(Err(e)) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(io::Error::other(e));
                }
                Err(_) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(io::Error::other("a worker exited during start-up"));
                }
            }
        }
        // Joined after the workers: each ends once every worker dropped its sender.
        threads.extend(log_threads);
        if let Some(link) = buckets.redis() {
            threads.push(crate::redis::spawn(link.clone(), stop.clone())?);
        }
        if let Some(l) = &cache_redis {
            threads.push(crate::redis::spawn(l.link().clone(), stop.clone())?);
        }
        if let (Some(r), Some(l)) = (&cfg.cache.redis, &cache_redis) {
            threads.push(crate::cache::redis::spawn_purge_listener(
                r,
                control.clone(),
                l.clone(),
                stop.clone(),
            )?);
        }
        // The health checker and the JWKS fetchers follow the config: a reload replaces them.
        let reload = crate::reload::ReloadState::new(crate::reload::Started {
            cfg: cfg.clone(),
            workers: n,
            hub,
            auth,
            upstream_tls,
            listeners: listeners_rt,
            sockets,
            bound: addrs.clone(),
            access_logs: access_logs.clone(),
        });
        // Said once per process start, not once per worker.
        match (&fallback, driver) {
            (Some(why), _) => {
                warn!("io_uring is not available ({why}); {n} workers run on monoio's epoll driver")
            }
            (None, d) => info!("{n} workers run on the {} driver", d.as_str()),
        }
        // Endpoints of other modules are mounted here, before the admin API serves, one line
        // each (see `crate::admin::Admin::mount`).
        if let Some((a, listener)) = &admin {
            reload.set_admin(a.clone());
            if let Ok(dup) = listener.try_clone() {
                reload.set_admin_socket(a.addr(), dup);
            }
            a.on_drain(reload.drain_hook());
            a.mount(
                crate::admin::Method::Post,
                "/reload",
                crate::reload::admin_handler(&reload, control.clone()),
            );
            // The metrics handler lives with the cache so that its families are appended.
            a.mount(
                crate::admin::Method::Get,
                "/metrics",
                crate::cache::admin::metrics_handler(control.clone()),
            );
            a.mount(
                crate::admin::Method::Post,
                "/cache/purge",
                crate::cache::admin::purge_handler(control.clone()),
            );
            a.mount(
                crate::admin::Method::Get,
                "/cache",
                crate::cache::admin::stats_handler(control.clone()),
            );
        }
        let admin = match admin {
            Some((a, listener)) => Some(a.spawn(listener)?),
            None => None,
        };
        Ok(Gateway {
            addrs,
            driver,
            stop,
            threads,
            buckets,
            control,
            admin,
            reload,
            access_logs,
        })
    }

    /// The access log outputs (`None` when no listener logs).
    pub fn access_logs(&self) -> Option<&Arc<crate::access_log::AccessLogs>> {
        (!self.access_logs.is_empty()).then_some(&self.access_logs)
    }

    /// Reopens the access log files (log rotation; what SIGUSR1 does).
    pub fn reopen_access_logs(&self) {
        self.access_logs.reopen();
    }

    /// Script calls sent and round trips made to Redis so far (0 without the Redis backend).
    pub fn redis_counts(&self) -> (u64, u64) {
        self.buckets.redis().map_or((0, 0), |r| {
            (
                r.commands.load(Ordering::Relaxed),
                r.round_trips.load(Ordering::Relaxed),
            )
        })
    }

    /// The workers' mailboxes: how the admin API and reloads reach each worker.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The admin API, when enabled: its address, and [`crate::admin::Admin::mount`] for
    /// further endpoints.
    pub fn admin(&self) -> Option<&Arc<crate::admin::Admin>> {
        self.admin.as_ref().map(|h| h.admin())
    }

    /// The admin API's bound address (the real port when the config said 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin().map(|a| a.addr())
    }

    /// The bound address of each configured listener, in config order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn driver(&self) -> DriverKind {
        self.driver
    }

    /// Begins a graceful shutdown: stop accepting, finish in-flight requests, close idle
    /// connections.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reload.stop_background();
    }

    /// Waits until every worker has stopped.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Writers a reload started end once the workers closed their side.
        self.access_logs.join_writers();
        // The admin API answers (`/ready`: 503) until the workers are gone.
        if let Some(a) = &mut self.admin {
            a.stop_and_join();
        }
        self.reload.stop_background();
        self.reload.join_background();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.reload.stop_background();
    }
}

/// Refuses an address that another socket already listens on: a probe without
/// `SO_REUSEPORT` fails there, where our own reuse-port sockets would silently share the port.
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already in use by another process"),
            )
        } else {
            io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))
        }
    })
}

/// Descriptors kept out of the connection budget: listeners, upstream pools' spare, Redis,
/// health checks, log files.
const FD_RESERVE: u64 = 256;
/// The smallest per-worker connection cap derived from the descriptor limit.
const MIN_AUTO_CAP: u64 = 64;
/// The largest.
const MAX_AUTO_CAP: u64 = 1 << 20;

/// The per-worker cap on client connections: the configured one, or (0) the descriptor limit
/// less a reserve, shared by the workers. The soft limit is raised to the hard one first, as
/// servers commonly do. An idle client connection needs no upstream connection (pools follow
/// the requests in flight), so the cap does not set descriptors aside for them: a worker that
/// runs out pauses accepting (see `pause_accepting`) instead of failing. (Half the limit was
/// the first choice; with 2 workers and a 20,000 limit, the kernel's uneven spread of 10,000
/// idle connections put one worker at its 4,936 cap while the other had room.)
pub(crate) fn connection_cap(configured: usize, workers: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            1024
        } else {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            lim.rlim_cur
        }
    };
    let per_worker = soft.saturating_sub(FD_RESERVE) / (workers.max(1) as u64);
    per_worker.clamp(MIN_AUTO_CAP, MAX_AUTO_CAP) as usize
}

/// Per worker: (listener slot, socket); the bound address of each listener; and per listener
/// a duplicate of every socket (kept for a binary upgrade's hand-over).
type Bound = (
    Vec<Vec<(usize, std::net::TcpListener)>>,
    Vec<SocketAddr>,
    Vec<Vec<std::net::TcpListener>>,
);

fn bind_listeners(
    cfg: &Config,
    workers: usize,
    inherited: &mut crate::upgrade::Inherited,
) -> io::Result<Bound> {
    let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    let mut addrs = Vec::new();
    let mut dups = Vec::new();
    for (slot, l) in cfg.listeners.iter().enumerate() {
        let (socks, addr) = bind_listener(l, workers, inherited)?;
        let mut all = Vec::new();
        for (list, mine) in per_worker.iter_mut().zip(socks) {
            for s in mine {
                all.push(s.try_clone()?);
                list.push((slot, s));
            }
        }
        dups.push(all);
        addrs.push(addr);
    }
    Ok((per_worker, addrs, dups))
}

/// The sockets of one listener, per worker: those handed over by a replaced process for its
/// address (spread over the workers; a worker may get several), and for every worker left
/// without one a new `SO_REUSEPORT` socket. Returns them with the bound address.
pub(crate) fn bind_listener(
    l: &crate::config::ListenerConfig,
    workers: usize,
    inherited: &mut crate::upgrade::Inherited,
) -> io::Result<(Vec<Vec<std::net::TcpListener>>, SocketAddr)> {
    let mut addr = l.address.addr;
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    let adopted = inherited.take(addr);
    let adopting = !adopted.is_empty();
    for (i, s) in adopted.into_iter().enumerate() {
        per_worker[i % workers.max(1)].push(s);
    }
    if addr.port() != 0 && !adopting {
        probe_free(addr)?;
    }
    for (w, list) in per_worker.iter_mut().enumerate() {
        if !list.is_empty() {
            continue;
        }
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener: no setsockopt per
        // connection.
        s.set_nodelay(true)?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
        s.listen(l.backlog.min(i32::MAX as u32) as i32)?;
        if w == 0 {
            // Port 0: the first worker's port is every other worker's.
            addr = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no inet address"))?;
        }
        list.push(s.into());
    }
    Ok((per_worker, addr))
}

/// What the workers share: endpoint health, the host-wide rate-limit buckets, the TLS
/// configs (with their session caches and ticket keys) and the published JWT key sets.
struct Shared {
    control: Arc<Control>,
    hub: Arc<HealthHub>,
    buckets: Arc<HostBuckets>,
    /// TLS configs and the route index.
    built: crate::proxy::Shared,
    auth: Arc<crate::auth::AuthShared>,
    /// `[cache.redis]`: the response cache's shared layer.
    cache_redis: Option<Arc<crate::cache::redis::SharedLayer>>,
    /// This worker's side of the access log.
    access_log: Option<crate::access_log::WorkerAccessLog>,
}

/// Per upstream group in config order: its TLS, if any.
type UpstreamTlsList = Vec<Option<Arc<UpstreamTls>>>;

/// One rustls config per TLS listener and per TLS upstream group, built once for all workers.
/// The files were checked when the config loaded; an error here means they changed since.
pub(crate) fn build_tls(cfg: &Config) -> io::Result<(Vec<ListenerRt>, UpstreamTlsList)> {
    let fail = |e: tls::TlsConfigError| io::Error::other(format!("key `{}`: {}", e.key, e.reason));
    let mut listeners = Vec::with_capacity(cfg.listeners.len());
    for (i, l) in cfg.listeners.iter().enumerate() {
        let server = match &l.tls {
            Some(t) => Some(tls::server_config(t, &format!("listeners[{i}].tls")).map_err(fail)?),
            None => None,
        };
        listeners.push(ListenerRt::from_config(l, server));
    }
    let mut upstreams = Vec::with_capacity(cfg.upstreams.len());
    for (name, u) in &cfg.upstreams {
        let built = match &u.tls {
            Some(t) => {
                let authorities: Vec<&str> = u
                    .endpoints
                    .iter()
                    .map(|e| e.address.text.as_str())
                    .collect();
                Some(Arc::new(
                    tls::upstream_tls(t, &format!("upstreams.{name}.tls"), &authorities)
                        .map_err(fail)?,
                ))
            }
            None => None,
        };
        upstreams.push(built);
    }
    Ok((listeners, upstreams))
}

type Ready = mpsc::Sender<Result<(DriverKind, Option<String>), String>>;

fn run_worker(
    id: usize,
    cfg: Arc<Config>,
    shared: Shared,
    listeners: Vec<(usize, std::net::TcpListener)>,
    stop: Arc<AtomicBool>,
    choice: DriverChoice,
    ready: Ready,
) {
    let drain = cfg.server.shutdown_timeout.0;
    // The worker's main future, built on whichever runtime comes up.
    let mut main = Some(move || worker_main(id, cfg, shared, listeners, stop, drain));
    let mut why_not_uring = None;
    if choice != DriverChoice::Epoll {
        if monoio::utils::detect_uring() {
            // COOP_TASKRUN: completions are processed when the worker next enters the kernel,
            // not by interrupting it (kernel 5.19+; older kernels refuse it, and get the plain
            // ring).
            let mut urb = io_uring::IoUring::builder();
            urb.setup_coop_taskrun().setup_taskrun_flag();
            let built = RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(urb)
                .with_entries(1024)
                .enable_timer()
                .build()
                .or_else(|_| {
                    RuntimeBuilder::<IoUringDriver>::new()
                        .with_entries(1024)
                        .enable_timer()
                        .build()
                });
            match built {
                Ok(mut rt) => {
                    let _ = ready.send(Ok((DriverKind::IoUring, None)));
                    if let Some(main) = main.take() {
                        rt.block_on(main());
                    }
                    return;
                }
                Err(e) => why_not_uring = Some(format!("io_uring setup failed: {e}")),
            }
        } else {
            why_not_uring = Some("the kernel refused io_uring_setup".to_string());
        }
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            let _ = ready.send(Ok((DriverKind::Epoll, why_not_uring)));
            if let Some(main) = main.take() {
                rt.block_on(main());
            }
        }
        Err(e) => {
            let _ = ready.send(Err(format!("worker {id}: cannot build a runtime: {e}")));
        }
    }
}

/// Decrements the open-connection count when a connection task ends, however it ends.
struct ConnGuard(Rc<Worker>, usize);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.metrics.conn_closed(self.1);
        if self.0.accept_paused.get() > 0 {
            self.0.conn_closed.notify_all();
        }
    }
}

/// Why a worker stopped accepting for a while.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pause {
    /// `max_connections_per_worker` connections are open.
    Cap,
    /// The process or system ran out of file descriptors (EMFILE, ENFILE) or memory.
    Descriptors,
}

/// How long an accept paused for lack of descriptors waits at most before trying again (a
/// closing upstream connection frees one without any client connection closing).
const FD_PAUSE_RETRY: Duration = Duration::from_millis(250);

/// Waits, without spinning, until the worker may accept again: a connection closed, or (for
/// lack of descriptors) a short while passed. Logs one line when an episode begins (once for
/// the worker, not once per accept loop of it).
async fn pause_accepting(w: &Worker, why: Pause, episode: &mut Option<(Pause, Instant)>) {
    if episode.is_none() && w.accept_paused.get() == 0 {
        *episode = Some((why, Instant::now()));
        match why {
            Pause::Cap => warn!(
                "worker {}: {} client connections open (max_connections_per_worker); accepting paused until one closes",
                w.id,
                w.active.get()
            ),
            Pause::Descriptors => warn!(
                "worker {}: out of file descriptors with {} client connections open; accepting paused",
                w.id,
                w.active.get()
            ),
        }
    }
    // A count, not a flag: the worker's other accept loops may be paused too, and a closing
    // connection must wake them all. Taken back on drop, however the wait ends.
    struct Paused<'a>(&'a Worker);
    impl Drop for Paused<'_> {
        fn drop(&mut self) {
            let n = &self.0.accept_paused;
            n.set(n.get().saturating_sub(1));
        }
    }
    w.accept_paused.set(w.accept_paused.get() + 1);
    let _paused = Paused(w);
    let closed = w.conn_closed.notified();
    match why {
        Pause::Cap => {
            monoio::select! {
                _ = closed => {},
                _ = w.shutdown.wait() => {},
                _ = w.stop_accepting.wait() => {},
            }
        }
        Pause::Descriptors => {
            monoio::select! {
                _ = closed => {},
                _ = monoio::time::sleep(FD_PAUSE_RETRY) => {},
                _ = w.shutdown.wait() => {},
                _ = w.stop_accepting.wait() => {},
            }
        }
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

async fn worker_main(
    id: usize,
    cfg: Arc<Config>,
    shared: Shared,
    listeners: Vec<(usize, std::net::TcpListener)>,
    stop: Arc<AtomicBool>,
    drain: Duration,
) {
    // Upstream TLS connections the pool drops finish their close_notify in tasks of their own.
    let _late = crate::tls::LateCloses::allow();
    let worker = Worker::new(
        &cfg,
        id,
        shared.hub,
        shared.buckets,
        &shared.auth,
        shared.built,
    );
    if let Some(l) = shared.access_log {
        let _ = worker.access_log.set(l);
    }
    let w = Rc::new(worker);
    *w.listener_stop.borrow_mut() = (0..cfg.listeners.len())
        .map(|_| Rc::new(crate::proxy::Shutdown::default()))
        .collect();
    drop(cfg);
    let control = shared.control;
    w.cache.set_control(control.clone());
    if control.workers() > 1 {
        // Jobs another worker posts (invalidations, purges) run at once, not at the next tick.
        monoio::spawn(control.clone().serve(w.clone()));
    }
    if let Some(l) = shared.cache_redis {
        w.cache.set_shared(l);
    }
    {
        // Every 50 ms, off the request path: the stop flag, and endpoint health from the hub.
        let w = w.clone();
        monoio::spawn(async move {
            let mut ticks = 0u32;
            while !stop.load(Ordering::Relaxed) {
                w.hub.sync(&w.config().upstreams, Instant::now());
                w.auth().sync();
                w.tick_date();
                if let Some(l) = w.access_log.get() {
                    l.tick_open(|s| w.metrics.open_connections(s) > 0);
                }
                control.run_pending(&w);
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(IDLE_TICK_EVERY) {
                    w.idle_wheel.tick();
                }
                IoWheel::with(|iw| iw.advance(Instant::now()));
                monoio::time::sleep(SYNC_INTERVAL).await;
            }
            w.shutdown.trigger();
            // Idle ticks go on during the drain: a connection accepted just before the
            // shutdown counts its first request's grace in them; so do the I/O deadlines'
            // (the task ends with the runtime).
            let mut drain_ticks = 0u32;
            loop {
                monoio::time::sleep(SYNC_INTERVAL).await;
                IoWheel::with(|iw| iw.advance(Instant::now()));
                drain_ticks = drain_ticks.wrapping_add(1);
                if drain_ticks.is_multiple_of(IDLE_TICK_EVERY) {
                    w.idle_wheel.wake_all();
                }
            }
        });
    }
    {
        let w = w.clone();
        monoio::spawn(async move {
            loop {
                monoio::select! {
                    _ = monoio::time::sleep(Duration::from_secs(1)) => {
                        for g in &w.config().upstreams {
                            g.sweep();
                        }
                    }
                    _ = w.shutdown.wait() => break,
                }
            }
        });
    }
    for (slot, l) in listeners {
        spawn_accept(&w, slot, l);
    }
    w.shutdown.wait().await;
    // One beat for the accept loops to collect their cancelled accepts (a connection one of
    // them completed with is served, and counted in `active` before the drain looks).
    monoio::time::sleep(Duration::from_millis(20)).await;
    let end = Instant::now() + drain;
    while w.active.get() > 0 && Instant::now() < end {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if w.active.get() > 0 {
        warn!(
            "worker {id}: {} connections still open after the shutdown timeout; closing them",
            w.active.get()
        );
    }
    for g in &w.config().upstreams {
        g.clear_idle();
    }
    // close_notify still on its way (a full socket buffer), for as long as each may take.
    let end = Instant::now() + crate::tls::CLOSE_TAIL_WAIT;
    while crate::tls::LateCloses::pending() > 0 && Instant::now() < end {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(l) = w.access_log.get() {
        l.close();
    }
}

/// Accepts each worker keeps in flight per listener. With one, a burst of new connections is
/// taken one per turn of the event loop (a wake-up and an `io_uring_enter` each); with several,
/// the connections that arrived together complete in the same turn.
pub const ACCEPTS_IN_FLIGHT: usize = 4;

/// Starts accepting on `l` (listener `slot`) on this worker, until the worker shuts down or a
/// reload removes the listener (its `listener_stop`): [`ACCEPTS_IN_FLIGHT`] accept loops share
/// the socket.
pub(crate) fn spawn_accept(w: &Rc<Worker>, slot: usize, l: std::net::TcpListener) {
    let stop = w.listener_stop.borrow().get(slot).cloned();
    let Some(stop) = stop else {
        warn!("worker {}: no listener slot {slot}", w.id);
        return;
    };
    let port = l.local_addr().ok().map(|a| a.port());
    match monoio::net::TcpListener::from_std(l) {
        Ok(l) => {
            let l = Rc::new(l);
            for _ in 0..ACCEPTS_IN_FLIGHT {
                monoio::spawn(accept_loop(w.clone(), l.clone(), slot, port, stop.clone()));
            }
        }
        Err(e) => warn!("worker {}: cannot register a listener: {e}", w.id),
    }
}

async fn accept_loop(
    w: Rc<Worker>,
    l: Rc<monoio::net::TcpListener>,
    listener: usize,
    port: Option<u16>,
    removed: Rc<crate::proxy::Shutdown>,
) {
    let mut episode: Option<(Pause, Instant)> = None;
    // One canceller for the loop's accepts (its set of ops keeps its capacity).
    let canceller = monoio::io::Canceller::new();
    loop {
        // A drain ends the loop too: the listener closes, open connections carry on.
        if w.shutdown.is_set() || w.stop_accepting.is_set() || removed.is_set() {
            break;
        }
        if w.active.get() >= w.config().max_connections {
            pause_accepting(&w, Pause::Cap, &mut episode).await;
            continue;
        }
        if let Some((why, since)) = episode.take() {
            info!(
                "worker {}: accepting again after {:?} ({why:?})",
                w.id,
                since.elapsed()
            );
        }
        let accept = l.cancelable_accept(canceller.handle());
        let mut accept = std::pin::pin!(accept);
        let stopping = async {
            monoio::select! {
                _ = w.shutdown.wait() => {},
                _ = w.stop_accepting.wait() => {},
                _ = removed.wait() => {},
            }
        };
        let accepted = monoio::select! {
            r = &mut accept => r,
            _ = stopping => {
                // Stopping (shutdown, drain, hand-over, listener removed): the accept is cancelled and
                // then awaited, so that a connection the kernel already handed to it is served.
                // Dropping an io_uring accept in flight would leak that connection's descriptor
                // (monoio 0.2.4 ignores the completion) and the client would hang, then be
                // reset when the process exits.
                let _ = canceller.cancel();
                if let Ok((stream, peer)) = accept.await {
                    start_conn(&w, stream, peer, listener, port);
                }
                break;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                // The worker's other accept loops may have filled the cap meanwhile: this
                // connection waits, unread, as it would have in the backlog.
                while w.active.get() >= w.config().max_connections
                    && !(w.shutdown.is_set() || w.stop_accepting.is_set())
                {
                    pause_accepting(&w, Pause::Cap, &mut episode).await;
                }
                start_conn(&w, stream, peer, listener, port);
            }
            Err(e) if out_of_descriptors(&e) => {
                pause_accepting(&w, Pause::Descriptors, &mut episode).await;
            }
            Err(e) => {
                // A connection that failed between the handshake and accept (ECONNABORTED):
                // nothing to pause for.
                debug!("worker {}: accept failed: {e}", w.id);
            }
        }
    }
}

/// Starts serving an accepted connection in its own task.
fn start_conn(
    w: &Rc<Worker>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    listener: usize,
    port: Option<u16>,
) {
    w.active.set(w.active.get() + 1);
    // Consulted once per accepted connection (no allocation), never per request.
    // The listener's TLS config comes from the current snapshot, so that a reload's
    // re-read certificates serve the next handshake.
    let (trusted, tls) = {
        let cfg = w.config();
        let tls = cfg.listeners.get(listener).and_then(|l| l.tls.clone());
        (cfg.trusted_proxies.contains(peer.ip()), tls)
    };
    w.metrics.conn_accepted(listener);
    let guard = ConnGuard(w.clone(), listener);
    // Two task bodies, so that a plain connection's task is not sized for TLS.
    match &tls {
        None => {
            monoio::spawn(async move {
                let info = ConnInfo {
                    listener,
                    trusted,
                    port,
                    ..ConnInfo::default()
                };
                serve(&guard.0, stream, peer, info).await;
                drop(guard);
            });
        }
        Some(cfg) => {
            let cfg = cfg.clone();
            monoio::spawn(async move {
                let info = ConnInfo {
                    listener,
                    tls: true,
                    trusted,
                    port,
                    client_subject: None,
                    tls_version: None,
                };
                serve_tls(&guard.0, cfg, stream, peer, info).await;
                drop(guard);
            });
        }
    }
}

/// A TLS connection: the handshake, in the connection's own task, bounded by the head timeout
/// and cut short by a shutdown; then the requests. A failed handshake closes quietly.
async fn serve_tls(
    w: &Worker,
    cfg: Arc<rustls::ServerConfig>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    mut info: ConnInfo,
) {
    let hs = monoio::select! {
        r = monoio::time::timeout(w.config().timeouts.client_head, tls::accept(cfg, stream)) => r,
        _ = w.shutdown.wait() => return,
    };
    match hs {
        Ok(Ok((s, client_subject))) => {
            w.metrics.tls_handshake(info.listener, true);
            info.client_subject = client_subject;
            info.tls_version = s.tls_version();
            serve(w, s, peer, info).await;
        }
        Ok(Err(e)) => {
            w.metrics.tls_handshake(info.listener, false);
            w.tls_handshake_failures
                .set(w.tls_handshake_failures.get() + 1);
            debug!("worker {}: TLS handshake with {peer} failed: {e}", w.id);
        }
        Err(_) => {
            w.metrics.tls_handshake(info.listener, false);
            w.tls_handshake_failures
                .set(w.tls_handshake_failures.get() + 1);
            debug!("worker {}: TLS handshake with {peer} timed out", w.id);
        }
    }
}
