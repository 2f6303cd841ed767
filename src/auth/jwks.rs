//! JWT key sets shared with the workers, and the background fetch of JWKS URLs.
//!
//! A [`KeySource`] holds the current key set behind a mutex with a version number beside it.
//! Workers read the version (one atomic load) every 50 ms and take the set only when it
//! changed; the request path reads the worker's own copy.
//!
//! One thread per JWKS URL fetches the set over HTTP/1.1 with `std::net::TcpStream`, inside a
//! blocking rustls session for https URLs (the client config is built once, at start):
//! - next fetch after `Cache-Control: max-age`, clamped to [`jwks_min_ttl`, `jwks_max_ttl`];
//! - a worker meeting an unknown `kid` asks for a refresh, honoured at most once per
//!   `jwks_min_refresh_interval`;
//! - keys that disappear from the set stay accepted for `jwks_grace` (tokens signed just
//!   before a rotation keep working);
//! - a failed fetch (a certificate that does not verify included) keeps the last good keys and
//!   is retried after `jwks_min_refresh_interval`; it is logged once, and again only when the
//!   reason changes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::config::JwtConfig;
use super::jwt::{self, KeySet};
use crate::{info, warn};

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// How often a fetcher thread looks at its flags while waiting.
const TICK: Duration = Duration::from_millis(50);

/// A provider's key set as published to the workers.
pub struct KeySource {
    current: Mutex<Arc<KeySet>>,
    version: AtomicU64,
    refresh: AtomicBool,
    /// Set for JWKS URL providers: the provider's settings and where to fetch.
    url: Option<(JwtConfig, Endpoint)>,
}

impl KeySource {
    pub fn fixed(set: KeySet) -> KeySource {
        KeySource {
            current: Mutex::new(Arc::new(set)),
            version: AtomicU64::new(1),
            refresh: AtomicBool::new(false),
            url: None,
        }
    }

    /// A JWKS URL provider's source: empty until its fetcher publishes a set.
    pub fn fetched(cfg: JwtConfig, endpoint: Endpoint) -> KeySource {
        KeySource {
            current: Mutex::new(Arc::new(KeySet::default())),
            version: AtomicU64::new(0),
            refresh: AtomicBool::new(false),
            url: Some((cfg, endpoint)),
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current set and its version.
    pub fn current(&self) -> (Arc<KeySet>, u64) {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (g.clone(), self.version.load(Ordering::Acquire))
    }

    pub fn publish(&self, set: KeySet) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *g = Arc::new(set);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Asks the fetcher (if any) for a refresh.
    pub fn want_refresh(&self) {
        if self.url.is_some() {
            self.refresh.store(true, Ordering::Relaxed);
        }
    }
}

/// `http[s]://host[:port]/path`, resolved when the config loads.
#[derive(Clone, Debug)]
pub struct HttpUrl {
    /// The authority as written (the `Host` header).
    pub host: String,
    pub addr: SocketAddr,
    pub path: String,
    /// `https://`: the name the server's certificate is verified against (the URL's host,
    /// also sent as SNI when it is a DNS name).
    pub https: Option<ServerName<'static>>,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (rest, https, default_port) = if let Some(r) = url.strip_prefix("https://") {
            (r, true, 443)
        } else if let Some(r) = url.strip_prefix("http://") {
            (r, false, 80)
        } else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(p) => (&rest[..p], &rest[p..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?}: expected http[s]://host[:port]/path"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{url:?}: the path holds spaces or control characters"
            ));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let https = if https {
            Some(crate::tls::endpoint_name(None, &with_port).ok_or_else(|| {
                format!("{url:?}: the host is not a TLS server name (DNS name or IP)")
            })?)
        } else {
            None
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority:?} resolves to no address"))?;
        Ok(HttpUrl {
            host: authority.to_string(),
            addr,
            path: path.to_string(),
            https,
        })
    }
}

/// An endpoint the gateway calls itself (a JWKS URL, an introspection endpoint): its URL and,
/// for https, the client config and the name to verify. Built once (at load to check it, at
/// start to use it) and shared by every call.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: HttpUrl,
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Endpoint {
    /// Parses `url` and, for https, builds its client config: verified against the CA bundle
    /// `ca`, else the webpki roots. Errors: (key, reason), the key being `url_key` or `ca`.
    pub fn load(url: &str, ca: Option<&str>, url_key: &str) -> Result<Endpoint, (String, String)> {
        let url = HttpUrl::parse(url).map_err(|r| (url_key.to_string(), r))?;
        let tls = match &url.https {
            Some(name) => {
                let cfg =
                    crate::tls::https_client_config(ca, "ca").map_err(|e| (e.key, e.reason))?;
                Some((cfg, name.clone()))
            }
            None if ca.is_some() => {
                return Err(("ca".into(), format!("only used with an https:// {url_key}")))
            }
            None => None,
        };
        Ok(Endpoint { url, tls })
    }
}

/// A fetched document and its `Cache-Control: max-age`.
pub struct Fetched {
    pub status: u16,
    pub body: Vec<u8>,
    pub max_age: Option<u64>,
}

/// A blocking connection: plain, or a rustls session over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Time left before `deadline`, or the error once it passed.
fn left(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("timed out".into())
    } else {
        Ok(left)
    }
}

/// Connects, and for https completes the handshake (the certificate verified), before
/// `deadline`.
fn connect(ep: &Endpoint, deadline: Instant) -> Result<Conn, String> {
    let mut tcp = TcpStream::connect_timeout(&ep.url.addr, left(deadline)?)
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some((cfg, name)) = &ep.tls else {
        return Ok(Conn::Plain(tcp));
    };
    let mut tls =
        ClientConnection::new(cfg.clone(), name.clone()).map_err(|e| format!("TLS: {e}"))?;
    while tls.is_handshaking() {
        let t = Some(left(deadline)?);
        tcp.set_read_timeout(t).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(t).map_err(|e| e.to_string())?;
        tls.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(Conn::Tls(Box::new(StreamOwned::new(tls, tcp))))
}

/// One blocking HTTP/1.1 request (`Connection: close`) within `timeout` in all. `body`: a form
/// body for a POST.
pub fn http_request(
    ep: &Endpoint,
    timeout: Duration,
    extra: &str,
    body: Option<&[u8]>,
) -> Result<Fetched, String> {
    let deadline = Instant::now() + timeout;
    let url = &ep.url;
    let mut s = connect(ep, deadline)?;
    let mut req = match body {
        None => format!("GET {} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\n", url.path, url.host),
        Some(b) => format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\naccept: application/json\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n",
            url.path, url.host, b.len()
        ),
    };
    req.push_str(extra);
    req.push_str("connection: close\r\n\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    s.tcp()
        .set_write_timeout(Some(left(deadline)?))
        .map_err(|e| e.to_string())?;
    s.write_all(&bytes)
        .and_then(|_| s.flush())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        s.tcp()
            .set_read_timeout(Some(left(deadline)?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                if buf.len() > MAX_JWKS_BYTES + 64 * 1024 {
                    return Err("answer too large".into());
                }
                if let Some(f) = parse_response(&buf, false)? {
                    return Ok(f);
                }
            }
            // Over TLS, a close without close_notify is an error here: a body that ends at
            // the close could have been cut short.
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    parse_response(&buf, true)?.ok_or_else(|| "connection closed mid-answer".into())
}

/// Parses a complete response in `buf`; `Ok(None)` while incomplete. `eof`: the peer closed
/// (a body without a length ends there).
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Fetched>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(buf).map_err(|e| format!("bad response: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = r.code.unwrap_or(0);
    let mut max_age = None;
    let mut length = None;
    let mut chunked = false;
    for h in r.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("");
        if h.name.eq_ignore_ascii_case("cache-control") {
            for d in v.split(',') {
                let d = d.trim();
                if d.eq_ignore_ascii_case("no-cache") || d.eq_ignore_ascii_case("no-store") {
                    max_age = Some(0);
                } else if let Some(a) = d.strip_prefix("max-age=") {
                    if let Ok(a) = a.trim_matches('"').parse::<u64>() {
                        max_age = Some(max_age.map_or(a, |m: u64| m.min(a)));
                    }
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| "bad content-length")?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &buf[n..];
    let body = if chunked {
        match dechunk(rest)? {
            Some(b) => b,
            None if eof => return Err("truncated chunked body".into()),
            None => return Ok(None),
        }
    } else if let Some(l) = length {
        if l > MAX_JWKS_BYTES {
            return Err("answer too large".into());
        }
        if rest.len() < l {
            return if eof {
                Err("truncated body".into())
            } else {
                Ok(None)
            };
        }
        rest[..l].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Fetched {
        status,
        body,
        max_age,
    }))
}

fn dechunk(mut b: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(p) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&b[..p]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        b = &b[p + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if out.len() + size > MAX_JWKS_BYTES {
            return Err("answer too large".into());
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// A retired key and the moment it stops being accepted.
struct Retired {
    key: jwt::JwtKey,
    until: Instant,
}

/// Starts one fetcher thread per JWKS URL provider; they stop when `stop` is set.
pub fn spawn_fetchers(
    names: Vec<String>,
    sources: &[Arc<KeySource>],
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for (name, src) in names.into_iter().zip(sources) {
        let Some((cfg, endpoint)) = src.url.clone() else {
            continue;
        };
        let src = src.clone();
        let stop = stop.clone();
        let label = name.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringway-jwks-{name}"))
            .spawn(move || fetch_loop(&name, &cfg, &endpoint, &src, &stop));
        match t {
            Ok(t) => threads.push(t),
            Err(e) => warn!("cannot start the JWKS fetcher of {label}: {e}"),
        }
    }
    threads
}

fn fetch_loop(name: &str, cfg: &JwtConfig, ep: &Endpoint, src: &KeySource, stop: &AtomicBool) {
    let allowed = jwt::allowed_algs(cfg);
    let mut fresh: Vec<jwt::JwtKey> = Vec::new();
    let mut retired: Vec<Retired> = Vec::new();
    let mut last_fetch: Option<Instant> = None;
    // The reason of the last failure logged, while fetches keep failing.
    let mut failing: Option<String> = None;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let asked = src.refresh.load(Ordering::Relaxed)
            && last_fetch.is_none_or(|t| now >= t + cfg.jwks_min_refresh_interval());
        let expired = retired.iter().any(|r| r.until <= now);
        if now >= next || asked {
            src.refresh.store(false, Ordering::Relaxed);
            last_fetch = Some(now);
            match fetch_set(ep, cfg.jwks_timeout(), &allowed) {
                Ok((set, max_age)) => {
                    let ttl = max_age
                        .map_or(cfg.jwks_max_ttl(), Duration::from_secs)
                        .clamp(cfg.jwks_min_ttl(), cfg.jwks_max_ttl());
                    next = now + ttl;
                    // Keys gone from the new set are kept for the grace period.
                    for old in fresh.drain(..) {
                        let still = set.keys.iter().any(|k| k.kid.is_some() && k.kid == old.kid);
                        if !still {
                            retired.push(Retired {
                                key: old,
                                until: now + cfg.jwks_grace(),
                            });
                        }
                    }
                    retired.retain(|r| {
                        !set.keys
                            .iter()
                            .any(|k| k.kid.is_some() && k.kid == r.key.kid)
                    });
                    fresh = set.keys;
                    failing = None;
                    info!(
                        "auth.jwt.{name}: {} keys from the JWKS URL ({} in their grace period); next refresh in {}s",
                        fresh.len(),
                        retired.len(),
                        ttl.as_secs()
                    );
                    publish(src, &fresh, &mut retired, now);
                }
                Err(e) => {
                    // The last good keys stay in service. The reason names no secret (a JWKS
                    // request carries none); it is logged once per streak of failures.
                    if failing.as_deref() != Some(e.as_str()) {
                        warn!("auth.jwt.{name}: JWKS fetch failed ({e}); keeping the last keys, retrying every {}ms",
                            cfg.jwks_min_refresh_interval().as_millis());
                        failing = Some(e);
                    }
                    next = now + cfg.jwks_min_refresh_interval();
                }
            }
        } else if expired {
            publish(src, &fresh, &mut retired, now);
        }
        std::thread::sleep(TICK);
    }
}

fn publish(src: &KeySource, fresh: &[jwt::JwtKey], retired: &mut Vec<Retired>, now: Instant) {
    retired.retain(|r| r.until > now);
    let keys = fresh
        .iter()
        .cloned()
        .chain(retired.iter().map(|r| r.key.clone()))
        .collect();
    src.publish(KeySet { keys });
}

fn fetch_set(
    ep: &Endpoint,
    timeout: Duration,
    allowed: &[jsonwebtoken::Algorithm],
) -> Result<(KeySet, Option<u64>), String> {
    let f = http_request(ep, timeout, "", None)?;
    if f.status != 200 {
        return Err(format!("status {}", f.status));
    }
    let set = jwt::parse_jwks(&f.body, allowed)?;
    Ok((set, f.max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_cache_lifetimes() {
        let r =
            b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=120\r\ncontent-length: 2\r\n\r\n{}";
        let f = parse_response(r, false).unwrap().unwrap();
        assert_eq!(
            (f.status, f.max_age, f.body.as_slice()),
            (200, Some(120), &b"{}"[..])
        );
        let r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n";
        let f = parse_response(r, false).unwrap().unwrap();
        assert_eq!((f.max_age, f.body.as_slice()), (Some(0), &b"{}"[..]));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}", false)
                .unwrap()
                .is_none()
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{}", true).is_err());
        let f = parse_response(b"HTTP/1.1 200 OK\r\n\r\n{}", true)
            .unwrap()
            .unwrap();
        assert_eq!(f.body, b"{}");
    }

    #[test]
    fn urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/keys").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (8080, "/keys"));
        assert_eq!(HttpUrl::parse("http://127.0.0.1").unwrap().path, "/");
        assert!(u.https.is_none());
        let u = HttpUrl::parse("https://127.0.0.1/keys").unwrap();
        assert_eq!(u.addr.port(), 443);
        assert_eq!(
            u.https,
            Some(ServerName::try_from("127.0.0.1".to_string()).unwrap())
        );
        let u = HttpUrl::parse("https://[::1]:8443/").unwrap();
        assert_eq!(
            (u.addr.port(), u.host.as_str(), u.https),
            (
                8443,
                "[::1]:8443",
                Some(ServerName::try_from("::1".to_string()).unwrap())
            )
        );
        assert!(HttpUrl::parse("ftp://x/").is_err());
        assert!(HttpUrl::parse("https://u@127.0.0.1/").is_err());
        assert!(HttpUrl::parse("http://u:p@127.0.0.1/").is_err());
    }

    #[test]
    fn endpoints_build_a_client_config_for_https_only() {
        let ep = Endpoint::load("https://127.0.0.1:8443/k", None, "jwks_url").unwrap();
        assert!(ep.tls.is_some(), "https verifies against the webpki roots");
        assert!(Endpoint::load("http://127.0.0.1/k", None, "url")
            .unwrap()
            .tls
            .is_none());
        let (k, r) = Endpoint::load("http://127.0.0.1/k", Some("ca.pem"), "url").unwrap_err();
        assert_eq!(
            (k.as_str(), r.as_str()),
            ("ca", "only used with an https:// url")
        );
        let (k, r) =
            Endpoint::load("https://127.0.0.1/k", Some("/nonexistent/ca.pem"), "url").unwrap_err();
        assert_eq!(k, "ca");
        assert!(
            r.contains("/nonexistent/ca.pem") && r.contains("cannot read"),
            "{r}"
        );
        let (k, _) = Endpoint::load("https://", None, "url").unwrap_err();
        assert_eq!(k, "url");
    }
}
