//! The lookup structure behind [`super::Router::find_index`]: immutable once built, `Send +
//! Sync`, so one table can serve every worker behind an `Arc` (see [`RouteTable::build`]).
//!
//! Cost of a lookup, whatever the number of routes:
//! - exact host: one hash lookup; `*.suffix` hosts: one walk of a radix tree over the host's
//!   bytes read backwards (at most the host's length in steps);
//! - exact path: one hash lookup per host class tried;
//! - regex paths: one pass of a multi-pattern lazy DFA over the path per chunk of
//!   [`REGEX_CHUNK`] patterns, reporting every pattern that matches;
//! - prefixes: one walk of a radix tree along the path.
//!
//! Then routes are tried in precedence order until one whose method and header conditions
//! hold; only routes whose host and path already match are looked at.

use std::collections::HashMap;

use regex_automata::meta;
use regex_automata::util::syntax;
use regex_automata::{Input, MatchKind, PatternSet};

use super::tree::{Forward, PrefixTree, Reverse, TreeBuilder};
use super::{PathMatch, Route};
use crate::config::{Config, RouteConfig};
use crate::http::request::RequestHead;

/// Most patterns compiled into one multi-pattern regex. Larger sets make the lazy DFA's states
/// bigger and its cache thrash; 1,024 keeps a table of 1,000 regex routes in one pass.
pub const REGEX_CHUNK: usize = 1024;

/// Size limit of one compiled multi-pattern NFA (the `regex` crate's default for one regex is
/// 10 MiB; a chunk that exceeds this is split in halves).
const REGEX_SET_NFA_LIMIT: usize = 64 << 20;

/// Lazy DFA cache per chunk and worker (the `regex` crate's default).
const REGEX_DFA_CACHE: usize = 2 << 20;

/// Longest host name lowered in place for matching; DNS names are at most 253 bytes
/// (RFC 1035 section 2.3.4). Longer hosts are compared as sent.
const MAX_LOWERED_HOST: usize = 256;

/// Routes of one host class, indexed by path condition.
#[derive(Debug, Default)]
struct Bucket {
    /// Exact paths, each with its range of `exact_ids`.
    exact: HashMap<Box<[u8]>, (u32, u32)>,
    /// Route ids of the exact paths, grouped by path, in precedence order within one.
    exact_ids: Box<[u32]>,
    regex: Vec<RegexChunk>,
    /// Route ids of `regex`, in precedence order; chunk `k` covers a contiguous range.
    regex_ids: Box<[u32]>,
    /// Prefixes (a route with no path condition is the prefix "").
    prefix: PrefixTree,
}

#[derive(Debug)]
struct RegexChunk {
    /// First index into `regex_ids`.
    start: u32,
    set: ChunkMatcher,
}

#[derive(Debug)]
enum ChunkMatcher {
    /// Patterns `start..start + n` of `regex_ids`, in order; `slot` names the worker's cache.
    Set { re: meta::Regex, slot: u32 },
    /// A pattern too large to share a set: the route's own compiled regex.
    One,
}

/// The route lookup table.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact_hosts: HashMap<Box<[u8]>, u32>,
    /// Reversed `.suffix` of each wildcard, with the index of its bucket.
    wildcard_hosts: PrefixTree,
    buckets: Vec<Bucket>,
    /// Routes with no `hosts`.
    any_host: Bucket,
    /// Number of multi-pattern regexes (each needs a cache per worker).
    regex_slots: u32,
    /// Largest pattern count of one multi-pattern regex.
    max_chunk: usize,
    routes: usize,
}

/// What a worker keeps beside a shared table: the lazy DFA caches of the regex sets.
#[derive(Debug)]
pub(crate) struct Scratch {
    caches: Vec<Option<Box<meta::Cache>>>,
    patterns: PatternSet,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new(&RouteTable::default())
    }
}

impl Scratch {
    pub fn new(table: &RouteTable) -> Scratch {
        Scratch {
            caches: (0..table.regex_slots).map(|_| None).collect(),
            patterns: PatternSet::new(table.max_chunk),
        }
    }
}

/// Sizes, for the start-up log and `ringway check`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableStats {
    pub routes: usize,
    pub exact_hosts: usize,
    pub wildcard_hosts: usize,
    pub exact_paths: usize,
    pub prefixes: usize,
    pub regexes: usize,
    pub regex_sets: usize,
}

/// Host without port and without trailing dots, lower-cased into `buf` when short enough: the
/// form routes are keyed by. `admin.example.com.` is the same DNS name as `admin.example.com`
/// (the empty root label, RFC 1034 §3.1) and an upstream that serves names reads it so: it
/// must not miss that host's routes and fall through to a catch-all.
///
/// An IPv6 literal is read as the address it names (RFC 3986 §3.2.2: `[::1]`,
/// `[0:0:0:0:0:0:0:1]` and `[0::1]` are one host) and written in the text form of RFC 5952
/// §4 (lower-case hex, zeros compressed) with its brackets, as the route's own literal was at
/// load ([`canonical_ip_literal`]). A literal that does not parse never gets here: the request
/// parser refused its Host with 400.
#[inline]
pub fn routing_host<'a>(host: &'a [u8], buf: &'a mut [u8; MAX_LOWERED_HOST]) -> &'a [u8] {
    let host = trim_root_dots(super::host_without_port(host));
    if host.first() == Some(&b'[') {
        return match canonical_ip_literal(host, buf) {
            Some(n) => &buf[..n],
            None => host,
        };
    }
    if host.len() <= buf.len() && host.iter().any(u8::is_ascii_uppercase) {
        for (d, s) in buf.iter_mut().zip(host) {
            *d = s.to_ascii_lowercase();
        }
        &buf[..host.len()]
    } else {
        host
    }
}

/// Writes the bracketed IPv6 literal `host` (`[...]`, nothing after it) into `buf` in its
/// RFC 5952 §4 text form, also bracketed, and returns its length; `None` when it is not one.
/// Writes into the caller's buffer: no allocation (it runs on the request path).
pub fn canonical_ip_literal(host: &[u8], buf: &mut [u8]) -> Option<usize> {
    use std::io::Write;
    let inner = host.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let addr: std::net::Ipv6Addr = std::str::from_utf8(inner).ok()?.parse().ok()?;
    let room = buf.len();
    let mut out = &mut buf[..];
    // std's `Display` for `Ipv6Addr` is RFC 5952's recommended form (§4.1 longest run of
    // zeros compressed, the first of equal runs; §4.2.2 not a single zero field; §4.3 lower
    // case); the longest, `[` 45 characters `]`, fits any buffer a host fits.
    write!(out, "[{addr}]").ok()?;
    Some(room - out.len())
}

/// A host name without its trailing dots (the root label).
#[inline]
pub fn trim_root_dots(host: &[u8]) -> &[u8] {
    let end = host.iter().rposition(|b| *b != b'.').map_or(0, |p| p + 1);
    &host[..end]
}

/// Method and header conditions of a route: more of them wins among routes with the same
/// path condition.
fn conditions(r: &RouteConfig) -> usize {
    r.methods.len().min(1) + r.headers.len()
}

/// Route indices fit in u32: a config cannot hold 2^32 routes (each takes well over a byte of
/// TOML), and `Config` is parsed from one file in memory.
fn id(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl RouteTable {
    /// Builds the table for `cfg`'s routes (already validated by `Config`), logging the time
    /// it took. Build once per config and share it: every worker's `Router` that is made
    /// from the same config can use it (`Router::with_table`).
    pub fn build(cfg: &Config) -> std::sync::Arc<RouteTable> {
        let t0 = std::time::Instant::now();
        let t = RouteTable::new(cfg);
        let s = t.stats();
        crate::info!(
            "router: {} routes in {:.1} ms ({} exact hosts, {} wildcard hosts, {} exact paths, {} prefixes, {} regexes in {} sets)",
            s.routes,
            t0.elapsed().as_secs_f64() * 1e3,
            s.exact_hosts,
            s.wildcard_hosts,
            s.exact_paths,
            s.prefixes,
            s.regexes,
            s.regex_sets
        );
        std::sync::Arc::new(t)
    }

    /// Builds the table for `cfg`'s routes (already validated by `Config`).
    pub fn new(cfg: &Config) -> RouteTable {
        let routes = &cfg.routes[..];
        // Route ids per host class, in config order.
        let mut exact: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut wild: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
        let mut wild_order: Vec<Box<[u8]>> = Vec::new();
        let mut any: Vec<u32> = Vec::new();
        for (i, rc) in cfg.routes.iter().enumerate() {
            if rc.hosts.is_empty() {
                any.push(id(i));
            }
            for h in &rc.hosts {
                // Matched as requests are: without the root label's dot.
                let mut h = h.trim_end_matches('.').to_ascii_lowercase();
                // An IPv6 literal in RFC 5952 form, as `routing_host` writes a request's.
                let mut buf = [0u8; MAX_LOWERED_HOST];
                if let Some(n) = canonical_ip_literal(h.as_bytes(), &mut buf) {
                    h = String::from_utf8_lossy(&buf[..n]).into_owned();
                }
                if let Some(suffix) = h.strip_prefix('*') {
                    let key: Box<[u8]> = suffix.as_bytes().into();
                    let list = wild.entry(key.clone()).or_insert_with(|| {
                        wild_order.push(key);
                        Vec::new()
                    });
                    list.push(id(i));
                } else {
                    exact.entry(h.as_bytes().into()).or_default().push(id(i));
                }
            }
        }
        let mut t = RouteTable {
            routes: routes.len(),
            ..RouteTable::default()
        };
        let mut exact_hosts = HashMap::with_capacity(exact.len());
        for (host, ids) in exact {
            let b = t.bucket(routes, ids);
            t.buckets.push(b);
            exact_hosts.insert(host, id(t.buckets.len() - 1));
        }
        t.exact_hosts = exact_hosts;
        let mut wt = TreeBuilder::default();
        for key in wild_order {
            let ids = wild.remove(&key).unwrap_or_default();
            let b = t.bucket(routes, ids);
            t.buckets.push(b);
            let rev: Vec<u8> = key.iter().rev().copied().collect();
            wt.insert(&rev, id(t.buckets.len() - 1));
        }
        t.wildcard_hosts = wt.finish();
        t.any_host = t.bucket(routes, any);
        t
    }

    fn bucket(&mut self, routes: &[RouteConfig], mut ids: Vec<u32>) -> Bucket {
        // Precedence among routes with the same path condition: more conditions, then config
        // order. A route listing a host twice is kept once.
        ids.dedup();
        ids.sort_by_key(|&i| (std::cmp::Reverse(conditions(&routes[i as usize])), i));
        let mut b = Bucket::default();
        let mut exact: Vec<(&[u8], u32)> = Vec::new();
        let mut regex_ids = Vec::new();
        let mut tree = TreeBuilder::default();
        for &i in &ids {
            // The same choice as `compile_route` (validation allows only one of the three).
            let r = &routes[i as usize];
            if let Some(p) = &r.path {
                exact.push((p.as_bytes(), i));
            } else if let Some(p) = &r.path_prefix {
                tree.insert(p.as_bytes(), i);
            } else if r.path_regex.is_some() {
                regex_ids.push(i);
            } else {
                tree.insert(b"", i);
            }
        }
        // Stable: precedence order is kept within one path.
        exact.sort_by_key(|e| e.0);
        b.exact = HashMap::with_capacity(exact.len());
        let mut k = 0;
        while k < exact.len() {
            let start = k;
            while k < exact.len() && exact[k].0 == exact[start].0 {
                k += 1;
            }
            b.exact
                .insert(exact[start].0.into(), (id(start), id(k - start)));
        }
        b.exact_ids = exact.iter().map(|e| e.1).collect();
        b.prefix = tree.finish();
        let mut start = 0usize;
        for chunk in regex_ids.chunks(REGEX_CHUNK) {
            self.regex_chunks(routes, chunk, start, &mut b.regex);
            start += chunk.len();
        }
        b.regex_ids = regex_ids.into_boxed_slice();
        b
    }

    /// Compiles `ids`' patterns into one multi-pattern regex, splitting on a size error.
    fn regex_chunks(
        &mut self,
        routes: &[RouteConfig],
        ids: &[u32],
        start: usize,
        out: &mut Vec<RegexChunk>,
    ) {
        let pats: Vec<&str> = ids
            .iter()
            .filter_map(|&i| routes[i as usize].path_regex.as_deref())
            .collect();
        // Same syntax and semantics as `regex::bytes::RegexSet`: the patterns were validated
        // with `regex::bytes::Regex`, which parses them the same way.
        let built = meta::Builder::new()
            .configure(
                meta::Config::new()
                    .match_kind(MatchKind::All)
                    .utf8_empty(false)
                    .which_captures(regex_automata::nfa::thompson::WhichCaptures::None)
                    .nfa_size_limit(Some(REGEX_SET_NFA_LIMIT))
                    .hybrid_cache_capacity(REGEX_DFA_CACHE),
            )
            .syntax(syntax::Config::new().utf8(false))
            .build_many(&pats);
        match built {
            Ok(re) if pats.len() == ids.len() => {
                out.push(RegexChunk {
                    start: id(start),
                    set: ChunkMatcher::Set {
                        re,
                        slot: self.regex_slots,
                    },
                });
                self.regex_slots += 1;
                self.max_chunk = self.max_chunk.max(ids.len());
            }
            _ if ids.len() > 1 => {
                let (a, b) = ids.split_at(ids.len() / 2);
                self.regex_chunks(routes, a, start, out);
                self.regex_chunks(routes, b, start + a.len(), out);
            }
            _ => out.push(RegexChunk {
                start: id(start),
                set: ChunkMatcher::One,
            }),
        }
    }

    pub fn stats(&self) -> TableStats {
        let mut s = TableStats {
            routes: self.routes,
            exact_hosts: self.exact_hosts.len(),
            ..TableStats::default()
        };
        s.wildcard_hosts = self.buckets.len() - self.exact_hosts.len();
        for b in self.buckets.iter().chain([&self.any_host]) {
            s.exact_paths += b.exact_ids.len();
            s.regexes += b.regex_ids.len();
            s.regex_sets += b.regex.len();
            s.prefixes += b.prefix.ids_len();
        }
        s
    }

    /// The route for a request, by the rules in the module documentation of `router`.
    #[inline]
    pub(crate) fn find(
        &self,
        routes: &[Route],
        req: &RequestHead,
        scratch: &mut Scratch,
    ) -> Option<usize> {
        let path = req.path_bytes();
        if let Some(host) = req.host_bytes() {
            let mut buf = [0u8; MAX_LOWERED_HOST];
            let host = routing_host(host, &mut buf);
            if !self.exact_hosts.is_empty() {
                if let Some(&b) = self.exact_hosts.get(host) {
                    if let Some(i) = self.buckets[b as usize].find(routes, req, path, scratch) {
                        return Some(i as usize);
                    }
                }
            }
            if !self.wildcard_hosts.is_empty() {
                let mut found = None;
                self.wildcard_hosts.find(&Reverse(host), true, |b| {
                    found = self.buckets[b as usize].find(routes, req, path, scratch);
                    found.is_some()
                });
                if let Some(i) = found {
                    return Some(i as usize);
                }
            }
        }
        self.any_host
            .find(routes, req, path, scratch)
            .map(|i| i as usize)
    }
}

impl Bucket {
    #[inline]
    fn find(
        &self,
        routes: &[Route],
        req: &RequestHead,
        path: &[u8],
        scratch: &mut Scratch,
    ) -> Option<u32> {
        if !self.exact.is_empty() {
            if let Some(&(start, n)) = self.exact.get(path) {
                let ids = self
                    .exact_ids
                    .get(start as usize..(start + n) as usize)
                    .unwrap_or_default();
                for &i in ids {
                    if routes[i as usize].matches_rest(req) {
                        return Some(i);
                    }
                }
            }
        }
        for (k, chunk) in self.regex.iter().enumerate() {
            let start = chunk.start as usize;
            let end = self
                .regex
                .get(k + 1)
                .map_or(self.regex_ids.len(), |c| c.start as usize);
            let ids = &self.regex_ids[start..end];
            match &chunk.set {
                ChunkMatcher::Set { re, slot } => {
                    let Some(cache_slot) = scratch.caches.get_mut(*slot as usize) else {
                        continue;
                    };
                    // First use on this worker: the only allocation of a regex lookup.
                    let cache = cache_slot.get_or_insert_with(|| Box::new(re.create_cache()));
                    let found = &mut scratch.patterns;
                    if !found.is_empty() {
                        found.clear();
                    }
                    re.which_overlapping_matches_with(cache, &Input::new(path), found);
                    // In precedence order; stop once every reported pattern has been seen
                    // (a miss costs no scan of the set at all).
                    let mut left = found.len();
                    for p in found.iter() {
                        if left == 0 {
                            break;
                        }
                        left -= 1;
                        if let Some(&i) = ids.get(p.as_usize()) {
                            if routes[i as usize].matches_rest(req) {
                                return Some(i);
                            }
                        }
                    }
                }
                ChunkMatcher::One => {
                    for &i in ids {
                        let r = &routes[i as usize];
                        if let PathMatch::Regex(re) = &r.path {
                            if re.is_match(path) && r.matches_rest(req) {
                                return Some(i);
                            }
                        }
                    }
                }
            }
        }
        self.prefix.find(&Forward(path), false, |i| {
            routes[i as usize].matches_rest(req)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5952 §4: one text form per IPv6 address, whatever the spelling.
    #[test]
    fn ip_literals_are_read_as_addresses_rfc5952_4() {
        let canon = |h: &str| {
            let mut buf = [0u8; MAX_LOWERED_HOST];
            let n = canonical_ip_literal(h.as_bytes(), &mut buf)?;
            Some(String::from_utf8(buf[..n].to_vec()).unwrap())
        };
        for (spelled, form) in [
            ("[::1]", "[::1]"),
            ("[0:0:0:0:0:0:0:1]", "[::1]"),
            ("[0000::0001]", "[::1]"),
            ("[2001:DB8::A]", "[2001:db8::a]"),
            ("[2001:db8:0:0:1:0:0:1]", "[2001:db8::1:0:0:1]"),
            ("[2001:db8:0:1:1:1:1:1]", "[2001:db8:0:1:1:1:1:1]"),
            ("[::FFFF:192.0.2.1]", "[::ffff:192.0.2.1]"),
        ] {
            assert_eq!(canon(spelled).as_deref(), Some(form), "{spelled}");
            let mut buf = [0u8; MAX_LOWERED_HOST];
            let with_port = format!("{spelled}:8080");
            assert_eq!(
                routing_host(with_port.as_bytes(), &mut buf),
                form.as_bytes()
            );
        }
        for bad in [
            "[::1",
            "::1",
            "[::g]",
            "[1:2:3:4:5:6:7:8:9]",
            "[::1%25eth0]",
            "[::1]x",
        ] {
            assert_eq!(canon(bad), None, "{bad}");
        }
    }
}
