//! One upstream attempt, as a function: a request head and a body source in, a response head
//! and the connection to read its body from out, or a typed error that says which side
//! failed and whether trying again can help.
//!
//! The attempt touches no client socket: the request body and interim (1xx) responses go
//! through a [`Downstream`], which the proxy implements over the client connection and which
//! a caller with a body in memory (a composition step, a cache revalidation) implements over
//! that. Retries, endpoint choice and breaker bookkeeping are the caller's (`forward.rs`).

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use monoio::net::TcpStream;

use crate::error::GatewayError;
use crate::http::encode::put_status_line;
use crate::http::is_hop_by_hop;
use crate::http::response::{parse_response, RespError, ResponseHead};
use crate::tls;
use crate::upstream::{UpConn, UpStream, UpstreamGroup, UPSTREAM_READ_BUF};
use crate::warn;

use super::conn::{IoFail, IoTimer};
use super::worker::Timeouts;

/// Bodies up to this size are copied behind their head and sent in one write.
pub const COALESCE_BYTES: usize = 16 * 1024;
/// Most interim (1xx) responses accepted before the final one; more is a hostile upstream.
pub const MAX_INTERIM: usize = 16;

/// Why a request body could not be delivered from the downstream side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownFail {
    /// The body failed (timeout, bad chunk, too large): the error to answer with.
    Answer(GatewayError),
    /// The client went away: nothing to answer.
    Gone,
}

/// The side of the request that is not the upstream: where the body comes from and where
/// interim responses go.
pub trait Downstream {
    /// The whole body, when it is held in memory (sent with the head when small, and again
    /// on a retry). `None`: the body streams through [`Downstream::body_part`] once.
    fn replay(&self) -> Option<&Bytes>;

    /// The next piece of the body as it goes on the wire (already framed), or `None` at its end.
    fn body_part(&mut self) -> impl Future<Output = Result<Option<BytesMut>, DownFail>>;

    /// An interim response (hop-by-hop fields removed), for the downstream to pass on or drop.
    fn interim(&mut self, head: Bytes) -> impl Future<Output = Result<(), DownFail>>;

    /// A body remains to be sent (the upstream may answer before taking it all).
    fn has_body(&self) -> bool;
}

/// A body held in memory, with no one to pass interim responses to.
pub struct InMemory(pub Bytes);

impl Downstream for InMemory {
    fn replay(&self) -> Option<&Bytes> {
        Some(&self.0)
    }

    async fn body_part(&mut self) -> Result<Option<BytesMut>, DownFail> {
        Ok(None)
    }

    async fn interim(&mut self, _head: Bytes) -> Result<(), DownFail> {
        Ok(())
    }

    fn has_body(&self) -> bool {
        !self.0.is_empty()
    }
}

/// Why one attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptError {
    /// Connect refused, timed out, or its TLS handshake failed (the error to answer with).
    Connect(GatewayError),
    /// A reused connection failed before any response byte: most likely closed while idle.
    Stale,
    /// The connection failed after the request was sent, before a response head.
    Reset,
    /// A new TLS connection's TLS layer failed after the request was sent, before any
    /// response byte, other than by the server refusing the handshake (that is `Connect`):
    /// an alert such as internal_error, or a record rustls refused. Answered as a TLS
    /// failure, retried as a reset (the upstream may have read the request).
    Tls,
    /// No response head within `upstream_response`, or a write to the upstream stalled.
    Timeout,
    /// The upstream's response head was invalid, or it sent too many interim responses.
    Bad,
    /// The downstream failed (its body timed out or was invalid, or it went away).
    Down(DownFail),
    /// `max_connections` reached and no room among `max_pending`.
    Overloaded,
}

impl AttemptError {
    /// Whether the upstream is to blame (for breakers, outlier detection and retries).
    pub fn upstream_side(&self) -> bool {
        !matches!(self, AttemptError::Down(_) | AttemptError::Overloaded)
    }

    /// The answer when no retry follows (`None`: the client is gone, answer nothing).
    pub fn answer(&self) -> Option<GatewayError> {
        Some(match self {
            AttemptError::Connect(e) => *e,
            AttemptError::Stale | AttemptError::Reset => GatewayError::UpstreamClosed,
            AttemptError::Tls => GatewayError::UpstreamTls,
            AttemptError::Timeout => GatewayError::UpstreamTimeout,
            AttemptError::Bad => GatewayError::UpstreamBadResponse,
            AttemptError::Overloaded => GatewayError::Overloaded,
            AttemptError::Down(DownFail::Answer(e)) => *e,
            AttemptError::Down(DownFail::Gone) => return None,
        })
    }
}

/// How to make one attempt.
#[derive(Clone, Copy, Debug)]
pub struct AttemptOpts {
    /// The request is HEAD: the response has no body whatever its headers say.
    pub head_request: bool,
    /// A pooled connection may be used.
    pub allow_pool: bool,
    /// Peek-check a pooled connection before use (skipped when a stale one costs only a resend).
    pub verify: bool,
    pub t: Timeouts,
}

/// One try: a connection to `ep`, the head in `head` and the body sent, the final response
/// head read into `resp`. `head` is handed back as it was sent, for a retry.
pub async fn attempt<D: Downstream>(
    group: &UpstreamGroup,
    ep: usize,
    head: &mut BytesMut,
    down: &mut D,
    o: &AttemptOpts,
    resp: &mut ResponseHead,
) -> Result<UpConn, AttemptError> {
    let mut up = acquire(group, ep, o).await?;
    // One timer for the writes and the wait for the response head.
    let slot = std::pin::pin!(None);
    let mut timer = IoTimer::new(slot);
    match send_request(&mut up, head, down, &o.t, &mut timer).await {
        Ok(()) => {}
        Err(SendFail::Down(f)) => return Err(AttemptError::Down(f)),
        Err(SendFail::Upstream(timeout)) => {
            // An upstream may answer before it has read the whole body (its own 413, an auth
            // error) and stop reading: pass that answer on rather than a 502. The client's
            // connection closes after it, as its body was not all read.
            // A fresh TLS connection whose write failed may hold the server's refusal of
            // the handshake (TLS 1.3: an alert after the client's Finished), which a read
            // finds.
            let fresh_tls = !timeout && !up.reused && matches!(up.stream, UpStream::Tls(..));
            if down.has_body() || fresh_tls {
                match read_response_head(&mut up, down, o, resp, &mut timer).await {
                    Ok(()) if down.has_body() => return Ok(up),
                    Err(RespFail::Tls(refused)) if fresh_tls => return Err(tls_fail(refused)),
                    _ => {}
                }
            }
            return Err(if timeout {
                AttemptError::Timeout
            } else if up.reused {
                AttemptError::Stale
            } else {
                AttemptError::Reset
            });
        }
    }
    match read_response_head(&mut up, down, o, resp, &mut timer).await {
        Ok(()) => Ok(up),
        Err(RespFail::Tls(refused)) if !up.reused => Err(tls_fail(refused)),
        Err(RespFail::ClosedEarly | RespFail::Tls(_)) if up.reused => Err(AttemptError::Stale),
        Err(RespFail::ClosedEarly | RespFail::Tls(_)) => Err(AttemptError::Reset),
        Err(RespFail::Timeout) => Err(AttemptError::Timeout),
        Err(RespFail::Bad) => Err(AttemptError::Bad),
        Err(RespFail::Down(f)) => Err(AttemptError::Down(f)),
    }
}

/// The first read of a new TLS connection failed in the TLS layer before any response byte.
/// An alert refusing the handshake (TLS 1.3 sends its refusal of a missing or unwanted client
/// certificate after the client took the handshake as done, RFC 8446 §4.4.2.4) is a failed
/// handshake: the server read no request, so it counts and retries as a connect failure.
/// Any other TLS failure is answered as one but retried as a reset.
fn tls_fail(refused: bool) -> AttemptError {
    if refused {
        AttemptError::Connect(GatewayError::UpstreamTls)
    } else {
        AttemptError::Tls
    }
}

/// A pooled connection to `ep`, or a new one within the breaker's `max_connections`
/// (waiting as one of at most `max_pending` requests when the limit is reached).
async fn acquire(
    group: &UpstreamGroup,
    ep: usize,
    o: &AttemptOpts,
) -> Result<UpConn, AttemptError> {
    if o.allow_pool {
        if let Some(c) = group.checkout(ep, o.verify) {
            return Ok(c);
        }
    }
    if let Some(b) = &group.breaker {
        if let Some(max) = b.max_connections {
            let started = Instant::now();
            while group.conns.open.get() >= max {
                if group.evict_one_idle() {
                    continue;
                }
                if b.pending.get() >= b.max_pending {
                    return Err(AttemptError::Overloaded);
                }
                b.pending.set(b.pending.get() + 1);
                let left = o.t.upstream_connect.saturating_sub(started.elapsed());
                let woke = monoio::time::timeout(left, group.conns.freed.notified())
                    .await
                    .is_ok();
                b.pending.set(b.pending.get() - 1);
                if !woke {
                    return Err(AttemptError::Overloaded);
                }
                if o.allow_pool {
                    if let Some(c) = group.checkout(ep, o.verify) {
                        return Ok(c);
                    }
                }
            }
        }
    }
    connect(group, ep, o.t.upstream_connect)
        .await
        .map_err(AttemptError::Connect)
}

/// A new connection to endpoint `ep`: TCP, then the TLS handshake when the group has TLS,
/// both within `dur`.
pub async fn connect(
    group: &UpstreamGroup,
    ep: usize,
    dur: Duration,
) -> Result<UpConn, GatewayError> {
    let addr = group.endpoints[ep].addr;
    let started = Instant::now();
    let stream = match monoio::time::timeout(dur, TcpStream::connect_addr(addr)).await {
        Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
        Ok(Err(_)) => return Err(GatewayError::UpstreamConnect),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let stream = match &group.tls {
        None => UpStream::Plain(stream),
        Some(t) => {
            use std::os::fd::AsRawFd;
            let fd = stream.as_raw_fd();
            let left = dur.saturating_sub(started.elapsed());
            match monoio::time::timeout(left, tls::connect(t, ep, stream)).await {
                Err(_) => return Err(GatewayError::UpstreamConnectTimeout),
                Ok(Err(e)) => {
                    warn!(
                        "TLS handshake with {addr} (upstream {}) failed: {e:?}",
                        group.name
                    );
                    return Err(GatewayError::UpstreamTls);
                }
                Ok(Ok(s)) => UpStream::Tls(Box::new(s), fd),
            }
        }
    };
    Ok(group.adopt(stream, ep))
}

enum SendFail {
    Down(DownFail),
    /// Writing to the upstream failed (`true`: it stalled past `upstream_write`).
    Upstream(bool),
}

fn up_fail(e: IoFail) -> SendFail {
    SendFail::Upstream(e == IoFail::Timeout)
}

/// Sends the head and the body: the downstream's bytes in memory, or streamed from it.
async fn send_request<D: Downstream>(
    up: &mut UpConn,
    head: &mut BytesMut,
    down: &mut D,
    t: &Timeouts,
    timer: &mut IoTimer<'_>,
) -> Result<(), SendFail> {
    let t_w = t.upstream_write;
    let head_len = head.len();
    let mut buf = std::mem::take(head);
    let replay = down.replay().cloned();
    let small = replay.as_ref().is_some_and(|b| b.len() <= COALESCE_BYTES);
    if let Some(b) = replay.as_ref().filter(|_| small) {
        buf.put_slice(b);
    }
    let res = timer.write_buf(&mut up.stream, buf, t_w).await;
    match res {
        Ok(mut b) => {
            b.truncate(head_len);
            *head = b;
        }
        Err(e) => return Err(up_fail(e)),
    }
    if let Some(b) = replay {
        if !small {
            timer
                .write_buf(&mut up.stream, b, t_w)
                .await
                .map_err(up_fail)?;
        }
        return Ok(());
    }
    while let Some(part) = down.body_part().await.map_err(SendFail::Down)? {
        timer
            .write_buf(&mut up.stream, part, t_w)
            .await
            .map_err(up_fail)?;
    }
    Ok(())
}

enum RespFail {
    ClosedEarly,
    /// A TLS alert (or a record rustls refused) before any response byte; `true`: an alert
    /// refusing the handshake.
    Tls(bool),
    Timeout,
    Bad,
    Down(DownFail),
}

/// Reads the final response head into `resp`, passing interim responses other than 100
/// (which ringway answers itself) to the downstream, at most [`MAX_INTERIM`] of them.
async fn read_response_head<D: Downstream>(
    up: &mut UpConn,
    down: &mut D,
    o: &AttemptOpts,
    resp: &mut ResponseHead,
    timer: &mut IoTimer<'_>,
) -> Result<(), RespFail> {
    // The whole head, interim responses included, within `upstream_response`.
    let deadline = super::conn::due_in(o.t.upstream_response);
    let mut got_any = false;
    let mut interim = 0usize;
    loop {
        if !up.rbuf.is_empty() {
            got_any = true;
            match parse_response(&up.rbuf, o.head_request, resp) {
                Ok(Some(n)) => {
                    resp.raw = up.rbuf.split_to(n).freeze();
                    let status = resp.status;
                    if status == 101 {
                        return Err(RespFail::Bad);
                    }
                    if (100..200).contains(&status) {
                        interim += 1;
                        if interim > MAX_INTERIM {
                            return Err(RespFail::Bad);
                        }
                        if status != 100 {
                            down.interim(strip_interim(resp))
                                .await
                                .map_err(RespFail::Down)?;
                        }
                        continue;
                    }
                    return Ok(());
                }
                Ok(None) => {}
                Err(RespError::TooLarge) | Err(RespError::Malformed(_)) => {
                    return Err(RespFail::Bad)
                }
            }
        }
        match timer
            .read_some_until(&mut up.stream, &mut up.rbuf, UPSTREAM_READ_BUF, deadline)
            .await
        {
            Ok(_) => {}
            Err(IoFail::Timeout) => return Err(RespFail::Timeout),
            Err(IoFail::Tls(refused)) if !got_any => return Err(RespFail::Tls(refused)),
            Err(_) if got_any => return Err(RespFail::Bad),
            Err(_) => return Err(RespFail::ClosedEarly),
        }
    }
}

/// An interim response as it is passed on: its status line and its end-to-end fields; the
/// hop-by-hop ones (and any the Connection field names) stay on this hop.
fn strip_interim(h: &ResponseHead) -> Bytes {
    let mut out = BytesMut::with_capacity(h.raw.len());
    put_status_line(&mut out, h.status, h.bytes(h.reason));
    let listed = crate::http::ConnectionOptions::collect(&h.raw, &h.headers, h.connection_options);
    for f in &h.headers {
        let name = h.bytes(f.name);
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case(b"content-length") || listed.lists(name)
        {
            continue;
        }
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(h.bytes(f.value));
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}
