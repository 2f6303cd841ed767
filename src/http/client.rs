//! The gateway's own HTTP/1.1 client, for the calls it makes itself: JWKS fetches, token
//! introspection and active health checks.
//!
//! It reads answers with the codec the proxy uses for upstream responses
//! ([`parse_response`] for heads, [`ChunkedScanner`] for chunked bodies), so an identity
//! provider or a health endpoint meets the same limits as an upstream: a head of at most
//! [`MAX_RESPONSE_HEAD_BYTES`](super::response::MAX_RESPONSE_HEAD_BYTES) and
//! [`MAX_RESPONSE_HEADERS`](super::response::MAX_RESPONSE_HEADERS) lines, at most
//! [`MAX_INTERIM_RESPONSES`] 1xx answers before the final one, a body cap given by the caller
//! and checked before anything is buffered, and one deadline for the whole exchange, connect
//! and TLS handshake included ([`within`]).
//!
//! A connection is reused ([`Pool`]) only when its answer was read to a definite end
//! (Content-Length, chunked, or no body), the server did not ask to close, the answer is
//! HTTP/1.1, and not one byte beyond the answer is buffered. Never after a HEAD, 204 or 304:
//! a server that wrongly sends a body there may send it a little later than the head. A
//! pooled connection is checked for stray bytes or a close again when it is taken out.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use super::chunked::{ChunkError, ChunkedScanner};
use super::response::{parse_response, RespBody, RespError, ResponseHead};
use super::Version;
use crate::tls::UpstreamTls;
use crate::upstream::UpStream;

/// Most interim (1xx) responses accepted before the final one; one more is an error. A
/// server may send several 1xx answers (RFC 9110 §15.2), never an endless stream of them.
pub const MAX_INTERIM_RESPONSES: usize = 8;
/// Bytes asked for per read.
const READ_CHUNK: usize = 8 * 1024;
/// Longest deadline an exchange is given, whatever the caller asks: keeps the timer's
/// `Instant` arithmetic far from overflow.
pub const MAX_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Why an exchange failed. Says what went wrong, for logs; carries no byte of the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The TCP connect failed.
    Connect(io::ErrorKind),
    /// The TLS handshake failed (the certificate did not verify, among others).
    Tls(Box<str>),
    /// Writing the request failed.
    Send(io::ErrorKind),
    /// Reading the answer failed.
    Recv(io::ErrorKind),
    /// The deadline of the exchange passed.
    Timeout,
    /// The server closed the connection before sending any byte of an answer.
    ClosedBeforeResponse,
    /// The server closed the connection in the middle of a head.
    TruncatedHead,
    /// The server closed the connection before the body's end (by its length or chunking).
    TruncatedBody,
    /// The head is malformed or its framing is invalid.
    BadHead(&'static str),
    /// The head is too large or has too many header lines.
    HeadTooLarge,
    /// More than [`MAX_INTERIM_RESPONSES`] 1xx answers.
    TooManyInterim,
    /// A 101 (Switching Protocols) the client never asked for.
    UnexpectedUpgrade,
    /// The chunked body is malformed (an overflowing chunk size included).
    BadChunk(ChunkError),
    /// The body is larger than the caller's cap.
    BodyTooLarge,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(k) => write!(f, "connect: {k}"),
            ClientError::Tls(e) => write!(f, "TLS handshake: {e}"),
            ClientError::Send(k) => write!(f, "send: {k}"),
            ClientError::Recv(k) => write!(f, "read: {k}"),
            ClientError::Timeout => f.write_str("timed out"),
            ClientError::ClosedBeforeResponse => f.write_str("connection closed before an answer"),
            ClientError::TruncatedHead => f.write_str("connection closed in the answer's head"),
            ClientError::TruncatedBody => f.write_str("connection closed in the answer's body"),
            ClientError::BadHead(r) => write!(f, "bad answer: {r}"),
            ClientError::HeadTooLarge => f.write_str("answer head too large or too many headers"),
            ClientError::TooManyInterim => {
                write!(f, "more than {MAX_INTERIM_RESPONSES} interim (1xx) answers")
            }
            ClientError::UnexpectedUpgrade => f.write_str("unexpected 101 Switching Protocols"),
            ClientError::BadChunk(c) => write!(f, "bad chunked body: {}", c.reason()),
            ClientError::BodyTooLarge => f.write_str("answer body too large"),
        }
    }
}

impl std::error::Error for ClientError {}

/// A complete answer: the final head and the body, de-chunked.
#[derive(Debug)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.head.header(name)
    }

    /// Every value of header `name`, in order.
    pub fn header_values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.head
            .headers
            .iter()
            .filter(move |h| self.head.bytes(h.name).eq_ignore_ascii_case(name))
            .map(|h| self.head.bytes(h.value))
    }
}

/// Where requests go: an address and, for TLS, the connector and which of its names the
/// server's certificate is verified against.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<UpstreamTls>, usize)>,
}

impl Target {
    pub fn plain(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }

    /// TLS with `cfg`, the certificate verified against `name` (also sent as SNI when it is a
    /// DNS name).
    pub fn tls(addr: SocketAddr, cfg: Arc<ClientConfig>, name: ServerName<'static>) -> Target {
        let tls = UpstreamTls {
            connector: monoio_rustls::TlsConnector::from(cfg),
            names: vec![name],
        };
        Target {
            addr,
            tls: Some((Arc::new(tls), 0)),
        }
    }
}

/// Runs `f` (an exchange, its connect included) within `timeout` (capped at
/// [`MAX_EXCHANGE_TIMEOUT`]); past it, the exchange and its connection are dropped.
pub async fn within<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match monoio::time::timeout(timeout.min(MAX_EXCHANGE_TIMEOUT), f).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout),
    }
}

/// A request head (and body) as bytes. `path` and `host` come from a validated config (no
/// spaces or control characters); `extra` is whole header lines, each ending in CRLF. `body`:
/// its content type and bytes. `keep_alive: false` adds `connection: close`.
pub fn request(
    method: &str,
    path: &str,
    host: &str,
    extra: &str,
    body: Option<(&str, &[u8])>,
    keep_alive: bool,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n{extra}");
    if let Some((ctype, b)) = body {
        out.push_str(&format!(
            "content-type: {ctype}\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    if !keep_alive {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if let Some((_, b)) = body {
        out.extend_from_slice(b);
    }
    out
}

/// Opens a connection to `target` (TCP, then the TLS handshake for a TLS target).
pub async fn connect(target: &Target) -> Result<ClientConn<UpStream>, ClientError> {
    let tcp = TcpStream::connect_addr(target.addr)
        .await
        .map_err(|e| ClientError::Connect(e.kind()))?;
    let _ = tcp.set_nodelay(true);
    let fd = tcp.as_raw_fd();
    let stream = match &target.tls {
        None => UpStream::Plain(tcp),
        Some((t, i)) => {
            let s = crate::tls::connect(t, *i, tcp)
                .await
                .map_err(|e| ClientError::Tls(e.to_string().into()))?;
            UpStream::Tls(Box::new(s), fd)
        }
    };
    Ok(ClientConn::new(stream, Some(fd)))
}

/// One request on a new connection, closed afterwards, within `timeout` in all. `req`
/// should carry `connection: close`.
pub async fn fetch(
    target: &Target,
    req: Vec<u8>,
    head_request: bool,
    max_body: usize,
    timeout: Duration,
) -> Result<Response, ClientError> {
    within(timeout, async {
        let mut c = connect(target).await?;
        let (resp, _) = c.exchange(req, head_request, max_body).await?;
        Ok(resp)
    })
    .await
}

/// One request on a new connection, closed afterwards, within `timeout` in all, for a caller
/// that needs only the final status (health checks): the body is read and thrown away as it
/// arrives, never held, up to `max_drain` bytes on the wire; an answer whose status is not
/// `wanted` is not read past its head (the verdict is known), and neither is a body past
/// `max_drain` (the status stands). A body that ends within `max_drain` must be well framed.
/// `req` should carry `connection: close`.
pub async fn fetch_status(
    target: &Target,
    req: Vec<u8>,
    wanted: impl Fn(u16) -> bool,
    max_drain: usize,
    timeout: Duration,
) -> Result<u16, ClientError> {
    within(timeout, async {
        let mut c = connect(target).await?;
        c.send(req).await?;
        let head = c.read_head(false).await?;
        if wanted(head.status) {
            c.drain_body(&head, max_drain).await?;
        }
        Ok(head.status)
    })
    .await
}

/// A connection and the bytes read from it but not yet used.
pub struct ClientConn<S> {
    stream: S,
    buf: BytesMut,
    /// The socket, for the liveness peek of a pooled connection.
    fd: Option<RawFd>,
}

impl<S: AsyncReadRent + AsyncWriteRent> ClientConn<S> {
    pub fn new(stream: S, fd: Option<RawFd>) -> ClientConn<S> {
        ClientConn {
            stream,
            buf: BytesMut::new(),
            fd,
        }
    }

    /// Appends what one read returns to the buffer. `Ok(0)`: end of stream. A read dropped
    /// by a deadline loses its buffer, but the connection is dropped with it (see [`within`]).
    async fn read_more(&mut self) -> io::Result<usize> {
        self.buf.reserve(READ_CHUNK);
        let b = std::mem::take(&mut self.buf);
        let len = b.len();
        let cap = b.capacity();
        let (r, slice) = self.stream.read(b.slice_mut(len..cap)).await;
        self.buf = slice.into_inner();
        r
    }

    /// Reads more, treating the end of the stream (a TLS close without close_notify
    /// included) as `eof`.
    async fn read_or(&mut self, eof: ClientError) -> Result<(), ClientError> {
        match self.read_more().await {
            Ok(0) => Err(eof),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(eof),
            Err(e) => Err(ClientError::Recv(e.kind())),
        }
    }

    /// Sends `req` and reads the whole answer. `head_request`: the request was HEAD (the
    /// answer has no body whatever its headers say). Returns the answer and whether the
    /// connection may carry another request.
    pub async fn exchange(
        &mut self,
        req: Vec<u8>,
        head_request: bool,
        max_body: usize,
    ) -> Result<(Response, bool), ClientError> {
        // Bytes before our request are a desynchronised stream (the pool checks this too).
        if !self.buf.is_empty() {
            return Err(ClientError::BadHead("bytes before the answer"));
        }
        self.send(req).await?;
        let head = self.read_head(head_request).await?;
        let body = self.read_body(&head, max_body).await?;
        // RFC 9112 §9.3: persistence needs HTTP/1.1 without `close`, a body with a definite
        // end, and nothing buffered past it (such bytes answer no request of ours). After a
        // HEAD, 204 or 304 a server that wrongly sends a body may send it later than the
        // head, where no check can see it yet: those connections are not reused either.
        let bodiless_by_rule = head_request || head.status == 204 || head.status == 304;
        let reusable = head.keep_alive
            && head.version == Version::Http11
            && !matches!(head.body, RespBody::Close)
            && !bodiless_by_rule
            && self.buf.is_empty();
        Ok((Response { head, body }, reusable))
    }

    /// Writes `req` whole and flushes it.
    async fn send(&mut self, req: Vec<u8>) -> Result<(), ClientError> {
        let (r, _) = self.stream.write_all(req).await;
        r.map_err(|e| ClientError::Send(e.kind()))?;
        self.stream
            .flush()
            .await
            .map_err(|e| ClientError::Send(e.kind()))
    }

    /// Reads the body `head` frames and throws it away, holding at most one read's worth
    /// (plus a chunk-size line) at a time: done at its end, or once more than `max_drain`
    /// bytes of it have been read (the rest is left unread). Framing errors and a close
    /// before the end, within that, are errors as in [`read_body`](Self::read_body).
    async fn drain_body(
        &mut self,
        head: &ResponseHead,
        max_drain: usize,
    ) -> Result<(), ClientError> {
        let mut drained: usize = 0;
        match head.body {
            RespBody::None => Ok(()),
            RespBody::Length(n) => {
                let mut left = n;
                loop {
                    let take = self
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.buf.advance(take);
                    left -= take as u64;
                    drained = drained.saturating_add(take);
                    if left == 0 || drained > max_drain {
                        return Ok(());
                    }
                    self.read_or(ClientError::TruncatedBody).await?;
                }
            }
            RespBody::Chunked => {
                let mut scanner = ChunkedScanner::new();
                loop {
                    if !self.buf.is_empty() {
                        let scan = scanner
                            .scan(&self.buf, |_, _| {})
                            .map_err(ClientError::BadChunk)?;
                        self.buf.advance(scan.consumed);
                        drained = drained.saturating_add(scan.consumed);
                        if scan.done || drained > max_drain {
                            return Ok(());
                        }
                    }
                    self.read_or(ClientError::TruncatedBody).await?;
                }
            }
            RespBody::Close => loop {
                // As in `read_body`: over TLS the close must come with close_notify.
                drained = drained.saturating_add(self.buf.len());
                self.buf.clear();
                if drained > max_drain {
                    return Ok(());
                }
                match self.read_more().await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(ClientError::TruncatedBody)
                    }
                    Err(e) => return Err(ClientError::Recv(e.kind())),
                }
            },
        }
    }

    /// The final head, past at most [`MAX_INTERIM_RESPONSES`] 1xx answers.
    async fn read_head(&mut self, head_request: bool) -> Result<ResponseHead, ClientError> {
        let mut head = ResponseHead::default();
        let mut interim: usize = 0;
        let mut got_any = false;
        loop {
            if !self.buf.is_empty() {
                got_any = true;
                match parse_response(&self.buf, head_request, &mut head) {
                    Ok(Some(n)) => {
                        head.raw = self.buf.split_to(n).freeze();
                        match head.status {
                            101 => return Err(ClientError::UnexpectedUpgrade),
                            100..=199 => {
                                interim = interim.saturating_add(1);
                                if interim > MAX_INTERIM_RESPONSES {
                                    return Err(ClientError::TooManyInterim);
                                }
                                continue;
                            }
                            _ => return Ok(head),
                        }
                    }
                    Ok(None) => {}
                    Err(RespError::TooLarge) => return Err(ClientError::HeadTooLarge),
                    Err(RespError::Malformed(r)) => return Err(ClientError::BadHead(r)),
                }
            }
            let eof = if got_any {
                ClientError::TruncatedHead
            } else {
                ClientError::ClosedBeforeResponse
            };
            match self.read_more().await {
                Ok(0) => return Err(eof),
                Ok(_) => {}
                // A server that closed an idle connection may answer the next write with a
                // reset: no answer started, which is what a pool needs to know.
                Err(e)
                    if !got_any
                        && matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                        ) =>
                {
                    return Err(ClientError::ClosedBeforeResponse)
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(eof),
                Err(e) => return Err(ClientError::Recv(e.kind())),
            }
        }
    }

    /// The body as `head` frames it, at most `max_body` bytes (decoded).
    async fn read_body(
        &mut self,
        head: &ResponseHead,
        max_body: usize,
    ) -> Result<Vec<u8>, ClientError> {
        match head.body {
            RespBody::None => Ok(Vec::new()),
            RespBody::Length(n) => {
                // Refused before any of it is read: the length alone says it is too large.
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| *n <= max_body)
                    .ok_or(ClientError::BodyTooLarge)?;
                while self.buf.len() < n {
                    self.read_or(ClientError::TruncatedBody).await?;
                }
                Ok(self.buf.split_to(n).to_vec())
            }
            RespBody::Chunked => {
                let mut scanner = ChunkedScanner::new();
                let mut out = Vec::new();
                loop {
                    if !self.buf.is_empty() {
                        let mut over = false;
                        let buf = &self.buf;
                        let scan = scanner
                            .scan(buf, |a, b| {
                                let fits = out
                                    .len()
                                    .checked_add(b - a)
                                    .is_some_and(|total| total <= max_body);
                                if fits && !over {
                                    out.extend_from_slice(&buf[a..b]);
                                } else {
                                    over = true;
                                }
                            })
                            .map_err(ClientError::BadChunk)?;
                        if over {
                            return Err(ClientError::BodyTooLarge);
                        }
                        self.buf.advance(scan.consumed);
                        if scan.done {
                            return Ok(out);
                        }
                    }
                    self.read_or(ClientError::TruncatedBody).await?;
                }
            }
            RespBody::Close => {
                // Delimited by the close (RFC 9112 §6.3 item 8). Over TLS the close must come
                // with close_notify, or the body may have been cut short: an error then.
                loop {
                    if self.buf.len() > max_body {
                        return Err(ClientError::BodyTooLarge);
                    }
                    match self.read_more().await {
                        Ok(0) => return Ok(std::mem::take(&mut self.buf).to_vec()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Err(ClientError::TruncatedBody)
                        }
                        Err(e) => return Err(ClientError::Recv(e.kind())),
                    }
                }
            }
        }
    }
}

/// An idle pooled connection.
struct Idle {
    conn: ClientConn<UpStream>,
    since: Instant,
}

/// Keep-alive connections to one target, for one worker (not shared between threads): at
/// most `max_idle` idle ones, each dropped after `idle_timeout`.
pub struct Pool {
    target: Target,
    idle: RefCell<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(target: Target, max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            target,
            idle: RefCell::new(Vec::new()),
            max_idle,
            idle_timeout,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Idle connections now held.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    /// The most recent idle connection that has not expired and on which nothing arrived
    /// since its last answer (a non-blocking peek: a close or stray bytes both disqualify).
    fn checkout(&self) -> Option<ClientConn<UpStream>> {
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        while let Some(Idle { conn, since }) = idle.pop() {
            if now.saturating_duration_since(since) >= self.idle_timeout {
                continue;
            }
            if conn.fd.is_some_and(crate::upstream::still_open) {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: ClientConn<UpStream>) {
        // Bytes past the response inside the TLS layer (the socket peek cannot see them).
        if self.max_idle == 0 || conn.stream.tls_input_pending(&mut conn.buf) {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let now = Instant::now();
        idle.retain(|i| now.saturating_duration_since(i.since) < self.idle_timeout);
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: now });
    }

    /// One request on a pooled connection, or a new one, within `timeout` in all. When a
    /// pooled connection turns out closed before any answer (the server's idle timeout raced
    /// ours), the request is sent once more on a new connection: only requests that are safe
    /// to repeat (RFC 9110 §9.2.2) may go through a pool.
    pub async fn send(
        &self,
        req: &[u8],
        head_request: bool,
        max_body: usize,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        within(timeout, async {
            if let Some(mut c) = self.checkout() {
                match c.exchange(req.to_vec(), head_request, max_body).await {
                    Ok((resp, reusable)) => {
                        if reusable {
                            self.checkin(c);
                        }
                        return Ok(resp);
                    }
                    Err(ClientError::ClosedBeforeResponse | ClientError::Send(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let mut c = connect(&self.target).await?;
            let (resp, reusable) = c.exchange(req.to_vec(), head_request, max_body).await?;
            if reusable {
                self.checkin(c);
            }
            Ok(resp)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::buf::{IoBuf, IoVecBuf, IoVecBufMut};
    use monoio::BufResult;
    use std::collections::VecDeque;

    /// An in-memory stream: reads return the scripted pieces in order, then end of stream;
    /// writes are kept.
    struct Script {
        pieces: VecDeque<Vec<u8>>,
        written: Vec<u8>,
        /// Once the pieces are out, a read waits forever instead of ending the stream.
        stall: bool,
    }

    impl Script {
        fn new(pieces: Vec<Vec<u8>>) -> Script {
            Script {
                // An empty read would mean the end of the stream.
                pieces: pieces.into_iter().filter(|p| !p.is_empty()).collect(),
                written: Vec::new(),
                stall: false,
            }
        }
    }

    impl AsyncReadRent for Script {
        async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
            let Some(mut p) = self.pieces.pop_front() else {
                if self.stall {
                    std::future::pending::<()>().await;
                }
                return (Ok(0), buf);
            };
            let room = buf.bytes_total();
            let n = p.len().min(room);
            // SAFETY: `n` bytes fit in the buffer's writable room.
            unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), buf.write_ptr(), n);
                buf.set_init(n);
            }
            if n < p.len() {
                self.pieces.push_front(p.split_off(n));
            }
            (Ok(n), buf)
        }

        async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
            (Ok(0), buf)
        }
    }

    impl AsyncWriteRent for Script {
        async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            // SAFETY: the buffer holds `bytes_init` initialised bytes at `read_ptr`.
            let s = unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) };
            self.written.extend_from_slice(s);
            (Ok(s.len()), buf)
        }

        async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
            (Ok(0), buf)
        }

        async fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }

        async fn shutdown(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Exchanges over a scripted stream: (status, body, reusable).
    fn talk(
        pieces: Vec<Vec<u8>>,
        head: bool,
        max_body: usize,
    ) -> Result<(u16, Vec<u8>, bool), ClientError> {
        run(async move {
            let mut c = ClientConn::new(Script::new(pieces), None);
            let (r, reuse) = c
                .exchange(b"GET / HTTP/1.1\r\n\r\n".to_vec(), head, max_body)
                .await?;
            Ok((r.status(), r.body, reuse))
        })
    }

    fn one(raw: &[u8]) -> Result<(u16, Vec<u8>, bool), ClientError> {
        talk(vec![raw.to_vec()], false, 1024)
    }

    const FRAMINGS: &[(&[u8], &[u8], bool)] = &[
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"hello",
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nT: v\r\n\r\n",
            b"hello",
            true,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello", false),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", false),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            b"",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"",
            true,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"hello",
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            b"hello",
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
            b"hello",
            false,
        ),
    ];

    #[test]
    fn every_framing_and_every_split() {
        for (raw, body, reuse) in FRAMINGS {
            let (status, got, r) = one(raw).unwrap();
            assert!(status == 200 || status == 204 || status == 304);
            assert_eq!(
                (&got[..], r),
                (*body, *reuse),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
            for split in 0..=raw.len() {
                let (a, b) = raw.split_at(split);
                let (_, got, r) = talk(vec![a.to_vec(), b.to_vec()], false, 1024).unwrap();
                assert_eq!((&got[..], r), (*body, *reuse), "split {split}");
            }
        }
        // One byte per read.
        for (raw, body, _) in FRAMINGS {
            let pieces = raw.iter().map(|b| vec![*b]).collect();
            assert_eq!(talk(pieces, false, 1024).unwrap().1, *body);
        }
    }

    /// Reads a head and drains its body over a scripted stream: the status, and the bytes
    /// the script had left unread.
    fn drain(pieces: Vec<Vec<u8>>, max_drain: usize) -> Result<(u16, usize), ClientError> {
        run(async move {
            let mut c = ClientConn::new(Script::new(pieces), None);
            c.send(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await?;
            let head = c.read_head(false).await?;
            c.drain_body(&head, max_drain).await?;
            assert!(
                c.buf.len() <= READ_CHUNK + 64,
                "nothing of the body is held"
            );
            Ok((head.status, c.stream.pieces.iter().map(Vec::len).sum()))
        })
    }

    /// A status-only exchange (health checks) reads a body to its end, split anywhere, and
    /// finds its framing errors; a body longer than the bound is left unread past it, held
    /// nowhere, and the status stands.
    #[test]
    fn draining_a_body_holds_none_of_it_and_stops_at_its_bound() {
        for (raw, _, _) in FRAMINGS {
            for split in 0..=raw.len() {
                let (a, b) = raw.split_at(split);
                let r = drain(vec![a.to_vec(), b.to_vec()], 1024);
                assert!(r.is_ok_and(|(_, left)| left == 0), "split {split}");
            }
        }
        assert_eq!(
            drain(
                vec![b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc".to_vec()],
                1024
            ),
            Err(ClientError::TruncatedBody)
        );
        assert!(matches!(
            drain(
                vec![b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec()],
                1024
            ),
            Err(ClientError::BadChunk(_))
        ));
        let piece = vec![b'x'; READ_CHUNK];
        let big = 64 * READ_CHUNK;
        // One chunk per read: a 4-digit size line, its data and CRLF.
        let mut chunk = format!("{:x}\r\n", READ_CHUNK - 8).into_bytes();
        chunk.extend_from_slice(&piece[..READ_CHUNK - 8]);
        chunk.extend_from_slice(b"\r\n");
        assert_eq!(chunk.len(), READ_CHUNK);
        for (head, body) in [
            (
                format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n"),
                &piece,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n".to_string(), &piece),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
                &chunk,
            ),
        ] {
            let mut pieces = vec![head.into_bytes()];
            pieces.extend(std::iter::repeat_n(body.clone(), 64));
            let (status, left) = drain(pieces, 4 * READ_CHUNK).unwrap();
            assert_eq!(status, 200);
            assert!(
                left >= 58 * READ_CHUNK,
                "stopped past the bound: {left} left"
            );
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (raw, _, _) in FRAMINGS {
            let close_delimited = !raw.windows(7).any(|w| w.eq_ignore_ascii_case(b"length:"))
                && !raw.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
            let bodiless = raw.starts_with(b"HTTP/1.1 204") || raw.starts_with(b"HTTP/1.1 304");
            for cut in 0..raw.len() {
                let r = one(&raw[..cut]);
                if close_delimited || bodiless {
                    // The head's end decides; a body ending at the close is whole.
                    let head_end = raw.windows(4).rposition(|w| w == b"\r\n\r\n").unwrap() + 4;
                    if cut >= head_end {
                        continue;
                    }
                }
                let e = r.unwrap_err();
                let want = if cut == 0 {
                    ClientError::ClosedBeforeResponse
                } else {
                    e.clone()
                };
                assert_eq!(e, want, "cut {cut}");
                assert!(
                    matches!(
                        e,
                        ClientError::ClosedBeforeResponse
                            | ClientError::TruncatedHead
                            | ClientError::TruncatedBody
                    ),
                    "cut {cut} of {:?}: {e:?}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
    }

    #[test]
    fn hostile_answers() {
        let flood = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM_RESPONSES + 1)
            + "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let eight = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM_RESPONSES)
            + "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            "X: y\r\n".repeat(300)
        );
        let big = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let cases: Vec<(Vec<u8>, ClientError)> = vec![
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n"
                    .to_vec(),
                ClientError::BadChunk(ChunkError::SizeOverflow),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                ClientError::BadChunk(ChunkError::BadSize),
            ),
            (flood.into_bytes(), ClientError::TooManyInterim),
            (many.into_bytes(), ClientError::HeadTooLarge),
            (big.into_bytes(), ClientError::HeadTooLarge),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1025\r\n\r\n".to_vec(),
                ClientError::BodyTooLarge,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
                ClientError::BadHead("invalid Content-Length"),
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec(),
                ClientError::UnexpectedUpgrade,
            ),
            (
                b"garbage\r\n\r\n".to_vec(),
                ClientError::BadHead("malformed response head"),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                one(&raw).unwrap_err(),
                want,
                "{:?}",
                String::from_utf8_lossy(&raw[..40.min(raw.len())])
            );
        }
        assert_eq!(one(eight.as_bytes()).unwrap().0, 200);
        // Chunked and close-delimited bodies over the cap.
        let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            raw.extend_from_slice(b"100\r\n");
            raw.extend_from_slice(&[b'a'; 256]);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(one(&raw).unwrap_err(), ClientError::BodyTooLarge);
        let mut raw = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        raw.extend_from_slice(&[b'a'; 2000]);
        assert_eq!(one(&raw).unwrap_err(), ClientError::BodyTooLarge);
    }

    #[test]
    fn bytes_after_the_answer_forbid_reuse() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.1 204 No Content\r\n\r\nX",
            b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nextra",
        ] {
            let (_, _, reuse) = one(raw).unwrap();
            assert!(!reuse, "{:?}", String::from_utf8_lossy(raw));
        }
        // HEAD, 204 and 304: never reused, even when nothing was buffered after the head
        // (a wrongly sent body may come later); a bodiless 200 with a length is.
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec();
        assert_eq!(talk(vec![raw], true, 1024).unwrap(), (200, vec![], false));
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        assert_eq!(talk(vec![raw], false, 1024).unwrap(), (204, vec![], false));
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec();
        assert_eq!(
            talk(vec![raw.clone()], false, 1024).unwrap(),
            (200, vec![], true)
        );
        let mut stray = raw;
        stray.extend_from_slice(b"hello");
        assert_eq!(
            talk(vec![stray], false, 1024).unwrap(),
            (200, vec![], false)
        );
    }

    #[test]
    fn the_deadline_covers_the_whole_exchange() {
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let r = rt.expect("runtime").block_on(async {
            let mut s = Script::new(vec![
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart".to_vec()
            ]);
            s.stall = true;
            let mut c = ClientConn::new(s, None);
            let t0 = Instant::now();
            let r = within(
                Duration::from_millis(50),
                c.exchange(b"GET / HTTP/1.1\r\n\r\n".to_vec(), false, 1024),
            )
            .await;
            (r.map(|_| ()), t0.elapsed())
        });
        assert_eq!(r.0, Err(ClientError::Timeout));
        assert!(r.1 >= Duration::from_millis(50) && r.1 < Duration::from_secs(5));
        // A deadline far beyond any sane one is capped, not an overflow.
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let r = rt
            .expect("runtime")
            .block_on(within(Duration::MAX, async { Ok::<_, ClientError>(7) }));
        assert_eq!(r, Ok(7));
    }

    #[test]
    fn requests_are_framed() {
        let r = request(
            "POST",
            "/i",
            "idp:80",
            "accept: x\r\n",
            Some(("a/b", b"k=v")),
            true,
        );
        assert_eq!(
            r,
            b"POST /i HTTP/1.1\r\nhost: idp:80\r\naccept: x\r\ncontent-type: a/b\r\ncontent-length: 3\r\n\r\nk=v"
        );
        let r = request("GET", "/", "h", "", None, false);
        assert_eq!(r, b"GET / HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n");
        // The request goes out as given.
        let written = run(async {
            let mut c = ClientConn::new(
                Script::new(vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()]),
                None,
            );
            c.exchange(r.clone(), false, 0).await.unwrap();
            c.stream.written
        });
        assert_eq!(written, r);
    }
}
