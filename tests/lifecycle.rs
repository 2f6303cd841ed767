//! The gateway as a process and as a set of workers: listeners, port conflicts, graceful
//! shutdown on SIGTERM, the CLI's `check`, config refusals, driver logging.

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringway::config::{Config, DriverChoice};
use ringway::server::Gateway;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_ringway");

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringway-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts the binary and waits until it accepts connections on `addr`.
fn spawn_gateway(cfg: &std::path::Path, addr: SocketAddr, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "-c"])
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.env("RINGWAY_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn ringway");
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok()),
        "the gateway did not start listening on {addr}"
    );
    child
}

/// Runs `ringway COMMAND -c FILE`, which must refuse the config: exit code 1. Returns stderr.
fn refused(command: &str, file: &std::path::Path) -> String {
    let out = Command::new(BIN)
        .args([command, "-c"])
        .arg(file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{command} {}", file.display());
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn sigterm(child: &Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn several_listeners_serve_the_same_routes() {
    for d in DRIVERS {
        let up = Upstream::echo();
        let toml = format!(
            "[server]\nworkers = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[listeners]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"up\"\n",
            up.addr
        );
        let gw = TestGateway::start(&toml, d);
        let addrs = gw.addrs();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0], addrs[1]);
        for a in &addrs {
            for _ in 0..10 {
                assert_eq!(get(*a, "/").status, 200, "{d:?} {a}");
            }
        }
    }
}

#[test]
fn refuses_an_address_another_process_listens_on() {
    let stranger = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = stranger.local_addr().unwrap();
    let toml =
        format!("[[listeners]]\naddress = \"{addr}\"\n[[routes]]\ndirect = {{ status = 200 }}\n");
    let cfg = Config::parse(&toml, "t.toml").unwrap();
    let err = Gateway::start(cfg, Some(1)).err().expect("start must fail");
    assert!(err.to_string().contains("already in use"), "{err}");

    // A stranger that set SO_REUSEPORT itself is refused too.
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_port(true).unwrap();
    s.set_reuse_address(true).unwrap();
    let addr2 = free_port();
    s.bind(&addr2.into()).unwrap();
    s.listen(16).unwrap();
    let toml =
        format!("[[listeners]]\naddress = \"{addr2}\"\n[[routes]]\ndirect = {{ status = 200 }}\n");
    let cfg = Config::parse(&toml, "t.toml").unwrap();
    let err = Gateway::start(cfg, Some(2)).err().expect("start must fail");
    assert!(err.to_string().contains("already in use"), "{err}");

    // Through the binary: exit code 1 and the reason on stderr.
    let p = write_config("busy.toml", &toml);
    assert!(refused("run", &p).contains("already in use"));
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests_and_exits_0() {
    let up = Upstream::start(|req| {
        if req.target == "/slow" {
            Reply::Slow {
                parts: vec![(
                    Duration::from_millis(700),
                    ok_response(b"finished").to_vec(),
                )],
                close: false,
            }
        } else {
            Reply::Raw(ok_response(b"quick"))
        }
    });
    let addr = free_port();
    let cfg = write_config(
        "shutdown.toml",
        &format!(
            "[server]\nworkers = 2\nshutdown_timeout = \"5s\"\n[[listeners]]\naddress = \"{addr}\"\n[upstreams.up]\nendpoints = [{{ address = \"{}\" }}]\n[[routes]]\nupstream = \"up\"\n",
            up.addr
        ),
    );
    for driver in ["io_uring", "epoll"] {
        let mut child = spawn_gateway(&cfg, addr, &[("RINGWAY_DRIVER", driver)]);
        // An idle keep-alive connection, and one with a request in flight.
        let mut idle = Client::connect(addr);
        idle.send(b"GET /quick HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(idle.read_response().unwrap().status, 200);
        let mut busy = Client::connect(addr);
        busy.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n");
        std::thread::sleep(Duration::from_millis(150));
        let t0 = Instant::now();
        sigterm(&child);
        let r = busy.read_response().expect("in-flight request completes");
        assert_eq!((r.status, r.text().as_str()), (200, "finished"), "{driver}");
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{driver}: connection closes after the last response"
        );
        assert!(
            idle.is_closed(Duration::from_secs(3)),
            "{driver}: idle keep-alive connections are closed"
        );
        assert_eq!(
            wait_exit(&mut child, Duration::from_secs(5)),
            Some(0),
            "{driver}: exit code"
        );
        assert!(t0.elapsed() < Duration::from_secs(4));
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{driver}: no longer accepting"
        );
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.contains("shutting down gracefully"), "{err}");
    }
}

#[test]
fn in_process_shutdown_waits_for_in_flight_requests() {
    for d in DRIVERS {
        let up = Upstream::slow(Duration::from_millis(400), b"done");
        let mut gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        std::thread::sleep(Duration::from_millis(100));
        gw.begin_shutdown();
        let r = c.read_response().expect("response");
        assert_eq!(r.text(), "done", "{d:?}");
        gw.stop();
    }
}

/// A graceful shutdown (SIGTERM, or the old process after a binary upgrade's hand-over) that
/// begins while a keep-alive response is being written, its head already sent without
/// `Connection: close`, with the client's next request pipelined behind it: the gateway had
/// promised to read on, so the next request is answered (with `Connection: close`), not left
/// unread while the connection closes. Before, the connection closed with the request unread,
/// which resets it (RFC 9112 §9.6: a reset can discard the response the client has not read
/// yet; §9.3.2: the client cannot tell whether the pipelined request was processed). A
/// connection idle at that moment may likewise have its next request on the way: it gets the
/// grace a connection accepted just before a shutdown gets.
#[test]
fn a_request_pipelined_behind_a_keep_alive_response_during_a_shutdown_is_answered() {
    for d in DRIVERS {
        let (up, head_sent, go) = half_sent_upstream("/slow", b"second");
        let gw = TestGateway::start(&proxy_all(up.addr), d);
        let mut c = Client::connect(gw.addr);
        c.send(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nPOST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
        );
        assert!(head_sent.wait(Duration::from_secs(10)), "{d:?}");
        // Every worker has begun shutting down once this returns (the job runs on the
        // worker's thread), as on SIGTERM or after a hand-over.
        gw.gateway()
            .control()
            .ask(Duration::from_secs(5), |w| w.shutdown.trigger())
            .expect("the workers answer");
        go.set();
        let r = c.read_response().expect("the first response");
        assert_eq!((r.status, r.text().as_str()), (200, "slow"), "{d:?}");
        assert_eq!(
            r.header("connection"),
            None,
            "{d:?}: its head promised more"
        );
        let r = c
            .read_response()
            .unwrap_or_else(|| panic!("{d:?}: the pipelined request is answered"));
        assert_eq!((r.status, r.text().as_str()), (200, "second"), "{d:?}");
        assert_eq!(r.header("connection"), Some("close"), "{d:?}");
        assert!(c.is_closed(Duration::from_secs(5)), "{d:?}");
    }
}

#[test]
fn driver_choice_is_logged_once() {
    let addr = free_port();
    let cfg = write_config(
        "driver.toml",
        &format!("[server]\nworkers = 2\n[[listeners]]\naddress = \"{addr}\"\n[[routes]]\ndirect = {{ status = 200 }}\n"),
    );
    let mut child = spawn_gateway(&cfg, addr, &[("RINGWAY_DRIVER", "epoll")]);
    sigterm(&child);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(5)), Some(0));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(err.matches("epoll driver").count(), 1, "{err}");
}

#[test]
fn io_uring_or_a_logged_fallback() {
    let up = Upstream::echo();
    let gw = TestGateway::start(&proxy_all(up.addr), DriverChoice::Auto);
    // Either driver serves; which one ran is reported.
    assert_eq!(get(gw.addr, "/").status, 200);
    let _ = gw.driver();
}

#[test]
fn check_command_validates_configs() {
    for file in ["config/ringway.toml", "config/demo.toml"] {
        let out = Command::new(BIN)
            .args(["check", "-c", file])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("OK") && text.contains("routes:"), "{text}");
        // The shipped configs set nothing `check` warns about.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("warning"), "{file}: {err}");
    }
    let bad = write_config(
        "bad.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[[routes]]\npath = \"/x\"\nupstream = \"missing\"\n",
    );
    let err = refused("check", &bad);
    assert!(err.contains("bad.toml:6:"), "{err}");
    assert!(err.contains("routes[0].upstream"), "{err}");
    assert!(err.contains("no upstream named \"missing\""), "{err}");

    let typo = write_config(
        "typo.toml",
        "[[listeners]]\naddress = \"127.0.0.1:0\"\nbaklog = 5\n",
    );
    let err = refused("run", &typo);
    assert!(
        err.contains("typo.toml:3:") && err.contains("baklog"),
        "{err}"
    );

    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ringway "));
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn many_connections_across_workers() {
    for d in DRIVERS {
        let up = Upstream::start(|_| Reply::Raw(ok_response(b"x")));
        let toml = format!("[server]\nworkers = 2\n{}", proxy_all(up.addr));
        let gw = TestGateway::start(&toml, d);
        let addr = gw.addr;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    for _ in 0..25 {
                        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
                        assert_eq!(c.read_response().unwrap().status, 200);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client thread");
        }
        assert_eq!(up.hits(), 200, "{d:?}");
    }
}
