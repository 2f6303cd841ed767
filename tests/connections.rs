//! Connection-level behaviour of the request lifecycle: the per-worker connection cap, the
//! lingering close after a refused body, and draining a short unread body.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

const DIRECT: &str = "[[routes]]\npath = \"/ok\"\ndirect = { status = 200, body = \"ok\" }\n";

#[test]
fn accepting_pauses_at_the_connection_cap_and_resumes_when_one_closes() {
    for driver in DRIVERS {
        let toml = format!(
            "[server]\nmax_connections_per_worker = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}"
        );
        let gw = TestGateway::start(&toml, driver);
        let mut a = Client::connect(gw.addr);
        let mut b = Client::connect(gw.addr);
        for c in [&mut a, &mut b] {
            c.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
            assert_eq!(c.read_response().expect("answer").status, 200);
        }
        // The third connection waits in the kernel's backlog: no answer while two are open.
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_timeout(Duration::from_millis(300));
        assert!(
            c.read_response().is_none(),
            "{driver:?}: a third connection was served past the cap"
        );
        // One closes: the waiting one is accepted and served.
        drop(a);
        c.read_timeout(Duration::from_secs(5));
        assert_eq!(
            c.read_response().expect("served after a close").status,
            200,
            "{driver:?}"
        );
        // The cap holds again: b and c are open.
        let mut d = Client::connect(gw.addr);
        d.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
        d.read_timeout(Duration::from_millis(300));
        assert!(d.read_response().is_none(), "{driver:?}");
        drop(b);
        d.read_timeout(Duration::from_secs(5));
        assert_eq!(d.read_response().expect("served").status, 200);
    }
}

#[test]
fn a_refused_body_still_being_sent_meets_a_lingering_close_not_a_reset() {
    // The gateway refuses a 1 MiB body at once (413) and closes. It closes in stages (RFC 9112
    // §9.6): a half-close, then it reads and throws away what the client still sends, so the
    // client gets the whole answer and an orderly end instead of a reset that could destroy
    // the answer before it is read.
    for driver in DRIVERS {
        let toml = format!(
            "[limits]\nmax_body_bytes = \"1KiB\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}"
        );
        let gw = TestGateway::start(&toml, driver);
        let mut c = Client::connect(gw.addr);
        let total = 1 << 20;
        let chunk = vec![b'x'; 64 * 1024];
        c.send(
            format!("POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
        );
        c.send(&chunk);
        let r = c.read_response().expect("the 413");
        assert_eq!(r.status, 413, "{driver:?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            c.is_closed(Duration::from_secs(2)),
            "{driver:?}: no FIN after the answer"
        );
        // The rest of the body still goes through: the gateway is reading it, not resetting.
        let mut sent = chunk.len();
        while sent < total {
            c.s.write_all(&chunk)
                .unwrap_or_else(|e| panic!("{driver:?}: write after the answer failed: {e}"));
            sent += chunk.len();
        }
    }
}

#[test]
fn a_short_unread_body_is_drained_and_the_connection_goes_on() {
    // A direct answer to a request whose body arrives after the head (not yet read when the
    // answer is made): the body is drained, and the next request on the connection is served.
    for driver in DRIVERS {
        let toml = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}");
        let gw = TestGateway::start(&toml, driver);
        let mut c = Client::connect(gw.addr);
        let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
        c.send(
            format!(
                "POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                smuggled.len()
            )
            .as_bytes(),
        );
        let r = c.read_response().expect("answer");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None, "kept alive");
        // The body, looking like a request, comes late: it must be drained, not parsed.
        c.send(smuggled);
        c.send(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response().expect("next answer");
        assert_eq!(
            r.status, 404,
            "{driver:?}: the body was parsed as a request"
        );
        assert_eq!(r.json()["error"], "no_route");
        // And it was the only answer: nothing for /smuggled.
        c.read_timeout(Duration::from_millis(200));
        assert!(c.read_response().is_none(), "{driver:?}: an extra answer");
    }
}

#[test]
fn a_body_trickling_past_client_body_total_gets_408() {
    let up = Upstream::echo();
    let gw = TestGateway::start(
        &config(
            &[up.addr],
            "[timeouts]\nclient_body = \"5s\"\nclient_body_total = \"300ms\"\n[[routes]]\nupstream = \"up\"\n",
        ),
        DRIVERS[0],
    );
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n");
    // One byte every 50 ms: each pause is far below client_body, the whole far above the total.
    let mut w = c.s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        for _ in 0..100 {
            if w.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let r = c.read_response().expect("an answer before the body ends");
    assert_eq!(r.status, 408);
    assert_eq!(r.json()["error"], "request_timeout");
    writer.join().expect("writer");
}

#[test]
fn upstream_body_total_cuts_a_response_that_never_ends() {
    let up = Upstream::start(|_| Reply::Slow {
        parts: (0..40)
            .map(|i| {
                let part = if i == 0 {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nx".to_vec()
                } else {
                    b"x".to_vec()
                };
                (Duration::from_millis(50), part)
            })
            .collect(),
        close: false,
    });
    let gw = TestGateway::start(
        &config(
            &[up.addr],
            "[timeouts]\nupstream_body = \"5s\"\nupstream_body_total = \"300ms\"\n[[routes]]\nupstream = \"up\"\n",
        ),
        DRIVERS[0],
    );
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    // The head went out; the body is cut after 300 ms: the client sees the connection end
    // before the 1000 bytes.
    assert!(
        c.read_response().is_none(),
        "a cut response must not look complete"
    );
}

#[test]
fn zero_means_no_total_deadline_and_other_values_are_checked() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    for ok in ["0s", "0ms", "10s"] {
        let cfg = ringway::config::Config::parse(
            &format!("[timeouts]\nupstream_body_total = \"{ok}\"\n{base}"),
            "t.toml",
        )
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(
            cfg.timeouts.upstream_body_total.0.is_none(),
            ok.starts_with('0')
        );
    }
    let err = ringway::config::Config::parse(
        &format!("[timeouts]\nclient_body_total = \"soon\"\n{base}"),
        "t.toml",
    )
    .expect_err("refused");
    assert!(err.to_string().contains("client_body_total"), "{err}");
}

#[test]
fn an_upstream_that_stops_reading_the_body_is_cut_off_at_upstream_write() {
    // The upstream accepts and never reads: once the socket buffers are full, the gateway's
    // write waits, and upstream_write (not the client's pace) ends the wait with a 504.
    // Under a second the wait is on a runtime timer; from a second on, on the worker's
    // deadline wheel (`IoWheel`): both end it.
    for t in ["300ms", "1s"] {
        stalled_upstream_write(t);
    }
}

fn stalled_upstream_write(t: &str) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let up = l.local_addr().expect("addr");
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        // Holds the accepted connection, unread, until the test has its answer (or 20 s).
        let (s, _) = l.accept().expect("accept");
        let _ = done_rx.recv_timeout(Duration::from_secs(20));
        drop(s);
    });
    let gw = TestGateway::start(
        &config(
            &[up],
            &format!("[limits]\nmax_body_bytes = \"64MiB\"\n[timeouts]\nupstream_write = \"{t}\"\nupstream_response = \"{t}\"\n[[routes]]\nupstream = \"up\"\n"),
        ),
        DRIVERS[0],
    );
    let mut c = Client::connect(gw.addr);
    let total = 32 << 20;
    c.send(format!("POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes());
    let mut w = c.s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 256 * 1024];
        let mut sent = 0;
        while sent < total && w.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
    });
    let r = c
        .read_response()
        .expect("an answer while the upstream stalls");
    assert_eq!(r.status, 504, "{t}: {}", r.text());
    assert_eq!(r.json()["error"], "upstream_timeout");
    assert_eq!(r.header("connection"), Some("close"));
    let _ = done_tx.send(());
    drop(c);
    writer.join().expect("writer");
    holder.join().expect("holder");
}

#[test]
fn a_client_that_stops_reading_the_response_is_cut_off_at_client_write() {
    // The client sends a request and never reads: once the socket buffers are full, the
    // gateway's write to it waits, and client_write ends the wait. The relay then stops, and
    // the upstream connection, in the middle of a body, is closed (the origin's write
    // fails). Under a second the wait is on a runtime timer; from a second on, on the
    // worker's deadline wheel (`IoWheel`).
    for driver in DRIVERS {
        for t in ["300ms", "1s"] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let up = l.local_addr().expect("addr");
            let origin = std::thread::spawn(move || {
                let (mut s, _) = l.accept().expect("accept");
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = std::io::Read::read(&mut s, &mut b).expect("request");
                    assert!(n > 0, "the request ended early");
                    head.extend_from_slice(&b[..n]);
                }
                // A body far larger than any socket buffer; the origin gives up by itself if
                // the gateway never lets go (the test then fails below).
                s.set_write_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                let total: u64 = 1 << 30;
                s.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
                )
                .expect("head");
                let chunk = vec![b'x'; 256 * 1024];
                let mut sent = 0u64;
                let err = loop {
                    if let Err(e) = s.write_all(&chunk) {
                        break e;
                    }
                    sent += chunk.len() as u64;
                    assert!(sent < total, "the whole body went through an unread client");
                };
                err.kind()
            });
            let gw = TestGateway::start(
                &config(
                    &[up],
                    &format!("[timeouts]\nclient_write = \"{t}\"\nupstream_body = \"60s\"\n[[routes]]\nupstream = \"up\"\n"),
                ),
                driver,
            );
            let mut c = Client::connect(gw.addr);
            c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
            // Never read: the origin's write ends when the gateway closes its side.
            let kind = origin.join().expect("origin");
            assert!(
                matches!(
                    kind,
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "{driver:?} {t}: the origin's write ended with {kind:?}, not the gateway's close"
            );
            // The client's connection is closed too: what it reads ends.
            c.read_timeout(Duration::from_secs(30));
            let mut sink = vec![0u8; 1 << 20];
            loop {
                match std::io::Read::read(&mut c.s, &mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset,
                            "{driver:?} {t}: the client's connection stayed open"
                        );
                        break;
                    }
                }
            }
        }
    }
}

/// A wait on the worker's deadline wheel (`IoWheel`, timeouts of a second or more) never
/// ends before its timeout, also when the worker ran behind its 50 ms tick (a long stretch of
/// work on its thread: a purge reading a large store, a burst of handshakes; here a control
/// job that holds the worker 900 ms). Before, a wait that began in that stretch counted its
/// deadline from the tick the wheel had last seen, as far behind as the worker was: a
/// `client_write` of 1 s cut a client after some 200 ms. The client here reads nothing for
/// 500 ms after the worker is free again, then everything: the whole body must come.
#[test]
fn a_wheel_deadline_is_not_early_when_the_worker_ran_behind_its_tick() {
    use std::io::Read;
    const BODY: usize = 8 << 20;
    for driver in DRIVERS {
        let body = "x".repeat(BODY);
        let gw = TestGateway::start(
            &format!("[server]\nworkers = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[timeouts]\nclient_write = \"1s\"\n[[routes]]\npath = \"/small\"\ndirect = {{ status = 200, body = \"ok\" }}\n[[routes]]\npath = \"/big\"\ndirect = {{ status = 200, body = \"{body}\" }}\n"),
            driver,
        );
        // A client whose receive buffer is small: the gateway's write of the big body waits.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        sock.connect(&gw.addr.into()).expect("connect");
        let mut c = Client::from_stream(std::net::TcpStream::from(sock));
        c.read_timeout(Duration::from_secs(20));
        // The connection is open on one worker, waiting for its next request.
        c.send(b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().expect("a first answer").status, 200);
        // Every worker is held 900 ms; the next request arrives meanwhile, so it is read,
        // and its answer's write begins, before the worker's next tick.
        let started = Event::new();
        let (s2, held) = (
            started.clone(),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        let control = gw.gateway().control().clone();
        let hold = std::thread::spawn(move || {
            control
                .ask(Duration::from_secs(10), move |_| {
                    if held.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                        s2.set();
                    }
                    std::thread::sleep(Duration::from_millis(900));
                })
                .expect("every worker held");
        });
        assert!(
            started.wait(Duration::from_secs(10)),
            "{driver:?}: no worker held"
        );
        c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
        hold.join().expect("hold");
        // Well within client_write: the gateway must still be waiting to write.
        std::thread::sleep(Duration::from_millis(500));
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        let want = loop {
            match c.s.read(&mut chunk) {
                Ok(0) | Err(_) => break None,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if got.len() >= end + 4 + BODY {
                    break Some(end + 4 + BODY);
                }
            }
        };
        assert_eq!(
            want,
            Some(got.len()),
            "{driver:?}: the connection was cut after {} bytes",
            got.len()
        );
    }
}

/// Sends `n` requests at once, each on its own client connection; all must succeed.
fn burst(addr: std::net::SocketAddr, n: usize) {
    let threads: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || get(addr, "/b").status))
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client thread"), 200);
    }
}

#[test]
fn the_upstream_pool_follows_demand_beyond_the_old_fixed_cap() {
    // 100 requests in flight at once, twice. With the automatic idle cap the pool keeps the
    // 100 connections of the first burst and the second burst opens none; with a fixed cap of
    // 64 (the old default) the second burst has to open new ones.
    for (max_idle, expect_reuse) in [("\"auto\"", true), ("64", false)] {
        let up = Upstream::slow(Duration::from_millis(300), b"ok");
        // `config` puts `extra` right after the group's endpoints, inside its table.
        let extra = format!("max_idle = {max_idle}\n[[routes]]\nupstream = \"up\"\n");
        let gw = TestGateway::start(&config(&[up.addr], &extra), DRIVERS[0]);
        burst(gw.addr, 100);
        let after_first = up.conns();
        assert!(
            after_first >= 90,
            "{max_idle}: {after_first} connections for 100 at once"
        );
        burst(gw.addr, 100);
        let opened = up.conns() - after_first;
        if expect_reuse {
            assert!(
                opened <= 5,
                "{max_idle}: the second burst opened {opened} connections"
            );
        } else {
            assert!(
                opened >= 20,
                "{max_idle}: the second burst opened only {opened}"
            );
        }
    }
}
