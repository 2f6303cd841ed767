//! Body relays: the request body from the client (as a [`Downstream`] of an attempt) and the
//! response body to the client, each through bounded buffers, one read and one write at a
//! time, so that a slow side slows the other instead of growing memory.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use monoio::buf::IoBuf;

use crate::error::GatewayError;
use crate::http::chunked::{ChunkedReframer, ChunkedScanner, TrailerPolicy};
use crate::http::encode::put_chunk_size;
use crate::http::request::BodyKind;
use crate::http::response::{RespBody, ResponseHead};
use crate::http::Version;
use crate::rewrite::{connection_value, encode_client_head, Forwarding};
use crate::router::Route;
use crate::upstream::{UpConn, UPSTREAM_READ_BUF};

use super::attempt::{DownFail, Downstream, COALESCE_BYTES};
use super::conn::{
    read_some, write_buf, ClientIo, Conn, IoFail, IoTimer, Outcome, BODY_READ_CHUNK,
};
use super::ctx::{RequestBody, RequestCtx};
use super::worker::{deadline_after, time_left, Snapshot, Timeouts, Worker};

/// The client side of a proxied request: its body, read as the upstream takes it, and the
/// interim responses passed back to it.
pub struct ClientSide<'a, S> {
    pub io: &'a mut S,
    pub rbuf: &'a mut BytesMut,
    pub body: &'a mut RequestBody,
    /// The whole body, when it was read before the first attempt.
    pub replay: Option<Bytes>,
    pub t: Timeouts,
    /// HTTP/1.1 clients get interim responses; HTTP/1.0 clients cannot.
    pub pass_interim: bool,
    /// Header names the route removes from requests (identity headers among them): trailer
    /// fields of these names are not forwarded either.
    pub denied: Option<&'a crate::router::HeaderRules>,
    /// `client_body_total`, from the first body read on.
    deadline: Option<Option<Instant>>,
}

impl<'a, S: ClientIo> ClientSide<'a, S> {
    pub fn new(
        io: &'a mut S,
        rbuf: &'a mut BytesMut,
        body: &'a mut RequestBody,
        t: Timeouts,
        version: Version,
    ) -> ClientSide<'a, S> {
        ClientSide {
            io,
            rbuf,
            body,
            replay: None,
            t,
            pass_interim: version == Version::Http11,
            denied: None,
            deadline: None,
        }
    }

    /// Sends `100 Continue` once, when the client asked for it and its body is wanted now.
    pub async fn send_continue(&mut self) -> Result<(), DownFail> {
        if !self.body.expect_continue || self.body.continue_sent || self.body.is_done() {
            return Ok(());
        }
        self.body.continue_sent = true;
        write_buf(
            self.io,
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            self.t.client_write,
        )
        .await
        .map(|_| ())
        .map_err(|_| DownFail::Gone)
    }

    /// Reads more of the request body into the read buffer: a pause past `client_body`, or
    /// the whole body past `client_body_total`, is a 408; a client that went away gets
    /// nothing.
    pub async fn read_more(&mut self) -> Result<(), DownFail> {
        let deadline = *self
            .deadline
            .get_or_insert_with(|| self.t.client_body_total.and_then(deadline_after));
        let dur = time_left(deadline, self.t.client_body);
        if dur.is_zero() {
            return Err(DownFail::Answer(GatewayError::ClientTimeout));
        }
        match read_some(self.io, self.rbuf, BODY_READ_CHUNK, dur).await {
            Ok(_) => Ok(()),
            Err(IoFail::Timeout) => Err(DownFail::Answer(GatewayError::ClientTimeout)),
            Err(_) => Err(DownFail::Gone),
        }
    }

    /// Reads the whole body into memory when it can be kept for a replay: already buffered,
    /// or (with a retry policy) no larger than `keep_limit`. `None`: it will stream once.
    pub async fn read_replayable(&mut self, keep_limit: u64) -> Result<Option<Bytes>, DownFail> {
        if self.body.is_done() {
            return Ok(Some(Bytes::new()));
        }
        loop {
            let denied = self.denied;
            let deny = |name: &[u8]| {
                denied.is_some_and(|d| d.drops(name) || d.drops_identity_spelling(name))
            };
            if let Some(b) = self
                .body
                .take_whole(self.rbuf, deny)
                .map_err(DownFail::Answer)?
            {
                return Ok(Some(b));
            }
            let too_big = match self.body.kind() {
                BodyKind::Length(n) => n > keep_limit,
                _ => self.rbuf.len() as u64 >= keep_limit,
            };
            if too_big {
                return Ok(None);
            }
            // Small enough to keep: read the rest before choosing an endpoint.
            self.send_continue().await?;
            self.read_more().await?;
        }
    }
}

impl<S: ClientIo> Downstream for ClientSide<'_, S> {
    fn replay(&self) -> Option<&Bytes> {
        self.replay.as_ref()
    }

    async fn body_part(&mut self) -> Result<Option<BytesMut>, DownFail> {
        if self.replay.is_some() || self.body.is_done() {
            return Ok(None);
        }
        self.send_continue().await?;
        loop {
            if !self.rbuf.is_empty() {
                let denied = self.denied;
                let deny = |name: &[u8]| {
                    denied.is_some_and(|d| d.drops(name) || d.drops_identity_spelling(name))
                };
                let part = self
                    .body
                    .take_with(self.rbuf, deny)
                    .map_err(DownFail::Answer)?;
                if !part.is_empty() {
                    return Ok(Some(part));
                }
            }
            if self.body.is_done() {
                return Ok(None);
            }
            self.read_more().await?;
        }
    }

    async fn interim(&mut self, head: Bytes) -> Result<(), DownFail> {
        if !self.pass_interim {
            return Ok(());
        }
        write_buf(self.io, head, self.t.client_write)
            .await
            .map(|_| ())
            .map_err(|_| DownFail::Gone)
    }

    fn has_body(&self) -> bool {
        self.body.kind() != BodyKind::None
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OutFraming {
    None,
    Length(u64),
    ChunkedPass,
    Dechunk,
    Rechunk,
    UntilClose,
}

enum RelayFail {
    /// The upstream's body framing was invalid before any byte reached the client: a 502
    /// can still be answered.
    BadBeforeHead,
    Io,
}

impl From<IoFail> for RelayFail {
    fn from(_: IoFail) -> Self {
        RelayFail::Io
    }
}

/// Writes the response head and relays the body. Returns how the request ended and whether
/// the upstream connection may go back to the pool.
pub async fn forward_response<'c, S: ClientIo>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    up: &mut UpConn,
    resp: &ResponseHead,
) -> (Outcome<'c>, bool) {
    forward_response_tee(w, cfg, route, c, ctx, up, resp, None).await
}

/// [`forward_response`], with the body's data bytes also captured into `tee` (the cache's
/// copy of a response it may store) as they go to the client.
#[allow(clippy::too_many_arguments)]
pub async fn forward_response_tee<'c, S: ClientIo>(
    w: &Worker,
    cfg: &Snapshot,
    route: &Route,
    c: &mut Conn<S>,
    ctx: &mut RequestCtx<'_>,
    up: &mut UpConn,
    resp: &ResponseHead,
    tee: Option<&mut crate::cache::Tee>,
) -> (Outcome<'c>, bool) {
    let client_11 = ctx.head.version == Version::Http11;
    ctx.rec.status = resp.status;
    // How the body reaches the client.
    let out = match resp.body {
        RespBody::None => OutFraming::None,
        RespBody::Length(n) => OutFraming::Length(n),
        RespBody::Chunked if client_11 => OutFraming::ChunkedPass,
        RespBody::Chunked => OutFraming::Dechunk,
        RespBody::Close if client_11 => OutFraming::Rechunk,
        RespBody::Close => OutFraming::UntilClose,
    };
    let definite = !matches!(out, OutFraming::Dechunk | OutFraming::UntilClose);
    // The request body was read to its end, else the connection cannot go on.
    let keep = ctx.head.keep_alive && definite && ctx.body.is_done() && !ctx.last_answer();

    let f = Forwarding {
        peer_ip: c.peer.as_bytes(),
        trusted: c.info.trusted,
        port: c.info.port,
        request_id: ctx.id.as_bytes(),
        via: &cfg.via,
        https: c.info.tls,
        client_cert: None,
        identity: b"",
        traceparent: None,
        keep_tracestate: crate::trace::KeepState::None,
    };
    let chunked = matches!(out, OutFraming::ChunkedPass | OutFraming::Rechunk);
    encode_client_head(
        &mut ctx.wbuf,
        resp,
        &route.response_headers,
        &f,
        &w.date.get(),
        &ctx.resp_headers,
        chunked,
        connection_value(keep, ctx.head.version),
    );

    // One timer for the relay's writes and reads.
    let slot = std::pin::pin!(None);
    let mut r = Relay {
        timer: IoTimer::new(slot),
        io: &mut c.io,
        wbuf: &mut ctx.wbuf,
        t_write: ctx.t.client_write,
        t_body: ctx.t.upstream_body,
        deadline: ctx.t.upstream_body_total.and_then(deadline_after),
        tee,
        sent: 0,
        gone: false,
    };
    let result = match out {
        OutFraming::None => r.flush().await.map(|_| true).map_err(RelayFail::from),
        OutFraming::Length(n) => r.copy_length(up, n).await.map_err(RelayFail::from),
        OutFraming::ChunkedPass | OutFraming::Dechunk => {
            r.copy_chunked(up, out == OutFraming::Dechunk, &route.response_headers)
                .await
        }
        OutFraming::Rechunk | OutFraming::UntilClose => r
            .copy_until_close(up, out == OutFraming::Rechunk)
            .await
            .map_err(RelayFail::from),
    };
    ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(r.sent);
    match result {
        Ok(complete) => {
            let reusable = complete
                && ctx.body.is_done()
                && resp.keep_alive
                && resp.body != RespBody::Close
                && up.rbuf.is_empty()
                && !bodiless_by_rule(resp, ctx.head.method == crate::http::request::Method::Head)
                && !(resp.version == Version::Http10
                    && resp.header(b"transfer-encoding").is_some())
                && !w.shutdown.is_set();
            if r.gone {
                // The client went away; the body was read on to its end for the cache (the
                // capture is whole), and the client's connection closes.
                if let Some(t) = r.tee.as_deref_mut() {
                    t.drained = true;
                }
                return (Outcome::Abort, reusable);
            }
            (Outcome::Relayed { keep }, reusable)
        }
        Err(RelayFail::BadBeforeHead) => (Outcome::from(GatewayError::UpstreamBadResponse), false),
        // Cut after the head went out. A client given a length or chunks sees the body end
        // short (RFC 9112 §8); one reading until the close would take a plain close for the
        // end, so its connection is reset instead.
        Err(RelayFail::Io) if !definite => (Outcome::Cut, false),
        Err(RelayFail::Io) => (Outcome::Abort, false),
    }
}

/// A response without a body by rule (RFC 9112 §6.3: to HEAD, 204, 304) whatever its header
/// fields say. A broken upstream may still send body bytes after it, later than the head, and
/// they would become the next request's response: such a connection is never pooled.
fn bodiless_by_rule(resp: &ResponseHead, head_request: bool) -> bool {
    head_request || resp.status == 204 || resp.status == 304
}

/// The client half of a response relay.
struct Relay<'a, S> {
    timer: IoTimer<'a>,
    io: &'a mut S,
    wbuf: &'a mut BytesMut,
    t_write: Duration,
    t_body: Duration,
    /// `upstream_body_total`, when set.
    deadline: Option<Instant>,
    /// The cache's capture of the body, when it may store the response.
    tee: Option<&'a mut crate::cache::Tee>,
    /// Bytes written to the client.
    sent: u64,
    /// A write to the client failed while the capture still wanted the rest of the body
    /// ([`Relay::leave`]): nothing more is written, the body is read on into the capture.
    gone: bool,
}

impl<S: ClientIo> Relay<'_, S> {
    /// Writes to the client, counting the bytes, and hands the buffer back (`None`: lost
    /// with a failed write the relay goes on after, see [`Relay::leave`]). Once the client
    /// is gone, nothing is written.
    async fn write<B: IoBuf + 'static>(&mut self, buf: B) -> Result<Option<B>, IoFail> {
        if self.gone {
            return Ok(Some(buf));
        }
        let n = buf.bytes_init() as u64;
        match self.timer.write_buf(self.io, buf, self.t_write).await {
            Ok(b) => {
                self.sent = self.sent.saturating_add(n);
                Ok(Some(b))
            }
            Err(e) => self.leave(e).map(|_| None),
        }
    }

    /// A write to the client failed (it went away, or stopped reading past
    /// `client_write`): the relay ends, unless the cache's capture still wants the rest of
    /// the body ([`crate::cache::Tee::wants_rest`]: it may be stored, and coalesced waiters
    /// receive it). Then the body is read on without client writes, within the upstream
    /// body timeouts, and the client's connection is closed at the end.
    #[cold]
    fn leave(&mut self, e: IoFail) -> Result<(), IoFail> {
        if self.tee.as_ref().is_some_and(|t| t.wants_rest()) {
            self.gone = true;
            Ok(())
        } else {
            Err(e)
        }
    }

    async fn flush(&mut self) -> Result<(), IoFail> {
        let buf = std::mem::take(self.wbuf);
        if let Some(mut buf) = self.write(buf).await? {
            buf.clear();
            *self.wbuf = buf;
        }
        Ok(())
    }

    /// One read of the upstream body: a pause past `upstream_body`, or the whole body past
    /// `upstream_body_total`, cuts the response. Once the client is gone, reading stops when
    /// the capture no longer wants the rest.
    async fn read_up(
        &mut self,
        up: &mut UpConn,
        buf: &mut BytesMut,
        want: usize,
    ) -> Result<usize, IoFail> {
        if self.gone && !self.tee.as_ref().is_some_and(|t| t.wants_rest()) {
            return Err(IoFail::Io);
        }
        let dur = time_left(self.deadline, self.t_body);
        if dur.is_zero() {
            return Err(IoFail::Timeout);
        }
        self.timer.read_some(&mut up.stream, buf, want, dur).await
    }

    /// Copies a Content-Length body. Small bodies already read go out with the head in one
    /// write; larger ones are relayed through the upstream connection's buffer.
    async fn copy_length(&mut self, up: &mut UpConn, n: u64) -> Result<bool, IoFail> {
        let mut left = n;
        let have = up.rbuf.len().min(left.min(usize::MAX as u64) as usize);
        if let Some(t) = self.tee.as_deref_mut() {
            t.push(&up.rbuf[..have]);
        }
        if have as u64 == left && have <= COALESCE_BYTES {
            self.wbuf.extend_from_slice(&up.rbuf[..have]);
            up.rbuf.advance(have);
            self.flush().await?;
            return Ok(true);
        }
        self.flush().await?;
        if have > 0 {
            let part = up.rbuf.split_to(have);
            left -= have as u64;
            self.write(part).await?;
        }
        if left == 0 {
            return Ok(true);
        }
        let mut buf = std::mem::take(&mut up.rbuf);
        while left > 0 {
            buf.clear();
            let want = (left.min(BODY_READ_CHUNK as u64)) as usize;
            let k = self.read_up(up, &mut buf, want).await?;
            if let Some(t) = self.tee.as_deref_mut() {
                t.push(&buf);
            }
            left -= (k as u64).min(left);
            buf = self.write(buf).await?.unwrap_or_default();
        }
        buf.clear();
        up.rbuf = buf;
        Ok(true)
    }

    /// Copies a chunked body: as it is to HTTP/1.1 clients (the scanner checks every framing
    /// byte and finds the end), or as plain data to HTTP/1.0 clients. Bad framing seen before
    /// the head went out is still a 502. A trailer section goes to HTTP/1.1 clients filtered
    /// ([`Relay::copy_trailers`]); HTTP/1.0 clients get none.
    async fn copy_chunked(
        &mut self,
        up: &mut UpConn,
        dechunk: bool,
        rules: &crate::router::HeaderRules,
    ) -> Result<bool, RelayFail> {
        let mut scanner = ChunkedScanner::new();
        let mut head_pending = true;
        loop {
            if !up.rbuf.is_empty() {
                let mark = self.wbuf.len();
                let mut tee = self.tee.as_deref_mut();
                let scanned = if dechunk {
                    let rb = &up.rbuf;
                    let wb = &mut *self.wbuf;
                    scanner.scan(rb, |a, b| {
                        wb.extend_from_slice(&rb[a..b]);
                        if let Some(t) = tee.as_deref_mut() {
                            t.push(&rb[a..b]);
                        }
                    })
                } else if let Some(t) = tee {
                    let rb = &up.rbuf;
                    scanner.scan_to_trailer(rb, |a, b| t.push(&rb[a..b]))
                } else {
                    scanner.scan_to_trailer(&up.rbuf, |_, _| {})
                };
                let r = match scanned {
                    Ok(r) => r,
                    Err(_) if head_pending => {
                        self.wbuf.truncate(mark);
                        return Err(RelayFail::BadBeforeHead);
                    }
                    Err(_) => return Err(RelayFail::Io),
                };
                if dechunk {
                    up.rbuf.advance(r.consumed);
                    self.flush().await?;
                } else if head_pending && r.consumed <= COALESCE_BYTES {
                    self.wbuf.extend_from_slice(&up.rbuf[..r.consumed]);
                    up.rbuf.advance(r.consumed);
                    self.flush().await?;
                } else {
                    if head_pending {
                        self.flush().await?;
                    }
                    let part = up.rbuf.split_to(r.consumed);
                    self.write(part).await?;
                }
                head_pending = false;
                if r.done {
                    return Ok(true);
                }
                if !dechunk && scanner.at_trailer() {
                    return self.copy_trailers(up, scanner, rules).await;
                }
            } else if head_pending {
                self.flush().await?;
                head_pending = false;
            }
            let mut rb = std::mem::take(&mut up.rbuf);
            let res = self.read_up(up, &mut rb, UPSTREAM_READ_BUF).await;
            up.rbuf = rb;
            res?;
        }
    }

    /// The rest of a chunked body once its last chunk went to the client: the trailer
    /// section, filtered as request trailers are under `trailers = "forward"` (RFC 9110
    /// §6.5.1: no field that frames, routes, authenticates, controls caching or the like; see
    /// [`crate::http::chunked::trailer_allowed`]) and without the fields the route removes
    /// from responses, then the final CRLF. A response without trailer fields has already
    /// ended when this would start, so only trailers pay for it (the line buffer).
    #[cold]
    async fn copy_trailers(
        &mut self,
        up: &mut UpConn,
        scanner: ChunkedScanner,
        rules: &crate::router::HeaderRules,
    ) -> Result<bool, RelayFail> {
        let mut rf = ChunkedReframer::from_scanner(scanner, TrailerPolicy::Filter);
        loop {
            if !up.rbuf.is_empty() {
                let r = rf
                    .reframe_with(&up.rbuf, self.wbuf, |name| rules.drops(name))
                    .map_err(|_| RelayFail::Io)?;
                if r.verbatim {
                    self.wbuf.extend_from_slice(&up.rbuf[..r.consumed]);
                }
                up.rbuf.advance(r.consumed);
                if r.done {
                    self.flush().await?;
                    return Ok(true);
                }
            }
            let mut rb = std::mem::take(&mut up.rbuf);
            let res = self.read_up(up, &mut rb, UPSTREAM_READ_BUF).await;
            up.rbuf = rb;
            res?;
        }
    }

    /// Copies a body delimited by the upstream closing: re-framed as chunked for HTTP/1.1
    /// clients, as it is (then closing) for HTTP/1.0 clients.
    async fn copy_until_close(&mut self, up: &mut UpConn, rechunk: bool) -> Result<bool, IoFail> {
        self.flush().await?;
        loop {
            if !up.rbuf.is_empty() {
                if let Some(t) = self.tee.as_deref_mut() {
                    t.push(&up.rbuf);
                }
                if rechunk {
                    self.wbuf.clear();
                    put_chunk_size(self.wbuf, up.rbuf.len());
                    self.wbuf.extend_from_slice(&up.rbuf);
                    self.wbuf.put_slice(b"\r\n");
                    up.rbuf.clear();
                    self.flush().await?;
                } else {
                    let part = up.rbuf.split();
                    self.write(part).await?;
                }
            }
            let mut rb = std::mem::take(&mut up.rbuf);
            let res = self.read_up(up, &mut rb, UPSTREAM_READ_BUF).await;
            up.rbuf = rb;
            match res {
                Ok(_) => {}
                Err(IoFail::Eof) => break,
                Err(e) => return Err(e),
            }
        }
        if rechunk {
            self.write(&b"0\r\n\r\n"[..]).await?;
        }
        Ok(false)
    }
}
