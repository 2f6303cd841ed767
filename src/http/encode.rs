//! Small writers for HTTP/1.1 heads into a `BytesMut`.

use bytes::{BufMut, BytesMut};

#[inline]
pub fn put_u64(buf: &mut BytesMut, n: u64) {
    let mut b = itoa::Buffer::new();
    buf.put_slice(b.format(n).as_bytes());
}

#[inline]
pub fn put_header(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.reserve(name.len() + value.len() + 4);
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_slice(b"\r\n");
}

/// Copies header lines that pass through unchanged, merging neighbours into one copy.
///
/// A line of the original head is copied as it stands only when its bytes are exactly what
/// [`put_header`] would write for it (`name`, `": "`, `value`, CRLF): then consecutive kept
/// lines are one `put_slice` of the original bytes instead of four writes each. Any other
/// form (no space after the colon, more whitespace, a bare LF) is written by `put_header`, so
/// the output is byte for byte the same as writing every kept line with `put_header`.
pub struct LineRuns<'a> {
    raw: &'a [u8],
    start: usize,
    end: usize,
    merge: bool,
}

impl<'a> LineRuns<'a> {
    #[inline]
    pub fn new(raw: &'a [u8]) -> LineRuns<'a> {
        #[cfg(not(test))]
        let merge = true;
        #[cfg(test)]
        let merge = MERGE_IN_TESTS.with(|m| m.get());
        LineRuns {
            raw,
            start: 0,
            end: 0,
            merge,
        }
    }

    /// Writes the header line whose name and value are `name` and `value` (spans of the raw
    /// head), now or as part of the current run.
    #[inline]
    pub fn push(&mut self, out: &mut BytesMut, name: crate::http::Span, value: crate::http::Span) {
        let (ns, ne) = (name.start as usize, name.end as usize);
        let (vs, ve) = (value.start as usize, value.end as usize);
        let line_end = ve + 2;
        let exact = self.merge
            && vs == ne + 2
            && self.raw.get(ne..vs) == Some(b": ".as_slice())
            && self.raw.get(ve..line_end) == Some(b"\r\n".as_slice());
        if exact {
            if self.end != self.start && self.end == ns {
                self.end = line_end;
            } else {
                self.flush(out);
                self.start = ns;
                self.end = line_end;
            }
        } else {
            self.flush(out);
            put_header(out, name.get(self.raw), value.get(self.raw));
        }
    }

    /// Writes the pending run; call before writing anything else to `out`.
    #[inline]
    pub fn flush(&mut self, out: &mut BytesMut) {
        if self.end > self.start {
            if let Some(run) = self.raw.get(self.start..self.end) {
                out.put_slice(run);
            }
        }
        self.start = 0;
        self.end = 0;
    }
}

#[cfg(test)]
thread_local! {
    static MERGE_IN_TESTS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Runs `f` with line merging on or off (off: every line through `put_header`, the reference
/// the merged output is tested against).
#[cfg(test)]
pub fn merge_lines_in_tests<R>(merge: bool, f: impl FnOnce() -> R) -> R {
    MERGE_IN_TESTS.with(|m| m.set(merge));
    let r = f();
    MERGE_IN_TESTS.with(|m| m.set(true));
    r
}

pub fn put_status_line(buf: &mut BytesMut, status: u16, reason: &[u8]) {
    buf.put_slice(b"HTTP/1.1 ");
    put_u64(buf, status as u64);
    buf.put_u8(b' ');
    buf.put_slice(reason);
    buf.put_slice(b"\r\n");
}

/// Writes `len` in hex followed by CRLF: a chunk-size line.
pub fn put_chunk_size(buf: &mut BytesMut, len: usize) {
    let mut tmp = [0u8; 16];
    let mut i = tmp.len();
    let mut n = len;
    loop {
        i -= 1;
        tmp[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&tmp[i..]);
    buf.put_slice(b"\r\n");
}

/// Standard reason phrases for the statuses ringway itself produces.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        402 => "Payment Required",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Span;

    #[test]
    fn chunk_sizes() {
        for (n, s) in [
            (0usize, "0\r\n"),
            (10, "a\r\n"),
            (255, "ff\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut b = BytesMut::new();
            put_chunk_size(&mut b, n);
            assert_eq!(&b[..], s.as_bytes());
        }
    }

    fn span(raw: &[u8], part: &str) -> Span {
        let start = raw
            .windows(part.len())
            .position(|w| w == part.as_bytes())
            .unwrap();
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    #[test]
    fn neighbouring_exact_lines_are_one_copy_and_other_forms_are_rewritten() {
        let raw = b"A: 1\r\nB: 2\r\nC:3\r\nD: 4\r\n";
        let mut runs = LineRuns::new(raw);
        let mut out = BytesMut::new();
        runs.push(&mut out, span(raw, "A"), span(raw, "1"));
        runs.push(&mut out, span(raw, "B"), span(raw, "2"));
        assert!(out.is_empty(), "A and B wait as one run");
        // C has no space after its colon: the run is written, then C as put_header writes it.
        runs.push(&mut out, span(raw, "C"), span(raw, "3"));
        assert_eq!(&out[..], b"A: 1\r\nB: 2\r\nC: 3\r\n");
        runs.push(&mut out, span(raw, "D"), span(raw, "4"));
        runs.flush(&mut out);
        assert_eq!(&out[..], b"A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n");
        // A span outside the raw bytes (httparse's empty value) is written, never panics.
        runs.push(&mut out, span(raw, "A"), Span::default());
        runs.flush(&mut out);
        assert!(out.ends_with(b"A: \r\n"));
    }
}
