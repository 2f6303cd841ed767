//! Criterion benches for the request path's hot functions, each beside a naive baseline:
//! - request-head parsing: ringway's zero-copy parser vs a split-and-allocate parser;
//! - route lookup: the indexed per-worker router vs a linear scan of all routes;
//! - balancer choice: each algorithm vs a naive sort-based least-request.
//!
//! Run: `cargo bench --bench hotpath`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use ringway::config::Config;
use ringway::http::request::{parse_request, Limits, RequestHead};
use ringway::router::Router;

const HEAD: &[u8] = b"GET /api/v1/users/12345?fields=name,email&expand=orders HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig\r\n\
Cookie: session=abcdef0123456789; theme=dark\r\n\
X-Request-Id: 7f3c9a10-2b4e-4c1d-9e8f-0a1b2c3d4e5f\r\n\
Connection: keep-alive\r\n\r\n";

/// The baseline: what a first attempt looks like: split into lines, allocate a String for
/// each name and value, lower-case names for lookup.
type NaiveHead = (String, String, Vec<(String, String)>);

fn naive_parse(buf: &[u8]) -> Option<NaiveHead> {
    let text = std::str::from_utf8(buf).ok()?;
    let end = text.find("\r\n\r\n")?;
    let mut lines = text[..end].split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    Some((method, target, headers))
}

fn bench_parse(c: &mut Criterion) {
    let limits = Limits::default();
    let mut head = RequestHead::default();
    let mut g = c.benchmark_group("head_parse");
    g.bench_function("ringway", |b| {
        b.iter(|| {
            let n = parse_request(black_box(HEAD), &limits, &mut head).unwrap();
            black_box(n);
        })
    });
    g.bench_function("naive_split_alloc", |b| {
        b.iter(|| black_box(naive_parse(black_box(HEAD))))
    });
    g.finish();
}

/// 200 routes: 40 hosts × (exact, prefix, regex) plus host-less prefixes.
fn route_config() -> String {
    let mut s = String::from("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n");
    for i in 0..40 {
        s += &format!("[[routes]]\nhosts = [\"svc{i}.example.com\"]\npath = \"/api/v1/status\"\nupstream = \"u\"\n");
        s += &format!("[[routes]]\nhosts = [\"svc{i}.example.com\"]\npath_prefix = \"/api/v1/items\"\nupstream = \"u\"\n");
        s += &format!("[[routes]]\nhosts = [\"*.svc{i}.example.com\"]\npath_prefix = \"/\"\nupstream = \"u\"\n");
        s += &format!("[[routes]]\npath_prefix = \"/team{i}/\"\nupstream = \"u\"\n");
        s += &format!(
            "[[routes]]\npath_prefix = \"/team{i}/v2/\"\nmethods = [\"POST\"]\nupstream = \"u\"\n"
        );
    }
    s += "[[routes]]\nhosts = [\"api.example.com\"]\npath_prefix = \"/api/v1/users\"\nupstream = \"u\"\n";
    s
}

struct NaiveRoute {
    hosts: Vec<String>,
    prefix: Option<String>,
    exact: Option<String>,
    methods: Vec<String>,
}

/// The baseline: scan every route, allocate the lower-cased host, keep the best score.
fn naive_find(routes: &[NaiveRoute], method: &str, host: &str, path: &str) -> Option<usize> {
    let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
    let mut best: Option<(usize, usize)> = None;
    for (i, r) in routes.iter().enumerate() {
        let host_score = if r.hosts.is_empty() {
            1
        } else if r.hosts.contains(&host) {
            3
        } else if r
            .hosts
            .iter()
            .any(|h| h.strip_prefix('*').is_some_and(|s| host.ends_with(s)))
        {
            2
        } else {
            continue;
        };
        if !r.methods.is_empty() && !r.methods.iter().any(|m| m == method) {
            continue;
        }
        let path_score = match (&r.exact, &r.prefix) {
            (Some(e), _) if e == path => 10_000,
            (Some(_), _) => continue,
            (None, Some(p)) if path.starts_with(p.as_str()) => p.len(),
            (None, Some(_)) => continue,
            (None, None) => 0,
        };
        let score = host_score * 100_000 + path_score;
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

fn bench_route(c: &mut Criterion) {
    let cfg = Config::parse(&route_config(), "bench.toml").unwrap();
    let router = Router::new(&cfg, 1);
    let naive: Vec<NaiveRoute> = cfg
        .routes
        .iter()
        .map(|r| NaiveRoute {
            hosts: r.hosts.clone(),
            prefix: r.path_prefix.clone(),
            exact: r.path.clone(),
            methods: r.methods.clone(),
        })
        .collect();
    let mut head = RequestHead::default();
    let n = parse_request(HEAD, &Limits::default(), &mut head)
        .unwrap()
        .unwrap();
    head.raw = bytes::Bytes::copy_from_slice(&HEAD[..n]);
    assert!(router.find(&head).is_some());
    assert!(naive_find(&naive, "GET", "api.example.com", "/api/v1/users/12345").is_some());
    let mut g = c.benchmark_group("route_lookup_200_routes");
    g.bench_function("ringway_indexed", |b| {
        b.iter(|| black_box(router.find_index(black_box(&head))))
    });
    g.bench_function("naive_linear_scan", |b| {
        b.iter(|| {
            black_box(naive_find(
                &naive,
                "GET",
                black_box("api.example.com"),
                black_box("/api/v1/users/12345"),
            ))
        })
    });
    g.finish();
}

/// The balancer's choice per request, for each algorithm over 10 endpoints, beside a naive
/// least-request that collects and sorts the loads on every pick.
fn bench_balance(c: &mut Criterion) {
    use ringway::upstream::UpstreamGroup;
    let mut g = c.benchmark_group("balancer_pick_10_endpoints");
    for algo in [
        "round_robin",
        "weighted_round_robin",
        "least_request",
        "peak_ewma",
        "consistent_hash",
    ] {
        let eps: Vec<String> = (0..10)
            .map(|i| {
                format!(
                    "{{ address = \"127.0.0.1:{}\", weight = {} }}",
                    9000 + i,
                    1 + i % 3
                )
            })
            .collect();
        let src = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nbalance = \"{algo}\"\nendpoints = [{}]\n",
            eps.join(", ")
        );
        let cfg = Config::parse(&src, "bench.toml").unwrap();
        let group = UpstreamGroup::new(0, "u", &cfg.upstreams["u"], 0);
        for (i, s) in group.stats.iter().enumerate() {
            s.outstanding.set((i * 7 % 5) as u32);
            s.observe_latency(
                std::time::Duration::from_micros(100 + 37 * i as u64),
                std::time::Instant::now(),
            );
        }
        let mut key = 0u64;
        g.bench_function(algo, |b| {
            b.iter(|| {
                key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
                black_box(group.pick(Some(key), &[]))
            })
        });
    }
    let loads: Vec<u32> = (0..10).map(|i| (i * 7 % 5) as u32).collect();
    g.bench_function("naive_least_request_sort", |b| {
        b.iter(|| {
            let mut v: Vec<(u32, usize)> = black_box(&loads).iter().copied().zip(0..).collect();
            v.sort();
            black_box(v[0].1)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_parse, bench_route, bench_balance);
criterion_main!(benches);
