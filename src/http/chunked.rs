//! Chunked transfer coding (RFC 9112 §7.1) as an incremental scanner.
//!
//! The scanner walks a body's bytes in any pieces, reports where the data of each chunk lies,
//! and says where the message ends. Because it validates every framing byte (strict CRLF, hex
//! sizes with overflow checks, bounded extensions and trailers), ringway can forward an already
//! chunked body as it is, or take the data out when the peer needs another framing.

/// Longest chunk-size line extension ringway accepts.
pub const MAX_CHUNK_EXT_BYTES: usize = 4096;
/// Most bytes of trailer fields accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// A chunk size that is not hex, or is missing.
    BadSize,
    /// A chunk size above `u64::MAX` (or more than 16 hex digits).
    SizeOverflow,
    /// A line not ended by CRLF, or data not followed by CRLF.
    BadLineEnding,
    /// Chunk extension longer than [`MAX_CHUNK_EXT_BYTES`].
    ExtensionTooLong,
    /// Trailer section longer than [`MAX_TRAILER_BYTES`] or malformed.
    BadTrailer,
}

impl ChunkError {
    pub fn reason(&self) -> &'static str {
        match self {
            ChunkError::BadSize => "malformed chunk size",
            ChunkError::SizeOverflow => "chunk size overflows",
            ChunkError::BadLineEnding => "malformed chunk line ending",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::BadTrailer => "malformed or oversized trailer",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` so far.
    Size {
        digits: u8,
    },
    /// After the size: optional whitespace, then `;ext` or CR.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Result of one [`ChunkedScanner::scan`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan {
    /// Bytes of the input that belong to this message (all of it unless `done`).
    pub consumed: usize,
    /// The final CRLF of the message was seen.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct ChunkedScanner {
    state: State,
    size: u64,
    line_bytes: usize,
    trailer_bytes: usize,
    /// The current trailer line has its field-name colon.
    colon_seen: bool,
    /// Data bytes seen so far (for body-size limits).
    pub data_total: u64,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedScanner {
    pub fn new() -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            size: 0,
            line_bytes: 0,
            trailer_bytes: 0,
            colon_seen: false,
            data_total: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `buf`, calling `on_data(start, end)` for each run of chunk data inside it.
    pub fn scan(
        &mut self,
        buf: &[u8],
        mut on_data: impl FnMut(usize, usize),
    ) -> Result<Scan, ChunkError> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Size { digits } => {
                    let v = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        _ if digits == 0 => return Err(ChunkError::BadSize),
                        b';' | b' ' | b'\t' => {
                            self.state = State::Ext;
                            self.line_bytes = 0;
                            continue;
                        }
                        b'\r' => {
                            self.state = State::SizeLf;
                            i += 1;
                            continue;
                        }
                        b'\n' => return Err(ChunkError::BadLineEnding),
                        _ => return Err(ChunkError::BadSize),
                    };
                    if digits >= 16 {
                        return Err(ChunkError::SizeOverflow);
                    }
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(v as u64))
                        .ok_or(ChunkError::SizeOverflow)?;
                    self.state = State::Size { digits: digits + 1 };
                    i += 1;
                }
                State::Ext => {
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' | 0 => return Err(ChunkError::BadLineEnding),
                        _ => {
                            self.line_bytes += 1;
                            if self.line_bytes > MAX_CHUNK_EXT_BYTES {
                                return Err(ChunkError::ExtensionTooLong);
                            }
                        }
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let avail = (buf.len() - i) as u64;
                    let take = avail.min(self.size) as usize;
                    on_data(i, i + take);
                    i += take;
                    self.size -= take as u64;
                    self.data_total += take as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::Size { digits: 0 };
                    i += 1;
                }
                State::TrailerStart => {
                    match b {
                        b'\r' => self.state = State::EndLf,
                        // A trailer line may not start with whitespace (obs-fold) or a colon.
                        b' ' | b'\t' | b':' | b'\n' => return Err(ChunkError::BadTrailer),
                        _ => {
                            self.state = State::TrailerLine;
                            self.colon_seen = false;
                            continue;
                        }
                    }
                    i += 1;
                }
                State::TrailerLine => {
                    match b {
                        b'\r' => {
                            if !self.colon_seen {
                                return Err(ChunkError::BadTrailer);
                            }
                            self.state = State::TrailerLf;
                        }
                        b'\n' | 0 => return Err(ChunkError::BadTrailer),
                        b':' => self.colon_seen = true,
                        _ => {}
                    }
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err(ChunkError::BadTrailer);
                    }
                    i += 1;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadTrailer);
                    }
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    self.state = State::Done;
                    i += 1;
                    return Ok(Scan {
                        consumed: i,
                        done: true,
                    });
                }
                State::Done => {
                    return Ok(Scan {
                        consumed: i,
                        done: true,
                    })
                }
            }
        }
        Ok(Scan {
            consumed: i,
            done: self.state == State::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        let r = s.scan(input, |a, b| out.extend_from_slice(&input[a..b]))?;
        assert!(r.done, "not done: {:?}", String::from_utf8_lossy(input));
        Ok((out, r.consumed))
    }

    const VALID: &[u8] = b"5\r\nhello\r\nA;name=val\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";

    #[test]
    fn decodes_with_extensions_and_trailers() {
        let (data, n) = decode_all(VALID).unwrap();
        assert_eq!(data, b"hello0123456789");
        assert_eq!(n, VALID.len());
    }

    #[test]
    fn stops_at_message_end() {
        let mut input = VALID.to_vec();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (_, n) = decode_all(&input).unwrap();
        assert_eq!(n, VALID.len());
    }

    #[test]
    fn split_at_every_byte() {
        for split in 0..=VALID.len() {
            let mut s = ChunkedScanner::new();
            let mut out = Vec::new();
            let (a, b) = VALID.split_at(split);
            let r1 = s.scan(a, |x, y| out.extend_from_slice(&a[x..y])).unwrap();
            assert_eq!(r1.consumed, a.len());
            let r2 = s.scan(b, |x, y| out.extend_from_slice(&b[x..y])).unwrap();
            assert!(r2.done, "split {split}");
            assert_eq!(out, b"hello0123456789", "split {split}");
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for i in 0..VALID.len() {
            let mut s = ChunkedScanner::new();
            let r = s.scan(&VALID[..i], |_, _| {}).unwrap();
            assert!(!r.done, "prefix {i}");
            assert_eq!(r.consumed, i);
        }
    }

    #[test]
    fn byte_at_a_time() {
        let mut s = ChunkedScanner::new();
        let mut out = Vec::new();
        for (i, b) in VALID.iter().enumerate() {
            let one = [*b];
            let r = s
                .scan(&one, |x, y| out.extend_from_slice(&one[x..y]))
                .unwrap();
            assert_eq!(r.done, i == VALID.len() - 1);
        }
        assert_eq!(out, b"hello0123456789");
    }

    #[test]
    fn malformed_table() {
        let long_ext = format!(
            "1;{}\r\na\r\n0\r\n\r\n",
            "x".repeat(MAX_CHUNK_EXT_BYTES + 1)
        );
        let cases: Vec<(&[u8], ChunkError)> = vec![
            (b"g\r\n", ChunkError::BadSize),
            (b"\r\n", ChunkError::BadSize),
            (b"-1\r\n", ChunkError::BadSize),
            (b"0x5\r\n", ChunkError::BadSize),
            (b"10000000000000000\r\n", ChunkError::SizeOverflow),
            (b"5\nhello\r\n", ChunkError::BadLineEnding),
            (b"5\r\nhelloX\r\n", ChunkError::BadLineEnding),
            (b"5\r\nhello\rX", ChunkError::BadLineEnding),
            (b"5;a\nb\r\n", ChunkError::BadLineEnding),
            (b"0\r\n\n", ChunkError::BadTrailer),
            (b"0\r\n folded\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\nX: a\nY: b\r\n\r\n", ChunkError::BadTrailer),
            (b"0\r\n\rX", ChunkError::BadLineEnding),
            (long_ext.as_bytes(), ChunkError::ExtensionTooLong),
        ];
        for (input, want) in cases {
            let mut s = ChunkedScanner::new();
            assert_eq!(
                s.scan(input, |_, _| {}).unwrap_err(),
                want,
                "for {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn counts_data() {
        let mut s = ChunkedScanner::new();
        s.scan(VALID, |_, _| {}).unwrap();
        assert_eq!(s.data_total, 15);
    }
}
