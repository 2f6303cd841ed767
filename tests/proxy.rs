//! Proxying over real sockets: routing, header rules, bodies both ways, framing, pools.
//! Every scenario runs on both monoio drivers.

mod support;

use std::time::Duration;

use support::*;

#[test]
fn forwards_path_query_method_and_body_unchanged() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let r = request(
            gw.addr,
            b"POST /a/b%20c?x=1&y=%2F HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\nX-Custom: v\r\n\r\nhello",
        );
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        let req = up.last();
        assert_eq!(req.method, "POST");
        assert_eq!(req.target, "/a/b%20c?x=1&y=%2F");
        assert_eq!(req.body, b"hello");
        assert_eq!(req.header("host"), Some("api.test"));
        assert_eq!(req.header("x-custom"), Some("v"));
        assert_eq!(req.header("content-length"), Some("5"));
        assert_eq!(req.version, 1, "upstream requests are HTTP/1.1");
    }
}

#[test]
fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
    for d in DRIVERS {
        let up = Upstream::start(|_| {
            Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-secret-resp\r\nX-Secret-Resp: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\nX-Request-Id: upstream-id\r\n\r\nok".to_vec())
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let r = request(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: h.test\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x\r\nUpgrade: websocket\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: client-id-1\r\nVia: 1.0 edge\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        let req = up.last();
        for h in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "upgrade",
        ] {
            assert!(
                req.header(h).is_none(),
                "{d:?}: {h} must not be forwarded: {:?}",
                req.headers
            );
        }
        // The peer is not a trusted proxy: its X-Forwarded-For is replaced (tests/forwarding.rs).
        assert_eq!(req.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(req.header("x-forwarded-proto"), Some("http"));
        assert_eq!(req.header("x-forwarded-host"), Some("h.test"));
        assert_eq!(req.headers_named("via"), vec!["1.0 edge", "1.1 ringway"]);
        assert_eq!(req.header("x-request-id"), Some("client-id-1"));
        // Response side.
        for h in ["x-secret-resp", "keep-alive", "upgrade"] {
            assert!(
                !r.has(h),
                "{d:?}: {h} must not reach the client: {:?}",
                r.headers
            );
        }
        assert_eq!(r.header("x-request-id"), Some("client-id-1"));
        assert_eq!(r.header("via"), Some("1.1 ringway"));
    }
}

#[test]
fn request_id_is_generated_when_absent_or_invalid() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let r1 = get(gw.addr, "/");
        let r2 = request(
            gw.addr,
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: bad\"id\r\n\r\n",
        );
        let id1 = r1.header("x-request-id").expect("id").to_string();
        let id2 = r2.header("x-request-id").expect("id").to_string();
        assert_eq!(id1.len(), 24);
        assert_ne!(id1, id2);
        assert_ne!(id2, "bad\"id");
        assert_eq!(up.last().header("x-request-id"), Some(id2.as_str()));
    }
}

#[test]
fn routes_by_host_path_method_and_header() {
    for d in DRIVERS {
        let a = Upstream::start(|_| Reply::Raw(ok_response(b"a")));
        let b = Upstream::start(|_| Reply::Raw(ok_response(b"b")));
        let toml = format!(
            r#"
[[listeners]]
address = "127.0.0.1:0"
[upstreams.a]
endpoints = [{{ address = "{}" }}]
[upstreams.b]
endpoints = [{{ address = "{}" }}]

[[routes]]
name = "catch-all"
direct = {{ status = 200, body = "fallback" }}

[[routes]]
name = "api-prefix"
path_prefix = "/api/"
upstream = "a"

[[routes]]
name = "api-v2-longer-prefix"
path_prefix = "/api/v2/"
upstream = "b"

[[routes]]
name = "exact"
path = "/api/exact"
upstream = "b"

[[routes]]
name = "regex"
path_regex = "^/api/items/[0-9]+$"
upstream = "b"

[[routes]]
name = "post-only"
path_prefix = "/api/"
methods = ["POST"]
upstream = "b"

[[routes]]
name = "canary"
path_prefix = "/api/"
headers = {{ "x-canary" = "yes" }}
upstream = "b"

[[routes]]
name = "exact-host"
hosts = ["shop.example.com"]
upstream = "b"

[[routes]]
name = "wildcard-host"
hosts = ["*.example.com"]
path_prefix = "/"
upstream = "a"
"#,
            a.addr, b.addr
        );
        let gw = TestGateway::start(&toml, d);
        let body = |raw: &str| request(gw.addr, raw.as_bytes()).text();
        assert_eq!(
            body("GET /api/x HTTP/1.1\r\nHost: t\r\n\r\n"),
            "a",
            "{d:?} prefix"
        );
        assert_eq!(
            body("GET /api/v2/x HTTP/1.1\r\nHost: t\r\n\r\n"),
            "b",
            "longest prefix wins"
        );
        assert_eq!(
            body("GET /api/exact HTTP/1.1\r\nHost: t\r\n\r\n"),
            "b",
            "exact beats prefix"
        );
        assert_eq!(
            body("GET /api/exact?q=1 HTTP/1.1\r\nHost: t\r\n\r\n"),
            "b",
            "query is not part of the path"
        );
        assert_eq!(
            body("GET /api/items/42 HTTP/1.1\r\nHost: t\r\n\r\n"),
            "b",
            "regex beats prefix"
        );
        assert_eq!(body("GET /api/items/x HTTP/1.1\r\nHost: t\r\n\r\n"), "a");
        assert_eq!(
            body("POST /api/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"),
            "b",
            "method condition"
        );
        assert_eq!(
            body("GET /api/x HTTP/1.1\r\nHost: t\r\nX-Canary: yes\r\n\r\n"),
            "b",
            "header condition"
        );
        assert_eq!(body("GET /other HTTP/1.1\r\nHost: t\r\n\r\n"), "fallback");
        assert_eq!(
            body("GET /other HTTP/1.1\r\nHost: SHOP.example.com:8080\r\n\r\n"),
            "b",
            "exact host, any case and port"
        );
        assert_eq!(
            body("GET /other HTTP/1.1\r\nHost: m.example.com\r\n\r\n"),
            "a",
            "wildcard host"
        );
        assert_eq!(
            body("GET /other HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            "fallback",
            "wildcard needs a subdomain"
        );
        assert_eq!(
            body("GET http://shop.example.com/x HTTP/1.1\r\nHost: other\r\n\r\n"),
            "b",
            "absolute-form authority is the host"
        );
    }
}

#[test]
fn no_route_is_404_json_with_request_id() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(
            &config(
                &[up.addr],
                "[[routes]]\npath_prefix = \"/only\"\nupstream = \"up\"\n",
            ),
            d,
        );
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")));
        let j = r.json();
        assert_eq!(j["error"], "no_route");
        assert_eq!(j["status"], 404);
        assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));
        // The connection stays usable.
        c.send(b"GET /only HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        assert_eq!(up.hits(), 1);
    }
}

#[test]
fn rewrites_prefix_and_host_and_headers() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[[routes]]
path_prefix = "/api"
strip_prefix = "/api"
upstream = "up"
request_headers = { add = { "x-added" = "1" }, set = { "x-set" = "gw" }, remove = ["x-remove-me"] }
response_headers = { set = { "x-frame-options" = "DENY" }, remove = ["server"] }

[[routes]]
path_prefix = "/old/"
replace_prefix = "/new/"
set_host = "internal.svc"
upstream = "up"

[[routes]]
path_prefix = "/ep"
preserve_host = false
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        let r = request(
            gw.addr,
            b"GET /api/users?id=3 HTTP/1.1\r\nHost: a\r\nX-Set: client\r\nX-Remove-Me: x\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        let req = up.last();
        assert_eq!(req.target, "/users?id=3");
        assert_eq!(req.header("x-added"), Some("1"));
        assert_eq!(req.headers_named("x-set"), vec!["gw"]);
        assert!(req.header("x-remove-me").is_none());
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        request(gw.addr, b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(up.last().target, "/");
        request(gw.addr, b"GET /old/thing HTTP/1.1\r\nHost: a\r\n\r\n");
        let req = up.last();
        assert_eq!(req.target, "/new/thing");
        assert_eq!(req.header("host"), Some("internal.svc"));
        request(gw.addr, b"GET /ep HTTP/1.1\r\nHost: client.host\r\n\r\n");
        assert_eq!(up.last().header("host"), Some(up.addr.to_string().as_str()));
    }
}

/// An origin answering `ok`, with `Date: date` for `target` and without a Date otherwise.
fn origin_dated_at(target: &'static str, date: &'static str) -> Upstream {
    Upstream::start(move |req| {
        let line = if req.target == target {
            format!("Date: {date}\r\n")
        } else {
            String::new()
        };
        Reply::Raw(format!("HTTP/1.1 200 OK\r\n{line}Content-Length: 2\r\n\r\nok").into_bytes())
    })
}

/// RFC 9110 §6.6.1: "A recipient with a clock that receives a response message without a Date
/// header field MUST record the time it was received and append a corresponding Date header
/// field ... if it is ... forwarded downstream." An origin's Date goes on as it is, once; a
/// response without one gets the gateway's; a route that removes Date keeps it out.
#[test]
fn rfc9110_6_6_1_a_forwarded_response_without_date_gets_one() {
    for d in DRIVERS {
        let up = origin_dated_at("/dated", "Tue, 14 Nov 2023 22:13:10 GMT");
        let extra = r#"
[[routes]]
path_prefix = "/nodate"
upstream = "up"
response_headers = { remove = ["date"] }

[[routes]]
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        let dates =
            |r: &Resp| -> Vec<String> { r.all("date").iter().map(|v| v.to_string()).collect() };
        let r = request(gw.addr, b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.text(), "ok");
        let added = dates(&r);
        assert_eq!(added.len(), 1, "{d:?}: {r:?}");
        // An IMF-fixdate (RFC 9110 §5.6.7): "Sun, 06 Nov 1994 08:49:37 GMT".
        assert_eq!(added[0].len(), 29, "{r:?}");
        assert!(
            added[0].ends_with(" GMT") && added[0].as_bytes()[3] == b',',
            "{r:?}"
        );
        let r = request(gw.addr, b"GET /dated HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(dates(&r), vec!["Tue, 14 Nov 2023 22:13:10 GMT"], "{r:?}");
        let r = request(gw.addr, b"GET /nodate HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.text(), "ok");
        assert!(dates(&r).is_empty(), "{r:?}");
    }
}

/// RFC 9110 §5.3: Date is one value, never a list, so a response carries one line of it. A
/// route whose `response_headers` add Date decides the field, as `set` and `remove` do: its
/// Date goes out alone, whether the origin sent one or not (RFC 9110 §6.6.1's addition is the
/// gateway's only when the route says nothing of Date). Before, the gateway's Date (or the
/// origin's) went out and the added one after it, two lines.
#[test]
fn rfc9110_5_3_a_route_that_adds_date_gets_one_line_of_it() {
    for d in DRIVERS {
        let up = origin_dated_at("/dated", "Sun, 06 Nov 1994 08:49:37 GMT");
        let extra = r#"
[[routes]]
upstream = "up"
response_headers = { add = { "date" = "Tue, 14 Nov 2023 22:13:10 GMT" } }
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for target in ["/undated", "/dated"] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            let r = request(gw.addr, raw.as_bytes());
            assert_eq!(r.text(), "ok");
            assert_eq!(
                r.all("date"),
                ["Tue, 14 Nov 2023 22:13:10 GMT"],
                "{d:?} {target}: {r:?}"
            );
        }
    }
}

/// RFC 9110 §5.3: a direct route whose `headers` carry Date answers with that Date alone.
/// Before, the gateway's Date followed it: two lines of a field that is one value.
#[test]
fn rfc9110_5_3_a_direct_route_with_its_own_date_sends_one_line_of_it() {
    let extra = r#"
[[routes]]
path = "/own"
direct = { status = 200, body = "ok", headers = { "Date" = "Tue, 14 Nov 2023 22:13:10 GMT" } }

[[routes]]
path = "/plain"
direct = { status = 200, body = "ok" }
"#;
    let gw = TestGateway::start(
        &config(&["127.0.0.1:9".parse().unwrap()], extra),
        ringway::config::DriverChoice::Auto,
    );
    let r = request(gw.addr, b"GET /own HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.text(), "ok");
    assert_eq!(r.all("date"), ["Tue, 14 Nov 2023 22:13:10 GMT"], "{r:?}");
    let r = request(gw.addr, b"HEAD /own HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.all("date"), ["Tue, 14 Nov 2023 22:13:10 GMT"], "{r:?}");
    let r = request(gw.addr, b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(r.text(), "ok");
    assert_eq!(r.all("date").len(), 1, "{r:?}");
}

/// Sends `raw` on a new connection and expects a 400 `bad_request`, after which the gateway
/// closes the connection when `closes` (a request-target it could not parse).
fn refused_with_400(gw: std::net::SocketAddr, raw: &str, closes: bool) {
    let mut c = Client::connect(gw);
    c.send(raw.as_bytes());
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 400, "{raw:?}");
    assert_eq!(r.json()["error"], "bad_request", "{raw:?}");
    if closes {
        assert!(c.is_closed(Duration::from_secs(5)), "{raw:?}: closed");
    }
}

/// RFC 3986 §5.2.4: a clean request path that a prefix replacement would turn into a dot
/// segment (`/v1../admin` with `/v1` -> `/pub/` is `/pub/../admin`, which the upstream reads as
/// `/admin`) is refused; before, the gateway sent that target upstream.
#[test]
fn a_replaced_prefix_never_sends_a_dot_segment_upstream_rfc3986_5_2_4() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[[routes]]
path_prefix = "/v1"
replace_prefix = "/pub/"
upstream = "up"

[[routes]]
path_prefix = "/v2"
replace_prefix = ""
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for path in [
            "/v1../admin",
            "/v1..",
            "/v1./x",
            "/v1..;x/admin",
            "/v2..",
            "/v2../admin",
        ] {
            // The request itself was read whole: the connection may stay.
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            refused_with_400(gw.addr, &raw, false);
        }
        assert_eq!(up.hits(), 0, "{d:?}: nothing reached the upstream");
        let r = request(gw.addr, b"GET /v1a...b?q=.. HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(up.last().target, "/pub/a...b?q=..");
        request(gw.addr, b"GET /v2/x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(up.last().target, "/x");
    }
}

/// RFC 9112 §3.2.2: `GET http://h HTTP/1.1` asks for `/`, and is rewritten as `/` is; before,
/// the route's `replace_prefix` was skipped and the upstream got `/`, outside the subtree the
/// route exposes.
#[test]
fn an_absolute_form_target_with_an_empty_path_is_rewritten_as_slash_rfc9112_3_2_2() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra =
            "[[routes]]\npath_prefix = \"/\"\nreplace_prefix = \"/pub/\"\nupstream = \"up\"\n";
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for (target, sent) in [
            ("/", "/pub/"),
            ("http://h", "/pub/"),
            ("http://h?q=1", "/pub/?q=1"),
            ("http://h/?q=1", "/pub/?q=1"),
        ] {
            let r = request(
                gw.addr,
                format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            );
            assert_eq!(r.status, 200, "{d:?} {target}");
            assert_eq!(up.last().target, sent, "{d:?} {target}");
        }
    }
}

/// A gateway whose first route answers 403 "protected" for the hosts `hosts` (a TOML array)
/// and whose catch-all goes to an echo upstream; each of `raws` must get the 403, and none
/// reach the upstream.
fn protected_hosts(
    hosts: &str,
    d: ringway::config::DriverChoice,
    raws: &[&str],
) -> (TestGateway, Upstream) {
    let up = Upstream::echo();
    let extra = format!(
        "[[routes]]\nhosts = {hosts}\ndirect = {{ status = 403, body = \"protected\" }}\n\n[[routes]]\nupstream = \"up\"\n"
    );
    let gw = TestGateway::start(&config(&[up.addr], &extra), d);
    for raw in raws {
        let r = request(gw.addr, raw.as_bytes());
        assert_eq!(
            (r.status, r.text().as_str()),
            (403, "protected"),
            "{d:?} {raw:?}"
        );
    }
    assert_eq!(up.hits(), 0, "{d:?}: nothing reached the catch-all");
    (gw, up)
}

/// `admin.example.com.` is the name `admin.example.com` (RFC 1034 §3.1: the root label), so it
/// takes that host's routes, not the catch-all's; before, a trailing dot reached the catch-all
/// upstream with the protected host's name.
#[test]
fn a_host_with_a_trailing_dot_takes_its_host_routes_rfc1034_3_1() {
    for d in DRIVERS {
        let (gw, _up) = protected_hosts(
            r#"["admin.example.com", "*.internal.test", "dotted.test."]"#,
            d,
            &[
                "GET /x HTTP/1.1\r\nHost: admin.example.com\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: admin.example.com.\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: ADMIN.example.com.:8080\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: admin.example.com..\r\n\r\n",
                "GET http://admin.example.com./x HTTP/1.1\r\nHost: other.test\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: db.internal.test.\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: dotted.test\r\n\r\n",
            ],
        );
        let r = request(gw.addr, b"GET /x HTTP/1.1\r\nHost: internal.test.\r\n\r\n");
        assert_eq!(
            r.status, 200,
            "the wildcard needs a label before its suffix"
        );
    }
}

/// An IPv6 literal names an address (RFC 3986 §3.2.2), and RFC 5952 §4 gives it one text form:
/// `[0:0:0:0:0:0:0:1]`, `[0::1]` and `[::1]` are one host, as are `[2001:DB8::A]` and
/// `[2001:db8:0:0:0:0:0:a]`. Routes by host compare the address, in the config and in the
/// request; before, another spelling of a protected host's literal missed its route and reached
/// the catch-all. A literal that names no address is a 400.
#[test]
fn ipv6_host_literals_are_compared_as_addresses_rfc5952_4() {
    for d in DRIVERS {
        let (gw, up) = protected_hosts(
            r#"["[0:0:0:0:0:0:0:1]", "[2001:DB8::A]"]"#,
            d,
            &[
                "GET /x HTTP/1.1\r\nHost: [::1]\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: [0::1]\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: [0000:0:0:0:0:0:0:0001]\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: [2001:db8::a]\r\n\r\n",
                "GET /x HTTP/1.1\r\nHost: [2001:db8:0:0:0:0:0:A]:443\r\n\r\n",
                "GET http://[0:0::1]/x HTTP/1.1\r\nHost: other.test\r\n\r\n",
            ],
        );
        for host in [
            "[::1",
            "[::g]",
            "[1:2:3:4:5:6:7:8:9]",
            "[::1%25eth0]",
            "[::1]x",
        ] {
            let raw = format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n");
            refused_with_400(gw.addr, &raw, true);
        }
        let r = request(gw.addr, b"GET /x HTTP/1.1\r\nHost: [::2]\r\n\r\n");
        assert_eq!(r.status, 200, "{d:?}: another address takes the catch-all");
        assert_eq!(
            up.last().header("host"),
            Some("[::2]"),
            "the Host is forwarded as sent"
        );
    }
}

/// Servlet containers drop `;parameters` from each segment before removing dot segments, so
/// `/x/..;/admin` is `/admin` to them: refused like `/x/../admin`; before, it was forwarded.
#[test]
fn a_dot_segment_with_parameters_is_refused_like_one_rfc3986_5_2_4() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[[routes]]
path_prefix = "/admin"
direct = { status = 403, body = "protected" }

[[routes]]
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for path in ["/x/..;/admin", "/..;/admin", "/x/.;p/admin", "/x/..;a=b"] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            refused_with_400(gw.addr, &raw, true);
        }
        assert_eq!(up.hits(), 0, "{d:?}: nothing reached the upstream");
        let r = request(gw.addr, b"GET /a;p=1/b..;c HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(up.last().target, "/a;p=1/b..;c");
    }
}

/// RFC 3986 §7.3: a back end that decodes `%00` into a C string cuts the path there, so
/// `/admin%00.png` reaches a `.png` route of the gateway and `/admin` of the upstream: refused;
/// before, it was forwarded.
#[test]
fn an_encoded_nul_in_the_path_is_refused_rfc3986_7_3() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[[routes]]
path_prefix = "/admin"
direct = { status = 403, body = "protected" }

[[routes]]
path_regex = "[.]png$"
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for path in ["/admin%00.png", "/%00/admin.png", "/a%00"] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            refused_with_400(gw.addr, &raw, true);
        }
        assert_eq!(up.hits(), 0, "{d:?}: nothing reached the upstream");
        let r = request(
            gw.addr,
            b"GET /img/a%20b%0A.png HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert_eq!(r.status, 200, "other escapes are data");
    }
}

/// An encoded backslash is refused like a raw one (RFC 3986 §2: `\` is no URI character; §2.4:
/// a back end decodes before it reads the path): IIS and other back ends read `%5C` as `/`, so
/// `/public%5C..%5Cadmin` is `/admin` to them but matched `/public` here. Before, it was
/// forwarded. In the query it is data.
#[test]
fn an_encoded_backslash_in_the_path_is_refused_rfc3986_2_4() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let extra = r#"
[[routes]]
path_prefix = "/admin"
direct = { status = 403, body = "protected" }

[[routes]]
path_prefix = "/public"
upstream = "up"
"#;
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        for path in [
            "/public%5C..%5Cadmin",
            "/public%5c..%5cadmin",
            "/public/%5C",
            "/public\\..\\admin",
        ] {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
            refused_with_400(gw.addr, &raw, true);
        }
        assert_eq!(up.hits(), 0, "{d:?}: nothing reached the upstream");
        let r = request(gw.addr, b"GET /public/a?q=%5C HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.status, 200, "{d:?}: an escape in the query is data");
        assert_eq!(up.last().target, "/public/a?q=%5C");
    }
}

#[test]
fn direct_responses() {
    for d in DRIVERS {
        let extra = r#"
[[routes]]
path = "/healthz"
direct = { status = 200, body = "ok", headers = { "content-type" = "text/plain" } }
[[routes]]
path = "/gone"
direct = { status = 410, body = "" }
"#;
        let up = Upstream::echo();
        let gw = TestGateway::start(&config(&[up.addr], extra), d);
        let r = get(gw.addr, "/healthz");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert!(r.has("x-request-id"));
        let date = r.header("date").expect("gateway responses carry Date");
        assert!(date.len() == 29 && date.ends_with(" GMT"), "{date}");
        let r = request(gw.addr, b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.header("content-length"), Some("2"));
        assert!(r.body.is_empty());
        assert_eq!(get(gw.addr, "/gone").status, 410);
        assert_eq!(up.hits(), 0);
    }
}

#[test]
fn chunked_request_body_is_streamed_with_trailers() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n");
        std::thread::sleep(Duration::from_millis(50));
        c.send(b"6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{d:?}");
        let req = up.last();
        assert_eq!(req.body, b"hello world");
        assert_eq!(req.header("transfer-encoding"), Some("chunked"));
        assert!(req.header("content-length").is_none());
    }
}

#[test]
fn large_bodies_stream_both_ways() {
    for d in DRIVERS {
        let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let up = Upstream::start(move |req| {
            assert_eq!(req.body.len(), 3 * 1024 * 1024);
            Reply::Raw(ok_response(&big2))
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        let body = vec![b'x'; 3 * 1024 * 1024];
        c.send(
            format!(
                "PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        c.send(&body);
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), big.len());
        assert!(r.body == big, "{d:?}: body corrupted");
        assert_eq!(up.last().body.len(), body.len());
    }
}

#[test]
fn first_byte_reaches_client_before_upstream_finishes() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Slow {
            parts: vec![
                (
                    Duration::ZERO,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst".to_vec(),
                ),
                (Duration::from_millis(800), b"-last".to_vec()),
            ],
            close: false,
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        let t0 = std::time::Instant::now();
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        use std::io::Read;
        while !got.windows(5).any(|w| w == b"first") {
            let n = c.s.read(&mut tmp).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&tmp[..n]);
        }
        assert!(
            t0.elapsed() < Duration::from_millis(600),
            "{d:?}: head and first bytes were held back"
        );
    }
}

#[test]
fn response_framings_head_204_304_chunked_and_close_delimited() {
    for d in DRIVERS {
        let up = Upstream::start(|req| {
            match req.target.as_str() {
            "/head" => Reply::Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec()),
            "/204" => Reply::Raw(b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n".to_vec()),
            "/304" => Reply::Raw(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec()),
            "/chunked" => Reply::Raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n".to_vec()),
            "/close" => Reply::RawClose(b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec()),
            _ => Reply::Raw(ok_response(b"?")),
        }
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        // HEAD: the upstream's Content-Length passes, no body follows, connection stays in sync.
        c.send(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response_for(true).unwrap();
        assert_eq!(r.header("content-length"), Some("1234"), "{d:?}");
        c.send(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 204);
        assert!(
            !r.has("content-length"),
            "no invented Content-Length on 204"
        );
        assert!(!r.has("transfer-encoding"));
        c.send(b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 304);
        assert!(!r.has("content-length"));
        c.send(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.text(), "abcdefg");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        // Close-delimited upstream body becomes chunked for an HTTP/1.1 client, which keeps its connection.
        c.send(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.text(), "until the end");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        c.send(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().text(), "?");
        // HTTP/1.0 client: chunked upstream body is de-chunked and the connection closes.
        let mut c10 = Client::connect(gw.addr);
        c10.send(b"GET /chunked HTTP/1.0\r\n\r\n");
        let r = c10.read_response().unwrap();
        assert_eq!(r.text(), "abcdefg");
        assert!(!r.has("transfer-encoding"));
        assert!(c10.is_closed(Duration::from_secs(2)));
    }
}

#[test]
fn expect_100_continue_and_interim_responses() {
    for d in DRIVERS {
        let up = Upstream::start(|req| {
            if req.target == "/early" {
                Reply::Raw(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
            } else {
                assert!(
                    req.header("expect").is_none(),
                    "Expect is answered by the gateway"
                );
                Reply::Raw(ok_response(&req.body))
            }
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 100, "{d:?}");
        c.send(b"data");
        let r = c.read_response().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "data"));
        c.send(b"GET /early HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 103);
        let r = c.read_response().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    for d in DRIVERS {
        let up = Upstream::start(|req| Reply::Raw(ok_response(req.target.as_bytes())));
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        let mut all = Vec::new();
        for i in 0..20 {
            all.extend_from_slice(format!("GET /r{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        }
        all.extend_from_slice(b"POST /post HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        c.send(&all);
        for i in 0..20 {
            assert_eq!(c.read_response().unwrap().text(), format!("/r{i}"), "{d:?}");
        }
        assert_eq!(c.read_response().unwrap().text(), "/post");
        let last = c.read_response().unwrap();
        assert_eq!(last.text(), "/last");
        assert_eq!(last.header("connection"), Some("close"));
        assert!(c.is_closed(Duration::from_secs(2)));
    }
}

#[test]
fn http10_keep_alive_rules() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.header("connection"), Some("keep-alive"));
        c.send(b"GET / HTTP/1.0\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed(Duration::from_secs(2)), "{d:?}");
    }
}

#[test]
fn weighted_round_robin_spreads_by_weight() {
    for d in DRIVERS {
        let ups: Vec<Upstream> = (0..3).map(|_| Upstream::echo()).collect();
        let toml = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.w]\nbalance = \"weighted_round_robin\"\nendpoints = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 1 }}]\n[[routes]]\nupstream = \"w\"\n",
            ups[0].addr, ups[1].addr, ups[2].addr
        );
        let gw = TestGateway::start(&toml, d);
        let mut c = Client::connect(gw.addr);
        for _ in 0..50 {
            c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(c.read_response().unwrap().status, 200);
        }
        let hits: Vec<usize> = ups.iter().map(|u| u.hits()).collect();
        assert_eq!(hits, vec![30, 10, 10], "{d:?}");
    }
}

#[test]
fn round_robin_across_instances() {
    for d in DRIVERS {
        let ups: Vec<Upstream> = (0..2).map(|_| Upstream::echo()).collect();
        let gw = TestGateway::start(
            &config(
                &[ups[0].addr, ups[1].addr],
                "[[routes]]\nupstream = \"up\"\n",
            ),
            d,
        );
        for _ in 0..10 {
            assert_eq!(get(gw.addr, "/").status, 200);
        }
        assert_eq!((ups[0].hits(), ups[1].hits()), (5, 5), "{d:?}");
    }
}

#[test]
fn keep_alive_pool_reuses_upstream_connections() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        for _ in 0..30 {
            assert_eq!(get(gw.addr, "/").status, 200);
        }
        assert_eq!(up.hits(), 30);
        assert_eq!(
            up.conns(),
            1,
            "{d:?}: 30 sequential requests should share one pooled connection"
        );
    }
}

#[test]
fn pooled_connection_closed_by_upstream_never_gives_502() {
    for d in DRIVERS {
        // The upstream closes keep-alive connections after 100 ms idle.
        let up = Upstream::start_with(Some(Duration::from_millis(100)), |_| {
            Reply::Raw(ok_response(b"fine"))
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        for round in 0..6 {
            // GETs are resent on a new connection when the pooled one turns out closed; POSTs
            // (never resent) rely on the liveness check before the pooled connection is used.
            let r = if round % 2 == 0 {
                get(gw.addr, "/")
            } else {
                request(
                    gw.addr,
                    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
                )
            };
            assert_eq!(r.status, 200, "{d:?} round {round}: {}", r.text());
            std::thread::sleep(Duration::from_millis(250));
        }
        assert!(up.conns() >= 6, "closed connections must not be reused");
    }
}

#[test]
fn idempotent_request_is_retried_once_when_reused_connection_fails() {
    for d in DRIVERS {
        // Every second request on a connection is dropped without an answer: the classic race of
        // an upstream closing a keep-alive connection just as the gateway reuses it.
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let up = Upstream::start(move |_| {
            if n2.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                Reply::Drop
            } else {
                Reply::Raw(ok_response(b"ok"))
            }
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        for i in 0..6 {
            let r = get(gw.addr, "/");
            assert_eq!(r.status, 200, "{d:?} GET {i} must be retried: {}", r.text());
        }
        // A POST is not idempotent: it is never sent twice.
        let before = up.hits();
        let r = request(
            gw.addr,
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
        );
        let sent = up.hits() - before;
        assert!(r.status == 200 || r.status == 502, "{}", r.status);
        if r.status == 502 {
            assert_eq!(sent, 1, "a failed POST is not replayed");
        }
    }
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    for d in DRIVERS {
        // Nothing listens on this port.
        let refusing = refusing_addr();
        let dead = refusing.addr;
        let slow = Upstream::start(|_| Reply::Hang(Duration::from_secs(3)));
        let garbage = Upstream::start(|_| Reply::RawClose(b"NOT HTTP AT ALL\r\n\r\n".to_vec()));
        let toml = format!(
            r#"
[[listeners]]
address = "127.0.0.1:0"
[timeouts]
upstream_response = "300ms"
[upstreams.dead]
endpoints = [{{ address = "{dead}" }}]
[upstreams.slow]
endpoints = [{{ address = "{}" }}]
[upstreams.garbage]
endpoints = [{{ address = "{}" }}]
[[routes]]
path = "/dead"
upstream = "dead"
[[routes]]
path = "/slow"
upstream = "slow"
[[routes]]
path = "/garbage"
upstream = "garbage"
"#,
            slow.addr, garbage.addr
        );
        let gw = TestGateway::start(&toml, d);
        let r = get(gw.addr, "/dead");
        assert_eq!(r.status, 502, "{d:?}");
        assert_eq!(r.json()["error"], "upstream_connect_failed");
        let t0 = std::time::Instant::now();
        let r = get(gw.addr, "/slow");
        assert_eq!(r.status, 504);
        assert_eq!(r.json()["error"], "upstream_timeout");
        assert!(t0.elapsed() < Duration::from_secs(2));
        let r = get(gw.addr, "/garbage");
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["error"], "upstream_bad_response");
    }
}

#[test]
fn upstream_dying_mid_body_cuts_the_client_response() {
    for d in DRIVERS {
        let up = Upstream::start(|_| {
            Reply::RawClose(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part".to_vec())
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        // The client sees the head and a short body, then the connection closes: it can tell
        // the response was truncated.
        assert!(
            c.read_response().is_none(),
            "{d:?}: a truncated body must not look complete"
        );
    }
}

#[test]
fn upstream_body_idle_timeout_cuts_a_stalled_response() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Slow {
            parts: vec![
                (
                    Duration::ZERO,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nstart".to_vec(),
                ),
                (Duration::from_secs(3), b"never".to_vec()),
            ],
            close: true,
        });
        let gw = TestGateway::start(
            &config(
                &[up.addr],
                "[timeouts]\nupstream_body = \"300ms\"\n[[routes]]\nupstream = \"up\"\n",
            ),
            d,
        );
        let mut c = Client::connect(gw.addr);
        let t0 = std::time::Instant::now();
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(c.read_response().is_none());
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{d:?}: stalled body must be cut by upstream_body"
        );
    }
}

#[test]
fn slow_client_applies_backpressure_instead_of_buffering() {
    use std::io::Read;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for d in DRIVERS {
        let total = 64 * 1024 * 1024;
        let written = Arc::new(AtomicUsize::new(0));
        let w2 = written.clone();
        let up = Upstream::start(move |_| Reply::Stream {
            head: format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").into_bytes(),
            total,
            written: w2.clone(),
        });
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        // The client reads nothing for a while: the upstream must be held back by the socket
        // buffers and ringway's bounded relay buffer, not be drained into gateway memory.
        std::thread::sleep(Duration::from_millis(800));
        let stalled_at = written.load(Ordering::SeqCst);
        assert!(
            stalled_at < 24 * 1024 * 1024,
            "{d:?}: upstream wrote {stalled_at} bytes while the client read nothing"
        );
        // Then the client drains everything and gets the whole body.
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head_done = false;
        let mut acc = Vec::new();
        while got < total {
            let n = c.s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed early at {got}");
            if !head_done {
                acc.extend_from_slice(&buf[..n]);
                if let Some(p) = acc.windows(4).position(|w| w == b"\r\n\r\n") {
                    head_done = true;
                    got += acc.len() - p - 4;
                }
            } else {
                got += n;
            }
        }
        assert_eq!(got, total, "{d:?}");
    }
}

#[test]
fn upstream_connect_timeout_is_504() {
    for d in DRIVERS {
        // A listener with a full accept queue: further SYNs are dropped, so connect() hangs.
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        l.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        l.listen(0).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr.into());
            fillers.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
        let gw = TestGateway::start(
            &config(
                &[addr],
                "[timeouts]\nupstream_connect = \"300ms\"\n[[routes]]\nupstream = \"up\"\n",
            ),
            d,
        );
        let t0 = std::time::Instant::now();
        let r = get(gw.addr, "/");
        assert_eq!(r.status, 504, "{d:?}: {}", r.text());
        assert_eq!(r.json()["error"], "upstream_connect_timeout");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}

#[test]
fn an_error_after_the_body_was_read_keeps_the_next_pipelined_request_intact() {
    for d in DRIVERS {
        let up = Upstream::echo();
        // Held for the test: a released port could become this gateway's own (a proxy loop).
        let refusing = refusing_addr();
        let dead = refusing.addr;
        let toml = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.ok]\nendpoints = [{{ address = \"{}\" }}]\n[upstreams.dead]\nendpoints = [{{ address = \"{dead}\" }}]\n[[routes]]\npath = \"/dead\"\nupstream = \"dead\"\n[[routes]]\nupstream = \"ok\"\n",
            up.addr
        );
        let gw = TestGateway::start(&toml, d);
        let mut c = Client::connect(gw.addr);
        c.send(b"POST /dead HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 502, "{d:?}");
        let r = c.read_response().unwrap();
        assert_eq!(
            r.status,
            200,
            "{d:?}: the pipelined GET must be read as sent: {}",
            r.text()
        );
        assert_eq!(up.last().target, "/ok");
    }
}

#[test]
fn ipv6_listener_and_client_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = format!(
            "[[listeners]]\naddress = \"[::1]:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"up\"\n",
            up.addr
        );
        let gw = TestGateway::start(&toml, d);
        assert!(gw.addr.is_ipv6());
        let r = request(gw.addr, b"GET /v6 HTTP/1.1\r\nHost: [::1]\r\n\r\n");
        assert_eq!(r.status, 200, "{d:?}");
        let req = up.last();
        assert_eq!(req.header("x-forwarded-for"), Some("::1"));
        assert_eq!(req.header("host"), Some("[::1]"));
    }
}

#[test]
fn an_upstream_answering_before_the_body_ends_is_passed_on() {
    use std::io::{Read, Write};
    for d in DRIVERS {
        // A raw upstream: reads the head only, answers 413 at once and closes.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
                .unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            // Drain a little, then go away without reading the rest.
            std::thread::sleep(Duration::from_millis(100));
        });
        let gw = TestGateway::start(&proxy_all(addr), d);
        let mut c = Client::connect(gw.addr);
        let total = 8 * 1024 * 1024;
        c.send(
            format!("PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n")
                .as_bytes(),
        );
        // Send the body in pieces until the gateway stops taking it or answers.
        let piece = vec![b'x'; 256 * 1024];
        for _ in 0..(total / piece.len()) {
            if c.try_send(&piece).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r = c.read_response().expect("a response");
        assert_eq!(r.status, 413, "{d:?}: {}", r.text());
        assert_eq!(r.text(), "too big!");
        assert_eq!(r.header("connection"), Some("close"));
        server.join().unwrap();
    }
}
