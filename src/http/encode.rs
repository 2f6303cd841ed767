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
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
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
}
