//! Forwarding headers over real sockets: what an upstream receives from a trusted and from an
//! untrusted peer (`[server] trusted_proxies`, RFC 7239). The peer in these tests is 127.0.0.1
//! (or ::1); the configs list it or not. Every scenario runs on both monoio drivers.

mod support;

use support::*;

/// A client that claims to be someone else, on every forwarding header.
const SPOOFED: &[u8] = b"GET /f HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6;proto=https;host=evil.test\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Port: 443\r\n\r\n";

fn with_trusted(up: std::net::SocketAddr, list: &str) -> String {
    config(
        &[up],
        &format!("[server]\ntrusted_proxies = {list}\n[[routes]]\nupstream = \"up\"\n"),
    )
}

/// What an untrusted peer's request must look like upstream: only what this hop saw.
fn assert_replaced(req: &Req, port: u16, ctx: &str) {
    assert_eq!(req.headers_named("x-forwarded-for"), ["127.0.0.1"], "{ctx}");
    assert_eq!(req.headers_named("x-real-ip"), ["127.0.0.1"], "{ctx}");
    assert_eq!(req.headers_named("x-forwarded-proto"), ["http"], "{ctx}");
    assert_eq!(
        req.headers_named("x-forwarded-host"),
        ["shop.test"],
        "{ctx}"
    );
    let port = port.to_string();
    assert_eq!(
        req.headers_named("x-forwarded-port"),
        [port.as_str()],
        "{ctx}"
    );
    assert_eq!(
        req.headers_named("forwarded"),
        ["for=127.0.0.1;proto=http;host=shop.test"],
        "{ctx}"
    );
    let head = String::from_utf8_lossy(&req.raw_head);
    assert!(
        // The spoofed port is a whole value (": 443" also begins a real port such as 44301).
        !head.contains("6.6.6.6")
            && !head.contains("evil.test")
            && !head.lines().any(|l| l.trim_end().ends_with(": 443")),
        "{ctx}: a spoofed value reached the upstream:\n{head}"
    );
}

#[test]
fn untrusted_peer_forwarding_headers_are_replaced_by_default() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let r = request(gw.addr, SPOOFED);
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_replaced(&up.last(), gw.addr.port(), &format!("{d:?}"));
    }
}

#[test]
fn peer_outside_trusted_proxies_is_not_trusted() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &with_trusted(up.addr, "[\"10.0.0.0/8\", \"::1/128\", \"127.0.0.2\"]"),
            d,
        );
        let r = request(gw.addr, SPOOFED);
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_replaced(&up.last(), gw.addr.port(), &format!("{d:?}"));
    }
}

#[test]
fn trusted_peer_forwarding_headers_are_kept_and_extended() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &with_trusted(up.addr, "[\"10.0.0.0/8\", \"127.0.0.0/8\"]"),
            d,
        );
        let mut c = Client::connect(gw.addr);
        c.send(SPOOFED);
        let r = c.read_final();
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        let req = up.last();
        assert_eq!(
            req.headers_named("x-forwarded-for"),
            ["6.6.6.6, 127.0.0.1"],
            "{d:?}"
        );
        assert_eq!(
            req.headers_named("forwarded"),
            ["for=6.6.6.6;proto=https;host=evil.test, for=127.0.0.1;proto=http;host=shop.test"],
            "{d:?}"
        );
        assert_eq!(req.headers_named("x-real-ip"), ["6.6.6.6"], "{d:?}");
        assert_eq!(req.headers_named("x-forwarded-proto"), ["https"], "{d:?}");
        assert_eq!(
            req.headers_named("x-forwarded-host"),
            ["evil.test"],
            "{d:?}"
        );
        assert_eq!(req.headers_named("x-forwarded-port"), ["443"], "{d:?}");

        // The next request on the same connection sends none: this hop's values, nothing left
        // over from the first.
        c.send(b"GET /g HTTP/1.1\r\nHost: shop.test\r\n\r\n");
        let r = c.read_final();
        assert_eq!(r.status, 200, "{d:?}");
        let req = up.last();
        assert_eq!(req.target, "/g");
        assert_eq!(req.headers_named("x-forwarded-for"), ["127.0.0.1"], "{d:?}");
        assert_eq!(req.headers_named("x-real-ip"), ["127.0.0.1"], "{d:?}");
        assert_eq!(req.headers_named("x-forwarded-proto"), ["http"], "{d:?}");
        let port = gw.addr.port().to_string();
        assert_eq!(
            req.headers_named("x-forwarded-port"),
            [port.as_str()],
            "{d:?}"
        );
        assert_eq!(
            req.headers_named("forwarded"),
            ["for=127.0.0.1;proto=http;host=shop.test"],
            "{d:?}"
        );
    }
}

#[test]
fn ipv6_peer_in_forwarded_is_quoted_and_bracketed() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    for d in DRIVERS {
        for (trusted, list) in [(false, "[]"), (true, "[\"::1\"]")] {
            let up = Upstream::echo();
            let toml = format!(
                "[server]\ntrusted_proxies = {list}\n[[listeners]]\naddress = \"[::1]:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"up\"\n",
                up.addr
            );
            let gw = TestGateway::start(&toml, d);
            let r = request(
                gw.addr,
                b"GET / HTTP/1.1\r\nHost: [::1]\r\nForwarded: for=\"[2001:db8::9]\"\r\n\r\n",
            );
            assert_eq!(r.status, 200, "{d:?}");
            let req = up.last();
            let want = if trusted {
                "for=\"[2001:db8::9]\", for=\"[::1]\";proto=http;host=\"[::1]\""
            } else {
                "for=\"[::1]\";proto=http;host=\"[::1]\""
            };
            assert_eq!(
                req.headers_named("forwarded"),
                [want],
                "{d:?} trusted={trusted}"
            );
            assert_eq!(req.headers_named("x-real-ip"), ["::1"], "{d:?}");
        }
    }
}

#[test]
fn longest_configured_timeouts_proxy_without_overflow() {
    // The regression: a huge `upstream_response` passed `check` and aborted the process on the
    // first proxied request (`Instant + d`). Now the longest accepted value is a day, and a
    // gateway configured with it serves requests.
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &config(
                &[up.addr],
                "[timeouts]\nclient_head = \"24h\"\nclient_idle = \"24h\"\nclient_body = \"24h\"\nclient_write = \"24h\"\nupstream_connect = \"24h\"\nupstream_response = \"1440m\"\nupstream_body = \"86400s\"\n[[routes]]\nupstream = \"up\"\nretry = { backoff_base = \"24h\", backoff_max = \"24h\" }\ntimeouts = { upstream_response = \"86400000ms\" }\n",
            ),
            d,
        );
        let r = request(
            gw.addr,
            b"POST /t HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(up.last().body, b"hi");
    }
}

#[test]
fn regression_crlf_in_replace_prefix_never_reaches_a_head() {
    // `ringway check` and the gateway load the same way: the config is refused, naming the
    // key and the line.
    let toml = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\npath_prefix = \"/v1\"\nreplace_prefix = \"/v2\\r\\nX-Injected: yes\"\nupstream = \"up\"\n";
    let e = ringway::config::Config::parse(toml, "inject.toml").unwrap_err();
    assert_eq!(e.key, "routes[0].replace_prefix");
    assert_eq!(e.line, Some(7));
    assert!(e.to_string().starts_with("inject.toml:7:"), "{e}");
}
