//! What the response cache's entries hold, against the byte budget they are weighed by:
//! live heap bytes counted with a counting global allocator, over real sockets (one gateway,
//! one worker, one keep-alive client; the only test of this binary, so that nothing else
//! allocates meanwhile).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use ringway::config::DriverChoice;
use support::*;

struct Live;

/// Heap bytes allocated and not yet freed, the whole process.
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Live {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, n) };
        if !q.is_null() {
            LIVE.fetch_add(n as i64 - l.size() as i64, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Live = Live;

/// Keys stored, then freshened by a 304 each.
const KEYS: usize = 64;
/// Bytes of a hop-by-hop field each 304 carries (not stored).
const PAD: usize = 8 * 1024;

/// RFC 9111 §4.3.4: a 304 freshens a stored response. The freshened entry must not hold
/// memory its weight (the worker's byte budget, `max_bytes_per_worker`) does not count: here
/// each 304 carries an 8 KiB field that is not stored (listed in `Connection`), and the heap
/// the entries hold after the freshening may grow by no more than their weight did (plus
/// slack for the buffers a first validation takes from the pools).
#[test]
fn rfc9111_4_3_4_a_freshened_entry_holds_no_more_than_its_weight() {
    let pad = "p".repeat(PAD);
    let up = Upstream::start(move |req| {
        if req.header("if-none-match") == Some("\"a\"") {
            return Reply::Raw(
                format!("HTTP/1.1 304 Not Modified\r\nconnection: x-pad\r\nx-pad: {pad}\r\netag: \"a\"\r\ncache-control: max-age=600\r\n\r\n")
                    .into_bytes(),
            );
        }
        let body = "b".repeat(1024);
        Reply::Raw(
            format!("HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\netag: \"a\"\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                .into_bytes(),
        )
    });
    let toml = format!(
        "[server]\nworkers = 1\n{}",
        config(&[up.addr], "[[routes]]\nupstream = \"up\"\ncache = { }\n")
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let control = gw.gateway().control();
    let weight = || -> i64 {
        ringway::cache::stats(control, Duration::from_secs(2))
            .unwrap()
            .iter()
            .map(|s| s.bytes as i64)
            .sum()
    };
    let mut c = Client::connect(gw.addr);
    let mut round = |expect: &str| {
        for i in 0..KEYS {
            c.send(format!("GET /k{i} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes());
            let r = c.read_response().expect("answer");
            assert_eq!(r.status, 200);
            let st = r.header("cache-status").unwrap_or("").to_string();
            assert!(st.contains(expect), "{st}");
        }
    };
    // The origin's log of the requests it got is the test's, not the gateway's: emptied
    // before each reading.
    let forget = || {
        let mut seen = up.seen.lock().unwrap();
        seen.clear();
        seen.shrink_to_fit();
    };
    // Stored, stale at once (max-age=0).
    round("fwd=uri-miss");
    forget();
    let (w0, l0) = (weight(), LIVE.load(Ordering::Relaxed));
    // Each validated: the 304 freshens it (fresh for 600 s).
    round("fwd-status=304");
    assert_eq!(up.hits(), 2 * KEYS);
    forget();
    let (w1, l1) = (weight(), LIVE.load(Ordering::Relaxed));
    let (grew, weighed) = (l1 - l0, w1 - w0);
    println!("{KEYS} entries freshened: heap {grew:+} bytes, weight {weighed:+} bytes");
    // Buffers a first validation takes from the pools (a few KiB).
    let slack = 32 * 1024;
    assert!(
        grew <= weighed + slack,
        "the heap grew by {grew} bytes, the entries' weight by {weighed}: {} bytes held and not counted",
        grew - weighed
    );
}
