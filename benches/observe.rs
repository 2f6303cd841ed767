//! What the end of a request costs with metrics (and the access log) on: the per-request work
//! of `proxy::record::done` apart from the rest of the request, next to the same request with
//! both off (nothing but a branch). Compare the figures with the CPU time of a whole proxied
//! request (perf/observability.sh: about 9 µs per request on the 2-core test machine).
//!
//!   cargo bench --bench observe

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ringway::access_log::{Entry, Logged};
use ringway::config::Config;
use ringway::metrics::{Done, WorkerMetrics};

fn cfg(extra: &str) -> Config {
    let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n{extra}");
    Config::parse(&src, "bench.toml").unwrap()
}

fn bench_end_of_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("end_of_request");
    let on = WorkerMetrics::new(&cfg(""));
    let off = WorkerMetrics::new(&cfg("[metrics]\nenabled = false\n"));
    // Metrics on: the four clock readings a timed proxied request takes (start, upstream
    // start, response head, end) and the counters of its route and group.
    g.bench_function("metrics_on", |b| {
        b.iter(|| {
            let t0 = Instant::now();
            let u0 = Instant::now();
            let u1 = Instant::now();
            let end = Instant::now();
            let d = Done {
                status: 200,
                error: None,
                kind: None,
                total_us: Some((end - t0).as_micros() as u64),
                upstream_us: Some((u1 - u0).as_micros() as u64),
                bytes_in: 78,
                bytes_out: 140,
                retries: 0,
                retry_budget_refusals: 0,
            };
            on.record(black_box(Some(0)), black_box(Some(0)), &d);
        })
    });
    // One clock reading, for scale (metrics_on takes four).
    g.bench_function("clock_read", |b| b.iter(|| black_box(Instant::now())));
    g.bench_function("metrics_off", |b| {
        b.iter(|| {
            let d = Done::default();
            off.record(black_box(Some(0)), black_box(Some(0)), &d);
        })
    });
    // The access log line of that request, into the worker's buffer (the writer thread writes
    // the full buffers to /dev/null).
    let built = ringway::access_log::build(
        &cfg("[access_log]\nenabled = true\noutput = \"/dev/null\"\n"),
        1,
    )
    .unwrap()
    .unwrap();
    let log = &built.workers[0];
    let trace = [b'a'; 32];
    let endpoint: std::net::SocketAddr = "127.0.0.1:9101".parse().unwrap();
    let mut dropped = 0u64;
    g.bench_function("access_log_line", |b| {
        b.iter(|| {
            let e = Entry {
                end: Instant::now(),
                request_id: b"5f0c6a1e9d2b4c7a00000001",
                trace_id: &trace,
                client: b"127.0.0.1",
                method: Some(b"GET"),
                host: Some(b"api.example.com"),
                path: Some(b"/v1/users/12345?expand=orders"),
                redact_query: None,
                status: 200,
                bytes_in: 78,
                bytes_out: 140,
                total_us: 1234,
                upstream_us: Some(1000),
                route: Some("users"),
                upstream: Some("users"),
                endpoint: Some(endpoint),
                consumer: None,
                error: None,
                retries: 0,
                tls: None,
            };
            if log.log(0, black_box(&e)) == Logged::Dropped {
                dropped += 1;
                log.tick();
            }
        })
    });
    g.finish();
    eprintln!("access log lines dropped during the bench: {dropped}");
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench_end_of_request
}
criterion_main!(benches);
