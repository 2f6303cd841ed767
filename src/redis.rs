//! The Redis link behind `[rate_limiting] backend = "redis"`.
//!
//! One `ringway-redis` thread per gateway process owns one connection to Redis. Host buckets
//! (see `ratelimit.rs`) queue a [`Demand`] when their stock of Redis-issued tokens runs low;
//! the thread sends every queued demand in one pipeline of `EVALSHA` calls to a token-bucket
//! script (in rounds of at most 2048), and puts the granted tokens into the buckets. Workers never talk to Redis and never
//! wait on this thread except for the very first tokens of a key (bounded by the timeout).
//!
//! The client is a plain blocking socket on its own thread, speaking RESP2 through the
//! `redis-protocol` crate: it is off the request path, and a parked std thread can be woken the
//! moment a worker queues a demand (`Thread::unpark`). The other way, a worker task waiting on
//! an answer sleeps on its worker's doorbell (`crate::doorbell`), rung by this thread after
//! each round of answers.
//!
//! While Redis cannot be reached (refused, reset, an answer later than `timeout`), the link is
//! marked down, logged once, and tried again every `retry_interval`; the buckets then follow
//! `on_failure` (local buckets, or 503). Recovery (Redis answering, not only accepting a
//! connection) is logged once too; a link that keeps going down and up logs at most once a
//! minute (see `RedisLink::set_down`). A round of plain commands that fails while it writes
//! one command, or reads one reply, larger than a round's writes (an entry over 1 MiB) is put
//! down to that size, not to the link: that command alone is given up and counted, and the
//! repeatable commands after it in its round are sent again (see `RoundFailed::TooLarge`). A
//! round's deadline moves while its replies keep coming, a mebibyte at a time (see
//! `Conn::round`), so a large reply read whole does not make the replies after it late.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::encode::extend_encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, BytesFrame, Resp2Frame};

use crate::config::RedisConfig;
use crate::{info, warn};

/// The token-bucket script. Time comes from Redis (`TIME`), so every gateway host shares one
/// clock. ARGV: rate (tokens per second), burst, tokens wanted, tokens given back. Returns the
/// tokens granted and the whole tokens left in the bucket.
pub const TOKEN_BUCKET_LUA: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(v[1])
local at = tonumber(v[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = tokens + (now - at) * rate / 1000000
end
tokens = math.min(burst, tokens + back)
local got = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - got
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {got, math.floor(tokens)}
"#;

/// The quota script. ARGV: the quota, units wanted, units given back, the Unix second the
/// counter expires (after its period). Returns the units granted and the units left.
pub const QUOTA_LUA: &str = r#"
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local back = tonumber(ARGV[3])
local used = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') - back)
local got = math.max(0, math.min(want, limit - used))
used = used + got
redis.call('SET', KEYS[1], used)
redis.call('EXPIREAT', KEYS[1], ARGV[4])
return {got, limit - used}
"#;

/// The script a demand runs, with its own arguments.
#[derive(Debug, Clone, Copy)]
pub enum Call {
    TokenBucket { rate: f64, burst: f64 },
    Quota { limit: f64, expire_at: u64 },
}

/// Called on the Redis thread with `Some((granted, left))`, or `None` when Redis failed.
pub type OnAnswer = Box<dyn FnOnce(Option<(u32, i64)>) + Send>;

/// What a host bucket asks of Redis.
pub struct Demand {
    /// The full Redis key.
    pub key: String,
    pub call: Call,
    pub want: u32,
    /// Tokens handed back (an expired stock).
    pub back: f64,
    pub done: OnAnswer,
}

/// Called on the Redis thread with a command's answer, or `None` when Redis failed.
pub type OnFrame = Box<dyn FnOnce(Option<BytesFrame>) + Send>;

/// A plain command (the response cache's GET, SET, EVAL), answered through `done`.
pub struct Command {
    pub args: Vec<bytes::Bytes>,
    /// The longest reply this command can have, in bytes (framing included; at most
    /// [`MAX_REPLY_BYTES`]): a `GET` of a cache entry, the longest entry's encoding; a list,
    /// its room; a status or an integer, [`SMALL_REPLY_BYTES`]. A longer reply breaks the link.
    pub max_reply: usize,
    /// Whether the command may be sent again after a round that sent it was given up before
    /// its answer was read (a large entry before it in the round, see
    /// [`RoundFailed::TooLarge`]): it may have run, so only a command whose second run leaves
    /// Redis as its first did, or as the same command sent a moment later would (a `GET`, a
    /// `SET` of the same value, an `EXPIRE`, a script that deletes, or compares before it
    /// writes), may be; one that counts (`INCR`, a script that takes tokens) may not, and
    /// gets `None`. The cache's commands are all repeatable. The rate limiter's script calls,
    /// which count, are never sent again: they go as [`Demand`]s, whose rounds a large reply
    /// never shares.
    pub repeatable: bool,
    pub done: Option<OnFrame>,
}

/// Most bytes the longest possible replies of one round of commands take (the bound of each
/// command summed, see [`Conn::pipeline`]): the commands of a larger batch go in several
/// rounds, so a round of small-reply commands is deeper than a round of lookups.
const MAX_ROUND_REPLY_BYTES: usize = 128 << 20;
/// Most bytes of arguments written in one round of plain commands (one command at least,
/// whatever its size), see [`write_round_len`]. Also what a round must read for its deadline
/// to move (see [`Conn::round`]), and the size past which a command or a reply is put down to
/// its size when its round fails ([`RoundFailed::TooLarge`]).
const MAX_ROUND_WRITE_BYTES: usize = 1 << 20;
/// Longest a round of plain commands takes, in `timeout`s, however its replies keep coming
/// (see [`Conn::round`]): its first `timeout`, and one more for each [`MAX_ROUND_WRITE_BYTES`]
/// of the most its replies can take ([`MAX_ROUND_REPLY_BYTES`]). A server that trickles
/// replies cannot hold the link's thread longer.
const MAX_ROUND_TIMEOUTS: u32 = 1 + (MAX_ROUND_REPLY_BYTES / MAX_ROUND_WRITE_BYTES) as u32;
/// Most rate-limit demands queued for the link's thread; past it new ones are refused at once
/// (see [`RedisLink::submit`]). Each new key's first request queues one, so a Redis that
/// stalls while clients keep coming with new keys (client addresses, header values) would
/// otherwise grow the queue for as long as the stall lasts (up to `timeout`, then again at
/// every retry). Two rounds' worth (see [`round_len`]); a demand weighs about 150 bytes.
pub const MAX_QUEUED_DEMANDS: usize = 4096;
/// Most plain commands queued; past it new ones fail at once (Redis slower than the
/// workers must not grow memory without bound).
pub const MAX_QUEUED_COMMANDS: usize = 4096;
/// Most bytes of arguments queued in plain commands (one command alone is queued whatever
/// its size): Redis slower than the workers' writes (an entry can be 1 MiB, or up to 1 GiB as
/// configured) must not grow memory with them; 300 entries of 900 KB queued behind a Redis
/// that did not read held 182 MB before this bound.
const MAX_QUEUED_BYTES: usize = 64 << 20;
/// Read and write buffers larger than this are given back after a round (a large entry's
/// round would otherwise keep its size for the connection's life).
const KEPT_BUFFER_BYTES: usize = 1 << 20;
/// Largest reply read by any link (the cache's largest entry, 1 GiB, and room for its
/// framing); each command has a bound of its own below it ([`Command::max_reply`]). Also the
/// longest bulk string read and thrown away (see [`Conn::read_frame`]): no host writes a
/// longer entry (`max_entry_bytes` is at most 1 GiB, and its encoding adds 12 KiB at most),
/// so a longer declared length is a broken or hostile server, and breaks the link as soon as
/// it is read rather than being read for as long as the server sends.
pub const MAX_REPLY_BYTES: usize = (1 << 30) + (1 << 20);
/// Largest reply of a command answered with a status, an integer, a script's two integers, a
/// script's SHA or an error line (the rate limiter's commands, the cache's writes): a hostile
/// server cannot make the link hold more for one of them.
pub const SMALL_REPLY_BYTES: usize = 64 * 1024;
/// Deepest nesting of arrays in a reply. ringway's replies nest one deep (a script's pair, a
/// pub/sub message); the decoder recurses once per level, so a hostile server could otherwise
/// overflow the thread's stack with `*1\r\n` repeated.
const MAX_REPLY_DEPTH: usize = 8;
/// Most frames in one reply, at every level (the decoder reserves room for each array's
/// declared length up front, and re-reads the reply each time more bytes arrive).
const MAX_REPLY_FRAMES: usize = 4096;
/// Longest line of a reply (a simple string, an error, an integer or a length).
const MAX_REPLY_LINE: usize = 16 * 1024;

/// Plain commands waiting for the link's thread, and the bytes of their arguments.
#[derive(Default)]
struct Queued {
    cmds: Vec<Command>,
    bytes: usize,
}

/// Shared between the workers (which queue demands) and the Redis thread.
pub struct RedisLink {
    cfg: RedisConfig,
    queue: Mutex<Vec<Demand>>,
    /// Plain commands (the response cache), sent as one pipeline per round.
    commands_queue: Mutex<Queued>,
    /// What the link serves, for its log lines: "limits" or "cache".
    role: &'static str,
    thread: OnceLock<Thread>,
    down: AtomicBool,
    /// Times the link failed: a connection refused or broken, an answer late or malformed
    /// (each retry that fails too), for the admin figures.
    pub failures: AtomicU64,
    /// When its state changes were last logged, and how many were not (see
    /// [`RedisLink::set_down`]); only the link's thread takes it.
    log: Mutex<LogState>,
    /// Lines logged about the link's state, for the tests.
    lines: AtomicU64,
    /// Commands sent in rounds (the rate limiter's script calls, the cache's commands), for
    /// the admin figures and the tests; the commands a connection sends when it opens
    /// (`AUTH`, `PING`, `SCRIPT LOAD`) are not counted.
    pub commands: AtomicU64,
    /// Round trips to Redis: every batch of commands written at once and then answered (a
    /// round of a pipeline, a script call sent again after loading its script, one command
    /// such as `AUTH`, `PING` or `SCRIPT LOAD`), on connections that opened. Before, a
    /// pipeline of several rounds, and the rate limiter's second round after a `NOSCRIPT`,
    /// counted once.
    pub round_trips: AtomicU64,
    /// Plain commands refused because the queue was full ([`MAX_QUEUED_COMMANDS`] or
    /// [`MAX_QUEUED_BYTES`]): a lookup answered as a miss, a write dropped.
    pub commands_refused: AtomicU64,
    /// Demands refused because [`MAX_QUEUED_DEMANDS`] were queued (see [`RedisLink::submit`]).
    pub demands_refused: AtomicU64,
    /// Commands given up alone, without marking the link down, because their round failed
    /// while it wrote that command or read its reply, larger than a round's writes
    /// ([`MAX_ROUND_WRITE_BYTES`]): an entry too large to move within `timeout` (see
    /// [`RoundFailed::TooLarge`]).
    pub commands_too_large: AtomicU64,
    /// Workers that wait on answers: rung after each round (see `crate::doorbell`).
    pub doorbells: crate::doorbell::Rings,
    /// Run on the link's thread each time the link is up again after it was down (see
    /// [`RedisLink::on_up`]).
    on_up: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Times the link came up again after it was down ([`RedisLink::ups`]), counted before
    /// `on_up` runs.
    ups: AtomicU64,
    /// `on_up` is to run again on the link's next pass ([`RedisLink::run_on_up_again`]).
    on_up_again: AtomicBool,
    /// When `on_up` is to run again while the link stays up ([`RedisLink::run_on_up_at`]);
    /// `None`: not asked.
    on_up_at: Mutex<Option<Instant>>,
}

impl RedisLink {
    pub fn new(cfg: RedisConfig) -> Arc<RedisLink> {
        RedisLink::with_role(cfg, "limits")
    }

    /// A link for another user of Redis (its log lines name `role`); each of its commands
    /// says how long its reply may be ([`Command::max_reply`]).
    pub fn with_role(cfg: RedisConfig, role: &'static str) -> Arc<RedisLink> {
        Arc::new(RedisLink {
            cfg,
            queue: Mutex::new(Vec::new()),
            commands_queue: Mutex::new(Queued::default()),
            role,
            thread: OnceLock::new(),
            down: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            log: Mutex::new(LogState::default()),
            lines: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            commands_refused: AtomicU64::new(0),
            demands_refused: AtomicU64::new(0),
            commands_too_large: AtomicU64::new(0),
            doorbells: crate::doorbell::Rings::default(),
            on_up: OnceLock::new(),
            ups: AtomicU64::new(0),
            on_up_again: AtomicBool::new(false),
            on_up_at: Mutex::new(None),
        })
    }

    /// Sets what runs, on the link's thread, each time Redis answers again after the link was
    /// down (the cache layer sends again the purges that failed meanwhile); set once. It may
    /// queue commands ([`RedisLink::command`]): they go in the next round.
    pub fn on_up(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_up.set(f);
    }

    /// How many times the link came up again after it was down. Read before queueing work
    /// that `on_up` is to pick up should it fail while the link is down: a different count
    /// once it failed means `on_up` may have run in between, before the work was handed to
    /// it ([`RedisLink::run_on_up_again`]).
    pub fn ups(&self) -> u64 {
        self.ups.load(Ordering::Acquire)
    }

    /// Has `on_up` run again on the link's thread, at its next pass, when the link is up then
    /// (when it is down, the next time it is up runs it anyway).
    pub fn run_on_up_again(&self) {
        self.on_up_again.store(true, Ordering::Release);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Has `on_up` run again on the link's thread at `at` (within the thread's idle pass, a
    /// tenth of a second at most), when the link is up then: the cache layer's timer for
    /// purges that failed while the link stayed up (an error answered, the queue full). A
    /// link down at `at` drops it (its next `on_up` runs anyway). Returns false, changing
    /// nothing, when a time is already asked for: one timer, the earliest.
    pub fn run_on_up_at(&self, at: Instant) -> bool {
        let mut t = self.on_up_at.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() {
            return false;
        }
        *t = Some(at);
        true
    }

    /// Whether a time asked of [`RedisLink::run_on_up_at`] has not come yet.
    pub fn on_up_at_pending(&self) -> bool {
        self.on_up_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Takes the time asked of [`RedisLink::run_on_up_at`], as the link's thread does when it
    /// comes (tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn take_on_up_at_for_tests(&self) -> Option<Instant> {
        self.on_up_at.lock().ok()?.take()
    }

    pub fn config(&self) -> &RedisConfig {
        &self.cfg
    }

    /// Holds the demand queue's lock: a [`RedisLink::submit`] meanwhile waits on it (tests).
    #[cfg(test)]
    pub(crate) fn hold_queue(&self) -> std::sync::MutexGuard<'_, Vec<Demand>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while Redis is known to be unreachable.
    #[inline]
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Queues a demand and wakes the Redis thread. With [`MAX_QUEUED_DEMANDS`] already
    /// queued (Redis slower than the demands) the demand is given back unsent, its `done` not
    /// called, and counted in [`RedisLink::demands_refused`]: the caller treats it as an
    /// answer from a slow Redis (`on_failure`).
    pub fn submit(&self, d: Demand) -> Result<(), Demand> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_QUEUED_DEMANDS {
            drop(q);
            self.demands_refused.fetch_add(1, Ordering::Relaxed);
            return Err(d);
        }
        q.push(d);
        drop(q);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
        Ok(())
    }

    /// Queues a plain command and wakes the Redis thread; a full queue (in commands or in
    /// bytes) or a link known to be down answers `None` at once (a write is dropped).
    pub fn command(&self, c: Command) {
        let size = args_len(&c);
        let mut q = self
            .commands_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let full = q.cmds.len() >= MAX_QUEUED_COMMANDS
            || (!q.cmds.is_empty() && q.bytes.saturating_add(size) > MAX_QUEUED_BYTES);
        if full || (self.is_down() && c.done.is_some()) {
            drop(q);
            if full {
                self.commands_refused.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(d) = c.done {
                d(None);
            }
            return;
        }
        q.bytes += size;
        q.cmds.push(c);
        drop(q);
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Puts `cmds` back at the head of the command queue, before those queued since (they
    /// were admitted once, and keep their order). The queue stays within its bounds
    /// ([`MAX_QUEUED_COMMANDS`], [`MAX_QUEUED_BYTES`], one command whatever its size): the
    /// newest commands past them are refused as [`RedisLink::command`] refuses them (`None`,
    /// counted in [`RedisLink::commands_refused`]). The queue filled up again while `cmds`
    /// were out; before, both were kept, so each large write given up could grow the queue by
    /// another 4096 commands or 64 MiB.
    fn requeue(&self, mut cmds: Vec<Command>) {
        if cmds.is_empty() {
            return;
        }
        let mut q = self
            .commands_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        cmds.append(&mut q.cmds);
        let (mut kept, mut bytes) = (0, 0usize);
        for c in &cmds {
            let size = args_len(c);
            if kept >= MAX_QUEUED_COMMANDS
                || (kept > 0 && bytes.saturating_add(size) > MAX_QUEUED_BYTES)
            {
                break;
            }
            kept += 1;
            bytes += size;
        }
        let refused = cmds.split_off(kept);
        q.cmds = cmds;
        q.bytes = bytes;
        drop(q);
        if !refused.is_empty() {
            self.commands_refused
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            fail_commands(refused);
        }
    }

    /// Marks the link down after a failure. Going down is logged, but at most once per
    /// [`LOG_EVERY`]: a server that accepts connections and then fails each round (a replica
    /// that refuses writes, a proxy in front of a dead Redis, `maxclients` reached) makes the
    /// link go down and up again every `retry_interval`, which logged two lines each time
    /// (one a second by default, for as long as it lasted). The next line says how many
    /// failures went unlogged; [`RedisLink::failures`] counts them all. A link that went down
    /// unlogged and stays down is logged at its first failure past [`LOG_EVERY`], so that the
    /// last line never says it answers while it does not.
    fn set_down(&self, why: &str) {
        self.set_down_at(why, Instant::now());
    }

    /// [`RedisLink::set_down`] at `now`.
    fn set_down_at(&self, why: &str, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let was_down = self.down.swap(true, Ordering::AcqRel);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if was_down && log.logged {
            return;
        }
        if log
            .down_at
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            if !was_down {
                log.logged = false;
                log.unlogged += 1;
            }
            return;
        }
        let again = match std::mem::take(&mut log.unlogged) {
            0 => String::new(),
            n => format!(" ({n} more times since the last such line)"),
        };
        log.down_at = Some(now);
        log.logged = true;
        drop(log);
        let policy = match (self.role, self.cfg.on_failure) {
            ("cache", _) => "the cache uses the local stores only",
            (_, crate::config::RedisFailure::Local) => "limits fall back to local buckets",
            (_, crate::config::RedisFailure::Deny) => "limited routes answer 503",
        };
        self.lines.fetch_add(1, Ordering::Relaxed);
        warn!(
            "redis at {} unreachable ({why}){again}; {policy} until it answers again",
            self.cfg.address.text
        );
    }

    /// The link marked down and up again as its thread does (tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn set_down_for_tests(&self) {
        self.set_down("test");
    }

    #[cfg(test)]
    pub(crate) fn set_up_for_tests(&self) {
        self.set_up();
    }

    /// Marks the link up; logged when going down was (see [`RedisLink::set_down`]).
    fn set_up(&self) {
        if !self.down.swap(false, Ordering::AcqRel) {
            return;
        }
        // Counted before `on_up` runs: what failed while the link was down and is handed to
        // `on_up` after it ran sees another count, and asks for it again.
        self.ups.fetch_add(1, Ordering::AcqRel);
        if let Some(f) = self.on_up.get() {
            f();
        }
        let logged = self.log.lock().map_or(true, |l| l.logged);
        if logged {
            self.lines.fetch_add(1, Ordering::Relaxed);
            info!(
                "redis at {} answers again; {} shared again",
                self.cfg.address.text, self.role
            );
        }
    }
}

/// Least time between two lines saying the link went down (see [`RedisLink::set_down`]).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What the link's log lines have said so far.
#[derive(Default)]
struct LogState {
    /// When a line last said the link went down.
    down_at: Option<Instant>,
    /// Whether the last time it went down was logged (so its recovery is).
    logged: bool,
    /// Times it went down since the last such line, not logged.
    unlogged: u64,
}

/// Starts the Redis thread; it ends once `stop` is set.
pub fn spawn(link: Arc<RedisLink>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    let l = link.clone();
    let t = std::thread::Builder::new()
        .name("ringway-redis".into())
        .spawn(move || run(l, stop))?;
    let _ = link.thread.set(t.thread().clone());
    Ok(t)
}

fn run(link: Arc<RedisLink>, stop: Arc<AtomicBool>) {
    let mut conn: Option<Conn> = None;
    let mut next_try = Instant::now();
    let idle = link.cfg.retry_interval.0.min(Duration::from_millis(100));
    while !stop.load(Ordering::Relaxed) {
        // A time asked of `run_on_up_at` that has come is taken whether the link is up or not.
        let due = {
            let mut at = link.on_up_at.lock().unwrap_or_else(|e| e.into_inner());
            let due = at.is_some_and(|t| Instant::now() >= t);
            if due {
                *at = None;
            }
            due
        };
        if (link.on_up_again.swap(false, Ordering::AcqRel) | due) && !link.is_down() {
            if let Some(f) = link.on_up.get() {
                f();
            }
        }
        let batch = std::mem::take(&mut *link.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let cmds = std::mem::take(
            &mut *link
                .commands_queue
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .cmds;
        let work = !batch.is_empty() || !cmds.is_empty();
        // Before a round, the connection must be as the last round left it: one the server
        // closed while it was idle (its `timeout`, a NAT or a proxy dropping idle flows) or
        // one holding bytes nobody asked for (see `Conn::expect_nothing`) is replaced now,
        // nothing sent on it. Before, the round was sent on it and failed, and the link was
        // marked down for `retry_interval` (503s with `on_failure = "deny"`) after every
        // idle period longer than the server's timeout.
        if work && conn.as_mut().is_some_and(|c| c.expect_nothing().is_err()) {
            conn = None;
        }
        if conn.is_none() && Instant::now() >= next_try && (link.is_down() || work) {
            let scripts = link.role == "limits";
            // While the link is down, it is up again once Redis answers, not once a
            // connection is accepted (`maxclients` reached, a proxy in front of a dead Redis,
            // a Redis loading its data): the cache's link asks for a `PING`, the rate
            // limiter's has had its scripts loaded.
            let opened = Conn::open(&link.cfg, scripts).and_then(|mut c| {
                if link.is_down() && !scripts {
                    c.ping()?;
                }
                Ok(c)
            });
            match opened {
                Ok(mut c) => {
                    link.count(&mut c);
                    conn = Some(c);
                    link.set_up();
                }
                Err(e) => {
                    link.set_down(&e.to_string());
                    next_try = Instant::now() + link.cfg.retry_interval.0;
                }
            }
        }
        if !cmds.is_empty() {
            match conn.as_mut() {
                None => fail_commands(cmds),
                Some(c) => {
                    let sent = c.pipeline(cmds);
                    link.count(c);
                    match sent {
                        Ok(()) => {}
                        // The connection may hold half a command, or half a reply: it is
                        // dropped, and the commands after the large one go on a fresh
                        // connection (the next pass opens it), whose opening and first round
                        // tell whether Redis still answers.
                        Err(Stopped::TooLarge(rest)) => {
                            conn = None;
                            link.commands_too_large.fetch_add(1, Ordering::Relaxed);
                            link.requeue(rest);
                        }
                        Err(Stopped::Link(e)) => {
                            conn = None;
                            link.set_down(&e.to_string());
                            next_try = Instant::now() + link.cfg.retry_interval.0;
                        }
                    }
                }
            }
            // The answers (or failures) are in: wake the workers waiting on them.
            link.doorbells.ring_all();
        }
        if batch.is_empty() {
            if link
                .commands_queue
                .lock()
                .map_or(true, |q| q.cmds.is_empty())
            {
                std::thread::park_timeout(idle);
            }
            continue;
        }
        // The demands go in rounds bounded as plain commands are (each reply can be
        // [`SMALL_REPLY_BYTES`] long: 2048 demands a round), each round's grants handed out and
        // its waiters woken once it is read. Before, every queued demand went as one round.
        let mut batch = batch;
        while !batch.is_empty() {
            let per_round = round_len(std::iter::repeat_n(SMALL_REPLY_BYTES, batch.len()));
            let rest = batch.split_off(per_round);
            let Some(c) = conn.as_mut() else {
                fail(batch);
                fail(rest);
                link.doorbells.ring_all();
                break;
            };
            let answered = c.token_buckets(&batch);
            link.count(c);
            match answered {
                Ok(answers) => {
                    for (d, a) in batch.into_iter().zip(answers) {
                        (d.done)(Some(a));
                    }
                }
                Err(e) => {
                    conn = None;
                    link.set_down(&e.to_string());
                    next_try = Instant::now() + link.cfg.retry_interval.0;
                    fail(batch);
                }
            }
            link.doorbells.ring_all();
            batch = rest;
        }
    }
}

impl RedisLink {
    /// Adds what `c` sent since it was last counted to [`RedisLink::round_trips`] and
    /// [`RedisLink::commands`].
    fn count(&self, c: &mut Conn) {
        let (rounds, sent) = (std::mem::take(&mut c.rounds), std::mem::take(&mut c.sent));
        self.round_trips.fetch_add(rounds, Ordering::Relaxed);
        self.commands.fetch_add(sent, Ordering::Relaxed);
    }
}

/// The bytes of a command's arguments.
fn args_len(c: &Command) -> usize {
    c.args.iter().map(|a| a.len()).sum()
}

/// Why a pipeline of plain commands stopped before its end ([`Conn::pipeline`]).
enum Stopped {
    /// The link failed: the round's commands and those after it got `None`.
    Link(io::Error),
    /// A round failed (late, or broken off) while it moved one command or one reply larger
    /// than a round's writes ([`MAX_ROUND_WRITE_BYTES`]), see [`RoundFailed::TooLarge`]: the
    /// round's commands got their answers or `None`, or are here to be sent again (its
    /// repeatable commands after the large one), followed by the commands after the round
    /// (not sent). Such a round is put down to that size, not to the link: a round is written and
    /// answered within one `timeout`, and a command or a reply always goes whole in one
    /// round, so an entry that the link cannot move within `timeout` (16 MiB takes about
    /// 18 ms on loopback, 1 GiB may be configured) would otherwise mark the link down for
    /// `retry_interval` each time it is written or read, every lookup missing meanwhile. A
    /// Redis that really stopped answering is found by the next round.
    TooLarge(Vec<Command>),
}

/// Why one round of plain commands failed ([`Conn::round`]).
enum RoundFailed {
    /// The link failed: every command of the round got `None`.
    Link(io::Error),
    /// The round was late or broken off ([`late_or_broken`]) while it wrote its one command
    /// larger than [`MAX_ROUND_WRITE_BYTES`] (or waited for that command's answer), or while
    /// it read a bulk string whose declared length (its header, read before its body) is
    /// larger than that: the commands answered before it got their answers, that command
    /// `None` (sent again, it would fail again); those after it were sent and may have run,
    /// so only the [`Command::repeatable`] ones are held here, to be sent again, and the
    /// others got `None` (see [`given_up`]). A round that fails with no such write or reply in
    /// progress (a silent Redis, a small reply cut off) is the link's failure.
    TooLarge(Vec<Command>),
}

/// Hands out the answers of a round given up while it moved the command after them (see
/// [`RoundFailed::TooLarge`]): the commands answered get their answers, in order, the next
/// one `None`; of the commands after it, the repeatable ones are returned, to be sent again,
/// and the others get `None`. Before, every command after the large one got `None`: a
/// lookup behind a large entry was a miss, a write behind it lost. A command is sent again
/// once at most (it is no longer repeatable after): a server that stalls on a large reply
/// in every round cannot have the queued commands sent round after round.
fn given_up(cmds: Vec<Command>, answers: Vec<BytesFrame>) -> Vec<Command> {
    let answered = answers.len();
    let mut answers = answers.into_iter();
    let mut again = Vec::new();
    for (i, mut c) in cmds.into_iter().enumerate() {
        if i > answered && c.repeatable {
            c.repeatable = false;
            again.push(c);
        } else if let Some(d) = c.done {
            d(answers.next());
        }
    }
    again
}

/// An error that says the round was late or its connection broken off, as a large write or
/// reply meets when the link cannot move it within `timeout`; a malformed or hostile reply
/// (`InvalidData`) is never put down to size.
fn late_or_broken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::WriteZero
    )
}

fn fail_commands(cmds: Vec<Command>) {
    for c in cmds {
        if let Some(d) = c.done {
            d(None);
        }
    }
}

fn fail(batch: Vec<Demand>) {
    for d in batch {
        (d.done)(None);
    }
}

/// One blocking connection, every round (writing its commands, reading their answers)
/// bounded by the configured timeout.
struct Conn {
    sock: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    sha: String,
    quota_sha: String,
    timeout: Duration,
    /// Round trips and commands sent since the link last counted them ([`RedisLink::count`]).
    rounds: u64,
    sent: u64,
    /// Whether the reply [`Conn::read_frame`] reads (or read last) is a bulk string declared
    /// longer than [`MAX_ROUND_WRITE_BYTES`] (see [`RoundFailed::TooLarge`]).
    large_reply: bool,
    /// Bytes read from the socket since the connection opened (wrapping), for a round's
    /// progress ([`Conn::round`]).
    received: usize,
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Conn {
    /// Connects, authenticates, and with `scripts` (the rate limiter's link) loads the
    /// limiter's scripts; the cache's link sends its own scripts with `EVAL` and needs none
    /// loaded (nor the `SCRIPT` command, which an ACL may deny it).
    fn open(cfg: &RedisConfig, scripts: bool) -> io::Result<Conn> {
        let t = cfg.timeout.0;
        let sock = TcpStream::connect_timeout(&cfg.address.addr, t)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(t))?;
        sock.set_write_timeout(Some(t))?;
        let mut c = Conn {
            sock,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: BytesMut::with_capacity(4096),
            sha: String::new(),
            quota_sha: String::new(),
            timeout: t,
            rounds: 0,
            sent: 0,
            large_reply: false,
            received: 0,
        };
        if let Some(p) = &cfg.password {
            match c.call(&[b"AUTH", p.as_bytes()])? {
                BytesFrame::SimpleString(_) => {}
                // The password itself is never logged.
                other => return Err(proto_err(format!("AUTH refused: {}", describe(&other)))),
            }
        }
        if scripts {
            c.load_script()?;
        }
        Ok(c)
    }

    fn load_script(&mut self) -> io::Result<()> {
        self.sha = self.script_load(TOKEN_BUCKET_LUA)?;
        self.quota_sha = self.script_load(QUOTA_LUA)?;
        Ok(())
    }

    /// Asks Redis whether it serves this connection: `PONG`, or a refusal of `PING` by an
    /// ACL that lets the cache's own commands through, is an answer.
    fn ping(&mut self) -> io::Result<()> {
        match self.call(&[b"PING"])? {
            BytesFrame::SimpleString(_) => Ok(()),
            BytesFrame::Error(e) if e.starts_with("NOPERM") => Ok(()),
            other => Err(proto_err(format!("PING: {}", describe(&other)))),
        }
    }

    fn script_load(&mut self, script: &str) -> io::Result<String> {
        match self.call(&[b"SCRIPT", b"LOAD", script.as_bytes()])? {
            BytesFrame::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(proto_err(format!(
                "SCRIPT LOAD failed: {}",
                describe(&other)
            ))),
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> io::Result<BytesFrame> {
        self.wbuf.clear();
        encode_command(&mut self.wbuf, args)?;
        self.expect_nothing()?;
        let deadline = Instant::now() + self.timeout;
        self.send(deadline)?;
        let f = self.read_frame(deadline, SMALL_REPLY_BYTES)?;
        self.nothing_left()?;
        Ok(f)
    }

    /// Before a round (checked by `run` before each, and by [`Conn::call`]): nothing may be
    /// waiting on the connection. RESP2 answers carry no
    /// request id, only their order: bytes nobody asked for (a second answer to one command,
    /// an answer that came after its round gave up on it) would be taken as the answer to the
    /// next command sent, another key's entry or another bucket's grant. Such a connection
    /// is dropped (a peer that closed it is found here too). One non-blocking peek, the one
    /// pooled upstream connections get ([`crate::upstream::still_open`]).
    fn expect_nothing(&mut self) -> io::Result<()> {
        if !self.rbuf.is_empty() {
            return Err(proto_err("a reply nobody asked for"));
        }
        if crate::upstream::still_open(self.sock.as_raw_fd()) {
            Ok(())
        } else {
            Err(proto_err(
                "closed by the server, or a reply nobody asked for",
            ))
        }
    }

    /// After a round: every byte read was an answer to one of its commands (see
    /// [`Conn::expect_nothing`]).
    fn nothing_left(&self) -> io::Result<()> {
        if self.rbuf.is_empty() {
            Ok(())
        } else {
            Err(proto_err("more replies than commands"))
        }
    }

    /// The next reply, of at most `max_reply` bytes (its command's bound): a longer one is
    /// a hostile or broken server, refused as soon as it is known to be longer (a bulk
    /// string's declared length, or the bytes of a reply not yet whole); but a bulk string
    /// answered whole (no array around it) that is longer than its command's bound and at
    /// most [`MAX_REPLY_BYTES`] long is read and thrown away as it arrives, never held, and
    /// taken as `Null` (no value: for a lookup, a miss). That is what another host whose
    /// `max_entry_bytes` is larger writes; breaking the link on it would take the shared layer
    /// away from this host for `retry_interval` each time the entry is asked for.
    fn read_frame(&mut self, deadline: Instant, max_reply: usize) -> io::Result<BytesFrame> {
        self.large_reply = false;
        loop {
            if let Some(len) = bulk_len(&self.rbuf) {
                self.large_reply = len > MAX_ROUND_WRITE_BYTES;
                if len > max_reply {
                    if len > MAX_REPLY_BYTES {
                        return Err(proto_err("bulk string too large"));
                    }
                    self.skip(len, deadline)?;
                    return Ok(BytesFrame::Null);
                }
            }
            match reply_len_within(&self.rbuf, max_reply)? {
                // Not whole: every byte held is this reply's.
                None if self.rbuf.len() > max_reply => return Err(proto_err("reply too large")),
                None => {}
                Some(n) if n > max_reply => return Err(proto_err("reply too large")),
                Some(_) => {
                    match decode_bytes_mut(&mut self.rbuf).map_err(|e| proto_err(e.to_string()))? {
                        Some((frame, _, _)) => return Ok(frame),
                        None => return Err(proto_err("reply checked whole but not decoded")),
                    }
                }
            }
            self.fill(deadline)?;
        }
    }

    /// Reads and throws away the next `len` bytes (a bulk string with its framing, see
    /// [`Conn::read_frame`]), which must end with CR LF; what follows them stays in `rbuf`.
    /// Nothing is held but one read's bytes.
    fn skip(&mut self, mut len: usize, deadline: Instant) -> io::Result<()> {
        let mut last = [0u8; 2];
        loop {
            let n = len.min(self.rbuf.len());
            match n {
                0 => {}
                1 => last = [last[1], self.rbuf[0]],
                n => last = [self.rbuf[n - 2], self.rbuf[n - 1]],
            }
            let _ = self.rbuf.split_to(n);
            len -= n;
            if len == 0 {
                break;
            }
            self.fill(deadline)?;
        }
        if &last != b"\r\n" {
            return Err(proto_err("bulk string not followed by CR LF"));
        }
        Ok(())
    }

    /// Writes `wbuf` whole by `deadline` (a round's: its answers must come by then too), and
    /// counts a round trip. Each `write` waits at most the time left: the socket's write
    /// timeout is set to it. Before, every `write` had the whole `timeout` to itself, so a
    /// server that took a few bytes at a time, each within `timeout`, held the round (the
    /// link's thread, and every command queued behind it) for as long as it went on reading.
    fn send(&mut self, deadline: Instant) -> io::Result<()> {
        let too_slow = || io::Error::new(io::ErrorKind::TimedOut, "commands taken too slowly");
        let mut at = 0;
        while at < self.wbuf.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(too_slow());
            }
            // Never zero (which would mean no timeout), as in `fill`.
            self.sock.set_write_timeout(Some(deadline - now))?;
            match self.sock.write(&self.wbuf[at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(too_slow())
                }
                Err(e) => return Err(e),
            }
        }
        self.rounds += 1;
        Ok(())
    }

    /// Reads what the server has sent into `rbuf`, waiting until `deadline` at most: the
    /// socket's read timeout is the time left. Before, it stayed the whole `timeout` set when
    /// the connection opened, so a read begun just before the deadline could wait one more
    /// `timeout` (a reply trickled in just in time made a round take twice its timeout).
    fn fill(&mut self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "answer too late"));
        }
        // Never zero (which would mean no timeout): a wait under a microsecond is rounded up.
        self.sock.set_read_timeout(Some(deadline - now))?;
        let mut chunk = [0u8; 16 * 1024];
        let n = match self.sock.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "answer too late"))
            }
            Err(e) => return Err(e),
        };
        self.rbuf.extend_from_slice(&chunk[..n]);
        self.received = self.received.wrapping_add(n);
        Ok(())
    }

    /// Sends plain commands in rounds whose longest possible replies (each command's
    /// [`Command::max_reply`]) take at most [`MAX_ROUND_REPLY_BYTES`], one command at least: a
    /// round's answers are held until it is read whole (see [`Conn::round`]), so a server
    /// answering each of 4096 queued lookups with the longest reply would otherwise have the
    /// link hold 4096 of them (32 GiB of 8 MiB replies). A round of writes, each answered with
    /// a status or an integer, takes up to 2048 of them. On an error the round's commands and
    /// those after it get `None`, except after a round that failed on one command or reply
    /// too large for a round ([`Stopped::TooLarge`]): the commands after it are given back
    /// unsent, behind the round's repeatable commands that were not answered.
    fn pipeline(&mut self, mut cmds: Vec<Command>) -> Result<(), Stopped> {
        loop {
            let per_round = round_len(cmds.iter().map(|c| c.max_reply))
                .min(write_round_len(cmds.iter().map(args_len)));
            let rest = cmds.split_off(per_round.min(cmds.len()));
            match self.round(cmds) {
                Ok(()) => {}
                Err(RoundFailed::TooLarge(mut again)) => {
                    again.extend(rest);
                    return Err(Stopped::TooLarge(again));
                }
                Err(RoundFailed::Link(e)) => {
                    fail_commands(rest);
                    return Err(Stopped::Link(e));
                }
            }
            if rest.is_empty() {
                return Ok(());
            }
            cmds = rest;
        }
    }

    /// Sends plain commands as one pipeline and hands each its answer once the round is read
    /// whole and held nothing more (see [`Conn::expect_nothing`], which `run` checks before
    /// the first round); on an error every command gets `None`. Writing the commands and
    /// reading their answers share one deadline, `timeout` away, moved while replies keep
    /// coming: once a reply is whole and [`MAX_ROUND_WRITE_BYTES`] or more have been read
    /// since the round began or the deadline last moved, the rest of the round has `timeout`
    /// from then on, never past [`MAX_ROUND_TIMEOUTS`] times `timeout` from its start. A Redis
    /// that has just moved a mebibyte is answering; before, one deadline for the round meant
    /// that a large reply read whole just in time made the small reply after it late, and
    /// that marked the link down. Each reply must still be whole by the deadline it starts
    /// under: a silent Redis is found within one `timeout`, and an entry too large to move
    /// within `timeout` still fails. A round that fails while it moves one large command or
    /// reply fails that command alone ([`RoundFailed::TooLarge`]).
    fn round(&mut self, cmds: Vec<Command>) -> Result<(), RoundFailed> {
        self.wbuf.clear();
        let large_write = cmds.len() == 1 && args_len(&cmds[0]) > MAX_ROUND_WRITE_BYTES;
        let encoded = cmds.iter().try_for_each(|c| {
            let args: Vec<&[u8]> = c.args.iter().map(|a| &a[..]).collect();
            encode_command(&mut self.wbuf, &args)
        });
        let start = Instant::now();
        let mut deadline = start + self.timeout;
        let cap = start + self.timeout.saturating_mul(MAX_ROUND_TIMEOUTS);
        if let Err(e) = encoded.and_then(|_| self.send(deadline)) {
            fail_commands(cmds);
            if large_write && late_or_broken(&e) {
                return Err(RoundFailed::TooLarge(Vec::new()));
            }
            return Err(RoundFailed::Link(e));
        }
        self.sent += cmds.len() as u64;
        let mut answers = Vec::with_capacity(cmds.len());
        // What had been read when the deadline was set last.
        let mut counted = self.received;
        for c in &cmds {
            match self.read_frame(deadline, c.max_reply) {
                Ok(f) => {
                    answers.push(f);
                    if self.received.wrapping_sub(counted) >= MAX_ROUND_WRITE_BYTES {
                        counted = self.received;
                        deadline = deadline.max(Instant::now() + self.timeout).min(cap);
                    }
                }
                Err(e) if (large_write || self.large_reply) && late_or_broken(&e) => {
                    return Err(RoundFailed::TooLarge(given_up(cmds, answers)));
                }
                Err(e) => {
                    fail_commands(cmds);
                    return Err(RoundFailed::Link(e));
                }
            }
        }
        if let Err(e) = self.nothing_left() {
            fail_commands(cmds);
            return Err(RoundFailed::Link(e));
        }
        for (c, f) in cmds.into_iter().zip(answers) {
            if let Some(d) = c.done {
                d(Some(f));
            }
        }
        self.shrink_buffers();
        Ok(())
    }

    /// Gives back a buffer a large round grew (the answers handed out keep their own bytes).
    fn shrink_buffers(&mut self) {
        if self.wbuf.capacity() > KEPT_BUFFER_BYTES {
            self.wbuf = BytesMut::with_capacity(4096);
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > KEPT_BUFFER_BYTES {
            self.rbuf = BytesMut::with_capacity(4096);
        }
    }

    /// Runs the token-bucket script once per demand, as one pipeline (one round: `run` sizes
    /// it). A demand that meets a server without the script (restarted, flushed) is sent again
    /// after loading it.
    fn token_buckets(&mut self, batch: &[Demand]) -> io::Result<Vec<(u32, i64)>> {
        let mut out: Vec<Option<(u32, i64)>> = vec![None; batch.len()];
        for _ in 0..2 {
            let todo: Vec<usize> = (0..batch.len()).filter(|&i| out[i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            self.wbuf.clear();
            for &i in &todo {
                let d = &batch[i];
                let (want, back) = (d.want.to_string(), fmt_f64(d.back));
                // Token bucket: rate, burst, want, back. Quota: limit, want, back, expiry.
                let (sha, args) = match d.call {
                    Call::TokenBucket { rate, burst } => {
                        (&self.sha, [fmt_f64(rate), fmt_f64(burst), want, back])
                    }
                    Call::Quota { limit, expire_at } => (
                        &self.quota_sha,
                        [fmt_f64(limit), want, back, expire_at.to_string()],
                    ),
                };
                encode_command(
                    &mut self.wbuf,
                    &[
                        b"EVALSHA",
                        sha.as_bytes(),
                        b"1",
                        d.key.as_bytes(),
                        args[0].as_bytes(),
                        args[1].as_bytes(),
                        args[2].as_bytes(),
                        args[3].as_bytes(),
                    ],
                )?;
            }
            let deadline = Instant::now() + self.timeout;
            self.send(deadline)?;
            self.sent += todo.len() as u64;
            let mut reload = false;
            for &i in &todo {
                match self.read_frame(deadline, SMALL_REPLY_BYTES)? {
                    BytesFrame::Array(v) if v.len() == 2 => {
                        let got = frame_int(&v[0]).ok_or_else(|| proto_err("bad answer"))?;
                        let left = frame_int(&v[1]).ok_or_else(|| proto_err("bad answer"))?;
                        // Never more than was asked: a broken or hostile server cannot
                        // hand a host an unbounded stock.
                        let asked = i64::from(batch[i].want);
                        out[i] = Some((got.clamp(0, asked) as u32, left));
                    }
                    BytesFrame::Error(e) if e.starts_with("NOSCRIPT") => reload = true,
                    other => return Err(proto_err(format!("script: {}", describe(&other)))),
                }
            }
            self.nothing_left()?;
            if !reload {
                break;
            }
            self.load_script()?;
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| proto_err("script missing after reload")))
            .collect()
    }
}

/// The whole length (its line, the string, CR LF) of the bulk string at the start of `buf`,
/// once its line is there; `None` for anything else, or a line [`reply_len`] refuses.
fn bulk_len(buf: &[u8]) -> Option<usize> {
    let rest = buf.strip_prefix(b"$")?;
    // A length has at most 20 digits and a sign.
    let eol = memchr::memmem::find(&rest[..rest.len().min(24)], b"\r\n")?;
    let n: u64 = std::str::from_utf8(&rest[..eol]).ok()?.parse().ok()?;
    usize::try_from(n).ok()?.checked_add(1 + eol + 2 + 2)
}

/// How many of the commands whose longest replies are `bounds` (in order) go in the next
/// round: as many as fit in [`MAX_ROUND_REPLY_BYTES`], one at least.
fn round_len(bounds: impl Iterator<Item = usize>) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for b in bounds {
        total = total.saturating_add(b.clamp(1, MAX_REPLY_BYTES));
        if n > 0 && total > MAX_ROUND_REPLY_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// How many of the commands whose arguments weigh `sizes` bytes (in order) go in the next
/// round: as many as fit in [`MAX_ROUND_WRITE_BYTES`], one at least. A round is written and
/// answered within one `timeout`, so the cache's queued writes (up to 64 MiB) go in rounds a
/// link can write in that time rather than one.
fn write_round_len(sizes: impl Iterator<Item = usize>) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for b in sizes {
        total = total.saturating_add(b);
        if n > 0 && total > MAX_ROUND_WRITE_BYTES {
            break;
        }
        n += 1;
    }
    n
}

/// Takes the first reply off `buf`: `Ok(None)` while it is not whole. The reply is checked
/// first, without recursion or allocation, against the limits above ([`reply_len`]), and only
/// then handed to the decoder.
pub fn decode_reply(buf: &mut BytesMut) -> io::Result<Option<BytesFrame>> {
    decode_reply_within(buf, MAX_REPLY_BYTES)
}

/// [`decode_reply`] with bulk strings of at most `max_bulk` bytes: a longer one is refused
/// as soon as its length is read, before any of it is.
pub fn decode_reply_within(buf: &mut BytesMut, max_bulk: usize) -> io::Result<Option<BytesFrame>> {
    if reply_len_within(buf, max_bulk)?.is_none() {
        return Ok(None);
    }
    match decode_bytes_mut(buf).map_err(|e| proto_err(e.to_string()))? {
        Some((frame, _, _)) => Ok(Some(frame)),
        None => Err(proto_err("reply checked whole but not decoded")),
    }
}

/// The length of the RESP2 reply at the start of `buf` (`Ok(None)`: not whole yet), read
/// iteratively: arrays nest at most [`MAX_REPLY_DEPTH`] deep, a reply holds at most
/// [`MAX_REPLY_FRAMES`] frames, a line at most [`MAX_REPLY_LINE`] bytes and a bulk string at
/// most [`MAX_REPLY_BYTES`]. Numbers are read as the decoder reads them.
pub fn reply_len(buf: &[u8]) -> io::Result<Option<usize>> {
    reply_len_within(buf, MAX_REPLY_BYTES)
}

/// [`reply_len`] with bulk strings of at most `max_bulk` bytes (and [`MAX_REPLY_BYTES`]).
pub fn reply_len_within(buf: &[u8], max_bulk: usize) -> io::Result<Option<usize>> {
    let max_bulk = max_bulk.min(MAX_REPLY_BYTES);
    // Elements still expected by each open array, innermost last.
    let mut open = [0usize; MAX_REPLY_DEPTH];
    let mut depth = 0;
    let mut at = 0;
    for _ in 0..MAX_REPLY_FRAMES {
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        // A byte that starts no RESP2 frame is refused as it arrives: before, bytes without a
        // line end waited for one, and a reply of stray bytes was taken for a late one.
        if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
            return Err(proto_err("bad frame type in reply"));
        }
        let rest = &buf[at + 1..];
        let window = &rest[..rest.len().min(MAX_REPLY_LINE + 2)];
        let Some(eol) = memchr::memmem::find(window, b"\r\n") else {
            if rest.len() > MAX_REPLY_LINE + 1 {
                return Err(proto_err("reply line too long"));
            }
            return Ok(None);
        };
        let line = &rest[..eol];
        at += 1 + eol + 2;
        let number = || -> io::Result<i64> {
            std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| proto_err("bad number in reply"))
        };
        match kind {
            b'+' | b'-' => {}
            b':' => {
                number()?;
            }
            b'$' => match number()? {
                -1 => {}
                n if n < 0 => return Err(proto_err("bad bulk length in reply")),
                n => {
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|n| *n <= max_bulk)
                        .ok_or_else(|| proto_err("bulk string too large"))?;
                    // The string and the two bytes after it (the decoder takes them as CR LF
                    // unchecked).
                    at = at.saturating_add(n).saturating_add(2);
                    if at > buf.len() {
                        return Ok(None);
                    }
                }
            },
            b'*' => match number()? {
                -1 | 0 => {}
                n if n < 0 => return Err(proto_err("bad array length in reply")),
                n => {
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|n| *n < MAX_REPLY_FRAMES)
                        .ok_or_else(|| proto_err("array too long"))?;
                    let slot = open
                        .get_mut(depth)
                        .ok_or_else(|| proto_err("reply nested too deep"))?;
                    *slot = n;
                    depth += 1;
                    continue;
                }
            },
            _ => return Err(proto_err("bad frame type in reply")),
        }
        // One frame done: it counts for the innermost open array, which may close in turn.
        loop {
            if depth == 0 {
                return Ok(Some(at));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
    Err(proto_err("too many frames in reply"))
}

fn encode_command(buf: &mut BytesMut, args: &[&[u8]]) -> io::Result<()> {
    let parts: Vec<BorrowedFrame<'_>> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    extend_encode_borrowed(buf, &BorrowedFrame::Array(&parts), false)
        .map(|_| ())
        .map_err(|e| proto_err(e.to_string()))
}

fn frame_int(f: &BytesFrame) -> Option<i64> {
    match f {
        BytesFrame::Integer(i) => Some(*i),
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            std::str::from_utf8(b).ok()?.parse().ok()
        }
        _ => None,
    }
}

fn describe(f: &BytesFrame) -> String {
    match f {
        BytesFrame::Error(e) => e.to_string(),
        other => format!("unexpected {:?}", other.kind()),
    }
}

/// A number for the script: integral values without a fraction, others with enough digits.
fn fmt_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.6}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays_of_bulk_strings() {
        let mut b = BytesMut::new();
        encode_command(&mut b, &[b"GET", b"k"]).unwrap();
        assert_eq!(&b[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }

    /// A server for one link whose answer to the first command waits until the test says
    /// `go` (see [`Gated::go`]), so that commands queued meanwhile reach the link's thread as
    /// one batch; then `rest` serves the connection, and its socket stays open until the
    /// test is done.
    struct Gated {
        addr: std::net::SocketAddr,
        first_seen: std::sync::mpsc::Receiver<()>,
        go: std::sync::mpsc::Sender<()>,
        done: std::sync::mpsc::Sender<()>,
        server: std::thread::JoinHandle<()>,
    }

    impl Gated {
        fn start(
            first_answer: &'static [u8],
            rest: impl FnOnce(&mut TcpStream) + Send + 'static,
        ) -> Gated {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let (first_read, first_seen) = std::sync::mpsc::channel::<()>();
            let (go, answer_first) = std::sync::mpsc::channel::<()>();
            let (done, wait) = std::sync::mpsc::channel::<()>();
            let server = std::thread::spawn(move || {
                let Some(mut s) = first_answered(&l, &first_read, &answer_first, first_answer)
                else {
                    return;
                };
                rest(&mut s);
                let _ = wait.recv();
            });
            Gated {
                addr,
                first_seen,
                go,
                done,
                server,
            }
        }

        /// Waits for the first command to reach the server, queues `batch` behind it with
        /// `queue`, then lets the server answer.
        fn go(&self, queue: impl FnOnce()) {
            self.first_seen
                .recv_timeout(Duration::from_secs(10))
                .expect("the first command reaches the server");
            queue();
            let _ = self.go.send(());
        }

        fn stop(self, link: (Arc<AtomicBool>, JoinHandle<()>)) {
            link.0.store(true, Ordering::SeqCst);
            let _ = self.done.send(());
            let _ = self.server.join();
            let _ = link.1.join();
        }
    }

    /// A link to `addr` with `timeout`, its thread started.
    fn link_to(
        addr: std::net::SocketAddr,
        role: &'static str,
        timeout: &str,
    ) -> (Arc<RedisLink>, (Arc<AtomicBool>, JoinHandle<()>)) {
        let cfg: RedisConfig =
            toml::from_str(&format!("address = \"{addr}\"\ntimeout = \"{timeout}\"\n"))
                .expect("config");
        let link = RedisLink::with_role(cfg, role);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(link.clone(), stop.clone()).expect("thread");
        (link, (stop, thread))
    }

    /// A plain command whose reply may be `max_reply` bytes long, repeatable; `tx` hears
    /// whether it was answered.
    fn command(
        args: &[&'static [u8]],
        max_reply: usize,
        tx: Option<std::sync::mpsc::Sender<bool>>,
    ) -> Command {
        Command {
            args: args.iter().map(|a| bytes::Bytes::from_static(a)).collect(),
            max_reply,
            repeatable: true,
            done: tx.map(|tx| -> OnFrame {
                Box::new(move |f| {
                    let _ = tx.send(f.is_some());
                })
            }),
        }
    }

    /// Reads from `s` until `needle` has been seen `n` times, then writes `answer` `n` times.
    fn answer_after(s: &mut TcpStream, needle: &[u8], n: usize, answer: &[u8]) {
        let (mut seen, mut chunk) = (Vec::new(), [0u8; 4096]);
        while seen.windows(needle.len()).filter(|w| *w == needle).count() < n {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = s.write_all(&answer.repeat(n));
    }

    /// A batch of plain commands goes in rounds whose longest replies fit
    /// [`MAX_ROUND_REPLY_BYTES`], each round's answers handed out once it is read: with a
    /// 16 MiB reply bound each, 8 commands a round. A server that answers only the first 8 of
    /// 40 queued lookups has those 8 answered; before, the 40 went as one round and all waited
    /// for the 40th answer (the link could hold 40 replies of 16 MiB).
    #[test]
    fn a_batch_goes_in_rounds_whose_replies_are_bounded_in_bytes() {
        let server = Gated::start(b"$1\r\nx\r\n", |s| {
            answer_after(s, b"\r\nGET", 8, b"$1\r\nv\r\n");
        });
        let (link, thread) = link_to(server.addr, "cache", "30s");
        link.command(command(&[b"GET", b"first"], 16 << 20, None));
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        server.go(|| {
            for _ in 0..40 {
                link.command(command(&[b"GET", b"k"], 16 << 20, Some(tx.clone())));
            }
        });
        for i in 0..8 {
            let got = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(got, Ok(true), "answer {i} of the first round");
        }
        server.stop(thread);
    }

    /// A write of an entry too large to move within `timeout` fails alone: the link stays up,
    /// the command queued behind it is answered on a fresh connection, and the write is
    /// counted. The server never reads past its first command on the first connection, so a
    /// 32 MiB `SET` cannot be written within the round's `timeout` (more than loopback's
    /// socket buffers hold). Before, that round marked the link down for `retry_interval`,
    /// and the lookup behind it failed with it (a miss, and every lookup after it for a
    /// second), each time such an entry was written.
    #[test]
    fn a_write_too_large_for_the_timeout_fails_alone_and_leaves_the_link_up() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (first_read, first_seen) = std::sync::mpsc::channel::<()>();
        let (go, answer_first) = std::sync::mpsc::channel::<()>();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let Some(_first) = first_answered(&l, &first_read, &answer_first, b"$1\r\nx\r\n")
            else {
                return;
            };
            // `first` is read no more (and stays open): the large write stalls on it.
            let Ok((mut second, _)) = l.accept() else {
                return;
            };
            answer_after(&mut second, b"\r\nGET", 1, b"$1\r\nv\r\n");
            let _ = wait.recv();
        });
        let (link, thread) = link_to(addr, "cache", "1s");
        link.command(command(&[b"GET", b"first"], SMALL_REPLY_BYTES, None));
        first_seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the first command reaches the server");
        let entry = bytes::Bytes::from(vec![b'e'; 32 << 20]);
        let (set_tx, set_rx) = std::sync::mpsc::channel::<bool>();
        let (get_tx, get_rx) = std::sync::mpsc::channel::<bool>();
        let mut set = command(&[b"SET", b"big"], SMALL_REPLY_BYTES, Some(set_tx));
        set.args.push(entry);
        link.command(set);
        link.command(command(&[b"GET", b"k"], SMALL_REPLY_BYTES, Some(get_tx)));
        let _ = go.send(());
        assert_eq!(set_rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        assert_eq!(
            get_rx.recv_timeout(Duration::from_secs(30)),
            Ok(true),
            "the lookup behind the large write is answered"
        );
        assert!(!link.is_down());
        assert_eq!(link.failures.load(Ordering::Relaxed), 0);
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 1);
        thread.0.store(true, Ordering::SeqCst);
        let _ = done.send(());
        let _ = server.join();
        let _ = thread.1.join();
    }

    /// The first connection of a fake Redis: accepted, the link's first command read (it
    /// comes alone: nothing more is sent before its answer), `seen` told, and `answer` written
    /// once `go` says so; `None` when the link went away meanwhile. (Serves [`Gated`] and the
    /// tests whose first connection goes on its own way.)
    fn first_answered(
        l: &std::net::TcpListener,
        seen: &std::sync::mpsc::Sender<()>,
        go: &std::sync::mpsc::Receiver<()>,
        answer: &[u8],
    ) -> Option<TcpStream> {
        let (mut first, _) = l.accept().ok()?;
        let mut chunk = [0u8; 4096];
        if !matches!(first.read(&mut chunk), Ok(n) if n > 0) {
            return None;
        }
        let _ = seen.send(());
        let _ = go.recv();
        first.write_all(answer).ok()?;
        Some(first)
    }

    /// Reads from `s` until `needle` has been seen.
    /// Only the bytes a match may still end in are kept (a 2 MiB command is read in a
    /// blink).
    fn read_until(s: &mut TcpStream, needle: &[u8]) {
        let (mut seen, mut chunk) = (Vec::new(), [0u8; 64 * 1024]);
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let keep = seen.len().saturating_sub(needle.len());
            seen.drain(..keep);
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The commands given back after a large write keep the queue within its bounds: while
    /// a 32 MiB `SET` is being written (the server reads no more of it, then drops the
    /// connection), 4096 more lookups fill the queue again; the 4095 lookups given back go
    /// first and the newest 4095 are refused (`None`, counted), as a full queue refuses them.
    /// Before, both were kept (8191 queued, past `MAX_QUEUED_COMMANDS`), so each large write
    /// given up could grow the queue by another 4096 commands or 64 MiB.
    #[test]
    fn commands_given_back_after_a_large_write_keep_the_queue_within_its_bounds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
        let (go, answer_first) = std::sync::mpsc::channel::<()>();
        let (cut, cut_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let Some(mut first) = first_answered(&l, &seen_tx, &answer_first, b"$1\r\nx\r\n")
            else {
                return;
            };
            // The large write has begun: it stalls here until the test has queued more,
            // then the connection is dropped under it (unread bytes: a reset).
            read_until(&mut first, b"SET");
            let _ = seen_tx.send(());
            let _ = cut_rx.recv();
            drop(first);
            let Ok((mut second, _)) = l.accept() else {
                return;
            };
            answer_each(&mut second, b"\r\nGET", usize::MAX, b"$1\r\nv\r\n");
        });
        let (link, thread) = link_to(addr, "cache", "30s");
        link.command(command(&[b"GET", b"first"], SMALL_REPLY_BYTES, None));
        seen.recv_timeout(Duration::from_secs(10))
            .expect("the first command reaches the server");
        let (set_tx, set_rx) = std::sync::mpsc::channel::<bool>();
        let mut set = command(&[b"SET", b"big"], SMALL_REPLY_BYTES, Some(set_tx));
        set.args.push(bytes::Bytes::from(vec![b'e'; 32 << 20]));
        link.command(set);
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        for _ in 0..MAX_QUEUED_COMMANDS - 1 {
            link.command(command(
                &[b"GET", b"k"],
                SMALL_REPLY_BYTES,
                Some(tx.clone()),
            ));
        }
        let _ = go.send(());
        seen.recv_timeout(Duration::from_secs(10))
            .expect("the large write reaches the server");
        for _ in 0..MAX_QUEUED_COMMANDS {
            link.command(command(
                &[b"GET", b"k"],
                SMALL_REPLY_BYTES,
                Some(tx.clone()),
            ));
        }
        let _ = cut.send(());
        assert_eq!(set_rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        let (mut answered, mut refused) = (0, 0);
        for _ in 0..2 * MAX_QUEUED_COMMANDS - 1 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(true) => answered += 1,
                Ok(false) => refused += 1,
                Err(e) => panic!("a lookup got no answer: {e}"),
            }
        }
        assert_eq!(
            (answered, refused),
            (MAX_QUEUED_COMMANDS, MAX_QUEUED_COMMANDS - 1)
        );
        assert_eq!(
            link.commands_refused.load(Ordering::Relaxed),
            MAX_QUEUED_COMMANDS as u64 - 1
        );
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 1);
        assert!(!link.is_down());
        thread.0.store(true, Ordering::SeqCst);
        let _ = thread.1.join();
        let _ = server.join();
    }

    /// A round of lookups `a`, `big`, `c`, `d` whose answer to `big` declares an 8 MiB bulk
    /// string (over `MAX_ROUND_WRITE_BYTES`) and then stalls, `big_reply` being the lookup's
    /// bound; `d` is marked not repeatable (as a command that counts would be). Returns
    /// whether `a`, `big`, `c`, `d` were answered and whether the lookup `k` queued after them
    /// was, on a fresh connection.
    fn a_large_reply_stalls(big_reply: usize) -> (Arc<RedisLink>, [Result<bool, String>; 5]) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (seen_tx, seen) = std::sync::mpsc::channel::<()>();
        let (go, answer_first) = std::sync::mpsc::channel::<()>();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let Some(mut first) = first_answered(&l, &seen_tx, &answer_first, b"$1\r\nx\r\n")
            else {
                return;
            };
            read_until(&mut first, b"\r\nd\r\n");
            // `a` whole, then only the header and a few bytes of `big`: `first` says no
            // more, and stays open.
            if first.write_all(b"$1\r\na\r\n$8388608\r\neeee").is_err() {
                return;
            }
            if let Ok((mut second, _)) = l.accept() {
                answer_each(&mut second, b"\r\nGET", usize::MAX, b"$1\r\nv\r\n");
            }
            let _ = wait.recv();
        });
        let (link, thread) = link_to(addr, "cache", "1s");
        link.command(command(&[b"GET", b"first"], SMALL_REPLY_BYTES, None));
        seen.recv_timeout(Duration::from_secs(10))
            .expect("the first command reaches the server");
        let mut rxs = Vec::new();
        let batch: [(&'static [u8], usize); 4] = [
            (b"a", 16 << 20),
            (b"big", big_reply),
            (b"c", 16 << 20),
            (b"d", 16 << 20),
        ];
        for (key, bound) in batch {
            let (tx, rx) = std::sync::mpsc::channel::<bool>();
            let mut get = command(&[b"GET", key], bound, Some(tx));
            get.repeatable = key != b"d";
            link.command(get);
            rxs.push(rx);
        }
        let _ = go.send(());
        let wait_for = |rx: &std::sync::mpsc::Receiver<bool>| {
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|e| e.to_string())
        };
        let [a, big, c, d] = [&rxs[0], &rxs[1], &rxs[2], &rxs[3]].map(wait_for);
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        link.command(command(&[b"GET", b"k"], SMALL_REPLY_BYTES, Some(tx)));
        let k = wait_for(&rx);
        thread.0.store(true, Ordering::SeqCst);
        let _ = thread.1.join();
        let _ = done.send(());
        // A link that never opened a second connection leaves the server waiting for one.
        drop(TcpStream::connect(addr));
        let _ = server.join();
        (link, [a, big, c, d, k])
    }

    /// A lookup whose reply declares a bulk string over a round's bytes (an entry written by
    /// a host with a larger `timeout` or `max_entry_bytes`) and does not come whole within
    /// `timeout` fails alone, as a large write does: the answer before it is handed out, it
    /// gets `None`, the connection is dropped (it holds half a reply), the link stays up, and
    /// the repeatable lookup after it in its round (`c`) is sent again on a fresh connection
    /// and answered there, with the next lookup; the one not repeatable (`d`: it may have
    /// run) gets `None`. Before, the round marked the link down for `retry_interval` (every
    /// lookup a miss meanwhile, each time such an entry was asked for), and later every
    /// command after the large one got `None` (a miss, or a write lost). Here the reply fits
    /// the lookup's bound (it would be read and kept).
    #[test]
    fn a_reply_too_large_for_the_timeout_fails_its_lookup_alone_and_leaves_the_link_up() {
        let (link, got) = a_large_reply_stalls(16 << 20);
        assert_eq!(got, [Ok(true), Ok(false), Ok(true), Ok(false), Ok(true)]);
        assert!(!link.is_down());
        assert_eq!(link.failures.load(Ordering::Relaxed), 0);
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 1);
    }

    /// As above, with a reply longer than the lookup's bound (read and thrown away as it
    /// arrives, see `Conn::read_frame`).
    #[test]
    fn a_reply_too_large_to_skip_within_the_timeout_fails_its_lookup_alone() {
        let (link, got) = a_large_reply_stalls(SMALL_REPLY_BYTES);
        assert_eq!(got, [Ok(true), Ok(false), Ok(true), Ok(false), Ok(true)]);
        assert!(!link.is_down());
        assert_eq!(link.failures.load(Ordering::Relaxed), 0);
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 1);
    }

    /// A command is sent again once at most: queued behind two lookups `big1` and `big2`
    /// whose replies a server starts (an 8 MiB length, four bytes) and never ends, on every
    /// connection, the lookup `c` is sent again after `big1`'s round is given up, and gets
    /// `None` when `big2`'s is; the link stays up, each large lookup counted. Without the
    /// bound, `c` went out a third time (here answered, on a third connection); a server
    /// that stalls every round could have every queued command sent round after round.
    #[test]
    fn a_command_is_sent_again_once_at_most() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let Ok((mut s, _)) = l.accept() else { return };
                read_until(&mut s, b"\r\nc\r\n");
                if s.write_all(b"$8388608\r\neeee").is_err() {
                    return;
                }
                // Held until the link gives up and closes it.
                let mut chunk = [0u8; 4096];
                while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
            }
            if let Ok((mut third, _)) = l.accept() {
                answer_each(&mut third, b"\r\nGET", usize::MAX, b"$1\r\nv\r\n");
            }
        });
        let cfg: RedisConfig =
            toml::from_str(&format!("address = \"{addr}\"\ntimeout = \"500ms\"\n"))
                .expect("config");
        let link = RedisLink::with_role(cfg, "cache");
        let mut rxs = Vec::new();
        // Queued before the link's thread starts: they go as one round.
        for key in [&b"big1"[..], b"big2", b"c"] {
            let (tx, rx) = std::sync::mpsc::channel::<bool>();
            let mut get = command(&[b"GET"], 16 << 20, Some(tx));
            get.args.push(bytes::Bytes::copy_from_slice(key));
            link.command(get);
            rxs.push(rx);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(link.clone(), stop.clone()).expect("thread");
        let got: Vec<_> = rxs
            .iter()
            .map(|rx| rx.recv_timeout(Duration::from_secs(30)))
            .collect();
        stop.store(true, Ordering::SeqCst);
        let _ = thread.join();
        // A link that did not connect a third time leaves the server waiting for it.
        drop(TcpStream::connect(addr));
        let _ = server.join();
        assert_eq!(got, [Ok(false), Ok(false), Ok(false)], "big1, big2, c");
        assert!(!link.is_down());
        assert_eq!(link.failures.load(Ordering::Relaxed), 0);
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 2);
    }

    /// A round of lookups `a`, `big`, `c` (a 2 MiB entry in the middle), its `timeout` 4 s:
    /// the server sends `a` and half of `big` at once, the rest of `big` 2 s later (whole
    /// within the round's first `timeout`), and `c` 2.5 s after that: past the round's first
    /// deadline, but within `timeout` of `big` being whole. A Redis that moves a 2 MiB reply
    /// is answering; `c` is answered on the same connection, the link stays up, and the
    /// lookup `k` queued after the round is answered there too (the server takes no second
    /// connection). Before, the round's one deadline, used up by `big`, made `c` late and
    /// marked the link down (a miss for every lookup for `retry_interval`), each time a
    /// large entry was read with other commands behind it. The sleeps only place `c` well
    /// inside the window (0.5 s past the first deadline, 1.5 s before the moved one; `big`
    /// whole 2 s before the first: margins wide enough for a loaded 2-core CI machine, and a
    /// late server thread only moves `c` later past the first deadline); no assertion is on
    /// time.
    #[test]
    fn a_large_reply_read_whole_gives_the_rest_of_its_round_a_fresh_timeout() {
        const BIG: usize = 2 << 20;
        let server = Gated::start(b"$1\r\nx\r\n", |s| {
            read_until(s, b"\r\nc\r\n");
            let mut head = b"$1\r\na\r\n".to_vec();
            head.extend_from_slice(format!("${BIG}\r\n").as_bytes());
            head.resize(head.len() + BIG / 2, b'e');
            if s.write_all(&head).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2000));
            let mut tail = vec![b'e'; BIG - BIG / 2];
            tail.extend_from_slice(b"\r\n");
            if s.write_all(&tail).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2500));
            if s.write_all(b"$1\r\nc\r\n").is_err() {
                return;
            }
            answer_each(s, b"\r\nGET", 1, b"$1\r\nv\r\n");
        });
        let (link, thread) = link_to(server.addr, "cache", "4s");
        link.command(command(&[b"GET", b"first"], SMALL_REPLY_BYTES, None));
        let mut rxs = Vec::new();
        server.go(|| {
            for key in [&b"a"[..], b"big", b"c"] {
                let (tx, rx) = std::sync::mpsc::channel::<bool>();
                let mut get = command(&[b"GET"], 16 << 20, Some(tx));
                get.args.push(bytes::Bytes::copy_from_slice(key));
                link.command(get);
                rxs.push(rx);
            }
        });
        let got: Vec<_> = rxs
            .iter()
            .map(|rx| rx.recv_timeout(Duration::from_secs(30)))
            .collect();
        assert_eq!(got, [Ok(true), Ok(true), Ok(true)], "a, big, c");
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        link.command(command(&[b"GET", b"k"], SMALL_REPLY_BYTES, Some(tx)));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(true), "k");
        assert!(!link.is_down());
        assert_eq!(link.failures.load(Ordering::Relaxed), 0);
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 0);
        server.stop(thread);
    }

    /// The deadline a large reply moves is a fresh `timeout`, not a pass: a Redis that sends
    /// `a` and a 2 MiB `big` whole and then nothing for `c` still marks the link down (a
    /// silent Redis is found within one `timeout` of its last whole reply), and `c` gets
    /// `None`.
    #[test]
    fn a_redis_silent_after_a_large_reply_still_marks_the_link_down() {
        const BIG: usize = 2 << 20;
        let server = Gated::start(b"$1\r\nx\r\n", |s| {
            read_until(s, b"\r\nc\r\n");
            let mut both = b"$1\r\na\r\n".to_vec();
            both.extend_from_slice(format!("${BIG}\r\n").as_bytes());
            both.resize(both.len() + BIG, b'e');
            both.extend_from_slice(b"\r\n");
            let _ = s.write_all(&both);
        });
        let (link, thread) = link_to(server.addr, "cache", "500ms");
        link.command(command(&[b"GET", b"first"], SMALL_REPLY_BYTES, None));
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        server.go(|| {
            for key in [&b"a"[..], b"big", b"c"] {
                let mut get = command(&[b"GET"], 16 << 20, Some(tx.clone()));
                get.args.push(bytes::Bytes::copy_from_slice(key));
                link.command(get);
            }
        });
        for key in ["a", "big", "c"] {
            let got = rx.recv_timeout(Duration::from_secs(30));
            assert_eq!(got, Ok(false), "{key}: the round failed with the link");
        }
        // Answered after the link's thread has dealt with the failed round.
        link.command(command(&[b"GET", b"k"], SMALL_REPLY_BYTES, Some(tx)));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        assert!(link.is_down());
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 0);
        server.stop(thread);
    }

    /// A Redis that does not answer a lookup, that cuts a small reply short, or that declares
    /// a bulk string longer than any entry (`MAX_REPLY_BYTES`) still marks the link down:
    /// only a reply declared over a round's bytes, late or cut off, is put down to its size.
    /// The server would answer lookups on a second connection, which a link left up would
    /// open.
    #[test]
    fn a_silent_redis_or_a_small_reply_cut_short_still_marks_the_link_down() {
        for reply in [&b""[..], b"$100\r\nabc", b"$99999999999\r\n"] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            let server = std::thread::spawn(move || {
                let Ok((mut first, _)) = l.accept() else {
                    return;
                };
                read_until(&mut first, b"GET");
                if first.write_all(reply).is_err() {
                    return;
                }
                // A second connection, if the link opens one, is answered (the test opens
                // one of its own at the end, so that this one returns).
                if let Ok((mut second, _)) = l.accept() {
                    answer_each(&mut second, b"\r\nGET", usize::MAX, b"$1\r\nv\r\n");
                }
            });
            let (link, thread) = link_to(addr, "cache", "1s");
            let (tx, rx) = std::sync::mpsc::channel::<bool>();
            link.command(command(&[b"GET", b"x"], 16 << 20, Some(tx.clone())));
            assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(false));
            link.command(command(&[b"GET", b"k"], 16 << 20, Some(tx)));
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(30)),
                Ok(false),
                "reply {reply:?}: the lookup after it fails"
            );
            assert!(link.is_down(), "reply {reply:?}");
            assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 0);
            thread.0.store(true, Ordering::SeqCst);
            let _ = thread.1.join();
            drop(TcpStream::connect(addr));
            let _ = server.join();
        }
    }

    /// A large write answered with a malformed reply (a broken or hostile server, not a
    /// slow link) marks the link down: only a round late or broken off is put down to its
    /// size. Before, any failure of a round of one write over 1 MiB was.
    #[test]
    fn a_large_write_answered_with_a_malformed_reply_marks_the_link_down() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let Ok((mut first, _)) = l.accept() else {
                return;
            };
            read_until(&mut first, b"eeee\r\n");
            if first.write_all(b"?bad\r\n").is_err() {
                return;
            }
            // A second connection, if the link opens one, is answered (the test opens one of
            // its own at the end, so that this one returns).
            if let Ok((mut second, _)) = l.accept() {
                answer_each(&mut second, b"\r\nGET", usize::MAX, b"$1\r\nv\r\n");
            }
        });
        let (link, thread) = link_to(addr, "cache", "10s");
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        let mut set = command(&[b"SET", b"big"], SMALL_REPLY_BYTES, Some(tx.clone()));
        set.args.push(bytes::Bytes::from(vec![b'e'; 2 << 20]));
        link.command(set);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        link.command(command(&[b"GET", b"k"], SMALL_REPLY_BYTES, Some(tx)));
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(false));
        assert!(link.is_down());
        assert_eq!(link.commands_too_large.load(Ordering::Relaxed), 0);
        thread.0.store(true, Ordering::SeqCst);
        let _ = thread.1.join();
        drop(TcpStream::connect(addr));
        let _ = server.join();
    }

    /// A round's depth follows each command's own reply bound, not the longest reply of the
    /// link: 100 writes, each answered with a status ([`SMALL_REPLY_BYTES`]), go as one round,
    /// and a server that answers once it has them all answers every one. Before, every command
    /// of the cache's link had the link's bound (a list's 8 MiB and 64 KiB with the default
    /// `max_entry_bytes`): 15 commands a round, whose answers this server never sent, so
    /// every write failed after the timeout.
    #[test]
    fn a_round_of_small_reply_commands_is_deeper_than_a_round_of_lookups() {
        let server = Gated::start(b"+OK\r\n", |s| {
            answer_after(s, b"\r\nSET", 100, b"+OK\r\n");
        });
        let (link, thread) = link_to(server.addr, "cache", "5s");
        link.command(command(&[b"SET", b"first", b"v"], SMALL_REPLY_BYTES, None));
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        server.go(|| {
            for _ in 0..100 {
                let set = command(&[b"SET", b"k", b"v"], SMALL_REPLY_BYTES, Some(tx.clone()));
                link.command(set);
            }
        });
        for i in 0..100 {
            let got = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(got, Ok(true), "answer {i}");
        }
        assert_eq!(
            round_len(std::iter::repeat_n(SMALL_REPLY_BYTES, 4096)),
            2048
        );
        server.stop(thread);
    }

    /// Reads from `s` and answers each `needle` seen with `answer` as it comes, `n` in all.
    fn answer_each(s: &mut TcpStream, needle: &[u8], n: usize, answer: &[u8]) {
        let (mut seen, mut chunk, mut answered) = (Vec::new(), [0u8; 4096], 0);
        while answered < n {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => seen.extend_from_slice(&chunk[..k]),
            }
            let found = seen.windows(needle.len()).filter(|w| *w == needle).count();
            while answered < found.min(n) {
                if s.write_all(answer).is_err() {
                    return;
                }
                answered += 1;
            }
        }
    }

    /// `round_trips` counts round trips, not pipelines: a pipeline of 3000 writes goes in two
    /// rounds (2048 a round, each answered with a status), after the one round of the first
    /// write, so 3 round trips and 3001 commands. Before, the link counted one round trip per
    /// pipeline (2 here), and no command of the cache's link.
    #[test]
    fn round_trips_count_rounds_and_commands_every_command_sent() {
        let server = Gated::start(b"+OK\r\n", |s| {
            answer_each(s, b"\r\nSET", 3000, b"+OK\r\n");
        });
        let (link, thread) = link_to(server.addr, "cache", "5s");
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        link.command(command(
            &[b"SET", b"first", b"v"],
            SMALL_REPLY_BYTES,
            Some(tx.clone()),
        ));
        server.go(|| {
            for _ in 0..3000 {
                let set = command(&[b"SET", b"k", b"v"], SMALL_REPLY_BYTES, Some(tx.clone()));
                link.command(set);
            }
        });
        for i in 0..3001 {
            let got = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(got, Ok(true), "answer {i}");
        }
        // The link's thread counts a pipeline once it is done: stopped, it has counted all.
        server.stop(thread);
        assert_eq!(link.round_trips.load(Ordering::SeqCst), 3);
        assert_eq!(link.commands.load(Ordering::SeqCst), 3001);
        assert_eq!(link.failures.load(Ordering::SeqCst), 0);
    }

    /// A round's commands are written within its deadline (the link's `timeout`), however
    /// the server takes them: one that reads 1 KiB at a time, soon enough for each `write` to
    /// make progress within the timeout but too slowly for a 4 MiB command to be written in
    /// 20 s, fails the round once the timeout has passed. Before, each `write` had the whole
    /// timeout to itself, so the round (and the link's thread, and every command queued
    /// behind it) was held for as long as the server went on reading.
    #[test]
    fn a_round_is_written_within_its_deadline_however_slowly_redis_reads() {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        // Small buffers on both sides, so that the command cannot sit in them.
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        sock.bind(&any.into()).expect("bind");
        sock.listen(1).expect("listen");
        let l: std::net::TcpListener = sock.into();
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return 0 };
            let (mut got, mut chunk) = (0usize, [0u8; 1024]);
            // Bounded: 40 s of reading at most; ends when the client goes.
            for _ in 0..8000 {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            got
        });
        let cfg: RedisConfig =
            toml::from_str(&format!("address = \"{addr}\"\ntimeout = \"500ms\"\n"))
                .expect("config");
        let mut c = Conn::open(&cfg, false).expect("connects");
        socket2::SockRef::from(&c.sock)
            .set_send_buffer_size(8192)
            .expect("sndbuf");
        let big = bytes::Bytes::from(vec![b'x'; 4 << 20]);
        let (answer, answered) = std::sync::mpsc::channel();
        let set = Command {
            args: vec![
                bytes::Bytes::from_static(b"SET"),
                bytes::Bytes::from_static(b"k"),
                big,
            ],
            max_reply: SMALL_REPLY_BYTES,
            repeatable: true,
            done: Some(Box::new(move |f| {
                let _ = answer.send(f.is_some());
            })),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let r = c.round(vec![set]);
            // A round of one write over a round's bytes, late: put down to its size.
            let _ = tx.send(matches!(r, Err(RoundFailed::TooLarge(_))));
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(got, Ok(true));
        assert_eq!(answered.recv_timeout(Duration::from_secs(1)), Ok(false));
        let _ = writer.join();
        let read = server.join().expect("server");
        assert!(read < 4 << 20, "the server read {read} bytes");
    }

    #[test]
    fn a_round_writes_at_most_a_mebibyte_of_arguments_but_one_command_whatever_its_size() {
        assert_eq!(write_round_len([100usize; 10].into_iter()), 10);
        assert_eq!(write_round_len([600usize << 10; 3].into_iter()), 1);
        assert_eq!(write_round_len([512usize << 10; 3].into_iter()), 2);
        assert_eq!(write_round_len([4usize << 20, 1].into_iter()), 1);
    }

    /// The rate limiter's demands go in rounds bounded as plain commands are (a reply of
    /// [`SMALL_REPLY_BYTES`] each: 2048 a round), each round's grants handed out once it is
    /// read: a server that answers only the first 2048 of 2100 queued demands has those 2048
    /// granted. Before, the 2100 went as one round (up to 4096, with 64 KiB replies each
    /// possible), and all failed once the server stopped answering.
    #[test]
    fn rate_limit_demands_go_in_rounds_bounded_in_reply_bytes() {
        let sha = b"$40\r\n0000000000000000000000000000000000000000\r\n";
        let server = Gated::start(sha, move |s| {
            // The second script, then the first demand and the first round of the batch.
            answer_each(s, b"SCRIPT", 1, sha);
            answer_each(s, b"EVALSHA", 1 + 2048, b"*2\r\n:1\r\n:0\r\n");
        });
        let (link, thread) = link_to(server.addr, "limits", "5s");
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        let demand = |tx: std::sync::mpsc::Sender<bool>| Demand {
            key: "k".into(),
            call: Call::TokenBucket {
                rate: 10.0,
                burst: 10.0,
            },
            want: 1,
            back: 0.0,
            done: Box::new(move |a| {
                let _ = tx.send(a.is_some());
            }),
        };
        assert!(link.submit(demand(tx.clone())).is_ok());
        server.go(|| {
            for _ in 0..2100 {
                assert!(link.submit(demand(tx.clone())).is_ok());
            }
        });
        for i in 0..1 + 2048 {
            let got = rx.recv_timeout(Duration::from_secs(10));
            assert_eq!(got, Ok(true), "grant {i}");
        }
        server.stop(thread);
    }

    /// A read waits no longer than its round's deadline, whatever the socket's timeout: a
    /// connection opened with a 30 s `timeout`, asked for a reply by a deadline 100 ms away,
    /// from a server that sends half a reply and stalls, gives up at the deadline. Before, the
    /// socket's read timeout stayed the connection's `timeout`, so a read begun before the
    /// deadline waited up to 30 s more.
    #[test]
    fn a_read_waits_no_longer_than_its_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = s.write_all(b"$5\r\nab");
            let _ = wait.recv();
        });
        let cfg: RedisConfig =
            toml::from_str(&format!("address = \"{addr}\"\ntimeout = \"30s\"\n")).expect("config");
        let mut c = Conn::open(&cfg, false).expect("connects");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let r = c.read_frame(
                Instant::now() + Duration::from_millis(100),
                SMALL_REPLY_BYTES,
            );
            let _ = tx.send(r.map_err(|e| e.kind()));
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        let _ = done.send(());
        assert_eq!(got, Ok(Err(io::ErrorKind::TimedOut)));
        let _ = reader.join();
        let _ = server.join();
    }

    /// A server that accepts every connection and closes it at once keeps the link down: it
    /// is logged once, not at every retry, and every failure is counted. One that answers
    /// `PING` but drops every round makes the link go up and down at every retry: logged once
    /// each way, then at most once a minute. Before, a connection accepted was taken as
    /// recovery and every change was logged, so each retry logged two lines ("answers
    /// again", "unreachable"): 40 lines for 20 failures here, a pair a second by default.
    #[test]
    fn a_link_that_keeps_failing_is_logged_once_and_counted() {
        // Down unlogged (within a minute of the last line), then down for good: logged at its
        // first failure past the minute, so that the last line does not say it answers
        // (review r12a M4: before, nothing more was logged).
        let cfg: RedisConfig = toml::from_str("address = \"127.0.0.1:9\"\n").expect("config");
        let link = RedisLink::with_role(cfg, "cache");
        let t0 = Instant::now();
        let lines = || link.lines.load(Ordering::SeqCst);
        link.set_down_at("a", t0);
        link.set_up();
        assert_eq!(lines(), 2);
        link.set_down_at("b", t0 + Duration::from_secs(1));
        link.set_down_at("b", t0 + Duration::from_secs(30));
        assert_eq!(lines(), 2, "within the minute");
        link.set_down_at("b", t0 + LOG_EVERY + Duration::from_secs(1));
        assert_eq!(lines(), 3, "still down past the minute");
        link.set_down_at("b", t0 + 3 * LOG_EVERY);
        assert_eq!(lines(), 3, "logged once while down");
        link.set_up();
        assert_eq!(lines(), 4, "its recovery is logged");

        for (pong, want) in [(false, 1), (true, 2)] {
            let (failures, lines) = keep_failing(pong);
            assert!(failures >= 20, "{failures} failures");
            assert_eq!(
                lines, want,
                "lines logged for {failures} failures (PING: {pong})"
            );
        }
    }

    /// Runs a cache link against a server that drops every connection (after answering its
    /// `PING`s with `pong`) until it has failed 20 times; its failures and lines logged.
    fn keep_failing(pong: bool) -> (u64, u64) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let stop_accepting = Arc::new(AtomicBool::new(false));
        let stopping = stop_accepting.clone();
        let server = std::thread::spawn(move || {
            for s in l.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut s) = s else { continue };
                let mut chunk = [0u8; 4096];
                // Without `pong`, the connection is dropped at once.
                if pong {
                    loop {
                        match s.read(&mut chunk) {
                            Ok(n) if n > 0 && chunk[..n].windows(4).any(|w| w == b"PING") => {
                                let _ = s.write_all(b"+PONG\r\n");
                            }
                            _ => break,
                        }
                    }
                }
            }
        });
        let cfg: RedisConfig = toml::from_str(&format!(
            "address = \"{addr}\"\ntimeout = \"5s\"\nretry_interval = \"5ms\"\n"
        ))
        .expect("config");
        let link = RedisLink::with_role(cfg, "cache");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(link.clone(), stop.clone()).expect("thread");
        for _ in 0..2000 {
            if link.failures.load(Ordering::SeqCst) >= 20 {
                break;
            }
            // Writes are queued even while the link is down (lookups fail at once).
            link.command(command(&[b"SET", b"k", b"v"], SMALL_REPLY_BYTES, None));
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
        let _ = thread.join();
        stop_accepting.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(addr);
        let _ = server.join();
        (
            link.failures.load(Ordering::SeqCst),
            link.lines.load(Ordering::SeqCst),
        )
    }

    /// A bulk string longer than its command's bound, such as an entry another host with a
    /// larger `max_entry_bytes` wrote, is read and thrown away as it arrives (the read buffer
    /// never grows past one read), answered as `Null` (a miss), and the connection stays in
    /// step: the next reply is the next command's. One declared longer than any host writes
    /// ([`MAX_REPLY_BYTES`]) is refused as soon as its length is read. Before, a lookup's
    /// reply could be as long as the link's longest (8 MiB on the cache's link), held whole;
    /// a longer one broke the link.
    #[test]
    fn a_bulk_string_longer_than_its_command_s_bound_is_skipped_not_held() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut big = b"$4194304\r\n".to_vec();
            big.resize(big.len() + (4 << 20), b'e');
            big.extend_from_slice(b"\r\n$1\r\nv\r\n$4611686018427387904\r\n");
            let _ = s.write_all(&big);
            let mut chunk = [0u8; 64];
            let _ = s.read(&mut chunk);
        });
        let cfg: RedisConfig =
            toml::from_str(&format!("address = \"{addr}\"\ntimeout = \"30s\"\n")).expect("config");
        let mut c = Conn::open(&cfg, false).expect("connects");
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = c.read_frame(deadline, 16 * 1024).expect("skipped");
        assert_eq!(first, BytesFrame::Null);
        assert!(c.rbuf.capacity() <= 64 * 1024, "{} held", c.rbuf.capacity());
        let second = c.read_frame(deadline, 16 * 1024).expect("the next reply");
        assert_eq!(second, BytesFrame::BulkString("v".into()));
        let third = c.read_frame(deadline, 16 * 1024);
        assert!(third.is_err(), "2^62 bytes declared: {third:?}");
        drop(c);
        let _ = server.join();
    }

    /// Commands queued behind a Redis that does not read are bounded in bytes, not only in
    /// count: a write past [`MAX_QUEUED_BYTES`] is dropped (a lookup answered `None`). Before,
    /// 4096 commands of any size were kept (entries of 1 MiB: 4 GiB).
    #[test]
    fn queued_commands_are_bounded_in_bytes_while_redis_does_not_read() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            // The cache's link sends nothing before its commands (no password, no scripts to
            // load): nothing is read until the test is done.
            let Ok((_s, _)) = l.accept() else { return };
            let _ = wait.recv();
        });
        let (link, (stop, thread)) = link_to(addr, "cache", "60s");
        let set = |n: usize| Command {
            args: vec![
                bytes::Bytes::from_static(b"SET"),
                bytes::Bytes::from_static(b"k"),
                bytes::Bytes::from(vec![b'x'; n]),
            ],
            max_reply: SMALL_REPLY_BYTES,
            repeatable: true,
            done: None,
        };
        // A first write larger than the socket's buffers: the link's thread blocks on it.
        link.command(set(64 << 20));
        let taken = || link.commands_queue.lock().is_ok_and(|q| q.cmds.is_empty());
        for _ in 0..1000 {
            if taken() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(taken(), "the link took the first write");
        let refused = Arc::new(AtomicU64::new(0));
        for _ in 0..100 {
            let r = refused.clone();
            let mut c = set(1 << 20);
            c.done = Some(Box::new(move |f| {
                if f.is_none() {
                    r.fetch_add(1, Ordering::SeqCst);
                }
            }));
            link.command(c);
        }
        let queued = link.commands_queue.lock().map_or(0, |q| q.bytes);
        assert!(queued <= MAX_QUEUED_BYTES, "{queued} bytes queued");
        assert!(refused.load(Ordering::SeqCst) > 0, "every write was queued");
        stop.store(true, Ordering::SeqCst);
        let _ = go.send(());
        let _ = server.join();
        let _ = thread.join();
    }

    /// A reply cut anywhere is not whole yet, never refused: the check of a frame's first
    /// byte (a byte that starts no RESP2 frame is refused as it arrives) reads only the byte
    /// at a frame's start, never one inside a bulk string, a line, or its CR LF, so a reply
    /// split across reads at any byte is still read. Stray bytes at a frame's start are
    /// refused at once, also past the first frame.
    #[test]
    fn a_reply_cut_at_any_byte_is_not_whole_yet_and_stray_bytes_are_refused() {
        let replies: [&[u8]; 7] = [
            b"+OK\r\n",
            b"-ERR a *bad* $thing\r\n",
            b":-42\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"$12\r\n*2\r\n+x\r\n:%\xff!\r\n",
            b"*3\r\n$-1\r\n*1\r\n*2\r\n$6\r\n9000-0\r\n*2\r\n$1\r\np\r\n$3\r\n\r\n_\r\n$0\r\n\r\n",
        ];
        for r in replies {
            assert_eq!(reply_len(r).ok().flatten(), Some(r.len()), "{r:?}");
            for cut in 0..r.len() {
                assert!(
                    matches!(reply_len(&r[..cut]), Ok(None)),
                    "{:?} cut at {cut}",
                    String::from_utf8_lossy(r)
                );
            }
        }
        for stray in [
            &b"\xad"[..],
            b"%1\r\n",
            b"_\r\n",
            b"*2\r\n:1\r\nx",
            b"*2\r\n$1\r\nx\r\n>",
        ] {
            assert!(reply_len(stray).is_err(), "{stray:?}");
        }
    }

    #[test]
    fn numbers_for_the_script() {
        assert_eq!(fmt_f64(200.0), "200");
        assert_eq!(fmt_f64(0.5), "0.500000");
        assert_eq!(frame_int(&BytesFrame::Integer(7)), Some(7));
        assert_eq!(frame_int(&BytesFrame::BulkString("12".into())), Some(12));
        assert_eq!(frame_int(&BytesFrame::Null), None);
    }
}
