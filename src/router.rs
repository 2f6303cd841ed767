//! Route table, compiled per worker from the config.
//!
//! # How the winning route is chosen
//! 1. **Host.** Routes listing the request's exact host are tried first, then routes whose
//!    `*.suffix` wildcard matches it (longest suffix first), then routes with no `hosts`.
//!    Host comparison ignores case and the port. If no route of a host class matches the rest
//!    of the request, the next class is tried.
//! 2. **Path,** within one host class: an exact `path` first, then `path_regex` routes in
//!    config order, then `path_prefix` routes from the longest prefix to the shortest (a route
//!    with no path condition is a prefix of "/").
//! 3. **Conditions.** Among routes with the same path condition, those with more conditions
//!    (`methods`, `headers`) are tried first; ties go to the route written first.
//!
//! Paths are matched on the raw request path (no percent-decoding, no dot-segment removal);
//! the query string is not part of the path.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use regex::bytes::Regex;

use crate::config::{Config, HeaderOps, RouteConfig};
use crate::http::encode::{put_header, put_status_line, reason_phrase};
use crate::http::request::RequestHead;
use crate::ratelimit::{Concurrency, Limit};
use crate::retry::RetryPolicy;
use std::time::Duration;

#[derive(Debug)]
pub enum PathMatch {
    Any,
    Exact(Box<[u8]>),
    Prefix(Box<[u8]>),
    Regex(Regex),
}

/// A header name (lower case) and value.
pub type HeaderPair = (Box<[u8]>, Box<[u8]>);

/// Header rewrites, names lower case.
#[derive(Debug, Default)]
pub struct HeaderRules {
    pub add: Vec<HeaderPair>,
    pub set: Vec<HeaderPair>,
    pub remove: Vec<Box<[u8]>>,
}

impl HeaderRules {
    fn compile(ops: &HeaderOps) -> Self {
        let b = |s: &str| s.as_bytes().to_vec().into_boxed_slice();
        HeaderRules {
            add: ops.add.iter().map(|(k, v)| (b(&k.0), b(v))).collect(),
            set: ops.set.iter().map(|(k, v)| (b(&k.0), b(v))).collect(),
            remove: ops.remove.iter().map(|k| b(&k.0)).collect(),
        }
    }

    /// Is an incoming header of this name dropped (removed, or replaced by a `set`)?
    #[inline]
    pub fn drops(&self, name: &[u8]) -> bool {
        (!self.remove.is_empty() && self.remove.iter().any(|r| r.eq_ignore_ascii_case(name)))
            || (!self.set.is_empty() && self.set.iter().any(|(r, _)| r.eq_ignore_ascii_case(name)))
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
}

#[derive(Debug)]
pub enum Action {
    Proxy { upstream: usize },
    Direct(DirectResponse),
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
    /// Who may call the route (None: anyone).
    pub auth: Option<crate::auth::Policy>,
    /// What becomes of request trailer fields: dropped, or forwarded when RFC 9110 §6.5.1
    /// allows them in a trailer.
    pub trailers: crate::http::chunked::TrailerPolicy,
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
    fn conditions(&self) -> usize {
        self.methods.len().min(1) + self.headers.len()
    }

    #[inline]
    fn matches_rest(&self, req: &RequestHead) -> bool {
        if !self.methods.is_empty() {
            let m = req.method_str();
            if !self.methods.iter().any(|x| &**x == m) {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            req.header_values(name)
                .any(|v| crate::http::trim_ows(v) == &**want)
        })
    }

    /// Writes the path and query to send upstream.
    pub fn write_target(&self, path_query: &[u8], out: &mut BytesMut) {
        let pq = if path_query.is_empty() || path_query[0] == b'?' {
            // Absolute-form target with an empty path.
            out.put_u8(b'/');
            path_query
        } else {
            path_query
        };
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

#[derive(Debug, Default)]
struct Bucket {
    exact: HashMap<Box<[u8]>, Vec<usize>>,
    regex: Vec<usize>,
    prefix: Vec<usize>,
}

impl Bucket {
    fn find(&self, routes: &[Route], req: &RequestHead, path: &[u8]) -> Option<usize> {
        if let Some(list) = self.exact.get(path) {
            if let Some(&i) = list.iter().find(|&&i| routes[i].matches_rest(req)) {
                return Some(i);
            }
        }
        for &i in &self.regex {
            if let PathMatch::Regex(re) = &routes[i].path {
                if re.is_match(path) && routes[i].matches_rest(req) {
                    return Some(i);
                }
            }
        }
        for &i in &self.prefix {
            let ok = match &routes[i].path {
                PathMatch::Prefix(p) => path.starts_with(p),
                _ => true,
            };
            if ok && routes[i].matches_rest(req) {
                return Some(i);
            }
        }
        None
    }

    fn sort(&mut self, routes: &[Route]) {
        let key = |i: &usize| (std::cmp::Reverse(routes[*i].conditions()), *i);
        for list in self.exact.values_mut() {
            list.sort_by_key(key);
        }
        self.regex.sort_by_key(key);
        self.prefix.sort_by_key(|i| {
            let len = match &routes[*i].path {
                PathMatch::Prefix(p) => p.len(),
                _ => 0,
            };
            (
                std::cmp::Reverse(len),
                std::cmp::Reverse(routes[*i].conditions()),
                *i,
            )
        });
    }
}

#[derive(Debug, Default)]
pub struct Router {
    pub routes: Vec<Route>,
    exact_hosts: HashMap<Box<[u8]>, Bucket>,
    /// (".example.com", bucket), longest suffix first.
    wildcard_hosts: Vec<(Box<[u8]>, Bucket)>,
    any_host: Bucket,
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
    /// Compiles the routes; `seed` varies per worker (retry jitter).
    pub fn new(cfg: &Config, seed: u64) -> Router {
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
                    .and_then(|a| crate::auth::Policy::compile(&cfg.auth, a));
                let hidden = r.auth.as_ref().map_or(&[][..], |p| &p.hidden[..]);
                for h in identity.iter().chain(hidden) {
                    if !r.request_headers.remove.contains(h) {
                        r.request_headers.remove.push(h.clone());
                    }
                }
                r
            })
            .collect();
        let mut exact_hosts: HashMap<Box<[u8]>, Bucket> = HashMap::new();
        let mut wildcard_hosts: Vec<(Box<[u8]>, Bucket)> = Vec::new();
        let mut any_host = Bucket::default();
        for (i, rc) in cfg.routes.iter().enumerate() {
            if rc.hosts.is_empty() {
                add_route(&mut any_host, &routes, i);
            }
            for h in &rc.hosts {
                let h = h.to_ascii_lowercase();
                let bucket = if let Some(suffix) = h.strip_prefix('*') {
                    let key: Box<[u8]> = suffix.as_bytes().into();
                    match wildcard_hosts.iter().position(|(k, _)| *k == key) {
                        Some(p) => &mut wildcard_hosts[p].1,
                        None => {
                            wildcard_hosts.push((key, Bucket::default()));
                            &mut wildcard_hosts.last_mut().expect("just pushed").1
                        }
                    }
                } else {
                    exact_hosts.entry(h.as_bytes().into()).or_default()
                };
                add_route(bucket, &routes, i);
            }
        }
        wildcard_hosts.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        for b in exact_hosts.values_mut() {
            b.sort(&routes);
        }
        for (_, b) in wildcard_hosts.iter_mut() {
            b.sort(&routes);
        }
        any_host.sort(&routes);
        Router {
            routes,
            exact_hosts,
            wildcard_hosts,
            any_host,
        }
    }

    /// The route for a request, by the rules in the module documentation.
    pub fn find(&self, req: &RequestHead) -> Option<&Route> {
        self.find_index(req).map(|i| &self.routes[i])
    }

    pub fn find_index(&self, req: &RequestHead) -> Option<usize> {
        let path = req.path_bytes();
        if let Some(host) = req.host_bytes() {
            let host = host_without_port(host);
            let mut lower = [0u8; 256];
            let host = if host.len() <= lower.len() && host.iter().any(u8::is_ascii_uppercase) {
                for (d, s) in lower.iter_mut().zip(host) {
                    *d = s.to_ascii_lowercase();
                }
                &lower[..host.len()]
            } else {
                host
            };
            if !self.exact_hosts.is_empty() {
                if let Some(b) = self.exact_hosts.get(host) {
                    if let Some(i) = b.find(&self.routes, req, path) {
                        return Some(i);
                    }
                }
            }
            for (suffix, b) in &self.wildcard_hosts {
                if host.len() > suffix.len() && host.ends_with(suffix) {
                    if let Some(i) = b.find(&self.routes, req, path) {
                        return Some(i);
                    }
                }
            }
        }
        self.any_host.find(&self.routes, req, path)
    }
}

fn add_route(bucket: &mut Bucket, routes: &[Route], i: usize) {
    match &routes[i].path {
        PathMatch::Exact(p) => bucket.exact.entry(p.clone()).or_default().push(i),
        PathMatch::Regex(_) => bucket.regex.push(i),
        PathMatch::Prefix(_) | PathMatch::Any => bucket.prefix.push(i),
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
            Action::Direct(DirectResponse {
                status: d.status,
                head: head.freeze(),
                body: Bytes::from(d.body.clone().into_bytes()),
            })
        }
        (None, None) => unreachable!("validated at load: a route has upstream or direct"),
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

    #[test]
    fn empty_absolute_form_path_becomes_slash() {
        assert_eq!(target("", ""), "/");
        assert_eq!(target("", "?q=1"), "/?q=1");
    }
}
