//! The admin listener: blocking sockets, a thread per connection, bounded everywhere.
//!
//! Every byte comes from a possibly hostile client: heads are parsed by the data plane's own
//! parser ([`parse_request`], httparse underneath) under the small [`LIMITS`] below, bodies
//! are taken only with a Content-Length of at most [`MAX_BODY_BYTES`], and each read and
//! write runs under a deadline (`request_timeout` from a request's first byte through its
//! body, `idle_timeout` between keep-alive requests). At most `max_connections` connections
//! are open. At the cap a new connection takes the place of the oldest one still waiting for
//! a request (new, idle, or sending one), which is closed; only when every place is taken by
//! a request being answered is the new one answered 503 and closed at once. So neither idle
//! nor slow connections, however many, keep `/live` unanswered.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::{lock, Admin, AdminRequest, AdminResponse, ConnState, Method, OpenConn};
use crate::debug;
use crate::http::request::{parse_request, BodyKind, Limits, ParseError, RequestHead};

/// Largest admin request head (request line, headers, blank line).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines in an admin request.
pub const MAX_HEADERS: usize = 64;
/// Longest admin request-target.
pub const MAX_URI_BYTES: usize = 2 * 1024;
/// Largest admin request body (a purge list, a log level): 1 MiB.
pub const MAX_BODY_BYTES: u64 = 1 << 20;
/// Requests served on one keep-alive connection before it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// How often the listener's thread wakes to look at the stop flag and a pending drain.
const TICK: Duration = Duration::from_millis(50);
/// Bytes read per call.
const READ_CHUNK: usize = 4 * 1024;
/// The listen(2) backlog of the admin socket.
const BACKLOG: i32 = 64;

/// What the admin parser accepts.
const LIMITS: Limits = Limits {
    max_head_bytes: MAX_HEAD_BYTES,
    max_headers: MAX_HEADERS,
    max_uri_bytes: MAX_URI_BYTES,
    max_body_bytes: MAX_BODY_BYTES,
    allow_trace: false,
    allow_underscores_in_headers: false,
    tls: false,
};

/// The answer to a connection beyond the cap, written without waiting.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 39\r\nretry-after: 1\r\nconnection: close\r\n\r\n{\"error\":\"too many admin connections\"}\n";

#[derive(Clone, Copy, Debug)]
pub(super) struct ConnLimits {
    pub max_connections: usize,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Binds the admin socket: no `SO_REUSEPORT`, so a second process on the same port fails
/// here instead of silently sharing it.
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let fail = |e: io::Error| io::Error::new(e.kind(), format!("admin API on {addr}: {e}"));
    let s =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(fail)?;
    s.set_reuse_address(true).map_err(fail)?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(fail)?;
    }
    s.bind(&addr.into()).map_err(fail)?;
    s.listen(BACKLOG).map_err(fail)?;
    s.set_nonblocking(true).map_err(fail)?;
    Ok(s.into())
}

/// The listener's thread: accepts, starts a thread per connection, runs drain ticks; ends
/// when the admin stops.
pub(super) fn run(admin: Arc<Admin>, listener: TcpListener) {
    let fd = listener.as_raw_fd();
    while !admin.stopping() {
        admin.drain_tick();
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for a descriptor this function owns through `listener`.
        let n = unsafe { libc::poll(&mut p, 1, TICK.as_millis() as libc::c_int) };
        if n <= 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((s, peer)) => admit(&admin, s, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: wait for the next tick rather than spin.
                    debug!("admin: accept failed: {e}");
                    break;
                }
            }
        }
    }
    admin.stop();
}

/// Registers a connection and serves it on its own thread, or answers 503 past the cap.
fn admit(admin: &Arc<Admin>, s: TcpStream, peer: SocketAddr) {
    // Accepted sockets do not inherit O_NONBLOCK on Linux; set it plainly either way.
    if s.set_nonblocking(false).is_err() {
        return;
    }
    let id = {
        let mut c = lock(&admin.conns);
        let max = admin.limits.max_connections;
        let evicted = c
            .open
            .values()
            .filter(|o| o.state == ConnState::Evicted)
            .count();
        let mut room = c.open.len() - evicted < max;
        // At the cap, the oldest connection still waiting for (the rest of) a request gives
        // its place up: a new connection, a `/live` probe among them, is never shut out by
        // connections that say nothing, trickle, or sit idle between requests (RFC 9112
        // §9.3: a server may close an idle connection). Those whose handler runs are kept. The
        // closed ones' threads end at once (their read returns), and at most `max` of them
        // are let be ending at a time, so threads stay bounded (2 x max).
        if !room && evicted < max {
            let oldest = c
                .open
                .iter_mut()
                .filter(|(_, o)| o.state == ConnState::Waiting)
                .min_by_key(|(id, _)| **id);
            if let Some((_, o)) = oldest {
                o.state = ConnState::Evicted;
                let _ = o.stream.shutdown(std::net::Shutdown::Both);
                room = true;
            }
        }
        if !room {
            None
        } else {
            match s.try_clone() {
                Ok(clone) => {
                    let id = c.next;
                    c.next = c.next.wrapping_add(1);
                    c.open.insert(
                        id,
                        OpenConn {
                            stream: clone,
                            state: ConnState::Waiting,
                        },
                    );
                    Some(id)
                }
                Err(_) => return,
            }
        }
    };
    let Some(id) = id else {
        // Best effort, never blocking the accept loop: a full send buffer loses the answer.
        let _ = s.set_nonblocking(true);
        let _ = (&s).write(BUSY);
        return;
    };
    let slot = Slot {
        admin: admin.clone(),
        id,
    };
    let spawned = std::thread::Builder::new()
        .name("ringway-admin-conn".into())
        .spawn(move || serve(&slot.admin, s, peer, slot.id));
    // On failure the closure, and with it the slot, is dropped: the place is given back.
    if let Ok(t) = spawned {
        let mut c = lock(&admin.conns);
        // Threads that ended are joined here, so the list stays as long as the cap.
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut c.threads)
            .into_iter()
            .partition(|t| t.is_finished());
        c.threads = running;
        c.threads.push(t);
        drop(c);
        for t in done {
            let _ = t.join();
        }
    }
}

/// A place under the connection cap, given back however the connection's thread ends (a
/// panicking handler included).
struct Slot {
    admin: Arc<Admin>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.admin.conns).open.remove(&self.id);
        self.admin.conn_gone.notify_all();
    }
}

/// Why reading a request stopped.
enum ReadEnd {
    /// The peer closed, or a read failed: nothing to answer.
    Closed,
    /// The idle deadline passed before a first byte: close quietly.
    Idle,
    /// A request began but did not complete in time: 408.
    Slow,
    Refused(ParseError),
}

/// `set_read_timeout` until `end`; `false` once it passed.
fn arm_read(s: &TcpStream, end: Instant) -> bool {
    let left = end.saturating_duration_since(Instant::now());
    !left.is_zero() && s.set_read_timeout(Some(left)).is_ok()
}

/// Reads more bytes into `buf` before `end`. `Ok(false)`: the deadline passed.
fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, end: Instant) -> Result<bool, ()> {
    let mut tmp = [0u8; READ_CHUNK];
    loop {
        if !arm_read(s, end) {
            return Ok(false);
        }
        match s.read(&mut tmp) {
            Ok(0) => return Err(()),
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // The timeout (EAGAIN) or a spurious wake-up: the deadline decides.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return Err(()),
        }
    }
}

/// Reads a complete head into `head`; returns its length.
fn read_head(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &mut RequestHead,
    limits: &ConnLimits,
    first: bool,
) -> Result<(usize, Instant), ReadEnd> {
    let now = Instant::now();
    // A new connection that says nothing holds its place for request_timeout, not longer.
    let idle_end = now
        + if first {
            limits.request_timeout.min(limits.idle_timeout)
        } else {
            limits.idle_timeout
        };
    // Bytes left over from a pipelined request start the next one's clock now.
    let mut started = (!buf.is_empty()).then(|| now + limits.request_timeout);
    loop {
        if !buf.is_empty() {
            match parse_request(buf, &LIMITS, head) {
                Ok(Some(n)) => {
                    return Ok((
                        n,
                        started.unwrap_or_else(|| Instant::now() + limits.request_timeout),
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Refused(e)),
            }
        }
        match read_more(s, buf, started.unwrap_or(idle_end)) {
            Ok(true) => {
                if started.is_none() {
                    started = Some(Instant::now() + limits.request_timeout);
                }
            }
            Ok(false) if started.is_some() => return Err(ReadEnd::Slow),
            Ok(false) => return Err(ReadEnd::Idle),
            Err(()) => return Err(ReadEnd::Closed),
        }
    }
}

/// Marks connection `id` as being answered (`Serving`) or waiting again; `false` when it was
/// closed to make room meanwhile (its request, complete or not, is not served).
fn set_state(admin: &Admin, id: u64, state: ConnState) -> bool {
    let mut c = lock(&admin.conns);
    match c.open.get_mut(&id) {
        Some(o) if o.state != ConnState::Evicted => {
            o.state = state;
            true
        }
        _ => false,
    }
}

/// Serves the requests of one connection.
fn serve(admin: &Admin, mut s: TcpStream, peer: SocketAddr, id: u64) {
    let _ = s.set_nodelay(true);
    let limits = admin.limits;
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut head = RequestHead::default();
    let mut served = 0u32;
    loop {
        let (len, deadline) = match read_head(&mut s, &mut buf, &mut head, &limits, served == 0) {
            Ok(x) => x,
            Err(ReadEnd::Closed) | Err(ReadEnd::Idle) => return,
            Err(ReadEnd::Slow) => {
                let r = AdminResponse::error(408, "the request took too long to arrive");
                let _ = write_response(&mut s, &r, false, true, deadline_from(&limits));
                return;
            }
            Err(ReadEnd::Refused(e)) => {
                let mut r = AdminResponse::error(e.status(), e.reason());
                if let Some(allow) = e.allow() {
                    r = r.with_header("allow", allow);
                }
                let _ = write_response(&mut s, &r, false, true, deadline_from(&limits));
                return;
            }
        };
        head.raw = bytes::Bytes::copy_from_slice(&buf[..len]);
        buf.drain(..len);
        let body_len = match head.body {
            BodyKind::None => 0,
            BodyKind::Length(n) if n <= MAX_BODY_BYTES => n as usize,
            BodyKind::Length(_) => {
                let r = AdminResponse::error(413, "the admin API takes bodies up to 1 MiB");
                let _ = write_response(&mut s, &r, false, true, deadline_from(&limits));
                return;
            }
            BodyKind::Chunked => {
                // RFC 9110 §15.5.12: the admin API wants a Content-Length.
                let r = AdminResponse::error(411, "send the body with a Content-Length");
                let _ = write_response(&mut s, &r, false, true, deadline_from(&limits));
                return;
            }
        };
        if body_len > 0 && head.expect_continue && buf.is_empty() {
            // RFC 9110 §10.1.1: the client waits for this before sending the body.
            if write_all_by(&mut s, b"HTTP/1.1 100 Continue\r\n\r\n", deadline).is_err() {
                return;
            }
        }
        while buf.len() < body_len {
            match read_more(&mut s, &mut buf, deadline) {
                Ok(true) => {}
                Ok(false) => {
                    let r = AdminResponse::error(408, "the request body took too long");
                    let _ = write_response(&mut s, &r, false, true, deadline_from(&limits));
                    return;
                }
                Err(()) => return,
            }
        }
        // While its handler runs, the connection is not closed to make room.
        if !set_state(admin, id, ConnState::Serving) {
            return;
        }
        let body: Vec<u8> = buf.drain(..body_len).collect();
        let req = request_of(&head, body, peer);
        let is_head = req.method == Method::Head;
        let resp = admin.dispatch(&req);
        served = served.saturating_add(1);
        let close = !head.keep_alive || served >= MAX_REQUESTS_PER_CONNECTION || admin.stopping();
        // The handler is done: a client slow to read its answer holds its place no better
        // than one slow to send its request.
        if !set_state(admin, id, ConnState::Waiting) {
            return;
        }
        if write_response(&mut s, &resp, is_head, close, deadline_from(&limits)).is_err() || close {
            return;
        }
    }
}

fn deadline_from(limits: &ConnLimits) -> Instant {
    Instant::now() + limits.request_timeout
}

/// The request as handlers see it.
fn request_of(head: &RequestHead, body: Vec<u8>, peer: SocketAddr) -> AdminRequest {
    let pq = head.bytes(head.path_query);
    let (path, query) = match pq.iter().position(|b| *b == b'?') {
        Some(p) => (&pq[..p], &pq[p + 1..]),
        None => (pq, &b""[..]),
    };
    let mut headers: Vec<(String, Vec<u8>)> = head
        .headers
        .iter()
        .map(|h| {
            (
                String::from_utf8_lossy(head.bytes(h.name)).to_ascii_lowercase(),
                head.bytes(h.value).to_vec(),
            )
        })
        .collect();
    // RFC 9112 §3.2.2: an absolute-form target's authority replaces the Host header (the
    // parser's `host`); handlers and the rebinding guard read it as `host`.
    if let Some(authority) = head.host.map(|h| head.bytes(h)) {
        match headers.iter_mut().find(|(n, _)| n == "host") {
            Some((_, v)) => {
                if v.as_slice() != authority {
                    *v = authority.to_vec();
                }
            }
            None => headers.push(("host".into(), authority.to_vec())),
        }
    }
    AdminRequest {
        method: head.method,
        path: String::from_utf8_lossy(path).into_owned(),
        query: String::from_utf8_lossy(query).into_owned(),
        headers,
        body,
        peer,
    }
}

/// Writes all of `data` before `end`.
fn write_all_by(s: &mut TcpStream, mut data: &[u8], end: Instant) -> io::Result<()> {
    while !data.is_empty() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_write_timeout(Some(left))?;
        match s.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A header line a handler asked for, if it cannot break the head (RFC 9110 §5.1, §5.5).
fn safe_header(name: &str, value: &str) -> bool {
    const SERVER_OWNED: &[&str] = &["content-length", "transfer-encoding", "connection", "date"];
    !name.is_empty()
        && name.bytes().all(crate::http::is_tchar)
        && !SERVER_OWNED.iter().any(|o| o.eq_ignore_ascii_case(name))
        && crate::config::check_header_value(value).is_ok()
}

/// Writes an answer; the body is left out for HEAD, 1xx, 204 and 304 (RFC 9110 §6.4.1).
fn write_response(
    s: &mut TcpStream,
    r: &AdminResponse,
    head_request: bool,
    close: bool,
    end: Instant,
) -> io::Result<()> {
    let mut out: Vec<u8> = Vec::with_capacity(256 + r.body.len());
    // A handler's status outside 100..=599 would not be a status code (RFC 9110 §15).
    let status = if (100..=599).contains(&r.status) {
        r.status
    } else {
        500
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(crate::http::encode::reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    out.extend_from_slice(&crate::date::http_date(secs));
    out.extend_from_slice(b"\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n");
    let no_body = head_request || status < 200 || status == 204 || status == 304;
    let mut lines: Vec<(&str, &str)> = vec![("content-type", r.content_type.as_str())];
    lines.extend(r.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    for (n, v) in lines {
        if safe_header(n, v) {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        } else {
            crate::warn!("admin: a handler's header {n:?} is not valid in a head; dropped");
        }
    }
    if status != 204 && status >= 200 {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(r.body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !no_body {
        out.extend_from_slice(&r.body);
    }
    write_all_by(s, &out, end)?;
    if close {
        // Let the answer reach the client before the close: an unread request byte would
        // otherwise turn the close into a reset that can destroy it (RFC 9112 §9.6).
        let _ = s.shutdown(std::net::Shutdown::Write);
        drain_briefly(s);
    }
    Ok(())
}

/// Reads and drops what the client still sends, for a short while, after a close.
fn drain_briefly(s: &mut TcpStream) {
    /// How long, and how much, a closing connection is read.
    const LINGER: Duration = Duration::from_millis(200);
    const LINGER_BYTES: usize = 64 * 1024;
    let end = Instant::now() + LINGER;
    let mut tmp = [0u8; READ_CHUNK];
    let mut seen = 0usize;
    while seen < LINGER_BYTES && arm_read(s, end) {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_well_framed() {
        let mut head = crate::http::response::ResponseHead::default();
        let n = crate::http::response::parse_response(BUSY, false, &mut head)
            .unwrap()
            .unwrap();
        assert_eq!(head.status, 503);
        assert_eq!(
            head.body,
            crate::http::response::RespBody::Length((BUSY.len() - n) as u64)
        );
    }

    #[test]
    fn handler_headers_that_could_break_the_head_are_refused() {
        assert!(safe_header("x-thing", "a value"));
        assert!(!safe_header("x-thing", "a\r\nset-cookie: x"));
        assert!(!safe_header("bad name", "v"));
        assert!(!safe_header("", "v"));
        assert!(!safe_header("Content-Length", "5"));
        assert!(!safe_header("connection", "keep-alive"));
    }
}
