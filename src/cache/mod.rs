//! The response cache: a shared cache (RFC 9111) per worker.
//!
//! ```text
//!  phases.rs action ─► cache route? ─► serve.rs
//!      GET/HEAD: key ─► store (per worker, bytes-bounded) ─► fresh: answer from the store
//!                                                        ├► stale + stale-while-revalidate:
//!                                                        │   answer, revalidate in the background
//!                                                        └► miss/stale: one fetch per key
//!                                                            (others wait on it), validators
//!                                                            sent, 304 freshens, a storable
//!                                                            response is captured as it
//!                                                            streams to the client
//!      unsafe methods: forwarded, then the URL is invalidated (§4.4)
//!      PURGE (routes with `purge = true`, behind their auth policy): purge on every worker
//! ```
//!
//! - [`config`]: `[cache]` and a route's `cache = { ... }`.
//! - [`policy`]: directives, dates, freshness inputs, Vary, conditionals, ranges.
//! - [`serve`]: the phase itself.
//!
//! Each worker owns one store ([`WorkerCache`], [`store`]): a map weighted by the bytes an
//! entry holds, so that the worker's budget bounds memory whatever the keys and the bodies,
//! with S3-FIFO eviction (a scan of one-time URLs does not push out what is used). Nothing is shared between workers; purges and invalidations reach the other
//! workers through [`crate::control::Control`].

pub mod admin;
pub mod config;
pub mod fields;
pub mod policy;
pub mod redis;
pub mod serve;
mod store;

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use crate::config::Config;
use crate::control::{Control, ControlError};
use crate::http::request::RequestHead;
use crate::http::HeaderSpan;
use crate::local::Notify;
use crate::router::HeaderRules;

use config::{QueryKey, RouteCacheConfig};
use fields::{Fields, FieldsRef};
use policy::Directives;
use store::StoreKey;

/// Bytes counted for an entry beyond its header and body bytes (the object, its vectors).
const ENTRY_OVERHEAD: u64 = 256;
/// Most coalescing flights one worker tracks at once; past it, misses go upstream alone.
const MAX_FLIGHTS: usize = 65_536;
/// Longest key accepted (a longer one is not cached).
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Spare key buffers a worker keeps, and the largest one kept (see [`WorkerCache::key_buf`]).
const MAX_SPARE_KEY_BUFS: usize = 256;
const MAX_SPARE_KEY_BYTES: usize = 1024;
/// The most room an evicted key's vector, reused for a stored key, may have beyond that key
/// (room the entry's weight counts; see [`WorkerCache::store_key`]).
const STORE_KEY_SLACK: usize = 32;
/// Ended flights a worker keeps for the next misses to reuse (see [`FlightGuard`]'s drop).
const MAX_SPARE_FLIGHTS: usize = 64;
/// Most surrogate keys kept per object.
const MAX_TAGS: usize = 64;
/// Largest field vector kept from an evicted object for the next one (see
/// [`WorkerCache::new_object`]).
const MAX_SPARE_FIELDS: usize = 64;
/// Largest buffer kept from an evicted object for the next stored miss, and the most room a
/// reused one may have beyond what that miss asks for (room no weight counts; see
/// [`WorkerCache::object_buf`]).
const MAX_SPARE_BUF: usize = 64 * 1024;
const SPARE_BUF_SLACK: usize = 256;
/// Most cache lines one [`prefetch`] asks for (an evicted object's buffer is kept up to
/// [`MAX_SPARE_BUF`]; what the next stored miss writes first is its start).
const MAX_PREFETCH_LINES: usize = 64;

/// Asks the CPU to bring the `len` bytes at `p` into its caches (at most
/// [`MAX_PREFETCH_LINES`] lines of 64 bytes) ahead of the reads or writes to come, so that
/// they do not wait on memory then. A stored miss, once the store is full, writes its object
/// into the allocations of the one evicted before it and reads the entry it evicts, all last
/// touched a whole turn of the store ago (a budget of 64 MiB is out of every cache a core
/// has): without a prefetch each of those lines is a wait on memory. A hint only: it changes
/// nothing the program computes. For a value whose size is known at compile time,
/// [`prefetch_of`] (no line count to work out at run time).
// Out of line: a stored miss brings in three spans (an evicted buffer, field vector and key),
// and one copy of this code run three times is fewer code lines than three copies in line.
#[inline(never)]
fn prefetch(p: *const u8, len: usize) {
    lines_of(p as usize, len, |at| prefetch_line(at as *const u8));
}

/// Calls `line` with the address of each 64-byte line the `len` bytes at `p` touch, from the
/// first, at most [`MAX_PREFETCH_LINES`] of them ([`prefetch`]'s addresses).
#[inline(always)]
fn lines_of(p: usize, len: usize, mut line: impl FnMut(usize)) {
    let start = p & !63;
    let end = p.saturating_add(len);
    let lines = end
        .saturating_sub(start)
        .div_ceil(64)
        .min(MAX_PREFETCH_LINES);
    // The odd lines first (up to three), then four at a time: a stored miss brings in some
    // 25 lines at once, and a loop of one line a turn spends more on counting than on asking.
    let mut at = start;
    if lines & 1 != 0 {
        line(at);
        at = at.wrapping_add(64);
    }
    if lines & 2 != 0 {
        line(at);
        line(at.wrapping_add(64));
        at = at.wrapping_add(128);
    }
    for _ in 0..lines / 4 {
        line(at);
        line(at.wrapping_add(64));
        line(at.wrapping_add(128));
        line(at.wrapping_add(192));
        at = at.wrapping_add(256);
    }
}

/// [`prefetch`] of the `T` at `p`: its lines, their count known at compile time.
#[inline(always)]
fn prefetch_of<T>(p: *const T) {
    let len = std::mem::size_of::<T>();
    let p = p.cast::<u8>();
    let mut at = 0;
    while at < len {
        prefetch_line(p.wrapping_add(at));
        at += 64;
    }
    // The last byte's line, which the steps above miss when `p` is not aligned to a line
    // (unless one of them asked for that very byte: a length of 64k + 1).
    if len % 64 != 1 {
        prefetch_line(p.wrapping_add(len.saturating_sub(1)));
    }
}

/// Asks the CPU to bring the line holding `p` into its caches (see [`prefetch`]); does
/// nothing off x86-64.
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch reads and writes nothing the program sees and never faults,
    // whatever the address (so the address need not be valid); SSE, which it needs, is part
    // of x86-64.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Seconds since the Unix epoch (0 before it): the clock `SystemTime::now` reads, read
/// directly (a miss reads it three times; `duration_since` and its `Duration` cost more than
/// the read).
pub fn now_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0)
}

/// A route's cache settings, compiled.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    /// What every key of the route starts with: `u`, then the route's name (its `name`, else
    /// `route#N`) after its length (four bytes, big-endian). Two routes never share an entry:
    /// routes split one URL by method, header or consumer, each to its own upstream, and one
    /// route's answer is not another's (a `key.ignore_host` route's key is not that of a
    /// request without Host on another route either). Purges and invalidations find objects
    /// by URL, whatever their route.
    pub(crate) key_start: Box<[u8]>,
    pub ignore_host: bool,
    pub query: QueryMode,
    pub key_headers: Vec<Box<[u8]>>,
    pub key_consumer: bool,
    /// The route has an auth policy: non-public responses are keyed by consumer.
    pub auth: bool,
    pub set_cookie: config::SetCookieMode,
    pub heuristic: bool,
    pub max_heuristic: u64,
    pub swr: Option<u64>,
    pub sie: Option<u64>,
    pub max_object: u64,
    /// PURGE is accepted ([`config::PurgeRights`]).
    pub purge: bool,
    /// Only these consumers may PURGE (`None`: any caller the route's auth lets in).
    pub purgers: Option<Box<[Box<str>]>>,
    pub max_variants: usize,
    pub coalesce_timeout: Duration,
    /// Targeted cache-control fields (RFC 9213), lower case, most specific first. Private:
    /// `targeted_lens` is derived from it and must change with it.
    targeted: Vec<Box<[u8]>>,
    pub name: Box<[u8]>,
    /// The `Cache-Status` lines of this route's usual miss, stored and refused by `no-store`
    /// ([`serve::usual_miss_line`] of `name`), written whole rather than part by part.
    status_stored: Box<[u8]>,
    status_no_store: Box<[u8]>,
    /// The lengths of the `targeted` names modulo 64, as bits ([`policy::length_bits`], set
    /// with `targeted`): a response's analysis looks at a line's name only when its length
    /// has one of these bits, or is Cache-Control's.
    targeted_lens: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryMode {
    All,
    None,
    Only(Vec<Box<[u8]>>),
}

impl RoutePolicy {
    /// The compiled policy of route `rc`, named `route` (its name, else `route#N`), `None`
    /// when it does not cache.
    pub fn compile(
        cfg: &Config,
        rc: &crate::config::RouteConfig,
        route: &str,
    ) -> Option<Box<RoutePolicy>> {
        let c: &RouteCacheConfig = rc.cache.as_ref().filter(|c| c.enabled)?;
        let g = &cfg.cache;
        let b = |s: &str| -> Box<[u8]> { s.to_ascii_lowercase().into_bytes().into() };
        let mut query = match &c.key.query {
            QueryKey::Mode(m) if m == "none" => QueryMode::None,
            QueryKey::Mode(_) => QueryMode::All,
            QueryKey::Only(list) => {
                QueryMode::Only(list.iter().map(|s| s.as_bytes().into()).collect())
            }
        };
        if let QueryMode::Only(l) = &mut query {
            l.sort();
        }
        let name: Box<[u8]> = g.name.as_bytes().into();
        let targeted: Vec<Box<[u8]>> = g.targeted_fields.iter().map(|h| b(&h.0)).collect();
        let mut key_start = vec![b'u'];
        key_start.extend_from_slice(&u32::try_from(route.len()).unwrap_or(u32::MAX).to_be_bytes());
        key_start.extend_from_slice(route.as_bytes());
        Some(Box::new(RoutePolicy {
            key_start: key_start.into(),
            ignore_host: c.key.ignore_host,
            query,
            key_headers: c.key.headers.iter().map(|h| b(&h.0)).collect(),
            key_consumer: c.key.consumer,
            auth: rc.auth.as_ref().is_some_and(|a| !a.any_of.is_empty()),
            set_cookie: c.set_cookie,
            heuristic: c.heuristic,
            max_heuristic: c.max_heuristic.0.as_secs(),
            swr: c.stale_while_revalidate.map(|d| d.0.as_secs()),
            sie: c.stale_if_error.map(|d| d.0.as_secs()),
            max_object: c.max_object_bytes.map_or(g.max_object_bytes.0, |s| s.0),
            purge: c.purge.enabled(),
            purgers: match &c.purge {
                config::PurgeRights::Consumers(v) => {
                    Some(v.iter().map(|n| n.as_str().into()).collect())
                }
                config::PurgeRights::Flag(_) => None,
            },
            max_variants: g.max_variants,
            coalesce_timeout: g.coalesce_timeout.0,
            targeted_lens: policy::length_bits(&targeted),
            targeted,
            status_stored: serve::usual_miss_line(&name, false),
            status_no_store: serve::usual_miss_line(&name, true),
            name,
        }))
    }

    /// The directives that govern this cache for a response: the first valid targeted field
    /// (RFC 9213 §2.2), else `Cache-Control`. `true` when a targeted field was used (then
    /// `Expires` is ignored too).
    pub fn response_directives(&self, fields: FieldsRef<'_>) -> (Directives, bool) {
        self.directives_by(|name, each| policy::fields(fields, name).for_each(each))
    }

    /// [`RoutePolicy::response_directives`] over any view of a response's field lines:
    /// `lines(name, each)` calls `each` with every value of `name`, in order. This lets the
    /// cache decide from the upstream's head, before copying any field, that a response is
    /// not stored.
    pub fn directives_by(
        &self,
        lines: impl Fn(&[u8], &mut dyn FnMut(&[u8])),
    ) -> (Directives, bool) {
        for t in &self.targeted {
            // The field's lines joined with ", " (RFC 9110 §5.3); `None` when it is absent.
            let mut joined: Option<Vec<u8>> = None;
            lines(t, &mut |v| match &mut joined {
                None => joined = Some(v.to_vec()),
                Some(j) => {
                    j.extend_from_slice(b", ");
                    j.extend_from_slice(v);
                }
            });
            let Some(joined) = joined else { continue };
            if let Some(d) = Directives::targeted(&joined) {
                return (d, true);
            }
        }
        let mut d = Directives::default();
        lines(b"cache-control", &mut |v| d.add(v));
        (d, false)
    }
}

/// A host as the store keys it: its name as routing reads it (without the port, and without
/// the root label's trailing dot, RFC 1034 §3.1: `a.test.` is `a.test`), then its `:port` if
/// any, so that a purge of one spelling reaches the other. The default port of the target's
/// scheme (80, or 443 when `https`, [`RequestHead::https`]) and an empty port are left out:
/// `a.test:80` is the origin `a.test` (RFC 9110 §4.2.3, RFC 3986 §6.2.3).
/// An IPv6 literal is the address it names, in RFC 5952 §4 form, as routing reads it
/// (`[0::1]` and `[::1]` are one key, one stored object and one purge target).
#[inline]
pub fn key_host(h: &[u8], https: bool) -> (Cow<'_, [u8]>, &[u8]) {
    split_host(h, Some(https))
}

/// Whether `h`'s port is the default port of one scheme and not the other (`:80`, `:443`, in
/// any spelling [`key_host`] reads): whether the scheme changes its key.
pub(crate) fn scheme_moves_port(h: &[u8]) -> bool {
    let port = &h[crate::router::host_without_port(h).len()..];
    is_default_port(port, Some(true)) != is_default_port(port, Some(false))
}

/// [`key_host`] for a scheme that may not be known (`None`: either default port is left out).
#[inline]
fn split_host(h: &[u8], https: Option<bool>) -> (Cow<'_, [u8]>, &[u8]) {
    let name = crate::router::host_without_port(h);
    let port = &h[name.len()..];
    // Looked at only when there is a port: the usual request names none.
    let port = if !port.is_empty() && is_default_port(port, https) {
        &port[..0]
    } else {
        port
    };
    let name = crate::router::trim_root_dots(name);
    if name.first() == Some(&b'[') {
        return (ip_literal(name), port);
    }
    (Cow::Borrowed(name), port)
}

/// A bracketed IPv6 literal host in RFC 5952 §4 form ([`crate::router::canonical_ip_literal`]);
/// as spelled when it names no address (the request parser refused such a Host).
#[cold]
#[inline(never)]
fn ip_literal(name: &[u8]) -> Cow<'_, [u8]> {
    let mut buf = [0u8; 64];
    match crate::router::canonical_ip_literal(name, &mut buf) {
        Some(n) => Cow::Owned(buf[..n].to_vec()),
        None => Cow::Borrowed(name),
    }
}

/// `port` (`:` then digits, as it follows a host) is empty or the scheme's default port, read
/// as a number (`:080` is 80): the same origin as no port.
#[inline]
fn is_default_port(port: &[u8], https: Option<bool>) -> bool {
    let Some(digits) = port.strip_prefix(b":") else {
        return false;
    };
    if digits.is_empty() {
        return true;
    }
    let zeros = digits.iter().take_while(|b| **b == b'0').count();
    let n = &digits[zeros..];
    match https {
        Some(true) => n == b"443",
        Some(false) => n == b"80",
        None => n == b"80" || n == b"443",
    }
}

/// The URL part of a key and the purge matching: host (lower case, see [`key_host`]) and path
/// with its query as sent.
pub fn url_of(head: &RequestHead, out: &mut Vec<u8>) {
    let (name, port) = key_host(head.host_bytes().unwrap_or(b""), head.https);
    let pq = head.bytes(head.path_query);
    out.reserve(name.len() + port.len() + pq.len() + usize::from(pq.first() != Some(&b'/')));
    push_lower(out, &name);
    out.extend_from_slice(port);
    if pq.first() == Some(&b'/') {
        out.extend_from_slice(pq);
    } else {
        out.push(b'/');
        out.extend_from_slice(pq);
    }
}

/// The URL an object of a route whose key is not the URL as sent is stored under, and the
/// one an invalidation (RFC 9111 §4.4) or a purge names besides the URL as sent: `url` (as
/// [`url_of`] writes it) as the route's key reads it: without the host for `key.ignore_host`
/// (it then starts with `/`), with no query for `key.query = "none"`, and with the listed
/// parameters sorted for an allowlist (as [`key_query_only`] writes them). Two URLs the key
/// takes for one are then one URL for the store too: before, an object kept the URL of the
/// request that stored it, and a `POST` to another URL of the same key (`?a=1&b=2` for one
/// stored by `?b=2&a=1&utm=x`, or the same path through another host) left it to answer the
/// next `GET` of that URL. `None` when the key is the URL as sent.
pub fn keyed_url(p: &RoutePolicy, url: &[u8]) -> Option<Vec<u8>> {
    if !p.ignore_host && matches!(p.query, QueryMode::All) {
        return None;
    }
    let slash = memchr::memchr(b'/', url).unwrap_or(url.len());
    let (host, pq) = url.split_at(slash);
    let (path, query) = match memchr::memchr(b'?', pq) {
        Some(i) => (&pq[..i], &pq[i + 1..]),
        None => (pq, &b""[..]),
    };
    let mut out = Vec::with_capacity(url.len());
    if !p.ignore_host {
        out.extend_from_slice(host);
    }
    match &p.query {
        QueryMode::All => out.extend_from_slice(pq),
        QueryMode::None => out.extend_from_slice(path),
        QueryMode::Only(keep) => key_query_only(keep, path, query, &mut out),
    }
    Some(out)
}

/// `url` (as [`url_of`] writes it) without its host: the form a `key.ignore_host` route's
/// objects are stored under ([`keyed_url`]), for purges by URL or prefix that name a host.
pub fn hostless(url: &[u8]) -> &[u8] {
    &url[memchr::memchr(b'/', url).unwrap_or(url.len())..]
}

/// What [`url_of`] writes, found once in a request head: measured, then written into a
/// `BytesMut` (the buffer a stored object's head, URL and body share) without looking for the
/// head's parts again.
#[derive(Clone)]
pub struct UrlParts<'h> {
    host: Cow<'h, [u8]>,
    port: &'h [u8],
    pq: &'h [u8],
}

impl<'h> UrlParts<'h> {
    #[inline]
    pub fn of(head: &'h RequestHead) -> UrlParts<'h> {
        let (host, port) = key_host(head.host_bytes().unwrap_or(b""), head.https);
        UrlParts {
            host,
            port,
            pq: head.bytes(head.path_query),
        }
    }

    /// The parts of a URL as [`url_of`] wrote it (or [`keyed_url`] made it of one): the host
    /// and port up to the first `/`, then the path and query.
    pub fn of_url(url: &'h [u8]) -> UrlParts<'h> {
        let slash = memchr::memchr(b'/', url).unwrap_or(url.len());
        UrlParts {
            host: Cow::Borrowed(&url[..slash]),
            port: b"",
            pq: &url[slash..],
        }
    }

    /// A "/" goes before a path that does not start with one (`*`, say).
    #[inline]
    fn slash(&self) -> bool {
        self.pq.first() != Some(&b'/')
    }

    /// The length of what [`url_of`] writes.
    #[inline]
    pub fn out_len(&self) -> usize {
        self.host.len() + self.port.len() + usize::from(self.slash()) + self.pq.len()
    }

    /// Appends what [`url_of`] writes to `out` (which the caller has made room for: each part
    /// grows it only when it has not).
    // Inlined: one caller, once per stored miss (out of line, the call costs more than the
    // checks it would share).
    #[inline(always)]
    pub fn put(&self, out: &mut BytesMut) {
        let from = out.len();
        out.extend_from_slice(&self.host);
        if let Some(host) = out.get_mut(from..) {
            host.make_ascii_lowercase();
        }
        out.extend_from_slice(self.port);
        if self.slash() {
            out.extend_from_slice(b"/");
        }
        out.extend_from_slice(self.pq);
    }
}

/// Writes the key of a request: the URL (host unless ignored, path, query per the policy),
/// chosen header values, and a consumer when given. The usual key (no header values, no
/// consumer, the query whole or ignored) is written here; the other parts out of line.
#[inline]
pub fn build_key(p: &RoutePolicy, sent: &Sent<'_>, consumer: Option<&[u8]>, out: &mut Vec<u8>) {
    let head = sent.head;
    out.clear();
    let (host, port) = if p.ignore_host {
        (Cow::Borrowed(&b""[..]), &b""[..])
    } else {
        key_host(head.host_bytes().unwrap_or(b""), head.https)
    };
    let pq = head.bytes(head.path_query);
    let path = head.path_bytes();
    let query = query_of(head, pq);
    // Room for the usual key at once (tag, host, path and query, a consumer); the header
    // values, unknown here, may grow it.
    out.reserve(
        p.key_start.len()
            + host.len()
            + port.len()
            + pq.len()
            + consumer.map_or(0, |c| c.len() + 2)
            + 3,
    );
    out.extend_from_slice(&p.key_start);
    push_lower(out, &host);
    out.extend_from_slice(port);
    out.push(0);
    match &p.query {
        QueryMode::None => out.extend_from_slice(path),
        // Path, `?` and query are the path-and-query as received when the path is (the
        // usual case): one copy.
        QueryMode::All if !query.is_empty() && pq.len() == path.len() + 1 + query.len() => {
            out.extend_from_slice(pq)
        }
        QueryMode::All => {
            out.extend_from_slice(path);
            if !query.is_empty() {
                out.push(b'?');
                out.extend_from_slice(query);
            }
        }
        QueryMode::Only(keep) => key_query_only(keep, path, query, out),
    }
    if !p.key_headers.is_empty() || consumer.is_some() {
        key_headers_and_consumer(p, sent, consumer, out);
    }
}

/// The path and the kept query parameters (`QueryMode::Only`), sorted by name; parameters of
/// one name keep the order the request gave them (an origin that reads the first or the last
/// one answers `?a=1&a=2` and `?a=2&a=1` differently). A parameter is kept when its name,
/// percent-decoded, is listed: an origin decodes `%61=x` as `a=x`, so a key that left it out
/// would store the answer to `?a=1&%61=x` under `?a=1` (parameter cloaking). It is kept as
/// written, so that request has a key of its own.
#[inline(never)]
fn key_query_only(keep: &[Box<[u8]>], path: &[u8], query: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(path);
    let name_of = |kv: &[u8]| -> usize { kv.iter().position(|b| *b == b'=').unwrap_or(kv.len()) };
    let mut params: Vec<(&[u8], &[u8])> = query
        .split(|b| *b == b'&')
        .filter_map(|kv| {
            let name = &kv[..name_of(kv)];
            let listed = keep.iter().find(|k| crate::http::decodes_to(name, k))?;
            Some((&**listed, kv))
        })
        .collect();
    // Stable: the order within one name stays the request's.
    params.sort_by(|a, b| a.0.cmp(b.0));
    let params = params.into_iter().map(|(_, kv)| kv);
    for (i, kv) in params.enumerate() {
        out.push(if i == 0 { b'?' } else { b'&' });
        out.extend_from_slice(kv);
    }
}

/// The chosen header values and the consumer of a key.
#[inline(never)]
fn key_headers_and_consumer(
    p: &RoutePolicy,
    sent: &Sent<'_>,
    consumer: Option<&[u8]>,
    out: &mut Vec<u8>,
) {
    let names: usize = p.key_headers.iter().map(|h| h.len() + 2).sum();
    out.reserve(names);
    for h in &p.key_headers {
        out.push(0);
        out.extend_from_slice(h);
        out.push(b'=');
        // Keyed as the request goes upstream, in the form Vary compares (the same reasons, see
        // `Sent::vary_value`: a field the client's `Connection` lists, or one the gateway
        // writes, does not reach the origin as the client sent it).
        out.extend_from_slice(&sent.vary_value(h));
    }
    if let Some(c) = consumer {
        out.push(0);
        out.push(b'c');
        out.extend_from_slice(c);
    }
}

/// The query of a request (after the first `?` of its path-and-query `pq`; empty when none).
/// The parser ends the path at that `?`, within the same span: the query is then found
/// without a scan.
fn query_of<'h>(head: &RequestHead, pq: &'h [u8]) -> &'h [u8] {
    let (path, whole) = (head.path, head.path_query);
    if path.start == whole.start && path.end <= whole.end {
        let at = path.len();
        return match pq.get(at) {
            Some(b'?') => &pq[at + 1..],
            // No query, or not a path the parser made: looked for.
            None => b"",
            Some(_) => scan_query(pq),
        };
    }
    scan_query(pq)
}

fn scan_query(pq: &[u8]) -> &[u8] {
    memchr::memchr(b'?', pq).map_or(b"", |i| &pq[i + 1..])
}

/// Appends `s` lower-cased (ASCII). Shorter than a word (8 bytes, e.g. one label): in one
/// pass, byte by byte (no copy call, then no second pass over the copy). Longer (most hosts):
/// copied, then lower-cased in place a word at a time (a byte at a time costs ten
/// instructions a byte), the last word overlapping the one before it when the length is not
/// a multiple of 8 (lower-casing twice is lower-casing once).
#[inline(always)]
fn push_lower(out: &mut Vec<u8>, s: &[u8]) {
    if s.len() < 8 {
        out.extend(s.iter().map(u8::to_ascii_lowercase));
        return;
    }
    push_lower_words(out, s);
}

/// [`push_lower`] of 8 bytes or more (out of line: the short case stays as small as it was).
#[inline(never)]
fn push_lower_words(out: &mut Vec<u8>, s: &[u8]) {
    let start = out.len();
    out.extend_from_slice(s);
    let Some(d) = out.get_mut(start..) else {
        return;
    };
    let mut words = d.chunks_exact_mut(8);
    for w in &mut words {
        lower_word(w);
    }
    if !words.into_remainder().is_empty() {
        // The last 8 bytes (there are 8 or more).
        if let Some(last) = d.len().checked_sub(8).and_then(|i| d.get_mut(i..)) {
            lower_word(last);
        }
    }
}

/// Lower-cases (ASCII) the 8 bytes of `w` at once; bytes that are not `A`-`Z` stay as they
/// are (nothing is done when `w` is not 8 bytes long).
#[inline]
fn lower_word(w: &mut [u8]) {
    let Ok(b) = <[u8; 8]>::try_from(&*w) else {
        return;
    };
    let x = u64::from_le_bytes(b);
    // Each byte's low 7 bits (`h`, below 0x80), and sums that set its top bit, with no carry
    // into the next byte (at most 0x7f + 0x3f): `h >= b'A'` and `h > b'Z'`.
    let h = x & 0x7f7f_7f7f_7f7f_7f7f;
    let ge_a = h + 0x3f3f_3f3f_3f3f_3f3f;
    let gt_z = h + 0x2525_2525_2525_2525;
    // Top bits of the bytes in `A`..=`Z` (a byte of 0x80 or more is none), moved to 0x20.
    let upper = ge_a & !gt_z & !x & 0x8080_8080_8080_8080;
    w.copy_from_slice(&(x | (upper >> 2)).to_le_bytes());
}

/// What a freshness computation needs (RFC 9111 §4.2), fixed when an object is stored or
/// freshened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Unix seconds the response was received.
    pub response_time: u64,
    /// `corrected_initial_age` (§4.2.3).
    pub initial_age: u64,
    /// Freshness lifetime (§4.2.1).
    pub lifetime: u64,
    /// Stale-while-revalidate and stale-if-error windows (RFC 5861), 0 when none.
    pub swr: u64,
    pub sie: u64,
    /// Stale use forbidden: must-revalidate, proxy-revalidate or s-maxage (§4.2.4, §5.2.2.2,
    /// §5.2.2.8, §5.2.2.10).
    pub no_stale: bool,
    /// Every use needs validation (`no-cache`, §5.2.2.4).
    pub always_validate: bool,
}

impl Timing {
    /// `current_age` (§4.2.3).
    pub fn age(&self, now: u64) -> u64 {
        self.initial_age
            .saturating_add(now.saturating_sub(self.response_time))
    }
}

/// A stored response.
#[derive(Debug, Default)]
pub struct Object {
    pub status: u16,
    pub reason: Bytes,
    /// End-to-end header fields as stored (no framing, no Age, no hop-by-hop fields).
    pub fields: Fields,
    pub body: Bytes,
    pub t: Timing,
    /// The URL (host and path with query) for purges and invalidations. For a response
    /// stored from an upstream, a slice of the allocation that also holds the head's copy and
    /// the body (see `serve::analyze_response`).
    pub url: Bytes,
    /// Surrogate keys (`Surrogate-Key`), for purges by tag.
    pub tags: Vec<Box<[u8]>>,
    /// The request's values of the fields the response varies on (lower-case names).
    pub vary: Vec<(Box<[u8]>, Vec<u8>)>,
    /// Soft-purged: stale from now on (still usable where stale use is allowed).
    pub invalid: Cell<bool>,
    /// The worker's purge count ([`WorkerCache::purges`]) when the object went into its
    /// store: an invalidation numbered later covers it ([`WorkerCache::invalidated`]).
    pub born: Cell<u64>,
}

/// A request as it went upstream, for its Vary values (RFC 9111 §4.1: the selecting header
/// fields are those of the request as forwarded, which the origin answered). The client's own
/// fields, save those the gateway writes: the identity headers only it sets (the mTLS subject,
/// the consumer, forwarded claims; a client's copy is removed, and the origin saw the
/// gateway's value, or none), and the headers the route's `request_headers` add, set or
/// remove (the origin saw the client's lines, if kept, then the route's).
#[derive(Clone, Copy)]
pub struct Sent<'a> {
    pub head: &'a RequestHead,
    /// The route's `request_headers`: `add`, `set`, `remove` (which holds the identity names
    /// too) and `identity`, the identity header names (lower case).
    pub rules: &'a HeaderRules,
    /// The identity header lines the auth stage sent (`name: value` CRLF, names lower case).
    pub lines: &'a [u8],
    /// The mTLS subject header's name and value, when the client has a verified certificate.
    pub cert: Option<(&'a [u8], &'a [u8])>,
    /// How this hop forwards the request: the value of a field it drops or writes itself is
    /// read from the head it would send ([`Sent::hop_value`]). `None` in unit tests of the
    /// rest, whose fields then go as the client sent them.
    pub hop: Option<Hop<'a>>,
}

/// The rules of a request sent as the client sent it ([`Sent::plain`]). (Behind a lock:
/// `Sent::plain` serves tests and benches, never the request path.)
static NO_RULES: std::sync::LazyLock<HeaderRules> = std::sync::LazyLock::new(HeaderRules::default);

/// The route and this hop's facts about the client, what
/// [`crate::rewrite::encode_upstream_head`] takes with the [`Sent`] (see
/// [`crate::rewrite::Forwarding`] for each).
#[derive(Clone, Copy)]
pub struct Hop<'a> {
    pub route: &'a crate::router::Route,
    pub peer_ip: &'a [u8],
    pub request_id: &'a [u8],
    pub via: &'a [u8],
    pub port: Option<u16>,
    pub trusted: bool,
    pub https: bool,
    /// The request's trace context: the `traceparent` it sends upstream names a new span of
    /// the gateway's (random per request), and its `tracestate` choice.
    pub trace: &'a crate::trace::TraceContext,
    /// The snapshot's upstream groups: the route's endpoints' addresses are the `Host` it
    /// sends when it does not send the client's ([`Sent::endpoint_authority`]).
    pub upstreams: &'a [Rc<crate::upstream::UpstreamGroup>],
}

impl<'a> Sent<'a> {
    /// A request whose headers go upstream as the client sent them (no identity header, no
    /// rule).
    pub fn plain(head: &'a RequestHead) -> Sent<'a> {
        Sent {
            head,
            rules: &NO_RULES,
            lines: b"",
            cert: None,
            hop: None,
        }
    }

    /// `head` as `hop` sends it (its route's `request_headers`), with the identity lines
    /// `lines` and the mTLS subject `cert`. (Made whole here, where it is kept: not copied
    /// again with the hop added.)
    #[inline(always)]
    pub fn new(
        head: &'a RequestHead,
        lines: &'a [u8],
        cert: Option<(&'a [u8], &'a [u8])>,
        hop: Hop<'a>,
    ) -> Sent<'a> {
        Sent {
            head,
            rules: &hop.route.request_headers,
            lines,
            cert,
            hop: Some(hop),
        }
    }

    /// The value of the field `name` (lower case) as compared for Vary.
    pub fn vary_value(&self, name: &[u8]) -> Vec<u8> {
        if self.written(name) {
            // An identity header's value is exact (`sent_value`); a rule's as sent.
            if self.hop.is_none()
                || self
                    .rules
                    .identity
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name))
            {
                return self.sent_value(name);
            }
            return self.hop_value(name);
        }
        if self.hop.is_some() && self.not_as_sent(name) {
            return self.hop_value(name);
        }
        policy::vary_value(name, &mut self.head.header_values(name))
    }

    /// Whether the origin does not get the client's `name` lines as they are (RFC 9110
    /// §7.6.1: ones its `Connection` lists, hop-by-hop and framing fields; ones this hop
    /// writes itself, `X-Forwarded-For` and the like; an identity header's underscore
    /// spelling, dropped with it). Comparing the client's lines there would let a client store
    /// a variant the origin made for other values under its own, served to everyone who sends
    /// them (`Connection: accept-language` with `Accept-Language: fr` would store the
    /// origin's answer to a request without the field as the French one).
    fn not_as_sent(&self, name: &[u8]) -> bool {
        let head = self.head;
        crate::rewrite::sent_as(name) != crate::rewrite::SentAs::Client
            || (head.connection_options
                && crate::http::ConnectionOptions::collect(&head.raw, &head.headers, true)
                    .lists(name))
            || (head.underscore_names
                && self
                    .hop
                    .is_some_and(|h| h.route.request_headers.drops_identity_spelling(name)))
    }

    /// The value of `name` in the head this hop would send upstream
    /// ([`crate::rewrite::encode_upstream_head`], the source of truth), with the request's own
    /// `traceparent` (a new, random span each time, so no later request matches it). Out of
    /// line: only responses that vary on such a field come here. `Host`, when the route sends
    /// the endpoint's address, is that address ([`Sent::endpoint_authority`]).
    #[cold]
    #[inline(never)]
    fn hop_value(&self, name: &[u8]) -> Vec<u8> {
        let Some(hop) = self.hop else {
            return policy::vary_value(name, &mut self.head.header_values(name));
        };
        let authority = Self::endpoint_authority(&hop);
        let traceparent = hop.trace.traceparent();
        let fwd = crate::rewrite::Forwarding {
            peer_ip: hop.peer_ip,
            trusted: hop.trusted,
            port: hop.port,
            request_id: hop.request_id,
            via: hop.via,
            https: hop.https,
            client_cert: self.cert,
            identity: self.lines,
            // The gateway's own span, random per request: `traceparent` as sent matches no
            // other request's (a client's `X-Request-Id`, passed on, may repeat).
            traceparent: Some(&traceparent),
            keep_tracestate: hop.trace.keep_state,
        };
        let mut head = BytesMut::new();
        crate::rewrite::encode_upstream_head(&mut head, self.head, hop.route, &authority, &fwd);
        // The lines after the request line, up to the blank line.
        let lines = head[..]
            .split(|b| *b == b'\n')
            .skip(1)
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .take_while(|l| !l.is_empty());
        let mut values = lines.filter_map(|l| {
            let colon = l.iter().position(|b| *b == b':')?;
            l[..colon]
                .eq_ignore_ascii_case(name)
                .then(|| crate::http::trim_ows(&l[colon + 1..]))
        });
        policy::vary_value(name, &mut values)
    }

    /// The `Host` this hop sends when it sends the endpoint's address (`preserve_host =
    /// false`, or a request without Host): the address of the route's endpoint as configured,
    /// what [`crate::proxy::forward`] sends. The endpoint is picked once the store has been
    /// looked in, so a group of several gives the list of their addresses, in config order
    /// (the request goes with one of them): the same value before and after the fetch, for
    /// each of the group's requests, that changes when the group's endpoints do.
    fn endpoint_authority(hop: &Hop<'_>) -> Vec<u8> {
        let crate::router::Action::Proxy { upstream } = hop.route.action else {
            return Vec::new();
        };
        let Some(group) = hop.upstreams.get(upstream) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, e) in group.endpoints.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(&e.authority);
        }
        out
    }

    /// Whether the gateway writes `name` itself (an identity header, or one the route's rules
    /// touch): a few name compares, no allocation, on a route without rules none.
    #[inline]
    fn written(&self, name: &[u8]) -> bool {
        let is = |n: &[u8]| n.eq_ignore_ascii_case(name);
        let r = self.rules;
        r.identity.iter().any(|n| is(n))
            || r.remove.iter().any(|n| is(n))
            || r.set.iter().any(|(n, _)| is(n))
            || r.add.iter().any(|(n, _)| is(n))
    }

    /// The value of a field the gateway writes, as it goes upstream (the order of
    /// `rewrite::encode_upstream_head`): the client's lines unless removed or replaced, the mTLS
    /// subject, the identity lines, the route's `set` then `add` values. An identity header's
    /// is exact (no list items: a subject's escaped `\,` is not a separator);
    /// [`policy::VARY_ABSENT`] when none is sent.
    #[cold]
    #[inline(never)]
    fn sent_value(&self, name: &[u8]) -> Vec<u8> {
        let is = |n: &[u8]| n.eq_ignore_ascii_case(name);
        let r = self.rules;
        let identity = r.identity.iter().any(|n| is(n));
        let dropped =
            identity || r.remove.iter().any(|n| is(n)) || r.set.iter().any(|(n, _)| is(n));
        let mut values: Vec<&[u8]> = Vec::new();
        if !dropped {
            values.extend(self.head.header_values(name));
        }
        if let Some((_, v)) = self.cert.filter(|(n, _)| is(n)) {
            values.push(v);
        }
        for line in self.lines.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            if is(&line[..colon]) {
                values.push(crate::http::trim_ows(&line[colon + 1..]));
            }
        }
        for (n, v) in r.set.iter().chain(r.add.iter()) {
            if is(n) {
                values.push(v);
            }
        }
        if !identity {
            return policy::vary_value(name, &mut values.iter().copied());
        }
        if values.is_empty() {
            return policy::VARY_ABSENT.to_vec();
        }
        values.join(&b"\n"[..])
    }

    /// Whether `vary` (the Vary values of a stored response) are this request's.
    pub fn matches(&self, vary: &[(Box<[u8]>, Vec<u8>)]) -> bool {
        vary.iter()
            .all(|(name, stored)| self.vary_value(name) == *stored)
    }
}

impl Object {
    pub fn weight(&self) -> u64 {
        let fields = self.fields.weight();
        let mut listed = 0;
        if !self.vary.is_empty() || !self.tags.is_empty() {
            listed = self.listed_weight();
        }
        (self.body.len() + fields + listed + self.url.len() + self.reason.len()) as u64
            + ENTRY_OVERHEAD
    }

    /// The bytes of the Vary values and surrogate keys (most objects have neither: out of
    /// line, out of a stored miss's code lines).
    #[cold]
    #[inline(never)]
    fn listed_weight(&self) -> usize {
        let vary: usize = self.vary.iter().map(|(n, v)| n.len() + v.len()).sum();
        let tags: usize = self.tags.iter().map(|t| t.len()).sum();
        vary + tags
    }

    /// Whether the request's values of the Vary fields, as sent upstream, are those stored
    /// (§4.1).
    pub fn vary_matches(&self, req: &Sent<'_>) -> bool {
        self.vary.is_empty() || req.matches(&self.vary)
    }

    pub fn etag(&self) -> Option<&[u8]> {
        policy::field(&self.fields, b"etag")
    }

    pub fn last_modified(&self) -> Option<&[u8]> {
        policy::field(&self.fields, b"last-modified")
    }

    /// Fresh at `now` (§4.2), and not soft-purged.
    pub fn is_fresh(&self, now: u64) -> bool {
        !self.invalid.get() && self.t.lifetime > self.t.age(now)
    }

    /// Seconds of freshness left (negative once stale).
    pub fn ttl(&self, now: u64) -> i64 {
        if self.invalid.get() {
            return -(self.t.age(now).min(i64::MAX as u64) as i64);
        }
        // Exact, then clamped: a lifetime or an age read from Redis may be any u64 (`as i64`
        // wrapped past i64::MAX), and callers negate the result.
        let left = i128::from(self.t.lifetime) - i128::from(self.t.age(now));
        left.clamp(-i128::from(i64::MAX), i128::from(i64::MAX)) as i64
    }
}

/// The stored variants of one key, newest first (the store keeps their weight, what
/// [`Variants::weight`] says when they go in).
#[derive(Clone)]
pub struct Entry {
    pub variants: Variants,
}

impl Entry {
    /// The newest variant that the request `req` selects (§4.1).
    #[inline]
    fn select(&self, req: &Sent<'_>) -> Option<Rc<Object>> {
        self.variants
            .as_slice()
            .iter()
            .find(|o| o.vary_matches(req))
            .cloned()
    }
}

/// The variants of one key, newest first, never empty: most keys have one, which takes no
/// vector (one allocation less per stored object, and one less to free when it goes).
#[derive(Clone)]
pub enum Variants {
    One(Rc<Object>),
    Many(Vec<Rc<Object>>),
}

impl Variants {
    pub fn as_slice(&self) -> &[Rc<Object>] {
        match self {
            Variants::One(o) => std::slice::from_ref(o),
            Variants::Many(v) => v,
        }
    }

    /// `None` when `v` is empty.
    fn from_vec(mut v: Vec<Rc<Object>>) -> Option<Variants> {
        match v.len() {
            0 => None,
            1 => v.pop().map(Variants::One),
            _ => Some(Variants::Many(v)),
        }
    }

    fn weight(&self) -> u64 {
        self.as_slice().iter().map(|o| o.weight()).sum()
    }
}

/// A cache key with its hash ([`WorkerCache::key`]): the store and the flights find keys by
/// it, so that a request hashes its key once for its lookup, its flight and its store.
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    pub hash: u64,
    pub bytes: &'a [u8],
}

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The store of one worker: each key's variants, weighed by [`Entry::weight`] (the store adds
/// the key's capacity).
type Map = store::Store<Entry>;

/// How a coalesced fetch ended, for those who waited on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlightEnd {
    Pending,
    /// A response was stored: look again.
    Stored,
    /// The response was not storable: go upstream alone.
    NotStorable,
    /// The fetch failed or was abandoned: one waiter takes over.
    Failed,
}

/// One fetch in progress for a key, as its waiters and its stream see it. Waiters are woken
/// (worker-local, no polling) when its head is known, as body bytes arrive, and when it ends.
/// Made only when needed ([`FlightSlot`]): when a request joins the fetch, or when the fetch
/// publishes a head to stream; a fetch no one joins, whose body comes whole with its head (the
/// usual miss), never has one.
pub struct Flight {
    pub done: Notify,
    pub end: Cell<FlightEnd>,
    /// The head of a storable response, once known: waiters stream it (chunked when its
    /// length is not known). Taken back when the body outgrows the capture.
    pub stream: RefCell<Option<Rc<FlightStream>>>,
    /// The body outgrew `max_object_bytes` (only a body of unknown length can): it is not
    /// stored and no new waiter starts on it; the waiters already streaming it go on
    /// receiving it through a window of the last `max_object_bytes` bytes (`base`).
    pub cut: Cell<bool>,
    /// The body's bytes so far (while it streams), at most `max_object_bytes`: from the
    /// start, or past the cut the last ones, from `base` on.
    body: RefCell<BytesMut>,
    /// Where `body` starts in the whole body (0 until the cut).
    base: Cell<usize>,
    /// Waiters streaming a chunked body now ([`Flight::stream_guard`]): past the cut the
    /// window is kept only while there are some.
    streaming: Cell<usize>,
    /// The body arrived whole past the cut (not stored, so no `Stored` end tells it): its
    /// streaming waiters may end their answers.
    pub body_end: Cell<bool>,
    /// The whole body, once the fetch stored it.
    whole: RefCell<Option<Bytes>>,
    /// A stream's allocation, emptied, for the next publish (flights are reused: see
    /// [`FlightGuard`]'s drop).
    spare_stream: RefCell<Option<Rc<FlightStream>>>,
    /// Another request found this flight (to wait on it): it is not reused, since its
    /// `done` may keep a slot for each waiter it had.
    joined: Cell<bool>,
}

/// The least of a body past the cut kept for the waiters streaming it: two upstream reads, so
/// that a waiter keeping up is not cut by a small `max_object_bytes`.
pub const MIN_WINDOW: usize = 64 * 1024;

/// A waiter streaming a chunked body, counted in its flight ([`Flight::stream_guard`]).
pub struct StreamingWaiter(Rc<Flight>);

impl Drop for StreamingWaiter {
    fn drop(&mut self) {
        self.0
            .streaming
            .set(self.0.streaming.get().saturating_sub(1));
    }
}

/// What a waiter sends before the body of a response it receives as it arrives.
#[derive(Clone)]
pub struct FlightStream {
    pub status: u16,
    pub reason: Bytes,
    pub fields: Fields,
    /// The body's length; `None` for a chunked response (streamed chunked, and complete
    /// only once the fetch ends `Stored`).
    pub len: Option<u64>,
    pub t: Timing,
    /// The fetching request's values of the fields the response varies on.
    pub vary: Vec<(Box<[u8]>, Vec<u8>)>,
}

impl FlightStream {
    /// What a spare stream holds: nothing.
    fn empty() -> FlightStream {
        FlightStream {
            status: 0,
            reason: Bytes::new(),
            fields: Fields::default(),
            len: None,
            t: Timing::default(),
            vary: Vec::new(),
        }
    }

    /// Whether a waiting request may take this response (§4.1).
    pub fn vary_matches(&self, req: &Sent<'_>) -> bool {
        self.vary.is_empty() || req.matches(&self.vary)
    }
}

impl Flight {
    /// A pending flight.
    fn new() -> Flight {
        Flight {
            done: Notify::default(),
            end: Cell::new(FlightEnd::Pending),
            stream: RefCell::new(None),
            cut: Cell::new(false),
            body: RefCell::new(BytesMut::new()),
            base: Cell::new(0),
            streaming: Cell::new(0),
            body_end: Cell::new(false),
            whole: RefCell::new(None),
            spare_stream: RefCell::new(None),
            joined: Cell::new(false),
        }
    }

    /// Body bytes from `off` on that have arrived (empty when none yet).
    pub fn body_from(&self, off: usize) -> Bytes {
        if let Some(w) = self.whole.borrow().as_ref() {
            return w.slice(off.min(w.len())..);
        }
        let b = self.body.borrow();
        Bytes::copy_from_slice(&b[off.min(b.len())..])
    }

    /// Body bytes from `off` on that have arrived, as [`Flight::body_from`]; `None` when
    /// the ones at `off` are no longer kept (past the cut, this waiter fell more than the
    /// window behind the fetch).
    pub fn window_from(&self, off: usize) -> Option<Bytes> {
        let base = self.base.get();
        (off >= base).then(|| self.body_from(off - base))
    }

    /// Counts a waiter streaming a chunked body for as long as the guard lives.
    pub fn stream_guard(self: &Rc<Self>) -> StreamingWaiter {
        self.streaming.set(self.streaming.get() + 1);
        StreamingWaiter(self.clone())
    }

    /// Bytes of a body past the cut: kept in the window for the waiters streaming it (the
    /// oldest dropped past `max_object_bytes`, at least [`MIN_WINDOW`]), or dropped when none
    /// does.
    fn past_cut(&self, data: &[u8], max: usize) {
        let window = max.max(MIN_WINDOW);
        let mut b = self.body.borrow_mut();
        if self.streaming.get() == 0 {
            if b.capacity() > 0 {
                *b = BytesMut::new();
            }
        } else {
            b.extend_from_slice(data);
            let excess = b.len().saturating_sub(window);
            if excess > 0 {
                b.advance(excess);
                self.base.set(self.base.get().saturating_add(excess));
            }
        }
        drop(b);
        self.done.notify_all();
    }

    /// Publishes the head to stream to waiters.
    pub fn publish(&self, s: FlightStream) {
        let spare = self.spare_stream.borrow_mut().take();
        let st = match spare {
            Some(mut rc) => match Rc::get_mut(&mut rc) {
                Some(slot) => {
                    *slot = s;
                    rc
                }
                None => Rc::new(s),
            },
            None => Rc::new(s),
        };
        *self.stream.borrow_mut() = Some(st);
        self.done.notify_all();
    }

    /// Takes the published head back once the fetch is over (no waiter starts on it any
    /// more): moved out (its allocation kept for the next publish), or copied when a waiter
    /// still streams it.
    pub fn take_stream(&self) -> Option<FlightStream> {
        let mut st = self.stream.borrow_mut().take()?;
        let Some(s) = Rc::get_mut(&mut st) else {
            return Some((*st).clone());
        };
        let out = std::mem::replace(s, FlightStream::empty());
        *self.spare_stream.borrow_mut() = Some(st);
        Some(out)
    }

    /// Empties a stream no waiter holds into the spare slot (the flight is being reused).
    fn keep_stream(&self) {
        let Some(mut st) = self.stream.borrow_mut().take() else {
            return;
        };
        if let Some(s) = Rc::get_mut(&mut st) {
            *s = FlightStream::empty();
            *self.spare_stream.borrow_mut() = Some(st);
        }
    }
}

/// Hashes a `u64` that already is a keyed hash (the keys of the store and of the flights, see
/// [`KeyRef`]) as itself.
#[derive(Default, Clone, Copy)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed here; other input is still mixed in, not lost.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PreHashedBuild = std::hash::BuildHasherDefault<PreHashed>;

/// [`WorkerCache::share`]'s write to the Redis layer `l`.
#[inline(never)]
fn share_to(
    l: &redis::SharedLayer,
    key: &[u8],
    obj: &Object,
    max_variants: usize,
    heard: redis::Heard,
) {
    l.put(key, obj, now_secs(), max_variants, heard);
}

/// Counters of one worker's cache.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub stale_hits: u64,
    pub misses: u64,
    pub stores: u64,
    pub revalidations: u64,
    pub coalesced: u64,
    pub purged: u64,
    /// Stored objects read by purges that read the whole store (see
    /// [`WorkerCache::purge_local`]) and by sweeps of invalidated URLs.
    pub purge_scanned: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// One worker's cache: its store, its fetches in flight and its counters.
pub struct WorkerCache {
    map: RefCell<Map>,
    /// Keyed by the cache key's hash ([`KeyRef`]); each slot holds its key, compared on
    /// every lookup. Two keys with the same hash cannot both have a flight: the second
    /// fetches alone, as when there are [`MAX_FLIGHTS`].
    flights: RefCell<Flights>,
    /// Hashes keys for the store and the flights (keyed, random per worker, so that a client
    /// cannot aim collisions at them); a request hashes its key once.
    key_hasher: quick_cache::DefaultHashBuilder,
    stats: RefCell<CacheStats>,
    /// Key buffers of requests that ended, for the next ones to build their keys into
    /// (at most [`MAX_SPARE_KEY_BUFS`] of at most [`MAX_SPARE_KEY_BYTES`] each).
    spare_keys: RefCell<Vec<Vec<u8>>>,
    /// Flights that ended with no waiter holding them, reset, for the next fetches that need
    /// one (at most [`MAX_SPARE_FLIGHTS`]).
    spare_flights: RefCell<Vec<Rc<Flight>>>,
    /// An evicted object's allocation, emptied, and its field vector (at most
    /// [`MAX_SPARE_FIELDS`] long), for the next stored miss (see [`WorkerCache::new_object`]).
    spare_object: RefCell<Option<Rc<Object>>>,
    spare_fields: RefCell<Vec<HeaderSpan>>,
    /// The allocation that held an evicted object's head, URL and body, emptied (at most
    /// [`MAX_SPARE_BUF`] bytes), for the next stored miss (see [`WorkerCache::object_buf`]).
    spare_buf: RefCell<Option<BytesMut>>,
    /// An evicted key's vector, emptied (at most [`MAX_SPARE_KEY_BYTES`]), for the next
    /// stored key (see [`WorkerCache::store_key`]).
    spare_key: RefCell<Vec<u8>>,
    /// To tell the other workers about purges and invalidations (set by the server).
    control: OnceLock<Arc<Control>>,
    /// The Redis layer shared by every worker and host (`[cache.redis]`), set by the server.
    shared: OnceLock<Arc<redis::SharedLayer>>,
    worker: usize,
    /// How many purges and invalidations this worker has applied ([`WorkerCache::purge_local`]).
    /// A fetch notes the count when it begins; what it then stores is checked against the
    /// purges applied since (see [`WorkerCache::purged_since`]).
    purges: Cell<u64>,
    /// The last [`MAX_RECENT_PURGES`] purges, each with its number in `purges`.
    recent_purges: RefCell<std::collections::VecDeque<(u64, Purge)>>,
    /// Purges applied here whose Redis copies may not be gone yet: the ticket of each
    /// ([`redis::SharedLayer::purge_ticket`]), the purge, and the Unix second this worker
    /// applied it. An entry found in Redis that one of them covers and that was received
    /// before it is not taken ([`WorkerCache::pending_in_redis_covers`]). Kept until the
    /// purge is done in Redis, which a link that is down delays until it is up again (the
    /// layer sends it again), at most [`MAX_REDIS_PENDING`].
    redis_pending: RefCell<Vec<(u64, Rc<Purge>, u64)>>,
    /// Purges pushed out of `redis_pending` past [`MAX_REDIS_PENDING`] and not settled yet:
    /// until they are, no entry found in Redis received before the latest of them is taken,
    /// whatever its URL ([`RedisFloor`]). Before, the purge pushed out was forgotten, and
    /// its copies could come back from Redis.
    redis_floor: RefCell<Option<RedisFloor>>,
    /// This worker's place in the purge log ([`redis::Heard`]): what its writes to Redis
    /// carry. Moved by the purge log's listener ([`WorkerCache::heard_in_log`]).
    log_at: Cell<redis::Heard>,
    /// The purges by prefix and of everything logged (heard from the log, or this host's own
    /// once logged), with their IDs in the log, oldest first, at most [`MAX_WIDE_PURGES`] and
    /// [`MAX_WIDE_PURGE_BYTES`]: an entry found in Redis that one of them covers, written by a
    /// worker that had not applied it, is taken as from before it
    /// ([`WorkerCache::wide_purge_covers`]). Their copies in Redis are not deleted again by
    /// the hosts that hear them (a `SCAN` of the keys each), unlike a purge by URL or tag.
    wide_purges: RefCell<std::collections::VecDeque<(redis::LogId, Rc<Purge>)>>,
    /// The bytes of their prefixes.
    wide_purge_bytes: Cell<usize>,
    /// The ID of the newest purge pushed out of `wide_purges` (or of a gap in the log): an
    /// entry whose writer had not reached it is refused, whatever its URL.
    wide_floor: Cell<redis::LogId>,
    /// The newest of `wide_floor` and the IDs in `wide_purges`: an entry whose writer had
    /// reached it needs no other check (the usual case, and every entry while no such purge
    /// was heard).
    wide_newest: Cell<redis::LogId>,
    /// The URLs invalidated (RFC 9111 §4.4) since the last sweep, each with the number in
    /// `purges` of its latest invalidation: a stored object of such a URL born before it is
    /// gone for every lookup ([`WorkerCache::invalidate_local`]). At most
    /// [`MAX_INVALIDATED`] URLs of [`MAX_INVALIDATED_BYTES`] in all before a sweep.
    invalidated: RefCell<HashMap<Box<[u8]>, u64, quick_cache::DefaultHashBuilder>>,
    /// The bytes of the URLs in `invalidated`.
    invalidated_bytes: Cell<usize>,
    /// `invalidated` is not empty (tested on every lookup).
    any_invalidated: Cell<bool>,
    /// The lengths of the URLs in `invalidated` modulo 64, as bits: a stored object whose
    /// URL's length has no bit here is of no invalidated URL (tested before its URL is
    /// looked for in `invalidated`, on every lookup while some URL is invalidated).
    invalidated_lens: Cell<u64>,
    /// The bytes of bodies captured to be stored, while they arrive.
    in_flight: Rc<InFlight>,
    /// A piece of a representation (a 206, RFC 9111 §3.3) was stored here once: until then a
    /// miss does not look at its `Range` for one (see `serve::piece_lookup`).
    pieces: Cell<bool>,
}

/// One worker's bytes of bodies being captured for the store ([`Tee`]), which the store's
/// budget does not count until they are stored, bounded by
/// `[cache] max_in_flight_bytes_per_worker`: a flood of concurrent misses for large bodies
/// cannot hold more than that.
pub struct InFlight {
    used: Cell<u64>,
    max: u64,
}

/// Bytes held against a worker's [`InFlight`] bound, given back when dropped.
pub struct Charge {
    of: Rc<InFlight>,
    n: u64,
}

impl Charge {
    /// Holds `by` bytes more, if the bound allows.
    fn grow(&mut self, by: u64) -> bool {
        let used = self.of.used.get().saturating_add(by);
        if used > self.of.max {
            return false;
        }
        self.of.used.set(used);
        self.n += by;
        true
    }

    /// Gives back every byte held.
    fn release(&mut self) {
        let n = std::mem::take(&mut self.n);
        self.of.used.set(self.of.used.get().saturating_sub(n));
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.release();
    }
}

/// Most purges a worker remembers for the fetches in flight when they were applied: a fetch
/// that began before older ones are forgotten stores nothing (the safe side; it takes more
/// than this many purges during one fetch).
const MAX_RECENT_PURGES: usize = 64;
/// Most purges a worker awaits the Redis side of one by one ([`WorkerCache::redis_pending`]);
/// past it the oldest is moved to the worker's [`RedisFloor`].
const MAX_REDIS_PENDING: usize = 64;
/// Most tickets a worker's [`RedisFloor`] waits for: more than a host can have unsettled (the
/// layer keeps at most 64 purges, and the link queues at most 4096 commands, two or more a
/// purge), unless settlements were lost (a worker's control mailbox full). Past it the floor
/// stays until every ticket up to the latest pushed out is settled, which the settlements'
/// `below` tells ([`WorkerCache::settle_redis_below`]; the safe side meanwhile: entries
/// received before it are not taken).
const MAX_FLOOR_TICKETS: usize = 4096;

/// The purges a worker awaits in Redis past [`MAX_REDIS_PENDING`], as one guard: no entry
/// found in Redis received before `at` (plus [`PURGE_CLOCK_MARGIN_SECS`]) is taken, whatever
/// its URL, until every ticket in `tickets` is settled.
struct RedisFloor {
    /// This worker's clock when the latest of them was applied.
    at: u64,
    tickets: Vec<u64>,
    /// More than [`MAX_FLOOR_TICKETS`] were pushed out: the floor stays until every ticket up
    /// to `newest` is settled ([`WorkerCache::settle_redis_below`]).
    stuck: bool,
    /// The latest ticket pushed out to it.
    newest: u64,
}
/// How far another host's clock may be ahead of this one's for a purge awaited in Redis to
/// still cover what that host stored before it ([`WorkerCache::pending_in_redis_covers`]):
/// an entry received up to this long after the purge, by this host's clock, is taken as from
/// before it while the purge is awaited (a miss, at worst).
const PURGE_CLOCK_MARGIN_SECS: u64 = 5;

/// Most purges by prefix or of everything a worker remembers for the entries it finds in
/// Redis ([`WorkerCache::wide_purges`]); past it (or [`MAX_WIDE_PURGE_BYTES`]) the oldest
/// raises the worker's floor ([`WorkerCache::wide_floor`]).
const MAX_WIDE_PURGES: usize = 64;
/// Most bytes of their prefixes.
const MAX_WIDE_PURGE_BYTES: usize = 256 * 1024;

/// Most URLs a worker keeps invalidated (RFC 9111 §4.4) between sweeps of its store
/// ([`WorkerCache::invalidate_local`]): a sweep reads every stored object, so one per this
/// many invalidations keeps an unsafe request's cost from growing with the store.
const MAX_INVALIDATED: usize = 1024;
/// Most bytes of those URLs between sweeps.
const MAX_INVALIDATED_BYTES: usize = 1 << 20;

impl WorkerCache {
    pub fn new(cfg: &Config, worker: usize) -> Rc<WorkerCache> {
        let budget = cfg.cache.max_bytes_per_worker.0;
        // An estimate only (the store sizes its tables from it, and grows them past it);
        // entries of 8 KiB on average.
        let items = (budget / 8192).clamp(16, 1 << 20) as usize;
        Rc::new(WorkerCache {
            map: RefCell::new(Map::new(items, budget)),
            flights: RefCell::new(Flights::new()),
            key_hasher: Default::default(),
            stats: RefCell::new(CacheStats::default()),
            spare_keys: RefCell::new(Vec::new()),
            spare_flights: RefCell::new(Vec::new()),
            spare_object: RefCell::new(None),
            spare_fields: RefCell::new(Vec::new()),
            spare_buf: RefCell::new(None),
            spare_key: RefCell::new(Vec::new()),
            purges: Cell::new(0),
            recent_purges: RefCell::new(std::collections::VecDeque::new()),
            redis_pending: RefCell::new(Vec::new()),
            redis_floor: RefCell::new(None),
            log_at: Cell::new((0, 0)),
            wide_purges: RefCell::new(std::collections::VecDeque::new()),
            wide_purge_bytes: Cell::new(0),
            wide_floor: Cell::new((0, 0)),
            wide_newest: Cell::new((0, 0)),
            invalidated: RefCell::new(HashMap::default()),
            invalidated_bytes: Cell::new(0),
            any_invalidated: Cell::new(false),
            invalidated_lens: Cell::new(0),
            in_flight: Rc::new(InFlight {
                used: Cell::new(0),
                max: cfg.cache.max_in_flight(),
            }),
            control: OnceLock::new(),
            shared: OnceLock::new(),
            worker,
            pieces: Cell::new(false),
        })
    }

    /// Whether a piece of a representation (a 206) was ever stored here.
    #[inline(always)]
    pub(crate) fn has_pieces(&self) -> bool {
        self.pieces.get()
    }

    /// Notes that a piece was stored ([`WorkerCache::has_pieces`]).
    pub(crate) fn note_piece(&self) {
        self.pieces.set(true);
    }

    /// Holds `n` bytes of a body about to be captured for the store against the worker's
    /// in-flight bound; `None` when they do not fit.
    pub fn charge_in_flight(&self, n: u64) -> Option<Charge> {
        let mut c = Charge {
            of: self.in_flight.clone(),
            n: 0,
        };
        c.grow(n).then_some(c)
    }

    /// Bytes of bodies being captured now (see [`InFlight`]).
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight.used.get()
    }

    /// Lets purges and invalidations made on this worker reach the others.
    pub fn set_control(&self, c: Arc<Control>) {
        let _ = self.control.set(c);
    }

    /// Sets the Redis layer (`[cache.redis]`).
    pub fn set_shared(&self, l: Arc<redis::SharedLayer>) {
        if let Some(c) = self.control.get() {
            l.set_control(c.clone());
        }
        let _ = self.shared.set(l);
    }

    pub fn shared(&self) -> Option<&Arc<redis::SharedLayer>> {
        self.shared.get()
    }

    /// Writes a stored object to the Redis layer, if there is one (queued, not awaited),
    /// keeping at most `max_variants` variants of the key there too, with this worker's place
    /// in the purge log ([`redis::Heard`]). The caller has checked the object against the
    /// purges applied since its fetch began ([`WorkerCache::purged_since`]).
    // The test in line (a stored miss without a Redis layer makes no call); the writing out.
    #[inline]
    pub fn share(&self, key: &[u8], obj: &Object, max_variants: usize) {
        if let Some(l) = self.shared.get() {
            share_to(l, key, obj, max_variants, self.log_at.get());
        }
    }

    pub fn stats(&self) -> CacheStats {
        let mut s = *self.stats.borrow();
        let m = self.map.borrow();
        s.entries = m.len() as u64;
        s.bytes = m.weight();
        s
    }

    pub(crate) fn count(&self, f: impl FnOnce(&mut CacheStats)) {
        f(&mut self.stats.borrow_mut());
    }

    /// An empty buffer to build a key into: a spare one when there is one, so that a cached
    /// request does not allocate its key. Give it back with [`WorkerCache::give_key_buf`].
    pub fn key_buf(&self) -> Vec<u8> {
        self.spare_keys.borrow_mut().pop().unwrap_or_default()
    }

    /// Keeps a key buffer for a later request (a large one, or one past the bound, is freed).
    pub fn give_key_buf(&self, mut buf: Vec<u8>) {
        let mut spare = self.spare_keys.borrow_mut();
        if buf.capacity() <= MAX_SPARE_KEY_BYTES && spare.len() < MAX_SPARE_KEY_BUFS {
            buf.clear();
            spare.push(buf);
        } else {
            // (A key past the bound, or a worker with as many spares as it keeps.)
            std::hint::cold_path();
        }
    }

    /// `key` with its hash, for the store and the flights.
    #[inline]
    pub fn key<'k>(&self, key: &'k [u8]) -> KeyRef<'k> {
        KeyRef {
            hash: self.key_hasher.hash_one(key),
            bytes: key,
        }
    }

    /// The variants stored under `key`.
    pub fn get(&self, key: &[u8]) -> Option<Vec<Rc<Object>>> {
        if self.any_invalidated.get() {
            self.drop_invalidated(self.key(key));
        }
        self.map
            .borrow()
            .get(self.key(key))
            .map(|e| e.variants.as_slice().to_vec())
    }

    /// The newest variant under `key` that `head` selects (§4.1), and whether the key had
    /// any variant at all.
    // Inlined in the cache phase's first look (`serve::first_look`), the usual caller.
    #[inline]
    pub fn lookup(&self, key: KeyRef<'_>, req: &Sent<'_>) -> (Option<Rc<Object>>, bool) {
        let m = self.map.borrow();
        let Some(e) = m.get(key) else {
            return (None, false);
        };
        if self.any_invalidated.get() && self.holds_invalidated(e) {
            drop(m);
            return self.lookup_past_invalidated(key, req);
        }
        (e.select(req), true)
    }

    /// [`WorkerCache::lookup`] of a key whose entry holds an invalidated object: that one goes
    /// from the store first.
    #[cold]
    #[inline(never)]
    fn lookup_past_invalidated(
        &self,
        key: KeyRef<'_>,
        req: &Sent<'_>,
    ) -> (Option<Rc<Object>>, bool) {
        self.drop_invalidated(key);
        let m = self.map.borrow();
        match m.peek(key) {
            Some(e) => (e.select(req), true),
            None => (None, false),
        }
    }

    /// Stores `obj` under `key`, replacing the variant with the same Vary values and dropping
    /// the oldest past `max_variants`.
    pub fn insert(&self, key: &[u8], obj: Rc<Object>, max_variants: usize) {
        self.insert_key(self.key(key), obj, max_variants);
    }

    /// [`WorkerCache::insert`] with the key's hash known.
    pub fn insert_key(&self, key: KeyRef<'_>, obj: Rc<Object>, max_variants: usize) {
        if key.bytes.len() > MAX_KEY_BYTES {
            std::hint::cold_path();
            return;
        }
        obj.born.set(self.purges.get());
        // Stored alone at first (one look at the map, not a look for the key's other
        // variants and then another to store): a key stored before hands its former entry
        // back, and its other variants are then put back with the new one.
        let weight = obj.weight();
        // (The object itself goes in, not a second reference: a key stored before finds it in
        // the store for its other variants.)
        let entry = Entry {
            variants: Variants::One(obj),
        };
        let stored = StoreKey {
            hash: key.hash,
            bytes: self.store_key(key.bytes),
        };
        let evicted = self.map.borrow_mut().insert(stored, entry, weight);
        self.count(|s| s.stores += 1);
        let Some((k, e)) = evicted else {
            return;
        };
        if k.hash == key.hash && k.bytes == key.bytes {
            std::hint::cold_path();
            self.keep_variants(key, e, max_variants);
        } else if let Variants::One(o) = e.variants {
            self.keep_object(o);
        }
        if k.bytes.capacity() <= MAX_SPARE_KEY_BYTES {
            let mut k = k.bytes;
            k.clear();
            prefetch(k.as_ptr(), k.capacity());
            *self.spare_key.borrow_mut() = k;
        }
    }

    /// Brings in, for a miss whose response head has arrived (its analysis and storing follow,
    /// with no wait between), what storing the key hashed `hash` will read and write: the
    /// store's table lines ([`store::Store::prefetch_insert`]) and what the eviction reads of
    /// the entry it will evict (most likely: the one at the front of its queue): its object
    /// (not its key's bytes, which the eviction does not read; they are brought in when kept).
    /// The store brought the entry's slot in after its last insert ([`store::Store::insert`]).
    /// Also the first and last lines of `key` (copied into the store) and of each of `also`
    /// (the request's host and path, read again to write the object's URL): while the fetch
    /// waited, the other connections' requests ran and these went out of the nearest caches.
    #[inline]
    pub fn prefetch_store(&self, key: KeyRef<'_>, also: [&[u8]; 2]) {
        for s in [key.bytes, also[0], also[1]] {
            let p = s.as_ptr();
            prefetch_line(p);
            prefetch_line(p.wrapping_add(s.len().saturating_sub(1)));
        }
        let m = self.map.borrow();
        let Some(e) = m.prefetch_insert(key.hash) else {
            return;
        };
        if let Variants::One(o) = &e.variants {
            // The object and the counts before it (`Rc`'s allocation).
            let obj = Rc::as_ptr(o);
            prefetch_line(
                obj.cast::<u8>()
                    .wrapping_sub(2 * std::mem::size_of::<usize>()),
            );
            prefetch_of(obj);
        }
    }

    /// Puts back, with the object just stored alone under `key`, the variants `former` (the
    /// key's entry it replaced) held for other Vary values, newest first, at most
    /// `max_variants` in all. Nothing when the new object was not stored (too heavy: with
    /// other variants, heavier still).
    #[cold]
    #[inline(never)]
    fn keep_variants(&self, key: KeyRef<'_>, former: Entry, max_variants: usize) {
        let stored = self.map.borrow().peek(key).map(|e| e.variants.clone());
        let Some(Variants::One(obj)) = stored else {
            return;
        };
        let older = former
            .variants
            .as_slice()
            .iter()
            .filter(|o| o.vary != obj.vary);
        let mut v = Vec::with_capacity(max_variants.clamp(1, 16));
        v.push(obj.clone());
        v.extend(older.cloned());
        v.truncate(max_variants.max(1));
        if v.len() < 2 {
            return;
        }
        let variants = Variants::Many(v);
        let weight = variants.weight();
        let stored = StoreKey {
            hash: key.hash,
            bytes: key.bytes.to_vec(),
        };
        // Soft: the store just counted the key's use. Stored anew if the new entry went
        // already (an insert drops an entry grown past what may be stored).
        let mut m = self.map.borrow_mut();
        if let Err((k, e)) = m.replace(stored, Entry { variants }, weight, true) {
            m.insert(k, e, weight);
        }
    }

    /// A vector holding `bytes`, for a key going into the store: an evicted key's when it has
    /// the room and at most [`STORE_KEY_SLACK`] bytes more (no allocation and no free per
    /// stored miss once the store is full and keys are alike), else a new one.
    fn store_key(&self, bytes: &[u8]) -> Vec<u8> {
        let mut spare = self.spare_key.borrow_mut();
        let cap = spare.capacity();
        if cap >= bytes.len() && cap - bytes.len() <= STORE_KEY_SLACK {
            let mut k = std::mem::take(&mut *spare);
            k.extend_from_slice(bytes);
            return k;
        }
        std::hint::cold_path();
        bytes.to_vec()
    }

    /// Keeps an evicted object's allocations for [`WorkerCache::new_object`] when nothing else
    /// holds it. What holds the allocations the next stored miss reuses (its fields' block and
    /// spans, its URL, its body) is taken out now; the rest (the reason phrase, tags, Vary
    /// values, all empty or static for most) is dropped when the next object is built over it,
    /// not reset to defaults first.
    fn keep_object(&self, mut o: Rc<Object>) {
        let Some(obj) = Rc::get_mut(&mut o) else {
            std::hint::cold_path();
            return;
        };
        let (block, fields) = std::mem::take(&mut obj.fields).into_parts();
        drop(std::mem::take(&mut obj.url));
        drop(std::mem::take(&mut obj.body));
        // An object stored from an upstream holds its head's copy (the fields' block, from the
        // allocation's start), its URL and its body in one allocation
        // (`serve::analyze_response`): with the other handles dropped above, the block's gives
        // all of it back, from its start (nothing to move back, as from the body's handle).
        // What the next stored miss writes (this buffer, the spans) is brought in now, while
        // the requests between run (see `prefetch`).
        if let Ok(mut buf) = block.try_into_mut() {
            buf.clear();
            if buf.capacity() <= MAX_SPARE_BUF {
                prefetch(buf.as_ptr(), buf.capacity());
                if let Some(unused) = self.spare_buf.borrow_mut().replace(buf) {
                    // The one kept before, which no stored miss took (too small or too
                    // large for it).
                    std::hint::cold_path();
                    drop(unused);
                }
            }
        }
        if fields.capacity() <= MAX_SPARE_FIELDS {
            let mut spare = self.spare_fields.borrow_mut();
            if spare.capacity() < fields.capacity() {
                prefetch(
                    fields.as_ptr().cast(),
                    fields.capacity() * std::mem::size_of::<HeaderSpan>(),
                );
                *spare = fields;
            }
        }
        *self.spare_object.borrow_mut() = Some(o);
    }

    /// An empty buffer with room for `n` bytes: an evicted object's when it has that room and at
    /// most [`SPARE_BUF_SLACK`] bytes more (so that a stored object never holds much more
    /// memory than its weight says), else a new one.
    pub fn object_buf(&self, n: usize) -> BytesMut {
        let fits = |b: &mut BytesMut| {
            let cap = b.capacity();
            cap >= n && cap - n <= SPARE_BUF_SLACK
        };
        match self.spare_buf.borrow_mut().take_if(fits) {
            Some(b) => b,
            None => BytesMut::with_capacity(n),
        }
    }

    /// An empty vector for a stored response's field spans: an evicted object's, when one is
    /// kept.
    pub fn field_vec(&self) -> Vec<HeaderSpan> {
        std::mem::take(&mut *self.spare_fields.borrow_mut())
    }

    /// An object that `fill` builds (it sets every part of the object given) in an evicted
    /// object's allocation when one is kept (no allocation and no free per stored miss once
    /// the store is full), else in a new one. Built where it is kept: an `Object` is some 250
    /// bytes, and one built elsewhere and moved here is copied at least once more.
    // Inlined even into a large caller (`serve::analyze_whole`, once per stored miss): out of
    // line, the parts `fill` moves were first gathered for the call.
    #[inline(always)]
    pub fn new_object(&self, fill: impl FnOnce(&mut Object)) -> Rc<Object> {
        let kept = self.spare_object.borrow_mut().take();
        if let Some(mut rc) = kept {
            // Always unique (`keep_object` keeps only objects nothing else holds).
            if let Some(slot) = Rc::get_mut(&mut rc) {
                fill(slot);
                return rc;
            }
        }
        let mut o = Object::default();
        fill(&mut o);
        Rc::new(o)
    }

    /// Stores `obj`, a stored response freshened by a 304 or a HEAD (RFC 9111 §4.3.4,
    /// §4.3.5): here, in Redis, and in every other worker that holds an older copy of the same
    /// variant (posted, not awaited), so that no worker keeps revalidating the copy
    /// the origin has just confirmed. Not on the hot path: only after a validation.
    pub fn store_freshened(&self, key: &[u8], obj: &Rc<Object>, max_variants: usize) {
        self.insert(key, obj.clone(), max_variants);
        self.share(key, obj, max_variants);
        let Some(c) = self.control.get().filter(|c| c.workers() > 1) else {
            return;
        };
        // A copy that must be validated before each use (`no-cache`, or already stale) would
        // be validated by the other workers all the same: telling them costs work per request
        // and saves none. A fresh one is told once per freshness lifetime at most, since the
        // others then have it fresh too.
        if key.len() > MAX_KEY_BYTES || obj.t.always_validate || obj.ttl(now_secs()) <= 0 {
            return;
        }
        let encoded = Bytes::from(redis::encode(obj));
        for i in (0..c.workers()).filter(|&i| i != self.worker) {
            let key = key.to_vec();
            let encoded = encoded.clone();
            let _ = c.post(
                i,
                Box::new(move |w| w.cache.take_freshened(&key, &encoded, max_variants)),
            );
        }
    }

    /// Runs `job` on every other worker's cache (posted, not awaited): what a validation
    /// learnt about the copies they hold. Not on the hot path.
    pub fn post_to_others(&self, job: impl Fn(&WorkerCache) + Send + Sync + 'static) {
        let Some(c) = self.control.get().filter(|c| c.workers() > 1) else {
            return;
        };
        let job = Arc::new(job);
        for i in (0..c.workers()).filter(|&i| i != self.worker) {
            let job = job.clone();
            let _ = c.post(i, Box::new(move |w| job(&w.cache)));
        }
    }

    /// Another worker's [`WorkerCache::store_freshened`]: replaces this worker's copy of the
    /// same variant unless that one was received later (seconds: one received in the same
    /// second is replaced, the freshened copy carrying the origin's latest fields); stores
    /// nothing where this worker holds none.
    fn take_freshened(&self, key: &[u8], encoded: &Bytes, max_variants: usize) {
        let Some(obj) = redis::decode(encoded) else {
            return;
        };
        let key = self.key(key);
        // A copy invalidated here and not yet looked up since is not one this worker holds.
        if self.any_invalidated.get() {
            self.drop_invalidated(key);
        }
        let older = self.map.borrow().peek(key).is_some_and(|e| {
            e.variants
                .as_slice()
                .iter()
                .any(|o| o.vary == obj.vary && o.t.response_time <= obj.t.response_time)
        });
        if older {
            self.insert_key(key, Rc::new(obj), max_variants);
        }
    }

    /// The fetch in flight for `key`, if any, joined (as a waiter would).
    pub fn flight(&self, key: &[u8]) -> Option<Rc<Flight>> {
        self.flight_at(self.key(key))
    }

    fn flight_at(&self, key: KeyRef<'_>) -> Option<Rc<Flight>> {
        let mut f = self.flights.borrow_mut();
        let slot = f.get_mut(key.hash).filter(|s| s.key == key.bytes)?;
        Some(self.join(slot))
    }

    /// The flight of `slot` for a request that waits on it (made now if the fetch has none).
    fn join(&self, slot: &mut FlightSlot) -> Rc<Flight> {
        let f = slot.flight.get_or_insert_with(|| self.spare_flight());
        f.joined.set(true);
        f.clone()
    }

    /// Starts a fetch for `key`; `None` when one is already in flight or too many are.
    pub fn begin_flight(self: &Rc<Self>, key: &[u8]) -> Option<FlightGuard> {
        self.begin_flight_at(self.key(key))
    }

    /// The fetch in flight for `key` to wait on (`Ok`), or else the start of one (`Err`, as
    /// [`WorkerCache::begin_flight`] gives it), in one look at the flights.
    pub fn join_or_begin_flight(
        self: &Rc<Self>,
        key: KeyRef<'_>,
    ) -> Result<Rc<Flight>, Option<FlightGuard>> {
        let mut f = self.flights.borrow_mut();
        match f.get_mut(key.hash) {
            // Another key under the same hash: this one fetches alone.
            Some(slot) if slot.key != key.bytes => Err(None),
            Some(slot) => Ok(self.join(slot)),
            None => Err(self.start_flight(&mut f, key)),
        }
    }

    /// The start of a fetch for `key` (`Some`, as [`WorkerCache::begin_flight`] gives it),
    /// unless a fetch is in flight under its hash (`None`: for
    /// [`WorkerCache::join_or_begin_flight`] to join, or to fetch alone when it is another
    /// key's), in one look at the flights.
    // One call per miss, the start of the fetch inlined in it (not a second call), and no look
    // through the list when it is empty. Kept out of the cache phase's code: inlined there, it
    // moves the compiler's inlining of the whole request path.
    #[inline(never)]
    pub fn begin_unless_in_flight(self: &Rc<Self>, key: KeyRef<'_>) -> Option<Option<FlightGuard>> {
        let mut f = self.flights.borrow_mut();
        if !f.is_idle() {
            // Other fetches in flight: looked through out of the usual miss's code lines (at
            // one connection, the case where those lines cost most, nothing else is in flight).
            std::hint::cold_path();
            if f.get_mut(key.hash).is_some() {
                return None;
            }
        }
        Some(self.start_flight(&mut f, key))
    }

    fn begin_flight_at(self: &Rc<Self>, key: KeyRef<'_>) -> Option<FlightGuard> {
        let mut f = self.flights.borrow_mut();
        if f.get_mut(key.hash).is_some() {
            return None;
        }
        self.start_flight(&mut f, key)
    }

    /// A fetch for `key`, which has no slot in `flights`: only its key (copied into the slot,
    /// see [`Flights::insert`]); the [`Flight`] comes when one is needed. `None` when there
    /// are [`MAX_FLIGHTS`] already.
    #[inline(always)]
    fn start_flight(self: &Rc<Self>, f: &mut Flights, key: KeyRef<'_>) -> Option<FlightGuard> {
        if f.len() >= MAX_FLIGHTS {
            std::hint::cold_path();
            return None;
        }
        f.insert(key, self);
        Some(FlightGuard {
            cache: self.clone(),
            hash: key.hash,
            end: FlightEnd::Pending,
            flight: OnceCell::new(),
        })
    }

    /// A pending flight: a spare one (reset when it was kept) or a new one.
    fn spare_flight(&self) -> Rc<Flight> {
        let spare = self.spare_flights.borrow_mut().pop();
        spare.unwrap_or_else(|| Rc::new(Flight::new()))
    }

    /// The flight of the fetch whose slot is under `hash`, made now if it has none.
    fn flight_of(&self, hash: u64) -> Rc<Flight> {
        match self.flights.borrow_mut().get_mut(hash) {
            Some(slot) => slot
                .flight
                .get_or_insert_with(|| self.spare_flight())
                .clone(),
            // Not reached: a guard's slot is there until the guard drops. A flight no
            // request can find then serves the fetch alone.
            None => self.spare_flight(),
        }
    }

    /// Keeps an ended flight for a later fetch, reset, when nothing but its guard holds it (no
    /// waiter, so no `Notified` of its `done` either), no request ever waited on it, and there
    /// is room; dropped otherwise.
    fn keep_flight(&self, f: Rc<Flight>) {
        let mut spare = self.spare_flights.borrow_mut();
        if Rc::strong_count(&f) != 1
            || Rc::weak_count(&f) != 0
            || f.joined.get()
            || spare.len() >= MAX_SPARE_FLIGHTS
        {
            return;
        }
        f.end.set(FlightEnd::Pending);
        f.keep_stream();
        f.cut.set(false);
        f.base.set(0);
        f.streaming.set(0);
        f.body_end.set(false);
        *f.body.borrow_mut() = BytesMut::new();
        *f.whole.borrow_mut() = None;
        spare.push(f);
    }

    /// Applies a purge to this worker's store; returns how many objects it hit. (It reads
    /// every stored object: for the admin API and other hosts' purges. An unsafe method's
    /// invalidation goes through [`WorkerCache::invalidate_local`] instead.)
    pub fn purge_local(&self, p: &Purge) -> u64 {
        let hit = if p.soft {
            let (mut hit, mut read) = (0u64, 0u64);
            for (_, e) in self.map.borrow().iter() {
                for o in e.variants.as_slice() {
                    read += 1;
                    if p.matches(o) {
                        o.invalid.set(true);
                        hit += 1;
                    }
                }
            }
            self.count(|s| s.purge_scanned += read);
            hit
        } else {
            self.remove_where(|o| p.matches(o))
        };
        self.count(|s| s.purged += hit);
        self.note_purge(p.clone());
        hit
    }

    /// Removes from the store every object `gone` says; returns how many.
    fn remove_where(&self, gone: impl Fn(&Object) -> bool) -> u64 {
        let (mut hit, mut read) = (0u64, 0u64);
        let mut m = self.map.borrow_mut();
        let mut keys: Vec<StoreKey> = Vec::new();
        for (k, e) in m.iter() {
            let v = e.variants.as_slice();
            read += v.len() as u64;
            let n = v.iter().filter(|o| gone(o)).count() as u64;
            if n > 0 {
                hit += n;
                keys.push(k.clone());
            }
        }
        for k in keys {
            Self::remove_variants_of(&mut m, k, &gone);
        }
        drop(m);
        self.count(|s| s.purge_scanned += read);
        hit
    }

    /// Removes the variants under the key `stored` that `gone` says.
    fn remove_variants_of(m: &mut Map, stored: StoreKey, gone: &impl Fn(&Object) -> bool) {
        let key = KeyRef {
            hash: stored.hash,
            bytes: &stored.bytes,
        };
        let Some(e) = m.peek(key) else { return };
        let variants: Vec<Rc<Object>> = e
            .variants
            .as_slice()
            .iter()
            .filter(|o| !gone(o))
            .cloned()
            .collect();
        match Variants::from_vec(variants) {
            None => {
                m.remove(key);
            }
            Some(variants) => {
                let weight = variants.weight();
                m.insert(stored, Entry { variants }, weight);
            }
        }
    }

    /// Invalidates the URL `url` here (RFC 9111 §4.4): each object of it stored before now is
    /// gone for every lookup from now on, without a read of the whole store (an unsafe request
    /// would otherwise cost a read of every stored object, on every worker). The objects go
    /// from the store when a lookup meets them, or at the next sweep: one per
    /// [`MAX_INVALIDATED`] URLs or [`MAX_INVALIDATED_BYTES`] of them.
    pub fn invalidate_local(&self, url: &[u8]) {
        let p = Purge {
            target: PurgeTarget::Url(url.to_vec()),
            soft: false,
        };
        let n = self.note_purge(p);
        let full = {
            let mut t = self.invalidated.borrow_mut();
            match t.get_mut(url) {
                Some(at) => *at = n,
                None => {
                    t.insert(url.into(), n);
                    self.invalidated_bytes
                        .set(self.invalidated_bytes.get() + url.len());
                }
            }
            t.len() >= MAX_INVALIDATED || self.invalidated_bytes.get() >= MAX_INVALIDATED_BYTES
        };
        self.any_invalidated.set(true);
        self.invalidated_lens
            .set(self.invalidated_lens.get() | 1 << (url.len() % 64));
        if full {
            self.sweep_invalidated();
        }
    }

    /// Whether `e` holds an object of a URL invalidated after it was stored (while some URL
    /// is: [`WorkerCache::any_invalidated`]).
    #[inline]
    fn holds_invalidated(&self, e: &Entry) -> bool {
        let lens = self.invalidated_lens.get();
        e.variants
            .as_slice()
            .iter()
            .any(|o| lens >> (o.url.len() % 64) & 1 == 1 && self.invalidated(o))
    }

    /// Whether `o` is of a URL invalidated after it was stored.
    fn invalidated(&self, o: &Object) -> bool {
        self.invalidated
            .borrow()
            .get(&o.url[..])
            .is_some_and(|at| *at > o.born.get())
    }

    /// Removes the invalidated objects under `key` (a lookup's, while some URL is
    /// invalidated).
    #[cold]
    #[inline(never)]
    fn drop_invalidated(&self, key: KeyRef<'_>) {
        let gone = |o: &Object| self.invalidated(o);
        let mut m = self.map.borrow_mut();
        let Some(e) = m.peek(key) else { return };
        let n = e.variants.as_slice().iter().filter(|o| gone(o)).count() as u64;
        if n == 0 {
            return;
        }
        let stored = StoreKey {
            hash: key.hash,
            bytes: key.bytes.to_vec(),
        };
        Self::remove_variants_of(&mut m, stored, &gone);
        drop(m);
        self.count(|s| s.purged += n);
    }

    /// Removes every invalidated object from the store and forgets the invalidated URLs.
    #[cold]
    #[inline(never)]
    fn sweep_invalidated(&self) {
        let hit = self.remove_where(|o| self.invalidated(o));
        self.count(|s| s.purged += hit);
        self.invalidated.borrow_mut().clear();
        self.invalidated_bytes.set(0);
        self.any_invalidated.set(false);
        self.invalidated_lens.set(0);
    }

    /// Numbers a purge or invalidation just applied and remembers it for the fetches in
    /// flight ([`WorkerCache::purged_since`]); returns its number.
    fn note_purge(&self, p: Purge) -> u64 {
        // For the fetches in flight: a response to a request sent before this purge is
        // content from before it (RFC 9111 §4.4), not to be stored as current.
        let n = self.purges.get().wrapping_add(1);
        self.purges.set(n);
        let mut recent = self.recent_purges.borrow_mut();
        if recent.len() == MAX_RECENT_PURGES {
            recent.pop_front();
        }
        recent.push_back((n, p));
        n
    }

    /// How many purges this worker has applied: what a fetch notes when it begins, for
    /// [`WorkerCache::purged_since`].
    #[inline(always)]
    pub fn purges(&self) -> u64 {
        self.purges.get()
    }

    /// Whether a purge applied since `seen` (a count from [`WorkerCache::purges`], taken
    /// before the fetch's request was sent) covers the object a fetch made: `Some(true)` for
    /// a soft purge only (the object may be stored, stale), `Some(false)` for a hard one or
    /// when the purges since `seen` are no longer all remembered (not stored).
    #[inline(always)]
    pub fn purged_since(&self, seen: u64, o: &Object) -> Option<bool> {
        if self.purges.get() == seen {
            return None;
        }
        self.purged_since_slow(seen, o)
    }

    #[cold]
    #[inline(never)]
    fn purged_since_slow(&self, seen: u64, o: &Object) -> Option<bool> {
        let recent = self.recent_purges.borrow();
        // The purge numbered `seen + 1` must still be remembered.
        if recent
            .front()
            .is_none_or(|(n, _)| *n > seen.wrapping_add(1))
        {
            return Some(false);
        }
        let mut soft = None;
        for (_, p) in recent.iter().filter(|(n, _)| *n > seen) {
            if p.matches(o) {
                if !p.soft {
                    return Some(false);
                }
                soft = Some(true);
            }
        }
        soft
    }

    /// Invalidates `url` (RFC 9111 §4.4) here ([`WorkerCache::invalidate_local`]), in Redis
    /// (and so on the other hosts), and on every other worker (posted, not waited for).
    pub fn invalidate_everywhere(&self, url: Vec<u8>) {
        let p = Purge {
            target: PurgeTarget::Url(url.clone()),
            soft: false,
        };
        let ticket = self.redis_ticket();
        self.invalidate_local(&url);
        self.note_redis_pending(ticket, &p);
        let q = p.clone();
        self.post_to_others(move |c| {
            c.invalidate_local(&url);
            c.note_redis_pending(ticket, &q);
        });
        self.purge_in_redis(&p, ticket);
    }

    /// Applies `p` here, in Redis, and posts it to every other worker (without waiting for
    /// them).
    pub fn purge_everywhere(&self, p: Purge) -> u64 {
        let ticket = self.redis_ticket();
        let n = self.purge_local(&p);
        self.note_redis_pending(ticket, &p);
        let q = p.clone();
        self.post_to_others(move |c| {
            c.purge_local(&q);
            c.note_redis_pending(ticket, &q);
        });
        self.purge_in_redis(&p, ticket);
        n
    }

    /// A ticket for a purge this worker sends to Redis, when there is a Redis layer and the
    /// workers can be told when its copies are gone there (see [`purge_in_redis`]).
    fn redis_ticket(&self) -> Option<u64> {
        let l = self.shared.get()?;
        self.control.get()?;
        Some(l.purge_ticket())
    }

    /// Notes that `p`, just applied here under `ticket`, awaits its Redis side: until that is
    /// done, an entry found in Redis that it covers may be a copy it deletes there, and is not
    /// taken ([`WorkerCache::pending_in_redis_covers`]).
    pub fn note_redis_pending(&self, ticket: Option<u64>, p: &Purge) {
        let Some(t) = ticket else { return };
        let mut q = self.redis_pending.borrow_mut();
        // One equal to a purge awaited under an earlier ticket replaces it (sent after it,
        // the later covers what it did, and more; the layer keeps the later one too, see
        // `redis::SharedLayer::keep_unsent`), so that repeated invalidations of one URL
        // while Redis is down do not push the other purges out; the earlier's settlement
        // then finds nothing.
        if let Some(i) = q.iter().position(|(k, o, _)| *k < t && **o == *p) {
            q.remove(i);
        } else if q.len() >= MAX_REDIS_PENDING {
            // The oldest goes to the floor, which covers every URL (issue 12: before, it was
            // forgotten, and its copies could come back from Redis).
            let (old, _, at) = q.remove(0);
            let mut f = self.redis_floor.borrow_mut();
            let f = f.get_or_insert_with(|| RedisFloor {
                at,
                tickets: Vec::new(),
                stuck: false,
                newest: old,
            });
            f.at = f.at.max(at);
            f.newest = f.newest.max(old);
            if f.tickets.len() < MAX_FLOOR_TICKETS {
                f.tickets.push(old);
            } else {
                f.stuck = true;
            }
        }
        q.push((t, Rc::new(p.clone()), now_secs()));
    }

    /// The purge under `ticket` is done in Redis (its copies there are gone), or given up.
    /// `logged`: the ID the purge log gave it, when this host logged it: one by prefix or of
    /// everything is then remembered at once ([`WorkerCache::wide_purges`]), not only once
    /// this host's listener reads it back from the log (another host's write of a copy from
    /// before it may land in Redis meanwhile).
    pub fn settle_redis_purge(&self, ticket: u64, logged: Option<redis::LogId>) {
        if let Some(id) = logged {
            let wide: Vec<Rc<Purge>> = self
                .redis_pending
                .borrow()
                .iter()
                .filter(|(t, p, _)| *t == ticket && p.is_wide())
                .map(|(_, p, _)| p.clone())
                .collect();
            for p in wide {
                self.remember_wide(id, p);
            }
        }
        self.redis_pending
            .borrow_mut()
            .retain(|(t, _, _)| *t != ticket);
        let mut floor = self.redis_floor.borrow_mut();
        if let Some(f) = floor.as_mut() {
            f.tickets.retain(|t| *t != ticket);
            if f.tickets.is_empty() && !f.stuck {
                *floor = None;
            }
        }
    }

    /// Every purge under a ticket below `below` is done in Redis, or given up
    /// (`redis::SharedLayer::settled_below`): they are awaited no more, here or on the floor.
    /// Sent with each settlement and again after one was lost to a full control mailbox
    /// (`redis::SharedLayer::settlement`), so that a lost settlement no longer leaves its
    /// purge, and the floor, in place until the process ends.
    pub fn settle_redis_below(&self, below: u64) {
        self.redis_pending
            .borrow_mut()
            .retain(|(t, _, _)| *t >= below);
        let mut floor = self.redis_floor.borrow_mut();
        if let Some(f) = floor.as_mut() {
            f.tickets.retain(|t| *t >= below);
            if f.tickets.is_empty() && (!f.stuck || f.newest < below) {
                *floor = None;
            }
        }
    }

    /// The purges applied here whose Redis side is not done yet, for a lookup about to be
    /// sent to Redis ([`WorkerCache::pending_in_redis_covers`]); `None` (no allocation) when
    /// there is none. Taken before the lookup is sent: a purge settled while Redis answers may
    /// have deleted the copies after Redis read the answer.
    pub fn pending_in_redis(&self) -> Option<Vec<(Rc<Purge>, u64)>> {
        let q = self.redis_pending.borrow();
        let floor = self.redis_floor.borrow();
        if q.is_empty() && floor.is_none() {
            return None;
        }
        let mut out: Vec<(Rc<Purge>, u64)> = q.iter().map(|(_, p, at)| (p.clone(), *at)).collect();
        // The floor, as a purge of everything at its time.
        if let Some(f) = floor.as_ref() {
            out.push((
                Rc::new(Purge {
                    target: PurgeTarget::All,
                    soft: false,
                }),
                f.at,
            ));
        }
        Some(out)
    }

    /// Whether `o`, found in Redis by a lookup sent while the purges `before` were awaited
    /// there ([`WorkerCache::pending_in_redis`]), is covered by one of them or by one applied
    /// here since that is still awaited, and was received before it (RFC 9111 §4.4: what a
    /// purge removed must not come back). Redis may still hold the copy the purge deletes,
    /// for a round trip, or, the link down, until the layer sends the purge again. The entry's
    /// time of receipt is from the clock of the host that fetched it:
    /// [`PURGE_CLOCK_MARGIN_SECS`] covers one a little ahead of this one. An entry received
    /// after the purge is taken.
    pub fn pending_in_redis_covers(&self, before: Option<&[(Rc<Purge>, u64)]>, o: &Object) -> bool {
        let covers = |p: &Purge, at: u64| {
            o.t.response_time <= at.saturating_add(PURGE_CLOCK_MARGIN_SECS) && p.matches(o)
        };
        before.is_some_and(|b| b.iter().any(|(p, at)| covers(p, *at)))
            || self
                .redis_pending
                .borrow()
                .iter()
                .any(|(_, p, at)| covers(p, *at))
            || self
                .redis_floor
                .borrow()
                .as_ref()
                .is_some_and(|f| o.t.response_time <= f.at.saturating_add(PURGE_CLOCK_MARGIN_SECS))
    }

    /// Moves this worker's place in the purge log (see [`redis::LogPlace`]) once it applied
    /// `p` (a purge read from the log), and remembers `p` when it is by prefix or of
    /// everything ([`WorkerCache::wide_purges`]). A gap (the log lost purges this host had
    /// not read; it purged its stores) raises the floor to the log's place: the purges lost
    /// are not known, so an entry whose writer had not reached it is refused. Where the log's
    /// IDs went back (Redis lost the log), the place, the floor and the purges remembered
    /// start again from there.
    pub fn heard_in_log(&self, place: redis::LogPlace, p: Option<&Purge>) {
        match place {
            redis::LogPlace::Entry(id) => {
                self.log_at.set(self.log_at.get().max(id));
                if let Some(p) = p.filter(|p| p.is_wide()) {
                    self.remember_wide(id, Rc::new(p.clone()));
                }
            }
            redis::LogPlace::Start(at) => self.log_at.set(self.log_at.get().max(at)),
            redis::LogPlace::Gap(at) => {
                if at < self.log_at.get() {
                    self.wide_purges.borrow_mut().clear();
                    self.wide_purge_bytes.set(0);
                    self.wide_floor.set(at);
                } else {
                    self.wide_floor.set(self.wide_floor.get().max(at));
                }
                self.log_at.set(at);
                self.reset_wide_newest();
            }
        }
    }

    /// Remembers a purge by prefix or of everything logged under `id`, in the order of the
    /// log (once, though it comes from the settlement and from the log both), pushing the
    /// oldest out to the floor past the bounds.
    fn remember_wide(&self, id: redis::LogId, p: Rc<Purge>) {
        if id < self.wide_floor.get() {
            return;
        }
        let mut q = self.wide_purges.borrow_mut();
        if q.iter().any(|(i, _)| *i == id) {
            return;
        }
        let at = q.iter().rposition(|(i, _)| *i < id).map_or(0, |i| i + 1);
        self.wide_purge_bytes
            .set(self.wide_purge_bytes.get() + p.target_len());
        q.insert(at, (id, p));
        while q.len() > MAX_WIDE_PURGES || self.wide_purge_bytes.get() > MAX_WIDE_PURGE_BYTES {
            let Some((old, p)) = q.pop_front() else { break };
            self.wide_purge_bytes
                .set(self.wide_purge_bytes.get().saturating_sub(p.target_len()));
            self.wide_floor.set(self.wide_floor.get().max(old));
        }
        drop(q);
        self.reset_wide_newest();
    }

    fn reset_wide_newest(&self) {
        let last = self.wide_purges.borrow().back().map_or((0, 0), |(i, _)| *i);
        self.wide_newest.set(last.max(self.wide_floor.get()));
    }

    /// Whether `o`, found in Redis and written by a worker at `heard` in the purge log
    /// ([`redis::Heard`]), is covered by a purge by prefix or of everything logged after that
    /// (RFC 9111 §4.4): `Some(false)` for a hard one, or an entry below the floor (refused: a
    /// miss), `Some(true)` for a soft one only (taken stale), `None` when none covers it.
    /// The writer had not applied that purge when it queued the write, which may have landed
    /// after the purge deleted the Redis copies; such a copy came back to every host until it
    /// expired. An entry of an older build says no place, and is taken as written before
    /// every purge. Free while no such purge is remembered, and for an entry written after
    /// the newest.
    #[inline(always)]
    pub fn wide_purge_covers(&self, o: &Object, heard: redis::Heard) -> Option<bool> {
        if heard >= self.wide_newest.get() {
            return None;
        }
        self.wide_purge_covers_slow(o, heard)
    }

    #[cold]
    #[inline(never)]
    fn wide_purge_covers_slow(&self, o: &Object, heard: redis::Heard) -> Option<bool> {
        if heard < self.wide_floor.get() {
            return Some(false);
        }
        let mut soft = None;
        for (_, p) in self.wide_purges.borrow().iter().filter(|(i, _)| *i > heard) {
            if p.matches(o) {
                if !p.soft {
                    return Some(false);
                }
                soft = Some(true);
            }
        }
        soft
    }

    /// [`purge_in_redis_with`] this worker's layer, when there is one.
    fn purge_in_redis(&self, p: &Purge, ticket: Option<u64>) {
        if let Some(l) = self.shared.get() {
            purge_in_redis_with(l, self.control.get().cloned(), p, ticket);
        }
    }
}

/// Deletes `p`'s copies in Redis (and publishes it to the other hosts) under `ticket`
/// ([`WorkerCache::redis_ticket`]), then tells every worker that it is done there
/// ([`WorkerCache::settle_redis_purge`]). Sent after each worker noted it as pending (posts
/// to a worker are run in order, and the answer comes after them).
fn purge_in_redis_with(
    l: &Arc<redis::SharedLayer>,
    control: Option<Arc<Control>>,
    p: &Purge,
    ticket: Option<u64>,
) {
    let done = match (control, ticket) {
        (Some(c), Some(t)) => Some(l.settlement(c, t)),
        _ => None,
    };
    l.purge(p, ticket, done);
}

/// A fetch in progress in `WorkerCache::flights`: its key (what a request that finds the
/// slot by its hash compares), and its [`Flight`] once a request joined it or it published a
/// head.
struct FlightSlot {
    key: Vec<u8>,
    flight: Option<Rc<Flight>>,
}

/// Slots a worker keeps in a short list before it uses the map: a few fetches are in flight
/// at once, usually, and a look through a few slots costs less than a hash table's insert,
/// probe and removal.
const FEW_FLIGHTS: usize = 8;

/// The fetches in flight on a worker, by their key's hash (at most one slot per hash): the
/// first [`FEW_FLIGHTS`] in a list (its room made once), the others in a map.
struct Flights {
    /// The list's slots in flight are `few[..live]`; those after are ended, kept for their
    /// key's buffer (at most [`MAX_SPARE_KEY_BYTES`]), which the next fetch writes its key
    /// into: a slot of the list is reused in place, its key buffer taken from no pool and
    /// given back to none.
    few: Vec<(u64, FlightSlot)>,
    live: usize,
    many: HashMap<u64, FlightSlot, PreHashedBuild>,
}

impl Flights {
    fn new() -> Flights {
        Flights {
            few: Vec::with_capacity(FEW_FLIGHTS),
            live: 0,
            many: HashMap::default(),
        }
    }

    fn len(&self) -> usize {
        self.live + self.many.len()
    }

    /// No fetch is in flight (the usual state when a miss begins one): nothing to look through.
    #[inline(always)]
    fn is_idle(&self) -> bool {
        self.live == 0 && self.many.is_empty()
    }

    #[inline]
    fn get_mut(&mut self, hash: u64) -> Option<&mut FlightSlot> {
        if let Some((_, s)) = self.few[..self.live].iter_mut().find(|(h, _)| *h == hash) {
            return Some(s);
        }
        if self.many.is_empty() {
            return None;
        }
        self.many.get_mut(&hash)
    }

    /// Adds the slot of `key`, whose hash has none, with a copy of its bytes: in an ended
    /// slot of the list, in a key buffer of `cache`'s ([`WorkerCache::key_buf`]) otherwise.
    #[inline(always)]
    fn insert(&mut self, key: KeyRef<'_>, cache: &WorkerCache) {
        debug_assert!(self.get_mut(key.hash).is_none(), "one slot per hash");
        if let Some((h, s)) = self.few.get_mut(self.live) {
            *h = key.hash;
            s.key.clear();
            s.key.extend_from_slice(key.bytes);
            // An ended slot's flight was taken when it ended ([`Flights::remove`]).
            debug_assert!(s.flight.is_none(), "an ended slot holds no flight");
            self.live += 1;
            return;
        }
        self.insert_new(key, cache);
    }

    /// [`Flights::insert`] past the ended slots of the list: a new slot (out of line, once per
    /// slot of the list and for the fetches past it).
    #[inline(never)]
    fn insert_new(&mut self, key: KeyRef<'_>, cache: &WorkerCache) {
        let mut k = cache.key_buf();
        k.extend_from_slice(key.bytes);
        let slot = FlightSlot {
            key: k,
            flight: None,
        };
        if self.few.len() < FEW_FLIGHTS {
            self.few.push((key.hash, slot));
            self.live += 1;
        } else {
            self.many.insert(key.hash, slot);
        }
    }

    /// Ends the slot of `hash`: `None` when it has none, else its flight, if one was made. A
    /// slot of the list keeps its key buffer (one past [`MAX_SPARE_KEY_BYTES`] is freed); a
    /// slot of the map gives it back to `cache`.
    #[inline(always)]
    fn remove(&mut self, hash: u64, cache: &WorkerCache) -> Option<Option<Rc<Flight>>> {
        // The slot last begun, usually the only one in flight: ended where it is.
        if let Some(last) = self.live.checked_sub(1) {
            if let Some((h, s)) = self.few.get_mut(last) {
                if *h == hash {
                    self.live = last;
                    if s.key.capacity() > MAX_SPARE_KEY_BYTES {
                        std::hint::cold_path();
                        s.key = Vec::new();
                    }
                    return Some(s.flight.take());
                }
            }
        }
        self.remove_other(hash, cache)
    }

    /// [`Flights::remove`] of a slot other than the list's last in flight (out of line).
    #[inline(never)]
    fn remove_other(&mut self, hash: u64, cache: &WorkerCache) -> Option<Option<Rc<Flight>>> {
        if let Some(i) = self.few[..self.live].iter().position(|(h, _)| *h == hash) {
            self.live -= 1;
            // The slots in flight stay first.
            if i != self.live {
                self.few.swap(i, self.live);
            }
            let s = &mut self.few[self.live].1;
            if s.key.capacity() > MAX_SPARE_KEY_BYTES {
                s.key = Vec::new();
            }
            return Some(s.flight.take());
        }
        if self.many.is_empty() {
            return None;
        }
        let s = self.many.remove(&hash)?;
        cache.give_key_buf(s.key);
        Some(s.flight)
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Held by the request that fetches for a key; dropping it (done, failed or cancelled) ends
/// the flight and wakes the waiters.
pub struct FlightGuard {
    cache: Rc<WorkerCache>,
    /// The key's hash, where the fetch's slot is in `flights`.
    hash: u64,
    /// How the fetch ended ([`FlightGuard::finish`]); `Pending` until then, `Failed` when the
    /// guard drops without it.
    end: FlightEnd,
    /// The flight, once this guard asked for it ([`FlightGuard::flight`]).
    flight: OnceCell<Rc<Flight>>,
}

impl FlightGuard {
    /// Ends the fetch as `end` says (the guard's drop tells the waiters).
    // Inlined: a store and the drop's call, not a call of its own (once per stored miss).
    #[inline]
    pub fn finish(mut self, end: FlightEnd) {
        self.end = end;
    }

    /// The flight, to publish to (made now if no request joined the fetch yet: the one that
    /// later joiners find).
    pub fn flight(&self) -> &Rc<Flight> {
        self.flight.get_or_init(|| self.cache.flight_of(self.hash))
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let made = self
            .cache
            .flights
            .borrow_mut()
            .remove(self.hash, &self.cache)
            .flatten();
        if made.is_none() && self.flight.get().is_none() {
            // No one joined and nothing was published: no one to tell (the usual miss).
            return;
        }
        self.tell(made);
    }
}

impl FlightGuard {
    /// Ends the flight a request joined or a head was published to (`made`, the slot's, is
    /// the guard's own when both are there): its waiters are told how the fetch ended. Out of
    /// line: the usual miss has no flight, and its guard's drop stays small.
    #[inline(never)]
    fn tell(&mut self, made: Option<Rc<Flight>>) {
        // The guard's and the slot's are the same flight, if any.
        let Some(f) = self.flight.take().or(made) else {
            return;
        };
        f.end.set(match self.end {
            FlightEnd::Pending => FlightEnd::Failed,
            e => e,
        });
        f.done.notify_all();
        self.cache.keep_flight(f);
    }
}

/// What a purge removes (hard) or marks stale (soft).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurgeTarget {
    /// One URL: host and path with its query, as in `Host` + request-target (all variants).
    Url(Vec<u8>),
    /// Every URL that starts with this (host and path prefix).
    Prefix(Vec<u8>),
    /// Every object tagged with this surrogate key.
    Tag(Vec<u8>),
    /// Everything.
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purge {
    pub target: PurgeTarget,
    /// Mark stale instead of removing.
    pub soft: bool,
}

impl Purge {
    /// By prefix or of everything: its copies in Redis are not deleted again by the hosts
    /// that hear it ([`WorkerCache::wide_purges`]).
    fn is_wide(&self) -> bool {
        matches!(self.target, PurgeTarget::Prefix(_) | PurgeTarget::All)
    }

    /// The bytes of its URL, prefix or tag.
    fn target_len(&self) -> usize {
        match &self.target {
            PurgeTarget::Url(b) | PurgeTarget::Prefix(b) | PurgeTarget::Tag(b) => b.len(),
            PurgeTarget::All => 0,
        }
    }

    fn matches(&self, o: &Object) -> bool {
        match &self.target {
            PurgeTarget::Url(u) => *o.url == u[..],
            PurgeTarget::Prefix(p) => o.url.starts_with(p),
            PurgeTarget::Tag(t) => o.tags.iter().any(|x| **x == t[..]),
            PurgeTarget::All => true,
        }
    }
}

/// A URL for a purge from its parts: the host (lower-cased; the scheme not being known, the
/// port 80 or 443 counts as a default one, see [`key_host`]) and the path with its query.
pub fn purge_url(host: &str, path_query: &str) -> Vec<u8> {
    purge_url_in(None, host, path_query)
}

/// The URLs a purge of `host` and `path_query` names when its scheme is not given (the admin
/// API's `url=` and `prefix=` without one): a port that is one scheme's default is an origin
/// of its own for the other (RFC 9110 §4.2.3), so `a.test:443` is `https://a.test` (keyed
/// `a.test`) or `http://a.test:443` (keyed `a.test:443`), and both are named; any other
/// spelling names one URL.
pub fn purge_urls(host: &str, path_query: &str) -> Vec<Vec<u8>> {
    let http = purge_url_in(Some(false), host, path_query);
    let https = purge_url_in(Some(true), host, path_query);
    if http == https {
        vec![http]
    } else {
        vec![http, https]
    }
}

/// [`purge_url`] for a URL of a known scheme (`Some(true)`: https), whose default port alone
/// is left out.
pub fn purge_url_in(https: Option<bool>, host: &str, path_query: &str) -> Vec<u8> {
    let (name, port) = split_host(host.as_bytes(), https);
    let mut u: Vec<u8> = name.iter().map(u8::to_ascii_lowercase).collect();
    u.extend_from_slice(port);
    if !path_query.starts_with('/') {
        u.push(b'/');
    }
    u.extend_from_slice(path_query.as_bytes());
    u
}

/// Runs a purge on every worker of a gateway (for the admin API) and returns the number of
/// objects it hit on each, in worker order.
///
/// With `[cache.redis]`, every worker applies it first and notes it as pending in Redis, then
/// the Redis copies are deleted: a worker's lookup in Redis sent in between does not take
/// back a copy the purge covers ([`WorkerCache::pending_in_redis_covers`]). A purge whose
/// Redis side fails (the link down) stays pending on every worker until the layer has sent
/// it again ([`redis::SharedLayer::purge`]). Before, worker 0
/// deleted them while the others purged on their own, and a worker that purged first could
/// find the copy still in Redis and store it again.
pub fn purge(control: &Arc<Control>, p: Purge, limit: Duration) -> Result<Vec<u64>, ControlError> {
    // The layer (worker 0's: one for every worker), and one ticket for every worker.
    let layer = control
        .ask(limit, |w| {
            (w.id == 0).then(|| w.cache.shared().cloned()).flatten()
        })?
        .into_iter()
        .flatten()
        .next();
    let ticket = layer.as_ref().map(|l| l.purge_ticket());
    let q = p.clone();
    let applied = control.ask(limit, move |w| {
        let n = w.cache.purge_local(&q);
        w.cache.note_redis_pending(ticket, &q);
        n
    });
    // Also when a worker did not answer in time: the Redis copies go all the same (a worker
    // that has not applied it yet notes it pending when it does; the settlement, posted
    // after, finds it noted).
    if let Some(l) = layer {
        purge_in_redis_with(&l, Some(control.clone()), &p, ticket);
    }
    applied
}

/// Every worker's cache counters, in worker order.
pub fn stats(control: &Control, limit: Duration) -> Result<Vec<CacheStats>, ControlError> {
    control.ask(limit, |w| w.cache.stats())
}

/// Surrogate keys of a response (`Surrogate-Key`, space-separated), bounded.
pub fn surrogate_keys(fields: FieldsRef<'_>) -> Vec<Box<[u8]>> {
    policy::fields(fields, b"surrogate-key")
        .flat_map(|v| v.split(|b| *b == b' ' || *b == b'\t'))
        .filter(|t| !t.is_empty())
        .take(MAX_TAGS)
        .map(|t| t.into())
        .collect()
}

/// What the client half of a response relay captures for the store: the body's data bytes
/// (no framing), up to `max`; past it the capture is dropped and `over` set. With a flight,
/// the bytes go into it, and its waiters are woken as they arrive.
pub struct Tee {
    buf: BytesMut,
    len: usize,
    pub max: usize,
    pub over: bool,
    /// The client went away part way and the body was still read to its end for the store
    /// and the waiters (see [`Tee::wants_rest`]).
    pub drained: bool,
    flight: Option<Rc<Flight>>,
    /// What the capture holds against the worker's in-flight bound (grown as the body
    /// arrives past it; given back when the capture is dropped or finished).
    charge: Charge,
}

impl Tee {
    /// A capture into `buf` (empty; its spare capacity is the room the body is expected to
    /// take, possibly in an allocation that holds other parts of the object too), holding
    /// `charge` against the worker's in-flight bound (at least that room).
    pub fn with_buf(max: usize, buf: BytesMut, flight: Option<Rc<Flight>>, charge: Charge) -> Tee {
        let buf = match &flight {
            Some(f) => {
                *f.body.borrow_mut() = buf;
                BytesMut::new()
            }
            None => buf,
        };
        Tee {
            buf,
            len: 0,
            max,
            over: false,
            drained: false,
            flight,
            charge,
        }
    }

    /// Whether the rest of the body is still wanted when the client that fetches it goes
    /// away: while the capture may still be stored, or waiters stream it (one client's
    /// disconnect must not cut the others' responses).
    pub fn wants_rest(&self) -> bool {
        !self.over || self.flight.as_ref().is_some_and(|f| f.streaming.get() > 0)
    }

    /// The body arrived whole: past the cut, the waiters streaming it may end their answers
    /// (a stored body tells them by the flight's `Stored` end).
    pub fn body_ended(&self) {
        if let Some(f) = self.flight.as_ref().filter(|_| self.over) {
            f.body_end.set(true);
        }
    }

    #[inline]
    pub fn push(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.over {
            if let Some(f) = &self.flight {
                f.past_cut(data, self.max);
            }
            return;
        }
        let len = self.len.saturating_add(data.len());
        let room = len as u64 > self.charge.n;
        if len > self.max || (room && !self.charge.grow(len as u64 - self.charge.n)) {
            // Past the object bound, or past the worker's in-flight bound: not stored.
            self.over = true;
            self.buf = BytesMut::new();
            self.charge.release();
            if let Some(f) = &self.flight {
                // Not stored: no new waiter starts on it (those waiting for its head go
                // upstream themselves), and those streaming it go on through the window.
                *f.stream.borrow_mut() = None;
                f.cut.set(true);
                f.past_cut(data, self.max);
            }
            return;
        }
        self.len += data.len();
        match &self.flight {
            Some(f) => {
                f.body.borrow_mut().extend_from_slice(data);
                f.done.notify_all();
            }
            None => self.buf.extend_from_slice(data),
        }
    }

    /// The captured body (for a flight, also kept there for its waiters).
    pub fn finish(self) -> Bytes {
        match self.flight {
            Some(f) => {
                let b = std::mem::take(&mut *f.body.borrow_mut()).freeze();
                *f.whole.borrow_mut() = Some(b.clone());
                b
            }
            None => self.buf.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::{parse_request, Limits};

    fn head(raw: &str) -> RequestHead {
        let mut h = RequestHead::default();
        let n = parse_request(raw.as_bytes(), &Limits::default(), &mut h)
            .expect("valid head")
            .expect("complete head");
        assert_eq!(n, raw.len());
        h.raw = Bytes::copy_from_slice(raw.as_bytes());
        h
    }

    /// RFC 9110 §4.2.3, RFC 3986 §6.2.3: the scheme's default port and an empty port key as
    /// no port; others, and the other scheme's default, stay.
    #[test]
    fn key_host_leaves_out_the_scheme_s_default_port() {
        let k = |h: &str, https| {
            let (n, p) = key_host(h.as_bytes(), https);
            format!(
                "{}|{}",
                String::from_utf8_lossy(&n),
                String::from_utf8_lossy(p)
            )
        };
        for (h, https, want) in [
            ("a.test", false, "a.test|"),
            ("a.test:80", false, "a.test|"),
            ("a.test:", false, "a.test|"),
            ("a.test:0080", false, "a.test|"),
            ("a.test.:80", false, "a.test|"),
            ("a.test:443", false, "a.test|:443"),
            ("a.test:443", true, "a.test|"),
            ("a.test:80", true, "a.test|:80"),
            ("a.test:8080", false, "a.test|:8080"),
            ("a.test:0", false, "a.test|:0"),
            ("a.test:800", false, "a.test|:800"),
            ("[::1]:80", false, "[::1]|"),
            ("[::1]:443", false, "[::1]|:443"),
            ("[::1]", false, "[::1]|"),
            // RFC 5952 §4, as routing reads a literal.
            ("[0:0:0:0:0:0:0:1]:80", false, "[::1]|"),
            ("[0::1]:8080", false, "[::1]|:8080"),
            ("[2001:DB8::A]", true, "[2001:db8::a]|"),
            ("[not-an-address]", false, "[not-an-address]|"),
        ] {
            assert_eq!(k(h, https), want, "{h} https={https}");
            // The scheme moves the key exactly when the two schemes key the host apart.
            assert_eq!(
                scheme_moves_port(h.as_bytes()),
                k(h, true) != k(h, false),
                "{h}"
            );
        }
        assert_eq!(purge_url("A.test:443", "/x"), b"a.test/x");
        assert_eq!(purge_url("a.test:80", "/x"), b"a.test/x");
        assert_eq!(
            purge_url_in(Some(false), "a.test:443", "/x"),
            b"a.test:443/x"
        );
        // Without a scheme, a port that is either default names both origins it may be.
        assert_eq!(
            purge_urls("A.test:443", "/x"),
            [b"a.test:443/x".to_vec(), b"a.test/x".to_vec()]
        );
        assert_eq!(
            purge_urls("a.test:80", "/x"),
            [b"a.test/x".to_vec(), b"a.test:80/x".to_vec()]
        );
        assert_eq!(purge_urls("a.test:8080", "/x"), [b"a.test:8080/x".to_vec()]);
        assert_eq!(purge_urls("a.test", "/x"), [b"a.test/x".to_vec()]);
        for (raw, want) in [
            ("GET /x HTTP/1.1\r\nHost: a.test:80\r\n\r\n", "a.test/x"),
            (
                "GET http://a.test:80/x HTTP/1.1\r\nHost: a\r\n\r\n",
                "a.test/x",
            ),
            (
                "GET https://a.test:443/x HTTP/1.1\r\nHost: a\r\n\r\n",
                "a.test/x",
            ),
            (
                "GET https://a.test:80/x HTTP/1.1\r\nHost: a\r\n\r\n",
                "a.test:80/x",
            ),
        ] {
            let mut u = Vec::new();
            url_of(&head(raw), &mut u);
            assert_eq!(String::from_utf8_lossy(&u), want, "{raw:?}");
        }
    }

    /// RFC 9111 §4.1: an identity header's Vary value is the one sent upstream, exactly (a
    /// subject's escaped `\,` is not a list separator), or absent; the client's copy of it
    /// never counts; other fields are the client's.
    #[test]
    fn vary_values_of_identity_headers_are_those_sent_upstream() {
        let h = head(
            "GET / HTTP/1.1\r\nHost: h\r\nX-Consumer: alice\r\nX-Subject: CN=x\r\nAccept: a\r\n\r\n",
        );
        let identity: Box<[Box<[u8]>]> = [b"x-subject"[..].into(), b"x-consumer"[..].into()].into();
        let rules = HeaderRules {
            remove: identity.clone(),
            identity,
            ..HeaderRules::default()
        };
        let sent = |lines: &'static [u8], cert: Option<&'static [u8]>| Sent {
            rules: &rules,
            lines,
            cert: cert.map(|c| (&b"x-subject"[..], c)),
            ..Sent::plain(&h)
        };
        let none = sent(b"", None);
        assert_eq!(none.vary_value(b"x-consumer"), policy::VARY_ABSENT);
        assert_eq!(none.vary_value(b"x-subject"), policy::VARY_ABSENT);
        assert_eq!(none.vary_value(b"accept"), b"a");
        let bob = sent(b"x-user: 7\r\nx-consumer: bob\r\n", Some(b"CN=a\\, b"));
        assert_eq!(bob.vary_value(b"x-consumer"), b"bob");
        assert_eq!(bob.vary_value(b"X-Subject"), b"CN=a\\, b");
        let other = sent(b"", Some(b"CN=a\\,b"));
        assert_ne!(other.vary_value(b"x-subject"), bob.vary_value(b"x-subject"));
        // Plain: no identity headers, the client's fields as they are.
        assert_eq!(Sent::plain(&h).vary_value(b"x-consumer"), b"alice");
    }

    /// RFC 9111 §4.1: a header the route's `request_headers` touch has the value the gateway
    /// sends: a `set` one's alone, none for a removed one, the client's lines then the added
    /// ones for an `add`; other fields are the client's.
    #[test]
    fn vary_values_of_headers_the_route_rewrites_are_those_sent_upstream() {
        let h = head("GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\nX-D: 4\r\n\r\n");
        let pair = |n: &str, v: &str| (n.as_bytes().into(), v.as_bytes().into());
        let rules = HeaderRules {
            set: [pair("x-a", "set")].into(),
            add: [pair("x-c", "more"), pair("x-e", "new")].into(),
            remove: [b"x-b"[..].into()].into(),
            ..HeaderRules::default()
        };
        let sent = Sent {
            rules: &rules,
            ..Sent::plain(&h)
        };
        assert_eq!(sent.vary_value(b"x-a"), b"set");
        assert_eq!(sent.vary_value(b"X-B"), policy::VARY_ABSENT);
        assert_eq!(sent.vary_value(b"x-c"), b"3, more");
        assert_eq!(sent.vary_value(b"x-d"), b"4");
        assert_eq!(sent.vary_value(b"x-e"), b"new");
    }

    /// `prefetch` asks for each line the bytes touch once, in order from the first, whatever
    /// their alignment and length (every remainder of the four-at-a-time steps), and for no
    /// more than `MAX_PREFETCH_LINES`.
    #[test]
    fn prefetch_asks_for_each_line_of_the_bytes_once() {
        let max = MAX_PREFETCH_LINES * 64;
        for base in [0usize, 1 << 20, usize::MAX - max - 256] {
            for off in [0usize, 1, 31, 63, 64, 65, 127] {
                for len in (0..=max + 130).chain([usize::MAX - base]) {
                    let p = base + off;
                    let mut got = Vec::new();
                    lines_of(p, len, |a| got.push(a));
                    let first = p / 64 * 64;
                    let last = p.saturating_add(len).saturating_sub(1).max(p) / 64 * 64;
                    let n = ((last - first) / 64 + 1).min(MAX_PREFETCH_LINES);
                    let want: Vec<usize> = (0..n).map(|i| first + i * 64).collect();
                    // (A length of 0 at an unaligned address still names its line; at an
                    // aligned one, none.)
                    let want = if len == 0 && p % 64 == 0 {
                        Vec::new()
                    } else {
                        want
                    };
                    assert_eq!(got, want, "p {p:#x} len {len}");
                }
            }
        }
    }

    /// `push_lower` writes what a byte-by-byte lower-casing writes, after what was there, for
    /// every length around the word's (shorter, whole words, a remainder) and every byte at
    /// every place.
    #[test]
    fn push_lower_lowercases_ascii_and_keeps_other_bytes() {
        for len in 0..=40usize {
            for b in 0..=255u8 {
                for at in [0, len / 2, len.saturating_sub(1)] {
                    let mut s: Vec<u8> = (0..len).map(|i| b"aZ.-9@[`{\x80"[i % 10]).collect();
                    if at < len {
                        s[at] = b;
                    }
                    let mut out = b"u".to_vec();
                    push_lower(&mut out, &s);
                    let mut want = b"u".to_vec();
                    want.extend(s.iter().map(u8::to_ascii_lowercase));
                    assert_eq!(out, want, "len {len}, byte {b:#x} at {at}");
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn push_lower_matches_to_ascii_lowercase(
            s in proptest::collection::vec(proptest::num::u8::ANY, 0..100)
        ) {
            let mut out = Vec::new();
            push_lower(&mut out, &s);
            proptest::prop_assert_eq!(out, s.to_ascii_lowercase());
        }
    }

    /// The key as `build_key` wrote it before it took the query from the parsed spans: the
    /// query found by a scan, path and query copied apart.
    fn reference_key(p: &RoutePolicy, head: &RequestHead, consumer: Option<&[u8]>) -> Vec<u8> {
        let mut out = p.key_start.to_vec();
        let (host, port) = if p.ignore_host {
            (Cow::Borrowed(&b""[..]), &b""[..])
        } else {
            key_host(head.host_bytes().unwrap_or(b""), head.https)
        };
        out.extend(host.iter().map(u8::to_ascii_lowercase));
        out.extend_from_slice(port);
        out.push(0);
        out.extend_from_slice(head.path_bytes());
        let pq = head.bytes(head.path_query);
        let query = pq
            .iter()
            .position(|b| *b == b'?')
            .map_or(&b""[..], |i| &pq[i + 1..]);
        match &p.query {
            QueryMode::None => {}
            QueryMode::All => {
                if !query.is_empty() {
                    out.push(b'?');
                    out.extend_from_slice(query);
                }
            }
            QueryMode::Only(keep) => {
                let mut params: Vec<&[u8]> = query
                    .split(|b| *b == b'&')
                    .filter(|kv| {
                        keep.iter()
                            .any(|k| kv.split(|b| *b == b'=').next() == Some(k))
                    })
                    .collect();
                params.sort();
                for (i, kv) in params.iter().enumerate() {
                    out.push(if i == 0 { b'?' } else { b'&' });
                    out.extend_from_slice(kv);
                }
            }
        }
        for h in &p.key_headers {
            out.push(0);
            out.extend_from_slice(h);
            out.push(b'=');
            // In the form Vary compares (absent as `VARY_ABSENT`).
            out.extend_from_slice(&policy::vary_value(h, &mut head.header_values(h)));
        }
        if let Some(c) = consumer {
            out.push(0);
            out.push(b'c');
            out.extend_from_slice(c);
        }
        out
    }

    #[test]
    fn build_key_writes_host_path_query_headers_and_consumer() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\ncache = { enabled = true }\n";
        let cfg = Config::parse(src, "t.toml").expect("config");
        let base = RoutePolicy::compile(&cfg, &cfg.routes[0], "t").expect("a cache route");
        let mut policies = Vec::new();
        for query in [
            QueryMode::All,
            QueryMode::None,
            QueryMode::Only(vec![b"a".to_vec().into(), b"z".to_vec().into()]),
        ] {
            for ignore_host in [false, true] {
                for headers in [vec![], vec![b"accept".to_vec().into()]] {
                    let mut p = (*base).clone();
                    p.query = query.clone();
                    p.ignore_host = ignore_host;
                    p.key_headers = headers;
                    policies.push(p);
                }
            }
        }
        let heads = [
            "GET /a/b HTTP/1.1\r\nHost: Example.COM\r\n\r\n",
            "GET /a/b?z=1&a=2&b HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "GET /a? HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a?? HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /?a HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept:  b \r\n\r\n",
            "GET http://Other.example?a=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
            "GET http://h/p/q?a=1&z HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET http://h HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /p HTTP/1.0\r\n\r\n",
        ];
        let mut out = Vec::new();
        for raw in heads {
            let h = head(raw);
            for p in &policies {
                for consumer in [None, Some(&b"alice"[..])] {
                    build_key(p, &Sent::plain(&h), consumer, &mut out);
                    assert_eq!(
                        String::from_utf8_lossy(&out),
                        String::from_utf8_lossy(&reference_key(p, &h, consumer)),
                        "{raw:?} {:?} ignore_host={}",
                        p.query,
                        p.ignore_host
                    );
                }
            }
        }
        // Spot checks of what the key is.
        let h = head(heads[1]);
        build_key(&base, &Sent::plain(&h), None, &mut out);
        // The route's name first (`t`, after its length).
        assert_eq!(&out[..], b"u\0\0\0\x01texample.com\0/a/b?z=1&a=2&b");
        let h = head(heads[5]);
        build_key(&base, &Sent::plain(&h), None, &mut out);
        assert_eq!(&out[..], b"u\0\0\0\x01tother.example\0/?a=1");
    }

    #[test]
    fn url_parts_write_what_url_of_writes_and_measure_it() {
        for raw in [
            "GET /a/b?c=1&d HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /p HTTP/1.0\r\n\r\n",
            "GET http://Other.example/q?x HTTP/1.1\r\nHost: other.example\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let h = head(raw);
            let mut want = Vec::new();
            url_of(&h, &mut want);
            // Appended after what the buffer already holds, as for a stored object's head.
            let mut got = BytesMut::from(&b"head"[..]);
            UrlParts::of(&h).put(&mut got);
            assert_eq!(&got[..4], b"head", "{raw:?}");
            assert_eq!(&got[4..], &want[..], "{raw:?}");
            assert_eq!(UrlParts::of(&h).out_len(), want.len(), "{raw:?}");
        }
    }

    fn stream() -> FlightStream {
        FlightStream {
            status: 200,
            reason: Bytes::from_static(b"OK"),
            fields: Fields::from_pairs([(&b"etag"[..], &b"\"a\""[..])]).expect("fits"),
            len: Some(3),
            t: Timing::default(),
            vary: vec![(b"accept"[..].into(), b"text/html".to_vec())],
        }
    }

    #[test]
    fn take_stream_gives_back_what_was_published_even_while_a_waiter_streams_it() {
        let f = Flight::new();
        assert!(f.take_stream().is_none());
        f.publish(stream());
        let first = f.stream.borrow().as_ref().map(Rc::as_ptr);
        let back = f.take_stream().expect("published");
        assert_eq!(back.fields, stream().fields);
        assert_eq!(back.vary, stream().vary);
        assert!(
            f.stream.borrow().is_none(),
            "taken, not left to later waiters"
        );
        // The next publish reuses the stream's allocation.
        f.publish(stream());
        assert_eq!(f.stream.borrow().as_ref().map(Rc::as_ptr), first);
        assert_eq!(f.take_stream().expect("published").fields, stream().fields);
        // A waiter holding the stream keeps its own; the fetch gets a copy.
        f.publish(stream());
        let held = f.stream.borrow().clone().expect("published");
        let back = f.take_stream().expect("published");
        assert_eq!(back.fields, held.fields);
        assert_eq!(back.vary, held.vary);
        assert_eq!(back.len, Some(3));
    }

    fn object(body: &'static [u8]) -> Rc<Object> {
        Rc::new(Object {
            status: 200,
            reason: Bytes::new(),
            fields: Fields::default(),
            body: Bytes::from_static(body),
            t: Timing::default(),
            url: Bytes::from_static(b"h/p"),
            tags: Vec::new(),
            vary: Vec::new(),
            invalid: Cell::new(false),
            born: Cell::new(0),
        })
    }

    #[test]
    fn variants_keep_their_order_and_are_never_empty() {
        assert!(Variants::from_vec(Vec::new()).is_none());
        let (a, b) = (object(b"a"), object(b"bb"));
        let one = Variants::from_vec(vec![a.clone()]).expect("one");
        assert!(matches!(one, Variants::One(_)));
        assert!(Rc::ptr_eq(&one.as_slice()[0], &a));
        assert_eq!(one.weight(), a.weight());
        let two = Variants::from_vec(vec![b.clone(), a.clone()]).expect("two");
        let s = two.as_slice();
        assert_eq!(s.len(), 2);
        assert!(Rc::ptr_eq(&s[0], &b) && Rc::ptr_eq(&s[1], &a));
        assert_eq!(two.weight(), a.weight() + b.weight());
    }

    #[test]
    fn a_key_keeps_its_variants_newest_first_up_to_the_cap() {
        let c = worker_cache();
        let varying = |body: &'static [u8], lang: &[u8]| {
            let mut o = object(body);
            Rc::get_mut(&mut o).expect("new").vary =
                vec![(b"accept-language".to_vec().into(), lang.to_vec())];
            o
        };
        let (en, fr, de) = (
            varying(b"en", b"en"),
            varying(b"fr", b"fr"),
            varying(b"de", b"de"),
        );
        let bodies = |c: &WorkerCache| -> Vec<Bytes> {
            c.get(b"k")
                .unwrap_or_default()
                .iter()
                .map(|o| o.body.clone())
                .collect()
        };
        c.insert(b"k", en.clone(), 2);
        assert_eq!(bodies(&c), [&b"en"[..]]);
        c.insert(b"k", fr.clone(), 2);
        assert_eq!(bodies(&c), [&b"fr"[..], b"en"]);
        // Past the cap the oldest goes.
        c.insert(b"k", de.clone(), 2);
        assert_eq!(bodies(&c), [&b"de"[..], b"fr"]);
        // The same Vary values replace their variant, which becomes the newest.
        let fr2 = varying(b"fr2", b"fr");
        c.insert(b"k", fr2, 2);
        assert_eq!(bodies(&c), [&b"fr2"[..], b"de"]);
        // The weight is that of what is stored (key, both variants), nothing left over.
        let stats = c.stats();
        assert_eq!(stats.entries, 1);
        let held = c.get(b"k").expect("stored");
        let weight: u64 = held.iter().map(|o| o.weight()).sum();
        let key_cap = c
            .map
            .borrow()
            .iter()
            .map(|(k, _)| k.bytes.capacity())
            .sum::<usize>();
        assert_eq!(stats.bytes, weight + key_cap as u64);
        // One variant allowed: the newest alone.
        c.insert(b"k", en.clone(), 1);
        assert_eq!(bodies(&c), [&b"en"[..]]);
        // Another key is left alone.
        c.insert(b"j", fr.clone(), 2);
        assert_eq!(bodies(&c), [&b"en"[..]]);
        assert_eq!(c.stats().entries, 2);
    }

    /// An object of the URL `url` with body `body`, received at `at`.
    fn url_obj(url: &'static [u8], body: &'static [u8], at: u64) -> Object {
        Object {
            status: 200,
            body: Bytes::from_static(body),
            url: Bytes::from_static(url),
            t: Timing {
                response_time: at,
                ..Timing::default()
            },
            ..Object::default()
        }
    }

    /// RFC 9111 §4.4: an entry found in Redis whose writer had not applied a purge by prefix
    /// or of everything that covers it (its place in the log before the purge's ID) is
    /// refused after a hard one and taken stale after a soft one; one written after, or of
    /// another URL, is taken. An entry of an older build (no place) counts as before every
    /// purge. The purges remembered are bounded: the oldest pushed out raises a floor below
    /// which every entry is refused. A gap raises it too; a log whose IDs went back starts
    /// again from there.
    #[test]
    fn wide_purges_heard_refuse_the_entries_written_before_them() {
        use redis::LogPlace;
        let c = worker_cache();
        let o = url_obj(b"h/a/p", b"x", 1);
        let other = url_obj(b"h/b/p", b"x", 1);
        // Nothing remembered: nothing covered, old builds' entries included.
        assert_eq!(c.wide_purge_covers(&o, (0, 0)), None);
        c.heard_in_log(LogPlace::Start((50, 0)), None);
        assert_eq!(c.log_at.get(), (50, 0));
        let prefix = |soft| Purge {
            target: PurgeTarget::Prefix(b"h/a/".to_vec()),
            soft,
        };
        c.heard_in_log(LogPlace::Entry((100, 0)), Some(&prefix(false)));
        assert_eq!(c.log_at.get(), (100, 0));
        assert_eq!(c.wide_purge_covers(&o, (99, 5)), Some(false));
        assert_eq!(c.wide_purge_covers(&o, (0, 0)), Some(false));
        assert_eq!(c.wide_purge_covers(&o, (100, 0)), None);
        assert_eq!(c.wide_purge_covers(&other, (99, 0)), None);
        // A soft one marks stale; a hard one after it still refuses.
        c.heard_in_log(LogPlace::Entry((110, 0)), Some(&prefix(true)));
        assert_eq!(c.wide_purge_covers(&o, (105, 0)), Some(true));
        assert_eq!(c.wide_purge_covers(&o, (99, 0)), Some(false));
        // A purge by URL moves the place only; one heard twice is remembered once.
        c.heard_in_log(
            LogPlace::Entry((120, 0)),
            Some(&Purge {
                target: PurgeTarget::Url(b"h/b/p".to_vec()),
                soft: false,
            }),
        );
        assert_eq!(c.log_at.get(), (120, 0));
        assert_eq!(c.wide_purge_covers(&other, (0, 0)), None);
        c.heard_in_log(LogPlace::Entry((110, 0)), Some(&prefix(true)));
        assert_eq!(c.wide_purges.borrow().len(), 2);
        // This host's own purge of everything, remembered at its settlement, in log order.
        let all = Purge {
            target: PurgeTarget::All,
            soft: false,
        };
        c.note_redis_pending(Some(9), &all);
        c.settle_redis_purge(9, Some((105, 3)));
        assert_eq!(c.wide_purge_covers(&other, (105, 2)), Some(false));
        assert_eq!(c.wide_purge_covers(&other, (105, 3)), None);
        let ids: Vec<_> = c.wide_purges.borrow().iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, vec![(100, 0), (105, 3), (110, 0)]);
        // Bounded: past it the oldest go to the floor.
        for i in 0..MAX_WIDE_PURGES as u64 {
            let p = Purge {
                target: PurgeTarget::Prefix(format!("h/z{i}/").into_bytes()),
                soft: false,
            };
            c.heard_in_log(LogPlace::Entry((200 + i, 0)), Some(&p));
        }
        assert_eq!(c.wide_purges.borrow().len(), MAX_WIDE_PURGES);
        assert_eq!(c.wide_floor.get(), (110, 0));
        assert_eq!(c.wide_purge_covers(&other, (109, 0)), Some(false));
        assert_eq!(c.wide_purge_covers(&other, (110, 0)), None);
        assert_eq!(c.wide_purge_covers(&other, (500, 0)), None);
        // A gap: the floor goes to the log's place.
        c.heard_in_log(LogPlace::Gap((1000, 0)), Some(&all));
        assert_eq!(c.wide_purge_covers(&other, (999, 0)), Some(false));
        assert_eq!(c.wide_purge_covers(&other, (1000, 0)), None);
        // The log's IDs went back (Redis lost it): place, floor and purges start again.
        c.heard_in_log(LogPlace::Gap((10, 0)), Some(&all));
        assert_eq!(c.log_at.get(), (10, 0));
        assert!(c.wide_purges.borrow().is_empty());
        assert_eq!(c.wide_purge_covers(&other, (10, 0)), None);
        assert_eq!(c.wide_purge_covers(&other, (9, 0)), Some(false));
    }

    /// RFC 9111 §4.4: while a purge's Redis side is awaited (a round trip, or, the link
    /// down, until the layer sends it again), an entry found in Redis that it covers and that
    /// was received before it (or within the clock margin after it) is not taken; one of
    /// another URL, or received after it, is; once settled, the purge covers nothing more.
    #[test]
    fn a_purge_awaited_in_redis_covers_the_entries_received_before_it() {
        let c = worker_cache();
        let now = now_secs();
        let p = Purge {
            target: PurgeTarget::Url(b"h/p".to_vec()),
            soft: false,
        };
        c.note_redis_pending(None, &p);
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
        c.note_redis_pending(Some(7), &p);
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
        assert!(c.pending_in_redis_covers(
            None,
            &url_obj(b"h/p", b"ahead", now + PURGE_CLOCK_MARGIN_SECS)
        ));
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/q", b"other", now - 100)));
        assert!(!c.pending_in_redis_covers(
            None,
            &url_obj(b"h/p", b"after", now + PURGE_CLOCK_MARGIN_SECS + 2)
        ));
        // A lookup sent while it was awaited does not take what it covers, settled since.
        let before = c.pending_in_redis();
        c.settle_redis_purge(7, None);
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
        assert!(c.pending_in_redis_covers(before.as_deref(), &url_obj(b"h/p", b"old", now - 100)));
        assert!(c.pending_in_redis().is_none());
        // Bounded: the oldest awaited is forgotten past the bound.
        for t in 0..=MAX_REDIS_PENDING as u64 {
            c.note_redis_pending(
                Some(100 + t),
                &Purge {
                    target: PurgeTarget::Url(format!("h/{t}").into_bytes()),
                    soft: false,
                },
            );
        }
        assert_eq!(c.redis_pending.borrow().len(), MAX_REDIS_PENDING);
        // The oldest went to the floor (issue 12: before, it was forgotten): until it is
        // settled, no entry received before it is taken, whatever its URL; one received after
        // is.
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/0", b"old", now - 100)));
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/z", b"old", now - 100)));
        assert!(!c.pending_in_redis_covers(
            None,
            &url_obj(b"h/z", b"after", now + PURGE_CLOCK_MARGIN_SECS + 2)
        ));
        let before = c.pending_in_redis();
        c.settle_redis_purge(100, None);
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/z", b"old", now - 100)));
        assert!(c.pending_in_redis_covers(before.as_deref(), &url_obj(b"h/z", b"old", now - 100)));
        assert!(c.redis_floor.borrow().is_none());
        // One equal to an awaited purge, under a later ticket, replaces it (and pushes no
        // other out: 300 pushed h/1 out, 301 none): the earlier's settlement finds nothing,
        // the later's ends it.
        for t in [300, 301] {
            c.note_redis_pending(Some(t), &p);
        }
        assert_eq!(c.redis_pending.borrow().len(), MAX_REDIS_PENDING);
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/2", b"old", now - 100)));
        c.settle_redis_purge(300, None);
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
        c.settle_redis_purge(301, None);
        // h/1, on the floor, still covers it; settled, nothing does.
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
        c.settle_redis_purge(101, None);
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/p", b"old", now - 100)));
    }

    /// A settlement lost to a full control mailbox no longer leaves the purges it settled
    /// awaited, nor the floor, until the process ends: `settle_redis_below` (sent with every
    /// settlement, and again by the purge log's listener after one was lost) ends every
    /// purge under a lower ticket, the floor's included, even a floor past
    /// [`MAX_FLOOR_TICKETS`], once every ticket pushed out to it is below.
    #[test]
    fn purges_and_the_floor_are_settled_below_a_ticket_even_a_floor_past_its_bound() {
        let c = worker_cache();
        let now = now_secs();
        let purge = |t: u64| Purge {
            target: PurgeTarget::Url(format!("h/{t}").into_bytes()),
            soft: false,
        };
        let n = (MAX_REDIS_PENDING + MAX_FLOOR_TICKETS + 10) as u64;
        for t in 0..n {
            c.note_redis_pending(Some(t), &purge(t));
        }
        assert!(c.redis_floor.borrow().as_ref().is_some_and(|f| f.stuck));
        // Every ticket it holds is below, not every ticket pushed out to it: it stays.
        c.settle_redis_below(MAX_FLOOR_TICKETS as u64 + 5);
        assert!(c.pending_in_redis_covers(None, &url_obj(b"h/z", b"old", now - 100)));
        assert_eq!(c.redis_pending.borrow().len(), MAX_REDIS_PENDING);
        // Every ticket pushed out to it settled: it goes, stuck or not; the awaited stay.
        c.settle_redis_below(n - MAX_REDIS_PENDING as u64);
        assert!(c.redis_floor.borrow().is_none());
        assert!(!c.pending_in_redis_covers(None, &url_obj(b"h/z", b"old", now - 100)));
        assert_eq!(c.redis_pending.borrow().len(), MAX_REDIS_PENDING);
        // The awaited below go.
        c.settle_redis_below(n - 10);
        assert_eq!(c.redis_pending.borrow().len(), 10);
        c.settle_redis_below(n);
        assert!(c.pending_in_redis().is_none());
    }

    /// RFC 9111 §4.4 with lazy invalidation: an object invalidated here is gone for a lookup
    /// (and one of another URL, of the same length or not, is not), a copy stored after is
    /// served, and a freshened copy another worker posts (its 304 answered before it ran the
    /// invalidation posted to it) does not bring back the invalidated one (review r12a H1:
    /// before, `take_freshened` saw the invalidated copy still in the store, took it for one
    /// held here and stored the freshened pre-POST copy over it).
    #[test]
    fn an_invalidated_object_is_gone_for_lookups_and_freshened_copies() {
        let c = worker_cache();
        let h = head("GET /p HTTP/1.1\r\nHost: h\r\n\r\n");
        let req = Sent::plain(&h);
        let body = |k: &[u8]| c.lookup(c.key(k), &req).0.map(|o| o.body.clone());
        c.insert(b"k", Rc::new(url_obj(b"h/p", b"old", 10)), 4);
        c.insert(b"same-length", Rc::new(url_obj(b"h/q", b"q", 10)), 4);
        c.insert(b"other-length", Rc::new(url_obj(b"h/longer", b"l", 10)), 4);
        c.invalidate_local(b"h/p");
        assert_eq!(body(b"same-length").as_deref(), Some(&b"q"[..]));
        assert_eq!(body(b"other-length").as_deref(), Some(&b"l"[..]));
        let fresh = Bytes::from(redis::encode(&url_obj(b"h/p", b"old", 20)));
        c.take_freshened(b"k", &fresh, 4);
        assert!(c.get(b"k").is_none(), "the pre-POST copy came back");
        assert_eq!(body(b"k"), None);
        assert_eq!(c.stats().purged, 1);
        // Stored after the invalidation: served, and freshened from another worker.
        c.insert(b"k", Rc::new(url_obj(b"h/p", b"new", 30)), 4);
        assert_eq!(body(b"k").as_deref(), Some(&b"new"[..]));
        let fresh = Bytes::from(redis::encode(&url_obj(b"h/p", b"new", 40)));
        c.take_freshened(b"k", &fresh, 4);
        let got = c.get(b"k").expect("stored");
        assert_eq!(got[0].t.response_time, 40);
        assert_eq!(c.stats().purge_scanned, 0, "no read of the whole store");
    }

    fn worker_cache() -> Rc<WorkerCache> {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n";
        let cfg = Config::parse(src, "t.toml").expect("config");
        WorkerCache::new(&cfg, 0)
    }

    #[test]
    fn an_evicted_object_lends_its_allocations_to_the_next_stored_one() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache]\nmax_bytes_per_worker = \"4KiB\"\nmax_object_bytes = \"2KiB\"\n";
        let cfg = Config::parse(src, "t.toml").expect("config");
        let c = WorkerCache::new(&cfg, 0);
        // Laid out as a stored miss lays out an object: head, then body, in one allocation.
        let obj = || {
            let mut buf = BytesMut::with_capacity(1100);
            buf.extend_from_slice(&[b'h'; 100]);
            let head = buf.split().freeze();
            buf.extend_from_slice(&[b'x'; 1000]);
            Object {
                status: 200,
                fields: Fields::from_block(
                    head.slice(0..8),
                    vec![HeaderSpan {
                        name: crate::http::Span { start: 0, end: 4 },
                        value: crate::http::Span { start: 4, end: 8 },
                    }],
                ),
                url: head.slice(8..12),
                body: buf.freeze(),
                ..Object::default()
            }
        };
        // Four of these fill the budget: the others evict.
        for i in 0..20 {
            c.insert(format!("k{i}").as_bytes(), Rc::new(obj()), 4);
        }
        assert!(c.stats().bytes <= 4096);
        let kept = c.spare_object.borrow().as_ref().map(Rc::as_ptr);
        let kept = kept.expect("an evicted object kept");
        {
            let spare = c.spare_object.borrow();
            let spare = spare.as_ref().expect("kept");
            assert!(spare.body.is_empty() && spare.fields.is_empty(), "emptied");
        }
        let fields = c.field_vec();
        assert!(
            fields.is_empty() && fields.capacity() >= 1,
            "its field vector kept"
        );
        assert_eq!(c.field_vec().capacity(), 0, "given once");
        // The allocation that held the head and the body comes back whole, for a miss that
        // needs about as much.
        assert_eq!(
            c.spare_buf.borrow().as_ref().map(BytesMut::capacity),
            Some(1100)
        );
        assert_eq!(
            c.object_buf(100).capacity(),
            100,
            "too large for 100 bytes: a new one"
        );
        let buf = c.object_buf(1000);
        assert!(buf.is_empty() && buf.capacity() == 1100, "reused");
        assert!(c.spare_buf.borrow().is_none(), "given once");
        let o = c.new_object(|o| {
            *o = Object {
                status: 203,
                ..Object::default()
            }
        });
        assert_eq!(Rc::as_ptr(&o), kept, "the allocation reused");
        assert_eq!(o.status, 203);
        assert!(c.spare_object.borrow().is_none());
        // Objects something else still holds when they are evicted are left to it.
        let held: Vec<Rc<Object>> = (20..40)
            .map(|i| {
                let o = Rc::new(obj());
                c.insert(format!("k{i}").as_bytes(), o.clone(), 4);
                o
            })
            .collect();
        let spare = c.spare_object.borrow().as_ref().map(Rc::as_ptr);
        assert!(
            held.iter().all(|o| Some(Rc::as_ptr(o)) != spare),
            "none of them kept"
        );
        assert!(held.iter().all(|o| o.body.len() == 1000), "untouched");
    }

    #[test]
    fn an_evicted_key_holds_the_next_stored_key_when_it_fits() {
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache]\nmax_bytes_per_worker = \"4KiB\"\nmax_object_bytes = \"2KiB\"\n";
        let cfg = Config::parse(src, "t.toml").expect("config");
        let c = WorkerCache::new(&cfg, 0);
        let obj = || {
            Rc::new(Object {
                status: 200,
                body: Bytes::from(vec![b'x'; 1000]),
                ..Object::default()
            })
        };
        let stored_at = |key: &[u8]| {
            let m = c.map.borrow();
            let found = m.iter().find(|(k, _)| k.bytes == key).map(|(k, _)| k);
            found.map(|k| (k.bytes.as_ptr(), k.bytes.capacity()))
        };
        // Keys of 40 bytes; four objects fill the budget, the others evict.
        let long = |i: usize| format!("{i:040}").into_bytes();
        for i in 0..20 {
            c.insert(&long(i), obj(), 4);
        }
        assert!(c.stats().bytes <= 4096);
        let spare = c.spare_key.borrow().as_ptr();
        assert_eq!(c.spare_key.borrow().capacity(), 40, "an evicted key kept");
        assert!(c.spare_key.borrow().is_empty());
        // A key of 30 bytes fits in it (10 bytes of room, counted in the entry's weight).
        c.insert(&[b'a'; 30], obj(), 4);
        assert_eq!(stored_at(&[b'a'; 30]), Some((spare, 40)), "reused");
        assert_eq!(
            c.get(&[b'a'; 30]).map(|v| v.len()),
            Some(1),
            "found by its bytes"
        );
        assert!(c.stats().bytes <= 4096);
        // A key far shorter than the spare one does not take it (the room would be wasted).
        let spare = c.spare_key.borrow().as_ptr();
        c.insert(b"k", obj(), 4);
        let (at, cap) = stored_at(b"k").expect("stored");
        assert!(at != spare && cap == 1, "a new vector of its length");
        // Nor does one longer than it.
        c.insert(&long(99), obj(), 4);
        assert!(c.get(&long(99)).is_some());
        assert!(c.stats().bytes <= 4096);
    }

    #[test]
    fn a_key_has_one_flight_found_by_its_bytes_and_gone_when_it_ends() {
        let c = worker_cache();
        let Err(Some(g)) = c.join_or_begin_flight(c.key(b"k1")) else {
            panic!("no flight yet: this request starts one");
        };
        let Ok(f) = c.join_or_begin_flight(c.key(b"k1")) else {
            panic!("the flight is found");
        };
        assert!(Rc::ptr_eq(&f, g.flight()));
        assert!(c.flight(b"k2").is_none());
        assert!(c.begin_flight(b"k1").is_none(), "one flight per key");
        let g2 = c.begin_flight(b"k2").expect("another key");
        drop(g);
        assert_eq!(f.end.get(), FlightEnd::Failed);
        {
            let fl = c.flights.borrow();
            assert_eq!(
                (fl.live, fl.few.len()),
                (1, 2),
                "the ended slot keeps its key buffer"
            );
            assert_eq!(fl.few[0].1.key, b"k2", "the slot in flight comes first");
        }
        assert!(
            c.spare_flights.borrow().is_empty(),
            "a waiter holds it: not kept"
        );
        assert!(c.flight(b"k1").is_none());
        assert!(c.flight(b"k2").is_some());
        g2.finish(FlightEnd::Stored);
        assert!(c.flight(b"k2").is_none());
        let spare = c.spare_keys.borrow().len();
        let g3 = c.begin_flight(b"k1").expect("a new fetch may start");
        assert_eq!(c.flights.borrow().few.len(), 2, "an ended slot is reused");
        assert_eq!(
            c.spare_keys.borrow().len(),
            spare,
            "with its own key buffer"
        );
        assert!(c.flight(b"k1").is_some());
        drop(g3);
        assert!(c.flights.borrow().is_empty());
    }

    #[test]
    fn flights_past_the_list_are_in_the_map_and_each_ends_alone() {
        let c = worker_cache();
        let keys: Vec<Vec<u8>> = (0..FEW_FLIGHTS + 3)
            .map(|i| format!("key{i}").into_bytes())
            .collect();
        let mut guards: Vec<Option<FlightGuard>> = keys
            .iter()
            .map(|k| Some(c.begin_flight(k).expect("room for it")))
            .collect();
        {
            let fl = c.flights.borrow();
            assert_eq!((fl.live, fl.many.len()), (FEW_FLIGHTS, 3));
        }
        // Ended out of order, from the list and from the map: each leaves the others found.
        for i in [3, FEW_FLIGHTS + 1, 0, FEW_FLIGHTS - 1, FEW_FLIGHTS] {
            let spare = c.spare_keys.borrow().len();
            drop(guards[i].take());
            let from_map = i >= FEW_FLIGHTS;
            assert_eq!(
                c.spare_keys.borrow().len(),
                spare + usize::from(from_map),
                "a map slot's key buffer goes back to the pool, a list slot's stays"
            );
            for (j, k) in keys.iter().enumerate() {
                assert_eq!(c.flight(k).is_some(), guards[j].is_some(), "key {j}");
            }
        }
        // Ended slots of the list are reused before the map is.
        let again = c.begin_flight(&keys[3]).expect("room");
        assert_eq!(c.flights.borrow().many.len(), 1);
        drop(again);
        guards.clear();
        assert!(c.flights.borrow().is_empty());
    }

    #[test]
    fn a_list_slot_keeps_no_key_buffer_past_the_bound() {
        let c = worker_cache();
        let long = vec![b'k'; MAX_SPARE_KEY_BYTES + 1];
        drop(c.begin_flight(&long).expect("a fetch"));
        let fl = c.flights.borrow();
        assert_eq!(fl.few.len(), 1);
        assert_eq!(fl.few[0].1.key.capacity(), 0, "freed");
    }

    #[test]
    fn a_flight_under_the_same_hash_is_not_another_keys() {
        let c = worker_cache();
        let at = |bytes: &'static [u8]| KeyRef { hash: 7, bytes };
        let g = c.begin_flight_at(at(b"a")).expect("started");
        assert!(c.flight_at(at(b"b")).is_none(), "a collision is no match");
        assert!(
            c.begin_flight_at(at(b"b")).is_none(),
            "the other key fetches alone"
        );
        assert!(
            matches!(c.join_or_begin_flight(at(b"b")), Err(None)),
            "neither joined nor begun"
        );
        assert!(!g.flight().joined.get(), "not joined by the other key");
        assert!(c.flight_at(at(b"a")).is_some());
        drop(g);
        assert!(c.flight_at(at(b"a")).is_none());
    }

    #[test]
    fn prehashed_hashes_a_u64_as_itself() {
        use std::hash::BuildHasher;
        let h = PreHashedBuild::default();
        assert_eq!(h.hash_one(0x1234_5678_9abc_def0u64), 0x1234_5678_9abc_def0);
        assert_ne!(h.hash_one(&b"ab"[..]), h.hash_one(&b"ba"[..]));
    }

    #[test]
    fn now_secs_reads_the_system_clock() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs();
        let now = now_secs();
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs();
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn an_ended_flight_no_one_holds_is_reset_and_reused() {
        let c = worker_cache();
        let g = c.begin_flight(b"k1").expect("started");
        let first = Rc::as_ptr(g.flight());
        g.flight().publish(stream());
        g.flight().cut.set(true);
        g.flight().body.borrow_mut().extend_from_slice(b"abc");
        g.finish(FlightEnd::Stored);
        assert_eq!(c.spare_flights.borrow().len(), 1, "kept");
        let g = c.begin_flight(b"k2").expect("started");
        let f = g.flight();
        assert_eq!(Rc::as_ptr(f), first, "reused");
        assert_eq!(f.end.get(), FlightEnd::Pending);
        assert!(f.stream.borrow().is_none() && !f.cut.get() && f.body.borrow().is_empty());
        assert!(f.whole.borrow().is_none());
        assert!(c.flight(b"k1").is_none() && c.flight(b"k2").is_some());
        drop(g);
        assert!(c.flight(b"k2").is_none());
    }

    #[test]
    fn a_flight_that_had_a_waiter_is_not_kept() {
        let c = worker_cache();
        let g = c.begin_flight(b"k").expect("started");
        let f = c.flight(b"k").expect("in flight");
        drop(f);
        drop(g);
        assert!(
            c.spare_flights.borrow().is_empty(),
            "not kept, even once the waiter is gone"
        );
    }

    /// Whether a waiter registered on `n` (polled once, pending) has been woken since.
    fn woken(n: &mut std::pin::Pin<Box<crate::local::Notified<'_>>>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        n.as_mut().poll(&mut cx).is_ready()
    }

    fn waiting(f: &Flight) -> std::pin::Pin<Box<crate::local::Notified<'_>>> {
        let mut n = Box::pin(f.done.notified());
        assert!(!woken(&mut n), "nothing happened yet");
        n
    }

    use std::future::Future;

    #[test]
    fn a_fetch_no_one_joins_that_publishes_nothing_makes_no_flight() {
        let c = worker_cache();
        let g = c.begin_flight(b"k").expect("started");
        g.finish(FlightEnd::Stored);
        assert!(c.spare_flights.borrow().is_empty(), "no flight was made");
        assert!(c.flights.borrow().is_empty());
        assert!(
            c.flights.borrow().few[0].1.key.capacity() >= b"k".len(),
            "the ended slot keeps its key buffer for the next fetch"
        );
        let g = c.begin_flight(b"k").expect("a new fetch may start");
        drop(g);
        assert!(
            c.spare_flights.borrow().is_empty(),
            "failed, still no flight"
        );
    }

    #[test]
    fn a_waiter_that_joins_before_the_head_is_streamed_what_the_fetch_publishes() {
        let c = worker_cache();
        let Err(Some(g)) = c.join_or_begin_flight(c.key(b"k")) else {
            panic!("no flight yet: this request starts one");
        };
        let Ok(f) = c.join_or_begin_flight(c.key(b"k")) else {
            panic!("the fetch is found");
        };
        assert!(f.joined.get() && f.end.get() == FlightEnd::Pending);
        let mut n = waiting(&f);
        // The fetch publishes into the flight the waiter made.
        g.flight().publish(stream());
        assert!(Rc::ptr_eq(&f, g.flight()));
        assert!(woken(&mut n), "woken by the head");
        assert_eq!(f.stream.borrow().as_ref().map(|s| s.status), Some(200));
        n = waiting(&f);
        let mut tee = Tee::with_buf(
            16,
            BytesMut::new(),
            Some(g.flight().clone()),
            c.charge_in_flight(0).expect("room"),
        );
        tee.push(b"abc");
        assert!(woken(&mut n), "woken by the bytes");
        assert_eq!(&f.body_from(1)[..], b"bc");
        n = waiting(&f);
        assert_eq!(&tee.finish()[..], b"abc");
        assert!(g.flight().take_stream().is_some());
        g.finish(FlightEnd::Stored);
        assert!(woken(&mut n), "woken by the end");
        assert_eq!(f.end.get(), FlightEnd::Stored);
        assert_eq!(
            &f.body_from(0)[..],
            b"abc",
            "the whole body stays for the waiter"
        );
        drop(n);
        drop(f);
        assert!(c.spare_flights.borrow().is_empty(), "joined: not kept");
        assert!(c.flight(b"k").is_none());
    }

    #[test]
    fn a_waiter_that_joins_while_the_body_streams_finds_the_published_flight() {
        let c = worker_cache();
        let g = c.begin_flight(b"k").expect("started");
        g.flight().publish(stream());
        assert!(!g.flight().joined.get());
        let mut tee = Tee::with_buf(
            16,
            BytesMut::new(),
            Some(g.flight().clone()),
            c.charge_in_flight(0).expect("room"),
        );
        tee.push(b"ab");
        let Ok(f) = c.join_or_begin_flight(c.key(b"k")) else {
            panic!("the fetch is found");
        };
        assert!(Rc::ptr_eq(&f, g.flight()) && f.joined.get());
        assert_eq!(f.stream.borrow().as_ref().map(|s| s.len), Some(Some(3)));
        assert_eq!(&f.body_from(0)[..], b"ab", "what arrived before the join");
        let mut n = waiting(&f);
        tee.push(b"c");
        assert!(woken(&mut n));
        assert_eq!(&f.body_from(2)[..], b"c");
        drop(tee);
        g.finish(FlightEnd::Stored);
        assert_eq!(f.end.get(), FlightEnd::Stored);
        drop(n);
        drop(f);
        assert!(c.spare_flights.borrow().is_empty(), "joined: not kept");
    }

    /// A capture holds against the worker's in-flight bound what it has received past its
    /// first room, is refused past the bound (and then holds nothing), and gives everything
    /// back when finished or dropped.
    #[test]
    fn captures_hold_their_bytes_against_the_in_flight_bound_until_they_end() {
        let c = WorkerCache::new(
            &crate::config::Config::parse(
                "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\n[cache]\nmax_bytes_per_worker = \"64KiB\"\nmax_object_bytes = \"8KiB\"\nmax_in_flight_bytes_per_worker = \"10KiB\"\n",
                "t.toml",
            )
            .expect("valid"),
            0,
        );
        let tee = |room: u64| {
            let charge = c.charge_in_flight(room)?;
            Some(Tee::with_buf(8192, BytesMut::new(), None, charge))
        };
        let mut a = tee(6144).expect("fits");
        assert_eq!(c.in_flight_bytes(), 6144);
        assert!(tee(6144).is_none(), "6 KiB more do not fit beside it");
        assert_eq!(c.in_flight_bytes(), 6144, "a refused charge holds nothing");
        a.push(&[b'a'; 6144]);
        assert_eq!(c.in_flight_bytes(), 6144, "within its room");
        let mut b = tee(0).expect("empty");
        b.push(&[b'b'; 3000]);
        assert_eq!(c.in_flight_bytes(), 9144);
        b.push(&[b'b'; 2000]);
        assert!(b.over, "past the bound: dropped");
        assert_eq!(c.in_flight_bytes(), 6144, "and gives back what it held");
        assert_eq!(&a.finish()[..], &[b'a'; 6144][..]);
        assert_eq!(c.in_flight_bytes(), 0);
        let mut d = tee(0).expect("empty");
        d.push(&[b'd'; 8192]);
        assert_eq!(c.in_flight_bytes(), 8192);
        drop(d);
        assert_eq!(
            c.in_flight_bytes(),
            0,
            "an abandoned capture gives back too"
        );
    }

    #[test]
    fn a_body_past_the_cut_is_kept_in_a_window_while_waiters_stream_it() {
        let c = worker_cache();
        let g = c.begin_flight(b"k").expect("started");
        let f = g.flight().clone();
        f.publish(stream());
        let mut tee = Tee::with_buf(
            16,
            BytesMut::new(),
            Some(f.clone()),
            c.charge_in_flight(0).expect("room"),
        );
        let streaming = f.stream_guard();
        tee.push(b"0123456789");
        assert!(tee.wants_rest());
        tee.push(b"abcdefghij");
        // Past the bound: not stored, no new waiter, the streaming one goes on.
        assert!(tee.over && f.cut.get() && f.stream.borrow().is_none());
        assert!(tee.wants_rest(), "a waiter streams it");
        assert_eq!(&f.window_from(5).expect("kept")[..], b"56789abcdefghij");
        // Past the window, the oldest bytes go: a waiter that far behind is cut.
        tee.push(&vec![b'x'; MIN_WINDOW]);
        assert!(f.window_from(5).is_none());
        let at = 20 + MIN_WINDOW - 10;
        assert_eq!(&f.window_from(at).expect("kept")[..], &[b'x'; 10][..]);
        tee.body_ended();
        assert!(f.body_end.get());
        // No one streams it any more: nothing more is kept, nothing more wanted.
        drop(streaming);
        assert!(!tee.wants_rest());
        tee.push(b"more");
        assert_eq!(f.body.borrow().capacity(), 0);
        drop(tee);
        g.finish(FlightEnd::NotStorable);
    }

    #[test]
    fn a_request_after_the_fetch_stored_its_response_finds_no_flight() {
        let c = worker_cache();
        let g = c.begin_flight(b"k").expect("started");
        g.flight().publish(stream());
        assert!(g.flight().take_stream().is_some());
        g.finish(FlightEnd::Stored);
        assert_eq!(
            c.spare_flights.borrow().len(),
            1,
            "published, not joined: kept"
        );
        assert!(c.flight(b"k").is_none());
        let Err(Some(g)) = c.join_or_begin_flight(c.key(b"k")) else {
            panic!("the fetch ended: this request starts one");
        };
        drop(g);
        assert_eq!(
            c.spare_flights.borrow().len(),
            1,
            "the new fetch made no flight"
        );
    }

    #[test]
    fn a_fetch_that_fails_after_a_late_join_lets_the_waiter_take_over() {
        for published in [false, true] {
            let c = worker_cache();
            let g = c.begin_flight(b"k").expect("started");
            if published {
                g.flight().publish(stream());
            }
            let Ok(f) = c.join_or_begin_flight(c.key(b"k")) else {
                panic!("the fetch is found");
            };
            let mut n = waiting(&f);
            drop(g);
            assert!(woken(&mut n), "woken by the failure");
            assert_eq!(f.end.get(), FlightEnd::Failed);
            let Err(Some(g)) = c.join_or_begin_flight(c.key(b"k")) else {
                panic!("the waiter takes over");
            };
            let Ok(f2) = c.join_or_begin_flight(c.key(b"k")) else {
                panic!("the new fetch is found");
            };
            assert!(!Rc::ptr_eq(&f, &f2), "a new flight for the new fetch");
            assert_eq!(f2.end.get(), FlightEnd::Pending);
            g.finish(FlightEnd::NotStorable);
            assert_eq!(f2.end.get(), FlightEnd::NotStorable);
        }
    }

    #[test]
    fn flights_are_bounded() {
        let c = worker_cache();
        let mut guards = Vec::new();
        for i in 0..MAX_FLIGHTS {
            guards.push(c.begin_flight(format!("k{i}").as_bytes()).expect("room"));
        }
        assert!(c.begin_flight(b"one more").is_none());
        assert!(matches!(
            c.join_or_begin_flight(c.key(b"one more")),
            Err(None)
        ));
        assert!(c.flight(b"k7").is_some(), "a running fetch is still found");
        guards.pop();
        assert!(c.begin_flight(b"one more").is_some());
    }

    #[test]
    fn flights_past_the_short_list_are_found_and_ended_the_same() {
        let c = worker_cache();
        let n = FEW_FLIGHTS * 3;
        let key = |i: usize| format!("k{i}").into_bytes();
        let mut guards: Vec<Option<FlightGuard>> =
            (0..n).map(|i| c.begin_flight(&key(i))).collect();
        assert!(guards.iter().all(Option::is_some));
        assert_eq!(c.flights.borrow().len(), n);
        for (i, g) in guards.iter().enumerate() {
            let f = c.flight(&key(i)).expect("in flight");
            let g = g.as_ref().expect("started");
            assert!(Rc::ptr_eq(&f, g.flight()), "each key finds its own flight");
            assert!(c.begin_flight(&key(i)).is_none(), "one flight per key");
        }
        // End every other one, from the list and from the map alike.
        for (i, g) in guards.iter_mut().enumerate() {
            if i % 2 == 0 {
                g.take().expect("started").finish(FlightEnd::Stored);
            }
        }
        for i in 0..n {
            assert_eq!(c.flight(&key(i)).is_some(), i % 2 == 1, "key {i}");
        }
        // Ended keys start again (into the list's room first), the others are still found.
        let again: Vec<FlightGuard> = (0..n)
            .step_by(2)
            .map(|i| c.begin_flight(&key(i)).expect("ended: may start"))
            .collect();
        assert_eq!(c.flights.borrow().len(), n);
        drop(guards);
        drop(again);
        assert!(c.flights.borrow().is_empty());
        // A collision past the short list is no match either.
        let at = |bytes: &'static [u8], hash: u64| KeyRef { hash, bytes };
        let gs: Vec<FlightGuard> = (0..FEW_FLIGHTS as u64 + 1)
            .map(|h| c.begin_flight_at(at(b"a", h)).expect("room"))
            .collect();
        let last = FEW_FLIGHTS as u64;
        assert!(c.flight_at(at(b"b", last)).is_none());
        assert!(matches!(c.join_or_begin_flight(at(b"b", last)), Err(None)));
        assert!(c.flight_at(at(b"a", last)).is_some());
        drop(gs);
        assert!(c.flights.borrow().is_empty());
    }
}
