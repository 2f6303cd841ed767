//! Route table: the routes compiled per worker, and a lookup table ([`RouteTable`]) that can
//! be built once per config and shared by every worker.
//!
//! # How the winning route is chosen
//! 1. **Host.** Routes listing the request's exact host are tried first, then routes whose
//!    `*.suffix` wildcard matches it (longest suffix first), then routes with no `hosts`.
//!    Host comparison ignores case, the port and trailing dots. If no route of a host class
//!    matches the rest of the request, the next class is tried.
//! 2. **Path,** within one host class: an exact `path` first, then `path_regex` routes in
//!    config order, then `path_prefix` routes from the longest prefix to the shortest (a route
//!    with no path condition is a prefix of "/").
//! 3. **Conditions.** Among routes with the same path condition, those with more conditions
//!    (`methods`, `headers`) are tried first; ties go to the route written first.
//!
//! Paths are matched on the raw request path (no percent-decoding, no dot-segment removal);
//! the query string is not part of the path.
//!
//! # How it is found quickly
//! The rules above read as a walk over every route; the table gets the same answer without
//! looking at routes whose host or path cannot match ([`table`]): exact hosts and exact paths
//! in hash maps, `*.suffix` hosts and path prefixes in radix trees ([`tree`]) walked once per
//! request from the longest match to the shortest, and all `path_regex` routes of a host class
//! in one multi-pattern regex (chunks of [`table::REGEX_CHUNK`]) that reports every matching
//! pattern in one pass, tried in precedence order. `tests/routing.rs` checks the table against
//! the linear algorithm on random route sets and requests.

mod table;
mod tree;

pub use table::{canonical_ip_literal, trim_root_dots, RouteTable, TableStats};

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use regex::bytes::Regex;

use crate::config::{Config, HeaderOps, RouteConfig};
use crate::http::encode::{put_header, put_status_line, reason_phrase};
use crate::http::request::RequestHead;
use crate::ratelimit::{Concurrency, Limit};
use crate::retry::RetryPolicy;
use std::time::Duration;
use table::Scratch;

#[derive(Debug)]
pub enum PathMatch {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Regex(Regex),
}

/// Whether header names `a` (lower case) and `b` are the same once ASCII case is ignored and
/// `_` read as `-`, as CGI/WSGI/Rack/PHP-FPM servers read them (both become `HTTP_X_NAME`).
#[inline]
fn same_cgi_name(a: &[u8], b: &[u8]) -> bool {
    let fold = |c: u8| {
        if c == b'_' {
            b'-'
        } else {
            c.to_ascii_lowercase()
        }
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| fold(*x) == fold(*y))
}

/// A header name (lower case) and value.
pub type HeaderPair = (Box<[u8]>, Box<[u8]>);

/// Header rewrites, names lower case. Boxed slices rather than vectors: a `Route` is copied
/// into every worker, and these are fixed once compiled.
#[derive(Debug, Default)]
pub struct HeaderRules {
    pub add: Box<[HeaderPair]>,
    pub set: Box<[HeaderPair]>,
    pub remove: Box<[Box<[u8]>]>,
    /// Identity headers (the consumer, forwarded claims, mTLS subjects): only the gateway sets
    /// them, so a client's copy is removed under any spelling that a CGI-style server reads as
    /// the same name, `_` for `-` (`x_consumer`, `x-user_id`), which a listener with
    /// `allow_underscores_in_headers` lets through.
    pub identity: Box<[Box<[u8]>]>,
}

impl HeaderRules {
    fn compile(ops: &HeaderOps) -> Self {
        let b = |s: &str| s.as_bytes().to_vec().into_boxed_slice();
        HeaderRules {
            add: ops.add.iter().map(|(k, v)| (b(&k.0), b(v))).collect(),
            set: ops.set.iter().map(|(k, v)| (b(&k.0), b(v))).collect(),
            remove: ops.remove.iter().map(|k| b(&k.0)).collect(),
            identity: Box::default(),
        }
    }

    /// Whether any header is dropped ([`HeaderRules::drops`]): a route without `remove` or
    /// `set` rules (most) need not ask per line.
    #[inline]
    pub fn drops_any(&self) -> bool {
        !self.remove.is_empty() || !self.set.is_empty()
    }

    /// Is an incoming header of this name dropped (removed, or replaced by a `set`)?
    #[inline]
    pub fn drops(&self, name: &[u8]) -> bool {
        (!self.remove.is_empty() && self.remove.iter().any(|r| r.eq_ignore_ascii_case(name)))
            || (!self.set.is_empty() && self.set.iter().any(|(r, _)| r.eq_ignore_ascii_case(name)))
    }

    /// Does a rule name this header (`remove`, `set` or `add`): the route decides it, so the
    /// gateway writes none of its own (as for `Date`, RFC 9110 §6.6.1: a second line of a
    /// singleton field would break RFC 9110 §5.3).
    #[inline]
    pub fn decides(&self, name: &[u8]) -> bool {
        self.drops(name)
            || (!self.add.is_empty() && self.add.iter().any(|(r, _)| r.eq_ignore_ascii_case(name)))
    }

    /// Whether `name` is one of the identity headers under another spelling, `_` for `-`
    /// (`x_consumer`): looked at only for a head with such names (`underscore_names`; the
    /// exact spellings are in `remove`), and for trailers.
    #[cold]
    pub fn drops_identity_spelling(&self, name: &[u8]) -> bool {
        self.identity.iter().any(|r| same_cgi_name(r, name))
    }

    /// Writes the `set` and `add` headers.
    pub fn put(&self, buf: &mut BytesMut) {
        for (k, v) in self.set.iter().chain(self.add.iter()) {
            put_header(buf, k, v);
        }
    }
}

#[derive(Debug)]
pub enum Rewrite {
    None,
    /// Remove this prefix from the path when present ("" left becomes "/").
    Strip(Box<[u8]>),
    /// Replace the route's `path_prefix` (first) with the second.
    Replace(Box<[u8]>, Box<[u8]>),
}

#[derive(Debug)]
pub enum HostPolicy {
    /// Forward the client's Host.
    Preserve,
    /// Use the chosen endpoint's configured address.
    Endpoint,
    /// Use this value.
    Set(Box<[u8]>),
}

/// A fixed response served without an upstream. `head` holds the status line and headers but
/// not the framing headers, which depend on the request.
#[derive(Debug)]
pub struct DirectResponse {
    pub status: u16,
    pub head: Bytes,
    pub body: Bytes,
    /// Whether `head` (the configured `headers`) holds a Date: then the gateway writes none
    /// (Date is one value, RFC 9110 §5.3).
    pub own_date: bool,
}

#[derive(Debug)]
pub enum Action {
    Proxy {
        upstream: usize,
    },
    /// Boxed: most routes proxy, and a `Route` is copied into every worker.
    Direct(Box<DirectResponse>),
    /// Several upstream calls, one JSON answer (see `crate::compose`).
    Compose(Box<crate::compose::Plan>),
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub path: PathMatch,
    pub methods: Vec<Box<[u8]>>,
    pub headers: Vec<HeaderPair>,
    pub action: Action,
    pub rewrite: Rewrite,
    pub host: HostPolicy,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    pub max_body_bytes: Option<u64>,
    pub retry: Option<RetryPolicy>,
    pub timeouts: RouteTimeouts,
    /// Rate limits, in config order (ids unique across routes).
    pub limits: Vec<Limit>,
    pub concurrency: Option<Concurrency>,
    /// Requests without a verified client certificate get a 403.
    pub require_client_cert: bool,
    /// Who may call the route (None: anyone). Boxed: a `Route` is copied into every worker,
    /// and most routes have none.
    pub auth: Option<Box<crate::auth::Policy>>,
    /// What becomes of request trailer fields: dropped, or forwarded when RFC 9110 §6.5.1
    /// allows them in a trailer.
    pub trailers: crate::http::chunked::TrailerPolicy,
    /// Response caching (None: the route does not cache).
    pub cache: Option<Box<crate::cache::RoutePolicy>>,
}

/// Per-route overrides of the global timeouts.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteTimeouts {
    pub client_body: Option<Duration>,
    pub client_write: Option<Duration>,
    pub upstream_connect: Option<Duration>,
    pub upstream_response: Option<Duration>,
    pub upstream_body: Option<Duration>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RetryPolicy(attempts={})", self.attempts)
    }
}

impl Route {
    #[inline]
    fn matches_rest(&self, req: &RequestHead) -> bool {
        if !self.methods.is_empty() {
            let m = req.method_str();
            // A route for GET serves HEAD too (RFC 9110 §9.3.2: HEAD is GET without the
            // content; an origin runs the same handler), so that a HEAD cannot pass by the
            // GET route's policies to a later route.
            if !self
                .methods
                .iter()
                .any(|x| &**x == m || (m == b"HEAD" && &**x == b"GET"))
            {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            req.header_values(name)
                .any(|v| crate::http::trim_ows(v) == &**want)
        })
    }

    /// Whether the rewrite would join the replacement's last segment and the rest of `path`
    /// (the request's path, free of dot segments: the parser refused them) into a `.` or `..`
    /// segment, with or without `;` parameters: `path_prefix = "/v1"` with
    /// `replace_prefix = "/pub/"` makes `/v1../admin` into `/pub/../admin`, which the upstream
    /// resolves to `/admin` (RFC 3986 §5.2.4), outside what the route exposes. Only the seam
    /// can make one: the replacement holds no dot segment (refused at load), and a stripped
    /// prefix ends at a segment boundary.
    pub fn rewrite_makes_dot_segment(&self, path: &[u8]) -> bool {
        let Rewrite::Replace(from, to) = &self.rewrite else {
            return false;
        };
        let Some(rest) = path.strip_prefix(&**from) else {
            return false;
        };
        // The replacement's last (partial) segment; "" when it ends with '/' or is empty (then
        // the encoder puts a '/' before `rest`).
        let tail = to
            .iter()
            .rposition(|b| *b == b'/')
            .map_or(&to[..], |p| &to[p + 1..]);
        let seam = tail
            .iter()
            .chain(rest)
            .take_while(|b| !matches!(b, b'/' | b';' | b'?'));
        let mut dots = 0;
        for b in seam {
            if *b != b'.' || dots == 2 {
                return false;
            }
            dots += 1;
        }
        dots > 0
    }

    /// Writes the path and query to send upstream.
    pub fn write_target(&self, path_query: &[u8], out: &mut BytesMut) {
        if path_query.is_empty() || path_query[0] == b'?' {
            // An absolute-form target with an empty path: its path is "/" (RFC 9112 §3.2.2),
            // rewritten as "/" is (a rewrite of "/?q" is that of "/" then "?q").
            self.write_rewritten(b"/", out);
            out.put_slice(path_query);
        } else {
            self.write_rewritten(path_query, out);
        }
    }

    /// Writes `pq` (a path, then maybe a query) with the route's rewrite applied.
    fn write_rewritten(&self, pq: &[u8], out: &mut BytesMut) {
        match &self.rewrite {
            Rewrite::None => out.put_slice(pq),
            // Only at a segment boundary: "/api" strips "/api/x" and "/api?q", not "/apiary".
            Rewrite::Strip(p) => match pq.strip_prefix(&**p) {
                Some(rest) if rest.is_empty() || rest[0] == b'?' => {
                    out.put_u8(b'/');
                    out.put_slice(rest);
                }
                Some(rest) if rest[0] == b'/' => out.put_slice(rest),
                Some(rest) if p.ends_with(b"/") => {
                    out.put_u8(b'/');
                    out.put_slice(rest);
                }
                _ => out.put_slice(pq),
            },
            Rewrite::Replace(from, to) => match pq.strip_prefix(&**from) {
                Some(rest) => {
                    out.put_slice(to);
                    if to.is_empty() && (rest.is_empty() || rest[0] != b'/') {
                        out.put_u8(b'/');
                    }
                    out.put_slice(rest);
                }
                None => out.put_slice(pq),
            },
        }
    }
}

/// The compiled routes of one worker and the lookup table (possibly shared with the other
/// workers) that picks among them.
#[derive(Debug, Default)]
pub struct Router {
    pub routes: Vec<Route>,
    table: Arc<RouteTable>,
    /// This worker's regex caches for the shared table.
    scratch: RefCell<Scratch>,
}

/// Host without port, for matching. IPv6 literals keep their brackets.
#[inline]
pub fn host_without_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        return match host.iter().position(|b| *b == b']') {
            Some(p) => &host[..=p],
            None => host,
        };
    }
    match host.iter().rposition(|b| *b == b':') {
        Some(p) => &host[..p],
        None => host,
    }
}

impl Router {
    /// Compiles the routes and their lookup table; `seed` varies per worker (retry jitter).
    pub fn new(cfg: &Config, seed: u64) -> Router {
        Router::with_table(cfg, seed, RouteTable::build(cfg))
    }

    /// Compiles the routes around a lookup table built once from the same `cfg` with
    /// [`RouteTable::build`] and shared by every worker.
    pub fn with_table(cfg: &Config, seed: u64, table: Arc<RouteTable>) -> Router {
        let upstream_index: HashMap<&str, usize> = cfg
            .upstreams
            .keys()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let mut next_limit = 0u32;
        // Identity headers are the gateway's to set: client-sent copies go on every route.
        let identity = crate::auth::WorkerAuth::identity_headers(cfg);
        let routes: Vec<Route> = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, rc)| {
                let mut r = compile_route(i, rc, &upstream_index, seed);
                r.limits = rc
                    .rate_limits
                    .iter()
                    .map(|l| {
                        next_limit += 1;
                        Limit::new(next_limit - 1, &r.name, l)
                    })
                    .collect();
                for q in &rc.quotas {
                    next_limit += 1;
                    r.limits.push(Limit::quota(next_limit - 1, &r.name, q));
                }
                r.auth = rc
                    .auth
                    .as_ref()
                    .and_then(|a| crate::auth::Policy::compile(&cfg.auth, a))
                    .map(Box::new);
                let hidden = r.auth.as_ref().map_or(&[][..], |p| &p.hidden[..]);
                let mut remove = std::mem::take(&mut r.request_headers.remove).into_vec();
                for h in identity.iter().chain(hidden) {
                    if !remove.contains(h) {
                        remove.push(h.clone());
                    }
                }
                r.request_headers.remove = remove.into_boxed_slice();
                r.request_headers.identity = identity.clone().into_boxed_slice();
                r.cache = crate::cache::RoutePolicy::compile(cfg, rc, &r.name);
                r
            })
            .collect();
        let scratch = RefCell::new(Scratch::new(&table));
        Router {
            routes,
            table,
            scratch,
        }
    }

    /// The lookup table (to share it, or for its sizes).
    pub fn table(&self) -> &Arc<RouteTable> {
        &self.table
    }

    /// The route for a request, by the rules in the module documentation.
    pub fn find(&self, req: &RequestHead) -> Option<&Route> {
        self.find_index(req).map(|i| &self.routes[i])
    }

    pub fn find_index(&self, req: &RequestHead) -> Option<usize> {
        match self.scratch.try_borrow_mut() {
            Ok(mut s) => self.table.find(&self.routes, req, &mut s),
            // Not reached (lookups do not nest); a fresh scratch keeps it panic-free.
            Err(_) => self
                .table
                .find(&self.routes, req, &mut Scratch::new(&self.table)),
        }
    }
}

fn compile_route(i: usize, rc: &RouteConfig, upstreams: &HashMap<&str, usize>, seed: u64) -> Route {
    let b = |s: &str| -> Box<[u8]> { s.as_bytes().into() };
    let path = if let Some(p) = &rc.path {
        PathMatch::Exact(b(p))
    } else if let Some(p) = &rc.path_prefix {
        PathMatch::Prefix(b(p))
    } else if let Some(re) = &rc.path_regex {
        // Validated at load.
        PathMatch::Regex(Regex::new(re).expect("path_regex validated at load"))
    } else {
        PathMatch::Any
    };
    let action = match (&rc.upstream, &rc.direct) {
        (Some(u), _) => Action::Proxy {
            upstream: upstreams[u.get_ref().as_str()],
        },
        (None, Some(d)) => {
            let mut head = BytesMut::new();
            put_status_line(&mut head, d.status, reason_phrase(d.status).as_bytes());
            for (k, v) in &d.headers {
                put_header(&mut head, k.0.as_bytes(), v.as_bytes());
            }
            Action::Direct(Box::new(DirectResponse {
                status: d.status,
                head: head.freeze(),
                body: Bytes::from(d.body.clone().into_bytes()),
                own_date: d
                    .headers
                    .iter()
                    .any(|(k, _)| k.0.eq_ignore_ascii_case("date")),
            }))
        }
        (None, None) => {
            let c = rc
                .compose
                .as_ref()
                .expect("validated at load: a route has upstream, direct or compose");
            let group = |n: &str| upstreams.get(n).copied();
            let plan = crate::compose::Plan::compile(c, rc.path_regex.as_deref(), &group)
                .expect("compose validated at load");
            Action::Compose(Box::new(plan))
        }
    };
    let rewrite = match (&rc.strip_prefix, &rc.replace_prefix, &rc.path_prefix) {
        (Some(s), _, _) => Rewrite::Strip(b(s)),
        (None, Some(to), Some(from)) => Rewrite::Replace(b(from), b(to)),
        _ => Rewrite::None,
    };
    let host = match (&rc.set_host, rc.preserve_host) {
        (Some(h), _) => HostPolicy::Set(b(h)),
        (None, true) => HostPolicy::Preserve,
        (None, false) => HostPolicy::Endpoint,
    };
    Route {
        name: rc.name.clone().unwrap_or_else(|| format!("route#{i}")),
        path,
        methods: rc.methods.iter().map(|m| b(m)).collect(),
        headers: rc.headers.iter().map(|(k, v)| (b(&k.0), b(v))).collect(),
        action,
        rewrite,
        host,
        request_headers: HeaderRules::compile(&rc.request_headers),
        response_headers: HeaderRules::compile(&rc.response_headers),
        max_body_bytes: rc.max_body_bytes.map(|s| s.0),
        trailers: rc.trailers.policy(),
        retry: rc
            .retry
            .as_ref()
            .map(|r| RetryPolicy::new(r, seed ^ i as u64)),
        timeouts: rc
            .timeouts
            .as_ref()
            .map(|t| RouteTimeouts {
                client_body: t.client_body.map(|d| d.0),
                client_write: t.client_write.map(|d| d.0),
                upstream_connect: t.upstream_connect.map(|d| d.0),
                upstream_response: t.upstream_response.map(|d| d.0),
                upstream_body: t.upstream_body.map(|d| d.0),
            })
            .unwrap_or_default(),
        limits: Vec::new(),
        concurrency: rc.concurrency.as_ref().map(|c| Concurrency {
            id: i as u32,
            key: c.key.clone(),
            max: c.max,
        }),
        require_client_cert: rc.require_client_cert,
        auth: None,
        cache: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(toml_route: &str, pq: &str) -> String {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n{toml_route}\n");
        let cfg = Config::parse(&src, "t").unwrap();
        let r = Router::new(&cfg, 1);
        let mut out = BytesMut::new();
        r.routes[0].write_target(pq.as_bytes(), &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn strip_prefix_only_at_segment_boundaries() {
        let route = "strip_prefix = \"/api\"";
        assert_eq!(target(route, "/api/users?x=1"), "/users?x=1");
        assert_eq!(target(route, "/api"), "/");
        assert_eq!(target(route, "/api?x"), "/?x");
        assert_eq!(target(route, "/apiary"), "/apiary");
        assert_eq!(target(route, "/other"), "/other");
        assert_eq!(target("strip_prefix = \"/api/\"", "/api/users"), "/users");
    }

    #[test]
    fn replace_prefix() {
        let route = "path_prefix = \"/v1/\"\nreplace_prefix = \"/internal/\"";
        assert_eq!(target(route, "/v1/a?b"), "/internal/a?b");
        let route = "path_prefix = \"/v1\"\nreplace_prefix = \"\"";
        assert_eq!(target(route, "/v1"), "/");
        assert_eq!(target(route, "/v1/x"), "/x");
    }

    fn makes_dot_segment(toml_route: &str, path: &str) -> bool {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n{toml_route}\n");
        let cfg = Config::parse(&src, "t").unwrap();
        Router::new(&cfg, 1).routes[0].rewrite_makes_dot_segment(path.as_bytes())
    }

    /// RFC 3986 §5.2.4: the seam of a replaced prefix must not become a dot segment.
    #[test]
    fn a_replaced_prefix_never_makes_a_dot_segment() {
        let pub_ = "path_prefix = \"/v1\"\nreplace_prefix = \"/pub/\"";
        for p in [
            "/v1..",
            "/v1../admin",
            "/v1.",
            "/v1./x",
            "/v1..;x/y",
            "/v1.;",
        ] {
            assert!(makes_dot_segment(pub_, p), "{p}");
        }
        for p in [
            "/v1/a", "/v1", "/v1...", "/v1.a", "/v1a", "/v2..", "/v1/..x",
        ] {
            assert!(!makes_dot_segment(pub_, p), "{p}");
        }
        let root = "path_prefix = \"/v2\"\nreplace_prefix = \"\"";
        assert!(makes_dot_segment(root, "/v2.."));
        assert!(makes_dot_segment(root, "/v2../admin"));
        assert!(!makes_dot_segment(root, "/v2/a"));
        let dot = "path_prefix = \"/v3\"\nreplace_prefix = \"/p.\"";
        assert!(!makes_dot_segment(dot, "/v3./x"), "`p..` is a name");
        assert!(!makes_dot_segment("strip_prefix = \"/api\"", "/api.."));
    }

    #[test]
    fn empty_absolute_form_path_becomes_slash() {
        assert_eq!(target("", ""), "/");
        assert_eq!(target("", "?q=1"), "/?q=1");
        // And is rewritten as "/" is.
        let root = "path_prefix = \"/\"\nreplace_prefix = \"/pub/\"";
        assert_eq!(target(root, ""), "/pub/");
        assert_eq!(target(root, "?q=1"), "/pub/?q=1");
        assert_eq!(target(root, "/?q=1"), "/pub/?q=1");
        let gone = "path_prefix = \"/\"\nreplace_prefix = \"\"";
        assert_eq!(target(gone, "?q"), "/?q");
        assert_eq!(target("strip_prefix = \"/\"", "?q"), "/?q");
    }
}
