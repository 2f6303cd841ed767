//! Allocations on the keep-alive request path, counted with a counting global allocator.
//!
//! The upstream and the client here are written so that they allocate nothing per request
//! (fixed buffers), so what the counter sees during the measured requests is the gateway's.
//! The figure is printed; the assertion is a property (no allocation at all during the measured
//! requests), not a timing.
//! Run for a plain route, a JWT route (a cached token: no allocation either) and a trusted
//! peer's forwarding headers.

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
        // One gateway per driver and setting: eight connections in all; bounded, it stops by
        // itself.
        for _ in 0..8 {
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
    let plain = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"{up_addr}\" }}]\n[[routes]]\nupstream = \"u\"\n"
    );
    // The same with a JWT route: the token is the same on every request (the per-core cache
    // path), a claim is forwarded and a consumer mapped.
    let secret = "alloc-test-secret-of-32-bytes-ok";
    let jwt = format!(
        "{plain}auth = \"j\"\n[auth.jwt.j]\nsecret = \"{secret}\"\nforward_claims = {{ sub = \"x-user-id\" }}\n[[consumers]]\nname = \"c\"\njwt_subjects = [\"alice\"]\n"
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    // A trusted peer whose forwarding headers are kept and extended.
    let trusted = plain.replacen(
        "[[listeners]]",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[[listeners]]",
        1,
    );
    // The access log on, to a file: each request formats its line into the worker's
    // preallocated buffer; the sync task hands full buffers to the writer thread and takes
    // emptied ones back (no allocation on either side).
    let log_path = std::env::temp_dir().join(format!("ringway-alloc-{}.log", std::process::id()));
    let logged = format!(
        "{plain}[access_log]\nenabled = true\noutput = \"{}\"\n",
        log_path.display()
    );
    let trusted_req = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.7\r\nForwarded: for=192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\n\r\n".to_vec();
    let plain_req =
        b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: alloc-test\r\nAccept: */*\r\n\r\n".to_vec();
    let jwt_req = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: alloc-test\r\nAccept: */*\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    let mut logged_requests = 0u64;
    for (label, toml, req) in [
        ("plain", &plain, &plain_req),
        ("jwt", &jwt, &jwt_req),
        ("trusted", &trusted, &trusted_req),
        ("access-log", &logged, &plain_req),
    ] {
        for driver in [
            ringway::config::DriverChoice::IoUring,
            ringway::config::DriverChoice::Epoll,
        ] {
            let mut cfg = ringway::config::Config::parse(toml, "t.toml").unwrap();
            cfg.server.driver = driver;
            cfg.server.workers = 1;
            let gw = ringway::server::Gateway::start(cfg, None).unwrap();
            let mut c = TcpStream::connect(gw.addrs()[0]).unwrap();
            c.set_nodelay(true).unwrap();
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
                // A refusal (401) must not pass for a proxied request.
                assert!(buf.starts_with(b"HTTP/1.1 200 "), "{label}: not proxied");
            };
            // Warm up: pools, buffers, the upstream connection.
            for _ in 0..200 {
                exchange(&mut c);
            }
            // At least 2,000 requests, and long enough that the worker's idle wheel turns
            // (a keep-alive wait takes the slot of a tick further on each second: a slot that
            // allocated when first used showed up only when a run crossed a tick).
            let mut requests = 0u64;
            let started = std::time::Instant::now();
            let before = ALLOCS.load(Ordering::Relaxed);
            while requests < 2000 || started.elapsed() < ringway::server::IDLE_TICK * 3 / 2 {
                exchange(&mut c);
                requests += 1;
            }
            let allocs = ALLOCS.load(Ordering::Relaxed) - before;
            if label == "access-log" {
                logged_requests += 200 + requests;
            }
            println!("{label} {driver:?}: {allocs} allocations for {requests} proxied keep-alive requests");
            // The README claims none: exactly none, not "few".
            assert_eq!(
                allocs, 0,
                "{label} {driver:?}: {allocs} allocations for {requests} requests"
            );
            drop(c);
            gw.shutdown();
            gw.join();
        }
    }
    // Every logged request (warm-up and measured, both drivers) reached the file whole.
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert_eq!(
        text.lines().count() as u64,
        logged_requests,
        "access log lines"
    );
    assert!(text
        .lines()
        .all(|l| l.starts_with("{\"time\":\"") && l.ends_with('}')));
}
