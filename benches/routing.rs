//! Route lookup at 10, 1,000, 10,000 and 100,000 routes (issue 15): the request matching the
//! first route, the last one, and no route, for prefix tables, exact-host tables, wildcard
//! hosts and regex tables, each beside a naive linear scan; then one table shared by two
//! threads against a copy per thread.
//!
//! Run: `cargo bench --bench routing -- --quick` (short; the full run takes several minutes).
//! Regex tables stop at 10,000 routes: loading 100,000 regexes (each validated on its own by
//! the config loader) dominates the run.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

use ringway::config::Config;
use ringway::http::request::{parse_request, Limits, RequestHead};
use ringway::router::{RouteTable, Router};

const SIZES: &[usize] = &[10, 1_000, 10_000, 100_000];

#[derive(Clone, Copy)]
enum Kind {
    Prefix,
    Host,
    Wildcard,
    Regex,
}

fn config(kind: Kind, n: usize) -> Config {
    let mut s = String::from(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n",
    );
    for i in 0..n {
        s.push_str("[[routes]]\nupstream = \"u\"\n");
        match kind {
            Kind::Prefix => s.push_str(&format!("path_prefix = \"/svc{i}/\"\n")),
            Kind::Host => s.push_str(&format!("hosts = [\"h{i}.test\"]\n")),
            Kind::Wildcard => s.push_str(&format!("hosts = [\"*.w{i}.test\"]\n")),
            Kind::Regex => s.push_str(&format!("path_regex = '^/r{i}/[0-9]+$'\n")),
        }
    }
    Config::parse(&s, "bench.toml").expect("bench config")
}

/// (label, host, path) of the requests: the first route, the last, none.
fn probes(kind: Kind, n: usize) -> [(&'static str, String, String); 3] {
    let last = n - 1;
    match kind {
        Kind::Prefix => [
            ("hit_first", "a.test".into(), "/svc0/x".into()),
            ("hit_last", "a.test".into(), format!("/svc{last}/x")),
            ("miss", "a.test".into(), "/nomatch/x".into()),
        ],
        Kind::Host => [
            ("hit_first", "h0.test".into(), "/x".into()),
            ("hit_last", format!("h{last}.test"), "/x".into()),
            ("miss", "nomatch.test".into(), "/x".into()),
        ],
        Kind::Wildcard => [
            ("hit_first", "api.w0.test".into(), "/x".into()),
            ("hit_last", format!("api.w{last}.test"), "/x".into()),
            ("miss", "api.nomatch.test".into(), "/x".into()),
        ],
        Kind::Regex => [
            ("hit_first", "a.test".into(), "/r0/123".into()),
            ("hit_last", "a.test".into(), format!("/r{last}/123")),
            ("miss", "a.test".into(), "/nomatch/123".into()),
        ],
    }
}

fn head(host: &str, path: &str) -> RequestHead {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n");
    let mut h = RequestHead::default();
    let n = parse_request(raw.as_bytes(), &Limits::default(), &mut h)
        .expect("valid head")
        .expect("complete head");
    h.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..n]);
    h
}

/// The baseline: every route looked at for every request (what the router did before its
/// index for prefixes and wildcards, and still does for regexes one by one).
fn naive_find(
    cfg: &Config,
    regexes: &[Option<regex::bytes::Regex>],
    host: &str,
    path: &str,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, r) in cfg.routes.iter().enumerate() {
        let host_ok = r.hosts.is_empty()
            || r.hosts.iter().any(|h| match h.strip_prefix('*') {
                Some(s) => host.len() > s.len() && host.ends_with(s),
                None => h == host,
            });
        if !host_ok {
            continue;
        }
        if let Some(re) = &regexes[i] {
            if re.is_match(path.as_bytes()) {
                return Some(i);
            }
            continue;
        }
        let len = match &r.path_prefix {
            Some(p) if path.starts_with(p.as_str()) => p.len(),
            Some(_) => continue,
            None => 0,
        };
        if best.is_none_or(|(l, _)| len > l) {
            best = Some((len, i));
        }
    }
    best.map(|(_, i)| i)
}

fn bench_tables(c: &mut Criterion) {
    for (name, kind) in [
        ("prefix", Kind::Prefix),
        ("exact_host", Kind::Host),
        ("wildcard_host", Kind::Wildcard),
        ("regex", Kind::Regex),
    ] {
        let mut g = c.benchmark_group(format!("route_lookup_{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        for &n in SIZES {
            if matches!(kind, Kind::Regex) && n > 10_000 {
                continue;
            }
            let cfg = config(kind, n);
            let t0 = Instant::now();
            let router = Router::new(&cfg, 1);
            eprintln!("{name} {n} routes: router built in {:?}", t0.elapsed());
            let regexes: Vec<Option<regex::bytes::Regex>> = cfg
                .routes
                .iter()
                .map(|r| {
                    r.path_regex
                        .as_ref()
                        .map(|p| regex::bytes::Regex::new(p).unwrap())
                })
                .collect();
            for (label, host, path) in probes(kind, n) {
                let h = head(&host, &path);
                let want = naive_find(&cfg, &regexes, &host, &path);
                assert_eq!(router.find_index(&h), want, "{name} {n} {label}");
                g.bench_with_input(
                    BenchmarkId::new(format!("indexed_{label}"), n),
                    &h,
                    |b, h| b.iter(|| black_box(router.find_index(black_box(h)))),
                );
                if n <= 10_000 {
                    g.bench_with_input(
                        BenchmarkId::new(format!("linear_{label}"), n),
                        &n,
                        |b, _| {
                            b.iter(|| {
                                black_box(naive_find(
                                    &cfg,
                                    &regexes,
                                    black_box(&host),
                                    black_box(&path),
                                ))
                            })
                        },
                    );
                }
            }
        }
        g.finish();
    }
}

/// Two threads looking up the last of 10,000 prefix routes: each with its own table, or both
/// reading one shared table. Reports the slower thread's time for `iters` lookups.
fn bench_shared(c: &mut Criterion) {
    const THREADS: usize = 2;
    let cfg = config(Kind::Prefix, 10_000);
    let shared = RouteTable::build(&cfg);
    let mut g = c.benchmark_group("route_lookup_10000_prefix_2_threads");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for share in [false, true] {
        let label = if share {
            "shared_table"
        } else {
            "table_per_thread"
        };
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(THREADS);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..THREADS)
                        .map(|t| {
                            let (cfg, barrier, shared) = (&cfg, &barrier, &shared);
                            s.spawn(move || {
                                let router = if share {
                                    Router::with_table(cfg, t as u64, shared.clone())
                                } else {
                                    Router::with_table(
                                        cfg,
                                        t as u64,
                                        Arc::new(RouteTable::new(cfg)),
                                    )
                                };
                                let h = head("a.test", "/svc9999/x");
                                barrier.wait();
                                let t0 = Instant::now();
                                for _ in 0..iters {
                                    black_box(router.find_index(black_box(&h)));
                                }
                                t0.elapsed()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("bench thread"))
                        .max()
                        .unwrap_or_default()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_tables, bench_shared);
criterion_main!(benches);
