//! Malformed and oversized requests over real sockets: each gets its status, a JSON body, and
//! the connection is closed afterwards so nothing behind it can be read as a request.
//! Also the client-side timeouts. Every scenario runs on both monoio drivers.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ringway::http::chunked::ChunkedScanner;
use support::*;

fn table() -> Vec<(String, Vec<u8>, u16)> {
    let mut t: Vec<(String, Vec<u8>, u16)> = vec![];
    let mut add =
        |name: &str, raw: &[u8], status: u16| t.push((name.to_string(), raw.to_vec(), status));
    add("CL and TE together", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400);
    add(
        "differing CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
    );
    add(
        "CL list differing",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 5\r\n\r\nabcde",
        400,
    );
    add(
        "CL not a number",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4x\r\n\r\nabcd",
        400,
    );
    add(
        "CL negative",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        400,
    );
    add(
        "CL overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 184467440737095516160\r\n\r\n",
        400,
    );
    add(
        "TE final not chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        400,
    );
    add(
        "TE unknown coding",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
    );
    add(
        "TE in HTTP/1.0",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
    add(
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n",
        400,
    );
    add(
        "space before colon",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n",
        400,
    );
    add(
        "bare CR in value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
        400,
    );
    add("bare CR line end", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400);
    add("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400);
    add(
        "two Hosts",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
    );
    add("bad method", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400);
    add(
        "garbage",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        400,
    );
    add("HTTP/2 line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505);
    add(
        "relative target",
        b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    );
    add(
        "CONNECT",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        501,
    );
    add(
        "unknown expectation",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\nx",
        417,
    );
    add(
        "bad chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    );
    add(
        "chunk size overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        400,
    );
    add(
        "chunk without CRLF",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        400,
    );
    add(
        "URI too long",
        format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(9000)).as_bytes(),
        414,
    );
    add(
        "too many headers",
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(150)
        )
        .as_bytes(),
        431,
    );
    add(
        "head too large",
        format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "v".repeat(20000)
        )
        .as_bytes(),
        431,
    );
    // RFC 9112 §3.2: Host.
    add(
        "Host with a path",
        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        400,
    );
    add("empty Host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400);
    add("Host list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400);
    add(
        "Host garbage",
        b"GET / HTTP/1.1\r\nHost: a\"<x>\r\n\r\n",
        400,
    );
    add(
        "Host bad port",
        b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n",
        400,
    );
    add("Host userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400);
    add(
        "absolute-form bad authority",
        b"GET http://a,b/ HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    );
    // RFC 9112 §2.3: malformed versions are 400, not 505.
    add("version HTTP/1", b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400);
    add(
        "version HTTP/01.01",
        b"GET / HTTP/01.01\r\nHost: a\r\n\r\n",
        400,
    );
    add(
        "space in the target",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    );
    add("TRACE", b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405);
    // RFC 9112 §7.1.1: chunk extensions.
    add(
        "empty chunk extension",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;\r\nhello\r\n0\r\n\r\n",
        400,
    );
    add(
        "invalid chunk extension",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;bad[=x\r\nhello\r\n0\r\n\r\n",
        400,
    );
    add(
        "unterminated quoted chunk extension",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"x\r\nhello\r\n0\r\n\r\n",
        400,
    );
    add(
        "whitespace after chunk size",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        400,
    );
    add(
        "body over limit",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n",
        413,
    );
    t
}

#[test]
fn malformed_requests_get_their_status_and_the_connection_closes() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &config(
                &[up.addr],
                "[limits]\nmax_body_bytes = \"1MiB\"\n[[routes]]\nupstream = \"up\"\n",
            ),
            d,
        );
        for (name, raw, status) in table() {
            let mut c = Client::connect(gw.addr);
            // A well-formed request is queued behind the bad one: it must never be answered.
            let mut bytes = raw.clone();
            bytes.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
            let _ = c.try_send(&bytes);
            let r = c
                .read_response()
                .unwrap_or_else(|| panic!("{d:?} {name}: no response"));
            assert_eq!(r.status, status, "{d:?} {name}: {}", r.text());
            assert_eq!(r.header("connection"), Some("close"), "{d:?} {name}");
            let j = r.json();
            assert_eq!(j["status"], status);
            assert!(j["request_id"].as_str().is_some_and(|s| !s.is_empty()));
            assert!(
                c.is_closed(Duration::from_secs(2)),
                "{d:?} {name}: connection must close"
            );
        }
        assert!(
            up.seen
                .lock()
                .unwrap()
                .iter()
                .all(|r| r.target != "/smuggled"),
            "{d:?}: a request behind a malformed one reached the upstream"
        );
    }
}

#[test]
fn configured_limits_apply() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[limits]
max_head_bytes = "1KiB"
max_headers = 8
max_uri_bytes = 100
max_body_bytes = 10
[[routes]]
path_prefix = "/big"
max_body_bytes = "1KiB"
upstream = "up"
[[routes]]
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        let uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(120));
        assert_eq!(request(gw.addr, uri.as_bytes()).status, 414, "{d:?}");
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X: 1\r\n".repeat(9));
        assert_eq!(request(gw.addr, many.as_bytes()).status, 431);
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "v".repeat(1100)
        );
        assert_eq!(request(gw.addr, big.as_bytes()).status, 431);
        assert_eq!(
            request(
                gw.addr,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n01234567890"
            )
            .status,
            413
        );
        assert_eq!(
            request(
                gw.addr,
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789"
            )
            .status,
            200
        );
        // Per-route override.
        let body = "b".repeat(1000);
        let r = request(
            gw.addr,
            format!("POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n{body}")
                .as_bytes(),
        );
        assert_eq!(r.status, 200);
        // Chunked bodies are counted as they stream.
        let mut c = Client::connect(gw.addr);
        let _ = c.try_send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 413);
        // 413 with Expect: 100-continue is answered before the body is sent.
        let mut c = Client::connect(gw.addr);
        c.send(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 413);
    }
}

/// An upstream that reports each connection's bytes: `Seen::Head` once a request head is in,
/// `Seen::Whole` with everything received once the gateway closes the connection. Answers
/// nothing. Serves one connection; panics are re-raised by joining the handle.
fn recording_upstream() -> (SocketAddr, mpsc::Receiver<Seen>, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().expect("upstream accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let mut head = false;
        loop {
            let k = s.read(&mut tmp).expect("the gateway closes the connection");
            if k == 0 {
                break;
            }
            buf.extend_from_slice(&tmp[..k]);
            if !head && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                head = true;
                let _ = tx.send(Seen::Head);
            }
        }
        let _ = tx.send(Seen::Whole(buf));
    });
    (addr, rx, h)
}

/// RFC 9112 §7.1 with RFC 9110 §15.5.14 (413): a chunk size that takes a body past
/// `max_body_bytes` is refused as soon as its line is read, as a Content-Length over the limit
/// is refused with the head, not once that much data has come. Before the upstream was
/// contacted, it never is; once the head is upstream, that attempt is abandoned (the upstream
/// connection closed, the size line never sent) and the client's connection closes.
#[test]
fn a_chunk_size_over_the_body_limit_is_a_413_at_its_line_rfc9112_7_1() {
    let extra = "[limits]\nmax_body_bytes = \"1KiB\"\n[timeouts]\nclient_body = \"3s\"\n[[routes]]\nupstream = \"up\"\n";
    for d in DRIVERS {
        // With the head: nothing reaches the upstream.
        let up = Upstream::echo();
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for size in ["ffffffffffffffff", "100000", "401"] {
            let mut c = Client::connect(gw.addr);
            let raw = format!(
                "POST /big HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nab"
            );
            let _ = c.try_send(raw.as_bytes());
            let r = c
                .read_response()
                .unwrap_or_else(|| panic!("{d:?} {size}: no answer"));
            assert_eq!(r.status, 413, "{d:?} {size}: {}", r.text());
            assert_eq!(r.header("connection"), Some("close"), "{d:?} {size}");
            assert!(c.is_closed(Duration::from_secs(2)), "{d:?} {size}");
        }
        // Exactly the limit in one chunk still goes through.
        let mut c = Client::connect(gw.addr);
        c.send(b"POST /fits HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n");
        c.send(&[b'x'; 1024]);
        c.send(b"\r\n0\r\n\r\n");
        assert_eq!(c.read_response().expect("answer").status, 200, "{d:?}");
        assert_eq!(
            up.hits(),
            1,
            "{d:?}: an over-limit body reached the upstream"
        );

        // After the head went upstream with a first chunk: the size line is not forwarded.
        let (addr, rx, server) = recording_upstream();
        let gw = TestGateway::start(&config(&[addr], extra), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"POST /late HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("head upstream")
        {
            Seen::Head => {}
            Seen::Whole(b) => panic!("{d:?}: upstream closed early: {b:?}"),
        }
        c.send(b"ffffffffffffffff\r\nxyz");
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 413, "{d:?}: {}", r.text());
        assert!(c.is_closed(Duration::from_secs(2)), "{d:?}");
        let got = match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("upstream closed")
        {
            Seen::Whole(b) => b,
            Seen::Head => unreachable!(),
        };
        assert_eq!(
            String::from_utf8_lossy(body_of(&got)),
            "3\r\nabc\r\n",
            "{d:?}: the upstream saw more than the first chunk"
        );
        server.join().expect("upstream thread");
    }
}

#[test]
fn a_request_split_at_every_byte_is_parsed_the_same() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let raw: &[u8] = b"POST /split?q=1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in (1..raw.len()).step_by(7) {
            let mut c = Client::connect(gw.addr);
            c.send(&raw[..cut]);
            std::thread::sleep(Duration::from_millis(5));
            c.send(&raw[cut..]);
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} cut {cut}");
            assert_eq!(up.last().body, b"abc");
        }
    }
}

#[test]
fn slow_head_gets_408_and_idle_keep_alive_is_closed() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = "[timeouts]\nclient_head = \"300ms\"\nclient_idle = \"400ms\"\nclient_body = \"300ms\"\n[[routes]]\nupstream = \"up\"\n";
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        // Slowloris: a byte at a time, never finishing the head.
        let mut c = Client::connect(gw.addr);
        let t0 = Instant::now();
        for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ".iter() {
            if c.try_send(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = c.read_response().expect("408");
        assert_eq!(r.status, 408, "{d:?}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(c.is_closed(Duration::from_secs(2)));
        // An idle keep-alive connection is closed without a response.
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        let t0 = Instant::now();
        assert!(
            c.is_closed(Duration::from_secs(3)),
            "{d:?}: idle connection must close"
        );
        assert!(t0.elapsed() >= Duration::from_millis(300));
        // A stalled request body gets 408.
        let mut c = Client::connect(gw.addr);
        c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345");
        let r = c.read_response().expect("408 for a stalled body");
        assert_eq!(r.status, 408);
    }
}

/// An idle deadline several seconds ahead is kept on the worker's idle wheel: the connection
/// is neither closed before it nor left open long after it.
#[test]
fn an_idle_deadline_seconds_ahead_closes_the_connection_on_time() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = "[timeouts]\nclient_idle = \"2500ms\"\n[[routes]]\nupstream = \"up\"\n";
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        let t0 = Instant::now();
        // Still open (and serving) before the deadline.
        assert!(!c.is_closed(Duration::from_millis(1500)), "{d:?}");
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200, "{d:?}");
        // The deadline starts again after that request: closed 2.5 s later, a tick or two after
        // it (not a turn of the wheel later).
        let t1 = Instant::now();
        assert!(
            c.is_closed(Duration::from_secs(10)),
            "{d:?}: idle connection must close"
        );
        let waited = t1.elapsed();
        assert!(
            waited >= Duration::from_millis(2400),
            "{d:?}: closed after {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(6),
            "{d:?}: closed after {waited:?}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(1500));
    }
}

#[test]
fn client_disconnect_mid_request_body_is_handled() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        for _ in 0..5 {
            let mut c = Client::connect(gw.addr);
            c.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\npartial");
            drop(c);
        }
        // The gateway is still healthy.
        assert_eq!(get(gw.addr, "/").status, 200, "{d:?}");
    }
}

/// One gateway, two listeners: the first with the defaults, the second with `allow_trace` and
/// `allow_underscores_in_headers`.
fn two_listeners(up: SocketAddr, routes: &str) -> String {
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         allow_trace = true\nallow_underscores_in_headers = true\n\n\
         [upstreams.up]\nendpoints = [{{ address = \"{up}\" }}]\n\n{routes}\n"
    )
}

/// An echoing upstream behind [`two_listeners`] with one route to it: the upstream, the
/// gateway (kept while the test runs) and the two listeners' addresses (defaults, then lax).
fn echo_behind_two_listeners(
    d: ringway::config::DriverChoice,
) -> (Upstream, TestGateway, SocketAddr, SocketAddr) {
    let up = Upstream::echo();
    let gw = TestGateway::start(
        &two_listeners(up.addr, "[[routes]]\nupstream = \"up\"\n"),
        d,
    );
    let addrs = gw.addrs();
    let (strict, lax) = (addrs[0], addrs[1]);
    (up, gw, strict, lax)
}

#[test]
fn version_trace_and_underscores_through_the_gateway() {
    for d in DRIVERS {
        let (up, _gw, strict, lax) = echo_behind_two_listeners(d);

        // RFC 9110 §2.5: HTTP/1.2 is served as HTTP/1.1, and proxied as such.
        let r = request(strict, b"GET /v12 HTTP/1.2\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(r.version, 1);
        let seen = up.last();
        assert_eq!((seen.target.as_str(), seen.version), ("/v12", 1), "{d:?}");
        assert!(seen.raw_head.starts_with(b"GET /v12 HTTP/1.1\r\n"));

        // TRACE: 405 with Allow by default, forwarded where the listener allows it.
        let hits = up.hits();
        let r = request(strict, b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 405, "{d:?}");
        assert_eq!(r.json()["error"], "method_not_allowed");
        let allow = r.header("allow").expect("405 carries Allow");
        assert!(allow.contains("GET") && !allow.contains("TRACE"), "{allow}");
        assert_eq!(up.hits(), hits, "{d:?}: TRACE reached the upstream");
        let r = request(lax, b"TRACE /t HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200, "{d:?}");
        assert_eq!(up.last().method, "TRACE");

        // Underscore header names: dropped by default, kept where the listener allows them.
        let raw: &[u8] =
            b"GET /u HTTP/1.1\r\nHost: a\r\nX_Consumer: evil\r\nX-Ok: 1\r\nX_User_Id: 7\r\n\r\n";
        assert_eq!(request(strict, raw).status, 200, "{d:?}");
        let seen = up.last();
        assert_eq!(seen.target, "/u");
        assert_eq!(seen.header("x-ok"), Some("1"));
        assert!(
            seen.headers.iter().all(|(k, _)| !k.contains('_')),
            "{d:?}: {:?}",
            seen.headers
        );
        assert_eq!(request(lax, raw).status, 200);
        let seen = up.last();
        assert_eq!(seen.header("x_consumer"), Some("evil"), "{d:?}");
        assert_eq!(seen.header("x_user_id"), Some("7"));

        // An invalid Host is refused before anything reaches the upstream.
        let hits = up.hits();
        assert_eq!(
            request(strict, b"GET / HTTP/1.1\r\nHost: evil.example/x\r\n\r\n").status,
            400
        );
        assert_eq!(up.hits(), hits);
    }
}

/// Where underscores are allowed, `Content_Length` / `Transfer_Encoding` (any spelling with an
/// `_` for a `-`) are refused: the gateway does not frame by them, but a next hop that reads `_`
/// as `-` (CGI-style servers do) would, and the two would split the bytes differently (RFC 9112
/// §6.1, §6.3 item 3, §11.2). Before, the line went upstream as it was, next to the gateway's own
/// framing: a CL.TE smuggle (http-request-smuggler's `underjoin1`). The default listener still
/// drops such lines.
#[test]
fn framing_fields_spelled_with_underscores_are_refused_where_kept_rfc9112_11_2() {
    for d in DRIVERS {
        let (up, _gw, strict, lax) = echo_behind_two_listeners(d);
        let smuggled = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        for line in [
            "Transfer_Encoding: chunked",
            "transfer_encoding: chunked",
            "Transfer-Encoding_: chunked",
            "Content_Length: 5",
            "CONTENT_LENGTH: 5",
        ] {
            let raw = [
                format!(
                    "POST /u HTTP/1.1\r\nHost: a\r\n{line}\r\nContent-Length: {}\r\n\r\n",
                    smuggled.len()
                )
                .as_bytes(),
                smuggled,
            ]
            .concat();
            let hits = up.hits();
            let mut c = Client::connect(lax);
            c.send(&raw);
            let r = c.read_response().expect("an answer");
            if line.starts_with("Transfer-Encoding_") {
                // Not a framing name under any spelling: kept and forwarded.
                assert_eq!(r.status, 200, "{d:?} {line}");
                continue;
            }
            assert_eq!(r.status, 400, "{d:?} {line}: {}", r.text());
            assert!(c.is_closed(Duration::from_secs(2)), "{d:?} {line}");
            assert_eq!(up.hits(), hits, "{d:?} {line}: reached the upstream");

            // The default listener drops the line and frames by Content-Length.
            let r = request(strict, &raw);
            assert_eq!(r.status, 200, "{d:?} {line}");
            let seen = up.last();
            assert_eq!(seen.target, "/u");
            assert_eq!(seen.body, smuggled, "{d:?} {line}");
            assert!(seen.headers.iter().all(|(k, _)| !k.contains('_')), "{d:?}");
        }
    }
}

enum Seen {
    /// A request head arrived (its body is not read yet).
    Head,
    /// A whole request: head and chunked body, as received.
    Whole(Vec<u8>),
}

/// A loopback upstream for chunked requests that reports the bytes it receives, framing
/// included, and answers each request with a 200 and `connection: close`. Serves `n`
/// connections, then returns; panics are re-raised by joining the handle.
fn raw_chunked_upstream(n: usize) -> (SocketAddr, mpsc::Receiver<Seen>, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    l.set_nonblocking(true).expect("nonblocking");
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..n {
            let mut s = loop {
                match l.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("upstream accept: {e}"),
                }
            };
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let mut head_end = None;
            let mut scanner = ChunkedScanner::new();
            let mut scanned = 0;
            loop {
                let k = s.read(&mut tmp).expect("upstream read");
                assert!(k > 0, "the gateway closed before the body ended");
                buf.extend_from_slice(&tmp[..k]);
                if head_end.is_none() {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        head_end = Some(p + 4);
                        scanned = p + 4;
                        let _ = tx.send(Seen::Head);
                    }
                }
                if head_end.is_some() {
                    let r = scanner
                        .scan(&buf[scanned..], |_, _| {})
                        .expect("the gateway forwards a valid chunked body");
                    scanned += r.consumed;
                    if r.done {
                        break;
                    }
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .expect("upstream write");
            let _ = tx.send(Seen::Whole(buf));
        }
    });
    (addr, rx, h)
}

fn next_whole(rx: &mpsc::Receiver<Seen>) -> Vec<u8> {
    loop {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("upstream saw a request")
        {
            Seen::Head => continue,
            Seen::Whole(b) => return b,
        }
    }
}

fn body_of(raw: &[u8]) -> &[u8] {
    let p = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    &raw[p + 4..]
}

/// Chunk extensions and trailer fields never reach the upstream: the body is re-framed, both
/// when it arrived with the head and when it is streamed.
#[test]
fn chunked_bodies_are_reframed_and_trailers_dropped() {
    for d in DRIVERS {
        let (addr, rx, server) = raw_chunked_upstream(2);
        let gw = TestGateway::start(&proxy_all(addr), d);
        let head: &[u8] = b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body: &[u8] = b"005;ext=1\r\nhello\r\n6 ; q=\"a;b\"\r\n world\r\n0\r\nAuthorization: Bearer x\r\nHost: evil\r\nX-Sum: 1\r\n\r\n";
        let want: &[u8] = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

        // All in one write: the body is kept whole before it is forwarded.
        let mut c = Client::connect(gw.addr);
        c.send(&[head, body].concat());
        assert_eq!(c.read_response().expect("response").status, 200, "{d:?}");
        assert_eq!(body_of(&next_whole(&rx)), want, "{d:?}");

        // Streamed: the rest of the body is sent once the upstream has the head.
        let mut c = Client::connect(gw.addr);
        c.send(&[head, &body[..14]].concat());
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("head upstream")
        {
            Seen::Head => {}
            Seen::Whole(_) => panic!("{d:?}: whole request before the body was sent"),
        }
        c.send(&body[14..]);
        assert_eq!(c.read_response().expect("response").status, 200, "{d:?}");
        let got = next_whole(&rx);
        assert_eq!(
            String::from_utf8_lossy(body_of(&got)),
            String::from_utf8_lossy(want),
            "{d:?}"
        );
        server.join().expect("upstream thread");
    }
}

/// A loopback upstream that reports every byte it receives, per connection, as it arrives
/// (`(connection index, bytes)`), and answers a head it sees complete on a connection's first
/// bytes with an empty 200. Serves `n` connections.
fn per_read_upstream(n: usize) -> (SocketAddr, mpsc::Receiver<(usize, Vec<u8>)>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for i in 0..n {
            let Ok((mut s, _)) = l.accept() else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut seen = Vec::new();
                let mut tmp = [0u8; 4096];
                let mut answered = false;
                while let Ok(k) = s.read(&mut tmp) {
                    if k == 0 {
                        return;
                    }
                    seen.extend_from_slice(&tmp[..k]);
                    let _ = tx.send((i, tmp[..k].to_vec()));
                    if !answered
                        && seen.windows(4).any(|w| w == b"\r\n\r\n")
                        && seen.starts_with(b"GET")
                    {
                        answered = true;
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A chunked body refused part way (here at a trailer line that starts with a bare LF, after
/// the line before it ended in an earlier read) leaves the connection's framing unknown: the
/// 400 closes it (RFC 9112 §6.3, §11.2). Before, the body reader's state had moved on over the
/// refused bytes, and reading them again for the answer took `\r\n` as the end of the trailer
/// section: the connection was kept, and `GET /smuggled` from inside the refused body was
/// parsed as the next request and proxied.
#[test]
fn a_body_refused_part_way_closes_the_connection_rfc9112_6_3() {
    for d in DRIVERS {
        let (addr, rx) = per_read_upstream(2);
        let gw = TestGateway::start(&proxy_all(addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: y");
        // Once the chunk's data is upstream, the gateway has read all of the first write.
        let mut first = Vec::new();
        while !first.windows(5).any(|w| w == b"hello") {
            let (_, b) = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the body's start upstream");
            first.extend_from_slice(&b);
        }
        c.send(b"\r\n\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 400, "{d:?}: {}", r.text());
        assert!(
            c.is_closed(Duration::from_secs(5)),
            "{d:?}: the connection stayed open"
        );
        drop(c);
        // Whatever else reached the upstream: never the request inside the refused body.
        let mut rest = Vec::new();
        while let Ok((_, b)) = rx.recv_timeout(Duration::from_millis(300)) {
            rest.extend_from_slice(&b);
        }
        assert!(
            !rest.windows(9).any(|w| w == b"/smuggled"),
            "{d:?}: {}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A route that forwards trailers passes only the fields RFC 9110 §6.5.1 allows in a trailer,
/// and none the route removes from requests (identity headers are among those).
#[test]
fn forwarded_trailers_are_filtered() {
    for d in DRIVERS {
        let (addr, rx, server) = raw_chunked_upstream(1);
        let gw = TestGateway::start(
            &config(
                &[addr],
                "[[routes]]\nupstream = \"up\"\ntrailers = \"forward\"\nrequest_headers = { remove = [\"x-secret\"] }\n",
            ),
            d,
        );
        let head: &[u8] = b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body: &[u8] = b"5;ext=1\r\nhello\r\n0\r\nAuthorization: Bearer x\r\nHost: evil\r\nContent-Length: 5\r\nX-Secret: s\r\nX-Sum: 1\r\n\r\n";
        let mut c = Client::connect(gw.addr);
        c.send(&[head, body].concat());
        assert_eq!(c.read_response().expect("response").status, 200, "{d:?}");
        assert_eq!(
            String::from_utf8_lossy(body_of(&next_whole(&rx))),
            "5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
            "{d:?}"
        );
        server.join().expect("upstream thread");
    }
}

/// `Max-Forwards` (RFC 9110 §7.6.2) on a listener that allows TRACE: with 0 the gateway is the
/// last hop and answers TRACE (the request echoed as `message/http`, secrets left out) and
/// OPTIONS itself; otherwise it forwards the value less one. Other methods carry it unchanged.
#[test]
fn max_forwards_makes_the_gateway_the_last_hop_or_is_decremented() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nallow_trace = true\n\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nupstream = \"up\"\n",
            up.addr
        );
        let gw = TestGateway::start(&toml, d);
        let mut c = Client::connect(gw.addr);
        c.send(b"TRACE /t HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\nX-Probe: 1\r\nAuthorization: Bearer secret\r\nCookie: s=1\r\n\r\n");
        let r = c.read_response().expect("TRACE answer");
        assert_eq!(r.status, 200, "{d:?}");
        assert_eq!(r.header("content-type"), Some("message/http"));
        let echo = r.text();
        assert!(echo.starts_with("TRACE /t HTTP/1.1\r\n"), "{echo}");
        assert!(
            echo.contains("X-Probe: 1\r\n") || echo.contains("x-probe: 1\r\n"),
            "{echo}"
        );
        assert!(!echo.to_ascii_lowercase().contains("secret"), "{echo}");
        assert!(!echo.to_ascii_lowercase().contains("cookie"), "{echo}");
        // OPTIONS with 0, on the same connection: the gateway answers with Allow.
        c.send(b"OPTIONS /t HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n");
        let r = c.read_response().expect("OPTIONS answer");
        assert_eq!(r.status, 200, "{d:?}");
        assert!(r.header("allow").is_some_and(|a| a.contains("GET")));
        assert_eq!(
            up.hits(),
            0,
            "{d:?}: a last-hop request reached the upstream"
        );
        // Above 0: forwarded, one less.
        c.send(b"TRACE /t HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\n\r\n");
        let r = c.read_response().expect("forwarded TRACE");
        assert_eq!(r.status, 200);
        assert_eq!(up.last().header("max-forwards"), Some("2"), "{d:?}");
        // Another method carries it unchanged.
        c.send(b"GET /t HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n");
        assert_eq!(c.read_response().expect("GET").status, 200);
        assert_eq!(up.last().header("max-forwards"), Some("0"), "{d:?}");
        assert_eq!(up.hits(), 2);
    }
}
