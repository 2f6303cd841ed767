//! Whole-connection property test with the response cache on (RFC 9111), on stable Rust with
//! proptest.
//!
//! Each case makes an origin script and a client script. The origin (a loopback test server)
//! answers the k-th request it gets in the case with the case's k-th response spec (cycled):
//! a status among 200/203/204/206/299/301/302/304/307/404/410/500/501/599 (412 to a failed
//! `If-Match`), a random mix of `Cache-Control`
//! directives (junk included), `Expires`, `Date`, `Last-Modified`, `ETag` (valid and garbage),
//! `Vary`, `Accept-Ranges` / `Content-Range`, `Set-Cookie`, `Age`, hop-by-hop fields, a
//! `103` first, bodies up to 70,000 bytes, framed by `Content-Length`, chunked (trailers
//! sometimes) or close-delimited (valid framing only: hostile framing is
//! `tests/hostile_upstream.rs`'s job). A 206 only answers a forwarded single `Range`, a 304
//! only a forwarded `If-None-Match` / `If-Modified-Since`; otherwise the origin sends the 200.
//! The client sends on one keep-alive connection a sequence of requests (GET, HEAD, POST, PUT,
//! DELETE; conditionals; ranges; `Accept-Encoding` / `Accept-Language`; request
//! `Cache-Control` and `Pragma`; sometimes `Authorization`, a body, HTTP/1.0 with
//! `keep-alive`, `Connection: close`) to a few URLs of a cached route, some of them
//! pipelined. Each case has URLs of its own (`/c/<case>/u<i>`): the store carries over.
//!
//! Every body the origin sends is a representation `(url, rep)`: its bytes name the URL and the
//! representation, and are the same every time they are sent (the validators are tied to
//! `rep` too, so that equal strong entity tags mean equal bytes, RFC 9110 §8.8.3). A request
//! with `Authorization` is answered with representations of its own (`rep` 4 to 7).
//!
//! Asserted for every case:
//! - every request gets exactly one response, in order, that a strict parser in this file
//!   reads (status line, field lines, body length per RFC 9112 §6.3: none for HEAD, 204 and
//!   304; `Content-Length` agrees; chunked decodes), with no `Content-Length` on a 204
//!   (RFC 9110 §8.6); the connection stays open unless a response says `Connection: close`;
//! - a 200-class body from the origin is one whole representation of that URL (never another
//!   URL's); a 206 comes only for a request with `Range`, its body is what its `Content-Range`
//!   claims of a representation of that URL the origin sent (RFC 9110 §14.4, §15.3.7);
//! - a 304 only answers a request with `If-None-Match` or `If-Modified-Since` (RFC 9110
//!   §15.4.5);
//! - a request without `Authorization` never gets a representation the origin made for one
//!   with it, unless the origin made it `public`, `s-maxage` or `must-revalidate` (RFC 9111
//!   §3.5);
//! - a `Set-Cookie` only comes back to the request the origin set it for (the io_uring run
//!   stores no response with one, `set_cookie = "bypass"`; the epoll run strips it);
//! - no field the origin's `Connection` lists is relayed (RFC 9110 §7.6.1);
//! - 412 only to `If-Match`, 416 only to `Range`, a 206 to `If-Range` only when it matches
//!   (RFC 9110 §13.1.5), a 304 to `If-None-Match` names a tag it lists; `only-if-cached`
//!   (GET, HEAD) never answered by the origin (RFC 9111 §5.2.1.7);
//! - an answer from the store (its `x-serial` names an origin response made for another
//!   request) is of the same URL and a safe method, never of a response with `no-store`
//!   (unless `must-understand` on a known status), `private`, `no-cache`, `Vary: *`, a
//!   cookie (bypass), an `Accept-Encoding` / `Accept-Language` variant the request does not
//!   match, nor of one made for a request with `no-store` (RFC 9111 §5.2.1.5) or, unshared,
//!   `Authorization`; not against a request's `no-cache`, `max-age=0` or `Pragma:
//!   no-cache`; not definitely stale outside `max-stale`, `stale-while-revalidate` and
//!   `stale-if-error` (after an origin error), nor at all with `must-revalidate`,
//!   `proxy-revalidate` or `s-maxage` (§4.2.4); not stored before an unsafe method's 2xx/3xx
//!   on the URL (§4.4); without a `private="x-secret"` field; with one `Age` of at least the
//!   origin's `Age` and apparent age (§4.2.3);
//! - after each case the connection (unless closed) answers one more GET with exactly its
//!   answer (none lost, none added), and no request head inside a request body reached the
//!   origin; what the origin got for a request has its method (a HEAD only for a HEAD the
//!   store did not answer: a background revalidation is a GET) and a `Range` only when the
//!   request had one;
//! - the gateway answers a plain GET on a fresh connection after each case (no panic, no stuck
//!   worker; a panic of a test server thread is re-raised when it stops).
//!
//! The grammars, the origin, the parser and the checks live in `tests/prop_support/cache_fuzz.rs`,
//! shared with `tests/fuzz_cache_redis.rs` (the same across two hosts sharing Redis).
//!
//! Case count: `RINGWAY_FUZZ_CASES` (default 48 per driver, a few seconds in a debug build). A
//! longer run: `RINGWAY_FUZZ_CASES=3000 cargo test --test fuzz_cache_conn -- --nocapture`.

#[path = "prop_support/cache_fuzz.rs"]
mod cache_fuzz;
mod support;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cache_fuzz::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use ringway::config::DriverChoice;
use support::*;

const DEFAULT_CASES: u32 = 48;

static CASE_NO: AtomicUsize = AtomicUsize::new(0);

fn run_case(
    stats: &Stats,
    gw: &TestGateway,
    origin: &Mutex<OriginState>,
    up: &Upstream,
    c: &Case,
    strip: bool,
) -> Result<(), TestCaseError> {
    let case_no = CASE_NO.fetch_add(1, Ordering::Relaxed);
    let start = begin_case(origin, case_no, &c.origin);
    let paths: Vec<String> = (0..URLS).map(|u| format!("/c/{case_no}/u{u}")).collect();
    let mut rd = Reader::connect(gw.addr);
    // Batches of requests sent in one write.
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for (i, r) in c.client.iter().enumerate() {
        match batches.last_mut() {
            Some(b) if r.pipelined => b.push(i),
            _ => batches.push(vec![i]),
        }
    }
    // The origin's requests of this case come after these.
    let seen_from = up.seen.lock().unwrap().len();
    let mut closed = false;
    // Which requests were answered from the store (the origin's answer to another request).
    let mut from_store = vec![false; c.client.len()];
    'batches: for batch in &batches {
        let mut bytes = Vec::new();
        for &i in batch {
            let r = &c.client[i];
            bytes.extend(request_bytes(
                r,
                &paths[r.url],
                &format!("q{case_no}-{i}"),
                start,
            ));
        }
        if rd.s.write_all(&bytes).is_err() {
            return Err(TestCaseError::fail(
                "the gateway closed the connection early",
            ));
        }
        for &i in batch {
            let r = &c.client[i];
            let id = format!("q{case_no}-{i}");
            let (a, sent) = next_answer(stats, &mut rd, origin, r, i)?;
            check_answer(r, &paths[r.url], &id, &a, &sent, strip, start)
                .map_err(TestCaseError::fail)?;
            from_store[i] = answered_from_store(&a, &sent, &id);
            if after_answer(r, i, &a)? {
                closed = true;
                break 'batches;
            }
        }
    }
    end_connection(&mut rd, closed)?;
    check_origin_saw(up, seen_from, case_no, &smuggled_path(&paths[0]), |i| {
        c.client.get(i).map(|r| (r, from_store[i]))
    })?;
    stats
        .upstream
        .fetch_add(origin.lock().unwrap().sent.len(), Ordering::Relaxed);
    Ok(())
}

fn fuzz(d: DriverChoice) {
    let (cache, strip) = cache_settings(d);
    let cases = std::env::var("RINGWAY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let state = Arc::new(Mutex::new(OriginState::default()));
    let st = state.clone();
    let mut up = Upstream::start(move |req| origin_answer(&st, req));
    let toml = config(
        &[up.addr],
        &format!("[[routes]]\npath_prefix = \"/c\"\nupstream = \"up\"\ncache = {{ {cache} }}\n"),
    );
    let gw = TestGateway::start(&toml, d);
    let stats = Stats::default();
    let ran = AtomicUsize::new(0);
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..PtConfig::default()
    });
    let t0 = Instant::now();
    let result = runner.run(&case(), |c| {
        ran.fetch_add(1, Ordering::Relaxed);
        run_case(&stats, &gw, &state, &up, &c, strip)?;
        let r = get(gw.addr, "/c/alive");
        prop_assert_eq!(r.status, 200, "a fresh connection after the case");
        Ok(())
    });
    eprintln!(
        "{d:?}: {} runs (shrinking included) in {:?}: {} answers, {} cache hits, {} upstream \
         (both drivers so far: {} from the store unasked, {} 206, {} 304)",
        ran.load(Ordering::Relaxed),
        t0.elapsed(),
        stats.answers.load(Ordering::Relaxed),
        stats.hits.load(Ordering::Relaxed),
        stats.upstream.load(Ordering::Relaxed),
        REUSED.load(Ordering::Relaxed),
        PARTIAL.load(Ordering::Relaxed),
        NOT_MODIFIED.load(Ordering::Relaxed),
    );
    drop(gw);
    // Re-raises a panic of an origin thread.
    up.stop();
    if let Err(e) = result {
        panic!("{d:?}: {e}");
    }
}

#[test]
fn cached_connection_fuzz_io_uring() {
    fuzz(DriverChoice::IoUring);
}

#[test]
fn cached_connection_fuzz_epoll() {
    fuzz(DriverChoice::Epoll);
}
