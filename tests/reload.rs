//! Hot reload and binary upgrade, over real sockets: in-process gateways for the reload
//! semantics, the real binary for SIGHUP and the hand-over between two processes.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ringway::config::{Config, DriverChoice};
use ringway::reload::{ListenerFate, ReloadError};
use support::*;

fn parse(toml: &str) -> Config {
    Config::parse(toml, "reload.toml").unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"))
}

/// A loopback upstream that answers 200 with `name` as the body.
fn named(name: &'static str) -> Upstream {
    Upstream::start(move |_| Reply::Raw(ok_response(name.as_bytes())))
}

/// One listener on port 0, groups `a` and `b`, and `/x` routed to `target`.
fn two_groups(a: SocketAddr, b: SocketAddr, target: &str, extra: &str) -> String {
    format!(
        "[server]\nworkers = 2\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.a]\nendpoints = [{{ address = \"{a}\" }}]\n\n[upstreams.b]\nendpoints = [{{ address = \"{b}\" }}]\n\n[[routes]]\nname = \"x\"\npath_prefix = \"/x\"\nupstream = \"{target}\"\n{extra}\n"
    )
}

fn get_on(c: &mut Client, path: &str) -> Resp {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    c.read_response().expect("a response")
}

/// A scratch directory under the target dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ringway-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        // Written whole then renamed, as an editor or a deploy tool does, so a reader never
        // sees half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn reload_swaps_routes_for_the_next_request_on_a_keep_alive_connection() {
    for driver in DRIVERS {
        let (a, b) = (named("A"), named("B"));
        let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", ""), driver);
        let mut c = Client::connect(gw.addr);
        assert_eq!(get_on(&mut c, "/x").text(), "A");
        let rep = gw
            .gateway()
            .reload(parse(&two_groups(a.addr, b.addr, "b", "")))
            .expect("valid config reloads");
        assert_eq!(rep.generation, 1);
        assert_eq!(rep.routes_added, vec!["x".to_string()]);
        assert_eq!(rep.groups_kept, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(rep.listeners.len(), 1);
        assert_eq!(rep.listeners[0].change, ListenerFate::Kept);
        assert_eq!(rep.listeners[0].bound, gw.addr);
        // The same connection, its next request: the new route.
        assert_eq!(get_on(&mut c, "/x").text(), "B");
        assert_eq!(get_on(&mut c, "/x").text(), "B");
        // A new connection on the kept listener too.
        assert_eq!(get(gw.addr, "/x").text(), "B");
    }
}

#[test]
fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    for driver in DRIVERS {
        let slow = Upstream::slow(Duration::from_millis(800), b"old");
        let b = named("new");
        let cfg = |target: &str| two_groups(slow.addr, b.addr, target, "");
        let gw = TestGateway::start(&cfg("a"), driver);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(slow.wait_for(Duration::from_secs(5), |r| !r.is_empty()));
        // Group `a` leaves the config while its request is in flight.
        let next = format!(
            "[server]\nworkers = 2\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.b]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nname = \"x\"\npath_prefix = \"/x\"\nupstream = \"b\"\n",
            b.addr
        );
        let rep = gw.gateway().reload(parse(&next)).expect("reloads");
        assert_eq!(rep.groups_removed, vec!["a".to_string()]);
        let r = c.read_response().expect("the slow response");
        assert_eq!((r.status, r.text().as_str()), (200, "old"));
        // The connection stays open and its next request takes the new config.
        assert_eq!(get_on(&mut c, "/x").text(), "new");
    }
}

#[test]
fn a_long_response_is_not_cut_by_reloads() {
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let total = 8 << 20;
    let up = Upstream::start(move |_| Reply::Stream {
        head: format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").into_bytes(),
        total,
        written: w.clone(),
    });
    let b = named("B");
    let gw = TestGateway::start(&two_groups(up.addr, b.addr, "a", ""), DriverChoice::Auto);
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    // Read slowly, reloading between reads, alternating the route's target.
    let mut got = 0usize;
    let mut head_end = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut acc = Vec::new();
    let mut reloads = 0;
    while head_end.is_none_or(|h| got < h + total) {
        let n = s.read(&mut buf).expect("the stream goes on");
        assert!(n > 0, "the response was cut after {got} bytes");
        got += n;
        if head_end.is_none() {
            acc.extend_from_slice(&buf[..n]);
            head_end = acc.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
        }
        if reloads < 6 && got > reloads * (1 << 20) {
            let target = if reloads % 2 == 0 { "b" } else { "a" };
            gw.gateway()
                .reload(parse(&two_groups(up.addr, b.addr, target, "")))
                .expect("reloads");
            reloads += 1;
        }
    }
    assert_eq!(reloads, 6);
    assert_eq!(got, head_end.unwrap() + total);
}

#[test]
fn an_invalid_config_is_refused_with_the_check_message_and_changes_nothing() {
    let (a, b) = (named("A"), named("B"));
    let dir = Scratch::new("invalid");
    let good = two_groups(a.addr, b.addr, "a", "");
    let gw = TestGateway::start(&good, DriverChoice::Auto);
    let bad = dir.write("bad.toml", &two_groups(a.addr, b.addr, "nowhere", ""));
    let e = gw.gateway().reload_file(&bad).expect_err("refused");
    let ReloadError::Invalid(ce) = &e else {
        panic!("not an invalid-config error: {e}");
    };
    assert_eq!(ce.key, "routes[0].upstream");
    assert!(ce.line.is_some());
    // Word for word what `ringway check` says.
    let out = Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&out.stderr);
    assert!(
        check.contains(&format!("invalid config: {ce}")),
        "check said {check:?}, reload said {e}"
    );
    assert_eq!(e.to_string(), format!("invalid config: {ce}"));
    assert!(e
        .to_string()
        .contains(&format!("{}:{}", bad.display(), ce.line.unwrap())));
    // Nothing changed.
    assert_eq!(gw.gateway().reload_generation(), 0);
    assert_eq!(get(gw.addr, "/x").text(), "A");
}

#[test]
fn an_unchanged_group_keeps_its_pool_and_a_changed_one_starts_fresh() {
    let (a, b) = (named("A"), named("B"));
    // One worker, so that every request meets the same pool.
    let cfg =
        |extra: &str| two_groups(a.addr, b.addr, "a", extra).replace("workers = 2", "workers = 1");
    let gw = TestGateway::start(&cfg(""), DriverChoice::Auto);
    for _ in 0..3 {
        assert_eq!(get(gw.addr, "/x").text(), "A");
    }
    assert_eq!(a.conns(), 1);
    // A new route, group `a` unchanged: its pooled connection serves on.
    let rep = gw
        .gateway()
        .reload(parse(&cfg(
            "\n[[routes]]\npath = \"/y\"\ndirect = { status = 200, body = \"y\" }\n",
        )))
        .unwrap();
    assert!(rep.groups_kept.contains(&"a".to_string()));
    for _ in 0..3 {
        assert_eq!(get(gw.addr, "/x").text(), "A");
    }
    assert_eq!(get(gw.addr, "/y").text(), "y");
    assert_eq!(
        a.conns(),
        1,
        "the upstream saw a new connection after a reload"
    );
    // Group `a` changed (its idle timeout): rebuilt, with a fresh pool.
    let changed = cfg("").replace(
        "[upstreams.b]",
        "[upstreams.a.outlier]\nconsecutive_failures = 7\n\n[upstreams.b]",
    );
    let rep = gw.gateway().reload(parse(&changed)).unwrap();
    assert_eq!(rep.groups_changed, vec!["a".to_string()]);
    assert_eq!(get(gw.addr, "/x").text(), "A");
    assert_eq!(a.conns(), 2);
}

#[test]
fn ejections_of_an_unchanged_group_carry_over() {
    let good = named("good");
    let dead = refusing_addr();
    // Two endpoints; one failure ejects for a minute. One worker (one balancer).
    let cfg = |extra: &str| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\" }}]\nbalance = \"round_robin\"\n[upstreams.u.outlier]\nconsecutive_failures = 1\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n\n[[routes]]\nupstream = \"u\"\n{extra}\n",
            dead.addr, good.addr
        )
    };
    let gw = TestGateway::start(&cfg(""), DriverChoice::Auto);
    // Until the dead endpoint is ejected, some requests meet it (retried or 502).
    for _ in 0..4 {
        let _ = get(gw.addr, "/");
    }
    let before = good.hits();
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    assert_eq!(good.hits(), before + 6, "the dead endpoint is ejected");
    gw.gateway()
        .reload(parse(&cfg(
            "\n[[routes]]\npath = \"/other\"\ndirect = { status = 204 }\n",
        )))
        .unwrap();
    // Still ejected after the reload: every request goes to the good endpoint at once.
    let before = good.hits();
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    assert_eq!(good.hits(), before + 6);
}

/// Issue 11 ("health state, ejections ... of unchanged ... endpoints carry over"): a reload
/// that changes a group (here only another endpoint's weight) keeps the ejection of an
/// endpoint whose address is unchanged; before, the rebuilt group started every endpoint
/// fresh and the next request went to the dead endpoint (502).
#[test]
fn ejections_of_an_unchanged_endpoint_carry_over_when_its_group_changes() {
    let good = named("good");
    let dead = refusing_addr();
    let cfg = |weight: u32| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\", weight = {weight} }}]\nbalance = \"round_robin\"\n[upstreams.u.outlier]\nconsecutive_failures = 1\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n\n[[routes]]\nupstream = \"u\"\n",
            dead.addr, good.addr
        )
    };
    let gw = TestGateway::start(&cfg(1), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    // Until the dead endpoint is ejected, some requests meet it (502).
    for _ in 0..4 {
        let _ = get(gw.addr, "/");
    }
    let rep = gw.gateway().reload(parse(&cfg(2))).unwrap();
    assert_eq!(rep.groups_changed, vec!["u".to_string()]);
    let ups = request(
        adm,
        b"GET /upstreams HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .json();
    let e0 = &ups["upstreams"][0]["endpoints"][0];
    assert_eq!(e0["ejected"], true, "{ups}");
    assert_eq!(e0["ejections"], 1, "{ups}");
    // Every request goes to the good endpoint at once: none meets the dead one.
    let before = good.hits();
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    assert_eq!(good.hits(), before + 6);
}

/// Issue 11: the active health checks' verdict on an endpoint whose address is unchanged
/// carries over a reload that changes its group; the new checker starts from it.
#[test]
fn active_health_of_an_unchanged_endpoint_carries_over_when_its_group_changes() {
    let good = named("good");
    let dead = refusing_addr();
    let cfg = |weight: u32| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}, {{ address = \"{}\", weight = {weight} }}]\nbalance = \"round_robin\"\noutlier = {{ consecutive_failures = 0 }}\n[upstreams.u.health_check]\npath = \"/\"\ninterval = \"100ms\"\nunhealthy_threshold = 3\nhealthy_threshold = 1\n\n[[routes]]\nupstream = \"u\"\n",
            dead.addr, good.addr
        )
    };
    let gw = TestGateway::start(&cfg(1), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    let health = || {
        let ups = request(
            adm,
            b"GET /upstreams HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .json();
        ups["upstreams"][0]["endpoints"][0]["health"].clone()
    };
    // The checker takes the dead endpoint out (bounded wait on the admin API's answer).
    let mut out = false;
    for _ in 0..200 {
        if health() == "unhealthy" {
            out = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(out, "the health checker never took the dead endpoint out");
    let rep = gw.gateway().reload(parse(&cfg(2))).unwrap();
    assert_eq!(rep.groups_changed, vec!["u".to_string()]);
    assert_eq!(health(), "unhealthy");
    let before = good.hits();
    for _ in 0..6 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    // The good endpoint's hits include its health checks: at least the 6 requests.
    assert!(good.hits() >= before + 6);
}

#[test]
fn listeners_are_added_and_removed_by_a_reload() {
    for driver in DRIVERS {
        let (a, b) = (named("A"), named("B"));
        let one = two_groups(a.addr, b.addr, "a", "");
        let two = one.replacen(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"second\"\n",
            1,
        );
        let gw = TestGateway::start(&one, driver);
        let rep = gw.gateway().reload(parse(&two)).unwrap();
        let added: Vec<_> = rep
            .listeners
            .iter()
            .filter(|l| l.change == ListenerFate::Added)
            .collect();
        assert_eq!(added.len(), 1);
        let second = added[0].bound;
        assert_ne!(second.port(), 0);
        assert_eq!(gw.gateway().listener_addrs(), vec![gw.addr, second]);
        assert_eq!(get(second, "/x").text(), "A");
        // A keep-alive connection on the listener about to go.
        let mut kept = Client::connect(second);
        assert_eq!(get_on(&mut kept, "/x").text(), "A");
        let rep = gw.gateway().reload(parse(&one)).unwrap();
        assert!(rep
            .listeners
            .iter()
            .any(|l| l.change == ListenerFate::Removed && l.bound == second));
        // It drains: the idle connection is closed within a tick or two, new connections are
        // refused; the first listener serves on.
        kept.read_timeout(Duration::from_secs(5));
        assert!(
            kept.read_response().is_none(),
            "the drained connection closes"
        );
        assert!(
            eventually(Duration::from_secs(5), || TcpStream::connect(second)
                .is_err()),
            "the removed listener still accepts"
        );
        assert_eq!(get(gw.addr, "/x").text(), "A");
        assert_eq!(gw.gateway().listener_addrs(), vec![gw.addr]);
    }
}

/// A reload that removes a listener while a keep-alive answer is being written on one of its
/// connections, its head already sent without `Connection: close`, with the next request
/// pipelined behind it: that request is answered before the connection closes (RFC 9112
/// §9.3.2), as the README promises ("their connections close after their request in flight").
/// Before, the connection closed with it unread.
#[test]
fn a_request_pipelined_on_a_removed_listeners_connection_is_answered() {
    for driver in DRIVERS {
        let (up, head_sent, go) = half_sent_upstream("/x/slow", b"A");
        let one = two_groups(up.addr, up.addr, "a", "");
        let two = one.replacen(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"second\"\n",
            1,
        );
        let gw = TestGateway::start(&two, driver);
        let second = gw.addrs()[1];
        // A keep-alive connection idle when the reload comes.
        let mut idle = Client::connect(second);
        idle.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = idle.read_response().expect("a response");
        assert_eq!(
            (r.status, r.header("connection")),
            (200, None),
            "{driver:?}"
        );
        let mut c = Client::connect(second);
        c.send(b"GET /x/slow HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(head_sent.wait(Duration::from_secs(10)), "{driver:?}");
        let rep = gw.gateway().reload(parse(&one)).unwrap();
        assert!(rep
            .listeners
            .iter()
            .any(|l| l.change == ListenerFate::Removed && l.bound == second));
        go.set();
        let r = c.read_response().expect("the first response");
        assert_eq!((r.status, r.text().as_str()), (200, "slow"), "{driver:?}");
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("{driver:?}: the pipelined request is answered"));
        assert_eq!((r.status, r.text().as_str()), (200, "A"), "{driver:?}");
        // The connection's last answer says so (RFC 9112 §9.6), as during a shutdown.
        assert_eq!(r.header("connection"), Some("close"), "{driver:?}");
        // Closed, not merely quiet: a read that times out is no close.
        assert!(
            c.is_closed(Duration::from_secs(5)),
            "{driver:?}: then it closes"
        );
        // The idle connection's next request, on its way as the listener goes, is answered,
        // with `Connection: close`.
        idle.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = idle
            .read_response()
            .unwrap_or_else(|| panic!("{driver:?}: the idle connection's request is answered"));
        assert_eq!(
            (r.status, r.header("connection")),
            (200, Some("close")),
            "{driver:?}"
        );
        assert!(idle.is_closed(Duration::from_secs(5)), "{driver:?}");
    }
}

#[test]
fn reloads_under_load_fail_no_request() {
    let (a, b) = (named("A"), named("B"));
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", ""), DriverChoice::Auto);
    let addr = gw.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for t in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        clients.push(thread::spawn(move || {
            // Bounded: at most this many requests per thread, whatever happens.
            let mut c = Client::connect(addr);
            for i in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Odd threads open a new connection every 10 requests.
                if t % 2 == 1 && i % 10 == 0 {
                    c = Client::connect(addr);
                }
                if c.try_send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n").is_err() {
                    failures.lock().unwrap().push("write failed".into());
                    c = Client::connect(addr);
                    continue;
                }
                match c.read_response() {
                    Some(r) if r.status == 200 && (r.text() == "A" || r.text() == "B") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.text())),
                    None => {
                        failures.lock().unwrap().push("no response".into());
                        c = Client::connect(addr);
                    }
                }
            }
        }));
    }
    assert!(eventually(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        > 100));
    for i in 0..30 {
        let target = if i % 2 == 0 { "b" } else { "a" };
        gw.gateway()
            .reload(parse(&two_groups(a.addr, b.addr, target, "")))
            .expect("reloads");
        if i == 15 {
            // An invalid config during the load changes nothing.
            assert!(gw
                .gateway()
                .reload_file(Path::new("/nonexistent/ringway.toml"))
                .is_err());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "failed requests: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(gw.gateway().reload_generation(), 30);
}

// ---------------------------------------------------------------------------------------------
// The binary: SIGHUP and the hand-over.

/// A `ringway` process; its stderr lines are collected by a thread. Killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    seen: mpsc::Receiver<()>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringway"))
            .args(args)
            .env("RINGWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ringway starts");
        let err = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, seen) = mpsc::channel();
        let l = lines.clone();
        let reader = thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push(line);
                let _ = tx.send(());
            }
        });
        Proc {
            child,
            lines,
            seen,
            reader: Some(reader),
        }
    }

    /// Waits for a log line containing `text` (the `n`th such line), up to `limit`.
    fn wait_line(&self, text: &str, n: usize, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            {
                let lines = self.lines.lock().unwrap();
                if let Some(l) = lines.iter().filter(|l| l.contains(text)).nth(n - 1) {
                    return Some(l.clone());
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.seen.recv_timeout(left).is_err() {
                let lines = self.lines.lock().unwrap();
                return lines
                    .iter()
                    .filter(|l| l.contains(text))
                    .nth(n - 1)
                    .cloned();
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        let line = self
            .wait_line("listening on ", 1, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no listening line: {:?}", self.lines.lock().unwrap()));
        let rest = line.split("listening on ").nth(1).unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits (bounded) for the process to exit; true when it did.
    fn wait_exit(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[test]
fn sighup_reloads_the_running_binary() {
    let (a, b) = (named("A"), named("B"));
    let dir = Scratch::new("sighup");
    let path = dir.write("ringway.toml", &two_groups(a.addr, b.addr, "a", ""));
    let p = Proc::spawn(&["run", "-c", path.to_str().unwrap()]);
    let addr = p.addr();
    let mut c = Client::connect(addr);
    assert_eq!(get_on(&mut c, "/x").text(), "A");
    dir.write("ringway.toml", &two_groups(a.addr, b.addr, "b", ""));
    p.signal(libc::SIGHUP);
    assert!(
        p.wait_line("reload #1", 1, Duration::from_secs(10))
            .is_some(),
        "no reload line: {:?}",
        p.lines.lock().unwrap()
    );
    assert_eq!(get_on(&mut c, "/x").text(), "B");
    // An invalid file: refused with the check message, traffic unchanged.
    dir.write("ringway.toml", &two_groups(a.addr, b.addr, "nowhere", ""));
    p.signal(libc::SIGHUP);
    let refused = p
        .wait_line("reload refused", 1, Duration::from_secs(10))
        .expect("a refusal line");
    assert!(
        refused.contains(&format!("{}:", path.display())) && refused.contains("routes[0].upstream"),
        "{refused}"
    );
    assert_eq!(get_on(&mut c, "/x").text(), "B");
    p.signal(libc::SIGTERM);
}

/// A reload logs the new config's warnings (`Config::warnings`: what `ringway check` prints and
/// the start logs), one line each: a JWT provider that checks neither issuer nor audience
/// (RFC 8725 §3.8, §3.9) and a `[cache.redis] max_entry_bytes` no link moves within its
/// `timeout` (read at start only, so also named as not reloaded; the warning is about the
/// file). A refused reload changes nothing and logs only why.
#[test]
fn a_reload_logs_the_new_configs_warnings() {
    let up = named("A");
    let dir = Scratch::new("sighup-warnings");
    let path = dir.write("ringway.toml", &two_groups(up.addr, up.addr, "a", ""));
    let p = Proc::spawn(&["run", "-c", path.to_str().unwrap()]);
    let addr = p.addr();
    let warned = "\n[auth.jwt.open]\nsecret = \"test-only-secret-of-32-bytes-min\"\n\n[cache.redis]\naddress = \"127.0.0.1:9\"\ntimeout = \"20ms\"\nmax_entry_bytes = \"64MiB\"\n";
    dir.write("ringway.toml", &two_groups(up.addr, up.addr, "a", warned));
    p.signal(libc::SIGHUP);
    let limit = Duration::from_secs(10);
    let lines = || p.lines.lock().unwrap().clone();
    for text in [
        "reload #1: auth.jwt.open: checks neither the issuer nor the audience",
        "reload #1: cache.redis.max_entry_bytes: 64.0 MiB cannot be moved within `timeout` (20 ms)",
    ] {
        let line = p
            .wait_line(text, 1, limit)
            .unwrap_or_else(|| panic!("no line with {text:?}: {:?}", lines()));
        assert!(line.contains(" warn reload #1: "), "{line}");
    }
    // Refused (no such upstream): only the refusal. Then a reload without warnings; every line
    // of the refused one came before its line.
    dir.write(
        "ringway.toml",
        &two_groups(up.addr, up.addr, "nowhere", warned),
    );
    p.signal(libc::SIGHUP);
    p.wait_line("reload refused", 1, limit)
        .unwrap_or_else(|| panic!("no refusal: {:?}", lines()));
    dir.write("ringway.toml", &two_groups(up.addr, up.addr, "a", ""));
    p.signal(libc::SIGHUP);
    p.wait_line("reload #2", 1, limit)
        .unwrap_or_else(|| panic!("no second reload: {:?}", lines()));
    for name in ["auth.jwt.open: ", "cache.redis.max_entry_bytes: "] {
        let n = lines().iter().filter(|l| l.contains(name)).count();
        assert_eq!(n, 1, "{name}: {:?}", lines());
    }
    let mut c = Client::connect(addr);
    assert_eq!(get_on(&mut c, "/x").text(), "A");
    p.signal(libc::SIGTERM);
}

/// The reload report (what `POST /reload` answers) carries the new config's warnings.
#[test]
fn the_reload_report_carries_the_new_configs_warnings() {
    let up = named("A");
    let gw = TestGateway::start(&two_groups(up.addr, up.addr, "a", ""), DriverChoice::Auto);
    let warned = "\n[auth.jwt.open]\nsecret = \"test-only-secret-of-32-bytes-min\"\n";
    let rep = gw
        .gateway()
        .reload(parse(&two_groups(up.addr, up.addr, "a", warned)))
        .unwrap();
    assert_eq!(rep.warnings.len(), 1, "{:?}", rep.warnings);
    assert!(
        rep.warnings[0].starts_with("auth.jwt.open: "),
        "{:?}",
        rep.warnings
    );
    let rep = gw
        .gateway()
        .reload(parse(&two_groups(up.addr, up.addr, "a", "")))
        .unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
}

/// A refusal whose reason spans lines (the TOML parser's message for a syntax error) is still
/// one event line, with the file, line, column and the whole reason on it: every line the
/// process writes starts with its time, so a log reader never sees a line without one.
#[test]
fn a_reload_refusal_for_a_syntax_error_is_one_log_line() {
    let up = named("A");
    let dir = Scratch::new("sighup-syntax");
    let path = dir.write("ringway.toml", &two_groups(up.addr, up.addr, "a", ""));
    let p = Proc::spawn(&["run", "-c", path.to_str().unwrap()]);
    let addr = p.addr();
    dir.write("ringway.toml", "[server\nworkers = 1\n");
    p.signal(libc::SIGHUP);
    let refused = p
        .wait_line("reload refused", 1, Duration::from_secs(10))
        .expect("a refusal line");
    assert!(
        refused.contains(&format!("{}:1:", path.display())) && refused.contains("expected"),
        "the reason is on the refusal's line: {refused}"
    );
    // The old config keeps serving.
    let mut c = Client::connect(addr);
    assert_eq!(get_on(&mut c, "/x").text(), "A");
    p.signal(libc::SIGTERM);
    let lines = p.lines.lock().unwrap().clone();
    for l in &lines {
        assert!(
            l.len() > 24 && l.as_bytes()[..4].iter().all(u8::is_ascii_digit) && &l[23..24] == "Z",
            "a line without its time: {l:?} in {lines:?}"
        );
    }
}

/// One request on a new connection (`Connection: close`): the 200 body, or what went wrong
/// (`connect: ...` when the connection was refused).
fn one_shot(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /who HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    // Bounded: a response larger than this is a failure too.
    s.take(64 * 1024)
        .read_to_end(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("no response ({} bytes)", out.len()));
    };
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    Ok(body.to_string())
}

#[test]
fn a_binary_upgrade_refuses_no_connection() {
    let dir = Scratch::new("upgrade");
    let sock = dir.0.join("upgrade.sock");
    let cfg = |port: u16, body: &str| {
        format!(
            "[server]\nworkers = 2\nshutdown_timeout = \"5s\"\nupgrade_socket = \"{}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[[routes]]\npath = \"/who\"\ndirect = {{ status = 200, body = \"{body}\" }}\n",
            sock.display()
        )
    };
    let first = dir.write("old.toml", &cfg(0, "old"));
    let mut old = Proc::spawn(&["run", "-c", first.to_str().unwrap()]);
    let addr = old.addr();
    assert!(eventually(Duration::from_secs(10), || sock.exists()));
    // The new config names the port the old process holds: its sockets are adopted.
    let second = dir.write("new.toml", &cfg(addr.port(), "new"));

    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen_new = Arc::new(AtomicUsize::new(0));
    let seen_old = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, refused, failed, seen_new, seen_old) = (
            stop.clone(),
            refused.clone(),
            failed.clone(),
            seen_new.clone(),
            seen_old.clone(),
        );
        clients.push(thread::spawn(move || {
            // A new connection per request, bounded in count.
            for _ in 0..50_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match one_shot(addr) {
                    Err(e) if e.starts_with("connect") => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        failed.lock().unwrap().push(e);
                    }
                    Err(e) => failed.lock().unwrap().push(e),
                    Ok(body) if body == "new" => {
                        seen_new.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(body) if body == "old" => {
                        seen_old.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(body) => failed.lock().unwrap().push(body),
                }
            }
        }));
    }
    assert!(eventually(Duration::from_secs(10), || seen_old
        .load(Ordering::Relaxed)
        > 50));
    // `ringway upgrade` is `run --takeover <upgrade_socket>`.
    let new = Proc::spawn(&["upgrade", "-c", second.to_str().unwrap()]);
    assert!(
        old.wait_exit(Duration::from_secs(20)),
        "the old process did not exit: {:?}",
        old.lines.lock().unwrap()
    );
    assert!(old
        .wait_line("handed over", 1, Duration::from_secs(1))
        .is_some());
    // Traffic after the old process is gone.
    let after = seen_new.load(Ordering::Relaxed);
    assert!(eventually(Duration::from_secs(10), || seen_new
        .load(Ordering::Relaxed)
        > after + 50));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert!(new
        .wait_line("takeover: received", 1, Duration::from_secs(1))
        .is_some());
    let failed = failed.lock().unwrap();
    eprintln!(
        "upgrade: {} answered by the old process, {} by the new, {} refused, {} failed",
        seen_old.load(Ordering::Relaxed),
        seen_new.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        failed.len()
    );
    assert_eq!(
        refused.load(Ordering::Relaxed),
        0,
        "refused: {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(10)]
    );
    // The new process also serves hand-overs now, on the same path.
    assert!(eventually(Duration::from_secs(10), || sock.exists()));
    new.signal(libc::SIGTERM);
}

#[test]
fn an_upgrade_socket_path_too_long_for_a_unix_address_is_refused_with_its_key() {
    let long = format!("/tmp/{}.sock", "s".repeat(120));
    let src = format!(
        "[server]\nupgrade_socket = \"{long}\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n"
    );
    let e = Config::parse(&src, "up.toml").expect_err("refused");
    assert_eq!(e.key, "server.upgrade_socket");
    assert_eq!(e.line, Some(2));
    assert!(e.reason.contains("107"), "{e}");
    let ok = src.replace(&long, "/tmp/ringway.sock");
    assert_eq!(
        Config::parse(&ok, "up.toml")
            .unwrap()
            .server
            .upgrade_socket
            .as_deref(),
        Some("/tmp/ringway.sock")
    );
}

/// Names of the threads of process `pid` (as the kernel truncates them: 15 bytes).
fn thread_names(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                out.push(n.trim().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn reloads_leave_no_thread_behind() {
    let a = named("A");
    let jwks = Upstream::start(|_| Reply::Raw(ok_response(br#"{"keys":[]}"#)));
    let dir = Scratch::new("threads");
    // Variants differ in the health-check interval (the checker thread is replaced) and in a
    // JWKS URL provider (its fetcher thread starts, then stops).
    let cfg = |i: usize| {
        let provider = if i % 2 == 1 {
            format!("[auth.jwt.idp]\njwks_url = \"http://{}/jwks\"\n", jwks.addr)
        } else {
            String::new()
        };
        format!(
            "[server]\nworkers = 2\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.a]\nendpoints = [{{ address = \"{}\" }}]\n[upstreams.a.health_check]\npath = \"/\"\ninterval = \"{}ms\"\n\n[[routes]]\nupstream = \"a\"\n\n{provider}",
            a.addr,
            200 + i % 2 * 100
        )
    };
    let path = dir.write("ringway.toml", &cfg(0));
    let p = Proc::spawn(&["run", "-c", path.to_str().unwrap()]);
    let addr = p.addr();
    assert_eq!(get(addr, "/").text(), "A");
    let pid = p.child.id();
    assert!(eventually(Duration::from_secs(5), || thread_names(pid)
        .iter()
        .any(|n| n == "ringway-health")));
    let at_start = thread_names(pid);
    for i in 1..=20 {
        dir.write("ringway.toml", &cfg(i));
        p.signal(libc::SIGHUP);
        assert!(
            p.wait_line(&format!("reload #{i}:"), 1, Duration::from_secs(10))
                .is_some(),
            "reload {i}: {:?}",
            p.lines.lock().unwrap()
        );
        // A new thread names itself once it runs: wait for the names, bounded.
        let expected = |names: &[String]| {
            names
                .iter()
                .filter(|n| n.starts_with("ringway-jwks"))
                .count()
                == i % 2
                && names.iter().filter(|n| *n == "ringway-health").count() == 1
                && names.len() == at_start.len() + i % 2
        };
        assert!(
            eventually(Duration::from_secs(5), || expected(&thread_names(pid))),
            "after reload {i}: {:?} (at start {at_start:?})",
            thread_names(pid)
        );
    }
    // An even count of reloads: the same threads as at start.
    assert!(eventually(Duration::from_secs(5), || thread_names(pid) == at_start));
    assert_eq!(get(addr, "/").text(), "A");
    p.signal(libc::SIGTERM);
}

#[test]
fn a_reload_rereads_the_listener_certificates() {
    use support::pki::{pki, provider, roots};
    let p = pki();
    let dir = Scratch::new("tls");
    let cert = dir.0.join("listener.pem");
    let key = dir.0.join("listener.key");
    std::fs::write(&cert, p.read("a-chain.pem")).unwrap();
    std::fs::write(&key, p.read("a.key")).unwrap();
    let up = named("up");
    let cfg = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nupstream = \"u\"\n",
        cert.display(),
        key.display(),
        up.addr
    );
    let gw = TestGateway::start(&cfg, DriverChoice::Auto);
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots("ca.pem"))
            .with_no_client_auth(),
    );
    let hello = |sni: &str| -> Result<String, String> {
        let mut c = Client::connect_tls(gw.addr, sni, client.clone()).map_err(|e| e.to_string())?;
        c.try_send(format!("GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        c.read_response()
            .map(|r| r.text())
            .ok_or_else(|| "no response".to_string())
    };
    assert_eq!(hello("a.test").as_deref(), Ok("up"));
    assert!(hello("x.wild.test").is_err());
    // An unchanged reload first: the listener keeps its rustls config (and sessions), and
    // what its files held is now known to the next reload.
    gw.gateway().reload(parse(&cfg)).expect("reloads");
    assert_eq!(hello("a.test").as_deref(), Ok("up"));
    // A keep-alive TLS connection open across the reload keeps its session.
    let mut open = Client::connect_tls(gw.addr, "a.test", client.clone()).unwrap();
    // The files are replaced (the same paths), then the config is reloaded unchanged: the
    // new certificate is served (not the kept config).
    std::fs::write(&cert, p.read("wild-chain.pem")).unwrap();
    std::fs::write(&key, p.read("wild.key")).unwrap();
    gw.gateway().reload(parse(&cfg)).expect("reloads");
    assert_eq!(hello("x.wild.test").as_deref(), Ok("up"));
    assert!(hello("a.test").is_err());
    open.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert_eq!(open.read_response().expect("a response").text(), "up");
}

#[test]
fn rate_limit_buckets_of_an_unchanged_limit_carry_over() {
    let up = named("ok");
    let cfg = |rate: u32, extra: &str| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}]\n\n{extra}\n[[routes]]\nname = \"limited\"\nupstream = \"u\"\nrate_limits = [{{ key = \"client_ip\", rate = {rate}, per = \"1m\" }}]\n",
            up.addr
        )
    };
    let gw = TestGateway::start(&cfg(3, ""), DriverChoice::Auto);
    for _ in 0..3 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    assert_eq!(get(gw.addr, "/").status, 429);
    // Another route with its own limit, ahead of it (a numbering by position would shift);
    // the limit unchanged: its spent bucket stays spent.
    gw.gateway()
        .reload(parse(&cfg(
            3,
            "[[routes]]\nname = \"other\"\npath = \"/other\"\ndirect = { status = 204 }\nrate_limits = [{ key = \"client_ip\", rate = 100, per = \"1m\" }]\n",
        )))
        .unwrap();
    assert_eq!(get(gw.addr, "/").status, 429);
    assert_eq!(get(gw.addr, "/other").status, 204);
    // The limit changed: a new bucket, full.
    gw.gateway().reload(parse(&cfg(4, ""))).unwrap();
    for _ in 0..4 {
        assert_eq!(get(gw.addr, "/").status, 200);
    }
    assert_eq!(get(gw.addr, "/").status, 429);
}

#[test]
fn consumers_and_api_keys_are_reloaded() {
    use ringway::auth::apikey::key_hash_hex;
    let up = named("ok");
    let cfg = |key: &[u8]| {
        format!(
            "[server]\nworkers = 2\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{}\" }}]\n\n[auth.api_key]\nquery = \"api_key\"\n\n[[consumers]]\nname = \"app\"\napi_keys = [\"{}\"]\n\n[[routes]]\nupstream = \"u\"\nauth = \"api_key\"\n",
            up.addr,
            key_hash_hex(key)
        )
    };
    let gw = TestGateway::start(&cfg(b"old-key-0001"), DriverChoice::Auto);
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/?api_key=old-key-0001").status, 200);
    assert_eq!(get_on(&mut c, "/?api_key=new-key-0002").status, 401);
    gw.gateway().reload(parse(&cfg(b"new-key-0002"))).unwrap();
    // The same keep-alive connection: the rotated key set applies to its next request.
    assert_eq!(get_on(&mut c, "/?api_key=new-key-0002").status, 200);
    assert_eq!(get_on(&mut c, "/?api_key=old-key-0001").status, 401);
}

#[test]
fn a_new_process_that_fails_to_start_leaves_the_old_one_serving() {
    let dir = Scratch::new("upgrade-fail");
    let sock = dir.0.join("upgrade.sock");
    let held = refusing_addr();
    let cfg = |port: u16, extra: &str| {
        format!(
            "[server]\nworkers = 2\nupgrade_socket = \"{}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n{extra}\n[[routes]]\npath = \"/who\"\ndirect = {{ status = 200, body = \"old\" }}\n",
            sock.display()
        )
    };
    let first = dir.write("old.toml", &cfg(0, ""));
    let old = Proc::spawn(&["run", "-c", first.to_str().unwrap()]);
    let addr = old.addr();
    assert!(eventually(Duration::from_secs(10), || sock.exists()));
    // The new config also wants an address another socket holds: the new process receives
    // the sockets, fails to start, and exits without confirming.
    let second = dir.write(
        "new.toml",
        &cfg(
            addr.port(),
            &format!("\n[[listeners]]\naddress = \"{}\"\n", held.addr),
        ),
    );
    let mut new = Proc::spawn(&["upgrade", "-c", second.to_str().unwrap()]);
    assert!(
        new.wait_exit(Duration::from_secs(20)),
        "the new process should fail"
    );
    assert!(new.child.try_wait().unwrap().is_some_and(|s| !s.success()));
    assert!(
        old.wait_line("hand-over failed", 1, Duration::from_secs(10))
            .is_some(),
        "{:?}",
        old.lines.lock().unwrap()
    );
    // The old process serves on, on the same sockets, and still offers hand-overs.
    for _ in 0..20 {
        assert_eq!(one_shot(addr).as_deref(), Ok("old"));
    }
    assert!(sock.exists());
    assert!(
        old.child.id() > 0
            && old
                .wait_line("handed over", 1, Duration::from_millis(1))
                .is_none()
    );
    old.signal(libc::SIGTERM);
}

#[test]
fn reloads_from_other_threads_are_serialised() {
    let (a, b) = (named("A"), named("B"));
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", ""), DriverChoice::Auto);
    // An admin thread and a signal thread at once, as `POST /reload` and SIGHUP would.
    let g = gw.gateway();
    assert!(matches!(g.reload_config_file(), Err(ReloadError::NoFile)));
    let generations: Vec<u64> = thread::scope(|s| {
        let ts: Vec<_> = (0..4)
            .map(|i| {
                let cfg = two_groups(a.addr, b.addr, if i % 2 == 0 { "b" } else { "a" }, "");
                s.spawn(move || g.reload(parse(&cfg)).expect("reloads").generation)
            })
            .collect();
        ts.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut sorted = generations.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 2, 3, 4], "{generations:?}");
    assert_eq!(g.reload_generation(), 4);
    assert!(["A", "B"].contains(&get(gw.addr, "/x").text().as_str()));
}

/// `POST /reload` on the admin API does what SIGHUP does: 200 with the report, or the
/// `ringway check` message with 400 and the running config unchanged; `/routes` follows.
#[test]
fn post_reload_on_the_admin_api_reloads_the_file_or_refuses_it() {
    let (a, b) = (named("A"), named("B"));
    let dir = Scratch::new("admin-post");
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let path = dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "a", "") + admin),
    );
    let gw = TestGateway::start(&std::fs::read_to_string(&path).unwrap(), DriverChoice::Auto);
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    let post = |api| {
        request(
            api,
            b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        )
    };
    // Started from text, not a file: nothing to reload yet.
    assert_eq!(post(api).status, 409);
    gw.gateway().set_config_path(path.clone());
    assert_eq!(get(gw.addr, "/x").text(), "A");

    dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "b", "") + admin),
    );
    let r = post(api);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["generation"], 1);
    assert_eq!(get(gw.addr, "/x").text(), "B");
    let routes = request(api, b"GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").text();
    assert!(
        routes.contains("\"b\""),
        "/routes after the reload: {routes}"
    );

    dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "nowhere", "") + admin),
    );
    let r = post(api);
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        msg.contains("routes[0].upstream") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    assert_eq!(gw.gateway().reload_generation(), 1);
    assert_eq!(get(gw.addr, "/x").text(), "B");
}

/// Whether a connection to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn a_reload_after_a_drain_opens_no_listener() {
    let (a, b) = (named("A"), named("B"));
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\ndrain_delay = \"0s\"\n";
    let one = two_groups(a.addr, b.addr, "a", admin);
    let two = one.replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"second\"\n",
        1,
    );
    let gw = TestGateway::start(&one, DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    let r = request(
        adm,
        b"POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(
        eventually(Duration::from_secs(5), || refused(gw.addr)),
        "the drain closes the listener"
    );
    // A drained gateway stays closed: a reload that adds a listener must not leave a socket
    // listening (with nobody accepting, its connections would hang instead of being refused).
    let e = gw
        .gateway()
        .reload(parse(&two))
        .expect_err("a drained gateway refuses a reload");
    assert_eq!(e.status(), 503, "{e}");
    for addr in gw.gateway().listener_addrs() {
        assert!(refused(addr), "{addr} accepts after the drain");
    }
    assert_eq!(gw.gateway().reload_generation(), 0);
}

#[test]
fn a_binary_upgrade_takes_over_the_admin_port() {
    let dir = Scratch::new("upgrade-admin");
    let sock = dir.0.join("upgrade.sock");
    let cfg = |port: u16, admin: u16, body: &str| {
        format!(
            "[server]\nworkers = 2\nshutdown_timeout = \"5s\"\nupgrade_socket = \"{}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\n[[routes]]\npath = \"/who\"\ndirect = {{ status = 200, body = \"{body}\" }}\n",
            sock.display()
        )
    };
    let first = dir.write("old.toml", &cfg(0, 0, "old"));
    let mut old = Proc::spawn(&["run", "-c", first.to_str().unwrap()]);
    let addr = old.addr();
    let line = old
        .wait_line("admin API on http://", 1, Duration::from_secs(10))
        .expect("the old process serves the admin API");
    let admin: SocketAddr = line
        .split("admin API on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("an admin address");
    assert!(eventually(Duration::from_secs(10), || sock.exists()));
    // The new config keeps both ports, as an upgrade of a deployed config does.
    let second = dir.write("new.toml", &cfg(addr.port(), admin.port(), "new"));
    let mut new = Proc::spawn(&["upgrade", "-c", second.to_str().unwrap()]);
    assert!(
        old.wait_exit(Duration::from_secs(20)),
        "the old process did not exit; new: {:?}",
        new.lines.lock().unwrap()
    );
    assert!(
        !new.wait_exit(Duration::from_millis(200)),
        "the new process exited: {:?}",
        new.lines.lock().unwrap()
    );
    assert_eq!(get(addr, "/who").text(), "new");
    let r = request(admin, b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    new.signal(libc::SIGTERM);
    assert!(new.wait_exit(Duration::from_secs(10)));
}

#[test]
fn buckets_carry_over_when_a_route_is_named_like_an_unnamed_one() {
    // An unnamed route is labelled by its index (`#1`); a route may be named "#1" too.
    let limit = "rate_limits = [{ key = \"client_ip\", rate = 1, per = \"1m\" }]";
    let toml = format!(
        "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n\
         [[routes]]\nname = \"#1\"\npath = \"/a\"\ndirect = {{ status = 200 }}\n{limit}\n\n\
         [[routes]]\npath = \"/b\"\ndirect = {{ status = 200 }}\n{limit}\n\n\
         [[routes]]\nname = \"c\"\npath = \"/c\"\ndirect = {{ status = 200 }}\n{limit}\n"
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    assert_eq!(get(gw.addr, "/c").status, 200);
    assert_eq!(get(gw.addr, "/c").status, 429);
    // The same config again: every limit is unchanged, so every bucket stays as it was.
    gw.gateway().reload(parse(&toml)).unwrap();
    assert_eq!(
        get(gw.addr, "/c").status,
        429,
        "/c's spent bucket carries over"
    );
    assert_eq!(get(gw.addr, "/a").status, 200);
    assert_eq!(get(gw.addr, "/b").status, 200, "/b has a bucket of its own");
}

#[test]
fn a_request_whose_head_straddles_a_reload_is_authenticated_by_its_own_config() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    const SECRET_A: &str = "reload-secret-a-of-32-bytes-min!";
    const SECRET_B: &str = "reload-secret-b-of-32-bytes-min!";
    let cfg = |providers: &str, method: &str| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n{providers}\n[[routes]]\npath = \"/x\"\nauth = \"{method}\"\ndirect = {{ status = 200, body = \"in\" }}\n"
        )
    };
    let both =
        format!("[auth.jwt.a]\nsecret = \"{SECRET_A}\"\n\n[auth.jwt.b]\nsecret = \"{SECRET_B}\"\n");
    let only_a = format!("[auth.jwt.a]\nsecret = \"{SECRET_A}\"\n");
    let token = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({ "sub": "u", "exp": now() + 600 }),
        &EncodingKey::from_secret(SECRET_B.as_bytes()),
    )
    .unwrap();
    // The route takes provider "b" (the second of two); the next config has only "a".
    let gw = TestGateway::start(&cfg(&both, "b"), DriverChoice::Auto);
    let mut slow = Client::connect(gw.addr);
    slow.send(
        format!("GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n").as_bytes(),
    );
    // One exchange on another connection of the same worker: by then the worker read the
    // first connection's bytes and began its request (on the current config).
    let mut other = Client::connect(gw.addr);
    let r = get_on(&mut other, "/x");
    assert_eq!(r.status, 401, "{}", r.text());
    gw.gateway().reload(parse(&cfg(&only_a, "a"))).unwrap();
    slow.send(b"\r\n");
    let r = slow
        .read_response()
        .expect("an answer, on the config the request began with");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "in");
    // A request that begins after the reload takes the new config: "b"'s token is refused.
    assert_eq!(get_on(&mut other, "/x").status, 401);
    let mut c = Client::connect(gw.addr);
    c.send(
        format!("GET /x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n").as_bytes(),
    );
    assert_eq!(c.read_response().expect("an answer").status, 401);
}

/// Blocks worker `w` in a control job until the returned sender is dropped or sent to.
fn block_worker(ctl: &ringway::control::Control, w: usize) -> mpsc::Sender<()> {
    let (started_tx, started) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    ctl.post(
        w,
        Box::new(move |_| {
            let _ = started_tx.send(());
            let _ = released.recv_timeout(Duration::from_secs(60));
        }),
    )
    .unwrap();
    started
        .recv_timeout(Duration::from_secs(5))
        .expect("the worker runs the job");
    release
}

fn admin_routes(adm: SocketAddr) -> String {
    request(
        adm,
        b"GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .text()
}

/// Whether `n` new connections all get `body` for `/x`.
fn all_answer(addr: SocketAddr, body: &str, n: usize) -> bool {
    (0..n).all(|_| get(addr, "/x").text() == body)
}

#[test]
fn a_reload_committed_while_a_worker_lags_reaches_it_and_the_admin_api() {
    let (a, b) = (named("A"), named("B"));
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", admin), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    let release = block_worker(gw.gateway().control(), 1);
    let e = gw
        .gateway()
        .reload(parse(&two_groups(a.addr, b.addr, "b", admin)))
        .expect_err("worker 1 does not answer within the reload's limit");
    assert!(matches!(e, ReloadError::Workers(_)), "{e}");
    // "config committed": the running config is the new one, and so is what /routes shows.
    assert_eq!(gw.gateway().reload_generation(), 1);
    let routes = admin_routes(adm);
    assert!(routes.contains("\"upstream\": \"b\""), "{routes}");
    // Worker 1 takes it once it runs its jobs again.
    drop(release);
    assert!(eventually(Duration::from_secs(5), || all_answer(
        gw.addr, "B", 20
    )));
}

#[test]
fn a_reload_is_refused_while_a_worker_mailbox_is_full_and_changes_nothing() {
    let (a, b) = (named("A"), named("B"));
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", admin), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    let ctl = gw.gateway().control().clone();
    let release = block_worker(&ctl, 1);
    let mut filled = false;
    for _ in 0..=ringway::control::MAX_PENDING_JOBS {
        if ctl.post(1, Box::new(|_| {})).is_err() {
            filled = true;
            break;
        }
    }
    assert!(filled);
    // Before: posted to worker 0 only, the reload left worker 1 on the old config for good.
    let e = gw
        .gateway()
        .reload(parse(&two_groups(a.addr, b.addr, "b", admin)))
        .expect_err("worker 1 cannot take the job");
    assert!(matches!(e, ReloadError::Busy(_)), "{e}");
    assert_eq!(e.status(), 503);
    assert_eq!(gw.gateway().reload_generation(), 0);
    assert!(admin_routes(adm).contains("\"upstream\": \"a\""));
    drop(release);
    assert!(eventually(Duration::from_secs(5), || ctl
        .ask(Duration::from_secs(1), |w| w.id)
        .is_ok()));
    assert!(all_answer(gw.addr, "A", 20));
    // Once the mailbox drained, the same reload applies on every worker.
    gw.gateway()
        .reload(parse(&two_groups(a.addr, b.addr, "b", admin)))
        .unwrap();
    assert!(all_answer(gw.addr, "B", 20));
}

#[test]
fn keys_that_apply_only_at_start_are_named_by_the_reload() {
    let (a, b) = (named("A"), named("B"));
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", admin), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    // The admin listener and a kept listener's socket options stay as they were at start.
    let next = two_groups(
        a.addr,
        b.addr,
        "b",
        "\n[admin]\naddress = \"127.0.0.2:0\"\nmax_connections = 3\n",
    )
    .replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\nbacklog = 16\n",
        1,
    );
    let rep = gw.gateway().reload(parse(&next)).unwrap();
    for key in [
        "admin.address",
        "admin.max_connections",
        "listeners[0].backlog",
    ] {
        assert!(
            rep.not_reloaded.iter().any(|k| k == key),
            "{key} not in {:?}",
            rep.not_reloaded
        );
    }
    assert_eq!(gw.gateway().admin_addr(), Some(adm));
    assert_eq!(get(gw.addr, "/x").text(), "B");
    // The admin listener is not re-bound (it may be serving the very request that asked for
    // the reload): a later reload still names its address, and it answers where it was.
    let rep = gw.gateway().reload(parse(&next)).unwrap();
    assert!(
        rep.not_reloaded.iter().any(|k| k == "admin.address"),
        "{:?}",
        rep.not_reloaded
    );
    let r = request(adm, b"GET /live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(r.status, 200);
}

#[test]
fn start_only_cache_metrics_log_and_access_log_keys_are_named_by_the_reload() {
    let (a, b) = (named("A"), named("B"));
    let gw = TestGateway::start(&two_groups(a.addr, b.addr, "a", ""), DriverChoice::Auto);
    // The store's budget, metrics and the log are set up at start; the access log follows a
    // reload (a listener the reload adds logs as configured).
    let extra = "\n[cache]\nmax_bytes_per_worker = \"1MiB\"\nmax_in_flight_bytes_per_worker = \"2MiB\"\n\n[metrics]\nenabled = false\n\n[log]\nlevel = \"debug\"\n\n[access_log]\nenabled = true\noutput = \"stdout\"\n";
    let next = two_groups(a.addr, b.addr, "b", extra).replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.2:0\"\n",
        1,
    );
    let start_only = [
        "cache.max_bytes_per_worker",
        "cache.max_in_flight_bytes_per_worker",
        "metrics.enabled",
        "log",
    ];
    let rep = gw.gateway().reload(parse(&next)).unwrap();
    assert_eq!(rep.not_reloaded, start_only, "{:?}", rep.not_reloaded);
    assert_eq!(get(gw.addr, "/x").text(), "B");
    // A cache key that routes compile follows the reload and is not named; the start-only
    // changes still do not apply, and are named again.
    let again = next.replace("[cache]\n", "[cache]\nmax_variants = 3\n");
    let rep = gw.gateway().reload(parse(&again)).unwrap();
    assert_eq!(rep.not_reloaded, start_only, "{:?}", rep.not_reloaded);
}

#[test]
fn a_failure_in_flight_on_the_old_group_does_not_eject_an_endpoint_of_the_changed_one() {
    let hang = Upstream::start(|_| Reply::Hang(Duration::from_millis(800)));
    let x2 = named("x2");
    let (y1, y2) = (named("y1"), named("y2"));
    let cfg = |e1: SocketAddr, e2: SocketAddr| {
        format!(
            "[server]\nworkers = 1\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.u]\nendpoints = [{{ address = \"{e1}\" }}, {{ address = \"{e2}\" }}]\nbalance = \"round_robin\"\n[upstreams.u.outlier]\nconsecutive_failures = 1\nbase_ejection_time = \"60s\"\nmax_ejection_percent = 50\n\n[[routes]]\nupstream = \"u\"\nretry = {{ attempts = 1 }}\n\n[admin]\naddress = \"127.0.0.1:0\"\n"
        )
    };
    let gw = TestGateway::start(&cfg(hang.addr, x2.addr), DriverChoice::Auto);
    let adm = gw.gateway().admin_addr().expect("the admin API runs");
    // A request in flight to the endpoint about to fail (round robin: within two requests).
    let mut in_flight = None;
    for _ in 0..2 {
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        if hang.wait_for(Duration::from_millis(300), |s| !s.is_empty()) {
            in_flight = Some(c);
            break;
        }
        assert_eq!(c.read_response().expect("x2 answers").text(), "x2");
    }
    let mut c = in_flight.expect("a request reached the failing endpoint");
    // The group changes: both endpoints replaced. Its health starts fresh.
    gw.gateway().reload(parse(&cfg(y1.addr, y2.addr))).unwrap();
    // The old request fails now, on the old group's endpoint 0.
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 502, "{}", r.text());
    let ups = request(
        adm,
        b"GET /upstreams HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .json();
    let eps = ups["upstreams"][0]["endpoints"].as_array().unwrap().clone();
    assert_eq!(eps.len(), 2, "{ups}");
    for e in eps {
        assert_eq!(e["ejected"], false, "{e}");
    }
}

/// Issue 11: `not_reloaded` compares with what the process runs on, not with the previous
/// reload's config: a start-only key changed by one reload is named again by the next one
/// (it is still not applied), until a reload puts back the value the process started with.
#[test]
fn a_start_only_change_is_named_by_every_reload_until_it_is_undone() {
    let (a, b) = (named("A"), named("B"));
    let dir = Scratch::new("start-only-twice");
    let admin = "\n[admin]\naddress = \"127.0.0.1:0\"\n";
    let path = dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "a", "") + admin),
    );
    let gw = TestGateway::start(&std::fs::read_to_string(&path).unwrap(), DriverChoice::Auto);
    gw.gateway().set_config_path(path.clone());
    let api = gw.gateway().admin_addr().expect("the admin API runs");
    let post = || {
        let r = request(
            api,
            b"POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let keys: Vec<String> = v["not_reloaded"]
            .as_array()
            .unwrap_or_else(|| panic!("no not_reloaded in {v}"))
            .iter()
            .map(|k| k.as_str().unwrap_or_default().to_string())
            .collect();
        keys
    };
    let off = "\n[metrics]\nenabled = false\n";
    // 1: a start-only key changes.
    dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "a", off) + admin),
    );
    assert_eq!(post(), vec!["metrics.enabled".to_string()]);
    // 2: only a route changes; metrics are still counted as at start, and said so.
    dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "b", off) + admin),
    );
    assert_eq!(post(), vec!["metrics.enabled".to_string()]);
    assert_eq!(get(gw.addr, "/x").text(), "B");
    let m = request(api, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").text();
    assert!(m.contains("\nringway_metrics_enabled 1\n"), "{m}");
    // 3: back to the value it started with: nothing left to name.
    dir.write(
        "ringway.toml",
        &(two_groups(a.addr, b.addr, "b", "") + admin),
    );
    assert!(post().is_empty());
}

/// Issue 11: a peer that connects to the upgrade socket and says nothing holds the hand-over
/// thread for a bounded time: a stop is not held up by it, and a real new process that
/// connects behind it is still served (after `READY_TIMEOUT`, within its own wait).
#[test]
fn a_silent_peer_on_the_upgrade_socket_neither_holds_the_stop_nor_blocks_a_real_upgrade() {
    use socket2::{Domain, SockAddr, Socket, Type};
    let dir = Scratch::new("silent-peer");
    let path = dir.0.join("upgrade.sock");
    let toml =
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[routes]]\ndirect = { status = 200 }\n";
    let silent = |path: &Path| {
        let s = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        s.connect(&SockAddr::unix(path).unwrap()).unwrap();
        // The running process sends its sockets at once: once they are here, it waits.
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 16];
        assert!(s.peek(&mut b).is_ok(), "nothing was sent to the peer");
        s
    };

    // 1. The stop.
    let mut gw = TestGateway::start(toml, DriverChoice::Auto);
    ringway::upgrade::listen(gw.gateway(), &path, Box::new(|| {})).unwrap();
    let _peer = silent(&path);
    let t0 = Instant::now();
    gw.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "the stop waited {:?} on the hand-over",
        t0.elapsed()
    );

    // 2. A real taker queued behind a silent peer.
    let gw = TestGateway::start(toml, DriverChoice::Auto);
    let handed = Event::new();
    let h = handed.clone();
    ringway::upgrade::listen(gw.gateway(), &path, Box::new(move || h.set())).unwrap();
    let _peer = silent(&path);
    let t0 = Instant::now();
    let (got, takeover) = ringway::upgrade::take_over(&path).expect("served after the silent peer");
    assert!(t0.elapsed() < ringway::upgrade::HANDOVER_TIMEOUT);
    assert!(!got.is_empty(), "the listening sockets came");
    takeover.ready().unwrap();
    assert!(
        handed.wait(Duration::from_secs(5)),
        "the hand-over completed"
    );
}

/// Two upgrades at once: the one served first takes the sockets; the other, queued on the
/// upgrade socket, is told plainly that the running process handed its sockets to another
/// upgrade (or stopped) before serving it, not an OS error out of context ("Connection reset
/// by peer", or "the running process closed the hand-over").
#[test]
fn the_loser_of_two_racing_upgrades_is_told_another_took_the_sockets() {
    let dir = Scratch::new("racing-upgrades");
    let path = dir.0.join("upgrade.sock");
    let toml =
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[routes]]\ndirect = { status = 200 }\n";
    let gw = TestGateway::start(toml, DriverChoice::Auto);
    let handed = Event::new();
    let h = handed.clone();
    ringway::upgrade::listen(gw.gateway(), &path, Box::new(move || h.set())).unwrap();
    let (got, first) = ringway::upgrade::take_over(&path).expect("the first is served");
    assert!(!got.is_empty());
    // The second connects while the first's hand-over is open: it waits in the queue.
    let second = ringway::upgrade::connect_to(&path).expect("queued");
    first.ready().unwrap();
    assert!(handed.wait(Duration::from_secs(5)), "the first completed");
    let Err(err) = ringway::upgrade::receive(second) else {
        panic!("the second got sockets");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("another upgrade"),
        "the loser's message: {msg}"
    );
}

/// The reload report names the routes whose config changed: a comment added above them, or
/// a route moved in the file, changes none (where a part stands in the file is not what it
/// says); a changed route is reported, once, as added and its old form as removed.
#[test]
fn the_reload_report_names_only_routes_whose_config_changed() {
    let (a, b) = (named("A"), named("B"));
    let text = two_groups(
        a.addr,
        b.addr,
        "a",
        "[[routes]]\nname = \"y\"\npath = \"/y\"\nupstream = \"b\"\n",
    );
    let gw = TestGateway::start(&text, DriverChoice::Auto);
    let rep = gw
        .gateway()
        .reload(parse(&format!("# a comment\n# and another\n{text}")))
        .expect("valid config reloads");
    assert!(rep.routes_added.is_empty(), "{rep:?}");
    assert!(rep.routes_removed.is_empty(), "{rep:?}");
    let changed = two_groups(
        a.addr,
        b.addr,
        "b",
        "[[routes]]\nname = \"y\"\npath = \"/y\"\nupstream = \"b\"\n",
    );
    let rep = gw
        .gateway()
        .reload(parse(&changed))
        .expect("valid config reloads");
    assert_eq!(rep.routes_added, vec!["x".to_string()]);
    assert_eq!(rep.routes_removed, vec!["x".to_string()]);
}
