//! Chunked transfer coding (RFC 9112 §7.1) as an incremental scanner, and a re-framer.
//!
//! The scanner walks a body's bytes in any pieces, reports where the data of each chunk lies,
//! and says where the message ends. It validates every framing byte: strict CRLF, hex sizes
//! with overflow checks, the chunk-extension grammar of RFC 9112 §7.1.1 (bounded), and
//! trailer field lines (bounded). ringway can then take the data out when the peer needs
//! another framing.
//!
//! Request bodies are not forwarded as received: [`ChunkedReframer`] writes the canonical form
//! of the same body (no chunk extensions, no leading zeros in sizes, trailer fields dropped or
//! filtered), so that an upstream never sees an extension or a trailer it might read
//! differently from ringway. A body that already is canonical, the common case, is reported
//! as such and can be forwarded without a copy.

use bytes::BytesMut;

use super::{is_hop_by_hop, is_tchar};

/// Longest chunk extension (everything between the size and the CRLF) ringway accepts.
pub const MAX_CHUNK_EXT_BYTES: usize = 4096;
/// Most bytes of trailer fields accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Most hex digits in a chunk size: 16 fill a `u64`.
const MAX_SIZE_DIGITS: usize = 16;

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
    /// A chunk extension outside the grammar of RFC 9112 §7.1.1 (`5;`, `5;a[`, an unterminated
    /// quoted string, whitespace after the size not followed by `;`).
    BadExtension,
    /// Trailer section longer than [`MAX_TRAILER_BYTES`] or malformed.
    BadTrailer,
    /// [`reframe_body`] was given a body that does not end.
    Truncated,
}

impl ChunkError {
    pub fn reason(&self) -> &'static str {
        match self {
            ChunkError::BadSize => "malformed chunk size",
            ChunkError::SizeOverflow => "chunk size overflows",
            ChunkError::BadLineEnding => "malformed chunk line ending",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::BadExtension => "malformed chunk extension",
            ChunkError::BadTrailer => "malformed or oversized trailer",
            ChunkError::Truncated => "chunked body ends early",
        }
    }
}

/// Where the scanner is inside a chunk extension:
/// `chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ext {
    /// Whitespace after the size: only more whitespace or `;` may follow.
    AfterSize,
    /// After `;`: whitespace, then a token.
    BeforeName,
    Name,
    /// Whitespace after a name: `=` or `;` must follow.
    AfterName,
    /// After `=`: whitespace, then a token or a quoted string.
    BeforeValue,
    Value,
    Quoted,
    QuotedEscape,
    /// Just after a closing quote: CR, whitespace or `;`.
    AfterQuote,
    /// Whitespace after a value: `;` must follow.
    AfterValue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size; `digits` so far.
    Size {
        digits: u8,
    },
    Ext(Ext),
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
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
    ext_bytes: usize,
    trailer_bytes: usize,
    /// Data bytes seen so far (for body-size limits).
    pub data_total: u64,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        Self::new()
    }
}

/// What the scan loop tells about each byte. Plain scanning cares only for data; the
/// re-framer also sorts framing bytes into kept, left out and trailer.
trait Sink {
    /// Stop before a chunk-size line whose digits and the byte after them are not all in the
    /// input yet, so that leading zeros can be told from the last digit.
    const WHOLE_SIZE: bool;
    /// Stop before the first trailer field line, leaving it unscanned: its consumer takes the
    /// rest of the message from there ([`ChunkedReframer::from_scanner`]).
    const STOP_AT_TRAILER: bool = false;
    /// `input[a..b]` is chunk data.
    fn data(&mut self, a: usize, b: usize);
    /// `input[i]` is framing that the canonical form keeps.
    fn keep(&mut self, i: usize);
    /// `input[i]` is framing that the canonical form leaves out: an extension byte or a
    /// leading zero of a size.
    fn omit(&mut self, i: usize);
    /// `input[i]` belongs to a trailer field line (its CRLF included).
    fn trailer(&mut self, i: usize, b: u8);
}

/// A sink of data only; `STOP`: it stops at the first trailer field line.
struct DataOnly<F, const STOP: bool>(F);

impl<F: FnMut(usize, usize), const STOP: bool> Sink for DataOnly<F, STOP> {
    const WHOLE_SIZE: bool = false;
    const STOP_AT_TRAILER: bool = STOP;
    #[inline]
    fn data(&mut self, a: usize, b: usize) {
        (self.0)(a, b)
    }
    #[inline]
    fn keep(&mut self, _: usize) {}
    #[inline]
    fn omit(&mut self, _: usize) {}
    #[inline]
    fn trailer(&mut self, _: usize, _: u8) {}
}

#[inline]
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `qdtext` of RFC 9110 §5.6.4.
#[inline]
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E | 0x80..=0xFF)
}

/// What may follow the backslash of a `quoted-pair` (RFC 9110 §5.6.4).
#[inline]
fn is_quoted_pair_char(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21..=0x7E | 0x80..=0xFF)
}

impl ChunkedScanner {
    pub fn new() -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            size: 0,
            ext_bytes: 0,
            trailer_bytes: 0,
            data_total: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Data bytes the body has already declared: those seen plus the rest of the chunk whose
    /// size was read. The final total is never less, so a body limit is exceeded as soon as
    /// a chunk-size line says so, before that chunk's data arrives.
    pub fn declared_total(&self) -> u64 {
        self.data_total.saturating_add(self.size)
    }

    /// Scans `buf`, calling `on_data(start, end)` for each run of chunk data inside it.
    pub fn scan(
        &mut self,
        buf: &[u8],
        on_data: impl FnMut(usize, usize),
    ) -> Result<Scan, ChunkError> {
        self.run(buf, &mut DataOnly::<_, false>(on_data))
    }

    /// [`scan`](Self::scan), stopping before the first trailer field line: then `consumed`
    /// is where that line starts, [`at_trailer`](Self::at_trailer) is true, and the rest of
    /// the message is for a [`ChunkedReframer::from_scanner`] to filter. A body without
    /// trailer fields scans exactly as with [`scan`](Self::scan).
    pub fn scan_to_trailer(
        &mut self,
        buf: &[u8],
        on_data: impl FnMut(usize, usize),
    ) -> Result<Scan, ChunkError> {
        self.run(buf, &mut DataOnly::<_, true>(on_data))
    }

    /// The last chunk was read and the trailer section (maybe empty) is next: the state
    /// [`scan_to_trailer`](Self::scan_to_trailer) stops in.
    pub fn at_trailer(&self) -> bool {
        self.state == State::TrailerStart
    }

    /// The extension state after byte `b` in state `e`, or the error it makes.
    fn ext_step(e: Ext, b: u8) -> Result<Option<Ext>, ChunkError> {
        use Ext::*;
        let ws = matches!(b, b' ' | b'\t');
        let next = match e {
            AfterSize if ws => AfterSize,
            AfterSize if b == b';' => BeforeName,
            BeforeName if ws => BeforeName,
            BeforeName if is_tchar(b) => Name,
            Name if is_tchar(b) => Name,
            Name if ws => AfterName,
            AfterName if ws => AfterName,
            Name | AfterName if b == b'=' => BeforeValue,
            Name | AfterName if b == b';' => BeforeName,
            BeforeValue if ws => BeforeValue,
            BeforeValue if b == b'"' => Quoted,
            BeforeValue if is_tchar(b) => Value,
            Value if is_tchar(b) => Value,
            Value | AfterQuote | AfterValue if ws => AfterValue,
            Value | AfterQuote | AfterValue if b == b';' => BeforeName,
            Quoted if b == b'"' => AfterQuote,
            Quoted if b == b'\\' => QuotedEscape,
            Quoted if is_qdtext(b) => Quoted,
            QuotedEscape if is_quoted_pair_char(b) => Quoted,
            // The line may end only after a name, a value or a closing quote.
            Name | Value | AfterQuote if b == b'\r' => return Ok(None),
            _ if b == b'\n' => return Err(ChunkError::BadLineEnding),
            _ => return Err(ChunkError::BadExtension),
        };
        Ok(Some(next))
    }

    fn run<S: Sink>(&mut self, buf: &[u8], sink: &mut S) -> Result<Scan, ChunkError> {
        let mut i = 0;
        // With `S::WHOLE_SIZE`: where the digits of the current size line end in `buf`.
        let mut digits_end = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Size { digits } => {
                    if S::WHOLE_SIZE && digits == 0 {
                        let run = buf[i..]
                            .iter()
                            .take(MAX_SIZE_DIGITS + 1)
                            .take_while(|b| hex_value(**b).is_some())
                            .count();
                        if i + run == buf.len() && run <= MAX_SIZE_DIGITS {
                            // The size may go on in the next read: leave the line for then.
                            return Ok(Scan {
                                consumed: i,
                                done: false,
                            });
                        }
                        digits_end = i + run;
                    }
                    let v = match hex_value(b) {
                        Some(v) => v,
                        None if digits == 0 => return Err(ChunkError::BadSize),
                        None => {
                            match b {
                                b';' => self.state = State::Ext(Ext::BeforeName),
                                b' ' | b'\t' => self.state = State::Ext(Ext::AfterSize),
                                b'\r' => {
                                    self.state = State::SizeLf;
                                    sink.keep(i);
                                    i += 1;
                                    continue;
                                }
                                b'\n' => return Err(ChunkError::BadLineEnding),
                                _ => return Err(ChunkError::BadSize),
                            }
                            self.ext_bytes = 1;
                            sink.omit(i);
                            i += 1;
                            continue;
                        }
                    };
                    if digits as usize >= MAX_SIZE_DIGITS {
                        return Err(ChunkError::SizeOverflow);
                    }
                    // A zero before other digits is left out of the canonical form.
                    if S::WHOLE_SIZE && v == 0 && self.size == 0 && i + 1 < digits_end {
                        sink.omit(i);
                    } else {
                        sink.keep(i);
                    }
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(v as u64))
                        .ok_or(ChunkError::SizeOverflow)?;
                    self.state = State::Size { digits: digits + 1 };
                    i += 1;
                }
                State::Ext(e) => {
                    match Self::ext_step(e, b)? {
                        Some(next) => {
                            self.ext_bytes += 1;
                            if self.ext_bytes > MAX_CHUNK_EXT_BYTES {
                                return Err(ChunkError::ExtensionTooLong);
                            }
                            self.state = State::Ext(next);
                            sink.omit(i);
                        }
                        None => {
                            self.state = State::SizeLf;
                            sink.keep(i);
                        }
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    sink.keep(i);
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
                    sink.data(i, i + take);
                    i += take;
                    self.size -= take as u64;
                    self.data_total = self.data_total.saturating_add(take as u64);
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    sink.keep(i);
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    sink.keep(i);
                    self.state = State::Size { digits: 0 };
                    i += 1;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                        sink.keep(i);
                        i += 1;
                        continue;
                    }
                    // A field line starts with its name: not whitespace (obs-fold), not a
                    // colon (RFC 9112 §5.1, §5.2).
                    if !is_tchar(b) {
                        return Err(ChunkError::BadTrailer);
                    }
                    if S::STOP_AT_TRAILER {
                        return Ok(Scan {
                            consumed: i,
                            done: false,
                        });
                    }
                    self.state = State::TrailerName;
                    continue;
                }
                State::TrailerName | State::TrailerValue | State::TrailerLf => {
                    self.state = match (self.state, b) {
                        (State::TrailerName, b':') => State::TrailerValue,
                        (State::TrailerName, _) if is_tchar(b) => State::TrailerName,
                        (State::TrailerValue, b'\r') => State::TrailerLf,
                        (State::TrailerValue, _) if super::is_field_value_byte(b) => {
                            State::TrailerValue
                        }
                        (State::TrailerLf, b'\n') => State::TrailerStart,
                        _ => return Err(ChunkError::BadTrailer),
                    };
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err(ChunkError::BadTrailer);
                    }
                    sink.trailer(i, b);
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::BadLineEnding);
                    }
                    sink.keep(i);
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

/// What becomes of the trailer fields of a re-framed body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrailerPolicy {
    /// No trailer field is forwarded (the default).
    #[default]
    Drop,
    /// Only fields that may appear in a trailer are forwarded: see [`trailer_allowed`].
    Filter,
}

/// Fields RFC 9110 §6.5.1 keeps out of trailers: framing, routing, request modifiers
/// (controls and conditionals), authentication, response control data and content
/// processing, plus the forwarding headers the gateway itself sets. Lower case.
const TRAILER_DENY: &[&[u8]] = &[
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"authorization",
    b"proxy-authorization",
    b"authentication-info",
    b"proxy-authentication-info",
    b"www-authenticate",
    b"proxy-authenticate",
    b"cookie",
    b"set-cookie",
    b"content-encoding",
    b"content-type",
    b"content-range",
    b"trailer",
    b"te",
    b"expect",
    b"max-forwards",
    b"cache-control",
    b"pragma",
    b"range",
    b"age",
    b"expires",
    b"date",
    b"location",
    b"retry-after",
    b"vary",
    b"warning",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
    b"x-request-id",
    b"via",
];

/// May a trailer field with this name be forwarded under [`TrailerPolicy::Filter`]? Not the
/// fields of [`TRAILER_DENY`], no conditional (`If-*`), no hop-by-hop field, and no name
/// holding `_` (see `Limits::allow_underscores_in_headers`).
pub fn trailer_allowed(name: &[u8]) -> bool {
    !(name.is_empty()
        || name.contains(&b'_')
        || (name.len() >= 3 && name[..3].eq_ignore_ascii_case(b"if-"))
        || is_hop_by_hop(name)
        || TRAILER_DENY.iter().any(|d| d.eq_ignore_ascii_case(name)))
}

/// Result of one [`ChunkedReframer::reframe`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reframe {
    /// Input bytes used. Less than the input, without `done`, when the input ends inside a
    /// chunk size: call again with the rest and more bytes.
    pub consumed: usize,
    /// The message ended.
    pub done: bool,
    /// `input[..consumed]` already is canonical: forward it as it is; nothing was written to
    /// `out`. Otherwise the canonical bytes for `input[..consumed]` were appended to `out`.
    pub verbatim: bool,
}

/// Validates a chunked body and produces its canonical encoding: each chunk's size in hex
/// without leading zeros or extensions, its data unchanged, the last chunk `0\r\n`, trailer
/// fields per the [`TrailerPolicy`], and the final CRLF. Incremental like
/// [`ChunkedScanner::scan`]; only a trailer field line under `Filter` is kept between calls
/// (in a buffer the re-framer owns and reuses across [`reset`](Self::reset)s).
#[derive(Clone, Debug)]
pub struct ChunkedReframer {
    scanner: ChunkedScanner,
    policy: TrailerPolicy,
    line: Vec<u8>,
}

impl ChunkedReframer {
    pub fn new(policy: TrailerPolicy) -> Self {
        ChunkedReframer {
            scanner: ChunkedScanner::new(),
            policy,
            line: Vec::new(),
        }
    }

    /// Takes over a body from `scanner` where it stands (after
    /// [`ChunkedScanner::scan_to_trailer`] stopped at a trailer field line, say): the output
    /// is then the canonical form of the rest of the body only.
    pub fn from_scanner(scanner: ChunkedScanner, policy: TrailerPolicy) -> Self {
        ChunkedReframer {
            scanner,
            policy,
            line: Vec::new(),
        }
    }

    /// Ready for another body, with another policy; the trailer buffer keeps its capacity.
    pub fn reset(&mut self, policy: TrailerPolicy) {
        self.scanner = ChunkedScanner::new();
        self.policy = policy;
        self.line.clear();
    }

    /// Data bytes seen so far.
    pub fn data_total(&self) -> u64 {
        self.scanner.data_total
    }

    /// Data bytes declared so far (for body-size limits): see
    /// [`ChunkedScanner::declared_total`].
    pub fn declared_total(&self) -> u64 {
        self.scanner.declared_total()
    }

    pub fn is_done(&self) -> bool {
        self.scanner.is_done()
    }

    /// Re-frames the next piece of a body. On error, `out` may hold part of the output: the
    /// body is refused and nothing of it should be sent.
    pub fn reframe(&mut self, input: &[u8], out: &mut BytesMut) -> Result<Reframe, ChunkError> {
        self.reframe_with(input, out, |_| false)
    }

    /// [`reframe`](Self::reframe), with `deny(name)` removing more trailer fields under
    /// `Filter` (the gateway's identity headers, for one).
    pub fn reframe_with(
        &mut self,
        input: &[u8],
        out: &mut BytesMut,
        deny: impl FnMut(&[u8]) -> bool,
    ) -> Result<Reframe, ChunkError> {
        let mut e = Emit {
            input,
            out,
            run_start: 0,
            run_end: 0,
            diverged: false,
            policy: self.policy,
            line: &mut self.line,
            deny,
        };
        let r = self.scanner.run(input, &mut e)?;
        if e.diverged {
            e.flush();
        }
        Ok(Reframe {
            consumed: r.consumed,
            done: r.done,
            verbatim: !e.diverged,
        })
    }
}

/// The re-framer's sink: input bytes kept in a row are copied to `out` in one go, and only
/// once the output has diverged from the input.
struct Emit<'a, D> {
    input: &'a [u8],
    out: &'a mut BytesMut,
    /// The run of kept input bytes not yet copied.
    run_start: usize,
    run_end: usize,
    /// Some input byte was left out: the output is not `input[..consumed]`.
    diverged: bool,
    policy: TrailerPolicy,
    line: &'a mut Vec<u8>,
    deny: D,
}

impl<D> Emit<'_, D> {
    #[inline]
    fn keep_range(&mut self, a: usize, b: usize) {
        if a != self.run_end {
            self.flush();
            self.run_start = a;
        }
        self.run_end = b;
    }

    fn flush(&mut self) {
        // Until the output diverges, the kept run is the input itself: nothing to copy.
        if !self.diverged {
            return;
        }
        if self.run_end > self.run_start {
            self.out
                .extend_from_slice(&self.input[self.run_start..self.run_end]);
        }
        self.run_start = self.run_end;
    }
}

impl<D: FnMut(&[u8]) -> bool> Sink for Emit<'_, D> {
    const WHOLE_SIZE: bool = true;

    #[inline]
    fn data(&mut self, a: usize, b: usize) {
        self.keep_range(a, b);
    }

    #[inline]
    fn keep(&mut self, i: usize) {
        self.keep_range(i, i + 1);
    }

    #[inline]
    fn omit(&mut self, _: usize) {
        self.diverged = true;
    }

    fn trailer(&mut self, _: usize, b: u8) {
        self.diverged = true;
        if self.policy == TrailerPolicy::Drop {
            return;
        }
        // The scanner bounds the trailer section, and with it this line.
        self.line.push(b);
        if b == b'\n' {
            let colon = self.line.iter().position(|c| *c == b':').unwrap_or(0);
            let name = &self.line[..colon];
            if trailer_allowed(name) && !(self.deny)(name) {
                self.flush();
                self.out.extend_from_slice(self.line);
            }
            self.line.clear();
        }
    }
}

/// Re-frames a complete chunked body held in one buffer (a body kept for retries): the same
/// bytes back, without a copy, when they already are canonical.
pub fn reframe_body(raw: bytes::Bytes, policy: TrailerPolicy) -> Result<bytes::Bytes, ChunkError> {
    let mut r = ChunkedReframer::new(policy);
    let mut out = BytesMut::new();
    let f = r.reframe(&raw, &mut out)?;
    if !f.done {
        return Err(ChunkError::Truncated);
    }
    Ok(if f.verbatim {
        raw.slice(..f.consumed)
    } else {
        out.freeze()
    })
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

    /// RFC 9112 §7.1.1: what a chunk line may hold after its size.
    #[test]
    fn extension_table() {
        let good: &[&[u8]] = &[
            b"5;a\r\n",
            b"5;a=b\r\n",
            b"5 ;a\r\n",
            b"5\t; a = b ; c\r\n",
            b"5;a=\"\"\r\n",
            b"5;a=\"x y;z=\\\"q\\\\\"\r\n",
            b"5;a=\"v\" ;b=c\r\n",
            b"5;a=\"\xe9\"\r\n",
            b"5;!#$%&'*+-.^_`|~=x\r\n",
            b"0005\r\n",
            b"5;a;b;c=1\r\n",
        ];
        for line in good {
            let mut s = ChunkedScanner::new();
            let r = s.scan(line, |_, _| {});
            assert_eq!(
                r.map(|r| r.consumed),
                Ok(line.len()),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        let bad: &[(&[u8], ChunkError)] = &[
            (b"5;\r\n", ChunkError::BadExtension),
            (b"5; \r\n", ChunkError::BadExtension),
            (b"5;;a\r\n", ChunkError::BadExtension),
            (b"5;bad[=x\r\n", ChunkError::BadExtension),
            (b"5;a=\r\n", ChunkError::BadExtension),
            (b"5;a=b c\r\n", ChunkError::BadExtension),
            (b"5;a=\"unterminated\r\n", ChunkError::BadExtension),
            (b"5;a=\"x\"y\r\n", ChunkError::BadExtension),
            (b"5;a=\"\x01\"\r\n", ChunkError::BadExtension),
            (b"5;a=\"\\\x00\"\r\n", ChunkError::BadExtension),
            (b"5;a \r\n", ChunkError::BadExtension),
            (b"5;a=b \r\n", ChunkError::BadExtension),
            (b"5 \r\n", ChunkError::BadExtension),
            (b"5\t\r\n", ChunkError::BadExtension),
            (b"5 a\r\n", ChunkError::BadExtension),
            (b"5;=b\r\n", ChunkError::BadExtension),
            (b"5;a==b\r\n", ChunkError::BadExtension),
            (b"5;a\x7f\r\n", ChunkError::BadExtension),
            (b"5;a=\"x\nb\r\n", ChunkError::BadLineEnding),
            (b" 5\r\n", ChunkError::BadSize),
            (b"+5\r\n", ChunkError::BadSize),
            (b"0x5\r\n", ChunkError::BadSize),
            (b"5-\r\n", ChunkError::BadSize),
            (b"5,\r\n", ChunkError::BadSize),
            (b"5\r\r\n", ChunkError::BadLineEnding),
        ];
        for (line, want) in bad {
            let mut s = ChunkedScanner::new();
            assert_eq!(
                s.scan(line, |_, _| {}),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn trailer_table() {
        let good: &[&[u8]] = &[
            b"0\r\n\r\n",
            b"0\r\nX: y\r\n\r\n",
            b"0\r\nX:\r\n\r\n",
            b"0\r\nX: a\tb \xff\r\nY-Z:q\r\n\r\n",
        ];
        for body in good {
            let mut s = ChunkedScanner::new();
            let r = s.scan(body, |_, _| {}).unwrap();
            assert!(r.done, "{:?}", String::from_utf8_lossy(body));
        }
        let bad: &[&[u8]] = &[
            b"0\r\nX : y\r\n\r\n",
            b"0\r\n: y\r\n\r\n",
            b"0\r\nX\r\n\r\n",
            b"0\r\nX(: y\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
            b"0\r\nX: a\x7f\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
            b"0\r\n\tX: y\r\n\r\n",
        ];
        for body in bad {
            let mut s = ChunkedScanner::new();
            assert_eq!(
                s.scan(body, |_, _| {}),
                Err(ChunkError::BadTrailer),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let big = format!("0\r\nX: {}\r\n\r\n", "v".repeat(MAX_TRAILER_BYTES));
        let mut s = ChunkedScanner::new();
        assert_eq!(
            s.scan(big.as_bytes(), |_, _| {}),
            Err(ChunkError::BadTrailer)
        );
    }

    /// Re-frames `input` fed in pieces cut at `cuts`, as a caller would: what is not consumed
    /// is carried over to the next call.
    fn reframe_pieces(
        input: &[u8],
        cuts: &[usize],
        policy: TrailerPolicy,
    ) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut r = ChunkedReframer::new(policy);
        let mut out = BytesMut::new();
        let mut wire = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut used = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(fed, input.len());
            pending.extend_from_slice(&input[fed..cut]);
            fed = cut;
            let f = r.reframe(&pending, &mut out)?;
            if f.verbatim {
                assert!(out.is_empty());
                wire.extend_from_slice(&pending[..f.consumed]);
            } else {
                wire.extend_from_slice(&out.split());
            }
            used += f.consumed;
            pending.drain(..f.consumed);
            if f.done {
                return Ok((wire, used));
            }
        }
        Err(ChunkError::Truncated)
    }

    #[test]
    fn reframe_canonical_body_is_verbatim() {
        let body: &[u8] = b"5\r\nhello\r\na\r\n0123456789\r\n0\r\n\r\nGET /next";
        let mut r = ChunkedReframer::new(TrailerPolicy::Drop);
        let mut out = BytesMut::new();
        let f = r.reframe(body, &mut out).unwrap();
        assert_eq!(
            f,
            Reframe {
                consumed: body.len() - 9,
                done: true,
                verbatim: true
            }
        );
        assert!(out.is_empty());
        assert_eq!(r.data_total(), 15);
    }

    #[test]
    fn reframe_table() {
        let cases: &[(&[u8], TrailerPolicy, &[u8])] = &[
            (
                b"5;a=b\r\nhello\r\n0;x\r\n\r\n",
                TrailerPolicy::Drop,
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            (
                b"0005 ; a = \"q;\\\"\"\r\nhello\r\n000\r\n\r\n",
                TrailerPolicy::Drop,
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            (
                b"00010\r\n0123456789abcdef\r\n0\r\n\r\n",
                TrailerPolicy::Drop,
                b"10\r\n0123456789abcdef\r\n0\r\n\r\n",
            ),
            (
                b"1\r\nx\r\n0\r\nAuthorization: a\r\nX-Sum: 1\r\n\r\n",
                TrailerPolicy::Drop,
                b"1\r\nx\r\n0\r\n\r\n",
            ),
            (
                b"1\r\nx\r\n0\r\nAuthorization: a\r\nX-Sum: 1\r\nhost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nIf-Match: x\r\nConnection: close\r\nX_Sum: 2\r\nServer-Timing: t\r\n\r\n",
                TrailerPolicy::Filter,
                b"1\r\nx\r\n0\r\nX-Sum: 1\r\nServer-Timing: t\r\n\r\n",
            ),
            (
                b"0\r\nX-Sum: 1\r\n\r\n",
                TrailerPolicy::Filter,
                b"0\r\nX-Sum: 1\r\n\r\n",
            ),
        ];
        for (input, policy, want) in cases {
            let (whole, n) = reframe_pieces(input, &[], *policy).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&whole),
                String::from_utf8_lossy(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
            assert_eq!(n, input.len());
            // Split at every byte, and byte by byte: the same output.
            for cut in 0..=input.len() {
                let (split, _) = reframe_pieces(input, &[cut], *policy).unwrap();
                assert_eq!(split, whole, "cut {cut}");
            }
            let cuts: Vec<usize> = (0..input.len()).collect();
            assert_eq!(reframe_pieces(input, &cuts, *policy).unwrap().0, whole);
        }
    }

    #[test]
    fn reframe_refuses_what_the_scanner_refuses() {
        for input in [
            &b"5;\r\nhello\r\n0\r\n\r\n"[..],
            b"5 \r\nhello\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                reframe_pieces(input, &[], TrailerPolicy::Drop),
                Err(ChunkError::BadExtension)
            );
        }
        assert_eq!(
            reframe_pieces(b"10000000000000000\r\n", &[], TrailerPolicy::Drop),
            Err(ChunkError::SizeOverflow)
        );
        // A size line cut short waits, carried over, without being consumed.
        let mut r = ChunkedReframer::new(TrailerPolicy::Drop);
        let mut out = BytesMut::new();
        let f = r.reframe(b"5\r\nhello\r\n00", &mut out).unwrap();
        assert_eq!(f.consumed, 10);
        assert!(!f.done);
    }

    #[test]
    fn reframe_deny_hook() {
        let mut r = ChunkedReframer::new(TrailerPolicy::Filter);
        let mut out = BytesMut::new();
        let f = r
            .reframe_with(b"0\r\nX-Consumer: a\r\nX-Sum: 1\r\n\r\n", &mut out, |n| {
                n.eq_ignore_ascii_case(b"x-consumer")
            })
            .unwrap();
        assert!(f.done && !f.verbatim);
        assert_eq!(&out[..], b"0\r\nX-Sum: 1\r\n\r\n");
        // Reused: a new body with another policy.
        r.reset(TrailerPolicy::Drop);
        out.clear();
        let f = r.reframe(b"0\r\nX-Sum: 1\r\n\r\n", &mut out).unwrap();
        assert!(f.done);
        assert_eq!(&out[..], b"0\r\n\r\n");
    }

    #[test]
    fn reframe_body_shares_canonical_bytes() {
        let raw = bytes::Bytes::from_static(b"3\r\nabc\r\n0\r\n\r\nrest");
        let b = reframe_body(raw.clone(), TrailerPolicy::Drop).unwrap();
        assert_eq!(&b[..], b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(b.as_ptr(), raw.as_ptr());
        let b = reframe_body(
            bytes::Bytes::from_static(b"3;x\r\nabc\r\n0\r\n\r\n"),
            TrailerPolicy::Drop,
        )
        .unwrap();
        assert_eq!(&b[..], b"3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(
            reframe_body(bytes::Bytes::from_static(b"3\r\nab"), TrailerPolicy::Drop),
            Err(ChunkError::Truncated)
        );
    }

    #[test]
    fn trailer_names() {
        for ok in [&b"X-Sum"[..], b"Server-Timing", b"Content-Digest", b"ETag"] {
            assert!(trailer_allowed(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"content-length"[..],
            b"Transfer-Encoding",
            b"HOST",
            b"Authorization",
            b"Cookie",
            b"If-None-Match",
            b"if-x",
            b"TE",
            b"Trailer",
            b"Keep-Alive",
            b"Upgrade",
            b"X_Y",
            b"",
            b"X-Forwarded-For",
        ] {
            assert!(!trailer_allowed(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn counts_data() {
        let mut s = ChunkedScanner::new();
        s.scan(VALID, |_, _| {}).unwrap();
        assert_eq!(s.data_total, 15);
    }

    /// The declared total counts a chunk's size as soon as its line is read, and stays put
    /// while its data arrives.
    #[test]
    fn declared_total_counts_a_chunk_at_its_size_line() {
        let mut s = ChunkedScanner::new();
        s.scan(b"3\r\nabc\r\n", |_, _| {}).unwrap();
        assert_eq!(s.declared_total(), 3);
        s.scan(b"ffffffffffffffff\r\nxy", |_, _| {}).unwrap();
        assert_eq!(s.declared_total(), u64::MAX);
        assert_eq!(s.data_total, 5);
        let mut r = ChunkedReframer::new(TrailerPolicy::Drop);
        let mut out = BytesMut::new();
        r.reframe(b"100000\r\n", &mut out).unwrap();
        assert_eq!((r.declared_total(), r.data_total()), (0x100000, 0));
    }

    /// `scan_to_trailer` stops where the first trailer field line starts, and a re-framer
    /// that takes over from there filters the trailer section (RFC 9110 §6.5.1), at every
    /// split of the input; a body without trailer fields scans to its end as with `scan`.
    #[test]
    fn scan_to_trailer_hands_the_trailers_over() {
        let body: &[u8] = b"5\r\nhello\r\n0\r\nSet-Cookie: a\r\nX-Sum: 1\r\nHost: h\r\n\r\n";
        let start = body.len() - b"Set-Cookie: a\r\nX-Sum: 1\r\nHost: h\r\n\r\n".len();
        for cut in 0..=body.len() {
            let mut s = ChunkedScanner::new();
            let mut at = 0;
            for piece in [&body[..cut], &body[cut..]] {
                let r = s
                    .scan_to_trailer(&body[at..at + piece.len()], |_, _| {})
                    .unwrap();
                assert!(!r.done);
                at += r.consumed;
                if at == start {
                    break;
                }
            }
            assert_eq!(at, start, "cut {cut}");
            assert!(s.at_trailer());
            let mut rf = ChunkedReframer::from_scanner(s, TrailerPolicy::Filter);
            let mut out = BytesMut::new();
            let r = rf.reframe(&body[start..], &mut out).unwrap();
            assert!(r.done && !r.verbatim);
            assert_eq!(&out[..], b"X-Sum: 1\r\n\r\n");
        }
        let mut s = ChunkedScanner::new();
        let r = s
            .scan_to_trailer(b"5\r\nhello\r\n0\r\n\r\n", |_, _| {})
            .unwrap();
        assert_eq!((r.consumed, r.done), (15, true));
    }
}
