//! Allocations on the keep-alive request path, counted with a counting global allocator.
//!
//! The upstream and the client here are written so that they allocate nothing per request
//! (fixed buffers), so what the counter sees during the measured requests is the gateway's.
//! The figure is printed; the assertion is a property (allocations per request), not a timing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\nContent-Type: text/plain\r\n\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// Reads until `buf` ends with a blank line (requests here have no body).
fn read_head(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    let mut n = 0;
    loop {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
        if buf[..n].ends_with(b"\r\n\r\n") {
            return true;
        }
    }
}

#[test]
fn keep_alive_requests_allocate_nothing_in_the_gateway() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        // One gateway per driver: two connections in all; bounded, it stops by itself.
        for _ in 0..2 {
            let Ok((mut s, _)) = upstream.accept() else {
                return;
            };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while read_head(&mut s, &mut buf) {
                    if s.write_all(RESPONSE).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"{up_addr}\" }}]\n[[routes]]\nupstream = \"u\"\n"
    );
    for driver in [
        ringway::config::DriverChoice::IoUring,
        ringway::config::DriverChoice::Epoll,
    ] {
        let mut cfg = ringway::config::Config::parse(&toml, "t.toml").unwrap();
        cfg.server.driver = driver;
        cfg.server.workers = 1;
        let gw = ringway::server::Gateway::start(cfg, None).unwrap();
        let mut c = TcpStream::connect(gw.addrs()[0]).unwrap();
        c.set_nodelay(true).unwrap();
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: alloc-test\r\nAccept: */*\r\n\r\n";
        let mut buf = [0u8; 4096];
        let mut exchange = |c: &mut TcpStream| {
            c.write_all(req).unwrap();
            let mut n = 0;
            while n < RESPONSE.len() + 60 {
                let k = c.read(&mut buf[n..]).unwrap();
                assert!(k > 0);
                n += k;
                if buf[..n].ends_with(&RESPONSE[RESPONSE.len() - 64..]) {
                    break;
                }
            }
        };
        // Warm up: pools, buffers, the upstream connection.
        for _ in 0..200 {
            exchange(&mut c);
        }
        let requests = 2000u64;
        let before = ALLOCS.load(Ordering::Relaxed);
        for _ in 0..requests {
            exchange(&mut c);
        }
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        println!("{driver:?}: {allocs} allocations for {requests} proxied keep-alive requests");
        assert!(
            allocs * 10 < requests,
            "{driver:?}: {allocs} allocations for {requests} requests"
        );
        drop(c);
        gw.shutdown();
        gw.join();
    }
}
