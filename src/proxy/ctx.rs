//! A request's own state, born with its head and dropped with its response.
//!
//! Nothing here outlives the request: the connection keeps only its socket, its read buffer
//! and what the handshake told it. Buffers and the parsed head are lent by the worker's pool
//! and handed back cleared when the context drops, so a request allocates nothing once the
//! pools are warm, and no header line, flag or unread body byte of one request can reach the
//! next.

use bytes::{Bytes, BytesMut};

use crate::auth::Identity;
use crate::error::GatewayError;
use crate::http::chunked::{ChunkedReframer, TrailerPolicy};
use crate::http::request::{BodyKind, RequestHead};

use super::worker::{Timeouts, Worker};

/// Longest client-supplied X-Request-Id that is kept (longer ones are replaced).
pub const MAX_REQUEST_ID: usize = 64;

/// How much of the request body has come off the connection. The keep-alive decision after
/// any answer is made from this alone (see `conn::Conn::finish`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyState {
    /// Nothing of it was read (or the head was refused and its framing is unknown).
    Unread,
    /// Some of it was read, not all.
    Partial,
    /// All of it was read: the next byte on the connection starts the next request.
    Done,
}

/// The request body's framing and read state.
pub struct RequestBody {
    kind: BodyKind,
    state: BodyState,
    /// Content-Length bytes not yet taken off the connection.
    left: u64,
    /// Chunked framing, validated byte by byte and re-framed canonically for the upstream (no
    /// chunk extensions; trailers per the route's policy).
    reframer: ChunkedReframer,
    /// The route's body limit (data bytes).
    max: u64,
    /// The client asked for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// ringway sent `100 Continue` (the client will send the body).
    pub continue_sent: bool,
    /// The head was refused: where the body ends is unknown.
    unknown: bool,
    /// Body bytes taken off the connection, as they came (for the metrics and access log).
    wire: u64,
    /// The body was refused part way (bad chunk framing, over the limit): the answer for every
    /// later read. The reader's state has moved on over bytes that stay in the buffer, so
    /// reading them again could find an end that is not there (RFC 9112 §6.3, §11.2).
    failed: Option<GatewayError>,
}

impl RequestBody {
    pub fn new(head: &RequestHead, max: u64) -> RequestBody {
        let (state, left) = match head.body {
            BodyKind::None => (BodyState::Done, 0),
            BodyKind::Length(0) => (BodyState::Done, 0),
            BodyKind::Length(n) => (BodyState::Unread, n),
            BodyKind::Chunked => (BodyState::Unread, 0),
        };
        RequestBody {
            kind: head.body,
            state,
            left,
            reframer: ChunkedReframer::new(TrailerPolicy::Drop),
            max,
            expect_continue: head.expect_continue,
            continue_sent: false,
            unknown: false,
            wire: 0,
            failed: None,
        }
    }

    /// The body of a head that was refused: its end cannot be known.
    pub fn unknown() -> RequestBody {
        RequestBody {
            kind: BodyKind::None,
            state: BodyState::Unread,
            left: 0,
            reframer: ChunkedReframer::new(TrailerPolicy::Drop),
            max: 0,
            expect_continue: false,
            continue_sent: false,
            unknown: true,
            wire: 0,
            failed: None,
        }
    }

    /// The route's body limit and trailer policy (before any of the body is read).
    pub fn set_route(&mut self, max: u64, trailers: TrailerPolicy) {
        self.max = max;
        self.reframer.reset(trailers);
    }

    #[inline]
    pub fn state(&self) -> BodyState {
        self.state
    }

    #[inline]
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    pub fn kind(&self) -> BodyKind {
        self.kind
    }

    /// Body bytes taken off the connection so far, framing included.
    pub fn wire(&self) -> u64 {
        self.wire
    }

    /// Content-Length bytes still to come (0 for other framings).
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Whether the rest of the body can be read and thrown away so that the connection
    /// survives an answer: a known framing, and a client that is sending (it did not ask to
    /// wait for `100 Continue`, or got it). A client still waiting for `100 Continue` may send
    /// its body or not (RFC 9110 §10.1.1): nothing after the answer could be trusted.
    pub fn drainable(&self) -> bool {
        !self.unknown && self.failed.is_none() && (!self.expect_continue || self.continue_sent)
    }

    /// Takes off the front of `buf` the bytes that belong to this body (all of `buf`, or up to
    /// the body's end), as they go upstream: a Content-Length body as it came, a chunked one in
    /// canonical form (as it came when it already was; `deny` removes more trailer fields
    /// under the `Filter` policy). Marks the state.
    pub fn take_with(
        &mut self,
        buf: &mut BytesMut,
        deny: impl FnMut(&[u8]) -> bool,
    ) -> Result<BytesMut, GatewayError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.state == BodyState::Done || self.unknown || buf.is_empty() {
            return Ok(BytesMut::new());
        }
        let (consumed, part) = match self.kind {
            BodyKind::None => return Ok(BytesMut::new()),
            BodyKind::Length(_) => {
                let n = (buf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                if self.left == 0 {
                    self.state = BodyState::Done;
                }
                (n, buf.split_to(n))
            }
            BodyKind::Chunked => {
                // Stays empty (unallocated) while the body is canonical.
                let mut framed = BytesMut::new();
                let r = match self.reframer.reframe_with(buf, &mut framed, deny) {
                    Ok(r) => r,
                    Err(e) => return Err(self.fail(GatewayError::BadChunk(e))),
                };
                // A chunk size that takes the body past the limit is refused with its line,
                // before its data is read, and before the line goes anywhere (the upstream
                // never sees it), as a Content-Length over the limit is refused with the head.
                if self.reframer.declared_total() > self.max {
                    return Err(self.fail(GatewayError::BodyTooLarge));
                }
                if r.done {
                    self.state = BodyState::Done;
                }
                let raw = buf.split_to(r.consumed);
                (r.consumed, if r.verbatim { raw } else { framed })
            }
        };
        self.wire = self.wire.saturating_add(consumed as u64);
        if self.state != BodyState::Done && consumed > 0 {
            self.state = BodyState::Partial;
        }
        Ok(part)
    }

    /// Records that the body was refused part way; `e` is then every later read's answer.
    #[cold]
    fn fail(&mut self, e: GatewayError) -> GatewayError {
        self.failed = Some(e);
        e
    }

    /// [`Self::take_with`] without a deny list (for a body read to be thrown away).
    pub fn take(&mut self, buf: &mut BytesMut) -> Result<BytesMut, GatewayError> {
        self.take_with(buf, |_| false)
    }

    /// When all of a body not yet started lies in `buf`: its length there. `Ok(None)`: more
    /// is needed (or some was already taken).
    pub fn complete_in(&self, buf: &[u8]) -> Result<Option<usize>, GatewayError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.state != BodyState::Unread || self.unknown {
            return Ok(None);
        }
        match self.kind {
            BodyKind::None => Ok(Some(0)),
            BodyKind::Length(n) => Ok((buf.len() as u64 >= n).then_some(n as usize)),
            BodyKind::Chunked => {
                let mut r = self.reframer.clone();
                let mut scratch = BytesMut::new();
                let f = r
                    .reframe(buf, &mut scratch)
                    .map_err(GatewayError::BadChunk)?;
                if r.declared_total() > self.max {
                    return Err(GatewayError::BodyTooLarge);
                }
                Ok(f.done.then_some(f.consumed))
            }
        }
    }

    /// Takes the whole body out of `buf` when it is all there (see [`Self::complete_in`]), in
    /// the form it goes upstream (see [`Self::take_with`]).
    pub fn take_whole(
        &mut self,
        buf: &mut BytesMut,
        deny: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Bytes>, GatewayError> {
        let Some(n) = self.complete_in(buf)? else {
            return Ok(None);
        };
        let mut whole = buf.split_to(n);
        let out = match self.kind {
            BodyKind::Chunked => self.take_with(&mut whole, deny)?,
            _ => {
                self.wire = self.wire.saturating_add(n as u64);
                whole
            }
        };
        self.left = 0;
        self.state = BodyState::Done;
        Ok(Some(out.freeze()))
    }
}

/// A request id: the client's (when it is short and made of token characters) or ours.
pub struct ReqId {
    buf: [u8; MAX_REQUEST_ID],
    len: usize,
}

impl ReqId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The client's id when it is fit to be echoed, else a new one.
    fn assign(&mut self, w: &Worker, client: Option<&[u8]>) {
        match client.filter(|v| valid_request_id(v)) {
            Some(v) => {
                self.buf[..v.len()].copy_from_slice(v);
                self.len = v.len();
            }
            None => {
                let mut id = [0u8; 24];
                w.next_id(&mut id);
                self.buf[..24].copy_from_slice(&id);
                self.len = 24;
            }
        }
    }
}

fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

/// One request's context: created when its head begins, passed to every phase, dropped when
/// its response is done.
pub struct RequestCtx<'w> {
    w: &'w Worker,
    pub head: RequestHead,
    pub id: ReqId,
    /// The matched route's index in the snapshot's table.
    pub route: Option<usize>,
    /// This request's timeouts: the global ones with the route's overrides.
    pub t: Timeouts,
    /// Who made this request, once the route's auth policy accepted it.
    pub identity: Identity,
    /// Header lines for this request's response, whoever makes it: RateLimit lines, the
    /// `WWW-Authenticate` challenge of a refusal.
    pub resp_headers: BytesMut,
    /// Identity header lines sent upstream (forwarded claims, consumer).
    pub auth_headers: BytesMut,
    pub body: RequestBody,
    /// The answer written to the client.
    pub wbuf: BytesMut,
    /// The head sent upstream; kept to be sent again on a retry.
    pub ubuf: BytesMut,
    /// Consumers and credential providers, taken with the config snapshot: a route's policy
    /// names providers by index, so a reload between the two (while the head arrives) must
    /// not pair an old policy with new providers.
    pub auth: std::rc::Rc<crate::auth::WorkerAuth>,
    /// What the end of the request records (metrics, access log) and its trace context.
    pub rec: super::record::Record,
    /// The index of the listener that accepted the connection.
    pub listener: usize,
}

impl<'w> RequestCtx<'w> {
    /// This answer is the connection's last: a shutdown began (SIGTERM, a binary upgrade) or a
    /// reload removed the connection's listener. It says `Connection: close`, so the client
    /// sends nothing more on it (RFC 9112 §9.6).
    #[inline]
    pub fn last_answer(&self) -> bool {
        self.w.shutdown.is_set() || self.w.listener_closed(self.listener)
    }

    pub fn new(w: &'w Worker, t: Timeouts) -> RequestCtx<'w> {
        RequestCtx {
            w,
            head: w.bufs.take_head(),
            id: ReqId {
                buf: [0; MAX_REQUEST_ID],
                len: 0,
            },
            route: None,
            t,
            identity: Identity::default(),
            resp_headers: w.bufs.take(),
            auth_headers: w.bufs.take(),
            body: RequestBody::unknown(),
            wbuf: w.bufs.take(),
            ubuf: w.bufs.take(),
            auth: w.auth(),
            rec: super::record::Record::default(),
            listener: 0,
        }
    }

    /// Called once the head is parsed: the request id and the body's framing.
    pub fn head_ready(&mut self, max_body: u64) {
        let client_id = self.head.header(b"x-request-id");
        self.id.assign(self.w, client_id);
        self.body = RequestBody::new(&self.head, max_body);
        self.rec.head_ok = true;
        self.rec.trace = crate::trace::TraceContext::for_request(&self.head, || self.w.random());
    }

    /// Called when the head was refused: an id for the answer; the body's end is unknown.
    pub fn head_refused(&mut self) {
        self.id.assign(self.w, None);
        self.body = RequestBody::unknown();
        self.rec.head_ok = false;
        self.rec.trace = crate::trace::TraceContext::new_trace(|| self.w.random());
    }
}

impl Drop for RequestCtx<'_> {
    fn drop(&mut self) {
        let pool = &self.w.bufs;
        pool.give_head(std::mem::take(&mut self.head));
        pool.give(std::mem::take(&mut self.resp_headers));
        pool.give(std::mem::take(&mut self.auth_headers));
        pool.give(std::mem::take(&mut self.wbuf));
        pool.give(std::mem::take(&mut self.ubuf));
    }
}
