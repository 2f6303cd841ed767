//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` a client sent
//! is kept when it is valid, else the gateway starts a trace; either way the gateway is a span
//! of its own, whose id goes upstream in a rewritten `traceparent`. `tracestate` is passed
//! through unchanged when it is within bounds, cut by whole members when it is not, and only
//! with a trace the client started.
//!
//! Parsing follows §3.2: version `00` is exactly 55 characters, lowercase hex, a trace id and a
//! parent id that are not all zeros, one `traceparent` field. A higher version (not `ff`) is
//! read as §3.2.4 asks: its first 55 characters as version 00's, followed by the end or a `-`
//! and fields this gateway does not know; the trace is continued as version 00. Only the
//! sampled flag is passed on (§3.2.2.5: flags not defined by version 00 are set to zero).
//! Anything else starts a new trace (and drops `tracestate`, §3.3.1.1: a vendor that could not
//! parse `traceparent` must not use `tracestate`). `tracestate` goes upstream only when it is a
//! valid list (§3.3.1: at most 32 members, keys and values of the specified grammar, no key
//! twice); a list that is not is dropped whole, never passed on half-checked. A valid list
//! longer than [`MAX_TRACESTATE`] is truncated as §3.3.1.5 asks: whole members are removed,
//! first those longer than [`LONG_TRACESTATE_MEMBER`] (from the end of the list), then the
//! last ones, until the rest fits. Nothing here allocates.

use crate::http::request::RequestHead;

/// Length of a version-00 `traceparent` value: `00-` 32 hex `-` 16 hex `-` 2 hex.
pub const TRACEPARENT_LEN: usize = 55;
/// Most characters of `tracestate` passed upstream, counted as §3.3.1.5 counts a combined
/// header: the members and the commas between them, without optional white space. A vendor
/// should propagate at least 512; a longer list is cut by whole members (never one
/// half-written), see [`KeepState`].
pub const MAX_TRACESTATE: usize = 512;
/// §3.3.1.5: when a list must be truncated, members longer than this are removed first.
pub const LONG_TRACESTATE_MEMBER: usize = 128;
/// Most `tracestate` field lines passed upstream (a list has at most 32 members, §3.3.1.1, so
/// more lines than that cannot be a valid list).
pub const MAX_TRACESTATE_LINES: usize = 32;
/// Most members of a `tracestate` list (§3.3.1.1); a longer list is dropped.
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The one trace flag version 00 defines (§3.2.2.5.1); the others are reserved and sent as zero.
pub const SAMPLED: u8 = 0x01;

/// One request's trace context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's own span (the `parent-id` the upstream sees).
    pub span_id: [u8; 8],
    /// The client's span, when the trace came from the client.
    pub parent_id: Option<[u8; 8]>,
    /// trace-flags (bit 0: sampled).
    pub flags: u8,
    /// What of the client's `tracestate` goes upstream.
    pub keep_state: KeepState,
}

/// What of the client's `tracestate` goes upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeepState {
    /// Nothing: no list, not a valid one, or no trace of the client's.
    #[default]
    None,
    /// Its field lines, as they were received (a list within [`MAX_TRACESTATE`] bytes).
    All,
    /// The members whose bits are set (bit `i`: the `i`-th non-empty member, counting across
    /// the field lines in order), joined by commas on one line: a list cut to fit
    /// [`MAX_TRACESTATE`] (§3.3.1.5), or one whose white space and empty members alone made it
    /// longer.
    Members(u32),
}

impl KeepState {
    /// Some `tracestate` goes upstream.
    pub fn any(self) -> bool {
        self != KeepState::None
    }
}

/// Writes the `tracestate` field lines that go upstream, as `keep` says, from the client's
/// values (`values`: the head's `tracestate` values, in order).
pub fn put_tracestate<'a>(
    out: &mut impl bytes::BufMut,
    values: impl Iterator<Item = &'a [u8]>,
    keep: KeepState,
) {
    match keep {
        KeepState::None => {}
        KeepState::All => {
            for v in values {
                out.put_slice(b"tracestate: ");
                out.put_slice(v);
                out.put_slice(b"\r\n");
            }
        }
        KeepState::Members(mask) => {
            out.put_slice(b"tracestate: ");
            let mut first = true;
            for (i, m) in members(values).enumerate().take(MAX_TRACESTATE_MEMBERS) {
                if mask & (1 << i) != 0 {
                    if !first {
                        out.put_u8(b',');
                    }
                    out.put_slice(m);
                    first = false;
                }
            }
            out.put_slice(b"\r\n");
        }
    }
}

/// The non-empty members of a `tracestate` list (its values in order), without their OWS.
fn members<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(crate::http::trim_ows)
        .filter(|m| !m.is_empty())
}

/// The flags of a trace the gateway starts: sampled, since the gateway records the request (its
/// access log line carries the trace id).
pub const NEW_TRACE_FLAGS: u8 = 0x01;

impl TraceContext {
    /// The context of a request: the client's trace when its `traceparent` is valid, a new one
    /// otherwise. `rand` gives the random bits (three calls at most).
    pub fn for_request(head: &RequestHead, mut rand: impl FnMut() -> u64) -> TraceContext {
        let mut values = head.header_values(b"traceparent");
        let first = values.next();
        let parsed = match (first, values.next()) {
            (Some(v), None) => parse_traceparent(v),
            // None, or more than one: no trace to continue (§3.2: one field).
            _ => None,
        };
        let span_id = nonzero8(&mut rand);
        match parsed {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id,
                parent_id: Some(parent),
                flags,
                keep_state: tracestate_kept(head),
            },
            None => TraceContext::fresh(span_id, &mut rand),
        }
    }

    /// A new trace (for a request whose head was refused, or one without a valid parent).
    pub fn new_trace(mut rand: impl FnMut() -> u64) -> TraceContext {
        let span_id = nonzero8(&mut rand);
        TraceContext::fresh(span_id, &mut rand)
    }

    fn fresh(span_id: [u8; 8], rand: &mut impl FnMut() -> u64) -> TraceContext {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&rand().to_be_bytes());
        trace_id[8..].copy_from_slice(&(rand() | 1).to_be_bytes());
        TraceContext {
            trace_id,
            span_id,
            parent_id: None,
            flags: NEW_TRACE_FLAGS,
            keep_state: KeepState::None,
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_into(&self.trace_id, &mut out);
        out
    }

    /// The `traceparent` value sent upstream: this trace, the gateway's span as the parent.
    pub fn traceparent(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        hex_into(&self.trace_id, &mut out[3..35]);
        hex_into(&self.span_id, &mut out[36..52]);
        hex_into(&[self.flags], &mut out[53..55]);
        out
    }
}

/// Parses a `traceparent` value (§3.2.2, and §3.2.4 for a higher version): (trace id, parent
/// id, flags with only the sampled bit kept), or `None` when it is not valid.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < TRACEPARENT_LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut version = [0u8; 1];
    unhex(&v[..2], &mut version)?;
    match version[0] {
        // §3.2.2.1: version 00 has exactly this length.
        0x00 if v.len() != TRACEPARENT_LEN => return None,
        0x00 => {}
        // §3.2.2.1: `ff` is an invalid version.
        0xff => return None,
        // §3.2.4: a higher version may be longer; what follows version 00's fields must
        // start with a dash.
        _ if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0u8; 16];
    let mut parent = [0u8; 8];
    let mut flags = [0u8; 1];
    unhex(&v[3..35], &mut trace_id)?;
    unhex(&v[36..52], &mut parent)?;
    unhex(&v[53..55], &mut flags)?;
    // §3.2.2.3 / §3.2.2.4: all-zero ids are invalid.
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags[0] & SAMPLED))
}

/// What of the client's `tracestate` goes upstream. The list must be valid: at most
/// [`MAX_TRACESTATE_MEMBERS`] members (empty ones are allowed and not counted, §3.3.1.1), each
/// a valid `key=value` (§3.3.1.3), no key twice (§3.3.1.1: keys are unique); else nothing goes.
/// A valid list of at most [`MAX_TRACESTATE`] bytes goes as it came; a longer one goes as its
/// members, cut to fit as §3.3.1.5 asks when they do not.
fn tracestate_kept(head: &RequestHead) -> KeepState {
    let mut total = 0usize;
    let mut lines = 0usize;
    for v in head.header_values(b"tracestate") {
        total = total.saturating_add(v.len());
        lines += 1;
    }
    if lines == 0 || lines > MAX_TRACESTATE_LINES {
        return KeepState::None;
    }
    let mut keys: [&[u8]; MAX_TRACESTATE_MEMBERS] = [&[]; MAX_TRACESTATE_MEMBERS];
    let mut n = 0usize;
    for member in members(head.header_values(b"tracestate")) {
        let Some(key) = tracestate_member_key(member) else {
            return KeepState::None;
        };
        if n == MAX_TRACESTATE_MEMBERS || keys[..n].contains(&key) {
            return KeepState::None;
        }
        keys[n] = key;
        n += 1;
    }
    if total <= MAX_TRACESTATE {
        // The usual case: the lines go as they came, byte for byte.
        return KeepState::All;
    }
    let mut lens = [0usize; MAX_TRACESTATE_MEMBERS];
    for (len, member) in lens
        .iter_mut()
        .zip(members(head.header_values(b"tracestate")))
    {
        *len = member.len();
    }
    match cut_to_fit(&lens[..n]) {
        0 => KeepState::None,
        mask => KeepState::Members(mask),
    }
}

/// The members (by bit, as [`KeepState::Members`]) of a list whose members have the lengths
/// `lens` (at most 32) that fit [`MAX_TRACESTATE`] joined by commas. §3.3.1.5: members longer
/// than [`LONG_TRACESTATE_MEMBER`] are removed first, then members from the end of the list,
/// until the rest fits; nothing is removed from a list that fits.
fn cut_to_fit(lens: &[usize]) -> u32 {
    debug_assert!(lens.len() <= MAX_TRACESTATE_MEMBERS);
    let mut mask = match lens.len() {
        0 => return 0,
        32.. => u32::MAX,
        n => (1u32 << n) - 1,
    };
    let mut count = lens.len();
    let mut size: usize = lens.iter().sum::<usize>() + count - 1;
    // The list's size once member `i` is removed.
    let without = |size: usize, count: usize, len: usize| {
        if count == 1 {
            0
        } else {
            size - len - 1
        }
    };
    for long in [true, false] {
        for (i, &len) in lens.iter().enumerate().rev() {
            if size <= MAX_TRACESTATE {
                return mask;
            }
            if mask & (1 << i) != 0 && (!long || len > LONG_TRACESTATE_MEMBER) {
                size = without(size, count, len);
                count -= 1;
                mask &= !(1 << i);
            }
        }
    }
    mask
}

/// The key of a valid list member `key=value` (§3.3.1.3), or `None`.
///
/// key: `simple-key` (a lowercase letter or digit, then up to 255 of `a-z 0-9 _ - * /`) or
/// `tenant@system` (tenant: a lowercase letter or digit, then up to 240 of those; system: a
/// lowercase letter, then up to 13). A key may start with a digit (as version 2 of the
/// specification allows; version 1 allowed it in tenant ids only).
/// value: 1 to 256 printable ASCII characters other than `,` and `=`, not ending in a space.
fn tracestate_member_key(member: &[u8]) -> Option<&[u8]> {
    fn keychar(c: u8) -> bool {
        matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
    }
    fn part(p: &[u8], max: usize, digit_first: bool) -> bool {
        match p.split_first() {
            Some((&c, rest)) => {
                (c.is_ascii_lowercase() || (digit_first && c.is_ascii_digit()))
                    && rest.len() < max
                    && rest.iter().all(|&c| keychar(c))
            }
            None => false,
        }
    }
    let eq = member.iter().position(|b| *b == b'=')?;
    let (key, value) = (&member[..eq], &member[eq + 1..]);
    let key_ok = match key.iter().position(|b| *b == b'@') {
        None => part(key, 256, true),
        Some(at) => part(&key[..at], 241, true) && part(&key[at + 1..], 14, false),
    };
    let value_ok = !value.is_empty()
        && value.len() <= 256
        && value
            .iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && value.last() != Some(&b' ');
    (key_ok && value_ok).then_some(key)
}

fn nonzero8(rand: &mut impl FnMut() -> u64) -> [u8; 8] {
    (rand() | 1).to_be_bytes()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(src: &[u8], out: &mut [u8]) {
    for (i, b) in src.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

/// Lowercase hex only (§3.2.2: `HEXDIGLC`).
fn unhex(src: &[u8], out: &mut [u8]) -> Option<()> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if src.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(src[2 * i])? << 4) | nib(src[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_parses_and_round_trips() {
        let (t, p, f) = parse_traceparent(GOOD).expect("valid");
        assert_eq!(f, 1);
        let ctx = TraceContext {
            trace_id: t,
            span_id: p,
            parent_id: None,
            flags: f,
            keep_state: KeepState::None,
        };
        assert_eq!(&ctx.traceparent()[..], GOOD);
        assert_eq!(&ctx.trace_id_hex()[..], &GOOD[3..35]);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let bad: &[&[u8]] = &[
            b"",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            b"0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"CC-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // A higher version: what follows the flags must start with a dash (§3.2.4).
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01future",
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"cc-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-\xff1",
        ];
        for b in bad {
            assert!(
                parse_traceparent(b).is_none(),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
        // Every prefix of a good value is refused (and nothing panics).
        for n in 0..GOOD.len() {
            assert!(parse_traceparent(&GOOD[..n]).is_none());
        }
    }

    /// §3.2.4: a higher version is read by version 00's fields; §3.2.2.5: flags other than
    /// sampled are not passed on.
    #[test]
    fn higher_versions_are_read_by_the_version_00_fields_and_only_sampled_is_kept() {
        let id = &GOOD[3..35];
        for v in [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
            b"fe-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            let (t, _, f) = parse_traceparent(v).expect("a higher version is read");
            let ctx = TraceContext {
                trace_id: t,
                flags: f,
                ..TraceContext::default()
            };
            assert_eq!(&ctx.trace_id_hex()[..], id);
            assert_eq!(f, SAMPLED);
        }
        let (_, _, f) =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").unwrap();
        assert_eq!(f, SAMPLED);
        let (_, _, f) =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe").unwrap();
        assert_eq!(f, 0);
    }

    #[test]
    fn tracestate_members_follow_the_key_and_value_grammar() {
        let k = "k".repeat(256);
        let v = "v".repeat(256);
        let good = [
            "foo=1".to_string(),
            "rojo=00f067aa0ba902b7".into(),
            "congo=t61rcWkgMzE".into(),
            "0a=1".into(),
            "a_-*/9=x y".into(),
            "tenant@sys=1".into(),
            "1tenant@s=1".into(),
            format!("{k}=1"),
            format!("a={v}"),
            format!("{}@{}=1", "t".repeat(241), "s".repeat(14)),
            "a=!\"#$%&'()*+-./:;<>?@[]^_`{|}~".into(),
        ];
        for m in &good {
            assert!(tracestate_member_key(m.as_bytes()).is_some(), "{m}");
        }
        let bad = [
            "foo".to_string(),
            "=1".into(),
            "foo=".into(),
            "FOO=1".into(),
            "foo.bar=1".into(),
            "foo =1".into(),
            "foo=1 ".into(),
            "foo=a=b".into(),
            "foo=\x7f".into(),
            "foo=\u{e9}".into(),
            "_foo=1".into(),
            "foo@=1".into(),
            "@foo=1".into(),
            "foo@@bar=1".into(),
            "foo@bar@baz=1".into(),
            "foo@1bar=1".into(),
            format!("{k}k=1"),
            format!("a={v}v"),
            format!("{}@s=1", "t".repeat(242)),
            format!("t@{}=1", "s".repeat(15)),
        ];
        for m in &bad {
            assert!(tracestate_member_key(m.as_bytes()).is_none(), "{m}");
        }
    }

    /// §3.3.1.5: long members first (from the end, as many as needed), then from the end.
    #[test]
    fn an_over_long_list_is_cut_to_fit_by_whole_members() {
        // Fits (with its commas): nothing removed.
        assert_eq!(cut_to_fit(&[100, 100, 100, 100, 108]), 0b11111);
        assert_eq!(cut_to_fit(&[]), 0);
        // 513 with its commas: the one long member goes.
        assert_eq!(cut_to_fit(&[100, 200, 100, 110]), 0b1101);
        // Two long members: the later one goes, which is enough.
        assert_eq!(cut_to_fit(&[200, 3, 200, 3, 200]), 0b01111);
        assert_eq!(cut_to_fit(&[259, 3, 259]), 0b011);
        // All long members go, then the last short ones.
        assert_eq!(
            cut_to_fit(&[300, 100, 300, 100, 100, 100, 100, 100, 100]),
            0b0_0111_1010
        );
        // One member too long for the bound: nothing goes.
        assert_eq!(cut_to_fit(&[513]), 0);
        // 32 members of 20: 671; keeps 24 (24 * 21 - 1 = 503).
        assert_eq!(cut_to_fit(&[20; 32]), (1 << 24) - 1);
    }

    #[test]
    fn new_traces_have_nonzero_ids() {
        let t = TraceContext::new_trace(|| 0);
        assert_ne!(t.trace_id, [0; 16]);
        assert_ne!(t.span_id, [0; 8]);
        assert_eq!(t.flags, NEW_TRACE_FLAGS);
        assert!(parse_traceparent(&t.traceparent()).is_some());
    }
}
