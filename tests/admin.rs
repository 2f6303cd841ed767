//! The admin API over real sockets: every endpoint, the bearer token, redaction of secrets,
//! drain (readiness, then the data plane stops accepting while in-flight requests finish),
//! hostile clients, the mount API, and `ringway status` / `reload` / `drain` against the binary.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringway::admin::{AdminResponse, Method};
use ringway::config::{Config, DriverChoice};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_ringway");
const TOKEN: &str = "test-admin-token-0123456789";

/// One request to the admin API on a fresh connection.
fn call(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> Resp {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    request(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn admin_get(addr: SocketAddr, path: &str) -> Resp {
    call(addr, "GET", path, None, "")
}

/// A gateway with one upstream, a direct route and `[admin]` on 127.0.0.1:0 with `admin`.
fn gateway(up: SocketAddr, admin: &str, extra: &str, driver: DriverChoice) -> TestGateway {
    let toml = config(
        &[up],
        &format!(
            "{extra}\n[[routes]]\nname = \"fast\"\npath = \"/fast\"\ndirect = {{ status = 200, body = \"fast\" }}\n\n\
             [[routes]]\nname = \"proxied\"\npath_prefix = \"/\"\nupstream = \"up\"\n\
             rate_limits = [{{ key = \"client_ip\", rate = 1000 }}]\n\n\
             [admin]\naddress = \"127.0.0.1:0\"\n{admin}\n"
        ),
    );
    TestGateway::start(&toml, driver)
}

fn admin_addr(g: &TestGateway) -> SocketAddr {
    g.gateway().admin_addr().expect("the admin API runs")
}

#[test]
fn every_endpoint_answers() {
    let up = Upstream::echo();
    let g = gateway(up.addr, "", "", DriverChoice::Auto);
    let a = admin_addr(&g);
    assert_eq!(a.ip().to_string(), "127.0.0.1");
    assert_ne!(a.port(), 0);

    let r = admin_get(a, "/live");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["live"], true);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = request(a, b"HEAD /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());

    let r = admin_get(a, "/ready");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["ready"], true);
    assert_eq!(r.json()["draining"], false);

    let c = admin_get(a, "/config").json();
    assert_eq!(c["listeners"][0]["address"], "127.0.0.1:0");
    assert_eq!(
        c["timeouts"]["client_head"], "10s",
        "defaults are filled in"
    );
    assert_eq!(
        c["upstreams"]["up"]["endpoints"][0]["address"],
        up.addr.to_string()
    );
    assert_eq!(c["admin"]["drain_delay"], "5s");

    let routes = admin_get(a, "/routes").json();
    let routes = routes["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0]["name"], "fast");
    assert_eq!(routes[0]["match"]["path"], "/fast");
    assert_eq!(routes[0]["action"]["direct"]["status"], 200);
    assert_eq!(routes[1]["match"]["path_prefix"], "/");
    assert_eq!(routes[1]["action"]["upstream"], "up");
    assert_eq!(routes[1]["policies"]["rate_limits"][0]["key"], "client_ip");
    assert_eq!(routes[1]["policies"]["rate_limits"][0]["rate"], 1000);

    // A proxied request leaves a pooled connection behind, which /upstreams shows.
    assert_eq!(get(g.addr, "/x").status, 200);
    let ok = eventually(Duration::from_secs(3), || {
        let u = admin_get(a, "/upstreams").json();
        u["upstreams"][0]["endpoints"][0]["idle_pool"] == 1
    });
    assert!(ok, "the idle upstream connection shows in /upstreams");
    let u = admin_get(a, "/upstreams").json();
    assert_eq!(u["workers"], 1);
    let group = &u["upstreams"][0];
    assert_eq!(group["name"], "up");
    assert_eq!(group["balance"], "round_robin");
    let ep = &group["endpoints"][0];
    assert_eq!(ep["address"], up.addr.to_string());
    assert_eq!(ep["weight"], 1);
    assert_eq!(ep["health"], "healthy");
    assert_eq!(ep["ejected"], false);
    assert_eq!(ep["in_flight"], 0);
    assert_eq!(ep["per_worker"].as_array().unwrap().len(), 1);

    // Run-time log level: read, set (JSON or a bare name), refuse nonsense, put it back.
    let before = admin_get(a, "/log/level").json()["level"]
        .as_str()
        .unwrap()
        .to_string();
    let r = call(a, "PUT", "/log/level", None, "{\"level\": \"debug\"}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(admin_get(a, "/log/level").json()["level"], "debug");
    assert!(ringway::log::enabled(ringway::log::Level::Debug));
    assert_eq!(call(a, "PUT", "/log/level", None, "warn").status, 200);
    assert!(!ringway::log::enabled(ringway::log::Level::Info));
    assert_eq!(call(a, "PUT", "/log/level", None, "loud").status, 400);
    assert_eq!(call(a, "PUT", "/log/level", None, &before).status, 200);
    assert_eq!(admin_get(a, "/log/level").json()["level"], before.as_str());

    // Wrong method: 405 with Allow; unknown path: 404.
    let r = call(a, "DELETE", "/config", None, "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = call(a, "GET", "/drain", None, "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = call(a, "POST", "/log/level", None, "");
    assert_eq!(r.header("allow"), Some("GET, HEAD, PUT"));
    assert_eq!(admin_get(a, "/nowhere").status, 404);
    assert_eq!(admin_get(a, "/live/x").status, 404);

    // What a web page could send: a rebound name (no token here) and a cross-origin write.
    let r = request(
        a,
        b"GET /config HTTP/1.1\r\nHost: evil.example:9901\r\n\r\n",
    );
    assert_eq!(r.status, 403);
    let r = request(
        a,
        b"POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 403);
    assert_eq!(admin_get(a, "/ready").status, 200, "not drained");
    let r = request(a, b"GET /live HTTP/1.1\r\nHost: localhost:1\r\n\r\n");
    assert_eq!(r.status, 200);

    // Keep-alive: several requests on one connection.
    let mut c = Client::connect(a);
    for _ in 0..3 {
        c.send(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    // Pipelined: two requests in one write, two answers in order.
    c.send(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(c.read_response().unwrap().status, 404);
}

/// RFC 9112 §3.2.2: with an absolute-form target the authority in it is the request's host
/// and the Host header is ignored, so the DNS-rebinding guard (no token configured) judges
/// that authority: a foreign name in the target is refused even with `Host: 127.0.0.1`.
#[test]
fn the_rebinding_guard_reads_an_absolute_form_targets_authority() {
    let up = Upstream::echo();
    let g = gateway(up.addr, "", "", DriverChoice::Auto);
    let a = admin_addr(&g);
    let r = request(
        a,
        b"GET http://evil.example:9901/config HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    );
    assert_eq!(r.status, 403, "a foreign authority in the target");
    let r = request(
        a,
        b"GET http://127.0.0.1:9901/live HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(
        r.status, 200,
        "the target's local authority, whatever Host says"
    );
}

#[test]
fn the_token_is_required_checked_and_accepted() {
    let up = Upstream::echo();
    let g = gateway(
        up.addr,
        &format!("token = \"{TOKEN}\""),
        "",
        DriverChoice::Auto,
    );
    let a = admin_addr(&g);
    for path in ["/config", "/routes", "/upstreams", "/log/level", "/nowhere"] {
        let r = call(a, "GET", path, None, "");
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"ringway admin\"")
        );
        let r = call(a, "GET", path, Some("test-admin-token-0123456788"), "");
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"ringway admin\", error=\"invalid_token\"")
        );
        // A prefix or an extension of the token is as wrong as any other.
        assert_eq!(call(a, "GET", path, Some(&TOKEN[..20]), "").status, 401);
        let longer = format!("{TOKEN}x");
        assert_eq!(call(a, "GET", path, Some(&longer), "").status, 401);
    }
    assert_eq!(call(a, "GET", "/config", Some(TOKEN), "").status, 200);
    assert_eq!(call(a, "GET", "/nowhere", Some(TOKEN), "").status, 404);
    // With a token, which no web page can attach, any Host is fine.
    let r = request(
        a,
        format!(
            "GET /routes HTTP/1.1\r\nHost: admin.example\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    // The scheme is case-insensitive (RFC 9110 §11.1); Basic is not Bearer.
    let r = request(
        a,
        format!("GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let r = request(
        a,
        format!("GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {TOKEN}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 401);
    // Two Authorization headers are ambiguous.
    let r = request(
        a,
        format!(
            "GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nAuthorization: Bearer x\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 400);
    // A wrong method is refused only after the token: nothing about paths leaks without it.
    assert_eq!(call(a, "DELETE", "/config", None, "").status, 401);
    assert_eq!(call(a, "DELETE", "/config", Some(TOKEN), "").status, 405);
    // The probes are open.
    assert_eq!(admin_get(a, "/live").status, 200);
    assert_eq!(admin_get(a, "/ready").status, 200);
    // Draining needs the token.
    assert_eq!(call(a, "POST", "/drain", None, "").status, 401);
    assert_eq!(admin_get(a, "/ready").status, 200);
}

#[test]
fn a_non_loopback_admin_address_without_a_token_is_refused_at_load() {
    let text = "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[routes]]\ndirect = { status = 200 }\n\n[admin]\naddress = \"0.0.0.0:9901\"\n";
    let e = Config::parse(text, "open.toml").unwrap_err();
    assert_eq!(e.key, "admin.address");
    assert_eq!(e.line, Some(8));
    let msg = e.to_string();
    assert!(msg.starts_with("open.toml:8:"), "{msg}");
    assert!(
        msg.contains("admin.address") && msg.contains("token"),
        "{msg}"
    );

    // The binary refuses it the same way, for `check` and for `run`.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-refused");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("open.toml");
    std::fs::write(&file, text).unwrap();
    for cmd in ["check", "run"] {
        let out = Command::new(BIN)
            .args([cmd, "-c"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("open.toml:8:") && err.contains("key `admin.address`"),
            "{cmd}: {err}"
        );
    }
    // With a token the same address loads.
    let with_token = format!("{text}token = \"{TOKEN}\"\n");
    Config::parse(&with_token, "open.toml").unwrap();
}

#[test]
fn config_redacts_every_secret() {
    let p = pki::pki();
    let redis = refusing_addr();
    let key_path = p.path("a.key");
    let client_key = p.path("client.key");
    let hash = ringway::auth::apikey::key_hash_hex(b"consumer key");
    // base64 of "jwt-b64-secret-value-long-enough-for-hs256"
    let b64 = "and0LWI2NC1zZWNyZXQtdmFsdWUtbG9uZy1lbm91Z2gtZm9yLWhzMjU2";
    let toml = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"
tls = {{ certificates = [{{ cert = "{cert}", key = "{key_path}" }}] }}

[[listeners]]
address = "127.0.0.1:0"

[upstreams.up]
endpoints = [{{ address = "127.0.0.1:9" }}]
tls = {{ ca = "{ca}", client_cert = "{client_cert}", client_key = "{client_key}" }}

[rate_limiting]
backend = "redis"
redis = {{ address = "{redis}", password = "redis-password-SECRET1" }}

[auth.jwt.hs]
secret = "jwt-secret-SECRET2-long-enough-for-hs256"

[auth.jwt.b64]
secret_base64 = "{b64}"

[auth.jwt.remote]
jwks_url = "http://127.0.0.1:9/keys?api_key=url-SECRET3"

[auth.introspection.idp]
url = "http://127.0.0.1:9/introspect"
client_id = "gateway-client"
client_secret = "client-secret-SECRET4"

[[consumers]]
name = "alice"
api_keys = ["{hash}"]

[[routes]]
upstream = "up"
auth = "hs"
headers = {{ "x-api-key" = "match-SECRET5" }}
request_headers = {{ set = {{ authorization = "Bearer upstream-SECRET6", "x-served-by" = "gw" }}, add = {{ "x-upstream-token" = "SECRET7" }} }}

[admin]
address = "127.0.0.1:0"
token = "{TOKEN}"
"#,
        cert = p.path("a-chain.pem"),
        ca = p.path("ca.pem"),
        client_cert = p.path("client.pem"),
        redis = redis.addr,
    );
    let g = TestGateway::start(&toml, DriverChoice::Auto);
    let a = admin_addr(&g);
    let r = call(a, "GET", "/config", Some(TOKEN), "");
    assert_eq!(r.status, 200);
    let text = r.text();
    for secret in [
        "SECRET",
        TOKEN,
        b64,
        "and0LWI2NC1",
        hash.as_str(),
        &hash[7..],
        key_path.as_str(),
        client_key.as_str(),
        "api_key=url",
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} leaked in /config:\n{text}"
        );
    }
    let c = r.json();
    let red = "<redacted>";
    assert_eq!(c["auth"]["jwt"]["hs"]["secret"], red);
    assert_eq!(
        c["auth"]["jwt"]["hs"]["secret_base64"],
        serde_json::Value::Null
    );
    assert_eq!(c["auth"]["jwt"]["b64"]["secret_base64"], red);
    assert_eq!(
        c["auth"]["jwt"]["remote"]["jwks_url"],
        "http://127.0.0.1:9/keys?<redacted>"
    );
    assert_eq!(c["auth"]["introspection"]["idp"]["client_secret"], red);
    assert_eq!(
        c["auth"]["introspection"]["idp"]["client_id"],
        "gateway-client"
    );
    assert_eq!(c["rate_limiting"]["redis"]["password"], red);
    assert_eq!(c["admin"]["token"], red);
    assert_eq!(c["listeners"][0]["tls"]["certificates"][0]["key"], red);
    assert_eq!(
        c["listeners"][0]["tls"]["certificates"][0]["cert"],
        p.path("a-chain.pem")
    );
    assert_eq!(c["upstreams"]["up"]["tls"]["client_key"], red);
    assert_eq!(c["consumers"][0]["api_keys"][0], red);
    let route = &c["routes"][0];
    assert_eq!(route["match"]["headers"]["x-api-key"], red);
    assert_eq!(
        route["rewrite"]["request_headers"]["set"]["authorization"],
        red
    );
    assert_eq!(
        route["rewrite"]["request_headers"]["set"]["x-served-by"],
        "gw"
    );
    assert_eq!(
        route["rewrite"]["request_headers"]["add"]["x-upstream-token"],
        red
    );
    assert_eq!(route["policies"]["auth"]["any_of"][0], "hs");
    // /routes goes through the same redaction.
    let routes = call(a, "GET", "/routes", Some(TOKEN), "").text();
    assert!(!routes.contains("SECRET"), "{routes}");
}

#[test]
fn drain_fails_readiness_then_closes_the_listeners_while_in_flight_requests_finish() {
    for d in DRIVERS {
        let up = Upstream::slow(Duration::from_millis(1500), b"slow done");
        let g = gateway(
            up.addr,
            "drain_delay = \"300ms\"",
            "[server]\nworkers = 2\n",
            d,
        );
        let a = admin_addr(&g);
        // A slow request in flight, and a keep-alive connection that stays open.
        let mut slow = Client::connect(g.addr);
        slow.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(up.wait_for(Duration::from_secs(5), |s| !s.is_empty()));
        let mut kept = Client::connect(g.addr);
        kept.send(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(kept.read_response().unwrap().status, 200);

        let r = call(a, "POST", "/drain", None, "");
        assert_eq!(r.status, 202, "{}", r.text());
        let ms = r.json()["listeners_close_in_ms"].as_u64().unwrap();
        assert!(ms <= 300, "{ms}");
        // Readiness fails at once.
        let r = admin_get(a, "/ready");
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["draining"], true);
        assert_eq!(r.json()["ready"], false);
        // A second drain keeps the first one's schedule.
        let again = call(a, "POST", "/drain?delay=1h", None, "");
        assert_eq!(again.status, 202);
        assert!(again.json()["listeners_close_in_ms"].as_u64().unwrap() <= 300);

        // Then new data-plane connections are refused: every worker closed its listener.
        let refused = eventually(
            Duration::from_secs(5),
            || matches!(TcpStream::connect(g.addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        );
        assert!(
            refused,
            "{d:?}: new connections are refused after the drain delay"
        );
        let r = admin_get(a, "/ready").json();
        assert_eq!(r["workers_stopped_accepting"], 2, "{r}");
        // ... while the request in flight finishes, and open connections are still served.
        let resp = slow.read_final();
        assert_eq!(resp.status, 200, "{d:?}");
        assert_eq!(resp.text(), "slow done");
        kept.send(b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(kept.read_response().unwrap().status, 200);
        // The admin API keeps answering.
        assert_eq!(admin_get(a, "/live").status, 200);
    }
}

#[test]
fn readiness_fails_during_shutdown_and_the_admin_api_stops_with_the_gateway() {
    let up = Upstream::slow(Duration::from_millis(800), b"late");
    let mut g = gateway(up.addr, "drain_delay = \"0s\"", "", DriverChoice::Auto);
    let a = admin_addr(&g);
    let mut slow = Client::connect(g.addr);
    slow.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(up.wait_for(Duration::from_secs(5), |s| !s.is_empty()));
    g.begin_shutdown();
    // Workers finish the request in flight; meanwhile the admin API says "not ready".
    let r = admin_get(a, "/ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["shutting_down"], true);
    assert_eq!(slow.read_final().status, 200);
    g.stop();
    assert!(
        TcpStream::connect(a).is_err(),
        "the admin listener closed with the gateway"
    );
}

#[test]
fn other_modules_mount_endpoints_without_touching_the_server() {
    let up = Upstream::echo();
    let g = gateway(
        up.addr,
        &format!("token = \"{TOKEN}\""),
        "",
        DriverChoice::Auto,
    );
    let admin = g.gateway().admin().expect("admin");
    let a = admin.addr();
    admin.mount(
        Method::Get,
        "/metrics",
        Arc::new(|_| AdminResponse::text(200, "text/plain; version=0.0.4", "up 1\n")),
    );
    admin.mount(
        Method::Post,
        "/cache/purge/*",
        Arc::new(|req| {
            AdminResponse::json(
                200,
                &serde_json::json!({ "purged": req.path, "q": req.query_param("key").ok().flatten() }),
            )
        }),
    );
    admin.mount(
        Method::Post,
        "/cache/purge/all",
        Arc::new(|_| AdminResponse::json(200, &serde_json::json!({ "all": true }))),
    );
    // A handler cannot smuggle a header line into the head.
    admin.mount_open(
        Method::Get,
        "/open",
        Arc::new(|_| {
            AdminResponse::text(200, "text/plain", "open\n")
                .with_header("x-evil", "a\r\nset-cookie: x=1")
                .with_header("x-fine", "yes")
        }),
    );
    let r = call(a, "GET", "/metrics", Some(TOKEN), "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    assert_eq!(r.text(), "up 1\n");
    assert_eq!(call(a, "GET", "/metrics", None, "").status, 401);
    let r = call(a, "POST", "/cache/purge/users/1?key=a%20b", Some(TOKEN), "");
    assert_eq!(r.json()["purged"], "/cache/purge/users/1");
    assert_eq!(r.json()["q"], "a b");
    // The exact mount wins over the prefix.
    let r = call(a, "POST", "/cache/purge/all", Some(TOKEN), "");
    assert_eq!(r.json()["all"], true);
    let r = call(a, "GET", "/cache/purge/x", Some(TOKEN), "");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = admin_get(a, "/open");
    assert_eq!(r.status, 200);
    assert!(!r.has("set-cookie") && !r.has("x-evil"));
    assert_eq!(r.header("x-fine"), Some("yes"));
    // A handler that panics (a bug; release builds abort) costs its connection, not a place
    // under the connection cap (16 here).
    admin.mount(Method::Get, "/boom", Arc::new(|_| panic!("handler bug")));
    for _ in 0..20 {
        let mut s = raw(a);
        let _ = s.write_all(
            format!(
                "GET /boom HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        );
        assert_eq!(status_of(&mut s), None);
    }
    assert_eq!(admin_get(a, "/live").status, 200);
    // Mounting again replaces.
    admin.mount(
        Method::Get,
        "/metrics",
        Arc::new(|_| AdminResponse::text(200, "text/plain", "up 2\n")),
    );
    assert_eq!(call(a, "GET", "/metrics", Some(TOKEN), "").text(), "up 2\n");
}

/// A raw connection to the admin API with a read timeout.
fn raw(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads a whole answer up to the close (or the timeout) and returns its status.
fn status_of(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends raw bytes on a new connection and returns the answer's status. A 503 means the
/// connection cap was still full of connections the server had not yet finished closing
/// (each lingers until the client's close): tried again, a bounded number of times.
fn answer(a: SocketAddr, bytes: &[u8]) -> Option<u16> {
    for _ in 0..100 {
        let mut s = raw(a);
        let _ = s.write_all(bytes);
        let st = status_of(&mut s);
        if st != Some(503) {
            return st;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(503)
}

#[test]
fn hostile_clients_are_bounded_and_the_admin_api_answers_after() {
    let up = Upstream::echo();
    let g = gateway(
        up.addr,
        "max_connections = 4\nrequest_timeout = \"500ms\"\nidle_timeout = \"3s\"",
        "",
        DriverChoice::Auto,
    );
    let a = admin_addr(&g);

    // An oversized head: 431.
    let big = format!(
        "GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let st = answer(a, big.as_bytes());
    assert_eq!(st, Some(431));
    // A request-target too long: 414.
    let st = answer(
        a,
        format!(
            "GET /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "x".repeat(3000)
        )
        .as_bytes(),
    );
    assert_eq!(st, Some(414));
    // Garbage: 400.
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"[..],
        b"GET /live\r\n\r\n",
        b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /live HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ] {
        let st = answer(a, junk);
        assert_eq!(st, Some(400), "{:?}", String::from_utf8_lossy(junk));
    }
    // Bodies: too large (413), chunked (411), HTTP/2 preface (505 or 400).
    let st = answer(
        a,
        b"PUT /log/level HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2000000\r\n\r\n",
    );
    assert_eq!(st, Some(413));
    let st = answer(a,
        b"PUT /log/level HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ninfo\r\n0\r\n\r\n",
    );
    assert_eq!(st, Some(411));
    let st = answer(a, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert!(matches!(st, Some(400) | Some(505)), "{st:?}");
    // TRACE is not served.
    let st = answer(a, b"TRACE /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(st, Some(405));

    // Slowloris: a head that never completes gets 408 once request_timeout passes...
    let t0 = Instant::now();
    let mut s = raw(a);
    s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    assert_eq!(status_of(&mut s), Some(408));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // ... and so does one that trickles a byte at a time, each read well within the timeout.
    let t0 = Instant::now();
    let mut s = raw(a);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let line = format!("GET /live HTTP/1.1\r\nX-Slow: {}", "a".repeat(200));
        for b in line.bytes() {
            if w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(status_of(&mut s), Some(408));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    writer.join().unwrap();
    // A connection that says nothing is closed, silently, after request_timeout.
    let t0 = Instant::now();
    let mut s = raw(a);
    assert_eq!(status_of(&mut s), None);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // Blank lines before a request line are skipped (RFC 9112 §2.2), not waited on forever.
    let mut s = raw(a);
    s.write_all(b"\r\n\r\n\r\n\r\n").unwrap();
    assert_eq!(status_of(&mut s), Some(408));
    // A body that never arrives: 408 too.
    let mut s = raw(a);
    s.write_all(b"PUT /log/level HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nin")
        .unwrap();
    assert_eq!(status_of(&mut s), Some(408));

    // Every prefix of a request, then a close: nothing is answered wrongly, nothing breaks.
    let whole = b"PUT /log/level HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\r\ninfo";
    for cut in 0..whole.len() {
        let mut s = raw(a);
        let _ = s.write_all(&whole[..cut]);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let st = status_of(&mut s);
        assert!(st.is_none() || st == Some(400), "cut at {cut}: {st:?}");
    }

    // Many connections: 4 kept open (idle between requests) do not shut others out: each new
    // one takes the place of the oldest idle one (which is closed) and is served.
    let mut held = Vec::new();
    for _ in 0..4 {
        // Retried while earlier connections are still being closed (see `answer`).
        let ok = eventually(Duration::from_secs(2), || {
            let mut c = Client::connect(a);
            c.send(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            let served = c.read_response().is_some_and(|r| r.status == 200);
            if served {
                held.push(c);
            }
            served
        });
        assert!(ok, "4 connections are served");
    }
    for _ in 0..20 {
        let mut s = raw(a);
        let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        assert_eq!(status_of(&mut s), Some(200));
    }
    for c in &mut held {
        assert!(c.read_response().is_none(), "closed to make room");
    }
    drop(held);
    // The admin API answers once the held connections are gone.
    let ok = eventually(Duration::from_secs(3), || {
        let mut s = raw(a);
        let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        status_of(&mut s) == Some(200)
    });
    assert!(ok, "the admin API answers after the flood");
    assert_eq!(admin_get(a, "/ready").status, 200);
}

/// A connection that read one `/live` answer and stays open, idle.
fn idle_keep_alive(a: SocketAddr) -> Client {
    let mut c = Client::connect(a);
    c.send(b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(c.read_response().map(|r| r.status), Some(200));
    c
}

#[test]
fn connections_that_send_nothing_cannot_starve_live_and_ready() {
    // Review r5 D8: `max_connections` silent (or trickling, or idle) connections, reopened as
    // they close, made every `/live` answer 503, while the README says a flood cannot starve
    // it. At the cap the oldest connection still waiting for a request now makes room
    // (RFC 9112 §9.3: a server may close an idle connection); one being answered is kept.
    let up = Upstream::echo();
    let g = gateway(
        up.addr,
        "max_connections = 4\nrequest_timeout = \"60s\"\nidle_timeout = \"60s\"",
        "",
        DriverChoice::Auto,
    );
    let a = admin_addr(&g);
    // Four connections, each admitted (it was answered), then: idle, a partial head, a head
    // without its body, idle.
    let mut held: Vec<Client> = (0..4).map(|_| idle_keep_alive(a)).collect();
    held[1].send(b"GET /config HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    held[2].send(b"PUT /log/level HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nin");
    // More probes than places: every one is answered; the silent connections, reopened as
    // they are closed, never get a probe refused either.
    for i in 0..10 {
        let path = if i % 2 == 0 { "/live" } else { "/ready" };
        assert_eq!(admin_get(a, path).status, 200, "probe {i}: {path}");
        held.push(Client::connect(a));
    }
    // The four first ones were closed to make room, oldest first, without an answer (not
    // a read timeout: the server's deadlines are a minute here).
    for (i, c) in held.iter_mut().take(4).enumerate() {
        let mut rest = Vec::new();
        match c.s.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{i}: {:?}", String::from_utf8_lossy(&rest)),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{i}: {e}"),
        }
    }
    drop(held);

    // Connections whose requests are being answered keep their places: with all four in a
    // handler, one more is refused with 503 (the cap still bounds threads), and served again
    // once they are done.
    let admin = g.gateway().admin().expect("admin");
    let release = Event::new();
    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r2, in2) = (release.clone(), inside.clone());
    admin.mount_open(
        Method::Get,
        "/block",
        Arc::new(move |_| {
            in2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            r2.wait(Duration::from_secs(30));
            AdminResponse::text(200, "text/plain", "done\n")
        }),
    );
    let busy: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::connect(a);
            c.send(b"GET /block HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            c
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || inside
        .load(std::sync::atomic::Ordering::SeqCst)
        == 4));
    assert_eq!(admin_get(a, "/live").status, 503);
    release.set();
    for mut c in busy {
        assert_eq!(c.read_response().map(|r| r.status), Some(200));
    }
    assert_eq!(admin_get(a, "/live").status, 200);
    assert_eq!(admin_get(a, "/ready").status, 200);
}

/// A `ringway run` child process, killed on drop.
struct Proc {
    child: Child,
    admin: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary on `toml` and waits for the admin API's address in its log.
fn run_binary(name: &str, toml: &str) -> Proc {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, toml).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--workers", "2", "-c"])
        .arg(&file)
        .env("RINGWAY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringway");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("admin API on http://").nth(1) {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the binary logs its admin address");
    let p = Proc {
        child,
        admin: addr.parse().unwrap(),
    };
    assert!(eventually(Duration::from_secs(5), || {
        TcpStream::connect(p.admin).is_ok()
    }));
    p
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RINGWAY_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // No config file in the working directory to read an address from.
    cmd.current_dir(env!("CARGO_TARGET_TMPDIR"));
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ringway_status_and_drain_talk_to_a_running_binary() {
    let up = Upstream::echo();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.users]\nendpoints = [{{ address = \"{}\", weight = 3 }}]\n\n[[routes]]\nupstream = \"users\"\n\n[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\ndrain_delay = \"0s\"\n",
        up.addr
    );
    let p = run_binary("status.toml", &toml);
    let addr = p.admin.to_string();

    let (code, out, err) = cli(&["status", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("ringway at {addr}: ready")), "{out}");
    assert!(out.contains("workers: 2"), "{out}");
    assert!(out.contains("users (round_robin"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&up.addr.to_string()))
        .unwrap_or_else(|| panic!("the endpoint is listed: {out}"));
    assert!(
        line.contains("healthy") && line.contains("weight 3"),
        "{line}"
    );

    // The token from the environment; without any, a 401 explained.
    let (code, out, _) = cli(
        &["status", "--admin", &addr],
        &[("RINGWAY_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(code, Some(0), "{out}");
    let (code, _, err) = cli(&["status", "--admin", &addr], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("401") && err.contains("--token"), "{err}");
    // Nothing listening: a clear error.
    let nobody = refusing_addr();
    let (code, _, err) = cli(&["status", "--admin", &nobody.addr.to_string()], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot connect"), "{err}");

    // `ringway reload`: the running binary re-reads its file; an invalid one is refused with
    // the check message and the gateway keeps serving.
    let (code, out, err) = cli(&["reload", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reload #1 applied: 1 routes"), "{out}");
    assert!(!out.contains("warning:"), "{out}");
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("admin-bin")
        .join("status.toml");
    // A config that loads with a warning (a Redis entry cap that cannot move within the
    // link's timeout) and changes a key read at start only: the summary names both.
    std::fs::write(
        &file,
        format!("{toml}\n[cache.redis]\naddress = \"127.0.0.1:9\"\ntimeout = \"20ms\"\nmax_entry_bytes = \"64MiB\"\n"),
    )
    .unwrap();
    let (code, out, err) = cli(&["reload", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("reload #2 applied"), "{out}");
    assert!(out.contains("  warning: cache.redis"), "{out}");
    assert!(
        out.contains("not reloaded (read at start only): cache.redis"),
        "{out}"
    );
    std::fs::write(
        &file,
        toml.replace("upstream = \"users\"", "upstream = \"nobody\""),
    )
    .unwrap();
    let (code, _, err) = cli(&["reload", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid config") && err.contains("routes[0].upstream"),
        "{err}"
    );
    let (code, out, _) = cli(&["status", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(0), "{out}");

    // Drain, then status says "not ready" and exits 1.
    let (code, out, err) = cli(&["drain", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("draining"), "{out}");
    let (code, out, _) = cli(&["status", "--admin", &addr, "--token", TOKEN], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NOT READY (draining"), "{out}");
}

/// Issue 11: stopping the gateway joins the admin connections' threads: a handler that ends
/// soon is waited for (its work is done when `join` returns), one that is stuck is waited for
/// no longer than `CONN_JOIN_LIMIT`.
#[test]
fn stopping_joins_admin_connection_threads_within_a_deadline() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Mutex};
    let mut gw = TestGateway::start(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[admin]\naddress = \"127.0.0.1:0\"\n",
        DriverChoice::Auto,
    );
    let a = gw.gateway().admin_addr().expect("the admin API runs");
    let admin = gw.gateway().admin().expect("the admin API runs").clone();
    let (slow_in, stuck_in) = (Event::new(), Event::new());
    let slow_done = Arc::new(AtomicBool::new(false));
    {
        let (entered, done) = (slow_in.clone(), slow_done.clone());
        admin.mount(
            Method::Get,
            "/slow",
            Arc::new(move |_| {
                entered.set();
                std::thread::sleep(Duration::from_millis(500));
                done.store(true, Ordering::SeqCst);
                AdminResponse::text(200, "text/plain", "late\n")
            }),
        );
    }
    let (release, wait) = mpsc::channel::<()>();
    let wait = Mutex::new(wait);
    {
        let entered = stuck_in.clone();
        admin.mount(
            Method::Get,
            "/stuck",
            Arc::new(move |_| {
                entered.set();
                let _ = wait
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recv_timeout(Duration::from_secs(60));
                AdminResponse::text(200, "text/plain", "never\n")
            }),
        );
    }
    let mut conns = Vec::new();
    for path in ["/slow", "/stuck"] {
        let mut s = raw(a);
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .unwrap();
        conns.push(s);
    }
    assert!(slow_in.wait(Duration::from_secs(5)) && stuck_in.wait(Duration::from_secs(5)));
    let t0 = Instant::now();
    gw.stop();
    let took = t0.elapsed();
    assert!(
        slow_done.load(Ordering::SeqCst),
        "the slow handler's thread was not joined"
    );
    assert!(
        took < ringway::admin::CONN_JOIN_LIMIT + Duration::from_secs(2),
        "stopping took {took:?}"
    );
    drop(release);
}
