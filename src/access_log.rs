//! The access log: one JSON line per request, written off the request path.
//!
//! ```text
//!  request end ──► worker's buffer (preallocated, per output) ──► full or 50 ms tick:
//!                  try_send to the output's writer thread (bounded channel) ──► file / stdout
//!                  ◄── emptied buffer comes back over the worker's own bounded channel
//! ```
//!
//! A request formats its line straight into the worker's current buffer: no allocation, no
//! lock, no system call. When the line does not fit, the full buffer is handed to the writer
//! with `try_send` and a spare one is taken with `try_recv`; when the writer is behind (a slow
//! disk) and no spare has come back, the line is dropped and counted
//! (`ringway_access_log_dropped_total`): the request path never waits for the disk.
//!
//! Each output has one writer thread. [`AccessLogs::reopen`] (SIGUSR1) makes each writer
//! reopen its file before its next write, for log rotation.
//!
//! Client-supplied text (method, host, path, request id) is JSON-escaped, bytes outside
//! printable ASCII as `\u00XX`, and each such field is cut at [`MAX_FIELD_BYTES`], so a line
//! stays valid JSON and bounded whatever the request held.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::{config::ByteSize, warn};

/// Most bytes of one client-supplied field written to a line (before escaping).
pub const MAX_FIELD_BYTES: usize = 1024;
/// The smallest buffer: the longest line (four client fields at [`MAX_FIELD_BYTES`], each
/// escaped to at most 6 bytes a byte, plus the fixed fields) always fits in an empty one.
pub const MIN_BUFFER: u64 = 32 * 1024;
/// The largest buffer accepted in the config.
pub const MAX_BUFFER: u64 = 64 * 1024 * 1024;
/// Buffers per worker and output: one being filled, the rest in flight or waiting.
pub const BUFFERS_PER_WORKER: usize = 4;
/// Full buffers waiting for one writer thread, from all workers together.
pub const WRITER_QUEUE: usize = 16;
/// How long a worker that stops waits at most for its last buffer to be taken.
pub const FINAL_FLUSH_WAIT: Duration = Duration::from_secs(1);
/// How often an idle writer thread checks for a reopen request.
const WRITER_POLL: Duration = Duration::from_millis(100);

/// Lines the writer threads failed to write (the output refused them: disk full, I/O error),
/// since the process started, over every output (`ringway_access_log_write_lost_total`).
/// Counted by the writer threads, never on the request path.
static WRITE_LOST: AtomicU64 = AtomicU64::new(0);

/// Lines lost because writing them failed, in this process (see [`WRITE_LOST`]).
pub fn lines_lost_to_write_errors() -> u64 {
    WRITE_LOST.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/// `[access_log]`, and a listener's `[listeners.access_log]` (which replaces it for that
/// listener).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Default off.
    #[serde(default)]
    pub enabled: bool,
    /// `"stdout"` or a file path (opened for appending, created if missing).
    #[serde(default = "d_output", deserialize_with = "de_output")]
    pub output: String,
    /// Fraction of requests logged, 0.0 to 1.0 (default 1.0: all).
    #[serde(default)]
    pub sample: Fraction,
    /// Fields written, in this order (default: all, in [`Field::ALL`] order).
    #[serde(default = "d_fields")]
    pub fields: Vec<Field>,
    /// Size of each per-worker buffer (default 256 KiB; 32 KiB to 64 MiB).
    #[serde(default = "d_buffer")]
    pub buffer: BufferSize,
}

fn d_output() -> String {
    "stdout".into()
}
fn de_output<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.contains('\0') {
        return Err(de::Error::custom(
            "must be \"stdout\" or a file path (not empty)",
        ));
    }
    Ok(s)
}
fn d_fields() -> Vec<Field> {
    Field::ALL.to_vec()
}
fn d_buffer() -> BufferSize {
    BufferSize(256 * 1024)
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: false,
            output: d_output(),
            sample: Fraction::default(),
            fields: d_fields(),
            buffer: d_buffer(),
        }
    }
}

/// A number from 0.0 to 1.0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fraction(pub f64);

impl Default for Fraction {
    fn default() -> Self {
        Fraction(1.0)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=1.0).contains(&v) {
            return Err(de::Error::custom(format!(
                "must be between 0.0 and 1.0, not {v}"
            )));
        }
        Ok(Fraction(v))
    }
}

/// A buffer size within [`MIN_BUFFER`]..=[`MAX_BUFFER`] ("256KiB", or bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSize(pub u64);

impl<'de> Deserialize<'de> for BufferSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = ByteSize::deserialize(d)?.0;
        if !(MIN_BUFFER..=MAX_BUFFER).contains(&v) {
            return Err(de::Error::custom(format!(
                "must be between {MIN_BUFFER} and {MAX_BUFFER} bytes, not {v}"
            )));
        }
        Ok(BufferSize(v))
    }
}

/// A field of an access log line; its JSON key is its snake_case name.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// RFC 3339 UTC with milliseconds, when the response ended.
    Time,
    RequestId,
    /// 32 hex digits (W3C trace context).
    TraceId,
    /// The client's address (the TCP peer).
    Client,
    Method,
    Host,
    /// Path and query as received.
    Path,
    /// 0 when no response was written (the client went away).
    Status,
    BytesIn,
    BytesOut,
    /// Total latency in milliseconds (microsecond precision).
    DurationMs,
    /// Upstream latency in milliseconds, or null without an upstream phase.
    UpstreamDurationMs,
    Route,
    /// The upstream group.
    Upstream,
    /// The endpoint's address.
    Endpoint,
    Consumer,
    /// The gateway error kind of a gateway-made error answer.
    Error,
    Retries,
    /// "1.2" or "1.3", or null on a plain connection.
    Tls,
}

impl Field {
    pub const ALL: [Field; 19] = [
        Field::Time,
        Field::RequestId,
        Field::TraceId,
        Field::Client,
        Field::Method,
        Field::Host,
        Field::Path,
        Field::Status,
        Field::BytesIn,
        Field::BytesOut,
        Field::DurationMs,
        Field::UpstreamDurationMs,
        Field::Route,
        Field::Upstream,
        Field::Endpoint,
        Field::Consumer,
        Field::Error,
        Field::Retries,
        Field::Tls,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Field::Time => "time",
            Field::RequestId => "request_id",
            Field::TraceId => "trace_id",
            Field::Client => "client",
            Field::Method => "method",
            Field::Host => "host",
            Field::Path => "path",
            Field::Status => "status",
            Field::BytesIn => "bytes_in",
            Field::BytesOut => "bytes_out",
            Field::DurationMs => "duration_ms",
            Field::UpstreamDurationMs => "upstream_duration_ms",
            Field::Route => "route",
            Field::Upstream => "upstream",
            Field::Endpoint => "endpoint",
            Field::Consumer => "consumer",
            Field::Error => "error",
            Field::Retries => "retries",
            Field::Tls => "tls",
        }
    }
}

/// Most fields in a line (each field once).
const MAX_FIELDS: usize = Field::ALL.len();

/// What one listener logs: its fields in order and its sampling threshold.
#[derive(Clone, Copy, Debug)]
struct Settings {
    fields: [Field; MAX_FIELDS],
    nfields: u8,
    /// A request is logged when a random u32 is below this (`1 << 32`: always).
    threshold: u64,
}

impl Settings {
    fn new(c: &AccessLogConfig) -> Settings {
        let mut fields = [Field::Time; MAX_FIELDS];
        let mut n = 0;
        for f in &c.fields {
            if !fields[..n].contains(f) && n < MAX_FIELDS {
                fields[n] = *f;
                n += 1;
            }
        }
        Settings {
            fields,
            nfields: n as u8,
            threshold: (c.sample.0 * 4_294_967_296.0) as u64,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared: the outputs and their writer threads.

struct Output {
    /// Stable across reloads: workers find their side of an output by it.
    id: u64,
    name: String,
    /// The per-worker buffer size it was opened with (a kept output keeps it).
    buffer: u64,
    reopen: Arc<AtomicBool>,
    /// No listener logs to it any more: each worker closes its side once it holds no line
    /// for it and no connection of a listener a reload removed still writes to it; then the
    /// writer ends.
    retired: bool,
}

/// The outputs of a gateway, and the writer threads reloads started.
#[derive(Default)]
struct Registry {
    outputs: Vec<Output>,
    /// Writer threads a reload started, by output id (those of the start are joined with the
    /// workers). Joined once finished, at the next reload or when the gateway stops.
    threads: Vec<(u64, JoinHandle<()>)>,
    next_id: u64,
}

/// The access log outputs of a gateway; [`AccessLogs::reopen`] is what SIGUSR1 calls.
pub struct AccessLogs {
    reg: std::sync::Mutex<Registry>,
}

impl AccessLogs {
    /// A gateway whose listeners do not log (a reload may add outputs).
    pub fn empty() -> Arc<AccessLogs> {
        Arc::new(AccessLogs {
            reg: std::sync::Mutex::new(Registry::default()),
        })
    }

    fn reg(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every writer to reopen its file before its next write (log rotation: move the
    /// file, then call this). Returns at once; stdout is left as it is.
    pub fn reopen(&self) {
        for o in &self.reg().outputs {
            o.reopen.store(true, Ordering::Release);
        }
    }

    /// The outputs listeners log to, as configured ("stdout" or a path).
    pub fn outputs(&self) -> Vec<String> {
        self.reg()
            .outputs
            .iter()
            .filter(|o| !o.retired)
            .map(|o| o.name.clone())
            .collect()
    }

    /// Whether no listener logs.
    pub fn is_empty(&self) -> bool {
        self.reg().outputs.iter().all(|o| o.retired)
    }

    /// Joins the writer threads reloads started (call once the workers stopped: a writer ends
    /// when every worker has closed its side).
    pub fn join_writers(&self) {
        let threads = std::mem::take(&mut self.reg().threads);
        for (_, t) in threads {
            let _ = t.join();
        }
    }

    /// What a reload to `cfg` changes (see [`Reconfig`]): outputs a listener names that are
    /// not open are opened, with their writer threads, here on the reloading thread; outputs
    /// no listener names any more are retired. `slots` gives each listener of `cfg` (config
    /// order) its slot; `total` is the number of slots, all others being closed listeners.
    /// A file that cannot be opened fails the call, and nothing changes. Also returns the
    /// keys that cannot follow (a kept output keeps its buffer size).
    pub(crate) fn reconfigure(
        &self,
        cfg: &crate::config::Config,
        slots: &[usize],
        total: usize,
        workers: usize,
    ) -> io::Result<(Reconfig, Vec<String>)> {
        let mut reg = self.reg();
        // Writers of outputs retired earlier that ended: joined, and forgotten.
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut reg.threads)
            .into_iter()
            .partition(|(_, t)| t.is_finished());
        reg.threads = running;
        for (id, t) in done {
            let _ = t.join();
            reg.outputs.retain(|o| o.id != id || !o.retired);
        }
        let eff = per_listener(cfg);
        let mut names: Vec<(String, u64)> = Vec::new();
        for c in eff.iter().flatten() {
            match names.iter_mut().find(|(n, _)| *n == c.output) {
                Some((_, b)) => *b = (*b).max(c.buffer.0),
                None => names.push((c.output.clone(), c.buffer.0)),
            }
        }
        let live = |reg: &Registry, name: &str| {
            reg.outputs
                .iter()
                .find(|o| !o.retired && o.name == name)
                .map(|o| (o.id, o.buffer))
        };
        // Fallible first: every new output's file.
        let mut opened = Vec::new();
        for (name, buf) in &names {
            if live(&reg, name).is_none() {
                opened.push((name.clone(), *buf, Sink::open(name)?));
            }
        }
        let mut new_sinks: Vec<Vec<WorkerSink>> = (0..workers).map(|_| Vec::new()).collect();
        for (name, buf, sink) in opened {
            let id = reg.next_id;
            reg.next_id = reg.next_id.wrapping_add(1);
            // A spawn that fails drops its sinks: the writers started so far end, and are
            // joined with the others.
            let (out, sinks, t) = start_output(id, &name, buf, sink, workers)?;
            reg.threads.push((id, t));
            for (list, s) in new_sinks.iter_mut().zip(sinks) {
                list.push(s);
            }
            reg.outputs.push(out);
        }
        // Committed: retire what no listener names.
        let mut retired = Vec::new();
        for o in reg.outputs.iter_mut() {
            if !o.retired && !names.iter().any(|(n, _)| *n == o.name) {
                o.retired = true;
                retired.push(o.id);
            }
        }
        let mut table = vec![SlotLog::Closed; total];
        let mut keep = Vec::new();
        for ((i, c), slot) in eff.iter().enumerate().zip(slots) {
            let entry = match c {
                None => SlotLog::Off,
                Some(c) => match live(&reg, &c.output) {
                    Some((id, buffer)) => {
                        if buffer < c.buffer.0 {
                            let key = if cfg.listeners[i].access_log.is_some() {
                                format!("listeners[{i}].access_log.buffer")
                            } else {
                                "access_log.buffer".to_string()
                            };
                            if !keep.contains(&key) {
                                keep.push(key);
                            }
                        }
                        SlotLog::Log(id, Settings::new(c))
                    }
                    None => SlotLog::Off,
                },
            };
            if let Some(t) = table.get_mut(*slot) {
                *t = entry;
            }
        }
        Ok((
            Reconfig {
                slots: table,
                retired,
                sinks: std::sync::Mutex::new(new_sinks.into_iter().map(Some).collect()),
            },
            keep,
        ))
    }
}

/// What a listener slot logs after a reload.
#[derive(Clone, Copy, Debug)]
enum SlotLog {
    /// Nothing (no access log for it).
    Off,
    /// To this output, with these settings.
    Log(u64, Settings),
    /// Its listener is gone: the requests still in flight on its connections are logged as
    /// before, then the entry goes.
    Closed,
}

/// A reload's change to every worker's access log, applied by
/// [`WorkerAccessLog::reconfigure`] on each worker's thread.
pub(crate) struct Reconfig {
    /// By slot.
    slots: Vec<SlotLog>,
    /// Outputs no listener names any more.
    retired: Vec<u64>,
    /// Per worker: its side of each output this reload opened (taken by that worker).
    sinks: std::sync::Mutex<Vec<Option<Vec<WorkerSink>>>>,
}

impl Reconfig {
    /// Whether a listener logs after the reload (a worker that logged nothing so far needs
    /// its side of the access log only then: requests are timed while one exists).
    pub(crate) fn logs_anything(&self) -> bool {
        self.slots.iter().any(|s| matches!(s, SlotLog::Log(..)))
    }
}

/// What [`build`] makes: the shared handle, one [`WorkerAccessLog`] per worker (to move into
/// its thread), and the writer threads (joined after the workers).
pub struct Built {
    pub shared: Arc<AccessLogs>,
    pub workers: Vec<WorkerAccessLog>,
    pub threads: Vec<JoinHandle<()>>,
}

/// The effective access log of each listener: its own table, else the global one; `None` when
/// that is off.
fn per_listener(cfg: &crate::config::Config) -> Vec<Option<&AccessLogConfig>> {
    cfg.listeners
        .iter()
        .map(|l| l.access_log.as_ref().unwrap_or(&cfg.access_log))
        .map(|c| c.enabled.then_some(c))
        .collect()
}

/// Whether any listener logs.
pub fn any_enabled(cfg: &crate::config::Config) -> bool {
    per_listener(cfg).iter().any(Option::is_some)
}

/// Starts the writer thread of one output opened as `sink`, and makes each worker's side.
fn start_output(
    id: u64,
    name: &str,
    buf: u64,
    sink: Sink,
    workers: usize,
) -> io::Result<(Output, Vec<WorkerSink>, JoinHandle<()>)> {
    let reopen = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(WRITER_QUEUE);
    let mut returns = Vec::with_capacity(workers);
    let mut sinks = Vec::with_capacity(workers);
    for worker in 0..workers {
        let (ret_tx, ret_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS_PER_WORKER);
        for _ in 1..BUFFERS_PER_WORKER {
            // Cannot fail: the channel holds BUFFERS_PER_WORKER.
            let _ = ret_tx.try_send(Vec::with_capacity(buf as usize));
        }
        returns.push(ret_tx);
        sinks.push(WorkerSink {
            id,
            worker,
            cap: buf as usize,
            cur: RefCell::new(Some(Vec::with_capacity(buf as usize))),
            tx: RefCell::new(Some(tx.clone())),
            spare: ret_rx,
            retired: Cell::new(false),
        });
    }
    drop(tx);
    let flag = reopen.clone();
    let label = name.to_string();
    let t = std::thread::Builder::new()
        .name("ringway-access-log".into())
        .spawn(move || writer(sink, label, rx, returns, flag))?;
    Ok((
        Output {
            id,
            name: name.to_string(),
            buffer: buf,
            reopen,
            retired: false,
        },
        sinks,
        t,
    ))
}

/// Opens the outputs and starts one writer thread per distinct output. `None` when no listener
/// logs. A file that cannot be opened fails the start.
pub fn build(cfg: &crate::config::Config, workers: usize) -> io::Result<Option<Built>> {
    let eff = per_listener(cfg);
    if eff.iter().all(Option::is_none) {
        return Ok(None);
    }
    // Distinct outputs, with the largest buffer any listener asks for.
    let mut names: Vec<(String, u64)> = Vec::new();
    for c in eff.iter().flatten() {
        match names.iter_mut().find(|(n, _)| *n == c.output) {
            Some((_, b)) => *b = (*b).max(c.buffer.0),
            None => names.push((c.output.clone(), c.buffer.0)),
        }
    }
    let mut outputs = Vec::new();
    let mut threads = Vec::new();
    let mut per_worker: Vec<Vec<WorkerSink>> = (0..workers).map(|_| Vec::new()).collect();
    for (id, (name, buf)) in names.iter().enumerate() {
        let (out, sinks, t) = start_output(id as u64, name, *buf, Sink::open(name)?, workers)?;
        for (list, s) in per_worker.iter_mut().zip(sinks) {
            list.push(s);
        }
        threads.push(t);
        outputs.push(out);
    }
    let listeners: Vec<Option<(usize, Settings)>> = eff
        .iter()
        .map(|c| {
            c.map(|c| {
                let i = names.iter().position(|(n, _)| *n == c.output).unwrap_or(0);
                (i, Settings::new(c))
            })
        })
        .collect();
    let workers = per_worker
        .into_iter()
        .enumerate()
        .map(|(id, sinks)| WorkerAccessLog::with(id, sinks, listeners.clone()))
        .collect();
    Ok(Some(Built {
        shared: Arc::new(AccessLogs {
            reg: std::sync::Mutex::new(Registry {
                next_id: outputs.len() as u64,
                outputs,
                threads: Vec::new(),
            }),
        }),
        workers,
        threads,
    }))
}

enum Sink {
    Stdout,
    File(File, String),
}

impl Sink {
    fn open(name: &str) -> io::Result<Sink> {
        if name == "stdout" {
            return Ok(Sink::Stdout);
        }
        let f = open_append(name).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::ENXIO) {
                "a named pipe that no process reads".to_string()
            } else {
                e.to_string()
            };
            io::Error::new(e.kind(), format!("access log {name}: {why}"))
        })?;
        Ok(Sink::File(f, name.to_string()))
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut o = io::stdout().lock();
                o.write_all(b)?;
                o.flush()
            }
            Sink::File(f, _) => f.write_all(b),
        }
    }

    fn reopen(&mut self) {
        if let Sink::File(f, name) = self {
            match open_append(name) {
                Ok(n) => *f = n,
                Err(e) => {
                    warn!("access log {name}: cannot reopen: {e}; still writing to the old file")
                }
            }
        }
    }
}

/// Opens an output file for appending without waiting: a named pipe that no process reads
/// would otherwise hold the opening thread (the reloading one, or the start) until a reader
/// comes; opened non-blocking it is refused at once (ENXIO). Writes then block again, on the
/// writer thread only.
fn open_append(name: &str) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(name)?;
    // SAFETY: fcntl on a descriptor this function owns; F_GETFL/F_SETFL read and set flags.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// One output's writer: writes the chunks the workers hand over and gives the buffers back.
/// Ends when every worker has dropped its sender (after the workers stopped).
fn writer(
    mut sink: Sink,
    label: String,
    rx: Receiver<(usize, Vec<u8>)>,
    returns: Vec<SyncSender<Vec<u8>>>,
    reopen: Arc<AtomicBool>,
) {
    let mut failing = false;
    loop {
        if reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
        match rx.recv_timeout(WRITER_POLL) {
            Ok((worker, mut chunk)) => {
                if reopen.swap(false, Ordering::AcqRel) {
                    sink.reopen();
                }
                match sink.write(&chunk) {
                    Ok(()) => failing = false,
                    Err(e) => {
                        // The chunk holds whole lines; a failed write may have written some
                        // of them, but which cannot be told: all count as lost.
                        let lines = chunk.iter().filter(|b| **b == b'\n').count() as u64;
                        WRITE_LOST.fetch_add(lines, Ordering::Relaxed);
                        if !failing {
                            warn!("access log {label}: write failed: {e}; lines are lost until it works again (ringway_access_log_write_lost_total)");
                        }
                        failing = true;
                    }
                }
                chunk.clear();
                if let Some(r) = returns.get(worker) {
                    let _ = r.try_send(chunk);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per worker.

/// Full buffers to a writer, tagged with the worker they go back to.
type ChunkSender = SyncSender<(usize, Vec<u8>)>;

struct WorkerSink {
    /// The output's id ([`Output::id`]).
    id: u64,
    worker: usize,
    cap: usize,
    /// The buffer being filled (`None` while every buffer is with the writer).
    cur: RefCell<Option<Vec<u8>>>,
    /// Taken when the worker stops ([`WorkerAccessLog::close`]): once every worker's is gone,
    /// the writer ends.
    tx: RefCell<Option<ChunkSender>>,
    spare: Receiver<Vec<u8>>,
    /// A reload retired the output: closed once nothing more is written to it.
    retired: Cell<bool>,
}

impl WorkerSink {
    /// Hands the current buffer to the writer when it holds anything, and takes a spare.
    /// Never blocks: a writer that is behind keeps the buffer here.
    fn ship(&self) {
        let mut cur = self.cur.borrow_mut();
        if let Some(b) = cur.take() {
            if b.is_empty() {
                *cur = Some(b);
                return;
            }
            let sent = match self.tx.borrow().as_ref() {
                Some(tx) => tx.try_send((self.worker, b)),
                None => Err(TrySendError::Disconnected((self.worker, b))),
            };
            match sent {
                Ok(()) => {}
                Err(TrySendError::Full((_, b)) | TrySendError::Disconnected((_, b))) => {
                    *cur = Some(b);
                    return;
                }
            }
        }
        *cur = self.spare.try_recv().ok();
    }

    /// Lines are waiting in the current buffer.
    fn pending(&self) -> bool {
        self.cur.borrow().as_ref().is_some_and(|b| !b.is_empty())
    }
}

/// One worker's side of the access log (see the module doc).
pub struct WorkerAccessLog {
    /// Its outputs and listeners; replaced by a reload on the worker's thread, between
    /// requests (a borrow on the request path, no allocation).
    tables: RefCell<Tables>,
    /// A clock reading of the sync task (monotonic, wall milliseconds), from which a line's
    /// time is worked out without another clock read.
    anchor: Cell<(Instant, u64)>,
    rng: Cell<u64>,
    /// The last second formatted (Unix seconds, its RFC 3339 text): lines of the same second
    /// rewrite only the milliseconds.
    second: Cell<(u64, [u8; crate::date::RFC3339_MILLIS_LEN])>,
}

struct Tables {
    sinks: Vec<WorkerSink>,
    /// Per listener slot: the output (index into `sinks`) and what to log.
    listeners: Vec<Option<(usize, Settings)>>,
    /// Slots of listeners a reload removed that still log the requests of their open
    /// connections; each entry goes once its slot has no connection left on this worker.
    closing: Vec<usize>,
}

/// One request's line, as the end of a request sees it.
pub struct Entry<'a> {
    pub end: Instant,
    pub request_id: &'a [u8],
    pub trace_id: &'a [u8; 32],
    pub client: &'a [u8],
    /// `None` when the head was refused (nothing of it is trusted).
    pub method: Option<&'a [u8]>,
    pub host: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
    /// A query parameter of `path` that carries a credential (`[auth.api_key].query`): its
    /// values are written as `[redacted]`.
    pub redact_query: Option<&'a [u8]>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub total_us: u64,
    pub upstream_us: Option<u64>,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub endpoint: Option<SocketAddr>,
    pub consumer: Option<&'a str>,
    pub error: Option<&'static str>,
    pub retries: u32,
    pub tls: Option<&'static str>,
}

/// What became of a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logged {
    Written,
    /// Not sampled, or the listener does not log.
    Skipped,
    /// No room: dropped (count it).
    Dropped,
}

impl WorkerAccessLog {
    fn with(id: usize, sinks: Vec<WorkerSink>, listeners: Vec<Option<(usize, Settings)>>) -> Self {
        WorkerAccessLog {
            tables: RefCell::new(Tables {
                sinks,
                listeners,
                closing: Vec::new(),
            }),
            anchor: Cell::new((Instant::now(), crate::date::unix_millis())),
            rng: Cell::new(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17)),
            second: Cell::new((u64::MAX, [0; crate::date::RFC3339_MILLIS_LEN])),
        }
    }

    /// The access log of worker `id` before any output (a reload then adds them).
    pub(crate) fn empty(id: usize) -> Self {
        WorkerAccessLog::with(id, Vec::new(), Vec::new())
    }

    /// Whether the requests of listener `l` are logged at all.
    pub fn logs(&self, l: usize) -> bool {
        self.tables
            .borrow()
            .listeners
            .get(l)
            .is_some_and(Option::is_some)
    }

    /// Writes one request's line into the worker's buffer for its output.
    pub fn log(&self, listener: usize, e: &Entry<'_>) -> Logged {
        let t = self.tables.borrow();
        let Some(Some((sink, set))) = t.listeners.get(listener) else {
            return Logged::Skipped;
        };
        if set.threshold < (1 << 32) {
            // xorshift64: the sampling draw, no clock and no allocation.
            let mut x = self.rng.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng.set(x);
            if (x >> 32) >= set.threshold {
                return Logged::Skipped;
            }
        }
        let Some(sink) = t.sinks.get(*sink) else {
            return Logged::Skipped;
        };
        for attempt in 0..2 {
            {
                let mut cur = sink.cur.borrow_mut();
                if let Some(buf) = cur.as_mut() {
                    let start = buf.len();
                    let mut out = Out {
                        buf,
                        limit: sink.cap,
                        full: false,
                    };
                    self.format(&mut out, set, e);
                    if !out.full {
                        return Logged::Written;
                    }
                    buf.truncate(start);
                }
            }
            if attempt == 0 {
                sink.ship();
            }
        }
        Logged::Dropped
    }

    /// The sync task's tick (every 50 ms): a new clock anchor, full or not, each buffer goes
    /// to its writer. Slots of removed listeners are taken as having no connection left (see
    /// [`WorkerAccessLog::tick_open`]).
    pub fn tick(&self) {
        self.tick_open(|_| false);
    }

    /// [`WorkerAccessLog::tick`], told by `open` whether a listener slot still has connections
    /// on this worker: a removed listener's slot stops logging once it has none, and a retired
    /// output is closed (its writer ends once every worker closed it) once no slot logs to it
    /// and its last lines were shipped.
    pub fn tick_open(&self, open: impl Fn(usize) -> bool) {
        self.anchor
            .set((Instant::now(), crate::date::unix_millis()));
        let mut t = self.tables.borrow_mut();
        let Tables {
            sinks,
            listeners,
            closing,
        } = &mut *t;
        closing.retain(|&s| {
            if open(s) {
                return true;
            }
            if let Some(e) = listeners.get_mut(s) {
                *e = None;
            }
            false
        });
        for (i, s) in sinks.iter().enumerate() {
            s.ship();
            if s.retired.get() && !s.pending() && !listeners.iter().flatten().any(|(k, _)| *k == i)
            {
                s.tx.borrow_mut().take();
            }
        }
    }

    /// A reload's change ([`AccessLogs::reconfigure`]), on the worker's thread between
    /// requests: new outputs are added, retired ones marked, and every slot's entry set. A
    /// removed listener's slot keeps its entry while its connections finish.
    pub(crate) fn reconfigure(&self, r: &Reconfig, worker: usize) {
        let fresh = r
            .sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(worker)
            .and_then(Option::take)
            .unwrap_or_default();
        let mut t = self.tables.borrow_mut();
        let old: Vec<Option<(u64, Settings)>> = t
            .listeners
            .iter()
            .map(|e| e.and_then(|(i, set)| t.sinks.get(i).map(|s| (s.id, set))))
            .collect();
        // Sides closed since the last reload are dropped here (the list stays as short as
        // the outputs in use).
        t.sinks.retain(|s| s.tx.borrow().is_some());
        for s in &t.sinks {
            if r.retired.contains(&s.id) {
                s.retired.set(true);
            }
        }
        t.sinks.extend(fresh);
        let sinks = &t.sinks;
        let pos = |id: u64| sinks.iter().position(|s| s.id == id);
        let n = r.slots.len().max(old.len());
        let mut closing = Vec::new();
        let listeners: Vec<Option<(usize, Settings)>> = (0..n)
            .map(
                |slot| match r.slots.get(slot).copied().unwrap_or(SlotLog::Closed) {
                    SlotLog::Off => None,
                    SlotLog::Log(id, set) => pos(id).map(|i| (i, set)),
                    SlotLog::Closed => {
                        let kept = old
                            .get(slot)
                            .copied()
                            .flatten()
                            .and_then(|(id, set)| pos(id).map(|i| (i, set)));
                        if kept.is_some() {
                            closing.push(slot);
                        }
                        kept
                    }
                },
            )
            .collect();
        t.listeners = listeners;
        t.closing = closing;
    }

    /// A stopping worker's last lines are shipped (waiting a little for room if needed), then
    /// its senders are dropped, so that the writers end once every worker has stopped (even if
    /// a task of the worker outlives it).
    pub fn close(&self) {
        self.flush_final();
        for s in &self.tables.borrow().sinks {
            s.tx.borrow_mut().take();
        }
    }

    /// A stopping worker's last lines: shipped, waiting a little for room if needed.
    fn flush_final(&self) {
        let end = Instant::now() + FINAL_FLUSH_WAIT;
        for s in &self.tables.borrow().sinks {
            loop {
                if !s.pending() || Instant::now() >= end {
                    break;
                }
                s.ship();
                if !s.pending() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// RFC 3339 text of `unix_ms`, reusing the date and time of day of the same second.
    fn time_text(&self, unix_ms: u64) -> [u8; crate::date::RFC3339_MILLIS_LEN] {
        let secs = unix_ms / 1000;
        let (cached, mut text) = self.second.get();
        if cached != secs {
            text = crate::date::rfc3339_millis(unix_ms);
            self.second.set((secs, text));
            return text;
        }
        let ms = unix_ms % 1000;
        text[20] = b'0' + (ms / 100) as u8;
        text[21] = b'0' + (ms / 10 % 10) as u8;
        text[22] = b'0' + (ms % 10) as u8;
        text
    }

    fn unix_ms(&self, at: Instant) -> u64 {
        let (i, ms) = self.anchor.get();
        match at.checked_duration_since(i) {
            Some(d) => ms.saturating_add(d.as_millis() as u64),
            None => ms.saturating_sub(i.duration_since(at).as_millis() as u64),
        }
    }

    fn format(&self, o: &mut Out<'_>, set: &Settings, e: &Entry<'_>) {
        o.put(b"{");
        for (i, f) in set.fields[..set.nfields as usize].iter().enumerate() {
            if i > 0 {
                o.put(b",");
            }
            o.put(b"\"");
            o.put(f.key().as_bytes());
            o.put(b"\":");
            match f {
                Field::Time => {
                    o.put(b"\"");
                    o.put(&self.time_text(self.unix_ms(e.end)));
                    o.put(b"\"");
                }
                Field::RequestId => o.string(Some(e.request_id)),
                Field::TraceId => o.string(Some(&e.trace_id[..])),
                Field::Client => o.string(Some(e.client)),
                Field::Method => o.string(e.method),
                Field::Host => o.string(e.host),
                Field::Path => o.path(e.path, e.redact_query),
                Field::Status => o.num(e.status as u64),
                Field::BytesIn => o.num(e.bytes_in),
                Field::BytesOut => o.num(e.bytes_out),
                Field::DurationMs => o.millis(e.total_us),
                Field::UpstreamDurationMs => match e.upstream_us {
                    Some(us) => o.millis(us),
                    None => o.put(b"null"),
                },
                Field::Route => o.string(e.route.map(str::as_bytes)),
                Field::Upstream => o.string(e.upstream.map(str::as_bytes)),
                Field::Endpoint => match e.endpoint {
                    Some(a) => {
                        o.put(b"\"");
                        o.addr(a);
                        o.put(b"\"");
                    }
                    None => o.put(b"null"),
                },
                Field::Consumer => o.string(e.consumer.map(str::as_bytes)),
                Field::Error => o.string(e.error.map(str::as_bytes)),
                Field::Retries => o.num(e.retries as u64),
                Field::Tls => o.string(e.tls.map(str::as_bytes)),
            }
        }
        o.put(b"}\n");
    }
}

/// A bounded writer into a buffer that never grows past its capacity (so never reallocates).
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    limit: usize,
    full: bool,
}

impl Out<'_> {
    #[inline]
    fn put(&mut self, s: &[u8]) {
        let limit = self.limit.min(self.buf.capacity());
        if self.full || self.buf.len() + s.len() > limit {
            self.full = true;
            return;
        }
        self.buf.extend_from_slice(s);
    }

    fn num(&mut self, v: u64) {
        let mut b = itoa::Buffer::new();
        self.put(b.format(v).as_bytes());
    }

    /// An address as `a.b.c.d:port` (IPv4, without the formatting machinery) or
    /// `[v6]:port`.
    fn addr(&mut self, a: SocketAddr) {
        match a {
            SocketAddr::V4(v4) => {
                for (i, o) in v4.ip().octets().iter().enumerate() {
                    if i > 0 {
                        self.put(b".");
                    }
                    self.num(*o as u64);
                }
            }
            SocketAddr::V6(v6) => {
                let _ = std::fmt::Write::write_fmt(self, format_args!("[{}]", v6.ip()));
            }
        }
        self.put(b":");
        self.num(a.port() as u64);
    }

    /// Microseconds as milliseconds with three decimals.
    fn millis(&mut self, us: u64) {
        self.num(us / 1000);
        let frac = us % 1000;
        self.put(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    /// A JSON string (or null), escaped per RFC 8259 §7, cut at [`MAX_FIELD_BYTES`]. Bytes
    /// outside printable ASCII are written as `\u00XX` so the line is valid UTF-8 JSON whatever
    /// the client sent.
    fn string(&mut self, v: Option<&[u8]>) {
        let Some(v) = v else {
            self.put(b"null");
            return;
        };
        self.put(b"\"");
        self.escaped(&v[..v.len().min(MAX_FIELD_BYTES)]);
        self.put(b"\"");
    }

    /// The request target as [`Out::string`] writes it, with the value of every `name=`
    /// parameter of its query written as `[redacted]` (RFC 6750 §5.3: credentials in URLs end
    /// up in logs). The query is read by the scan the API key lookup and `hide_credentials`
    /// use ([`crate::http::query_of`], [`crate::http::query_params`]: up to a `#`, split at
    /// `&`, names form-decoded as [`crate::http::form_decodes_to`] reads them), so a value is
    /// hidden exactly when the gateway would take it for the key. A target without a query is
    /// written in one piece.
    fn path(&mut self, v: Option<&[u8]>, name: Option<&[u8]>) {
        let (Some(v), Some(name)) = (v, name) else {
            return self.string(v);
        };
        let v = &v[..v.len().min(MAX_FIELD_BYTES)];
        let Some((q, query)) = crate::http::query_of(v) else {
            return self.string(Some(v));
        };
        self.put(b"\"");
        // `done`: how far `v` is written; `at`: where the parameter `kv` starts in `v`.
        let (mut done, mut at) = (0, q);
        for (kv, k) in crate::http::query_params(query) {
            // A name alone (no `=`) has no value to hide.
            if kv.len() > k.len() && crate::http::form_decodes_to(k, name) {
                let value = at + k.len() + 1;
                self.escaped(&v[done..value]);
                self.put(b"[redacted]");
                done = at + kv.len();
            }
            at += kv.len() + 1;
        }
        self.escaped(&v[done..]);
        self.put(b"\"");
    }

    /// Bytes escaped for a JSON string (see [`Out::string`]), without the quotes.
    fn escaped(&mut self, v: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut run = 0;
        for (i, &b) in v.iter().enumerate() {
            let esc: Option<[u8; 6]> = match b {
                b'"' | b'\\' => Some([b'\\', b, 0, 0, 0, 0]),
                0x20..=0x7e => None,
                _ => Some([
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 15) as usize],
                ]),
            };
            if let Some(esc) = esc {
                self.put(&v[run..i]);
                let n = if esc[2] == 0 { 2 } else { 6 };
                self.put(&esc[..n]);
                run = i + 1;
            }
        }
        self.put(&v[run..]);
    }
}

impl std::fmt::Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.put(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(id: &'a [u8], trace: &'a [u8; 32], path: &'a [u8]) -> Entry<'a> {
        Entry {
            end: Instant::now(),
            request_id: id,
            trace_id: trace,
            client: b"127.0.0.1",
            method: Some(b"GET"),
            host: Some(b"a.test"),
            path: Some(path),
            redact_query: None,
            status: 200,
            bytes_in: 10,
            bytes_out: 20,
            total_us: 1234,
            upstream_us: Some(1000),
            route: Some("r"),
            upstream: Some("u"),
            endpoint: Some("127.0.0.1:9".parse().unwrap()),
            consumer: None,
            error: None,
            retries: 0,
            tls: None,
        }
    }

    fn worker_log(cap: usize) -> (WorkerAccessLog, Receiver<(usize, Vec<u8>)>) {
        let (tx, rx) = mpsc::sync_channel(1);
        let (_ret_tx, ret_rx) = mpsc::sync_channel(1);
        let c = AccessLogConfig {
            enabled: true,
            ..Default::default()
        };
        let log = WorkerAccessLog::with(
            0,
            vec![WorkerSink {
                id: 0,
                worker: 0,
                cap,
                cur: RefCell::new(Some(Vec::with_capacity(cap))),
                tx: RefCell::new(Some(tx)),
                spare: ret_rx,
                retired: Cell::new(false),
            }],
            vec![Some((0, Settings::new(&c)))],
        );
        log.anchor.set((Instant::now(), 1_795_671_497_123));
        log.rng.set(1);
        (log, rx)
    }

    /// The credential parameter's values are redacted; everything else is written (escaped)
    /// as it came, the fragment included.
    #[test]
    fn credential_query_values_are_redacted() {
        let trace = [b'a'; 32];
        let cases: [(&[u8], &str); 10] = [
            (b"/a?k=s1", "/a?k=[redacted]"),
            (
                b"/a?x=\"&k=s1&k=&k=s2#k=s3",
                "/a?x=\"&k=[redacted]&k=[redacted]&k=[redacted]#k=s3",
            ),
            (b"/a?kk=1&k&xk=2&k=\x01", "/a?kk=1&k&xk=2&k=[redacted]"),
            (b"/a?", "/a?"),
            (b"/a", "/a"),
            (b"/k=s1", "/k=s1"),
            (b"/a?k=s1?k=s2", "/a?k=[redacted]"),
            // However the name is spelled, as the key is read.
            (b"/a?%6B=s1&%6b=s2", "/a?%6B=[redacted]&%6b=[redacted]"),
            // A `+` is a space in a name, as the key lookup reads it: not `k`.
            (b"/a?k+=s1&+k=s2&%2Bk=s3", "/a?k+=s1&+k=s2&%2Bk=s3"),
            (b"/a?&&k=s1&", "/a?&&k=[redacted]&"),
        ];
        for (path, want) in cases {
            let (log, _rx) = worker_log(64 * 1024);
            let mut e = entry(b"id", &trace, path);
            e.redact_query = Some(b"k");
            assert_eq!(log.log(0, &e), Logged::Written);
            let buf = log.tables.borrow().sinks[0].cur.borrow().clone().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["path"], want, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn a_line_is_json_with_every_field_and_hostile_bytes_escaped() {
        let (log, _rx) = worker_log(64 * 1024);
        let trace = [b'a'; 32];
        let path = b"/p\"a\\t\x01h\xff?q=1";
        assert_eq!(log.log(0, &entry(b"id-1", &trace, path)), Logged::Written);
        let buf = log.tables.borrow().sinks[0].cur.borrow().clone().unwrap();
        let line = std::str::from_utf8(&buf).expect("utf-8");
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(line).expect(line);
        assert_eq!(v["path"], "/p\"a\\t\u{1}h\u{ff}?q=1");
        assert_eq!(v["duration_ms"], 1.234);
        assert_eq!(v["upstream_duration_ms"], 1.0);
        assert_eq!(v["endpoint"], "127.0.0.1:9");
        assert_eq!(v["consumer"], serde_json::Value::Null);
        assert_eq!(v["time"].as_str().unwrap().len(), 24);
        for f in Field::ALL {
            assert!(v.get(f.key()).is_some(), "{}", f.key());
        }
    }

    #[test]
    fn ipv6_endpoints_and_times_of_one_second() {
        let (log, _rx) = worker_log(64 * 1024);
        let trace = [b'a'; 32];
        let mut e = entry(b"id", &trace, b"/");
        e.endpoint = Some("[::1]:8080".parse().unwrap());
        let (i, ms) = log.anchor.get();
        e.end = i + std::time::Duration::from_millis(5);
        log.log(0, &e);
        e.end = i + std::time::Duration::from_millis(2_000);
        log.log(0, &e);
        let buf = log.tables.borrow().sinks[0].cur.borrow().clone().unwrap();
        let lines: Vec<serde_json::Value> = std::str::from_utf8(&buf)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["endpoint"], "[::1]:8080");
        let t = |ms| String::from_utf8(crate::date::rfc3339_millis(ms).to_vec()).unwrap();
        assert_eq!(lines[0]["time"], t(ms + 5));
        assert_eq!(lines[1]["time"], t(ms + 2_000));
    }

    #[test]
    fn a_full_buffer_with_a_writer_behind_drops_instead_of_blocking() {
        let (log, rx) = worker_log(MIN_BUFFER as usize);
        let trace = [b'a'; 32];
        let long = vec![b'x'; 4000];
        let mut written = 0;
        let mut dropped = 0;
        // The writer takes nothing: one chunk fits in its queue, then every line is dropped.
        for _ in 0..100 {
            match log.log(0, &entry(b"id", &trace, &long)) {
                Logged::Written => written += 1,
                Logged::Dropped => dropped += 1,
                Logged::Skipped => unreachable!(),
            }
        }
        assert!(written > 0 && dropped > 0, "{written} {dropped}");
        assert_eq!(written + dropped, 100);
        // The one chunk shipped holds whole lines only.
        let (_, chunk) = rx.try_recv().expect("one chunk shipped");
        let text = std::str::from_utf8(&chunk).unwrap();
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }
}
