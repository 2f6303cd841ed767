//! Upstream response heads and their framing (RFC 9112 §6.3).

use std::mem::MaybeUninit;

use bytes::Bytes;

use super::{
    is_framing_name_with_underscore, list_items, parse_content_length, trim_ows, ConnectionFlags,
    HeaderSpan, Span, Version,
};

/// Most bytes accepted in an upstream response head.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines accepted in an upstream response head.
pub const MAX_RESPONSE_HEADERS: usize = 256;

/// How the response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespBody {
    /// No body: HEAD, 1xx, 204, 304, or Content-Length: 0.
    None,
    Length(u64),
    Chunked,
    /// Delimited by the upstream closing the connection.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespError {
    /// The head is malformed or its framing is invalid.
    Malformed(&'static str),
    /// The head is larger than [`MAX_RESPONSE_HEAD_BYTES`].
    TooLarge,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub raw: Bytes,
    pub status: u16,
    pub reason: Span,
    pub version: Version,
    pub headers: Vec<HeaderSpan>,
    pub body: RespBody,
    /// The upstream allows reusing the connection after this response.
    pub keep_alive: bool,
    pub connection_options: bool,
    /// How the upstream's `Content-Length` goes to the client.
    pub length_line: LengthLine,
}

/// What becomes of a response's `Content-Length` lines on the way to the client (RFC 9110
/// §8.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthLine {
    /// None, or one line of digits: copied as it is.
    AsIs,
    /// Several lines, or a list of one repeated value (`2, 2`): one line of the value.
    Canonical(u64),
    /// On a 1xx or 204, where it may not be (dropped).
    Drop,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            raw: Bytes::new(),
            status: 0,
            reason: Span::default(),
            version: Version::Http11,
            // Empty: shells are pooled per worker and keep the capacity they grew to.
            headers: Vec::new(),
            body: RespBody::None,
            keep_alive: true,
            connection_options: false,
            length_line: LengthLine::AsIs,
        }
    }
}

impl ResponseHead {
    #[inline]
    pub fn bytes(&self, s: Span) -> &[u8] {
        s.get(&self.raw)
    }

    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| self.bytes(h.name).eq_ignore_ascii_case(name))
            .map(|h| self.bytes(h.value))
    }
}

/// Parses an upstream response head at the start of `buf`. `head_request` is whether the
/// request was HEAD, which makes any body absent whatever the headers say.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    out: &mut ResponseHead,
) -> Result<Option<usize>, RespError> {
    let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_RESPONSE_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_RESPONSE_HEAD_BYTES {
                return Err(RespError::TooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(RespError::TooLarge),
        Err(httparse::Error::Version) => return higher_minor_version(buf, head_request, out),
        Err(_) => return Err(RespError::Malformed("malformed response head")),
    };
    if len > MAX_RESPONSE_HEAD_BYTES {
        return Err(RespError::TooLarge);
    }
    let status = resp.code.unwrap_or(0);
    // RFC 9110 §15: a status code outside 100..=599 is invalid, and a client SHOULD treat it
    // as a 5xx. It is not relayed: `099` would go out as `HTTP/1.1 99`, which is no status
    // line at all (RFC 9112 §4: three digits).
    if !(100..=599).contains(&status) {
        return Err(RespError::Malformed("invalid status code"));
    }
    out.status = status;
    // httparse leaves the reason unset when a status line has none ("HTTP/1.1 200\r\n").
    out.reason = resp
        .reason
        .map_or(Span::default(), |r| Span::of(buf, r.as_bytes()));
    out.version = if resp.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    out.headers.clear();
    out.connection_options = false;

    let mut content_length: Option<u64> = None;
    // Lines of it, and whether one was a list.
    let mut length_lines = 0u32;
    let mut length_list = false;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_chunked_count = 0u32;
    let mut te_other = false;
    let mut conn = ConnectionFlags::default();
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        // No CR, LF or NUL can be here (RFC 9110 §5.5): httparse ends a value at CR or LF and
        // refuses every other control byte but HTAB. `httparse_keeps_cr_lf_nul_out_of_values`
        // pins that; scanning each value again cost 7% of the proxy's instructions per request.
        debug_assert!(!value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)
                .ok_or(RespError::Malformed("invalid Content-Length"))?;
            if content_length.is_some_and(|p| p != n) {
                return Err(RespError::Malformed("conflicting Content-Length"));
            }
            content_length = Some(n);
            length_lines += 1;
            length_list |= value.contains(&b',');
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_seen = true;
            for coding in list_items(value) {
                let coding = trim_ows(coding.split(|b| *b == b';').next().unwrap_or(b""));
                te_chunked_last = coding.eq_ignore_ascii_case(b"chunked");
                te_chunked_count += u32::from(te_chunked_last);
                te_other |= !te_chunked_last;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            conn.add(value);
        } else if is_framing_name_with_underscore(name) {
            // Not framed by here, and left out of the head: every copy of it (the client's,
            // the cache's, a 1xx passed on) is built from `headers`, and a next hop that
            // reads `_` as `-` would frame by it (RFC 9112 §6.3 item 3, §11.2).
            continue;
        }
        out.headers.push(HeaderSpan {
            name: Span::of(buf, name),
            value: Span::of(buf, value),
        });
    }
    // A transfer coding other than chunked (gzip, compress, deflate, an unknown one) is not
    // decoded here, and a client would take its bytes for the content itself (RFC 9112
    // §6.1): the response is refused, not relayed under another framing.
    if te_other {
        return Err(RespError::Malformed("unsupported transfer coding"));
    }
    // Framing that RFC 9112 calls faulty is refused, not guessed at: a cache would store the
    // guess and serve it to every client, and another hop may have read the bytes otherwise.
    if te_seen {
        // §6.1: an HTTP/1.0 message with Transfer-Encoding is treated as faulty framing.
        if out.version == Version::Http10 {
            return Err(RespError::Malformed(
                "Transfer-Encoding in an HTTP/1.0 response",
            ));
        }
        // §6.3 item 3: both "ought to be handled as an error" (a smuggling attempt).
        if content_length.is_some() {
            return Err(RespError::Malformed(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        // §6.1: a sender MUST NOT apply chunked more than once (on one line or two).
        if te_chunked_count > 1 {
            return Err(RespError::Malformed("chunked applied more than once"));
        }
    }
    out.keep_alive = conn.persistent(out.version);
    out.connection_options = conn.other;
    out.length_line = match content_length {
        Some(_) if (100..200).contains(&status) || status == 204 => LengthLine::Drop,
        Some(n) if length_lines > 1 || length_list => LengthLine::Canonical(n),
        _ => LengthLine::AsIs,
    };
    out.body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        RespBody::None
    } else if te_seen {
        // Only chunked, once, as the final coding gets here (refused above otherwise).
        if te_chunked_last {
            RespBody::Chunked
        } else {
            out.keep_alive = false;
            RespBody::Close
        }
    } else if let Some(n) = content_length {
        if n == 0 {
            RespBody::None
        } else {
            RespBody::Length(n)
        }
    } else {
        out.keep_alive = false;
        RespBody::Close
    };
    Ok(Some(len))
}

/// httparse knows only HTTP/1.0 and HTTP/1.1. A response in a higher minor version of HTTP/1
/// is read as HTTP/1.1 (RFC 9110 §2.5: a recipient SHOULD process it as the highest minor
/// version it implements), as requests are: a copy with the minor digit patched is parsed.
/// Spans are offsets and the copy has the same length, so they stay valid for `buf`. Rare, so
/// the copy's allocation does not matter; only the bytes a head may occupy are copied.
fn higher_minor_version(
    buf: &[u8],
    head_request: bool,
    out: &mut ResponseHead,
) -> Result<Option<usize>, RespError> {
    match buf {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor, b' ', ..]
            if minor.is_ascii_digit() && *minor >= b'2' =>
        {
            let keep = buf.len().min(MAX_RESPONSE_HEAD_BYTES.saturating_add(1));
            let mut copy = buf[..keep].to_vec();
            copy[7] = b'1';
            parse_response(&copy, head_request, out)
        }
        // The space after the version has not arrived yet.
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => Ok(None),
        _ => Err(RespError::Malformed("malformed response head")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guarantee `parse_response` relies on instead of scanning each value: no CR, LF or
    /// NUL inside a field value (RFC 9110 §5.5). If httparse ever let one through, this fails.
    #[test]
    fn httparse_keeps_cr_lf_nul_out_of_values() {
        for bad in [&b"\0"[..], b"\r", b"\rx", b"\x01", b"\x7f"] {
            for at in ["", "a", "abc def"] {
                let mut raw = b"HTTP/1.1 200 OK\r\nX-A: ".to_vec();
                raw.extend_from_slice(at.as_bytes());
                raw.extend_from_slice(bad);
                raw.extend_from_slice(b"tail\r\nContent-Length: 0\r\n\r\n");
                let mut h = ResponseHead::default();
                match parse_response(&raw, false, &mut h) {
                    Err(_) => {}
                    Ok(Some(n)) => {
                        h.raw = Bytes::copy_from_slice(&raw[..n]);
                        for f in &h.headers {
                            let v = h.bytes(f.value);
                            assert!(
                                !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                                "{raw:?} gave the value {v:?}"
                            );
                        }
                    }
                    Ok(None) => panic!("{raw:?} read as incomplete"),
                }
            }
        }
        // A bare LF ends the line: what follows is a field of its own or an error, never part
        // of the value.
        let lf = b"HTTP/1.1 200 OK\r\nX-A: a\nb: c\r\n\r\n";
        let mut h = ResponseHead::default();
        if let Ok(Some(n)) = parse_response(lf, false, &mut h) {
            h.raw = Bytes::copy_from_slice(&lf[..n]);
            assert!(h.headers.iter().all(|f| !h.bytes(f.value).contains(&b'\n')));
        }
    }

    fn parse(raw: &[u8], head: bool) -> Result<Option<ResponseHead>, RespError> {
        let mut out = ResponseHead::default();
        Ok(parse_response(raw, head, &mut out)?.map(|_| out))
    }

    /// RFC 9112 §11.2: `Content_Length` / `Transfer_Encoding` lines (any case, `_` for any
    /// `-`) neither frame the response nor stay in its head; other names with `_` stay.
    #[test]
    fn framing_names_spelled_with_underscores_are_left_out() {
        let raw = b"HTTP/1.1 200 OK\r\nContent_Length: 40\r\nx-a: 1\r\nTRANSFER_ENCODING: chunked\r\ncontent-length: 4\r\nX_Length: 2\r\ntransfer_encoding: gzip\r\n\r\n";
        let mut r = parse(raw, false).unwrap().unwrap();
        r.raw = Bytes::copy_from_slice(raw);
        assert_eq!(r.body, RespBody::Length(4));
        assert_eq!(r.length_line, LengthLine::AsIs);
        let names: Vec<&[u8]> = r.headers.iter().map(|h| r.bytes(h.name)).collect();
        assert_eq!(names, [&b"x-a"[..], b"content-length", b"X_Length"]);
        // Alone, it leaves the response close-delimited, as with no framing field at all.
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer_Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, RespBody::Close);
        assert!(r.headers.is_empty());
    }

    #[test]
    fn framing_rules() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, RespBody::Length(5));
        assert!(r.keep_alive);
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, RespBody::None);
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.body, RespBody::None);
        let r = parse(
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, RespBody::None);
        let r = parse(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!(r.body, RespBody::Close);
        assert!(!r.keep_alive);
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.body, RespBody::Chunked);
        assert!(r.keep_alive);
        let r = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!r.keep_alive);
        let r = parse(b"HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 100);
        assert_eq!(r.body, RespBody::None);
    }

    #[test]
    fn malformed() {
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        assert!(parse(b"HTTX/1.1 200 OK\r\n\r\n", false).is_err());
        assert!(parse(b"HTTP/1.1 2000 OK\r\n\r\n", false).is_err());
    }

    /// RFC 9112 §6.1, §6.3 item 3 and RFC 9110 §15: faulty framing and invalid status codes
    /// are refused (the proxy answers 502), whatever the status and the request method.
    #[test]
    fn faulty_framing_and_invalid_status_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.0 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 000 X\r\n\r\n",
            b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 999 X\r\n\r\n",
        ] {
            for head in [false, true] {
                assert!(
                    matches!(parse(raw, head), Err(RespError::Malformed(_))),
                    "{:?}",
                    String::from_utf8_lossy(raw)
                );
            }
        }
        for ok in [
            &b"HTTP/1.1 100 Continue\r\n\r\n"[..],
            b"HTTP/1.1 599 X\r\n\r\n",
        ] {
            assert!(parse(ok, false).unwrap().is_some());
        }
    }

    /// RFC 9110 §2.5: HTTP/1.x with x > 1 is read as HTTP/1.1; other versions are refused.
    #[test]
    fn higher_minor_version_reads_as_http11() {
        let raw = b"HTTP/1.2 201 Made\r\nContent-Length: 2\r\n\r\nok";
        let r = parse(raw, false).unwrap().unwrap();
        assert_eq!(
            (r.status, r.version, r.body),
            (201, Version::Http11, RespBody::Length(2))
        );
        assert_eq!(r.reason.get(raw), b"Made");
        assert!(r.keep_alive);
        for i in 0..raw.len() - 2 {
            assert!(parse(&raw[..i], false).unwrap().is_none(), "prefix {i}");
        }
        for bad in [
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            b"HTTP/1.10 200 OK\r\n\r\n",
            b"HTTP/1.x 200 OK\r\n\r\n",
            b"HTTP/0.9 200 OK\r\n\r\n",
            b"HTTP/1.2\r\n\r\n",
        ] {
            assert!(
                parse(bad, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Found by the property tests: a status line without a reason left httparse's reason
    /// unset, and its span was computed from an unrelated pointer (an overflow).
    #[test]
    fn status_line_without_reason() {
        for raw in [
            &b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 204 \r\n\r\n",
        ] {
            let r = parse(raw, false).unwrap().unwrap();
            assert_eq!(r.reason.get(raw), b"");
        }
    }

    #[test]
    fn every_prefix_is_partial() {
        let raw: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n";
        for i in 0..raw.len() {
            assert!(parse(&raw[..i], false).unwrap().is_none(), "prefix {i}");
        }
    }
}
