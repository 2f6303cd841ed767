//! The access log over real sockets: JSON lines with the right fields, per-listener settings,
//! sampling, reopening for rotation (what SIGUSR1 does), and a writer that cannot keep up:
//! lines are dropped and counted while requests go on unhindered.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringway::config::DriverChoice;
use serde_json::Value;
use support::*;

/// A fresh directory for this test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ringway-access-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = PathBuf::from(p.to_string_lossy().replace([' ', '{', '}', ':', ','], "_"));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lines(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn wait_lines(p: &Path, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            got = lines(p);
            got.len() >= n
        }),
        "{} lines expected in {}, got {}",
        n,
        p.display(),
        got.len()
    );
    got
}

/// One request on its own connection; every byte of the answer.
fn exchange(addr: SocketAddr, raw: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    out
}

fn header<'a>(resp: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(resp).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    head.split("\r\n")
        .filter_map(|l| l.split_once(": "))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn log_config(out: &Path) -> String {
    format!(
        "[access_log]\nenabled = true\noutput = \"{}\"\n",
        out.display()
    )
}

#[test]
fn each_request_is_one_json_line_with_its_fields() {
    for driver in DRIVERS {
        let dir = TempDir::new("fields");
        let log = dir.file("access.log");
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"hello")));
        let toml = format!(
            "{}\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"up\"\n",
            config(&[up.addr], &log_config(&log))
        );
        let gw = TestGateway::start(&toml, driver);
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let req = format!(
            "POST /api/items?q=1 HTTP/1.1\r\nHost: shop.test\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        );
        let resp = exchange(gw.addr, &req);
        assert!(resp.starts_with(b"HTTP/1.1 200"));
        let miss = exchange(
            gw.addr,
            "GET /nowhere HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
        );
        assert!(miss.starts_with(b"HTTP/1.1 404"));
        let got = wait_lines(&log, 2);
        assert_eq!(got.len(), 2, "{driver:?}");
        let a = &got[0];
        assert_eq!(a["method"], "POST");
        assert_eq!(a["host"], "shop.test");
        assert_eq!(a["path"], "/api/items?q=1");
        assert_eq!(a["status"], 200);
        assert_eq!(a["client"], "127.0.0.1");
        assert_eq!(a["route"], "api");
        assert_eq!(a["upstream"], "up");
        assert_eq!(a["endpoint"], up.addr.to_string());
        assert_eq!(a["trace_id"], trace);
        assert_eq!(a["request_id"].as_str(), header(&resp, "x-request-id"));
        assert_eq!(a["bytes_in"], req.len() as u64);
        assert_eq!(a["bytes_out"], resp.len() as u64);
        assert_eq!(a["retries"], 0);
        assert_eq!(a["error"], Value::Null);
        assert_eq!(a["consumer"], Value::Null);
        assert_eq!(a["tls"], Value::Null);
        let total = a["duration_ms"].as_f64().unwrap();
        let upstream = a["upstream_duration_ms"].as_f64().unwrap();
        assert!(total >= upstream && upstream >= 0.0, "{a}");
        // RFC 3339 UTC with milliseconds: 2026-11-26T05:38:17.123Z
        let t = a["time"].as_str().unwrap();
        let b = t.as_bytes();
        assert_eq!(b.len(), 24, "{t}");
        assert!(
            b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z',
            "{t}"
        );
        let b = &got[1];
        assert_eq!(b["status"], 404);
        assert_eq!(b["error"], "no_route");
        assert_eq!(b["route"], Value::Null);
        assert_eq!(b["upstream"], Value::Null);
        assert_eq!(b["upstream_duration_ms"], Value::Null);
    }
}

#[test]
fn listeners_choose_fields_sampling_or_no_log() {
    let dir = TempDir::new("listeners");
    let main = dir.file("main.log");
    let admin = dir.file("short.log");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
    // Listener 0 uses [access_log]; 1 its own fields; 2 the same file, sampling nothing;
    // 3 no log at all.
    let toml = format!(
        r#"[[listeners]]
address = "127.0.0.1:0"

[[listeners]]
address = "127.0.0.1:0"
[listeners.access_log]
enabled = true
output = "{short}"
fields = ["status", "path"]

[[listeners]]
address = "127.0.0.1:0"
[listeners.access_log]
enabled = true
output = "{short}"
sample = 0.0

[[listeners]]
address = "127.0.0.1:0"
[listeners.access_log]
enabled = false

[upstreams.up]
endpoints = [{{ address = "{up}" }}]

[[routes]]
upstream = "up"

[access_log]
enabled = true
output = "{main}"
"#,
        short = admin.display(),
        main = main.display(),
        up = up.addr
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let addrs = gw.addrs();
    for (i, a) in addrs.iter().enumerate() {
        let r = exchange(
            *a,
            &format!("GET /l{i} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"),
        );
        assert!(r.starts_with(b"HTTP/1.1 200"), "listener {i}");
    }
    let m = wait_lines(&main, 1);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["path"], "/l0");
    let s = wait_lines(&admin, 1);
    // Listener 1 chose two fields, in its order; listener 2 (same file) samples nothing;
    // listener 3 does not log.
    assert_eq!(s.len(), 1, "{s:?}");
    let obj = s[0].as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["path", "status"]);
    assert_eq!(s[0]["path"], "/l1");
    let raw = std::fs::read_to_string(&admin).unwrap();
    assert!(
        raw.starts_with("{\"status\":200,\"path\":\"/l1\"}"),
        "{raw}"
    );
}

#[test]
fn reopen_moves_writing_to_a_new_file_for_rotation() {
    let dir = TempDir::new("reopen");
    let log = dir.file("a.log");
    let rotated = dir.file("a.log.1");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
    let toml = format!(
        "{}\n[[routes]]\nupstream = \"up\"\n",
        config(&[up.addr], &log_config(&log))
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let get = |p: &str| {
        let r = exchange(
            gw.addr,
            &format!("GET {p} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"),
        );
        assert!(r.starts_with(b"HTTP/1.1 200"));
    };
    get("/before");
    wait_lines(&log, 1);
    // What logrotate does: move the file, then signal (SIGUSR1 calls this).
    std::fs::rename(&log, &rotated).unwrap();
    gw.gateway().reopen_access_logs();
    get("/after");
    let new = wait_lines(&log, 1);
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["path"], "/after");
    let old = lines(&rotated);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["path"], "/before");
}

#[test]
fn a_writer_that_cannot_keep_up_costs_lines_not_requests() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = TempDir::new("fifo");
    let fifo = dir.file("stuck.fifo");
    let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // A reader that reads nothing until the end: the pipe fills, the writer thread blocks.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the fifo");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
    let toml = format!(
        "{}\n[[routes]]\nupstream = \"up\"\n",
        config(
            &[up.addr],
            &format!(
                "[access_log]\nenabled = true\noutput = \"{}\"\nbuffer = \"32KiB\"\n",
                fifo.display()
            )
        )
    );
    let mut gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    // Long paths make long lines: 600 requests of ~1.1 KiB lines are far more than the pipe
    // (64 KiB) and the worker's buffers (4 x 32 KiB) hold.
    let path = format!("/{}", "p".repeat(1000));
    let mut c = Client::connect(gw.addr);
    let n = 600;
    let started = Instant::now();
    for _ in 0..n {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
        assert_eq!(c.read_response().expect("answered").status, 200);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "requests were held up: {took:?}"
    );
    let mut text = String::new();
    let counted = |text: &mut String| {
        text.clear();
        ringway::metrics::render_prometheus(&ctl, text).expect("scrape");
        let v = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0)
        };
        (
            v("ringway_access_log_lines_total"),
            v("ringway_access_log_dropped_total"),
        )
    };
    let mut got = (0, 0);
    assert!(eventually(Duration::from_secs(5), || {
        got = counted(&mut text);
        got.0 + got.1 == n
    }));
    let (written, dropped) = got;
    assert!(dropped > 0, "nothing dropped: {written} written");
    assert!(written > 0);
    // Drain the pipe so the writer can finish, then stop: every line that was written
    // (not dropped) reaches the reader whole.
    let drain = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 65536];
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => all.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > end {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("{e}"),
            }
        }
        all
    });
    drop(c);
    gw.stop();
    let all = drain.join().unwrap();
    let text = String::from_utf8(all).unwrap();
    let read = text
        .lines()
        .inspect(|l| {
            serde_json::from_str::<Value>(l).expect("whole JSON lines");
        })
        .count() as u64;
    assert_eq!(read, written, "{dropped} dropped");
}

/// An output whose writes fail (here `/dev/full`: ENOSPC, as a full disk) costs lines, never
/// requests, and the lines it cost are counted (`ringway_access_log_write_lost_total`), not only
/// named once in the event log. Before, they counted as written and nothing showed the loss.
#[test]
fn lines_lost_to_a_failing_output_are_counted() {
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
    let toml = format!(
        "{}\n[[routes]]\nupstream = \"up\"\n",
        config(
            &[up.addr],
            "[access_log]\nenabled = true\noutput = \"/dev/full\"\n"
        )
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let ctl = gw.gateway().control().clone();
    let mut c = Client::connect(gw.addr);
    let n = 50u64;
    for _ in 0..n {
        c.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(c.read_response().expect("answered").status, 200);
    }
    let mut text = String::new();
    let mut got = (0, 0);
    // The worker ships its buffer on its next 50 ms tick; the writer counts what failed.
    assert!(
        eventually(Duration::from_secs(10), || {
            text.clear();
            ringway::metrics::render_prometheus(&ctl, &mut text).expect("scrape");
            let v = |name: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                    .unwrap_or(0)
            };
            got = (
                v("ringway_access_log_lines_total"),
                v("ringway_access_log_write_lost_total"),
            );
            got.0 == n && got.1 >= n
        }),
        "(written into buffers, lost to the output) = {got:?}"
    );
    ringway::metrics::prom::check_exposition(&text).expect("a valid exposition");
}

#[test]
fn bad_access_log_keys_are_refused_with_their_position() {
    let base = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    for (extra, key, line, why) in [
        (
            "[access_log]\nsample = 1.5\n",
            "access_log.sample",
            4,
            "between 0.0 and 1.0",
        ),
        (
            "[access_log]\nfields = [\"status\", \"colour\"]\n",
            "access_log.fields[1]",
            4,
            "unknown variant",
        ),
        (
            "[access_log]\nbuffer = \"1KiB\"\n",
            "access_log.buffer",
            4,
            "between",
        ),
        (
            "[access_log]\noutput = \"\"\n",
            "access_log.output",
            4,
            "stdout",
        ),
        (
            "[log]\nformat = \"xml\"\n",
            "log.format",
            4,
            "unknown variant",
        ),
        (
            "[log]\nlevel = \"loud\"\n",
            "log.level",
            4,
            "unknown log level",
        ),
    ] {
        let e = ringway::config::Config::parse(&format!("{base}{extra}"), "a.toml").unwrap_err();
        assert_eq!(e.file, "a.toml");
        assert_eq!(e.key, key, "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.reason.contains(why), "{e}");
    }
    let e = ringway::config::Config::parse(
        &format!("{base}[listeners.access_log]\nenabled = true\nsampel = 1\n"),
        "a.toml",
    )
    .unwrap_err();
    assert_eq!(e.key, "listeners[0].access_log.sampel", "{e}");
}

#[test]
fn an_output_that_cannot_be_opened_fails_the_start() {
    let toml = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[access_log]\nenabled = true\noutput = \"/nonexistent-dir/x/access.log\"\n";
    let cfg = ringway::config::Config::parse(toml, "a.toml").unwrap();
    let err = match ringway::server::Gateway::start(cfg, Some(1)) {
        Ok(_) => panic!("started without its access log"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("/nonexistent-dir/x/access.log"),
        "{err}"
    );
}

#[test]
fn tls_version_and_handshakes_are_recorded() {
    use support::pki::{pki, provider, roots};
    let dir = TempDir::new("tls");
    let log = dir.file("tls.log");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
    let p = pki();
    let toml = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"https\"\ntls = {{ certificates = [{{ cert = \"{}\", key = \"{}\" }}] }}\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"up\"\n{}",
        p.path("a-chain.pem"),
        p.path("a.key"),
        up.addr,
        log_config(&log)
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    for (versions, want) in [
        (&[&rustls::version::TLS13][..], "1.3"),
        (&[&rustls::version::TLS12][..], "1.2"),
    ] {
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots("ca.pem"))
            .with_no_client_auth();
        let mut c =
            Client::connect_tls(gw.addr, "a.test", std::sync::Arc::new(cfg)).expect("handshake");
        c.send(b"GET /tls HTTP/1.1\r\nHost: a.test\r\n\r\n");
        assert_eq!(c.read_response().expect("response").status, 200);
        let got = wait_lines(&log, if want == "1.3" { 1 } else { 2 });
        assert_eq!(got.last().unwrap()["tls"], want);
    }
    // A client that does not speak TLS: a failed handshake, counted.
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    let ctl = gw.gateway().control().clone();
    let mut text = String::new();
    let v = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    assert!(eventually(Duration::from_secs(5), || {
        text.clear();
        ringway::metrics::render_prometheus(&ctl, &mut text).unwrap();
        v(
            &text,
            "ringway_listener_tls_handshake_failures_total{listener=\"https\"}",
        ) == Some(1)
    }));
    assert_eq!(
        v(
            &text,
            "ringway_listener_tls_handshakes_total{listener=\"https\"}"
        ),
        Some(3),
        "{text}"
    );
    assert_eq!(
        v(
            &text,
            "ringway_listener_connections_accepted_total{listener=\"https\"}"
        ),
        Some(3)
    );
}

/// After a reload that adds a group sorting before the served one (groups sit in name order,
/// so the served group's position moves while its slot stays), a line still names the group
/// and endpoint that served the request.
#[test]
fn lines_name_the_right_group_after_a_reload_moves_groups() {
    let dir = TempDir::new("reorder");
    let out = dir.file("access.log");
    let (a, b) = (Upstream::echo(), Upstream::echo());
    let cfg = |extra: &str| {
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n{extra}[upstreams.b]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nname = \"to-b\"\nupstream = \"b\"\n\n[access_log]\nenabled = true\noutput = \"{}\"\n",
            b.addr,
            out.display()
        )
    };
    let gw = TestGateway::start(&cfg(""), DRIVERS[0]);
    let with_a = format!(
        "[upstreams.a]\nendpoints = [{{ address = \"{}\" }}]\n\n",
        a.addr
    );
    let next = ringway::config::Config::parse(&cfg(&with_a), "r.toml").unwrap();
    gw.gateway().reload(next).expect("the reload applies");
    let resp = exchange(
        gw.addr,
        "GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    let got = wait_lines(&out, 1);
    assert_eq!(b.hits(), 1);
    assert_eq!(got[0]["upstream"], "b", "{:?}", got[0]);
    assert_eq!(got[0]["endpoint"], b.addr.to_string(), "{:?}", got[0]);
}

/// A request that waits on another's cache fill and receives the body as it arrives is logged
/// with the bytes it was sent, as every other answer is.
#[test]
fn a_coalesced_cache_answer_is_logged_with_its_bytes() {
    let dir = TempDir::new("coalesced");
    let log = dir.file("access.log");
    let up = Upstream::start(|_| {
        Reply::Script(vec![
            Step::Write(
                b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 12\r\n\r\nfirst"
                    .to_vec(),
            ),
            Step::Wait(Duration::from_millis(800)),
            Step::Write(b"-second".to_vec()),
        ])
    });
    let toml = format!(
        "{}\n[[routes]]\nname = \"cached\"\nupstream = \"up\"\ncache = {{ }}\n",
        config(&[up.addr], &log_config(&log))
    );
    let gw = TestGateway::start(&toml, DRIVERS[0]);
    let raw = "GET /slow HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    let mut leader = TcpStream::connect(gw.addr).expect("connect");
    leader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    leader.write_all(raw.as_bytes()).unwrap();
    assert!(up.wait_for(Duration::from_secs(5), |s| s.len() == 1));
    let waiter = exchange(gw.addr, raw);
    let mut first = Vec::new();
    leader.read_to_end(&mut first).unwrap();
    assert!(first.ends_with(b"first-second"));
    assert!(waiter.ends_with(b"first-second"));
    let status = header(&waiter, "cache-status").unwrap_or("");
    assert!(status.contains("collapsed"), "{status}");
    assert_eq!(up.hits(), 1);
    let got = wait_lines(&log, 2);
    let id = header(&waiter, "x-request-id").expect("request id");
    let line = got
        .iter()
        .find(|l| l["request_id"] == id)
        .unwrap_or_else(|| panic!("no line for {id}: {got:?}"));
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["route"], "cached", "{line}");
    assert_eq!(line["bytes_out"], waiter.len() as u64, "{line}");
}

/// Whether a descriptor of this process is open on `path`.
fn file_open(path: &Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        })
        .unwrap_or(false)
}

/// Issue 11: a reload opens the access log output of a listener it adds (before, such a
/// listener never logged); when a reload removes it, the request still in flight on it is
/// logged, then the output nobody uses any more is closed and its writer ends.
#[test]
fn a_reload_opens_the_output_of_a_listener_it_adds_and_closes_one_left_unused() {
    let dir = TempDir::new("reload-out");
    let out = dir.file("second.log");
    let up = Upstream::start(|r| {
        if r.target == "/slow" {
            Reply::Slow {
                parts: vec![(Duration::from_millis(600), ok_response(b"slow"))],
                close: false,
            }
        } else {
            Reply::Raw(ok_response(b"ok"))
        }
    });
    let one = format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n\n[[routes]]\nupstream = \"up\"\n",
        up.addr
    );
    let two = one.replacen(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
        &format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\naddress = \"127.0.0.1:0\"\nname = \"second\"\n[listeners.access_log]\nenabled = true\noutput = \"{}\"\n",
            out.display()
        ),
        1,
    );
    for driver in DRIVERS {
        // As the test gateway started: one worker, this driver.
        let parse = |t: &str| {
            let mut c = ringway::config::Config::parse(t, "r.toml").unwrap();
            c.server.workers = 1;
            c.server.driver = driver;
            c
        };
        let _ = std::fs::remove_file(&out);
        let gw = TestGateway::start(&one, driver);
        assert!(gw.gateway().access_logs().is_none());
        let rep = gw
            .gateway()
            .reload(parse(&two))
            .expect("the reload applies");
        assert!(rep.not_reloaded.is_empty(), "{:?}", rep.not_reloaded);
        let second = rep
            .listeners
            .iter()
            .find(|l| l.change == ringway::reload::ListenerFate::Added)
            .expect("a listener added")
            .bound;
        let outputs = gw.gateway().access_logs().map(|a| a.outputs());
        assert_eq!(outputs, Some(vec![out.display().to_string()]));
        // The first listener does not log, the added one does.
        assert_eq!(get(gw.addr, "/first").status, 200);
        assert_eq!(get(second, "/second").status, 200);
        let got = wait_lines(&out, 1);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["path"], "/second");
        // A request in flight on the second listener when a reload removes it.
        let mut c = Client::connect(second);
        c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(up.wait_for(Duration::from_secs(5), |r| r
            .iter()
            .any(|r| r.target == "/slow")));
        let rep = gw
            .gateway()
            .reload(parse(&one))
            .expect("the reload applies");
        assert!(rep
            .listeners
            .iter()
            .any(|l| l.bound == second && l.change == ringway::reload::ListenerFate::Removed));
        assert!(gw.gateway().access_logs().is_none());
        assert_eq!(c.read_response().expect("an answer").text(), "slow");
        let got = wait_lines(&out, 2);
        assert_eq!(got[1]["path"], "/slow", "{got:?}");
        // Its connection closed, the output is closed: the writer thread ended with its file.
        drop(c);
        assert!(
            eventually(Duration::from_secs(5), || !file_open(&out)),
            "{} still open",
            out.display()
        );
        // A reload that adds it again opens it again.
        gw.gateway()
            .reload(parse(&two))
            .expect("the reload applies");
        assert!(eventually(Duration::from_secs(5), || file_open(&out)));
    }
}

/// A reload whose access log output cannot be opened is refused, and changes nothing.
#[test]
fn a_reload_whose_output_cannot_be_opened_changes_nothing() {
    let dir = TempDir::new("reload-bad-out");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let base = proxy_all(up.addr);
    let gw = TestGateway::start(&base, DRIVERS[0]);
    // A directory is not a file to append to.
    let bad = format!("{base}\n{}", log_config(&dir.0));
    let next = ringway::config::Config::parse(&bad, "r.toml").unwrap();
    let e = gw.gateway().reload(next).expect_err("refused");
    assert_eq!(e.status(), 400, "{e}");
    assert!(e.to_string().contains(&dir.0.display().to_string()), "{e}");
    assert_eq!(gw.gateway().reload_generation(), 0);
    assert!(gw.gateway().access_logs().is_none());
    assert_eq!(get(gw.addr, "/").status, 200);
}

/// A named pipe nobody reads as the output: opening it for writing would wait for a reader
/// forever, on the reloading thread (the signal loop's, so SIGTERM would go unanswered too).
/// The reload is refused at once instead, naming the output, and nothing changes; with a
/// reader the same output is accepted.
#[test]
fn a_reload_to_a_pipe_without_a_reader_is_refused_not_hung() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = TempDir::new("reload-fifo");
    let fifo = dir.file("nobody.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let base = proxy_all(up.addr);
    let gw = TestGateway::start(&base, DRIVERS[0]);
    let with = format!(
        "{base}\n[access_log]\nenabled = true\noutput = \"{}\"\n",
        fifo.display()
    );
    let next = ringway::config::Config::parse(&with, "r.toml").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let gw = gw.gateway();
        s.spawn(move || {
            let _ = tx.send(
                gw.reload(next)
                    .map(|_| ())
                    .map_err(|e| (e.status(), e.to_string())),
            );
        });
        let got = rx.recv_timeout(Duration::from_secs(10));
        if got.is_err() {
            // Unblock the stuck open (it waits for a reader) so the scope can end, then fail.
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo);
            panic!("the reload hung opening a pipe without a reader");
        }
        let (status, e) = got.unwrap().expect_err("refused");
        assert_eq!(status, 400, "{e}");
        assert!(e.contains(&fifo.display().to_string()), "{e}");
    });
    assert_eq!(gw.gateway().reload_generation(), 0);
    assert_eq!(get(gw.addr, "/").status, 200);
    // With a reader, the pipe is a fine output.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the fifo");
    let next = ringway::config::Config::parse(&with, "r.toml").unwrap();
    gw.gateway()
        .reload(next)
        .expect("a pipe with a reader is accepted");
}

/// A reload applies a kept listener's new access log settings (fields here) on the output it
/// keeps open; a larger buffer asked for a kept output is named in `not_reloaded`.
#[test]
fn a_reload_applies_new_fields_to_a_kept_output() {
    let dir = TempDir::new("reload-fields");
    let out = dir.file("access.log");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let with = |fields: &str, buffer: &str| {
        format!(
            "{}\n[access_log]\nenabled = true\noutput = \"{}\"\nfields = [{fields}]\nbuffer = \"{buffer}\"\n",
            proxy_all(up.addr),
            out.display()
        )
    };
    let gw = TestGateway::start(&with("\"path\"", "256KiB"), DRIVERS[0]);
    assert_eq!(get(gw.addr, "/one").status, 200);
    assert_eq!(wait_lines(&out, 1)[0], serde_json::json!({"path": "/one"}));
    let mut next =
        ringway::config::Config::parse(&with("\"path\", \"status\"", "1MiB"), "r.toml").unwrap();
    next.server.workers = 1;
    next.server.driver = DRIVERS[0];
    let rep = gw.gateway().reload(next).expect("the reload applies");
    assert_eq!(rep.not_reloaded, vec!["access_log.buffer".to_string()]);
    assert_eq!(get(gw.addr, "/two").status, 200);
    let got = wait_lines(&out, 2);
    assert_eq!(got[1], serde_json::json!({"path": "/two", "status": 200}));
    assert_eq!(
        gw.gateway().access_logs().map(|a| a.outputs()),
        Some(vec![out.display().to_string()])
    );
}

/// Sends each `(target, status, logged)` as a GET, checks its status, then that its access log
/// line's `path` is `logged`; the lines, in order.
fn logged_paths(addr: SocketAddr, log: &Path, targets: &[(&str, u16, &str)]) -> Vec<Value> {
    for (target, status, _) in targets {
        let resp = exchange(
            addr,
            &format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"),
        );
        let want = format!("HTTP/1.1 {status}");
        assert!(resp.starts_with(want.as_bytes()), "{target}");
    }
    let got = wait_lines(log, targets.len());
    for (line, (target, _, logged)) in got.iter().zip(targets) {
        assert_eq!(line["path"], *logged, "{target}");
    }
    got
}

/// RFC 6750 §5.3 (credentials in URLs end up in logs): an API key sent in the configured query
/// parameter is written as `[redacted]` in the `path` field, wherever it sits in the query and
/// however often; the rest of the target is kept, other parameters (and names that only begin
/// like it) included.
#[test]
fn an_api_key_in_the_query_is_redacted_in_the_path_field() {
    let dir = TempDir::new("apikey");
    let log = dir.file("access.log");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let toml = format!(
        "{}\n[auth.api_key]\nquery = \"api_key\"\n[[consumers]]\nname = \"c1\"\napi_keys = [\"{}\"]\n[[routes]]\npath_prefix = \"/key\"\nupstream = \"up\"\nauth = \"api_key\"\n[[routes]]\npath_prefix = \"/open\"\nupstream = \"up\"\n",
        config(&[up.addr], &log_config(&log)),
        ringway::auth::apikey::key_hash_hex(b"key-one")
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let targets = [
        ("/key/x?api_key=key-one", 200, "/key/x?api_key=[redacted]"),
        (
            "/key/x?a=1&api_key=key-one&b=2",
            200,
            "/key/x?a=1&api_key=[redacted]&b=2",
        ),
        ("/key/x?api_key=wrong", 401, "/key/x?api_key=[redacted]"),
        (
            "/open/y?my_api_key=v&api_key=key-one&api_key=again",
            200,
            "/open/y?my_api_key=v&api_key=[redacted]&api_key=[redacted]",
        ),
        (
            "/open/y?api_keyx=v&api_key",
            200,
            "/open/y?api_keyx=v&api_key",
        ),
        ("/open/z", 200, "/open/z"),
        // Spelled otherwise, read as the lookup reads it (form-decoded names): accepted, so
        // redacted; `api+key` names `api key`, not the key: refused, and written as sent.
        (
            "/key/x?%61pi_key=key-one",
            200,
            "/key/x?%61pi_key=[redacted]",
        ),
        (
            "/key/x?api%5fkey=key-one",
            200,
            "/key/x?api%5fkey=[redacted]",
        ),
        ("/key/x?api+key=not-it", 401, "/key/x?api+key=not-it"),
        (
            "/open/y?api%2Bkey=v&api_key+=w",
            200,
            "/open/y?api%2Bkey=v&api_key+=w",
        ),
    ];
    let got = logged_paths(gw.addr, &log, &targets);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("key-one"), "{text}");
    assert_eq!(got[0]["consumer"], "c1");
}

/// The access log reads a query as the API key lookup does (`http::query_of`,
/// `http::query_params`, form-decoded names): with `query = "api key"`, `api+key` and
/// `api%20key` carry the key, are accepted and redacted; `api_key` and `api%2Bkey` do not, and
/// are written as sent. RFC 6750 §5.3.
#[test]
fn a_query_parameter_is_redacted_exactly_when_it_is_read_as_the_key() {
    let dir = TempDir::new("apikey-spelling");
    let log = dir.file("access.log");
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let toml = format!(
        "{}\n[auth.api_key]\nquery = \"api key\"\n[[consumers]]\nname = \"c1\"\napi_keys = [\"{}\"]\n[[routes]]\npath_prefix = \"/key\"\nupstream = \"up\"\nauth = \"api_key\"\n",
        config(&[up.addr], &log_config(&log)),
        ringway::auth::apikey::key_hash_hex(b"key-one")
    );
    let gw = TestGateway::start(&toml, DriverChoice::Auto);
    let targets = [
        ("/key/a?api+key=key-one", 200, "/key/a?api+key=[redacted]"),
        (
            "/key/b?api%20key=key-one",
            200,
            "/key/b?api%20key=[redacted]",
        ),
        (
            "/key/c?x=1&%61pi+k%65y=key-one",
            200,
            "/key/c?x=1&%61pi+k%65y=[redacted]",
        ),
        ("/key/d?api_key=not-it", 401, "/key/d?api_key=not-it"),
        ("/key/e?api%2Bkey=not-it", 401, "/key/e?api%2Bkey=not-it"),
    ];
    logged_paths(gw.addr, &log, &targets);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("key-one"), "{text}");
}
