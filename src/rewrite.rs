//! The heads ringway writes: the request head sent upstream and the response head sent to the
//! client. Header bytes are copied here, once, from the received head's buffer.
//!
//! Upstream: hop-by-hop headers (Connection and the headers it lists, Keep-Alive,
//! Proxy-Connection, TE, Trailer, Upgrade, Transfer-Encoding) and Expect are dropped, the body
//! is re-framed, the forwarding headers are written as below, `Via` and `X-Request-Id` are
//! added, then the route's header rules.
//! Client: the same hop-by-hop rules, the upstream's `X-Request-Id` replaced by ours, `Via`
//! added, the route's response rules, then framing and `Connection`.
//!
//! # Forwarding headers
//! `Forwarded` (RFC 7239), `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
//! `X-Forwarded-Port` and `X-Real-IP` describe the client to the upstream. Only a peer listed in
//! `[server] trusted_proxies` may speak for someone else (RFC 7239 §8.3 on trusting them), and
//! all six headers follow the same rule:
//! - **trusted peer**: the client's copies are kept. `X-Forwarded-For` and `Forwarded` are
//!   extended with this hop's element (the peer address), joined onto one line; the other four
//!   are passed on as sent, and written by ringway only when the peer sent none.
//! - **any other peer** (the default): every client copy is removed, and ringway writes its own:
//!   `X-Forwarded-For` and `X-Real-IP` = the peer, `X-Forwarded-Proto` = http or https,
//!   `X-Forwarded-Host` = Host, `X-Forwarded-Port` = the listener's port, and
//!   `Forwarded: for=...;proto=...;host=...` (an IPv6 node quoted and bracketed, RFC 7239 §6).
//!
//! A client copy listed in its `Connection` header is hop-by-hop (RFC 9110 §7.6.1) and never
//! kept. A route rule that removes or sets one of these headers wins over both.

use bytes::{BufMut, BytesMut};

use crate::http::encode::{put_header, put_status_line, put_u64, LineRuns};
use crate::http::request::{BodyKind, Method, RequestHead};
use crate::http::response::{LengthLine, RespBody, ResponseHead};
use crate::http::{ConnectionOptions, Version};
use crate::router::{HeaderRules, HostPolicy, Route};
use crate::trace::KeepState;

/// What this hop adds to the heads it forwards.
pub struct Forwarding<'a> {
    /// The client's address as text (IPv6 without brackets), for the forwarding headers.
    pub peer_ip: &'a [u8],
    /// The peer is one of `[server] trusted_proxies`: its forwarding headers are kept and
    /// extended rather than replaced.
    pub trusted: bool,
    /// The port of the listener the client connected to, for `X-Forwarded-Port` (none written
    /// when unknown).
    pub port: Option<u16>,
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
    /// W3C trace context: the `traceparent` value sent upstream in place of the client's
    /// (see `crate::trace`). `None`: the client's trace fields pass as they are.
    pub traceparent: Option<&'a [u8]>,
    /// With `traceparent`: what of the client's `tracestate` goes upstream (see
    /// `crate::trace::KeepState`).
    pub keep_tracestate: crate::trace::KeepState,
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
    Xfport,
    XRealIp,
    Forwarded,
    RequestId,
    MaxForwards,
    TraceParent,
    TraceState,
    /// `Date`: only a response's is looked at ([`encode_client_head`]); a request's goes as
    /// any other field.
    Date,
    Other,
}

impl Hdr {
    /// A header describing the client to the next hop (see the module doc), as a bit of
    /// `Seen`.
    #[inline]
    fn forwarding_bit(self) -> u8 {
        match self {
            Hdr::Xff => 1,
            Hdr::Xfp => 2,
            Hdr::Xfh => 4,
            Hdr::Xfport => 8,
            Hdr::XRealIp => 16,
            Hdr::Forwarded => 32,
            _ => 0,
        }
    }
}

#[inline]
fn classify(name: &[u8]) -> Hdr {
    let eq = |s: &[u8]| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if eq(b"te") => Hdr::Hop,
        4 if eq(b"host") => Hdr::Host,
        4 if eq(b"date") => Hdr::Date,
        6 if eq(b"expect") => Hdr::Expect,
        7 if eq(b"trailer") || eq(b"upgrade") => Hdr::Hop,
        9 if eq(b"forwarded") => Hdr::Forwarded,
        9 if eq(b"x-real-ip") => Hdr::XRealIp,
        10 if eq(b"connection") || eq(b"keep-alive") => Hdr::Hop,
        10 if eq(b"tracestate") => Hdr::TraceState,
        11 if eq(b"traceparent") => Hdr::TraceParent,
        12 if eq(b"x-request-id") => Hdr::RequestId,
        12 if eq(b"max-forwards") => Hdr::MaxForwards,
        14 if eq(b"content-length") => Hdr::ContentLength,
        15 if eq(b"x-forwarded-for") => Hdr::Xff,
        16 if eq(b"proxy-connection") => Hdr::Hop,
        16 if eq(b"x-forwarded-host") => Hdr::Xfh,
        16 if eq(b"x-forwarded-port") => Hdr::Xfport,
        17 if eq(b"transfer-encoding") => Hdr::Hop,
        17 if eq(b"x-forwarded-proto") => Hdr::Xfp,
        _ => Hdr::Other,
    }
}

/// How a request field named `name` goes upstream when it is not one a route's rules touch:
/// as the client sent it ([`SentAs::Client`]), never ([`SentAs::Dropped`]: hop-by-hop and
/// framing fields, `Expect`), or written by this hop from what it knows of the client
/// ([`SentAs::Hop`]: the forwarding fields, `Host`, the request id, `tracestate`; read the
/// value from [`encode_upstream_head`]'s output), or unique to the request
/// ([`SentAs::Unique`]: the trace parent naming this hop's new span). `Max-Forwards` goes as sent on the
/// methods this hop does not count it for, which are the only ones a cache looks up.
/// Fields the client's `Connection` lists are dropped too; that depends on the head, not the
/// name.
pub fn sent_as(name: &[u8]) -> SentAs {
    match classify(name) {
        Hdr::Other | Hdr::Date | Hdr::MaxForwards => SentAs::Client,
        Hdr::Hop | Hdr::ContentLength | Hdr::Expect => SentAs::Dropped,
        Hdr::TraceParent => SentAs::Unique,
        Hdr::Host
        | Hdr::RequestId
        | Hdr::Xff
        | Hdr::Xfp
        | Hdr::Xfh
        | Hdr::Xfport
        | Hdr::XRealIp
        | Hdr::Forwarded
        | Hdr::TraceState => SentAs::Hop,
    }
}

/// See [`sent_as`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SentAs {
    Client,
    Dropped,
    Hop,
    Unique,
}

/// Whether `Max-Forwards` is this hop's business (RFC 9110 §7.6.2): on TRACE and OPTIONS.
pub fn max_forwards_applies(m: Method) -> bool {
    matches!(m, Method::Trace | Method::Options)
}

/// A `Max-Forwards` value: 1*DIGIT, saturating at `u64::MAX`. `None` when it is not digits.
pub fn max_forwards(v: &[u8]) -> Option<u64> {
    let v = crate::http::trim_ows(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
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

/// Removes from the target written at `out[start..]` every query parameter whose name reads
/// as `name` once decoded as `application/x-www-form-urlencoded` (`api%5Fkey` is `api_key`, as
/// the gateway read it: [`crate::http::query_of`] and [`crate::http::query_params`], the scan
/// the API key was found with, ending at a `#`), and the `?` with them when none is left: a
/// credential the gateway checked (`hide_credentials`).
fn drop_query_param(out: &mut BytesMut, start: usize, name: &[u8]) {
    let Some((q, query)) = crate::http::query_of(&out[start..]) else {
        return;
    };
    let named = |k: &[u8]| crate::http::form_decodes_to(k, name);
    if !crate::http::query_params(query).any(|(_, k)| named(k)) {
        return;
    }
    // `q` is the query's first byte, after the `?`; anything after the query (a `#...`, which a
    // request never has: the parser refuses it) is kept.
    let (q, end) = (start + q, start + q + query.len());
    let query = out[q..end].to_vec();
    let tail = out[end..].to_vec();
    out.truncate(q - 1);
    let mut sep = b'?';
    for (kv, _) in crate::http::query_params(&query).filter(|(_, k)| !named(k)) {
        out.put_u8(sep);
        out.put_slice(kv);
        sep = b'&';
    }
    out.put_slice(&tail);
}

/// Writes the request head sent upstream (into a cleared `out`).
pub fn encode_upstream_head(
    out: &mut BytesMut,
    req: &RequestHead,
    route: &Route,
    authority: &[u8],
    f: &Forwarding<'_>,
) {
    let mut lines = LineRuns::new(&req.raw);
    out.clear();
    out.put_slice(req.method_str());
    out.put_u8(b' ');
    let pq = req.bytes(req.path_query);
    if pq == b"*" {
        out.put_u8(b'*');
    } else {
        let start = out.len();
        route.write_target(pq, out);
        if let Some(name) = route.auth.as_ref().and_then(|p| p.hidden_query.as_deref()) {
            drop_query_param(out, start, name);
        }
    }
    out.put_slice(b" HTTP/1.1\r\n");
    let rules = &route.request_headers;
    let conn = ConnectionOptions::collect(&req.raw, &req.headers, req.connection_options);
    // Forwarding headers kept from a trusted peer, one bit per header (`Hdr::forwarding_bit`).
    let mut kept = 0u8;
    for h in &req.headers {
        let name = req.bytes(h.name);
        match classify(name) {
            Hdr::Other | Hdr::Date => {}
            // RFC 9110 §7.6.2: this hop decrements it on TRACE and OPTIONS (a 0 was answered
            // by the gateway itself); other methods carry it unchanged.
            Hdr::MaxForwards if max_forwards_applies(req.method) => {
                if rules.drops(name) || conn.lists(name) {
                    continue;
                }
                match max_forwards(req.bytes(h.value)) {
                    Some(n) if n > 0 => {
                        lines.flush(out);
                        out.put_slice(b"max-forwards: ");
                        put_u64(out, n - 1);
                        out.put_slice(b"\r\n");
                    }
                    // Invalid (or 0, which never gets here): not passed on.
                    _ => {}
                }
                continue;
            }
            Hdr::MaxForwards => {}
            // The gateway's own span replaces the client's parent (W3C Trace Context §3.2).
            Hdr::TraceParent if f.traceparent.is_some() => continue,
            // Dropped, or written below as the members that fit (W3C Trace Context §3.3.1.5).
            Hdr::TraceState if f.traceparent.is_some() && f.keep_tracestate != KeepState::All => {
                continue
            }
            Hdr::TraceParent | Hdr::TraceState => {}
            k @ (Hdr::Xfp | Hdr::Xfh | Hdr::Xfport | Hdr::XRealIp) => {
                if !(f.trusted && keeps(rules, &conn, name)) {
                    continue;
                }
                kept |= k.forwarding_bit();
            }
            // Joined with this hop's element below.
            _ => continue,
        }
        if rules.drops(name)
            || conn.lists(name)
            || (req.underscore_names && rules.drops_identity_spelling(name))
        {
            continue;
        }
        lines.push(out, h.name, h.value);
    }
    lines.flush(out);
    let host = req.host_bytes();
    if !rules.drops(b"x-forwarded-for") {
        // Earlier hops first (from a trusted peer only), then the client this hop saw.
        out.put_slice(b"x-forwarded-for: ");
        put_kept_list(out, req, rules, &conn, f.trusted, Hdr::Xff);
        out.put_slice(f.peer_ip);
        out.put_slice(b"\r\n");
    }
    match (&route.host, host) {
        (HostPolicy::Set(h), _) => put_header(out, b"host", h),
        (HostPolicy::Preserve, Some(h)) => put_header(out, b"host", h),
        _ => put_header(out, b"host", authority),
    }
    let proto: &[u8] = if f.https { b"https" } else { b"http" };
    let ours = |bit: Hdr, name: &[u8]| kept & bit.forwarding_bit() == 0 && !rules.drops(name);
    if ours(Hdr::Xfp, b"x-forwarded-proto") {
        put_header(out, b"x-forwarded-proto", proto);
    }
    if let Some(h) = host.filter(|_| ours(Hdr::Xfh, b"x-forwarded-host")) {
        put_header(out, b"x-forwarded-host", h);
    }
    if let Some(p) = f.port.filter(|_| ours(Hdr::Xfport, b"x-forwarded-port")) {
        out.put_slice(b"x-forwarded-port: ");
        put_u64(out, u64::from(p));
        out.put_slice(b"\r\n");
    }
    if ours(Hdr::XRealIp, b"x-real-ip") {
        put_header(out, b"x-real-ip", f.peer_ip);
    }
    if !rules.drops(b"forwarded") {
        out.put_slice(b"forwarded: ");
        put_kept_list(out, req, rules, &conn, f.trusted, Hdr::Forwarded);
        put_forwarded_element(out, f.peer_ip, proto, host);
        out.put_slice(b"\r\n");
    }
    put_header(out, b"via", f.via);
    put_header(out, b"x-request-id", f.request_id);
    if let Some(tp) = f.traceparent {
        put_header(out, b"traceparent", tp);
        if let KeepState::Members(_) = f.keep_tracestate {
            if !rules.drops(b"tracestate") && !conn.lists(b"tracestate") {
                let values = req.header_values(b"tracestate");
                crate::trace::put_tracestate(out, values, f.keep_tracestate);
            }
        }
    }
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

/// Is a client's forwarding header of this name passed on (a trusted peer's): not listed in
/// its Connection header, not removed or replaced by the route?
#[inline]
fn keeps(rules: &HeaderRules, conn: &ConnectionOptions, name: &[u8]) -> bool {
    !rules.drops(name) && !conn.lists(name)
}

/// Writes the values of the client's `which` headers (a list header: X-Forwarded-For or
/// Forwarded), each followed by ", ", when the peer is trusted; nothing otherwise.
fn put_kept_list(
    out: &mut BytesMut,
    req: &RequestHead,
    rules: &HeaderRules,
    conn: &ConnectionOptions,
    trusted: bool,
    which: Hdr,
) {
    if !trusted {
        return;
    }
    for h in &req.headers {
        let name = req.bytes(h.name);
        if classify(name) != which || !keeps(rules, conn, name) {
            continue;
        }
        let v = crate::http::trim_ows(req.bytes(h.value));
        if !v.is_empty() {
            out.put_slice(v);
            out.put_slice(b", ");
        }
    }
}

/// This hop's `Forwarded` element (RFC 7239 §4): `for=` the peer (an IPv6 address quoted and
/// bracketed, §6), `proto=`, and `host=` the request's Host (quoted unless it is a token, §4).
fn put_forwarded_element(out: &mut BytesMut, peer_ip: &[u8], proto: &[u8], host: Option<&[u8]>) {
    out.put_slice(b"for=");
    if peer_ip.contains(&b':') {
        out.put_slice(b"\"[");
        out.put_slice(peer_ip);
        out.put_slice(b"]\"");
    } else {
        out.put_slice(peer_ip);
    }
    out.put_slice(b";proto=");
    out.put_slice(proto);
    if let Some(h) = host {
        out.put_slice(b";host=");
        if !h.is_empty() && h.iter().all(|&b| crate::http::is_tchar(b)) {
            out.put_slice(h);
        } else {
            // quoted-string (RFC 9110 §5.6.4); `"` and `\` as quoted-pairs. The head parser
            // already refused CR, LF and NUL in header values.
            out.put_u8(b'"');
            for &b in h {
                if b == b'"' || b == b'\\' {
                    out.put_u8(b'\\');
                }
                out.put_u8(b);
            }
            out.put_u8(b'"');
        }
    }
}

/// Writes the response head sent to the client (into a cleared `out`). `date`: the worker's
/// current IMF-fixdate, written as `Date` when the response has none (RFC 9110 §6.6.1);
/// `extra`: header lines the gateway adds (RateLimit); `chunked`: the body goes out chunked;
/// `connection`: the Connection value, if any.
#[allow(clippy::too_many_arguments)]
pub fn encode_client_head(
    out: &mut BytesMut,
    resp: &ResponseHead,
    rules: &HeaderRules,
    f: &Forwarding<'_>,
    date: &[u8],
    extra: &[u8],
    chunked: bool,
    connection: Option<&[u8]>,
) {
    let mut lines = LineRuns::new(&resp.raw);
    out.clear();
    put_status_line(out, resp.status, resp.bytes(resp.reason));
    let conn = ConnectionOptions::collect(&resp.raw, &resp.headers, resp.connection_options);
    let keep_length = matches!(resp.body, RespBody::Length(_) | RespBody::None);
    let mut has_date = false;
    let drops = rules.drops_any();
    for h in &resp.headers {
        let name = resp.bytes(h.name);
        let kind = classify(name);
        match kind {
            Hdr::Other
            | Hdr::Date
            | Hdr::Host
            | Hdr::Expect
            | Hdr::Xff
            | Hdr::Xfp
            | Hdr::Xfh
            | Hdr::Xfport
            | Hdr::XRealIp
            | Hdr::Forwarded => {}
            Hdr::ContentLength if keep_length && resp.length_line == LengthLine::AsIs => {}
            _ => continue,
        }
        // The Content-Length kept here is the framing the client reads the body by: a
        // Connection option naming it (which RFC 9110 §7.6.1 forbids for a field meant for
        // every recipient) does not take it away, else the body would go out unframed on a
        // connection kept open (RFC 9112 §6.3: read until the close).
        if (drops && rules.drops(name)) || (conn.lists(name) && kind != Hdr::ContentLength) {
            continue;
        }
        // A route whose `response_headers` name Date (set, add or remove) decides it: Date is
        // one value (RFC 9110 §5.3), so an added one replaces the response's too. (Asked of
        // the rules only at a Date line, and below for a response without one.)
        if kind == Hdr::Date {
            if rules.decides(b"date") {
                continue;
            }
            has_date = true;
        }
        lines.push(out, h.name, h.value);
    }
    lines.flush(out);
    // A recipient with a clock that forwards a response without Date adds one: the time it
    // was received (RFC 9110 §6.6.1), this second's by the worker's clock. A route whose
    // `response_headers` set, add or remove Date decides it instead (one line, §5.3).
    if !has_date && !rules.decides(b"date") {
        put_header(out, b"date", date);
    }
    // Several lines or a list of one value go out as one line of it (RFC 9110 §8.6).
    if let (true, LengthLine::Canonical(n)) = (keep_length, resp.length_line) {
        out.put_slice(b"content-length: ");
        put_u64(out, n);
        out.put_slice(b"\r\n");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::http::request::{parse_request, Limits};
    use crate::router::Router;

    /// `hide_credentials` removes every parameter whose name a form decoder reads as the key's,
    /// keeps the others in their order, and reads the query only up to a `#` (RFC 3986 §3.4:
    /// a fragment is no part of the query; before, a parameter after one was removed too).
    #[test]
    fn dropping_the_key_parameter_reads_the_query_as_the_key_was_found() {
        let drop = |target: &str, name: &str| {
            let mut out = BytesMut::from(&b"GET "[..]);
            out.put_slice(target.as_bytes());
            drop_query_param(&mut out, 4, name.as_bytes());
            String::from_utf8(out[4..].to_vec()).unwrap()
        };
        assert_eq!(drop("/a?x=1&api_key=k&y=2", "api_key"), "/a?x=1&y=2");
        assert_eq!(drop("/a?api_key=k", "api_key"), "/a");
        assert_eq!(drop("/a?api%5Fkey=k&api_key=j&z", "api_key"), "/a?z");
        assert_eq!(drop("/a?api+key=k&api%20key=j&x", "api key"), "/a?x");
        assert_eq!(drop("/a?api_key=k+1&x", "api_key"), "/a?x");
        assert_eq!(drop("/a?x=1#&api_key=k", "api_key"), "/a?x=1#&api_key=k");
        assert_eq!(drop("/a?api_key=k#f", "api_key"), "/a#f");
        assert_eq!(drop("/a", "api_key"), "/a");
        assert_eq!(drop("/a?my_api_key=k", "api_key"), "/a?my_api_key=k");
    }

    /// The head `encode_upstream_head` writes for `raw` on a route with `route_extra`.
    fn upstream_head(raw: &str, route_extra: &str, f: &Forwarding<'_>) -> String {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n{route_extra}\n");
        let cfg = Config::parse(&src, "t.toml").unwrap();
        let router = Router::new(&cfg, 1);
        let mut head = RequestHead::default();
        let n = parse_request(raw.as_bytes(), &Limits::default(), &mut head)
            .unwrap()
            .unwrap();
        head.raw = bytes::Bytes::copy_from_slice(&raw.as_bytes()[..n]);
        let mut out = BytesMut::new();
        encode_upstream_head(&mut out, &head, &router.routes[0], b"127.0.0.1:9", f);
        String::from_utf8(out.to_vec()).unwrap()
    }

    fn fwd(peer_ip: &[u8], trusted: bool) -> Forwarding<'_> {
        Forwarding {
            peer_ip,
            trusted,
            port: Some(8080),
            request_id: b"rid",
            via: b"1.1 ringway",
            https: false,
            client_cert: None,
            identity: b"",
            traceparent: None,
            keep_tracestate: KeepState::None,
        }
    }

    /// The values of header `name` (lower case) in `head`, in order.
    fn values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.split("\r\n")
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    const SPOOFED: &str = "GET /a HTTP/1.1\r\nHost: shop.test:8443\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Port: 1\r\n\r\n";

    #[test]
    fn untrusted_peer_forwarding_headers_are_replaced() {
        let h = upstream_head(SPOOFED, "", &fwd(b"192.0.2.1", false));
        assert_eq!(values(&h, "x-forwarded-for"), ["192.0.2.1"], "{h}");
        assert_eq!(values(&h, "x-real-ip"), ["192.0.2.1"], "{h}");
        assert_eq!(values(&h, "x-forwarded-proto"), ["http"], "{h}");
        assert_eq!(values(&h, "x-forwarded-host"), ["shop.test:8443"], "{h}");
        assert_eq!(values(&h, "x-forwarded-port"), ["8080"], "{h}");
        assert_eq!(
            values(&h, "forwarded"),
            ["for=192.0.2.1;proto=http;host=\"shop.test:8443\""],
            "{h}"
        );
        assert!(
            !h.contains("6.6.6.6") && !h.contains("7.7.7.7") && !h.contains("evil"),
            "{h}"
        );
    }

    #[test]
    fn trusted_peer_forwarding_headers_are_kept_and_extended() {
        let h = upstream_head(SPOOFED, "", &fwd(b"10.0.0.2", true));
        assert_eq!(
            values(&h, "x-forwarded-for"),
            ["6.6.6.6, 7.7.7.7, 10.0.0.2"],
            "{h}"
        );
        assert_eq!(
            values(&h, "forwarded"),
            ["for=6.6.6.6;proto=https, for=10.0.0.2;proto=http;host=\"shop.test:8443\""],
            "{h}"
        );
        assert_eq!(values(&h, "x-real-ip"), ["6.6.6.6"], "{h}");
        assert_eq!(values(&h, "x-forwarded-proto"), ["https"], "{h}");
        assert_eq!(values(&h, "x-forwarded-host"), ["evil.test"], "{h}");
        assert_eq!(values(&h, "x-forwarded-port"), ["1"], "{h}");
        // A trusted peer that sent none of them gets this hop's values.
        let h = upstream_head(
            "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "",
            &fwd(b"10.0.0.2", true),
        );
        assert_eq!(values(&h, "x-forwarded-for"), ["10.0.0.2"], "{h}");
        assert_eq!(values(&h, "x-real-ip"), ["10.0.0.2"], "{h}");
        assert_eq!(values(&h, "x-forwarded-proto"), ["http"], "{h}");
        assert_eq!(values(&h, "x-forwarded-host"), ["a.test"], "{h}");
        assert_eq!(values(&h, "x-forwarded-port"), ["8080"], "{h}");
        assert_eq!(
            values(&h, "forwarded"),
            ["for=10.0.0.2;proto=http;host=a.test"],
            "{h}"
        );
    }

    #[test]
    fn connection_listed_copies_are_never_kept() {
        let raw = "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: x-real-ip, forwarded, x-forwarded-for\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
        let h = upstream_head(raw, "", &fwd(b"10.0.0.2", true));
        assert!(!h.contains("6.6.6.6"), "{h}");
        assert_eq!(values(&h, "x-real-ip"), ["10.0.0.2"], "{h}");
    }

    #[test]
    fn ipv6_peer_is_quoted_and_bracketed_in_forwarded() {
        let h = upstream_head(
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            "",
            &fwd(b"2001:db8::7", false),
        );
        assert_eq!(
            values(&h, "forwarded"),
            ["for=\"[2001:db8::7]\";proto=http;host=\"[::1]:80\""],
            "{h}"
        );
        assert_eq!(values(&h, "x-forwarded-for"), ["2001:db8::7"], "{h}");
        // No Host (HTTP/1.0), unknown port: no host= and no X-Forwarded-Port.
        let mut f = fwd(b"192.0.2.1", false);
        f.port = None;
        f.https = true;
        let h = upstream_head("GET / HTTP/1.0\r\n\r\n", "", &f);
        assert_eq!(
            values(&h, "forwarded"),
            ["for=192.0.2.1;proto=https"],
            "{h}"
        );
        assert!(values(&h, "x-forwarded-port").is_empty(), "{h}");
        assert!(values(&h, "x-forwarded-host").is_empty(), "{h}");
    }

    #[test]
    fn a_host_that_is_not_a_token_is_quoted_in_forwarded() {
        let h = upstream_head(
            "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "",
            &fwd(b"192.0.2.1", false),
        );
        assert_eq!(
            values(&h, "forwarded"),
            ["for=192.0.2.1;proto=http;host=\"[::1]:8080\""],
            "{h}"
        );
        // Quotes and backslashes (refused in Host by the head parser, but the writer does not
        // rely on it) become quoted-pairs.
        let mut out = BytesMut::new();
        put_forwarded_element(&mut out, b"192.0.2.1", b"http", Some(b"a\"b\\c"));
        assert_eq!(
            &out[..],
            &b"for=192.0.2.1;proto=http;host=\"a\\\"b\\\\c\""[..]
        );
    }

    #[test]
    fn max_forwards_is_digits_saturating_and_decremented_only_on_trace_and_options() {
        assert_eq!(max_forwards(b"0"), Some(0));
        assert_eq!(max_forwards(b" 12 "), Some(12));
        assert_eq!(max_forwards(b"99999999999999999999999"), Some(u64::MAX));
        for bad in [&b""[..], b"-1", b"1.5", b"0x10", b"1 2"] {
            assert_eq!(
                max_forwards(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let f = fwd(b"192.0.2.1", false);
        let h = upstream_head(
            "OPTIONS * HTTP/1.1\r\nHost: a\r\nMax-Forwards: 5\r\n\r\n",
            "",
            &f,
        );
        assert_eq!(values(&h, "max-forwards"), ["4"], "{h}");
        let h = upstream_head(
            "OPTIONS * HTTP/1.1\r\nHost: a\r\nMax-Forwards: x\r\n\r\n",
            "",
            &f,
        );
        assert!(values(&h, "max-forwards").is_empty(), "{h}");
        let h = upstream_head(
            "GET / HTTP/1.1\r\nHost: a\r\nMax-Forwards: 5\r\n\r\n",
            "",
            &f,
        );
        assert_eq!(values(&h, "max-forwards"), ["5"], "{h}");
    }

    #[test]
    fn route_rules_win_over_forwarding_headers() {
        let rules = "request_headers = { remove = [\"forwarded\", \"x-real-ip\"], set = { \"x-forwarded-for\" = \"hidden\" } }";
        for trusted in [false, true] {
            let h = upstream_head(SPOOFED, rules, &fwd(b"10.0.0.2", trusted));
            assert!(values(&h, "forwarded").is_empty(), "{h}");
            assert!(values(&h, "x-real-ip").is_empty(), "{h}");
            assert_eq!(values(&h, "x-forwarded-for"), ["hidden"], "{h}");
        }
    }

    /// A fixed-seed xorshift generator: the same random cases every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Up to 11 lines drawn from `forms`, appended to `raw`.
    fn add_lines(raw: &mut Vec<u8>, forms: &[&str], next: &mut impl FnMut() -> u64) {
        for _ in 0..(next() % 12) {
            raw.extend_from_slice(forms[(next() % forms.len() as u64) as usize].as_bytes());
        }
    }

    /// The client head for `raw` (an upstream response) on a route with `route_extra`,
    /// written with merged runs of unchanged lines and line by line.
    fn client_heads(raw: &[u8], route_extra: &str) -> (Vec<u8>, Vec<u8>) {
        let src = format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nupstream = \"u\"\n{route_extra}\n");
        let cfg = Config::parse(&src, "t.toml").unwrap();
        let router = Router::new(&cfg, 1);
        let rules = &router.routes[0].response_headers;
        let mut head = ResponseHead::default();
        let n = crate::http::response::parse_response(raw, false, &mut head)
            .unwrap()
            .unwrap();
        head.raw = bytes::Bytes::copy_from_slice(&raw[..n]);
        let f = fwd(b"10.0.0.2", false);
        let mut merged = BytesMut::new();
        let mut single = BytesMut::new();
        for (out, merge) in [(&mut merged, true), (&mut single, false)] {
            crate::http::encode::merge_lines_in_tests(merge, || {
                encode_client_head(
                    out,
                    &head,
                    rules,
                    &f,
                    b"Thu, 26 Nov 2026 18:00:01 GMT",
                    b"x-extra: 1\r\n",
                    false,
                    Some(b"keep-alive"),
                )
            });
        }
        (merged.to_vec(), single.to_vec())
    }

    #[test]
    fn merged_header_runs_write_the_same_bytes_as_line_by_line() {
        // Lines of every form httparse accepts, kept and dropped ones mixed, in random order.
        let forms: &[&str] = &[
            "Server: nginx\r\n",
            "Date: Thu, 26 Nov 2026 18:00:00 GMT\r\n",
            "Content-Type: text/plain\r\n",
            "ETag: \"abc\"\r\n",
            "X-Empty: \r\n",
            "X-NoSpace:v\r\n",
            "X-Spaces:   v  \r\n",
            "X-Tab:\tv\t\r\n",
            "X-Bare-LF: v\n",
            "Connection: keep-alive, X-Hop\r\n",
            "X-Hop: dropped\r\n",
            "Keep-Alive: timeout=5\r\n",
            "X-Request-Id: theirs\r\n",
            "Via: 1.0 other\r\n",
            "X-Secret: removed by the route\r\n",
            "Set-Cookie: a=b\r\n",
            "X-Obs-Text: café\r\n",
        ];
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let route = "response_headers = { remove = [\"x-secret\"] }";
        for case in 0..500 {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            add_lines(&mut raw, forms, &mut next);
            raw.extend_from_slice(b"Content-Length: 0\r\n\r\n");
            let (merged, single) = client_heads(&raw, route);
            assert_eq!(
                String::from_utf8_lossy(&merged),
                String::from_utf8_lossy(&single),
                "case {case}: {}",
                String::from_utf8_lossy(&raw)
            );
        }
        // A typical head: dropped lines leave the kept ones in order.
        let (merged, _) = client_heads(
            b"HTTP/1.1 200 OK\r\nServer: a\r\nDate: b\r\nConnection: close\r\nETag: \"c\"\r\nContent-Length: 0\r\n\r\n",
            route,
        );
        let text = String::from_utf8(merged).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\nServer: a\r\nDate: b\r\nETag: \"c\"\r\nContent-Length: 0\r\nvia: 1.1 ringway\r\n"),
            "{text}"
        );
    }

    #[test]
    fn merged_request_lines_write_the_same_bytes_as_line_by_line() {
        let forms: &[&str] = &[
            "User-Agent: curl/8\r\n",
            "Accept: */*\r\n",
            "X-Empty: \r\n",
            "X-NoSpace:v\r\n",
            "X-Spaces:   v  \r\n",
            "X-Bare-LF: v\n",
            "Connection: keep-alive, X-Hop\r\n",
            "X-Hop: dropped\r\n",
            "X-Forwarded-For: 6.6.6.6\r\n",
            "X-Forwarded-Proto: https\r\n",
            "Forwarded: for=6.6.6.6\r\n",
            "Max-Forwards: 3\r\n",
            "Traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n",
            "X-Secret: removed by the route\r\n",
            "Cookie: a=b\r\n",
        ];
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let src = "[[listeners]]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nendpoints = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nupstream = \"u\"\nrequest_headers = { remove = [\"x-secret\"] }\n";
        let cfg = Config::parse(src, "t.toml").unwrap();
        let router = Router::new(&cfg, 1);
        for case in 0..500 {
            let method = ["GET", "OPTIONS", "POST"][(next() % 3) as usize];
            let mut raw = format!("{method} /a HTTP/1.1\r\nHost: h\r\n").into_bytes();
            add_lines(&mut raw, forms, &mut next);
            raw.extend_from_slice(b"\r\n");
            let mut head = RequestHead::default();
            let n = parse_request(&raw, &Limits::default(), &mut head)
                .unwrap()
                .unwrap();
            head.raw = bytes::Bytes::copy_from_slice(&raw[..n]);
            let trusted = next() & 1 == 0;
            let f = fwd(b"10.0.0.2", trusted);
            let mut merged = BytesMut::new();
            let mut single = BytesMut::new();
            let route = &router.routes[0];
            for (out, merge) in [(&mut merged, true), (&mut single, false)] {
                crate::http::encode::merge_lines_in_tests(merge, || {
                    encode_upstream_head(out, &head, route, b"u:9", &f)
                });
            }
            assert_eq!(
                String::from_utf8_lossy(&merged),
                String::from_utf8_lossy(&single),
                "case {case}: {}",
                String::from_utf8_lossy(&raw)
            );
        }
    }
}
