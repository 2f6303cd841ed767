//! Malformed and oversized requests over real sockets: each gets its status, a JSON body, and
//! the connection is closed afterwards so nothing behind it can be read as a request.
//! Also the client-side timeouts. Every scenario runs on both monoio drivers.

mod support;

use std::time::{Duration, Instant};

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
