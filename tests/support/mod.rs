//! Test harness: an in-process gateway on 127.0.0.1:0, real loopback upstream servers with
//! scripted behaviour, and a raw HTTP/1.1 client for well-formed and malformed traffic.
#![allow(dead_code)]

pub mod hostile;
pub mod pki;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ringway::config::{Config, DriverChoice};
use ringway::server::{DriverKind, Gateway};

/// The largest chunk the test servers and clients accept: bigger ones come only from a hostile
/// peer, and end the exchange instead of overflowing.
pub const MAX_TEST_BODY: usize = 1 << 30;

/// Both monoio drivers; tests run their scenario on each.
pub const DRIVERS: [DriverChoice; 2] = [DriverChoice::IoUring, DriverChoice::Epoll];

/// A gateway running in this process; shut down and joined on drop.
pub struct TestGateway {
    gw: Option<Gateway>,
    pub addr: SocketAddr,
}

impl TestGateway {
    /// Starts a gateway from TOML text on the given driver, with one worker unless the TOML
    /// says otherwise.
    pub fn start(toml: &str, driver: DriverChoice) -> TestGateway {
        let mut cfg = Config::parse(toml, "test.toml")
            .unwrap_or_else(|e| panic!("bad test config: {e}\n{toml}"));
        cfg.server.driver = driver;
        if cfg.server.workers == 0 {
            cfg.server.workers = 1;
        }
        let gw = Gateway::start(cfg, None).expect("gateway starts");
        if driver == DriverChoice::Epoll {
            assert_eq!(gw.driver(), DriverKind::Epoll);
        }
        TestGateway {
            addr: gw.addrs()[0],
            gw: Some(gw),
        }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.gw.as_ref().expect("running").addrs().to_vec()
    }

    pub fn driver(&self) -> DriverKind {
        self.gw.as_ref().expect("running").driver()
    }

    /// The running gateway (its control plane, counters).
    pub fn gateway(&self) -> &Gateway {
        self.gw.as_ref().expect("running")
    }

    /// Graceful shutdown; returns once the workers stopped.
    pub fn stop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown();
            gw.join();
        }
    }

    pub fn begin_shutdown(&self) {
        if let Some(gw) = &self.gw {
            gw.shutdown();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An address where nothing listens, held for as long as the value lives: a socket bound to it
/// without listen(2), so connections to it are refused. A port merely bound and released could
/// be handed to the next socket that binds port 0, a gateway of this very test among them,
/// which would then proxy to itself in a loop.
pub struct Refusing {
    pub addr: SocketAddr,
    _held: socket2::Socket,
}

pub fn refusing_addr() -> Refusing {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = s
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("an inet address");
    Refusing { addr, _held: s }
}

/// Seconds since the Unix epoch (token `exp`/`iat` claims).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A key or key-set file of `tests/data/auth`.
pub fn data(name: &str) -> String {
    format!("{}/tests/data/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A config with one listener on 127.0.0.1:0, one upstream "up" with the given endpoints and
/// `extra` appended (routes, timeouts...).
pub fn config(endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[[listeners]]\naddress = \"127.0.0.1:0\"\n\n[upstreams.up]\nendpoints = [{}]\n\n{extra}\n",
        eps.join(", ")
    )
}

/// A config that sends every request to one upstream.
pub fn proxy_all(up: SocketAddr) -> String {
    config(&[up], "[[routes]]\nupstream = \"up\"\n")
}

// ---------------------------------------------------------------------------------------------
// Upstream servers.

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub target: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The head exactly as received.
    pub raw_head: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What an upstream does with a request.
pub enum Reply {
    /// Write these bytes and keep the connection.
    Raw(Vec<u8>),
    /// Write these bytes and close.
    RawClose(Vec<u8>),
    /// Write each part after its delay, then close if `close`.
    Slow {
        parts: Vec<(Duration, Vec<u8>)>,
        close: bool,
    },
    /// Close without answering.
    Drop,
    /// Say nothing for this long, then close.
    Hang(Duration),
    /// Write `head`, then `total` bytes of body in 64 KiB pieces as fast as the peer takes
    /// them, counting the body bytes written into `written`.
    Stream {
        head: Vec<u8>,
        total: usize,
        written: Arc<AtomicUsize>,
    },
    /// Run these steps in order, then keep reading requests on the connection.
    Script(Vec<Step>),
}

/// One step of a [`Reply::Script`].
pub enum Step {
    Write(Vec<u8>),
    /// Pause (ends early when the server stops).
    Wait(Duration),
    /// Tell the test that the steps before this one are done.
    Signal(Arc<Event>),
    /// Wait until the test sets this event (at most 10 s; ends early when the server stops).
    Await(Arc<Event>),
    /// Half-close, let the peer read what was sent, then drop the connection.
    Close,
}

/// A one-shot flag a test thread can wait on (instead of sleeping and polling).
#[derive(Default)]
pub struct Event {
    set: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Event {
    pub fn new() -> Arc<Event> {
        Arc::new(Event::default())
    }

    pub fn set(&self) {
        *self.set.lock().unwrap() = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *self.set.lock().unwrap()
    }

    /// Waits until set or `limit` passes; true when set.
    pub fn wait(&self, limit: Duration) -> bool {
        let g = self.set.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, limit, |s| !*s).unwrap();
        *g
    }
}

/// An upstream that answers `slow` with its head and half its 4-byte body (`sl`), then sets the
/// first event (the head is out) and waits for the second before the rest (`ow`); any other
/// target gets a 200 with `other`.
pub fn half_sent_upstream(
    slow: &'static str,
    other: &'static [u8],
) -> (Upstream, Arc<Event>, Arc<Event>) {
    let (head_sent, go) = (Event::new(), Event::new());
    let (h, g) = (head_sent.clone(), go.clone());
    let up = Upstream::start(move |req| {
        if req.target == slow {
            Reply::Script(vec![
                Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nsl".to_vec()),
                Step::Signal(h.clone()),
                Step::Await(g.clone()),
                Step::Write(b"ow".to_vec()),
            ])
        } else {
            Reply::Raw(ok_response(other))
        }
    });
    (up, head_sent, go)
}

pub fn ok_response(body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

type Handler = dyn Fn(&Req) -> Reply + Send + Sync;

/// The threads of a loopback test server: on stop, every connection is shut down (which wakes
/// blocked reads and writes), every thread is joined, and a panic in any of them is re-raised
/// in the test thread.
pub struct ServerThreads {
    addr: SocketAddr,
    /// Set on stop: ends scripted waits and hangs at once.
    pub stop: Arc<Event>,
    handles: Arc<Mutex<Vec<thread::JoinHandle<()>>>>,
    /// A clone of each open accepted connection, to shut it down on stop.
    streams: Arc<Mutex<Vec<Option<TcpStream>>>>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl ServerThreads {
    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.streams.lock().unwrap().len()
    }

    /// Accepts on `l` (blocking) and runs `conn` on a thread per connection.
    pub fn serve(
        l: TcpListener,
        conn: impl Fn(TcpStream, &Event) + Send + Sync + 'static,
    ) -> ServerThreads {
        let addr = l.local_addr().expect("addr");
        let stop = Event::new();
        let handles = Arc::new(Mutex::new(Vec::new()));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let conn = Arc::new(conn);
        let (st, hs, ss) = (stop.clone(), handles.clone(), streams.clone());
        let acceptor = thread::spawn(move || {
            for stream in l.incoming() {
                if st.is_set() {
                    return;
                }
                let Ok(stream) = stream else { continue };
                // The clone lets `stop` shut the connection down; it is dropped as soon as the
                // connection's thread is done, so that its end closes the socket.
                let slot = {
                    let mut ss = ss.lock().unwrap();
                    ss.push(stream.try_clone().ok());
                    ss.len() - 1
                };
                let (conn, st, ss) = (conn.clone(), st.clone(), ss.clone());
                let h = thread::spawn(move || {
                    conn(stream, &st);
                    ss.lock().unwrap()[slot] = None;
                });
                hs.lock().unwrap().push(h);
            }
        });
        ServerThreads {
            addr,
            stop,
            handles,
            streams,
            acceptor: Some(acceptor),
        }
    }

    /// Stops accepting, shuts every connection down, joins every thread; re-raises the first
    /// panic of a server thread (or prints it when the test is already panicking).
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.stop.set();
        // Wakes the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let mut panics = Vec::new();
        if let Err(p) = acceptor.join() {
            panics.push(p);
        }
        for s in self.streams.lock().unwrap().iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let handles: Vec<_> = self.handles.lock().unwrap().drain(..).collect();
        for h in handles {
            if let Err(p) = h.join() {
                panics.push(p);
            }
        }
        if let Some(p) = panics.into_iter().next() {
            if thread::panicking() {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                eprintln!("a test server thread panicked too: {msg}");
            } else {
                std::panic::resume_unwind(p);
            }
        }
    }
}

impl Drop for ServerThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback HTTP/1.1 server with scripted replies; counts requests and connections.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Req>>>,
    /// Notified with each request pushed to `seen`.
    arrived: Arc<std::sync::Condvar>,
    threads: ServerThreads,
}

impl Upstream {
    /// Answers every request with `handler`. Keep-alive connections idle for longer than
    /// `idle_close` are closed by the server (None: 10 s).
    pub fn start_with(
        idle_close: Option<Duration>,
        handler: impl Fn(&Req) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let addr = l.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(std::sync::Condvar::new());
        let handler: Arc<Handler> = Arc::new(handler);
        let (r, c, s, a) = (
            requests.clone(),
            connections.clone(),
            seen.clone(),
            arrived.clone(),
        );
        let idle = idle_close.unwrap_or(Duration::from_secs(10));
        let threads = ServerThreads::serve(l, move |stream, stop| {
            c.fetch_add(1, Ordering::SeqCst);
            upstream_conn(stream, &*handler, &r, (&s, &a), stop, idle)
        });
        Upstream {
            addr,
            requests,
            connections,
            seen,
            arrived,
            threads,
        }
    }

    pub fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::start_with(None, handler)
    }

    /// Answers 200 with `body` after `delay`, keeping the connection.
    pub fn slow(delay: Duration, body: &'static [u8]) -> Upstream {
        Upstream::start(move |_| Reply::Slow {
            parts: vec![(delay, ok_response(body))],
            close: false,
        })
    }

    /// Answers 200 with a body describing the request as JSON: method, target, headers, body.
    pub fn echo() -> Upstream {
        Upstream::start(|req| Reply::Raw(ok_response(echo_json(req).as_bytes())))
    }

    pub fn hits(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Req {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }

    /// The targets of every request received so far.
    pub fn targets(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.target.clone())
            .collect()
    }

    /// Waits (on arrivals, no polling) until the requests seen so far satisfy `f`, or `limit`
    /// passes; true when they do.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&[Req]) -> bool) -> bool {
        let g = self.seen.lock().unwrap();
        let (g, _) = self
            .arrived
            .wait_timeout_while(g, limit, |seen| !f(seen))
            .unwrap();
        f(&g)
    }

    /// Stops the server now: joins its threads and re-raises their panics.
    pub fn stop(&mut self) {
        self.threads.stop();
    }
}

pub fn echo_json(req: &Req) -> String {
    serde_json::json!({
        "method": req.method,
        "target": req.target,
        "headers": req.headers,
        "body": String::from_utf8_lossy(&req.body),
    })
    .to_string()
}

fn upstream_conn(
    mut s: TcpStream,
    h: &Handler,
    count: &AtomicUsize,
    (seen, arrived): (&Mutex<Vec<Req>>, &std::sync::Condvar),
    stop: &Event,
    idle: Duration,
) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let _ = s.set_read_timeout(Some(idle));
        let req = match read_request(&mut s, &mut buf) {
            Some(r) => r,
            None => return,
        };
        if stop.is_set() {
            return;
        }
        count.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(req.clone());
        arrived.notify_all();
        let keep = req
            .header("connection")
            .is_none_or(|v| !v.eq_ignore_ascii_case("close"));
        match h(&req) {
            Reply::Raw(b) => {
                if s.write_all(&b).is_err() || !keep {
                    return;
                }
            }
            Reply::RawClose(b) => {
                let _ = s.write_all(&b);
                close_gently(&mut s);
                return;
            }
            Reply::Slow { parts, close } => {
                for (d, b) in parts {
                    if stop.wait(d) || s.write_all(&b).is_err() {
                        return;
                    }
                }
                if close {
                    let _ = s.shutdown(Shutdown::Write);
                    return;
                }
            }
            Reply::Stream {
                head,
                total,
                written,
            } => {
                if s.write_all(&head).is_err() {
                    return;
                }
                let piece = vec![b'z'; 65536];
                let mut left = total;
                while left > 0 {
                    let n = left.min(piece.len());
                    if s.write_all(&piece[..n]).is_err() {
                        return;
                    }
                    written.fetch_add(n, Ordering::SeqCst);
                    left -= n;
                }
            }
            Reply::Script(steps) => {
                for step in steps {
                    match step {
                        Step::Write(b) => {
                            if s.write_all(&b).is_err() {
                                return;
                            }
                        }
                        Step::Wait(d) => {
                            if stop.wait(d) {
                                return;
                            }
                        }
                        Step::Signal(e) => e.set(),
                        Step::Await(e) => {
                            let until = std::time::Instant::now() + Duration::from_secs(10);
                            while !e.wait(Duration::from_millis(50)) {
                                if std::time::Instant::now() >= until || stop.is_set() {
                                    return;
                                }
                            }
                        }
                        Step::Close => {
                            close_gently(&mut s);
                            return;
                        }
                    }
                }
            }
            Reply::Drop => return,
            Reply::Hang(d) => {
                stop.wait(d);
                return;
            }
        }
    }
}

/// Half-closes, then drops whatever the peer already sent, so that unread bytes do not turn
/// the close into a reset that could destroy the answer before the peer read it.
pub fn close_gently(s: &mut TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_nonblocking(true);
    let mut tmp = [0u8; 4096];
    for _ in 0..64 {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads one request (head and body: Content-Length or chunked) with an independent parser.
pub fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Req> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers: Vec<(String, String)> = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).to_string(),
                        )
                    })
                    .collect();
                let mut r = Req {
                    method: req.method.unwrap_or("").to_string(),
                    target: req.path.unwrap_or("").to_string(),
                    version: req.version.unwrap_or(1),
                    headers,
                    body: Vec::new(),
                    raw_head: buf[..n].to_vec(),
                };
                buf.drain(..n);
                if r.header("transfer-encoding")
                    .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
                {
                    r.body = read_chunked(s, buf)?;
                } else if let Some(cl) = r.header("content-length") {
                    let cl: usize = cl.trim().parse().ok()?;
                    while buf.len() < cl {
                        fill(s, buf)?;
                    }
                    r.body = buf.drain(..cl).collect();
                }
                return Some(r);
            }
            Ok(httparse::Status::Partial) => fill(s, buf)?,
            Err(_) => return None,
        }
    }
}

fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut tmp = [0u8; 16384];
    match s.read(&mut tmp) {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            Some(())
        }
    }
}

fn read_line(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..p].to_vec();
            buf.drain(..p + 2);
            return Some(line);
        }
        fill(s, buf)?;
    }
}

fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(s, buf)?;
        let size_txt = String::from_utf8_lossy(&line);
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // trailers
            loop {
                let t = read_line(s, buf)?;
                if t.is_empty() {
                    return Some(body);
                }
            }
        }
        // A size that cannot be buffered ends the connection (the sender is hostile).
        let need = size.checked_add(2).filter(|n| *n <= MAX_TEST_BODY)?;
        while buf.len() < need {
            fill(s, buf)?;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..need);
    }
}

// ---------------------------------------------------------------------------------------------
// Client side.

/// A response as a client received it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// The values of every line named `name` (any case), in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A byte stream a [`Client`] can run over: plain TCP or a TLS client connection.
pub trait Wire: Read + Write {
    fn wire_timeout(&self, d: Duration);
}

impl Wire for TcpStream {
    fn wire_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).expect("read timeout");
    }
}

/// A synchronous rustls client connection over TCP.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Wire for TlsStream {
    fn wire_timeout(&self, d: Duration) {
        self.sock.set_read_timeout(Some(d)).expect("read timeout");
    }
}

/// A raw client connection.
pub struct Client<S: Wire = TcpStream> {
    pub s: S,
    buf: Vec<u8>,
}

impl Client<TcpStream> {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).expect("connect to gateway");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.set_nodelay(true);
        Client { s, buf: Vec::new() }
    }

    /// A client on a socket the test connected itself (with options of its own).
    pub fn from_stream(s: TcpStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.set_nodelay(true);
        Client { s, buf: Vec::new() }
    }
}

impl Client<TlsStream> {
    /// Connects over TLS and completes the handshake.
    pub fn connect_tls(
        addr: SocketAddr,
        sni: &str,
        cfg: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Client<TlsStream>> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string())
            .map_err(std::io::Error::other)?;
        let conn = rustls::ClientConnection::new(cfg, name).map_err(std::io::Error::other)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Client { s, buf: Vec::new() })
    }
}

impl<S: Wire> Client<S> {
    pub fn send(&mut self, bytes: &[u8]) -> &mut Self {
        self.try_send(bytes).expect("write to gateway");
        self
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    pub fn read_timeout(&mut self, d: Duration) {
        self.s.wire_timeout(d);
    }

    /// Bytes received but not yet taken as a response.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.s.read(&mut tmp) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Reads one response; `head_request` says the request was HEAD (no body follows).
    pub fn read_response_for(&mut self, head_request: bool) -> Option<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = r.code.unwrap();
                    let version = r.version.unwrap();
                    let headers: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).to_string(),
                            )
                        })
                        .collect();
                    self.buf.drain(..n);
                    let mut resp = Resp {
                        status,
                        version,
                        headers,
                        body: Vec::new(),
                    };
                    if (100..200).contains(&status) {
                        return Some(resp);
                    }
                    if head_request || status == 204 || status == 304 {
                        return Some(resp);
                    }
                    if resp.header("transfer-encoding").is_some() {
                        resp.body = self.read_chunked()?;
                    } else if let Some(cl) = resp.header("content-length") {
                        let cl: usize = cl.parse().expect("numeric content-length");
                        while self.buf.len() < cl {
                            if !self.fill() {
                                return None;
                            }
                        }
                        resp.body = self.buf.drain(..cl).collect();
                    } else {
                        while self.fill() {}
                        resp.body = std::mem::take(&mut self.buf);
                    }
                    return Some(resp);
                }
                Ok(httparse::Status::Partial) => {
                    if !self.fill() {
                        return None;
                    }
                }
                Err(e) => panic!(
                    "gateway sent a malformed response ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    pub fn read_response(&mut self) -> Option<Resp> {
        self.read_response_for(false)
    }

    /// Reads the final response, skipping 1xx.
    pub fn read_final(&mut self) -> Resp {
        loop {
            let r = self.read_response().expect("a response");
            if r.status >= 200 {
                return r;
            }
        }
    }

    fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..p].to_vec();
                self.buf.drain(..p + 2);
                return Some(line);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn read_chunked(&mut self) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let txt = String::from_utf8_lossy(&line).to_string();
            let size =
                usize::from_str_radix(txt.split(';').next()?.trim(), 16).expect("hex chunk size");
            if size == 0 {
                loop {
                    if self.read_line()?.is_empty() {
                        return Some(body);
                    }
                }
            }
            // A chunk larger than a test ever sends cannot complete: read to the end and
            // report the response as cut.
            let Some(need) = size.checked_add(2).filter(|n| *n <= MAX_TEST_BODY) else {
                while self.fill() {}
                return None;
            };
            while self.buf.len() < need {
                if !self.fill() {
                    return None;
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            assert_eq!(
                &self.buf[size..need],
                b"\r\n",
                "chunk data must end with CRLF"
            );
            self.buf.drain(..need);
        }
    }

    /// True when the gateway closed the connection (EOF within `wait`), with nothing more sent.
    pub fn is_closed(&mut self, wait: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        self.s.wire_timeout(wait);
        let mut tmp = [0u8; 1024];
        match self.s.read(&mut tmp) {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                false
            }
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ),
        }
    }
}

/// Sends one request on a new connection and reads the response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Resp {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.read_response_for(raw.starts_with(b"HEAD "))
        .expect("a response")
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n").as_bytes(),
    )
}

/// Waits until `f` holds or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A real `redis-server` on a free loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("ringway-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = RedisServer {
            child: None,
            port,
            dir,
        };
        r.restart();
        r
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        assert!(
            eventually(Duration::from_secs(10), || self
                .command(&["PING"])
                .is_some_and(|r| r.starts_with("+PONG"))),
            "redis-server did not start on port {}",
            self.port
        );
    }

    /// SIGKILL: no goodbye to connected clients.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends one command and returns the raw RESP answer (one read, enough for short answers).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(self.addr()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.ends_with(b"\r\n") {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// Calls of a command so far, from INFO commandstats (e.g. "evalsha").
    pub fn calls(&self, cmd: &str) -> u64 {
        let info = self.command(&["INFO", "commandstats"]).unwrap_or_default();
        let tag = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&tag))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Keys matching a pattern.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let raw = self.command(&["KEYS", pattern]).unwrap_or_default();
        raw.lines()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Paced load: `conns` connections to each address, each sending one request every
/// `interval` for `run`. Returns the count of each status seen.
pub fn paced_load(
    addrs: &[SocketAddr],
    conns: usize,
    interval: Duration,
    run: Duration,
    request: &'static [u8],
) -> std::collections::BTreeMap<u16, u32> {
    let t0 = Instant::now();
    let threads: Vec<_> = addrs
        .iter()
        .flat_map(|a| std::iter::repeat_n(*a, conns))
        .map(|addr| {
            thread::spawn(move || {
                let mut seen = std::collections::BTreeMap::new();
                let mut c = Client::connect(addr);
                let mut next = Instant::now();
                while t0.elapsed() < run {
                    c.send(request);
                    let status = c.read_response().map_or(0, |r| r.status);
                    *seen.entry(status).or_insert(0u32) += 1;
                    if status == 0 {
                        c = Client::connect(addr);
                    }
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = std::collections::BTreeMap::new();
    for t in threads {
        for (s, n) in t.join().unwrap() {
            *all.entry(s).or_insert(0) += n;
        }
    }
    all
}

// ---------------------------------------------------------------------------------------------
// The binary, for its event log.

/// The binary running on a config file (see [`run_binary`]); killed when dropped.
pub struct Binary {
    child: std::process::Child,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary on `toml` (written as `name` under the test's target scratch folder; one
/// worker, the default log level), its stderr lines sent to the returned channel as they come:
/// for what only the event log shows. Killed when the [`Binary`] is dropped.
pub fn run_binary(name: &str, toml: &str) -> (Binary, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("run-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, toml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringway"))
        .args(["run", "--workers", "1", "-c"])
        .arg(&file)
        .env_remove("RINGWAY_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ringway");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Binary { child }, rx)
}

/// The next line from [`run_binary`]'s log holding `needle`, with the lines before it (waits
/// at most 10 s for each).
pub fn line_with(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> (String, Vec<String>) {
    let mut before = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no line with {needle:?} after {before:?}"));
        if line.contains(needle) {
            return (line, before);
        }
        before.push(line);
    }
}
