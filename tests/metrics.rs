//! Metrics over real sockets: requests that end every way (proxied, no route, upstream
//! refused, rate-limited, auth refused) show up as exact counts in the rendered Prometheus
//! text, which parses by the format's line grammar.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ringway::control::Control;
use ringway::metrics::prom::{check_exposition, render_prometheus, Line};
use support::*;

/// Sends one request on its own connection (`Connection: close`) and returns every byte the
/// gateway sent back.
fn exchange(addr: SocketAddr, raw: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to the close");
    out
}

fn status_of(resp: &[u8]) -> u16 {
    std::str::from_utf8(&resp[9..12]).unwrap().parse().unwrap()
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: m.test\r\nConnection: close\r\n\r\n")
}

fn scrape(ctl: &Control) -> (String, Vec<Line>) {
    let mut out = String::new();
    render_prometheus(ctl, &mut out).expect("every worker answers");
    let lines = check_exposition(&out).unwrap_or_else(|e| panic!("{e}\n{out}"));
    (out, lines)
}

/// A sample's name, its exact labels and its expected value.
type Expect<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// The value of the sample `name` whose labels are exactly `labels` (0 when absent).
fn value(lines: &[Line], name: &str, labels: &[(&str, &str)]) -> f64 {
    lines
        .iter()
        .find(|l| {
            l.name == name
                && l.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.labels.iter().any(|(a, b)| a == k && b == v))
        })
        .map_or(0.0, |l| l.value)
}

#[test]
fn every_kind_of_ending_is_counted_exactly() {
    for driver in DRIVERS {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"hello")));
        let dead = refusing_addr();
        let toml = format!(
            r#"[[listeners]]
address = "127.0.0.1:0"
name = "main"

[upstreams.up]
endpoints = [{{ address = "{}" }}]

[upstreams.down]
endpoints = [{{ address = "{}" }}]

[auth.api_key]
query = "api_key"

[[consumers]]
name = "batch"
api_keys = ["{}"]

[[routes]]
name = "ok"
path_prefix = "/ok"
upstream = "up"

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "down"

[[routes]]
name = "limited"
path_prefix = "/limited"
upstream = "up"
rate_limits = [{{ key = "route", rate = 2, per = "1m" }}]

[[routes]]
name = "key"
path_prefix = "/key"
upstream = "up"
auth = "api_key"
"#,
            up.addr,
            dead.addr,
            ringway::auth::apikey::key_hash_hex(b"batch-key-1")
        );
        let gw = TestGateway::start(&toml, driver);
        let ctl = gw.gateway().control().clone();

        let mut ok_in = 0u64;
        let mut ok_out = 0u64;
        for _ in 0..3 {
            let req = get_req("/ok/x");
            let resp = exchange(gw.addr, &req);
            assert_eq!(status_of(&resp), 200, "{driver:?}");
            ok_in += req.len() as u64;
            ok_out += resp.len() as u64;
        }
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/nowhere"))), 404);
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/dead"))), 502);
        let limited: Vec<u16> = (0..3)
            .map(|_| status_of(&exchange(gw.addr, &get_req("/limited"))))
            .collect();
        assert_eq!(limited, [200, 200, 429]);
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/key"))), 401);
        assert_eq!(
            status_of(&exchange(gw.addr, &get_req("/key?api_key=batch-key-1"))),
            200
        );

        // A request's counters are added just after its response is written: wait for the
        // last one, then every figure must be exact.
        let total = 10.0;
        let mut last = (String::new(), Vec::new());
        assert!(
            eventually(Duration::from_secs(5), || {
                last = scrape(&ctl);
                let n: f64 = last
                    .1
                    .iter()
                    .filter(|l| l.name == "ringway_route_requests_total")
                    .map(|l| l.value)
                    .sum();
                n == total
                    && value(
                        &last.1,
                        "ringway_listener_connections_open",
                        &[("listener", "main")],
                    ) == 0.0
            }),
            "{driver:?}: the counts never reached {total}:\n{}",
            last.0
        );
        let (text, l) = last;
        let req = "ringway_route_requests_total";
        let err = "ringway_route_errors_total";
        let cases: &[Expect] = &[
            (req, &[("route", "ok"), ("class", "2xx")], 3.0),
            (req, &[("route", "ok"), ("class", "5xx")], 0.0),
            (req, &[("route", "(none)"), ("class", "4xx")], 1.0),
            (err, &[("route", "(none)"), ("kind", "no_route")], 1.0),
            (req, &[("route", "dead"), ("class", "5xx")], 1.0),
            (
                err,
                &[("route", "dead"), ("kind", "upstream_connect_failed")],
                1.0,
            ),
            (req, &[("route", "limited"), ("class", "2xx")], 2.0),
            (req, &[("route", "limited"), ("class", "4xx")], 1.0),
            (err, &[("route", "limited"), ("kind", "rate_limited")], 1.0),
            (
                "ringway_route_rate_limit_refusals_total",
                &[("route", "limited")],
                1.0,
            ),
            (
                "ringway_route_rate_limit_refusals_total",
                &[("route", "ok")],
                0.0,
            ),
            (req, &[("route", "key"), ("class", "4xx")], 1.0),
            (req, &[("route", "key"), ("class", "2xx")], 1.0),
            (
                "ringway_route_auth_refusals_total",
                &[("route", "key"), ("reason", "unauthorized")],
                1.0,
            ),
            (
                "ringway_route_auth_refusals_total",
                &[("route", "ok"), ("reason", "unauthorized")],
                0.0,
            ),
            // Per upstream group: only requests that reached the upstream phase.
            (
                "ringway_upstream_requests_total",
                &[("upstream", "up"), ("class", "2xx")],
                6.0,
            ),
            (
                "ringway_upstream_requests_total",
                &[("upstream", "down"), ("class", "5xx")],
                1.0,
            ),
            (
                "ringway_upstream_errors_total",
                &[("upstream", "down"), ("kind", "upstream_connect_failed")],
                1.0,
            ),
            (
                "ringway_endpoint_connect_failures_total",
                &[("upstream", "down"), ("endpoint", &dead.addr.to_string())],
                1.0,
            ),
            (
                "ringway_endpoint_connect_failures_total",
                &[("upstream", "up"), ("endpoint", &up.addr.to_string())],
                0.0,
            ),
            (
                "ringway_endpoint_healthy",
                &[("upstream", "up"), ("endpoint", &up.addr.to_string())],
                1.0,
            ),
            (
                "ringway_route_request_duration_seconds_count",
                &[("route", "ok")],
                3.0,
            ),
            (
                "ringway_route_upstream_duration_seconds_count",
                &[("route", "ok")],
                3.0,
            ),
            (
                "ringway_route_gateway_duration_seconds_count",
                &[("route", "ok")],
                3.0,
            ),
            // A failed upstream phase has its latency too.
            (
                "ringway_route_upstream_duration_seconds_count",
                &[("route", "dead")],
                1.0,
            ),
            // No upstream phase, no upstream latency.
            (
                "ringway_route_upstream_duration_seconds_count",
                &[("route", "(none)")],
                0.0,
            ),
            (
                "ringway_route_request_duration_seconds_bucket",
                &[("route", "ok"), ("le", "+Inf")],
                3.0,
            ),
            (
                "ringway_route_received_bytes_total",
                &[("route", "ok")],
                ok_in as f64,
            ),
            (
                "ringway_route_sent_bytes_total",
                &[("route", "ok")],
                ok_out as f64,
            ),
            (
                "ringway_listener_connections_accepted_total",
                &[("listener", "main")],
                10.0,
            ),
            ("ringway_workers", &[], 1.0),
            ("ringway_metrics_enabled", &[], 1.0),
        ];
        for (name, labels, want) in cases {
            assert_eq!(
                value(&l, name, labels),
                *want,
                "{driver:?}: {name} {labels:?}\n{text}"
            );
        }
        // The upstream never saw the refused requests.
        assert_eq!(up.hits(), 6);
    }
}

/// A cached route's fetch that fails has its upstream latency too, as a route without a cache
/// has (the request's count and the upstream phase's latency come together).
#[test]
fn a_cached_route_s_failed_fetch_has_its_upstream_latency() {
    let dead = refusing_addr();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"hi")));
    let toml = config(
        &[up.addr],
        &format!(
            "[upstreams.down]\nendpoints = [{{ address = \"{}\" }}]\n\
             [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\nupstream = \"down\"\ncache = {{ }}\n",
            dead.addr
        ),
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/dead/x"))), 502);
    let mut l = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        l = scrape(&ctl).1;
        value(
            &l,
            "ringway_route_requests_total",
            &[("route", "dead"), ("class", "5xx")],
        ) == 1.0
    }));
    assert_eq!(
        value(
            &l,
            "ringway_route_upstream_duration_seconds_count",
            &[("route", "dead")]
        ),
        1.0
    );
}

#[test]
fn workers_are_summed_when_scraped() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"hi")));
    let toml = config(
        &[up.addr],
        "[server]\nworkers = 3\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n",
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    // New connections spread over the workers (SO_REUSEPORT); the sum is what counts.
    let n = 30;
    for _ in 0..n {
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    }
    let mut l = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        l = scrape(&ctl).1;
        value(
            &l,
            "ringway_route_requests_total",
            &[("route", "all"), ("class", "2xx")],
        ) == n as f64
    }));
    assert_eq!(value(&l, "ringway_workers", &[]), 3.0);
    assert_eq!(
        value(
            &l,
            "ringway_upstream_requests_total",
            &[("upstream", "up"), ("class", "2xx")]
        ),
        n as f64
    );
}

#[test]
fn metrics_off_counts_no_requests_but_still_renders() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"hi")));
    let toml = config(
        &[up.addr],
        "[metrics]\nenabled = false\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n",
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    let (_, l) = scrape(gw.gateway().control());
    assert_eq!(value(&l, "ringway_metrics_enabled", &[]), 0.0);
    assert_eq!(
        value(
            &l,
            "ringway_route_requests_total",
            &[("route", "all"), ("class", "2xx")]
        ),
        0.0
    );
    // Gauges read when scraped are still there.
    assert_eq!(
        value(
            &l,
            "ringway_endpoint_healthy",
            &[("upstream", "up"), ("endpoint", &up.addr.to_string())]
        ),
        1.0
    );
}

/// A route named `(none)` would share the series of requests that match no route (summed into
/// one sample with them); refused at load, with its position, like any bad name.
#[test]
fn a_route_named_like_the_unmatched_label_is_refused() {
    let up = Upstream::echo();
    let toml = config(
        &[up.addr],
        "[[routes]]\nname = \"(none)\"\npath = \"/a\"\nupstream = \"up\"\n",
    );
    let e = ringway::config::Config::parse(&toml, "m.toml").unwrap_err();
    assert_eq!(e.key, "routes[0].name", "{e}");
    assert!(e.reason.contains("match no route"), "{e}");
    // So `(none)` is only ever the label of requests that matched no route.
    let ok = config(
        &[up.addr],
        "[[routes]]\nname = \"a\"\npath = \"/a\"\nupstream = \"up\"\n",
    );
    let gw = TestGateway::start(&ok, DRIVERS[0]);
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/zz"))), 404);
    let (text, l) = scrape(gw.gateway().control());
    let class = |route: &str, class: &str| {
        value(
            &l,
            "ringway_route_requests_total",
            &[("route", route), ("class", class)],
        )
    };
    assert_eq!(
        (class("a", "2xx"), class("(none)", "4xx")),
        (1.0, 1.0),
        "{text}"
    );
}

#[test]
fn a_bad_metrics_key_is_refused_with_its_position() {
    let e = ringway::config::Config::parse(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[metrics]\nenabled = \"yes\"\n",
        "m.toml",
    )
    .unwrap_err();
    assert_eq!(e.file, "m.toml");
    assert_eq!(e.line, Some(4));
    assert_eq!(e.key, "metrics.enabled");
    let e = ringway::config::Config::parse(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[metrics]\nenable = true\n",
        "m.toml",
    )
    .unwrap_err();
    assert!(e.reason.contains("unknown field `enable`"), "{e}");
}

#[test]
fn retries_budget_refusals_and_breaker_changes_are_counted() {
    let up = Upstream::start(|_| {
        Reply::Raw(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec())
    });
    let dead = refusing_addr();
    let toml = format!(
        r#"[[listeners]]
address = "127.0.0.1:0"

[upstreams.busy]
endpoints = [{{ address = "{}" }}]

[upstreams.gone]
endpoints = [{{ address = "{}" }}]
circuit_breaker = {{ error_rate = 0.5, min_requests = 2, open_for = "30s" }}

[[routes]]
name = "retried"
path_prefix = "/busy"
upstream = "busy"
retry = {{ attempts = 2, on = ["503"], backoff_base = "1ms", backoff_max = "1ms", budget_percent = 20, min_retries_per_second = 0 }}

[[routes]]
name = "broken"
path_prefix = "/gone"
upstream = "gone"
"#,
        up.addr, dead.addr
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    let n = 20u64;
    for _ in 0..n {
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/busy"))), 503);
    }
    let statuses: Vec<u16> = (0..3)
        .map(|_| status_of(&exchange(gw.addr, &get_req("/gone"))))
        .collect();
    assert_eq!(
        statuses,
        [502, 502, 503],
        "the breaker opens after two failures"
    );
    let mut l = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        l = scrape(&ctl).1;
        value(
            &l,
            "ringway_route_requests_total",
            &[("route", "broken"), ("class", "5xx")],
        ) == 3.0
            && value(
                &l,
                "ringway_route_requests_total",
                &[("route", "retried"), ("class", "5xx")],
            ) == n as f64
    }));
    // Each request was eligible for one retry (two attempts): taken or refused by the budget.
    let retries = value(&l, "ringway_route_retries_total", &[("route", "retried")]);
    let refused = value(
        &l,
        "ringway_route_retry_budget_refusals_total",
        &[("route", "retried")],
    );
    assert_eq!(
        retries,
        (up.hits() as u64 - n) as f64,
        "retries seen upstream"
    );
    assert_eq!(retries + refused, n as f64);
    assert!(retries > 0.0 && refused > 0.0, "{retries} {refused}");
    assert_eq!(
        value(
            &l,
            "ringway_upstream_retries_total",
            &[("upstream", "busy")]
        ),
        retries
    );
    let st = |s: &str| {
        value(
            &l,
            "ringway_upstream_breaker_state",
            &[("upstream", "gone"), ("state", s)],
        )
    };
    assert_eq!((st("closed"), st("open"), st("half_open")), (0.0, 1.0, 0.0));
    assert_eq!(
        value(
            &l,
            "ringway_upstream_breaker_transitions_total",
            &[("upstream", "gone"), ("state", "open")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &l,
            "ringway_route_errors_total",
            &[("route", "broken"), ("kind", "circuit_open")]
        ),
        1.0
    );
}

#[test]
fn the_redis_link_is_exposed() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let mut redis = RedisServer::start();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [upstreams.u]\nendpoints = [{{ address = \"{}\" }}]\n\
         [rate_limiting]\nbackend = \"redis\"\n\
         [rate_limiting.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"50ms\"\nretry_interval = \"200ms\"\non_failure = \"local\"\n\
         [[routes]]\nname = \"api\"\nupstream = \"u\"\nrate_limits = [{{ key = \"route\", rate = 100, per = \"1m\" }}]\n",
        up.addr, redis.port
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    for _ in 0..3 {
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/"))), 200);
    }
    let mut l = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        l = scrape(&ctl).1;
        let (calls, trips) = gw.gateway().redis_counts();
        value(&l, "ringway_redis_up", &[]) == 1.0
            && trips > 0
            && value(&l, "ringway_redis_round_trips_total", &[]) == trips as f64
            && value(&l, "ringway_redis_commands_total", &[]) == calls as f64
            && value(&l, "ringway_redis_demands_refused_total", &[]) == 0.0
    }));
    // The link goes down with the server.
    redis.kill();
    assert!(eventually(Duration::from_secs(5), || {
        let _ = exchange(gw.addr, &get_req("/"));
        value(&scrape(&ctl).1, "ringway_redis_up", &[]) == 0.0
    }));
}

/// The cache's Redis link (`[cache.redis]`) has metrics of its own, `ringway_cache_redis_*`,
/// apart from the rate limiter's link (`ringway_redis_*`, absent here): up, commands, round
/// trips, failures, commands refused, and the layer's lookups, entries found and writes.
/// Before, nothing showed that link's state, failures or traffic.
#[test]
fn the_cache_redis_link_is_exposed() {
    let up = Upstream::start(|_| {
        Reply::Raw(
            b"HTTP/1.1 200 OK\r\ncache-control: max-age=600\r\ncontent-length: 2\r\n\r\nok"
                .to_vec(),
        )
    });
    let mut redis = RedisServer::start();
    let toml = config(
        &[up.addr],
        &format!(
            "[cache.redis]\naddress = \"127.0.0.1:{}\"\ntimeout = \"1s\"\nretry_interval = \"100ms\"\n\n\
             [[routes]]\nupstream = \"up\"\ncache = {{ }}\n",
            redis.port
        ),
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    // A miss: looked up in Redis, fetched, stored and written to Redis.
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    let mut l = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            l = scrape(&ctl).1;
            value(&l, "ringway_cache_redis_up", &[]) == 1.0
                && value(&l, "ringway_cache_redis_lookups_total", &[]) >= 1.0
                && value(&l, "ringway_cache_redis_writes_total", &[]) >= 1.0
                && value(&l, "ringway_cache_redis_commands_total", &[]) >= 2.0
                && value(&l, "ringway_cache_redis_round_trips_total", &[]) >= 1.0
        }),
        "{l:?}"
    );
    assert_eq!(value(&l, "ringway_cache_redis_failures_total", &[]), 0.0);
    assert_eq!(
        value(&l, "ringway_cache_redis_commands_refused_total", &[]),
        0.0
    );
    assert_eq!(value(&l, "ringway_cache_redis_found_total", &[]), 0.0);
    // The purge log's counters (issue 12): nothing read, no gap.
    assert!(l
        .iter()
        .any(|x| x.name == "ringway_cache_redis_purges_heard_total"));
    assert_eq!(
        value(&l, "ringway_cache_redis_purge_log_gaps_total", &[]),
        0.0
    );
    assert_eq!(
        value(&l, "ringway_cache_redis_purge_log_errors_total", &[]),
        0.0
    );
    assert!(
        l.iter().all(|x| !x.name.starts_with("ringway_redis_")),
        "no rate-limit link here"
    );
    // The link goes down with the server, and its failure is counted.
    redis.kill();
    let mut i = 0;
    assert!(eventually(Duration::from_secs(5), || {
        i += 1;
        let _ = exchange(gw.addr, &get_req(&format!("/b{i}")));
        let l = scrape(&ctl).1;
        value(&l, "ringway_cache_redis_up", &[]) == 0.0
            && value(&l, "ringway_cache_redis_failures_total", &[]) >= 1.0
    }));
}

#[test]
fn ejections_health_in_flight_and_pools_per_endpoint() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let dead = refusing_addr();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\
         [upstreams.pair]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\n\
         outlier = {{ consecutive_failures = 2, base_ejection_time = \"30s\" }}\n\
         [[routes]]\nupstream = \"pair\"\n",
        dead.addr, up.addr
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    // Round robin: the dead endpoint fails every other request until its second failure
    // ejects it; then every request goes to the live one.
    let mut c = Client::connect(gw.addr);
    let mut fails = 0;
    for _ in 0..8 {
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        if c.read_response().expect("answer").status == 502 {
            fails += 1;
        }
    }
    assert_eq!(fails, 2);
    let dead_ep = dead.addr.to_string();
    let live_ep = up.addr.to_string();
    let mut l = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        l = scrape(&ctl).1;
        value(
            &l,
            "ringway_upstream_requests_total",
            &[("upstream", "pair"), ("class", "2xx")],
        ) == 6.0
    }));
    let ep = |name: &str, e: &str| value(&l, name, &[("upstream", "pair"), ("endpoint", e)]);
    assert_eq!(ep("ringway_endpoint_ejections_total", &dead_ep), 1.0);
    assert_eq!(ep("ringway_endpoint_connect_failures_total", &dead_ep), 2.0);
    assert_eq!(ep("ringway_endpoint_healthy", &dead_ep), 0.0);
    assert_eq!(ep("ringway_endpoint_healthy", &live_ep), 1.0);
    assert_eq!(ep("ringway_endpoint_ejections_total", &live_ep), 0.0);
    // Nothing in flight between requests; the live endpoint's connection is pooled.
    assert_eq!(ep("ringway_endpoint_in_flight", &live_ep), 0.0);
    assert_eq!(ep("ringway_endpoint_pool_idle", &live_ep), 1.0);
    assert_eq!(
        value(
            &l,
            "ringway_upstream_connections_open",
            &[("upstream", "pair")]
        ),
        1.0
    );
}

/// A reload that reorders routes and adds one: each route's counters follow its name, the new
/// route starts at zero and is counted, and a kept group keeps its counts.
#[test]
fn counters_follow_routes_by_name_across_a_reload() {
    let up = Upstream::echo();
    let routes = |order: &[&str]| {
        let mut t = String::new();
        for name in order {
            t.push_str(&format!(
                "[[routes]]\nname = \"{name}\"\npath = \"/{name}\"\nupstream = \"up\"\n\n"
            ));
        }
        config(&[up.addr], &t)
    };
    let gw = TestGateway::start(&routes(&["a", "b"]), ringway::config::DriverChoice::Auto);
    for p in ["/a", "/a", "/b"] {
        assert_eq!(status_of(&exchange(gw.addr, &get_req(p))), 200);
    }
    let next = ringway::config::Config::parse(&routes(&["c", "b", "a"]), "m.toml").unwrap();
    gw.gateway().reload(next).expect("the reload applies");
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/c"))), 200);
    let (text, lines) = scrape(gw.gateway().control());
    let ok = |route: &str| {
        value(
            &lines,
            "ringway_route_requests_total",
            &[("route", route), ("class", "2xx")],
        )
    };
    assert_eq!((ok("a"), ok("b"), ok("c")), (2.0, 1.0, 1.0), "{text}");
    let group = value(
        &lines,
        "ringway_upstream_requests_total",
        &[("upstream", "up"), ("class", "2xx")],
    );
    assert_eq!(group, 4.0, "{text}");
}

/// A reload that changes a group (adds an endpoint, then takes it away again) keeps the
/// group's counters and each kept endpoint's: Prometheus counters only go up while the
/// process runs (a reset reads as a restart). Before, a changed group moved to its other hub
/// slot and showed that slot's counts: zero the first time, then the counts of the group as
/// it was two reloads ago, and an endpoint the counts of whichever endpoint had its index.
#[test]
fn a_changed_group_keeps_its_counters_and_its_endpoints_theirs() {
    let (d1, d2) = (refusing_addr(), refusing_addr());
    let cfg = |eps: &[SocketAddr]| {
        config(
            eps,
            "[server]\nworkers = 1\n[[routes]]\nname = \"r\"\nupstream = \"up\"\n",
        )
        .replace(
            "[[listeners]]",
            "[upstreams.up.outlier]\nconsecutive_failures = 0\n\n[[listeners]]",
        )
    };
    let gw = TestGateway::start(&cfg(&[d1.addr]), ringway::config::DriverChoice::Auto);
    let fail = |n: usize| {
        for _ in 0..n {
            assert_eq!(status_of(&exchange(gw.addr, &get_req("/"))), 502);
        }
    };
    let counts = || {
        let (text, l) = scrape(gw.gateway().control());
        let failures = |ep: SocketAddr| {
            value(
                &l,
                "ringway_endpoint_connect_failures_total",
                &[("upstream", "up"), ("endpoint", &ep.to_string())],
            )
        };
        let req = value(
            &l,
            "ringway_upstream_requests_total",
            &[("upstream", "up"), ("class", "5xx")],
        );
        (req, failures(d1.addr), failures(d2.addr), text)
    };
    fail(3);
    let reload = |eps: &[SocketAddr]| {
        let next = ringway::config::Config::parse(&cfg(eps), "m.toml").unwrap();
        let rep = gw.gateway().reload(next).expect("the reload applies");
        assert_eq!(rep.groups_changed, vec!["up".to_string()]);
    };
    // Changed: d2 added in front of d1.
    reload(&[d2.addr, d1.addr]);
    let (req, f1, f2, text) = counts();
    assert_eq!((req, f1, f2), (3.0, 3.0, 0.0), "{text}");
    fail(2);
    let (req, f1, f2, text) = counts();
    assert_eq!(req, 5.0, "{text}");
    assert_eq!(f1 + f2, 5.0, "{text}");
    // Changed back: d1 alone keeps its own count, the group its total.
    reload(&[d1.addr]);
    let (req2, f1b, _, text) = counts();
    assert_eq!((req2, f1b), (5.0, f1), "{text}");
    // Removed, then configured again: it starts at zero, as a route does (its counts went
    // with it), whichever slot it lands in.
    let direct = cfg(&[d1.addr])
        .replace("[upstreams.up.outlier]\nconsecutive_failures = 0\n", "")
        .replace("[upstreams.up]", "[upstreams.other]")
        .replace("upstream = \"up\"", "direct = { status = 204 }");
    let next = ringway::config::Config::parse(&direct, "m.toml").unwrap();
    gw.gateway().reload(next).expect("the reload applies");
    for _ in 0..2 {
        let next = ringway::config::Config::parse(&cfg(&[d1.addr]), "m.toml").unwrap();
        gw.gateway().reload(next).expect("the reload applies");
        let (req, f1, _, text) = counts();
        assert_eq!((req, f1), (0.0, 0.0), "{text}");
        let next = ringway::config::Config::parse(&direct, "m.toml").unwrap();
        gw.gateway().reload(next).expect("the reload applies");
    }
}

/// A listener that a reload adds is counted under its own name; the kept one keeps its counts.
#[test]
fn a_listener_added_by_a_reload_is_counted() {
    let up = Upstream::echo();
    let listeners = |extra: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"main\"\n{extra}\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nupstream = \"up\"\n",
            up.addr
        )
    };
    let gw = TestGateway::start(&listeners(""), ringway::config::DriverChoice::Auto);
    assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    let next = ringway::config::Config::parse(
        &listeners("\n[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"extra\"\n"),
        "m.toml",
    )
    .unwrap();
    let rep = gw.gateway().reload(next).expect("the reload applies");
    let added = rep
        .listeners
        .iter()
        .find(|l| l.change == ringway::reload::ListenerFate::Added)
        .expect("a listener was added")
        .bound;
    for _ in 0..2 {
        assert_eq!(status_of(&exchange(added, &get_req("/b"))), 200);
    }
    let (text, lines) = scrape(gw.gateway().control());
    let accepted = |name: &str| {
        value(
            &lines,
            "ringway_listener_connections_accepted_total",
            &[("listener", name)],
        )
    };
    assert_eq!((accepted("main"), accepted("extra")), (1.0, 2.0), "{text}");
}

/// `GET /metrics` on the admin listener, checked by the format's grammar.
fn scrape_admin(admin: SocketAddr, accept: Option<&str>) -> (Resp, String) {
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let r = request(
        admin,
        format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    (r, text)
}

/// Issue 11: a composition's sub-requests are counted in their upstream groups' metrics, as
/// proxied requests are (status class, error kind, latency, bytes); the client request is
/// counted once, by its route, and in no group.
#[test]
fn composition_sub_requests_are_counted_by_their_groups() {
    let json = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let users = Upstream::start(move |_| Reply::Raw(json(r#"{"name": "Ada"}"#)));
    let refusing = refusing_addr();
    let toml = format!(
        r#"[[listeners]]
address = "127.0.0.1:0"

[upstreams.users]
endpoints = [{{ address = "{users}" }}]

[upstreams.pictures]
endpoints = [{{ address = "{refusing}" }}]

[admin]
address = "127.0.0.1:0"

[[routes]]
name = "profile"
path = "/profile"
[routes.compose]
[[routes.compose.calls]]
id = "user"
upstream = "users"
path = "/u"
into = "user"
[[routes.compose.calls]]
id = "pictures"
upstream = "pictures"
path = "/p"
into = "pictures"
required = false
"#,
        users = users.addr,
        refusing = refusing.addr
    );
    for driver in DRIVERS {
        let gw = TestGateway::start(&toml, driver);
        let admin = gw.gateway().admin_addr().expect("the admin API runs");
        for _ in 0..2 {
            assert_eq!(status_of(&exchange(gw.addr, &get_req("/profile"))), 200);
        }
        let (_, text) = scrape_admin(admin, None);
        let lines = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let v = |name: &str, labels: &[(&str, &str)]| value(&lines, name, labels);
        let req = "ringway_upstream_requests_total";
        assert_eq!(
            v(req, &[("upstream", "users"), ("class", "2xx")]),
            2.0,
            "{text}"
        );
        assert_eq!(
            v(req, &[("upstream", "pictures"), ("class", "5xx")]),
            2.0,
            "{text}"
        );
        assert_eq!(
            v(
                "ringway_upstream_errors_total",
                &[
                    ("upstream", "pictures"),
                    ("kind", "upstream_connect_failed")
                ]
            ),
            2.0,
            "{text}"
        );
        assert_eq!(
            v(
                "ringway_upstream_upstream_duration_seconds_count",
                &[("upstream", "users")]
            ),
            2.0,
            "{text}"
        );
        assert_eq!(
            v(
                "ringway_upstream_request_duration_seconds_count",
                &[("upstream", "users")]
            ),
            2.0,
            "{text}"
        );
        // Bytes: the sub-request's head went out, the answer's head and body came back.
        assert!(
            v(
                "ringway_upstream_received_bytes_total",
                &[("upstream", "users")]
            ) > 0.0
        );
        assert!(
            v(
                "ringway_upstream_sent_bytes_total",
                &[("upstream", "users")]
            ) > 2.0 * r#"{"name": "Ada"}"#.len() as f64,
            "{text}"
        );
        // The client requests: counted once each, by their route, with no group error.
        assert_eq!(
            v(
                "ringway_route_requests_total",
                &[("route", "profile"), ("class", "2xx")]
            ),
            2.0
        );
        let all_routes: f64 = lines
            .iter()
            .filter(|l| l.name == "ringway_route_requests_total")
            .map(|l| l.value)
            .sum();
        assert_eq!(all_routes, 2.0, "{text}");
    }
}

/// Issue 11: a scraper that prefers OpenMetrics (as Prometheus does) gets OpenMetrics text:
/// its content type, counter families without `_total`, `# EOF` last; the same samples as
/// the text format. Others get the text format.
#[test]
fn a_scraper_asking_for_openmetrics_gets_it() {
    use ringway::metrics::prom::{check_openmetrics, CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE};
    let up = Upstream::echo();
    let toml = format!(
        "{}\n[admin]\naddress = \"127.0.0.1:0\"\n",
        proxy_all(up.addr)
    );
    let gw = TestGateway::start(&toml, ringway::config::DriverChoice::Auto);
    let admin = gw.gateway().admin_addr().expect("the admin API runs");
    for _ in 0..3 {
        assert_eq!(status_of(&exchange(gw.addr, &get_req("/a"))), 200);
    }
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (r, om) = scrape_admin(admin, Some(prometheus));
    assert_eq!(r.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
    let lines = check_openmetrics(&om).unwrap_or_else(|e| panic!("{e}\n{om}"));
    assert!(om.ends_with("\n# EOF\n"));
    for family in [
        "ringway_route_requests",
        "ringway_upstream_requests",
        "ringway_listener_connections_accepted",
        "ringway_cache_hits",
    ] {
        assert!(
            om.contains(&format!("\n# TYPE {family} counter\n")),
            "{family}: {om}"
        );
    }
    assert!(om.contains("\n# TYPE ringway_route_request_duration_seconds histogram\n"));
    let v = |name: &str, labels: &[(&str, &str)]| value(&lines, name, labels);
    assert_eq!(
        v(
            "ringway_upstream_requests_total",
            &[("upstream", "up"), ("class", "2xx")]
        ),
        3.0,
        "{om}"
    );
    // The text format, as before, for a scraper that does not ask or prefers it.
    for accept in [
        None,
        Some("text/plain;version=0.0.4"),
        Some("application/openmetrics-text;q=0.2, text/plain"),
    ] {
        let (r, text) = scrape_admin(admin, accept);
        assert_eq!(r.header("content-type"), Some(CONTENT_TYPE), "{accept:?}");
        assert!(!text.contains("# EOF"));
        let text_lines = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // The same series either way (the scrapes themselves are not requests on a route).
        assert_eq!(text_lines.len(), lines.len(), "{accept:?}");
    }
}
