//! Allocations on the keep-alive request path, counted with a counting global allocator.
//!
//! The upstream and the client here are written so that they allocate nothing per request
//! (fixed buffers), so what the counter sees during the measured requests is the gateway's.
//! The figure is printed; the assertion is a property (no allocation at all during the measured
//! requests), not a timing.
//! Run for a plain route, a JWT route (a cached token: no allocation either), a trusted
//! peer's forwarding headers, the access log, and a cached route where every request is a new
//! URL that is stored (a stored miss: once the store is full, each store evicts one object and
//! the new one is built in its allocations).

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

// Storable for an hour (the cached route stores each; the others pass the field on).
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\nContent-Type: text/plain\r\nCache-Control: max-age=3600\r\n\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

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
        // One gateway per driver and setting: fourteen connections in all; bounded, it stops
        // by itself.
        for _ in 0..16 {
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
    // Every request a new URL (the path ends in the request's number, see `numbered` below),
    // stored: the store's budget is small, so it is full after the warm-up and each stored
    // miss evicts. Its objects are alike: the same answer, and paths of one length (numbered
    // from 100,000: a new object a byte longer than every evicted one would find no evicted
    // allocation with the room, until the store has turned over once).
    let cached = format!(
        "{plain}cache = {{}}\n[cache]\nmax_bytes_per_worker = \"64KiB\"\nmax_object_bytes = \"4KiB\"\n"
    );
    let trusted_req = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.7\r\nForwarded: for=192.0.2.7\r\nX-Real-IP: 192.0.2.7\r\n\r\n".to_vec();
    let plain_req =
        b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: alloc-test\r\nAccept: */*\r\n\r\n".to_vec();
    let jwt_req = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: alloc-test\r\nAccept: */*\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    // A cached route behind a trusted TLS-terminating proxy (every request from it): the
    // scheme it names (`X-Forwarded-Proto`, else `Forwarded`'s `proto`) is read for the key
    // in place (RFC 9110 §4.2.3: then 443 is the default port). Before, each such request
    // copied the value it read.
    let trusted_cached = cached.replacen(
        "[[listeners]]",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n[[listeners]]",
        1,
    );
    let xfp_req = b"GET /x HTTP/1.1\r\nHost: a:443\r\nX-Forwarded-Proto: https\r\n\r\n".to_vec();
    let fwd_req =
        b"GET /x HTTP/1.1\r\nHost: a:443\r\nForwarded: for=192.0.2.7;proto=https\r\n\r\n".to_vec();
    let mut logged_requests = 0u64;
    for (label, toml, req) in [
        ("plain", &plain, &plain_req),
        ("jwt", &jwt, &jwt_req),
        ("trusted", &trusted, &trusted_req),
        ("access-log", &logged, &plain_req),
        ("stored-miss", &cached, &plain_req),
        (
            "stored-miss-behind-tls-proxy-xfp",
            &trusted_cached,
            &xfp_req,
        ),
        (
            "stored-miss-behind-tls-proxy-forwarded",
            &trusted_cached,
            &fwd_req,
        ),
    ] {
        let numbered = label.starts_with("stored-miss");
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
            let mut sent = 100_000u64;
            let mut exchange = |c: &mut TcpStream| {
                if numbered {
                    // `GET /x<n> ...`: the request line's path numbered, written into a fixed
                    // buffer (the client allocates nothing either).
                    let mut line = [0u8; 512];
                    let mut w = &mut line[..];
                    write!(w, "GET /x{sent}").unwrap();
                    let left = w.len();
                    let path_end = line.len() - left;
                    let rest = &req[b"GET /x".len()..];
                    line[path_end..path_end + rest.len()].copy_from_slice(rest);
                    c.write_all(&line[..path_end + rest.len()]).unwrap();
                    sent += 1;
                } else {
                    c.write_all(req).unwrap();
                }
                let mut n = 0;
                while n < RESPONSE.len() + 200 {
                    let k = c.read(&mut buf[n..]).unwrap();
                    assert!(k > 0);
                    n += k;
                    if buf[..n].ends_with(&RESPONSE[RESPONSE.len() - 64..]) {
                        break;
                    }
                }
                // A refusal (401) must not pass for a proxied request.
                assert!(buf.starts_with(b"HTTP/1.1 200 "), "{label}: not proxied");
                if numbered {
                    // Each a miss that was stored (RFC 9211 `fwd=miss`, `stored`).
                    let head = &buf[..n];
                    assert!(
                        head.windows(10).any(|w| w == b"; stored\r\n"),
                        "{label}: not stored: {}",
                        String::from_utf8_lossy(head)
                    );
                }
            };
            // Warm up: pools, buffers, the upstream connection (and for the stored misses, the
            // store filled, its index grown to what a full store holds: some 200 objects).
            for _ in 0..if numbered { 2000 } else { 200 } {
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
