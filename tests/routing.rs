//! The indexed router (radix trees, host map, one-pass regex sets) against the linear
//! algorithm it replaced, kept here as the reference: random route sets (exact and wildcard
//! hosts, exact / prefix / regex paths, methods, headers) and random requests must pick the
//! same route. Also: regex tables larger than one multi-pattern chunk, and the memory a table
//! of 10,000 prefix routes takes per worker.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use proptest::prelude::*;

use ringway::config::Config;
use ringway::http::request::{parse_request, Limits, RequestHead};
use ringway::router::{host_without_port, PathMatch, Route, RouteTable, Router};

/// Counts allocations and live heap bytes of the current thread (tests run in parallel), for
/// the memory-per-route and no-allocation checks.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static ALLOCS: Cell<isize> = const { Cell::new(0) };
}

fn bump(c: &'static std::thread::LocalKey<Cell<isize>>, by: isize) {
    // try_with: the thread's locals may already be gone while it exits.
    let _ = c.try_with(|c| c.set(c.get() + by));
}

fn read(c: &'static std::thread::LocalKey<Cell<isize>>) -> isize {
    c.with(Cell::get)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        bump(&ALLOCS, 1);
        bump(&LIVE, l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        bump(&LIVE, -(l.size() as isize));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        bump(&ALLOCS, 1);
        bump(&LIVE, n as isize - l.size() as isize);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---- the reference: the linear router as it was before the index ----

#[derive(Default)]
struct RefBucket {
    exact: HashMap<Vec<u8>, Vec<usize>>,
    regex: Vec<usize>,
    prefix: Vec<usize>,
}

struct Reference<'a> {
    routes: &'a [Route],
    exact_hosts: HashMap<Vec<u8>, RefBucket>,
    wildcard_hosts: Vec<(Vec<u8>, RefBucket)>,
    any_host: RefBucket,
}

fn conditions(r: &Route) -> usize {
    r.methods.len().min(1) + r.headers.len()
}

fn matches_rest(r: &Route, req: &RequestHead) -> bool {
    (r.methods.is_empty()
        || r.methods
            .iter()
            .any(|m| &**m == req.method_str() || (req.method_str() == b"HEAD" && &**m == b"GET")))
        && r.headers.iter().all(|(name, want)| {
            req.header_values(name)
                .any(|v| ringway::http::trim_ows(v) == &**want)
        })
}

impl RefBucket {
    fn add(&mut self, routes: &[Route], i: usize) {
        match &routes[i].path {
            PathMatch::Exact(p) => self.exact.entry(p.to_vec()).or_default().push(i),
            PathMatch::Regex(_) => self.regex.push(i),
            PathMatch::Prefix(_) | PathMatch::Any => self.prefix.push(i),
        }
    }

    fn sort(&mut self, routes: &[Route]) {
        let key = |i: &usize| (std::cmp::Reverse(conditions(&routes[*i])), *i);
        for l in self.exact.values_mut() {
            l.sort_by_key(key);
        }
        self.regex.sort_by_key(key);
        self.prefix.sort_by_key(|i| {
            let len = match &routes[*i].path {
                PathMatch::Prefix(p) => p.len(),
                _ => 0,
            };
            (
                std::cmp::Reverse(len),
                std::cmp::Reverse(conditions(&routes[*i])),
                *i,
            )
        });
    }

    fn find(&self, routes: &[Route], req: &RequestHead, path: &[u8]) -> Option<usize> {
        if let Some(l) = self.exact.get(path) {
            if let Some(&i) = l.iter().find(|&&i| matches_rest(&routes[i], req)) {
                return Some(i);
            }
        }
        for &i in &self.regex {
            if let PathMatch::Regex(re) = &routes[i].path {
                if re.is_match(path) && matches_rest(&routes[i], req) {
                    return Some(i);
                }
            }
        }
        for &i in &self.prefix {
            let ok = match &routes[i].path {
                PathMatch::Prefix(p) => path.starts_with(p),
                _ => true,
            };
            if ok && matches_rest(&routes[i], req) {
                return Some(i);
            }
        }
        None
    }
}

impl<'a> Reference<'a> {
    fn new(cfg: &Config, routes: &'a [Route]) -> Self {
        let mut r = Reference {
            routes,
            exact_hosts: HashMap::new(),
            wildcard_hosts: Vec::new(),
            any_host: RefBucket::default(),
        };
        for (i, rc) in cfg.routes.iter().enumerate() {
            if rc.hosts.is_empty() {
                r.any_host.add(routes, i);
            }
            for h in &rc.hosts {
                let h = h.trim_end_matches('.').to_ascii_lowercase();
                let b = if let Some(s) = h.strip_prefix('*') {
                    let key = s.as_bytes().to_vec();
                    match r.wildcard_hosts.iter().position(|(k, _)| *k == key) {
                        Some(p) => &mut r.wildcard_hosts[p].1,
                        None => {
                            r.wildcard_hosts.push((key, RefBucket::default()));
                            &mut r.wildcard_hosts.last_mut().unwrap().1
                        }
                    }
                } else {
                    r.exact_hosts.entry(h.into_bytes()).or_default()
                };
                b.add(routes, i);
            }
        }
        r.wildcard_hosts
            .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        for b in r.exact_hosts.values_mut() {
            b.sort(routes);
        }
        for (_, b) in r.wildcard_hosts.iter_mut() {
            b.sort(routes);
        }
        r.any_host.sort(routes);
        r
    }

    fn find(&self, req: &RequestHead) -> Option<usize> {
        let path = req.path_bytes();
        if let Some(host) = req.host_bytes() {
            let host = host_without_port(host);
            let host = &host[..host.iter().rposition(|b| *b != b'.').map_or(0, |p| p + 1)];
            let lower;
            let host = if host.len() <= 256 {
                lower = host.to_ascii_lowercase();
                &lower[..]
            } else {
                host
            };
            if let Some(b) = self.exact_hosts.get(host) {
                if let Some(i) = b.find(self.routes, req, path) {
                    return Some(i);
                }
            }
            for (suffix, b) in &self.wildcard_hosts {
                if host.len() > suffix.len() && host.ends_with(suffix) {
                    if let Some(i) = b.find(self.routes, req, path) {
                        return Some(i);
                    }
                }
            }
        }
        self.any_host.find(self.routes, req, path)
    }
}

// ---- generators ----

const HOSTS: &[&str] = &[
    "a.test",
    "b.a.test",
    "*.a.test",
    "*.test",
    "*.b.a.test",
    "A.Test",
    "[::1]",
    "*.x",
    "dot.test.",
];
const EXACT: &[&str] = &["/", "/a", "/a/b", "/ab", "/b", "/a/1"];
const PREFIX: &[&str] = &["/", "/a", "/a/", "/ab", "/a/b", "/b", "/a/1"];
const REGEX: &[&str] = &[
    "^/a",
    "b$",
    "^/a/[0-9]+$",
    "a",
    "^/$",
    "x",
    "^/(a|b)/",
    "(?-u:\\xff)",
];
const METHODS: &[&str] = &["GET", "POST"];

#[derive(Debug, Clone)]
struct GenRoute {
    hosts: Vec<usize>,
    path: (u8, usize),
    methods: Vec<usize>,
    headers: Vec<(u8, u8)>,
}

fn gen_route() -> impl Strategy<Value = GenRoute> {
    (
        prop::collection::vec(0..HOSTS.len(), 0..3),
        (0u8..4, 0usize..8),
        prop::collection::vec(0..METHODS.len(), 0..3),
        prop::collection::vec((0u8..2, 0u8..2), 0..3),
    )
        .prop_map(|(hosts, path, methods, headers)| GenRoute {
            hosts,
            path,
            methods,
            headers,
        })
}

fn toml_of(routes: &[GenRoute]) -> String {
    let mut s = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for r in routes {
        s.push_str("[[routes]]\nupstream = \"u\"\n");
        if !r.hosts.is_empty() {
            let hs: Vec<String> = r.hosts.iter().map(|&h| format!("{:?}", HOSTS[h])).collect();
            s.push_str(&format!("hosts = [{}]\n", hs.join(", ")));
        }
        let (kind, k) = r.path;
        match kind {
            0 => s.push_str(&format!("path = {:?}\n", EXACT[k % EXACT.len()])),
            1 => s.push_str(&format!("path_prefix = {:?}\n", PREFIX[k % PREFIX.len()])),
            2 => s.push_str(&format!("path_regex = '{}'\n", REGEX[k % REGEX.len()])),
            _ => {}
        }
        let mut ms: Vec<&str> = r.methods.iter().map(|&m| METHODS[m]).collect();
        ms.dedup();
        if !ms.is_empty() {
            let ms: Vec<String> = ms.iter().map(|m| format!("{m:?}")).collect();
            s.push_str(&format!("methods = [{}]\n", ms.join(", ")));
        }
        let mut hs: Vec<(u8, u8)> = r.headers.clone();
        hs.sort_by_key(|h| h.0);
        hs.dedup_by_key(|h| h.0);
        if !hs.is_empty() {
            let hs: Vec<String> = hs
                .iter()
                .map(|(n, v)| format!("\"x-{}\" = \"{}\"", n, v))
                .collect();
            s.push_str(&format!("headers = {{ {} }}\n", hs.join(", ")));
        }
    }
    s
}

#[derive(Debug, Clone)]
struct GenReq {
    method: usize,
    host: Option<usize>,
    path: usize,
    headers: Vec<(u8, usize)>,
    absolute: bool,
}

const REQ_METHODS: &[&str] = &["GET", "POST", "PUT"];
const REQ_HOSTS: &[&str] = &[
    "a.test",
    "A.TEST:8080",
    "b.a.test",
    "c.b.a.test",
    "test",
    "x.test",
    ".a.test",
    "[::1]:80",
    "q.x",
    "x",
    "other",
    "a.test.",
    "B.A.test.:80",
    "dot.test",
    "q.x..",
];
const REQ_PATHS: &[&str] = &[
    "/", "/a", "/a/", "/a/b", "/a/1", "/a/12", "/ab", "/b", "/abc", "/x", "/b/a", "/a/b/c", "/%ff",
];
const HEADER_VALUES: &[&str] = &["0", "1", " 1 ", "2"];

fn gen_req() -> impl Strategy<Value = GenReq> {
    (
        0..REQ_METHODS.len(),
        prop::option::of(0..REQ_HOSTS.len()),
        0..REQ_PATHS.len(),
        prop::collection::vec((0u8..2, 0..HEADER_VALUES.len()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(method, host, path, headers, absolute)| GenReq {
            method,
            host,
            path,
            headers,
            absolute,
        })
}

fn head_of(r: &GenReq) -> RequestHead {
    let mut raw = String::new();
    let path = REQ_PATHS[r.path];
    match (r.host, r.absolute) {
        (Some(h), true) => raw.push_str(&format!(
            "{} http://{}{} HTTP/1.1\r\nHost: ignored.test\r\n",
            REQ_METHODS[r.method], REQ_HOSTS[h], path
        )),
        (Some(h), false) => raw.push_str(&format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\n",
            REQ_METHODS[r.method], path, REQ_HOSTS[h]
        )),
        // HTTP/1.0 may come without a Host.
        (None, _) => raw.push_str(&format!("{} {} HTTP/1.0\r\n", REQ_METHODS[r.method], path)),
    }
    for (n, v) in &r.headers {
        raw.push_str(&format!("X-{}:{}\r\n", n, HEADER_VALUES[*v]));
    }
    raw.push_str("\r\n");
    let mut head = RequestHead::default();
    let n = parse_request(raw.as_bytes(), &Limits::default(), &mut head)
        .unwrap_or_else(|e| panic!("{raw:?}: {e:?}"))
        .expect("complete head");
    head.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..n]);
    head
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn indexed_router_agrees_with_linear_reference(
        routes in prop::collection::vec(gen_route(), 0..40),
        reqs in prop::collection::vec(gen_req(), 1..40),
    ) {
        let src = toml_of(&routes);
        let cfg = Config::parse(&src, "prop.toml").expect("generated config is valid");
        let router = Router::new(&cfg, 1);
        let reference = Reference::new(&cfg, &router.routes);
        for r in &reqs {
            let head = head_of(r);
            prop_assert_eq!(router.find_index(&head), reference.find(&head), "{:?}\n{}", r, src);
        }
    }
}

/// A table with more regex routes than one multi-pattern chunk holds: precedence across
/// chunks (config order, then conditions) is kept, and a shared table gives the same answers.
#[test]
fn regex_routes_across_chunks() {
    let mut src = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..2600 {
        src.push_str(&format!(
            "[[routes]]\nupstream = \"u\"\npath_regex = '^/r{}/[0-9]+$'\n",
            i % 1300
        ));
        if i % 7 == 0 {
            src.push_str("methods = [\"POST\"]\n");
        }
    }
    src.push_str("[[routes]]\nupstream = \"u\"\npath_regex = '[0-9]$'\n");
    src.push_str("[[routes]]\nupstream = \"u\"\npath_prefix = \"/\"\n");
    let cfg = Config::parse(&src, "chunks.toml").unwrap();
    let table = RouteTable::build(&cfg);
    let routers = [
        Router::new(&cfg, 1),
        Router::with_table(&cfg, 2, table.clone()),
    ];
    let reference = Reference::new(&cfg, &routers[0].routes);
    let mut hits = 0;
    for i in (0..1400).step_by(13) {
        for method in ["GET", "POST"] {
            for tail in ["/5", "/x", "/12"] {
                let path = format!("/r{i}{tail}");
                let raw = format!("{method} {path} HTTP/1.1\r\nHost: h\r\n\r\n");
                let mut head = RequestHead::default();
                let n = parse_request(raw.as_bytes(), &Limits::default(), &mut head)
                    .unwrap()
                    .unwrap();
                head.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..n]);
                let want = reference.find(&head);
                for r in &routers {
                    assert_eq!(r.find_index(&head), want, "{raw:?}");
                }
                hits += usize::from(want.is_some_and(|w| w < 2600));
            }
        }
    }
    assert!(hits > 100, "the probe should hit regex routes ({hits})");
}

/// The memory goal of issue 15: at most 1 KiB per route and worker. A worker's `Router`
/// around a shared table holds only the compiled routes; the table is counted once.
#[test]
fn memory_per_route_10000_prefix_routes() {
    let mut src = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    const N: usize = 10_000;
    for i in 0..N {
        src.push_str(&format!(
            "[[routes]]\nname = \"svc{i}\"\npath_prefix = \"/svc{i}/\"\nupstream = \"u\"\n"
        ));
    }
    let cfg = Config::parse(&src, "mem.toml").unwrap();
    let before = read(&LIVE);
    let table = RouteTable::build(&cfg);
    let after_table = read(&LIVE);
    let router = Router::with_table(&cfg, 1, table.clone());
    let after_router = read(&LIVE);
    let table_per_route = (after_table - before) as f64 / N as f64;
    let worker_per_route = (after_router - after_table) as f64 / N as f64;
    eprintln!(
        "10,000 prefix routes: shared table {table_per_route:.0} B/route, each worker's routes {worker_per_route:.0} B/route"
    );
    assert!(
        table_per_route + worker_per_route <= 1024.0,
        "table {table_per_route:.0} + routes {worker_per_route:.0} bytes per route"
    );
    assert_eq!(router.routes.len(), N);
}

/// Lookups allocate nothing once a worker's regex caches exist (the request path's rule): exact
/// and wildcard hosts, exact paths, regex sets and prefixes, hits and misses.
#[test]
fn lookups_do_not_allocate() {
    let mut src = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..300 {
        src.push_str(&format!(
            "[[routes]]\nupstream = \"u\"\nhosts = [\"h{i}.test\", \"*.w{i}.test\"]\npath_regex = '^/r{i}/[0-9]+$'\nmethods = [\"GET\"]\n\
             [[routes]]\nupstream = \"u\"\npath = \"/e{i}\"\n\
             [[routes]]\nupstream = \"u\"\npath_prefix = \"/p{i}/\"\nheaders = {{ \"x-a\" = \"1\" }}\n"
        ));
    }
    let cfg = Config::parse(&src, "alloc.toml").unwrap();
    let router = Router::new(&cfg, 1);
    let heads: Vec<RequestHead> = [
        "GET /r7/123 HTTP/1.1\r\nHost: h7.test\r\n\r\n",
        "GET /r7/123 HTTP/1.1\r\nHost: a.W7.test:80\r\n\r\n",
        "POST /r7/123 HTTP/1.1\r\nHost: h7.test\r\n\r\n",
        "GET /e299 HTTP/1.1\r\nHost: h1.test\r\n\r\n",
        "GET /p299/x HTTP/1.1\r\nHost: other\r\nX-A: 1\r\n\r\n",
        "GET /p299/x HTTP/1.1\r\nHost: other\r\n\r\n",
        "GET /nothing HTTP/1.1\r\nHost: q.w5.test\r\n\r\n",
        // An IPv6 literal is rewritten into its RFC 5952 form on the stack.
        "GET /e299 HTTP/1.1\r\nHost: [0:0:0::1]:80\r\n\r\n",
    ]
    .iter()
    .map(|raw| {
        let mut h = RequestHead::default();
        let n = parse_request(raw.as_bytes(), &Limits::default(), &mut h)
            .unwrap()
            .unwrap();
        h.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..n]);
        h
    })
    .collect();
    let want: Vec<Option<usize>> = heads.iter().map(|h| router.find_index(h)).collect();
    assert_eq!(
        want,
        vec![
            Some(21),
            Some(21),
            None,
            Some(898),
            Some(899),
            None,
            None,
            Some(898)
        ]
    );
    let before = read(&ALLOCS);
    for _ in 0..1000 {
        for (h, w) in heads.iter().zip(&want) {
            assert_eq!(router.find_index(h), *w);
        }
    }
    assert_eq!(read(&ALLOCS) - before, 0);
}
