//! A gateway with every background part running (admin API with an open connection, access
//! log writer, cache Redis layer and purge subscriber, health checker, JWKS fetcher), stopped
//! in process: no thread of it and no listening socket is left behind. Alone in its binary, so
//! that the threads counted are this gateway's.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// Names of this process's threads that the gateway started (the kernel keeps 15 bytes).
fn gateway_threads() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                let n = n.trim();
                if n.starts_with("ringway-") {
                    out.push(n.to_string());
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_stopped_gateway_leaves_no_thread_and_no_listener() {
    let redis = RedisServer::start();
    let up = Upstream::start(|_| Reply::Raw(ok_response(b"ok")));
    let jwks = Upstream::start(|_| Reply::Raw(ok_response(br#"{"keys":[]}"#)));
    let log = std::env::temp_dir().join(format!("ringway-shutdown-{}.log", std::process::id()));
    let toml = format!(
        r#"[[listeners]]
address = "127.0.0.1:0"

[upstreams.up]
endpoints = [{{ address = "{up}" }}]
[upstreams.up.health_check]
path = "/"
interval = "100ms"

[[routes]]
upstream = "up"
cache = {{ }}

[cache.redis]
address = "{redis}"

[auth.jwt.idp]
jwks_url = "http://{jwks}/jwks"

[admin]
address = "127.0.0.1:0"

[access_log]
enabled = true
output = "{log}"
"#,
        up = up.addr,
        redis = redis.addr(),
        jwks = jwks.addr,
        log = log.display()
    );
    let mut gw = TestGateway::start(&toml, DRIVERS[0]);
    let addr = gw.addr;
    let admin = gw.gateway().admin_addr().expect("the admin API runs");
    assert_eq!(get(addr, "/a").status, 200);
    // An admin connection left open (keep-alive) when the gateway stops.
    let mut a = TcpStream::connect(admin).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    a.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = a.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let running = |want: &[&str]| {
        let names = gateway_threads();
        want.iter().all(|w| names.iter().any(|n| n.starts_with(w)))
    };
    let parts = [
        "ringway-w0",
        "ringway-admin",
        "ringway-admin-c",
        "ringway-access-",
        "ringway-purge",
        "ringway-health",
        "ringway-jwks",
    ];
    assert!(
        eventually(Duration::from_secs(5), || running(&parts)),
        "{:?}",
        gateway_threads()
    );
    gw.stop();
    // The admin connections' threads are joined by the stop itself, not merely on their way
    // out. (A joined thread's entry in /proc can outlast the join by the moment the kernel
    // takes to release it, longer on a loaded machine: a half-second bound, far below the
    // open connection's timeouts, which an unjoined thread would wait out.)
    let admin_gone = || {
        !gateway_threads()
            .iter()
            .any(|n| n.starts_with("ringway-admin"))
    };
    assert!(
        eventually(Duration::from_millis(500), admin_gone),
        "admin threads outlive the stop: {:?}",
        gateway_threads()
    );
    assert!(
        eventually(Duration::from_secs(5), || gateway_threads().is_empty()),
        "left behind: {:?}",
        gateway_threads()
    );
    for (what, a) in [("listener", addr), ("admin", admin)] {
        assert!(TcpStream::connect(a).is_err(), "the {what} still accepts");
    }
    let _ = std::fs::remove_file(&log);
}
