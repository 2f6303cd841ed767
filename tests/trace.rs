//! W3C trace context over real sockets: what the upstream receives, and the trace id in
//! gateway-made error bodies.

mod support;

use support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

/// (version, trace id, parent id, flags) of a traceparent value, checked strictly.
fn parts(v: &str) -> (String, String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "{v}");
    assert_eq!(v.len(), 55, "{v}");
    for (x, n) in p.iter().zip([2, 32, 16, 2]) {
        assert_eq!(x.len(), n, "{v}");
        assert!(
            x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{v}"
        );
    }
    assert_ne!(p[1], "0".repeat(32));
    assert_ne!(p[2], "0".repeat(16));
    (p[0].into(), p[1].into(), p[2].into(), p[3].into())
}

fn send(addr: std::net::SocketAddr, path: &str, headers: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t.test\r\n{headers}\r\n").as_bytes(),
    )
}

/// Sends `traceparent: tp` and a `tracestate` line for each of `lines` to `/a`.
fn send_trace<L: AsRef<str>>(addr: std::net::SocketAddr, tp: &str, lines: &[L]) -> Resp {
    let hs: String = lines
        .iter()
        .map(|l| format!("tracestate: {}\r\n", l.as_ref()))
        .collect();
    send(addr, "/a", &format!("traceparent: {tp}\r\n{hs}"))
}

#[test]
fn a_valid_client_trace_is_continued_with_the_gateway_as_parent() {
    for driver in DRIVERS {
        let up = Upstream::echo();
        let gw = TestGateway::start(&proxy_all(up.addr), driver);
        let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
        let r = send(
            gw.addr,
            "/a",
            &format!("traceparent: {tp}\r\ntracestate: congo=t61rcWkgMzE\r\ntracestate: rojo=00f067aa0ba902b7\r\n"),
        );
        assert_eq!(r.status, 200);
        let got = up.last();
        let tps = got.headers_named("traceparent");
        assert_eq!(tps.len(), 1, "{driver:?}: one traceparent upstream");
        let (v, trace, parent, flags) = parts(tps[0]);
        assert_eq!(v, "00");
        assert_eq!(trace, CLIENT_TRACE, "the client's trace id is kept");
        assert_ne!(
            parent, CLIENT_PARENT,
            "the gateway's own span is the parent"
        );
        assert_eq!(flags, "01", "the client's flags are kept");
        assert_eq!(
            got.headers_named("tracestate"),
            ["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"],
            "tracestate passes through"
        );
        // A second request on the same trace gets a new span of the gateway's.
        send(gw.addr, "/a", &format!("traceparent: {tp}\r\n"));
        let (_, trace2, parent2, _) = parts(up.last().header("traceparent").unwrap());
        assert_eq!(trace2, CLIENT_TRACE);
        assert_ne!(parent2, parent);
    }
}

#[test]
fn an_invalid_or_missing_traceparent_starts_a_new_trace_and_drops_tracestate() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DRIVERS[0]);
    let upper = CLIENT_TRACE.to_uppercase();
    let zeros = "0".repeat(32);
    let bad = [
        format!("traceparent: 00-{upper}-{CLIENT_PARENT}-01\r\n"),
        format!("traceparent: 00-{zeros}-{CLIENT_PARENT}-01\r\n"),
        format!("traceparent: 00-{CLIENT_TRACE}-0000000000000000-01\r\n"),
        format!("traceparent: ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01\r\n"),
        format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_PARENT}-01-extra\r\n"),
        format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_PARENT}\r\n"),
        // Two traceparent fields: ambiguous, refused.
        format!(
            "traceparent: 00-{CLIENT_TRACE}-{CLIENT_PARENT}-01\r\ntraceparent: 00-{CLIENT_TRACE}-{CLIENT_PARENT}-01\r\n"
        ),
        String::new(),
    ];
    let mut seen = std::collections::HashSet::new();
    for h in &bad {
        let r = send(
            gw.addr,
            "/a",
            &format!("{h}tracestate: congo=t61rcWkgMzE\r\n"),
        );
        assert_eq!(r.status, 200, "{h}");
        let got = up.last();
        let tps = got.headers_named("traceparent");
        assert_eq!(tps.len(), 1, "{h}");
        let (v, trace, _, flags) = parts(tps[0]);
        assert_eq!(v, "00");
        assert_ne!(trace, CLIENT_TRACE, "{h}: a new trace");
        assert_ne!(trace.to_lowercase(), upper.to_lowercase(), "{h}");
        assert_eq!(flags, "01");
        assert!(seen.insert(trace), "trace ids differ per request");
        assert!(
            got.header("tracestate").is_none(),
            "{h}: tracestate without a valid parent is dropped"
        );
    }
}

/// W3C Trace Context §3.3.1.3: a value is at most 256 characters; a list with a longer one is
/// not valid and is dropped whole (not truncated), the trace continued.
#[test]
fn a_tracestate_value_over_256_characters_drops_the_list() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DRIVERS[0]);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-00");
    let long = format!("v={}", "x".repeat(600));
    send(
        gw.addr,
        "/a",
        &format!("traceparent: {tp}\r\ntracestate: {long}\r\n"),
    );
    let got = up.last();
    assert!(got.header("tracestate").is_none());
    let (_, trace, _, flags) = parts(got.header("traceparent").unwrap());
    assert_eq!(trace, CLIENT_TRACE);
    assert_eq!(flags, "00");
}

/// W3C Trace Context §3.3.1.5: a valid tracestate longer than 512 characters (members and
/// commas, without white space) is truncated by whole members rather than dropped: members
/// longer than 128 characters go first (from the end of the list, only as many as needed),
/// then members from the end, until the rest fits; what is left goes on one line, joined by
/// commas. A list that fits goes byte for byte as it came.
#[test]
fn an_over_long_tracestate_is_truncated_by_whole_members_per_3_3_1_5() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DRIVERS[0]);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    // 100-character members k0..k5 and a 200-character one in the middle: 806 characters.
    let k = |i: usize| format!("k{i}={}", "v".repeat(97));
    let big = format!("big={}", "b".repeat(196));
    // 259-character members (the longest value, 256).
    let l = |i: usize| format!("l{i}={}", "w".repeat(256));
    let cases: Vec<(Vec<String>, Option<String>)> = vec![
        // The long member goes first (605 left), then k5 from the end: 504.
        (
            vec![
                format!("{} , {},{}", k(0), k(1), big),
                format!("{},{}, {} ,{}", k(2), k(3), k(4), k(5)),
            ],
            Some([k(0), k(1), k(2), k(3), k(4)].join(",")),
        ),
        // Of two long members only the last goes: the rest (271) fits.
        (
            vec![format!("a=1,{},b=2,{},c=3", l(0), l(1))],
            Some(format!("a=1,{},b=2,c=3", l(0))),
        ),
        // No long member: the last ones go until the rest fits.
        (
            vec![(0..6).map(k).collect::<Vec<_>>().join(",")],
            Some((0..5).map(k).collect::<Vec<_>>().join(",")),
        ),
        // Only white space and empty members made it long: every member goes, on one line.
        (
            vec![format!("a=1 ,{}, b=2", " ,".repeat(300)), "c=3".into()],
            Some("a=1,b=2,c=3".into()),
        ),
        // One member of 513 characters: nothing fits, nothing goes.
        (
            vec![format!("{}={}", "k".repeat(256), "v".repeat(256))],
            None,
        ),
    ];
    for (lines, want) in cases {
        let r = send_trace(gw.addr, &tp, &lines[..]);
        assert_eq!(r.status, 200, "{lines:?}");
        let got = up.last();
        let (_, trace, _, _) = parts(got.header("traceparent").unwrap());
        assert_eq!(trace, CLIENT_TRACE, "{lines:?}: the trace is continued");
        match want {
            Some(w) => {
                assert!(w.len() <= 512, "{w}");
                assert_eq!(got.headers_named("tracestate"), [w.as_str()], "{lines:?}");
            }
            None => assert!(got.header("tracestate").is_none(), "{lines:?}"),
        }
    }
    // 512 bytes exactly, with white space: within bounds, so byte for byte, line by line.
    let lines = [
        format!("a=1 , {}", k(0)),
        format!("b={}", "x".repeat(250)),
        format!("c={}", "y".repeat(152)),
    ];
    assert_eq!(lines.iter().map(String::len).sum::<usize>(), 512);
    send_trace(gw.addr, &tp, &lines[..]);
    assert_eq!(up.last().headers_named("tracestate"), lines);
}

/// W3C Trace Context §3.2.4: a traceparent of a higher version (not `ff`) is read by version
/// 00's fields, even with more fields after them, and the trace is continued (as version 00,
/// with its tracestate); §3.2.2.5: only the sampled flag is passed on.
#[test]
fn a_higher_traceparent_version_is_continued_and_only_the_sampled_flag_kept() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DRIVERS[0]);
    for (tp, flags) in [
        (format!("01-{CLIENT_TRACE}-{CLIENT_PARENT}-01"), "01"),
        (
            format!("cc-{CLIENT_TRACE}-{CLIENT_PARENT}-01-what-the-future-will-be-like"),
            "01",
        ),
        (format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-ff"), "01"),
        (format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-02"), "00"),
    ] {
        let r = send(
            gw.addr,
            "/a",
            &format!("traceparent: {tp}\r\ntracestate: foo=1\r\n"),
        );
        assert_eq!(r.status, 200, "{tp}");
        let got = up.last();
        let (v, trace, parent, f) = parts(got.header("traceparent").unwrap());
        assert_eq!(v, "00", "{tp}");
        assert_eq!(trace, CLIENT_TRACE, "{tp}: the trace is continued");
        assert_ne!(parent, CLIENT_PARENT, "{tp}");
        assert_eq!(f, flags, "{tp}");
        assert_eq!(got.headers_named("tracestate"), ["foo=1"], "{tp}");
    }
    // A higher version whose flags run on without a dash, and `ff`: a new trace.
    for tp in [
        format!("cc-{CLIENT_TRACE}-{CLIENT_PARENT}-01x"),
        format!("ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01"),
    ] {
        send(
            gw.addr,
            "/a",
            &format!("traceparent: {tp}\r\ntracestate: foo=1\r\n"),
        );
        let got = up.last();
        let (_, trace, _, _) = parts(got.header("traceparent").unwrap());
        assert_ne!(trace, CLIENT_TRACE, "{tp}");
        assert!(got.header("tracestate").is_none(), "{tp}");
    }
}

/// W3C Trace Context §3.3.1: a tracestate list of more than 32 members, with a key or value
/// outside the grammar, or with a key twice, is not a valid list and is not passed upstream
/// (the trace itself is continued); empty members are allowed, and 32 members pass.
#[test]
fn an_invalid_tracestate_list_is_dropped_and_a_valid_one_passes() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DRIVERS[0]);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let members = |n: usize| {
        (0..n)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let m32 = members(32);
    let m33 = members(33);
    let valid: [&[&str]; 4] = [
        &[m32.as_str()],
        &["foo=1 , ,bar=2", "baz=3"],
        &["foo=1", "", "bar=2"],
        &["tenant@vendor=x y", "0a=1"],
    ];
    for lines in valid {
        send_trace(gw.addr, &tp, lines);
        let got = up.last();
        assert_eq!(got.headers_named("tracestate"), lines, "{lines:?}");
    }
    let invalid: [&[&str]; 9] = [
        &[m33.as_str()],
        &[m32.as_str(), "one=more"],
        &["foo=1,foo=2"],
        &["foo=1", "foo=2"],
        &["FOO=1"],
        &["foo.bar=1"],
        &["foo@=1"],
        &["foo=1=2"],
        &["foo"],
    ];
    for lines in invalid {
        let r = send_trace(gw.addr, &tp, lines);
        assert_eq!(r.status, 200, "{lines:?}");
        let got = up.last();
        assert!(
            got.header("tracestate").is_none(),
            "{lines:?}: an invalid list is dropped"
        );
        let (_, trace, _, _) = parts(got.header("traceparent").unwrap());
        assert_eq!(trace, CLIENT_TRACE, "{lines:?}: the trace is continued");
    }
}

#[test]
fn gateway_made_errors_carry_the_trace_id() {
    let up = Upstream::echo();
    let dead = refusing_addr();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[upstreams.down]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\npath_prefix = \"/up\"\nupstream = \"up\"\n[[routes]]\npath_prefix = \"/down\"\nupstream = \"down\"\n",
        up.addr, dead.addr
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let tp = format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_PARENT}-01\r\n");
    for (path, status) in [("/nowhere", 404), ("/down", 502)] {
        let r = send(gw.addr, path, &tp);
        assert_eq!(r.status, status);
        let body = r.json();
        assert_eq!(body["trace_id"], CLIENT_TRACE, "{path}");
        assert_eq!(body["request_id"].as_str(), r.header("x-request-id"));
    }
    // Without a trace, the error still names the one the gateway started.
    let r = send(gw.addr, "/nowhere", "");
    let t = r.json()["trace_id"].as_str().unwrap().to_string();
    assert_eq!(t.len(), 32);
    assert_ne!(t, CLIENT_TRACE);
    // A refused head (malformed) also gets a trace id in its error.
    let r = request(
        gw.addr,
        b"GET /a HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["trace_id"].as_str().map(str::len), Some(32));
}

/// Composition's sub-requests carry the request's trace as a proxied request does: the
/// gateway's span as the parent, a new trace when the client sent none or an invalid one, and
/// `tracestate` only with a trace the client started.
#[test]
fn composition_calls_carry_the_gateway_span() {
    let a = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
                .to_vec(),
        )
    });
    let b = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"b\":2}"
                .to_vec(),
        )
    });
    let toml = format!(
        r#"[[listeners]]
address = "127.0.0.1:0"

[upstreams.a]
endpoints = [{{ address = "{}" }}]

[upstreams.b]
endpoints = [{{ address = "{}" }}]

[[routes]]
path = "/both"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "a"
path = "/a"
[[routes.compose.calls]]
id = "b"
upstream = "b"
path = "/b"
"#,
        a.addr, b.addr
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    // A client trace: continued, the gateway's span as the parent, tracestate passed.
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(
        gw.addr,
        "/both",
        &format!("traceparent: {tp}\r\ntracestate: congo=t61rcWkgMzE\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (ra, rb) = (a.last(), b.last());
    for got in [&ra, &rb] {
        let tps = got.headers_named("traceparent");
        assert_eq!(tps.len(), 1, "{got:?}");
        let (v, trace, parent, flags) = parts(tps[0]);
        assert_eq!((v.as_str(), flags.as_str()), ("00", "01"));
        assert_eq!(trace, CLIENT_TRACE);
        assert_ne!(
            parent, CLIENT_PARENT,
            "the gateway's own span is the parent"
        );
        assert_eq!(got.headers_named("tracestate"), ["congo=t61rcWkgMzE"]);
    }
    assert_eq!(
        ra.header("traceparent"),
        rb.header("traceparent"),
        "one span of the gateway's per request"
    );
    // An over-long list: cut by whole members as the proxied path cuts it (§3.3.1.5).
    let (l, m) = (
        format!("l={}", "w".repeat(256)),
        format!("m={}", "w".repeat(256)),
    );
    let r = send(
        gw.addr,
        "/both",
        &format!("traceparent: {tp}\r\ntracestate: a=1, {l}\r\ntracestate: {m}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for got in [a.last(), b.last()] {
        assert_eq!(got.headers_named("tracestate"), [format!("a=1,{l}")]);
    }
    // No trace, or an invalid one: a new trace, the same in every call; no tracestate.
    for headers in [
        String::new(),
        format!(
            "traceparent: 00-{}-{CLIENT_PARENT}-01\r\ntracestate: k=v\r\n",
            CLIENT_TRACE.to_uppercase()
        ),
    ] {
        let r = send(gw.addr, "/both", &headers);
        assert_eq!(r.status, 200, "{}", r.text());
        let (ra, rb) = (a.last(), b.last());
        let ta = ra
            .header("traceparent")
            .expect("a traceparent on every call");
        let (_, trace, _, flags) = parts(ta);
        assert_ne!(trace, CLIENT_TRACE.to_uppercase());
        assert_ne!(trace.to_uppercase(), CLIENT_TRACE.to_uppercase());
        assert_eq!(flags, "01");
        assert_eq!(rb.header("traceparent"), Some(ta));
        assert!(ra.headers_named("tracestate").is_empty(), "{ra:?}");
    }
}

/// A cache's background revalidation (stale-while-revalidate) carries the trace of the request
/// that triggered it, the gateway's span as the parent, as the request itself would.
#[test]
fn a_background_revalidation_carries_the_request_trace() {
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=0, stale-while-revalidate=60\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        )
    });
    let gw = TestGateway::start(
        &config(&[up.addr], "[[routes]]\nupstream = \"up\"\ncache = { }\n"),
        DRIVERS[0],
    );
    assert_eq!(send(gw.addr, "/s", "").status, 200);
    let first = up.last();
    // Stale at once: answered from the store, revalidated in the background.
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let r = send(
        gw.addr,
        "/s",
        &format!("traceparent: {tp}\r\ntracestate: congo=t61rcWkgMzE\r\n"),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.header("cache-status")
            .unwrap_or("")
            .contains("stale-while-revalidate"),
        "{r:?}"
    );
    assert!(up.wait_for(std::time::Duration::from_secs(5), |s| s.len() >= 2));
    let reval = up.last();
    assert_ne!(reval.header("traceparent"), first.header("traceparent"));
    let tps = reval.headers_named("traceparent");
    assert_eq!(tps.len(), 1, "{reval:?}");
    let (_, trace, parent, _) = parts(tps[0]);
    assert_eq!(trace, CLIENT_TRACE);
    assert_ne!(
        parent, CLIENT_PARENT,
        "the gateway's own span is the parent"
    );
    assert_eq!(reval.headers_named("tracestate"), ["congo=t61rcWkgMzE"]);
}
