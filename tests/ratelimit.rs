//! Rate limits over real sockets: 429 answers and headers, keys, accuracy across workers and
//! connections, bounded memory.

mod support;

use std::time::{Duration, Instant};

use ringway::config::DriverChoice;
use support::*;

fn limited(up: std::net::SocketAddr, limits: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"{up}\" }}]\n[[routes]]\nupstream = \"u\"\nrate_limits = [{limits}]\n{extra}\n"
    )
}

#[test]
fn over_the_limit_is_429_with_retry_after_and_ratelimit_headers() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
        let gw = TestGateway::start(
            &limited(
                up.addr,
                "{ key = \"client_ip\", rate = 5, per = \"1m\" }",
                "",
            ),
            d,
        );
        let mut c = Client::connect(gw.addr);
        for i in 0..5 {
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} request {i}");
            assert_eq!(r.header("ratelimit-policy"), Some("\"client_ip\";q=5;w=60"));
            assert!(r
                .header("ratelimit")
                .is_some_and(|v| v.starts_with("\"client_ip\";r=")));
        }
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 429, "{d:?}");
        assert_eq!(r.json()["error"], "rate_limited");
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=12).contains(&retry), "retry-after {retry}");
        assert!(r.header("ratelimit").is_some_and(|v| v.contains(";r=0;")));
        assert_eq!(up.hits(), 5, "refused requests never reach the upstream");
        // The connection stays usable after a 429.
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 429);
    }
}

/// draft-ietf-httpapi-ratelimit-headers: `r` is what is left of the quota `q` the policy
/// names, so never more than `q`. A bucket whose `burst` is over its `rate` holds more tokens
/// than `q`; before, `r` showed them (`q=2` with `r=9`).
#[test]
fn remaining_never_exceeds_the_quota_when_burst_is_over_rate() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
        let gw = TestGateway::start(
            &limited(
                up.addr,
                "{ key = \"client_ip\", rate = 2, per = \"1m\", burst = 10 }",
                "",
            ),
            d,
        );
        let mut c = Client::connect(gw.addr);
        let mut seen = Vec::new();
        for i in 0..10 {
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            let r = c.read_response().unwrap();
            assert_eq!(r.status, 200, "{d:?} request {i}: the burst admits ten");
            assert_eq!(r.header("ratelimit-policy"), Some("\"client_ip\";q=2;w=60"));
            let v = r.header("ratelimit").unwrap().to_string();
            let left: u64 = v
                .split(';')
                .find_map(|p| p.strip_prefix("r="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{v}"));
            seen.push(left);
        }
        assert_eq!(
            seen,
            [2, 2, 2, 2, 2, 2, 2, 2, 1, 0],
            "{d:?}: r <= q, then the burst's last"
        );
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 429, "{d:?}");
        assert!(r.header("ratelimit").is_some_and(|v| v.contains(";r=0;")));
    }
}

#[test]
fn header_keys_have_their_own_buckets() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let gw = TestGateway::start(
        &limited(
            up.addr,
            "{ key = \"header:x-api-key\", rate = 2, per = \"1m\" }",
            "",
        ),
        DriverChoice::Auto,
    );
    let status = |key: &str| {
        request(
            gw.addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\nX-Api-Key: {key}\r\n\r\n").as_bytes(),
        )
        .status
    };
    assert_eq!((status("a"), status("a"), status("a")), (200, 200, 429));
    assert_eq!((status("b"), status("b"), status("b")), (200, 200, 429));
}

/// A client at twice the limit, over several connections, is admitted at the limit ±10%,
/// with one worker and with two.
#[test]
fn admitted_rate_matches_the_limit_across_workers_and_connections() {
    for workers in [1, 2] {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
        let rate = 200.0;
        let burst = 20.0;
        let gw = TestGateway::start(
            &limited(
                up.addr,
                "{ key = \"client_ip\", rate = 200, per = \"1s\", burst = 20 }",
                &format!("[server]\nworkers = {workers}"),
            ),
            DriverChoice::Auto,
        );
        let t0 = Instant::now();
        // 8 connections × 50 requests/s = 400/s, twice the limit.
        let seen = paced_load(
            &[gw.addr],
            8,
            Duration::from_millis(20),
            Duration::from_secs(2),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert_eq!(seen.len(), 2, "only 200 and 429: {seen:?}");
        let ok = seen[&200];
        let refused = seen[&429];
        let elapsed = t0.elapsed().as_secs_f64();
        let expected = burst + rate * elapsed;
        println!(
            "{workers} worker(s): {ok} admitted, {refused} refused in {elapsed:.2} s; limit allows {expected:.0}"
        );
        assert!(refused > 0, "the client must be over its limit");
        let err = (ok as f64 - expected) / expected;
        assert!(
            err.abs() <= 0.10,
            "{workers} worker(s): admitted {ok}, expected {expected:.0} ({:+.1}%)",
            err * 100.0
        );
    }
}

#[test]
fn a_flood_of_keys_evicts_old_ones_instead_of_growing() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let gw = TestGateway::start(
        &limited(
            up.addr,
            "{ key = \"header:x-user\", rate = 1, per = \"1h\" }",
            "[rate_limiting]\nmax_keys = 100",
        ),
        DriverChoice::Auto,
    );
    let mut c = Client::connect(gw.addr);
    let mut send = |user: &str| {
        c.send(format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: {user}\r\n\r\n").as_bytes());
        c.read_response().unwrap().status
    };
    assert_eq!((send("first"), send("first")), (200, 429));
    // 3,000 distinct keys, each spending its one token.
    for i in 0..3000 {
        assert_eq!(send(&format!("flood-{i}")), 200);
    }
    // With room for 100 keys, at most about 100 of them can still be remembered (their bucket
    // empty); the rest were evicted and start again with a full bucket. Were every key kept,
    // all 3,000 would be refused now.
    let remembered = (0..3000)
        .filter(|i| send(&format!("flood-{i}")) == 429)
        .count();
    println!("{remembered} of 3000 flooded keys still remembered with max_keys = 100");
    assert!(
        remembered <= 300,
        "{remembered} keys remembered: memory is not bounded"
    );
}

#[test]
fn concurrency_limit_counts_in_flight_requests_across_workers() {
    let slow = Upstream::slow(Duration::from_millis(500), b"done");
    let toml = format!(
        "[server]\nworkers = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"u\"\nconcurrency = {{ max = 3 }}\n",
        slow.addr
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let addr = gw.addr;
    // Eight clients at once, on connections spread over both workers.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10 * i));
                get(addr, "/")
            })
        })
        .collect();
    let rs: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = rs.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Resp> = rs.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok, 3, "exactly max requests in flight, gateway-wide");
    assert_eq!(refused.len(), 5);
    assert_eq!(refused[0].json()["error"], "concurrency_limited");
    assert_eq!(refused[0].header("retry-after"), Some("1"));
    // Slots are given back when requests end.
    assert_eq!(get(addr, "/").status, 200);
}

/// Behind a trusted proxy (`server.trusted_proxies`), `client_ip` counts the client that
/// `X-Forwarded-For` names, not the proxy: each client behind it gets its own bucket. The
/// client is the rightmost element that is not a trusted proxy (RFC 7239 §5.2 and the
/// X-Forwarded-For convention: each proxy appends what it saw), so one cannot escape its
/// bucket by writing other addresses before its own. From an untrusted peer the header is
/// not believed: every request counts against the peer.
#[test]
fn client_ip_limits_count_the_client_behind_a_trusted_proxy() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let limit = "{ key = \"client_ip\", rate = 1, per = \"1m\" }";
    let gw = TestGateway::start(
        &limited(
            up.addr,
            limit,
            "[server]\nworkers = 1\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]",
        ),
        DriverChoice::Auto,
    );
    let status = |addr, xff: &str| {
        let xff = if xff.is_empty() {
            String::new()
        } else {
            format!("X-Forwarded-For: {xff}\r\n")
        };
        request(
            addr,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{xff}\r\n").as_bytes(),
        )
        .status
    };
    assert_eq!(status(gw.addr, "198.51.100.1"), 200);
    assert_eq!(status(gw.addr, "198.51.100.1"), 429);
    // Another client behind the same proxy has its own bucket.
    assert_eq!(status(gw.addr, "198.51.100.2"), 200);
    // Through a second trusted proxy, or written with a port: the same client.
    assert_eq!(status(gw.addr, "198.51.100.1, 10.1.2.3"), 429);
    assert_eq!(status(gw.addr, "198.51.100.1:5555"), 429);
    // Addresses the client wrote before its own change nothing.
    assert_eq!(status(gw.addr, "203.0.113.9, 198.51.100.2"), 429);
    // No header: the proxy itself.
    assert_eq!(status(gw.addr, ""), 200);
    assert_eq!(status(gw.addr, ""), 429);

    // Not trusted: the header is the client's own, and every request is the peer's.
    let gw = TestGateway::start(&limited(up.addr, limit, ""), DriverChoice::Auto);
    assert_eq!(status(gw.addr, "198.51.100.1"), 200);
    assert_eq!(status(gw.addr, "198.51.100.2"), 429);
}
