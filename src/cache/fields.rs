//! A stored response's header fields: the bytes of its field lines in one block, and where
//! each line's name and value lie in it.
//!
//! A response stored from an upstream keeps, as its block, the copy of its head that already
//! sits in the object's one allocation (`serve::analyze_response`), and as its lines the
//! parser's spans of the lines it stores: storing one adds no copy, no reference count per
//! line, and dropping one drops one handle and one vector of plain offsets. Fields read back
//! from Redis keep the part of the entry that holds them (`redis::decode`); fields built any
//! other way (merged by a validation, RFC 9111 §4.3.4 and §4.3.5; a head's lines copied for
//! one; tests) get a block of their own ([`Fields::from_pairs`]).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::http::encode::put_header;
use crate::http::{HeaderSpan, Span};

/// Most bytes a block may hold: its spans are `u32` offsets ([`Span`]). A longer list of
/// fields is refused ([`Fields::from_pairs`] gives `None`), never truncated.
pub const MAX_BLOCK_BYTES: usize = u32::MAX as usize;

/// A stored response's header fields, in the order received (names as received too).
#[derive(Clone, Default)]
pub struct Fields {
    /// Holds every line's bytes (for a head's copy, more: the status line, the lines not
    /// stored).
    block: Bytes,
    /// Each stored line's name and value in `block`.
    spans: Vec<HeaderSpan>,
}

/// Borrowed [`Fields`]: a block and the spans of lines in it (a parsed head and the lines
/// kept of it, before they are copied).
#[derive(Clone, Copy)]
pub struct FieldsRef<'a> {
    block: &'a [u8],
    spans: &'a [HeaderSpan],
}

/// The bytes `s` covers in `block`; none when it does not lie in it (every span built here
/// does, but a bad one must not panic).
#[inline]
pub fn part(block: &[u8], s: Span) -> &[u8] {
    block
        .get(s.start as usize..s.end as usize)
        .unwrap_or_default()
}

/// The span of `len` bytes at `at`, when it fits the offsets' width ([`MAX_BLOCK_BYTES`]).
#[inline]
pub fn span(at: usize, len: usize) -> Option<Span> {
    let end = at.checked_add(len)?;
    Some(Span {
        start: u32::try_from(at).ok()?,
        end: u32::try_from(end).ok()?,
    })
}

/// The (name, value) pairs of [`Fields`] or [`FieldsRef`], in order.
#[derive(Clone)]
pub struct Iter<'a> {
    block: &'a [u8],
    spans: std::slice::Iter<'a, HeaderSpan>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let s = self.spans.next()?;
        Some((part(self.block, s.name), part(self.block, s.value)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> FieldsRef<'a> {
    /// The lines `spans` marks in `block`.
    pub fn new(block: &'a [u8], spans: &'a [HeaderSpan]) -> FieldsRef<'a> {
        FieldsRef { block, spans }
    }

    #[inline]
    pub fn iter(self) -> Iter<'a> {
        Iter {
            block: self.block,
            spans: self.spans.iter(),
        }
    }

    pub fn len(self) -> usize {
        self.spans.len()
    }

    /// The block the lines are in.
    pub fn block(self) -> &'a [u8] {
        self.block
    }

    /// The lines' spans in [`FieldsRef::block`], in order.
    pub fn spans(self) -> &'a [HeaderSpan] {
        self.spans
    }

    pub fn is_empty(self) -> bool {
        self.spans.is_empty()
    }
}

impl<'a> From<&'a Fields> for FieldsRef<'a> {
    #[inline]
    fn from(f: &'a Fields) -> FieldsRef<'a> {
        f.view()
    }
}

impl<'a> IntoIterator for FieldsRef<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl Fields {
    /// The lines `spans` marks in `block` (a head's copy and the parser's spans of the lines
    /// stored: offsets in the head are offsets in its copy).
    pub fn from_block(block: Bytes, spans: Vec<HeaderSpan>) -> Fields {
        Fields { block, spans }
    }

    /// `pairs` copied into a block of their own (one allocation, plus the spans' vector);
    /// `None` when their bytes would not fit [`MAX_BLOCK_BYTES`] (checked before anything is
    /// allocated).
    pub fn from_pairs<'p, I>(pairs: I) -> Option<Fields>
    where
        I: IntoIterator<Item = (&'p [u8], &'p [u8])>,
        I::IntoIter: Clone,
    {
        let pairs = pairs.into_iter();
        let mut buf = BytesMut::with_capacity(pairs_len(pairs.clone())?);
        let spans = put_pairs(&mut buf, pairs)?;
        Some(Fields {
            block: buf.freeze(),
            spans,
        })
    }

    #[inline]
    pub fn view(&self) -> FieldsRef<'_> {
        FieldsRef {
            block: &self.block,
            spans: &self.spans,
        }
    }

    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        self.view().iter()
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The bytes these fields hold in memory: their whole block (for fields stored from a
    /// head, its copy: the status line and the lines not stored count too) and their spans.
    pub fn weight(&self) -> usize {
        self.block
            .len()
            .saturating_add(self.spans.len() * std::mem::size_of::<HeaderSpan>())
    }

    /// Keeps the lines `keep` accepts, in order (the block stays as it is).
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8], &[u8]) -> bool) {
        let block = &self.block;
        self.spans
            .retain(|s| keep(part(block, s.name), part(block, s.value)));
    }

    /// The block, and the spans' vector emptied, for other fields to reuse.
    pub fn into_parts(self) -> (Bytes, Vec<HeaderSpan>) {
        let mut spans = self.spans;
        spans.clear();
        (self.block, spans)
    }

    /// Writes the lines `keep` accepts (by name) to `out` as [`put_header`] writes them
    /// (`name: value` CRLF), in order. Lines whose bytes in the block are already that (the
    /// lines of a head stored as received, mostly), one right after another, are copied in
    /// one piece: a run of them is one copy instead of four writes each. The output is the
    /// same byte for byte either way (a test compares the two).
    pub fn put_lines(&self, out: &mut BytesMut, mut keep: impl FnMut(&[u8]) -> bool) {
        let block = &self.block[..];
        // The pending run of lines copied as they stand, `start..end` in `block`.
        let (mut start, mut end) = (0usize, 0usize);
        let flush = |out: &mut BytesMut, start: usize, end: usize| {
            if let Some(run) = block.get(start..end).filter(|r| !r.is_empty()) {
                out.put_slice(run);
            }
        };
        for s in &self.spans {
            let name = part(block, s.name);
            if !keep(name) {
                continue;
            }
            let (ns, ne) = (s.name.start as usize, s.name.end as usize);
            let (vs, ve) = (s.value.start as usize, s.value.end as usize);
            let line_end = ve + 2;
            // `: ` right after the name, the value right after it, CRLF right after the value.
            let exact = ns < ne
                && vs == ne + 2
                && vs <= ve
                && block
                    .get(ne..line_end)
                    .is_some_and(|rest| rest.starts_with(b": ") && rest.ends_with(b"\r\n"));
            if exact {
                if end != start && end == ns {
                    end = line_end;
                } else {
                    flush(out, start, end);
                    (start, end) = (ns, line_end);
                }
            } else {
                flush(out, start, end);
                (start, end) = (0, 0);
                put_header(out, name, part(block, s.value));
            }
        }
        flush(out, start, end);
    }

    /// Room in the spans' vector (0: it holds no allocation).
    pub fn spans_capacity(&self) -> usize {
        self.spans.capacity()
    }
}

/// The bytes `pairs` hold, when they fit [`MAX_BLOCK_BYTES`].
pub fn pairs_len<'p>(pairs: impl Iterator<Item = (&'p [u8], &'p [u8])>) -> Option<usize> {
    let mut n = 0usize;
    for (name, value) in pairs {
        n = n.checked_add(name.len())?.checked_add(value.len())?;
    }
    (n <= MAX_BLOCK_BYTES).then_some(n)
}

/// Appends each pair's name and value to `buf` and gives their spans, as offsets from the
/// start of `buf` (a block made of `buf` starts there); `None`, `buf` partly written, when an
/// offset would not fit [`MAX_BLOCK_BYTES`].
pub fn put_pairs<'p>(
    buf: &mut BytesMut,
    pairs: impl Iterator<Item = (&'p [u8], &'p [u8])>,
) -> Option<Vec<HeaderSpan>> {
    let mut spans = Vec::with_capacity(pairs.size_hint().0);
    for (name, value) in pairs {
        let name_at = span(buf.len(), name.len())?;
        buf.extend_from_slice(name);
        let value_at = span(buf.len(), value.len())?;
        buf.extend_from_slice(value);
        spans.push(HeaderSpan {
            name: name_at,
            value: value_at,
        });
    }
    Some(spans)
}

/// Equal when they hold the same pairs in the same order (wherever their bytes lie).
impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Fields {}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::response::{parse_response, ResponseHead};
    use proptest::prelude::*;

    /// A field name: a token (RFC 9110 §5.1), in any case.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}".prop_map(String::into_bytes)
    }

    /// A field value (RFC 9110 §5.5): visible bytes, obs-text, spaces and tabs inside, none
    /// at either end (a parser takes those off); empty ones too.
    fn value() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![0x21u8..=0x7e, 0x80u8..=0xff, Just(b' '), Just(b'\t')];
        prop::collection::vec(byte, 0..40).prop_map(|mut v| {
            while v.last().is_some_and(|b| matches!(b, b' ' | b'\t')) {
                v.pop();
            }
            while v.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
                v.remove(0);
            }
            v
        })
    }

    /// Names the response parser reads as framing (refused or handled apart): not generated.
    fn framing(n: &[u8]) -> bool {
        n.eq_ignore_ascii_case(b"content-length") || n.eq_ignore_ascii_case(b"transfer-encoding")
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Fields built over a head's copy from the parser's spans, and fields copied from a
        /// list, give back the same (name, value) pairs, those of the list, in order.
        #[test]
        fn a_head_and_a_list_give_the_same_pairs(
            lines in prop::collection::vec((name(), value()), 0..60),
        ) {
            let lines: Vec<_> = lines.into_iter().filter(|(n, _)| !framing(n)).collect();
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for (n, v) in &lines {
                raw.extend_from_slice(n);
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(v);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
            let mut head = ResponseHead::default();
            let n = parse_response(&raw, false, &mut head).expect("parsed");
            prop_assert_eq!(n, Some(raw.len()));
            let copy = Bytes::copy_from_slice(&raw);
            let from_head = Fields::from_block(copy, head.headers.clone());
            let pairs = lines.iter().map(|(n, v)| (&n[..], &v[..]));
            let from_list = Fields::from_pairs(pairs.clone()).expect("fits");
            prop_assert!(from_head.iter().eq(pairs.clone()));
            prop_assert!(from_list.iter().eq(pairs.clone()));
            prop_assert_eq!(&from_head, &from_list);
            prop_assert_eq!(from_list.len(), lines.len());
            // A list's block holds its bytes and nothing else.
            let bytes: usize = lines.iter().map(|(n, v)| n.len() + v.len()).sum();
            prop_assert_eq!(from_list.weight(), bytes + lines.len() * 16);
            // Retained lines keep their order and bytes.
            let mut kept = from_head.clone();
            kept.retain(|n, _| n.len() % 2 == 0);
            prop_assert!(kept.iter().eq(pairs.filter(|(n, _)| n.len() % 2 == 0)));
        }
    }

    /// What [`Fields::put_lines`] writes: every kept line as `put_header` writes it.
    fn put_one_by_one(f: &Fields, keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (n, v) in f {
            if keep(n) {
                put_header(&mut out, n, v);
            }
        }
        out.to_vec()
    }

    fn put_merged(f: &Fields, keep: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let mut out = BytesMut::from(&b"before\r\n"[..]);
        f.put_lines(&mut out, keep);
        out[8..].to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// `put_lines` writes what `put_header` writes line by line, whatever the lines' form
        /// in the head (OWS after the colon or none, spaces before the line end, a bare LF)
        /// and whichever lines are left out.
        #[test]
        fn put_lines_writes_what_put_header_writes(
            lines in prop::collection::vec(
                (name(), value(), prop::sample::select(vec![": ", ":", ":  ", ":\t"]),
                 prop::sample::select(vec!["\r\n", "\n", " \r\n"]), any::<bool>()),
                0..30,
            ),
        ) {
            let lines: Vec<_> = lines.into_iter().filter(|l| !framing(&l.0)).collect();
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for (n, v, sep, end, _) in &lines {
                raw.extend_from_slice(n);
                raw.extend_from_slice(sep.as_bytes());
                raw.extend_from_slice(v);
                raw.extend_from_slice(end.as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let mut head = ResponseHead::default();
            prop_assert_eq!(parse_response(&raw, false, &mut head).expect("parsed"), Some(raw.len()));
            let from_head = Fields::from_block(Bytes::copy_from_slice(&raw), head.headers.clone());
            let from_list = Fields::from_pairs(from_head.iter()).expect("fits");
            let dropped: Vec<&[u8]> = lines.iter().filter(|l| l.4).map(|l| &l.0[..]).collect();
            let keep = |n: &[u8]| !dropped.contains(&n);
            for f in [&from_head, &from_list] {
                prop_assert_eq!(put_merged(f, keep), put_one_by_one(f, keep));
                prop_assert_eq!(put_merged(f, |_| true), put_one_by_one(f, |_| true));
            }
        }
    }

    /// A list whose bytes would not fit the spans' `u32` offsets is refused before anything
    /// is allocated (the same 1 MiB lent 4,097 times: past 4 GiB).
    #[test]
    fn a_block_past_the_offsets_width_is_refused() {
        let big = vec![b'a'; 1 << 20];
        let pairs = std::iter::repeat_n((&big[..], &b""[..]), 4097);
        assert!(pairs_len(pairs.clone()).is_none());
        assert!(Fields::from_pairs(pairs).is_none());
        let fits = std::iter::repeat_n((&big[..], &b"v"[..]), 3);
        assert_eq!(pairs_len(fits), Some(3 * ((1 << 20) + 1)));
        assert_eq!(span(MAX_BLOCK_BYTES, 0).map(|s| s.end), Some(u32::MAX));
        assert!(span(MAX_BLOCK_BYTES, 1).is_none());
        assert!(span(MAX_BLOCK_BYTES + 1, 0).is_none());
        assert!(span(usize::MAX, 1).is_none());
    }

    /// A span that does not lie in its block (none is built so, but one must not panic)
    /// reads as empty.
    #[test]
    fn a_span_outside_its_block_reads_empty() {
        let f = Fields::from_block(
            Bytes::from_static(b"abcd"),
            vec![
                HeaderSpan {
                    name: Span { start: 2, end: 9 },
                    value: Span { start: 3, end: 1 },
                },
                HeaderSpan {
                    name: Span { start: 0, end: 1 },
                    value: Span { start: 1, end: 4 },
                },
            ],
        );
        let got: Vec<_> = f.iter().collect();
        assert_eq!(got, [(&b""[..], &b""[..]), (&b"a"[..], &b"bcd"[..])]);
    }
}
