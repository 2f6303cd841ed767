//! `[cache.redis]`: Redis as a layer shared by every worker and every host, behind the
//! per-worker stores.
//!
//! It goes through the same link as the rate limiter (`crate::redis`: one blocking connection
//! on its own thread, commands queued by the workers and sent as pipelines), with a link of
//! its own when both are configured.
//!
//! - A local miss asks Redis for the request's keys and waits at most `timeout`, asleep on
//!   the worker's doorbell (`crate::doorbell`) until the link's thread has the answers; no
//!   answer in time, an unreachable Redis or a bad entry is a miss (fail open).
//! - What a worker stores, it also writes to Redis (queued; the client never waits for it),
//!   when it is at most `max_entry_bytes`, with an expiry at the end of its usefulness
//!   (freshness left plus its stale windows, plus a minute for validation).
//! - Entries carry their timing (the Unix second they were received, their corrected initial
//!   age, lifetime and stale windows), so that freshness and `Age` are computed on every host
//!   as on the host that fetched them (clocks kept by NTP).
//! - Purges by URL and by surrogate key delete the Redis copies too (through index sets kept
//!   per URL and per tag), and every purge is published on `<prefix>purge`: each host runs a
//!   subscriber thread that applies what it hears to its workers' stores (through
//!   `crate::control`), so a purge reaches every host's local stores.
//!
//! Fleet bound: each host makes at most one fetch per key at a time (coalescing), and a host
//! that finds the object in Redis makes none; so the origin sees one fetch per object per
//! freshness lifetime for the whole fleet, plus at most one per other host whose miss falls
//! inside the first fetch's round trip (there is no lock across hosts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;

use crate::doorbell::Doorbell;
use crate::redis::{Command, RedisLink};

use super::{Object, Purge, PurgeTarget, Timing};

/// Most fields, tags and Vary values accepted in an entry read back from Redis.
const MAX_ENTRY_FIELDS: usize = 512;
/// Most bytes an entry's encoding takes beyond its object's weight (`Object::weight`, which
/// `max_entry_bytes` bounds): the fixed part, and at most 8 bytes per field, tag and Vary
/// value ([`MAX_ENTRY_FIELDS`] of each).
const MAX_ENCODING_OVERHEAD: u64 = 128 + 3 * 8 * MAX_ENTRY_FIELDS as u64;
/// Longest expiry given to an entry.
const MAX_TTL_SECS: u64 = 24 * 3600;
/// Kept beyond freshness and stale windows, so that a stale entry can still be validated.
const VALIDATION_SLACK_SECS: u64 = 60;
/// The entry format's tag. RWC2: a Vary value absent from the request is recorded as
/// `policy::VARY_ABSENT` (RWC1 recorded it as empty, like an empty field), so RWC1 entries are
/// refused (a miss) rather than matched the old way.
const MAGIC: &[u8; 4] = b"RWC2";

/// Removes every key listed in a set, then the set.
const PURGE_SET_LUA: &str = "local ks = redis.call('SMEMBERS', KEYS[1]) for _, k in ipairs(ks) do redis.call('DEL', k) end redis.call('DEL', KEYS[1]) return #ks";

/// The shared layer: its link and counters.
pub struct SharedLayer {
    link: Arc<RedisLink>,
    prefix: Bytes,
    max_entry: u64,
    timeout: Duration,
    /// Lookups sent, entries found, entries written.
    pub gets: AtomicU64,
    pub found: AtomicU64,
    pub sets: AtomicU64,
}

impl SharedLayer {
    /// The layer for `[cache.redis]`, if configured (its thread is started by the server).
    pub fn new(cfg: &crate::config::Config) -> Option<Arc<SharedLayer>> {
        let r = cfg.cache.redis.as_ref()?;
        Some(Arc::new(SharedLayer {
            link: RedisLink::with_role(r.link(), "cache"),
            prefix: Bytes::copy_from_slice(r.key_prefix.as_bytes()),
            max_entry: r.max_entry_bytes.0,
            timeout: r.timeout.0,
            gets: AtomicU64::new(0),
            found: AtomicU64::new(0),
            sets: AtomicU64::new(0),
        }))
    }

    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    fn rkey(&self, kind: &[u8], key: &[u8]) -> Bytes {
        let mut k = Vec::with_capacity(self.prefix.len() + kind.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(kind);
        k.extend_from_slice(key);
        k.into()
    }

    /// The entries stored under `keys`, in order (`None`: absent, bad, or no answer within
    /// the timeout). The task sleeps on the worker's doorbell until every answer is in or
    /// the timeout passes (no polling).
    pub async fn get(&self, bell: &Doorbell, keys: &[&[u8]]) -> Vec<Option<Object>> {
        type Slot = Arc<Mutex<(usize, Vec<Option<Bytes>>)>>;
        let slot: Slot = Arc::new(Mutex::new((0, vec![None; keys.len()])));
        let deadline = Instant::now() + self.timeout;
        bell.join(&self.link.doorbells);
        // Counted as a waiter before the commands go: an answer that beats the first look
        // still rings (one wake-up, found done).
        let _counted = bell.watch();
        // An answer longer than any entry this host writes is dropped as it arrives: waiting
        // answers are not left to hold up to the largest reply each.
        let longest = self.max_entry.saturating_add(MAX_ENCODING_OVERHEAD);
        for (i, k) in keys.iter().enumerate() {
            self.gets.fetch_add(1, Ordering::Relaxed);
            let s = slot.clone();
            self.link.command(Command {
                args: vec![Bytes::from_static(b"GET"), self.rkey(b"o:", k)],
                done: Some(Box::new(move |f| {
                    let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                    g.0 += 1;
                    if let Some(BytesFrame::BulkString(b)) = f {
                        if b.len() as u64 > longest {
                            return;
                        }
                        if let Some(v) = g.1.get_mut(i) {
                            *v = Some(b);
                        }
                    }
                })),
            });
        }
        bell.wait_until(deadline, || {
            slot.lock().map_or(keys.len(), |g| g.0) >= keys.len()
        })
        .await;
        let raw = std::mem::take(&mut slot.lock().unwrap_or_else(|e| e.into_inner()).1);
        raw.into_iter()
            .map(|b| {
                let o = b.and_then(|b| decode(&b));
                if o.is_some() {
                    self.found.fetch_add(1, Ordering::Relaxed);
                }
                o
            })
            .collect()
    }

    /// Writes `obj` under `key` (queued; nobody waits for it).
    pub fn put(&self, key: &[u8], obj: &Object, now: u64) {
        if obj.weight() > self.max_entry {
            return;
        }
        let left = obj.t.lifetime.saturating_sub(obj.t.age(now));
        let ttl = left
            .saturating_add(obj.t.swr.max(obj.t.sie))
            .saturating_add(VALIDATION_SLACK_SECS)
            .min(MAX_TTL_SECS);
        let rk = self.rkey(b"o:", key);
        let ttl_s = Bytes::from(ttl.to_string());
        self.sets.fetch_add(1, Ordering::Relaxed);
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"SET"),
                rk.clone(),
                Bytes::from(encode(obj)),
                Bytes::from_static(b"EX"),
                ttl_s.clone(),
            ],
            done: None,
        });
        // Index sets for purges by URL and by tag.
        let mut sets = vec![self.rkey(b"u:", &obj.url)];
        sets.extend(obj.tags.iter().map(|t| self.rkey(b"t:", t)));
        for s in sets {
            self.link.command(Command {
                args: vec![Bytes::from_static(b"SADD"), s.clone(), rk.clone()],
                done: None,
            });
            self.link.command(Command {
                args: vec![Bytes::from_static(b"EXPIRE"), s, ttl_s.clone()],
                done: None,
            });
        }
    }

    /// Deletes the Redis copies a purge names and tells every host (through the purge channel).
    pub fn purge(&self, p: &Purge) {
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"PUBLISH"),
                self.rkey(b"purge", b""),
                Bytes::from(encode_purge(p)),
            ],
            done: None,
        });
        let set = match &p.target {
            PurgeTarget::Url(u) => self.rkey(b"u:", u),
            PurgeTarget::Tag(t) => self.rkey(b"t:", t),
            PurgeTarget::Prefix(_) | PurgeTarget::All => return,
        };
        self.link.command(Command {
            args: vec![
                Bytes::from_static(b"EVAL"),
                Bytes::from_static(PURGE_SET_LUA.as_bytes()),
                Bytes::from_static(b"1"),
                set,
            ],
            done: None,
        });
    }
}

/// Most bytes of a purge message read from the channel.
const MAX_PURGE_MESSAGE: usize = 64 * 1024;

/// A purge as it travels on the channel: its kind, hard or soft, and its argument.
pub fn encode_purge(p: &Purge) -> Vec<u8> {
    let (kind, arg): (u8, &[u8]) = match &p.target {
        PurgeTarget::Url(u) => (b'u', u),
        PurgeTarget::Prefix(x) => (b'p', x),
        PurgeTarget::Tag(t) => (b't', t),
        PurgeTarget::All => (b'a', b""),
    };
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(kind);
    out.push(u8::from(p.soft));
    out.extend_from_slice(arg);
    out
}

pub fn decode_purge(b: &[u8]) -> Option<Purge> {
    if b.len() < 2 || b.len() > MAX_PURGE_MESSAGE || b[1] > 1 {
        return None;
    }
    let arg = b[2..].to_vec();
    let target = match b[0] {
        b'u' => PurgeTarget::Url(arg),
        b'p' => PurgeTarget::Prefix(arg),
        b't' => PurgeTarget::Tag(arg),
        b'a' if arg.is_empty() => PurgeTarget::All,
        _ => return None,
    };
    Some(Purge {
        target,
        soft: b[1] == 1,
    })
}

/// Starts the thread that listens on the purge channel and applies each purge to this
/// host's workers; it ends once `stop` is set. An unreachable Redis is tried again every
/// `retry_interval` (purges published meanwhile are missed: the local copies then live until
/// they expire).
pub fn spawn_purge_listener(
    cfg: &crate::cache::config::CacheRedisConfig,
    control: Arc<crate::control::Control>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("ringway-purge".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = listen(&cfg, &control, &stop);
                let until = Instant::now() + cfg.retry_interval.0;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
}

/// One subscription, until it fails or `stop` is set.
fn listen(
    cfg: &crate::cache::config::CacheRedisConfig,
    control: &crate::control::Control,
    stop: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect_timeout(&cfg.address.addr, cfg.timeout.0)?;
    // Short reads, so that the stop flag is seen.
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    sock.set_write_timeout(Some(cfg.timeout.0))?;
    let channel = format!("{}purge", cfg.key_prefix);
    let mut cmd = Vec::new();
    let mut frame = |args: &[&[u8]]| {
        cmd.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            cmd.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            cmd.extend_from_slice(a);
            cmd.extend_from_slice(b"\r\n");
        }
    };
    if let Some(p) = &cfg.password {
        frame(&[b"AUTH", p.as_bytes()]);
    }
    frame(&[b"SUBSCRIBE", channel.as_bytes()]);
    sock.write_all(&cmd)?;
    let mut rbuf = bytes::BytesMut::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        // Checked for depth, size and frame count before it is decoded (`crate::redis`).
        while let Some(f) = crate::redis::decode_reply(&mut rbuf)? {
            match f {
                BytesFrame::Array(v) if v.len() == 3 => {
                    if let (BytesFrame::BulkString(kind), BytesFrame::BulkString(msg)) =
                        (&v[0], &v[2])
                    {
                        if &kind[..] == b"message" {
                            if let Some(p) = decode_purge(msg) {
                                for i in 0..control.workers() {
                                    let p = p.clone();
                                    let _ = control.post(
                                        i,
                                        Box::new(move |w| {
                                            w.cache.purge_local(&p);
                                        }),
                                    );
                                }
                            }
                        }
                    }
                }
                BytesFrame::Error(e) => {
                    return Err(std::io::Error::other(e.to_string()));
                }
                _ => {}
            }
        }
        if rbuf.len() > MAX_PURGE_MESSAGE * 2 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "purge channel message too large",
            ));
        }
        match sock.read(&mut chunk) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => rbuf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn put_lv(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// An object as it is written to Redis.
pub fn encode(o: &Object) -> Vec<u8> {
    let mut out = Vec::with_capacity(o.weight() as usize + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&o.status.to_be_bytes());
    out.push(u8::from(o.t.no_stale) | (u8::from(o.t.always_validate) << 1));
    for v in [
        o.t.response_time,
        o.t.initial_age,
        o.t.lifetime,
        o.t.swr,
        o.t.sie,
    ] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    put_lv(&mut out, &o.reason);
    out.extend_from_slice(&(o.fields.len() as u32).to_be_bytes());
    for (n, v) in &o.fields {
        put_lv(&mut out, n);
        put_lv(&mut out, v);
    }
    put_lv(&mut out, &o.url);
    out.extend_from_slice(&(o.tags.len() as u32).to_be_bytes());
    for t in &o.tags {
        put_lv(&mut out, t);
    }
    out.extend_from_slice(&(o.vary.len() as u32).to_be_bytes());
    for (n, v) in &o.vary {
        put_lv(&mut out, n);
        put_lv(&mut out, v);
    }
    put_lv(&mut out, &o.body);
    out
}

/// A cursor over an entry read back from Redis: every length is checked against what is left.
struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<usize> {
        let s = self.take(4)?;
        Some(u32::from_be_bytes(s.try_into().ok()?) as usize)
    }
    fn u64(&mut self) -> Option<u64> {
        let s = self.take(8)?;
        Some(u64::from_be_bytes(s.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()?;
        let start = self.at;
        self.take(n)?;
        Some(self.b.slice(start..start + n))
    }
    /// A count of items that take at least `min` bytes each: at most [`MAX_ENTRY_FIELDS`],
    /// and no more than the bytes left can hold (so that no room is reserved for items the
    /// entry does not have).
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()?;
        let left = self.b.len().saturating_sub(self.at);
        (n <= MAX_ENTRY_FIELDS && n.saturating_mul(min) <= left).then_some(n)
    }
}

/// An entry read back from Redis; `None` when it is not one this version wrote whole.
pub fn decode(b: &Bytes) -> Option<Object> {
    let mut r = Reader { b, at: 0 };
    if r.take(4)? != MAGIC {
        return None;
    }
    let st = r.take(2)?;
    let status = u16::from_be_bytes([st[0], st[1]]);
    // The statuses `serve::screen` lets the cache store: never 206 or 304.
    if !(200..600).contains(&status) || status == 206 || status == 304 {
        return None;
    }
    let flags = r.take(1)?[0];
    // Only the two flags this version writes.
    if flags > 3 {
        return None;
    }
    let t = Timing {
        response_time: r.u64()?,
        initial_age: r.u64()?,
        lifetime: r.u64()?,
        swr: r.u64()?,
        sie: r.u64()?,
        no_stale: flags & 1 != 0,
        always_validate: flags & 2 != 0,
    };
    let reason = r.bytes()?;
    let n = r.count(8)?;
    let mut fields = Vec::with_capacity(n);
    for _ in 0..n {
        let (name, value) = (r.bytes()?, r.bytes()?);
        // Nothing that could break a head: names are tokens, values have no CR, LF or NUL,
        // and no framing or hop-by-hop field (never stored, RFC 9111 §3.1: the answer's own
        // Content-Length would meet the entry's).
        if name.is_empty()
            || !name.iter().all(|c| crate::http::is_tchar(*c))
            || value.iter().any(|c| matches!(c, b'\r' | b'\n' | 0))
            || super::policy::unstorable_field(&name)
        {
            return None;
        }
        fields.push((name, value));
    }
    if reason.iter().any(|c| matches!(c, b'\r' | b'\n' | 0)) {
        return None;
    }
    let url = r.bytes()?;
    let n = r.count(4)?;
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        tags.push(r.bytes()?.to_vec().into_boxed_slice());
    }
    let n = r.count(8)?;
    let mut vary = Vec::with_capacity(n);
    for _ in 0..n {
        let name: Box<[u8]> = r.bytes()?.to_vec().into();
        vary.push((name, r.bytes()?.to_vec()));
    }
    let body = r.bytes()?;
    if r.at != b.len() {
        return None;
    }
    Some(Object {
        status,
        reason,
        fields,
        body,
        t,
        url,
        tags,
        vary,
        invalid: std::cell::Cell::new(false),
        hidden: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_every_truncation_is_refused() {
        let o = Object {
            status: 200,
            reason: Bytes::from_static(b"OK"),
            fields: vec![(Bytes::from_static(b"etag"), Bytes::from_static(b"\"x\""))],
            body: Bytes::from_static(b"hello"),
            t: Timing {
                response_time: 1_700_000_000,
                initial_age: 3,
                lifetime: 60,
                swr: 5,
                sie: 0,
                no_stale: true,
                always_validate: false,
            },
            url: b"h/a?b".to_vec().into(),
            tags: vec![b"t1".to_vec().into()],
            vary: vec![(b"accept-encoding".to_vec().into(), b"gzip".to_vec())],
            invalid: std::cell::Cell::new(false),
            hidden: Vec::new(),
        };
        let enc = Bytes::from(encode(&o));
        let d = decode(&enc).expect("decodes");
        assert_eq!(d.body, o.body);
        assert_eq!(d.fields, o.fields);
        assert_eq!(d.t.initial_age, 3);
        assert!(d.t.no_stale);
        assert_eq!(d.vary, o.vary);
        for n in 0..enc.len() {
            assert!(decode(&enc.slice(..n)).is_none(), "prefix {n}");
        }
        let mut bad = enc.to_vec();
        bad.push(0);
        assert!(decode(&Bytes::from(bad)).is_none());
        // A header value with CR LF is refused.
        let mut o2 = o;
        o2.fields = vec![(Bytes::from_static(b"x"), Bytes::from_static(b"a\r\nb"))];
        assert!(decode(&Bytes::from(encode(&o2))).is_none());
    }
}
