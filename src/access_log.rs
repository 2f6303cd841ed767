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
use std::sync::atomic::{AtomicBool, Ordering};
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
    name: String,
    reopen: Arc<AtomicBool>,
}

/// The access log outputs of a gateway; [`AccessLogs::reopen`] is what SIGUSR1 calls.
pub struct AccessLogs {
    outputs: Vec<Output>,
}

impl AccessLogs {
    /// Asks every writer to reopen its file before its next write (log rotation: move the
    /// file, then call this). Returns at once; stdout is left as it is.
    pub fn reopen(&self) {
        for o in &self.outputs {
            o.reopen.store(true, Ordering::Release);
        }
    }

    /// The outputs, as configured ("stdout" or a path).
    pub fn outputs(&self) -> Vec<String> {
        self.outputs.iter().map(|o| o.name.clone()).collect()
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
    for (name, buf) in &names {
        let sink = Sink::open(name)?;
        let reopen = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(WRITER_QUEUE);
        let mut returns = Vec::with_capacity(workers);
        for (id, sinks) in per_worker.iter_mut().enumerate() {
            let (ret_tx, ret_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS_PER_WORKER);
            for _ in 1..BUFFERS_PER_WORKER {
                // Cannot fail: the channel holds BUFFERS_PER_WORKER.
                let _ = ret_tx.try_send(Vec::with_capacity(*buf as usize));
            }
            returns.push(ret_tx);
            sinks.push(WorkerSink {
                worker: id,
                cap: *buf as usize,
                cur: RefCell::new(Some(Vec::with_capacity(*buf as usize))),
                tx: RefCell::new(Some(tx.clone())),
                spare: ret_rx,
            });
        }
        drop(tx);
        let flag = reopen.clone();
        let label = name.clone();
        threads.push(
            std::thread::Builder::new()
                .name("ringway-access-log".into())
                .spawn(move || writer(sink, label, rx, returns, flag))?,
        );
        outputs.push(Output {
            name: name.clone(),
            reopen,
        });
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
    let now = (Instant::now(), crate::date::unix_millis());
    let workers = per_worker
        .into_iter()
        .enumerate()
        .map(|(id, sinks)| WorkerAccessLog {
            sinks,
            listeners: listeners.clone(),
            anchor: Cell::new(now),
            rng: Cell::new(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) << 17)),
            second: Cell::new((u64::MAX, [0; crate::date::RFC3339_MILLIS_LEN])),
        })
        .collect();
    Ok(Some(Built {
        shared: Arc::new(AccessLogs { outputs }),
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
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(name)
            .map_err(|e| io::Error::new(e.kind(), format!("access log {name}: {e}")))?;
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
            match OpenOptions::new().create(true).append(true).open(&*name) {
                Ok(n) => *f = n,
                Err(e) => {
                    warn!("access log {name}: cannot reopen: {e}; still writing to the old file")
                }
            }
        }
    }
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
                        if !failing {
                            warn!("access log {label}: write failed: {e}; lines are lost until it works again");
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
    worker: usize,
    cap: usize,
    /// The buffer being filled (`None` while every buffer is with the writer).
    cur: RefCell<Option<Vec<u8>>>,
    /// Taken when the worker stops ([`WorkerAccessLog::close`]): once every worker's is gone,
    /// the writer ends.
    tx: RefCell<Option<ChunkSender>>,
    spare: Receiver<Vec<u8>>,
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
}

/// One worker's side of the access log (see the module doc).
pub struct WorkerAccessLog {
    sinks: Vec<WorkerSink>,
    /// Per listener: the output and what to log.
    listeners: Vec<Option<(usize, Settings)>>,
    /// A clock reading of the sync task (monotonic, wall milliseconds), from which a line's
    /// time is worked out without another clock read.
    anchor: Cell<(Instant, u64)>,
    rng: Cell<u64>,
    /// The last second formatted (Unix seconds, its RFC 3339 text): lines of the same second
    /// rewrite only the milliseconds.
    second: Cell<(u64, [u8; crate::date::RFC3339_MILLIS_LEN])>,
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
    /// Whether the requests of listener `l` are logged at all.
    pub fn logs(&self, l: usize) -> bool {
        self.listeners.get(l).is_some_and(Option::is_some)
    }

    /// Writes one request's line into the worker's buffer for its output.
    pub fn log(&self, listener: usize, e: &Entry<'_>) -> Logged {
        let Some(Some((sink, set))) = self.listeners.get(listener) else {
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
        let Some(sink) = self.sinks.get(*sink) else {
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
    /// to its writer.
    pub fn tick(&self) {
        self.anchor
            .set((Instant::now(), crate::date::unix_millis()));
        for s in &self.sinks {
            s.ship();
        }
    }

    /// A stopping worker's last lines are shipped (waiting a little for room if needed), then
    /// its senders are dropped, so that the writers end once every worker has stopped (even if
    /// a task of the worker outlives it).
    pub fn close(&self) {
        self.flush_final();
        for s in &self.sinks {
            s.tx.borrow_mut().take();
        }
    }

    /// A stopping worker's last lines: shipped, waiting a little for room if needed.
    fn flush_final(&self) {
        let end = Instant::now() + FINAL_FLUSH_WAIT;
        for s in &self.sinks {
            loop {
                let pending = s.cur.borrow().as_ref().is_some_and(|b| !b.is_empty());
                if !pending || Instant::now() >= end {
                    break;
                }
                s.ship();
                let still = s.cur.borrow().as_ref().is_some_and(|b| !b.is_empty());
                if !still {
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
                Field::Path => o.string(e.path),
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
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.put(b"\"");
        let v = &v[..v.len().min(MAX_FIELD_BYTES)];
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
        self.put(b"\"");
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
        let log = WorkerAccessLog {
            sinks: vec![WorkerSink {
                worker: 0,
                cap,
                cur: RefCell::new(Some(Vec::with_capacity(cap))),
                tx: RefCell::new(Some(tx)),
                spare: ret_rx,
            }],
            listeners: vec![Some((0, Settings::new(&c)))],
            anchor: Cell::new((Instant::now(), 1_795_671_497_123)),
            rng: Cell::new(1),
            second: Cell::new((u64::MAX, [0; crate::date::RFC3339_MILLIS_LEN])),
        };
        (log, rx)
    }

    #[test]
    fn a_line_is_json_with_every_field_and_hostile_bytes_escaped() {
        let (log, _rx) = worker_log(64 * 1024);
        let trace = [b'a'; 32];
        let path = b"/p\"a\\t\x01h\xff?q=1";
        assert_eq!(log.log(0, &entry(b"id-1", &trace, path)), Logged::Written);
        let buf = log.sinks[0].cur.borrow().clone().unwrap();
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
        let buf = log.sinks[0].cur.borrow().clone().unwrap();
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
