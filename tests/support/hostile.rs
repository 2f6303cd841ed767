//! Hostile upstream servers: each misbehaves in one way on every request except `GET /ok`,
//! which gets a normal `200` with the body `fine`, so that a test can check that the gateway
//! still serves (on the same upstream, possibly over a pooled connection) afterwards.

use std::sync::Arc;
use std::time::Duration;

use super::{Event, Reply, Req, Step, Upstream};

/// The body of the normal answer to `GET /ok`.
pub const FINE: &[u8] = b"fine";

/// A complete response a poisoned pooled connection would deliver to the next client.
pub const POISON: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned";

/// One way of misbehaving.
#[derive(Clone)]
pub enum Hostile {
    /// A response head of `bytes` bytes (one huge header).
    OversizedHead(usize),
    /// A response head with `n` header lines.
    TooManyHeaders(usize),
    /// `n` interim `103 Early Hints` responses, then `200 fine`.
    InterimFlood(usize),
    /// One `103` carrying hop-by-hop fields (Connection, Keep-Alive, Transfer-Encoding and a
    /// field named in Connection) and a Link, then `200 fine`.
    InterimHopByHop,
    /// A chunked `200` whose first chunk-size line is this (sent with the head).
    BadFirstChunk(&'static [u8]),
    /// A chunked `200` with a good first chunk, then (after the client got it) this line.
    BadLaterChunk(&'static [u8]),
    /// The head of a bodiless response (`HEAD`, `204`, `304`: `status`), then after a pause
    /// [`POISON`]; `sent` is set once the poison was written. The connection stays open.
    LateBytesAfterBodiless { status: u16, sent: Arc<Event> },
    /// A complete `200` with a 4-byte body, then, 60 ms later (after the gateway pooled the
    /// connection), a whole second response ([`POISON`]); `sent` is set once it is written.
    LateBytesAfterComplete { sent: Arc<Event> },
    /// An HTTP/1.0 response with `Connection: keep-alive` and a chunked Transfer-Encoding.
    Http10Chunked,
    /// `Content-Length: 100`, 10 bytes of body, then close.
    EarlyClose,
    /// `Content-Length: 4` followed by more bytes than that ([`POISON`]) in the same write.
    LongerThanLength,
}

/// A `200` with the body `fine`.
pub fn fine() -> Vec<u8> {
    super::ok_response(FINE)
}

/// What a hostile upstream answers to `req`.
pub fn reply(h: &Hostile, req: &Req) -> Reply {
    if req.method == "GET" && req.target == "/ok" {
        return Reply::Raw(fine());
    }
    match h {
        Hostile::OversizedHead(bytes) => {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-big: ".to_vec();
            v.resize(v.len() + bytes, b'a');
            v.extend_from_slice(b"\r\n\r\nfine");
            Reply::RawClose(v)
        }
        Hostile::TooManyHeaders(n) => {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n".to_vec();
            for i in 0..*n {
                v.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
            }
            v.extend_from_slice(b"\r\nfine");
            Reply::RawClose(v)
        }
        Hostile::InterimFlood(n) => {
            let mut v = Vec::new();
            for _ in 0..*n {
                v.extend_from_slice(
                    b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n",
                );
            }
            v.extend_from_slice(&fine());
            Reply::Raw(v)
        }
        Hostile::InterimHopByHop => {
            let mut v = b"HTTP/1.1 103 Early Hints\r\nconnection: keep-alive, x-secret\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nx-secret: 1\r\nlink: </s.css>; rel=preload\r\n\r\n".to_vec();
            v.extend_from_slice(&fine());
            Reply::Raw(v)
        }
        Hostile::BadFirstChunk(line) => {
            let mut v = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            v.extend_from_slice(line);
            Reply::RawClose(v)
        }
        Hostile::BadLaterChunk(line) => Reply::Script(vec![
            Step::Write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec()),
            Step::Wait(Duration::from_millis(100)),
            Step::Write(line.to_vec()),
            Step::Close,
        ]),
        Hostile::LateBytesAfterBodiless { status, sent } => {
            let head = match status {
                204 => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                304 => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 4\r\n\r\n".to_vec(),
                // HEAD: the length of the body a GET would have had.
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n".to_vec(),
            };
            Reply::Script(vec![
                Step::Write(head),
                Step::Wait(Duration::from_millis(60)),
                Step::Write(POISON.to_vec()),
                Step::Signal(sent.clone()),
            ])
        }
        Hostile::LateBytesAfterComplete { sent } => Reply::Script(vec![
            Step::Write(fine()),
            Step::Wait(Duration::from_millis(60)),
            Step::Write(POISON.to_vec()),
            Step::Signal(sent.clone()),
        ]),
        Hostile::Http10Chunked => Reply::Raw(
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n4\r\nfine\r\n0\r\n\r\n".to_vec(),
        ),
        Hostile::EarlyClose => Reply::RawClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec(),
        ),
        Hostile::LongerThanLength => {
            let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfine".to_vec();
            v.extend_from_slice(POISON);
            Reply::Raw(v)
        }
    }
}

/// An upstream that misbehaves as `h` says (and serves `GET /ok` normally). Idle connections
/// are closed after 2 s, so that a gateway waiting for a close is not stuck for long.
pub fn start(h: Hostile) -> Upstream {
    Upstream::start_with(Some(Duration::from_secs(2)), move |req| reply(&h, req))
}
