//! Hostile identity providers and health endpoints, as real loopback servers: an overflowing
//! chunk size, an oversized head, too many headers, a flood of 1xx answers, bytes after the
//! answer, a close mid-body, a body over the cap and a slow drip past the deadline. For JWKS
//! fetches, introspection and active health checks, each case asserts what the client sees
//! (401/503, the endpoint taken out; a health check judges only the status, so a body over
//! the cap does not take an endpoint out) and that the gateway keeps serving. Also: introspection
//! reuses one keep-alive connection, and the negative cache stops repeated calls for the same
//! bad token.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use ringway::config::{Config, DriverChoice};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::json;
use support::*;

// ---------------------------------------------------------------------------------------------
// A scripted loopback server.

/// How the server answers one request.
#[derive(Clone)]
enum Act {
    /// Writes the bytes, then closes.
    Send(Vec<u8>),
    /// Writes the bytes and keeps the connection for the next request.
    KeepAlive(Vec<u8>),
    /// Writes the bytes one at a time, `gap` apart, then closes; stops when the peer is gone.
    Drip(Vec<u8>, Duration),
    /// Writes the head, then `chunk` again and again (up to `total` bytes or until the peer
    /// is gone), then closes.
    Flood {
        head: Vec<u8>,
        chunk: Vec<u8>,
        total: usize,
    },
}

type Answer = dyn Fn(&str) -> Act + Send + Sync;

/// A loopback HTTP/1.1 server: one thread per connection, each answering with `answer(the
/// request target)`. Counts connections and requests; a panic in a server thread is raised
/// again when the server is dropped.
struct Server {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    panicked: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

/// The request head's target, once a whole request (head and Content-Length body) is read;
/// `None` when the peer closes first.
fn read_request(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
            if buf.len() >= p + 4 + len {
                let target = head.split(' ').nth(1).unwrap_or("").to_string();
                buf.drain(..p + 4 + len);
                return Some(target);
            }
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn serve_conn(
    tcp: TcpStream,
    tls: Option<Arc<ServerConfig>>,
    answer: &Answer,
    requests: &AtomicUsize,
) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = tcp.set_write_timeout(Some(Duration::from_secs(10)));
    match tls {
        None => serve(tcp, answer, requests),
        Some(cfg) => {
            let Ok(conn) = ServerConnection::new(cfg) else {
                return;
            };
            serve(StreamOwned::new(conn, tcp), answer, requests)
        }
    }
}

fn serve(mut s: impl Read + Write, answer: &Answer, requests: &AtomicUsize) {
    let mut buf = Vec::new();
    while let Some(target) = read_request(&mut s, &mut buf) {
        requests.fetch_add(1, Ordering::SeqCst);
        match answer(&target) {
            Act::Send(b) => {
                let _ = s.write_all(&b).and_then(|_| s.flush());
                return;
            }
            Act::KeepAlive(b) => {
                if s.write_all(&b).and_then(|_| s.flush()).is_err() {
                    return;
                }
            }
            Act::Drip(b, gap) => {
                for byte in b {
                    if s.write_all(&[byte]).and_then(|_| s.flush()).is_err() {
                        return;
                    }
                    std::thread::sleep(gap);
                }
                return;
            }
            Act::Flood { head, chunk, total } => {
                if s.write_all(&head).and_then(|_| s.flush()).is_err() {
                    return;
                }
                let mut sent = 0;
                while sent < total && s.write_all(&chunk).and_then(|_| s.flush()).is_ok() {
                    sent += chunk.len();
                }
                return;
            }
        }
    }
}

impl Server {
    fn start(answer: impl Fn(&str) -> Act + Send + Sync + 'static) -> Server {
        Server::serve(None, answer)
    }

    /// Over TLS, presenting `cfg`'s certificate.
    fn start_tls(
        cfg: Arc<ServerConfig>,
        answer: impl Fn(&str) -> Act + Send + Sync + 'static,
    ) -> Server {
        Server::serve(Some(cfg), answer)
    }

    fn serve(
        tls: Option<Arc<ServerConfig>>,
        answer: impl Fn(&str) -> Act + Send + Sync + 'static,
    ) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let panicked = Arc::new(AtomicBool::new(false));
        let answer: Arc<Answer> = Arc::new(answer);
        let (c, r, st, p) = (
            conns.clone(),
            requests.clone(),
            stop.clone(),
            panicked.clone(),
        );
        let accept = std::thread::spawn(move || {
            for s in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(s) = s else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (answer, r, p, tls) = (answer.clone(), r.clone(), p.clone(), tls.clone());
                std::thread::spawn(move || {
                    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        serve_conn(s, tls, &*answer, &r)
                    }));
                    if ok.is_err() {
                        p.store(true, Ordering::SeqCst);
                    }
                });
            }
        });
        Server {
            addr,
            conns,
            requests,
            stop,
            panicked,
            accept: Some(accept),
        }
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let r = t.join();
            if !std::thread::panicking() {
                if let Err(e) = r {
                    std::panic::resume_unwind(e);
                }
                assert!(
                    !self.panicked.load(Ordering::SeqCst),
                    "a server thread panicked"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The hostile answers.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Hostile {
    /// `fffffffffffffffffffff`: more than 64 bits of chunk size.
    ChunkOverflow,
    /// A 70 KiB head.
    HugeHead,
    /// 300 header lines.
    ManyHeaders,
    /// 20 `100 Continue` answers, then a good one.
    InterimFlood,
    /// A Content-Length longer than the bytes sent before the close.
    EarlyClose,
    /// A chunked body of 4 MiB, over every cap.
    OverCap,
    /// A good answer, one byte per 50 ms: past any deadline of the tests.
    SlowDrip,
}

const ALL: [Hostile; 7] = [
    Hostile::ChunkOverflow,
    Hostile::HugeHead,
    Hostile::ManyHeaders,
    Hostile::InterimFlood,
    Hostile::EarlyClose,
    Hostile::OverCap,
    Hostile::SlowDrip,
];

/// A good answer with `body`, keep-alive.
fn good(body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// The hostile version of a good answer carrying `body`: what each case would deliver if the
/// client were lenient is that good answer (or its body), so passing means the limit held.
fn hostile(h: Hostile, body: &[u8]) -> Act {
    let with_head = |head: String| {
        let mut v = head.into_bytes();
        v.extend_from_slice(body);
        v
    };
    let cl = body.len();
    match h {
        Hostile::ChunkOverflow => Act::Send(with_head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n".into(),
        )),
        Hostile::HugeHead => Act::Send(with_head(format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: {cl}\r\n\r\n",
            "a".repeat(70 * 1024)
        ))),
        Hostile::ManyHeaders => Act::Send(with_head(format!(
            "HTTP/1.1 200 OK\r\n{}content-length: {cl}\r\n\r\n",
            "x-n: v\r\n".repeat(300)
        ))),
        Hostile::InterimFlood => {
            let mut v = "HTTP/1.1 100 Continue\r\n\r\n".repeat(20).into_bytes();
            v.extend_from_slice(&good(body));
            Act::Send(v)
        }
        Hostile::EarlyClose => Act::Send(with_head(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            cl + 100
        ))),
        Hostile::OverCap => {
            let mut chunk = b"1000\r\n".to_vec();
            chunk.extend_from_slice(&[b' '; 4096]);
            chunk.extend_from_slice(b"\r\n");
            Act::Flood {
                head: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                chunk,
                total: 4 << 20,
            }
        }
        Hostile::SlowDrip => Act::Drip(good(body), Duration::from_millis(50)),
    }
}

/// What the server does now: a hostile case, or good answers.
type Mode = Arc<Mutex<Option<Hostile>>>;

/// Requests served per mode (`None`: good answers).
type Served = Arc<Mutex<HashMap<Option<Hostile>, usize>>>;

fn served(s: &Served, m: Option<Hostile>) -> usize {
    s.lock().unwrap().get(&m).copied().unwrap_or(0)
}

fn bearer_get(addr: SocketAddr, path: &str, token: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// JWKS.

#[test]
fn hostile_jwks_servers_never_crash_the_fetcher_and_the_last_keys_stay() {
    let jwk = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
    let set = format!("{{\"keys\": [{jwk}]}}");
    let mode: Mode = Arc::new(Mutex::new(Some(Hostile::ChunkOverflow)));
    let count: Served = Arc::default();
    let (m, c) = (mode.clone(), count.clone());
    let keys = Server::start(move |_| {
        let now = *m.lock().unwrap();
        *c.lock().unwrap().entry(now).or_default() += 1;
        match now {
            None => Act::Send(good(set.as_bytes())),
            Some(h) => hostile(h, set.as_bytes()),
        }
    });
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            r#"
[auth.jwt.idp]
jwks_url = "http://{}/jwks"
jwks_min_refresh_interval = "100ms"
jwks_timeout = "500ms"
jwks_max_ttl = "1s"
jwks_min_ttl = "1s"

[[routes]]
path_prefix = "/open"
upstream = "up"

[[routes]]
upstream = "up"
auth = "idp"
"#,
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa".into());
    let key = EncodingKey::from_rsa_pem(&std::fs::read(data("rsa_private.pem")).unwrap()).unwrap();
    let token = encode(&h, &json!({"sub": "alice", "exp": now() + 600}), &key).unwrap();
    // Before any good fetch: every hostile answer leaves the provider without keys (401),
    // and the fetcher tries again (it did not die).
    for case in ALL {
        *mode.lock().unwrap() = Some(case);
        assert!(
            eventually(Duration::from_secs(10), || served(&count, Some(case)) >= 2),
            "{case:?}: the fetcher stopped fetching"
        );
        assert_eq!(bearer_get(gw.addr, "/", &token).status, 401, "{case:?}");
        assert_eq!(get(gw.addr, "/open").status, 200, "{case:?}");
    }
    *mode.lock().unwrap() = None;
    assert!(
        eventually(Duration::from_secs(10), || bearer_get(gw.addr, "/", &token)
            .status
            == 200),
        "good keys are taken once served"
    );
    // With keys in service, hostile answers keep the last good keys.
    for case in ALL {
        *mode.lock().unwrap() = Some(case);
        let before = served(&count, Some(case));
        assert!(
            eventually(Duration::from_secs(10), || served(&count, Some(case))
                >= before + 2),
            "{case:?}: the fetcher stopped fetching"
        );
        let t = encode(
            &h,
            &json!({"sub": format!("{case:?}"), "exp": now() + 600}),
            &key,
        )
        .unwrap();
        assert_eq!(bearer_get(gw.addr, "/", &t).status, 200, "{case:?}");
    }
}

/// A JWKS answer followed by stray bytes is taken whole (its connection closes anyway).
#[test]
fn jwks_answer_with_bytes_after_it_is_used_and_nothing_else() {
    let jwk = std::fs::read_to_string(data("rsa_jwk.json")).unwrap();
    let set = format!("{{\"keys\": [{jwk}]}}");
    let keys = Server::start(move |_| {
        let mut v = good(set.as_bytes());
        v.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"keys\":[]}");
        Act::Send(v)
    });
    let up = Upstream::echo();
    let cfg = config(
        &[up.addr],
        &format!(
            "[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\njwks_min_refresh_interval = \"100ms\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
            keys.addr
        ),
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa".into());
    let key = EncodingKey::from_rsa_pem(&std::fs::read(data("rsa_private.pem")).unwrap()).unwrap();
    let token = encode(&h, &json!({"sub": "a", "exp": now() + 600}), &key).unwrap();
    assert!(eventually(Duration::from_secs(10), || bearer_get(
        gw.addr, "/", &token
    )
    .status
        == 200));
}

// ---------------------------------------------------------------------------------------------
// Introspection.

fn introspection_gateway(
    up: SocketAddr,
    idp: SocketAddr,
    extra: &str,
    d: DriverChoice,
) -> TestGateway {
    let cfg = config(
        &[up],
        &format!(
            r#"
[auth.introspection.idp]
url = "http://{idp}/introspect"
client_id = "gateway"
client_secret = "s3cret"
timeout = "500ms"
{extra}

[[routes]]
path_prefix = "/open"
upstream = "up"

[[routes]]
upstream = "up"
auth = "idp"
"#
        ),
    );
    TestGateway::start(&cfg, d)
}

const ACTIVE: &str = r#"{"active": true, "sub": "svc"}"#;
const INACTIVE: &str = r#"{"active": false}"#;

#[test]
fn hostile_introspection_endpoints_are_503_and_the_worker_keeps_serving() {
    for d in DRIVERS {
        let mode: Mode = Arc::new(Mutex::new(None));
        let m = mode.clone();
        let idp = Server::start(move |_| match *m.lock().unwrap() {
            None => Act::KeepAlive(good(ACTIVE.as_bytes())),
            // Every hostile answer would say "active" if the client accepted it.
            Some(h) => hostile(h, ACTIVE.as_bytes()),
        });
        let up = Upstream::echo();
        let gw = introspection_gateway(up.addr, idp.addr, "", d);
        for case in ALL {
            *mode.lock().unwrap() = Some(case);
            let before = idp.requests();
            let r = bearer_get(gw.addr, "/", &format!("token-{case:?}"));
            assert_eq!(r.status, 503, "{d:?} {case:?}: {}", r.text());
            assert_eq!(r.header("retry-after"), Some("1"), "{d:?} {case:?}");
            assert_eq!(idp.requests(), before + 1, "{d:?} {case:?}");
            assert_eq!(get(gw.addr, "/open").status, 200, "{d:?} {case:?}");
        }
        *mode.lock().unwrap() = None;
        let r = bearer_get(gw.addr, "/", "a-good-token");
        assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        assert_eq!(up.last().header("authorization"), None);
        // A second good token on the kept connection.
        let conns = idp.conns();
        assert_eq!(bearer_get(gw.addr, "/", "another-good-one").status, 200);
        assert_eq!(
            idp.conns(),
            conns,
            "{d:?}: the keep-alive connection serves on"
        );
    }
}

/// Bytes after an answer (here a forged second answer saying "active") never answer the
/// next call: the connection is not reused.
#[test]
fn bytes_after_an_introspection_answer_do_not_answer_the_next_call() {
    for d in DRIVERS {
        let idp = Server::start(|_| {
            let mut v = good(INACTIVE.as_bytes());
            v.extend_from_slice(&good(ACTIVE.as_bytes()));
            Act::KeepAlive(v)
        });
        let up = Upstream::echo();
        let gw = introspection_gateway(up.addr, idp.addr, "", d);
        for i in 0..3 {
            let r = bearer_get(gw.addr, "/", &format!("token-{i}"));
            assert_eq!(r.status, 401, "{d:?} call {i}: {}", r.text());
        }
        assert_eq!(idp.requests(), 3, "{d:?}");
        assert_eq!(
            idp.conns(),
            3,
            "{d:?}: a connection with stray bytes is not reused"
        );
        assert_eq!(up.hits(), 0);
    }
}

/// A bodiless answer (204) followed by bytes a little later: the connection is checked when
/// taken from the pool, and not used.
#[test]
fn late_bytes_after_a_bodiless_answer_poison_no_call() {
    let idp = Server::start(|target| {
        if target == "/introspect" {
            // First the 204 (an error for introspection: 503), then a forged answer.
            let mut v = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
            v.extend_from_slice(&good(ACTIVE.as_bytes()));
            Act::Drip(v, Duration::from_millis(1))
        } else {
            Act::Send(good(b"{}"))
        }
    });
    let up = Upstream::echo();
    let gw = introspection_gateway(up.addr, idp.addr, "", DriverChoice::Auto);
    for i in 0..3 {
        let r = bearer_get(gw.addr, "/", &format!("t{i}"));
        assert_eq!(r.status, 503, "call {i}: {}", r.text());
    }
    assert_eq!(up.hits(), 0, "no forged answer let a request through");
}

#[test]
fn introspection_reuses_one_keep_alive_connection() {
    for d in DRIVERS {
        let idp = Server::start(|_| Act::KeepAlive(good(ACTIVE.as_bytes())));
        let up = Upstream::echo();
        let gw = introspection_gateway(up.addr, idp.addr, "", d);
        for i in 0..5 {
            let r = bearer_get(gw.addr, "/", &format!("token-{i}"));
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        }
        assert_eq!(idp.requests(), 5, "{d:?}: one call per token");
        assert_eq!(idp.conns(), 1, "{d:?}: every call on one connection");
    }
}

#[test]
fn introspection_over_https_reuses_one_keep_alive_connection() {
    for d in DRIVERS {
        let idp = Server::start_tls(pki::server_config("loopback"), |_| {
            Act::KeepAlive(good(ACTIVE.as_bytes()))
        });
        let up = Upstream::echo();
        let cfg = config(
            &[up.addr],
            &format!(
                "[auth.introspection.idp]\nurl = \"https://{}/i\"\nca = \"{}\"\nclient_id = \"g\"\nclient_secret = \"s\"\n[[routes]]\nupstream = \"up\"\nauth = \"idp\"\n",
                idp.addr,
                pki::pki().path("ca.pem")
            ),
        );
        let gw = TestGateway::start(&cfg, d);
        for i in 0..5 {
            let r = bearer_get(gw.addr, "/", &format!("token-{i}"));
            assert_eq!(r.status, 200, "{d:?}: {}", r.text());
        }
        assert_eq!(idp.requests(), 5, "{d:?}");
        assert_eq!(idp.conns(), 1, "{d:?}: every call on one TLS connection");
    }
}

/// The endpoint closes its kept connection between calls: the next call goes over a new one,
/// and is answered.
#[test]
fn a_kept_connection_closed_by_the_endpoint_is_replaced() {
    let idp = Server::start(|_| Act::Send(good(ACTIVE.as_bytes())));
    let up = Upstream::echo();
    let gw = introspection_gateway(up.addr, idp.addr, "", DriverChoice::Auto);
    for i in 0..3 {
        let r = bearer_get(gw.addr, "/", &format!("token-{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(idp.conns(), 3);
}

#[test]
fn the_negative_cache_stops_repeated_calls_for_the_same_bad_token() {
    for d in DRIVERS {
        // "broken" tokens get a 500 (503 to the client), others an inactive answer (401).
        let idp = Server::start(|_| Act::KeepAlive(good(INACTIVE.as_bytes())));
        let up = Upstream::echo();
        let gw = introspection_gateway(up.addr, idp.addr, "negative_cache_ttl = \"1s\"", d);
        for _ in 0..10 {
            assert_eq!(bearer_get(gw.addr, "/", "revoked").status, 401, "{d:?}");
        }
        assert_eq!(idp.requests(), 1, "{d:?}: one call for ten requests");
        // Another bad token costs its own call.
        assert_eq!(bearer_get(gw.addr, "/", "revoked-2").status, 401);
        assert_eq!(idp.requests(), 2, "{d:?}");
        // After the entry expires the token is asked about again.
        let t0 = Instant::now();
        assert!(eventually(Duration::from_secs(5), || {
            bearer_get(gw.addr, "/", "revoked").status == 401 && idp.requests() == 3
        }));
        assert!(t0.elapsed() >= Duration::from_millis(500), "{d:?}");
        assert_eq!(up.hits(), 0);
    }
}

#[test]
fn the_negative_cache_remembers_endpoint_failures_briefly() {
    let fail = Arc::new(AtomicBool::new(true));
    let f = fail.clone();
    let idp = Server::start(move |_| {
        if f.load(Ordering::SeqCst) {
            Act::KeepAlive(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n".to_vec())
        } else {
            Act::KeepAlive(good(ACTIVE.as_bytes()))
        }
    });
    let up = Upstream::echo();
    let gw = introspection_gateway(
        up.addr,
        idp.addr,
        "negative_cache_ttl = \"300ms\"",
        DriverChoice::Auto,
    );
    for _ in 0..5 {
        assert_eq!(bearer_get(gw.addr, "/", "tok").status, 503);
    }
    assert_eq!(idp.requests(), 1, "one call for five requests");
    // The endpoint recovers; once the entry expires the token is accepted.
    fail.store(false, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(5), || bearer_get(
        gw.addr, "/", "tok"
    )
    .status
        == 200));
    assert_eq!(idp.requests(), 2);
}

#[test]
fn negative_cache_ttl_is_bounded_at_load() {
    let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[auth.introspection.idp]\nurl = \"http://127.0.0.1:9/i\"\nclient_id = \"g\"\nclient_secret = \"s\"\nnegative_cache_ttl = \"10m\"\n";
    let e = Config::parse(src, "gw.toml").unwrap_err();
    assert_eq!(e.file, "gw.toml");
    assert_eq!(e.key, "auth.introspection.idp.negative_cache_ttl");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(e.reason.contains("at most 300s"), "{e}");
    let ok = src.replace("10m", "5m");
    Config::parse(&ok, "gw.toml").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Health checks.

/// A 200 "ok" that closes its connection.
const OK_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";

/// An endpoint whose `/healthz` answers `page(mode)` for the mode set now, counting the checks
/// each mode served in `count`; every other path gets [`OK_CLOSE`].
fn health_target<M: Copy + Eq + std::hash::Hash + Send + 'static>(
    mode: &Arc<Mutex<M>>,
    count: &Arc<Mutex<HashMap<M, usize>>>,
    page: impl Fn(M) -> Act + Send + Sync + 'static,
) -> Server {
    let (m, c) = (mode.clone(), count.clone());
    Server::start(move |path| {
        if path != "/healthz" {
            return Act::Send(OK_CLOSE.to_vec());
        }
        let now = *m.lock().unwrap();
        *c.lock().unwrap().entry(now).or_default() += 1;
        page(now)
    })
}

#[test]
fn hostile_health_endpoints_are_taken_out_and_the_gateway_keeps_serving() {
    let mode: Mode = Arc::new(Mutex::new(None));
    let count: Served = Arc::default();
    let target = health_target(&mode, &count, |now| match now {
        None => Act::Send(OK_CLOSE.to_vec()),
        Some(h) => hostile(h, b"ok"),
    });
    let other = Upstream::echo();
    let toml = format!(
        r#"
[[listeners]]
address = "127.0.0.1:0"

[upstreams.up]
endpoints = [{{ address = "{}" }}]
health_check = {{ path = "/healthz", interval = "100ms", timeout = "500ms", healthy_threshold = 1, unhealthy_threshold = 1 }}

[upstreams.other]
endpoints = [{{ address = "{}" }}]

[[routes]]
path_prefix = "/open"
upstream = "other"

[[routes]]
upstream = "up"
"#,
        target.addr, other.addr
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    assert!(eventually(Duration::from_secs(5), || get(gw.addr, "/")
        .status
        == 200));
    // A body over the cap is no failure for a health check, which judges the status
    // (`a_large_healthy_answer_keeps_the_endpoint_in`).
    for case in ALL.into_iter().filter(|c| *c != Hostile::OverCap) {
        *mode.lock().unwrap() = Some(case);
        assert!(
            eventually(Duration::from_secs(10), || get(gw.addr, "/").status == 503),
            "{case:?}: the endpoint is taken out"
        );
        assert_eq!(get(gw.addr, "/open").status, 200, "{case:?}");
        *mode.lock().unwrap() = None;
        assert!(
            eventually(Duration::from_secs(10), || get(gw.addr, "/").status == 200),
            "{case:?}: the endpoint comes back"
        );
        assert!(served(&count, Some(case)) >= 1);
    }
}

/// A health check judges the status (RFC 9110 §15: the status code is the server's verdict on
/// the request), so a 200 with a long body keeps the endpoint in, whatever its framing: read
/// and thrown away up to a bound, never held. Before, a body over 64 KiB failed the check and
/// took a healthy endpoint out. A 503 with such a body still takes it out.
#[test]
fn a_large_healthy_answer_keeps_the_endpoint_in() {
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum Page {
        Good,
        Length,
        Chunked,
        Close,
        Unavailable,
    }
    let mode = Arc::new(Mutex::new(Page::Good));
    let count: Arc<Mutex<HashMap<Page, usize>>> = Arc::default();
    let target = health_target(&mode, &count, |now| {
        let flood = |head: &str, chunk: Vec<u8>, total: usize| Act::Flood {
            head: head.as_bytes().to_vec(),
            chunk,
            total,
        };
        let mut chunk = b"1000\r\n".to_vec();
        chunk.extend_from_slice(&[b'x'; 4096]);
        chunk.extend_from_slice(b"\r\n");
        let page = 200 * 1024;
        match now {
            Page::Good => Act::Send(OK_CLOSE.to_vec()),
            Page::Length => flood(
                &format!("HTTP/1.1 200 OK\r\ncontent-length: {page}\r\n\r\n"),
                vec![b'x'; 1024],
                page,
            ),
            Page::Chunked => flood(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                chunk,
                8 << 20,
            ),
            Page::Close => flood("HTTP/1.1 200 OK\r\n\r\n", vec![b'x'; 4096], 8 << 20),
            Page::Unavailable => flood(
                &format!("HTTP/1.1 503 Service Unavailable\r\ncontent-length: {page}\r\n\r\n"),
                vec![b'x'; 1024],
                page,
            ),
        }
    });
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\nhealth_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"2s\", healthy_threshold = 1, unhealthy_threshold = 1 }}\n[[routes]]\nupstream = \"up\"\n",
        target.addr
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let served = |p: Page| count.lock().unwrap().get(&p).copied().unwrap_or(0);
    for page in [Page::Length, Page::Chunked, Page::Close] {
        *mode.lock().unwrap() = page;
        assert!(
            eventually(Duration::from_secs(10), || served(page) >= 3),
            "{page:?}: checked"
        );
        assert_eq!(
            get(gw.addr, "/").status,
            200,
            "{page:?}: the endpoint stays in"
        );
    }
    *mode.lock().unwrap() = Page::Unavailable;
    assert!(
        eventually(Duration::from_secs(10), || get(gw.addr, "/").status == 503),
        "a 503 takes the endpoint out"
    );
}

/// Stray bytes after a complete health answer do not fail the check (the connection is
/// closed after each check), and the endpoint stays in.
#[test]
fn a_health_answer_with_bytes_after_it_passes() {
    let checks = Arc::new(AtomicUsize::new(0));
    let c = checks.clone();
    let target = Server::start(move |path| {
        let mut ok = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        if path == "/healthz" {
            c.fetch_add(1, Ordering::SeqCst);
            ok.extend_from_slice(b"garbage after the answer");
            Act::Send(ok)
        } else {
            Act::Send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec(),
            )
        }
    });
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\nhealth_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"500ms\", unhealthy_threshold = 1 }}\n[[routes]]\nupstream = \"up\"\n",
        target.addr
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    assert!(eventually(Duration::from_secs(5), || checks
        .load(Ordering::SeqCst)
        >= 3));
    assert_eq!(get(gw.addr, "/").status, 200);
}

/// An introspection endpoint that gives no usable answer (here it refuses the gateway's
/// client credentials: 401) makes every bearer token 503. Before, that was logged at debug
/// level only, so a wrong `client_secret` broke every request with nothing in the default
/// log. Now the first failure after a usable answer is a warn line naming the endpoint and
/// the reason, the next ones are not in the default log (no line per request), and the first
/// usable answer after them is an info line.
#[test]
fn an_introspection_endpoint_that_stops_answering_is_logged_once_per_run_of_failures() {
    let refuse = Arc::new(AtomicBool::new(true));
    let r = refuse.clone();
    let idp = Server::start(move |_| {
        if r.load(Ordering::SeqCst) {
            Act::KeepAlive(
                b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic\r\ncontent-length: 0\r\n\r\n"
                    .to_vec(),
            )
        } else {
            Act::KeepAlive(good(ACTIVE.as_bytes()))
        }
    });
    let up = Upstream::echo();
    let toml = config(
        &[up.addr],
        &format!(
            r#"
[auth.introspection.idp]
url = "http://{}/introspect"
client_id = "gateway"
client_secret = "wrong"
timeout = "2s"

[[routes]]
upstream = "up"
auth = "idp"
"#,
            idp.addr
        ),
    );
    let (_bin, log) = run_binary("introspection-log.toml", &toml);
    let (line, _) = line_with(&log, "listening on ");
    let addr: SocketAddr = line
        .split("listening on ")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for i in 0..3 {
        let r = bearer_get(addr, "/", &format!("token-{i}"));
        assert_eq!(r.status, 503, "{i}: {}", r.text());
    }
    assert_eq!(idp.requests(), 3);
    refuse.store(false, Ordering::SeqCst);
    assert_eq!(bearer_get(addr, "/", "token-ok").status, 200);
    let (warn, _) = line_with(&log, "no usable answer");
    assert!(
        warn.contains(" warn ") && warn.contains(&idp.addr.to_string()),
        "{warn}"
    );
    assert!(warn.contains("status 401"), "{warn}");
    // Nothing for the second and third failures; then the recovery.
    let (back, between) = line_with(&log, "answering again");
    assert!(back.contains(" info "), "{back}");
    assert!(
        !between.iter().any(|l| l.contains("introspection")),
        "one line per run of failures: {between:?}"
    );
    // A new run of failures is logged again.
    refuse.store(true, Ordering::SeqCst);
    assert_eq!(bearer_get(addr, "/", "token-3").status, 503);
    // (The token judged active stays cached.)
    assert_eq!(bearer_get(addr, "/", "token-ok").status, 200);
    let (again, _) = line_with(&log, "no usable answer");
    assert!(again.contains(" warn "), "{again}");
}
