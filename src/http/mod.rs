//! HTTP/1.1 codec (RFC 9110 / RFC 9112): request and response heads parsed by httparse over
//! `bytes`, framing decided by us, and a chunked-body scanner.
//!
//! Heads are parsed in place: a parsed head keeps its raw bytes (`Bytes`) and the offsets of
//! each header, so no header byte is copied until it is forwarded.

pub mod chunked;
pub mod client;
pub mod encode;
pub mod request;
pub mod response;

/// A byte range inside a head's raw bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// The span of `part` inside `base`. A `part` that does not lie inside `base` (httparse
    /// leaves some fields unset, and `""` literals stand in for them) gives the empty span.
    #[inline]
    pub fn of(base: &[u8], part: &[u8]) -> Span {
        match (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize) {
            Some(start) if start <= base.len() && part.len() <= base.len() - start => Span {
                start: start as u32,
                end: (start + part.len()) as u32,
            },
            _ => Span::default(),
        }
    }

    #[inline]
    pub fn get<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        &raw[self.start as usize..self.end as usize]
    }

    #[inline]
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// One header line: name and value spans into the head's raw bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderSpan {
    pub name: Span,
    pub value: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing headers that ringway re-frames.
/// Compared case-insensitively; every entry is lower case.
pub const HOP_BY_HOP: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"transfer-encoding",
];

#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Whether `name` is `Content-Length` or `Transfer-Encoding` spelled with `_` for at least one
/// `-`, in any case (`Content_Length`, `TRANSFER_ENCODING`). ringway never frames by such a
/// line, but a next hop that reads `_` as `-` (CGI-style servers do) might: the two would
/// split the bytes differently (RFC 9112 §6.3 item 3, §11.2). Looks at the bytes of a name
/// of length 14 or 17 only.
#[inline]
pub fn is_framing_name_with_underscore(name: &[u8]) -> bool {
    let want: &[u8] = match name.len() {
        14 => b"content-length",
        17 => b"transfer-encoding",
        _ => return false,
    };
    let mut underscore = false;
    for (a, b) in name.iter().zip(want) {
        if *a == b'_' && *b == b'-' {
            underscore = true;
        } else if a.to_ascii_lowercase() != *b {
            return false;
        }
    }
    underscore
}

/// Splits a comma-separated field value into trimmed, non-empty elements (RFC 9110 §5.6.1).
pub fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(trim_ows)
        .filter(|s| !s.is_empty())
}

/// Whether `raw` (a query parameter's name or value), its `%XX` escapes decoded, is `want`.
/// A `%` not followed by two hex digits stands for itself (RFC 3986 §2.1).
pub fn decodes_to(raw: &[u8], want: &[u8]) -> bool {
    decoded_is(raw, false, want)
}

/// Whether the query parameter name or value `raw`, read as
/// `application/x-www-form-urlencoded` (each `+` a space, then `%XX` escapes decoded: how
/// upstream frameworks read a query), is `want`.
pub fn form_decodes_to(raw: &[u8], want: &[u8]) -> bool {
    decoded_is(raw, true, want)
}

fn decoded_is(raw: &[u8], plus_is_space: bool, want: &[u8]) -> bool {
    let mut j = 0;
    let all = percent_decoded(raw, plus_is_space, |b| {
        let same = want.get(j) == Some(&b);
        j += 1;
        same
    });
    all && j == want.len()
}

/// `raw` read as [`form_decodes_to`] reads it, into `out`; `None` when it does not fit.
pub fn form_decode_into<'b>(raw: &[u8], out: &'b mut [u8]) -> Option<&'b [u8]> {
    let mut n = 0;
    let fits = percent_decoded(raw, true, |b| {
        let Some(slot) = out.get_mut(n) else {
            return false;
        };
        *slot = b;
        n += 1;
        true
    });
    fits.then_some(&out[..n])
}

/// `raw` read as [`form_decodes_to`] reads it (for config values, at load).
pub fn form_decoded(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    percent_decoded(raw, true, |b| {
        out.push(b);
        true
    });
    out
}

/// Hands each byte of `raw`, its `%XX` escapes decoded (and with `plus_is_space` each `+` as a
/// space), to `each` until it says false; true when every byte was taken.
#[inline]
fn percent_decoded(raw: &[u8], plus_is_space: bool, mut each: impl FnMut(u8) -> bool) -> bool {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut i = 0;
    while i < raw.len() {
        let mut b = raw[i];
        i += 1;
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                raw.get(i).and_then(|c| hex(*c)),
                raw.get(i + 1).and_then(|c| hex(*c)),
            ) {
                b = (h * 16 + l) as u8;
                i += 2;
            }
        } else if b == b'+' && plus_is_space {
            b = b' ';
        }
        if !each(b) {
            return false;
        }
    }
    true
}

/// The query of a request-target (origin or absolute form, or a target being written
/// upstream): the bytes after the first `?`, up to a `#` (a fragment is no part of it, RFC
/// 3986 §3.4); `None` without a `?`. The one reading of a query that the API key, its removal
/// (`hide_credentials`) and the access log's redaction share.
pub fn query_of(target: &[u8]) -> Option<(usize, &[u8])> {
    let q = memchr::memchr(b'?', target)? + 1;
    let end = memchr::memchr(b'#', &target[q..]).map_or(target.len(), |p| q + p);
    Some((q, &target[q..end]))
}

/// The parameters of a query (`&`-separated, as written), each with its name: the bytes
/// before its first `=` (all of it without one).
pub fn query_params(query: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    query.split(|b| *b == b'&').map(|kv| {
        let name = memchr::memchr(b'=', kv).map_or(kv, |i| &kv[..i]);
        (kv, name)
    })
}

#[inline]
pub fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A byte of a field value (RFC 9110 §5.5: `field-vchar`, SP or HTAB) or of a reason phrase
/// (RFC 9112 §4): HTAB, SP, VCHAR or obs-text; no other control byte.
#[inline]
pub fn is_field_value_byte(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21..=0x7E | 0x80..=0xFF)
}

/// `tchar` of RFC 9110 §5.6.2: the bytes of a token (field names, methods, chunk-extension
/// names).
#[inline]
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Is `v` a valid `Host` field value or absolute-form authority: `uri-host [ ":" port ]`
/// (RFC 9112 §3.2, RFC 3986 §3.2.2 and §3.2.3)?
///
/// - An IP-literal must be a bracketed IPv6 address (RFC 4291 text form, IPv4 tail allowed);
///   IPvFuture and zone identifiers are refused.
/// - A reg-name (IPv4 addresses included) may hold letters, digits, `-`, `.`, `_` and `~`.
///   RFC 3986 also allows sub-delims and percent-encoding there; ringway refuses them because
///   routes compare host bytes, and `%61pi.example.com`, `a,b` or `a;b` would reach a route
///   (or an upstream building URLs from X-Forwarded-Host) under a second spelling. No DNS name
///   needs them.
/// - The port is decimal digits, at most 65535; an empty port (`host:`) is allowed by the
///   grammar and means the scheme's default.
///
/// Userinfo, paths, queries, fragments, spaces, commas and empty hosts are all refused by
/// these rules.
pub fn valid_authority(v: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(after) = v.strip_prefix(b"[") {
        let Some(close) = after.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &after[..close];
        let ok = std::str::from_utf8(inner)
            .ok()
            .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
        (ok, &after[close + 1..])
    } else {
        let end = v.iter().position(|b| *b == b':').unwrap_or(v.len());
        let host = &v[..end];
        let ok = !host.is_empty()
            && host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
        (ok, &v[end..])
    };
    if !host_ok {
        return false;
    }
    match rest {
        [] => true,
        [b':', port @ ..] => valid_port(port),
        _ => false,
    }
}

/// `port = *DIGIT` (RFC 3986 §3.2.3), bounded to what TCP can carry.
fn valid_port(port: &[u8]) -> bool {
    let mut n: u32 = 0;
    for b in port {
        if !b.is_ascii_digit() {
            return false;
        }
        n = match n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u32::from(b - b'0')))
        {
            Some(n) if n <= u32::from(u16::MAX) => n,
            _ => return false,
        };
    }
    true
}

/// What a head's Connection headers say (RFC 9112 §9.3).
#[derive(Default, Clone, Copy, Debug)]
pub struct ConnectionFlags {
    pub close: bool,
    pub keep_alive: bool,
    /// Some other option is listed: the header it names must not be forwarded.
    pub other: bool,
}

impl ConnectionFlags {
    pub fn add(&mut self, value: &[u8]) {
        // The usual value is one token: no list to split.
        let one = trim_ows(value);
        if one.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
            return;
        }
        if one.eq_ignore_ascii_case(b"close") {
            self.close = true;
            return;
        }
        for t in list_items(value) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else {
                self.other = true;
            }
        }
    }

    /// Does the connection persist after this message? HTTP/1.1 unless `close`; HTTP/1.0 only
    /// with `keep-alive`.
    pub fn persistent(&self, version: Version) -> bool {
        match version {
            Version::Http11 => !self.close,
            Version::Http10 => self.keep_alive && !self.close,
        }
    }
}

/// The values of a head's Connection headers (the first four), to drop the headers they name
/// (RFC 9110 §7.6.1).
pub struct ConnectionOptions<'a> {
    values: [&'a [u8]; 4],
    n: usize,
}

impl<'a> ConnectionOptions<'a> {
    /// Collects the Connection values of a head; `any` is false when the head has no
    /// Connection option other than close/keep-alive, which skips the scan.
    pub fn collect(raw: &'a [u8], headers: &[HeaderSpan], any: bool) -> Self {
        let mut c = ConnectionOptions {
            values: [b""; 4],
            n: 0,
        };
        if any {
            for h in headers {
                if c.n < 4 && h.name.get(raw).eq_ignore_ascii_case(b"connection") {
                    c.values[c.n] = h.value.get(raw);
                    c.n += 1;
                }
            }
        }
        c
    }

    /// Does a Connection header list `name`?
    #[inline]
    pub fn lists(&self, name: &[u8]) -> bool {
        self.values[..self.n]
            .iter()
            .any(|v| list_items(v).any(|t| t.eq_ignore_ascii_case(name)))
    }
}

/// Parses a Content-Length value: one or more identical decimal numbers separated by commas
/// (RFC 9110 §8.6). Anything else is `None`.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut out: Option<u64> = None;
    let mut any = false;
    for item in value.split(|b| *b == b',') {
        let item = trim_ows(item);
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut n: u64 = 0;
        for d in item {
            n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        }
        match out {
            Some(prev) if prev != n => return None,
            _ => out = Some(n),
        }
        any = true;
    }
    if any {
        out
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_flags_read_one_token_and_lists_alike_rfc9110_7_6_1() {
        let flags = |v: &[u8]| {
            let mut f = ConnectionFlags::default();
            f.add(v);
            (f.close, f.keep_alive, f.other)
        };
        assert_eq!(flags(b"keep-alive"), (false, true, false));
        assert_eq!(flags(b" Keep-Alive\t"), (false, true, false));
        assert_eq!(flags(b"CLOSE"), (true, false, false));
        assert_eq!(flags(b"close, keep-alive"), (true, true, false));
        assert_eq!(flags(b"keep-alive, x-opt"), (false, true, true));
        assert_eq!(flags(b"keep-alivex"), (false, false, true));
        assert_eq!(flags(b", ,"), (false, false, false));
        assert_eq!(flags(b""), (false, false, false));
    }

    #[test]
    fn framing_names_with_underscores() {
        for n in [
            &b"Content_Length"[..],
            b"content_length",
            b"CONTENT_LENGTH",
            b"Transfer_Encoding",
            b"transfer_encoding",
            b"TRANSFER_ENCODING",
        ] {
            assert!(is_framing_name_with_underscore(n), "{n:?}");
        }
        for n in [
            &b"Content-Length"[..],
            b"transfer-encoding",
            b"Content_Length_",
            b"Content_Lengt",
            b"Content_Lengtx",
            b"Transfer_Encodin_",
            b"X_Length",
            b"content__length",
            b"_______________",
            b"",
        ] {
            assert!(!is_framing_name_with_underscore(n), "{n:?}");
        }
    }

    #[test]
    fn content_length_values() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"42"), Some(42));
        assert_eq!(parse_content_length(b"42, 42"), Some(42));
        assert_eq!(parse_content_length(b"42,43"), None);
        assert_eq!(parse_content_length(b"+42"), None);
        assert_eq!(parse_content_length(b"-1"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"4 2"), None);
        assert_eq!(parse_content_length(b"0x10"), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
        assert_eq!(parse_content_length(b"18446744073709551615"), None);
        assert_eq!(
            parse_content_length(b"9999999999999999999"),
            Some(9999999999999999999)
        );
    }

    #[test]
    fn span_of_a_part_outside_the_base_is_empty() {
        let base = b"GET / HTTP/1.1";
        assert_eq!(Span::of(base, &base[4..5]), Span { start: 4, end: 5 });
        assert_eq!(Span::of(base, &base[14..]), Span { start: 14, end: 14 });
        assert_eq!(Span::of(base, b"elsewhere"), Span::default());
        assert_eq!(Span::of(&base[4..], &base[..3]), Span::default());
    }

    #[test]
    fn authorities() {
        for ok in [
            &b"example.com"[..],
            b"example.com:8080",
            b"EXAMPLE.com.",
            b"a",
            b"a:",
            b"a:0",
            b"a:65535",
            b"a:00080",
            b"127.0.0.1",
            b"127.0.0.1:80",
            b"my_host.internal",
            b"x~y-z",
            b"[::1]",
            b"[::1]:443",
            b"[::1]:",
            b"[2001:db8::1]",
            b"[::ffff:192.0.2.1]:80",
        ] {
            assert!(valid_authority(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b":80",
            b"a:65536",
            b"a:99999999999999999999",
            b"a:8o",
            b"a:-1",
            b"a:+80",
            b"a:80:80",
            b"a b",
            b" a",
            b"a/",
            b"a/path",
            b"a?q",
            b"a#f",
            b"u@a",
            b"u:p@a",
            b"a,b",
            b"a, b",
            b"a;b",
            b"%61pi",
            b"a\tb",
            b"a\x7f",
            b"\xc3\xa9.com",
            b"[::1",
            b"::1",
            b"[::1]x",
            b"[::g]",
            b"[1:2:3:4:5:6:7:8:9]",
            b"[v1.abc]",
            b"[fe80::1%25eth0]",
            b"[]",
            b"[127.0.0.1]",
            b"[::1]:65536",
        ] {
            assert!(!valid_authority(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn list_items_trim() {
        let v: Vec<&[u8]> = list_items(b" close , ,Keep-Alive\t").collect();
        assert_eq!(v, vec![&b"close"[..], &b"Keep-Alive"[..]]);
    }
}
