//! Criterion benches for the request path's hot functions, each beside a naive baseline:
//! - request-head parsing: ringway's zero-copy parser vs a split-and-allocate parser;
//! - route lookup: the indexed per-worker router vs a linear scan of all routes;
//! - balancer choice: each algorithm vs a naive sort-based least-request;
//! - header rewrite (the head sent upstream) and response-head encoding, each vs a naive
//!   String-formatting encoder;
//! - chunked request bodies: the re-framer (canonical input passed through, and input with
//!   extensions and trailers copied into canonical form) vs the scan-only pass-through it
//!   replaced.
//!
//! Run: `cargo bench --bench hotpath`.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use ringway::http::chunked::{ChunkedReframer, ChunkedScanner, TrailerPolicy};

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

/// The head sent upstream, and the head sent back to the client, each beside a naive encoder
/// that lower-cases names into Strings, checks a HashSet of hop-by-hop names and formats lines.
fn bench_rewrite(c: &mut Criterion) {
    use bytes::BytesMut;
    use ringway::http::response::{parse_response, ResponseHead};
    use ringway::rewrite::{encode_client_head, encode_upstream_head, Forwarding};
    use std::collections::HashSet;

    let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\npath_prefix = \"/api\"\nstrip_prefix = \"/api\"\nupstream = \"u\"\nrequest_headers = { set = { \"x-gateway\" = \"ringway\" }, remove = [\"cookie\"] }\nresponse_headers = { set = { \"x-frame-options\" = \"DENY\" } }\n";
    let cfg = Config::parse(src, "bench.toml").unwrap();
    let router = Router::new(&cfg, 1);
    let route = &router.routes[0];
    let mut head = RequestHead::default();
    let n = parse_request(HEAD, &Limits::default(), &mut head)
        .unwrap()
        .unwrap();
    head.raw = bytes::Bytes::copy_from_slice(&HEAD[..n]);
    let f = Forwarding {
        peer_ip: b"203.0.113.7",
        trusted: false,
        port: Some(8080),
        request_id: b"7f3c9a10-2b4e-4c1d-9e8f-0a1b2c3d4e5f",
        via: b"1.1 ringway",
        https: false,
        client_cert: None,
        identity: b"",
        traceparent: None,
        keep_tracestate: ringway::trace::KeepState::None,
    };
    let mut out = BytesMut::with_capacity(4096);
    let hop: HashSet<&str> = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ]
    .into_iter()
    .collect();

    let mut g = c.benchmark_group("header_rewrite_upstream");
    g.bench_function("ringway", |b| {
        b.iter(|| {
            encode_upstream_head(&mut out, black_box(&head), route, b"127.0.0.1:9", &f);
            black_box(out.len())
        })
    });
    g.bench_function("naive_format_strings", |b| {
        b.iter(|| {
            let (method, target, headers) = naive_parse(black_box(HEAD)).unwrap();
            let mut s = format!(
                "{method} {} HTTP/1.1\r\n",
                target.strip_prefix("/api").unwrap_or(&target)
            );
            for (k, v) in &headers {
                if hop.contains(k.as_str()) || k == "cookie" || k == "x-gateway" {
                    continue;
                }
                s += &format!("{k}: {v}\r\n");
            }
            s += "x-forwarded-for: 203.0.113.7\r\nvia: 1.1 ringway\r\nx-gateway: ringway\r\n\r\n";
            black_box(s.len())
        })
    });
    g.finish();

    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nServer: origin\r\nDate: Thu, 26 Nov 2026 04:00:00 GMT\r\nContent-Type: application/json\r\nContent-Length: 1234\r\nCache-Control: max-age=60\r\nETag: \"abc123\"\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n";
    let mut resp = ResponseHead::default();
    let rn = parse_response(RESP, false, &mut resp).unwrap().unwrap();
    resp.raw = bytes::Bytes::copy_from_slice(&RESP[..rn]);
    let mut g = c.benchmark_group("response_head_encode");
    g.bench_function("ringway", |b| {
        b.iter(|| {
            encode_client_head(
                &mut out,
                black_box(&resp),
                &route.response_headers,
                &f,
                b"Thu, 26 Nov 2026 04:00:00 GMT",
                b"",
                false,
                None,
            );
            black_box(out.len())
        })
    });
    g.bench_function("naive_format_strings", |b| {
        b.iter(|| {
            let text = std::str::from_utf8(black_box(RESP)).unwrap();
            let mut lines = text.split("\r\n");
            let mut s = format!("{}\r\n", lines.next().unwrap());
            for l in lines.filter(|l| !l.is_empty()) {
                let (k, v) = l.split_once(':').unwrap();
                let k = k.to_ascii_lowercase();
                if hop.contains(k.as_str()) {
                    continue;
                }
                s += &format!("{k}: {}\r\n", v.trim());
            }
            s += "via: 1.1 ringway\r\nx-frame-options: DENY\r\n\r\n";
            black_box(s.len())
        })
    });
    g.finish();
}

/// A chunked body of `chunks` chunks of `size` bytes; with `ext`, every size line carries an
/// extension and the body ends with two trailer fields.
fn chunked_body(chunks: usize, size: usize, ext: bool) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..chunks {
        if ext {
            b.extend_from_slice(format!("{size:x};seq={i};sig=\"abc\"\r\n").as_bytes());
        } else {
            b.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        }
        b.extend(std::iter::repeat_n(b'x', size));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"0\r\n");
    if ext {
        b.extend_from_slice(b"X-Checksum: 1234\r\nAuthorization: x\r\n");
    }
    b.extend_from_slice(b"\r\n");
    b
}

fn bench_chunked(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunked_body");
    let mut out = BytesMut::with_capacity(128 * 1024);
    let mut reframer = ChunkedReframer::new(TrailerPolicy::Drop);
    for (name, chunks, size) in [("64KiB_in_4KiB", 16, 4096), ("4KiB_in_64B", 64, 64)] {
        for ext in [false, true] {
            let body = chunked_body(chunks, size, ext);
            let tag = if ext { "ext" } else { "canonical" };
            g.throughput(Throughput::Bytes(body.len() as u64));
            // The baseline: validate and pass the input through as it is.
            g.bench_function(format!("{name}/{tag}/scan_pass_through"), |b| {
                b.iter(|| {
                    let mut s = ChunkedScanner::new();
                    let r = s.scan(black_box(&body), |_, _| {}).unwrap();
                    black_box(r.consumed)
                })
            });
            g.bench_function(format!("{name}/{tag}/reframe"), |b| {
                b.iter(|| {
                    reframer.reset(TrailerPolicy::Drop);
                    out.clear();
                    let r = reframer.reframe(black_box(&body), &mut out).unwrap();
                    black_box((r.consumed, r.verbatim, out.len()))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_parse,
    bench_route,
    bench_balance,
    bench_rewrite,
    bench_chunked
);
criterion_main!(benches);
