//! The heads ringway writes: the request head sent upstream and the response head sent to the
//! client. Header bytes are copied here, once, from the received head's buffer.
//!
//! Upstream: hop-by-hop headers (Connection and the headers it lists, Keep-Alive,
//! Proxy-Connection, TE, Trailer, Upgrade, Transfer-Encoding) and Expect are dropped, the body
//! is re-framed, `X-Forwarded-For` gets the client appended, `X-Forwarded-Proto`/`-Host` are set
//! to what this hop saw, `Via` and `X-Request-Id` are added, then the route's header rules.
//! Client: the same hop-by-hop rules, the upstream's `X-Request-Id` replaced by ours, `Via`
//! added, the route's response rules, then framing and `Connection`.

use bytes::{BufMut, BytesMut};

use crate::http::encode::{put_header, put_status_line, put_u64};
use crate::http::request::{BodyKind, Method, RequestHead};
use crate::http::response::{RespBody, ResponseHead};
use crate::http::{ConnectionOptions, Version};
use crate::router::{HeaderRules, HostPolicy, Route};

/// What this hop adds to the heads it forwards.
pub struct Forwarding<'a> {
    /// The client's address as text, for `X-Forwarded-For`.
    pub peer_ip: &'a [u8],
    pub request_id: &'a [u8],
    /// "1.1 ringway".
    pub via: &'a [u8],
    /// The client connection is TLS: `X-Forwarded-Proto: https`.
    pub https: bool,
    /// mTLS: the subject header's name and the verified client certificate's subject.
    pub client_cert: Option<(&'a [u8], &'a [u8])>,
    /// Identity header lines the auth stage adds upstream (forwarded claims, consumer), or
    /// nothing.
    pub identity: &'a [u8],
}

/// Header names with a rule of their own, recognised by length first so most names cost one
/// comparison.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hdr {
    Hop,
    Host,
    ContentLength,
    Expect,
    Xff,
    Xfp,
    Xfh,
    RequestId,
    Other,
}

#[inline]
fn classify(name: &[u8]) -> Hdr {
    let eq = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if eq(b"te") => Hdr::Hop,
        4 if eq(b"host") => Hdr::Host,
        6 if eq(b"expect") => Hdr::Expect,
        7 if eq(b"trailer") || eq(b"upgrade") => Hdr::Hop,
        10 if eq(b"connection") || eq(b"keep-alive") => Hdr::Hop,
        12 if eq(b"x-request-id") => Hdr::RequestId,
        14 if eq(b"content-length") => Hdr::ContentLength,
        15 if eq(b"x-forwarded-for") => Hdr::Xff,
        16 if eq(b"proxy-connection") => Hdr::Hop,
        16 if eq(b"x-forwarded-host") => Hdr::Xfh,
        17 if eq(b"transfer-encoding") => Hdr::Hop,
        17 if eq(b"x-forwarded-proto") => Hdr::Xfp,
        _ => Hdr::Other,
    }
}

/// The `Connection` value a response needs: `close` when the connection ends after it,
/// `keep-alive` for an HTTP/1.0 client that keeps it, nothing otherwise.
#[inline]
pub fn connection_value(keep: bool, version: Version) -> Option<&'static [u8]> {
    if !keep {
        Some(b"close")
    } else if version == Version::Http10 {
        Some(b"keep-alive")
    } else {
        None
    }
}

/// Writes the request head sent upstream (into a cleared `out`).
pub fn encode_upstream_head(
    out: &mut BytesMut,
    req: &RequestHead,
    route: &Route,
    authority: &[u8],
    f: &Forwarding<'_>,
) {
    out.clear();
    out.put_slice(req.method_str());
    out.put_u8(b' ');
    let pq = req.bytes(req.path_query);
    if pq == b"*" {
        out.put_u8(b'*');
    } else {
        route.write_target(pq, out);
    }
    out.put_slice(b" HTTP/1.1\r\n");
    let rules = &route.request_headers;
    let mut xff_seen = false;
    let conn = ConnectionOptions::collect(&req.raw, &req.headers, req.connection_options);
    for h in &req.headers {
        let name = req.bytes(h.name);
        match classify(name) {
            Hdr::Other => {}
            Hdr::Xff => {
                xff_seen = true;
                continue;
            }
            _ => continue,
        }
        if rules.drops(name) || conn.lists(name) {
            continue;
        }
        put_header(out, name, req.bytes(h.value));
    }
    if !rules.drops(b"x-forwarded-for") {
        // Earlier hops first, then the client this hop saw.
        out.put_slice(b"x-forwarded-for: ");
        if xff_seen {
            for h in &req.headers {
                if classify(req.bytes(h.name)) == Hdr::Xff {
                    out.put_slice(req.bytes(h.value));
                    out.put_slice(b", ");
                }
            }
        }
        out.put_slice(f.peer_ip);
        out.put_slice(b"\r\n");
    }
    match (&route.host, req.host_bytes()) {
        (HostPolicy::Set(h), _) => put_header(out, b"host", h),
        (HostPolicy::Preserve, Some(h)) => put_header(out, b"host", h),
        _ => put_header(out, b"host", authority),
    }
    if f.https {
        out.put_slice(b"x-forwarded-proto: https\r\n");
    } else {
        out.put_slice(b"x-forwarded-proto: http\r\n");
    }
    if let Some(h) = req.host_bytes() {
        put_header(out, b"x-forwarded-host", h);
    }
    put_header(out, b"via", f.via);
    put_header(out, b"x-request-id", f.request_id);
    if let Some((name, subject)) = f.client_cert {
        put_header(out, name, subject);
    }
    out.put_slice(f.identity);
    rules.put(out);
    match req.body {
        BodyKind::None => {
            if matches!(req.method, Method::Post | Method::Put | Method::Patch) {
                out.put_slice(b"content-length: 0\r\n");
            }
        }
        BodyKind::Length(n) => {
            out.put_slice(b"content-length: ");
            put_u64(out, n);
            out.put_slice(b"\r\n");
        }
        BodyKind::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.put_slice(b"\r\n");
}

/// Writes the response head sent to the client (into a cleared `out`). `extra`: header lines
/// the gateway adds (RateLimit); `chunked`: the body goes out chunked; `connection`: the
/// Connection value, if any.
pub fn encode_client_head(
    out: &mut BytesMut,
    resp: &ResponseHead,
    rules: &HeaderRules,
    f: &Forwarding<'_>,
    extra: &[u8],
    chunked: bool,
    connection: Option<&[u8]>,
) {
    out.clear();
    put_status_line(out, resp.status, resp.bytes(resp.reason));
    let conn = ConnectionOptions::collect(&resp.raw, &resp.headers, resp.connection_options);
    let keep_length = matches!(resp.body, RespBody::Length(_) | RespBody::None);
    for h in &resp.headers {
        let name = resp.bytes(h.name);
        match classify(name) {
            Hdr::Other | Hdr::Host | Hdr::Expect | Hdr::Xff | Hdr::Xfp | Hdr::Xfh => {}
            Hdr::ContentLength if keep_length => {}
            _ => continue,
        }
        if rules.drops(name) || conn.lists(name) {
            continue;
        }
        put_header(out, name, resp.bytes(h.value));
    }
    put_header(out, b"via", f.via);
    put_header(out, b"x-request-id", f.request_id);
    rules.put(out);
    out.put_slice(extra);
    if chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    if let Some(v) = connection {
        put_header(out, b"connection", v);
    }
    out.put_slice(b"\r\n");
}
