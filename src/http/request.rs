//! Request heads: parsing, validation of framing (RFC 9112 §6) and the limits that guard them.

use std::mem::MaybeUninit;

use bytes::Bytes;

use super::{
    list_items, parse_content_length, trim_ows, valid_authority, ConnectionFlags, HeaderSpan, Span,
    Version,
};

/// Default cap on the bytes of a request head (request line + headers + blank line).
pub const DEFAULT_MAX_HEAD_BYTES: usize = 16 * 1024;
/// Default cap on the number of request header lines.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Hard cap on `max_headers`: the header array lives on the stack while parsing.
pub const MAX_HEADERS_CAP: usize = 256;
/// Default cap on the request-target length.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// Default cap on a request body.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;

/// Limits applied while reading a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    /// Accept `TRACE` (a listener's `allow_trace`). Off by default, as in nginx: TRACE echoes
    /// the request head, credentials included, and ringway does not answer it itself.
    pub allow_trace: bool,
    /// Keep header lines whose name holds `_` (a listener's `allow_underscores_in_headers`).
    /// Off by default, as in nginx: CGI/WSGI/PHP-style upstreams read `X_User_Id` and
    /// `X-User-Id` as one variable, so such a line would slip past the gateway's strip of
    /// identity headers. Dropped lines still count towards `max_headers` and `max_head_bytes`.
    pub allow_underscores_in_headers: bool,
    /// The listener speaks TLS: the target URI of an origin-form request has the scheme
    /// `https` (RFC 9112 §3.3), so its default port is 443 ([`RequestHead::https`]).
    pub tls: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_uri_bytes: DEFAULT_MAX_URI_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            allow_trace: false,
            allow_underscores_in_headers: false,
            tls: false,
        }
    }
}

/// The methods named in the `Allow` header of a 405 (RFC 9110 §15.5.6): what ringway forwards.
/// Other extension methods are forwarded too; TRACE and CONNECT are not.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";

/// Why a request head was refused. Each maps to one status (see [`ParseError::status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Malformed syntax or ambiguous framing: 400.
    Bad(&'static str),
    /// Request-target longer than `max_uri_bytes`: 414.
    UriTooLong,
    /// Head larger than `max_head_bytes` or more than `max_headers` lines: 431.
    HeadTooLarge,
    /// A transfer coding or method ringway does not implement: 501.
    NotImplemented(&'static str),
    /// An `Expect` other than `100-continue`: 417.
    Expectation,
    /// A well-formed HTTP-version whose major version is not 1: 505.
    Version,
    /// TRACE on a listener that does not allow it: 405, with [`ALLOWED_METHODS`] in `Allow`.
    MethodNotAllowed,
}

impl ParseError {
    pub fn status(&self) -> u16 {
        match self {
            ParseError::Bad(_) => 400,
            ParseError::UriTooLong => 414,
            ParseError::HeadTooLarge => 431,
            ParseError::NotImplemented(_) => 501,
            ParseError::Expectation => 417,
            ParseError::Version => 505,
            ParseError::MethodNotAllowed => 405,
        }
    }

    /// The `Allow` header value that must come with this error (RFC 9110 §15.5.6).
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            ParseError::MethodNotAllowed => Some(ALLOWED_METHODS),
            _ => None,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::Bad(r) => r,
            ParseError::UriTooLong => "request-target too long",
            ParseError::HeadTooLarge => "request head too large",
            ParseError::NotImplemented(r) => r,
            ParseError::Expectation => "unsupported expectation",
            ParseError::Version => "HTTP version not supported",
            ParseError::MethodNotAllowed => "TRACE is not allowed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Patch,
    Trace,
    Connect,
    Other,
}

impl Method {
    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"PATCH" => Method::Patch,
            b"TRACE" => Method::Trace,
            b"CONNECT" => Method::Connect,
            _ => Method::Other,
        }
    }

    /// Idempotent methods (RFC 9110 §9.2.2): safe to send twice.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }
}

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head. Reused across the requests of a connection (its header vector keeps
/// its capacity).
#[derive(Debug)]
pub struct RequestHead {
    /// The head's bytes, up to and including the blank line.
    pub raw: Bytes,
    pub method: Method,
    pub method_span: Span,
    /// The request-target as received.
    pub target: Span,
    /// Path (no query) of the target; for absolute-form, the path part of the URI.
    pub path: Span,
    /// Path and query to forward (origin-form), or the whole target for `*`.
    pub path_query: Span,
    pub version: Version,
    pub headers: Vec<HeaderSpan>,
    /// Authority: from an absolute-form target, else the Host header.
    pub host: Option<Span>,
    /// The target URI's scheme is `https`: an absolute-form target's own scheme, else the
    /// listener's (`Limits::tls`, RFC 9112 §3.3). It says which port is the default one
    /// (443, else 80), the same origin as no port (RFC 9110 §4.2.3).
    pub https: bool,
    pub body: BodyKind,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// The head has a Connection header listing other than close/keep-alive.
    pub connection_options: bool,
    /// A kept field name holds `_` (only on a listener with `allow_underscores_in_headers`):
    /// the identity headers' other spellings are then looked for (`HeaderRules::identity`).
    pub underscore_names: bool,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            raw: Bytes::new(),
            method: Method::Get,
            method_span: Span::default(),
            target: Span::default(),
            path: Span::default(),
            path_query: Span::default(),
            version: Version::Http11,
            // Empty: shells are pooled per worker and keep the capacity they grew to.
            headers: Vec::new(),
            host: None,
            https: false,
            body: BodyKind::None,
            keep_alive: true,
            expect_continue: false,
            connection_options: false,
            underscore_names: false,
        }
    }
}

impl RequestHead {
    #[inline]
    pub fn bytes(&self, s: Span) -> &[u8] {
        s.get(&self.raw)
    }

    pub fn method_str(&self) -> &[u8] {
        self.bytes(self.method_span)
    }

    /// The path to route on; an empty absolute-form path reads as "/".
    pub fn path_bytes(&self) -> &[u8] {
        if self.path.is_empty() {
            b"/"
        } else {
            self.bytes(self.path)
        }
    }

    /// The request-target is in absolute-form (`http://a.test/x`): it is the target URI, its
    /// scheme and authority included (RFC 9112 §3.2.2, §3.3).
    #[inline]
    pub fn is_absolute_form(&self) -> bool {
        !matches!(self.bytes(self.target).first(), Some(b'/' | b'*'))
    }

    pub fn host_bytes(&self) -> Option<&[u8]> {
        self.host.map(|h| self.bytes(h))
    }

    /// First value of a header (name compared case-insensitively).
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| self.bytes(h.name).eq_ignore_ascii_case(name))
            .map(|h| self.bytes(h.value))
    }

    pub fn header_values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| self.bytes(h.name).eq_ignore_ascii_case(name))
            .map(move |h| self.bytes(h.value))
    }
}

/// Looks for a complete request head at the start of `buf`.
///
/// Returns `Ok(Some(len))` with the head's length and fills `out` (whose `raw` is left for the
/// caller to set from `buf[..len]`), `Ok(None)` when more bytes are needed and the limits still
/// allow them, or the error to answer with.
///
/// Beyond httparse's syntax checks: Host is validated (RFC 9112 §3.2), a malformed
/// HTTP-version is a 400 and `HTTP/1.x` with x > 1 is read as HTTP/1.1 (RFC 9110 §2.5), TRACE is
/// refused unless `limits.allow_trace`, and header lines whose name holds `_` are dropped
/// unless `limits.allow_underscores_in_headers`.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
    out: &mut RequestHead,
) -> Result<Option<usize>, ParseError> {
    match parse_head(buf, limits, out)? {
        Parsed::Done(len) => Ok(Some(len)),
        Parsed::Partial => Ok(None),
        Parsed::MinorVersion(at) => {
            // httparse knows only HTTP/1.0 and HTTP/1.1. A higher minor version of HTTP/1 is
            // served as HTTP/1.1 (RFC 9110 §2.5): parse a copy with the minor digit patched.
            // Spans are offsets and the copy has the same length, so they stay valid for
            // `buf`. Rare, so the copy's allocation does not matter; only the bytes a head may
            // occupy are copied.
            let keep = buf.len().min(limits.max_head_bytes.saturating_add(1));
            let mut copy = buf[..keep].to_vec();
            // `at` is the version's offset, inside the request line that the head limit
            // already bounded (see `classify_version`), so the digit is inside the copy.
            match copy.get_mut(at + 7) {
                Some(minor) => *minor = b'1',
                None => return Err(ParseError::Bad("malformed HTTP-version")),
            }
            match parse_head(&copy, limits, out)? {
                Parsed::Done(len) => Ok(Some(len)),
                Parsed::Partial => Ok(None),
                // The patched line holds HTTP/1.1: httparse cannot object to it again.
                Parsed::MinorVersion(_) => Err(ParseError::Bad("malformed HTTP-version")),
            }
        }
    }
}

enum Parsed {
    Done(usize),
    Partial,
    /// A complete request line ends in `HTTP/1.x` with x > 1, at this offset of the buffer.
    MinorVersion(usize),
}

fn parse_head(buf: &[u8], limits: &Limits, out: &mut RequestHead) -> Result<Parsed, ParseError> {
    // Only the bytes a head may occupy (and one more, to see it is too long) are looked at,
    // so that the answer is the same however the client's bytes were split into reads.
    let buf = &buf[..buf.len().min(limits.max_head_bytes.saturating_add(1))];
    let max_headers = limits.max_headers.min(MAX_HEADERS_CAP);
    let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS_CAP] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut []);
    let status = req.parse_with_uninit_headers(buf, &mut storage[..max_headers]);
    let len = match status {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return partial(buf, limits),
        Err(httparse::Error::Version) => return classify_version(buf, limits),
        Err(e) => return Err(map_httparse(e)),
    };
    if len > limits.max_head_bytes {
        return Err(oversize(buf, limits));
    }
    let target = req.path.unwrap_or("");
    if target.len() > limits.max_uri_bytes {
        return Err(ParseError::UriTooLong);
    }
    let method = req.method.unwrap_or("");
    out.method = Method::from_bytes(method.as_bytes());
    out.method_span = Span::of(buf, method.as_bytes());
    out.target = Span::of(buf, target.as_bytes());
    out.version = if req.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    out.headers.clear();
    out.host = None;
    out.https = limits.tls;
    out.body = BodyKind::None;
    out.expect_continue = false;
    out.connection_options = false;
    out.underscore_names = false;

    let mut content_length: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_chunked_count = 0u32;
    let mut te_other = false;
    let mut host_count = 0u32;
    let mut conn = ConnectionFlags::default();

    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        // Dropped, not refused (nginx's `underscores_in_headers off`): the line is neither
        // forwarded nor read for framing, routing or identity.
        if memchr::memchr(b'_', name).is_some() {
            if !limits.allow_underscores_in_headers {
                continue;
            }
            // Kept, a `Content_Length` or `Transfer_Encoding` would reach a next hop that may
            // read `_` as `-` (CGI-style servers do) and frame by it, while this hop does not:
            // the two would split the bytes differently (RFC 9112 §6.3 item 3, §11.2).
            if super::is_framing_name_with_underscore(name) {
                return Err(ParseError::Bad(
                    "Content-Length or Transfer-Encoding spelled with an underscore",
                ));
            }
            out.underscore_names = true;
        }
        // httparse already refuses CR, LF and other controls (but HTAB) in values: the
        // malformed table below pins that down.
        out.headers.push(HeaderSpan {
            name: Span::of(buf, name),
            value: Span::of(buf, value),
        });
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value).ok_or(ParseError::Bad("invalid Content-Length"))?;
            match content_length {
                Some(prev) if prev != n => {
                    return Err(ParseError::Bad("conflicting Content-Length values"))
                }
                _ => content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_seen = true;
            let mut any = false;
            for coding in list_items(value) {
                any = true;
                // Codings may carry parameters ("gzip;q=1"); the name is what counts.
                let coding = trim_ows(coding.split(|b| *b == b';').next().unwrap_or(b""));
                if coding.eq_ignore_ascii_case(b"chunked") {
                    te_chunked_count += 1;
                    te_chunked_last = true;
                } else {
                    if te_chunked_count > 0 {
                        return Err(ParseError::Bad("chunked is not the final transfer coding"));
                    }
                    te_other = true;
                    te_chunked_last = false;
                }
            }
            if !any {
                return Err(ParseError::Bad("empty Transfer-Encoding"));
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            host_count += 1;
            // RFC 9112 §3.2: an invalid Host value is a 400, whatever the version.
            let v = trim_ows(value);
            if !valid_authority(v) {
                return Err(ParseError::Bad("invalid Host header"));
            }
            out.host = Some(Span::of(buf, v));
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn.add(value);
        } else if name.eq_ignore_ascii_case(b"expect") {
            if trim_ows(value).eq_ignore_ascii_case(b"100-continue") {
                // An HTTP/1.0 client's is ignored (RFC 9110 §10.1.1): it gets no 1xx (§15.2).
                out.expect_continue = out.version == Version::Http11;
            } else {
                return Err(ParseError::Expectation);
            }
        }
    }

    if host_count > 1 {
        return Err(ParseError::Bad("more than one Host header"));
    }
    if out.version == Version::Http11 && host_count == 0 {
        return Err(ParseError::Bad("missing Host header"));
    }

    if te_seen {
        if out.version == Version::Http10 {
            return Err(ParseError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if content_length.is_some() {
            return Err(ParseError::Bad("both Content-Length and Transfer-Encoding"));
        }
        if !te_chunked_last {
            return Err(ParseError::Bad("chunked is not the final transfer coding"));
        }
        if te_chunked_count > 1 {
            return Err(ParseError::Bad("chunked applied more than once"));
        }
        if te_other {
            return Err(ParseError::NotImplemented("unsupported transfer coding"));
        }
        out.body = BodyKind::Chunked;
    } else if let Some(n) = content_length {
        out.body = if n == 0 {
            BodyKind::None
        } else {
            BodyKind::Length(n)
        };
    }

    out.keep_alive = conn.persistent(out.version);
    out.connection_options = conn.other;

    // Request-target forms (RFC 9112 §3.2).
    let tb = target.as_bytes();
    // A fragment is never sent (RFC 9112 §3.2, RFC 9110 §7.1): an upstream that reads
    // `/internal#x` as `/internal` would serve what a route on that path guards. Looked for
    // in the path by the scan that finds its end, in a query by one more.
    let path_end = |pq: &[u8]| -> Result<usize, ParseError> {
        let end = pq
            .iter()
            .position(|b| matches!(b, b'?' | b'#'))
            .unwrap_or(pq.len());
        let query = pq.get(end..).unwrap_or_default();
        if query.first() == Some(&b'#')
            || (query.len() > 1 && memchr::memchr(b'#', query).is_some())
        {
            return Err(ParseError::Bad("fragment (#) in the request-target"));
        }
        Ok(end)
    };
    match out.method {
        Method::Connect => return Err(ParseError::NotImplemented("CONNECT is not supported")),
        _ if tb == b"*" => {
            if out.method != Method::Options {
                return Err(ParseError::Bad("asterisk-form is only for OPTIONS"));
            }
            out.path = out.target;
            out.path_query = out.target;
        }
        _ if tb.first() == Some(&b'/') => {
            let path_end = path_end(tb)?;
            out.path = Span::of(buf, &tb[..path_end]);
            out.path_query = out.target;
        }
        _ => {
            let rest = strip_scheme(tb).ok_or(ParseError::Bad("invalid request-target"))?;
            let auth_end = rest
                .iter()
                .position(|b| matches!(b, b'/' | b'?'))
                .unwrap_or(rest.len());
            let authority = &rest[..auth_end];
            // The target's authority replaces Host (RFC 9112 §3.2.2), which must still have
            // been valid (checked above).
            if !valid_authority(authority) {
                return Err(ParseError::Bad("invalid authority in request-target"));
            }
            out.host = Some(Span::of(buf, authority));
            // `https://` is 8 bytes, `http://` 7.
            out.https = tb.len() - rest.len() == 8;
            let pq = &rest[auth_end..];
            let path_end = path_end(pq)?;
            // "http://h" and "http://h?q" have an empty path here; it means "/"
            // (RFC 9112 §3.2.2): `path_bytes` and the encoder supply the slash.
            out.path = Span::of(buf, &pq[..path_end]);
            out.path_query = Span::of(buf, pq);
        }
    }
    if let Some(why) = ambiguous_path(out.path.get(buf)) {
        return Err(ParseError::Bad(why));
    }
    // RFC 9110 §9.3.8: TRACE reflects the head (cookies, credentials) back to the client;
    // refused unless the listener allows it.
    if out.method == Method::Trace && !limits.allow_trace {
        return Err(ParseError::MethodNotAllowed);
    }
    Ok(Parsed::Done(len))
}

/// httparse needs more bytes: fine while the limits allow them. (No earlier verdict on a long
/// request line: it could differ from the one the complete head gets.)
fn partial(buf: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    if buf.len() > limits.max_head_bytes {
        return Err(oversize(buf, limits));
    }
    Ok(Parsed::Partial)
}

/// httparse refused the HTTP-version (it knows only `HTTP/1.0` and `HTTP/1.1`). Once the
/// request line is complete, RFC 9112 §2.3 decides: it must be `method SP target SP
/// HTTP-version` with `HTTP-version = "HTTP/" DIGIT "." DIGIT`, else 400 (a space inside the
/// target, trailing junk, `HTTP/1`, `HTTP/01.01`). `HTTP/1.x` is served as HTTP/1.1; another
/// major version is a 505.
fn classify_version(buf: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    // httparse skips empty lines before the request line (RFC 9112 §2.2).
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    let Some(lf) = memchr::memchr(b'\n', &buf[start..]) else {
        // The version may still be followed by more of the line: wait for its end.
        return partial(buf, limits);
    };
    let line_end = start + lf;
    if line_end > limits.max_head_bytes {
        return Err(oversize(buf, limits));
    }
    let line = &buf[start..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // httparse read the method and the target up to their single spaces; the rest is the
    // version, and nothing else.
    let mut spaces = memchr::memchr_iter(b' ', line);
    let (Some(_), Some(sp2)) = (spaces.next(), spaces.next()) else {
        return Err(ParseError::Bad("malformed request line"));
    };
    let version = &line[sp2 + 1..];
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            if *major != b'1' {
                Err(ParseError::Version)
            } else if *minor >= b'2' {
                Ok(Parsed::MinorVersion(start + sp2 + 1))
            } else {
                Err(ParseError::Bad("malformed request line"))
            }
        }
        _ if memchr::memchr(b' ', version).is_some() => Err(ParseError::Bad(
            "malformed request line (space in the target?)",
        )),
        _ => Err(ParseError::Bad("malformed HTTP-version")),
    }
}

/// Paths that name the same resource as another spelling would let a request reach a route
/// other than the one its upstream serves (an auth bypass: `/public/../admin`,
/// `/%61dmin`, `/public\..\admin`). Routes match raw bytes, so such paths are refused
/// rather than normalised: dot segments, percent-encoded unreserved characters (RFC 3986
/// §2.3, which no client needs to encode), and backslashes (not a URI character, RFC 3986
/// §2; WHATWG URL parsers, Node's among them, read `\` as `/`). `%2F` is left alone: it is
/// data in some APIs.
///
/// An encoded NUL (`%00`) is refused too: a back end that decodes it into a C string cuts the
/// path there (RFC 3986 §7.3). So is an encoded backslash (`%5C`, `%5c`): back ends that
/// decode the path before they split it (IIS among them) read it as `/`.
///
/// A dot segment followed by `;` parameters (`/x/..;/admin`) counts as one: servlet
/// containers (Tomcat, Jetty, Spring) drop each segment's parameters before they remove dot
/// segments (the path parameters of RFC 2396 §3.3), so they read it as `..`.
pub fn ambiguous_path(path: &[u8]) -> Option<&'static str> {
    // Most paths have none of these bytes: one vectorised scan and done.
    for i in memchr::memchr3_iter(b'.', b'%', b'\\', path) {
        if path[i] == b'\\' {
            return Some("backslash in the path");
        }
        if path[i] == b'.' {
            let starts_segment = i == 0 || path[i - 1] == b'/';
            let rest = &path[i + 1..];
            let rest = rest.strip_prefix(b".").unwrap_or(rest);
            if starts_segment && (rest.is_empty() || rest[0] == b'/' || rest[0] == b';') {
                return Some("dot segments in the path");
            }
        } else {
            let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
            if let (Some(h), Some(l)) = (hex(path.get(i + 1)), hex(path.get(i + 2))) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    return Some("percent-encoded unreserved character in the path");
                }
                // RFC 3986 §7.3: a back end that decodes `%00` into a C string ends the path
                // there (`/admin%00.png` is `/admin` to it, a `.png` route to the gateway).
                if c == 0 {
                    return Some("percent-encoded NUL in the path");
                }
                // An encoded backslash is refused like a raw one: IIS, ASP.NET and other back
                // ends decode `%5C` and read it as `/`, so `/public%5C..%5Cadmin` would be
                // `/admin` to them and an open `/public` route's request to the gateway.
                if c == b'\\' {
                    return Some("percent-encoded backslash in the path");
                }
            }
        }
    }
    None
}

fn strip_scheme(t: &[u8]) -> Option<&[u8]> {
    if t.len() > 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        Some(&t[7..])
    } else if t.len() > 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        Some(&t[8..])
    } else {
        None
    }
}

/// The head outgrew `max_head_bytes`: 414 when its request-target (as far as the first
/// `max_head_bytes + 1` bytes show it) is over `max_uri_bytes`, 431 otherwise.
fn oversize(buf: &[u8], limits: &Limits) -> ParseError {
    let view = &buf[..buf.len().min(limits.max_head_bytes.saturating_add(1))];
    let start = view
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(view.len());
    let line = &view[start..];
    let target_len = match memchr::memchr(b' ', line) {
        Some(sp) => line[sp + 1..]
            .iter()
            .position(|b| matches!(b, b' ' | b'\r' | b'\n'))
            .unwrap_or(line.len() - sp - 1),
        None => 0,
    };
    if target_len > limits.max_uri_bytes {
        ParseError::UriTooLong
    } else {
        ParseError::HeadTooLarge
    }
}

fn map_httparse(e: httparse::Error) -> ParseError {
    match e {
        httparse::Error::TooManyHeaders => ParseError::HeadTooLarge,
        // Handled by `classify_version` before this is called.
        httparse::Error::Version => ParseError::Bad("malformed HTTP-version"),
        httparse::Error::HeaderName => {
            ParseError::Bad("invalid header name (whitespace before colon or obs-fold?)")
        }
        httparse::Error::HeaderValue => ParseError::Bad("invalid header value"),
        httparse::Error::NewLine => ParseError::Bad("invalid line ending"),
        httparse::Error::Token | httparse::Error::Status => {
            ParseError::Bad("malformed request line")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ambiguous_paths_are_refused() {
        use super::ambiguous_path as a;
        for ok in [
            &b"/"[..],
            b"/a/b",
            b"/a.b/c..d/.e/f.",
            b"/a;x/b;..",
            b"/a%100",
            b"/a%0a%01",
            b"/a%2Fb",
            b"/a%20b",
            b"/%",
            b"/%zz",
            b"",
            b"*",
        ] {
            assert_eq!(a(ok), None, "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"/."[..],
            b"/..",
            b"/a/../admin",
            b"/a/./b",
            b"/a/..",
            b"/%61dmin",
            b"/a%2e%2e/b",
            b"/%7Euser",
            b"/x%2D",
            b"/public\\..\\admin",
            b"/a\\b",
            b"/x/..;/admin",
            b"/..;",
            b"/a/.;x/b",
            b"/admin%00.png",
            b"/%00",
            b"/public%5C..%5Cadmin",
            b"/a%5cb",
            b"/%5C",
        ] {
            assert!(a(bad).is_some(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// RFC 9112 §3.2: no fragment in a request-target (an upstream that drops it from
    /// `/internal#x` serves `/internal`), in the path or the query, in any form.
    #[test]
    fn a_fragment_in_the_request_target_is_refused() {
        for raw in [
            &b"GET /internal#x HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET /a?b#c HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a/internal#x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a#x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a?# HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /# HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x\\..\\internal HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(ParseError::Bad(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // A backslash in the query is data (only the path is matched by routes).
        assert!(parse(b"GET /a?b=\\ HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
    }

    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<(usize, RequestHead)>, ParseError> {
        let mut head = RequestHead::default();
        let r = parse_request(raw, &Limits::default(), &mut head)?;
        Ok(r.map(|n| {
            head.raw = Bytes::copy_from_slice(raw);
            (n, head)
        }))
    }

    fn ok(raw: &[u8]) -> RequestHead {
        parse(raw).expect("valid").expect("complete").1
    }

    fn err(raw: &[u8]) -> u16 {
        match parse(raw) {
            Err(e) => e.status(),
            Ok(r) => panic!(
                "expected an error for {:?}, got {:?}",
                String::from_utf8_lossy(raw),
                r.map(|x| x.0)
            ),
        }
    }

    #[test]
    fn simple_get() {
        let h = ok(b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.path_bytes(), b"/a/b");
        assert_eq!(h.bytes(h.path_query), b"/a/b?x=1");
        assert_eq!(h.host_bytes(), Some(&b"example.com"[..]));
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
    }

    #[test]
    fn http10_keep_alive_rules() {
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn framing() {
        let h = ok(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = ok(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(h.body, BodyKind::Length(5));
        let h = ok(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        let h = ok(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.body, BodyKind::None);
    }

    #[test]
    fn absolute_form() {
        let h = ok(b"GET http://example.com:8080/x?y HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.host_bytes(), Some(&b"example.com:8080"[..]));
        assert_eq!(h.path_bytes(), b"/x");
        assert_eq!(h.bytes(h.path_query), b"/x?y");
        let h = ok(b"GET http://example.com HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.path_bytes(), b"/");
        assert_eq!(h.bytes(h.path_query), b"");
    }

    #[test]
    fn expect_continue() {
        let h =
            ok(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        // RFC 9110 §10.1.1: ignored in an HTTP/1.0 request (it may not get a 1xx, §15.2).
        let h = ok(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(!h.expect_continue);
    }

    /// Table of malformed heads and the status each must get.
    #[test]
    fn malformed_table() {
        let big_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        let many_headers = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            (0..120)
                .map(|i| format!("X-H{i}: v\r\n"))
                .collect::<String>()
        );
        let big_header = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "v".repeat(17000)
        );
        let cases: Vec<(&[u8], u16)> = vec![
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n", 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Space : a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Bare: a\rb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\x00b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Ctl: a\x01b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-Lf: a\nb\r\n\r\n", 400),
            (b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / FOO/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET\r\n\r\n", 400),
            (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n", 417),
            (b"GET http://u@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (big_uri.as_bytes(), 414),
            (many_headers.as_bytes(), 431),
            (big_header.as_bytes(), 431),
        ];
        for (raw, status) in cases {
            assert_eq!(err(raw), status, "for {:?}", String::from_utf8_lossy(raw));
        }
    }

    fn parse_with(raw: &[u8], limits: &Limits) -> Result<Option<RequestHead>, ParseError> {
        let mut head = RequestHead::default();
        let r = parse_request(raw, limits, &mut head)?;
        Ok(r.map(|_| {
            head.raw = Bytes::copy_from_slice(raw);
            head
        }))
    }

    /// RFC 9112 §3.2: a missing (HTTP/1.1), repeated or invalid Host is a 400.
    #[test]
    fn host_table() {
        let bad: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:   \r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a?b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a#b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:http\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a:70000\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: [::z]\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \"a\"\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\xff\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a/b\r\n\r\n",
            // Absolute form: the authority is checked, and so is the Host line.
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nHost: x/y\r\n\r\n",
            b"GET http://a b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a,b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://[::1/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for raw in bad {
            assert_eq!(err(raw), 400, "{:?}", String::from_utf8_lossy(raw));
        }
        let h = ok(b"GET / HTTP/1.1\r\nHost:  api.example.com:8443 \r\n\r\n");
        assert_eq!(h.host_bytes(), Some(&b"api.example.com:8443"[..]));
        let h = ok(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n");
        assert_eq!(h.host_bytes(), Some(&b"[::1]:80"[..]));
        let h = ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(h.host_bytes(), None);
        let h = ok(b"GET http://[2001:db8::1]:8080/p HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(h.host_bytes(), Some(&b"[2001:db8::1]:8080"[..]));
        assert_eq!(h.path_bytes(), b"/p");
    }

    /// RFC 9112 §2.3 and RFC 9110 §2.5: malformed versions are 400, other majors 505,
    /// HTTP/1.x (x > 1) is served as HTTP/1.1.
    #[test]
    fn version_table() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/01.01\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.2 \r\nHost: a\r\n\r\n", 400),
            (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET /a HTTP/1.1 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.a\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/x.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/2\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            // A higher minor version is still HTTP/1.1: Host is required.
            (b"GET / HTTP/1.2\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            assert_eq!(err(raw), *status, "{:?}", String::from_utf8_lossy(raw));
        }
        for v in [&b"1.2"[..], b"1.9"] {
            let mut raw = b"\r\nPOST /p?q HTTP/".to_vec();
            raw.extend_from_slice(v);
            raw.extend_from_slice(b"\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc");
            let (n, h) = parse(&raw).unwrap().unwrap();
            assert_eq!(n, raw.len() - 3);
            assert_eq!(h.version, Version::Http11);
            assert_eq!(h.bytes(h.path_query), b"/p?q");
            assert_eq!(h.host_bytes(), Some(&b"h"[..]));
            assert_eq!(h.body, BodyKind::Length(3));
            assert!(h.keep_alive);
        }
        // Every prefix of an HTTP/1.2 head waits for more.
        let raw: &[u8] = b"GET /x HTTP/1.2\r\nHost: h\r\n\r\n";
        for i in 0..raw.len() {
            assert_eq!(parse(&raw[..i]).map(|r| r.map(|x| x.0)), Ok(None), "{i}");
        }
        // The head limit still applies to the patched copy.
        let limits = Limits {
            max_head_bytes: 40,
            ..Limits::default()
        };
        let big = format!("GET / HTTP/1.2\r\nHost: h\r\nX: {}\r\n\r\n", "v".repeat(40));
        assert_eq!(
            parse_with(big.as_bytes(), &limits).err(),
            Some(ParseError::HeadTooLarge)
        );
        assert_eq!(
            parse_with(&big.as_bytes()[..45], &limits).err(),
            Some(ParseError::HeadTooLarge)
        );
    }

    #[test]
    fn trace_is_refused_unless_allowed() {
        let raw: &[u8] = b"TRACE / HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n";
        let e = parse(raw).expect_err("405");
        assert_eq!(e, ParseError::MethodNotAllowed);
        assert_eq!(e.status(), 405);
        assert_eq!(e.allow(), Some(ALLOWED_METHODS));
        assert_eq!(parse(&raw[..10]).map(|r| r.map(|x| x.0)), Ok(None));
        let limits = Limits {
            allow_trace: true,
            ..Limits::default()
        };
        let h = parse_with(raw, &limits).unwrap().unwrap();
        assert_eq!(h.method, Method::Trace);
        // Only TRACE: other methods, extension ones included, pass.
        ok(b"PROPFIND / HTTP/1.1\r\nHost: a\r\n\r\n");
        ok(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn underscore_headers_are_dropped_by_default() {
        let raw: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nX_Consumer: evil\r\nX-Real: 1\r\n_: x\r\nContent_Length: 5\r\nTransfer_Encoding: chunked\r\nHost_: b\r\n\r\n";
        let h = ok(raw);
        let names: Vec<&[u8]> = h.headers.iter().map(|x| h.bytes(x.name)).collect();
        assert_eq!(names, vec![&b"Host"[..], b"X-Real"]);
        assert_eq!(h.header(b"x_consumer"), None);
        assert_eq!(h.body, BodyKind::None);
        assert_eq!(h.host_bytes(), Some(&b"a"[..]));
        let limits = Limits {
            allow_underscores_in_headers: true,
            ..Limits::default()
        };
        let h = parse_with(
            b"GET / HTTP/1.1\r\nHost: a\r\nX_Consumer: c\r\n\r\n",
            &limits,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.header(b"X_Consumer"), Some(&b"c"[..]));
        // Kept, a framing name with `_` for `-` is refused: a next hop may frame by it.
        for line in [
            &b"Content_Length: 5"[..],
            b"content_length: 0",
            b"Transfer_Encoding: chunked",
            b"TRANSFER_ENCODING: gzip",
        ] {
            let raw = [&b"POST / HTTP/1.1\r\nHost: a\r\n"[..], line, b"\r\n\r\n"].concat();
            assert!(
                matches!(parse_with(&raw, &limits), Err(ParseError::Bad(_))),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        for line in [
            &b"Content_Length_: 5"[..],
            b"Transfer-Encoding_: x",
            b"X_Length: 1",
        ] {
            let raw = [&b"POST / HTTP/1.1\r\nHost: a\r\n"[..], line, b"\r\n\r\n"].concat();
            let h = parse_with(&raw, &limits).unwrap().unwrap();
            assert_eq!(h.body, BodyKind::None);
        }
        // Dropped lines still count towards the header limit.
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        assert_eq!(
            parse_with(
                b"GET / HTTP/1.1\r\nHost: a\r\nA_1: 1\r\nA_2: 2\r\nA_3: 3\r\n\r\n",
                &limits
            )
            .err(),
            Some(ParseError::HeadTooLarge)
        );
    }

    /// Every proper prefix of a valid head is incomplete, never an error or a wrong parse.
    #[test]
    fn every_prefix_is_partial() {
        let raw: &[u8] =
            b"POST /p?q=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\nX-A: b\r\n\r\n";
        for i in 0..raw.len() {
            assert_eq!(
                parse(&raw[..i]).map(|r| r.map(|x| x.0)),
                Ok(None),
                "prefix {i}"
            );
        }
        assert_eq!(parse(raw).unwrap().unwrap().0, raw.len());
    }

    /// A head split at every byte and fed in two reads parses identically.
    #[test]
    fn split_at_every_byte() {
        let raw: &[u8] = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\nEXTRA";
        let head_len = raw.len() - 5;
        for i in 0..raw.len() {
            let mut buf = raw[..i].to_vec();
            let mut head = RequestHead::default();
            let first = parse_request(&buf, &Limits::default(), &mut head).unwrap();
            if i < head_len {
                assert_eq!(first, None, "split at {i}");
            }
            buf.extend_from_slice(&raw[i..]);
            let r = parse_request(&buf, &Limits::default(), &mut head).unwrap();
            assert_eq!(r, Some(head_len));
            assert!(!head.keep_alive);
        }
    }
}
