//! Criterion benches for the response cache's store (issue 12): what a stored miss does to a
//! worker's store, without the sockets around it, and what a hit's lookup costs.
//!
//! - `store_cycle/<budget>/stored_miss`: the time a stored miss spends in the store: a lookup
//!   that misses (a new key each time), then, after the request's other work, the object built
//!   in the store's recycled allocations (a 240-byte head, its URL and a 1 KiB body in one
//!   buffer, as `serve` lays it out) and stored, evicting once the budget is full. The other
//!   work between them is run but not timed: 32 KiB read from a sliding window of a 512 KiB
//!   buffer (which stays in a core's second-level cache), pushing the store's lines out of the
//!   first level as the kernel's and the proxy's work between a miss's lookup and its store
//!   does. At 1 MiB the store fits a core's second-level cache; at 64 MiB (the perf/ scripts'
//!   budget) what an eviction reads and the memory the new object is written into were last
//!   touched a whole turn of the store ago: the gap between the two is what memory costs a
//!   stored miss, which the store's prefetches are there to hide (perf/cache-ab.sh with
//!   `BUDGET_B=1MiB` measures the same gap end to end). Each iteration reads the clock four
//!   times (some 80 ns, the same at both budgets).
//! - `lookup/hit`: a lookup that finds a stored object (the same key each time).
//!
//! Run: `cargo bench --bench cache`.

use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

use ringway::cache::fields::Fields;
use ringway::cache::{Object, Sent, Timing, WorkerCache};
use ringway::config::Config;
use ringway::http::request::{parse_request, Limits, RequestHead};
use ringway::http::response::{parse_response, ResponseHead};

/// What the perf/ origin (nginx) answers, head only.
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n\
Server: nginx/1.22.1\r\n\
Date: Fri, 27 Nov 2026 04:32:53 GMT\r\n\
Content-Type: text/plain\r\n\
Content-Length: 1024\r\n\
Last-Modified: Fri, 27 Nov 2026 04:00:00 GMT\r\n\
Connection: keep-alive\r\n\
ETag: \"6566f9c0-400\"\r\n\
Cache-Control: max-age=3600\r\n\
Accept-Ranges: bytes\r\n\r\n";

const BODY: [u8; 1024] = [b'x'; 1024];

/// Bytes read between a miss's lookup and its store (the stand-in for the request's other
/// work), and the buffer they slide through.
const OTHER_WORK_BYTES: usize = 32 * 1024;
const OTHER_WORK_SPAN: usize = 512 * 1024;

fn cache(budget: &str) -> Rc<WorkerCache> {
    let src = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n[cache]\nmax_bytes_per_worker = \"{budget}\"\n"
    );
    let cfg = Config::parse(&src, "bench.toml").expect("bench config");
    WorkerCache::new(&cfg, 0)
}

fn request_head() -> RequestHead {
    let mut head = RequestHead::default();
    let raw = b"GET /m/1 HTTP/1.1\r\nHost: x\r\n\r\n";
    let n = parse_request(raw, &Limits::default(), &mut head)
        .expect("valid request")
        .expect("complete request");
    head.raw = Bytes::copy_from_slice(&raw[..n]);
    head
}

fn response_head() -> ResponseHead {
    let mut resp = ResponseHead::default();
    let n = parse_response(RESPONSE_HEAD, false, &mut resp)
        .expect("valid response")
        .expect("complete response");
    resp.raw = Bytes::copy_from_slice(&RESPONSE_HEAD[..n]);
    resp
}

/// The request's other work: reads `OTHER_WORK_BYTES` at `*at` (a line each), sliding on.
fn other_work(junk: &[u8], at: &mut usize) -> u64 {
    let mut sum = 0u64;
    let end = *at + OTHER_WORK_BYTES;
    let mut i = *at;
    while i < end {
        sum = sum.wrapping_add(u64::from(junk[i]));
        i += 64;
    }
    *at = if end + OTHER_WORK_BYTES > junk.len() {
        0
    } else {
        end
    };
    sum
}

/// One stored miss's work on the store, timed: the lookup that misses, then (not timed) the
/// other work, then the object built as `serve` builds it (head, URL and body in one recycled
/// buffer; the fields' spans in a recycled vector) and stored.
fn stored_miss(
    c: &WorkerCache,
    req: &RequestHead,
    resp: &ResponseHead,
    key: &mut Vec<u8>,
    n: u64,
    junk: &[u8],
    at: &mut usize,
) -> Duration {
    key.clear();
    key.extend_from_slice(b"GET\0x\0/m/");
    // (Written in place: a String per key would put an allocation in what is measured.)
    write!(key, "{n}").expect("a Vec takes every write");
    let start = Instant::now();
    let k = c.key(key);
    let (hit, _) = c.lookup(k, &Sent::plain(req));
    let looked = start.elapsed();
    assert!(hit.is_none(), "every key is new");
    black_box(other_work(junk, at));
    let start = Instant::now();
    let url = &key[4..];
    let mut buf = c.object_buf(resp.raw.len() + url.len() + BODY.len());
    buf.extend_from_slice(&resp.raw);
    buf.extend_from_slice(url);
    let mut block = buf.split().freeze();
    let url = block.split_off(resp.raw.len());
    let mut spans = c.field_vec();
    spans.extend(resp.headers.iter().copied());
    buf.extend_from_slice(&BODY);
    let body = buf.freeze();
    let obj = c.new_object(|o| {
        o.status = 200;
        o.reason = Bytes::from_static(b"OK");
        o.fields = Fields::from_block(block, spans);
        o.body = body;
        o.url = url;
        o.t = Timing {
            response_time: 1,
            lifetime: 3600,
            ..Timing::default()
        };
        o.tags.clear();
        o.vary.clear();
        o.invalid.set(false);
    });
    c.insert_key(k, obj, 4);
    looked + start.elapsed()
}

fn bench_store_cycle(c: &mut Criterion) {
    let req = request_head();
    let resp = response_head();
    let junk = vec![1u8; OTHER_WORK_SPAN];
    let mut g = c.benchmark_group("store_cycle");
    for (name, budget, fill) in [("1MiB", "1MiB", 2_000u64), ("64MiB", "64MiB", 60_000)] {
        let cache = cache(budget);
        let mut key = Vec::new();
        let (mut n, mut at) = (0u64, 0usize);
        // Filled past its budget first: every stored miss measured evicts.
        for _ in 0..fill {
            n += 1;
            stored_miss(&cache, &req, &resp, &mut key, n, &junk, &mut at);
        }
        g.bench_function(format!("{name}/stored_miss"), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    spent += stored_miss(&cache, &req, &resp, &mut key, n, &junk, &mut at);
                }
                spent
            })
        });
        let stats = cache.stats();
        assert!(stats.bytes > 0, "objects were stored");
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let req = request_head();
    let cache = cache("64MiB");
    let obj = Rc::new(Object {
        status: 200,
        body: Bytes::from_static(&BODY),
        ..Object::default()
    });
    cache.insert(b"GET\0x\0/hit", obj, 4);
    let mut g = c.benchmark_group("lookup");
    g.bench_function("hit", |b| {
        b.iter(|| {
            let k = cache.key(black_box(b"GET\0x\0/hit"));
            let (hit, _) = cache.lookup(k, &Sent::plain(&req));
            black_box(hit.expect("stored"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench_store_cycle, bench_lookup);
criterion_main!(benches);
