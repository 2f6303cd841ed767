//! Connection-level behaviour of the request lifecycle: the per-worker connection cap, the
//! lingering close after a refused body, and draining a short unread body.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

const DIRECT: &str = "[[routes]]\npath = \"/ok\"\ndirect = { status = 200, body = \"ok\" }\n";

#[test]
fn accepting_pauses_at_the_connection_cap_and_resumes_when_one_closes() {
    for driver in DRIVERS {
        let toml = format!(
            "[server]\nmax_connections_per_worker = 2\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}"
        );
        let gw = TestGateway::start(&toml, driver);
        let mut a = Client::connect(gw.addr);
        let mut b = Client::connect(gw.addr);
        for c in [&mut a, &mut b] {
            c.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
            assert_eq!(c.read_response().expect("answer").status, 200);
        }
        // The third connection waits in the kernel's backlog: no answer while two are open.
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_timeout(Duration::from_millis(300));
        assert!(
            c.read_response().is_none(),
            "{driver:?}: a third connection was served past the cap"
        );
        // One closes: the waiting one is accepted and served.
        drop(a);
        c.read_timeout(Duration::from_secs(5));
        assert_eq!(
            c.read_response().expect("served after a close").status,
            200,
            "{driver:?}"
        );
        // The cap holds again: b and c are open.
        let mut d = Client::connect(gw.addr);
        d.send(b"GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
        d.read_timeout(Duration::from_millis(300));
        assert!(d.read_response().is_none(), "{driver:?}");
        drop(b);
        d.read_timeout(Duration::from_secs(5));
        assert_eq!(d.read_response().expect("served").status, 200);
    }
}

#[test]
fn a_refused_body_still_being_sent_meets_a_lingering_close_not_a_reset() {
    // The gateway refuses a 1 MiB body at once (413) and closes. It closes in stages (RFC 9112
    // §9.6): a half-close, then it reads and throws away what the client still sends, so the
    // client gets the whole answer and an orderly end instead of a reset that could destroy
    // the answer before it is read.
    for driver in DRIVERS {
        let toml = format!(
            "[limits]\nmax_body_bytes = \"1KiB\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}"
        );
        let gw = TestGateway::start(&toml, driver);
        let mut c = Client::connect(gw.addr);
        let total = 1 << 20;
        let chunk = vec![b'x'; 64 * 1024];
        c.send(
            format!("POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
        );
        c.send(&chunk);
        let r = c.read_response().expect("the 413");
        assert_eq!(r.status, 413, "{driver:?}");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            c.is_closed(Duration::from_secs(2)),
            "{driver:?}: no FIN after the answer"
        );
        // The rest of the body still goes through: the gateway is reading it, not resetting.
        let mut sent = chunk.len();
        while sent < total {
            c.s.write_all(&chunk)
                .unwrap_or_else(|e| panic!("{driver:?}: write after the answer failed: {e}"));
            sent += chunk.len();
        }
    }
}

#[test]
fn a_short_unread_body_is_drained_and_the_connection_goes_on() {
    // A direct answer to a request whose body arrives after the head (not yet read when the
    // answer is made): the body is drained, and the next request on the connection is served.
    for driver in DRIVERS {
        let toml = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n{DIRECT}");
        let gw = TestGateway::start(&toml, driver);
        let mut c = Client::connect(gw.addr);
        let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
        c.send(
            format!(
                "POST /ok HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                smuggled.len()
            )
            .as_bytes(),
        );
        let r = c.read_response().expect("answer");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None, "kept alive");
        // The body, looking like a request, comes late: it must be drained, not parsed.
        c.send(smuggled);
        c.send(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response().expect("next answer");
        assert_eq!(
            r.status, 404,
            "{driver:?}: the body was parsed as a request"
        );
        assert_eq!(r.json()["error"], "no_route");
        // And it was the only answer: nothing for /smuggled.
        c.read_timeout(Duration::from_millis(200));
        assert!(c.read_response().is_none(), "{driver:?}: an extra answer");
    }
}
