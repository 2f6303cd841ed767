//! One client connection: wait for a request, read its head, run its phases, and end it
//! through one function ([`Conn::finish`]) that writes any gateway-made answer and decides,
//! from the request body's state alone, whether the connection goes on.
//!
//! The connection owns only its socket, its read buffer (held while bytes are expected) and
//! what its listener and handshake said. Everything about a request lives in its
//! [`RequestCtx`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::error::{write_error_response_traced, GatewayError};
use crate::http::encode::{put_header, put_status_line, put_u64, reason_phrase};
use crate::http::request::{parse_request, Method, ALLOWED_METHODS};
use crate::local::{timed, Due, IoWheel, TimedOut};
use crate::rewrite::connection_value;
use crate::router::DirectResponse;
use crate::server::IDLE_TICK;
use crate::tls;

use super::ctx::RequestCtx;
use super::phases;
use super::worker::{Snapshot, Worker};

/// Read buffer lent by the worker while a request's head or body is read; grows up to the
/// head limit when needed.
pub const CLIENT_READ_BUF: usize = 4 * 1024;
/// The connection's own small buffer, the only one it holds while it waits for its next
/// request. Most request heads fit; a larger one moves to a lent buffer (one copy).
pub const IDLE_READ_BUF: usize = 512;
/// Largest read while streaming a body.
pub const BODY_READ_CHUNK: usize = 32 * 1024;
/// Most request-body bytes read and thrown away after an answer so that the connection can
/// go on; a longer (or unknown) rest closes it instead.
pub const DRAIN_MAX: u64 = 64 * 1024;
/// Longest time spent draining a request body after an answer.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Closing with client bytes possibly in flight (RFC 9112 §9.6): after our answer and a
/// half-close, read and discard for at most this long, or this many bytes, before the full
/// close, so that the client reads its answer instead of a reset. Reads go into one small
/// buffer: the byte bound limits work, not memory.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
pub const LINGER_MAX: usize = 16 * 1024 * 1024;
/// Longest wait for a TLS `close_notify` to be written when a connection ends.
pub const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// What a connection's listener and TLS handshake tell its requests.
#[derive(Default)]
pub struct ConnInfo {
    /// Index of the listener in config order.
    pub listener: usize,
    /// Came over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
    /// The subject of the client's verified certificate (mTLS), as a header value.
    pub client_subject: Option<Box<[u8]>>,
    /// The peer is a trusted proxy: its forwarding headers are kept and extended.
    pub trusted: bool,
    /// The port the connection came in on (X-Forwarded-Port).
    pub port: Option<u16>,
    /// The TLS version negotiated ("1.2", "1.3"), on a TLS connection.
    pub tls_version: Option<&'static str>,
}

/// A client stream: plain TCP or TLS.
pub trait ClientIo: AsyncReadRent + AsyncWriteRent {
    /// Ends the stream politely: TLS sends `close_notify`; plain TCP needs nothing more than
    /// the close that dropping it does.
    fn close(&mut self, _limit: Duration) -> impl std::future::Future<Output = ()> {
        async {}
    }

    /// Half-closes the write side, so that a lingering close can read what is in flight.
    fn half_close(&mut self) -> impl std::future::Future<Output = ()> {
        async {}
    }

    /// After a response that was cut or could not be written ([`Next::Abort`]), the
    /// connection is dropped at once, with no goodbye and no lingering. Over TLS this leaves
    /// out `close_notify`, the only way a client can tell a cut from the end of a
    /// close-delimited body (RFC 8446 §6.1, RFC 9112 §9.8). Plain TCP has no such signal and
    /// closes as after any other response: the framing tells a length or chunks cut short,
    /// and a cut close-delimited body is [`Next::Reset`] instead.
    const ABORT_QUIETLY: bool = false;

    /// Drops the connection with a TCP reset ([`Next::Reset`]): a response whose body the
    /// client reads until the connection closes was cut, and a plain close would make the
    /// cut look like the end of the body (RFC 9112 §8, §9.8). Over TLS, no `close_notify`
    /// either (RFC 8446 §6.1).
    fn reset(self);
}

impl ClientIo for TcpStream {
    async fn half_close(&mut self) {
        let _ = AsyncWriteRent::shutdown(self).await;
    }

    fn reset(self) {
        reset_on_close(std::os::fd::AsRawFd::as_raw_fd(&self));
    }
}

impl ClientIo for tls::ServerStream {
    const ABORT_QUIETLY: bool = true;

    fn reset(self) {
        // The TLS session goes without a word: only the socket is left to close.
        self.into_tcp().reset();
    }

    fn close(&mut self, limit: Duration) -> impl std::future::Future<Output = ()> {
        tls::close_notify(self, limit)
    }

    fn half_close(&mut self) -> impl std::future::Future<Output = ()> {
        tls::close_notify(self, CLOSE_NOTIFY_TIMEOUT)
    }
}

/// Sets `SO_LINGER` to zero on a socket about to be closed, so that its close sends a TCP
/// reset instead of a FIN (what is still unsent is dropped). A failure leaves an ordinary
/// close.
fn reset_on_close(fd: std::os::fd::RawFd) {
    let off = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `setsockopt` reads `size_of::<linger>()` bytes from `&off`, a live local of that
    // type, and touches no other memory. An fd that is not a socket (or not open) makes the
    // call fail, and the close goes on as usual.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&off as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The client's address as text, formatted once per connection without a heap allocation.
pub struct PeerIp {
    /// Long enough for any IPv6 text form (45 bytes).
    buf: [u8; 48],
    len: u8,
    pub ip: std::net::IpAddr,
}

impl PeerIp {
    fn new(ip: std::net::IpAddr) -> PeerIp {
        use std::io::Write;
        let mut p = PeerIp {
            buf: [0; 48],
            len: 0,
            ip,
        };
        let mut cursor = &mut p.buf[..];
        match ip {
            // Most clients, once per connection: four octets without the formatting
            // machinery, which cost ~500 instructions here.
            std::net::IpAddr::V4(v4) => {
                for (i, o) in v4.octets().iter().enumerate() {
                    if i > 0 {
                        let _ = cursor.write_all(b".");
                    }
                    let _ = cursor.write_all(itoa::Buffer::new().format(*o).as_bytes());
                }
            }
            std::net::IpAddr::V6(_) => {
                let _ = write!(cursor, "{ip}");
            }
        }
        let left = cursor.len();
        p.len = (48 - left) as u8;
        p
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// I/O helpers: ownership-passing reads and writes with a timeout.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFail {
    Timeout,
    Eof,
    Io,
    /// The TLS layer failed: an alert from the peer (other than close_notify) or a record
    /// rustls could not accept. `true`: an alert by which the peer refuses the handshake
    /// (see [`crate::tls::tls_failure`]); over TLS 1.3 a server's refusal of the client's
    /// certificate, or of its absence, arrives this way, on the first read after a handshake
    /// the client took as done (RFC 8446 §4.4.2.4).
    Tls(bool),
}

/// Reads at most `max` more bytes, appending to `buf`. On timeout or error the stream is
/// closed by the caller, so a buffer lost with a cancelled read does not matter.
pub async fn read_some<R: AsyncReadRent>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
    dur: Duration,
) -> Result<usize, IoFail> {
    if let Some(due) = IoWheel::with(|w| w.due_in(dur)).flatten() {
        return read_by(io, buf, max, due).await;
    }
    // As in [`write_buf`]: the runtime timer's future is boxed, the common one stays small.
    Box::pin(async move {
        let slot = std::pin::pin!(None);
        IoTimer::new(slot).read_some(io, buf, max, dur).await
    })
    .await
}

/// A read of at most `max` more bytes into `buf`, until `due` on the worker's [`IoWheel`].
async fn read_by<R: AsyncReadRent>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
    due: Due,
) -> Result<usize, IoFail> {
    let (b, len, end) = read_room(buf, max);
    match timed(io.read(b.slice_mut(len..end)), due).await {
        Ok(r) => was_read(buf, r),
        Err(TimedOut) => Err(IoFail::Timeout),
    }
}

/// `buf` taken for a read of at most `max` more bytes: the buffer (room reserved), its length
/// and where the read ends.
fn read_room(buf: &mut BytesMut, max: usize) -> (BytesMut, usize, usize) {
    buf.reserve(max);
    let b = std::mem::take(buf);
    let len = b.len();
    let end = len + max.min(b.capacity() - len);
    (b, len, end)
}

/// What a read into [`read_room`]'s buffer gave; the buffer goes back to `buf`.
fn was_read(
    buf: &mut BytesMut,
    (res, slice): (std::io::Result<usize>, monoio::buf::SliceMut<BytesMut>),
) -> Result<usize, IoFail> {
    *buf = slice.into_inner();
    match res {
        Ok(0) => Err(IoFail::Eof),
        Ok(n) => Ok(n),
        Err(e) => Err(crate::tls::tls_failure(&e).map_or(IoFail::Io, IoFail::Tls)),
    }
}

/// Writes all of `buf` within `dur`, handing the buffer back.
pub async fn write_buf<W: AsyncWriteRent, B: IoBuf + 'static>(
    io: &mut W,
    buf: B,
    dur: Duration,
) -> Result<B, IoFail> {
    if let Some(due) = IoWheel::with(|w| w.due_in(dur)).flatten() {
        return written(timed(io.write_all(buf), due).await);
    }
    // A timeout under the wheel's reach (or a thread without one) takes a runtime timer. That
    // future is boxed so that the common one above, moved into every caller's state, stays
    // small (a runtime timer and its slot are several hundred bytes).
    Box::pin(async move {
        let slot = std::pin::pin!(None);
        IoTimer::new(slot).write_buf(io, buf, dur).await
    })
    .await
}

/// What a wheel-timed `write_all` gave.
fn written<B>(r: Result<monoio::BufResult<usize, B>, TimedOut>) -> Result<B, IoFail> {
    match r {
        Ok((Ok(_), b)) => Ok(b),
        Ok((Err(_), _)) => Err(IoFail::Io),
        Err(TimedOut) => Err(IoFail::Timeout),
    }
}

/// The instant `dur` from now; past the clock's range, thirty years on (as good as never).
pub fn due_in(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

/// One timer for a run of timed reads and writes (an upstream exchange, a response relay):
/// each operation moves the timer's deadline to `now + its timeout` instead of arming a timer
/// of its own. The first operation files it in the runtime's timer wheel; moving a deadline
/// later, as the next operation's almost always is, only notes it (monoio re-files an entry
/// when it comes due early), and the entry leaves the wheel once, when the run ends. The same
/// timeouts as [`read_some`] and [`write_buf`], without a wheel insert and removal and a
/// timeout future around every operation.
pub struct IoTimer<'a>(Pin<&'a mut Option<monoio::time::Sleep>>);

impl<'a> IoTimer<'a> {
    /// Wraps a pinned, empty slot (`let slot = std::pin::pin!(None);`).
    pub fn new(slot: Pin<&'a mut Option<monoio::time::Sleep>>) -> IoTimer<'a> {
        IoTimer(slot)
    }

    /// The timer, due at `at`.
    fn arm(&mut self, at: Instant) -> Pin<&mut monoio::time::Sleep> {
        let fresh = self.0.is_none();
        if fresh {
            self.0.set(Some(monoio::time::sleep_until(at.into())));
        }
        // Invariant: the slot holds a timer, set just above when it was empty.
        let mut sleep = self.0.as_mut().as_pin_mut().expect("filled above");
        if !fresh {
            sleep.as_mut().reset(at.into());
        }
        sleep
    }

    /// [`read_some`] under this timer.
    pub async fn read_some<R: AsyncReadRent>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        max: usize,
        dur: Duration,
    ) -> Result<usize, IoFail> {
        let due = IoWheel::with(|w| w.due_in(dur)).flatten();
        self.read_timed(io, buf, max, due, || due_in(dur)).await
    }

    /// [`read_some`], ending at `at` (one deadline for several reads).
    pub async fn read_some_until<R: AsyncReadRent>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        max: usize,
        at: Instant,
    ) -> Result<usize, IoFail> {
        let due = IoWheel::with(|w| w.due_at(at)).flatten();
        self.read_timed(io, buf, max, due, || at).await
    }

    /// A read until `due` on the worker's [`IoWheel`], or else (`None`) until the instant
    /// `at` gives, on the runtime's timer.
    async fn read_timed<R: AsyncReadRent>(
        &mut self,
        io: &mut R,
        buf: &mut BytesMut,
        max: usize,
        due: Option<Due>,
        at: impl FnOnce() -> Instant,
    ) -> Result<usize, IoFail> {
        if let Some(due) = due {
            return read_by(io, buf, max, due).await;
        }
        let (b, len, end) = read_room(buf, max);
        let sleep = self.arm(at());
        monoio::select! {
            r = io.read(b.slice_mut(len..end)) => was_read(buf, r),
            _ = sleep => Err(IoFail::Timeout),
        }
    }

    /// [`write_buf`] under this timer.
    pub async fn write_buf<W: AsyncWriteRent, B: IoBuf + 'static>(
        &mut self,
        io: &mut W,
        buf: B,
        dur: Duration,
    ) -> Result<B, IoFail> {
        if let Some(due) = IoWheel::with(|w| w.due_in(dur)).flatten() {
            return written(timed(io.write_all(buf), due).await);
        }
        let sleep = self.arm(due_in(dur));
        monoio::select! {
            r = io.write_all(buf) => match r {
                (Ok(_), b) => Ok(b),
                (Err(_), _) => Err(IoFail::Io),
            },
            _ = sleep => Err(IoFail::Timeout),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A client connection.
pub struct Conn<S> {
    pub io: S,
    /// Bytes read and not yet consumed: the connection's small buffer while it waits for a
    /// request (and while a head that fits is read), a buffer lent by the worker otherwise.
    pub rbuf: BytesMut,
    /// `rbuf` is the small buffer.
    small: bool,
    /// The small buffer while `rbuf` is a lent one.
    spare: BytesMut,
    pub peer: PeerIp,
    pub info: ConnInfo,
}

#[derive(PartialEq, Eq, Debug, Clone, Copy)]
pub enum Next {
    KeepAlive,
    Close,
    /// The response was cut (the upstream's body broke off) or could not be written to the
    /// client: the client must not take what it got for a complete response.
    Abort,
    /// The response was cut after its head went out, and its body was delimited by the
    /// close (an HTTP/1.0 client, a body of unknown length): the connection ends with a TCP
    /// reset ([`ClientIo::reset`]), the only sign of the cut such a client can read.
    Reset,
}

/// An answer the gateway makes itself.
pub enum Answer<'r> {
    Error(GatewayError),
    Direct(&'r DirectResponse),
    /// 308 to https on the same host (checked), path and query; the port to write, if any.
    Redirect {
        host_len: usize,
        port: Option<u16>,
    },
    /// TRACE or OPTIONS with `Max-Forwards: 0`: the gateway is the last hop (RFC 9110
    /// §7.6.2) and answers itself.
    LastHop,
    /// A composed JSON answer (see `crate::compose`).
    Composed(Box<crate::compose::Composed>),
}

/// How a request's phases ended.
pub enum Outcome<'r> {
    /// A gateway-made answer is to be written ([`Conn::finish`] writes it).
    Answer(Answer<'r>),
    /// The response was relayed in full; `keep`: the response let the connection go on.
    Relayed { keep: bool },
    /// The connection is unusable (the client went away, a write failed, a response was cut).
    Abort,
    /// A response whose body the client reads until the close was cut after its head went
    /// out: the connection is reset ([`Next::Reset`]).
    Cut,
}

impl From<GatewayError> for Outcome<'_> {
    fn from(e: GatewayError) -> Self {
        Outcome::Answer(Answer::Error(e))
    }
}

enum HeadRead {
    Ready,
    /// The client went away, idled out, or the worker is shutting down.
    Closed,
    Fail(GatewayError),
}

/// Idle wake-ups (one a second during the drain) a connection waiting for a request when a
/// shutdown begins may take to send it: one accepted just before (during a binary upgrade's
/// hand-over, say), or a keep-alive one whose client has its next request on the way.
pub const FIRST_REQUEST_GRACE_TICKS: u8 = 1;

/// A reload removed the connection's listener: the connection closes once its request in
/// flight is answered (or on the next idle tick), so the listener drains.
fn listener_gone(w: &Worker, listener: usize) -> bool {
    w.listener_closed(listener)
}

/// Serves one client connection until it closes.
pub async fn serve<S: ClientIo>(w: &Worker, io: S, peer: SocketAddr, info: ConnInfo) {
    let mut c = Conn {
        io,
        rbuf: BytesMut::new(),
        small: true,
        spare: BytesMut::new(),
        peer: PeerIp::new(peer.ip()),
        info,
    };
    let mut linger = false;
    loop {
        if c.rbuf.is_empty() && !c.wait_request(w).await {
            break;
        }
        // The request's state lives in a block of the worker's slab, not in this task: an
        // idle connection holds only what is above.
        match w.slab.boxed(c.request(w)).await {
            // A keep-alive answer promised to read on, so a shutdown or a listener removal
            // that began meanwhile still reads the next request (pipelined, or on its way)
            // and answers it with `Connection: close` (RFC 9112 §9.6): closing now would
            // reset it. Answers from then on are the last (`RequestCtx::last_answer`).
            Some(Next::KeepAlive) => {}
            None => break,
            Some(Next::Close) => {
                linger = true;
                break;
            }
            // Dropped as it is: over TLS, no close_notify after a cut response.
            Some(Next::Abort) => return,
            Some(Next::Reset) => {
                c.io.reset();
                return;
            }
        }
    }
    if linger {
        w.slab.boxed(c.linger(w)).await;
    }
    c.io.close(CLOSE_NOTIFY_TIMEOUT).await;
}

impl<S: ClientIo> Conn<S> {
    /// One request, from its head to its end. `None`: the connection closed (or idled out)
    /// before a head began. `Some(Next::Close)` is returned only when client bytes may still
    /// be in flight (an unread body, unparsed bytes, a refused head) and the close must
    /// linger; a close after a complete exchange is `None`. `Some(Next::Abort)`: the
    /// response was cut or not written, and the connection is dropped without a goodbye
    /// (only where [`ClientIo::ABORT_QUIETLY`]; elsewhere it closes as `Next::Close` does).
    /// `Some(Next::Reset)`: a close-delimited response was cut, and the connection is reset.
    async fn request(&mut self, w: &Worker) -> Option<Next> {
        // One snapshot for the whole request, whatever a reload does meanwhile.
        let cfg = w.config();
        let mut ctx = RequestCtx::new(w, cfg.timeouts);
        ctx.listener = self.info.listener;
        if w.timed() {
            // The request's first bytes are here (the wait for them is over).
            ctx.rec.start = Some(Instant::now());
        }
        let next = match self.read_head(w, &cfg, &mut ctx).await {
            HeadRead::Closed => return None,
            HeadRead::Fail(e) => {
                // The head was refused: nothing of it (a HEAD method included) applies, and
                // where its body ends is unknown.
                ctx.head_refused();
                ctx.head.method = Method::Get;
                self.finish(w, &mut ctx, Outcome::from(e)).await
            }
            HeadRead::Ready => {
                ctx.head_ready(cfg.limits.max_body_bytes);
                if !ctx.body.is_done() {
                    // A body is read through a lent buffer.
                    self.make_room(w, CLIENT_READ_BUF);
                }
                let out = phases::run(w, &cfg, self, &mut ctx).await;
                self.finish(w, &mut ctx, out).await
            }
        };
        // The response is done, however it ended: metrics and the access log line.
        super::record::done(w, &cfg, self, &ctx);
        match next {
            Next::KeepAlive => Some(Next::KeepAlive),
            Next::Reset => Some(Next::Reset),
            Next::Abort if S::ABORT_QUIETLY => Some(Next::Abort),
            Next::Close | Next::Abort if !ctx.body.is_done() || !self.rbuf.is_empty() => {
                Some(Next::Close)
            }
            Next::Close | Next::Abort => None,
        }
    }

    /// Waits for the first bytes of the next request with only the connection's small buffer
    /// and no timer of its own: the idle deadline is checked on the tick of the worker's idle
    /// wheel it falls on, so an idle connection costs its task and 512 bytes and wakes about
    /// once per idle timeout. `false`: the client closed, idled
    /// out, or the worker is shutting down.
    ///
    /// A request is still awaited for [`FIRST_REQUEST_GRACE_TICKS`] idle wake-ups (1 to 2 s)
    /// after a shutdown began: the connection was accepted just before it (during a binary
    /// upgrade's hand-over, say), or its last answer kept it alive, and its client may have a
    /// request on the way, which is answered with `Connection: close`.
    async fn wait_request(&mut self, w: &Worker) -> bool {
        if !self.small {
            // The lent buffer goes back to the worker while the connection idles.
            let lent = std::mem::replace(&mut self.rbuf, std::mem::take(&mut self.spare));
            w.bufs.give(lent);
            self.small = true;
        }
        let idle = w.config().timeouts.client_idle;
        // Read once per wait and once per wake-up (a keep-alive request pays one clock read).
        let mut now = Instant::now();
        let deadline = now.checked_add(idle);
        // The read waits as long as the connection idles; its buffer is the small one (whose
        // space the last request's head gave back). No timeout of its own: see the tick.
        self.rbuf.reserve(IDLE_READ_BUF);
        let buf = std::mem::take(&mut self.rbuf);
        let len = buf.len();
        let end = len + IDLE_READ_BUF.min(buf.capacity() - len);
        let read = self.io.read(buf.slice_mut(len..end));
        let mut read = std::pin::pin!(read);
        let mut grace_ticks = 0u8;
        // Once a shutdown began, only the wheel's wake-ups (one a second) are counted.
        let mut stopping = w.shutdown.is_set();
        loop {
            // The wheel's slot of the tick the deadline falls on (rounded up; no deadline: the
            // wheel's farthest slot, to look again then).
            let ahead = deadline.map_or(u64::MAX, |d| {
                let left = d.saturating_duration_since(now).as_millis();
                u64::try_from(left.div_ceil(IDLE_TICK.as_millis())).unwrap_or(u64::MAX)
            });
            let tick = w.idle_wheel.after(ahead);
            monoio::select! {
                r = &mut read => {
                    let (res, slice) = r;
                    self.rbuf = slice.into_inner();
                    return matches!(res, Ok(n) if n > 0);
                }
                _ = tick => {
                    now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        return false;
                    }
                    // A request on its way is still served (with `Connection: close`).
                    if w.shutdown.is_set() || listener_gone(w, self.info.listener) {
                        grace_ticks += 1;
                        if grace_ticks > FIRST_REQUEST_GRACE_TICKS {
                            return false;
                        }
                    }
                }
                // The read stays: a request on its way is still served (see above).
                _ = w.shutdown.wait(), if !stopping => stopping = true,
            }
        }
    }

    /// Makes room for `want` more bytes in the read buffer: a head or body that outgrows the
    /// small buffer moves, with what was read so far, into a buffer lent by the worker.
    fn make_room(&mut self, w: &Worker, want: usize) {
        if self.small && self.rbuf.capacity() - self.rbuf.len() < want {
            let mut lent = w.bufs.take();
            lent.extend_from_slice(&self.rbuf);
            self.rbuf.clear();
            self.spare = std::mem::replace(&mut self.rbuf, lent);
            self.small = false;
        }
    }

    async fn read_head(
        &mut self,
        w: &Worker,
        cfg: &Snapshot,
        ctx: &mut RequestCtx<'_>,
    ) -> HeadRead {
        let limits = cfg
            .listener_limits
            .get(self.info.listener)
            .unwrap_or(&cfg.limits);
        let mut started: Option<Instant> = None;
        loop {
            if !self.rbuf.is_empty() {
                match parse_request(&self.rbuf, limits, &mut ctx.head) {
                    Ok(Some(n)) => {
                        ctx.head.raw = self.rbuf.split_to(n).freeze();
                        return HeadRead::Ready;
                    }
                    // The head has begun: from now on the client_head deadline runs.
                    Ok(None) => {
                        started.get_or_insert_with(Instant::now);
                    }
                    Err(e) => return HeadRead::Fail(GatewayError::Parse(e)),
                }
            }
            let want = CLIENT_READ_BUF
                .min(limits.max_head_bytes + 1 - self.rbuf.len().min(limits.max_head_bytes));
            self.make_room(w, want.max(1));
            let res = match started {
                Some(t0) => {
                    let Some(left) = ctx.t.client_head.checked_sub(t0.elapsed()) else {
                        return HeadRead::Fail(GatewayError::ClientTimeout);
                    };
                    read_some(&mut self.io, &mut self.rbuf, want.max(1), left).await
                }
                None => {
                    if w.shutdown.is_set() {
                        return HeadRead::Closed;
                    }
                    monoio::select! {
                        r = read_some(&mut self.io, &mut self.rbuf, want.max(1), ctx.t.client_idle) => r,
                        _ = w.shutdown.wait() => return HeadRead::Closed,
                    }
                }
            };
            match res {
                Ok(_) => {}
                Err(IoFail::Timeout) if started.is_some() => {
                    return HeadRead::Fail(GatewayError::ClientTimeout)
                }
                Err(_) => return HeadRead::Closed,
            }
        }
    }

    /// The one place a request ends on the client side. Writes a gateway-made answer when
    /// there is one, and decides whether the connection goes on from the body's state alone:
    /// only when all of the request body has been read (or, after an answer, drained within
    /// [`DRAIN_MAX`] and [`DRAIN_TIMEOUT`]) is the next byte taken as the next request.
    pub async fn finish(&mut self, w: &Worker, ctx: &mut RequestCtx<'_>, out: Outcome<'_>) -> Next {
        let answer = match out {
            Outcome::Abort => return Next::Abort,
            Outcome::Cut => return Next::Reset,
            Outcome::Relayed { keep } => {
                return if keep && ctx.body.is_done() {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
            Outcome::Answer(a) => a,
        };
        let mut keep = ctx.head.keep_alive && !ctx.last_answer() && ctx.body.drainable();
        if keep {
            // What of the body is already here is consumed now; the rest must be short.
            keep = match ctx.body.take(&mut self.rbuf) {
                Err(_) => false,
                Ok(_) => ctx.body.is_done() || ctx.body.left() <= DRAIN_MAX,
            };
        }
        self.write_answer(w, ctx, &answer, keep);
        let written = ctx.wbuf.len() as u64;
        let buf = std::mem::take(&mut ctx.wbuf);
        match write_buf(&mut self.io, buf, ctx.t.client_write).await {
            Ok(b) => {
                ctx.wbuf = b;
                ctx.rec.bytes_out = ctx.rec.bytes_out.saturating_add(written);
            }
            Err(_) => return Next::Abort,
        }
        if !keep {
            return Next::Close;
        }
        if !ctx.body.is_done() && !self.drain(w, ctx).await {
            return Next::Close;
        }
        Next::KeepAlive
    }

    /// Builds a gateway-made answer in `ctx.wbuf`.
    fn write_answer(&self, w: &Worker, ctx: &mut RequestCtx<'_>, a: &Answer<'_>, keep: bool) {
        let date = w.date.get();
        let wbuf = &mut ctx.wbuf;
        wbuf.clear();
        let head_only = ctx.head.method == Method::Head;
        // What the end of the request records (see `record::done`).
        let (status, error) = match a {
            Answer::Error(e) => (e.status(), Some(*e)),
            Answer::Direct(d) => (d.status, None),
            Answer::Redirect { .. } => (308, None),
            Answer::LastHop => (200, None),
            Answer::Composed(c) => (c.status, None),
        };
        ctx.rec.status = status;
        ctx.rec.error = error;
        if let Answer::Composed(c) = a {
            ctx.rec.kind = c.kind;
        }
        match a {
            Answer::Error(e) => {
                let trace_id = ctx.rec.trace.trace_id_hex();
                write_error_response_traced(
                    wbuf,
                    *e,
                    ctx.id.as_bytes(),
                    &trace_id,
                    &date,
                    &ctx.resp_headers,
                    !keep,
                );
                if head_only {
                    // HEAD: the same head, no body.
                    if let Some(p) = memchr::memmem::find(wbuf, b"\r\n\r\n") {
                        wbuf.truncate(p + 4);
                    }
                }
            }
            Answer::Direct(d) => {
                let bodiless = d.status == 204 || d.status == 304;
                wbuf.put_slice(&d.head);
                if !bodiless {
                    wbuf.put_slice(b"content-length: ");
                    put_u64(wbuf, d.body.len() as u64);
                    wbuf.put_slice(b"\r\n");
                }
                end_head(
                    wbuf,
                    if d.own_date { b"" } else { &date },
                    ctx.id.as_bytes(),
                    &ctx.resp_headers,
                    keep,
                    ctx.head.version,
                );
                if !head_only && !bodiless {
                    wbuf.put_slice(&d.body);
                }
            }
            Answer::LastHop => {
                put_status_line(wbuf, 200, b"OK");
                if ctx.head.method == Method::Trace {
                    // The request as received (RFC 9110 §9.3.8), without the fields likely to
                    // carry secrets. A rare path: the body is built apart for its length.
                    let mut echo = BytesMut::new();
                    echo.put_slice(ctx.head.method_str());
                    echo.put_u8(b' ');
                    echo.put_slice(ctx.head.bytes(ctx.head.target));
                    echo.put_slice(b" HTTP/1.1\r\n");
                    for h in &ctx.head.headers {
                        let name = ctx.head.bytes(h.name);
                        if [&b"authorization"[..], b"proxy-authorization", b"cookie"]
                            .iter()
                            .any(|s| name.eq_ignore_ascii_case(s))
                        {
                            continue;
                        }
                        put_header(&mut echo, name, ctx.head.bytes(h.value));
                    }
                    echo.put_slice(b"\r\n");
                    wbuf.put_slice(b"content-type: message/http\r\ncontent-length: ");
                    put_u64(wbuf, echo.len() as u64);
                    wbuf.put_slice(b"\r\n");
                    end_head(wbuf, &date, ctx.id.as_bytes(), b"", keep, ctx.head.version);
                    wbuf.put_slice(&echo);
                } else {
                    put_header(wbuf, b"allow", ALLOWED_METHODS.as_bytes());
                    wbuf.put_slice(b"content-length: 0\r\n");
                    end_head(wbuf, &date, ctx.id.as_bytes(), b"", keep, ctx.head.version);
                }
            }
            Answer::Composed(cm) => {
                put_status_line(wbuf, cm.status, reason_phrase(cm.status).as_bytes());
                if !cm.own_type {
                    wbuf.put_slice(b"content-type: application/json\r\n");
                }
                wbuf.put_slice(b"content-length: ");
                put_u64(wbuf, cm.body.len() as u64);
                wbuf.put_slice(b"\r\n");
                wbuf.put_slice(&cm.headers);
                end_head(
                    wbuf,
                    if cm.own_date { b"" } else { &date },
                    ctx.id.as_bytes(),
                    &ctx.resp_headers,
                    keep,
                    ctx.head.version,
                );
                if !head_only {
                    wbuf.put_slice(&cm.body);
                }
            }
            Answer::Redirect { host_len, port } => {
                put_status_line(wbuf, 308, b"Permanent Redirect");
                wbuf.put_slice(b"location: https://");
                let host = ctx.head.host_bytes().unwrap_or(b"");
                wbuf.put_slice(&host[..(*host_len).min(host.len())]);
                if let Some(p) = port {
                    wbuf.put_u8(b':');
                    put_u64(wbuf, *p as u64);
                }
                // Origin form, or an absolute form's "/path?query", "?query" or nothing: an
                // empty path is "/" and the query stays (RFC 3986 §6.2.3, RFC 9112 §3.2.2).
                // Anything else (OPTIONS's "*") becomes "/".
                let pq = ctx.head.bytes(ctx.head.path_query);
                if !pq.starts_with(b"/") {
                    wbuf.put_u8(b'/');
                }
                if matches!(pq.first(), Some(b'/' | b'?')) {
                    wbuf.put_slice(pq);
                }
                wbuf.put_slice(b"\r\ncontent-length: 0\r\n");
                end_head(wbuf, &date, ctx.id.as_bytes(), b"", keep, ctx.head.version);
            }
        }
    }

    /// Reads and throws away the rest of the request body, within [`DRAIN_MAX`] bytes and
    /// [`DRAIN_TIMEOUT`]. `true`: the body ended, and the next byte starts a new request.
    pub(crate) async fn drain(&mut self, w: &Worker, ctx: &mut RequestCtx<'_>) -> bool {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut drained = 0u64;
        loop {
            match ctx.body.take(&mut self.rbuf) {
                Ok(part) => drained += part.len() as u64,
                Err(_) => return false,
            }
            if ctx.body.is_done() {
                return true;
            }
            if drained > DRAIN_MAX {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.make_room(w, CLIENT_READ_BUF);
            if read_some(&mut self.io, &mut self.rbuf, CLIENT_READ_BUF, left)
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// A close with client bytes possibly still in flight (RFC 9112 §9.6): half-close, then
    /// read and discard until the client closes, for a bounded time and byte count, so that
    /// our answer is not lost to a TCP reset.
    async fn linger(&mut self, w: &Worker) {
        self.io.half_close().await;
        let deadline = Instant::now() + LINGER_TIMEOUT;
        let mut seen = 0usize;
        let mut buf = w.bufs.take();
        while seen < LINGER_MAX {
            buf.clear();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match read_some(&mut self.io, &mut buf, CLIENT_READ_BUF, left).await {
                Ok(n) => seen += n,
                Err(_) => break,
            }
        }
        w.bufs.give(buf);
    }
}

/// The end of a gateway-made head: `Date` (none when `date` is empty: the head has its own),
/// the request id, `extra` header lines, `Connection` as the keep-alive decision says, and the
/// blank line (the cache's own answers end so too).
pub(crate) fn end_head(
    wbuf: &mut BytesMut,
    date: &[u8],
    request_id: &[u8],
    extra: &[u8],
    keep: bool,
    version: crate::http::Version,
) {
    if !date.is_empty() {
        put_header(wbuf, b"date", date);
    }
    put_header(wbuf, b"x-request-id", request_id);
    wbuf.put_slice(extra);
    if let Some(v) = connection_value(keep, version) {
        put_header(wbuf, b"connection", v);
    }
    wbuf.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    /// An idle keep-alive connection's task holds the connection loop's future only (the
    /// request's state lives in a slab block while a request runs): it must stay small, as
    /// 10,000 idle connections hold 10,000 of them.
    #[test]
    fn the_connection_task_stays_small() {
        fn size_of_future<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let cfg = crate::config::Config::parse("[[listeners]]\naddress = \"127.0.0.1:0\"\n", "t")
            .expect("config");
        let hub = crate::upstream::health::HealthHub::new(&cfg);
        let buckets = crate::ratelimit::HostBuckets::new(&cfg);
        let auth = crate::auth::AuthShared::new(&cfg).expect("auth");
        let w = super::Worker::new(&cfg, 0, hub, buckets, &auth, Default::default());
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let std_stream =
            std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let io = monoio::net::TcpStream::from_std(std_stream).expect("stream");
            let f = super::serve(
                &w,
                io,
                "127.0.0.1:1".parse().expect("addr"),
                super::ConnInfo::default(),
            );
            let n = size_of_future(&f);
            eprintln!("connection task future: {n} bytes");
            assert!(n <= 1024, "the connection future grew to {n} bytes");
        });
    }

    #[test]
    fn peer_ip_text_matches_display() {
        use std::net::IpAddr;
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.22.133.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(super::PeerIp::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

    /// One timer across operations: a deadline moved later does not fire at the old one, a
    /// deadline moved earlier than the one filed still fires (monoio re-files the entry), and
    /// so does one already past. The outer 10 s bound only stops a hang. (After a timeout the
    /// stream is not read again: a cancelled read may still take bytes, which is why callers
    /// close it.)
    #[test]
    fn one_io_timer_serves_several_operations() {
        use std::time::Duration;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let std_stream =
            std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut peer, _) = l.accept().expect("accept");
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut io = monoio::net::TcpStream::from_std(std_stream).expect("stream");
            let slot = std::pin::pin!(None);
            let mut timer = super::IoTimer::new(slot);
            let guard = Duration::from_secs(10);
            // A write with a short deadline completes (the peer's buffer has room) ...
            let w = timer.write_buf(&mut io, &b"ping"[..], Duration::from_millis(200));
            let r = monoio::time::timeout(guard, w).await.expect("no hang");
            assert!(r.is_ok());
            // ... and that deadline, moved later, does not cut the next read after 200 ms.
            let mut buf = bytes::BytesMut::new();
            let read = timer.read_some(&mut io, &mut buf, 64, Duration::from_secs(3600));
            let answer = async {
                monoio::time::sleep(Duration::from_millis(400)).await;
                std::io::Write::write_all(&mut peer, b"pong").expect("peer write");
            };
            let (r, ()) = monoio::join!(monoio::time::timeout(guard, read), answer);
            assert_eq!(r.expect("no hang"), Ok(4));
            assert_eq!(&buf[..], b"pong");
            // A deadline earlier than the one filed: the silent peer times out.
            let r = timer.read_some(&mut io, &mut buf, 64, Duration::from_millis(50));
            let r = monoio::time::timeout(guard, r)
                .await
                .expect("the earlier deadline fired");
            assert_eq!(r, Err(super::IoFail::Timeout));
            // A deadline already past is a timeout, not a wait.
            let r = timer.read_some_until(&mut io, &mut buf, 64, std::time::Instant::now());
            let r = monoio::time::timeout(guard, r).await.expect("no hang");
            assert_eq!(r, Err(super::IoFail::Timeout));
        });
    }
}
