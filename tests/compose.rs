//! API composition (`compose` routes) over real sockets with loopback upstreams: parallel and
//! dependent calls, per-item fan-out with batching and joins, every conflict policy (byte
//! for byte the same under random upstream delays), each failure mode, de-duplication,
//! retries, and the load-time refusals with their file, line and key.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ringway::config::Config;
use serde_json::{json, Value};
use support::*;

/// A 200 JSON answer.
fn json_ok(body: &str) -> Vec<u8> {
    json_status(200, body)
}

fn json_status(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The support echo upstream, answering as a JSON API does (`application/json`: a call
/// refuses an answer of another media type).
fn json_echo() -> Upstream {
    Upstream::start(|req| Reply::Raw(json_ok(&echo_json(req))))
}

/// A JSON answer after `delay`.
fn json_after(delay: Duration, body: String) -> Reply {
    Reply::Slow {
        parts: vec![(delay, json_ok(&body))],
        close: false,
    }
}

/// A config with named upstream groups and `routes` appended.
fn cfg(groups: &[(&str, SocketAddr)], routes: &str) -> String {
    let mut s = String::from("[[listeners]]\naddress = \"127.0.0.1:0\"\n\n");
    for (name, a) in groups {
        s.push_str(&format!(
            "[upstreams.{name}]\nendpoints = [{{ address = \"{a}\" }}]\n\n"
        ));
    }
    s.push_str(routes);
    s
}

fn get_with(addr: SocketAddr, path: &str, extra: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n{extra}\r\n").as_bytes(),
    )
}

/// The checks every composed answer passes: JSON, with its length.
fn check_framing(r: &Resp) {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string().as_str()),
        "{r:?}"
    );
}

#[test]
fn independent_calls_run_in_parallel() {
    // Each upstream answers only once all three requests are in flight together: were the
    // calls made one after another, the first would wait out its 5 s and report `false`.
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let handler = |name: &'static str, arrived: Arc<(Mutex<usize>, Condvar)>| {
        move |_: &Req| {
            let (m, cv) = &*arrived;
            let mut n = m.lock().unwrap();
            *n += 1;
            cv.notify_all();
            let (n, _) = cv
                .wait_timeout_while(n, Duration::from_secs(5), |n| *n < 3)
                .unwrap();
            Reply::Raw(json_ok(&format!(
                r#"{{"{name}": {{"together": {}}}}}"#,
                *n >= 3
            )))
        }
    };
    let a = Upstream::start(handler("a", arrived.clone()));
    let b = Upstream::start(handler("b", arrived.clone()));
    let c = Upstream::start(handler("c", arrived.clone()));
    let routes = r#"
[[routes]]
path = "/all"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "a"
path = "/a"
[[routes.compose.calls]]
id = "b"
upstream = "b"
path = "/b"
[[routes.compose.calls]]
id = "c"
upstream = "c"
path = "/c"
"#;
    let gw = TestGateway::start(
        &cfg(&[("a", a.addr), ("b", b.addr), ("c", c.addr)], routes),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/all");
    assert_eq!(r.status, 200, "{}", r.text());
    check_framing(&r);
    assert_eq!(
        r.json(),
        json!({"a": {"together": true}, "b": {"together": true}, "c": {"together": true}})
    );
    assert!(!r.has("ringway-partial"));
}

const DEPENDENT: &str = r#"
[[routes]]
path_regex = "^/users/(?P<id>[0-9]+)/summary$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
headers = { "x-tenant" = "${request.header.x-tenant}" }
into = "user"
pick = ["id", "name"]
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders"
query = { user = "${calls.user.body/id}", status = "${request.query.status}" }
extract = "/orders"
into = "orders"
"#;

#[test]
fn dependent_call_uses_the_first_calls_answer_and_the_client_request() {
    for d in DRIVERS {
        let users = Upstream::start(|req| {
            assert!(req.target.starts_with("/users/"), "{}", req.target);
            Reply::Raw(json_ok(
                r#"{"id": "u 7/x", "name": "Ada", "email": "ada@example.test"}"#,
            ))
        });
        let orders =
            Upstream::start(|_| Reply::Raw(json_ok(r#"{"orders": [{"id": 1}, {"id": 2}]}"#)));
        let gw = TestGateway::start(
            &cfg(&[("users", users.addr), ("orders", orders.addr)], DEPENDENT),
            d,
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let r = get_with(
            gw.addr,
            "/users/42/summary?status=open%20now",
            &format!(
                "X-Tenant: acme\r\ntraceparent: {tp}\r\ntracestate: k=v\r\nX-Request-Id: rid-1\r\n"
            ),
        );
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        check_framing(&r);
        assert_eq!(
            r.json(),
            json!({"user": {"id": "u 7/x", "name": "Ada"}, "orders": [{"id": 1}, {"id": 2}]})
        );
        let u = users.last();
        assert_eq!(u.target, "/users/42");
        assert_eq!(u.header("x-tenant"), Some("acme"));
        // The client's trace, with the gateway's span as the parent (as when proxied).
        let sent = u.header("traceparent").unwrap_or("");
        assert_eq!(sent.len(), tp.len(), "{sent}");
        assert_eq!(sent[..36], tp[..36], "{sent}");
        assert_ne!(sent, tp);
        assert_eq!(u.header("tracestate"), Some("k=v"));
        assert_eq!(u.header("x-request-id"), Some("rid-1"));
        assert_eq!(u.header("accept"), Some("application/json"));
        // The id is percent-encoded: it cannot add a path segment or a parameter.
        assert_eq!(
            orders.last().target,
            "/orders?status=open%20now&user=u%207%2Fx"
        );
    }
}

const FAN_OUT: &str = r#"
[[routes]]
path = "/cart"
[routes.compose]
[[routes.compose.calls]]
id = "cart"
upstream = "carts"
path = "/cart"
[[routes.compose.calls]]
id = "products"
upstream = "products"
path = "/products"
[routes.compose.calls.for_each]
items = "${calls.cart.body/items/*/product_id}"
batch = 2
batch_param = "id"
BATCH_AS
concurrency = 2
join = { key = "id", into = "product" }
"#;

/// Answers `/products?id=..` (repeated or comma list) or a JSON array body with the products.
fn products_handler(req: &Req) -> Reply {
    let ids: Vec<String> = if req.method == "POST" {
        let v: Vec<Value> = serde_json::from_slice(&req.body).expect("a JSON array body");
        v.iter().map(|x| x.to_string()).collect()
    } else {
        let q = req.target.split_once('?').map_or("", |(_, q)| q);
        q.split('&')
            .filter_map(|kv| kv.strip_prefix("id="))
            .flat_map(|v| v.split("%2C").chain(std::iter::empty()))
            .flat_map(|v| v.split(','))
            .map(str::to_string)
            .collect()
    };
    let list: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id.parse::<u64>().unwrap(), "title": format!("product {id}")}))
        .collect();
    Reply::Raw(json_ok(&Value::Array(list).to_string()))
}

#[test]
fn for_each_batches_dedupes_and_joins_back() {
    for (batch_as, method) in [
        ("", "GET"),
        ("batch_as = \"comma\"", "GET"),
        ("json", "POST"),
    ] {
        let carts = Upstream::start(|_| {
            Reply::Raw(json_ok(
                r#"{"items": [{"product_id": 1, "n": 1}, {"product_id": 2}, {"product_id": 1, "n": 3}, {"product_id": 3}, {"product_id": 4}]}"#,
            ))
        });
        let products = Upstream::start(products_handler);
        let routes = if batch_as == "json" {
            FAN_OUT
                .replace("batch_param = \"id\"\n", "")
                .replace("BATCH_AS", "batch_as = \"json\"")
                .replace(
                    "path = \"/products\"",
                    "path = \"/products\"\nmethod = \"POST\"",
                )
        } else {
            FAN_OUT.replace("BATCH_AS", batch_as)
        };
        let gw = TestGateway::start(
            &cfg(
                &[("carts", carts.addr), ("products", products.addr)],
                &routes,
            ),
            DRIVERS[0],
        );
        let r = get(gw.addr, "/cart");
        assert_eq!(r.status, 200, "{batch_as}: {}", r.text());
        check_framing(&r);
        let p = |id: u64| json!({"id": id, "title": format!("product {id}")});
        assert_eq!(
            r.json(),
            json!({"items": [
                {"product_id": 1, "n": 1, "product": p(1)},
                {"product_id": 2, "product": p(2)},
                {"product_id": 1, "n": 3, "product": p(1)},
                {"product_id": 3, "product": p(3)},
                {"product_id": 4, "product": p(4)},
            ]}),
            "{batch_as}"
        );
        // Four distinct ids in batches of two: two requests.
        assert_eq!(products.hits(), 2, "{batch_as}: {:?}", products.targets());
        let mut targets = products.targets();
        targets.sort();
        match batch_as {
            "" => assert_eq!(targets, ["/products?id=1&id=2", "/products?id=3&id=4"]),
            "json" => assert!(products
                .seen
                .lock()
                .unwrap()
                .iter()
                .all(|r| r.method == method)),
            _ => assert_eq!(targets, ["/products?id=1,2", "/products?id=3,4"]),
        }
    }
}

#[test]
fn for_each_without_join_collects_results_and_bounds_items() {
    let lists = Upstream::start(|_| Reply::Raw(json_ok(r#"{"ids": [5, 6, 5, 7]}"#)));
    let items = Upstream::start(|req| {
        let id = req.target.rsplit('/').next().unwrap().to_string();
        Reply::Raw(json_ok(&format!(r#"{{"id": {id}, "secret": 1}}"#)))
    });
    let routes = |max: usize| {
        format!(
            r#"
[[routes]]
path = "/x"
[routes.compose]
[[routes.compose.calls]]
id = "list"
upstream = "lists"
path = "/list"
omit = ["ids"]
[[routes.compose.calls]]
id = "each"
upstream = "items"
path = "/items/${{item}}"
into = "items"
omit = ["secret"]
[routes.compose.calls.for_each]
items = "${{calls.list.body/ids/*}}"
max_items = {max}
"#
        )
    };
    let gw = TestGateway::start(
        &cfg(&[("lists", lists.addr), ("items", items.addr)], &routes(3)),
        DRIVERS[1],
    );
    let r = get(gw.addr, "/x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"items": [{"id": 5}, {"id": 6}, {"id": 7}]})
    );
    assert_eq!(items.hits(), 3);
    drop(gw);
    let gw = TestGateway::start(
        &cfg(&[("lists", lists.addr), ("items", items.addr)], &routes(2)),
        DRIVERS[1],
    );
    let r = request(
        gw.addr,
        b"GET /x HTTP/1.1\r\nHost: t\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "each");
    assert!(r.text().contains("max_items"), "{}", r.text());
    // Named like every gateway-made error: the request id and the client's trace.
    assert_eq!(r.json()["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(r.json()["request_id"].as_str().map(str::len), Some(24));
}

/// Two upstreams that answer overlapping documents after random delays (xorshift, seeded).
fn racing_pair() -> (Upstream, Upstream) {
    let seed = Arc::new(AtomicUsize::new(0x9e37_79b9));
    let delay = move |seed: &AtomicUsize| {
        let mut x = seed.load(Ordering::SeqCst) as u64 | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        seed.store(x as usize, Ordering::SeqCst);
        Duration::from_millis(x % 25)
    };
    let (s1, s2) = (seed.clone(), seed);
    let a = Upstream::start(move |_| {
        json_after(
            delay(&s1),
            r#"{"k": 1, "a": true, "o": {"x": 1, "l": [1, 2]}, "z": "a"}"#.into(),
        )
    });
    let b = Upstream::start(move |_| {
        json_after(
            delay(&s2),
            r#"{"k": 2, "b": true, "o": {"y": 2, "l": [3]}, "z": {"from": "b"}}"#.into(),
        )
    });
    (a, b)
}

fn conflict_route(policy: &str) -> String {
    format!(
        r#"
[[routes]]
path = "/m"
[routes.compose]
{policy}
[[routes.compose.calls]]
id = "first"
upstream = "a"
path = "/a"
[[routes.compose.calls]]
id = "second"
upstream = "b"
path = "/b"
"#
    )
}

#[test]
fn conflict_policies_give_the_same_bytes_whatever_the_timing() {
    let (a, b) = racing_pair();
    let cases = [
        (
            "on_conflict = \"first\"",
            // Answers that need no tree are spliced as they came (values keep the upstream's
            // bytes); the top-level keys are sorted.
            r#"{"a":true,"b":true,"k":1,"o":{"x": 1, "l": [1, 2]},"z":"a"}"#,
        ),
        (
            "on_conflict = \"last\"",
            r#"{"a":true,"b":true,"k":2,"o":{"y": 2, "l": [3]},"z":{"from": "b"}}"#,
        ),
        (
            "on_conflict = \"deep_merge\"",
            r#"{"a":true,"b":true,"k":2,"o":{"l":[1,2,3],"x":1,"y":2},"z":{"from":"b"}}"#,
        ),
        (
            "on_conflict = \"deep_merge\"\narrays = \"replace\"",
            r#"{"a":true,"b":true,"k":2,"o":{"l":[3],"x":1,"y":2},"z":{"from":"b"}}"#,
        ),
    ];
    for (policy, want) in cases {
        let gw = TestGateway::start(
            &cfg(&[("a", a.addr), ("b", b.addr)], &conflict_route(policy)),
            DRIVERS[0],
        );
        for i in 0..12 {
            let r = get(gw.addr, "/m");
            assert_eq!(r.status, 200, "{policy} #{i}: {}", r.text());
            check_framing(&r);
            assert_eq!(r.text(), format!("{want}\n"), "{policy} #{i}");
        }
    }
    // "error" (the default): refused the same way every time, naming the key and the calls.
    let gw = TestGateway::start(
        &cfg(&[("a", a.addr), ("b", b.addr)], &conflict_route("")),
        DRIVERS[0],
    );
    let mut first: Option<Vec<u8>> = None;
    for _ in 0..8 {
        let r = get_with(gw.addr, "/m", SAME_IDS);
        assert_eq!(r.status, 502, "{}", r.text());
        check_framing(&r);
        let j = r.json();
        assert_eq!(j["error"], "compose_conflict");
        assert_eq!(j["key"], "k");
        assert_eq!(j["calls"], json!(["first", "second"]));
        match &first {
            None => first = Some(r.body.clone()),
            Some(f) => assert_eq!(f, &r.body),
        }
    }
}

/// A route with one required call to `bad` and one optional call to `ok`.
fn failure_route(extra_bad: &str, route_extra: &str) -> String {
    format!(
        r#"
[[routes]]
path = "/f"
[routes.compose]
{route_extra}
[[routes.compose.calls]]
id = "main"
upstream = "bad"
path = "/main"
into = "main"
{extra_bad}
[[routes.compose.calls]]
id = "side"
upstream = "ok"
path = "/side"
into = "side"
"#
    )
}

#[test]
fn a_failed_required_call_fails_the_request_naming_it() {
    let ok = Upstream::start(|_| Reply::Raw(json_ok(r#"{"fine": true}"#)));
    let refusing = refusing_addr();
    let big = "x".repeat(4096);
    let cases: Vec<(&str, Upstream, &str, u16, &str)> = vec![
        (
            "timeout",
            Upstream::slow(Duration::from_secs(3), br#"{"late": true}"#),
            "timeout = \"200ms\"",
            504,
            "did not answer in time",
        ),
        (
            "5xx",
            Upstream::start(|_| Reply::Raw(json_status(503, "{}"))),
            "",
            502,
            "answered 503",
        ),
        (
            "bad json",
            Upstream::start(|_| Reply::Raw(json_ok("<html>nope</html>"))),
            "",
            502,
            "not JSON",
        ),
        (
            "oversized",
            Upstream::start(move |_| Reply::Raw(json_ok(&format!("\"{big}\"")))),
            "",
            502,
            "larger than 1024 bytes",
        ),
    ];
    for (what, bad, extra, status, why) in cases {
        let route_extra = if what == "oversized" {
            "max_call_bytes = 1024"
        } else {
            ""
        };
        let gw = TestGateway::start(
            &cfg(
                &[("bad", bad.addr), ("ok", ok.addr)],
                &failure_route(extra, route_extra),
            ),
            DRIVERS[0],
        );
        let started = Instant::now();
        let r = get(gw.addr, "/f");
        assert_eq!(r.status, status, "{what}: {}", r.text());
        check_framing(&r);
        let j = r.json();
        assert_eq!(j["call"], "main", "{what}");
        assert_eq!(j["status"], status, "{what}");
        assert!(j["message"].as_str().unwrap().contains(why), "{what}: {j}");
        if what == "timeout" {
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{what}: {:?}",
                started.elapsed()
            );
        }
    }
    // Connection refused.
    let gw = TestGateway::start(
        &cfg(
            &[("bad", refusing.addr), ("ok", ok.addr)],
            &failure_route("", ""),
        ),
        DRIVERS[1],
    );
    let r = get(gw.addr, "/f");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "main");
    assert!(r.text().contains("could not connect"), "{}", r.text());
    // The route passes the call's own status on.
    let bad = Upstream::start(|_| Reply::Raw(json_status(404, "{}")));
    let gw = TestGateway::start(
        &cfg(
            &[("bad", bad.addr), ("ok", ok.addr)],
            &failure_route("", "pass_status = true"),
        ),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/f");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["call"], "main");
}

#[test]
fn a_passed_401_405_or_407_keeps_the_header_fields_its_status_needs() {
    // RFC 9110 §15.5.2 (401: WWW-Authenticate), §15.5.6 (405: Allow), §15.5.8 (407:
    // Proxy-Authenticate): passed on by `pass_status`, the status came without them.
    let ok = Upstream::start(|_| Reply::Raw(json_ok(r#"{"fine": true}"#)));
    let bad = Upstream::start(|req| {
        let (status, fields) = match req.target.as_str() {
            "/main" if req.header("x-case") == Some("401") => (
                401,
                "WWW-Authenticate: Basic realm=\"a\"\r\nwww-authenticate: Bearer\r\n",
            ),
            _ if req.header("x-case") == Some("405") => (405, "Allow: GET, HEAD\r\n"),
            _ => (
                407,
                "Proxy-Authenticate: Basic realm=\"p\"\r\nX-Other: no\r\n",
            ),
        };
        Reply::Raw(
            format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{fields}content-length: 2\r\n\r\n{{}}"
            )
            .into_bytes(),
        )
    });
    let gw = TestGateway::start(
        &cfg(
            &[("bad", bad.addr), ("ok", ok.addr)],
            &failure_route(
                "headers = { \"x-case\" = \"${request.header.x-case}\" }",
                "pass_status = true",
            ),
        ),
        DRIVERS[0],
    );
    let raw = |case: &str| {
        let mut c = Client::connect(gw.addr);
        c.send(format!("GET /f HTTP/1.1\r\nHost: t\r\nX-Case: {case}\r\n\r\n").as_bytes());
        c.read_response().expect("an answer")
    };
    let r = raw("401");
    assert_eq!(r.status, 401, "{}", r.text());
    let www: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("www-authenticate"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(www, ["Basic realm=\"a\"", "Bearer"], "{r:?}");
    let r = raw("405");
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "{r:?}");
    let r = raw("407");
    assert_eq!(r.status, 407, "{}", r.text());
    assert_eq!(
        r.header("proxy-authenticate"),
        Some("Basic realm=\"p\""),
        "{r:?}"
    );
    assert!(!r.has("x-other"), "{r:?}");
    // With its reason phrase (it was empty), seen on the wire.
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /f HTTP/1.1\r\nHost: t\r\nX-Case: 407\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    let _ = std::io::Read::read_to_end(&mut c.s, &mut raw);
    assert!(
        raw.starts_with(b"HTTP/1.1 407 Proxy Authentication Required\r\n"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn failed_optional_calls_are_left_out_or_replaced_and_reported() {
    let ok = Upstream::start(|_| Reply::Raw(json_ok(r#"{"fine": true}"#)));
    let refusing = refusing_addr();
    let bad_json = Upstream::start(|_| Reply::Raw(json_ok("{")));
    let routes = r#"
[[routes]]
path = "/p"
[routes.compose]
errors_field = true
[[routes.compose.calls]]
id = "main"
upstream = "ok"
path = "/main"
into = "main"
[[routes.compose.calls]]
id = "pictures"
upstream = "refusing"
path = "/pictures"
into = "pictures"
required = false
fallback = []
[[routes.compose.calls]]
id = "friends"
upstream = "badjson"
path = "/friends"
into = "friends"
required = false
"#;
    for d in DRIVERS {
        let gw = TestGateway::start(
            &cfg(
                &[
                    ("ok", ok.addr),
                    ("refusing", refusing.addr),
                    ("badjson", bad_json.addr),
                ],
                routes,
            ),
            d,
        );
        let r = get(gw.addr, "/p");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        check_framing(&r);
        assert_eq!(r.header("ringway-partial"), Some("pictures,friends"));
        let j = r.json();
        assert_eq!(j["main"], json!({"fine": true}));
        assert_eq!(j["pictures"], json!([]));
        assert!(j.get("friends").is_none(), "{j}");
        let errs = j["_errors"].as_array().unwrap();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0]["call"], "pictures");
        assert_eq!(errs[1]["call"], "friends");
        assert!(errs[1]["reason"].as_str().unwrap().contains("not JSON"));
    }
}

#[test]
fn identical_gets_are_made_once_and_retries_follow_the_route_policy() {
    let up = Upstream::start(|_| Reply::Raw(json_ok(r#"{"v": 1}"#)));
    let routes = r#"
[[routes]]
path = "/d"
[routes.compose]
[[routes.compose.calls]]
id = "one"
upstream = "up"
path = "/same"
into = "one"
[[routes.compose.calls]]
id = "two"
upstream = "up"
path = "/same"
into = "two"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/d");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"one": {"v": 1}, "two": {"v": 1}}));
    assert_eq!(up.hits(), 1);
    // Sub-requests use the upstream pool: later client requests reuse the connection.
    let mut c = Client::connect(gw.addr);
    for _ in 0..3 {
        c.send(b"GET /d HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().expect("an answer").status, 200);
    }
    assert_eq!(up.hits(), 4);
    assert_eq!(up.conns(), 1, "sub-request connections are pooled");

    // The first try is dropped unanswered; the route's retry policy tries again.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let flaky = Upstream::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::Drop
        } else {
            Reply::Raw(json_ok(r#"{"v": 2}"#))
        }
    });
    let routes = r#"
[[routes]]
path = "/r"
retry = { attempts = 2, on = ["reset", "connect_failure"] }
[routes.compose]
[[routes.compose.calls]]
id = "x"
upstream = "flaky"
path = "/x"
"#;
    let gw = TestGateway::start(&cfg(&[("flaky", flaky.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/r");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"v": 2}));
    assert_eq!(flaky.hits(), 2);
}

#[test]
fn the_last_step_posts_after_the_others_with_their_values() {
    let users = Upstream::start(|_| Reply::Raw(json_ok(r#"{"id": 9, "name": "Ada"}"#)));
    let orders = Upstream::start(|req| {
        if req.method == "POST" {
            Reply::Raw(json_status(
                201,
                &format!(r#"{{"created": {}}}"#, String::from_utf8_lossy(&req.body)),
            ))
        } else {
            Reply::Raw(json_ok("{}"))
        }
    });
    let routes = r#"
[[routes]]
path = "/buy"
[routes.compose]
[[routes.compose.calls]]
id = "order"
upstream = "orders"
method = "POST"
path = "/orders"
body = '{"user": ${calls.user.body/id}, "name": ${calls.user.body/name}, "q": ${request.query.q}}'
into = "order"
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/me"
into = "user"
"#;
    let gw = TestGateway::start(
        &cfg(&[("users", users.addr), ("orders", orders.addr)], routes),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/buy?q=a%22b");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"order": {"created": {"user": 9, "name": "Ada", "q": "a\"b"}}, "user": {"id": 9, "name": "Ada"}})
    );
    let p = orders.last();
    assert_eq!(p.header("content-type"), Some("application/json"));
}

#[test]
fn consumer_and_identity_headers_reach_the_calls() {
    let up = json_echo();
    let key = ringway::auth::apikey::key_hash_hex(b"team-key");
    let routes = format!(
        r#"
[auth.api_key]
header = "x-api-key"

[[consumers]]
name = "team-a"
api_keys = ["{key}"]

[[routes]]
path = "/me"
auth = "api_key"
[routes.compose]
[[routes.compose.calls]]
id = "team"
upstream = "up"
path = "/teams/${{request.consumer}}"
query = {{ q = "${{request.query.q}}" }}
into = "echo"
"#
    );
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], &routes), DRIVERS[0]);
    assert_eq!(get(gw.addr, "/me").status, 401);
    let r = get_with(gw.addr, "/me?q=line%0Abreak", "X-Api-Key: team-key\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = up.last();
    // A decoded control character goes on percent-encoded, never raw.
    assert_eq!(req.target, "/teams/team-a?q=line%0Abreak");
    assert_eq!(req.header("x-consumer"), Some("team-a"));
    assert!(
        req.header("x-api-key").is_none(),
        "the credential stays at the gateway"
    );
    assert_eq!(r.json()["echo"]["target"], "/teams/team-a?q=line%0Abreak");
}

#[test]
fn chunked_and_close_delimited_answers_and_head_calls_with_status_and_headers() {
    let chunked = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"c\":\r\n3\r\n[1]\r\n1\r\n}\r\n0\r\n\r\n"
                .to_vec(),
        )
    });
    let close = Upstream::start(|_| {
        Reply::RawClose(
            b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"closed\": true}".to_vec(),
        )
    });
    let meta = Upstream::start(|req| {
        assert_eq!(req.method, "HEAD");
        Reply::Raw(b"HTTP/1.1 200 OK\r\netag: \"v7\"\r\ncontent-length: 999\r\n\r\n".to_vec())
    });
    let echo = json_echo();
    let routes = r#"
[[routes]]
path = "/frames"
[routes.compose]
[[routes.compose.calls]]
id = "chunked"
upstream = "chunked"
path = "/c"
[[routes.compose.calls]]
id = "close"
upstream = "close"
path = "/close"
[[routes.compose.calls]]
id = "meta"
upstream = "meta"
method = "HEAD"
path = "/meta"
into = "meta"
[[routes.compose.calls]]
id = "echo"
upstream = "echo"
path = "/e/${calls.meta.status}"
headers = { "if-none-match" = "${calls.meta.header.etag}" }
into = "echo"
pick = ["target"]
"#;
    for d in DRIVERS {
        let gw = TestGateway::start(
            &cfg(
                &[
                    ("chunked", chunked.addr),
                    ("close", close.addr),
                    ("meta", meta.addr),
                    ("echo", echo.addr),
                ],
                routes,
            ),
            d,
        );
        let r = get(gw.addr, "/frames");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        check_framing(&r);
        assert_eq!(
            r.json(),
            json!({"c": [1], "closed": true, "meta": null, "echo": {"target": "/e/200"}})
        );
        assert_eq!(echo.last().header("if-none-match"), Some("\"v7\""));
    }
}

#[test]
fn the_request_deadline_bounds_a_chain_of_calls() {
    let slow = Upstream::start(|_| json_after(Duration::from_millis(250), r#"{"id": 1}"#.into()));
    let after = Upstream::start(|_| Reply::Raw(json_ok("{}")));
    let routes = r#"
[[routes]]
path = "/chain"
[routes.compose]
deadline = "400ms"
[[routes.compose.calls]]
id = "one"
upstream = "slow"
path = "/1"
into = "one"
[[routes.compose.calls]]
id = "two"
upstream = "slow"
path = "/2/${calls.one.body/id}"
into = "two"
[[routes.compose.calls]]
id = "three"
upstream = "after"
path = "/3/${calls.two.body/id}"
into = "three"
"#;
    let gw = TestGateway::start(
        &cfg(&[("slow", slow.addr), ("after", after.addr)], routes),
        DRIVERS[0],
    );
    let started = Instant::now();
    let r = get(gw.addr, "/chain");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["call"], "two");
    assert_eq!(r.json()["error"], "compose_call_timeout");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // The call after the one that timed out never started.
    assert_eq!(after.hits(), 0);
}

#[test]
fn chunked_answers_over_the_call_cap_and_answers_over_the_total_cap_fail() {
    let chunked_big = Upstream::start(|_| {
        let body = format!("\"{}\"", "y".repeat(3000));
        let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for part in body.as_bytes().chunks(700) {
            r.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            r.extend_from_slice(part);
            r.extend_from_slice(b"\r\n");
        }
        r.extend_from_slice(b"0\r\n\r\n");
        Reply::Raw(r)
    });
    let medium = Upstream::start(|_| Reply::Raw(json_ok(&format!("\"{}\"", "m".repeat(600)))));
    let routes = |cap: &str, b: &str| {
        format!(
            r#"
[[routes]]
path = "/caps"
[routes.compose]
{cap}
[[routes.compose.calls]]
id = "one"
upstream = "{b}"
path = "/1"
into = "one"
[[routes.compose.calls]]
id = "two"
upstream = "medium"
path = "/2"
into = "two"
"#
        )
    };
    let ups = [("big", chunked_big.addr), ("medium", medium.addr)];
    let gw = TestGateway::start(
        &cfg(&ups, &routes("max_call_bytes = 1024", "big")),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/caps");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "one");
    assert!(r.text().contains("larger than 1024 bytes"), "{}", r.text());
    drop(gw);
    // Each answer (~600 bytes) is under the call cap; the two together are over the total.
    let gw = TestGateway::start(
        &cfg(&ups, &routes("max_total_bytes = 1000", "medium")),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/caps");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "compose_too_large", "{}", r.text());
    assert!(r.text().contains("max_total_bytes"), "{}", r.text());
    // Counted by its kind like any gateway-made error (issue 11's "by gateway error kind").
    let mut text = String::new();
    ringway::metrics::render_prometheus(gw.gateway().control(), &mut text).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("ringway_route_errors_total{")
                && l.contains("kind=\"compose_too_large\"")
                && l.ends_with(" 1")),
        "{text}"
    );
}

/// `extra` is refused at `extra`'s 0-based line `line`, with `key`, the reason holding `why`.
fn refused(extra: &str, line: usize, key: &str, why: &str) {
    let head = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n";
    let src = format!("{head}{extra}");
    let e = Config::parse(&src, "c.toml").expect_err(extra);
    assert_eq!(e.key, key, "{e}");
    assert_eq!(e.file, "c.toml");
    assert_eq!(e.line, Some(head.lines().count() + 1 + line), "{e}\n{src}");
    assert!(e.reason.contains(why), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("c.toml:{}:", e.line.unwrap())),
        "{e}"
    );
}

#[test]
fn bad_compositions_are_refused_at_load_with_file_line_and_key() {
    let call = |id: &str, path: &str, more: &str| {
        format!(
            "[[routes.compose.calls]]\nid = \"{id}\"\nupstream = \"u\"\npath = \"{path}\"\n{more}"
        )
    };
    let route = |calls: String| format!("[[routes]]\npath = \"/c\"\n[routes.compose]\n{calls}");
    refused(
        &route(call("a", "/x/${calls.nope.body/id}", "")),
        6,
        "routes[0].compose.calls[0].path",
        "no call with id \"nope\"",
    );
    refused(
        &route(call("a", "/x/${calls.b.body/id}", "") + &call("b", "/y/${calls.a.status}", "")),
        4,
        "routes[0].compose.calls[0]",
        "cycle: a -> b -> a",
    );
    refused(
        &route(call("a", "/a", "") + &call("b", "/x/${calls.a.body/bad~2}", "")),
        10,
        "routes[0].compose.calls[1].path",
        "RFC 6901",
    );
    refused(
        &route(call("a", "/a", "method = \"POST\"\n") + &call("b", "/x/${calls.a.body/id}", "")),
        9,
        "routes[0].compose.calls[1]",
        "must be the last step",
    );
    refused(
        &route(call("a", "/a", "extract = \"nope\"\n")),
        7,
        "routes[0].compose.calls[0].extract",
        "must be empty or start with '/'",
    );
    refused(
        &route(call("a", "/a/${request.path.id}", "")),
        6,
        "routes[0].compose.calls[0].path",
        "needs a route with `path_regex`",
    );
    refused(
        &route(call("a", "/a", "") + &call("a", "/b", "")),
        8,
        "routes[0].compose.calls[1].id",
        "used twice",
    );
    refused(
        &route(call(
            "a",
            "/a",
            "[routes.compose.calls.for_each]\nitems = \"${calls.a.body/x}\"\n",
        )),
        8,
        "routes[0].compose.calls[0].for_each.items",
        "exactly one '*'",
    );
    refused(
        "[[routes]]\npath = \"/c\"\nupstream = \"u\"\n[routes.compose]\n[[routes.compose.calls]]\nid = \"a\"\nupstream = \"u\"\npath = \"/a\"\n",
        0,
        "routes[0].compose",
        "one of `upstream`, `direct` and `compose`",
    );
}

// ---------------------------------------------------------------------------------------------
// Review regressions: answers that must not depend on timing, and hostile upstream answers.

/// A JSON answer after 0 or `slow` ms, as `first` says for this request: the test flips it
/// between requests so that each of two upstreams is sometimes the first to answer.
fn flipped(first: &Arc<AtomicUsize>, me: usize, slow: u64, body: String) -> Reply {
    let d = if first.load(Ordering::SeqCst) % 2 == me {
        0
    } else {
        slow
    };
    json_after(Duration::from_millis(d), body)
}

/// The same request id and trace for every request, so that error bodies (which name both)
/// can be compared byte for byte.
const SAME_IDS: &str = "X-Request-Id: same\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";

/// Sends `n` requests to `path` (the same request id and trace each time), flipping `first` between
/// them, and checks that every answer is the same, byte for byte; returns it.
fn same_every_time(addr: SocketAddr, path: &str, first: &Arc<AtomicUsize>, n: usize) -> Resp {
    let mut seen: Option<Resp> = None;
    for i in 0..n {
        first.store(i, Ordering::SeqCst);
        let r = get_with(addr, path, SAME_IDS);
        check_framing(&r);
        match &seen {
            None => seen = Some(r),
            Some(s) => {
                assert_eq!(
                    (s.status, s.text(), s.header("ringway-partial")),
                    (r.status, r.text(), r.header("ringway-partial")),
                    "answer #{i}"
                );
            }
        }
    }
    seen.expect("n > 0")
}

#[test]
fn answers_over_the_total_cap_give_the_same_answer_whatever_the_timing() {
    let first = Arc::new(AtomicUsize::new(0));
    let (f1, f2) = (first.clone(), first.clone());
    let a = Upstream::start(move |_| flipped(&f1, 0, 80, format!("\"{}\"", "a".repeat(600))));
    let b = Upstream::start(move |_| flipped(&f2, 1, 80, format!("\"{}\"", "b".repeat(600))));
    for required in ["", "required = false"] {
        let routes = format!(
            r#"
[[routes]]
path = "/t"
[routes.compose]
max_total_bytes = 1000
[[routes.compose.calls]]
id = "one"
upstream = "a"
path = "/1"
into = "one"
{required}
[[routes.compose.calls]]
id = "two"
upstream = "b"
path = "/2"
into = "two"
{required}
"#
        );
        let gw = TestGateway::start(&cfg(&[("a", a.addr), ("b", b.addr)], &routes), DRIVERS[0]);
        let r = same_every_time(gw.addr, "/t", &first, 6);
        assert_eq!(r.status, 502, "{required}: {}", r.text());
        assert!(r.text().contains("max_total_bytes"), "{}", r.text());
    }
}

#[test]
fn a_failed_required_call_is_named_the_same_whatever_the_timing() {
    // `c` needs `a`; `c` and `d` both fail. Were `d`'s failure to stop `c` from starting
    // when it came before `a`'s answer, the answer would name `d` or `c` by timing.
    let first = Arc::new(AtomicUsize::new(0));
    let (f1, f2) = (first.clone(), first.clone());
    let a = Upstream::start(move |_| flipped(&f1, 0, 100, r#"{"id": 1}"#.into()));
    let c = Upstream::start(|_| Reply::Raw(json_status(500, "{}")));
    let d = Upstream::start(move |_| {
        let r = flipped(&f2, 1, 100, String::new());
        match r {
            Reply::Slow { parts, close } => Reply::Slow {
                parts: vec![(parts[0].0, json_status(503, "{}"))],
                close,
            },
            other => other,
        }
    });
    let routes = r#"
[[routes]]
path = "/r"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "a"
path = "/a"
into = "a"
[[routes.compose.calls]]
id = "c"
upstream = "c"
path = "/c/${calls.a.body/id}"
into = "c"
[[routes.compose.calls]]
id = "d"
upstream = "d"
path = "/d"
into = "d"
"#;
    let gw = TestGateway::start(
        &cfg(&[("a", a.addr), ("c", c.addr), ("d", d.addr)], routes),
        DRIVERS[0],
    );
    let r = same_every_time(gw.addr, "/r", &first, 6);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "c", "{}", r.text());
}

#[test]
fn a_failed_for_each_batch_is_named_the_same_whatever_the_timing() {
    let first = Arc::new(AtomicUsize::new(0));
    let f = first.clone();
    let src = Upstream::start(|_| {
        Reply::Raw(json_ok(
            r#"{"items": [{"id": "1"}, {"id": "2"}, {"id": "3"}, {"id": "4"}]}"#,
        ))
    });
    let items = Upstream::start(move |req| {
        let me = match req.target.as_str() {
            "/i/1" => 0,
            "/i/2" => 1,
            _ => return Reply::Raw(json_ok("{}")),
        };
        match flipped(&f, me, 100, String::new()) {
            Reply::Slow { parts, close } => Reply::Slow {
                parts: vec![(parts[0].0, json_status(500, "{}"))],
                close,
            },
            other => other,
        }
    });
    let routes = r#"
[[routes]]
path = "/fe"
[routes.compose]
[[routes.compose.calls]]
id = "src"
upstream = "src"
path = "/src"
into = "src"
[[routes.compose.calls]]
id = "each"
upstream = "items"
path = "/i/${item}"
into = "each"
[routes.compose.calls.for_each]
items = "${calls.src.body/items/*/id}"
concurrency = 2
"#;
    let gw = TestGateway::start(
        &cfg(&[("src", src.addr), ("items", items.addr)], routes),
        DRIVERS[0],
    );
    let r = same_every_time(gw.addr, "/fe", &first, 6);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("batch 1 of 4"), "{}", r.text());
}

#[test]
fn joins_cannot_multiply_one_answer_past_the_total_cap() {
    // 2000 items with the same id, one ~2 KB result: joined into every item it would make
    // a ~4 MB answer out of ~20 KB read.
    let list: Vec<String> = (0..2000).map(|_| r#"{"id":1}"#.to_string()).collect();
    let src_body = format!(r#"{{"list": [{}]}}"#, list.join(","));
    let src = Upstream::start(move |_| Reply::Raw(json_ok(&src_body)));
    let detail = Upstream::start(|_| {
        Reply::Raw(json_ok(&format!(
            r#"{{"id": 1, "blob": "{}"}}"#,
            "z".repeat(2000)
        )))
    });
    let routes = r#"
[[routes]]
path = "/j"
[routes.compose]
max_total_bytes = "100KiB"
[[routes.compose.calls]]
id = "src"
upstream = "src"
path = "/src"
[[routes.compose.calls]]
id = "detail"
upstream = "detail"
path = "/d/${item}"
[routes.compose.calls.for_each]
items = "${calls.src.body/list/*/id}"
join = { key = "id", into = "detail" }
"#;
    let gw = TestGateway::start(
        &cfg(&[("src", src.addr), ("detail", detail.addr)], routes),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/j");
    check_framing(&r);
    assert!(r.body.len() < 100 * 1024, "{} bytes", r.body.len());
    assert_eq!(r.status, 502, "{}", &r.text()[..r.text().len().min(300)]);
    assert_eq!(r.json()["call"], "detail");
    assert!(r.text().contains("max_total_bytes"), "{}", r.text());
}

#[test]
fn an_answer_that_is_not_utf8_is_not_json() {
    // RFC 8259 §8.1: JSON text is UTF-8. An answer spliced without a tree is checked too.
    let bad = Upstream::start(|_| {
        let body = b"{\"a\": \"\xff\xfe\"}";
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        Reply::Raw(r)
    });
    let ok = Upstream::start(|_| Reply::Raw(json_ok(r#"{"fine": true}"#)));
    let gw = TestGateway::start(
        &cfg(
            &[("bad", bad.addr), ("ok", ok.addr)],
            &failure_route("", ""),
        ),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/f");
    assert!(std::str::from_utf8(&r.body).is_ok(), "{:?}", r.body);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "main");
    assert!(r.text().contains("not JSON"), "{}", r.text());
}

#[test]
fn a_path_capture_is_sent_with_its_meaning_not_encoded_twice() {
    let users = Upstream::start(|_| Reply::Raw(json_ok(r#"{"ok": true}"#)));
    let routes = r#"
[[routes]]
path_regex = "^/u/(?P<id>[^/]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
headers = { "x-id" = "${request.path.id}" }
"#;
    let gw = TestGateway::start(&cfg(&[("users", users.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/u/a%2Fb%20c");
    assert_eq!(r.status, 200, "{}", r.text());
    let u = users.last();
    // The client's `%2F` is a slash inside the segment, `%20` a space: the same segment goes
    // on, not `a%252Fb%2520c`.
    assert_eq!(u.target, "/users/a%2Fb%20c");
    assert_eq!(u.header("x-id"), Some("a/b c"));
}

#[test]
fn a_batch_param_that_would_break_the_request_target_is_refused_at_load() {
    // The parameter name is written into every batch's request target as it is.
    for param in [r"id HTTP/1.1\r\nx-injected: 1", "id&admin=1", "a b"] {
        let extra = format!(
            "[[routes]]\npath = \"/c\"\n[routes.compose]\n[[routes.compose.calls]]\nid = \"a\"\nupstream = \"u\"\npath = \"/a\"\n[[routes.compose.calls]]\nid = \"b\"\nupstream = \"u\"\npath = \"/b\"\n[routes.compose.calls.for_each]\nitems = \"${{calls.a.body/l/*/id}}\"\nbatch = 2\nbatch_param = \"{param}\"\n"
        );
        refused(
            &extra,
            14,
            "routes[0].compose.calls[1].for_each.batch_param",
            "letters, digits",
        );
    }
}

#[test]
fn a_client_body_left_unread_by_a_composition_does_not_desync_the_connection() {
    // The composition never reads the client's body: `Conn::finish` must drain it before the
    // next bytes are taken as a request, or close.
    let up = Upstream::start(|_| Reply::Raw(json_ok(r#"{"ok": true}"#)));
    let routes = r#"
[[routes]]
path = "/c"
[routes.compose]
[[routes.compose.calls]]
id = "one"
upstream = "u"
path = "/one"
"#;
    let gw = TestGateway::start(&cfg(&[("u", up.addr)], routes), DRIVERS[0]);
    // The body looks like a request of its own.
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut c = Client::connect(gw.addr);
    c.send(
        format!(
            "POST /c HTTP/1.1\r\nHost: t\r\ncontent-length: {}\r\n\r\n{smuggled}GET /c HTTP/1.1\r\nHost: t\r\n\r\n",
            smuggled.len()
        )
        .as_bytes(),
    );
    for n in 0..2 {
        let r = c.read_response().expect("an answer");
        assert_eq!(r.status, 200, "#{n}: {}", r.text());
        assert_eq!(r.json(), json!({"ok": true}), "#{n}");
    }
    assert!(
        up.targets().iter().all(|t| t == "/one"),
        "{:?}",
        up.targets()
    );
}

#[test]
fn a_value_that_would_be_a_dot_segment_is_refused_not_sent() {
    // '.' is unreserved (RFC 3986 §2.3), so percent-encoding leaves "..": as a whole segment it
    // would take the call to another resource (§5.2.4), here `/` instead of `/orders/<id>`.
    let users = Upstream::start(|req| {
        let id = if req.target == "/users/1" { ".." } else { "." };
        Reply::Raw(json_ok(&format!(r#"{{"id": "{id}"}}"#)))
    });
    let orders = Upstream::start(|_| Reply::Raw(json_ok(r#"{"orders": []}"#)));
    let routes = r#"
[[routes]]
path_regex = "^/u/(?P<id>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
into = "user"
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders/${calls.user.body/id}/list"
into = "orders"
"#;
    let gw = TestGateway::start(
        &cfg(&[("users", users.addr), ("orders", orders.addr)], routes),
        DRIVERS[0],
    );
    for path in ["/u/1", "/u/2"] {
        let r = get(gw.addr, path);
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.json()["call"], "orders");
        assert!(r.text().contains("dot-segment"), "{}", r.text());
    }
    assert_eq!(orders.hits(), 0, "{:?}", orders.targets());
}

#[test]
fn a_null_or_empty_value_fails_the_call_instead_of_emptying_a_segment_or_a_filter() {
    // An empty value would turn `/orders/7` into `/orders/` (RFC 3986 §3.3: another resource,
    // typically the collection) and `?user_id=7` into `?user_id=`, which many APIs read as no
    // filter: other users' data. A null must not become "" (nor "null") either.
    let users = Upstream::start(|req| {
        let id = match req.target.as_str() {
            "/users/1" => "null",
            "/users/2" => "\"\"",
            _ => "7",
        };
        Reply::Raw(json_ok(&format!(r#"{{"id": {id}}}"#)))
    });
    let orders = json_echo();
    let routes = r#"
[[routes]]
path_regex = "^/p/(?P<id>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders/${calls.user.body/id}"
into = "orders"

[[routes]]
path_regex = "^/q/(?P<id>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders"
query = { user_id = "${calls.user.body/id}" }
into = "orders"

[[routes]]
path = "/h"
[routes.compose]
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders/${request.header.x-user}"
into = "orders"

[[routes]]
path_regex = "^/t/(?P<id>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/users/${request.path.id}"
[[routes.compose.calls]]
id = "orders"
upstream = "orders"
path = "/orders"
query = { tenant = "${calls.user.header.x-tenant}", mine = "${request.query.mine}" }
into = "orders"
"#;
    let gw = TestGateway::start(
        &cfg(&[("users", users.addr), ("orders", orders.addr)], routes),
        DRIVERS[0],
    );
    for (path, why) in [
        ("/p/1", "null"),
        ("/p/2", "empty"),
        ("/q/1", "null"),
        ("/q/2", "empty"),
        ("/h", "empty"),
        // A value the gateway derived (an answer's header here) that is missing would drop
        // the tenant filter; the client's own parameter may still be empty.
        ("/t/3", "empty"),
    ] {
        let r = get(gw.addr, path);
        assert_eq!(r.status, 502, "{path}: {}", r.text());
        assert_eq!(r.json()["call"], "orders", "{path}");
        assert!(r.text().contains(why), "{path}: {}", r.text());
    }
    assert_eq!(orders.hits(), 0, "{:?}", orders.targets());
    // A value still goes through.
    let r = get(gw.addr, "/p/3");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(gw.addr, "/q/3");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get_with(gw.addr, "/h", "X-User: 9\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        orders.targets(),
        ["/orders/7", "/orders?user_id=7", "/orders/9"]
    );
}

#[test]
fn calls_ask_for_identity_and_a_content_coded_answer_fails_naming_its_coding() {
    // RFC 9110 §12.5.3: without Accept-Encoding any content coding is acceptable, so an origin
    // may gzip; answers are read as JSON text, so calls ask for `identity`, and one encoded
    // all the same fails with its coding named (it was "not JSON (not UTF-8 ...)").
    let plain = Upstream::start(|_| Reply::Raw(json_ok(r#"{"v": 1}"#)));
    // The gzip bytes of `{"v":2}` do not matter: only the header is looked at.
    let gzip = Upstream::start(|_| {
        let body = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xab\x56\x2a\x53\xb2\x32\xaa\x05\x00";
        let mut r = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: GZIP\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        Reply::Raw(r)
    });
    let routes = r#"
[[routes]]
path = "/c"
[routes.compose]
errors_field = true
[[routes.compose.calls]]
id = "plain"
upstream = "plain"
path = "/p"
into = "plain"
[[routes.compose.calls]]
id = "gzip"
upstream = "gzip"
path = "/g"
into = "gzip"
required = false
"#;
    let gw = TestGateway::start(
        &cfg(&[("plain", plain.addr), ("gzip", gzip.addr)], routes),
        DRIVERS[0],
    );
    let r = get_with(gw.addr, "/c", "Accept-Encoding: gzip\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["plain"], json!({"v": 1}));
    assert_eq!(r.header("ringway-partial"), Some("gzip"));
    assert_eq!(
        r.json()["_errors"][0]["reason"],
        "content-coding gzip not supported",
        "{}",
        r.text()
    );
    for up in [&plain, &gzip] {
        assert_eq!(up.last().header("accept-encoding"), Some("identity"));
    }
}

#[test]
fn answers_passed_on_unshaped_are_held_to_the_json_depth_cap() {
    // README "API composition / Limits": JSON nesting is capped (serde_json's 128). An answer
    // written as sent (here only `into`) was validated without that cap: 5000 levels passed
    // with 200 where a deep-merged route gave 502.
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    // 126: under `into`, the composed answer is 127 deep (see
    // `the_composed_answer_nests_no_deeper_than_the_answers_may`).
    let (ok_doc, deep_doc) = (
        deep(126),
        format!(r#"{{"s": "[[[[", "d": {}}}"#, deep(5000)),
    );
    let up = Upstream::start(move |req| {
        let body = if req.target == "/deep" {
            &deep_doc
        } else {
            &ok_doc
        };
        Reply::Raw(json_ok(body))
    });
    let routes = ["ok", "deep"]
        .map(|p| {
            format!(
                "[[routes]]\npath = \"/{p}\"\n[routes.compose]\n[[routes.compose.calls]]\n\
                 id = \"a\"\nupstream = \"up\"\npath = \"/{p}\"\ninto = \"a\"\n\n"
            )
        })
        .concat();
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], &routes), DRIVERS[0]);
    let r = get(gw.addr, "/ok");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(gw.addr, "/deep");
    assert_eq!(r.status, 502, "{}", &r.text()[..200.min(r.body.len())]);
    assert_eq!(r.json()["call"], "a");
    assert!(
        r.text().contains("nested more than 126 levels"),
        "{}",
        r.text()
    );
}

#[test]
fn a_path_with_a_dot_segment_is_refused_at_load() {
    for path in ["/a/../admin", "/a/./b", "/.."] {
        refused(
            &format!("[[routes]]\npath = \"/c\"\n[routes.compose]\n[[routes.compose.calls]]\nid = \"a\"\nupstream = \"u\"\npath = \"{path}\"\n"),
            6,
            "routes[0].compose.calls[0].path",
            "no '.' or '..' segment",
        );
    }
}

#[test]
fn the_last_step_is_not_retried_where_a_get_would_be() {
    // POST is not idempotent (RFC 9110 §9.2.2): a 503 or a reset after it was sent is not
    // retried, under the same policy that retries the GET before it.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let flaky = Upstream::start(move |req| {
        let first = n2.fetch_add(1, Ordering::SeqCst) == 0;
        match (req.method.as_str(), first) {
            ("GET", true) => Reply::Raw(json_status(503, "{}")),
            ("GET", false) => Reply::Raw(json_ok(r#"{"v": 1}"#)),
            _ => Reply::Raw(json_status(503, "{}")),
        }
    });
    let routes = r#"
[[routes]]
path = "/p"
retry = { attempts = 3, on = ["reset", "503"] }
[routes.compose]
[[routes.compose.calls]]
id = "get"
upstream = "flaky"
path = "/g"
into = "get"
[[routes.compose.calls]]
id = "post"
upstream = "flaky"
method = "POST"
path = "/p"
body = '{"v": ${calls.get.body/v}}'
into = "post"
"#;
    let gw = TestGateway::start(&cfg(&[("flaky", flaky.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/p");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["call"], "post", "{}", r.text());
    let targets = flaky.targets();
    assert_eq!(
        targets,
        ["/g", "/g", "/p"],
        "one retry of the GET, none of the POST"
    );
}

/// RFC 8259 §8.1 (JSON text is UTF-8), §8.2 (a lone surrogate is no character), §4 (member
/// names SHOULD be unique: with duplicates, parsers disagree on the value), §6 (a number
/// beyond what implementations can hold), RFC 9110 §8.3 (Content-Type) and §8.4 (content
/// codings): a hostile backend's answer is held to the same rules whether the call shapes it
/// (parsed into a tree) or passes it on as sent. Before, an answer passed on unshaped was
/// only scanned: a lone surrogate or a number out of range reached the client where the
/// shaped call failed, duplicate names reached it as sent where the shaped call kept the
/// last, and neither mode looked at the Content-Type.
#[test]
fn shaped_and_unshaped_calls_hold_a_hostile_answer_to_the_same_rules_rfc8259() {
    let raw = |ct: &str, extra: &str, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\n{ct}{extra}content-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let json = "content-type: application/json\r\n";
    // (answer, passes)
    let cases: Vec<(Vec<u8>, bool)> = vec![
        (raw(json, "", br#"{"v": 1}"#), true),
        (
            raw(
                "content-type: application/json; charset=utf-8\r\n",
                "",
                br#"{"v": 1}"#,
            ),
            true,
        ),
        (
            raw(
                "content-type: Application/Problem+JSON\r\n",
                "",
                br#"{"v": 1}"#,
            ),
            true,
        ),
        (raw("", "", br#"{"v": 1}"#), true),
        (raw(json, "", br#"{"v": "\ud800"}"#), false),
        (raw(json, "", br#"{"v": "\udc00\ud800"}"#), false),
        (raw(json, "", br#"{"v": 1e400}"#), false),
        (raw(json, "", br#"{"v": 1, "v": 2}"#), false),
        (raw(json, "", br#"{"v": {"w": 1, "w": [2]}}"#), false),
        (raw(json, "", br#"{"v": "a", "\u0076": "b"}"#), false),
        (
            raw("content-type: text/html\r\n", "", br#"{"v": 1}"#),
            false,
        ),
        (
            raw("content-type: text/plain\r\n", "", br#"{"v": 1}"#),
            false,
        ),
        (raw(json, "", b"{\"v\": \"\xff\"}"), false),
        (raw(json, "", br#"{"v": 1} x"#), false),
        (raw(json, "", b""), false),
        (
            raw(json, "content-encoding: gzip\r\n", br#"{"v": 1}"#),
            false,
        ),
        (json_status(500, r#"{"v": 1}"#), false),
        (
            raw(
                json,
                "",
                format!(r#"{{"v": "{}"}}"#, "x".repeat(200)).as_bytes(),
            ),
            false,
        ),
        (
            raw(
                json,
                "",
                format!("{{\"v\": {}1{}}}", "[".repeat(127), "]".repeat(127)).as_bytes(),
            ),
            false,
        ),
    ];
    let n = cases.len();
    let answers = Arc::new(cases);
    let a2 = answers.clone();
    let up = Upstream::start(move |req| {
        let i: usize = req.target.trim_start_matches("/h/").parse().unwrap();
        Reply::Raw(a2[i].0.clone())
    });
    let route = |mode: &str, shaping: &str| {
        format!(
            "[[routes]]\npath_regex = \"^/{mode}/(?P<i>[0-9]+)$\"\n[routes.compose]\nmax_call_bytes = 128\n\
             [[routes.compose.calls]]\nid = \"a\"\nupstream = \"up\"\npath = \"/h/${{request.path.i}}\"\n\
             into = \"a\"\n{shaping}\n"
        )
    };
    let routes = route("raw", "") + &route("shaped", "omit = [\"zzz\"]");
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], &routes), DRIVERS[0]);
    for i in 0..n {
        let passes = answers[i].1;
        let raw_r = get(gw.addr, &format!("/raw/{i}"));
        let shaped_r = get(gw.addr, &format!("/shaped/{i}"));
        for (mode, r) in [("raw", &raw_r), ("shaped", &shaped_r)] {
            check_framing(r);
            assert_eq!(
                r.status,
                if passes { 200 } else { 502 },
                "case {i} {mode}: {}",
                r.text()
            );
        }
        let (a, b) = (raw_r.json(), shaped_r.json());
        if passes {
            assert_eq!(a, json!({"a": {"v": 1}}), "case {i}");
            assert_eq!(b, a, "case {i}");
        } else {
            assert_eq!(a["call"], "a", "case {i}");
            assert_eq!(a["message"], b["message"], "case {i}: the same reason");
        }
    }
}

#[test]
fn a_shared_get_cut_short_by_one_calls_timeout_is_made_again_for_a_call_with_time_left() {
    // README "API composition": each call has its own `timeout`, and identical GETs are made
    // once. The call with the short timeout (optional, declared first) made the shared request;
    // when its 100 ms ran out, the required call with the route's 10 s deadline took that
    // timeout as its own answer: 504 naming "main", which had 9.9 s left.
    // The upstream holds the first request until a second one arrives (5 s at most).
    let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
    let a2 = arrived.clone();
    let up = Upstream::start(move |_| {
        let (m, cv) = &*a2;
        let mut n = m.lock().unwrap();
        *n += 1;
        cv.notify_all();
        let _ = cv
            .wait_timeout_while(n, Duration::from_secs(5), |n| *n < 2)
            .unwrap();
        Reply::Raw(json_ok(r#"{"v": 1}"#))
    });
    let routes = r#"
[[routes]]
path = "/shared"
[routes.compose]
[[routes.compose.calls]]
id = "quick"
upstream = "up"
path = "/v"
timeout = "100ms"
required = false
into = "quick"
[[routes.compose.calls]]
id = "main"
upstream = "up"
path = "/v"
into = "main"
[[routes.compose.calls]]
id = "also"
upstream = "up"
path = "/v"
into = "also"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/shared");
    assert_eq!(r.status, 200, "{}", r.text());
    check_framing(&r);
    assert_eq!(r.json(), json!({"main": {"v": 1}, "also": {"v": 1}}));
    assert_eq!(r.header("ringway-partial"), Some("quick"));
    // Made again once, and shared by both calls with time left.
    assert_eq!(up.hits(), 2);
}

#[test]
fn a_call_header_never_doubles_a_field_the_gateway_writes_rfc9110_5_3() {
    // RFC 9110 §5.3: a sender must not generate several field lines of a field that is not
    // a list. A call's `content-type` went out beside the gateway's `application/json`, and
    // a call's `x-request-id`, `traceparent`, `tracestate` or identity header beside the
    // gateway's copy (an upstream reading the first line took the call's).
    let up = json_echo();
    let routes = r#"
[[routes]]
path = "/patch"
[routes.compose]
[[routes.compose.calls]]
id = "p"
upstream = "up"
method = "PATCH"
path = "/p"
headers = { "content-type" = "application/merge-patch+json" }
body = '{"a": 1}'
into = "p"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/patch");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = up.last();
    assert_eq!(
        req.headers_named("content-type"),
        vec!["application/merge-patch+json"]
    );
    assert_eq!(req.headers_named("content-length"), vec!["8"]);
    let route = |name: &str| {
        format!(
            "[[routes]]\npath = \"/c\"\n[routes.compose]\n[[routes.compose.calls]]\nid = \"a\"\n\
             upstream = \"u\"\npath = \"/a\"\nheaders = {{ \"{name}\" = \"v\" }}\n"
        )
    };
    for name in [
        "X-Request-Id",
        "traceparent",
        "tracestate",
        "x_request_id",
        "content_length",
        "Transfer_Encoding",
    ] {
        refused(
            &route(name),
            7,
            "routes[0].compose.calls[0].headers",
            "is set by the gateway",
        );
    }
    let auth = "[auth.jwt.main]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
                forward_claims = { sub = \"x-user-id\" }\n";
    for name in ["x-user-id", "X-Consumer", "x_user_id"] {
        refused(
            &format!("{auth}{}", route(name)),
            10,
            "routes[0].compose.calls[0].headers",
            "identity header",
        );
    }
}

#[test]
fn the_composed_answer_nests_no_deeper_than_the_answers_may() {
    // README "API composition / Limits": an answer may nest 127 levels (serde_json's
    // recursion limit of 128). The composed answer wraps it in more (the root object under
    // `into`, `wrap`, a join's items): an answer 127 deep under `into` gave a 200 whose body
    // serde_json (the gateway's own parser, as a client or as another composition's upstream)
    // refuses as too deep. Each answer, composed or refused, must stay parseable.
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let up = Upstream::start(move |req| {
        let (kind, n) = req.target[1..].split_once('/').unwrap();
        let n: usize = n.parse().unwrap();
        Reply::Raw(json_ok(&match kind {
            "items" => r#"{"items": [{"id": 1}]}"#.to_string(),
            "product" => format!(r#"[{{"id": 1, "d": {}}}]"#, deep(n)),
            _ => deep(n),
        }))
    });
    let routes = r#"
[[routes]]
path_regex = "^/into/(?P<n>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "up"
path = "/doc/${request.path.n}"
into = "a"

[[routes]]
path_regex = "^/wrap/(?P<n>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "up"
path = "/doc/${request.path.n}"
into = "a"
wrap = "w"

[[routes]]
path_regex = "^/join/(?P<n>[0-9]+)$"
[routes.compose]
[[routes.compose.calls]]
id = "src"
upstream = "up"
path = "/items/0"
into = "src"
[[routes.compose.calls]]
id = "p"
upstream = "up"
path = "/product/${request.path.n}"
[routes.compose.calls.for_each]
items = "${calls.src.body/items/*/id}"
join = { key = "id", into = "product" }
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let depth_ok = |r: &Resp| serde_json::from_slice::<Value>(&r.body).is_ok();
    for (route, fits, over) in [("into", 126, 127), ("wrap", 125, 126), ("join", 121, 127)] {
        let r = get(gw.addr, &format!("/{route}/{fits}"));
        assert_eq!(r.status, 200, "{route} {fits}");
        assert!(
            depth_ok(&r),
            "{route} {fits}: the composed answer is too deep to parse"
        );
        let r = get(gw.addr, &format!("/{route}/{over}"));
        assert_eq!(
            r.status,
            502,
            "{route} {over}: {}",
            &r.text()[..200.min(r.body.len())]
        );
        assert!(depth_ok(&r));
        assert!(r.text().contains("nested more than"), "{}", r.text());
    }
}

#[test]
fn an_integer_past_64_bits_is_not_passed_on_rounded_rfc8259_6() {
    // RFC 8259 §6: integers past 2^53 are not exact in a double. serde_json holds one past 64
    // bits as a double: `18446744073709551616` and `...617` both became
    // `1.8446744073709552e19`, so the two ids were de-duplicated into one, fetched as
    // `?id=1.8446744073709552e%2B19`, and the one result joined into both items; a path
    // template sent `/p/1.2345678901234568e%2B29` for 123456789012345678901234567890.
    let up = Upstream::start(|req| {
        Reply::Raw(json_ok(match req.target.as_str() {
            "/src" => {
                r#"{"items": [{"id": 18446744073709551616}, {"id": 18446744073709551617}], "big": 123456789012345678901234567890, "ok": 18446744073709551615}"#
            }
            _ => r#"[{"id": 1, "v": "x"}]"#,
        }))
    });
    let routes = r#"
[[routes]]
path = "/c"
[routes.compose]
errors_field = true
[[routes.compose.calls]]
id = "src"
upstream = "up"
path = "/src"
pick = ["ok"]
into = "src"
[[routes.compose.calls]]
id = "each"
upstream = "up"
path = "/each"
required = false
into = "each"
[routes.compose.calls.for_each]
items = "${calls.src.body/items/*/id}"
batch = 10
batch_param = "id"
[[routes.compose.calls]]
id = "path"
upstream = "up"
path = "/p/${calls.src.body/big}"
required = false
into = "path"
[[routes.compose.calls]]
id = "exact"
upstream = "up"
path = "/e/${calls.src.body/ok}"
into = "exact"
[[routes.compose.calls]]
id = "body"
upstream = "up"
method = "POST"
path = "/b"
body = '{"items": ${calls.src.body/items}}'
required = false
into = "body"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/c");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("ringway-partial"),
        Some("each,path,body"),
        "{}",
        r.text()
    );
    let j = r.json();
    for e in j["_errors"].as_array().unwrap() {
        assert!(e["reason"].as_str().unwrap().contains("RFC 8259 §6"), "{e}");
    }
    // A 64-bit integer is exact, and goes on as written.
    assert!(up
        .targets()
        .contains(&"/e/18446744073709551615".to_string()));
    assert!(
        !up.targets().iter().any(|t| t.contains("e%2B") || t == "/b"),
        "{:?}",
        up.targets()
    );
}

#[test]
fn errors_field_owns_the_errors_member() {
    // README "Failures": with `errors_field = true` the answer lists failed calls in
    // `_errors`. An answer merged at the root with its own `_errors` member passed it on as
    // the gateway's list when no call failed (`{"_errors": "upstream's", "u": 1}`), and was
    // silently replaced by the list when one did.
    let up = Upstream::start(|req| {
        Reply::Raw(match req.target.as_str() {
            "/own" => json_ok(r#"{"_errors": ["upstream's"], "u": 1}"#),
            "/plain" => json_ok(r#"{"p": 1}"#),
            _ => json_status(500, "{}"),
        })
    });
    let routes = r#"
[[routes]]
path = "/e"
[routes.compose]
errors_field = true
[[routes.compose.calls]]
id = "own"
upstream = "up"
path = "/own"
required = false
[[routes.compose.calls]]
id = "plain"
upstream = "up"
path = "/plain"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/e");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("ringway-partial"), Some("own"));
    let j = r.json();
    assert_eq!(j["p"], 1);
    assert_eq!(j["_errors"][0]["call"], "own", "{j}");
    assert!(j.get("u").is_none(), "{j}");
    let route = |more: &str| {
        format!(
            "[[routes]]\npath = \"/c\"\n[routes.compose]\nerrors_field = true\n\
             [[routes.compose.calls]]\nid = \"a\"\nupstream = \"u\"\npath = \"/a\"\n{more}"
        )
    };
    refused(
        &route("into = \"_errors\"\n"),
        8,
        "routes[0].compose.calls[0].into",
        "errors_field",
    );
    refused(
        &route("required = false\nfallback = { _errors = 1 }\n"),
        9,
        "routes[0].compose.calls[0].fallback",
        "errors_field",
    );
}

#[test]
fn route_response_headers_decide_the_fields_they_name_rfc9110_5_3() {
    // A route's `response_headers` decide a field they name, as on a proxied answer. On a
    // composed answer they were added after the gateway's own lines: `set content-type`
    // gave two Content-Type lines (the gateway's application/json first), `set` of
    // ringway-partial or date a second line, and `remove = ["ringway-partial"]` removed nothing.
    let up = Upstream::start(|req| {
        Reply::Raw(match req.target.as_str() {
            "/a" => json_ok(r#"{"a": 1}"#),
            _ => json_status(500, "{}"),
        })
    });
    let routes = r#"
[[routes]]
path = "/set"
response_headers = { set = { "content-type" = "application/hal+json", "ringway-partial" = "hidden", "date" = "Thu, 01 Jan 2026 00:00:00 GMT" } }
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "up"
path = "/a"
into = "a"
[[routes.compose.calls]]
id = "b"
upstream = "up"
path = "/b"
required = false
into = "b"

[[routes]]
path = "/remove"
response_headers = { remove = ["ringway-partial"] }
[routes.compose]
[[routes.compose.calls]]
id = "b"
upstream = "up"
path = "/b"
required = false
into = "b"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/set");
    assert_eq!(r.status, 200, "{}", r.text());
    let named = |r: &Resp, n: &str| {
        r.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(named(&r, "content-type"), vec!["application/hal+json"]);
    assert_eq!(named(&r, "ringway-partial"), vec!["hidden"]);
    assert_eq!(named(&r, "date"), vec!["Thu, 01 Jan 2026 00:00:00 GMT"]);
    assert_eq!(r.json(), json!({"a": {"a": 1}}));
    let r = get(gw.addr, "/remove");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(named(&r, "ringway-partial").is_empty(), "{r:?}");
    check_framing(&r);
}

#[test]
fn a_reference_inside_a_json_string_of_a_body_is_refused_at_load() {
    // README "Calls": a value goes in a body as JSON. `body = '{"q": "${request.query.q}"}'`
    // passed the load check (`null` in place of each reference leaves `"null"`, a string)
    // and sent `{"q": ""abc""}`, invalid JSON, with every request.
    let route = |body: &str| {
        format!(
            "[[routes]]\npath = \"/c\"\n[routes.compose]\n[[routes.compose.calls]]\nid = \"p\"\n\
             upstream = \"u\"\nmethod = \"POST\"\npath = \"/p\"\nbody = '{body}'\n"
        )
    };
    for body in [
        r#"{"q": "${request.query.q}"}"#,
        r#"{"n": "id-${request.query.n}"}"#,
        r#"["${request.header.x}"]"#,
    ] {
        refused(
            &route(body),
            8,
            "routes[0].compose.calls[0].body",
            "a reference inside a JSON string",
        );
    }
    // Written alone, the reference gives a JSON value: the body the upstream gets parses.
    let up = json_echo();
    let gw = TestGateway::start(
        &cfg(
            &[("u", up.addr)],
            &route(r#"{"q": ${request.query.q}, "lit": "$${x}"}"#),
        ),
        DRIVERS[0],
    );
    let r = get(gw.addr, "/c?q=a%22b");
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: Value = serde_json::from_slice(&up.last().body).expect("the body is JSON");
    assert_eq!(sent, json!({"q": "a\"b", "lit": "${x}"}));
}

#[test]
fn a_plus_in_the_client_query_is_a_space_as_a_form_decoder_reads_it() {
    // `${request.query.q}` decoded only `%XX`: `?q=two+words` went on as `q=two%2Bwords`, a
    // literal `+`, where a proxied request's upstream (and the gateway's own API key stage,
    // README "API keys") reads `two words` (application/x-www-form-urlencoded).
    let up = json_echo();
    let routes = r#"
[[routes]]
path = "/s"
[routes.compose]
[[routes.compose.calls]]
id = "s"
upstream = "up"
path = "/search"
query = { q = "${request.query.q}" }
headers = { "x-q" = "${request.query.my_q}" }
into = "s"
"#;
    let gw = TestGateway::start(&cfg(&[("up", up.addr)], routes), DRIVERS[0]);
    let r = get(gw.addr, "/s?q=two+words%2B1&my%5Fq=a+b");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = up.last();
    assert_eq!(req.target, "/search?q=two%20words%2B1");
    assert_eq!(req.header("x-q"), Some("a b"));
}
